"""Differential edge cases of the rendezvous API, the dynamic handler and the c10d backend (issue 17, item 10).

Every case runs on ``elastic_impl`` and on upstream ``torch.distributed.elastic`` (see harness.py); a case whose
observations differ is listed in ``conformance.known_differences.API_BEHAVIOUR_DIFFERENCES`` with its reason.
Cases that need a store use a real TCPStore on 127.0.0.1, port 0, of their own; handlers are shut down and stores
dropped before the case returns.
"""

from __future__ import annotations

import pickle
import threading
import time
from datetime import timedelta

from tests.differential.harness import case, module, outcome, same_behaviour_test

_RDZV = "rendezvous"
_API = "rendezvous.api"
_DYN = "rendezvous.dynamic_rendezvous"
_C10D = "rendezvous.c10d_rendezvous_backend"
_HANDLER = "rendezvous.RendezvousHandler"
_DYN_HANDLER = "rendezvous.dynamic_rendezvous.DynamicRendezvousHandler"
_FROM_BACKEND = "rendezvous.dynamic_rendezvous.DynamicRendezvousHandler.from_backend"
_C10D_BACKEND = "rendezvous.c10d_rendezvous_backend.C10dRendezvousBackend"
_TIMEOUT = "rendezvous.dynamic_rendezvous.RendezvousTimeout"
_ERRORS = (
    "RendezvousError", "RendezvousClosedError", "RendezvousTimeoutError", "RendezvousConnectionError",
    "RendezvousStateError", "RendezvousGracefulExitError",
)


def _store(timeout: float = 2.0):
    from torch.distributed import TCPStore

    # Connecting gets a generous bound (a busy machine); the store's calls then get ``timeout``.
    store = TCPStore("127.0.0.1", 0, is_master=True, timeout=timedelta(seconds=30))
    store.set_timeout(timedelta(seconds=timeout))
    return store


def _client(host: str, port: int, timeout: float = 2.0):
    from torch.distributed import TCPStore

    store = TCPStore(host, port, is_master=False, timeout=timedelta(seconds=30))
    store.set_timeout(timedelta(seconds=timeout))
    return store


def _timeout(root: str, join: float = 3.0, last_call: float = 0.1):
    dyn = module(root, _DYN)
    return dyn.RendezvousTimeout(join=timedelta(seconds=join), last_call=timedelta(seconds=last_call),
                                 close=timedelta(seconds=2), heartbeat=timedelta(seconds=1))


def _handler(root: str, store, run_id: str = "r", min_nodes: int = 1, max_nodes: int = 1, **timeouts):
    dyn = module(root, _DYN)
    backend = module(root, _C10D).C10dRendezvousBackend(store, run_id)
    return dyn.DynamicRendezvousHandler.from_backend(run_id, store, backend, min_nodes, max_nodes,
                                                     local_addr="127.0.0.1", timeout=_timeout(root, **timeouts),
                                                     keep_alive_interval=1)


def _seconds(td: timedelta) -> float:
    return td.total_seconds()


# ---------------------------------------------------------------------------------------------- errors


@case("rendezvous.api.RendezvousError", "rendezvous.api.RendezvousGracefulExitError",
      "rendezvous.api.RendezvousClosedError", "rendezvous.api.RendezvousTimeoutError",
      "rendezvous.api.RendezvousConnectionError", "rendezvous.api.RendezvousStateError")
def case_rdzv_error_hierarchy(root, tmp):
    api = module(root, _API)
    classes = [getattr(api, name) for name in _ERRORS]
    pairs = sorted((a.__name__, b.__name__) for a in classes for b in classes if a is not b and issubclass(a, b))
    builtins = sorted((c.__name__, base.__name__) for c in classes
                      for base in (Exception, TimeoutError, ConnectionError, RuntimeError, ValueError)
                      if issubclass(c, base))
    return pairs, builtins


@case("rendezvous.api.RendezvousError", "rendezvous.api.RendezvousClosedError",
      "rendezvous.api.RendezvousTimeoutError", "rendezvous.api.RendezvousGracefulExitError")
def case_rdzv_errors_without_message_and_pickled(root, tmp):
    api = module(root, _API)
    observed = []
    for name in _ERRORS:
        cls = getattr(api, name)
        plain, with_text = cls(), cls("why")
        copy = pickle.loads(pickle.dumps(with_text))
        observed.append((name, str(plain), plain.args, str(with_text), type(copy).__name__, copy.args))
    return observed


@case("rendezvous.api.RendezvousError", "rendezvous.api.RendezvousClosedError")
def case_rdzv_errors_importable_from_the_package(root, tmp):
    package, api = module(root, _RDZV), module(root, _API)
    return [(name, getattr(package, name, None) is getattr(api, name)) for name in _ERRORS]


# ---------------------------------------------------------------------------------------------- RendezvousHandler


