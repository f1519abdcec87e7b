"""Shared helpers used across elastic_impl (clock seam, store helpers, logging, data utilities)."""
