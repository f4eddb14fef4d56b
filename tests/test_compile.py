"""`vitedge compile`: real ONNX Runtime / OpenVINO engines from FP32, FP16 and INT8 inputs.

The reference digits ViT is quantized with the real `vitedge quantize`, compiled for each target and
run through `vitedge.load` and `vitedge predict` on all 360 held-out images: top-1 must match FP32.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import vitedge
from vitedge.cli.main import main as cli
from vitedge.compilation import compile_model, resolve_batch
from vitedge.errors import VitedgeError
from vitedge.manifest import Manifest

# (target, precision) -> quantized input that `vitedge quantize` writes for that target
CASES = [
    ("onnxruntime", "fp32"), ("onnxruntime", "fp16"), ("onnxruntime", "int8"),
    ("openvino", "fp32"), ("openvino", "fp16"), ("openvino", "int8"),
]


@pytest.fixture(scope="module")
def val_data(ref_onnx, val_dir):
    from vitedge.data import ImageSet, label_indices

    vs = ImageSet.from_path(val_dir)
    with vitedge.load(ref_onnx) as ref:
        x = ref.preprocessing.batch(vs.paths)
        y = label_indices(vs.labels, ref.manifest.labels, str(val_dir))
        fp32 = ref.infer(x).argmax(1)
    return x, y, fp32


@pytest.fixture(scope="module")
def sources(tmp_path_factory, ref_onnx, calib_dir, ref_int8_onnxruntime, ref_int8_openvino):
    """FP32 export plus the FP16/INT8 artifacts `vitedge quantize` makes for each backend (INT8: the shared ones)."""
    from vitedge.quantization import quantize

    d = tmp_path_factory.mktemp("quantized")
    out = {("onnxruntime", "fp32"): ref_onnx, ("openvino", "fp32"): ref_onnx,
           ("onnxruntime", "int8"): ref_int8_onnxruntime, ("openvino", "int8"): ref_int8_openvino}
    for backend, suffix in (("onnxruntime", ".onnx"), ("openvino", ".xml")):
        path, man = quantize(ref_onnx, d / f"{backend}_fp16{suffix}", precision="fp16", backend=backend, calib=calib_dir, samples=32)
        assert man.precision == "fp16"
        out[(backend, "fp16")] = path
    return out


@pytest.fixture(scope="module")
def engines(tmp_path_factory, sources):
    d = tmp_path_factory.mktemp("engines")
    out = {}
    for target, prec in CASES:
        suffix = ".onnx" if target == "onnxruntime" else ".xml"
        out[(target, prec)] = compile_model(sources[(target, prec)], d / f"{target}_{prec}{suffix}", target=target)
    return out


@pytest.mark.e2e  # builds an engine per backend and precision, then validates each on the held-out images
@pytest.mark.parametrize("target,precision", CASES)
def test_engine_keeps_fp32_top1_on_heldout_images(engines, val_data, target, precision):
    path, man = engines[(target, precision)]
    x, y, fp32 = val_data
    assert man.backend == target and man.precision == precision
    assert man.compile["target"] == target and man.compile["batch"] == 1  # latency default: static batch 1
    assert set(man.files) >= {path.name} and man.lineage[-1]["precision"] == precision
    assert all(c["cosine_min"] > 0.99 for c in man.verification["checks"].values())
    with vitedge.load(path) as eng:
        assert eng.backend == target and eng.fixed_batch == 1
        pred = eng.infer(x).argmax(1)
    assert (pred == y).mean() >= (fp32 == y).mean() - 1e-9, "top-1 accuracy fell below FP32"
    assert (pred == fp32).mean() >= 0.99


@pytest.mark.parametrize("target,precision", CASES)
def test_predict_cli_matches_fp32(engines, val_data, val_dir, target, precision):
    path, _ = engines[(target, precision)]
    _, y, fp32 = val_data
    res = CliRunner().invoke(cli, ["predict", str(path), str(val_dir), "--json", "-k", "3"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)
    assert len(rows) == len(y) and all(len(r["top"]) == 3 for r in rows)
    got = np.array([r["top"][0]["index"] for r in rows])
    assert all(Path(r["image"]).parent.name == r["top"][0]["label"] for r, ok in zip(rows, got == y) if ok)
    assert (got == y).mean() >= (fp32 == y).mean() - 1e-9
    assert (got == fp32).mean() >= 0.99


def test_predict_cli_text(engines, val_dir):
    path, _ = engines[("onnxruntime", "fp32")]
    img = sorted((val_dir / "7").iterdir())[0]
    res = CliRunner().invoke(cli, ["predict", str(path), str(img), "--top-k", "2"])
    assert res.exit_code == 0, res.output
    line = res.stdout.strip()
    assert line.startswith(str(img)) and line.split(": ", 1)[1].split()[0] == "7" and line.count("%") == 2


def test_static_and_dynamic_shapes(tmp_path, ref_onnx):
    import onnx
    import openvino as ov

    kw = {"verify": False}  # verification is covered elsewhere; this test is about shapes
    static, _ = compile_model(ref_onnx, tmp_path / "s.onnx", target="onnxruntime", **kw)
    dynamic, dman = compile_model(ref_onnx, tmp_path / "d.onnx", target="onnxruntime", batch="dynamic", **kw)
    thr, tman = compile_model(ref_onnx, tmp_path / "t.xml", target="openvino", hint="throughput", **kw)
    fixed4, _ = compile_model(ref_onnx, tmp_path / "f4.xml", target="openvino", batch=4, **kw)
    dim0 = lambda p: onnx.load(str(p)).graph.input[0].type.tensor_type.shape.dim[0]  # noqa: E731
    assert dim0(static).dim_value == 1
    assert dim0(dynamic).dim_param and dman.inputs[0].shape[0] == "batch"
    assert not ov.Core().read_model(str(thr)).inputs[0].get_partial_shape().is_static and tman.compile["batch"] == "dynamic"
    assert list(ov.Core().read_model(str(fixed4)).inputs[0].get_shape()) == [4, 3, 64, 64]
    x = np.random.default_rng(1).standard_normal((6, 3, 64, 64)).astype(np.float32)
    outs = []
    for p in (static, dynamic, fixed4):
        with vitedge.load(p) as e:
            outs.append(e.infer(x))  # 6 images: chunks of 1, one dynamic call, 4 + padded 2
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-4)
    np.testing.assert_allclose(outs[0], outs[2], atol=0.1)  # OpenVINO runs bf16 on this CPU by default


def test_resolve_batch():
    assert resolve_batch("auto", "latency") == 1 and resolve_batch("auto", "throughput") is None
    assert resolve_batch(None, "latency") is None and resolve_batch("dynamic", "latency") is None and resolve_batch("8", "latency") == 8
    for bad in ("0", "many", -2):
        with pytest.raises(VitedgeError):
            resolve_batch(bad, "latency")


def test_openvino_settings_are_applied(tmp_path, ref_onnx):
    path, man = compile_model(ref_onnx, tmp_path / "e.xml", target="openvino", threads=1, hint="throughput", precision_hint="f32", streams=1)
    assert man.compile["openvino_config"] == {"PERFORMANCE_HINT": "THROUGHPUT", "INFERENCE_NUM_THREADS": "1", "NUM_STREAMS": "1",
                                              "INFERENCE_PRECISION_HINT": "f32"}
    with vitedge.load(path) as eng:
        props = eng.properties
    assert props["PERFORMANCE_HINT"] == "THROUGHPUT" and props["INFERENCE_NUM_THREADS"] == "1" and props["NUM_STREAMS"] == "1"
    assert props["INFERENCE_PRECISION_HINT"] == "f32"
    # FP32 weights are kept FP32 in the IR (save_model would halve them by default)
    import openvino as ov

    consts = [op for op in ov.Core().read_model(str(path)).get_ops() if op.get_type_name() == "Constant"]
    assert not any(str(c.get_element_type()) in ("<Type: 'float16'>", "f16") or c.get_element_type().to_string() == "f16" for c in consts)


def test_int8_openvino_float_ops_precision_default(engines):
    from vitedge.backends.openvino import cpu_has_bf16
    from vitedge.compilation import default_precision_hint

    _, man = engines[("openvino", "int8")]
    # the INT8 fidelity search measures the float parts in bf16 (on CPUs that have it: issue 9, docs/runtime.md) and in
    # f32, and the engine gets the precision it chose
    chosen = man.quantization["float_precision"] if man.quantization else None
    allowed = ("bf16", "f32") if cpu_has_bf16() else ("f32",)
    assert default_precision_hint("int8") == allowed[0]
    assert man.compile["openvino_config"].get("INFERENCE_PRECISION_HINT") == (chosen or allowed[0]) and (chosen or allowed[0]) in allowed


def test_onnxruntime_engine_is_optimised_and_loads_on_plain_cpu_session(tmp_path, ref_onnx):
    import onnx
    import onnxruntime as ort

    path, man = compile_model(ref_onnx, tmp_path / "e.onnx", target="onnxruntime", threads=1)
    assert man.compile["opt_level"] == "extended" and man.compile["threads"] == 1
    ops = lambda p: {(n.domain, n.op_type) for n in onnx.load(str(p)).graph.node}  # noqa: E731
    fused = {op for op in ops(path) - ops(ref_onnx) if op[0] == "com.microsoft"}
    assert fused, "the saved model holds no ONNX Runtime fused ops: it was not optimised"
    assert ("", "Shape") in ops(ref_onnx) and ("", "Shape") not in ops(path)  # static batch: shape arithmetic folded
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((1, 3, 64, 64)).astype(np.float32)
    ref = ort.InferenceSession(str(ref_onnx), providers=["CPUExecutionProvider"]).run(None, {"pixel_values": x})[0]
    np.testing.assert_allclose(sess.run(None, {"pixel_values": x})[0], ref, atol=1e-4)
    with vitedge.load(path) as eng:
        assert eng.threads == 1 and "CPUExecutionProvider" in eng.providers


def test_blob_round_trip(tmp_path, ref_onnx):
    path, man = compile_model(ref_onnx, tmp_path / "e.xml", target="openvino", export_blob=True)
    blob = tmp_path / "e.blob"
    assert blob.exists() and man.compile["blob"]["file"] == "e.blob" and "e.blob" in man.files
    x = np.random.default_rng(0).standard_normal((3, 3, 64, 64)).astype(np.float32)
    with vitedge.load(blob) as a, vitedge.load(path) as b, vitedge.load(path, use_blob=False) as c:
        assert a.from_blob and b.from_blob and not c.from_blob
        np.testing.assert_allclose(a.infer(x), c.infer(x), atol=1e-5)
        np.testing.assert_allclose(b.infer(x), c.infer(x), atol=1e-5)
    # a blob from another OpenVINO version: the .blob is refused, the .xml compiles the IR instead
    side = Manifest.sidecar_path(path)
    data = json.loads(side.read_text())
    data["compile"]["blob"]["openvino"] = "2020.1.0"
    side.write_text(json.dumps(data))
    with pytest.raises(VitedgeError, match="exported by OpenVINO 2020.1.0"):
        vitedge.load(blob)
    with vitedge.load(path) as e:
        assert not e.from_blob and e.infer(x).shape == (3, 10)


def test_compile_from_a_model_object(tmp_path, tiny_vit):
    path, man = compile_model(tiny_vit, tmp_path / "tiny.onnx", target="onnxruntime")
    assert man.model["family"] == "vit" and man.inputs[0].shape == [1, 3, 32, 32]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.onnx", "tiny.onnx.vitedge.json"]
    with vitedge.load(path) as e:
        assert e.infer(np.zeros((2, 3, 32, 32), np.float32)).shape == (2, 7)


def test_default_output_names(tmp_path, ref_onnx):
    src = tmp_path / "m.onnx"
    shutil.copy(ref_onnx, src)
    shutil.copy(Manifest.sidecar_path(ref_onnx), Manifest.sidecar_path(src))
    p1, _ = compile_model(src, target="onnxruntime", verify=False)
    p2, _ = compile_model(src, target="openvino", verify=False)
    assert p1 == tmp_path / "m.ort.onnx" and p2 == tmp_path / "m.ov.xml" and (tmp_path / "m.ov.bin").exists()


def test_cli_compile(tmp_path, ref_onnx):
    out = tmp_path / "cli.xml"
    res = CliRunner().invoke(cli, ["compile", str(ref_onnx), "--backend", "openvino", "-o", str(out), "--blob", "--threads", "2"])
    assert res.exit_code == 0, res.output
    assert "wrote" in res.stdout and "checked on images inputs" in res.stdout and "compiled blob" in res.stdout
    assert out.exists() and out.with_suffix(".bin").exists() and out.with_suffix(".blob").exists()
    assert Manifest.load(Manifest.sidecar_path(out)).compile["openvino_config"]["INFERENCE_NUM_THREADS"] == "2"


@pytest.mark.parametrize("args,message", [
    (["missing.onnx"], "does not exist"),
    (["{ref}", "--backend", "onnxruntime", "--blob"], "--blob is an option of openvino"),
    (["{ref}", "--backend", "onnxruntime", "-o", "{tmp}/x.xml"], "must end in .onnx"),
    (["{ref}", "--backend", "openvino", "-o", "{tmp}/x.xml", "--device", "NPU7"], "not present on this machine"),
    (["{ref}", "--batch", "0"], "must be >= 1"),
    (["{ref}", "-o", "{tmp}/x.onnx", "--img-size", "96"], "cannot change the resolution"),
    (["{ref}", "-o", "{tmp}/x.onnx", "--precision-hint", "bf16"], "no bf16 precision hint"),
    (["{ref}", "-o", "{ref}"], "would overwrite its input"),
    (["{ir}", "--backend", "onnxruntime", "-o", "{tmp}/x.onnx"], "ONNX Runtime runs ONNX files"),
    (["{tmp}/junk.onnx", "-o", "{tmp}/x.onnx"], "not a readable ONNX file"),
])
def test_cli_compile_errors_are_one_line(tmp_path, ref_onnx, engines, args, message):
    (tmp_path / "junk.onnx").write_bytes(b"not an onnx file at all")
    ir, _ = engines[("openvino", "fp32")]
    args = [a.format(ref=ref_onnx, tmp=tmp_path, ir=ir) for a in args]
    before = sorted(p.name for p in tmp_path.iterdir())
    res = CliRunner().invoke(cli, ["compile", *args])
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing half-written
