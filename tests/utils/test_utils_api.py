"""log level, get_logger, env helpers, free port socket, macros."""

from __future__ import annotations

import logging
import socket

import pytest

from elastic_impl.utils import api
from elastic_impl.utils.log_level import get_log_level
from elastic_impl.utils.logging import get_logger


def test_default_log_level_and_logger_name(monkeypatch):
    monkeypatch.delenv("LOGLEVEL", raising=False)
    assert get_log_level() == "WARNING"
    logger = get_logger()
    assert logger.name == __name__ and logger.level == logging.WARNING
    assert get_logger("named.one").name == "named.one"


def test_loglevel_env_and_bad_value(monkeypatch):
    monkeypatch.setenv("LOGLEVEL", "debug")
    assert get_logger("lvl.test").level == logging.DEBUG
    monkeypatch.setenv("LOGLEVEL", "LOUD")
    with pytest.raises(ValueError, match="invalid LOGLEVEL 'LOUD'; allowed"):
        get_logger("lvl.test")


def test_get_env_variable_or_raise(monkeypatch):
    monkeypatch.setenv("ELASTIC_TEST_VAR", "v")
    assert api.get_env_variable_or_raise("ELASTIC_TEST_VAR") == "v"
    monkeypatch.delenv("ELASTIC_TEST_VAR")
    with pytest.raises(ValueError, match="ELASTIC_TEST_VAR expected, but not set"):
        api.get_env_variable_or_raise("ELASTIC_TEST_VAR")


def test_socket_with_port_is_listening_on_a_free_port():
    sock = api.get_socket_with_port()
    try:
        host, port = sock.getsockname()[:2]
        assert port > 0
        client = socket.create_connection((host, port), timeout=5)  # it really accepts connections
        client.close()
    finally:
        sock.close()


def test_macros_substitute_local_rank_only_in_strings():
    args = ["--rank", api.macros.local_rank, f"out_{api.macros.local_rank}.log", 3, "${other}"]
    assert api.macros.substitute(args, "2") == ["--rank", "2", "out_2.log", 3, "${other}"]
