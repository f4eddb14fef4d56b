"""TensorRT backend: serialized engines for NVIDIA GPUs, built strongly typed (TensorRT 10 and 11).

Building (``vitedge compile --backend tensorrt``) uses the ``tensorrt`` Python API: the ONNX is parsed with
``OnnxParser`` into a **strongly typed** network (``NetworkDefinitionCreationFlag.STRONGLY_TYPED``;
TensorRT 11 makes every network strongly typed and removed ``BuilderFlag.FP16``/``INT8``, which on
TensorRT 10 are deprecated and weakly typed, free to ignore the FP32 nodes an FP16 overflow guard
kept).  Precision therefore comes from the ONNX file's types, never from builder flags:

* FP32 ONNX: ``precision_hint`` f16 (the default) converts it to FP16 first with vitedge's FP16
  conversion and its overflow guard (:func:`vitedge.quantization.fp16.convert_onnx_fp16`, checked
  on the shipped check images), so the nodes the guard keeps in FP32 stay FP32 in the engine;
  f32 builds it as it is (TensorRT may use TF32 for it); bf16 is refused (vitedge writes no BF16 ONNX).
* FP16 ONNX (``vitedge quantize --fp16 --backend tensorrt``): built as typed.
* INT8 QDQ ONNX (``vitedge quantize --backend tensorrt``): explicit quantization from its Q/DQ
  nodes; with f16 (default) its float parts go to FP16 first with the same guard (Q/DQ scales in
  FP16, ONNX opset 19), with f32 they stay FP32.

One optimisation profile (min/opt/max batch, and resolution when the ONNX has dynamic height/width),
a workspace memory-pool limit, a timing cache file (one written by another TensorRT version or GPU
is ignored with a warning and rebuilt), ``ProfilingVerbosity.DETAILED`` so that the engine inspector
reports every layer's precision (:func:`engine_layers`), and the engine is serialized to
``.engine``.  Every parser error is listed with its node.  The TensorRT version and the GPU (name,
compute capability) go into the manifest; :func:`check_compat` refuses to load an engine on another
TensorRT version or GPU architecture, because TensorRT engines are not portable.

TensorRT is an optional extra (``pip install "vitedge[tensorrt]"``: ``tensorrt`` and ``cuda-python``)
that needs an NVIDIA GPU with its driver; supported versions: :data:`SUPPORTED_TENSORRT`.  Where it
is missing, every entry point raises :class:`BackendUnavailable` saying so.  The pure functions here
(:func:`compute_profile`, :func:`inspect_onnx`, :func:`check_compat`, :func:`typing_plan`,
:func:`network_flags`, :func:`profile_chunks`, :func:`parse_engine_information`) run anywhere and
are tested without a GPU.

Running goes through ``cuda-python`` only: one CUDA stream per engine; device buffers allocated once
per tensor and reused while they are large enough; the host-to-device copies, ``execute_async_v3``
and the device-to-host copies are all queued on that stream, then one synchronisation; every CUDA
call's error code is checked (:func:`cuda_check`); the buffers are freed and the stream destroyed on
close.  A batch outside the profile is run in chunks, the last one padded up to the profile's minimum.

This module is written against NVIDIA's documented TensorRT 10.x / 11.x Python API and has not been
run on a GPU; see docs/tensorrt.md for what was checked against which documentation.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .._io import save_onnx
from .._onnx import QDQ_OPS
from ..data import default_check_images
from ..errors import (
    BackendUnavailable,
    FileProblem,
    ModelNotSupported,
    ShapeMismatch,
    VitedgeError,
    first_line,
)
from ..manifest import Manifest
from ..quantization.fp16 import FP16_KEEP_FLOAT, convert_onnx_fp16
from ..ui import note
from .base import Engine, mac_summary, pad_batch
from .registry import Backend, register

log = logging.getLogger("vitedge")

INSTALL_HINT = 'install it with: pip install "vitedge[tensorrt]" on a machine with an NVIDIA GPU and its CUDA driver'
DEFAULT_MAX_BATCH = 32
# TensorRT major versions this module is written for (10: strongly typed opt-in; 11: always strongly typed)
SUPPORTED_TENSORRT = (10, 11)
QDQ_FP16_OPSET = 19  # QuantizeLinear/DequantizeLinear take FP16 inputs and scales from ONNX opset 19

# ONNX ops the reference ViT export uses that TensorRT 10's ONNX parser supports (opset <= 20)
TRT_SUPPORTED_OPS = {
    "Add",
    "Cast",
    "Concat",
    "Constant",
    "ConstantOfShape",
    "Conv",
    "Div",
    "Equal",
    "Erf",
    "Expand",
    "Flatten",
    "Gather",
    "Gelu",
    "Gemm",
    "Identity",
    "LayerNormalization",
    "MatMul",
    "Mul",
    "Pow",
    "ReduceMean",
    "Relu",
    "Reshape",
    "Shape",
    "Sigmoid",
    "Slice",
    "Softmax",
    "Split",
    "Sqrt",
    "Squeeze",
    "Sub",
    "Tanh",
    "Transpose",
    "Unsqueeze",
    "Where",
    "QuantizeLinear",
    "DequantizeLinear",
    "Range",
    "Tile",
    "ReduceSum",
    "ReduceMax",
    "Neg",
    "Exp",
    "Clip",
    "Less",
    "Greater",
    "Not",
    "And",
    "Or",
    "Max",
    "Min",
    "Abs",
    "Einsum",
    "BatchNormalization",
    "GlobalAveragePool",
    "Pad",
    "ScaledDotProductAttention",
}
_UNSUPPORTED_HINT = {
    "MatMulInteger": "ONNX Runtime's QOperator format; quantize with QDQ format for TensorRT",
    "QLinearMatMul": "ONNX Runtime's QOperator format; quantize with QDQ format for TensorRT",
    "DynamicQuantizeLinear": "dynamic quantization; TensorRT needs static QDQ (vitedge quantize --backend tensorrt)",
}


# -- availability -------------------------------------------------------------------------------
def tensorrt_status() -> str | None:
    """None when TensorRT can build/run here, else the reason it cannot (one line)."""
    if importlib.util.find_spec("tensorrt") is None:
        return "TensorRT is not installed (no Python module 'tensorrt')"
    if _cudart() is None:
        return "cuda-python is not installed (vitedge reaches the GPU through it)"
    gpu = gpu_info()
    if gpu is None:
        return "no NVIDIA GPU is visible (CUDA reports no device)"
    return None


def require_tensorrt():
    """The ``tensorrt`` module, after checking that it, cuda-python and a GPU are here and the version is supported."""
    reason = tensorrt_status()
    if reason:
        raise BackendUnavailable(f"{reason}: TensorRT engines need TensorRT and an NVIDIA GPU", INSTALL_HINT)
    import tensorrt as trt

    check_tensorrt_version(trt.__version__)
    return trt


def check_tensorrt_version(version: str) -> int:
    """The major version, or BackendUnavailable when it is not one of :data:`SUPPORTED_TENSORRT`."""
    major = (_major_minor(str(version)) or (0,))[0]
    if major not in SUPPORTED_TENSORRT:
        supported = " and ".join(f"{m}.x" for m in SUPPORTED_TENSORRT)
        raise BackendUnavailable(
            f"TensorRT {version} is installed, but vitedge builds and runs engines with TensorRT {supported}",
            'pip install "tensorrt>=10,<12"; on Jetson, use a JetPack whose TensorRT is 10.x',
        )
    return major


def _cudart():
    """cuda-python's runtime API (``cuda.bindings.runtime`` from cuda-python 12.6, ``cuda.cudart`` before), or None."""
    try:
        if importlib.util.find_spec("cuda") is None:
            return None
    except (ImportError, ValueError):
        return None
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError:
            return None
    return cudart


