"""`vitedge benchmark`: builds the engines this machine can run, validates them in one run, ranks them.

Runs the real sweep on the shipped reference model with tiny timing budgets and a subset of
candidates (ONNX Runtime FP32/INT8, OpenVINO FP32/INT8, TensorRT to show it is skipped with a reason).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
from click.testing import CliRunner

from vitedge.benchmarking import candidates, rank
from vitedge.errors import VitedgeError
from vitedge.report import SCHEMA, Report

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory, calib_dir, val_dir):
    from vitedge.cli.main import main

    out = tmp_path_factory.mktemp("bench")
    res = CliRunner().invoke(main, [
        "benchmark", "reference", "--calib", str(calib_dir), "--val", str(val_dir), "-o", str(out),
        "--backends", "onnxruntime,openvino,tensorrt", "--precisions", "fp32,int8", "--val-samples", "60",
        "--calib-samples", "16", "--runs", "8", "--rounds", "2", "--batch-sizes", "1",
    ], catch_exceptions=False)
    return res, out


@pytest.mark.e2e
def test_benchmark_prints_ranked_table_and_writes_reports(bench_run):
    res, out = bench_run
    assert res.exit_code == 0, res.output
    data = json.loads((out / "report.json").read_text())
    jsonschema.validate(data, SCHEMA)
    assert data["kind"] == "benchmark"
    built = {e["name"] for e in data["models"] if e["role"] == "engine"}
    assert built == {"onnxruntime fp32", "onnxruntime int8", "openvino fp32", "openvino int8"}
    for name in built:  # every built engine is in the printed table
        assert name in res.output
    # TensorRT cannot run here: listed with the reason, never faked
    trt = {s["name"]: s["reason"] for s in data["skipped"]}
    assert set(trt) == {"tensorrt fp32", "tensorrt int8"} and all("TensorRT" in r or "GPU" in r for r in trt.values())
    # ranked by measured latency, Pareto front and recommendation consistent with the numbers
    by = {m["name"]: m for m in data["models"]}
    p50 = [by[n]["latency"]["p50_ms"] for n in data["ranking"]]
    assert p50 == sorted(p50) and set(data["ranking"]) == built
    assert data["pareto"] and set(data["pareto"]) <= built and data["ranking"][0] in data["pareto"]
    rec = data["recommended"]
    assert by[rec]["vs_reference"]["top1_drop_pp"] <= 1.0
    # on the front, or a float engine within 5 % of the fastest (more faithful at about the same speed)
    fastest = min(by[n]["latency"]["p50_ms"] for n in data["pareto"])
    assert rec in data["pareto"] or (by[rec]["precision"] != "int8" and by[rec]["latency"]["p50_ms"] <= 1.05 * fastest)
    # a speed-up per engine, or none at all when the machine was too busy to measure one (speedup_verdict says why)
    measurable = data["speedup_verdict"]["measurable"]
    assert by["pytorch fp32"]["role"] == "reference" and all(by[n]["speedup"] > 0 if measurable else by[n]["speedup"] is None for n in built)
    # OpenVINO FP32 really computes in FP32 (the benchmark sets the f32 hint), its INT8 engine in INT8
    assert by["openvino fp32"]["precision_breakdown"]["mac_share"].get("fp32", 0) == pytest.approx(1.0)
    assert by["openvino int8"]["precision_breakdown"]["int8_mac_share"] > 0.5
    assert any(f.startswith(("INT8 is the fastest", "INT8 is not the fastest")) for f in data["findings"])
    html = (out / "report.html").read_text()
    assert html.count("<svg") == 2 and "Pareto front" in html and "tensorrt int8" in html
    assert (out / "artifacts" / "fp32.onnx").exists() and (out / "report.md").exists()


@pytest.mark.e2e
def test_rank_pareto_front_from_a_real_report(bench_run):
    _, out = bench_run
    rep = Report.load(out)
    engines = rep.engines
    # make one engine both slower and less accurate than another: it must leave the front
    fast, slow = sorted(engines, key=lambda e: e["latency"]["p50_ms"])[:2]
    slow["vs_reference"]["top1_drop_pp"] = fast["vs_reference"]["top1_drop_pp"] + 5.0
    rank(rep, max_drop=1.0, fidelity=False)  # the fidelity target has a test of its own below
    assert slow["name"] not in rep.data["pareto"] and rep.data["recommended"] == fast["name"]
    # an impossible budget recommends nothing, and says so
    rank(rep, max_drop=-1.0, fidelity=False)
    assert rep.data["recommended"] is None and any(f.startswith("no engine is") and "within -1 pp" in f for f in rep.data["findings"])


def _engine(name, precision, p50, agreement):
    return {"name": name, "precision": precision, "latency": {"p50_ms": p50},
            "vs_reference": {"top1_agreement": agreement, "cosine_min": 0.99}}


def test_precision_is_chosen_on_the_target():
    """INT8 that is not faster than BF16 and less faithful is not recommended; INT8 under the target never is."""
    from vitedge.benchmarking import choose, meets_target

    int8, bf16 = _engine("openvino int8", "int8", 10.0, 0.985), _engine("openvino bf16", "bf16", 10.3, 0.999)
    name, why = choose([int8, bf16])
    assert name == "openvino bf16" and "INT8 buys nothing" in why and "+3.0 %" in why
    assert choose([int8, _engine("openvino bf16", "bf16", 12.0, 0.999)]) == ("openvino int8", None)  # 20 % slower: INT8 wins
    assert choose([int8, _engine("openvino bf16", "bf16", 10.1, 0.98)]) == ("openvino int8", None)  # not more faithful
    assert not meets_target(_engine("x", "int8", 1.0, 0.97)) and meets_target(_engine("x", "int8", 1.0, 0.98))
    dense = {"vs_reference": {"top1_agreement": None, "cosine_min": 0.999, "outputs": {"a": {"cosine_min": 0.990}}}}
    assert not meets_target(dense)


def test_candidates_and_bad_names():
    names = [c.name for c in candidates()]
    assert "openvino bf16" in names and "onnxruntime bf16" not in names and "tensorrt int8" in names
    with pytest.raises(VitedgeError, match="unknown backend"):
        candidates(["tflite"])
    with pytest.raises(VitedgeError, match="unknown precision"):
        candidates(None, ["int4"])


def test_benchmark_script_help_runs():
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run_benchmarks.py"), "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "--models" in res.stdout and "--quick" in res.stdout


@pytest.mark.slow
def test_benchmark_script_quick_on_reference(tmp_path):
    out = tmp_path / "results.md"
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run_benchmarks.py"), "--models", "reference", "--quick",
                          "--time-budget", "0.3", "--precisions", "fp32,int8", "--backends", "onnxruntime,openvino",
                          "--out", str(out), "--work", str(tmp_path / "runs")], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    text = out.read_text()
    assert "instruction sets:" in res.stdout and "AVX-512 VNNI" in text
    assert "| PyTorch eager FP32" in text and "onnxruntime int8" in text and "speed-up vs PyTorch eager FP32" in text
