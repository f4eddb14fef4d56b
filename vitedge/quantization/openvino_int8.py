"""INT8 OpenVINO IR with NNCF post-training quantization (Transformer model type: SmoothQuant, bias
correction, LayerNorm/Softmax/GELU left in float), optionally with NNCF's accuracy control."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..errors import VitedgeError
from .calibration import EvalSet, StreamingBatches

log = logging.getLogger("vitedge")

_ESTIMATOR = {"minmax": "MINMAX", "percentile": "MEAN_QUANTILE", "entropy": "HISTOGRAM"}


def _advanced(method: str):
    """Map vitedge's --method onto NNCF's activation range estimators (NNCF has no KL/entropy
    calibration: its histogram estimator, which picks the range minimising quantization error, stands in)."""
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    return AdvancedQuantizationParameters(
        activations_range_estimator_params=getattr(RangeEstimatorParametersSet, _ESTIMATOR[method]))


def float_matmuls(ov_model) -> list[str]:
    """MatMul/Convolution ops whose activation input is not fake-quantized (i.e. kept in float)."""
    out = []
    for op in ov_model.get_ordered_ops():
        if op.get_type_name() in ("MatMul", "Convolution"):
            src = op.input_value(0).get_node()
            if src.get_type_name() != "FakeQuantize":
                out.append(op.get_friendly_name())
    return out


def quantize_openvino(model: Path, out_xml: Path, stream: StreamingBatches, samples: int, method: str,
                      eval_set: EvalSet | None = None, max_drop: float | None = None) -> dict:
    import nncf
    import openvino as ov

    try:
        ov_model = ov.convert_model(str(model))
    except Exception as exc:
        raise VitedgeError(f"OpenVINO cannot convert {model.name}: {str(exc).strip().splitlines()[0][:200]}") from None
    calib = nncf.Dataset(stream)
    common = dict(model_type=nncf.ModelType.TRANSFORMER, subset_size=samples, preset=nncf.QuantizationPreset.MIXED)
    info: dict = {"tool": f"nncf {nncf.__version__}", "model_type": "TRANSFORMER", "preset": "MIXED",
                  "range_estimator": _ESTIMATOR[method]}
    try:
        if max_drop is None:
            q = nncf.quantize(ov_model, calib, advanced_parameters=_advanced(method), **common)
        else:
            targets = eval_set.labels if eval_set.labelled else eval_set.ref.argmax(1)
            items, i = [], 0
            for x in eval_set.batches(32):
                items.append((x, targets[i : i + len(x)]))
                i += len(x)

            def validate(compiled, data) -> float:
                hit = n = 0
                for x, y in data:
                    pred = np.asarray(compiled(x)[0]).argmax(1)
                    hit += int((pred == y).sum())
                    n += len(y)
                return hit / max(n, 1)

            val = nncf.Dataset(items, lambda item: item[0])
            q = nncf.quantize_with_accuracy_control(
                ov_model, calib, val, validate, max_drop=max_drop / 100.0, drop_type=nncf.DropType.ABSOLUTE,
                advanced_quantization_parameters=_advanced(method), **common)
            info["accuracy_control"] = "nncf.quantize_with_accuracy_control"
        ov.save_model(q, str(out_xml))  # weights stored as int8
    except VitedgeError:
        raise
    except Exception as exc:
        stream.raise_if_failed(exc)
        raise VitedgeError(f"NNCF quantization failed: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}") from None
    info["float_ops"] = float_matmuls(q)
    return info
