"""Differential edge cases of the etcd (v2 API) pieces: EtcdStore, EtcdRendezvousBackend/create_backend and the
legacy EtcdRendezvousHandler, on ``elastic_impl`` and on upstream, against one real etcd (``/usr/bin/etcd``, v2
enabled) that this module starts on first use and stops when the module's tests end (or at interpreter exit).

Every case uses its own run id / key prefix (a fresh uuid), so the two implementations never see each other's keys.
Upstream's etcd pieces need python-etcd (the ``etcd`` package); without it or without the etcd binary the cases skip.
"""

from __future__ import annotations

import atexit
import datetime
import importlib
import socket
import threading
import time
import uuid

import pytest

from tests.differential.harness import UPSTREAM, case, module, outcome, same_behaviour_test

STORE = "rendezvous.etcd_store.EtcdStore"
BACKEND = "rendezvous.etcd_rendezvous_backend.EtcdRendezvousBackend"
CREATE_BACKEND = "rendezvous.etcd_rendezvous_backend.create_backend"
HANDLER = "rendezvous.etcd_rendezvous.EtcdRendezvousHandler"

TD = datetime.timedelta

# --------------------------------------------------------------------------------------------- the one etcd

_SERVER: list = []  # the etcd server of this module, started on first use


def _etcd_address() -> tuple[str, int]:
    if not _SERVER:
        pytest.importorskip("etcd", reason="upstream's etcd pieces need python-etcd")
        etcd_server = importlib.import_module("elastic_impl.rendezvous.etcd_server")
        try:
            etcd_server.find_etcd_binary()
        except FileNotFoundError as e:
            pytest.skip(f"needs the etcd binary: {e}")
        server = etcd_server.EtcdServer()
        try:
            server.start(timeout=60)
        except BaseException:
            server.stop()
            raise
        atexit.register(server.stop)
        _SERVER.append(server)
    return "127.0.0.1", _SERVER[0].get_port()


@pytest.fixture(scope="module", autouse=True)
def _stop_the_etcd_server_after_this_module():
    yield
    while _SERVER:
        server = _SERVER.pop()
        server.stop()
        atexit.unregister(server.stop)


def _endpoint() -> str:
    host, port = _etcd_address()
    return f"{host}:{port}"


def _client():
    import etcd

    host, port = _etcd_address()
    return etcd.Client(host=host, port=port, read_timeout=5)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _dead_client():
    """A python-etcd client of a loopback port nobody listens on."""
    import etcd

    _etcd_address()  # skips like the others when etcd is missing
    return etcd.Client(host="127.0.0.1", port=_free_port(), read_timeout=5)


def _uid(root: str) -> str:
    return ("up" if root == UPSTREAM else "ours") + uuid.uuid4().hex[:10]


def _raw(key: str):
    """("value", value) / ("missing",) of an etcd key, read with a plain python-etcd client."""
    import etcd

    try:
        return ("value", _client().read(key).value)
    except etcd.EtcdKeyNotFound:
        return ("missing",)


def _raw_ttl(key: str):
    ttl = _client().read(key).ttl
    return "default (2 h)" if ttl is not None and ttl > 7000 else ttl


def _store(root: str, timeout: float | None = 0.3, prefix: str | None = None):
    store_cls = module(root, "rendezvous.etcd_store").EtcdStore
    return store_cls(_client(), prefix or f"/diff/store/{_uid(root)}",
                     None if timeout is None else TD(seconds=timeout))


def _backend(root: str, run_id: str | None = None, **kwargs):
    cls = module(root, "rendezvous.etcd_rendezvous_backend").EtcdRendezvousBackend
    kwargs.setdefault("key_prefix", "/diff/rdzv")
    return cls(_client(), run_id or _uid(root), **kwargs)


def _params(root: str, backend: str, endpoint: str | None = None, run_id: str | None = None, min_nodes: int = 1,
            max_nodes: int = 1, **options):
    api = module(root, "rendezvous.api")
    return api.RendezvousParameters(backend=backend, endpoint=_endpoint() if endpoint is None else endpoint,
                                    run_id=run_id or _uid(root), min_nodes=min_nodes, max_nodes=max_nodes, **options)


