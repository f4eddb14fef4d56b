"""ONNX files vitedge did not export: quantize, compile, validate, predict and load accept them.

Every model here is made in the test by another exporter than ``vitedge export``: the TorchScript
``torch.onnx.export`` at opset 13/14 (LayerNorm decomposed into ReduceMean/Pow/Sqrt/Div) with fixed
or dynamic batch and other input/output names, a random ``transformers`` ViT, and a model whose
outputs are a dense token map plus a pooled vector (not a classifier).  Models are tiny (32 px) and
random: the tests check that the pipeline runs on real ONNX Runtime / OpenVINO / NNCF and reports
sensible agreement with FP32, not accuracy.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from vitedge.errors import ShapeMismatch, VitedgeError
from vitedge.manifest import Manifest

FAST = dict(time_budget=0.05, rounds=1, warmup=1, min_runs=3, batch_sizes=(1,))
FAST_CLI = ["--time-budget", "0.05", "--rounds", "1", "--batch-sizes", "1", "--val-samples", "24"]


def _cli(args: list[str]):
    from vitedge.cli.main import main

    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _tiny_vit(num_classes: int = 10, seed: int = 0):
    from vitedge import VisionTransformer

    torch.manual_seed(seed)
    return VisionTransformer(img_size=32, patch_size=8, num_classes=num_classes, d_model=32, num_heads=2, num_layers=2,
                             d_ff=64, dropout=0.0).eval()


def _torchscript_export(model, path: Path, opset: int, batch: int, inputs: list[str], outputs: list[str], dynamic: bool) -> Path:
    axes = {n: {0: "batch_size"} for n in inputs + outputs} if dynamic else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(batch, 3, 32, 32),), str(path), dynamo=False, opset_version=opset,
                          input_names=inputs, output_names=outputs, dynamic_axes=axes)
    return path


@pytest.fixture(scope="module")
def ts_onnx(tmp_path_factory) -> Path:
    """TorchScript exporter, opset 14, fixed batch 2, input 'input.1', output 'output'."""
    path = _torchscript_export(_tiny_vit(), tmp_path_factory.mktemp("ts") / "vit_ts14.onnx", 14, 2, ["input.1"], ["output"], False)
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"ReduceMean", "Pow", "Sqrt", "Div"} <= ops and "LayerNormalization" not in ops  # really the decomposed flavour
    return path


@pytest.fixture(scope="module")
def hf_onnx(tmp_path_factory) -> Path:
    """A random transformers ViTForImageClassification, exported with input 'pixel_values' and output 'logits'."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=64, num_labels=10)
    hf = ViTForImageClassification(cfg).eval()

    class Logits(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, pixel_values):
            return self.m(pixel_values=pixel_values).logits

    return _torchscript_export(Logits(hf), tmp_path_factory.mktemp("hf") / "hf_vit.onnx", 14, 1, ["pixel_values"], ["logits"], True)


