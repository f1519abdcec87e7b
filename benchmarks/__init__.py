"""Benchmarks of elastic_impl side by side with upstream torchrun / torch.distributed.elastic (`python -m benchmarks`)."""
