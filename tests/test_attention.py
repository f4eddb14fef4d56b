"""Attention maps of deployed engines (engine.attention, vitedge explain): from the engine's own probabilities,
equal to PyTorch's for FP32, close for INT8, on the patch grid, refused for token-merged engines."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import vitedge
from vitedge import attention
from vitedge.errors import ModelNotSupported, ShapeMismatch, VitedgeError


@pytest.fixture(scope="module")
def images(digit_images):
    return digit_images[:6]


@pytest.fixture(scope="module")
def ov_fp32(tmp_path_factory, ref_onnx):
    from vitedge.compilation import compile_model

    path, _ = compile_model(ref_onnx, tmp_path_factory.mktemp("ov") / "ref.ov.xml", target="openvino")
    return path


# -- the maths --------------------------------------------------------------------------------------------------------------
def _probs(rng, n=2, heads=3, tokens=21, blocks=3):
    logits = rng.standard_normal((blocks, n, heads, tokens, tokens))
    return [np.exp(b) / np.exp(b).sum(-1, keepdims=True) for b in logits]


def test_rollout_needs_only_the_last_blocks_cls_row():
    """The exported graph's last block attends from the CLS token alone: the rollout is the same."""
    full = _probs(np.random.default_rng(0))
    cls_only = full[:-1] + [full[-1][:, :, :1]]
    np.testing.assert_allclose(attention.rollout(cls_only), attention.rollout(full), rtol=1e-12)
    row = attention.rollout(full)
    np.testing.assert_allclose(row.sum(-1), 1.0)  # rows stay distributions


def test_register_tokens_are_left_out_of_the_grid():
    probs = _probs(np.random.default_rng(1), tokens=1 + 4 + 16)  # CLS, 4 registers, a 4x4 grid
    assert attention.patch_grid(21, 64, 64, patch=16) == (4, 4, 5)
    assert attention.patch_grid(21, 64, 64) == (4, 4, 5)  # patch size inferred
    assert attention.patch_grid(1 + 12, 48, 64) == (3, 4, 1)  # non-square
    m = attention.maps(probs, 64, 64, "rollout", 16)
    assert m.shape == (2, 4, 4)
    np.testing.assert_allclose(m.reshape(2, -1), attention.rollout(probs)[:, 5:], rtol=1e-6)
    c = attention.maps(probs, 64, 64, "cls", 16)
    assert c.shape == (2, 3, 4, 4)
    np.testing.assert_allclose(c.reshape(2, 3, -1), probs[-1][:, :, 0, 5:], rtol=1e-6)
    with pytest.raises(ShapeMismatch, match="do not fit"):
        attention.patch_grid(21, 64, 64, patch=8)
    with pytest.raises(ModelNotSupported, match="token-merged"):
        attention.maps([probs[0], probs[1][..., :-2, :-2]], 64, 64)
    with pytest.raises(VitedgeError, match="unknown attention map kind"):
        attention.maps(probs, 64, 64, "gradcam")


def test_agreement_numbers():
    a = np.arange(20.0).reshape(4, 5)
    assert attention.agreement(a, 3 * a + 1) == {"correlation": pytest.approx(1.0), "top10_overlap": 1.0}
    assert attention.correlation(a, -a) == pytest.approx(-1.0)
    assert attention.correlation(np.ones(4), np.ones(4)) == 1.0 and attention.correlation(np.ones(4), a.ravel()[:4]) == 0.0
    b = a.copy()
    b.flat[19], b.flat[0] = b.flat[0], b.flat[19]  # the top patches swap places with the bottom ones
    assert attention.top_overlap(a, b) == 0.5  # top 10 % of 20: 2 patches, one kept


def test_colormap_spans_viridis():
    c = attention.colormap(np.array([0.0, 0.5, 1.0, 2.0]))
    assert c.dtype == np.uint8 and c.shape == (4, 3)
    assert c[0].tolist() == [68, 1, 84] and c[-1].tolist() == c[-2].tolist() == [253, 231, 37]


# -- engines --------------------------------------------------------------------------------------------------------------------
def test_fp32_onnx_engine_maps_equal_pytorchs(ref_onnx, images):
    with vitedge.load("reference", backend="pytorch") as torch_ref, vitedge.load(ref_onnx) as onnx_engine:
        for kind, shape in (("rollout", (6, 4, 4)), ("cls", (6, 3, 4, 4))):
            ours, theirs = onnx_engine.attention(images, kind), torch_ref.attention(images, kind)
            assert ours.shape == theirs.shape == shape
            np.testing.assert_allclose(ours, theirs, atol=1e-5)
        x = onnx_engine.preprocessing.batch(images)
        np.testing.assert_array_equal(onnx_engine.attention(x), onnx_engine.attention(images))  # preprocessed arrays too


def test_openvino_exposes_its_fused_attention(ov_fp32, ref_onnx, images):
    """OpenVINO's IR holds each block's attention as one ScaledDotProductAttention op: the maps still come out,
    as ONNX Runtime's up to the engine's float precision (bf16 on CPUs that have it), and the engine's
    predictions do not change."""
    import openvino as ov

    ops = {o.get_type_name() for o in ov.Core().read_model(str(ov_fp32)).get_ordered_ops()}
    assert "ScaledDotProductAttention" in ops and "Softmax" not in ops
    with vitedge.load(ov_fp32) as e, vitedge.load(ref_onnx) as r:
        x = e.preprocessing.batch(images)
        before = e.infer(x)
        np.testing.assert_allclose(e.attention(x, "cls"), r.attention(x, "cls"), atol=0.03)
        assert attention.correlation(e.attention(x), r.attention(x)) > 0.999
        np.testing.assert_array_equal(e.infer(x), before)


