"""INT8 QDQ ONNX for TensorRT with ONNX Runtime's static quantizer (ONNX Runtime's own INT8 comes from NNCF: nncf_int8.py).

Calibration is run once into a range cache; every quantized variant (the plain model and those the
accuracy-aware search builds) is then produced from the same ranges, quickly and reproducibly.

Calibration is streamed: ``collect_data`` is called per chunk of batches, which merges the ranges
(MinMax) or histograms (entropy/percentile) as it goes, so activations of the whole set never sit
in memory.  (ONNX Runtime's own ``CalibMaxIntermediateOutputs`` option is not used: in this
version it drops the collected outputs instead of merging them.)
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .._io import needs_external_data
from ..errors import VitedgeError, first_line
from .calibration import StreamingBatches

log = logging.getLogger("vitedge")

QUANT_OP_TYPES = ["MatMul", "Gemm", "Conv"]  # LayerNorm, Softmax, GELU stay float (ViT-aware default)
CALIB_BATCH = 8
CHUNK_BATCHES = 4  # batches per collect_data call for MinMax (its augmented outputs are per-tensor min/max scalars)
HIST_CHUNK_BATCHES = 1  # entropy/percentile: the augmented model outputs every full activation, so one batch at a time


@dataclass
class QDQConfig:
    """How the QDQ model is built (recorded in the manifest)."""

    target: str  # onnxruntime | tensorrt
    activation_type: str  # QUInt8 | QInt8
    weight_type: str = "QInt8"
    per_channel: bool = True
    reduce_range: bool = False
    activation_symmetric: bool = False
    op_types: list[str] = field(default_factory=lambda: list(QUANT_OP_TYPES))
    extra_options: dict = field(default_factory=dict)
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


def tensorrt_config() -> QDQConfig:
    """Explicit-quantization QDQ for TensorRT: symmetric int8 everywhere, Q/DQ only on MatMul/Conv/Gemm inputs."""
    return QDQConfig(
        "tensorrt", "QInt8", activation_symmetric=True,
        extra_options={
            "QuantizeBias": False,  # TensorRT keeps biases in float and fuses them itself
            "OpTypesToExcludeOutputQuantization": list(QUANT_OP_TYPES),  # Q/DQ on inputs only
            "DedicatedQDQPair": True,  # every Q/DQ feeds exactly one MatMul/Conv/Gemm
        },
        reason="TensorRT explicit quantization: symmetric S8S8 (zero point 0), per-channel weights, Q/DQ on MatMul/Conv/Gemm inputs",
    )


def _method(name: str):
    from onnxruntime.quantization import CalibrationMethod

    return {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile}[name]


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

    calib_opts = {"symmetric": symmetric} if method == "minmax" else {}
    if method == "percentile":
        calib_opts["percentile"] = 99.999
    cache = scratch / "ranges.json"
    quiet = contextlib.redirect_stdout(io.StringIO())  # the histogram calibrators print progress lines
    try:
        quiet.__enter__()
        calibrator = create_calibrator(model, QUANT_OP_TYPES, augmented_model_path=str(scratch / "augmented.onnx"),
                                       calibrate_method=_method(method), extra_options=calib_opts)
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

    extra = {"ActivationSymmetric": cfg.activation_symmetric, "WeightSymmetric": True, **cfg.extra_options}
    big = needs_external_data(model)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            root = logging.getLogger()
            was, root.disabled = root.disabled, True  # ORT logs warnings through the root logger
            try:
                quantize_static(
                    str(model), str(out), None, calibration_cache_path=str(cache), quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=list(cfg.op_types), per_channel=cfg.per_channel, reduce_range=cfg.reduce_range,
                    activation_type=getattr(QuantType, cfg.activation_type), weight_type=getattr(QuantType, cfg.weight_type),
                    nodes_to_exclude=list(exclude), nodes_to_quantize=list(only) if only else None,
                    calibrate_method=_method(method), extra_options=extra, use_external_data_format=big,
                )
            finally:
                root.disabled = was
    except Exception as exc:
        raise VitedgeError(f"ONNX Runtime quantization failed: {type(exc).__name__}: {first_line(exc, 200)}") from None
    if cfg.target == "tensorrt":
        _only_matrix_consumers(out)
    return out


def _only_matrix_consumers(path: Path) -> None:
    """TensorRT: a Q/DQ pair must feed only MatMul/Conv/Gemm; other readers of the tensor (e.g. a Shape
    on the input) get the float tensor back, so TensorRT fuses every pair into its INT8 kernels."""
    import onnx

    proto = onnx.load(str(path))
    g = proto.graph
    q_in = {n.output[0]: n.input[0] for n in g.node if n.op_type == "QuantizeLinear"}
    dq_src = {n.output[0]: q_in[n.input[0]] for n in g.node if n.op_type == "DequantizeLinear" and n.input[0] in q_in}
    changed = False
    for n in g.node:
        if n.op_type in QUANT_OP_TYPES or n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        for k, name in enumerate(n.input):
            if name in dq_src:
                n.input[k] = dq_src[name]
                changed = True
    if changed:
        used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
        dead = True
        while dead:  # drop Q/DQ pairs nobody reads any more
            dead = [n for n in g.node if n.op_type in ("QuantizeLinear", "DequantizeLinear") and not set(n.output) & used]
            for n in dead:
                g.node.remove(n)
            used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
        onnx.save(proto, str(path))


def quantizable_nodes(model: Path) -> list[str]:
    import onnx

    g = onnx.load(str(model), load_external_data=False).graph
    return [n.name for n in g.node if n.op_type in QUANT_OP_TYPES]
