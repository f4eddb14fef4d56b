"""TensorRT: what can be checked without TensorRT or a GPU, and the real build where both exist.

On machines without them (these machines) the build/run tests skip with the reason that
``tensorrt_status()`` gives; everything else runs here:

* the ONNX TensorRT consumes: the INT8 Q/DQ file of a 224-px ViT (197 tokens) with NVIDIA's placement
  (attention core and head GEMV in float, one Q/DQ pair per tensor) within the fidelity target under
  ONNX Runtime, and FP16 files whose overflow-guarded nodes stay FP32;
* the strongly typed design: network-creation flags, the typing plan (no builder precision flags);
* the build and the runtime against fake ``tensorrt`` and ``cuda-python`` modules whose "GPU" is ONNX
  Runtime running the very ONNX the parser was given: compile -> verify -> run, buffer reuse, one
  stream, padding under the profile's minimum, parser errors, timing caches, the engine inspector;
* profiles, the version/GPU compatibility check and every error path.
"""

from __future__ import annotations

import ctypes
import json
import shutil
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

import vitedge
import vitedge.backends.tensorrt as trtmod
from vitedge.backends.base import Engine, mac_summary
from vitedge.backends.tensorrt import (
    SUPPORTED_TENSORRT, TRT_SUPPORTED_OPS, OnnxInfo, TensorRTEngine, _Buffers, attach_timing_cache, check_compat,
    check_onnx_for_tensorrt, check_tensorrt_version, compute_profile, convert_for_tensorrt, cuda_check, inspect_onnx,
    network_flags, parse_engine_information, parser_errors, profile_chunks, tensorrt_status, typing_plan,
)
from vitedge.cli.main import main as cli
from vitedge.compilation import compile_model
from vitedge.errors import BackendUnavailable, ShapeMismatch, VitedgeError
from vitedge.manifest import Manifest
from vitedge.quantization.fidelity import Target

REASON = tensorrt_status()
needs_trt = pytest.mark.skipif(REASON is not None, reason=f"TensorRT build/run needs TensorRT and an NVIDIA GPU: {REASON}")
without_trt = pytest.mark.skipif(REASON is None, reason="TensorRT and a GPU are present: the unavailability path cannot occur")


@pytest.fixture(scope="module")
def qdq_onnx(tmp_path_factory, ref_onnx, calib_dir):
    from vitedge.quantization import quantize

    path, _ = quantize(ref_onnx, tmp_path_factory.mktemp("trt") / "int8.onnx", precision="int8", backend="tensorrt",
                       calib=calib_dir, samples=16)
    return path


@pytest.fixture(scope="module")
def vit224(tmp_path_factory, calib_dir):
    """A random-weight ViT-Ti at 224 px (196 patches + CLS = 197 tokens), its FP32 ONNX and its TensorRT INT8 Q/DQ file."""
    from vitedge.quantization import quantize

    folder = tmp_path_factory.mktemp("vit224")
    fp32, _ = vitedge.export_onnx(vitedge.load_model("vit_tiny"), folder / "vit_tiny.onnx")
    qdq, man = quantize(fp32, folder / "vit_tiny.trt.int8.onnx", backend="tensorrt", calib=calib_dir, samples=16)
    return SimpleNamespace(fp32=fp32, qdq=qdq, man=man)


# -- the ONNX TensorRT consumes ---------------------------------------------------------------
def test_fp32_export_is_what_tensorrt_takes(ref_onnx):
    info = inspect_onnx(ref_onnx)
    assert info.input_name == "pixel_values" and info.shape[1:] == [3, 64, 64] and info.dynamic_axes == [0]
    assert info.output_names == ["logits"] and not info.has_qdq and not info.fp16_weights and info.opset == 18
    assert info.ops <= TRT_SUPPORTED_OPS, f"ops TensorRT's parser may not take: {info.ops - TRT_SUPPORTED_OPS}"
    check_onnx_for_tensorrt(info)


def test_strongly_typed_plan_takes_precision_from_the_onnx_types(ref_onnx, qdq_onnx):
    """No builder precision flags (TensorRT 11 has none): an FP32 file is converted to FP16 (f16, the
    default) or built as it is (f32); a QDQ file is INT8 with FP16 or FP32 float parts; BF16 is refused."""
    fp32 = inspect_onnx(ref_onnx)
    assert typing_plan(fp32, None) == ("fp16", "fp16", "fp16") == typing_plan(fp32, "f16")
    assert typing_plan(fp32, "f32") == (None, "fp32", "fp32")
    with pytest.raises(VitedgeError, match="strongly typed.*BF16"):
        typing_plan(fp32, "bf16")
    qdq = inspect_onnx(qdq_onnx)
    assert qdq.has_qdq and qdq.ops <= TRT_SUPPORTED_OPS
    check_onnx_for_tensorrt(qdq)
    assert typing_plan(qdq, None) == ("fp16", "int8", "fp16")
    assert typing_plan(qdq, "f32") == (None, "int8", "fp32")
    fp16 = OnnxInfo("x", [None, 3, 64, 64], ["y"], fp16_weights=True)
    assert typing_plan(fp16, None) == (None, "fp16", "fp16") and typing_plan(fp16, "f32")[0] is None
    assert typing_plan(OnnxInfo("x", [None, 3, 64, 64], ["y"], has_qdq=True, fp16_weights=True), None) == (None, "int8", "fp16")
    assert not hasattr(trtmod, "builder_flags")


def _fake_trt(version: str, strongly_typed: int | None = 1):
    flags = SimpleNamespace(**({"STRONGLY_TYPED": strongly_typed} if strongly_typed is not None else {}))
    return SimpleNamespace(__version__=version, NetworkDefinitionCreationFlag=flags)


