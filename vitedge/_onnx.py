"""What an ONNX graph holds: one definition of "quantized" for every module that asks.

Three op sets, from wide to narrow:

* :data:`QUANTIZED_OPS`: any op that only appears in a quantized graph (QDQ pairs, QOperator
  integer ops, dynamic quantization).  A graph with one of them is not an FP32/FP16 export any more:
  :func:`onnx_precision` says ``int8`` and ``vitedge quantize`` refuses to quantize it again.
* :data:`QDQ_OPS`: the explicit QuantizeLinear/DequantizeLinear pairs, the only INT8 form TensorRT builds.
* :data:`INTEGER_KERNEL_OPS`: QOperator ops that run an integer MatMul/Conv kernel themselves, as
  opposed to a float MatMul fed by DequantizeLinear (which ONNX Runtime fuses to an integer kernel
  only when both inputs are dequantized).  The per-layer precision breakdown uses it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})

INTEGER_KERNEL_OPS = frozenset(
    {"QLinearMatMul", "MatMulInteger", "QLinearConv", "ConvInteger", "QGemm", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QAttention"}
)

QUANTIZED_OPS = (
    QDQ_OPS
    | INTEGER_KERNEL_OPS
    | frozenset(
        {
            "DynamicQuantizeLinear",
            "MatMulNBits",
            "QLinearAdd",
            "QLinearMul",
            "QLinearSigmoid",
            "QLinearSoftmax",
            "QLinearConcat",
            "QLinearAveragePool",
            "QLinearGlobalAveragePool",
            "QLinearLeakyRelu",
            "QLinearReduceMean",
        }
    )
)


def op_types(proto: Any) -> set[str]:
    """The op types used in a model's main graph."""
    return {n.op_type for n in proto.graph.node}


def quantized_ops(proto: Any) -> set[str]:
    """The ops of ``proto`` that show it was quantized (empty for an FP32/FP16 model)."""
    return op_types(proto) & QUANTIZED_OPS


def onnx_precision(model: Any) -> str:
    """What an ONNX model (a ``ModelProto`` or a path) holds: ``int8`` (quantized), ``fp16`` weights, or ``fp32``."""
    import onnx

    proto = onnx.load(str(model), load_external_data=False) if isinstance(model, (str, Path)) else model
    if quantized_ops(proto):
        return "int8"
    if any(t.data_type == onnx.TensorProto.FLOAT16 for t in proto.graph.initializer):
        return "fp16"
    return "fp32"