def cuda_check(result, what: str, cudart=None):
    """Check a cuda-python call's error code and return its value(s).

    cuda-python calls return ``(error, *values)``; anything but ``cudaSuccess`` (0) raises a
    VitedgeError naming the call and CUDA's error name and description."""
    parts: tuple[Any, ...] = result if isinstance(result, tuple) else (result,)
    err, *values = parts
    code = int(getattr(err, "value", err))
    if code != 0:
        name, desc = getattr(err, "name", f"error {code}"), ""
        cu = cudart if cudart is not None else _cudart()
        try:
            _, text = cu.cudaGetErrorString(err)
            desc = text.decode(errors="replace") if isinstance(text, bytes) else str(text)
        except Exception:  # no description: the name is enough
            pass
        raise VitedgeError(
            f"CUDA error in {what}: {name}" + (f" ({desc})" if desc else ""), "check the GPU and its driver (nvidia-smi), and that the GPU has free memory"
        )
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def gpu_info() -> dict | None:
    """Name and compute capability of CUDA device 0 (through cuda-python), or None when there is none."""
    cu = _cudart()
    if cu is None:
        return None
    try:
        if not cuda_check(cu.cudaGetDeviceCount(), "cudaGetDeviceCount", cu):
            return None
        props = cuda_check(cu.cudaGetDeviceProperties(0), "cudaGetDeviceProperties", cu)
    except Exception:  # no driver / no device
        return None
    name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
    return {"name": name.strip("\x00").strip(), "compute_capability": f"{props.major}.{props.minor}"}


# -- pure helpers (tested without a GPU) --------------------------------------------------------
@dataclass
class OnnxInfo:
    input_name: str
    shape: list  # ints, or names/None for dynamic dims
    output_names: list[str]
    ops: set[str] = field(default_factory=set)
    has_qdq: bool = False
    fp16_weights: bool = False
    opset: int | None = None

    @property
    def dynamic_axes(self) -> list[int]:
        return [i for i, d in enumerate(self.shape) if not (isinstance(d, int) and d > 0)]


