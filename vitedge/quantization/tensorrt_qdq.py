"""TensorRT explicit quantization: the QDQ ONNX that TensorRT's builder consumes.

TensorRT cannot be installed on machines without an NVIDIA GPU, so vitedge writes the QDQ file here
(symmetric INT8, zero point 0, per-channel weight scales, Q/DQ only on the inputs of
MatMul/Conv/Gemm where TensorRT fuses them) and proves it with ONNX Runtime, which executes the same
Q/DQ arithmetic.  Building the engine from it is ``vitedge compile --backend tensorrt``.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from .ort_int8 import QUANT_OP_TYPES, tensorrt_config  # noqa: F401  (re-exported)


def inspect_qdq(path: str | Path) -> dict:
    """Facts about a QDQ ONNX file that decide whether TensorRT can consume it as explicit INT8."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    g = onnx.load(str(path), load_external_data=False).graph
    init = {i.name: i for i in g.initializer}
    consumers = defaultdict(list)
    for n in g.node:
        for i in n.input:
            consumers[i].append(n.op_type)
    zero_points, dq_consumers, per_channel, per_tensor_weights = [], set(), 0, 0
    for n in g.node:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        if len(n.input) > 2 and n.input[2] in init:
            zero_points.append(numpy_helper.to_array(init[n.input[2]]))
        if n.op_type == "DequantizeLinear":
            dq_consumers.update(consumers[n.output[0]])
            if n.input[0] in init:  # a weight
                scale = init.get(n.input[1])
                if scale is not None and len(scale.dims) == 1 and scale.dims[0] > 1:
                    per_channel += 1
                else:
                    per_tensor_weights += 1
    return {
        "zero_points_all_zero": bool(zero_points) and all((np.asarray(z) == 0).all() for z in zero_points),
        "int8_only": bool(zero_points) and all(np.asarray(z).dtype == np.int8 for z in zero_points),
        "dq_consumers": sorted(dq_consumers),
        "per_channel_weights": per_channel,
        "per_tensor_weights": per_tensor_weights,
    }