@case(_HANDLER)
def case_rdzv_handler_is_abstract(root, tmp):
    api = module(root, _API)
    return outcome(lambda: api.RendezvousHandler()), sorted(api.RendezvousHandler.__abstractmethods__)


@case(_HANDLER, "rendezvous.RendezvousHandler.use_agent_store")
def case_rdzv_handler_minimal_subclass(root, tmp):
    api = module(root, _API)

    class Handler(api.RendezvousHandler):
        def get_backend(self):
            return "mine"

        def next_rendezvous(self):
            return api.RendezvousInfo(None, 0, 1, None)

        def is_closed(self):
            return False

        def set_closed(self):
            pass

        def num_nodes_waiting(self):
            return 0

        def get_run_id(self):
            return "run"

        def shutdown(self):
            return True

    handler = Handler()
    info = handler.next_rendezvous()
    return handler.use_agent_store, handler.get_backend(), info.rank, info.world_size, info.bootstrap_store_info


@case(_HANDLER)
def case_rdzv_handler_subclass_missing_shutdown(root, tmp):
    api = module(root, _API)

    class Handler(api.RendezvousHandler):
        def get_backend(self):
            return "mine"

        def next_rendezvous(self):
            raise NotImplementedError

        def is_closed(self):
            return False

        def set_closed(self):
            pass

        def num_nodes_waiting(self):
            return 0

        def get_run_id(self):
            return "run"

    return outcome(Handler)


# ---------------------------------------------------------------------------------------------- RendezvousInfo


@case("rendezvous.RendezvousInfo")
def case_rdzv_info_attributes(root, tmp):
    api = module(root, _API)
    store = object()
    boot = api.RendezvousStoreInfo("h", 5)
    info = api.RendezvousInfo(store, 2, 4, boot)
    read_only = outcome(lambda: setattr(info, "rank", 3), compare_message=False)
    return (info.store is store, info.rank, info.world_size, info.bootstrap_store_info == boot, read_only,
            outcome(lambda: api.RendezvousInfo(store, 0, 1), compare_message=False))


@case("rendezvous.RendezvousInfo")
def case_rdzv_info_positional_and_keywords(root, tmp):
    api = module(root, _API)
    info = api.RendezvousInfo(store=None, rank=0, world_size=1, bootstrap_store_info=None)
    return info.store, info.rank, info.world_size, info.bootstrap_store_info


# ---------------------------------------------------------------------------------------------- RendezvousStoreInfo


@case("rendezvous.api.RendezvousStoreInfo")
def case_rdzv_store_info_dataclass(root, tmp):
    api = module(root, _API)
    a, b = api.RendezvousStoreInfo("h", 1), api.RendezvousStoreInfo(master_addr="h", master_port=1)
    return (repr(a), a == b, a == api.RendezvousStoreInfo("h", 2), api.RendezvousStoreInfo.MASTER_ADDR_KEY,
            api.RendezvousStoreInfo.MASTER_PORT_KEY, outcome(lambda: api.RendezvousStoreInfo("h"), compare_message=False))


@case("rendezvous.api.RendezvousStoreInfo.build")
def case_rdzv_store_info_build_rank0_with_port(root, tmp):
    api = module(root, _API)
    store = _store()
    info = api.RendezvousStoreInfo.build(0, store, "10.1.2.3", server_port=4242)
    return info.master_addr, info.master_port, store.get("MASTER_ADDR"), store.get("MASTER_PORT")


@case("rendezvous.api.RendezvousStoreInfo.build")
def case_rdzv_store_info_build_rank0_without_port(root, tmp):
    api = module(root, _API)
    store = _store()
    info = api.RendezvousStoreInfo.build(0, store, "10.1.2.3")
    return info.master_addr, 0 < info.master_port < 65536, int(store.get("MASTER_PORT")) == info.master_port


@case("rendezvous.api.RendezvousStoreInfo.build")
def case_rdzv_store_info_build_rank0_port_zero(root, tmp):
    api = module(root, _API)
    store = _store()
    info = api.RendezvousStoreInfo.build(0, store, "10.1.2.3", server_port=0)
    return info.master_addr, 0 < info.master_port < 65536


@case("rendezvous.api.RendezvousStoreInfo.build")
def case_rdzv_store_info_build_rank0_no_local_addr(root, tmp):
    import socket

    api = module(root, _API)
    store = _store()
    info = api.RendezvousStoreInfo.build(0, store, None, server_port=7)
    return info.master_addr == socket.getfqdn(), info.master_port


@case("rendezvous.api.RendezvousStoreInfo.build")
def case_rdzv_store_info_build_other_rank_reads(root, tmp):
    api = module(root, _API)
    store = _store()
    store.set("MASTER_ADDR", "node0")
    store.set("MASTER_PORT", "1234")
    info = api.RendezvousStoreInfo.build(3, store, "ignored", server_port=99)
    return info.master_addr, info.master_port


