"""Nothing a worker wrote is deleted by the agent (issue 13 item 7): every start of a worker group gets its own
log folder."""

from __future__ import annotations

import os


def test_restart_with_same_count_gets_fresh_attempt_folder(tmp_path):
    """DefaultLogsSpecs.reify called twice for the same restart count (a membership change re-forms the group
    without using a restart) gives a new folder; the first start's files stay."""
    from elastic_impl.multiprocessing import DefaultLogsSpecs, Std

    specs = DefaultLogsSpecs(log_dir=str(tmp_path), redirects=Std.ALL)
    envs = {r: {"TORCHELASTIC_RUN_ID": "job", "TORCHELASTIC_RESTART_COUNT": "0"} for r in range(2)}
    first = specs.reify(envs)
    with open(first.stdouts[0], "w") as f:
        f.write("precious")
    second = specs.reify(envs)
    assert os.path.dirname(second.stdouts[0]) != os.path.dirname(first.stdouts[0])
    assert open(first.stdouts[0]).read() == "precious"
    # a rerun (a new DefaultLogsSpecs, as a new launcher process makes) with the same run id and log dir
    rerun = DefaultLogsSpecs(log_dir=str(tmp_path), redirects=Std.ALL).reify(envs)
    assert os.path.dirname(rerun.stdouts[0]) not in {os.path.dirname(first.stdouts[0]),
                                                      os.path.dirname(second.stdouts[0])}
    assert open(first.stdouts[0]).read() == "precious"