def test_network_is_created_strongly_typed_on_10_and_11():
    assert network_flags(_fake_trt("10.7.0", 1)) == 1 << 1  # TensorRT 10: STRONGLY_TYPED = 1 (EXPLICIT_BATCH = 0)
    assert network_flags(_fake_trt("11.1.0", 0)) == 1 << 0  # 11: accepted (and ignored: always strongly typed)
    assert network_flags(_fake_trt("11.4.0", None)) == 0  # should a later 11.x drop the flag
    with pytest.raises(BackendUnavailable, match="no strongly typed"):
        network_flags(_fake_trt("10.0.0", None))
    with pytest.raises(BackendUnavailable, match=r"TensorRT 8\.6\.1 is installed.*10\.x and 11\.x"):
        network_flags(_fake_trt("8.6.1"))
    assert SUPPORTED_TENSORRT == (10, 11) and check_tensorrt_version("11.0.0.14") == 11
    with pytest.raises(BackendUnavailable, match="12.0"):
        check_tensorrt_version("12.0.0")


def test_qoperator_onnx_is_refused():
    info = OnnxInfo("x", [None, 3, 64, 64], ["y"], ops={"MatMulInteger", "Add"})
    with pytest.raises(VitedgeError, match="cannot parse MatMulInteger.*QDQ"):
        check_onnx_for_tensorrt(info)
    with pytest.raises(VitedgeError, match="dynamic channel"):
        check_onnx_for_tensorrt(OnnxInfo("x", [None, None, 64, 64], ["y"]))


# -- optimisation profiles --------------------------------------------------------------------
def test_profile_dynamic_batch_defaults():
    assert compute_profile(["batch", 3, 64, 64]) == {"min": (1, 3, 64, 64), "opt": (1, 3, 64, 64), "max": (32, 3, 64, 64)}
    assert compute_profile(["batch", 3, 64, 64], hint="throughput")["opt"] == (8, 3, 64, 64)
    assert compute_profile([None, 3, 224, 224], profile="2,4,16") == {"min": (2, 3, 224, 224), "opt": (4, 3, 224, 224), "max": (16, 3, 224, 224)}
    assert compute_profile(["N", 3, 8, 8], profile=(1, 1, 1))["max"] == (1, 3, 8, 8)


def test_profile_fixed_batch():
    assert set(compute_profile(["batch", 3, 64, 64], batch=4).values()) == {(4, 3, 64, 64)}
    assert set(compute_profile([2, 3, 64, 64]).values()) == {(2, 3, 64, 64)}
    with pytest.raises(ShapeMismatch):
        compute_profile([2, 3, 64, 64], batch=4)
    with pytest.raises(VitedgeError, match="conflicts with the fixed batch"):
        compute_profile(["batch", 3, 64, 64], batch=4, profile="1,4,8")


def test_profile_dynamic_resolution():
    p = compute_profile(["b", 3, "h", "w"], img_size="160,224,320", profile="1,2,8")
    assert p == {"min": (1, 3, 160, 160), "opt": (2, 3, 224, 224), "max": (8, 3, 320, 320)}
    assert set(compute_profile(["b", 3, "h", "w"], img_size=224, batch=1).values()) == {(1, 3, 224, 224)}
    with pytest.raises(VitedgeError, match="dynamic height.*--img-size"):
        compute_profile(["b", 3, "h", "w"])
    with pytest.raises(VitedgeError, match="fixed height of 64"):
        compute_profile(["b", 3, 64, 64], img_size=224)


@pytest.mark.parametrize("bad,match", [("4,2,1", "min <= opt <= max"), ("0,1,2", "min <= opt <= max"), ("a,b,c", "min,opt,max"),
                                       ("1,2", "1 or 3 numbers")])
def test_profile_bad_values(bad, match):
    with pytest.raises(VitedgeError, match=match):
        compute_profile(["batch", 3, 64, 64], profile=bad)


# -- engine portability -----------------------------------------------------------------------
BUILT = {"version": "10.7.0", "gpu": "NVIDIA A10", "compute_capability": "8.6", "hardware_compatibility": "none", "version_compatible": False}


def test_compat_same_platform_and_same_architecture():
    check_compat(BUILT, {"version": "10.7.0", "gpu": "NVIDIA A10", "compute_capability": "8.6"})
    check_compat(BUILT, {"version": "10.7.0", "gpu": "NVIDIA RTX A6000", "compute_capability": "8.6"})  # same SM: allowed


def test_compat_refuses_other_tensorrt_version():
    with pytest.raises(VitedgeError, match=r"built with TensorRT 10\.7\.0 but TensorRT 10\.8\.0 is installed.*rebuild") as ei:
        check_compat(BUILT, {"version": "10.8.0", "gpu": "NVIDIA A10", "compute_capability": "8.6"})
    assert "\n" not in str(ei.value)
    check_compat({**BUILT, "version_compatible": True}, {"version": "10.8.0", "gpu": "NVIDIA A10", "compute_capability": "8.6"})
    with pytest.raises(VitedgeError, match="TensorRT 10.7.0"):
        check_compat({**BUILT, "version_compatible": True}, {"version": "11.0.0", "gpu": "NVIDIA A10", "compute_capability": "8.6"})


def test_compat_refuses_other_gpu_architecture():
    with pytest.raises(VitedgeError, match=r"built for NVIDIA A10 \(compute capability 8\.6\) but this GPU is NVIDIA T4 \(compute capability 7\.5\)"):
        check_compat(BUILT, {"version": "10.7.0", "gpu": "NVIDIA T4", "compute_capability": "7.5"})
    check_compat({**BUILT, "hardware_compatibility": "ampere_plus"}, {"version": "10.7.0", "gpu": "NVIDIA L4", "compute_capability": "8.9"})
    with pytest.raises(VitedgeError, match="does not say which TensorRT version"):
        check_compat({}, {"version": "10.7.0"})


# -- the INT8 Q/DQ file: NVIDIA's placement, fidelity under ONNX Runtime -------------------------
def _qdq_structure(path: Path):
    g = onnx.load(str(path)).graph
    producer = {o: n for n in g.node for o in n.output}
    readers = Counter(i for n in g.node for i in n.input)
    q = [n for n in g.node if n.op_type == "QuantizeLinear"]
    dq_fed = {}
    for n in g.node:
        if n.op_type in ("MatMul", "Gemm", "Conv"):
            dq_fed[n.name] = [producer.get(i) is not None and producer[i].op_type == "DequantizeLinear" for i in n.input[:2]]
    return g, q, readers, dq_fed


