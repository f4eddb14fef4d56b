"""INT8 with NNCF for both CPU runtimes: OpenVINO IR (FakeQuantize) and QDQ ONNX for ONNX Runtime.

One set of algorithms (NNCF's min-max calibration, SmoothQuant, bias correction) writes both formats,
so a configuration that keeps a model's predictions on one runtime means the same on the other.
:class:`Int8Config` is one whole-model setting of the fidelity search (``fidelity.py``);
:func:`quantize_nncf` applies it; :func:`prepare` runs a result on the held-out images and
:func:`timed_interleaved` times it.  The search runs all of it in its worker process (``worker.py``,
``candidates.py``), so a crash in a native library costs one call, not the user's run.

ViT-aware structure (which MatMul is the patch embedding, a block's fc2, the attention core) is
read from the ONNX graph by :func:`graph_roles`; it works on vitedge's exports and on foreign ONNX
files (timm, transformers, torch.onnx) alike because it looks at weights and data flow, not names.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

log = logging.getLogger("vitedge")

if TYPE_CHECKING:  # pragma: no cover
    from .roles import GraphRoles

#: vitedge's --method names -> NNCF's activation range estimators (NNCF has no KL method: its histogram
#: estimator, which picks the range minimising the quantization error, stands in for "entropy").
ESTIMATORS = {"minmax": "MINMAX", "percentile": "MEAN_QUANTILE", "entropy": "HISTOGRAM"}


@dataclass(frozen=True)
class Int8Config:
    """How one INT8 try is made.  Frozen and JSON-able: it is recorded in the manifest and the table."""

    smooth_quant: float | None = None  # SmoothQuant strength on MatMuls; None = NNCF's default (0.95), < 0 = off
    estimator: str = "minmax"  # activation ranges: minmax | percentile | entropy
    bias_correction: str = "fast"  # fast | full (NNCF's BiasCorrection: slower, corrects every layer's mean shift)
    attention_float: bool = False  # Q·Kᵀ and softmax·V stay in float
    float_groups: tuple[str, ...] = ()  # structural groups kept in float: patch_embed, first_block, last_block, fc2

    def describe(self) -> str:
        parts = []
        if self.smooth_quant is not None:
            parts.append("SmoothQuant off" if self.smooth_quant < 0 else f"SmoothQuant {self.smooth_quant:g}")
        if self.estimator != "minmax":
            parts.append(f"{self.estimator} ranges")
        if self.bias_correction != "fast":
            parts.append("full bias correction")
        if self.attention_float:
            parts.append("attention core float")
        parts += [f"{g.replace('_', ' ')} float" for g in self.float_groups]
        return ", ".join(parts) or "NNCF defaults"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["float_groups"] = list(self.float_groups)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Int8Config:
        return cls(**{**d, "float_groups": tuple(d.get("float_groups", ()))})

    def but(self, **changes) -> Int8Config:
        return replace(self, **changes)


def float_names(cfg: Int8Config, roles: GraphRoles) -> list[str]:
    """Names of the ops this config keeps in float by structure (OpenVINO may suffix a Conv's name)."""
    names: list[str] = list(roles.token_merging) + list(roles.position)  # INT8 there would change which tokens merge, for no speed
    for grp in cfg.float_groups:
        names += roles.group(grp)
    if cfg.attention_float:
        names += roles.attention
    return sorted(set(names))


def _advanced(cfg: Int8Config):
    from nncf.quantization.advanced_parameters import (
        AdvancedQuantizationParameters,
        AdvancedSmoothQuantParameters,
    )
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    kw = {"activations_range_estimator_params": getattr(RangeEstimatorParametersSet, ESTIMATORS[cfg.estimator])}
    if cfg.smooth_quant is not None:
        kw["smooth_quant_alphas"] = AdvancedSmoothQuantParameters(matmul=float(cfg.smooth_quant))
    return AdvancedQuantizationParameters(**kw)


class _KnownBatchwise(logging.Filter):
    """Drops NNCF's warning that batchwise statistics may be inaccurate for a transformer: vitedge asks for them only
    for a model whose every activation keeps the batch on axis 0 (``candidates.calibration_batch``), where they are exact."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "batchwise statistics" not in record.getMessage()


def quantize_nncf(
    model,
    calib: Iterable[np.ndarray],
    subset_size: int,
    cfg: Int8Config,
    ignored: list[str],
    compress_weights: bool = True,
    batchwise: bool = False,
):
    """Quantize an ``ov.Model`` or an ``onnx.ModelProto`` with NNCF; returns the same kind of model.

    ``compress_weights=False`` leaves the weights' fake-quantizers on the FP32 weights (NNCF's own accuracy
    control works on that form): ops can then be returned to float exactly, by a graph edit
    (:mod:`vitedge.quantization.candidates`).  ``batchwise``: ``calib`` yields batches of several images, whose
    statistics NNCF reduces image by image (``subset_size`` then counts batches)."""
    import nncf

    data = nncf.Dataset(calib)
    scope = nncf.IgnoredScope(names=list(ignored) + [n + "/WithoutBiases" for n in ignored], validate=False) if ignored else None
    adv = _advanced(cfg)
    if not compress_weights:
        adv.backend_params["compress_weights"] = False  # NNCF's BackendParameters.COMPRESS_WEIGHTS, both backends
    adv.batchwise_statistics = batchwise
    quiet = _KnownBatchwise()
    nncf_log = logging.getLogger("nncf")
    if batchwise:
        nncf_log.addFilter(quiet)
    try:
        return nncf.quantize(
            model,
            data,
            model_type=nncf.ModelType.TRANSFORMER,
            preset=nncf.QuantizationPreset.MIXED,
            subset_size=subset_size,
            fast_bias_correction=cfg.bias_correction == "fast",
            ignored_scope=scope,
            advanced_parameters=adv,
        )
    finally:
        nncf_log.removeFilter(quiet)