def inspect_onnx(path: Path) -> OnnxInfo:
    """What TensorRT will be given: input shape and dynamic axes, ops, quantization, precision."""
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # DecodeError and friends
        raise FileProblem(f"{path} is not a readable ONNX file ({type(exc).__name__})", "re-export it with vitedge export") from None
    inits = {i.name for i in proto.graph.initializer}
    inputs = [v for v in proto.graph.input if v.name not in inits]
    if len(inputs) != 1:
        raise VitedgeError(f"{path.name} has {len(inputs)} inputs; vitedge engines take one image tensor")
    dims = [d.dim_value if d.dim_value else (d.dim_param or None) for d in inputs[0].type.tensor_type.shape.dim]
    ops = {n.op_type for n in proto.graph.node}
    return OnnxInfo(
        input_name=inputs[0].name,
        shape=dims,
        output_names=[o.name for o in proto.graph.output],
        ops=ops,
        has_qdq=bool(ops & QDQ_OPS),
        fp16_weights=any(t.data_type == onnx.TensorProto.FLOAT16 for t in proto.graph.initializer),
        opset=next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None),
    )


def check_onnx_for_tensorrt(info: OnnxInfo) -> None:
    """Refuse ONNX that TensorRT's parser cannot take, naming the op and what to do instead."""
    if len(info.shape) != 4:
        raise ShapeMismatch(f"input {info.input_name} has shape {info.shape}, not (N, C, H, W)")
    if not (isinstance(info.shape[1], int) and info.shape[1] > 0):
        raise VitedgeError(f"input {info.input_name} has a dynamic channel dimension", "re-export with a fixed channel count")
    bad = sorted(op for op in info.ops if op in _UNSUPPORTED_HINT)
    if bad:
        raise ModelNotSupported(f"TensorRT cannot parse {bad[0]} nodes", _UNSUPPORTED_HINT[bad[0]])
    unknown = sorted(info.ops - TRT_SUPPORTED_OPS)
    if unknown:
        log.warning("ops not in vitedge's TensorRT list (the parser decides): %s", ", ".join(unknown))


def _parse_triple(value, what: str) -> tuple[int, int, int]:
    if isinstance(value, str):
        try:
            parts = [int(v) for v in value.replace(" ", "").split(",") if v]
        except ValueError:
            raise VitedgeError(f"{what} {value!r} is not 'min,opt,max' integers", "e.g. --profile 1,8,32") from None
    elif isinstance(value, int):
        parts = [value]
    else:
        parts = [int(v) for v in value]
    if len(parts) == 1:
        parts = parts * 3
    if len(parts) != 3:
        raise VitedgeError(f"{what} {value!r} needs 1 or 3 numbers (min,opt,max)", "e.g. --profile 1,8,32")
    lo, opt, hi = parts
    if not 1 <= lo <= opt <= hi:
        raise VitedgeError(f"{what} {lo},{opt},{hi} must satisfy 1 <= min <= opt <= max", "e.g. --profile 1,8,32")
    return lo, opt, hi


def compute_profile(
    shape: list, *, batch: int | None = None, profile=None, hint: str = "latency", img_size=None, max_batch: int = DEFAULT_MAX_BATCH
) -> dict[str, tuple[int, ...]]:
    """Optimisation-profile shapes ``{"min", "opt", "max"}`` for an (N, C, H, W) input.

    * fixed ``batch`` (or a static batch in the ONNX): min = opt = max = that batch;
    * dynamic batch: ``profile`` gives ``min,opt,max`` batch sizes; default 1, (1 for latency,
      8 for throughput), ``max_batch``;
    * dynamic height/width: ``img_size`` (one size, or ``min,opt,max``) - required then, because a
      ViT's position embeddings fix the resolution it was trained for.
    """
    if len(shape) != 4:
        raise ShapeMismatch(f"input shape {shape} is not (N, C, H, W)")
    n, c, h, w = shape
    static_n = n if isinstance(n, int) and n > 0 else None
    if static_n is not None and batch is not None and batch != static_n:
        raise ShapeMismatch(f"the ONNX has a fixed batch of {static_n}, not {batch}", f"use --batch {static_n} or re-export with --batch dynamic")
    fixed = batch or static_n
    if fixed is not None:
        if profile is not None and _parse_triple(profile, "profile") != (fixed,) * 3:
            raise VitedgeError(f"--profile {profile} conflicts with the fixed batch {fixed}", "use --batch dynamic with --profile")
        b = (fixed, fixed, fixed)
    elif profile is not None:
        b = _parse_triple(profile, "profile")
    else:
        opt = 1 if hint == "latency" else min(8, max_batch)
        b = (1, opt, max_batch)
    if not (isinstance(c, int) and c > 0):
        raise VitedgeError("the channel dimension is dynamic", "re-export with a fixed channel count")
    spatial = []
    for name, d in (("height", h), ("width", w)):
        if isinstance(d, int) and d > 0:
            if img_size is not None and _parse_triple(img_size, "img_size") != (d, d, d):
                raise ShapeMismatch(f"the ONNX has a fixed {name} of {d}, not {img_size}", "re-export the model at that size (vitedge export --img-size)")
            spatial.append((d, d, d))
        else:
            if img_size is None:
                raise VitedgeError(f"the ONNX has a dynamic {name}", "give --img-size SIZE or MIN,OPT,MAX for the profile")
            spatial.append(_parse_triple(img_size, "img_size"))
    return {k: (b[i], c, spatial[0][i], spatial[1][i]) for i, k in enumerate(("min", "opt", "max"))}


