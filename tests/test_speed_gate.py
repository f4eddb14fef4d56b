"""The `--min-speedup` gate on a busy machine (issue #14 item 5): median of paired per-round ratios,
reference threads, load average before and after timing, busy-machine warning, report wording.

Pure functions are tested with literal numbers (no timing, no loading the machine); the report
rendering with a small hand-built report document.
"""

from __future__ import annotations

import copy

import jsonschema
import pytest

from vitedge.report import SCHEMA, Report


def _model(name: str, role: str, p50: float, speedup: float, **extra) -> dict:
    return {
        "name": name, "role": role, "backend": "onnxruntime", "precision": "fp32", "artifact": f"{name}.onnx", "format": "onnx",
        "options": {}, "size_bytes": 1000, "load_s": 0.1, "peak_rss_mb": None, "rss_increase_mb": None, "accuracy": None,
        "vs_reference": None if role == "reference" else {
            "top1_agreement": 1.0, "top5_agreement": 1.0, "cosine_mean": 1.0, "cosine_min": 1.0, "snr_db": None,
            "max_abs_error": 0.0, "worst": []},
        "latency": {"batch": 1, "runs": 3, "p50_ms": p50, "p90_ms": p50, "p99_ms": p50, "mean_ms": p50, "samples_ms": [p50] * 3},
        "throughput": [{"batch": 1, "images_per_s": 1000 / p50, "p50_ms": p50, "runs": 3}],
        "speedup": speedup, "throughput_speedup": {"1": speedup}, "precision_breakdown": None, "gate_failures": [], **extra,
    }


def _report(gates: dict, machine: dict | None = None, settings: dict | None = None) -> Report:
    return Report({
        "schema": "vitedge.report/1", "kind": "validate", "created": "2026-01-01T00:00:00+00:00", "vitedge_version": "0",
        "machine": {"cpu": "Test CPU", "instruction_sets": {}, "usable_cores": 2, **(machine or {})},
        "settings": settings or {}, "data": {"source": "x", "images": 3, "labelled": False, "classes": 2, "skipped": []},
        "models": [_model("ref", "reference", 10.0, 1.0), _model("eng", "engine", 2.0, 5.0)],
        "gates": {"max_drop_pp": None, "min_speedup": None, "strict": False, "passed": True, "failures": [], **gates},
        "findings": [],
    })


# -- report wording ------------------------------------------------------------------------------
def test_gate_line_names_only_the_gates_that_were_set():
    only_drop = _report({"max_drop_pp": 1.0})
    for text in (only_drop.markdown(), only_drop.html()):
        assert "Nonex" not in text and "None pp" not in text
        assert "max drop 1 pp" in text and "min speed-up" not in text
    only_speed = _report({"min_speedup": 3.0})
    for text in (only_speed.markdown(), only_speed.html()):
        assert "None pp" not in text and "min speed-up 3x" in text and "max drop" not in text
    both = _report({"max_drop_pp": 0.5, "min_speedup": 2.0, "strict": True}).markdown()
    assert "**Gates** (max drop 0.5 pp (upper end of the 95% CI), min speed-up 2x): passed" in both
    assert "**Gates**" not in _report({}).markdown()  # no gate: no gate line at all


# -- the gate: median of paired per-round ratios ------------------------------------------------------
def test_speedup_is_the_median_of_paired_round_ratios_not_the_ratio_of_medians():
    from vitedge.timing import paired_speedup

    # five rounds; in rounds 3-5 another process slows the PyTorch reference but not the engine as much
    ref = [[10.0], [10.0], [40.0], [40.0], [40.0]]
    eng = [[1.0], [1.0], [10.0], [10.0], [10.0]]
    sp = paired_speedup(ref, eng)
    # per-round ratios 10, 10, 4, 4, 4: median 4; the ratio of the two medians (40 / 10) is 4 too here...
    assert sp["ratios"] == [10.0, 10.0, 4.0, 4.0, 4.0] and sp["speedup"] == 4.0
    # ...but when the load moves between the reference's and the engine's rounds they differ:
    ref = [[10.0], [10.0], [10.0], [30.0], [30.0]]
    eng = [[2.0], [2.0], [6.0], [6.0], [6.0]]
    sp = paired_speedup(ref, eng)
    assert sp["ratios"] == [5.0, 5.0, round(10 / 6, 4), 5.0, 5.0]
    assert sp["speedup"] == 5.0  # median of 5, 5, 1.67, 5, 5
    assert sp["ratio_of_medians"] == pytest.approx(10.0 / 6.0)  # median 10 ms / median 6 ms: 1.67x
    assert sp["rounds"] == 5 and sp["ratio_iqr"] == [5.0, 5.0]
    assert sp["ratio_min"] == pytest.approx(10 / 6) and sp["ratio_max"] == 5.0


