"""Timer bookkeeping, bad input and virtual-time expiry (fake clock, real process reaped)."""

from __future__ import annotations

import multiprocessing as mp
import os
import select
import signal
import threading
import time

import pytest

from elastic_impl import timer
from elastic_impl.timer import FileTimerRequest, LocalTimerServer, TimerRequest


def test_register_release_and_expired_timers():
    server = LocalTimerServer(mp.Queue(), max_interval=1)
    server.register_timers([TimerRequest(1, "a", 10), TimerRequest(1, "b", 30), TimerRequest(2, "a", 20)])
    assert server.get_expired_timers(15) == {1: [TimerRequest(1, "a", 10)]}
    server.register_timers([TimerRequest(1, "a", -1)])  # release
    assert server.get_expired_timers(25) == {2: [TimerRequest(2, "a", 20)]}
    server.clear_timers({2})
    assert server.get_expired_timers(100) == {1: [TimerRequest(1, "b", 30)]}


def test_expire_timer_forces_expiry_of_one_scope_or_all():
    server = LocalTimerServer(mp.Queue(), max_interval=1)
    server.register_timers(
        [TimerRequest(1, "a", 1e12), TimerRequest(1, "b", 1e12), TimerRequest(2, "a", 1e12)]
    )
    assert server.expire_timer(1, "b") == 1
    assert [r.scope_id for r in server.get_expired_timers(0)[1]] == ["b"]
    assert server.expire_timer(2) == 1 and set(server.get_expired_timers(0)) == {1, 2}
    assert server.expire_timer(99) == 0


class _Recorder(timer.TimerClient):
    def __init__(self):
        self.calls = []

    def acquire(self, scope_id, expiration_time):
        self.calls.append(("acquire", scope_id, expiration_time))

    def release(self, scope_id):
        self.calls.append(("release", scope_id))


def test_expires_acquires_and_releases_even_on_error(fake_clock):
    client = _Recorder()
    with pytest.raises(KeyError):
        with timer.expires(after=5, scope="s", client=client):
            raise KeyError("x")
    with timer.expires(after=2, client=client):
        pass
    assert client.calls[:2] == [("acquire", "s", fake_clock.now + 5), ("release", "s")]
    default_scope = client.calls[2][1]
    assert default_scope.endswith(
        f"test_timer_api.py#{test_expires_acquires_and_releases_even_on_error.__code__.co_firstlineno + 5}"
    )
    assert client.calls[3] == ("release", default_scope)


def test_configured_client_is_used(monkeypatch):
    from elastic_impl.timer import api

    monkeypatch.setattr(api, "_timer_client", None)  # restored after the test
    with pytest.raises(RuntimeError, match="Configure timer client before using countdown timers"):
        with timer.expires(after=1):
            pass
    client = _Recorder()
    timer.configure(client)
    with timer.expires(after=1, scope="x"):
        pass
    assert [c[0] for c in client.calls] == ["acquire", "release"]


@pytest.mark.parametrize("after", [-1, float("nan"), float("inf"), "5", None, True])
def test_bad_after_is_one_line_error(after):
    with pytest.raises(ValueError) as info:
        with timer.expires(after=after, client=_Recorder()):
            pass
    assert repr(after) in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("interval", [0, -2, float("nan"), "1"])
def test_bad_max_interval_is_one_line_error(interval, tmp_path):
    with pytest.raises(ValueError, match="max_interval must be a positive finite number"):
        LocalTimerServer(mp.Queue(), max_interval=interval)
    with pytest.raises(ValueError, match="max_interval must be a positive finite number"):
        timer.FileTimerServer(str(tmp_path / "fifo"), "run", max_interval=interval)


def test_bad_client_and_clock_are_clear_errors():
    with pytest.raises(TypeError, match="must be a TimerClient or None, got 'oops'"):
        timer.configure("oops")
    with pytest.raises(TypeError, match="Clock"):
        timer.set_clock(object())


def test_file_server_refuses_a_regular_file(tmp_path):
    path = tmp_path / "not-a-fifo"
    path.write_text("data")
    server = timer.FileTimerServer(str(path), "run", max_interval=0.1)
    with pytest.raises(ValueError, match="exists and is not a FIFO"):
        server.start()
    assert path.read_text() == "data"