def test_int8_engine_maps_are_its_own(ref_int8_onnxruntime, ref_onnx, images):
    with vitedge.load(ref_int8_onnxruntime) as q, vitedge.load(ref_onnx) as f:
        ours, theirs = q.attention(images), f.attention(images)
    assert ours.shape == theirs.shape and not np.array_equal(ours, theirs)  # INT8 moved it, a little
    assert 0.9 < attention.correlation(ours, theirs) <= 1.0


@pytest.fixture(scope="module")
def merged(tmp_path_factory, tiny_vit):
    from vitedge.export import export_onnx

    path, _ = export_onnx(tiny_vit, tmp_path_factory.mktemp("merged") / "merged.onnx", merge_tokens=1, images=[])
    return path


def test_token_merged_engine_has_no_map(merged):
    with vitedge.load(merged) as e, pytest.raises(ModelNotSupported, match="merges tokens .* no attention map"):
        e.attention(np.zeros((1, 3, 32, 32), np.float32))


def test_validate_says_why_an_engine_has_no_attention_section(merged, tiny_onnx, photo_dir):
    from vitedge.validation import validate

    rep = validate(merged, tiny_onnx, data=photo_dir, samples=6, batch_sizes=(1,), runs=2, rounds=1, warmup=1, min_runs=1)
    assert rep.engines[0]["attention"] is None
    assert any("attention maps not compared" in f and "merges tokens" in f for f in rep.data["findings"])


def test_attention_probabilities_are_found_by_data_flow(ref_onnx, ref_int8_onnxruntime):
    """Each block's Softmax, in order, in FP32 and in INT8 QDQ graphs; a Softmax over the logits is not one."""
    import onnx
    from onnx import helper

    from vitedge import graph

    fp32 = graph.attention_probabilities(ref_onnx)
    assert len(fp32) == 4 and graph.attention_probabilities(ref_int8_onnxruntime) == fp32
    proto = onnx.load(str(ref_onnx))
    logits = proto.graph.output[0].name
    proto.graph.node.append(helper.make_node("Softmax", [logits], ["probs"], axis=-1))
    assert graph.attention_probabilities(proto) == fp32


def test_graph_without_attention_softmax_is_refused(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 32, 32])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3, 32, 32])
    model = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y]), opset_imports=[helper.make_opsetid("", 18)])
    onnx.save(model, tmp_path / "relu.onnx")
    with vitedge.load(tmp_path / "relu.onnx", preprocessing={"img_size": 32}) as e, pytest.raises(VitedgeError, match="no attention Softmax"):
        e.attention(np.zeros((1, 3, 32, 32), np.float32))


# -- vitedge explain --------------------------------------------------------------------------------------------------------
def test_explain_fp32_engine_against_its_reference(ov_fp32, ref_onnx, images, tmp_path):
    from vitedge.explain import explain

    result = explain(ov_fp32, images, tmp_path / "out", reference=ref_onnx)
    assert len(result["images"]) == 6 and result["grid"] == [4, 4]
    for row in result["images"]:
        assert row["correlation"] >= 0.999 and row["top10_overlap"] == 1.0
        with Image.open(tmp_path / "out" / row["png"]) as im:
            assert im.format == "PNG" and im.width > 3 * 224 and im.height > 224  # image, engine, reference
    assert json.loads((tmp_path / "out" / "attention.json").read_text()) == result
    assert result["summary"]["correlation"]["min"] >= 0.999
    alone = explain(ref_onnx, images[:2], tmp_path / "alone", kind="cls")  # no reference: the engine's maps only
    assert "summary" not in alone and "correlation" not in alone["images"][0] and alone["grid"] == [4, 4]
    with Image.open(tmp_path / "alone" / alone["images"][0]["png"]) as im:
        assert 2 * 224 < im.width < 3 * 224  # image, engine


def test_explain_cli_int8_against_fp32(ref_int8_onnxruntime, ref_onnx, images, tmp_path):
    from vitedge.cli import main

    res = CliRunner().invoke(main, ["explain", str(ref_int8_onnxruntime), *map(str, images[:3]), "-o", str(tmp_path / "ex"), "--reference", str(ref_onnx)])
    assert res.exit_code == 0, res.output
    assert "correlation mean" in res.output
    data = json.loads((tmp_path / "ex" / "attention.json").read_text())
    assert data["engine_precision"] == "int8" and len(data["images"]) == 3
    for row in data["images"]:
        assert -1.0 <= row["correlation"] <= 1.0 and 0.0 <= row["top10_overlap"] <= 1.0
        Image.open(tmp_path / "ex" / row["png"]).load()
    res = CliRunner().invoke(main, ["explain", str(ref_onnx), str(tmp_path / "missing.png"), "-o", str(tmp_path / "ex2")])
    assert res.exit_code != 0 and "does not exist" in res.output
