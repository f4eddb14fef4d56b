"""`vitedge validate`: accuracy drop with a paired interval, measured speed-up, gates, reports.

Real engines only: the reference digits ViT exported to ONNX, quantized to INT8 by vitedge and run
by ONNX Runtime and OpenVINO, on the real held-out digit images.  Timing budgets are tiny: these
tests check that latency is measured and reported, not how fast anything is.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from click.testing import CliRunner

from vitedge.errors import GateFailed, VitedgeError
from vitedge.report import SCHEMA, Report
from vitedge.validation import EngineSpec, paired_drop, validate, wilson_interval

FAST = dict(time_budget=0.05, rounds=2, warmup=1, min_runs=4)


@pytest.fixture(scope="module")
def labelled_report(tmp_path_factory, ref_int8_onnxruntime, ref_onnx, val_dir) -> tuple[Report, Path]:
    from vitedge import resources

    out = tmp_path_factory.mktemp("report")
    with pytest.MonkeyPatch.context() as mp:  # no other process on the cores, whatever this machine runs (tests/test_busy_machine.py)
        mp.setattr(resources, "read_cpu", lambda sample_s=0.25: resources.CpuReading(resources.usable_cores(), 0.0, resources.load_average()))
        rep = validate([ref_int8_onnxruntime, EngineSpec(ref_onnx, "openvino", {"config": {"INFERENCE_PRECISION_HINT": "f32"}})], "reference",
                       data=val_dir, samples=120, batch_sizes=(1, 2), out_dir=out, **FAST)
    return rep, out


def _cli(args: list[str]):
    from vitedge.cli.main import main

    return CliRunner().invoke(main, args, catch_exceptions=False)


# -- statistics ---------------------------------------------------------------------------------
def test_paired_drop_interval_contains_estimate_and_shrinks_with_n():
    ref = np.zeros(400, bool)
    ref[:360] = True  # the reference is right on 360 of 400 images
    eng = ref.copy()
    eng[:10] = False  # the engine loses 10 of them ...
    eng[360:362] = True  # ... and gets 2 others right: 8 net, 2 percentage points
    for method in ("agresti-min", "bootstrap"):
        d = paired_drop(ref, eng, method=method)
        assert d["drop_pp"] == pytest.approx(2.0)
        assert d["reference_only"] == 10 and d["engine_only"] == 2
        lo, hi = d["ci95_pp"]
        assert lo < 2.0 < hi and hi - lo < 5
    # identical predictions: the drop is 0 but a finite sample still leaves uncertainty
    same = paired_drop(ref, ref)
    assert same["drop_pp"] == 0 and same["ci95_pp"][0] < 0 < same["ci95_pp"][1]
    wide = paired_drop(ref[:50], ref[:50])["ci95_pp"]
    assert wide[1] - wide[0] > same["ci95_pp"][1] - same["ci95_pp"][0]
    # the agreement interval brackets the proportion
    assert wilson_interval(90, 100) == pytest.approx([0.826, 0.945], abs=5e-4)  # 90/100 at 95 %: Wilson (1927)


# -- the PyTorch reference is an Engine ---------------------------------------------------------------
def test_pytorch_engine_runs_the_reference_like_any_engine(ref_spec, ref_onnx, val_dir):
    import torch

    from vitedge import compare, load
    from vitedge.backends.pytorch import PyTorchEngine, open as open_pytorch

    before = torch.get_num_threads()
    try:
        with open_pytorch(ref_spec, threads=1) as eng:
            assert isinstance(eng, PyTorchEngine) and eng.backend == "pytorch" and eng.options == {"threads": 1}
            man = eng.manifest
            assert (man.format, man.precision, man.task) == ("pytorch", "fp32", "classification")
            assert eng.input_shape == ["batch", 3, 64, 64] and eng.output_names == ["logits"]
            assert man.labels == ref_spec.labels and eng.preprocessing is ref_spec.preprocessing
            images = sorted(val_dir.glob("3/*.png"))[:4]
            x = eng.preprocessing.batch(images)
            with torch.inference_mode():
                want = ref_spec.model(torch.from_numpy(x)).numpy()
            assert np.array_equal(eng.infer(x), want)
            preds = eng.predict(images, top_k=2)
            assert [p.labels[0] for p in preds] == ["3"] * 4
            with load(ref_onnx) as onnx_eng:  # the export of the same weights: matched by name, cosine ~1
                outs = compare.match_outputs(eng.infer_all(x), onnx_eng.infer_all(x), "onnx")
                assert compare.output_metrics(want, outs["logits"])["cosine_min"] > 0.9999
        assert eng.model is None  # closed
        with pytest.raises(VitedgeError, match="threads=0"):
            open_pytorch(ref_spec, threads=0)
    finally:
        torch.set_num_threads(before)


# -- labelled data, Python API -------------------------------------------------------------------
def test_int8_engine_reports_drop_interval_and_speedup(labelled_report, ref_int8_onnxruntime):
    rep, _ = labelled_report
    assert rep.labelled and rep.data["data"]["images"] == 120
    ref = rep.reference
    assert ref["backend"] == "pytorch" and ref["speedup"] == pytest.approx(1.0)
    assert 0.9 < ref["accuracy"]["top1"] <= 1.0  # the reference model's held-out accuracy is 98.6 %
    int8 = next(e for e in rep.engines if e["precision"] == "int8")
    vs = int8["vs_reference"]
    lo, hi = vs["top1_drop_ci95_pp"]
    assert lo <= vs["top1_drop_pp"] <= hi and hi > lo
    assert vs["top1_drop_pp"] == pytest.approx(100 * (ref["accuracy"]["top1"] - int8["accuracy"]["top1"]))
    assert vs["top5_drop_ci95_pp"] is not None
    assert 0.99 < vs["cosine_mean"] <= 1.0 + 1e-9 and vs["snr_db"] > 10
    assert len(vs["worst"]) == 10 and vs["worst"][0]["image"].endswith(".png")
    # the speed-up is the median of the per-round paired ratios measured in this run (2 rounds, + up to 2 extensions)
    assert ref["speedup_spread"]["ratios"] == [1.0] * ref["speedup_spread"]["rounds"]
    verdict = rep.data["speedup_verdict"]
    if verdict["measurable"]:
        sp = int8["speedup_spread"]
        assert 2 <= sp["rounds"] <= 4 and len(sp["ratios"]) == sp["rounds"]
        assert int8["speedup"] == pytest.approx(float(np.median(sp["ratios"])), rel=1e-3)
        assert sp["ratio_min"] <= sp["ratio_iqr"][0] <= int8["speedup"] <= sp["ratio_iqr"][1] <= sp["ratio_max"]
    else:  # the reference's threads waited for cores that other jobs on this machine held (tests/test_busy_machine.py)
        assert verdict["reason"].startswith("the FP32 reference ran") and int8["speedup"] is None
    lat = int8["latency"]
    assert lat["runs"] >= 4 and lat["p50_ms"] <= lat["p90_ms"] <= lat["p99_ms"] <= lat["max_ms"]
    assert [t["batch"] for t in int8["throughput"]] == [1, 2] and all(t["images_per_s"] > 0 for t in int8["throughput"])
    assert int8["size_bytes"] == ref_int8_onnxruntime.stat().st_size and int8["load_s"] > 0
    # which precision the layers really run in: all matrix work of the QDQ model is INT8
    assert int8["precision_breakdown"]["int8_mac_share"] > 0.9


def test_openvino_fp32_engine_and_precision_listing(labelled_report):
    rep, _ = labelled_report
    ov = next(e for e in rep.engines if e["backend"] == "openvino")
    assert ov["name"] == "openvino fp32 (fp32 hint)"
    assert ov["vs_reference"]["cosine_min"] > 0.9999  # FP32 vs FP32
    pb = ov["precision_breakdown"]
    assert pb["mac_share"] == {"fp32": pytest.approx(1.0)}  # the f32 hint really gives FP32 kernels
    assert {layer["type"] for layer in pb["layers"]} >= {"FullyConnected"}


def test_attention_section_compares_each_engines_maps_with_the_references(labelled_report):
    rep, out = labelled_report
    for e in rep.engines:
        att = e["attention"]
        assert att["kind"] == "rollout" and att["images"] == len(att["per_image"]) == 32  # bounded: 32 of the 120 images
        assert 0.99 < att["correlation"]["min"] <= att["correlation"]["median"] <= 1.0 and 0 <= att["top10_overlap"]["min"] <= 1
        worst = min(r["correlation"] for r in att["per_image"])
        assert [m["correlation"] for m in att["moved"]][0] == worst and len(att["moved"]) == 3
        assert np.shape(att["moved"][0]["engine_map"]) == np.shape(att["moved"][0]["reference_map"]) == (4, 4)
    md, html = (out / "report.md").read_text(), (out / "report.html").read_text()
    assert "## Attention vs FP32" in md and 'id="attention"' in html and html.count('src="data:image/png;base64,') == 2 * 3


def test_report_files_match_schema(labelled_report):
    rep, out = labelled_report
    data = json.loads((out / "report.json").read_text())
    jsonschema.validate(data, SCHEMA)
    assert data["machine"]["instruction_sets"].keys() >= {"AVX2", "AVX-512F", "AVX-512 VNNI", "AVX-512 BF16", "AMX-INT8"}
    # the load average before and after timing, and whether the machine was busy
    load = data["machine"]["load"]
    assert len(load["before_timing"]) == len(load["after_timing"]) == 3 and load["cores"] >= 1
    assert load["busy"] is (load["warning"] is not None) and load["busy_load_per_core"] == 1.0
    # the reference's threads: by default the cores other processes leave free (every usable core on a quiet machine)
    fitted = data["settings"]["engine_threads"]  # None: every core fits, the engines keep their own thread counts
    assert data["settings"]["reference_threads"] == (fitted or load["cores"]) == data["models"][0]["options"]["threads"]
    md = (out / "report.md").read_text()
    assert "top-1 drop (95% CI)" in md and "onnxruntime int8" in md and "| pytorch fp32 (ref)" in md
    html = (out / "report.html").read_text()
    assert html.count("<svg") == 2 + 2  # latency distribution + accuracy vs latency, and the attention correlation of each engine
    for m in rep.models:  # every model compared appears in both plots
        assert html.count(f"<title>{m['name']}") >= 2
    assert not re.search(r"""(src|href)=["']?(http|//)""", html)  # self-contained
    assert Report.load(out).engines[0]["name"] == rep.engines[0]["name"]


