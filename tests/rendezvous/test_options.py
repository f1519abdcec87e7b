"""Rendezvous options are parsed and checked once (rendezvous.options): one alias table, one seconds parser with
bounds, one set of defaults, one node-count and run-id check, and a typed RendezvousOptions built where the options
enter (launch_agent), before any store is contacted."""

from __future__ import annotations

import socket
from datetime import timedelta

import pytest

from elastic_impl.launcher.api import LaunchConfig, LaunchConfigError
from elastic_impl.rendezvous import RendezvousParameters
from elastic_impl.rendezvous.options import (
    DEFAULT_KEEP_ALIVE_INTERVAL,
    RendezvousOptions,
    check_run_id,
    option_seconds,
    timeout_seconds,
)
from elastic_impl.run import config_from_args, main, parse_args


def _build(**overrides):
    kwargs = dict(backend="c10d", endpoint="127.0.0.1:29400", run_id="job", min_nodes=1, max_nodes=2)
    kwargs.update(overrides)
    return RendezvousOptions.build(**kwargs)


def test_options_are_canonical_typed_and_the_endpoint_is_split():
    options = _build(endpoint="[::1]:2379, host-2", config={"heartbeat": "2", "join_timeout": "5", "is_host": "1"})
    assert options.config == {"keep_alive_interval": "2", "join_timeout": "5", "is_host": "1"}
    assert options.seconds == {"keep_alive_interval": 2.0, "join_timeout": 5.0}
    assert options.endpoints == (("::1", 2379), ("host-2", None))
    params = options.parameters()
    assert isinstance(params, RendezvousParameters)
    assert (params.backend, params.run_id, params.min_nodes, params.max_nodes) == ("c10d", "job", 1, 2)
    assert params.get("keep_alive_interval") == "2" and params.get("heartbeat") is None


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"config": {"heartbeat": "1e-9"}},
         "rendezvous option heartbeat (keep_alive_interval)='1e-9' is out of range (allowed: a number of seconds "
         "with 0.01 <= seconds <= 2592000)"),
        ({"config": {"read_timeout": "soon"}}, "rendezvous option read_timeout='soon' is not a number of seconds"),
        ({"config": {"timeout": "-1"}}, "rendezvous option timeout='-1' is out of range"),
        ({"config": {"missed_heartbeats": "0"}},
         "rendezvous option missed_heartbeats (keep_alive_max_attempt)='0' is out of range (allowed: an integer "
         "with 1 <= value <= 1000)"),
        ({"config": [("join_timeout", "1"), ("join_timeout", "2")]}, "'join_timeout' is given twice"),
        ({"config": {"missed_heartbeats": 1, "keep_alive_max_attempt": 2}}, "'keep_alive_max_attempt' is given twice"),
        ({"endpoint": "h1:2379,,h2:2379"}, "'h1:2379,,h2:2379' has an empty member"),
        ({"endpoint": "h1:2379,h2:notaport"}, "bad rendezvous endpoint 'h2:notaport'"),
        ({"run_id": " "}, "rendezvous run_id must be a non-empty string, got ' '"),
        ({"min_nodes": 0}, "The minimum number of rendezvous nodes (0) must be greater than zero."),
        ({"min_nodes": 3}, "The maximum number of rendezvous nodes (2) must be greater than or equal to the minimum"),
        ({"backend": ""}, "rendezvous backend must be a backend name such as c10d, etcd or static, got ''"),
    ],
)
def test_a_bad_option_is_one_line_naming_it(overrides, message):
    with pytest.raises(ValueError) as info:
        _build(**overrides)
    assert message in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_the_api_and_the_launcher_check_node_counts_and_run_id_alike():
    for checker in (
        lambda: RendezvousParameters("c10d", "h", "job", 3, 2),
        lambda: LaunchConfig(min_nodes=3, max_nodes=2, nproc_per_node=1),
        lambda: _build(min_nodes=3, max_nodes=2),
    ):
        with pytest.raises(ValueError, match=r"maximum number of rendezvous nodes \(2\) must be greater than or equal "
                                             r"to the minimum number of rendezvous nodes \(3\)"):
            checker()
    with pytest.raises(ValueError, match="run_id must be a non-empty string, got ''"):
        RendezvousParameters("c10d", "h", "", 1, 1)
    assert check_run_id("job") == "job"


def test_one_seconds_parser_for_the_api_and_for_rdzv_conf():
    # the API form (timedelta/number) and the option form (text) share bounds: heartbeat keeps its 10 ms floor
    assert timeout_seconds("join", timedelta(seconds=2), 600.0) == 2.0
    assert timeout_seconds("join", None, 600.0) == 600.0
    assert timeout_seconds("heartbeat", None, DEFAULT_KEEP_ALIVE_INTERVAL) == 5.0
    with pytest.raises(ValueError, match=r"rendezvous heartbeat timeout=0.001 is out of range .*0.01 <= seconds"):
        timeout_seconds("heartbeat", 0.001, DEFAULT_KEEP_ALIVE_INTERVAL)
    with pytest.raises(ValueError, match="must be a timedelta or seconds, got '5'"):
        timeout_seconds("close", "5", 30.0)
    assert option_seconds({"read_timeout": "1.5"}, "read_timeout", 60.0) == 1.5
    assert option_seconds({}, "read_timeout", 60.0) == 60.0


def test_cli_accepts_an_etcd_cluster_endpoint_list():
    """The README documents --rdzv-endpoint h1:p1,h2:p2 for etcd clusters; the CLI used to reject the list before
    the backend could see it (seen failing: 'bad rendezvous endpoint '127.0.0.1:2379,127.0.0.1:2479'')."""
    args = parse_args(["--rdzv-backend", "etcd-v3", "--rdzv-endpoint", "127.0.0.1:2379,[::1]:2479", "--nnodes", "1:2",
                       "examples/train.py"])
    config, _, _ = config_from_args(args)
    assert config.rdzv_endpoint == "127.0.0.1:2379,[::1]:2479"


def test_a_bad_option_stops_the_launch_before_the_store_is_contacted(capsys):
    """Every time option any backend reads is checked when launch_agent builds the options. Before, join_timeout
    was read only after the c10d backend had connected to the store (seen failing: the store endpoint below got a
    connection before the launcher reported the bad value)."""
    with socket.socket() as store:
        store.bind(("127.0.0.1", 0))
        store.listen(8)
        store.settimeout(0.5)
        port = store.getsockname()[1]
        with pytest.raises(SystemExit) as info:
            main(["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "opts",
                  "--rdzv-conf", "is_host=0,read_timeout=2,join_timeout=-5", "examples/train.py"])
        err = capsys.readouterr().err
        assert info.value.code == 2, err
        assert err.strip().splitlines() == [
            "elastic-run: error: rendezvous option join_timeout='-5' is out of range (allowed: a number of seconds "
            "with 0 < seconds <= 2592000)"
        ]
        with pytest.raises(TimeoutError):  # nobody connected
            store.accept()[0].close()


def test_launch_config_errors_stay_launch_config_errors():
    with pytest.raises(LaunchConfigError, match=r"invalid min_nodes: 0 \(The minimum number of rendezvous nodes"):
        LaunchConfig(min_nodes=0, max_nodes=1, nproc_per_node=1)
