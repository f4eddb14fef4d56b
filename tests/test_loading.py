"""Loading trained ViTs: vitedge checkpoints, timm state dicts, Hugging Face folders, nn.Modules, bad input."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from vitedge import ModelSpec, Preprocessing, VisionTransformer, VitedgeError, load_model, save_checkpoint
from vitedge.errors import FileProblem, ModelNotSupported
from vitedge.models.loading import REFERENCE_CHECKPOINT


def _randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Perturb every parameter (LayerNorms and biases included) so a mis-mapped tensor shows up in the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def _vit(seed=0, **kw) -> VisionTransformer:
    torch.manual_seed(seed)
    args = dict(img_size=32, patch_size=16, num_classes=5, d_model=128, num_heads=2, num_layers=2, d_ff=256, dropout=0.0)
    args.update(kw)
    return _randomize(VisionTransformer(**args), seed)


def _x(size=32, n=3, seed=0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).standard_normal((n, 3, size, size)).astype(np.float32))


def _logits(model, x):
    with torch.no_grad():
        return model(x)


# ------------------------------------------------------------------------------------------
# vitedge checkpoint
# ------------------------------------------------------------------------------------------
def test_vitedge_checkpoint_round_trip(tmp_path):
    model = _vit(qkv_bias=False)
    pre = Preprocessing(img_size=32, resize=36, center_crop=True, interpolation="bilinear", mean=(0.1, 0.2, 0.3),
                        std=(0.4, 0.5, 0.6), channel_order="BGR")
    labels = ["ant", "bee", "cat", "dog", "eel"]
    path = save_checkpoint(ModelSpec(model, pre, model.config, labels), tmp_path / "m.safetensors")
    assert path.exists() and not [p for p in tmp_path.iterdir() if p.name != "m.safetensors"]  # no temp files left
    spec = load_model(path)
    assert spec.config == model.config
    assert spec.preprocessing == pre
    assert spec.labels == labels
    assert spec.source == str(path) and spec.notes == []
    x = _x()
    assert torch.equal(_logits(spec.model, x), _logits(model, x))
    assert not spec.model.training


def test_reference_checkpoint_is_complete():
    spec = load_model("reference")
    assert spec.source == str(REFERENCE_CHECKPOINT)
    assert spec.config.img_size == 64 and spec.config.num_classes == 10
    assert spec.labels == [str(i) for i in range(10)]
    assert spec.preprocessing.img_size == (64, 64) and spec.preprocessing.mean == (0.5, 0.5, 0.5)
    assert spec.model_info()["family"] == "vit"


def test_save_checkpoint_rejects_a_generic_module(tmp_path):
    spec = load_model(nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2)), img_size=8)
    with pytest.raises(VitedgeError, match="only vitedge VisionTransformer"):
        save_checkpoint(spec, tmp_path / "x.safetensors")
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------------------
# timm-style state dicts
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "fmt",
    ["pth", "pth-model", "pth-state_dict", "pth-module-prefix", "pth-lightning", "pth-legacy-format", "safetensors", "bin"],
)
def test_timm_state_dict(tmp_path, fmt):
    model = _vit()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    if fmt == "safetensors":
        path = tmp_path / "vit.safetensors"
        save_file(sd, str(path))
    else:
        path = tmp_path / ("vit.bin" if fmt == "bin" else "vit.pth")
        obj = {
            "pth": sd, "bin": sd,
            "pth-model": {"model": sd, "epoch": 300, "optimizer": {}},
            "pth-state_dict": {"state_dict": sd, "arch": "vit_tiny"},
            "pth-module-prefix": {f"module.{k}": v for k, v in sd.items()},
            "pth-legacy-format": sd,
            "pth-lightning": {"state_dict": {f"model.{k}": v for k, v in sd.items()}, "epoch": 3},
        }[fmt]
        torch.save(obj, path, _use_new_zipfile_serialization=fmt != "pth-legacy-format")
    spec = load_model(path)
    cfg = spec.config
    assert (cfg.img_size, cfg.patch_size, cfg.d_model, cfg.num_heads, cfg.num_layers, cfg.d_ff, cfg.num_classes) == (32, 16, 128, 2, 2, 256, 5)
    assert cfg.qkv_bias
    assert any("num_heads=2 assumed" in n for n in spec.notes)
    assert any("timm state dict" in n for n in spec.notes)
    x = _x()
    assert torch.equal(_logits(spec.model, x), _logits(model, x))


def test_timm_without_qkv_bias_and_without_head(tmp_path):
    model = _vit(qkv_bias=False, num_classes=0)
    torch.save(model.state_dict(), tmp_path / "feat.pth")
    spec = load_model(tmp_path / "feat.pth")
    assert spec.config.qkv_bias is False and spec.config.num_classes == 0
    x = _x()
    out = _logits(spec.model, x)
    assert out.shape == (3, 128)  # CLS features
    assert torch.equal(out, _logits(model, x))


def test_timm_num_heads_guess_and_override(tmp_path):
    model = _vit(d_model=96, num_heads=3, d_ff=192)
    torch.save(model.state_dict(), tmp_path / "w96.pth")
    with pytest.raises(VitedgeError, match=r"w96\.pth: cannot guess the number of heads for width 96 — pass num_heads="):
        load_model(tmp_path / "w96.pth")
    spec = load_model(tmp_path / "w96.pth", num_heads=3)
    assert spec.config.num_heads == 3
    x = _x()
    assert torch.allclose(_logits(spec.model, x), _logits(model, x))
    with pytest.raises(VitedgeError, match="not divisible by num_heads=5"):
        load_model(tmp_path / "w96.pth", num_heads=5)
    # a wrong (but valid) head count changes the maths: the override really is used
    wrong = load_model(tmp_path / "w96.pth", num_heads=2)
    assert not torch.allclose(_logits(wrong.model, x), _logits(model, x), atol=1e-3)


def _layer_scale_vit(seed=0) -> VisionTransformer:
    """A LayerScale ViT whose gammas are far from 1 and from each other (random, some negative)."""
    model = _vit(seed, d_model=64, d_ff=128, num_heads=2, layer_scale=True)
    g = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".gamma"):
                p.copy_(torch.empty(p.shape).uniform_(-1.5, 1.5, generator=g))
    return model


def test_timm_layer_scale(tmp_path):
    """DeiT III / DINOv2-style ``blocks.N.ls1/ls2.gamma`` load and scale each residual branch."""
    model = _layer_scale_vit()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    assert "blocks.1.ls2.gamma" in sd and sd["blocks.0.ls1.gamma"].shape == (64,)
    save_file(sd, str(tmp_path / "deit3.safetensors"))
    spec = load_model(tmp_path / "deit3.safetensors", num_heads=2)
    assert spec.config.layer_scale and spec.config.d_model == 64 and spec.config.num_layers == 2
    x = _x()
    got = _logits(spec.model, x)
    assert torch.equal(got, _logits(model, x))

    # the forward written out by hand: x + g1 * attn(norm1(x)), then x + g2 * mlp(norm2(x))
    m = spec.model
    with torch.no_grad():
        t = torch.cat([m.cls_token.expand(len(x), -1, -1), m.patch_embed(x)], 1) + m.pos_embed
        for i, blk in enumerate(m.blocks):
            t = t + sd[f"blocks.{i}.ls1.gamma"] * blk.attn(blk.norm1(t))[0]
            t = t + sd[f"blocks.{i}.ls2.gamma"] * blk.mlp(blk.norm2(t))
        want = m.head(m.norm(t)[:, 0])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    # the gammas matter: the same weights without them give other logits
    plain = VisionTransformer(**{**model.config.to_dict(), "layer_scale": False}).eval()
    plain.load_state_dict({k: v for k, v in sd.items() if ".ls" not in k})
    assert not torch.allclose(_logits(plain, x), got, atol=1e-2)

    # a checkpoint with ls1 but not ls2 is a mismatch, not a silent half-LayerScale model
    torch.save({k: v for k, v in sd.items() if ".ls2." not in k}, tmp_path / "half.pth")
    with pytest.raises(VitedgeError, match=r"missing 2 keys \(e\.g\. blocks\.0\.ls2\.gamma\)"):
        load_model(tmp_path / "half.pth", num_heads=2)


@pytest.mark.parametrize(
    "extra, what",
    [
        ({"dist_token": torch.zeros(1, 1, 128), "head_dist.weight": torch.zeros(5, 128), "head_dist.bias": torch.zeros(5)}, "distilled DeiT"),
        ({"reg_token": torch.zeros(1, 4, 128)}, "register tokens"),
        ({"fc_norm.weight": torch.ones(128), "fc_norm.bias": torch.zeros(128)}, "global-pool ViT"),
    ],
)
def test_timm_variants_vitedge_does_not_support(tmp_path, extra, what):
    sd = dict(_vit().state_dict())
    sd.update(extra)
    torch.save(sd, tmp_path / "variant.pth")
    with pytest.raises(ModelNotSupported, match=what):  # naming the variant is the point
        load_model(tmp_path / "variant.pth")


# ------------------------------------------------------------------------------------------
# Hugging Face
# ------------------------------------------------------------------------------------------
transformers = pytest.importorskip("transformers")


def _hf_config(**kw):
    args = dict(image_size=32, patch_size=16, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=128, num_labels=4, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    args.update(kw)
    cfg = transformers.ViTConfig(**args)
    if cfg.num_labels:
        cfg.id2label = {i: f"class_{i}" for i in range(cfg.num_labels)}
        cfg.label2id = {v: k for k, v in cfg.id2label.items()}
    return cfg


@pytest.fixture(scope="module")
def hf_classifier(tmp_path_factory):
    """A random transformers ViTForImageClassification, saved with save_pretrained."""
    torch.manual_seed(0)
    model = _randomize(transformers.ViTForImageClassification(_hf_config()), seed=1)
    folder = tmp_path_factory.mktemp("hf") / "vit"
    model.save_pretrained(folder)
    return model, folder


def _hf_logits(model, x):
    with torch.no_grad():
        return model(pixel_values=x).logits


def _saved_state_dict(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def _copy_config(src, dst):
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())


def test_hf_folder_safetensors(hf_classifier):
    model, folder = hf_classifier
    assert (folder / "model.safetensors").exists()
    spec = load_model(folder)
    assert spec.config.d_model == 64 and spec.config.num_heads == 2 and spec.config.layer_norm_eps == 1e-12
    assert spec.labels == ["class_0", "class_1", "class_2", "class_3"]
    assert any("no preprocessor_config.json" in n for n in spec.notes)
    pre = spec.preprocessing
    assert (pre.img_size, pre.resize, pre.mean, pre.std, pre.interpolation) == ((32, 32), None, (0.5,) * 3, (0.5,) * 3, "bilinear")
    x = _x()
    ref = _hf_logits(model, x)
    got = _logits(spec.model, x)
    assert ref.abs().max() > 0.1  # a meaningful comparison, not zeros against zeros
    assert torch.allclose(got, ref, atol=1e-4), (got - ref).abs().max()


@pytest.mark.parametrize("layout", ["4.x", "4.x-no-prefix", "self", "self-no-prefix", "5.x-in-memory"])
def test_hf_pytorch_model_bin_layouts(hf_classifier, tmp_path, layout):
    """pytorch_model.bin written by torch.save, in each key layout transformers has used."""
    model, folder = hf_classifier
    if layout == "5.x-in-memory":  # what torch.save(model.state_dict()) gives with transformers 5
        sd = model.state_dict()
        if not any(".q_proj." in k for k in sd):
            pytest.skip("this transformers version keeps the 4.x names in memory")
    else:
        sd = _saved_state_dict(folder)
        assert any(".attention.attention.query." in k for k in sd)
        if layout.startswith("self"):
            sd = {k.replace(".attention.attention.", ".attention.self."): v for k, v in sd.items()}
        if layout.endswith("no-prefix"):
            sd = {k.removeprefix("vit."): v for k, v in sd.items()}
    target = tmp_path / layout
    _copy_config(folder, target)
    torch.save(sd, target / "pytorch_model.bin")
    spec = load_model(target)
    x = _x(seed=2)
    assert torch.allclose(_logits(spec.model, x), _hf_logits(model, x), atol=1e-4)


def test_hf_sharded_safetensors(hf_classifier, tmp_path):
    model, folder = hf_classifier
    sd = _saved_state_dict(folder)
    keys = sorted(sd)
    target = tmp_path / "sharded"
    _copy_config(folder, target)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2], "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for name, ks in shards.items():
        save_file({k: sd[k].contiguous() for k in ks}, str(target / name))
    index = {"metadata": {}, "weight_map": {k: name for name, ks in shards.items() for k in ks}}
    (target / "model.safetensors.index.json").write_text(json.dumps(index))
    spec = load_model(target)
    x = _x()
    assert torch.allclose(_logits(spec.model, x), _hf_logits(model, x), atol=1e-4)
    (target / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileProblem, match="model-00002-of-00002.safetensors"):
        load_model(target)


def test_hf_vitmodel_without_head_and_without_qkv_bias(tmp_path):
    torch.manual_seed(0)
    model = _randomize(transformers.ViTModel(_hf_config(num_labels=0, qkv_bias=False), add_pooling_layer=True), seed=2)
    model.save_pretrained(tmp_path / "backbone")
    spec = load_model(tmp_path / "backbone")
    assert spec.config.num_classes == 0 and spec.config.qkv_bias is False
    assert any("CLS features" in n for n in spec.notes)
    x = _x()
    with torch.no_grad():
        want = model(pixel_values=x).last_hidden_state[:, 0]
    assert torch.allclose(_logits(spec.model, x), want, atol=1e-4)


def test_hf_preprocessor_config_is_honoured(hf_classifier, tmp_path, calib_dir):
    from PIL import Image

    model, folder = hf_classifier
    target = tmp_path / "with_pre"
    model.save_pretrained(target)
    proc = transformers.ViTImageProcessor(size={"height": 32, "width": 32}, resample=3,
                                          image_mean=[0.4, 0.45, 0.5], image_std=[0.2, 0.25, 0.3])
    proc.save_pretrained(target)
    spec = load_model(target)
    pre = spec.preprocessing
    assert (pre.img_size, pre.interpolation, pre.mean, pre.std) == ((32, 32), "bicubic", (0.4, 0.45, 0.5), (0.2, 0.25, 0.3))
    assert not any("preprocessor_config" in n for n in spec.notes)
    # vitedge's preprocessing gives what the Hugging Face processor gives on real images
    paths = sorted(calib_dir.rglob("*.png"))[:4]
    imgs = [Image.open(p).convert("RGB") for p in paths]
    want = proc(images=imgs, return_tensors="np")["pixel_values"]
    np.testing.assert_allclose(pre.batch(paths), want, atol=1e-5)


def test_hf_shortest_edge_and_center_crop_config():
    from vitedge.models.loading import preprocessing_from_hf

    pre = preprocessing_from_hf({"do_resize": True, "size": {"shortest_edge": 256}, "do_center_crop": True,
                                 "crop_size": {"height": 224, "width": 224}, "resample": 3,
                                 "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}, 224)
    assert (pre.img_size, pre.resize, pre.center_crop, pre.interpolation) == ((224, 224), 256, True, "bicubic")
    pre = preprocessing_from_hf({"do_normalize": False, "do_rescale": False, "size": {"height": 64, "width": 64}}, 64)
    assert pre.mean == (0.0, 0.0, 0.0) and pre.std == (1.0, 1.0, 1.0) and pre.scale == 1.0


def test_hf_config_that_is_not_a_vit(hf_classifier, tmp_path):
    _, folder = hf_classifier
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 64}))
    with pytest.raises(ModelNotSupported, match="'bert'"):
        load_model(bert)
    deit = tmp_path / "deit"
    deit.mkdir()
    (deit / "config.json").write_text(json.dumps({"model_type": "deit"}))
    with pytest.raises(ModelNotSupported):
        load_model(deit)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    with pytest.raises(FileProblem):
        load_model(broken)
    noweights = tmp_path / "noweights"
    _copy_config(folder, noweights)
    with pytest.raises(VitedgeError, match="noweights has config.json but no model.safetensors or pytorch_model.bin"):
        load_model(noweights)


def test_hf_weights_file_alone_points_to_the_folder(hf_classifier):
    _, folder = hf_classifier
    with pytest.raises(VitedgeError, match="model.safetensors looks like Hugging Face ViT weights — load the whole save_pretrained folder"):
        load_model(folder / "model.safetensors")


def test_hf_weights_that_do_not_match_the_config(hf_classifier, tmp_path):
    _, folder = hf_classifier
    target = tmp_path / "mismatch"
    target.mkdir()
    cfg = json.loads((folder / "config.json").read_text())
    cfg["num_hidden_layers"] = 3  # the weights have 2
    (target / "config.json").write_text(json.dumps(cfg))
    save_file(_saved_state_dict(folder), str(target / "model.safetensors"))
    with pytest.raises(VitedgeError, match=r"mismatch[/\\]model\.safetensors: weights do not match .*missing \d+ keys \(e\.g\. blocks\.2\."):
        load_model(target)


# ------------------------------------------------------------------------------------------
# plain nn.Module and ModelSpec
# ------------------------------------------------------------------------------------------
class _TinyConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 8, 8)
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, images):
        return self.fc(self.conv(images).flatten(1))


def test_plain_module(tmp_path):
    net = _TinyConvNet().train()
    with pytest.raises(VitedgeError, match="_TinyConvNet is not a vitedge VisionTransformer — pass img_size="):
        load_model(net)
    spec = load_model(net, img_size=32, labels=["a", "b", "c"])
    assert spec.model is net and not net.training  # put in eval mode
    assert spec.config is None and spec.labels == ["a", "b", "c"] and spec.num_classes == 3
    assert spec.preprocessing.img_size == (32, 32)
    assert spec.model_info() == {"family": "module", "source": "_TinyConvNet"}


def test_vit_module_and_spec_pass_through():
    model = _vit()
    spec = load_model(model)
    assert spec.config == model.config and spec.preprocessing.img_size == (32, 32)
    custom = Preprocessing(img_size=32, resize=None, center_crop=False)
    again = load_model(spec, img_size=48, preprocessing=None, labels=list("vwxyz"))
    assert again.preprocessing.img_size == (48, 48) and spec.preprocessing.img_size == (32, 32)  # original untouched
    assert again.labels == list("vwxyz") and spec.labels is None
    assert load_model(spec, preprocessing=custom).preprocessing is custom


# ------------------------------------------------------------------------------------------
# bad input: one clear VitedgeError naming the file
# ------------------------------------------------------------------------------------------
def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_missing_file_and_folder_without_config(tmp_path):
    with pytest.raises(VitedgeError) as e:
        load_model(tmp_path / "nope.pth")
    assert re.search(r"model .*nope\.pth does not exist — give a checkpoint file, a Hugging Face folder, or a preset: vit_tiny", _one_line(e))
    with pytest.raises(FileProblem):
        load_model(tmp_path)
    (tmp_path / "model.onnx").write_bytes(b"x")
    with pytest.raises(VitedgeError, match=r"model\.onnx: unknown model file type '\.onnx'"):
        load_model(tmp_path / "model.onnx")


@pytest.mark.parametrize("name", ["corrupt.pth", "corrupt.safetensors", "empty.pth", "empty.safetensors"])
def test_corrupt_files(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"" if name.startswith("empty") else np.random.default_rng(0).bytes(4096))
    with pytest.raises(VitedgeError) as e:
        load_model(path)
    msg = _one_line(e)
    assert str(path) in msg
    if name.endswith(".pth"):
        assert "is not a PyTorch file (neither a torch.save zip archive nor a pickle" in msg
    else:
        assert "is not a readable safetensors file (SafetensorError" in msg


def test_pickle_that_is_not_a_state_dict(tmp_path):
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    with pytest.raises(VitedgeError, match=r"tensor\.pth does not hold a state dict of tensors"):
        load_model(tmp_path / "tensor.pth")
    torch.save(_TinyConvNet(), tmp_path / "whole_module.pth")  # pickled module: refused, never unpickled
    with pytest.raises(VitedgeError, match=r"whole_module\.pth holds pickled Python objects \(.*_TinyConvNet\), not just tensors"):
        load_model(tmp_path / "whole_module.pth")
    # a truncated torch zip archive
    data = (tmp_path / "tensor.pth").read_bytes()
    (tmp_path / "truncated.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(FileProblem):
        load_model(tmp_path / "truncated.pth")


def test_unknown_key_layout(tmp_path):
    resnet = {"conv1.weight": torch.zeros(64, 3, 7, 7), "bn1.weight": torch.ones(64), "bn1.bias": torch.zeros(64),
              "layer1.0.conv1.weight": torch.zeros(64, 64, 3, 3), "fc.weight": torch.zeros(1000, 2048), "fc.bias": torch.zeros(1000)}
    torch.save(resnet, tmp_path / "resnet50.pth")
    with pytest.raises(VitedgeError) as e:
        load_model(tmp_path / "resnet50.pth")
    msg = _one_line(e)
    assert "resnet50.pth is not a ViT checkpoint vitedge knows (keys like conv1.weight" in msg
    assert "expected timm keys" in msg


def test_shape_mismatch(tmp_path):
    sd = dict(_vit().state_dict())
    sd["blocks.1.mlp.fc2.weight"] = torch.zeros(128, 200)  # should be (128, 256)
    save_file(sd, str(tmp_path / "bad_shape.safetensors"))
    with pytest.raises(VitedgeError) as e:
        load_model(tmp_path / "bad_shape.safetensors")
    msg = _one_line(e)
    assert "bad_shape.safetensors: tensor blocks.1.mlp.fc2.weight has shape (128, 200), expected (128, 256)" in msg


def test_missing_block_tensor(tmp_path):
    sd = dict(_vit().state_dict())
    del sd["blocks.1.attn.proj.bias"]
    torch.save(sd, tmp_path / "partial.pth")
    with pytest.raises(VitedgeError, match=r"partial\.pth: weights do not match .*missing 1 keys \(e\.g\. blocks\.1\.attn\.proj\.bias\)"):
        load_model(tmp_path / "partial.pth")


def test_damaged_vitedge_metadata(tmp_path):
    model = _vit()
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(tmp_path / "meta.safetensors"), metadata={"vitedge": "{broken"})
    with pytest.raises(FileProblem):
        load_model(tmp_path / "meta.safetensors")


def test_bad_img_size():
    with pytest.raises(VitedgeError, match="img_size -32 must be a positive"):
        load_model("reference", img_size=-32)


def test_preset_spec(tmp_path, monkeypatch):
    spec = load_model("vit_tiny", img_size=32)
    assert spec.config.d_model == 192 and spec.config.img_size == 32 and spec.source == "preset:vit_tiny"
    assert any("random weights" in n for n in spec.notes)
    # a file named like a preset wins over the preset
    monkeypatch.chdir(tmp_path)
    torch.save(dict(_vit().state_dict()), tmp_path / "vit_tiny")
    with pytest.raises(VitedgeError, match="unknown model file type"):
        load_model("vit_tiny")
