"""The ViT family: preset sizes, arbitrary input resolution, attention maps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vitedge import VitedgeError, load_model
from vitedge.models.vit import PRESETS, ViTConfig, VisionTransformer, count_parameters, create_model, preset_config


@pytest.mark.parametrize(
    "name, params",  # exact counts of timm's vit_{tiny,small,base,large}_patch16_224; ViT-H at patch 16
    [("vit_tiny", 5_717_416), ("vit_small", 22_050_664), ("vit_base", 86_567_656), ("vit_large", 304_326_632),
     ("vit_huge", 632_199_400)],
)
def test_preset_parameter_counts(name, params):
    cfg = preset_config(name)
    assert cfg.num_classes == 1000 and cfg.patch_size == 16 and cfg.img_size == 224
    with torch.device("meta"):  # no memory: ViT-H would be 2.5 GB in fp32
        model = create_model(name)
    assert count_parameters(model) == params


def test_preset_shapes_match_the_paper():
    assert PRESETS["vit_tiny"][:3] == (192, 3, 12)
    assert PRESETS["vit_small"][:3] == (384, 6, 12)
    assert PRESETS["vit_base"][:3] == (768, 12, 12)
    assert PRESETS["vit_large"][:3] == (1024, 16, 24)
    assert PRESETS["vit_huge"][:3] == (1280, 16, 32)
    for d, _, _, ff in PRESETS.values():
        assert ff == 4 * d
    assert preset_config("ViT-Base").d_model == 768  # case and dash tolerant
    with pytest.raises(KeyError, match="vit_tiny"):
        preset_config("vit_gigantic")


def test_preset_forward_shape():
    model = create_model("vit_tiny", img_size=32, num_classes=5, dropout=0.0).eval()
    with torch.no_grad():
        out = model(torch.randn(3, 3, 32, 32))
    assert out.shape == (3, 5) and torch.isfinite(out).all()


def test_config_round_trip_and_unknown_keys():
    cfg = preset_config("vit_small", num_classes=10, qkv_bias=False)
    assert ViTConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown ViT config keys: hidden"):
        ViTConfig.from_dict({**cfg.to_dict(), "hidden": 3})
    # configs written before layer_scale existed (vitedge checkpoints, manifests) still load
    old = {k: v for k, v in cfg.to_dict().items() if k != "layer_scale"}
    assert ViTConfig.from_dict(old) == cfg and not cfg.layer_scale
    ls = preset_config("vit_small", layer_scale=True)
    assert ViTConfig.from_dict(ls.to_dict()) == ls


def test_layer_scale_parameters():
    plain = create_model("vit_tiny", img_size=32, num_layers=2)
    assert not [k for k in plain.state_dict() if ".ls" in k]  # unchanged timm layout without LayerScale
    model = create_model("vit_tiny", img_size=32, num_layers=2, layer_scale=True)
    gammas = {k: v.shape for k, v in model.state_dict().items() if ".ls" in k}
    assert gammas == {f"blocks.{i}.ls{j}.gamma": (192,) for i in range(2) for j in (1, 2)}
    assert count_parameters(model) == count_parameters(plain) + 4 * 192
    assert model.config.layer_scale and VisionTransformer.from_config(model.config).config == model.config


# ------------------------------------------------------------------------------------------
# resolution
# ------------------------------------------------------------------------------------------
def test_reference_runs_at_other_resolutions(ref_spec, val_dir):
    """The digits ViT (trained at 64) keeps most of its accuracy at 96 and 48 via interpolated positions."""
    from vitedge.data import ImageSet, label_indices

    model = ref_spec.model
    images = ImageSet.from_path(val_dir).sample(120, seed=1)
    y = label_indices(images.labels, ref_spec.labels, str(val_dir))
    accs = {}
    for size in (64, 96, 48):
        spec = load_model("reference", img_size=size)
        assert spec.preprocessing.img_size == (size, size)
        x = spec.preprocessing.batch(images.paths)
        assert x.shape == (120, 3, size, size)
        with torch.no_grad():
            logits = model(torch.from_numpy(x))
        assert logits.shape == (120, 10) and torch.isfinite(logits).all()
        accs[size] = float((logits.argmax(1).numpy() == y).mean())
    assert accs[64] >= 0.95
    # full held-out set: 64 -> 98.6 %, 96 -> 82 %, 48 (a 3x3 grid) -> 50 %; chance is 10 %
    assert accs[96] >= 0.7 and accs[48] >= 0.3, accs
    assert any("interpolated from 64" in n for n in load_model("reference", img_size=96).notes)


def test_position_embedding_interpolation_keeps_cls_and_identity(ref_spec):
    model = ref_spec.model
    pos = model.pos_embed
    assert model.interpolate_pos_embed(4, 4) is pos  # trained grid: untouched
    bigger = model.interpolate_pos_embed(6, 6)
    assert bigger.shape == (1, 37, pos.shape[-1])
    assert torch.equal(bigger[:, 0], pos[:, 0])  # CLS position kept, not interpolated
    # bicubic resampling matches torch's own on the patch grid (as two weight products: to float rounding)
    d = pos.shape[-1]
    grid = pos[:, 1:].reshape(1, 4, 4, d).permute(0, 3, 1, 2)
    want = torch.nn.functional.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False)
    assert torch.allclose(bigger[:, 1:], want.permute(0, 2, 3, 1).reshape(1, 36, d), atol=1e-6)
    # non-square grids work too
    assert model.interpolate_pos_embed(3, 5).shape == (1, 16, d)
    with torch.no_grad():
        assert model(torch.randn(2, 3, 48, 80)).shape == (2, 10)


def test_size_not_divisible_by_patch_is_a_clear_error(ref_spec):
    with pytest.raises(ValueError, match="50x64 is not divisible by the patch size 16"):
        ref_spec.model(torch.randn(1, 3, 50, 64))
    with pytest.raises(ValueError, match="img_size 40 is not divisible by patch_size 16"):
        VisionTransformer(img_size=40, patch_size=16)
    with pytest.raises(VitedgeError, match="img_size 50 is not divisible by the patch size 16"):
        load_model("reference", img_size=50)
    with pytest.raises(VitedgeError, match="img_size 50 is not divisible by the patch size 16 of preset vit_tiny"):
        load_model("vit_tiny", img_size=50)
    with pytest.raises(ValueError, match="divisible by num_heads"):
        VisionTransformer(d_model=100, num_heads=3)


# ------------------------------------------------------------------------------------------
# attention maps
# ------------------------------------------------------------------------------------------
def test_attention_maps(ref_spec):
    model, cfg = ref_spec.model, ref_spec.config
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32))
    with torch.no_grad():
        plain = model(x)
        logits, maps = model(x, return_attention=True)
    assert isinstance(plain, torch.Tensor)  # the default forward returns only the logits
    assert torch.equal(plain, logits)
    assert len(maps) == cfg.num_layers
    tokens = (64 // 16) ** 2 + 1
    for a in maps:
        assert a.shape == (2, cfg.num_heads, tokens, tokens)
        assert (a >= 0).all()
        assert torch.allclose(a.sum(-1), torch.ones(2, cfg.num_heads, tokens), atol=1e-5)
    # heads are different maps, not copies
    assert not torch.allclose(maps[0][:, 0], maps[0][:, 1])
    # at another resolution the maps grow with the token count
    with torch.no_grad():
        _, maps96 = model(torch.randn(1, 3, 96, 96), return_attention=True)
    assert maps96[-1].shape == (1, cfg.num_heads, 37, 37)


def test_attention_matches_a_manual_computation(tiny_vit):
    """Block 0's map equals softmax(q k^T / sqrt(d)) computed from the qkv weights directly."""
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        _, maps = tiny_vit(x, return_attention=True)
        tokens = tiny_vit.patch_embed(x)
        t = torch.cat([tiny_vit.cls_token, tokens], 1) + tiny_vit.pos_embed
        h = tiny_vit.blocks[0].norm1(t)
        q, k, _ = tiny_vit.blocks[0].attn.qkv(h).chunk(3, dim=-1)
        heads, hd = 2, 32
        q = q.reshape(1, -1, heads, hd).transpose(1, 2)
        k = k.reshape(1, -1, heads, hd).transpose(1, 2)
        want = torch.softmax(q @ k.transpose(-1, -2) / hd**0.5, -1)
    assert torch.allclose(maps[0], want, atol=1e-5)


