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
    section: str = ""  # per-hardware tables group rows under a heading ("Elastic Agent", ...)

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


def _is_hardware_header(line: str) -> bool:
    cells = [c.strip().lower() for c in line.strip().strip("|").split("|")]
    return len(cells) >= 3 and cells[:2] == ["section", "api"]


def parse_markdown(text: str, source: str = "<table>") -> list[Row]:
    header = next((ln for ln in text.splitlines() if ln.strip().startswith("|")), "")
    if _is_hardware_header(header):
        names = ", ".join(repr(c) for c in parse_hardware_markdown(text, source).columns)
        raise TableError(f"{source} has one column per hardware; choose one with --hardware (one of {names})")
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


_MARKS = {"✔": True, "✘": False}
_NEW_SUFFIX = " (new)"


@dataclass(frozen=True)
class HardwareEntry:
    section: str
    api: str
    new: bool  # marked "(new)": in this table but not in the older 104-row one
    claims: tuple[bool, ...]  # one per column of HardwareTable.columns
    line: int


@dataclass(frozen=True)
class HardwareTable:
    """A vendor table with one ✔/✘ column per hardware (``|section|API|Atlas A2 training|...|``)."""

    source: str
    preamble: str  # the text above the table, kept so the observed table can be written in the same layout
    columns: tuple[str, ...]
    entries: tuple[HardwareEntry, ...]

    def column(self, hardware: str | None) -> str:
        """The column ``--hardware`` names: exact, or a unique case-insensitive prefix ("Atlas A2")."""
        names = ", ".join(repr(c) for c in self.columns)
        if not hardware:
            raise TableError(f"{self.source} has one column per hardware; choose one with --hardware (one of {names})")
        wanted = " ".join(hardware.split()).lower()
        exact = [c for c in self.columns if c.lower() == wanted]
        matches = exact or [c for c in self.columns if c.lower().startswith(wanted)]
        if len(matches) != 1:
            raise TableError(f"--hardware {hardware!r} is not a column of {self.source}; one of {names}")
        return matches[0]

    def rows(self, hardware: str) -> list[Row]:
        index = self.columns.index(hardware)
        return [Row(e.api, e.claims[index], "new in this table" if e.new else "-", e.line, e.section)
                for e in self.entries]


def parse_hardware_markdown(text: str, source: str = "<table>") -> HardwareTable:
    columns: tuple[str, ...] = ()
    entries: list[HardwareEntry] = []
    preamble: list[str] = []
    state = "before-header"
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not stripped.startswith("|"):
            if state == "before-header":
                preamble.append(raw)
            elif state == "body" and stripped:
                raise TableError(f"{source}:{number}: text inside the table; every row must start with '|'")
            continue
        if not stripped.endswith("|") or len(stripped) < 2:
            raise TableError(f"{source}:{number}: table row must start and end with '|': {stripped!r}")
        cells = [c.strip() for c in stripped[1:-1].split("|")]
        if state == "before-header":
            if not _is_hardware_header(stripped) or not all(cells[2:]):
                raise TableError(f"{source}:{number}: header must be section|API|<hardware>..., got {stripped!r}")
            columns = tuple(cells[2:])
            state = "separator"
            continue
        if state == "separator":
            if len(cells) != len(columns) + 2 or not all(re.fullmatch(r":?-+:?", c) for c in cells):
                raise TableError(f"{source}:{number}: expected the separator row of {len(columns) + 2} cells, "
                                 f"got {stripped!r}")
            state = "body"
            continue
        if len(cells) != len(columns) + 2:
            raise TableError(f"{source}:{number}: expected {len(columns) + 2} cells (section, API, "
                             f"{', '.join(columns)}), got {len(cells)}: {stripped!r}")
        section, api, marks = cells[0], cells[1], cells[2:]
        new = api.endswith(_NEW_SUFFIX)
        api = api[: -len(_NEW_SUFFIX)].strip() if new else api
        if not api.startswith(API_PREFIX) or not _DOTTED.match(api):
            raise TableError(f"{source}:{number}: api {api!r} is not a dotted path under {API_PREFIX.rstrip('.')!r}")
        for column, mark in zip(columns, marks, strict=True):
            if mark not in _MARKS:
                raise TableError(f"{source}:{number}: {column} value {mark!r} for {api} must be ✔ or ✘")
        entries.append(HardwareEntry(section, api, new, tuple(_MARKS[m] for m in marks), number))
    if state != "body":
        raise TableError(f"{source}: no table with header |section|API|<hardware>...| found")
    _no_duplicates(source, [Row(e.api, True, "", e.line) for e in entries])
    return HardwareTable(source, "\n".join(preamble).strip(), columns, tuple(entries))


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


