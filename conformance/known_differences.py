"""Documented, accepted differences between an implementation and the documented behaviour.

Keyed by (implementation, api). A failing row listed here is reported with verdict KNOWN-DIFFERENCE and its reason
instead of VIOLATION; a listed row that passes is flagged as a stale entry. Add an entry only with a reason a reader
can verify (a documented upstream deviation, a deliberate design decision of ours).
"""

from __future__ import annotations

KNOWN_DIFFERENCES: dict[tuple[str, str], str] = {}


def known_difference(impl: str, api: str) -> str | None:
    return KNOWN_DIFFERENCES.get((impl, api))