def test_int8_qdq_224px_vit_meets_the_fidelity_target_in_onnxruntime(vit224):
    """The TensorRT INT8 file of a ViT at 224 px (197 tokens), run by ONNX Runtime (the same Q/DQ arithmetic
    TensorRT executes), against FP32 on held-out images: within the INT8 fidelity target. Random weights have
    no outlier channels: the check on a real pretrained ViT is benchmarks/fidelity.py's TensorRT section."""
    v = vit224.man.verification
    m = v["agreement"]
    assert v["engine"] == "onnxruntime" and v["images"] >= 8 and not v["random_inputs"] and m["finite"]
    target = Target()
    assert m["cosine_min"] >= target.cosine or m["top1_agreement"] >= target.agreement, m
    q = vit224.man.quantization
    assert q["method"] == "entropy"  # NVIDIA's default calibration for INT8 (the manifest says so)
    assert q["config"]["extra_options"]["DedicatedQDQPair"] is False
    # 12 blocks x 2; the head, and the last block's query, projection and MLP (exported for the CLS token only)
    assert len(q["float_by_placement"]["attention"]) == 24 and len(q["float_by_placement"]["gemv"]) == 5
    assert "compile --backend tensorrt" in v["note"]


def test_int8_qdq_structure_nvidia_placement(vit224):
    """One Q/DQ pair per tensor (no duplicates), Q/DQ only on matrix-op inputs, attention core in float, head GEMV in float."""
    g, q, readers, dq_fed = _qdq_structure(vit224.qdq)
    quantized = Counter(n.input[0] for n in q)
    assert quantized and max(quantized.values()) == 1, [t for t, c in quantized.items() if c > 1]  # one pair per tensor
    assert all(readers[n.output[0]] == 1 for n in q)  # each Q feeds exactly its DQ
    # weights: 12 blocks x (q, k, v, proj, fc1, fc2) + patch conv, less the last block's CLS-only GEMVs (q, proj, fc1, fc2)
    roles = vit224.man.quantization["float_by_placement"]
    for name in roles["attention"] + roles["gemv"]:
        assert dq_fed[name] == [False, False], name  # q·kᵀ, softmax·v and the head: float
    int8 = [n for n, fed in dq_fed.items() if all(fed)]
    assert len(int8) == 12 * 6 + 1 - 4 and all(n not in roles["attention"] + roles["gemv"] for n in int8)  # patch embed too
    heads = [n for n in g.node if n.op_type == "Gemm"]
    assert heads and {n.name for n in heads} <= set(roles["gemv"])  # the classifier on the CLS token: (N, 192) x (192, classes)
    # the LayerNorm output read by q, k and v goes through one shared pair
    ln = {n.output[0] for n in g.node if n.op_type == "LayerNormalization"}
    shared = [n for n in q if n.input[0] in ln]
    dq_of = {n.input[0]: n for n in g.node if n.op_type == "DequantizeLinear"}
    assert shared and max(readers[dq_of[n.output[0]].output[0]] for n in shared) >= 1
    dq_nodes = [n for n in g.node if n.op_type == "DequantizeLinear" and n.input[0] in {x.output[0] for x in q}]
    assert all(readers[n.output[0]] >= 1 for n in dq_nodes)
    for n in g.node:  # every reader of a DQ is a matrix op (TensorRT fuses the pair into its INT8 kernel)
        if any(i in {d.output[0] for d in dq_nodes} for i in n.input):
            assert n.op_type in ("MatMul", "Gemm", "Conv"), n.op_type


def test_int8_qdq_with_fp16_float_parts_for_a_strongly_typed_build(vit224, tmp_path):
    """What compile does with the INT8 file under --precision-hint f16 (the default): float parts FP16 with
    the overflow guard, Q/DQ scales FP16 (opset 19), LayerNorm/Softmax FP32; ONNX Runtime runs it."""
    import onnxruntime as ort

    out = tmp_path / "typed.onnx"
    rec = convert_for_tensorrt(vit224.qdq, out, vit224.man, qdq=True)
    assert rec["to"] == "fp16" and rec["opset"] == 19 and rec["overflow_guard"]["checked"]
    proto = onnx.load(str(out))
    assert next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) == 19
    inits = {i.name: i.data_type for i in proto.graph.initializer}
    dq = [n for n in proto.graph.node if n.op_type == "DequantizeLinear"]
    assert dq and all(inits.get(n.input[1]) == onnx.TensorProto.FLOAT16 for n in dq)  # FP16 scales: FP16 outputs
    ln = [n for n in proto.graph.node if n.op_type == "LayerNormalization"]
    assert ln and all(inits[n.input[1]] == onnx.TensorProto.FLOAT for n in ln)  # kept FP32
    x = vitedge.load(vit224.fp32).preprocessing.batch(sorted(Path(vitedge.data.SHIPPED_CALIBRATION).rglob("*.png"))[:4])
    ref = ort.InferenceSession(str(vit224.qdq), providers=["CPUExecutionProvider"]).run(None, {"pixel_values": x})[0]
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"pixel_values": x})[0]
    cos = (ref * got).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(got, axis=1)
    assert np.isfinite(got).all() and cos.min() > 0.99


