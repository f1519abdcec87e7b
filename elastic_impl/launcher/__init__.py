"""Programmatic launcher (mirrors ``torch.distributed.launcher``)."""

from elastic_impl.launcher.api import LaunchConfig, elastic_launch, launch_agent

__all__ = ["LaunchConfig", "elastic_launch", "launch_agent"]
