"""One preprocessing resolver: timm's rules, then Hugging Face's, then vitedge's, then flags; one default rule."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from vitedge import Preprocessing, VisionTransformer, VitedgeError, export_onnx, load_model
from vitedge.preprocessing_resolver import resolve_preprocessing

AUGREG = {"input_size": [3, 224, 224], "crop_pct": 0.9, "interpolation": "bicubic", "mean": [0.5] * 3, "std": [0.5] * 3,
          "crop_mode": "center"}


def _geometry(pre: Preprocessing) -> tuple:
    return pre.img_size, pre.resize, pre.center_crop, pre.interpolation, pre.mean, pre.std, pre.scale, pre.channel_order


# -- timm's rules --------------------------------------------------------------------------------------
@pytest.mark.parametrize(("size", "crop_pct", "resize"), [(224, 0.9, 248), (224, 0.875, 256), (384, 1.0, 384), (224, 0.95, 235)])
def test_timm_resize_is_floor_of_size_over_crop_pct(size, crop_pct, resize):
    pre = resolve_preprocessing(timm={**AUGREG, "input_size": [3, size, size], "crop_pct": crop_pct})
    assert (pre.img_size, pre.resize, pre.center_crop) == ((size, size), resize, True)
    assert pre.mean == (0.5, 0.5, 0.5) and pre.std == (0.5, 0.5, 0.5) and pre.interpolation == "bicubic"
    assert pre.assumed == []  # the config said everything


def test_timm_hub_config_json_and_its_gaps():
    hub = {"architecture": "vit_base_patch16_224", "num_classes": 1000, "pretrained_cfg": AUGREG}
    assert resolve_preprocessing(timm=hub) == resolve_preprocessing(timm=AUGREG)
    bare = resolve_preprocessing(timm={"input_size": [3, 224, 224]})  # timm's defaults, each recorded
    assert (bare.resize, bare.interpolation, bare.mean) == (256, "bicubic", (0.485, 0.456, 0.406))
    assert len(bare.assumed) == 4 and any("crop_pct 0.875" in a for a in bare.assumed)
    squash = resolve_preprocessing(timm={**AUGREG, "crop_mode": "squash", "crop_pct": 1.0})
    assert squash.resize is None and not squash.center_crop
    for bad in ({**AUGREG, "crop_mode": "squash"}, {**AUGREG, "crop_mode": "border"}):
        with pytest.raises(VitedgeError, match="crop_mode"):
            resolve_preprocessing(timm=bad)


# -- Hugging Face --------------------------------------------------------------------------------------
def test_hf_preprocessor_config_resizes_straight_to_size():
    hf = {"image_processor_type": "ViTImageProcessor", "do_resize": True, "size": {"height": 224, "width": 224}, "resample": 3,
          "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.4, 0.45, 0.5], "image_std": [0.2, 0.25, 0.3]}
    pre = resolve_preprocessing(hf=hf)
    assert (pre.img_size, pre.resize, pre.center_crop, pre.interpolation) == ((224, 224), None, False, "bicubic")
    assert pre.mean == (0.4, 0.45, 0.5) and pre.std == (0.2, 0.25, 0.3) and pre.assumed == []
    raw = resolve_preprocessing(hf={**hf, "do_normalize": False, "do_rescale": False})
    assert raw.mean == (0.0, 0.0, 0.0) and raw.std == (1.0, 1.0, 1.0) and raw.scale == 1.0
    vit_defaults = resolve_preprocessing(32, hf={"image_processor_type": "ViTImageProcessor"})  # ViTImageProcessor's own defaults
    assert _geometry(vit_defaults)[:6] == ((32, 32), None, False, "bilinear", (0.5,) * 3, (0.5,) * 3)


# -- precedence and flags ------------------------------------------------------------------------------
def test_precedence_timm_then_hf_then_manifest():
    hf = {"image_processor_type": "ViTImageProcessor", "size": {"height": 224, "width": 224}, "image_mean": [0.1] * 3, "image_std": [0.2] * 3}
    manifest = Preprocessing(img_size=224, resize=None, center_crop=False, mean=(0.3,) * 3, std=(0.3,) * 3)
    assert resolve_preprocessing(timm=AUGREG, hf=hf, manifest=manifest).mean == (0.5, 0.5, 0.5)
    assert resolve_preprocessing(hf=hf, manifest=manifest).mean == (0.1, 0.1, 0.1)
    assert _geometry(resolve_preprocessing(manifest=manifest)) == _geometry(manifest)


def test_flags_override_what_they_set():
    pre = resolve_preprocessing(timm=AUGREG, flags={"mean": "0.1,0.2,0.3", "interpolation": "bilinear"})
    assert pre.mean == (0.1, 0.2, 0.3) and pre.interpolation == "bilinear" and pre.resize == 248 and pre.std == (0.5,) * 3
    assert resolve_preprocessing(timm=AUGREG, flags={"img_size": 384}).resize == 426  # floor(384 / 0.9): the crop_pct is kept
    assert resolve_preprocessing(timm=AUGREG, flags={"resize": 300}).resize == 300
    straight = resolve_preprocessing(timm=AUGREG, flags={"crop": False})
    assert straight.resize is None and not straight.center_crop
    with pytest.raises(VitedgeError, match="unknown preprocessing options gamma"):
        resolve_preprocessing(224, flags={"gamma": 2.2})


# -- one default rule ----------------------------------------------------------------------------------
def test_one_default_rule_everywhere(tmp_path):
    from vitedge.foreign import preprocessing_from_options

    rule = resolve_preprocessing(32)
    assert _geometry(rule) == ((32, 32), 36, True, "bicubic", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 1 / 255, "RGB")
    assert len(rule.assumed) == 4  # resize/crop, interpolation, mean, std
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=32, patch_size=16, num_classes=3, d_model=64, num_heads=2, num_layers=1, d_ff=128, dropout=0.0)
    torch.save(vit.state_dict(), tmp_path / "bare.pth")  # a timm state dict with no config anywhere
    timm_bare = load_model(tmp_path / "bare.pth")
    assert any("default rule" in n for n in timm_bare.notes)
    for other in (Preprocessing.for_size(32), Preprocessing(img_size=32), preprocessing_from_options(input_shape=[1, 3, 32, 32])[0],
                  load_model(vit).preprocessing, timm_bare.preprocessing):
        assert _geometry(other) == _geometry(rule)
    assert load_model("vit_tiny").preprocessing.resize == 256 and load_model("vit_tiny", img_size=384).preprocessing.resize == 438
    with pytest.raises(VitedgeError, match="input size is not known"):
        resolve_preprocessing()


# -- a timm checkpoint folder (no timm installed) ------------------------------------------------------
TIMM_CFG = {"input_size": [3, 32, 32], "crop_pct": 0.9, "interpolation": "bicubic", "mean": [0.5] * 3, "std": [0.5] * 3, "crop_mode": "center"}


@pytest.fixture(scope="module")
def timm_folder(tmp_path_factory):
    """A tiny ViT saved as timm's hub layout: model.safetensors + config.json with its pretrained_cfg."""
    torch.manual_seed(1)
    vit = VisionTransformer(img_size=32, patch_size=16, num_classes=3, d_model=64, num_heads=2, num_layers=2, d_ff=128, dropout=0.0).eval()
    folder = tmp_path_factory.mktemp("timm") / "vit_tiny_augreg"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"architecture": "vit_tiny_patch16_224", "num_classes": 3,
                                                    "label_names": ["cat", "dog", "eel"], "pretrained_cfg": TIMM_CFG}))
    return folder