def size_profile(man: Manifest, img_size=None):
    """The height/width range of the optimisation profile: ``img_size`` as given (one size or ``min,opt,max``),
    and for a dynamic-size artifact (``vitedge export --dynamic-size``) by default its bounds around its size,
    ``(min, size, max)``; sizes outside the artifact's bounds are refused here, before any build."""
    sizes = man.dynamic_size
    if sizes is None:
        return img_size
    if img_size is None:
        target = min(man.preprocessing_obj.img_size)
        return (sizes.min, target, sizes.max)
    triple = _parse_triple(img_size, "img_size")
    for side in triple:
        sizes.check(side, side)
    return triple


def typing_plan(info: OnnxInfo, precision_hint: str | None) -> tuple[str | None, str, str]:
    """How a strongly typed build gets its precision: ``(conversion, precision, float_precision)``.

    ``conversion`` is None (build the ONNX as typed) or ``"fp16"`` (convert its float parts to FP16
    with the overflow guard first); ``precision`` is the engine's for the manifest (``int8`` for a
    QDQ ONNX); ``float_precision`` that of the layers left in float.  No builder precision flags are
    ever set: TensorRT 11 has none, and on 10 they would make the build weakly typed.
    """
    hint = precision_hint or "f16"
    if hint == "bf16":
        raise VitedgeError(
            "TensorRT builds here are strongly typed: BF16 would need an ONNX with BF16 types, which vitedge does not write",
            "use --precision-hint f16 (the default) or f32",
        )
    if hint not in ("f16", "f32"):
        raise VitedgeError(f"precision hint {hint!r} is not f16 or f32 for TensorRT")
    if info.fp16_weights:  # already typed FP16 (an FP16 file, or a QDQ file whose float parts are FP16)
        if hint == "f32" and precision_hint:
            log.warning(
                "the ONNX carries FP16 types: a strongly typed build keeps them, whatever --precision-hint says (compile the FP32 export for an FP32 engine)"
            )
        return None, "int8" if info.has_qdq else "fp16", "fp16"
    if hint == "f16":
        return "fp16", "int8" if info.has_qdq else "fp16", "fp16"
    return None, "int8" if info.has_qdq else "fp32", "fp32"


def network_flags(trt) -> int:
    """``create_network`` flags: STRONGLY_TYPED (TensorRT 10: opt-in; 11: always on, the flag accepted and ignored)."""
    major = check_tensorrt_version(trt.__version__)
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if flag is None:
        if major >= 11:  # strongly typed is the only mode
            return 0
        raise BackendUnavailable(f"TensorRT {trt.__version__} has no strongly typed networks", 'pip install "tensorrt>=10,<12"')
    return 1 << int(flag)


def profile_chunks(n: int, lo: int, hi: int) -> list[tuple[int, int, int]]:
    """Split ``n`` images into runs the profile accepts: ``(start, stop, run_batch)``, chunks of at most
    ``hi``; a chunk under ``lo`` (the last one, or the whole batch) runs padded to ``lo``."""
    lo, hi = max(1, int(lo)), max(1, int(hi))
    out = []
    for start in range(0, n, hi):
        stop = min(start + hi, n)
        out.append((start, stop, max(stop - start, lo)))
    return out


def parser_errors(parser) -> list[str]:
    """Every error of TensorRT's ONNX parser, each with the node it is about (index, name, op when known)."""
    out = []
    for i in range(int(parser.num_errors)):
        e = parser.get_error(i)
        desc = str(e.desc()).strip()
        node = int(e.node()) if hasattr(e, "node") else -1
        name = str(e.node_name()) if hasattr(e, "node_name") else ""
        op = str(e.node_operator()) if hasattr(e, "node_operator") else ""
        where = (f"node {node}" + (f" {name}" if name else "") + (f" ({op})" if op else "")) if node >= 0 else "graph"
        out.append(f"{where}: {desc}")
    return out


def attach_timing_cache(config, path: Path | None) -> bool:
    """Give the builder a timing cache, loaded from ``path`` when that file holds one for this TensorRT
    and GPU.  A cache from another TensorRT version or GPU (or a damaged one) is ignored with a warning
    and a new one is built (it replaces the file after the build).  Returns True when the file was reused."""
    cache = config.create_timing_cache(b"")
    if cache is None:
        raise VitedgeError("TensorRT could not create a timing cache")
    reused = False
    data = path.read_bytes() if path is not None and path.is_file() else b""
    if data:
        try:
            loaded = config.create_timing_cache(data)
        except Exception:  # damaged file
            loaded = None
        # ITimingCache.combine returns False for a cache of another TensorRT version or (ignore_mismatch=False) GPU
        reused = loaded is not None and bool(cache.combine(loaded, False))
        if not reused:
            note(f"timing cache {path} is from another TensorRT version or GPU (or damaged): ignored and rebuilt")
    if not config.set_timing_cache(cache, False):
        raise VitedgeError(f"TensorRT refused the timing cache{f' {path}' if path else ''}", "delete the file or give another --timing-cache")
    return reused


_TRT_DTYPES = (
    ("int8", "int8"),
    ("fp8", "fp8"),
    ("int4", "int4"),
    ("bf16", "bf16"),
    ("bfloat", "bf16"),
    ("half", "fp16"),
    ("fp16", "fp16"),
    ("fp32", "fp32"),
    ("float", "fp32"),
    ("int32", "int32"),
    ("int64", "int64"),
    ("bool", "bool"),
)
_MYELIN = ("myelin", "foreignnode")


