"""etcd (v2 API) rendezvous backend, handler, store and server, against a real etcd started on loopback.

All rows are claimed "no" on NPU: they still run, so the report records what actually happens.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from datetime import timedelta

from conformance.checks._rdzv import in_threads
from conformance.checks.c10d import cas_sequence
from conformance.registry import check

EB = "rendezvous.etcd_rendezvous_backend"
ES = "rendezvous.etcd_store"


def _backend(ctx, run_id=None):
    etcd = ctx.resources.etcd()
    run_id = run_id or ctx.run_id("etcd")
    return ctx.get(f"{EB}.EtcdRendezvousBackend")(etcd.client(), run_id, key_prefix="/conformance/rdzv", ttl=60), run_id


def _store(ctx):
    etcd = ctx.resources.etcd()
    prefix = f"/conformance/store/{uuid.uuid4().hex[:8]}"
    return ctx.get(f"{ES}.EtcdStore")(etcd.client(), prefix, timeout=timedelta(seconds=5))


@check(f"{EB}.create_backend", timeout=60)
def create_backend(ctx) -> None:
    etcd = ctx.resources.etcd()
    params = ctx.get("rendezvous.RendezvousParameters")(
        backend="etcd-v2", endpoint=etcd.endpoint, run_id=ctx.run_id("create"), min_nodes=1, max_nodes=1,
        protocol="http",
    )
    backend, store = ctx.get(f"{EB}.create_backend")(params)
    ctx.expect(isinstance(backend, ctx.get(f"{EB}.EtcdRendezvousBackend")), f"create_backend() gave {type(backend)}")
    ctx.expect(isinstance(store, ctx.get(f"{ES}.EtcdStore")), f"create_backend() store is {type(store)}")
    store.set("conformance-create", "v")
    ctx.expect_equal(store.get("conformance-create"), b"v", "the returned store round-trips through etcd")
    bad = ctx.get("rendezvous.RendezvousParameters")(
        backend="etcd-v2", endpoint=etcd.endpoint, run_id="x", min_nodes=1, max_nodes=1, protocol="gopher",
    )
    ctx.expect_raises(ValueError, ctx.get(f"{EB}.create_backend"), bad, what="create_backend() with protocol 'gopher'")
    unreadable_ca = ctx.get("rendezvous.RendezvousParameters")(
        backend="etcd-v2", endpoint=etcd.endpoint, run_id="x", min_nodes=1, max_nodes=1, protocol="https",
        ca_cert=f"/nonexistent/{uuid.uuid4().hex}/ca.pem",
    )
    ctx.expect_raises(ctx.get("rendezvous.api.RendezvousConnectionError"), ctx.get(f"{EB}.create_backend"),
                      unreadable_ca, what="create_backend() over https with an unreadable ca_cert")


@check(f"{EB}.EtcdRendezvousBackend", timeout=60)
def etcd_backend(ctx) -> None:
    first, run_id = _backend(ctx)
    second, _ = _backend(ctx, run_id)
    cas_sequence(ctx, first, second)
    other, _ = _backend(ctx)
    ctx.expect(other.get_state() is None, "another run id must not see this run's state")


@check(f"{EB}.EtcdRendezvousBackend.get_state", timeout=60)
def etcd_get_state(ctx) -> None:
    first, run_id = _backend(ctx)
    ctx.expect(first.get_state() is None, "get_state() of a new run must be None")
    _, token, ok = first.set_state(b"\x00etcd\xff")
    got = _backend(ctx, run_id)[0].get_state()
    ctx.expect(ok and got is not None and got[0] == b"\x00etcd\xff", f"get_state() from another client: {got}")
    ctx.expect_equal(got[1], token, "token from get_state() equals the one set_state() returned")


@check(f"{EB}.EtcdRendezvousBackend.name", timeout=60)
def etcd_name(ctx) -> None:
    ctx.expect_equal(_backend(ctx)[0].name, "etcd-v2", "EtcdRendezvousBackend.name")


@check(f"{EB}.EtcdRendezvousBackend.set_state", timeout=60)
def etcd_set_state(ctx) -> None:
    first, run_id = _backend(ctx)
    cas_sequence(ctx, first, _backend(ctx, run_id)[0])
    current = first.get_state()
    # token 0 was never handed out (etcd v2 ignores prevIndex=0): it must not overwrite the state
    ctx.expect_equal(first.set_state(b"token-zero", 0), (*current, False), "set_state(token=0) on an existing state")
    ctx.expect_equal(first.get_state(), current, "state after set_state(token=0)")


@check("rendezvous.etcd_rendezvous.EtcdRendezvousHandler", timeout=90)
def etcd_rendezvous_handler(ctx) -> None:
    etcd = ctx.resources.etcd()
    module = ctx.adapter.module("torch.distributed.elastic.rendezvous.etcd_rendezvous")
    run_id = ctx.run_id("etcdv1")

    def node():
        params = ctx.get("rendezvous.RendezvousParameters")(
            backend="etcd", endpoint=etcd.endpoint, run_id=run_id, min_nodes=2, max_nodes=2, protocol="http",
            timeout=30, last_call_timeout=1,
        )
        handler = module.create_rdzv_handler(params)
        ctx.add_cleanup(handler.shutdown)
        return handler

    nodes = [node() for _ in range(2)]
    ctx.expect(all(isinstance(n, ctx.get("rendezvous.etcd_rendezvous.EtcdRendezvousHandler")) for n in nodes),
               "create_rdzv_handler() did not give EtcdRendezvousHandler")
    ctx.expect_equal(nodes[0].get_backend(), "etcd", "EtcdRendezvousHandler.get_backend()")
    infos = in_threads(ctx, [n.next_rendezvous for n in nodes], 60)
    ctx.expect_equal(sorted(i.rank for i in infos), [0, 1], "ranks of a 2-node etcd rendezvous")
    ctx.expect_equal({i.world_size for i in infos}, {2}, "world size of a 2-node etcd rendezvous")
    infos[0].store.set("conformance", "shared")
    ctx.expect_equal(infos[1].store.get("conformance"), b"shared", "both nodes share the rendezvous store")
    nodes[0].set_closed()
    ctx.expect(nodes[1].is_closed(), "set_closed() on one node is not seen by the other")


@check(f"{ES}.EtcdStore", timeout=60)
def etcd_store(ctx) -> None:
    store = _store(ctx)
    import torch.distributed as dist

    ctx.expect(isinstance(store, dist.Store), "EtcdStore is not a torch.distributed.Store")
    store.set("a", "1")
    ctx.expect_equal(store.get("a"), b"1", "set/get round trip")


@check(f"{ES}.EtcdStore.add", timeout=60)
def etcd_store_add(ctx) -> None:
    store = _store(ctx)
    ctx.expect_equal(store.add("counter", 3), 3, "add() on a new key")
    ctx.expect_equal(store.add("counter", 4), 7, "add() accumulates")
    results = in_threads(ctx, [lambda: store.add("race", 1) for _ in range(4)])
    ctx.expect_equal(sorted(results), [1, 2, 3, 4], "concurrent add() results (atomic increments)")


@check(f"{ES}.EtcdStore.check", timeout=60)
def etcd_store_check(ctx) -> None:
    store = _store(ctx)
    store.set("present", "x")
    ctx.expect(store.check(["present"]) is True, "check() of a present key")
    ctx.expect(store.check(["present", "absent"]) is False, "check() with one absent key")


@check(f"{ES}.EtcdStore.get", timeout=60)
def etcd_store_get(ctx) -> None:
    store = _store(ctx)
    store.set("bin", b"\x00\x01\xff")
    ctx.expect_equal(store.get("bin"), b"\x00\x01\xff", "get() of binary data")
    short = ctx.get(f"{ES}.EtcdStore")(ctx.resources.etcd().client(), "/conformance/empty", timeout=timedelta(seconds=1))
    started = time.monotonic()
    ctx.expect_raises(LookupError, short.get, "never-set", what="get() of a key never set (timeout 1 s)")
    waited = time.monotonic() - started
    ctx.expect(0.9 <= waited < 4, f"get() of a missing key with a 1 s store timeout gave up after {waited:.2f} s")


@check(f"{ES}.EtcdStore.set", timeout=60)
def etcd_store_set(ctx) -> None:
    store = _store(ctx)
    store.set("k", "first")
    store.set("k", "second")
    ctx.expect_equal(store.get("k"), b"second", "set() overwrites")


@check(f"{ES}.EtcdStore.wait", timeout=60)
def etcd_store_wait(ctx) -> None:
    store = _store(ctx)
    timer = threading.Timer(0.5, lambda: store.set("late", "v"))
    started = time.monotonic()
    timer.start()
    try:
        store.wait(["late"])
    finally:
        timer.cancel()
    waited = time.monotonic() - started
    ctx.expect(waited >= 0.45, f"wait() returned after {waited:.2f} s, before the key was set (at 0.5 s)")
    ctx.expect_equal(store.get("late"), b"v", "wait() returned before the key was set")
    started = time.monotonic()
    ctx.expect_raises(LookupError, store.wait, ["never"], timedelta(seconds=1), what="wait() on a missing key, 1 s")
    waited = time.monotonic() - started
    ctx.expect(0.9 <= waited < 3.5, f"wait(override_timeout=1 s) on a missing key (store timeout 5 s) gave up after "
               f"{waited:.2f} s")


@check("rendezvous.etcd_server.EtcdServer", timeout=90)
def etcd_server(ctx) -> None:
    ctx.resources.etcd()  # skips with the reason when the etcd binary is absent
    from conformance.context import ETCD_BINARY

    old = os.environ.get("TORCHELASTIC_ETCD_BINARY_PATH")
    os.environ["TORCHELASTIC_ETCD_BINARY_PATH"] = ETCD_BINARY
    try:
        server = ctx.get("rendezvous.etcd_server.EtcdServer")(data_dir=str(ctx.tmpdir / "data"))
        log = open(ctx.tmpdir / "etcd-server.log", "w")  # noqa: SIM115 (closed by cleanup)
        ctx.add_cleanup(log.close)
        server.start(timeout=30, stderr=log)
    finally:
        if old is None:
            os.environ.pop("TORCHELASTIC_ETCD_BINARY_PATH", None)
        else:
            os.environ["TORCHELASTIC_ETCD_BINARY_PATH"] = old
    ctx.add_cleanup(server.stop)
    ctx.expect_equal(server.get_endpoint(), f"{server.get_host()}:{server.get_port()}", "get_endpoint()")
    client = server.get_client()
    client.write("/conformance/server", "alive")
    ctx.expect_equal(client.read("/conformance/server").value, "alive", "v2 write/read through get_client()")
    server.stop()
    ctx.expect_raises(Exception, client.read, "/conformance/server", what="reading after stop()")
