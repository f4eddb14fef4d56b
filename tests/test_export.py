"""`vitedge export`: verified ONNX files, batch/opset choices, external data, failure leaves nothing."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from torch import nn

import vitedge.export as export_mod
from vitedge import Manifest, VisionTransformer, VitedgeError, export_onnx, load_model
from vitedge.errors import ModelNotSupported
from vitedge.export import Tolerance, compare_outputs, ort_session


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    sess = ort_session(path)
    assert [i.name for i in sess.get_inputs()] == ["pixel_values"]
    assert [o.name for o in sess.get_outputs()] == ["logits"]
    return sess.run(None, {"pixel_values": x})[0]


def _torch(model, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def _assert_verified(path: Path, man: Manifest, *, checks=("random", "images")) -> None:
    """Checker passes, manifest numbers within tolerance, hashes match, ONNX metadata present."""
    onnx.checker.check_model(str(path))
    side = Manifest.sidecar_path(path)
    assert side.exists()
    on_disk = Manifest.load(side)
    assert on_disk.files == man.files and on_disk.verification == man.verification
    assert set(man.verification["checks"]) == set(checks)
    for name, r in man.verification["checks"].items():
        assert r["passed"] and r["finite"], name
        assert 0 <= r["max_abs_error"] <= r["tolerance"], name
        assert r["cosine_min"] > 0.99999 and r["top1_agreement"] == 1.0, name
    assert path.name in man.files
    for fname, digest in man.files.items():
        assert _sha256(path.parent / fname) == digest
    proto = onnx.load(str(path), load_external_data=False)
    meta = {p.key: p.value for p in proto.metadata_props}
    essentials = json.loads(meta["vitedge"])
    assert essentials["model"] == man.model and essentials["preprocessing"] == man.preprocessing
    assert essentials["labels"] == man.labels and essentials["precision"] == "fp32"
    assert man.opset == max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


# ------------------------------------------------------------------------------------------
# the reference model (conftest's session export)
# ------------------------------------------------------------------------------------------
def test_reference_export_is_verified(ref_onnx, ref_spec):
    man = Manifest.load(Manifest.sidecar_path(ref_onnx))
    _assert_verified(ref_onnx, man)
    assert man.format == "onnx" and man.precision == "fp32" and man.task == "classification" and man.opset == 18
    assert man.model["config"] == ref_spec.config.to_dict()
    assert man.preprocessing == ref_spec.preprocessing.to_dict() and man.labels == [str(i) for i in range(10)]
    assert man.inputs[0].name == "pixel_values" and man.inputs[0].shape == ["batch", 3, 64, 64]
    assert man.outputs[0].name == "logits" and man.outputs[0].shape == ["batch", 10]
    assert man.verification["checks"]["images"]["batch"] == 4  # real shipped images were used


@pytest.mark.parametrize("n", [1, 5])
def test_reference_dynamic_batch_in_onnxruntime(ref_onnx, ref_spec, val_dir, n):
    paths = sorted(val_dir.rglob("*.png"))[:: 37][:n]
    x = ref_spec.preprocessing.batch(paths)
    got = _run(ref_onnx, x)
    want = _torch(ref_spec.model, x)
    assert got.shape == (n, 10)
    np.testing.assert_allclose(got, want, atol=1e-4)
    # the ONNX model classifies the real digits correctly
    y = np.array([int(p.parent.name) for p in paths])
    assert (got.argmax(1) == y).mean() >= 0.8


def test_compare_outputs_numbers():
    ref = np.array([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    res = compare_outputs(ref, ref)
    assert res["max_abs_error"] == 0 and res["snr_db"] == float("inf") and res["top1_agreement"] == 1.0
    out = ref + np.array([[0.0, 0.0, 0.5], [0.0, 0.0, 2.5]])  # second row's argmax flips
    res = compare_outputs(ref, out)
    assert res["max_abs_error"] == 2.5 and res["max_rel_error"] == pytest.approx(2.5 / 3)
    assert res["top1_agreement"] == 0.5 and res["cosine_min"] < res["cosine_mean"] < 1
    assert compare_outputs(ref, np.full_like(ref, np.nan))["finite"] is False


# ------------------------------------------------------------------------------------------
# presets
# ------------------------------------------------------------------------------------------
@pytest.mark.e2e
def test_vit_tiny_preset_export(tmp_path):
    torch.manual_seed(0)
    path, man = export_onnx("vit_tiny", tmp_path / "tiny.onnx")
    _assert_verified(path, man)
    assert man.model["config"]["d_model"] == 192 and man.inputs[0].shape == ["batch", 3, 224, 224]
    assert any("random weights" in a for a in man.assumptions)


@pytest.mark.slow
def test_vit_base_preset_export(tmp_path):
    torch.manual_seed(0)
    path, man = export_onnx("vit_base", tmp_path / "base.onnx")
    _assert_verified(path, man)
    assert man.outputs[0].shape == ["batch", 1000]
    assert list(man.files) == ["base.onnx"]  # 346 MB: one file, no external data


@pytest.mark.slow
def test_vit_large_preset_uses_external_data(tmp_path):
    torch.manual_seed(0)
    path, man = export_onnx("vit_large", tmp_path / "large.onnx", images=[])
    _assert_verified(path, man, checks=("random",))
    assert sorted(man.files) == ["large.onnx", "large.onnx.data"]
    assert path.stat().st_size < 50e6 < (tmp_path / "large.onnx.data").stat().st_size


# ------------------------------------------------------------------------------------------
# batch, opset, resolution
# ------------------------------------------------------------------------------------------
def test_fixed_batch(tmp_path, tiny_vit):
    path, man = export_onnx(tiny_vit, tmp_path / "b3.onnx", batch=3)
    _assert_verified(path, man)
    assert man.inputs[0].shape == [3, 3, 32, 32] and man.outputs[0].shape == [3, 7]
    assert {r["batch"] for r in man.verification["checks"].values()} == {3}
    x = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
    np.testing.assert_allclose(_run(path, x), _torch(tiny_vit, x), atol=1e-4)
    with pytest.raises(Exception, match=r"(?i)dimension|shape"):  # onnxruntime's own error type
        _run(path, x[:1])  # the batch really is fixed


def test_opset_14_uses_the_torchscript_exporter(tmp_path, tiny_vit):
    path, man = export_onnx(tiny_vit, tmp_path / "o14.onnx", opset=14)
    _assert_verified(path, man)
    proto = onnx.load(str(path))
    ops = {n.op_type for n in proto.graph.node}
    assert "LayerNormalization" not in ops and "ReduceMean" in ops  # decomposed: LayerNormalization needs opset 17
    assert man.inputs[0].shape == ["batch", 3, 32, 32]
    x = np.random.default_rng(1).standard_normal((5, 3, 32, 32)).astype(np.float32)
    np.testing.assert_allclose(_run(path, x), _torch(tiny_vit, x), atol=1e-4)


@pytest.mark.parametrize("opset", [9, 12, 22, 30])
def test_unsupported_opset(tmp_path, tiny_vit, opset):
    with pytest.raises(ModelNotSupported, match="choose an opset from 13 to 21"):  # the hint is the point
        export_onnx(tiny_vit, tmp_path / "x.onnx", opset=opset)
    assert not list(tmp_path.iterdir())


def test_other_resolution(tmp_path, ref_spec, val_dir):
    path, man = export_onnx("reference", tmp_path / "ref96.onnx", img_size=96)
    _assert_verified(path, man)
    assert man.inputs[0].shape == ["batch", 3, 96, 96] and man.preprocessing["img_size"] == [96, 96]
    assert man.model["config"]["img_size"] == 64  # trained size; positions interpolated in the graph
    assert any("interpolated from 64" in a for a in man.assumptions)
    spec96 = load_model("reference", img_size=96)
    x = spec96.preprocessing.batch(sorted(val_dir.rglob("*.png"))[:3])
    np.testing.assert_allclose(_run(path, x), _torch(ref_spec.model, x), atol=1e-4)


def test_generic_module_export(tmp_path):
    """Any nn.Module (forward argument not called x) exports with a dynamic batch."""

    class ConvNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 8, 8)
            self.fc = nn.Linear(8 * 4 * 4, 3)

        def forward(self, images):
            return self.fc(torch.relu(self.conv(images)).flatten(1))

    torch.manual_seed(0)
    net = ConvNet()
    path, man = export_onnx(load_model(net, img_size=32, labels=["a", "b", "c"]), tmp_path / "conv.onnx")
    _assert_verified(path, man)
    assert man.task == "classification" and man.labels == ["a", "b", "c"] and man.model["family"] == "module"
    x = np.random.default_rng(0).standard_normal((5, 3, 32, 32)).astype(np.float32)
    np.testing.assert_allclose(_run(path, x), _torch(net, x), atol=1e-5)


def test_layer_scale_model_export(tmp_path):
    """A DeiT III / DINOv2-style LayerScale ViT exports and verifies (CLS-only last block included);
    the gammas are in the graph (the output changes with them)."""
    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, num_classes=5, d_model=32, num_heads=2, num_layers=2, d_ff=64, dropout=0.0,
                              layer_scale=True)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".gamma"):
                p.uniform_(-2.0, 2.0)
    model.eval()
    path, man = export_onnx(model, tmp_path / "ls.onnx", images=[])
    _assert_verified(path, man, checks=("random",))
    assert man.model["config"]["layer_scale"] is True
    assert man.model["graph"]["last_block"] == "cls_token_only"
    x = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
    out = _run(path, x)
    np.testing.assert_allclose(out, _torch(model, x), atol=1e-4)
    with torch.no_grad():
        model.blocks[1].ls2.gamma.mul_(0.5)
    assert not np.allclose(out, _torch(model, x), atol=1e-3)  # the gammas reach the output


def test_feature_model_task(tmp_path):
    torch.manual_seed(0)
    feat = VisionTransformer(img_size=32, num_classes=0, d_model=32, num_heads=2, num_layers=1, d_ff=64, dropout=0.0).eval()
    path, man = export_onnx(feat, tmp_path / "feat.onnx", images=[])
    _assert_verified(path, man, checks=("random",))
    assert man.task == "features" and man.outputs[0].shape == ["batch", 32]


# ------------------------------------------------------------------------------------------
# external data (> 2 GB protobuf limit)
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("opset", [18, 14])
def test_external_data_path(tmp_path, tiny_vit, monkeypatch, opset):
    """The threshold decides; lowering it makes a tiny model take the ViT-L/H path for real."""
    monkeypatch.setattr(export_mod, "EXPORT_EXTERNAL_WEIGHT_BYTES", 10_000)
    path, man = export_onnx(tiny_vit, tmp_path / "ext.onnx", opset=opset)
    _assert_verified(path, man)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ext.onnx", "ext.onnx.data", "ext.onnx.vitedge.json"]
    assert sorted(man.files) == ["ext.onnx", "ext.onnx.data"]
    proto = onnx.load(str(path), load_external_data=False)
    external = [t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert external and all(dict((e.key, e.value) for e in t.external_data)["location"] == "ext.onnx.data" for t in external)
    assert (tmp_path / "ext.onnx.data").stat().st_size > path.stat().st_size
    # moved elsewhere together, it still loads and computes the same
    moved = tmp_path / "moved"
    moved.mkdir()
    for f in man.files:
        shutil.copy(tmp_path / f, moved / f)
    x = np.random.default_rng(2).standard_normal((1, 3, 32, 32)).astype(np.float32)
    np.testing.assert_allclose(_run(moved / "ext.onnx", x), _torch(tiny_vit, x), atol=1e-4)


def test_small_models_stay_in_one_file(tiny_onnx):
    man = Manifest.load(Manifest.sidecar_path(tiny_onnx))
    assert list(man.files) == [tiny_onnx.name]
    assert export_mod.EXPORT_EXTERNAL_WEIGHT_BYTES < 2**31  # below protobuf's 2 GB cap


# ------------------------------------------------------------------------------------------
# failures leave nothing behind
# ------------------------------------------------------------------------------------------
def test_nan_weight_is_reported_and_nothing_written(tmp_path):
    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, num_classes=3, d_model=32, num_heads=2, num_layers=2, d_ff=64, dropout=0.0).eval()
    with torch.no_grad():
        model.blocks[1].mlp.fc1.weight[3, 5] = float("nan")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(VitedgeError, match=r"weights contain NaN/inf \(1 tensors, e\.g\. blocks\.1\.mlp\.fc1\.weight\).*nothing was exported"):
        export_onnx(model, out / "nan.onnx")
    assert not list(out.iterdir())


def test_failed_verification_leaves_nothing(tmp_path, tiny_vit):
    """An impossible tolerance fails the ONNX Runtime check after the export: no new file, no scratch
    folder, and an earlier good export at the same path is left untouched."""
    fast = dict(opset=14)  # the quick TorchScript exporter; the check and cleanup are the same for every opset
    path, man = export_onnx(tiny_vit, tmp_path / "m.onnx", images=[], **fast)
    before = {f: _sha256(tmp_path / f) for f in ("m.onnx", "m.onnx.vitedge.json")}
    impossible = Tolerance(atol=-1.0, rtol=0.0)
    with pytest.raises(VitedgeError, match=r"ONNX output differs from PyTorch on random inputs: max abs error .* > tolerance -1"):
        export_onnx(tiny_vit, tmp_path / "fail.onnx", tolerance=impossible, **fast)
    with pytest.raises(VitedgeError, match="ONNX output differs from PyTorch"):
        export_onnx(tiny_vit, tmp_path / "m.onnx", images=[], tolerance=impossible, **fast)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.vitedge.json"]
    assert {f: _sha256(tmp_path / f) for f in before} == before


def test_bad_output_and_batch(tmp_path, tiny_vit):
    with pytest.raises(VitedgeError, match="must end in .onnx"):
        export_onnx(tiny_vit, tmp_path / "model.pt")
    with pytest.raises(VitedgeError, match="batch 0 must be >= 1"):
        export_onnx(tiny_vit, tmp_path / "m.onnx", batch=0)
    (tmp_path / "dir.onnx").mkdir()
    with pytest.raises(VitedgeError, match="is a folder"):
        export_onnx(tiny_vit, tmp_path / "dir.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.onnx"]


# ------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------
def _cli(*args):
    from vitedge.cli.main import main

    return CliRunner().invoke(main, list(map(str, args)))


def test_cli_export_reference(tmp_path):
    out = tmp_path / "cli" / "reference.onnx"
    res = _cli("export", "reference", "-o", out, "--batch", "3")
    assert res.exit_code == 0, res.output
    assert "verified on random inputs (batch 3)" in res.stdout and "verified on images inputs (batch 3)" in res.stdout
    assert f"wrote {out}" in res.stdout.replace("\n", "")
    man = Manifest.load(Manifest.sidecar_path(out))
    _assert_verified(out, man)
    assert man.inputs[0].shape == [3, 3, 64, 64] and man.outputs[0].shape == [3, 10]


@pytest.mark.parametrize(
    "args, message",
    [
        (["export", "no_such_model.pth", "-o", "{tmp}/x.onnx"], "model no_such_model.pth does not exist"),
        (["export", "reference", "-o", "{tmp}/x.onnx", "--opset", "9"], "opset 9 is not supported"),
        (["export", "reference", "-o", "{tmp}/x.onnx", "--batch", "0"], "batch 0 must be >= 1"),
        (["export", "reference", "-o", "{tmp}/x.onnx", "--img-size", "50"], "img_size 50 is not divisible by the patch size 16"),
        (["export", "vit_tiny", "-o", "{tmp}/x.onnx", "--img-size", "50"], "img_size 50 is not divisible"),
        (["export", "reference", "-o", "{tmp}/x.txt"], "must end in .onnx"),
        (["export", "reference", "-o", "{tmp}/x.onnx", "--calib", "{tmp}/empty"], "no images (jpg/png/bmp/webp) found"),
    ],
)
def test_cli_bad_input(tmp_path, args, message):
    (tmp_path / "empty").mkdir()
    res = _cli(*[a.format(tmp=tmp_path) for a in args])
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], res.stderr
    assert "Traceback" not in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def test_cli_bad_batch_value(tmp_path):
    res = _cli("export", "reference", "-o", tmp_path / "x.onnx", "--batch", "many")
    assert res.exit_code == 2 and "use 'dynamic' or a positive integer" in res.stderr


@pytest.mark.e2e
def test_last_block_runs_for_the_cls_token_only(tmp_path):
    """The classifier reads CLS only: the exported last block's projection and MLP run on 1 token, not 197,
    and the file still matches the full PyTorch model (export verifies it)."""
    import onnx

    from vitedge import export_onnx, load_model

    spec = load_model("vit_tiny")
    lean = export_onnx(spec, tmp_path / "lean.onnx", batch=1, images=[])
    full = export_onnx(spec, tmp_path / "full.onnx", batch=1, images=[], cls_only_last_block=False)
    assert lean.manifest.model["graph"]["last_block"] == "cls_token_only"
    assert full.manifest.model["graph"]["last_block"] == "all_tokens"

    def one_token_matmuls(path):
        g = onnx.shape_inference.infer_shapes(onnx.load(str(path))).graph
        shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in g.value_info}
        return [n for n in g.node if n.op_type in ("MatMul", "Gemm") and len(shapes.get(n.output[0], [])) == 3
                and shapes[n.output[0]][1] == 1]

    assert len(one_token_matmuls(tmp_path / "lean.onnx")) >= 3 and one_token_matmuls(tmp_path / "full.onnx") == []
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    from vitedge import load

    with load(tmp_path / "lean.onnx") as a, load(tmp_path / "full.onnx") as b:
        np.testing.assert_allclose(a.infer(x), b.infer(x), atol=1e-4)