def _create_backend(root: str, **options):
    return module(root, "rendezvous.etcd_rendezvous_backend").create_backend(_params(root, "etcd-v2", **options))


def _type_names(call) -> tuple:
    """What the caller gets: the type names of the returned objects, or the exception's type name."""
    result = outcome(call, compare_message=False)
    if result[0] == "ok":
        return ("ok", tuple(type(x).__name__ for x in result[1]))
    return result


def _stop_leases(handler) -> None:
    """Both legacy implementations renew their keys from daemon threads until these events are set."""
    impl = getattr(handler, "_rdzv_impl", None)
    for name in ("_lease_run_id_stop", "_lease_this_rank_stop"):
        event = getattr(impl, name, None)
        if event is not None:
            event.set()


def _legacy(root: str, **options):
    legacy = module(root, "rendezvous.etcd_rendezvous")
    options.setdefault("timeout", 5)
    options.setdefault("last_call_timeout", 1)
    return legacy.create_rdzv_handler(_params(root, "etcd", **options))


def _with_legacy(root: str, observe, **options):
    """``observe(handler)`` on a fresh legacy handler, or the exception creating it raised; leases stopped after."""
    try:
        handler = _legacy(root, **options)
    except Exception as e:  # noqa: BLE001 - the creation error is the observation
        return ("create raised", type(e).__name__)
    try:
        return observe(handler)
    finally:
        _stop_leases(handler)


# --------------------------------------------------------------------------------------------- EtcdStore


@case(STORE, f"{STORE}.set", f"{STORE}.get")
def case_etcd_store_set_get_str_and_bytes(root, tmp):
    store = _store(root)
    store.set("s", "text")
    store.set(b"b", b"\x00\xff")
    store.set("mixed", b"\x01")
    store.set("s", "overwritten")
    store.set("empty", "")
    return tuple(store.get(k) for k in ("s", b"b", b"mixed", "empty"))


@case(STORE, f"{STORE}.get")
def case_etcd_store_get_missing_key_times_out(root, tmp):
    store = _store(root, timeout=0.3)
    started = time.monotonic()
    result = outcome(lambda: store.get("missing"), compare_message=False)
    return result, time.monotonic() - started >= 0.25


@case(f"{STORE}.get", f"{STORE}.set")
def case_etcd_store_get_waits_for_a_late_key(root, tmp):
    store = _store(root, timeout=5)
    writer = _store(root, prefix=store.prefix)
    timer = threading.Timer(0.2, lambda: writer.set("late", "v"))
    timer.start()
    try:
        return store.get("late")
    finally:
        timer.cancel()
        timer.join()


@case(STORE)
def case_etcd_store_timeout_and_base_class(root, tmp):
    import torch.distributed as dist

    default = _store(root, timeout=None)
    given = _store(root, timeout=1.5)
    given.set_timeout(TD(seconds=2))
    return default.timeout.total_seconds(), given.timeout.total_seconds(), isinstance(default, dist.Store)


@case(STORE)
def case_etcd_store_prefix_attribute(root, tmp):
    store_cls = module(root, "rendezvous.etcd_store").EtcdStore
    return tuple(store_cls(_client(), p).prefix for p in ("/abs/dir", "/abs/dir/", "rel/dir", "/"))


@case(STORE, f"{STORE}.get", f"{STORE}.set")
def case_etcd_store_relative_prefix_round_trip(root, tmp):
    store = _store(root, timeout=0.3, prefix=f"diff-relative/{_uid(root)}")
    store.set("k", "v")
    return outcome(lambda: store.get("k"), compare_message=False)


@case(STORE)
def case_etcd_store_prefix_none(root, tmp):
    store_cls = module(root, "rendezvous.etcd_store").EtcdStore
    return outcome(lambda: store_cls(_client(), None), compare_message=False)


@case(f"{STORE}.set")
def case_etcd_store_rejects_keys_and_values_that_are_not_str_or_bytes(root, tmp):
    store = _store(root)
    return (outcome(lambda: store.set("k", 1), compare_message=False),
            outcome(lambda: store.set(1, "v"), compare_message=False),
            outcome(lambda: store.set("k", None), compare_message=False))