def test_fp16_qdq_from_an_older_opset_is_converted_not_relabelled(tmp_path):
    """A QDQ file at opset 13 (ReduceMean with an ``axes`` attribute, which opset 18 moved to an input): FP16
    Q/DQ needs opset 19, so the file goes through ONNX's version converter instead of a relabelled opset."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)
    inits = [numpy_helper.from_array(np.round(w / 0.02).astype(np.int8), "w_q"), numpy_helper.from_array(np.float32(0.02), "w_s"),
             numpy_helper.from_array(np.int8(0), "zp"), numpy_helper.from_array(np.float32(0.05), "x_s")]
    nodes = [helper.make_node("ReduceMean", ["x"], ["m"], axes=[1], keepdims=1), helper.make_node("Sub", ["x", "m"], ["c"]),
             helper.make_node("QuantizeLinear", ["c", "x_s", "zp"], ["c_q"]), helper.make_node("DequantizeLinear", ["c_q", "x_s", "zp"], ["c_dq"]),
             helper.make_node("DequantizeLinear", ["w_q", "w_s", "zp"], ["w_dq"]), helper.make_node("MatMul", ["c_dq", "w_dq"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])], inits)
    src = tmp_path / "old.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]), src)
    out = tmp_path / "old.fp16.onnx"
    rec = convert_for_tensorrt(src, out, SimpleNamespace(preprocessing_obj=None), qdq=True)
    proto = onnx.load(str(out))
    assert rec["opset"] == 19 and next(o.version for o in proto.opset_import if o.domain == "") == 19
    assert len(next(n for n in proto.graph.node if n.op_type == "ReduceMean").input) == 2  # axes became an input
    x = np.random.default_rng(1).standard_normal((3, 8)).astype(np.float32)
    ref = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.allclose(got, ref, atol=0.05)


# -- FP16 for TensorRT: FP16 weights, guarded nodes FP32 ------------------------------------------
@pytest.fixture(scope="module")
def hot_onnx(tmp_path_factory):
    """A small ViT whose residual stream passes 65504 after block 0's MLP (FP16 overflows there)."""
    import torch

    from vitedge import VisionTransformer, export_onnx

    torch.manual_seed(0)
    m = VisionTransformer(img_size=32, patch_size=8, num_classes=7, d_model=64, num_heads=2, num_layers=3, d_ff=128, dropout=0.0).eval()
    with torch.no_grad():
        m.blocks[0].mlp.fc2.weight.mul_(1.2e6)
    out = tmp_path_factory.mktemp("hot") / "hot.onnx"
    export_onnx(m, out)
    return out


def _float_types(path: Path) -> tuple[dict, dict]:
    proto = onnx.shape_inference.infer_shapes(onnx.load(str(path)), check_type=True, strict_mode=True)
    g = proto.graph
    types = {v.name: v.type.tensor_type.elem_type for v in list(g.value_info) + list(g.input) + list(g.output)}
    types.update({i.name: i.data_type for i in g.initializer})
    return {n.name: n for n in g.node}, types


def test_fp16_file_for_tensorrt_has_fp16_weights_and_guarded_nodes_in_fp32(hot_onnx, calib_dir, tmp_path):
    from vitedge.quantization import quantize

    out, man = quantize(hot_onnx, tmp_path / "hot.trt.fp16.onnx", precision="fp16", backend="tensorrt", calib=calib_dir)
    guard = man.quantization["overflow_guard"]
    over = [k["node"] for k in guard["kept_fp32_for_overflow"]]
    assert guard["checked"] and over
    nodes, types = _float_types(out)
    F16, F32 = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT
    weights = [n for n in nodes.values() if n.op_type in ("MatMul", "Gemm") and n.input[1] in types and n.name not in over]
    assert weights and all(types[n.input[1]] == F16 for n in weights)  # FP16 weights: FP16 layers in the engine
    for name in over:  # the guard's nodes: FP32 in, FP32 out (a strongly typed build keeps them FP32)
        n = nodes[name]
        assert all(types.get(t) in (F32, None) for t in list(n.input) + list(n.output) if t and types.get(t) in (F16, F32)), name
    assert all(types[n.output[0]] == F32 for n in nodes.values() if n.op_type == "LayerNormalization")
    assert inspect_onnx(out).fp16_weights and typing_plan(inspect_onnx(out), None) == (None, "fp16", "fp16")
    assert man.verification["agreement"]["finite"]


def test_compile_time_fp16_conversion_is_guarded_too(hot_onnx, tmp_path):
    """compile --backend tensorrt of an FP32 file (default f16): the same guard, on the shipped check images."""
    man = Manifest.find(hot_onnx)[1]
    rec = convert_for_tensorrt(hot_onnx, tmp_path / "hot.fp16.onnx", man, qdq=False)
    assert rec["overflow_guard"]["checked"] and rec["overflow_guard"]["kept_fp32_for_overflow"]
    assert rec["overflow_guard"]["checked_on"] == "the shipped check images"


# -- fake TensorRT and CUDA: the build, the runtime and compile's verification without a GPU ------
class FakeCuda:
    """cuda-python's runtime API over host memory; records every call and the stream it was queued on."""

    class cudaMemcpyKind:
        cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost = 1, 2

    class Stream:
        def __init__(self, n):
            self.n = n

        def __int__(self):
            return self.n

    def __init__(self, fail: str | None = None):
        self.mem: dict[int, ctypes.Array] = {}
        self.calls: list[tuple] = []
        self.fail = fail
        self.streams = 0
        self.destroyed: list[int] = []

    def _ret(self, name, *values):
        self.calls.append((name,) + tuple(int(v) if isinstance(v, FakeCuda.Stream) else v for v in values[:0]))
        return ((SimpleNamespace(value=2, name="cudaErrorMemoryAllocation") if self.fail == name else 0),) + values

    def cudaGetErrorString(self, err):
        return 0, b"out of memory"

    def cudaStreamCreate(self):
        self.streams += 1
        return self._ret("cudaStreamCreate", FakeCuda.Stream(100 + self.streams))

    def cudaStreamDestroy(self, stream):
        self.destroyed.append(int(stream))
        return self._ret("cudaStreamDestroy")

    def cudaMalloc(self, n):
        buf = ctypes.create_string_buffer(n)
        self.mem[ctypes.addressof(buf)] = buf
        r = self._ret("cudaMalloc", ctypes.addressof(buf))
        self.calls[-1] = ("cudaMalloc", n)
        return r

    def cudaFree(self, ptr):
        self.mem.pop(ptr)
        return self._ret("cudaFree")

    def cudaMemcpyAsync(self, dst, src, n, kind, stream):
        ctypes.memmove(dst, src, n)
        r = self._ret("cudaMemcpyAsync")
        self.calls[-1] = ("H2D" if kind == 1 else "D2H", int(stream))
        return r

    def cudaStreamSynchronize(self, stream):
        r = self._ret("cudaStreamSynchronize")
        self.calls[-1] = ("sync", int(stream))
        return r


