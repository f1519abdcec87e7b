"""Behavioural checks, one module per documented package; importing a module registers its checks."""