@case(f"{STORE}.set")
def case_etcd_store_bytearray_value(root, tmp):
    store = _store(root)
    return outcome(lambda: store.set("k", bytearray(b"ab")), compare_message=False)


@case(f"{STORE}.check")
def case_etcd_store_check_missing_and_present(root, tmp):
    store = _store(root)
    before = store.check(["a"])
    store.set("a", "1")
    return before, store.check(["a"]), store.check([b"a"]), store.check(["a", "missing"]), store.check([])


@case(f"{STORE}.check", f"{STORE}.wait")
def case_etcd_store_empty_key_list_on_a_fresh_prefix(root, tmp):
    store = _store(root, timeout=0.2)
    return outcome(lambda: store.check([])), outcome(lambda: store.wait([]), compare_message=False)


@case(f"{STORE}.check", f"{STORE}.wait")
def case_etcd_store_duplicate_keys(root, tmp):
    store = _store(root, timeout=0.2)
    store.set("a", "1")
    return outcome(lambda: store.check(["a", "a"])), outcome(lambda: store.wait(["a", "a"]), compare_message=False)


@case(f"{STORE}.wait")
def case_etcd_store_wait_present_missing_and_timeouts(root, tmp):
    store = _store(root, timeout=5)
    store.set("a", "1")
    store.set("b", "2")
    started = time.monotonic()
    missing = outcome(lambda: store.wait(["a", "zz"], TD(seconds=0.2)), compare_message=False)
    waited = time.monotonic() - started
    return (
        outcome(lambda: store.wait(["a", "b"])),
        outcome(lambda: store.wait(["a"], TD(0))),
        missing, 0.15 <= waited < 2,
        outcome(lambda: store.wait(["zz"], TD(seconds=-1)), compare_message=False),
    )


@case(f"{STORE}.wait")
def case_etcd_store_wait_uses_the_store_timeout_by_default(root, tmp):
    store = _store(root, timeout=0.2)
    started = time.monotonic()
    result = outcome(lambda: store.wait(["never"]), compare_message=False)
    return result, 0.15 <= time.monotonic() - started < 2


@case(f"{STORE}.wait", f"{STORE}.set")
def case_etcd_store_wait_wakes_for_a_late_key(root, tmp):
    store = _store(root, timeout=5)
    store.set("early", "1")
    writer = _store(root, prefix=store.prefix)
    timer = threading.Timer(0.2, lambda: writer.set("late", "2"))
    timer.start()
    try:
        return outcome(lambda: store.wait(["early", "late"]))
    finally:
        timer.cancel()
        timer.join()


@case(f"{STORE}.add", f"{STORE}.get")
def case_etcd_store_add_fresh_existing_zero_negative(root, tmp):
    store = _store(root)
    return store.add("n", 5), store.add("n", 0), store.add("n", -7), store.get("n"), store.add("z", 0), store.get("z")


@case(f"{STORE}.add", f"{STORE}.set")
def case_etcd_store_add_to_a_value_that_was_set(root, tmp):
    store = _store(root)
    store.set("c", "10")
    store.set(b"bytes", b"-3")
    return store.add("c", 1), store.add(b"bytes", 3)


@case(f"{STORE}.add")
def case_etcd_store_add_to_a_non_numeric_value(root, tmp):
    store = _store(root)
    store.set("text", "abc")
    return outcome(lambda: store.add("text", 1), compare_message=False), store.get("text")


@case(f"{STORE}.add")
def case_etcd_store_add_float_amount(root, tmp):
    store = _store(root)
    return outcome(lambda: store.add("f", 1.5), compare_message=False), outcome(lambda: store.get("f"),
                                                                                  compare_message=False)


@case(f"{STORE}.add")
def case_etcd_store_add_str_amount(root, tmp):
    store = _store(root)
    return (outcome(lambda: store.add("s", "3"), compare_message=False),
            outcome(lambda: store.add("s", "3"), compare_message=False))


