"""An iterator over ``n`` epochs, each produced by ``generator_fn(epoch)``."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TypeVar

_T = TypeVar("_T")

__all__ = ["CyclingIterator"]


class CyclingIterator(Iterator[_T]):
    """Yields everything from ``generator_fn(start_epoch)``, then ``generator_fn(start_epoch + 1)``... up to epoch ``n - 1``.

    ``start_epoch`` lets a restarted worker resume from the epoch it reached before.
    """

    def __init__(self, n: int, generator_fn: Callable[[int], Iterator[_T]], start_epoch: int = 0):
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"CyclingIterator n must be a non-negative int, got {n!r}")
        if not callable(generator_fn):
            raise TypeError(f"CyclingIterator generator_fn must be callable, got {generator_fn!r}")
        self._n = n
        self._epoch = start_epoch
        self._generator_fn = generator_fn
        self._iter = iter(generator_fn(self._epoch))

    def __iter__(self):
        return self

    def __next__(self) -> _T:
        while True:
            try:
                return next(self._iter)
            except StopIteration:
                if self._epoch >= self._n - 1:
                    raise
                self._epoch += 1
                self._iter = iter(self._generator_fn(self._epoch))
