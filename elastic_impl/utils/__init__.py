"""Shared helpers used across elastic_impl (clock seam, store helpers, logging, data utilities)."""

from elastic_impl.utils.api import get_env_variable_or_raise, get_socket_with_port, macros

__all__ = ["get_env_variable_or_raise", "get_socket_with_port", "macros"]
