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
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

log = logging.getLogger("vitedge")

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
    def from_dict(cls, d: dict) -> "Int8Config":
        return cls(**{**d, "float_groups": tuple(d.get("float_groups", ()))})

    def but(self, **changes) -> "Int8Config":
        return replace(self, **changes)


@dataclass
class GraphRoles:
    """Names of the matrix ops of a ViT graph, by the part of the network they belong to."""

    patch_embed: list[str] = field(default_factory=list)
    blocks: list[list[str]] = field(default_factory=list)  # weight MatMuls of each encoder block, in order
    fc2: list[str] = field(default_factory=list)
    attention: list[str] = field(default_factory=list)  # MatMuls of two activations (Q·Kᵀ, softmax·V)
    head: list[str] = field(default_factory=list)
    token_merging: list[str] = field(default_factory=list)  # ToMe similarity MatMuls: always float (they pick tokens)

    def group(self, name: str) -> list[str]:
        if name == "patch_embed":
            return self.patch_embed
        if name == "first_block":
            return self.blocks[0] if self.blocks else []
        if name == "last_block":
            return self.blocks[-1] if self.blocks else []
        if name == "fc2":
            return self.fc2
        raise KeyError(name)


def graph_roles(model) -> GraphRoles:
    """Find the patch embedding, the encoder blocks, each block's fc2 and the attention core in an ONNX graph.

    A weight MatMul/Gemm whose input width is at least twice its output width is an MLP's second layer
    (fc2); the fc2s close the encoder blocks, so everything between two fc2s is one block.  A Conv
    before the first block is the patch embedding; weight ops after the last fc2 are the head.
    """
    from ..graph import MATRIX_OPS, as_model, constant_behind

    roles = GraphRoles()
    ops: list[tuple[str, str, int | None, int | None]] = []  # (name, op type, input width, output width)
    for n in as_model(model).graph:
        if n.op_type not in MATRIX_OPS:
            continue
        w = constant_behind(n.inputs[1]) if len(n.inputs) > 1 else None
        if w is None:
            if n.op_type == "MatMul" and constant_behind(n.inputs[0]) is None:
                # token merging's similarity (read by the max/argmax of the matching), else the attention core
                merging = any(r.op_type in ("ReduceMax", "ArgMax", "TopK") for r in n.outputs[0].consumers())
                (roles.token_merging if merging else roles.attention).append(n.name)
            continue
        dims = list(w.shape)
        if len(dims) != 2:
            ops.append((n.name, n.op_type, None, None))
            continue
        trans_b = n.op_type == "Gemm" and n.attributes.get_int("transB", 0)
        k, m = (dims[1], dims[0]) if trans_b else (dims[0], dims[1])
        ops.append((n.name, n.op_type, k, m))
    widths = [m for *_, m in ops if m]
    d_model = max(set(widths), key=widths.count) if widths else None  # the residual width: most MatMuls write it
    current: list[str] = []
    for name, op_type, k, m in ops:
        if op_type == "Conv" and not roles.blocks and not current:
            roles.patch_embed.append(name)
            continue
        current.append(name)
        if k and m == d_model and k >= 2 * m:  # fc2: d_ff -> d_model closes a block
            roles.fc2.append(name)
            roles.blocks.append(current)
            current = []
    roles.head = current if roles.blocks else []
    return roles


def ov_attention_matmuls(ov_model) -> list[str]:
    """The attention core of an OpenVINO model: its fused ScaledDotProductAttention ops (``convert_model``
    fuses Q·Kᵀ, softmax and ·V into one, named after the ·V MatMul) and any MatMul of two activations."""

    def is_const(out) -> bool:
        node = out.get_node()
        for _ in range(4):
            t = node.get_type_name()
            if t == "Constant":
                return True
            if t not in ("Convert", "Transpose", "Reshape", "FakeQuantize"):
                return False
            node = node.input_value(0).get_node()
        return False

    return [op.get_friendly_name() for op in ov_model.get_ordered_ops()
            if op.get_type_name() == "ScaledDotProductAttention"
            or (op.get_type_name() == "MatMul" and not is_const(op.input_value(0)) and not is_const(op.input_value(1)))]


def float_names(cfg: Int8Config, roles: GraphRoles) -> list[str]:
    """Names of the ops this config keeps in float by structure (OpenVINO may suffix a Conv's name)."""
    names: list[str] = list(roles.token_merging)  # INT8 there would change which tokens merge, for no speed
    for grp in cfg.float_groups:
        names += roles.group(grp)
    if cfg.attention_float:
        names += roles.attention
    return sorted(set(names))


def _advanced(cfg: Int8Config):
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, AdvancedSmoothQuantParameters
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    kw = {"activations_range_estimator_params": getattr(RangeEstimatorParametersSet, ESTIMATORS[cfg.estimator])}
    if cfg.smooth_quant is not None:
        kw["smooth_quant_alphas"] = AdvancedSmoothQuantParameters(matmul=float(cfg.smooth_quant))
    return AdvancedQuantizationParameters(**kw)