class FakeOrtGpu:
    """A fake ICudaEngine / IExecutionContext pair whose kernels are ONNX Runtime running ``onnx_path``."""

    def __init__(self, onnx_path: Path, cuda: FakeCuda, min_batch: int = 1, max_batch: int = 64):
        import onnxruntime as ort

        self.sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        self.inp = self.sess.get_inputs()[0]
        self.outs = [o.name for o in self.sess.get_outputs()]
        self.cuda, self.lo, self.hi = cuda, min_batch, max_batch
        self.shapes, self.addr, self.ran = {}, {}, []
        self.num_io_tensors = 1 + len(self.outs)
        self.out_cols = {o.name: o.shape[1:] for o in self.sess.get_outputs()}

    # ICudaEngine
    def get_tensor_name(self, i):
        return ([self.inp.name] + self.outs)[i]

    def get_tensor_mode(self, name):
        return 1 if name in self.outs else 0

    def get_tensor_dtype(self, name):
        return "float32"

    def create_execution_context(self):
        return self

    # IExecutionContext
    def set_input_shape(self, name, shape):
        if not self.lo <= shape[0] <= self.hi:
            return False
        self.shapes[name] = tuple(shape)
        return True

    def get_tensor_shape(self, name):
        return (self.shapes[self.inp.name][0], *self.out_cols[name])

    def set_tensor_address(self, name, ptr):
        self.addr[name] = ptr
        return True

    def execute_async_v3(self, stream):
        self.cuda.calls.append(("execute", int(stream)))
        shape = self.shapes[self.inp.name]
        x = np.frombuffer(ctypes.string_at(self.addr[self.inp.name], int(np.prod(shape)) * 4), np.float32).reshape(shape)
        self.ran.append(shape[0])
        for name, y in zip(self.outs, self.sess.run(self.outs, {self.inp.name: x})):
            y = np.ascontiguousarray(y, np.float32)
            ctypes.memmove(self.addr[name], y.ctypes.data, y.nbytes)
        return True


INSPECTOR_JSON = json.dumps({"Layers": [
    {"Name": "/patch_embed/proj/Conv + /patch_embed/Reshape", "LayerType": "CaskConvolution", "ParameterType": "Convolution",
     "Kernel": [16, 16], "Groups": 1,
     "Inputs": [{"Name": "pixel_values_q", "Location": "Device", "Dimensions": [-1, 3, 224, 224],
                 "Format/Datatype": "Four wide channel vectorized row major Int8 format"}],
     "Outputs": [{"Name": "tokens", "Location": "Device", "Dimensions": [-1, 192, 14, 14], "Format/Datatype": "Row major linear Int8 format"}]},
    {"Name": "{ForeignNode[/blocks.0/norm1/LayerNormalization.../blocks.11/mlp/fc2/MatMul]}", "LayerType": "Myelin",
     "Inputs": [{"Name": "tokens", "Dimensions": [-1, 197, 192], "Format/Datatype": "Half"}],
     "Outputs": [{"Name": "cls", "Dimensions": [-1, 192], "Format/Datatype": "Half"}]},
    {"Name": "/head/Gemm", "LayerType": "CaskGemmMatrixMultiply", "ParameterType": "MatrixMultiply", "MatrixOpA": "kNONE",
     "Inputs": [{"Name": "cls", "Dimensions": [-1, 192], "Format/Datatype": "Row major linear FP16 format"}],
     "Outputs": [{"Name": "logits", "Dimensions": [-1, 1000], "Format/Datatype": "Row major linear FP32 format"}]},
], "Bindings": ["pixel_values", "logits"]})


def test_engine_inspector_json_gives_per_layer_precisions():
    layers = parse_engine_information(INSPECTOR_JSON)
    assert [(l["type"], l["precision"]) for l in layers] == [("CaskConvolution", "int8"), ("Myelin", "fp16"), ("CaskGemmMatrixMultiply", "fp16")]
    assert layers[0]["macs"] == 192 * 14 * 14 * 3 * 16 * 16 and layers[2]["macs"] == 1000 * 192 and layers[1].get("fused")
    s = mac_summary(layers, "test")
    assert s["int8_mac_share"] == pytest.approx(layers[0]["macs"] / (layers[0]["macs"] + layers[2]["macs"]))
    assert s["layer_count"] == {"int8": 1, "fp16": 2} and "1 fused subgraphs" in s["source"]
    # TensorRT 11's schema (I/O Tensors instead of Bindings) and LAYER_NAMES_ONLY builds parse too
    assert parse_engine_information(json.dumps({"Layers": ["a", "b"], "I/O Tensors": [{"Name": "x"}]}))[1] == \
        {"name": "b", "type": "?", "precision": "?", "macs": 0}


def test_validation_shows_the_inspector_view_for_tensorrt(monkeypatch):
    from vitedge import validation

    monkeypatch.setitem(sys.modules, "tensorrt", SimpleNamespace(LayerInformationFormat=SimpleNamespace(JSON="json")))
    eng = object.__new__(TensorRTEngine)  # only the deserialized engine is needed: no GPU here
    eng._engine = SimpleNamespace(create_engine_inspector=lambda: SimpleNamespace(get_engine_information=lambda fmt: INSPECTOR_JSON))
    pb = validation.precision_breakdown(SimpleNamespace(engine=eng))
    assert pb["source"].startswith("tensorrt engine inspector") and pb["int8_mac_share"] > 0.9 and len(pb["layers"]) == 3