@case("rendezvous.api.RendezvousStoreInfo.build")
def case_rdzv_store_info_build_other_rank_nothing_published(root, tmp):
    api = module(root, _API)
    store = _store(timeout=0.3)
    return outcome(lambda: api.RendezvousStoreInfo.build(1, store, "x"), compare_message=False)


# ---------------------------------------------------------------------------------------------- RendezvousTimeout


@case(_TIMEOUT, "rendezvous.dynamic_rendezvous.RendezvousTimeout.join",
      "rendezvous.dynamic_rendezvous.RendezvousTimeout.last_call", "rendezvous.dynamic_rendezvous.RendezvousTimeout.close",
      "rendezvous.dynamic_rendezvous.RendezvousTimeout.heartbeat")
def case_rdzv_timeout_defaults(root, tmp):
    t = module(root, _DYN).RendezvousTimeout()
    return t.join, t.last_call, t.close, t.heartbeat


@case(_TIMEOUT, "rendezvous.dynamic_rendezvous.RendezvousTimeout.join",
      "rendezvous.dynamic_rendezvous.RendezvousTimeout.heartbeat")
def case_rdzv_timeout_none_means_default(root, tmp):
    t = module(root, _DYN).RendezvousTimeout(join=None, last_call=timedelta(seconds=2), close=None, heartbeat=None)
    return t.join, t.last_call, t.close, t.heartbeat


@case(_TIMEOUT, "rendezvous.dynamic_rendezvous.RendezvousTimeout.close")
def case_rdzv_timeout_read_only(root, tmp):
    t = module(root, _DYN).RendezvousTimeout()
    return outcome(lambda: setattr(t, "close", timedelta(seconds=1)), compare_message=False)


def _timeout_case(name: str, covers: str, **kwargs) -> None:
    def run(root, tmp):
        t = module(root, _DYN).RendezvousTimeout
        return outcome(lambda: _seconds(getattr(t(**kwargs), next(iter(kwargs)))))

    run.__name__ = f"case_{name}"
    case(_TIMEOUT, f"{_TIMEOUT}.{covers}")(run)


_timeout_case("rdzv_timeout_zero_join", "join", join=timedelta(0))
_timeout_case("rdzv_timeout_negative_last_call", "last_call", last_call=timedelta(seconds=-1))
_timeout_case("rdzv_timeout_zero_close", "close", close=timedelta(0))
_timeout_case("rdzv_timeout_negative_heartbeat", "heartbeat", heartbeat=timedelta(milliseconds=-5))
_timeout_case("rdzv_timeout_sub_second_join", "join", join=timedelta(milliseconds=250))


@case(_TIMEOUT, "rendezvous.dynamic_rendezvous.RendezvousTimeout.join")
def case_rdzv_timeout_number_instead_of_timedelta(root, tmp):
    t = module(root, _DYN).RendezvousTimeout
    return outcome(lambda: _seconds(t(join=5).join), compare_message=False)


@case(_TIMEOUT, "rendezvous.dynamic_rendezvous.RendezvousTimeout.heartbeat")
def case_rdzv_timeout_one_millisecond_heartbeat(root, tmp):
    t = module(root, _DYN).RendezvousTimeout
    return outcome(lambda: _seconds(t(heartbeat=timedelta(milliseconds=1)).heartbeat), compare_message=False)


# ---------------------------------------------------------------------------------------------- C10dRendezvousBackend


@case(_C10D_BACKEND, f"{_C10D_BACKEND}.name", f"{_C10D_BACKEND}.get_state")
def case_rdzv_c10d_backend_fresh_store(root, tmp):
    backend = module(root, _C10D).C10dRendezvousBackend(_store(), "run")
    return backend.name, backend.get_state()


@case(_C10D_BACKEND)
def case_rdzv_c10d_backend_empty_run_id(root, tmp):
    return outcome(lambda: module(root, _C10D).C10dRendezvousBackend(_store(), ""))


@case(_C10D_BACKEND)
def case_rdzv_c10d_backend_none_run_id(root, tmp):
    return outcome(lambda: module(root, _C10D).C10dRendezvousBackend(_store(), None))


@case(_C10D_BACKEND)
def case_rdzv_c10d_backend_int_run_id(root, tmp):
    return outcome(lambda: module(root, _C10D).C10dRendezvousBackend(_store(), 5), compare_message=False)


@case(_C10D_BACKEND, f"{_C10D_BACKEND}.set_state", f"{_C10D_BACKEND}.get_state")
def case_rdzv_c10d_backend_set_then_get(root, tmp):
    backend = module(root, _C10D).C10dRendezvousBackend(_store(), "run")
    state, token, has_set = backend.set_state(b"first")
    got_state, got_token = backend.get_state()
    return state, has_set, got_state, got_token == token, isinstance(token, bytes)


@case(_C10D_BACKEND, f"{_C10D_BACKEND}.set_state")
def case_rdzv_c10d_backend_set_with_current_token(root, tmp):
    backend = module(root, _C10D).C10dRendezvousBackend(_store(), "run")
    _, token, _ = backend.set_state(b"first")
    state, new_token, has_set = backend.set_state(b"second", token)
    return state, has_set, new_token != token, backend.get_state()[0]