def _dtype_of(fmt: str) -> str:
    f = str(fmt).lower()
    return next((name for key, name in _TRT_DTYPES if key in f), "?")


def _dims(d) -> list[int]:
    return [abs(int(v)) or 1 for v in (d or [])]  # -1 (dynamic, no context given): counted as 1, shares stay right for batch


def _layer_macs(layer: dict) -> int:
    kind = str(layer.get("ParameterType") or layer.get("LayerType") or "")
    ins, outs = layer.get("Inputs") or [], layer.get("Outputs") or []
    if not ins or not outs or not outs[0].get("Dimensions"):
        return 0
    out = _dims(outs[0]["Dimensions"])
    a = _dims(ins[0].get("Dimensions"))
    if "Convolution" in kind:
        k = layer.get("Kernel") or []
        groups = int(layer.get("Groups") or 1)
        cin = a[1] if len(a) > 1 else 1
        return int(np.prod(out)) * (cin // max(groups, 1)) * int(np.prod(_dims(k)) if k else 1)
    if "MatrixMultiply" in kind or "Gemm" in kind or "FullyConnected" in kind:
        trans = "TRANSPOSE" in str(layer.get("MatrixOpA", "")).upper()
        k = (a[-2] if trans else a[-1]) if len(a) >= 2 else (a[-1] if a else 1)
        return int(np.prod(out)) * k
    return 0


def parse_engine_information(text: str) -> list[dict]:
    """Layers of TensorRT's engine-inspector JSON (``get_engine_information(LayerInformationFormat.JSON)``).

    With ``ProfilingVerbosity.DETAILED`` every layer has ``Inputs``/``Outputs`` whose ``Format/Datatype``
    names the precision it runs in (``Int8``, ``Half``/``FP16``, ``Float``/``FP32``...).  Each layer
    gives ``name, type, precision, macs`` (MACs estimated for convolutions and matrix multiplies).
    Layers TensorRT compiled into one fused subgraph (Myelin, "ForeignNode") report the precision of
    their inputs only: what runs inside them is not listed by TensorRT, and they are marked ``fused``.
    """
    import json

    data = json.loads(text)
    layers = []
    for item in data.get("Layers", []) if isinstance(data, dict) else []:
        if isinstance(item, str):  # built without DETAILED verbosity: names only
            layers.append({"name": item, "type": "?", "precision": "?", "macs": 0})
            continue
        ins, outs = item.get("Inputs") or [], item.get("Outputs") or []
        fmt = next((t.get("Format/Datatype") for t in list(ins) + list(outs) if t.get("Format/Datatype")), "")
        name, kind = str(item.get("Name", "?")), str(item.get("LayerType") or item.get("ParameterType") or "?")
        layer = {"name": name, "type": kind, "precision": _dtype_of(fmt), "macs": _layer_macs(item)}
        if any(m in (name + kind).lower() for m in _MYELIN):
            layer["fused"] = True
        layers.append(layer)
    return layers


def engine_layers(engine, trt=None) -> list[dict]:
    """Per-layer precisions of a deserialized ``ICudaEngine`` through its engine inspector."""
    trt = trt or __import__("tensorrt")
    inspector = engine.create_engine_inspector()
    return parse_engine_information(inspector.get_engine_information(trt.LayerInformationFormat.JSON))


def _check_images(man: Manifest) -> list | None:
    """The shipped check images through the model's preprocessing (the FP16 overflow guard's data), or None; one
    batch per input size (a dynamic-size model sees each image at its own aspect ratio)."""
    pre = man.preprocessing_obj
    images = default_check_images()
    if pre is None or not images:
        return None
    return [x for _, x in pre.batches(images)]


def drop_stale_value_info(proto) -> int:
    """Remove ``value_info`` entries of initializers: the FP16 converter leaves some that give an FP32
    weight (kept for LayerNorm) the FP16 type, which strict ONNX type checking rejects; an
    initializer's own type is the truth.  Returns how many were removed."""
    from ..graph import drop_initializer_value_info

    return drop_initializer_value_info(proto)


def convert_for_tensorrt(src: Path, out: Path, man: Manifest, *, qdq: bool) -> dict:
    """Float parts of ``src`` to FP16 for a strongly typed build, with the FP16 overflow guard (nodes whose
    activations overflow FP16 stay FP32, and the engine honours that because the build is strongly typed).
    A QDQ file's Q/DQ nodes get FP16 scales, which needs ONNX opset 19."""
    import onnx

    path = src
    if qdq:
        proto = onnx.load(str(src))
        opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), QDQ_FP16_OPSET)
        if opset < QDQ_FP16_OPSET:  # ONNX's version converter: ops whose signature changed (ReduceMean's axes...) are adapted
            from onnx import version_converter

            try:
                proto = version_converter.convert_version(proto, QDQ_FP16_OPSET)
            except Exception as exc:
                raise VitedgeError(
                    f"{src.name} (opset {opset}) cannot be converted to opset {QDQ_FP16_OPSET}, which FP16 Q/DQ needs "
                    f"({type(exc).__name__}: {first_line(exc, 120)})",
                    "compile with --precision-hint f32 (float parts in FP32), or export at opset 19",
                ) from None
        path = out.with_name(out.stem + f".opset{QDQ_FP16_OPSET}.onnx")
        save_onnx(proto, path)
    data = _check_images(man)
    res = convert_onnx_fp16(path, out, data)
    proto = onnx.load(str(out))
    if drop_stale_value_info(proto):
        save_onnx(proto, out)
    return {
        "to": "fp16",
        "tool": "vitedge.quantization.fp16.convert_onnx_fp16 (onnxruntime.transformers.float16, keep_io_types)",
        "kept_fp32_nodes": len(res.kept),
        "kept_float_op_types": FP16_KEEP_FLOAT,
        "overflow_guard": dict(res.guard, checked_on="the shipped check images" if data else "nothing (no check images)"),
        **({"opset": QDQ_FP16_OPSET} if qdq else {}),
    }


