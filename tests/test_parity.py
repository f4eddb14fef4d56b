"""Preprocessing parity: wrong mean/std and BGR/RGB swaps are caught, with their cost."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from vitedge import Preprocessing, export_onnx, load_model
from vitedge.cli import main
from vitedge.manifest import Manifest
from vitedge.parity import check_parity, preprocessing_from_timm, reference_preprocessing


@pytest.fixture(scope="module")
def colour_engine(tmp_path_factory, tiny_vit):
    """A random ViT whose checkpoint says RGB + ImageNet mean/std at 32 px, exported to ONNX."""
    spec = load_model(tiny_vit, preprocessing=Preprocessing.for_size(32))
    path, _ = export_onnx(spec, tmp_path_factory.mktemp("par") / "m.onnx")
    return path


def _tamper(src, tmp_path, **changes):
    dst = tmp_path / "engine"
    shutil.copytree(src.parent, dst)
    side = dst / Manifest.sidecar_path(src).name
    man = json.loads(side.read_text())
    man["preprocessing"].update(changes)
    side.write_text(json.dumps(man))
    return dst / src.name


def _ref_json(tmp_path):
    ref = tmp_path / "timm_config.json"
    ref.write_text(json.dumps({"pretrained_cfg": {"input_size": [3, 32, 32], "crop_pct": 32 / 36, "interpolation": "bicubic",
                                                  "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}}))
    return ref


def test_matching_preprocessing_passes(colour_engine, photo_dir, tmp_path):
    rep = check_parity(colour_engine, _ref_json(tmp_path), photo_dir, samples=8)
    assert rep.ok and rep.differences == [] and rep.max_abs_input_diff < 1e-5
    assert rep.top1_agreement == 1.0


def test_bgr_swap_is_caught(colour_engine, photo_dir, tmp_path):
    engine = _tamper(colour_engine, tmp_path, channel_order="BGR")
    rep = check_parity(engine, _ref_json(tmp_path), photo_dir, samples=16)
    assert not rep.ok
    assert [d.field for d in rep.differences] == ["channel_order"]
    assert rep.max_abs_input_diff > 0.1  # real colour photos: the swap changes the tensors


def test_wrong_mean_std_is_caught_with_its_cost(ref_onnx, val_dir, tmp_path):
    engine = _tamper(ref_onnx, tmp_path, mean=[0.3, 0.3, 0.3], std=[0.3, 0.3, 0.3])
    rep = check_parity(engine, "reference", val_dir, samples=64)
    assert {d.field for d in rep.differences} == {"mean", "std"}
    assert rep.top1_agreement is not None and rep.top1_agreement < 1.0  # a real cost on the trained model
    assert all(d.top1_agreement is not None for d in rep.differences)


def test_cli_exits_1_on_mismatch_and_0_on_match(ref_onnx, val_dir, tmp_path):
    ok = CliRunner().invoke(main, ["check", "parity", str(ref_onnx), "--reference", "reference", "--val", str(val_dir), "--val-samples", "8"])
    assert ok.exit_code == 0, ok.output
    engine = _tamper(ref_onnx, tmp_path, mean=[0.4, 0.5, 0.6])
    bad = CliRunner().invoke(main, ["check", "parity", str(engine), "--reference", "reference", "--val", str(val_dir), "--val-samples", "8"])
    assert bad.exit_code == 1 and "mean" in bad.output


def test_reference_configs_are_read(tmp_path):
    timm = preprocessing_from_timm({"input_size": [3, 224, 224], "crop_pct": 0.9, "interpolation": "bicubic", "mean": [0.5] * 3, "std": [0.5] * 3})
    assert timm.img_size == (224, 224) and timm.resize == 248 and timm.center_crop  # floor(224 / 0.9), as timm
    bare = preprocessing_from_timm({"input_size": [3, 224, 224]})  # no crop_pct: the one default rule, as everywhere
    assert bare.resize == Preprocessing.for_size(224).resize == 256 and bare.interpolation == "bicubic"
    hf = tmp_path / "preprocessor_config.json"
    hf.write_text(json.dumps({"image_processor_type": "ViTImageProcessor", "do_resize": True, "size": {"height": 224, "width": 224},
                              "resample": 2, "do_normalize": True, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}))
    pre, where = reference_preprocessing(tmp_path)
    assert pre.img_size == (224, 224) and pre.resize is None and pre.interpolation == "bilinear" and "Hugging Face" in where
