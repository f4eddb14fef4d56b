"""INT8 QDQ ONNX for TensorRT with ONNX Runtime's static quantizer (ONNX Runtime's own INT8 comes from NNCF: nncf_int8.py).

Calibration is run once into a range cache; every quantized variant (the plain model and those the
accuracy-aware search builds) is then produced from the same ranges, quickly and reproducibly.

Calibration is streamed: ``collect_data`` is called per chunk of batches, which merges the ranges
(MinMax) or histograms (entropy/percentile) as it goes, so activations of the whole set never sit
in memory.  (ONNX Runtime's own ``CalibMaxIntermediateOutputs`` option is not used: in this
version it drops the collected outputs instead of merging them.)

Q/DQ placement for TensorRT follows NVIDIA's Model Optimizer (``modelopt.onnx.quantization``, INT8
mode) where it matters for a ViT; ``nvidia-modelopt`` itself is not used because it pulls
onnxruntime-gpu and CuPy, which replace the CPU onnxruntime (see docs/tensorrt.md for the comparison):

* only MatMul/Gemm/Conv inputs get Q/DQ (per-channel symmetric weights, per-tensor symmetric activations);
* the MHA core stays in float: the two MatMuls of two activations (q·kᵀ and softmax·v), found with
  :func:`vitedge.quantization.roles.graph_roles`, are not quantized;
* GEMVs stay in float: a MatMul/Gemm whose activation has one row per image (the classifier head on
  the CLS token) gains nothing from INT8 on a GPU and loses accuracy;
* MatMul/Gemm with a weight dimension (K or N) under 16 stay in float (too small for INT8 Tensor Cores);
* one Q/DQ pair per tensor, shared by all its readers (``DedicatedQDQPair: False``), so TensorRT sees
  one scale per tensor (q, k and v read the LayerNorm output through the same pair);
* entropy calibration by default for this path (``vitedge.quantization.quantize``).
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .._io import needs_external_data
from ..errors import VitedgeError, first_line
from .calibration import StreamingBatches
from .roles import graph_roles

log = logging.getLogger("vitedge")

MIN_MATMUL_DIM = 16  # modelopt's _MIN_MATMUL_DIM: MatMul/Gemm with K or N below it stay float
QUANT_OP_TYPES = ["MatMul", "Gemm", "Conv"]  # LayerNorm, Softmax, GELU stay float (ViT-aware default)
QDQ = ("QuantizeLinear", "DequantizeLinear")
CALIB_BATCH = 8
CHUNK_BATCHES = 4  # batches per collect_data call for MinMax (its augmented outputs are per-tensor min/max scalars)
HIST_CHUNK_BATCHES = 1  # entropy/percentile: the augmented model outputs every full activation, so one batch at a time


@dataclass
class QDQConfig:
    """How the QDQ model is built (recorded in the manifest)."""

    activation_type: str  # QUInt8 | QInt8
    weight_type: str = "QInt8"
    per_channel: bool = True
    reduce_range: bool = False
    activation_symmetric: bool = False
    op_types: list[str] = field(default_factory=lambda: list(QUANT_OP_TYPES))
    extra_options: dict = field(default_factory=dict)
    nodes_to_exclude: list[str] = field(default_factory=list)  # always left in float (e.g. TensorRT's attention core, GEMVs)
    float_roles: dict = field(default_factory=dict)  # why: {"attention": [...], "gemv": [...]}
    reason: str = ""

    @property
    def label(self) -> str:
        a = "U8" if self.activation_type == "QUInt8" else "S8"
        w = "U8" if self.weight_type == "QUInt8" else "S8"
        return f"{a}{w}"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["scheme"] = self.label
        return d


def tensorrt_config(model: Path | None = None) -> QDQConfig:
    """Explicit-quantization QDQ for TensorRT: symmetric int8, Q/DQ only on MatMul/Conv/Gemm inputs, one
    shared pair per tensor; with ``model`` (the shape-inferred ONNX), the attention core and the GEMVs
    are excluded (see :func:`tensorrt_float_nodes`)."""
    kept = tensorrt_float_nodes(model) if model is not None else {}
    return QDQConfig(
        "QInt8",
        activation_symmetric=True,
        extra_options={
            "QuantizeBias": False,  # TensorRT keeps biases in float and fuses them itself
            "OpTypesToExcludeOutputQuantization": list(QUANT_OP_TYPES),  # Q/DQ on inputs only
            "DedicatedQDQPair": False,  # one Q/DQ pair per tensor, shared by its readers
        },
        nodes_to_exclude=sorted({n for names in kept.values() for n in names}),
        float_roles=kept,
        reason="TensorRT explicit quantization (NVIDIA's placement): symmetric S8S8, per-channel weights, one shared Q/DQ "
        "pair per tensor on MatMul/Conv/Gemm inputs; attention core and GEMVs (classifier head) in float",
    )


def tensorrt_float_nodes(model: Path) -> dict[str, list[str]]:
    """Matrix nodes NVIDIA's placement leaves in float: ``attention`` (MatMuls of two activations: q·kᵀ
    and softmax·v), ``gemv`` (MatMul/Gemm whose activation input has one row per image), ``small``
    (a weight with fewer than 16 rows or columns, e.g. a 10-class head) and, in a dynamic-size graph, ``position``
    (the position table's resampling, which never sees the image)."""
    from .. import graph

    onnx_model = graph.load(model)
    roles = graph_roles(onnx_model)
    attention = set(roles.attention)
    gemv, small = [], []
    for n in onnx_model.graph:
        if n.op_type not in ("MatMul", "Gemm") or graph.node_name(n) in attention:
            continue
        if graph.node_name(n) in roles.position:  # the position table's resampling (listed below): float, like the table
            continue
        act = next((v for v in n.inputs[:2] if v is not None and not v.is_initializer()), None)
        shape = [d if isinstance(d, int) else None for d in act.shape] if act is not None and act.shape is not None else None
        if shape:
            trans_a = n.op_type == "Gemm" and bool(n.attributes.get_int("transA"))
            if (len(shape) == 2 and not trans_a) or (len(shape) >= 3 and shape[-2] == 1):  # (N, K) or (N, 1, K): one row per image
                gemv.append(graph.node_name(n))
                continue
        w = n.inputs[1].const_value if len(n.inputs) > 1 and n.inputs[1] is not None and n.inputs[1].is_initializer() else None
        if w is not None and len(w.shape) == 2:  # K or N under 16: too small for INT8 Tensor Core kernels (modelopt's rule)
            trans_b = n.op_type == "Gemm" and bool(n.attributes.get_int("transB"))
            rows, cols = w.shape.numpy()  # a tensor's shape: every dim is known
            k, m = (cols, rows) if trans_b else (rows, cols)
            if min(k, m) < MIN_MATMUL_DIM:
                small.append(graph.node_name(n))
    kept = {"attention": sorted(attention), "gemv": gemv, "small": small}
    return {**kept, "position": roles.position} if roles.position else kept


def _method(name: str):
    from onnxruntime.quantization import CalibrationMethod

    return {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy, "percentile": CalibrationMethod.Percentile}[name]


def prepare(model: Path, out: Path) -> Path:
    """Shape inference (``quant_pre_process`` without graph rewrites, so node names stay the exporter's)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quant_pre_process(str(model), str(out), skip_optimization=True, skip_symbolic_shape=False)
    except Exception as exc:  # symbolic shape inference fails on some graphs; onnx shape inference is enough
        log.debug("symbolic shape inference failed (%s); using onnx shape inference only", exc)
        try:
            quant_pre_process(str(model), str(out), skip_optimization=True, skip_symbolic_shape=True)
        except Exception as exc2:
            raise VitedgeError(f"shape inference failed on {model.name}: {first_line(exc2, 200)}") from None
    return out


class _ListReader:
    """An ONNX Runtime CalibrationDataReader over a few preprocessed batches."""

    def __init__(self, batches: list, input_name: str):
        self._it = iter(batches)
        self.name = input_name

    def get_next(self):
        x = next(self._it, None)
        return None if x is None else {self.name: x}


def calibrate(model: Path, stream: StreamingBatches, input_name: str, method: str, scratch: Path, symmetric: bool = False) -> Path:
    """Collect activation ranges into a cache file (streamed); returns its path."""
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

    calib_opts: dict[str, Any] = {"symmetric": symmetric} if method == "minmax" else {}
    if method == "percentile":
        calib_opts["percentile"] = 99.999
    cache = scratch / "ranges.json"
    quiet = contextlib.redirect_stdout(io.StringIO())  # the histogram calibrators print progress lines
    try:
        quiet.__enter__()
        calibrator = create_calibrator(
            model, QUANT_OP_TYPES, augmented_model_path=str(scratch / "augmented.onnx"), calibrate_method=_method(method), extra_options=calib_opts
        )
        chunk: list = []
        got_any = False
        per_call = CHUNK_BATCHES if method == "minmax" else HIST_CHUNK_BATCHES
        for x in stream:  # a few batches per collect_data call: ranges/histograms merge as they go
            chunk.append(x)
            if len(chunk) == per_call:
                calibrator.collect_data(_ListReader(chunk, input_name))
                chunk, got_any = [], True
        if chunk:
            calibrator.collect_data(_ListReader(chunk, input_name))
            got_any = True
        if not got_any:
            raise VitedgeError(f"no usable calibration images in {stream.ims.source}")
        ranges = calibrator.compute_data()
        save_tensors_data(ranges, cache)
        del calibrator
    except VitedgeError:
        raise
    except Exception as exc:
        stream.raise_if_failed(exc)
        raise VitedgeError(f"calibration failed: {type(exc).__name__}: {first_line(exc, 200)}") from None
    finally:
        quiet.__exit__(None, None, None)
    return cache


def quantize_qdq(model: Path, out: Path, cache: Path, cfg: QDQConfig, method: str, *, exclude=(), only=None) -> Path:
    """Write a QDQ model from cached ranges. ``exclude`` keeps nodes float; ``only`` quantizes just those nodes."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    if only is not None:
        only = [n for n in only if n not in cfg.nodes_to_exclude]
        if not only:  # nothing left to quantize: the float model
            import shutil

            shutil.copyfile(model, out)
            return out
    extra = {"ActivationSymmetric": cfg.activation_symmetric, "WeightSymmetric": True, **cfg.extra_options}
    big = needs_external_data(model)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            root = logging.getLogger()
            was, root.disabled = root.disabled, True  # ORT logs warnings through the root logger
            try:
                quantize_static(
                    str(model),
                    str(out),
                    None,
                    calibration_cache_path=str(cache),
                    quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=list(cfg.op_types),
                    per_channel=cfg.per_channel,
                    reduce_range=cfg.reduce_range,
                    activation_type=getattr(QuantType, cfg.activation_type),
                    weight_type=getattr(QuantType, cfg.weight_type),
                    nodes_to_exclude=sorted(set(exclude) | set(cfg.nodes_to_exclude)),
                    nodes_to_quantize=list(only) if only else None,
                    calibrate_method=_method(method),
                    extra_options=extra,
                    use_external_data_format=big,
                )
            finally:
                root.disabled = was
    except Exception as exc:
        raise VitedgeError(f"ONNX Runtime quantization failed: {type(exc).__name__}: {first_line(exc, 200)}") from None
    _only_matrix_consumers(out)
    return out


def _only_matrix_consumers(path: Path) -> None:
    """TensorRT: a Q/DQ pair must feed only MatMul/Conv/Gemm; other readers of the tensor (e.g. a Shape
    on the input) get the float tensor back, so TensorRT fuses every pair into its INT8 kernels."""
    from .. import graph

    model = graph.load(path)
    changed = 0
    for dq in list(model.graph):
        src = graph.qdq_source(dq.outputs[0])
        if src is not None:
            others = [r for r in dq.outputs[0].consumers() if r.op_type not in QUANT_OP_TYPES and r.op_type not in QDQ]
            changed += graph.rewire(dq.outputs[0], src, others)
    if changed:
        graph.remove_dead(model)  # the pairs nobody reads any more
        graph.save(model, path)


def quantizable_nodes(model: Path, cfg: QDQConfig | None = None) -> list[str]:
    """Matrix nodes the quantizer may put in INT8 (those ``cfg`` always keeps in float left out)."""
    from .. import graph

    skip = set(cfg.nodes_to_exclude) if cfg else set()
    return [name for n in graph.load(model).graph if n.op_type in QUANT_OP_TYPES and (name := graph.node_name(n)) not in skip]