def _read(path: Path, hint: str = "") -> str:
    try:
        # utf-8-sig: a spreadsheet's "CSV UTF-8" export starts with a byte order mark, which is no part of the header
        return path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise TableError(f"cannot read table {str(path)!r}: {exc.strerror or exc}{hint}") from None
    except UnicodeDecodeError:
        raise TableError(f"table {str(path)!r} is not UTF-8 text") from None


def load_table(path: str | Path) -> list[Row]:
    """Read a ``.md`` or ``.csv`` support table; other suffixes are sniffed from the first non-blank line."""
    path = Path(path)
    text = _read(path)
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


ALL_SUPPORTED = "all-supported"
# Named tables: the bundled data files, so a vendor can say which claims are certified without a path.
NAMED_TABLES = {"published": "support_table.md", "ascend-2.13": "support_table_ascend_2.13.md"}
ALL_DOCUMENTED = "ascend-2.13"  # the longest list of documented APIs we hold: the rows of --table all-supported


@dataclass(frozen=True)
class Claims:
    """What a certification checks the implementation against: the rows and the claim of each."""

    name: str  # the table file's name, or 'all-supported'
    rows: list[Row]
    hardware: str | None = None  # the certified column of a per-hardware table
    layout: HardwareTable | None = None  # for writing the observed table in the vendor's own layout


def _named(name: str) -> Path:
    return Path(__file__).with_name(NAMED_TABLES[name])


def load_claims(spec: str | Path | None, hardware: str | None = None) -> Claims:
    """``--table`` (a path, ``published``, ``ascend-2.13`` or ``all-supported``) and ``--hardware``.

    ``all-supported`` claims every documented API supported, as elastic_impl and upstream do, so every row of the
    certification can fail (a table's "no" turns a failure into CLAIMED-UNSUPPORTED).
    """
    if spec == ALL_SUPPORTED:
        if hardware:
            raise TableError(f"--hardware {hardware!r} applies only to a per-hardware table, not {ALL_SUPPORTED}")
        hw = parse_hardware_markdown(_read(_named(ALL_DOCUMENTED)), NAMED_TABLES[ALL_DOCUMENTED])
        rows = [Row(e.api, True, "-", e.line, e.section) for e in hw.entries]
        return Claims(ALL_SUPPORTED, rows)
    path = default_table_path() if spec is None else _named(str(spec)) if str(spec) in NAMED_TABLES else Path(spec)
    names = ", ".join([*NAMED_TABLES, ALL_SUPPORTED])
    text = _read(path, "" if spec is None or str(spec) in NAMED_TABLES else
                 f"; --table takes a table file (.md or .csv) or one of {names}")
    header = next((ln for ln in text.splitlines() if ln.strip().startswith("|")), "")
    if path.suffix.lower() != ".csv" and _is_hardware_header(header):
        layout = parse_hardware_markdown(text, path.name)
        column = layout.column(hardware)
        return Claims(path.name, layout.rows(column), column, layout)
    if hardware:
        raise TableError(f"--hardware {hardware!r} applies only to a per-hardware table; {path.name} has one "
                         "supported column")
    return Claims(path.name, load_table(path))


def default_table_path() -> Path:
    """The published table: the shared copy if present, else the copy shipped with the suite."""
    shared = Path("/work/shared/support_table.md")
    bundled = Path(__file__).with_name("support_table.md")
    return bundled if bundled.exists() else shared