def _major_minor(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split(".")[:3] if p.isdigit())


def check_compat(built: dict, current: dict) -> None:
    """Refuse an engine built for another TensorRT version or GPU architecture.

    ``built`` is ``manifest.compile["tensorrt"]`` (``version``, ``gpu``, ``compute_capability``,
    ``hardware_compatibility``, ``version_compatible``); ``current`` the same keys for this machine.
    Engines only run on the TensorRT version that built them (unless built version-compatible) and
    on GPUs of the same compute capability (unless built with a hardware-compatibility level).
    A different GPU model of the same architecture only gets a warning.
    """
    bv, cv = built.get("version"), current.get("version")
    if not bv:
        raise VitedgeError("the engine's manifest does not say which TensorRT version built it", "rebuild it with vitedge compile --backend tensorrt")
    if bv != cv and not (built.get("version_compatible") and _major_minor(bv)[:1] == _major_minor(cv or "0")[:1]):
        raise VitedgeError(
            f"this engine was built with TensorRT {bv} but TensorRT {cv} is installed",
            f"rebuild it here with vitedge compile --backend tensorrt, or install tensorrt=={bv}",
        )
    bcc, ccc = built.get("compute_capability"), current.get("compute_capability")
    if bcc != ccc and built.get("hardware_compatibility", "none") in (None, "none"):
        raise VitedgeError(
            f"this engine was built for {built.get('gpu')} (compute capability {bcc}) but this GPU is {current.get('gpu')} (compute capability {ccc})",
            "TensorRT engines only run on the GPU architecture they were built for: rebuild it on this machine with vitedge compile --backend tensorrt",
        )
    if built.get("gpu") != current.get("gpu"):
        log.warning("engine built on %s, running on %s (same compute capability %s)", built.get("gpu"), current.get("gpu"), ccc)


# -- build (needs TensorRT and a GPU) -----------------------------------------------------------
def build_engine(
    src: Path,
    man: Manifest,
    scratch: Path,
    out_name: str,
    *,
    batch: int | None,
    hint: str,
    precision_hint: str | None,
    workspace_mb: int,
    profile,
    timing_cache,
    img_size,
) -> tuple[list[str], dict, str]:
    """Build a serialized engine into ``scratch/out_name``; returns (files, settings, precision).

    Everything that can be checked without TensorRT (the ONNX, the profile, the options) is checked
    first, so those mistakes are reported on any machine.
    """
    if src.suffix != ".onnx":
        raise VitedgeError(
            f"{src.name} is an OpenVINO IR: TensorRT builds from ONNX", "compile the ONNX (FP32, or INT8 QDQ from vitedge quantize --backend tensorrt)"
        )
    if workspace_mb is None or int(workspace_mb) < 16:
        raise VitedgeError(f"workspace {workspace_mb} MB is too small", "give --workspace-mb 16 or more (default 1024)")
    info = inspect_onnx(src)
    check_onnx_for_tensorrt(info)
    shapes = compute_profile(info.shape, batch=batch, profile=profile, hint=hint, img_size=size_profile(man, img_size))
    conversion, precision, float_precision = typing_plan(info, precision_hint)
    trt = require_tensorrt()

    typing = None
    build_src = src
    if conversion == "fp16":  # precision lives in the ONNX types: FP16 float layers, guarded nodes kept FP32
        build_src = scratch / "tensorrt_input.fp16.onnx"
        typing = convert_for_tensorrt(src, build_src, man, qdq=info.has_qdq)

    gpu = gpu_info() or {}
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt))  # strongly typed
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(build_src)):
        errs = parser_errors(parser)
        raise ModelNotSupported(
            f"TensorRT's ONNX parser rejected {src.name} ({len(errs)} error{'s' if len(errs) != 1 else ''}): "
            + ("; ".join(errs) if errs else "no error given"),
            "check the opset (13-20) and ops; re-export with vitedge export",
        )
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # per-layer precisions in the engine inspector
    prof = builder.create_optimization_profile()
    prof.set_shape(info.input_name, shapes["min"], shapes["opt"], shapes["max"])
    if config.add_optimization_profile(prof) < 0:
        raise VitedgeError(f"TensorRT refused the optimisation profile {shapes}", "check --profile and --img-size")
    cache_path = Path(timing_cache) if timing_cache else None
    cache_reused = attach_timing_cache(config, cache_path)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise VitedgeError(f"TensorRT could not build an engine from {src.name}", "see the TensorRT log above; try a larger --workspace-mb")
    (scratch / out_name).write_bytes(bytes(serialized))
    if cache_path:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    try:  # what TensorRT chose per layer (the engine inspector); a diagnostic, never a reason to fail
        engine = trt.Runtime(logger).deserialize_cuda_engine(bytes(serialized))
        summary = mac_summary(engine_layers(engine, trt), "tensorrt engine inspector")
        layer_precisions = {"layer_count": summary["layer_count"], "mac_share": summary["mac_share"], "source": summary["source"]}
        del engine
    except Exception as exc:
        layer_precisions = {"source": f"unavailable ({type(exc).__name__}: {str(exc)[:120]})"}
    settings = {
        "tensorrt": {
            "version": trt.__version__,
            "gpu": gpu.get("name"),
            "compute_capability": gpu.get("compute_capability"),
            "hardware_compatibility": "none",
            "version_compatible": False,
        },
        "strongly_typed": True,
        "flags": [],
        "float_precision": float_precision,
        "typing": typing,
        "profile": {k: list(v) for k, v in shapes.items()},
        "workspace_mb": int(workspace_mb),
        "timing_cache": str(cache_path) if cache_path else None,
        "timing_cache_reused": cache_reused if cache_path else None,
        "layer_precisions": layer_precisions,
    }
    return [out_name], settings, precision


