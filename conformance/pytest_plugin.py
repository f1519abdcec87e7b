"""pytest plugin: ``pytest --conformance-impl=elastic_impl|torch [--conformance-device=...]`` adds one item per row.

Without test paths on the command line it runs only those items (see ``_rows_only``); with paths, their tests too.

Loaded for every pytest run through the ``pytest11`` entry point, so module import stays cheap (no torch) and
nothing happens unless ``--conformance-impl`` is given. Verdicts map onto outcomes: VIOLATION / NO-CHECK fail,
SKIPPED skips (with the reason), CONFORMS, CLAIMED-UNSUPPORTED and UNDOCUMENTED-SUPPORT pass and carry the verdict
as a user property (it is in JUnit XML and in ``-rA`` output).
"""

from __future__ import annotations

import pytest

_STATE_KEY = "_conformance_state"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("conformance", "elastic conformance suite")
    group.addoption("--conformance-impl", default=None, metavar="IMPL",
                    help="add one test per support-table row, run against IMPL (elastic_impl, torch or a package)")
    group.addoption("--conformance-device", default="auto", metavar="DEVICE", help="cpu, cuda, npu, hpu or auto")
    group.addoption("--conformance-table", default=None, metavar="TABLE",
                    help="support table (.md, .csv, per-hardware .md), published, ascend-2.13 or all-supported")
    group.addoption("--conformance-hardware", default=None, metavar="HARDWARE",
                    help="the column of a per-hardware table, e.g. 'Atlas A2'")


class ConformanceFailure(AssertionError):
    pass


class ConformanceItem(pytest.Item):
    def __init__(self, *, row, **kwargs) -> None:
        super().__init__(**kwargs)
        self.row = row

    def runtest(self) -> None:
        from conformance.runner import FAILING_VERDICTS, SKIPPED, run_row

        state = _state(self.config)
        result = run_row(self.row, state["resources"], state["snapshot"])
        self.user_properties.append(("verdict", result.verdict))
        self.user_properties.append(("claimed", result.claimed))
        if result.verdict in FAILING_VERDICTS:
            raise ConformanceFailure(f"{result.verdict}: {result.error}")
        if result.verdict == SKIPPED:
            pytest.skip(result.error)

    def repr_failure(self, excinfo, style=None):
        if isinstance(excinfo.value, ConformanceFailure):
            return str(excinfo.value)
        return super().repr_failure(excinfo)

    def reportinfo(self):
        return self.path, None, f"conformance: {self.row.api}"


class ConformanceCollector(pytest.Collector):
    def __init__(self, *, rows, **kwargs) -> None:
        super().__init__(**kwargs)
        self.rows = rows

    def collect(self):
        for row in self.rows:
            yield ConformanceItem.from_parent(self, name=row.short_api, row=row)


def _state(config: pytest.Config) -> dict:
    state = getattr(config, _STATE_KEY, None)
    if state is None:
        raise pytest.UsageError("conformance items run without --conformance-impl")
    if "resources" not in state:
        import tempfile
        from pathlib import Path

        from conformance.context import SuiteResources
        from conformance.registry import load_checks
        from conformance.signatures import load_snapshot

        load_checks()
        state["tmp"] = tempfile.TemporaryDirectory(prefix="conformance-")
        state["resources"] = SuiteResources(state["adapter"], state["device"], Path(state["tmp"].name))
        state["snapshot"] = load_snapshot()
    return state


def _rows_only(config: pytest.Config) -> bool:
    """``--conformance-impl`` and no test paths named: the run is the conformance rows alone, not also the tests
    that ``testpaths`` (or the current directory) would collect -- the repository's whole suite, when run from its
    root. Named paths are collected as usual, with the rows added."""
    return bool(config.getoption("conformance_impl")) and config.args_source != pytest.Config.ArgsSource.ARGS


def pytest_ignore_collect(collection_path, config: pytest.Config) -> bool | None:
    return True if _rows_only(config) else None


@pytest.hookimpl(tryfirst=True)  # before -k/-m deselection sees the items
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list) -> None:
    impl = config.getoption("conformance_impl")
    if not impl:
        return
    from conformance.adapters import AdapterError, get_adapter, reference_adapter
    from conformance.device import DeviceError, detect
    from conformance.table import TableError, load_claims, validate_paths

    try:
        claims = load_claims(config.getoption("conformance_table"), config.getoption("conformance_hardware"))
        rows = claims.rows
        validate_paths(rows, reference_adapter().exists, claims.name)
        adapter = get_adapter(impl)
        device = detect(config.getoption("conformance_device"))
    except (TableError, AdapterError, DeviceError) as exc:
        raise pytest.UsageError(str(exc)) from None
    if not device.available:  # the device-free rows would pass and read as a certification of the device
        raise pytest.UsageError(f"{device.reason}; nothing certified")
    setattr(config, _STATE_KEY, {"adapter": adapter, "device": device})
    collector = ConformanceCollector.from_parent(session, name=f"conformance[{adapter.name}]", rows=rows)
    items.extend(session.genitems(collector))  # through the collection hooks, so reports count the rows


def pytest_unconfigure(config: pytest.Config) -> None:
    state = getattr(config, _STATE_KEY, None)
    if state and "resources" in state:
        state["resources"].close()
        state["tmp"].cleanup()