def _fake_trt_module(cuda: FakeCuda, *, version="10.7.0", parse_ok=True, seen=None, inspector_json=INSPECTOR_JSON):
    """Enough of the tensorrt module for build_engine and TensorRTEngine; no BuilderFlag at all."""
    seen = seen if seen is not None else {}

    class Parser:
        def __init__(self, network, logger):
            self.num_errors = 0 if parse_ok else 2

        def parse_from_file(self, path):
            seen["parsed"] = Path(path)
            return parse_ok

        def get_error(self, i):
            return [SimpleNamespace(desc=lambda: "Assertion failed: axis", node=lambda: 17, node_name=lambda: "/blocks.0/Split",
                                    node_operator=lambda: "Split"),
                    SimpleNamespace(desc=lambda: "unsupported opset 30", node=lambda: -1)][i]

    class Config:
        def __init__(self):
            self.profiling_verbosity = None
            self.cache = None

        def set_memory_pool_limit(self, pool, size):
            seen["workspace"] = size

        def add_optimization_profile(self, prof):
            seen["profile"] = prof.shape
            return 0

        def create_timing_cache(self, data):
            return SimpleNamespace(combine=lambda other, ignore: False, serialize=lambda: b"cache-" + version.encode(), data=data)

        def set_timing_cache(self, cache, ignore_mismatch):
            self.cache = cache
            return True

        def get_timing_cache(self):
            return self.cache

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            seen["network_flags"] = flags
            return SimpleNamespace()

        def create_builder_config(self):
            seen["config"] = Config()
            return seen["config"]

        def create_optimization_profile(self):
            prof = SimpleNamespace(shape=None)
            prof.set_shape = lambda name, lo, opt, hi: setattr(prof, "shape", (name, lo, opt, hi))
            return prof

        def build_serialized_network(self, network, config):
            seen["verbosity"] = config.profiling_verbosity
            return b"ENGINE:" + str(seen["parsed"]).encode()

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            path = Path(bytes(data).decode().split(":", 1)[1])
            lo, hi = (seen["profile"][1][0], seen["profile"][3][0]) if "profile" in seen else (1, 64)
            eng = FakeOrtGpu(path if path.exists() else seen["kept"], cuda, lo, hi)
            seen["engine"] = eng
            eng.create_engine_inspector = lambda: SimpleNamespace(get_engine_information=lambda fmt: inspector_json)
            return eng

    return SimpleNamespace(
        __version__=version, Logger=type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None}),
        Builder=Builder, OnnxParser=Parser, Runtime=Runtime,
        NetworkDefinitionCreationFlag=SimpleNamespace(STRONGLY_TYPED=1) if version.startswith("10") else SimpleNamespace(STRONGLY_TYPED=0),
        MemoryPoolType=SimpleNamespace(WORKSPACE="workspace"), ProfilingVerbosity=SimpleNamespace(DETAILED="detailed"),
        LayerInformationFormat=SimpleNamespace(JSON="json"), TensorIOMode=SimpleNamespace(INPUT=0, OUTPUT=1),
        nptype=lambda dt: np.float32,
    ), seen


@pytest.fixture
def fake_gpu(monkeypatch):
    """Install fake tensorrt + cuda-python: a "GPU" that is ONNX Runtime running the ONNX the parser was given."""
    cuda = FakeCuda()

    def install(**kw):
        trt, seen = _fake_trt_module(cuda, **kw)
        monkeypatch.setitem(sys.modules, "tensorrt", trt)
        monkeypatch.setattr(trtmod, "_cudart", lambda: cuda)
        monkeypatch.setattr(trtmod, "tensorrt_status", lambda: None)
        monkeypatch.setattr(trtmod, "gpu_info", lambda: {"name": "Fake GPU", "compute_capability": "8.7"})
        return trt, seen

    install.cuda = cuda
    return install


def _keep_scratch_onnx(monkeypatch, seen, folder: Path):
    """The ONNX the parser saw lives in compile's scratch folder: keep a copy for the fake engine."""
    real = trtmod.attach_timing_cache

    def spy(config, path):
        src = seen["parsed"]
        seen["kept"] = folder / ("kept." + src.name)
        shutil.copyfile(src, seen["kept"])
        return real(config, path)

    monkeypatch.setattr(trtmod, "attach_timing_cache", spy)


@pytest.mark.parametrize("which", ["fp32", "int8"])
def test_compile_builds_strongly_typed_and_verifies_like_every_backend(fake_gpu, monkeypatch, ref_onnx, qdq_onnx, tmp_path, which):
    """compile --backend tensorrt end to end against fake TensorRT/CUDA: a strongly typed network parsed from an ONNX
    with FP16 types (FP32 file: converted with the guard; INT8: Q/DQ with FP16 float parts), no builder flags,
    DETAILED profiling, the engine inspector's precisions in the manifest, and compile's verification of the
    engine against the ONNX on random and real inputs (TensorRTEngine: buffers, stream, profile padding)."""
    trt, seen = fake_gpu(version="11.1.0")
    _keep_scratch_onnx(monkeypatch, seen, tmp_path)
    src = ref_onnx if which == "fp32" else qdq_onnx
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"written by TensorRT 10.3")  # another version: ignored with a warning, rebuilt
    path, man = compile_model(src, tmp_path / "e.engine", target="tensorrt", batch="dynamic", profile="2,4,8", timing_cache=cache)
    assert seen["network_flags"] == 1 << 0 and seen["verbosity"] == "detailed"
    typed = onnx.load(str(seen["kept"]))
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in typed.graph.initializer)  # the types carry the precision
    assert seen["parsed"].name == "tensorrt_input.fp16.onnx"
    c = man.compile
    assert c["strongly_typed"] and c["flags"] == [] and c["float_precision"] == "fp16" and c["typing"]["overflow_guard"]["checked"]
    assert man.precision == ("fp16" if which == "fp32" else "int8")
    assert c["profile"]["min"][0] == 2 and c["profile"]["max"][0] == 8 and c["layer_precisions"]["layer_count"]["int8"] == 1
    assert c["timing_cache_reused"] is False and cache.read_bytes() == b"cache-11.1.0"
    checks = man.verification["checks"]
    assert set(checks) == {"random", "images"} and all(r["cosine_min"] > 0.99 for r in checks.values())
    assert checks["random"]["batch"] == 3  # 3 images: within the profile (2..8)
    ran = seen["engine"].ran
    assert ran and min(ran) >= 2 and max(ran) <= 8  # every run inside the profile (8 check images: one run of 8)
    assert not trtmod.__dict__.get("BuilderFlag")


