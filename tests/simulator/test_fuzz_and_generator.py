import pytest

from simulator.checker import check
from simulator.fuzz import fuzz
from simulator.generator import fuzz_base, random_scenario, random_schedule
from simulator.scenario import FAULT_NAMES, load_scenario
from simulator.virtual import run_virtual


def test_random_schedules_are_reproducible_and_valid():
    base = fuzz_base()
    a = random_schedule(11, base, 40)
    assert a == random_schedule(11, base, 40) != random_schedule(12, base, 40)
    assert [f.at for f in a] == sorted(f.at for f in a)
    assert {f.fault for f in a} <= set(FAULT_NAMES) and len({f.fault for f in a}) > 5
    s = random_scenario(3)
    assert s.validate() is s and s.seed == 3 and s.to_dict() == random_scenario(3).to_dict()


def test_random_schedules_hold_every_invariant_on_the_correct_store():
    for seed in range(12):
        s = random_scenario(seed)
        result = check(run_virtual(s).history, s)
        assert result.ok, (seed, [str(v) for v in result.violations])


def test_random_schedules_hold_every_invariant_with_keyed_arrivals():
    from dataclasses import replace

    for seed in range(8):
        s = random_scenario(seed)
        s = replace(s, store=replace(s.store, keyed=True)).validate()
        result = check(run_virtual(s).history, s)
        assert result.ok, (seed, [str(v) for v in result.violations])


def test_fuzz_finds_nothing_on_the_correct_store():
    result = fuzz(seed=4, runs=15)
    assert result.ok and result.runs == 15
    assert sum(result.outcomes.values()) == 15


def test_fuzz_catches_broken_cas_and_shrinks_to_a_short_replayable_scenario(tmp_path):
    """Proof that the checker can fail: the store that skips compare-and-set is caught and minimized."""
    result = fuzz(seed=1, runs=200, broken_cas=True, out_dir=tmp_path)
    assert not result.ok
    assert result.check.violated
    assert set(result.check.violated) & {"ranks_unique", "membership_agreement", "rounds_monotonic", "world_size_bounds"}
    assert len(result.failing.faults) <= 3
    written = load_scenario(result.written)
    assert written.store.broken_cas and written.expect.violations == result.check.violated
    replayed = check(run_virtual(written).history, written)
    assert replayed.violated == written.expect.violations
    assert [str(v) for v in replayed.violations] == [str(v) for v in result.check.violations]


@pytest.mark.slow  # a finding is shrunk, which takes tens of runs
def test_fuzz_can_vary_the_cluster_shape(tmp_path):
    result = fuzz(seed=5, runs=8, vary_cluster=True, out_dir=tmp_path,
                  progress=lambda count, runs, phase: None)
    assert result.runs >= 1
    if not result.ok:  # a finding must be a valid, replayable scenario
        written = load_scenario(result.written)
        assert check(run_virtual(written).history, written).violated == written.expect.violations