# -- gates through the CLI ----------------------------------------------------------------------
def test_cli_missed_gate_exits_1_after_writing_report(tmp_path, ref_int8_onnxruntime, val_dir, quiet_cpu):
    out = tmp_path / "rep"
    res = _cli(["validate", str(ref_int8_onnxruntime), "-r", "reference", "--val", str(val_dir), "--val-samples", "40", "--runs", "6",
                "--batch-sizes", "1", "--min-speedup", "1000", "--reference-threads", "1", "-o", str(out)])
    assert res.exit_code == 1, res.output
    assert "speed-up" in res.output and "--min-speedup 1000x" in res.output
    data = json.loads((out / "report.json").read_text())
    assert data["gates"]["passed"] is False and data["models"][1]["gate_failures"]
    assert (out / "report.html").exists() and (out / "report.md").exists()


def test_cli_met_gates_exit_0(tmp_path, ref_int8_onnxruntime, val_dir, quiet_cpu):
    import torch

    before = torch.get_num_threads()
    out = tmp_path / "rep"
    res = _cli(["validate", str(ref_int8_onnxruntime), "-r", "reference", "--val", str(val_dir), "--val-samples", "40", "--runs", "6",
                "--batch-sizes", "1", "--min-speedup", "0.001", "--max-drop", "50", "--reference-threads", "1", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert "all gates passed" in res.output and "onnxruntime int8" in res.output
    data = json.loads((out / "report.json").read_text())
    assert data["gates"]["passed"] is True
    # --reference-threads: PyTorch eager ran with 1 thread, recorded; the process-wide count is restored afterwards
    assert data["settings"]["reference_threads"] == 1 and data["settings"]["torch_threads"] == 1
    assert data["models"][0]["options"] == {"threads": 1} and torch.get_num_threads() == before
    assert "timed in the same run, 1 thread;" in (out / "report.md").read_text()


def test_strict_drop_gate_uses_the_interval(tmp_path, ref_onnx, val_dir):
    # the FP32 ONNX agrees with PyTorch on every image: drop 0, so --max-drop 0 passes on the estimate...
    rep = validate(ref_onnx, "reference", data=val_dir, samples=40, batch_sizes=(1,), max_drop=0.0, **FAST)
    assert rep.engines[0]["vs_reference"]["top1_drop_pp"] == 0 and rep.passed
    # ...but not on the upper end of its confidence interval (40 images cannot prove a 0 pp drop)
    with pytest.raises(GateFailed, match="upper bound exceeds --max-drop 0 pp") as info:
        validate(ref_onnx, "reference", data=val_dir, samples=40, batch_sizes=(1,), max_drop=0.0, strict=True,
                 out_dir=tmp_path / "strict", **FAST)
    assert info.value.exit_code == 1 and (tmp_path / "strict" / "report.json").exists()


# -- unlabelled data ------------------------------------------------------------------------------
def test_unlabelled_data_gives_agreement(tmp_path, ref_onnx, val_dir):
    flat = tmp_path / "flat"
    flat.mkdir()
    for i, p in enumerate(sorted(val_dir.rglob("*.png"))[::12]):
        shutil.copy(p, flat / f"img{i:03d}.png")
    rep = validate(EngineSpec(ref_onnx, "openvino"), ref_onnx, data=flat, batch_sizes=(1,), max_drop=50,
                   out_dir=tmp_path / "rep", **FAST)
    assert not rep.labelled and rep.reference["backend"] == "onnxruntime" and rep.reference["accuracy"] is None
    vs = rep.engines[0]["vs_reference"]
    assert vs["top1_drop_pp"] is None and vs["top1_drop_ci95_pp"] is None
    assert 0.9 <= vs["top1_agreement"] <= 1.0 and vs["top5_agreement"] >= vs["top1_agreement"]
    assert vs["top1_agreement_ci95"][0] <= vs["top1_agreement"] <= vs["top1_agreement_ci95"][1]
    jsonschema.validate(json.loads((tmp_path / "rep" / "report.json").read_text()), SCHEMA)
    assert "agreement with the FP32 reference" in (tmp_path / "rep" / "report.md").read_text()


# -- bad input ------------------------------------------------------------------------------------
def test_engine_of_another_model_is_refused_without_report(tmp_path, tiny_onnx, val_dir):
    with pytest.raises(VitedgeError) as info:
        validate(tiny_onnx, "reference", data=val_dir, samples=8, out_dir=tmp_path / "rep", **FAST)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "rep").exists() or not any((tmp_path / "rep").iterdir())


def test_cli_bad_arguments(tmp_path, ref_onnx):
    res = _cli(["validate", str(ref_onnx), "-r", "reference", "--batch-sizes", "0,2"])
    assert res.exit_code == 2 and "positive integers" in res.output
    res = _cli(["validate", str(ref_onnx), "-r", "reference", "--precision-hint", "bf16", "-o", str(tmp_path / "r")])
    assert res.exit_code == 2 and "OpenVINO option" in res.output


def test_sysinfo_reads_cpu_flags(tmp_path):
    from vitedge.sysinfo import _cpuinfo, instruction_sets, isa_summary, machine_info

    fake = tmp_path / "cpuinfo"
    fake.write_text("processor\t: 0\nmodel name\t: Test CPU 9000\nflags\t\t: fpu sse avx2 avx512f avx512_vnni amx_int8\n")
    model, flags = _cpuinfo(str(fake))
    isa = instruction_sets(flags)
    assert model == "Test CPU 9000"
    assert isa["AVX2"] and isa["AVX-512 VNNI"] and isa["AMX-INT8"] and not isa["AVX-512 BF16"] and not isa["AMX-BF16"]
    assert isa_summary({"instruction_sets": isa}) == "AVX2 yes, AVX-512F yes, AVX-512 VNNI yes, AVX-512 BF16 no, AMX yes"
    assert isa_summary({"instruction_sets": instruction_sets(set())}) == "AVX2 no, AVX-512F no, AVX-512 VNNI no, AVX-512 BF16 no, AMX no"
    assert _cpuinfo(str(tmp_path / "missing")) == (None, None)
    assert isa_summary({"instruction_sets": dict.fromkeys(isa)}) == "AVX2 ?, AVX-512F ?, AVX-512 VNNI ?, AVX-512 BF16 ?, AMX ?"
    info = machine_info()
    assert info["logical_cores"] >= 1 and set(info["instruction_sets"]) == set(isa)