def quantize_nncf(model, calib: Iterable[np.ndarray], subset_size: int, cfg: Int8Config, ignored: list[str],
                  compress_weights: bool = True):
    """Quantize an ``ov.Model`` or an ``onnx.ModelProto`` with NNCF; returns the same kind of model.

    ``compress_weights=False`` leaves the weights' fake-quantizers on the FP32 weights (NNCF's own accuracy
    control works on that form): ops can then be returned to float exactly, by a graph edit
    (:mod:`vitedge.quantization.candidates`)."""
    import nncf

    data = nncf.Dataset(calib)
    scope = nncf.IgnoredScope(names=list(ignored) + [n + "/WithoutBiases" for n in ignored], validate=False) if ignored else None
    adv = _advanced(cfg)
    if not compress_weights:
        adv.backend_params["compress_weights"] = False  # NNCF's BackendParameters.COMPRESS_WEIGHTS, both backends
    return nncf.quantize(model, data, model_type=nncf.ModelType.TRANSFORMER, preset=nncf.QuantizationPreset.MIXED,
                         subset_size=subset_size, fast_bias_correction=cfg.bias_correction == "fast", ignored_scope=scope,
                         advanced_parameters=adv)


def pad_to_multiple(x: np.ndarray, k: int) -> np.ndarray:
    """``x`` with its last image repeated until its length is a multiple of ``k`` (fixed-batch models)."""
    from ..backends.base import pad_batch

    return pad_batch(x, -(-len(x) // k) * k)


# -- measuring a candidate --------------------------------------------------------------------------------------------------
def timed_interleaved(runs: list[Callable[[], object]], rounds: int = 8, seconds: float = 6.0, min_runs: int = 3,
                      max_runs: int = 6) -> list[float]:
    """Median wall time (ms) of each of ``runs``, timed in interleaved rounds (:func:`vitedge.timing.interleaved`,
    order reversed every other round), so that a machine whose speed drifts (shared hosts, frequency changes)
    slows every run alike and the comparison between them holds.  After 3 warm-up runs each, each runs once
    untimed then ``min_runs`` to ``max_runs`` times per round, within its share of ``seconds``."""
    from ..timing import Slot, flat_samples, interleaved

    slot = Slot(seconds / rounds / max(1, len(runs)), min_runs, max(min_runs, max_runs))
    samples = interleaved(runs, rounds, slot, warmup=Slot(0.0, 3, 3), alternate=True, wake=True)
    return [float(np.median(flat_samples(s))) for s in samples]


def prepare(path: Path, backend: str, x: np.ndarray, float_precision: str | None, static: bool = False,
            batch: int = 16, fixed: int | None = None) -> tuple[dict[str, np.ndarray], Callable[[], object]]:
    """Outputs on the held-out images of a (quantized) file on the CPU, and a batch-1 run to time it with.

    OpenVINO ``static``: the model reshaped to batch 1, as ``vitedge compile`` makes latency engines, and
    run image by image.  It is measured, not assumed equal to the dynamic model: on an AMX CPU the static
    batch-1 INT8 engine of a real ViT-S agreed visibly less with FP32 (mean cosine 0.985 vs 0.999).
    """
    n = len(x)
    if fixed:  # a fixed-batch model takes exactly that many images: pad the last batch, time one batch
        batch, static = fixed, False
        x = pad_to_multiple(x, fixed)
    one = np.ascontiguousarray(x[: fixed or 1])
    if backend == "openvino":
        from ..backends.openvino import compiled_model

        cfg = {"PERFORMANCE_HINT": "LATENCY", **({"INFERENCE_PRECISION_HINT": float_precision} if float_precision else {})}
        if static:
            batch = 1
        compiled = compiled_model(path, "CPU", cfg, shape=[1, *x.shape[1:]] if static else None)
        req = compiled.create_infer_request()
        names = [o.get_any_name() for o in compiled.outputs]
        # np.array copies: the request's output tensors are reused by the next call
        parts = [[np.array(req.infer({0: x[i : i + batch]})[o]) for o in compiled.outputs] for i in range(0, len(x), batch)]
        run = lambda: req.infer({0: one})  # noqa: E731 - keeps compiled/req alive with the closure
    else:
        from ..backends.onnxruntime import session

        sess = session(path, precision="int8")
        name = sess.get_inputs()[0].name
        names = [o.name for o in sess.get_outputs()]
        parts = [sess.run(None, {name: x[i : i + batch]}) for i in range(0, len(x), batch)]
        run = lambda: sess.run(None, {name: one})  # noqa: E731
    outs = {name: np.concatenate([p[k] for p in parts])[:n] for k, name in enumerate(names)}
    return outs, run


def float_ops_openvino(ov_model) -> list[str]:
    """MatMul/Convolution ops whose activation input is not fake-quantized (i.e. run in float)."""
    out = []
    for op in ov_model.get_ordered_ops():
        if op.get_type_name() in ("MatMul", "Convolution"):
            if op.input_value(0).get_node().get_type_name() != "FakeQuantize":
                out.append(op.get_friendly_name())
    return out


# -- QDQ ONNX: the helpers live in vitedge.graph (imported on use: it loads onnx); these names are the search's -------------
def float_ops_onnx(model) -> list[str]:
    """Matrix ops that run in float in a QDQ ONNX model (:func:`vitedge.graph.float_ops`)."""
    from ..graph import float_ops

    return float_ops(model)


def qdq_scheme(model) -> str:
    """``U8S8``/``S8S8``/mixed integer scheme of a QDQ ONNX model (:func:`vitedge.graph.qdq_scheme`)."""
    from .. import graph

    return graph.qdq_scheme(model)


def dedicate_qdq(model) -> int:
    """A Q/DQ pair per reader, so ONNX Runtime fuses each into an integer kernel (:func:`vitedge.graph.dedicate_qdq`)."""
    from .. import graph

    return graph.dedicate_qdq(model)