@case(f"{STORE}.set", f"{STORE}.get")
def case_etcd_store_key_whose_base64_has_a_slash(root, tmp):
    store = _store(root, timeout=0.2)
    return (outcome(lambda: store.set(b"\xff\xff\xff", b"v"), compare_message=False),
            outcome(lambda: store.get(b"\xff\xff\xff"), compare_message=False))


@case(f"{STORE}.set", f"{STORE}.get", f"{STORE}.add", f"{STORE}.check", f"{STORE}.wait")
def case_etcd_store_unreachable_etcd_is_an_etcd_connection_error(root, tmp):
    import etcd

    store = module(root, "rendezvous.etcd_store").EtcdStore(_dead_client(), "/d", TD(seconds=0.2))
    seen = []
    for call in (lambda: store.set("a", "b"), lambda: store.get("a"), lambda: store.add("a", 1),
                 lambda: store.check(["a"]), lambda: store.wait(["a"])):
        try:
            call()
            seen.append("returned")
        except Exception as e:  # noqa: BLE001
            seen.append(isinstance(e, etcd.EtcdConnectionFailed))
    return tuple(seen)


@case(f"{STORE}.set")
def case_etcd_store_unreachable_etcd_is_a_dist_network_error(root, tmp):
    import torch.distributed as dist

    store = module(root, "rendezvous.etcd_store").EtcdStore(_dead_client(), "/d")
    try:
        store.set("a", "b")
    except Exception as e:  # noqa: BLE001
        return isinstance(e, dist.DistNetworkError)
    return "returned"


# --------------------------------------------------------------------------------------------- EtcdRendezvousBackend


@case(BACKEND, f"{BACKEND}.name", f"{BACKEND}.get_state")
def case_etcd_backend_name_and_empty_state(root, tmp):
    backend = _backend(root)
    return backend.name, backend.get_state()


@case(f"{BACKEND}.set_state", f"{BACKEND}.get_state")
def case_etcd_backend_set_state_compare_and_set(root, tmp):
    run_id = _uid(root)
    first, second = _backend(root, run_id), _backend(root, run_id)
    state, token, ok = first.set_state(b"\x00one\xff")
    lost = second.set_state(b"other")
    won = second.set_state(b"two", token)
    stale = first.set_state(b"stale", token)
    return (
        (state, type(token).__name__, ok),
        second.get_state()[0],
        (lost[0], lost[1] == token, lost[2]),
        (won[0], won[1] != token, won[2]),
        (stale[0], stale[1] == won[1], stale[2]),
    )


@case(f"{BACKEND}.set_state")
def case_etcd_backend_set_state_token_zero(root, tmp):
    existing, fresh = _backend(root), _backend(root)
    existing.set_state(b"current")
    lost = existing.set_state(b"zero", 0)
    created = fresh.set_state(b"created", 0)
    return (lost[0], lost[2]), (created[0], created[2]), existing.get_state()[0]


@case(f"{BACKEND}.set_state")
def case_etcd_backend_set_state_token_not_a_number(root, tmp):
    backend = _backend(root)
    backend.set_state(b"current")
    result = backend.set_state(b"new", "not-a-token")
    return result[0], result[2]


@case(f"{BACKEND}.set_state")
def case_etcd_backend_set_state_token_of_another_type(root, tmp):
    backend = _backend(root)
    backend.set_state(b"current")
    return outcome(lambda: backend.set_state(b"new", object())[::2], compare_message=False)


@case(f"{BACKEND}.set_state")
def case_etcd_backend_set_state_token_as_str(root, tmp):
    backend = _backend(root)
    _, token, _ = backend.set_state(b"current")
    result = backend.set_state(b"new", str(token))
    return result[0], result[2], backend.get_state()[0]


@case(f"{BACKEND}.set_state")
def case_etcd_backend_set_state_token_on_missing_state(root, tmp):
    backend = _backend(root)
    return outcome(lambda: backend.set_state(b"new", 5), compare_message=False), backend.get_state()


