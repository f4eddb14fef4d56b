"""FP16 that never overflows: a ViT whose residual stream passes the FP16 range (65504).

One block's ``mlp.fc2`` weight is scaled so the residual stream (the LayerNorm inputs of every later
block) reaches ~9e4.  FP16 arithmetic is executed faithfully by ``onnx.reference`` (numpy in the
declared dtypes, like an FP16 GPU kernel); ONNX Runtime's CPU provider would quietly run most FP16
ops in FP32 and hide the overflow.  A plain conversion (ONNX Runtime's converter with its default
block list, or vitedge's op-type list without the guard) gives inf/NaN; vitedge's guarded
conversion keeps the overflowing nodes in FP32, lists them in the manifest and stays within
tolerance of FP32.
"""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
import torch

import vitedge
from vitedge.data import ImageSet
from vitedge.export import compare_outputs
from vitedge.manifest import Manifest
from vitedge.quantization import quantize
from vitedge.quantization.fp16 import FP16_MAX, convert_onnx_fp16, scan_tensors, toposort


def _reference_run(model, x: np.ndarray) -> np.ndarray:
    """Execute an ONNX model with onnx.reference: every op in the dtype the file declares."""
    from onnx.reference import ReferenceEvaluator

    proto = onnx.load(str(model)) if not isinstance(model, onnx.ModelProto) else model
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        return ReferenceEvaluator(proto).run(None, {"pixel_values": x})[0]


@pytest.fixture(scope="module")
def hot_vit(tmp_path_factory, calib_dir):
    """A 32x32 ViT (3 blocks) whose residual stream exceeds FP16 after block 0's MLP, exported to ONNX."""
    from vitedge import VisionTransformer, export_onnx

    torch.manual_seed(0)
    m = VisionTransformer(img_size=32, patch_size=8, num_classes=7, d_model=64, num_heads=2, num_layers=3, d_ff=128, dropout=0.0).eval()
    with torch.no_grad():
        m.blocks[0].mlp.fc2.weight.mul_(1.2e6)  # weights stay < 65504, their output does not
    seen = {}
    hook = m.blocks[1].norm1.register_forward_hook(lambda mod, inp, out: seen.__setitem__("ln_in", float(inp[0].abs().max())))
    out = tmp_path_factory.mktemp("hot") / "hot.onnx"
    export_onnx(m, out)
    man = Manifest.find(out)[1]
    x = ImageSet.from_path(calib_dir).sample(24, 0).load_all(man.preprocessing_obj).x
    with torch.no_grad():
        m(torch.from_numpy(x))
    hook.remove()
    assert seen["ln_in"] > FP16_MAX  # the premise: a LayerNorm input past the FP16 range on real images
    return out, x


def test_naive_fp16_overflows_guarded_does_not(hot_vit, tmp_path):
    path, x = hot_vit
    ref = _reference_run(path, x)
    assert np.isfinite(ref).all()

    # ONNX Runtime's converter, default op block list: inf/NaN
    from onnxruntime.transformers.float16 import convert_float_to_float16

    plain = convert_float_to_float16(onnx.load(str(path)), keep_io_types=True)
    toposort(plain)  # the converter appends its Casts out of order; onnx.reference needs a sorted graph
    assert not np.isfinite(_reference_run(plain, x)).all()

    # the same converter and op-type list as vitedge, without the overflow guard: inf/NaN too
    naive = convert_onnx_fp16(path, tmp_path / "naive.onnx", guard=False)
    assert naive.kept and not naive.guard.get("kept_fp32_for_overflow")
    assert not np.isfinite(_reference_run(tmp_path / "naive.onnx", x)).all()

    # guarded: finite and within FP16 tolerance of FP32
    res = convert_onnx_fp16(path, tmp_path / "guarded.onnx", x[:16])  # checked on 16 images, run on 24
    out = _reference_run(tmp_path / "guarded.onnx", x)
    assert out.dtype == np.float32 and np.isfinite(out).all()
    cmp = compare_outputs(ref, out)
    assert cmp["cosine_min"] > 0.9999 and cmp["top1_agreement"] == 1.0
    assert cmp["max_abs_error"] <= 1e-3 + 1e-2 * np.abs(ref).max()

    g = res.guard
    assert g["checked"] and g["images"] == 16
    assert g["largest_fp32_activation"] > FP16_MAX and g["hot_tensor_count"] >= 2
    kept_for_overflow = {k["node"] for k in g["kept_fp32_for_overflow"]}
    assert kept_for_overflow and kept_for_overflow <= set(res.kept)
    # what was kept: the fc2 MatMul and the residual Adds after it; LayerNorm/Softmax by op type
    nodes = {n.name: n.op_type for n in onnx.load(str(path)).graph.node}
    # the residual stream and what reads it (Slice: the last block takes the CLS token off the stream)
    assert {nodes[k] for k in kept_for_overflow} <= {"MatMul", "Add", "Gemm", "Slice"}
    assert "MatMul" in {nodes[k] for k in kept_for_overflow}
    assert sum(nodes[k] == "Add" for k in kept_for_overflow) >= 3  # the residual stream of blocks 0-2
    assert all(nodes[k] != "MatMul" for k in set(res.kept) - kept_for_overflow)
    # most matrix work still runs in FP16
    half = onnx.load(str(tmp_path / "guarded.onnx"))
    fp16_matmuls = [n for n in half.graph.node if n.op_type == "MatMul" and n.name not in res.kept]
    assert len(fp16_matmuls) >= 10


