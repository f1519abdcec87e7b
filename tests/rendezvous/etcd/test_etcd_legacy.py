"""The legacy ``etcd`` handler in one process (threads as nodes) against a real etcd, incl. upstream interop."""

from __future__ import annotations

import threading

import pytest

from elastic_impl.rendezvous import RendezvousParameters, rendezvous_handler_registry

pytestmark = pytest.mark.etcd


def _params(server, run_id, min_nodes, max_nodes, **options):
    options.setdefault("timeout", 30)
    options.setdefault("last_call_timeout", 0.3)
    return RendezvousParameters("etcd", server.get_endpoint(), run_id, min_nodes, max_nodes, **options)


def _in_threads(calls, timeout=60):
    results: dict[int, object] = {}

    def run(i, call):
        try:
            results[i] = call()
        except BaseException as e:  # noqa: BLE001 - reported below
            results[i] = e

    threads = [threading.Thread(target=run, args=(i, c), daemon=True) for i, c in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert all(not t.is_alive() for t in threads), "a node did not finish"
    return [results[i] for i in range(len(calls))]


def test_num_nodes_waiting_once_the_run_moved_on(etcd_server, run_id):
    node = rendezvous_handler_registry.create_handler(_params(etcd_server, run_id, 1, 2))
    try:
        info = node.next_rendezvous()
        assert (info.rank, info.world_size) == (0, 1)
        assert node.num_nodes_waiting() == 0
        # Another node tears the version down (as when a keep-alive lapses): this node must learn it has to rejoin.
        client = etcd_server.get_client()
        client.delete(f"/torchelastic/p2p/run_{run_id}/rdzv/active_version")
        assert node.num_nodes_waiting() == 1
        info = node.next_rendezvous()
        assert (info.rank, info.world_size) == (0, 1)
        assert node.num_nodes_waiting() == 0
    finally:
        node.shutdown()


def test_shutdown_closes_the_run_and_set_closed_works_before_any_state(etcd_server, run_id):
    first = rendezvous_handler_registry.create_handler(_params(etcd_server, run_id, 2, 2))
    second = rendezvous_handler_registry.create_handler(_params(etcd_server, run_id, 2, 2))
    assert not second.is_closed()
    first.set_closed()  # nothing was ever created for this run
    assert second.is_closed()
    from elastic_impl.rendezvous import RendezvousClosedError

    with pytest.raises(RendezvousClosedError, match=run_id):
        second.next_rendezvous()
    assert first.shutdown() is True


def test_interoperates_with_upstream_handlers(etcd_server, run_id):
    """Same keys and states as upstream: our nodes and torch's form one rendezvous with contiguous ranks."""
    from torch.distributed.elastic.rendezvous import RendezvousParameters as UpstreamParameters
    from torch.distributed.elastic.rendezvous.etcd_rendezvous import create_rdzv_handler as upstream_create

    ours = [rendezvous_handler_registry.create_handler(_params(etcd_server, run_id, 4, 4)) for _ in range(2)]
    theirs = [
        upstream_create(UpstreamParameters("etcd", etcd_server.get_endpoint(), run_id, 4, 4, timeout=30,
                                           last_call_timeout=1))
        for _ in range(2)
    ]
    infos = _in_threads([h.next_rendezvous for h in [*ours, *theirs]])
    assert not any(isinstance(i, BaseException) for i in infos), infos
    assert sorted(i.rank for i in infos) == [0, 1, 2, 3]
    assert {i.world_size for i in infos} == {4}
    # Their stores are the same etcd directory (our keys are URL-safe base64, identical for plain ASCII keys).
    infos[0].store.set("from-ours", "1")
    assert infos[3].store.get("from-ours") == b"1"
    ours[0].set_closed()
    assert theirs[0].is_closed()


@pytest.mark.parametrize(
    ("options", "run_suffix"),
    [
        ({"etcd_prefix": ""}, ""),  # the etcd root, as upstream
        ({"last_call_timeout": "0"}, ""),  # freeze as soon as min_workers joined, as upstream
        ({}, "/job"),  # a run id with '/', as upstream
    ],
)
def test_options_upstream_accepts_form_a_round(etcd_server, run_id, options, run_suffix):
    handler = rendezvous_handler_registry.create_handler(
        _params(etcd_server, run_id + run_suffix, 1, 2, **{"last_call_timeout": 0.3, **options}))
    try:
        info = handler.next_rendezvous()
        assert (info.rank, info.world_size) == (0, 1)
        assert handler.get_run_id() == run_id + run_suffix
    finally:
        handler.shutdown()


@pytest.mark.parametrize(("options", "named"), [({"etcd_prefix": "  "}, "etcd_prefix"),
                                                ({"last_call_timeout": "-1"}, "-1")])
def test_bad_prefix_or_last_call_is_a_one_line_error(etcd_server, run_id, options, named):
    with pytest.raises(ValueError, match=named) as info:
        rendezvous_handler_registry.create_handler(_params(etcd_server, run_id, 1, 1, **options))
    assert "\n" not in str(info.value)