@case(f"{BACKEND}.set_state")
def case_etcd_backend_set_state_of_a_non_bytes_state(root, tmp):
    backend = _backend(root)
    return (outcome(lambda: backend.set_state(None), compare_message=False),
            outcome(lambda: backend.set_state("text"), compare_message=False),
            backend.set_state(bytearray(b"ba"))[::2])


@case(f"{BACKEND}.set_state", f"{BACKEND}.get_state")
def case_etcd_backend_empty_state_round_trip(root, tmp):
    backend = _backend(root)
    return backend.set_state(b"")[::2], backend.get_state()[0]


@case(BACKEND)
def case_etcd_backend_empty_run_id(root, tmp):
    cls = module(root, "rendezvous.etcd_rendezvous_backend").EtcdRendezvousBackend
    return (outcome(lambda: cls(_client(), ""), compare_message=False),
            outcome(lambda: cls(_client(), None), compare_message=False))


@case(BACKEND, f"{BACKEND}.set_state")
def case_etcd_backend_run_id_with_a_slash(root, tmp):
    group = _uid(root)
    backend = _backend(root, f"{group}/job", key_prefix="/diff/slash")
    return backend.set_state(b"s")[::2], _raw(f"/diff/slash/{group}/job")


@case(BACKEND)
def case_etcd_backend_blank_run_id(root, tmp):
    cls = module(root, "rendezvous.etcd_rendezvous_backend").EtcdRendezvousBackend
    return outcome(lambda: type(cls(_client(), "  ")).__name__, compare_message=False)


@case(BACKEND, f"{BACKEND}.set_state")
def case_etcd_backend_ttl_values(root, tmp):
    seen = []
    for ttl in (None, 0, -5, 30):
        run_id = _uid(root)
        _backend(root, run_id, key_prefix="/diff/ttl", ttl=ttl).set_state(b"s")
        seen.append(_raw_ttl(f"/diff/ttl/{run_id}"))
    return tuple(seen)


@case(BACKEND, f"{BACKEND}.set_state")
def case_etcd_backend_fractional_ttl(root, tmp):
    run_id = _uid(root)
    result = outcome(lambda: _backend(root, run_id, key_prefix="/diff/ttl", ttl=1.5).set_state(b"s")[::2],
                     compare_message=False)
    return result, _raw(f"/diff/ttl/{run_id}")[0]


@case(BACKEND, f"{BACKEND}.set_state")
def case_etcd_backend_key_prefix_forms(root, tmp):
    base = f"/diff/kp/{_uid(root)}"
    seen = []
    for key_prefix, where in ((None, ""), ("", ""), (base.lstrip("/") + "/rel", base + "/rel"),
                              (base + "/abs/", base + "/abs"), (base + "/abs2", base + "/abs2")):
        run_id = _uid(root)
        _backend(root, run_id, key_prefix=key_prefix).set_state(b"s")
        seen.append(_raw(f"{where}/{run_id}")[0])
    return tuple(seen)


@case(f"{BACKEND}.get_state")
def case_etcd_backend_corrupt_state(root, tmp):
    run_id = _uid(root)
    _client().write(f"/diff/rdzv/{run_id}", "%%%")
    return outcome(lambda: _backend(root, run_id).get_state()[0], compare_message=False)


@case(f"{BACKEND}.get_state", f"{BACKEND}.set_state")
def case_etcd_backend_unreachable_etcd(root, tmp):
    cls = module(root, "rendezvous.etcd_rendezvous_backend").EtcdRendezvousBackend
    backend = cls(_dead_client(), "x")
    return (outcome(backend.get_state, compare_message=False),
            outcome(lambda: backend.set_state(b"s"), compare_message=False))


# --------------------------------------------------------------------------------------------- create_backend


@case(CREATE_BACKEND, f"{BACKEND}.name", f"{STORE}.get")
def case_etcd_create_backend_objects_and_where_they_write(root, tmp):
    run_id = _uid(root)
    backend, store = _create_backend(root, run_id=run_id)
    backend.set_state(b"state")
    store.set("k", "v")
    return (type(backend).__name__, type(store).__name__, backend.name, store.prefix,
            _raw(f"/torch/elastic/rendezvous/{run_id}"), store.get("k"))


