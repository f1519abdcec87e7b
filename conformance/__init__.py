"""Conformance suite: certifies an implementation of ``torch.distributed.elastic`` against the support table.

One registered behavioural check per table row (``conformance.checks``), run against our ``elastic_impl`` or
upstream ``torch`` (``conformance.adapters``) on a device (``conformance.device``); results become a terminal
table, ``report.json``, ``report.md`` and JUnit XML (``conformance.report``).
"""
