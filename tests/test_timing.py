"""The one interleaved timer (`vitedge.timing`): order of the rounds, run caps, warm-up, extension rounds, and
paired ratios on callables whose speeds are known (short sleeps: the whole file takes well under 5 s)."""

from __future__ import annotations

import time

import pytest

from vitedge.timing import Slot, flat_samples, interleaved, paired_speedup, run_for


def _logging(log: list[str], name: str, sleep_s: float = 0.0):
    def fn():
        log.append(name)
        if sleep_s:
            time.sleep(sleep_s)
    return fn


def test_rounds_alternate_order_with_warmup_and_an_untimed_wake_run():
    log: list[str] = []
    fns = [_logging(log, n) for n in "abc"]
    samples = interleaved(fns, 3, Slot(0.0, 2, 2), warmup=Slot(0.0, 1, 1), alternate=True, wake=True)
    warm = list("abc")
    r0 = ["a"] * 3 + ["b"] * 3 + ["c"] * 3  # each slot: one untimed run, then the two timed ones
    r1 = ["c"] * 3 + ["b"] * 3 + ["a"] * 3  # every other round in reverse
    assert log == warm + r0 + r1 + r0
    assert [[len(r) for r in s] for s in samples] == [[2, 2, 2]] * 3  # the wake run is not a sample
    log.clear()
    interleaved(fns, 2, Slot(0.0, 1, 1), alternate=False)  # validate's order: always the same; no warm-up by default
    assert log == list("abcabc")


def test_slot_caps_minimum_and_time_share():
    assert len(run_for(lambda: None, Slot(0.0, 4, None))) == 4  # minimum runs, no time left
    assert len(run_for(lambda: None, Slot(0.05, 1, 3))) == 3  # the cap stops a time-bounded slot
    assert len(run_for(lambda: None, Slot(0.0, 5, 3))) == 3  # and wins over the minimum
    n = len(run_for(lambda: time.sleep(0.005), Slot(0.02, 1, None)))
    assert 1 <= n <= 5  # each run takes >= 5 ms: no run starts after 20 ms
    assert all(v >= 4.9 for v in run_for(lambda: time.sleep(0.005), Slot(0.0, 2, 2)))  # samples are milliseconds


def test_paired_speedup_of_callables_with_known_speeds():
    slow, fast = (lambda: time.sleep(0.006)), (lambda: time.sleep(0.002))
    samples = interleaved([slow, fast], 6, Slot(0.0, 3, 3), warmup=Slot(0.0, 1, 1))
    sp = paired_speedup(samples[0], samples[1])
    assert sp["rounds"] == 6 and len(sp["ratios"]) == 6
    assert 2.3 < sp["speedup"] < 3.1  # 6 ms / 2 ms, plus each sleep's wake-up latency on both sides
    assert paired_speedup(samples[1], samples[0])["speedup"] == pytest.approx(1 / 3, rel=0.25)
    assert len(flat_samples(samples[0])) == 18


def test_rounds_are_added_for_an_unstable_callable_and_stay_paired():
    k = {"n": 0}

    def erratic():  # 1 ms and 10 ms in turn: its median never settles
        k["n"] += 1
        time.sleep(0.001 if k["n"] % 2 else 0.010)

    steady = lambda: time.sleep(0.002)  # noqa: E731
    samples = interleaved([steady, erratic, steady], 3, Slot(0.0, 4, 4), alternate=False, until_stable=0.5)
    assert [len(s) for s in samples] == [6, 6, 6]  # 3 rounds, then at most 3 more
    assert [len(r) for r in samples[1][3:]] == [1, 1, 1]  # an added round: at least one run (no time share here)
    assert [len(r) for r in samples[0][3:]] == [1, 1, 1]  # the baseline is timed with it, to pair the round
    assert samples[2][3:] == [[], [], []]  # a stable callable sits the added rounds out
    assert len(interleaved([steady, erratic], 2, Slot(0.0, 2, 2), until_stable=None)[1]) == 2  # no extension asked


def test_search_timer_keeps_its_method():
    from vitedge.quantization.candidates import timed_interleaved

    log: list[str] = []
    ms = timed_interleaved([_logging(log, "a", 0.003), _logging(log, "b", 0.001)], rounds=2, seconds=0.0)
    # 3 warm-up runs each; per round one untimed run and min_runs=3 timed ones, b before a in the second round
    assert log == ["a"] * 3 + ["b"] * 3 + ["a"] * 4 + ["b"] * 4 + ["b"] * 4 + ["a"] * 4
    assert ms[0] > 2.9 and ms[1] > 0.9 and ms[0] > ms[1]
    log.clear()
    timed_interleaved([_logging(log, "a")], rounds=1, seconds=0.0, min_runs=4, max_runs=2)
    assert log.count("a") == 3 + 1 + 4  # its minimum wins over its cap, as before
