"""Parse the published API support table (Markdown pipe table or CSV) into rows.

A malformed table is a user error: it raises :class:`TableError` whose message is one line naming the file, the line
number and what was expected, so the CLI can print it without a traceback.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

API_PREFIX = "torch.distributed.elastic."
_DOTTED = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+$")
_SUPPORTED_VALUES = {"yes": True, "no": False}
_HEADER = ("api", "supported", "notes")


class TableError(ValueError):
    """The support table cannot be used; the message is a single line."""


@dataclass(frozen=True)
class Row:
    api: str
    supported: bool
    notes: str
    line: int

    @property
    def claimed(self) -> str:
        return "yes" if self.supported else "no"

    @property
    def short_api(self) -> str:
        return self.api[len(API_PREFIX):]


def _make_row(source: str, line: int, cells: list[str]) -> Row:
    if len(cells) != 3:
        raise TableError(
            f"{source}:{line}: expected 3 cells (api, supported, notes), got {len(cells)}: {'|'.join(cells)!r}"
        )
    api, supported, notes = (c.strip() for c in cells)
    if not api.startswith(API_PREFIX) or not _DOTTED.match(api):
        raise TableError(
            f"{source}:{line}: api {api!r} is not a dotted path under {API_PREFIX.rstrip('.')!r}"
        )
    key = supported.lower()
    if key not in _SUPPORTED_VALUES:
        raise TableError(f"{source}:{line}: supported value {supported!r} for {api} must be 'yes' or 'no'")
    return Row(api=api, supported=_SUPPORTED_VALUES[key], notes=notes, line=line)


def _check_header(source: str, line: int, cells: list[str]) -> None:
    names = tuple(c.strip().lower() for c in cells)
    if names != _HEADER:
        raise TableError(f"{source}:{line}: header must be api|supported|notes, got {'|'.join(cells)!r}")


def parse_markdown(text: str, source: str = "<table>") -> list[Row]:
    rows: list[Row] = []
    state = "before-header"  # -> "separator" -> "body"
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not stripped.startswith("|"):
            if state == "body" and stripped:
                raise TableError(f"{source}:{number}: text inside the table; every row must start with '|'")
            continue
        if not stripped.endswith("|") or len(stripped) < 2:
            raise TableError(f"{source}:{number}: table row must start and end with '|': {stripped!r}")
        cells = stripped[1:-1].split("|")
        if state == "before-header":
            _check_header(source, number, cells)
            state = "separator"
        elif state == "separator":
            if not all(re.fullmatch(r"\s*:?-+:?\s*", c) for c in cells) or len(cells) != 3:
                raise TableError(f"{source}:{number}: expected the separator row |--|--|--|, got {stripped!r}")
            state = "body"
        else:
            rows.append(_make_row(source, number, cells))
    if state != "body":
        raise TableError(f"{source}: no table with header |api|supported|notes| found")
    return _no_duplicates(source, rows)


def parse_csv(text: str, source: str = "<table>") -> list[Row]:
    reader = csv.reader(io.StringIO(text))
    rows: list[Row] = []
    header_seen = False
    for cells in reader:
        number = reader.line_num
        if not cells or all(not c.strip() for c in cells):
            continue
        if not header_seen:
            _check_header(source, number, cells)
            header_seen = True
            continue
        rows.append(_make_row(source, number, cells))
    if not header_seen:
        raise TableError(f"{source}: empty CSV; expected a header api,supported,notes")
    return _no_duplicates(source, rows)


def _no_duplicates(source: str, rows: list[Row]) -> list[Row]:
    seen: dict[str, int] = {}
    for row in rows:
        if row.api in seen:
            raise TableError(f"{source}:{row.line}: duplicate api {row.api} (first on line {seen[row.api]})")
        seen[row.api] = row.line
    if not rows:
        raise TableError(f"{source}: the table has no rows")
    return rows


def load_table(path: str | Path) -> list[Row]:
    """Read a ``.md`` or ``.csv`` support table; other suffixes are sniffed from the first non-blank line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise TableError(f"cannot read table {str(path)!r}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise TableError(f"table {str(path)!r} is not UTF-8 text") from None
    if path.suffix.lower() == ".csv":
        return parse_csv(text, path.name)
    if path.suffix.lower() in (".md", ".markdown"):
        return parse_markdown(text, path.name)
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    if first.lower().startswith("api,"):
        return parse_csv(text, path.name)
    return parse_markdown(text, path.name)


def validate_paths(rows: Iterable[Row], exists: Callable[[str], bool], source: str = "<table>") -> None:
    """Reject rows naming an API that the reference implementation does not have."""
    for row in rows:
        if not exists(row.api):
            raise TableError(f"{source}:{row.line}: api {row.api} does not exist in the reference implementation")


def default_table_path() -> Path:
    """The published table: the shared copy if present, else the copy shipped with the suite."""
    shared = Path("/work/shared/support_table.md")
    bundled = Path(__file__).with_name("support_table.md")
    return bundled if bundled.exists() else shared