def test_scan_flags_overflow_in_the_unguarded_model(hot_vit, tmp_path):
    """The check vitedge runs (every tensor reduced in-graph by ONNX Runtime) sees the inf of the plain model."""
    path, x = hot_vit
    convert_onnx_fp16(path, tmp_path / "naive.onnx", guard=False)
    s16 = scan_tensors(onnx.load(str(tmp_path / "naive.onnx")), [x[:8]], tmp_path)
    s32 = scan_tensors(onnx.load(str(path)), [x[:8]], tmp_path)
    assert not s32.nonfinite and not s32.fp16_overflow
    # ONNX Runtime's CPU provider runs these FP16 ops in FP32, so the check reads FP16-declared tensors past 65504
    over = s16.fp16_overflow
    assert over and all(s16.types[t] == onnx.TensorProto.FLOAT16 for t in over - s16.nonfinite)
    assert max(s32.max_abs.values()) > FP16_MAX
    producers = {o: n.op_type for n in onnx.load(str(path)).graph.node for o in n.output}
    assert {"MatMul", "Add"} <= {producers[t] for t in over if t in producers}


def test_check_rounds_catch_what_the_threshold_missed(hot_vit, tmp_path):
    """With no head-room (threshold above the real peak) the FP32 scan flags nothing; the FP16 check finds the
    overflow, keeps the nodes where it starts in FP32 and converts again."""
    path, x = hot_vit
    res = convert_onnx_fp16(path, tmp_path / "g.onnx", x[:16], margin=0.5)
    g = res.guard
    inits = {i.name for i in onnx.load(str(path)).graph.initializer}
    assert set(g["hot_tensors"]) <= inits  # no activation flagged by the scan (at most a weight past 65504)
    assert len(g["rounds"]) >= 2 and g["rounds"][0]["bad_tensors"] > 0 and g["rounds"][-1]["bad_tensors"] == 0
    assert any("inf/NaN in FP16 check" in k["reason"] for k in g["kept_fp32_for_overflow"])
    assert np.isfinite(_reference_run(tmp_path / "g.onnx", x)).all()


def test_quantize_fp16_lists_overflow_nodes_in_manifest(hot_vit, calib_dir, tmp_path):
    path, x = hot_vit
    out, man = quantize(path, tmp_path / "hot.fp16.onnx", precision="fp16", backend="onnxruntime", calib=calib_dir)
    q = man.quantization
    guard = q["overflow_guard"]
    assert guard["checked"] and guard["images"] > 0 and "calibration images" in guard["checked_on"]
    over = [k["node"] for k in guard["kept_fp32_for_overflow"]]
    assert over and set(over) <= set(q["excluded_nodes"])
    assert all("|x|=" in k["reason"] or "inf/NaN" in k["reason"] for k in guard["kept_fp32_for_overflow"])
    assert man.verification["agreement"]["finite"] and man.verification["agreement"]["cosine_min"] > 0.9999
    assert Manifest.find(out)[1].quantization["overflow_guard"]["kept_fp32_for_overflow"] == guard["kept_fp32_for_overflow"]
    assert np.isfinite(_reference_run(out, x)).all()


def test_well_behaved_model_keeps_only_op_types(ref_onnx, calib_dir, tmp_path):
    """No false alarms: the shipped reference model needs nothing beyond LayerNorm/Softmax in FP32."""
    res = convert_onnx_fp16(ref_onnx, tmp_path / "ref.fp16.onnx", ImageSet.from_path(calib_dir).sample(16, 0)
                            .load_all(Manifest.find(ref_onnx)[1].preprocessing_obj).x)
    assert res.guard["checked"] and res.guard["kept_fp32_for_overflow"] == []
    assert res.guard["largest_fp32_activation"] < FP16_MAX / 2
    assert res.guard["headroom"] > 2
    _, man = quantize(ref_onnx, tmp_path / "ref.fp16.xml", precision="fp16", backend="openvino", calib=calib_dir)
    assert man.quantization["overflow_guard"]["fp16_compute_safe"] is True


def test_openvino_fp16_checked_and_flagged(hot_vit, calib_dir, tmp_path):
    """OpenVINO: compress_to_fp16 only stores weights as FP16; the compiled CPU model is checked for inf/NaN,
    its inference precision recorded, and a model whose activations exceed FP16 is flagged as unsafe for FP16 compute."""
    path, x = hot_vit
    out, man = quantize(path, tmp_path / "hot.fp16.xml", precision="fp16", backend="openvino", calib=calib_dir)
    g = man.quantization["overflow_guard"]
    assert g["checked"] and g["output_finite"] and g["images"] > 0 and g["cpu_inference_precision"]
    assert g["hot_tensor_count"] >= 2 and g["fp16_compute_safe"] is False and "f32" in g["advice"]
    assert g["largest_fp32_activation"] > FP16_MAX
    with vitedge.load(out) as eng:
        y = eng.infer(x)
    assert np.isfinite(y).all()
