"""FP16: ONNX with half-precision weights and math (FP32 inputs/outputs), or OpenVINO IR with FP16 weights."""

from __future__ import annotations

import warnings
from pathlib import Path

from ..errors import VitedgeError

# ops whose statistics/exponentials overflow or lose too much in half precision: kept in float32
FP16_KEEP_FLOAT = ["LayerNormalization", "Softmax", "ReduceMean", "ReduceSum", "Pow", "Sqrt", "Exp", "Log",
                   "SimplifiedLayerNormalization", "SkipLayerNormalization"]


def onnx_fp16(model: Path, out: Path) -> list[str]:
    """Convert to FP16 keeping I/O and overflow-prone ops in FP32; returns the node names kept float."""
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    proto = onnx.load(str(model))
    kept = [n.name for n in proto.graph.node if n.op_type in FP16_KEEP_FLOAT]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            half = convert_float_to_float16(proto, keep_io_types=True, op_block_list=list(DEFAULT_OP_BLOCK_LIST) + FP16_KEEP_FLOAT)
    except Exception as exc:
        raise VitedgeError(f"FP16 conversion failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from None
    big = half.ByteSize() > 1_800_000_000
    onnx.save(half, str(out), save_as_external_data=big, location=out.name + ".data" if big else None)
    return kept


def openvino_fp16(model: Path, out_xml: Path) -> None:
    """OpenVINO IR with FP16-compressed weights (the CPU plugin computes in FP32/BF16 as it sees fit)."""
    import openvino as ov

    try:
        ov_model = ov.convert_model(str(model))
        ov.save_model(ov_model, str(out_xml), compress_to_fp16=True)
    except Exception as exc:
        raise VitedgeError(f"OpenVINO FP16 conversion failed: {str(exc).strip().splitlines()[0][:200]}") from None