@case(_C10D_BACKEND, f"{_C10D_BACKEND}.set_state")
def case_rdzv_c10d_backend_set_with_stale_token(root, tmp):
    backend = module(root, _C10D).C10dRendezvousBackend(_store(), "run")
    _, old, _ = backend.set_state(b"first")
    _, current, _ = backend.set_state(b"second", old)
    state, token, has_set = backend.set_state(b"third", old)
    return state, token == current, has_set, backend.get_state()[0]


@case(_C10D_BACKEND, f"{_C10D_BACKEND}.set_state")
def case_rdzv_c10d_backend_none_token_when_state_exists(root, tmp):
    backend = module(root, _C10D).C10dRendezvousBackend(_store(), "run")
    _, token, _ = backend.set_state(b"first")
    state, got_token, has_set = backend.set_state(b"second", None)
    return state, got_token == token, has_set


def _bad_token_case(name: str, token) -> None:
    def run(root, tmp):
        backend = module(root, _C10D).C10dRendezvousBackend(_store(), "run")
        _, current, _ = backend.set_state(b"first")

        def attempt():
            state, got, has_set = backend.set_state(b"second", token)
            return state, got == current, has_set, backend.get_state()[0]

        return outcome(attempt, compare_message=False)

    run.__name__ = f"case_{name}"
    case(_C10D_BACKEND, f"{_C10D_BACKEND}.set_state")(run)


_bad_token_case("rdzv_c10d_backend_str_token", "not-a-token")
_bad_token_case("rdzv_c10d_backend_int_token", 7)
_bad_token_case("rdzv_c10d_backend_unknown_bytes_token", b"never-issued")


@case(_C10D_BACKEND, f"{_C10D_BACKEND}.set_state")
def case_rdzv_c10d_backend_empty_token(root, tmp):
    backend = module(root, _C10D).C10dRendezvousBackend(_store(), "run")
    first = backend.set_state(b"first", b"")
    second = backend.set_state(b"second", "")
    return first[0], first[2], second[0], second[2]


@case(_C10D_BACKEND, f"{_C10D_BACKEND}.set_state")
def case_rdzv_c10d_backend_stale_token_on_fresh_store(root, tmp):
    backend = module(root, _C10D).C10dRendezvousBackend(_store(), "run")
    return outcome(lambda: backend.set_state(b"state", b"never-issued"), compare_message=False), backend.get_state()


@case(_C10D_BACKEND, f"{_C10D_BACKEND}.get_state")
def case_rdzv_c10d_backend_runs_are_separate(root, tmp):
    c10d = module(root, _C10D)
    store = _store()
    a, b = c10d.C10dRendezvousBackend(store, "a"), c10d.C10dRendezvousBackend(store, "b")
    a.set_state(b"state-a")
    return a.get_state()[0], b.get_state()


@case(_C10D_BACKEND, f"{_C10D_BACKEND}.get_state", f"{_C10D_BACKEND}.set_state")
def case_rdzv_c10d_backend_two_instances_one_run(root, tmp):
    c10d = module(root, _C10D)
    store = _store()
    a = c10d.C10dRendezvousBackend(store, "run")
    a.set_state(b"from-a")
    b = c10d.C10dRendezvousBackend(_client(store.host, store.port), "run")
    got = b.get_state()
    return got[0], b.set_state(b"from-b", got[1])[2], a.get_state()[0]


@case(_C10D_BACKEND, f"{_C10D_BACKEND}.get_state")
def case_rdzv_c10d_backend_store_gone(root, tmp):
    c10d = module(root, _C10D)
    server = _store()
    client = _client(server.host, server.port, timeout=0.5)
    backend = c10d.C10dRendezvousBackend(client, "run")
    del server
    return outcome(backend.get_state, compare_message=False)


# ---------------------------------------------------------------------------------------------- create_backend


def _params(root: str, endpoint: str = "", **config):
    api = module(root, _API)
    return api.RendezvousParameters(backend="c10d", endpoint=endpoint, run_id="run", min_nodes=1, max_nodes=1, **config)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@case("rendezvous.c10d_rendezvous_backend.create_backend")
def case_rdzv_create_backend_tcp_host(root, tmp):
    c10d = module(root, _C10D)
    port = _free_port()
    backend, store = c10d.create_backend(_params(root, f"127.0.0.1:{port}", is_host="true", read_timeout="5"))
    client = _client("127.0.0.1", port)
    client.set("k", "v")
    return (backend.name, type(store).__name__, store.port == port, store.get("k"), backend.get_state(),
            store.timeout.total_seconds())


