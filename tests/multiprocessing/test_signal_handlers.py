"""The signal handlers a worker context installs: which signals (TORCHELASTIC_SIGNALS_TO_HANDLE), and that close()
puts the previous handlers back."""

from __future__ import annotations

import signal

import pytest

from elastic_impl.multiprocessing import DefaultLogsSpecs, start_processes
from elastic_impl.multiprocessing.api import (
    SignalException,
    _terminate_process_handler,
    parse_signals_to_handle,
    signals_to_handle_from_env,
)

pytestmark = pytest.mark.timeout(60)

HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1)


@pytest.fixture
def saved_handlers():
    saved = {sig: signal.getsignal(sig) for sig in HANDLED}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def _start_sleeper(tmp_path, contexts):
    envs = {0: {"TORCHELASTIC_RUN_ID": "sig", "TORCHELASTIC_RESTART_COUNT": "0"}}
    pc = start_processes("sig", "sleep", {0: ("30",)}, envs, DefaultLogsSpecs(log_dir=str(tmp_path)))
    contexts.append(pc)
    return pc


def test_close_restores_the_handlers_installed_before_start(tmp_path, contexts, saved_handlers):
    def mine(signum, frame):  # pragma: no cover - never called
        pass

    signal.signal(signal.SIGTERM, mine)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    pc = _start_sleeper(tmp_path, contexts)
    assert signal.getsignal(signal.SIGTERM) is _terminate_process_handler  # while the workers run
    pc.close(timeout=5)
    # Before: the context's raising handler stayed, so a later SIGTERM to an in-process run (CI cancellation,
    # `timeout`) raised where the program expected its own handler.
    assert signal.getsignal(signal.SIGTERM) is mine
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN


def test_a_handler_installed_after_start_is_kept(tmp_path, contexts, saved_handlers):
    def later(signum, frame):  # pragma: no cover - never called
        pass

    pc = _start_sleeper(tmp_path, contexts)
    signal.signal(signal.SIGTERM, later)  # as the agent does after starting its workers
    pc.close(timeout=5)
    assert signal.getsignal(signal.SIGTERM) is later


def test_the_environment_names_the_signals_handled(tmp_path, contexts, saved_handlers, monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_SIGNALS_TO_HANDLE", "SIGUSR1, SIGBOGUS")
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    pc = _start_sleeper(tmp_path, contexts)
    assert signal.getsignal(signal.SIGUSR1) is _terminate_process_handler
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # not named: not handled
    with pytest.raises(SignalException) as raised:
        signal.raise_signal(signal.SIGUSR1)
    assert raised.value.sigval == signal.SIGUSR1
    pc.close(timeout=5)


def test_signal_names_are_parsed_strictly():
    assert parse_signals_to_handle(" SIGTERM,SIGUSR1,SIGTERM") == (signal.SIGTERM, signal.SIGUSR1)
    for bad in ("SIGFOO", "SIGKILL", "15", "", "SIGTERM,"):
        with pytest.raises(ValueError, match="bad signal .* expected comma-separated names of catchable"):
            parse_signals_to_handle(bad)


def test_a_bad_name_in_the_environment_is_skipped(monkeypatch, caplog):
    monkeypatch.setenv("TORCHELASTIC_SIGNALS_TO_HANDLE", "SIGFOO,SIGUSR2")
    assert signals_to_handle_from_env() == (signal.SIGUSR2,)
    assert "'SIGFOO' is not a catchable signal" in caplog.text
