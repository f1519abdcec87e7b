"""Data utilities for elastic training: a restartable distributed sampler and a multi-epoch iterator."""

from elastic_impl.utils.data.cycling_iterator import CyclingIterator  # noqa: F401
from elastic_impl.utils.data.elastic_distributed_sampler import ElasticDistributedSampler  # noqa: F401