@case("rendezvous.c10d_rendezvous_backend.create_backend")
def case_rdzv_create_backend_tcp_client(root, tmp):
    c10d = module(root, _C10D)
    server = _store()
    backend, store = c10d.create_backend(_params(root, f"127.0.0.1:{server.port}", is_host="0", read_timeout=3))
    store.set("k", "v")
    return backend.name, type(store).__name__, server.get("k"), backend.get_state(), store.timeout.total_seconds()


@case("rendezvous.c10d_rendezvous_backend.create_backend")
def case_rdzv_create_backend_host_port_taken(root, tmp):
    c10d = module(root, _C10D)
    server = _store()
    # TCPStore servers are multi-tenant within a process: hosting on a port this process already hosts succeeds
    return outcome(lambda: [type(x).__name__ for x in c10d.create_backend(
        _params(root, f"127.0.0.1:{server.port}", is_host="yes", read_timeout=1))], compare_message=False)


@case("rendezvous.c10d_rendezvous_backend.create_backend")
def case_rdzv_create_backend_bad_is_host(root, tmp):
    c10d = module(root, _C10D)
    return outcome(lambda: c10d.create_backend(_params(root, "127.0.0.1:1", is_host="maybe")))


def _create_backend_case(name: str, **config) -> None:
    def run(root, tmp):
        c10d = module(root, _C10D)
        return outcome(lambda: c10d.create_backend(_params(root, "127.0.0.1:1", **config)))

    run.__name__ = f"case_{name}"
    case("rendezvous.c10d_rendezvous_backend.create_backend")(run)


_create_backend_case("rdzv_create_backend_bad_store_type", store_type="redis")
_create_backend_case("rdzv_create_backend_read_timeout_zero", read_timeout=0, is_host=True)
_create_backend_case("rdzv_create_backend_read_timeout_negative", read_timeout="-3", is_host=True)
_create_backend_case("rdzv_create_backend_read_timeout_not_a_number", read_timeout="soon", is_host=True)


@case("rendezvous.c10d_rendezvous_backend.create_backend")
def case_rdzv_create_backend_fractional_read_timeout(root, tmp):
    c10d = module(root, _C10D)
    port = _free_port()
    return outcome(lambda: c10d.create_backend(
        _params(root, f"127.0.0.1:{port}", read_timeout="2.5", is_host=True))[1].timeout.total_seconds(),
        compare_message=False)


@case("rendezvous.c10d_rendezvous_backend.create_backend")
def case_rdzv_create_backend_store_type_spelling(root, tmp):
    c10d = module(root, _C10D)
    backend, store = c10d.create_backend(_params(root, str(tmp / "rdzv-file"), store_type="  FILE "))
    return backend.name, type(store).__name__, backend.get_state()


@case("rendezvous.c10d_rendezvous_backend.create_backend", f"{_C10D_BACKEND}.set_state")
def case_rdzv_create_backend_file_store_shared(root, tmp):
    c10d = module(root, _C10D)
    path = str(tmp / "rdzv-file")
    a, _ = c10d.create_backend(_params(root, path, store_type="file"))
    b, _ = c10d.create_backend(_params(root, path, store_type="file"))
    a.set_state(b"from-a")
    return b.get_state()[0]


@case("rendezvous.c10d_rendezvous_backend.create_backend")
def case_rdzv_create_backend_file_store_no_endpoint(root, tmp):
    c10d = module(root, _C10D)
    return outcome(lambda: type(c10d.create_backend(_params(root, "", store_type="file"))[1]).__name__,
                   compare_message=False)


@case("rendezvous.c10d_rendezvous_backend.create_backend")
def case_rdzv_create_backend_nobody_listening(root, tmp):
    c10d = module(root, _C10D)
    port = _free_port()
    return outcome(lambda: c10d.create_backend(_params(root, f"127.0.0.1:{port}", is_host=False, read_timeout=1)),
                   compare_message=False)


# ---------------------------------------------------------------------------------------------- from_backend


def _from_backend(root: str, min_nodes=1, max_nodes=1, run_id="run", **kwargs):
    dyn = module(root, _DYN)
    store = _store()
    backend = module(root, _C10D).C10dRendezvousBackend(store, "run")
    return dyn.DynamicRendezvousHandler.from_backend(run_id, store, backend, min_nodes, max_nodes, **kwargs)


@case(_FROM_BACKEND, _DYN_HANDLER, "rendezvous.RendezvousHandler.get_backend",
      "rendezvous.RendezvousHandler.get_run_id", "rendezvous.RendezvousHandler.use_agent_store")
def case_rdzv_from_backend_settings(root, tmp):
    handler = _from_backend(root, 2, 3, local_addr="10.9.8.7")
    s = handler.settings
    return (handler.get_backend(), handler.get_run_id(), handler.use_agent_store, s.run_id, s.min_nodes, s.max_nodes,
            s.keep_alive_interval, s.keep_alive_max_attempt, s.timeout.join, s.timeout.heartbeat)