def test_round_times_are_round_medians_and_unpaired_rounds_are_skipped():
    from vitedge.errors import VitedgeError
    from vitedge.timing import flat_samples, paired_speedup

    ref = [[9.0, 10.0, 50.0], [20.0, 21.0, 22.0], [8.0], [12.0]]
    eng = [[1.0, 2.0, 3.0], [4.0, 5.0, 100.0], [], [3.0]]  # round 3: the engine sat out (an extension round)
    sp = paired_speedup(ref, eng)
    assert sp["ratios"] == [5.0, 4.2, 4.0]  # 10/2, 21/5, 12/3
    assert sp["rounds"] == 3 and sp["speedup"] == 4.2
    assert sp["ratio_iqr"] == pytest.approx([4.1, 4.6])  # linear percentiles of 4.0, 4.2, 5.0
    assert flat_samples(ref) == [9.0, 10.0, 50.0, 20.0, 21.0, 22.0, 8.0, 12.0]
    assert sp["ratio_of_medians"] == pytest.approx(16.0 / 3.0)  # median of the 8 reference times 16, of the 7 engine times 3
    with pytest.raises(VitedgeError, match="cannot pair"):
        paired_speedup([[1.0], []], [[], [1.0]])


def test_gate_checks_the_median_ratio_and_says_how_it_was_measured():
    from vitedge.validation import _apply_gates

    spread = {"method": "median of per-round ratios", "rounds": 10, "ratio_iqr": [2.1, 2.4], "ratio_min": 1.5,
              "ratio_max": 9.0, "ratios": [], "ratio_of_medians": 3.5}
    models = [_model("ref", "reference", 10.0, 1.0), _model("eng", "engine", 3.0, 2.25, speedup_spread=spread)]
    g = _apply_gates(models, None, 3.0, False, False)
    assert not g["passed"]
    assert g["failures"] == [("eng: speed-up 2.25x (median of 10 paired rounds, IQR 2.10-2.40x) over the FP32 reference "
                              "is below --min-speedup 3x")]
    assert _apply_gates(copy.deepcopy(models), None, 2.0, False, False)["passed"]


# -- a busy machine -----------------------------------------------------------------------------------
def test_busy_machine_decision_on_literal_load_averages():
    from vitedge.resources import BUSY_LOAD_PER_CORE, busy_machine_warning, load_record

    assert BUSY_LOAD_PER_CORE == 1.0
    assert busy_machine_warning([[0.3, 0.2, 0.1], [1.9, 1.0, 0.5]], cores=2) is None  # our own 2 threads: quiet
    assert busy_machine_warning([[2.0, 2.0, 2.0]], cores=2) is None  # exactly one per core is not above it
    assert busy_machine_warning([None, None], cores=2) is None  # no load average on this OS: nothing to say
    # busy at the start of timing, or at its end
    want = ("the machine was busy (load 3.40 on 2 cores): timings and speed-ups are unreliable; re-run on a quiet machine")
    assert busy_machine_warning([[3.4, 1.0, 0.5], [1.5, 1.2, 0.9]], cores=2) == want
    assert busy_machine_warning([[0.5, 0.5, 0.5], [3.4, 1.0, 0.5]], cores=2) == want
    assert busy_machine_warning([[4.01, 0, 0]], cores=4) == (
        "the machine was busy (load 4.01 on 4 cores): timings and speed-ups are unreliable; re-run on a quiet machine")
    assert busy_machine_warning([[1.5, 9.0, 9.0]], cores=1) is not None  # only the 1-minute figure counts...
    assert busy_machine_warning([[0.5, 9.0, 9.0]], cores=1) is None  # ...not the 5- and 15-minute ones
    rec = load_record([0.1, 0.1, 0.1], [2.5, 1.0, 0.4], [0.8, 0.9, 0.4], cores=2)
    assert rec == {"at_start": [0.1, 0.1, 0.1], "before_timing": [2.5, 1.0, 0.4], "after_timing": [0.8, 0.9, 0.4], "cores": 2,
                   "busy_load_per_core": 1.0, "busy": True,
                   "warning": "the machine was busy (load 2.50 on 2 cores): timings and speed-ups are unreliable; "
                              "re-run on a quiet machine"}
    assert load_record(None, [0.5, 0.5, 0.5], [1.0, 1, 1], cores=2)["busy"] is False


def test_report_shows_the_load_and_the_busy_warning():
    from vitedge.resources import load_record

    quiet = _report({"min_speedup": 2.0}, machine={"load": load_record([0.1, 0.2, 0.3], [0.5, 0.4, 0.3], [1.52, 1.1, 0.87], 2)},
                    settings={"reference_threads": 2, "rounds": 10})
    jsonschema.validate(quiet.data, SCHEMA)
    md, html = quiet.markdown(), quiet.html()
    for text in (md, html):
        assert "before timing 0.50 / 0.40 / 0.30, after timing 1.52 / 1.10 / 0.87" in text
        assert "timed in the same run, 2 threads" in text or "reference: ref, 2 threads" in text
        assert "the machine was busy" not in text
    busy = _report({}, machine={"load": load_record(None, [5.0, 3.0, 1.0], [4.0, 3.0, 1.0], 2)}, settings={"reference_threads": 2})
    warning = "the machine was busy (load 5.00 on 2 cores): timings and speed-ups are unreliable; re-run on a quiet machine"
    assert f"> **Warning: {warning}**" in busy.markdown()
    assert f'<p class="bad"><b>Warning: {warning}</b></p>' in busy.html()
    # a report without load figures (written before they existed) still renders
    assert "load average" not in _report({}).markdown()