def test_dropout_only_in_train_mode():
    model = VisionTransformer(img_size=32, num_classes=3, d_model=32, num_heads=2, num_layers=1, d_ff=64, dropout=0.5)
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
    model.train()
    torch.manual_seed(0)
    with torch.no_grad():
        assert not torch.equal(model(x), model(x))


def test_reference_model_holds_its_published_accuracy(ref_spec, val_dir, calib_dir):
    """The shipped checkpoint reaches the held-out top-1 recorded in digits_vit.json, on images it never saw."""
    import json

    from vitedge.data import ImageSet, label_indices
    from vitedge.models.loading import ASSETS

    info = json.loads((ASSETS / "digits_vit.json").read_text())
    val = ImageSet.from_path(val_dir)
    assert len(val) == info["split"]["held_out"] == 360
    calib_names = {p.name for p in calib_dir.rglob("*.png")}
    assert calib_names and not calib_names & {p.name for p in val.paths}  # disjoint splits
    batch = val.load_all(ref_spec.preprocessing)
    with torch.no_grad():
        pred = ref_spec.model(torch.from_numpy(batch.x)).argmax(1).numpy()
    top1 = float((pred == label_indices(batch.labels, ref_spec.labels, str(val_dir))).mean())
    assert top1 == pytest.approx(info["held_out_top1"], abs=0.003) and top1 >= 0.98