@pytest.fixture(scope="module")
def dense_onnx(tmp_path_factory) -> Path:
    """Not a classifier: outputs the dense token map (B, 16, 32) and the pooled CLS vector (B, 32)."""
    vit = _tiny_vit(num_classes=0, seed=1)

    class Dense(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            f, _ = self.m.forward_features(x)
            return f[:, 1:], f[:, 0]

    return _torchscript_export(Dense(vit), tmp_path_factory.mktemp("dense") / "dense.onnx", 13, 1, ["images"], ["tokens", "pooled"], True)


@pytest.fixture(scope="module")
def dynamic_size_onnx(tmp_path_factory, hf_onnx) -> Path:
    """The transformers file with its height and width declared dynamic (as exporters write them)."""
    proto = onnx.load(str(hf_onnx))
    for axis, name in ((2, "height"), (3, "width")):
        d = proto.graph.input[0].type.tensor_type.shape.dim[axis]
        d.Clear()
        d.dim_param = name
    out = tmp_path_factory.mktemp("dyn") / "dyn_size.onnx"
    onnx.save(proto, str(out))
    return out


def _copy(src: Path, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    dst = folder / src.name
    dst.write_bytes(src.read_bytes())
    return dst


# -- the manifest built from the file ------------------------------------------------------------
def test_manifest_from_a_torchscript_file(ts_onnx):
    from vitedge.foreign import ensure_manifest, is_foreign

    artifact, man = ensure_manifest(ts_onnx, announce=False)
    assert artifact == ts_onnx and is_foreign(man)
    assert man.inputs[0].name == "input.1" and man.inputs[0].shape == [2, 3, 32, 32]
    assert [o.name for o in man.outputs] == ["output"] and man.task == "classification"
    assert man.opset == 14 and man.model["layer_norm"].startswith("decomposed")
    pre = man.preprocessing_obj
    assert pre.img_size == (32, 32) and pre.mean == pytest.approx((0.485, 0.456, 0.406)) and pre.resize == 36  # floor(32 / 0.875)
    assert pre.interpolation == "bicubic"  # the one default rule, as for checkpoints
    assert any("mean = ImageNet" in a for a in man.assumptions) and any("bicubic" in a for a in man.assumptions)
    assert man.files[ts_onnx.name]  # hashed, so later steps record their lineage
    assert not Manifest.sidecar_path(ts_onnx).exists()  # nothing written next to the user's file


def test_preprocessing_options_and_json(tmp_path, hf_onnx):
    from vitedge.foreign import ensure_manifest, preprocessing_from_options

    pre, assumed = preprocessing_from_options(mean="0.5,0.5,0.5", std="0.5,0.5,0.5", crop=False, input_shape=["b", 3, 32, 32])
    assert pre.img_size == (32, 32) and pre.resize is None and not pre.center_crop
    assert assumed == ["bicubic interpolation"]  # only what was not given
    js = tmp_path / "pre.json"
    js.write_text(json.dumps({"img_size": 32, "resize": 40, "center_crop": True, "interpolation": "bicubic",
                              "mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6], "channel_order": "BGR"}))
    _, man = ensure_manifest(hf_onnx, {"json_path": js, "interpolation": "nearest"}, announce=False)  # a flag overrides the JSON
    p = man.preprocessing
    assert p["resize"] == 40 and p["interpolation"] == "nearest" and p["mean"] == [0.1, 0.2, 0.3] and p["channel_order"] == "BGR"
    assert not any("preprocessing" in a for a in man.assumptions)
    # a Hugging Face preprocessor_config.json is read as transformers would
    hf_cfg = tmp_path / "preprocessor_config.json"
    hf_cfg.write_text(json.dumps({"image_processor_type": "ViTImageProcessor", "do_resize": True, "size": {"height": 32, "width": 32},
                                  "resample": 2, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "do_normalize": True}))
    _, man = ensure_manifest(hf_onnx, hf_cfg, announce=False)
    assert man.preprocessing["resize"] is None and man.preprocessing["mean"] == [0.5, 0.5, 0.5]
    with pytest.raises(ShapeMismatch):
        ensure_manifest(hf_onnx, {"img_size": 64}, announce=False)
    for bad, msg in (({"mean": "0.5,0.5"}, "mean needs 3"), ({"colour": 1}, "unknown preprocessing")):
        with pytest.raises(VitedgeError, match=msg):
            ensure_manifest(hf_onnx, bad, announce=False)
    js.write_text(json.dumps({"img_size": 32, "gamma": 2.2}))
    with pytest.raises(VitedgeError, match="unknown preprocessing keys"):
        ensure_manifest(hf_onnx, js, announce=False)


# -- TorchScript opset 14, fixed batch, renamed input/output: Python API -----------------------------
@pytest.fixture(scope="module")
def ts_int8(tmp_path_factory, ts_onnx, calib_dir):
    from vitedge.quantization import quantize

    out = tmp_path_factory.mktemp("ts_q")
    ort_path, ort_man = quantize(ts_onnx, out / "ts.int8.onnx", precision="int8", backend="onnxruntime", calib=calib_dir, samples=17)
    ov_path, ov_man = quantize(ts_onnx, out / "ts.int8.xml", precision="int8", backend="openvino", calib=calib_dir, samples=17)
    return ort_path, ort_man, ov_path, ov_man


def test_quantize_torchscript_fixed_batch(ts_int8, ts_onnx):
    ort_path, ort_man, ov_path, ov_man = ts_int8
    for man in (ort_man, ov_man):
        assert man.inputs[0].name == "input.1" and man.inputs[0].shape[0] == 2  # the fixed batch is kept
        assert man.model["family"] == "foreign" and man.lineage[0]["artifact"] == ts_onnx.name
        assert man.preprocessing["img_size"] == [32, 32] and any("mean = ImageNet" in a for a in man.assumptions)
        a = man.verification["agreement"]
        assert a["images"] == 20 and a["cosine_min"] > 0.99 and a["top1_agreement"] >= 0.9, a
    assert ort_man.quantization["calibration"]["size"] == 17  # 17 images in padded batches of 2
    ops = {n.op_type for n in onnx.load(str(ort_path)).graph.node}
    assert "QuantizeLinear" in ops and {"ReduceMean", "Sqrt"} <= ops  # MatMuls INT8, decomposed LayerNorm left float
    assert Manifest.find(ov_path)[1].precision == "int8"


def test_compile_and_validate_torchscript(tmp_path, ts_int8, ts_onnx, val_dir):
    from vitedge import load
    from vitedge.compilation import compile_model
    from vitedge.validation import validate

    ort_path, _, ov_path, _ = ts_int8
    eng_path, eng_man = compile_model(ort_path, tmp_path / "ts.ort.onnx", target="onnxruntime")
    assert eng_man.compile["batch"] == 2  # "auto" keeps the exported fixed batch
    assert eng_man.verification["checks"]["images"]["cosine_min"] > 0.999
    with load(eng_path) as eng:
        preds = eng.predict(sorted(val_dir.glob("3/*.png"))[:3], top_k=2)  # 3 images through a batch-2 engine
    assert len(preds) == 3 and preds[0].labels[0] in [str(i) for i in range(10)]
    rep = validate([eng_path, ov_path], data=val_dir, samples=24, **FAST)  # reference: the foreign FP32 file, from the lineage
    ref = rep.reference
    assert ref["artifact"] == str(ts_onnx.resolve()) and rep.labelled
    for e in rep.engines:
        vs = e["vs_reference"]
        assert vs["cosine_mean"] > 0.99 and vs["top1_agreement"] >= 0.9 and "outputs" not in vs
        assert e["attention"]["correlation"]["min"] > 0.99  # the attention found from the foreign graph's data flow
    assert any("no vitedge manifest" in f for f in rep.data["findings"])


# -- transformers ViT, dynamic batch: through the CLI ----------------------------------------------
@pytest.mark.e2e  # quantize, compile, validate (and predict) in a row
def test_transformers_vit_cli_quantize_compile_validate_predict(tmp_path, hf_onnx, calib_dir, val_dir):
    q = tmp_path / "hf.int8.xml"
    r = _cli(["quantize", hf_onnx, "--int8", "--backend", "openvino", "--calib", calib_dir, "--calib-samples", "16",
              "--mean", "0.5,0.5,0.5", "--std", "0.5,0.5,0.5", "--no-crop", "-o", q])
    assert r.exit_code == 0, r.output
    assert "has no vitedge manifest" in r.output and "'pixel_values'" in r.output and "'logits'" in r.output
    assert "assumed preprocessing bicubic interpolation" in r.output and "mean = ImageNet" not in r.output
    man = Manifest.find(q)[1]
    assert man.preprocessing["mean"] == [0.5, 0.5, 0.5] and man.preprocessing["resize"] is None and not man.preprocessing["center_crop"]
    assert man.verification["agreement"]["cosine_min"] > 0.99

    r = _cli(["compile", q, "--backend", "openvino", "-o", tmp_path / "hf.ov.xml"])
    assert r.exit_code == 0, r.output
    assert Manifest.find(tmp_path / "hf.ov.xml")[1].preprocessing["mean"] == [0.5, 0.5, 0.5]

    r = _cli(["validate", tmp_path / "hf.ov.xml", "--val", val_dir, "-o", tmp_path / "rep"] + FAST_CLI)
    assert r.exit_code == 0, r.output
    data = json.loads((tmp_path / "rep" / "report.json").read_text())
    eng = data["models"][1]
    assert data["models"][0]["artifact"] == str(hf_onnx.resolve())  # the transformers file is the FP32 reference
    assert eng["vs_reference"]["cosine_mean"] > 0.99 and eng["vs_reference"]["top1_agreement"] >= 0.9

    img = sorted(val_dir.glob("7/*.png"))[0]
    r = _cli(["predict", hf_onnx, img, "-k", "3", "--img-size", "32", "--mean", "0.5,0.5,0.5", "--std", "0.5,0.5,0.5", "--json"])
    assert r.exit_code == 0, r.output
    top = json.loads(r.stdout)[0]["top"]
    assert len(top) == 3 and abs(sum(t["prob"] for t in top)) <= 1.0 + 1e-6


# -- a dense-map model with two outputs ------------------------------------------------------------
@pytest.mark.e2e  # quantize, compile, validate (and predict) in a row
def test_dense_map_model_quantize_compile_validate_per_output(tmp_path, dense_onnx, calib_dir, val_dir):
    from vitedge.compilation import compile_model
    from vitedge.quantization import quantize
    from vitedge.report import SCHEMA
    from vitedge.validation import validate

    pre = {"mean": "0.5,0.5,0.5", "std": "0.5,0.5,0.5"}
    mans = {}
    for backend, suffix in (("onnxruntime", ".onnx"), ("openvino", ".xml")):
        path, man = quantize(dense_onnx, tmp_path / f"dense.int8{suffix}", precision="int8", backend=backend, calib=calib_dir,
                             samples=16, preprocessing=pre)
        assert man.task == "features"
        outs = man.verification["agreement"]["outputs"]
        assert list(outs) == ["tokens", "pooled"] and outs["tokens"]["shape"] == [16, 32] and outs["pooled"]["shape"] == [32]
        for o in outs.values():
            assert o["cosine_min"] > 0.99 and o["snr_db"] > 20 and o["max_abs_error"] > 0, o
        assert "top1" not in man.verification["agreement"]  # the digit folders are no classes of a feature extractor
        mans[backend] = path
    eng, eman = compile_model(mans["onnxruntime"], tmp_path / "dense.ort.onnx", target="onnxruntime", batch="dynamic")
    assert set(eman.verification["checks"]["images"]["outputs"]) == {"tokens", "pooled"}

    rep = validate([eng, mans["openvino"]], dense_onnx, data=val_dir, samples=24, out_dir=tmp_path / "rep", **FAST)
    assert not rep.labelled
    for e in rep.engines:
        vs = e["vs_reference"]
        assert vs["top1_agreement"] is None and set(vs["outputs"]) == {"tokens", "pooled"}
        assert all(o["cosine_mean"] > 0.99 and o["snr_db"] > 20 for o in vs["outputs"].values()), vs["outputs"]
    import jsonschema

    jsonschema.validate(json.loads((tmp_path / "rep" / "report.json").read_text()), SCHEMA)
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| `tokens` | (16, 32) |" in md and "| `pooled` | (32,) |" in md
    with pytest.raises(VitedgeError, match="--max-drop needs class logits"):
        validate(eng, dense_onnx, data=val_dir, samples=8, max_drop=1.0, **FAST)
    with pytest.raises(VitedgeError, match="--max-drop needs class logits"):
        quantize(dense_onnx, tmp_path / "x.onnx", calib=calib_dir, samples=8, max_drop=1.0, preprocessing=pre)
    from vitedge import load

    with load(dense_onnx, preprocessing=pre) as m:
        with pytest.raises(VitedgeError, match="not a classifier"):
            m.predict(sorted(val_dir.glob("1/*.png"))[:1])
        outs = m.infer_all(m.preprocessing.batch(sorted(val_dir.glob("1/*.png"))[:3]))
    assert outs["tokens"].shape == (3, 16, 32) and outs["pooled"].shape == (3, 32)


# -- what cannot be assumed, and what is refused ----------------------------------------------------
def test_dynamic_size_without_img_size_is_a_one_line_error(tmp_path, dynamic_size_onnx, calib_dir):
    out = tmp_path / "q.onnx"
    for args in (["quantize", dynamic_size_onnx, "--int8", "--calib", calib_dir, "-o", out],
                 ["compile", dynamic_size_onnx, "-o", tmp_path / "c.ort.onnx"],
                 ["predict", dynamic_size_onnx, next(calib_dir.rglob("*.png"))]):
        r = _cli(args)
        assert r.exit_code == 2, r.output
        err = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
        assert len(err) == 1 and "dynamic input size" in err[0] and "--img-size" in err[0], r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing half-written
    # with the size given it works
    r = _cli(["compile", dynamic_size_onnx, "--img-size", "32", "-o", tmp_path / "c.ort.onnx", "--batch", "dynamic"])
    assert r.exit_code == 0, r.output
    man = Manifest.find(tmp_path / "c.ort.onnx")[1]
    assert man.preprocessing["img_size"] == [32, 32] and man.verification["checks"]["images"]["cosine_min"] > 0.999


def test_assumptions_are_printed_and_kept(tmp_path, ts_onnx):
    src = _copy(ts_onnx, tmp_path)
    r = _cli(["compile", src, "-o", tmp_path / "e.ort.onnx"])
    assert r.exit_code == 0, r.output
    for text in ("vit_ts14.onnx has no vitedge manifest", "'input.1' (2, 3, 32, 32)", "LayerNorm decomposed", "fixed batch of 2",
                 "assumed task classification", "assumed preprocessing mean = ImageNet", "assumed preprocessing std = ImageNet",
                 "center-crop 32", "assumed preprocessing bicubic interpolation"):
        assert text in r.output, (text, r.output)
    man = Manifest.find(tmp_path / "e.ort.onnx")[1]
    assert any("mean = ImageNet" in a for a in man.assumptions) and man.compile["batch"] == 2
    assert not Manifest.sidecar_path(src).exists()


def test_flags_for_a_model_with_a_manifest_are_refused(tmp_path, tiny_onnx):
    r = _cli(["quantize", tiny_onnx, "--fp16", "--mean", "0.5,0.5,0.5", "-o", tmp_path / "x.onnx"])
    assert r.exit_code == 2 and "has a vitedge manifest" in r.output and not (tmp_path / "x.onnx").exists()


def test_load_without_manifest(tmp_path, dynamic_size_onnx, hf_onnx, val_dir):
    from vitedge import load

    x = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
    with load(dynamic_size_onnx) as eng:  # no preprocessing: arrays only
        assert eng.infer(x).shape == (3, 10)
        with pytest.raises(VitedgeError, match="no preprocessing"):
            eng.predict(sorted(val_dir.glob("2/*.png"))[:1])
    with load(hf_onnx, backend="openvino", labels=[f"digit {i}" for i in range(10)]) as eng:
        pred = eng.predict(sorted(val_dir.glob("2/*.png"))[:2], top_k=1)
        assert pred[0].labels[0].startswith("digit ") and any("mean = ImageNet" in a for a in eng.manifest.assumptions)
    with pytest.raises(VitedgeError, match="10 classes"):
        load(hf_onnx, labels=["a", "b"])
