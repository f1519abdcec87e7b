"""ElasticDistributedSampler and CyclingIterator, checked against their contracts and against upstream."""

from __future__ import annotations

import pytest

from elastic_impl.utils.data import CyclingIterator, ElasticDistributedSampler


@pytest.mark.parametrize(
    "size, replicas, start", [(10, 3, 2), (10, 3, 0), (7, 2, 6), (5, 4, 0), (100, 8, 37)]
)
def test_ranks_partition_the_remaining_indices(size, replicas, start):
    dataset = list(range(size))
    shares = [list(ElasticDistributedSampler(dataset, replicas, rank, start)) for rank in range(replicas)]
    expected_len = -(-(size - start) // replicas)
    assert all(len(s) == expected_len for s in shares)
    flat = [i for s in shares for i in s]
    assert set(flat) == set(range(start, size))  # every remaining index served, nothing before start_index
    assert len(flat) - len(set(flat)) == expected_len * replicas - (size - start)  # only padding repeats


def test_epoch_reshuffles_deterministically():
    sampler = ElasticDistributedSampler(list(range(50)), 2, 0)
    first = list(sampler)
    assert list(sampler) == first
    sampler.set_epoch(1)
    assert list(sampler) != first
    again = ElasticDistributedSampler(list(range(50)), 2, 0)
    again.set_epoch(1)
    assert list(again) == list(sampler)


@pytest.mark.parametrize("size, replicas, start, epoch", [(10, 3, 2, 0), (33, 4, 5, 3), (9, 9, 0, 1)])
def test_same_indices_as_upstream(size, replicas, start, epoch):
    from torch.distributed.elastic.utils.data import ElasticDistributedSampler as Upstream

    for rank in range(replicas):
        ours, ref = (
            ElasticDistributedSampler(list(range(size)), replicas, rank, start),
            Upstream(list(range(size)), replicas, rank, start),
        )
        ours.set_epoch(epoch)
        ref.set_epoch(epoch)
        assert list(ours) == list(ref) and len(ours) == len(ref)


@pytest.mark.parametrize("start", [10, -1, 11, "1"])
def test_bad_start_index_is_clear_error(start):
    with pytest.raises(ValueError, match=r"start_index must be an int in \[0, 10\)"):
        ElasticDistributedSampler(list(range(10)), 2, 0, start)


def test_bad_rank_is_clear_error():
    with pytest.raises(ValueError, match="rank"):
        ElasticDistributedSampler(list(range(10)), 2, 5)


def test_cycling_iterator_runs_n_epochs_from_start_epoch():
    calls = []

    def gen(epoch):
        calls.append(epoch)
        return iter([epoch * 10, epoch * 10 + 1])

    assert list(CyclingIterator(3, gen)) == [0, 1, 10, 11, 20, 21]
    assert calls == [0, 1, 2]
    assert list(CyclingIterator(3, gen, start_epoch=2)) == [20, 21]
    assert list(CyclingIterator(4, lambda e: iter([] if e == 1 else [e]))) == [
        0,
        2,
        3,
    ]  # empty epochs skipped


def test_cycling_iterator_bad_input():
    with pytest.raises(ValueError, match="non-negative int, got -1"):
        CyclingIterator(-1, lambda e: iter([]))
    with pytest.raises(TypeError, match="must be callable"):
        CyclingIterator(2, [1, 2])