@case(CREATE_BACKEND)
def case_etcd_create_backend_protocol_spelling(root, tmp):
    return (_type_names(lambda: _create_backend(root, protocol=" HTTP ")),
            _type_names(lambda: _create_backend(root, protocol="http")),
            _type_names(lambda: _create_backend(root, protocol="gopher")),
            _type_names(lambda: _create_backend(root, protocol="")))


@case(CREATE_BACKEND)
def case_etcd_create_backend_bad_read_timeout(root, tmp):
    return tuple(_type_names(lambda v=v: _create_backend(root, read_timeout=v)) for v in ("0", "-1", "abc", "5"))


@case(CREATE_BACKEND)
def case_etcd_create_backend_fractional_read_timeout(root, tmp):
    return _type_names(lambda: _create_backend(root, read_timeout="0.5"))


@case(CREATE_BACKEND)
def case_etcd_create_backend_https_with_missing_cert_files(root, tmp):
    missing = str(tmp / "missing.pem")
    started = time.monotonic()
    seen = (
        _type_names(lambda: _create_backend(root, protocol="https")),
        _type_names(lambda: _create_backend(root, protocol="https", ssl_cert=missing, ssl_cert_key=missing)),
        _type_names(lambda: _create_backend(root, protocol="https", ca_cert=missing)),
    )
    return seen, time.monotonic() - started < 10


@case(CREATE_BACKEND, HANDLER)
def case_etcd_cert_options_over_http(root, tmp):
    missing = str(tmp / "missing.pem")
    return (_type_names(lambda: _create_backend(root, ssl_cert=missing)),
            _with_legacy(root, lambda h: "created", cert=missing))


@case(CREATE_BACKEND)
def case_etcd_create_backend_unreachable_endpoint(root, tmp):
    started = time.monotonic()
    result = _type_names(lambda: _create_backend(root, endpoint=f"127.0.0.1:{_free_port()}"))
    return result, time.monotonic() - started < 5


@case(CREATE_BACKEND)
def case_etcd_create_backend_endpoint_forms(root, tmp):
    # without a port: 2379 (nobody there, or an etcd: either way both implementations behave alike)
    return (_type_names(lambda: _create_backend(root, endpoint="127.0.0.1")),
            _type_names(lambda: _create_backend(root, endpoint=f"http://{_endpoint()}")),
            _type_names(lambda: _create_backend(root, endpoint=f"{_endpoint()}/path")))


@case(CREATE_BACKEND)
def case_etcd_create_backend_endpoint_list(root, tmp):
    return _type_names(lambda: _create_backend(root, endpoint=f"{_endpoint()},127.0.0.1:{_free_port()}"))


@case(CREATE_BACKEND)
def case_etcd_create_backend_ttl_option(root, tmp):
    run_id = _uid(root)
    backend, _ = _create_backend(root, run_id=run_id, ttl="30")
    backend.set_state(b"s")
    return _raw_ttl(f"/torch/elastic/rendezvous/{run_id}"), _type_names(lambda: _create_backend(root, ttl="0"))


@case(CREATE_BACKEND, BACKEND, f"{STORE}.get", f"{STORE}.wait", f"{STORE}.set")
def case_etcd_error_messages(root, tmp):
    """The wording of the one-line errors (user code may match on it)."""
    cls = module(root, "rendezvous.etcd_rendezvous_backend").EtcdRendezvousBackend
    store = _store(root, timeout=0.1)
    calls = (lambda: cls(_client(), ""), lambda: _create_backend(root, protocol="gopher"),
             lambda: _create_backend(root, read_timeout="0"), lambda: store.get("missing"),
             lambda: store.wait(["missing"]), lambda: store.set("k", 1))
    return tuple(outcome(call)[1:] for call in calls)


# --------------------------------------------------------------------------------------------- legacy handler


@case(HANDLER)
def case_etcd_legacy_handler_on_a_fresh_run(root, tmp):
    run_id = _uid(root)

    def observe(handler):
        return (type(handler).__name__, handler.get_backend(), handler.get_run_id() == run_id, handler.is_closed(),
                handler.num_nodes_waiting())

    return _with_legacy(root, observe, run_id=run_id)