# -- runtime ------------------------------------------------------------------------------------
class _Buffers:
    """One CUDA stream and reusable device buffers for one execution context (through cuda-python).

    A tensor's device buffer is allocated the first time and reused while it is large enough (a
    larger batch reallocates it once).  Copies in, the engine and copies out are queued on the one
    stream, then one synchronisation: nothing runs on the default stream.  :meth:`close` frees the
    buffers and destroys the stream."""

    def __init__(self, cudart=None):
        cu = cudart if cudart is not None else _cudart()
        if cu is None:
            raise BackendUnavailable("running TensorRT engines needs cuda-python", 'pip install "vitedge[tensorrt]" (it brings cuda-python)')
        self.cu = cu
        self.stream = cuda_check(cu.cudaStreamCreate(), "cudaStreamCreate", cu)
        self.device: dict[str, tuple[int, int]] = {}  # tensor name -> (device pointer, bytes)
        self.allocations = 0  # cudaMalloc calls so far

    @property
    def handle(self) -> int:
        return int(self.stream)

    def _buffer(self, name: str, nbytes: int) -> int:
        ptr, size = self.device.get(name, (None, 0))
        if ptr is not None and size >= nbytes:
            return ptr
        if ptr is not None:
            del self.device[name]
            cuda_check(self.cu.cudaFree(ptr), f"cudaFree({name})", self.cu)
        ptr = cuda_check(self.cu.cudaMalloc(max(int(nbytes), 1)), f"cudaMalloc({nbytes} bytes for {name})", self.cu)
        self.device[name] = (ptr, int(nbytes))
        self.allocations += 1
        return ptr

    def run(self, context, engine, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import tensorrt as trt

        if self.stream is None:
            raise VitedgeError("the TensorRT engine's CUDA stream was destroyed (engine closed)")
        cu = self.cu
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        outs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        host: dict[str, np.ndarray] = {}
        for n, x in inputs.items():
            if not context.set_input_shape(n, tuple(int(d) for d in x.shape)):
                raise ShapeMismatch(
                    f"TensorRT refused the input shape {tuple(x.shape)} for {n}",
                    "the engine's optimisation profile does not cover it: rebuild with --profile / --img-size",
                )
            host[n] = np.ascontiguousarray(x, dtype=trt.nptype(engine.get_tensor_dtype(n)))
            if not context.set_tensor_address(n, self._buffer(n, host[n].nbytes)):
                raise VitedgeError(f"TensorRT refused the device buffer of {n}")
        results: dict[str, np.ndarray] = {}
        for n in outs:  # shapes are known once every input shape is set
            shape = tuple(int(d) for d in context.get_tensor_shape(n))
            if any(d < 0 for d in shape):
                raise ShapeMismatch(f"TensorRT could not infer the shape of output {n} ({shape})")
            results[n] = np.empty(shape, dtype=trt.nptype(engine.get_tensor_dtype(n)))
            if not context.set_tensor_address(n, self._buffer(n, results[n].nbytes)):
                raise VitedgeError(f"TensorRT refused the device buffer of {n}")
        h2d, d2h = cu.cudaMemcpyKind.cudaMemcpyHostToDevice, cu.cudaMemcpyKind.cudaMemcpyDeviceToHost
        for n, x in host.items():  # all on self.stream, in order: copies in, the engine, copies out
            cuda_check(cu.cudaMemcpyAsync(self.device[n][0], x.ctypes.data, x.nbytes, h2d, self.stream), f"cudaMemcpyAsync({n} to the GPU)", cu)
        if not context.execute_async_v3(self.handle):
            raise VitedgeError("TensorRT failed to run the engine (execute_async_v3 returned False)", "see the TensorRT log above")
        for n, r in results.items():
            cuda_check(cu.cudaMemcpyAsync(r.ctypes.data, self.device[n][0], r.nbytes, d2h, self.stream), f"cudaMemcpyAsync({n} from the GPU)", cu)
        cuda_check(cu.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize", cu)
        return {n: v.astype(np.float32, copy=False) for n, v in results.items()}

    def close(self) -> None:
        """Free every device buffer and destroy the stream (idempotent); the first CUDA error is raised after all are tried."""
        first = None
        for name, (ptr, _) in list(self.device.items()):
            try:
                cuda_check(self.cu.cudaFree(ptr), f"cudaFree({name})", self.cu)
            except VitedgeError as exc:
                first = first or exc
        self.device.clear()
        if self.stream is not None:
            stream, self.stream = self.stream, None
            try:
                cuda_check(self.cu.cudaStreamDestroy(stream), "cudaStreamDestroy", self.cu)
            except VitedgeError as exc:
                first = first or exc
        if first is not None:
            raise first


def current_platform() -> dict:
    import tensorrt as trt

    gpu = gpu_info() or {}
    return {"version": trt.__version__, "gpu": gpu.get("name"), "compute_capability": gpu.get("compute_capability")}


class TensorRTEngine(Engine):
    """A deserialized ``.engine``; refuses engines built for another TensorRT version or GPU."""

    backend = "tensorrt"

    def __init__(self, artifact: Path, manifest: Manifest, **options: Any):
        super().__init__(artifact, manifest)
        if options:
            raise VitedgeError(f"TensorRT engines take no options ({', '.join(options)})")
        built = (manifest.compile or {}).get("tensorrt")
        if not built:
            raise VitedgeError(f"{artifact.name} has no TensorRT build record in its manifest", "rebuild it with vitedge compile --backend tensorrt")
        require_tensorrt()
        check_compat(built, current_platform())
        import tensorrt as trt

        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(Path(artifact).read_bytes())
        if self._engine is None:
            raise FileProblem(f"TensorRT cannot deserialize {artifact}", "the file is corrupt or from another TensorRT build: rebuild it")
        # one execution context (and one set of device buffers): calls borrow it in turn with Engine._take,
        # so they run one at a time, and the ones waiting for it get a VitedgeError when the engine is closed
        self._contexts = [self._engine.create_execution_context()]
        self._buffers = _Buffers()
        self._input = self.input_name

    def _run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        prof = self.manifest.compile.get("profile") or {}
        lo, hi = (prof.get("min") or [1])[0], (prof.get("max") or [len(batch)])[0]
        if not lo <= len(batch) <= hi:  # outside the profile: chunks of its max, the last padded up to its min
            parts = []
            for start, stop, size in profile_chunks(len(batch), lo, hi):
                parts.append({k: v[: stop - start] for k, v in self._run(pad_batch(batch[start:stop], size)).items()})
            return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        context = self._take(self._contexts)  # one execution context: callers run one at a time
        try:
            return self._buffers.run(context, self._engine, {self._input: batch})
        finally:
            self._give(self._contexts, context)

    def precision_breakdown(self) -> dict | None:
        """The engine inspector's per-layer precisions (vitedge builds with ``ProfilingVerbosity.DETAILED``)."""
        if self._engine is None:  # released
            return None
        return mac_summary(engine_layers(self._engine), "tensorrt engine inspector (per-layer I/O precision, ProfilingVerbosity.DETAILED)")

    def _release(self) -> None:
        # Engine.close() calls this once no run is in flight, so the context is back in its list
        self._contexts.clear()
        self._engine = self._runtime = None
        self._buffers.close()  # frees the device buffers and destroys the CUDA stream


def compile_tensorrt(
    src: Path,
    man: Manifest,
    scratch: Path,
    out_name: str,
    *,
    batch,
    threads,
    hint,
    precision_hint,
    device,
    img_size=None,
    workspace_mb=None,
    profile=None,
    timing_cache=None,
) -> tuple[list[str], dict, str]:
    """The registry's compile entry: :func:`build_engine` with its defaults (workspace 1024 MB)."""
    return build_engine(
        src,
        man,
        scratch,
        out_name,
        batch=batch,
        hint=hint,
        precision_hint=precision_hint,
        workspace_mb=1024 if workspace_mb is None else workspace_mb,
        profile=profile,
        timing_cache=timing_cache,
        img_size=img_size,
    )


BACKEND = register(
    Backend(
        name="tensorrt",
        summary="NVIDIA TensorRT on NVIDIA GPUs (and Jetson): a serialized .engine tied to the GPU and TensorRT version",
        engine=TensorRTEngine,
        runs=(".engine", ".plan"),
        compiler=compile_tensorrt,
        compile_options=("workspace_mb", "profile", "timing_cache"),
        engine_suffix=".engine",
        engine_name="{stem}.engine",
        engine_format="tensorrt",
        quantize=("int8", "fp16"),
        quantized_suffix=".onnx",
        quantizer="vitedge.quantization.strategies:TENSORRT",
        benchmark={"fp32": "f32", "fp16": "f16", "int8": None},
        status=tensorrt_status,
    )
)
