"""A distributed sampler that can start part-way through the dataset (resume after an elastic restart)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TypeVar

import torch
from torch.utils.data import Dataset
from torch.utils.data.distributed import DistributedSampler

T = TypeVar("T")

__all__ = ["ElasticDistributedSampler"]


class ElasticDistributedSampler(DistributedSampler[T]):
    """Each of ``num_replicas`` ranks gets an equal, disjoint share of dataset indices ``start_index..len-1``.

    Indices are shuffled with a generator seeded by the epoch (``set_epoch``), so every rank draws the same
    permutation; the tail is padded by wrapping around so all ranks see the same number of samples.
    """

    def __init__(
        self,
        dataset: Dataset[T],
        num_replicas: int | None = None,
        rank: int | None = None,
        start_index: int = 0,
    ):
        super().__init__(dataset=dataset, num_replicas=num_replicas, rank=rank)
        size = len(dataset)  # type: ignore[arg-type]
        if isinstance(start_index, bool) or not isinstance(start_index, int) or not 0 <= start_index < size:
            raise ValueError(
                f"start_index must be an int in [0, {size}) for a dataset of {size} items, got {start_index!r}"
            )
        self.start_index = start_index
        self.num_samples = math.ceil((size - start_index) / self.num_replicas)
        self.total_size = self.num_samples * self.num_replicas

    def __iter__(self) -> Iterator[T]:
        remaining = len(self.dataset) - self.start_index  # type: ignore[arg-type]
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        indices = (torch.randperm(remaining, generator=generator) + self.start_index).tolist()
        # wrap around so every rank gets num_samples indices
        while len(indices) < self.total_size:
            indices += indices[: self.total_size - len(indices)]
        mine = indices[self.rank : self.total_size : self.num_replicas]
        assert len(mine) == self.num_samples
        return iter(mine)

    def __len__(self) -> int:
        return self.num_samples