@case(HANDLER)
def case_etcd_legacy_set_closed_before_any_rendezvous(root, tmp):
    return _with_legacy(root, lambda h: (outcome(h.set_closed, compare_message=False), h.is_closed()))


@case(HANDLER, f"{STORE}.set", f"{STORE}.get")
def case_etcd_legacy_single_node_rendezvous(root, tmp):
    def observe(handler):
        info = handler.next_rendezvous()
        info.store.set("k", "v")
        return (info.rank, info.world_size, type(info.store).__name__, info.store.get("k"),
                type(info.bootstrap_store_info).__name__, handler.num_nodes_waiting(), handler.is_closed(),
                handler.shutdown(), handler.is_closed(), outcome(handler.next_rendezvous, compare_message=False))

    return _with_legacy(root, observe)


@case(HANDLER)
def case_etcd_legacy_timeout_waiting_for_peers(root, tmp):
    def observe(handler):
        started = time.monotonic()
        result = outcome(handler.next_rendezvous, compare_message=False)
        return result, time.monotonic() - started < 4

    return _with_legacy(root, observe, min_nodes=2, max_nodes=2, timeout=1, last_call_timeout=1)


@case(HANDLER)
def case_etcd_legacy_zero_timeout(root, tmp):
    return _with_legacy(root, lambda h: outcome(h.next_rendezvous, compare_message=False)[:2], timeout="0")


@case(HANDLER)
def case_etcd_legacy_fractional_timeout(root, tmp):
    return _with_legacy(root, lambda h: outcome(lambda: h.next_rendezvous().rank, compare_message=False),
                        timeout="2.5")


@case(HANDLER)
def case_etcd_legacy_zero_last_call_timeout(root, tmp):
    return _with_legacy(root, lambda h: h.next_rendezvous().world_size, min_nodes=1, max_nodes=2,
                        last_call_timeout="0")


@case(HANDLER)
def case_etcd_legacy_prefix_forms(root, tmp):
    """Where the run's keys go for the etcd_prefix forms (construction only: see the relative-prefix store case)."""
    seen = []
    base = f"/diff/legacy/{_uid(root)}"
    for prefix, where in (("", ""), (base.lstrip("/") + "/rel", base + "/rel"), (base + "/abs/", base + "/abs")):
        run_id = _uid(root)
        key = f"{where}/run_{run_id}/rdzv/version_counter"
        seen.append(_with_legacy(root, lambda h, key=key: _raw(key), run_id=run_id, etcd_prefix=prefix))
    return tuple(seen)


@case(HANDLER)
def case_etcd_legacy_run_id_with_a_slash(root, tmp):
    return _with_legacy(root, lambda h: (h.get_run_id().endswith("/job"), h.next_rendezvous().rank),
                        run_id=f"{_uid(root)}/job")


@case(HANDLER)
def case_etcd_legacy_protocol_in_capitals(root, tmp):
    return _with_legacy(root, lambda h: "created", protocol="HTTP"), _with_legacy(root, lambda h: "created",
                                                                                  protocol="gopher")


@case(HANDLER)
def case_etcd_legacy_unreachable_etcd(root, tmp):
    missing = str(tmp / "missing-ca.pem")
    started = time.monotonic()
    seen = (_with_legacy(root, lambda h: "created", endpoint=f"127.0.0.1:{_free_port()}"),
            _with_legacy(root, lambda h: "created", protocol="https", cacert=missing))
    return seen, time.monotonic() - started < 10


@case(HANDLER)
def case_etcd_legacy_handler_built_from_its_rendezvous(root, tmp):
    legacy = module(root, "rendezvous.etcd_rendezvous")
    run_id = _uid(root)
    rdzv = legacy.EtcdRendezvous(_client(), "/diff/direct", run_id, 1, 1, 5, 1)
    handler = legacy.EtcdRendezvousHandler(rdzv, None)
    try:
        return handler.get_backend(), handler.get_run_id() == run_id, handler.next_rendezvous().world_size
    finally:
        _stop_leases(handler)


test_same_observable_behaviour = same_behaviour_test(__name__)
