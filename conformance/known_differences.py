"""Documented, accepted differences between an implementation and the documented behaviour.

Keyed by (implementation, api). A failing row listed here is reported with verdict KNOWN-DIFFERENCE and its reason
instead of VIOLATION; a listed row that passes is flagged as a stale entry. Add an entry only with a reason a reader
can verify (a documented upstream deviation, a deliberate design decision of ours).
"""

from __future__ import annotations

KNOWN_DIFFERENCES: dict[tuple[str, str], str] = {}

# Narrower: only the signature comparison of the row is waived (its behaviour is still checked), for parameter
# lists that are not user API.
SIGNATURE_DIFFERENCES: dict[tuple[str, str], str] = {
    ("elastic_impl", "torch.distributed.elastic.rendezvous.dynamic_rendezvous.DynamicRendezvousHandler"): (
        "the constructor takes private types (upstream: _NodeDesc, RendezvousSettings, _RendezvousStateHolder); "
        "the documented way to build the handler is from_backend()/create_handler(), whose signatures are checked. "
        "Ours takes the RendezvousBackend instead of upstream's private state holder."
    ),
}


def known_difference(impl: str, api: str) -> str | None:
    return KNOWN_DIFFERENCES.get((impl, api))


def signature_difference(impl: str, api: str) -> str | None:
    return SIGNATURE_DIFFERENCES.get((impl, api))
