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