def test_runtime_pads_under_the_profile_minimum_and_reuses_buffers_on_one_stream(fake_gpu, ref_onnx, tmp_path):
    import onnxruntime as ort

    trt, seen = fake_gpu()
    cuda = fake_gpu.cuda
    gpu = FakeOrtGpu(ref_onnx, cuda, min_batch=2, max_batch=4)
    eng = TensorRTEngine.__new__(TensorRTEngine)
    Engine.__init__(eng, tmp_path / "m.engine", SimpleNamespace(compile={"profile": {"min": [2, 3, 64, 64], "max": [4, 3, 64, 64]}}))
    eng._engine, eng._contexts, eng._input, eng._buffers = gpu, [gpu], "pixel_values", _Buffers(cuda)
    x = np.random.default_rng(0).standard_normal((11, 3, 64, 64)).astype(np.float32)
    ref = ort.InferenceSession(str(ref_onnx), providers=["CPUExecutionProvider"]).run(None, {"pixel_values": x})[0]
    got = eng._run(x)["logits"]  # 4 + 4 + 3: within the profile
    assert gpu.ran == [4, 4, 3] and np.allclose(got, ref, atol=1e-4)
    one = eng._run(x[:1])["logits"]  # 1 image < min 2: padded to 2, cut back to 1
    assert gpu.ran[-1] == 2 and one.shape == (1, 10) and np.allclose(one, ref[:1], atol=1e-4)
    tail = eng._run(x[:9])["logits"]  # 4 + 4 + 1 -> the last chunk padded to 2
    assert gpu.ran[-3:] == [4, 4, 2] and np.allclose(tail, ref[:9], atol=1e-4)
    mallocs = [c for c in cuda.calls if c[0] == "cudaMalloc"]
    assert len(mallocs) == 2  # input and output allocated once (at batch 4), reused for every smaller batch
    stream = int(eng._buffers.stream)
    queued = [c for c in cuda.calls if c[0] in ("H2D", "execute", "D2H", "sync")]
    assert {c[1] for c in queued} == {stream}  # copies, execution and the wait: all on the engine's stream
    assert [c[0] for c in queued[:4]] == ["H2D", "execute", "D2H", "sync"]
    eng.close()
    assert cuda.destroyed == [stream] and cuda.mem == {}  # stream destroyed, buffers freed on close
    with pytest.raises(VitedgeError, match="closed"):
        eng.infer_all(x[:2])


def test_cuda_errors_are_checked(fake_gpu):
    cuda = fake_gpu.cuda
    assert cuda_check((0, 5), "x", cuda) == 5 and cuda_check((0,), "x", cuda) is None and cuda_check((0, 1, 2), "x", cuda) == (1, 2)
    cuda.fail = "cudaMalloc"
    buf = _Buffers(cuda)
    with pytest.raises(VitedgeError, match=r"CUDA error in cudaMalloc\(.*cudaErrorMemoryAllocation \(out of memory\)") as ei:
        buf._buffer("x", 1024)
    assert "\n" not in str(ei.value)
    cuda.fail = "cudaStreamDestroy"
    with pytest.raises(VitedgeError, match="cudaStreamDestroy"):
        buf.close()
    assert buf.stream is None
    buf.close()  # idempotent


def test_parser_errors_are_all_listed_with_their_node(fake_gpu, ref_onnx, tmp_path):
    fake_gpu(parse_ok=False)
    with pytest.raises(VitedgeError) as ei:
        compile_model(ref_onnx, tmp_path / "e.engine", target="tensorrt", precision_hint="f32")
    msg = str(ei.value)
    assert "rejected ref.onnx (2 errors)" in msg and "node 17 /blocks.0/Split (Split): Assertion failed: axis" in msg
    assert "graph: unsupported opset 30" in msg and "\n" not in msg
    parser = SimpleNamespace(num_errors=1, get_error=lambda i: SimpleNamespace(desc=lambda: "bad", node=lambda: 3))
    assert parser_errors(parser) == ["node 3: bad"]


def test_timing_cache_reuse_foreign_and_refused(tmp_path, capsys):
    class Cache:
        def __init__(self, data):
            self.data = data

        def combine(self, other, ignore_mismatch):
            assert ignore_mismatch is False
            return other.data == b"ours"

    class Config:
        accept = True

        def create_timing_cache(self, data):
            if data == b"damaged":
                raise RuntimeError("bad magic")
            return Cache(data)

        def set_timing_cache(self, cache, ignore_mismatch):
            return self.accept

    f = tmp_path / "t.cache"
    assert attach_timing_cache(Config(), None) is False
    f.write_bytes(b"ours")
    assert attach_timing_cache(Config(), f) is True
    for data in (b"theirs", b"damaged"):
        f.write_bytes(data)
        assert attach_timing_cache(Config(), f) is False
        assert "from another TensorRT version or GPU (or damaged): ignored and rebuilt" in capsys.readouterr().err
    cfg = Config()
    cfg.accept = False
    with pytest.raises(VitedgeError, match="refused the timing cache"):
        attach_timing_cache(cfg, f)


def test_profile_chunks():
    assert profile_chunks(11, 2, 4) == [(0, 4, 4), (4, 8, 4), (8, 11, 3)]
    assert profile_chunks(9, 2, 4) == [(0, 4, 4), (4, 8, 4), (8, 9, 2)]
    assert profile_chunks(1, 4, 4) == [(0, 1, 4)]
    assert profile_chunks(3, 1, 32) == [(0, 3, 3)]