@case(_FROM_BACKEND)
def case_rdzv_from_backend_keep_alive(root, tmp):
    handler = _from_backend(root, timeout=_timeout(root), keep_alive_interval=2, keep_alive_max_attempt=7)
    return handler.settings.keep_alive_interval, handler.settings.keep_alive_max_attempt, handler.settings.timeout.join


@case(_FROM_BACKEND)
def case_rdzv_from_backend_min_nodes_zero(root, tmp):
    return outcome(lambda: _from_backend(root, 0, 2))


@case(_FROM_BACKEND)
def case_rdzv_from_backend_max_below_min(root, tmp):
    return outcome(lambda: _from_backend(root, 3, 2))


@case(_FROM_BACKEND)
def case_rdzv_from_backend_empty_run_id(root, tmp):
    return outcome(lambda: _from_backend(root, run_id=""))


@case(_FROM_BACKEND, "rendezvous.RendezvousHandler.use_agent_store")
def case_rdzv_use_agent_store_env(root, tmp):
    import os

    handler = _from_backend(root)
    old = os.environ.get("TORCH_DISABLE_SHARE_RDZV_TCP_STORE")
    try:
        seen = []
        for value in ("1", "0", "true"):
            os.environ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = value
            seen.append(handler.use_agent_store)
        return seen
    finally:
        if old is None:
            os.environ.pop("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", None)
        else:
            os.environ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = old


# ---------------------------------------------------------------------------------------------- create_handler


def _create_handler(root: str, **config):
    dyn = module(root, _DYN)
    store = _store()
    backend = module(root, _C10D).C10dRendezvousBackend(store, "run")
    api = module(root, _API)
    params = api.RendezvousParameters(backend="c10d", endpoint="", run_id="run", min_nodes=1, max_nodes=2,
                                      local_addr="127.0.0.1", **config)
    return dyn.create_handler(store, backend, params)


def _handler_settings(handler) -> tuple:
    s = handler.settings
    return (s.run_id, s.min_nodes, s.max_nodes, s.keep_alive_interval, s.keep_alive_max_attempt, s.timeout.join,
            s.timeout.last_call, s.timeout.close, s.timeout.heartbeat, handler.get_backend())


@case("rendezvous.dynamic_rendezvous.create_handler")
def case_rdzv_create_handler_defaults(root, tmp):
    return _handler_settings(_create_handler(root))


@case("rendezvous.dynamic_rendezvous.create_handler")
def case_rdzv_create_handler_options(root, tmp):
    return _handler_settings(_create_handler(root, join_timeout="20", last_call_timeout=3, close_timeout="4",
                                             keep_alive_interval="2", keep_alive_max_attempt="6"))


@case("rendezvous.dynamic_rendezvous.create_handler")
def case_rdzv_create_handler_heartbeat_timeout(root, tmp):
    return _handler_settings(_create_handler(root, heartbeat_timeout="7"))


def _create_handler_case(name: str, compare_message: bool = True, **config) -> None:
    def run(root, tmp):
        return outcome(lambda: _handler_settings(_create_handler(root, **config)), compare_message=compare_message)

    run.__name__ = f"case_{name}"
    case("rendezvous.dynamic_rendezvous.create_handler")(run)


_create_handler_case("rdzv_create_handler_keep_alive_none", keep_alive_interval=None)
_create_handler_case("rdzv_create_handler_max_attempt_none", keep_alive_max_attempt=None)
_create_handler_case("rdzv_create_handler_join_timeout_zero", compare_message=False, join_timeout="0")
_create_handler_case("rdzv_create_handler_join_timeout_text", compare_message=False, join_timeout="ten")
_create_handler_case("rdzv_create_handler_join_timeout_fractional", compare_message=False, join_timeout="1.5")


# ---------------------------------------------------------------------------------------------- one node's rounds


@case(_DYN_HANDLER, "rendezvous.RendezvousHandler.next_rendezvous", "rendezvous.RendezvousHandler.num_nodes_waiting",
      "rendezvous.RendezvousHandler.is_closed", "rendezvous.RendezvousHandler.shutdown", "rendezvous.RendezvousInfo")
def case_rdzv_single_node_round(root, tmp):
    store = _store()
    handler = _handler(root, store)
    try:
        waiting_before = handler.num_nodes_waiting()
        info = handler.next_rendezvous()
        info.store.set("k", "v")
        prefixed = store.get("torch.rendezvous.r.0/k")
        return (waiting_before, info.rank, info.world_size, type(info.store).__name__, prefixed,
                handler.num_nodes_waiting(), handler.is_closed())
    finally:
        handler.shutdown()


@case(_DYN_HANDLER, "rendezvous.RendezvousHandler.next_rendezvous", "rendezvous.RendezvousInfo")
def case_rdzv_single_node_bootstrap_store_info(root, tmp):
    store = _store()
    handler = _handler(root, store)
    try:
        boot = handler.next_rendezvous().bootstrap_store_info
        client = _client(boot.master_addr, boot.master_port)
        client.set("x", "1")
        return type(boot).__name__, boot.master_addr, client.get("x")
    finally:
        handler.shutdown()


