"""torch.distributed.elastic.rendezvous.c10d_rendezvous_backend: the TCPStore-backed rendezvous backend."""

from __future__ import annotations

from conformance.registry import check

C = "rendezvous.c10d_rendezvous_backend"


def _backend(ctx, run_id: str | None = None):
    run_id = run_id or ctx.run_id("c10d")
    return ctx.get(f"{C}.C10dRendezvousBackend")(ctx.resources.tcp_store_client(), run_id), run_id


def cas_sequence(ctx, first, second) -> None:
    """Compare-and-set semantics of set_state through two clients of the same store (documented contract)."""
    ctx.expect(first.get_state() is None, "get_state() of a new run must be None")
    state, token1, ok = first.set_state(b"one")
    ctx.expect(ok and state == b"one", f"first set_state(b'one') without token: {(state, ok)}")
    state, token, ok = second.set_state(b"two")  # no token: only allowed when no state exists
    ctx.expect(not ok and state == b"one", f"set_state without token over an existing state: {(state, ok)}")
    state, token2, ok = second.set_state(b"two", token)
    ctx.expect(ok and state == b"two", f"set_state with the current token: {(state, ok)}")
    state, _, ok = first.set_state(b"three", token1)  # stale token from before "two"
    ctx.expect(not ok and state == b"two", f"set_state with a stale token must fail and return current: {(state, ok)}")
    got = first.get_state()
    ctx.expect(got is not None and got[0] == b"two", f"get_state() after CAS: {got}")


@check(f"{C}.create_backend")
def create_backend(ctx) -> None:
    master = ctx.resources.tcp_store()
    run_id = ctx.run_id("create")
    params = ctx.get("rendezvous.RendezvousParameters")(
        backend="c10d", endpoint=f"127.0.0.1:{master.port}", run_id=run_id, min_nodes=1, max_nodes=1,
        is_host=False, read_timeout=10,
    )
    backend, store = ctx.get(f"{C}.create_backend")(params)
    ctx.expect(isinstance(backend, ctx.get(f"{C}.C10dRendezvousBackend")), f"create_backend() gave {type(backend)}")
    store.set("conformance-create", "v")
    ctx.expect_equal(master.get("conformance-create"), b"v", "the returned store must be the endpoint's TCPStore")
    ctx.expect_equal(backend.name, "c10d", "backend name")
    bad = ctx.get("rendezvous.RendezvousParameters")(
        backend="c10d", endpoint=f"127.0.0.1:{master.port}", run_id=run_id, min_nodes=1, max_nodes=1,
        is_host=False, read_timeout=0,
    )
    ctx.expect_raises(ValueError, ctx.get(f"{C}.create_backend"), bad, what="create_backend() with read_timeout=0")


@check(f"{C}.C10dRendezvousBackend")
def c10d_backend(ctx) -> None:
    first, run_id = _backend(ctx)
    second, _ = _backend(ctx, run_id)
    cas_sequence(ctx, first, second)
    ctx.expect_raises(ValueError, ctx.get(f"{C}.C10dRendezvousBackend"), ctx.resources.tcp_store_client(), "",
                      what="C10dRendezvousBackend with an empty run id")
    other, _ = _backend(ctx)
    ctx.expect(other.get_state() is None, "another run id must not see this run's state")


@check(f"{C}.C10dRendezvousBackend.get_state")
def c10d_get_state(ctx) -> None:
    first, run_id = _backend(ctx)
    ctx.expect(first.get_state() is None, "get_state() of a new run must be None")
    _, token, _ = first.set_state(b"\x00binary\xff")
    second, _ = _backend(ctx, run_id)
    got = second.get_state()
    ctx.expect(got is not None and got[0] == b"\x00binary\xff", f"get_state() from another client: {got}")
    ctx.expect_equal(got[1], token, "token from get_state() equals the one set_state() returned")


@check(f"{C}.C10dRendezvousBackend.name")
def c10d_name(ctx) -> None:
    backend, _ = _backend(ctx)
    ctx.expect_equal(backend.name, "c10d", "C10dRendezvousBackend.name")


@check(f"{C}.C10dRendezvousBackend.set_state")
def c10d_set_state(ctx) -> None:
    first, run_id = _backend(ctx)
    second, _ = _backend(ctx, run_id)
    cas_sequence(ctx, first, second)
    # A token that does not match (here one never issued, of another type) does not update the state: the existing
    # state comes back with has_set False (documented on RendezvousBackend.set_state).
    got = second.set_state(b"four", "never-issued")
    ctx.expect(got is not None and not got[2] and got[0] == b"two",
               f"set_state with a token that does not match must fail and return the current state: {got}")
    fresh, _ = _backend(ctx)
    got = fresh.set_state(b"x", b"never-issued")
    ctx.expect((got is None or not got[2]) and fresh.get_state() is None,
               f"set_state with a token when no state exists must not set it: {got}, then {fresh.get_state()}")