# -- error paths on a machine without TensorRT -------------------------------------------------
@without_trt
def test_compile_says_what_is_missing_and_what_to_install(ref_onnx, tmp_path):
    with pytest.raises(BackendUnavailable) as ei:
        compile_model(ref_onnx, tmp_path / "e.engine", target="tensorrt")
    msg = str(ei.value)
    assert REASON in msg and "NVIDIA GPU" in msg and 'pip install "vitedge[tensorrt]"' in msg and "\n" not in msg
    assert list(tmp_path.iterdir()) == []


@without_trt
def test_cli_compile_tensorrt_unavailable(ref_onnx, tmp_path):
    res = CliRunner().invoke(cli, ["compile", str(ref_onnx), "--backend", "tensorrt", "-o", str(tmp_path / "e.engine")])
    assert res.exit_code == 2
    assert res.stderr.startswith("error:") and "TensorRT is not installed" in res.stderr and "NVIDIA GPU" in res.stderr
    assert list(tmp_path.iterdir()) == []


def test_input_mistakes_are_reported_before_tensorrt_is_needed(ref_onnx, tmp_path):
    ov_xml, _ = compile_model(ref_onnx, tmp_path / "m.xml", target="openvino", verify=False)
    cases = [
        (dict(model=ov_xml), "TensorRT builds from ONNX"),
        (dict(profile="8,4,2", batch="dynamic"), "min <= opt <= max"),
        (dict(workspace_mb=4), "too small"),
        (dict(export_blob=True), "--blob is an option of openvino, not tensorrt"),
        (dict(output=tmp_path / "e.onnx"), "must end in .engine"),
    ]
    for kw, match in cases:
        kw = {"model": ref_onnx, "output": tmp_path / "e.engine", **kw}
        with pytest.raises(VitedgeError, match=match) as ei:
            compile_model(kw.pop("model"), kw.pop("output"), target="tensorrt", **kw)
        assert not isinstance(ei.value, BackendUnavailable)
    assert not (tmp_path / "e.engine").exists()


def _fake_engine_files(tmp_path, ref_onnx, record):
    eng = tmp_path / "m.engine"
    eng.write_bytes(b"not a real engine")
    man = Manifest.load(Manifest.sidecar_path(ref_onnx)).derive(eng.name, "tensorrt", backend="tensorrt")
    man.compile = {"target": "tensorrt", **({"tensorrt": record} if record else {})}
    man.save(eng)
    return eng


@without_trt
def test_loading_an_engine_without_tensorrt(tmp_path, ref_onnx):
    eng = _fake_engine_files(tmp_path, ref_onnx, BUILT)
    with pytest.raises(BackendUnavailable, match='TensorRT is not installed.*pip install "vitedge\\[tensorrt\\]"'):
        vitedge.load(eng)


def test_loading_an_engine_without_build_record(tmp_path, ref_onnx):
    eng = _fake_engine_files(tmp_path, ref_onnx, None)
    with pytest.raises(VitedgeError, match="no TensorRT build record"):
        vitedge.load(eng)


def test_engine_without_manifest(tmp_path):
    (tmp_path / "x.engine").write_bytes(b"\x00" * 64)
    with pytest.raises(VitedgeError, match="no vitedge manifest"):
        vitedge.load(tmp_path / "x.engine")


# -- the real thing (NVIDIA GPU + TensorRT only) -----------------------------------------------
@needs_trt
@pytest.mark.tensorrt
@pytest.mark.parametrize("which", ["fp32", "fp16", "int8"])
def test_gpu_build_run_inspect_and_compare_top1_with_onnxruntime(tmp_path, ref_onnx, qdq_onnx, val_dir, which):
    """On a machine with TensorRT 10/11, cuda-python and an NVIDIA GPU: build strongly typed, run, read the
    engine inspector, compare top-1 with ONNX Runtime on the labelled images, refuse another platform.
    Never run yet: there is no GPU where this was written (docs/tensorrt.md)."""
    src = qdq_onnx if which == "int8" else ref_onnx
    cache = tmp_path / "timing.cache"
    hint = "f32" if which == "fp32" else None
    path, man = compile_model(src, tmp_path / "e.engine", target="tensorrt", batch="dynamic", profile="2,4,16", timing_cache=cache,
                              precision_hint=hint)
    rec, c = man.compile["tensorrt"], man.compile
    assert rec["version"] and rec["gpu"] and rec["compute_capability"] and cache.exists()
    assert c["strongly_typed"] and c["flags"] == [] and c["profile"]["min"][0] == 2 and c["profile"]["max"][0] == 16
    assert man.precision == which and all(r["cosine_min"] > 0.99 for r in man.verification["checks"].values())
    images = [p for c in range(10) for p in sorted((val_dir / str(c)).iterdir())[:3]]
    with vitedge.load(src, backend="onnxruntime") as ref, vitedge.load(path) as eng:
        x = ref.preprocessing.batch(images)
        assert (eng.infer(x).argmax(1) == ref.infer(x).argmax(1)).mean() >= 0.95
        assert eng.infer(x[:1]).shape == (1, 10)  # under the profile's minimum: padded
        assert eng.infer(np.concatenate([x, x[:3]])).shape == (33, 10)  # beyond its maximum: chunked, last chunk padded
        pb = eng.precision_breakdown()
    assert pb["layers"] and all(l["precision"] != "?" for l in pb["layers"])
    if which == "int8":
        assert pb["layer_count"].get("int8"), pb["layer_count"]
    side = Manifest.sidecar_path(path)
    data = json.loads(side.read_text())
    data["compile"]["tensorrt"]["compute_capability"] = "1.0"
    side.write_text(json.dumps(data))
    with pytest.raises(VitedgeError, match="compute capability 1.0"):
        vitedge.load(path)
    shutil.rmtree(tmp_path)