def _check_timm_pre(pre: Preprocessing):
    assert (pre.img_size, pre.resize, pre.center_crop, pre.interpolation) == ((32, 32), 35, True, "bicubic")  # floor(32 / 0.9)
    assert pre.mean == (0.5, 0.5, 0.5) and pre.std == (0.5, 0.5, 0.5)


def test_timm_folder_loads_with_its_config(timm_folder, tmp_path):
    for source in (timm_folder, timm_folder / "model.safetensors"):
        spec = load_model(source)
        _check_timm_pre(spec.preprocessing)
        assert spec.labels == ["cat", "dog", "eel"] and any("config.json" in n for n in spec.notes)
    assert load_model(timm_folder, img_size=64).preprocessing.resize == 71  # floor(64 / 0.9)
    # .pth next to config.json, and a pretrained_cfg embedded in the checkpoint itself
    sd = load_model(timm_folder).model.state_dict()
    pth_dir = tmp_path / "pth"
    pth_dir.mkdir()
    torch.save(sd, pth_dir / "vit.pth")
    (pth_dir / "config.json").write_text(json.dumps({"architecture": "vit_tiny_patch16_224", "pretrained_cfg": TIMM_CFG}))
    _check_timm_pre(load_model(pth_dir).preprocessing)
    torch.save({"state_dict": sd, "pretrained_cfg": TIMM_CFG}, tmp_path / "embedded.pth")
    _check_timm_pre(load_model(tmp_path / "embedded.pth").preprocessing)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "embedded.safetensors"), metadata={"pretrained_cfg": json.dumps(TIMM_CFG)})
    _check_timm_pre(load_model(tmp_path / "embedded.safetensors").preprocessing)


def test_timm_folder_passes_parity(timm_folder, photo_dir, tmp_path):
    from vitedge.cli import main
    from vitedge.parity import check_parity

    engine, man = export_onnx(load_model(timm_folder), tmp_path / "timm.onnx")
    assert man.preprocessing["resize"] == 35 and man.preprocessing["mean"] == [0.5, 0.5, 0.5]
    for reference in (timm_folder, timm_folder / "config.json", timm_folder / "model.safetensors"):
        rep = check_parity(engine, reference, photo_dir, samples=4)
        assert rep.ok and rep.differences == [], (reference, rep.differences)
    r = CliRunner().invoke(main, ["check", "parity", str(engine), "--reference", str(timm_folder), "--val", str(photo_dir), "--val-samples", "4"])
    assert r.exit_code == 0, r.output
    # the same weights without their config get the default rule: parity with the timm config catches it
    bare = tmp_path / "bare"
    bare.mkdir()
    save_file(load_file_dict(timm_folder), str(bare / "w.safetensors"))
    engine2, _ = export_onnx(load_model(bare / "w.safetensors"), tmp_path / "bare.onnx")
    rep = check_parity(engine2, timm_folder / "config.json", photo_dir, samples=4)
    assert {d.field for d in rep.differences} == {"resize", "mean", "std"}


def load_file_dict(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))