def test_file_client_without_server_is_clear_error(tmp_path):
    client = timer.FileTimerClient(str(tmp_path / "nobody"))
    start = time.monotonic()
    with pytest.raises(BrokenPipeError, match="^Could not send the FileTimerRequest because FileTimerServer is not "
                                              "available .*nobody") as raised:
        client.acquire("s", time.time() + 10)
    assert time.monotonic() - start >= 0.8  # retried for about a second, as upstream
    assert isinstance(raised.value.__cause__, FileNotFoundError)
    (tmp_path / "dir").mkdir()
    with pytest.raises(BrokenPipeError) as raised:  # not retried: a directory will not become a FIFO
        timer.FileTimerClient(str(tmp_path / "dir")).acquire("s", 1.0)
    assert isinstance(raised.value.__cause__, IsADirectoryError)


def test_file_client_waits_for_a_server_that_is_starting(tmp_path):
    # a worker may acquire before the server has created its FIFO; upstream retries for ~1 s (this raised at once)
    path = str(tmp_path / "late.fifo")
    server = timer.FileTimerServer(path, "run", max_interval=0.05)
    starter = threading.Timer(0.3, server.start)
    starter.start()
    try:
        timer.FileTimerClient(path).acquire("s", 1e12)
        deadline = time.monotonic() + 2
        while not server._timers and time.monotonic() < deadline:
            time.sleep(0.01)
        assert [r.scope_id for r in server._timers.values()] == ["s"]
    finally:
        starter.join()
        server.clear_timers({os.getpid()})
        server.stop()


def test_file_client_refuses_a_request_larger_than_pipe_buf(tmp_path):
    # a longer write to the FIFO is not atomic (it could interleave with other workers'); upstream raises too
    path = tmp_path / "plain-file"
    path.write_text("")
    with pytest.raises(RuntimeError, match=f"^FileTimerRequest larger than {select.PIPE_BUF} bytes is not supported"):
        timer.FileTimerClient(str(path)).acquire("x" * select.PIPE_BUF, 1.0)
    assert path.read_text() == ""


def test_virtual_time_expiry_reaps_real_process(fake_clock, spawn):
    sleeper = spawn("import time; time.sleep(60)")
    server = timer.FileTimerServer("/nonexistent-unused", "run", max_interval=1, clock=fake_clock)
    server.register_timers([FileTimerRequest(sleeper.pid, "train", fake_clock.now + 30, int(signal.SIGTERM))])
    fake_clock.now += 29
    assert server.run_once() == [] and sleeper.poll() is None
    fake_clock.now += 2
    assert server.run_once() == [sleeper.pid]
    assert sleeper.wait(timeout=10) == -signal.SIGTERM
    assert server.get_expired_timers(fake_clock.now + 1000) == {}
    assert server.get_last_progress_time() == int(fake_clock.now)


def test_timers_of_exited_processes_are_dropped(spawn):
    done = spawn("pass")
    done.wait(timeout=30)
    server = timer.FileTimerServer("/nonexistent-unused", "run", max_interval=1)
    server.register_timers([FileTimerRequest(done.pid, "s", 1, int(signal.SIGKILL))])
    assert server.get_expired_timers(time.time()) == {}


def test_a_signal_of_zero_or_below_does_not_kill_and_the_earliest_expired_signal_is_used(fake_clock, spawn):
    # FileTimerClient documents: "Using a negative or zero signal will not kill the process" (ours sent SIGKILL for
    # signal 0 and retried os.kill(pid, -1) forever). The timers are dropped; with several expired timers the signal
    # of the earliest one with a signal > 0 is sent.
    zero, negative, mixed = (spawn("import time; time.sleep(60)") for _ in range(3))
    server = timer.FileTimerServer("/nonexistent-unused", "run", max_interval=1, clock=fake_clock)
    now = fake_clock.now
    server.register_timers([
        FileTimerRequest(zero.pid, "s", now - 1, 0),
        FileTimerRequest(negative.pid, "s", now - 1, -1),
        FileTimerRequest(mixed.pid, "late", now - 1, int(signal.SIGKILL)),
        FileTimerRequest(mixed.pid, "no-signal", now - 3, 0),
        FileTimerRequest(mixed.pid, "early", now - 2, int(signal.SIGTERM)),
        FileTimerRequest(mixed.pid, "not-expired", now + 100, int(signal.SIGINT)),
    ])
    assert sorted(server.run_once()) == sorted([zero.pid, negative.pid, mixed.pid])
    assert mixed.wait(timeout=10) == -signal.SIGTERM
    assert zero.poll() is None and negative.poll() is None
    assert server.get_expired_timers(now + 1000) == {}