@case(_DYN_HANDLER, "rendezvous.RendezvousHandler.next_rendezvous", "rendezvous.RendezvousInfo")
def case_rdzv_bootstrap_store_info_is_the_rendezvous_store(root, tmp):
    store = _store()
    handler = _handler(root, store)
    try:
        boot = handler.next_rendezvous().bootstrap_store_info
        return boot.master_port == store.port
    finally:
        handler.shutdown()


@case(_DYN_HANDLER, "rendezvous.RendezvousHandler.next_rendezvous", "rendezvous.RendezvousInfo")
def case_rdzv_bootstrap_store_info_opted_out(root, tmp):
    import os

    store = _store()
    handler = _handler(root, store)
    os.environ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    try:
        info = handler.next_rendezvous()
        boot = info.bootstrap_store_info
        return (boot.master_addr, 0 < boot.master_port < 65536, info.store.get("MASTER_ADDR"),
                int(info.store.get("MASTER_PORT")) == boot.master_port)
    finally:
        del os.environ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"]
        handler.shutdown()


@case(_DYN_HANDLER, "rendezvous.RendezvousHandler.next_rendezvous")
def case_rdzv_single_node_second_round(root, tmp):
    store = _store()
    handler = _handler(root, store)
    try:
        handler.next_rendezvous()
        info = handler.next_rendezvous()
        info.store.set("k", "v")
        return info.rank, info.world_size, store.get("torch.rendezvous.r.1/k")
    finally:
        handler.shutdown()


@case(_DYN_HANDLER, "rendezvous.RendezvousHandler.set_closed", "rendezvous.RendezvousHandler.is_closed",
      "rendezvous.RendezvousHandler.next_rendezvous")
def case_rdzv_closed_before_any_round(root, tmp):
    store = _store()
    handler = _handler(root, store)
    try:
        before = handler.is_closed()
        handler.set_closed()
        again = outcome(handler.set_closed)
        return before, handler.is_closed(), again, outcome(handler.next_rendezvous, compare_message=False)
    finally:
        handler.shutdown()


@case(_DYN_HANDLER, "rendezvous.RendezvousHandler.set_closed", "rendezvous.RendezvousHandler.next_rendezvous",
      "rendezvous.RendezvousHandler.num_nodes_waiting")
def case_rdzv_closed_after_a_round(root, tmp):
    store = _store()
    handler = _handler(root, store)
    try:
        handler.next_rendezvous()
        handler.set_closed()
        return (handler.is_closed(), handler.num_nodes_waiting(),
                outcome(handler.next_rendezvous, compare_message=False))
    finally:
        handler.shutdown()


@case(_DYN_HANDLER, "rendezvous.RendezvousHandler.set_closed", "rendezvous.RendezvousHandler.is_closed")
def case_rdzv_closed_seen_by_another_handler(root, tmp):
    store = _store()
    a, b = _handler(root, store, max_nodes=2), _handler(root, store, max_nodes=2)
    try:
        before = b.is_closed()
        a.set_closed()
        # is_closed() propagates eventually (upstream caches the state for a second): poll for it
        deadline = time.monotonic() + 3
        while not b.is_closed() and time.monotonic() < deadline:
            time.sleep(0.1)
        return before, b.is_closed(), outcome(b.next_rendezvous, compare_message=False)
    finally:
        a.shutdown()
        b.shutdown()


@case(_DYN_HANDLER, "rendezvous.RendezvousHandler.next_rendezvous", "rendezvous.RendezvousHandler.set_closed",
      "rendezvous.api.RendezvousGracefulExitError", "rendezvous.api.RendezvousClosedError")
def case_rdzv_surplus_node_when_the_run_closes(root, tmp):
    """A node joining a run whose round already holds max_nodes waits (not counted as waiting); when the run is
    closed, its next_rendezvous() ends with the error observed here."""
    store = _store()
    a, b = _handler(root, store, join=20), _handler(root, store, join=20)
    try:
        a.next_rendezvous()
        ended: dict = {}
        surplus = threading.Thread(target=lambda: ended.update(r=outcome(b.next_rendezvous, compare_message=False)),
                                   daemon=True)
        surplus.start()
        time.sleep(1.5)  # it has joined and waits
        waiting, still_waiting = a.num_nodes_waiting(), surplus.is_alive()
        a.set_closed()
        surplus.join(15)
        return waiting, still_waiting, ended.get("r", "still waiting 15 s after the run closed")
    finally:
        a.shutdown()
        b.shutdown()


@case(_DYN_HANDLER, "rendezvous.RendezvousHandler.shutdown", "rendezvous.RendezvousHandler.is_closed")
def case_rdzv_shutdown_twice(root, tmp):
    store = _store()
    handler = _handler(root, store)
    handler.next_rendezvous()
    first, second = handler.shutdown(), handler.shutdown()
    return first, second, handler.is_closed(), outcome(handler.next_rendezvous, compare_message=False)


