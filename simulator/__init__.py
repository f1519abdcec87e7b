"""Cluster simulator: live (real agents as processes) and virtual-time (discrete-event) modes.

Follows the Jepsen split: ``generator`` produces operations and faults, ``fault_injection`` (the nemesis)
applies them, ``checker`` verifies invariants over the recorded ``history``.
"""