@case(_DYN_HANDLER, "rendezvous.RendezvousHandler.shutdown")
def case_rdzv_shutdown_without_a_round(root, tmp):
    store = _store()
    handler = _handler(root, store)
    other = _handler(root, store)
    return handler.shutdown(), other.is_closed()


@case(_DYN_HANDLER, "rendezvous.RendezvousHandler.shutdown")
def case_rdzv_shutdown_store_gone(root, tmp):
    server = _store()
    client = _client(server.host, server.port, timeout=0.5)
    handler = _handler(root, client)
    del server
    return outcome(handler.shutdown, compare_message=False)


@case(_DYN_HANDLER, "rendezvous.RendezvousHandler.next_rendezvous")
def case_rdzv_join_timeout_alone(root, tmp):
    store = _store()
    handler = _handler(root, store, min_nodes=2, max_nodes=2, join=0.5)
    try:
        started = time.monotonic()
        result = outcome(handler.next_rendezvous, compare_message=False)
        return result, time.monotonic() - started < 8, handler.is_closed()
    finally:
        handler.shutdown()


@case(_DYN_HANDLER, "rendezvous.RendezvousHandler.next_rendezvous", "rendezvous.RendezvousHandler.num_nodes_waiting")
def case_rdzv_late_node_waits_then_joins(root, tmp):
    store = _store(timeout=1.0)
    first = _handler(root, store, min_nodes=1, max_nodes=2, join=6, last_call=0.1)
    late = _handler(root, store, min_nodes=1, max_nodes=2, join=6, last_call=0.1)
    results = {}
    try:
        info = first.next_rendezvous()
        round0 = (info.rank, info.world_size)
        thread = threading.Thread(target=lambda: results.update(late=outcome(late.next_rendezvous)), daemon=True)
        thread.start()
        waiting = 0
        deadline = time.monotonic() + 4
        while waiting == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
            waiting = first.num_nodes_waiting()
        again = first.next_rendezvous()
        thread.join(6)
        late_outcome = results.get("late", ("still running",))
        if late_outcome[0] == "ok":
            late_seen = ("ok", sorted([again.rank, late_outcome[1].rank]), late_outcome[1].world_size)
        else:
            late_seen = late_outcome[:2]
        return round0, waiting, again.world_size, late_seen, first.num_nodes_waiting()
    finally:
        first.shutdown()
        late.shutdown()


# ---------------------------------------------------------------------------------------------- RendezvousBackend


def _dict_backend(root: str):
    dyn = module(root, _DYN)

    class DictBackend(dyn.RendezvousBackend):
        """A user's backend with only the three members of the interface."""

        def __init__(self):
            self.state: bytes | None = None
            self.version = 0
            self.lock = threading.Lock()

        @property
        def name(self):
            return "dict"

        def get_state(self):
            with self.lock:
                return None if self.state is None else (self.state, self.version)

        def set_state(self, state, token=None):
            with self.lock:
                if (self.state is None and token is None) or (self.state is not None and token == self.version):
                    self.state, self.version = state, self.version + 1
                    return self.state, self.version, True
                return None if self.state is None else (self.state, self.version, False)

    return DictBackend()


@case("rendezvous.dynamic_rendezvous.RendezvousBackend", "rendezvous.dynamic_rendezvous.RendezvousBackend.name",
      "rendezvous.dynamic_rendezvous.RendezvousBackend.get_state",
      "rendezvous.dynamic_rendezvous.RendezvousBackend.set_state")
def case_rdzv_user_backend_round(root, tmp):
    from torch.distributed import HashStore

    dyn = module(root, _DYN)
    backend = _dict_backend(root)
    store = HashStore()
    handler = dyn.DynamicRendezvousHandler.from_backend("run", store, backend, 1, 1, local_addr="127.0.0.1",
                                                        timeout=_timeout(root), keep_alive_interval=1)
    try:
        info = handler.next_rendezvous()
        return handler.get_backend(), info.rank, info.world_size, backend.state is not None, handler.is_closed()
    finally:
        handler.shutdown()


@case("rendezvous.dynamic_rendezvous.RendezvousBackend")
def case_rdzv_backend_is_abstract(root, tmp):
    dyn = module(root, _DYN)
    return outcome(lambda: dyn.RendezvousBackend()), sorted(dyn.RendezvousBackend.__abstractmethods__)


@case("rendezvous.dynamic_rendezvous.RendezvousBackend", _C10D_BACKEND)
def case_rdzv_backend_c10d_is_a_backend(root, tmp):
    dyn, c10d = module(root, _DYN), module(root, _C10D)
    api = module(root, _API)
    return (issubclass(c10d.C10dRendezvousBackend, dyn.RendezvousBackend),
            issubclass(dyn.DynamicRendezvousHandler, api.RendezvousHandler))


test_same_observable_behaviour = same_behaviour_test(__name__)
