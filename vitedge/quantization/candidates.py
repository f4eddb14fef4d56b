"""Build and measure INT8 candidates: the calls the search's worker process runs (:mod:`.worker`).

Quantize once, derive the rest by graph edits.  :func:`quantize_base` runs NNCF once per configuration
and keeps its output in a *revertible* form: the weights' fake-quantizers are left on the FP32 weights
(NNCF's ``compress_weights=False``, what its own accuracy control works on).  A candidate that keeps some
matrix ops in float is then that graph with the fake-quantizers on those ops' inputs removed, and the
remaining weights compressed to int8 as NNCF would have (:func:`build`): a graph edit of a second, not a new
calibration.  :func:`measure` runs a candidate on a set of preprocessed images (``.npy``), saves its outputs
for the parent to compare with FP32, and can keep the deployable file; :func:`time_models` times several
files side by side.

``fmt`` everywhere is the file format NNCF writes, ``openvino`` (an IR) or ``onnx`` (QDQ ONNX run by ONNX
Runtime).  Both formats: an OpenVINO IR (FakeQuantize) and a QDQ ONNX model for ONNX Runtime (QuantizeLinear /
DequantizeLinear, each reader of an activation given its own pair so ONNX Runtime fuses it into an integer
kernel: :func:`vitedge.graph.dedicate_qdq`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .. import graph
from .._io import needs_external_data, save_onnx
from ..backends.base import pad_batch
from ..backends.onnxruntime import session
from ..backends.openvino import compiled_model, split_keepdims_reductions
from ..timing import Slot, flat_samples, interleaved
from .nncf_int8 import Int8Config, float_names, quantize_nncf
from .roles import graph_roles
from .worker import data_paths

_cache: dict[tuple, Any] = {}  # this process's loaded models and arrays (the worker lives for one search)


def _array(path: str) -> np.ndarray:
    key = ("array", path)
    if key not in _cache:
        _cache[key] = np.load(path, mmap_mode="r")
    return _cache[key]


#: a set of preprocessed images on disk: one ``.npy``, or for a dynamic-size model one ``.npy`` per input size
Data = str | list[str]


def _parts(data: Data, count: int | None = None) -> list[np.ndarray]:
    """The arrays of ``data``, one per input size; ``count``: the first ``count`` images, taken evenly from the sizes."""
    parts = [_array(p) for p in data_paths(data)]
    if count:
        per = -(-count // len(parts))
        parts = [x[:per] for x in parts]
    return parts


#: images per NNCF calibration item when the model keeps the batch on axis 0 of every activation (:func:`calibration_batch`):
#: NNCF then reduces each image's statistics on its own (``batchwise_statistics``), so the ranges are those of one
#: image at a time (checked on a real ViT-S: identical ranges, biases within 1e-4), in fewer, larger inferences
CALIB_BATCH = 8
CALIB_MEMORY = 1 << 30  # bytes of matrix-op inputs NNCF may get back from one calibration inference


class _Calibration:
    """NNCF's calibration items: ``batch`` images at a time (1, or :data:`CALIB_BATCH` for a batch-first model), or
    the model's fixed batch; ``{input name: array}`` for NNCF's ONNX backend, the bare array for its OpenVINO backend."""

    def __init__(self, parts: list[np.ndarray], fixed: int | None, input_name: str | None = None, batch: int = 1):
        self.parts, self.fixed, self.input_name = parts, fixed, input_name  # one array per input size
        self.bs = fixed or batch

    def __iter__(self):
        for x in self.parts:
            for i in range(0, len(x), self.bs):
                b = x[i : i + self.bs]
                b = np.ascontiguousarray(pad_batch(b, self.bs) if self.fixed else b)
                yield {self.input_name: b} if self.input_name else b

    def __len__(self) -> int:
        return sum(-(-len(x) // self.bs) for x in self.parts)


def calibration_batch(source, hw: tuple[int, ...] | None = None) -> int:
    """Images per NNCF calibration item: :data:`CALIB_BATCH` for a model whose every activation carries the batch on
    axis 0 and nowhere else (so that NNCF's per-item statistics of a batch equal those of its images one at a time),
    fewer where the matrix ops' inputs of that many images would pass :data:`CALIB_MEMORY` (NNCF gets them all back
    from every inference), and 1 for a graph that moves the batch (tokens-first attention as in CLIP's exports,
    ``(batch*heads, T, d)`` reshapes, flattened ``(batch*T, C)`` Gemms).  ``hw``: the largest (height, width) a
    dynamic-size model is calibrated at."""
    per_image = _matrix_input_bytes(source, hw=hw)
    if per_image is None:
        return 1
    return int(max(1, min(CALIB_BATCH, CALIB_MEMORY // max(per_image, 1))))


def _matrix_input_bytes(source, probe: int = 7, hw: tuple[int, ...] | None = None) -> int | None:
    """Bytes of the matrix ops' activation inputs per image, or None when the batch leaves axis 0 anywhere (read
    from OpenVINO's shape propagation at batch ``probe``, and for a dynamic-size model at ``hw``).  ``source``: a
    model file, or an ``ov.Model`` (a copy is reshaped)."""
    import openvino as ov

    try:
        model = ov.Core().read_model(source) if isinstance(source, (str, Path)) else source.clone()
        inp = model.inputs[0]
        shape = inp.get_partial_shape()
        if len(model.inputs) != 1 or shape.rank.is_dynamic or len(shape) < 2:
            return None
        dims = [ov.Dimension(probe)] + [shape[i] for i in range(1, len(shape))]
        if hw is not None and len(dims) == 2 + len(hw):
            dims[2:] = [d if d.is_static else ov.Dimension(int(v)) for d, v in zip(dims[2:], hw, strict=True)]
        model.reshape({inp.get_any_name(): ov.PartialShape(dims)})
    except Exception:  # a model that cannot take another batch: one image at a time, as before
        return None
    fed = {inp.get_node().get_friendly_name()}  # ops whose values the image reaches (not through shapes or weights)
    total = 0
    for op in model.get_ordered_ops():
        values = [op.input_value(i) for i in range(op.get_input_size())]
        ins = [v for v in values if v.get_element_type().is_real() and v.get_node().get_friendly_name() in fed]
        if not ins:
            continue
        fed.add(op.get_friendly_name())
        if op.get_type_name() == "Result":
            continue
        for out in op.outputs():
            ps = out.get_partial_shape()
            if out.get_element_type().is_real() and ps.rank.is_static and len(ps) >= 2:
                if ps[0].is_dynamic or ps[0].get_length() != probe:
                    return None
        if op.get_type_name() in ("MatMul", "Convolution"):
            total += sum(4 * int(np.prod(list(ps.get_shape()))) // probe for ps in (v.get_partial_shape() for v in ins) if ps.is_static)
    return total


def quantize_base(
    source: str, fmt: str, config: dict, calib: Data, out: str, count: int | None = None, fixed_batch: int | None = None, batch: int | None = None
) -> dict:
    """NNCF INT8 of ``source`` with ``config`` on the first ``count`` calibration images, saved revertible at ``out``.
    ``batch``: images per calibration item (default: :func:`calibration_batch`).

    Returns the names of the matrix ops it quantized and the seconds it took."""
    import onnx

    t0 = time.perf_counter()
    cfg = Int8Config.from_dict(config)
    parts = _parts(calib, count)
    hw = max((x.shape[2:] for x in parts), key=lambda s: int(np.prod(s)))  # the largest size sets the memory per image
    proto = onnx.load(source)
    ignored = float_names(cfg, graph_roles(proto))
    if fmt == "openvino":
        import openvino as ov

        model = ov.convert_model(source)
        if batch is None:
            batch = calibration_batch(model, hw) if fixed_batch is None else 1
        if cfg.attention_float:
            ignored = sorted(set(ignored) | set(ov_attention_matmuls(model)))
        data = _Calibration(parts, fixed_batch, batch=batch)
        q = quantize_nncf(model, data, len(data), cfg, ignored, compress_weights=False, batchwise=data.bs > 1 and not fixed_batch)
        ov.save_model(q, out, compress_to_fp16=False)
        quantized = [op.get_friendly_name() for op in q.get_ordered_ops() if _ov_quantized(op)]
    else:
        if batch is None:
            batch = calibration_batch(source, hw) if fixed_batch is None else 1
        data = _Calibration(parts, fixed_batch, proto.graph.input[0].name, batch=batch)
        q = quantize_nncf(proto, data, len(data), cfg, ignored, compress_weights=False, batchwise=data.bs > 1 and not fixed_batch)
        save_onnx(q, Path(out), f"{Path(out).name}.data")
        dq = {n.output[0] for n in q.graph.node if n.op_type == "DequantizeLinear"}
        quantized = [n.name for n in q.graph.node if n.op_type in ("MatMul", "Gemm", "Conv") and any(i in dq for i in n.input[:2])]
    _cache.pop(("base", out), None)
    return {"quantized": quantized, "seconds": time.perf_counter() - t0}


# -- graph edits ------------------------------------------------------------------------------------------------------------
_OV_MATRIX = ("MatMul", "Convolution", "ScaledDotProductAttention")


def _ov_quantized(op) -> bool:
    return op.get_type_name() in _OV_MATRIX and any(op.input_value(i).get_node().get_type_name() == "FakeQuantize" for i in range(op.get_input_size()))


# NNCF places a quantizer before ops that only move values (e.g. the keys' Reshape/Transpose into an attention op):
# the fake-quantizer of an op's input is searched upwards through them (vitedge.graph.keep_float does so for ONNX)
_MOVES_ONLY = ("Reshape", "Transpose", "Squeeze", "Unsqueeze")


def _ov_keep_float(model, names: list[str]) -> list[str]:
    """Bypass the FakeQuantize on every input of the named ops (activation and weight), for those ops only.

    OpenVINO names a Conv with a bias ``NAME/WithoutBiases`` and a fused attention after its ·V MatMul."""
    wanted = set(names) | {n + "/WithoutBiases" for n in names}
    done = []
    for op in model.get_ordered_ops():
        if op.get_friendly_name() not in wanted or op.get_type_name() not in _OV_MATRIX:
            continue
        for i in range(op.get_input_size()):
            reader, port = op, i
            src = reader.input_value(port).get_node()
            while src.get_type_name() in _MOVES_ONLY:
                reader, port = src, 0
                src = reader.input_value(0).get_node()
            if src.get_type_name() == "FakeQuantize":
                reader.input(port).replace_source_output(src.input_value(0))
        done.append(op.get_friendly_name())
    return done


def _base(path: str, fmt: str):
    key = ("base", path)
    if key not in _cache:
        if fmt == "openvino":
            import openvino as ov

            _cache[key] = ov.Core().read_model(path)
        else:
            import onnx

            _cache[key] = onnx.load(path)
    return _cache[key]


def build(base: str, fmt: str, keep_float: list[str], out: str | None, data_name: str | None = None, spill: str | None = None) -> tuple[list[str], Any]:
    """The deployable candidate: the revertible base with ``keep_float`` in float and the other weights
    compressed to int8, written to ``out`` (a big ONNX model's weights go to ``data_name`` beside it: the
    artifact's final name, as the ONNX file records it).  Returns the matrix ops that run in float, and what to
    run: ``out``, or with ``out=None`` the model in memory (an ``ov.Model``, or an ONNX model's bytes), which
    spares the ranking pass a file per group."""
    if fmt == "openvino":
        import openvino as ov
        from openvino._offline_transformations import compress_quantize_weights_transformation

        model = _base(base, fmt).clone()
        _ov_keep_float(model, keep_float)
        compress_quantize_weights_transformation(model)
        split_keepdims_reductions(model)  # OpenVINO's fused Reduce + FakeQuantize bug (docs/openvino_static_batch.md)
        if out is not None:
            ov.save_model(model, out, compress_to_fp16=False)
        return float_ops_openvino(model), out or model
    import onnx
    from nncf.onnx.graph.passes import compress_quantize_weights_transformation

    model = onnx.ModelProto()
    model.CopyFrom(_base(base, fmt))
    graph.keep_float(model, keep_float)
    compress_quantize_weights_transformation(model)
    graph.dedicate_qdq(model)  # ONNX Runtime fuses a Q/DQ pair into an integer MatMul only when it has one reader
    if out is None and not needs_external_data(model):
        return graph.float_ops(model), model.SerializeToString()
    out = out or spill  # too big for one protobuf in memory: written where the caller says, and removed by it
    if out is None:
        raise ValueError("a model this big needs a file: pass out= or spill=")
    save_onnx(model, Path(out), data_name or f"{Path(out).name}.data")
    return graph.float_ops(model), out


def measure(
    fmt: str,
    model: str,
    data: Data,
    out_dir: str,
    variants: list[dict],
    fixed_batch: int | None = None,
    base: str | None = None,
    keep_float: list[str] | None = None,
    keep: bool = False,
    time_s: float = 0.0,
    data_name: str | None = None,
    threads: int | None = None,
) -> dict:
    """Outputs of a candidate on the images in ``data`` for each engine variant (float precision, static batch 1),
    saved as ``out_dir/outputs.KEY.npz``, and with ``time_s`` > 0 each variant's batch-1 latency (its variants
    timed interleaved).  With ``base``: the candidate is first built from it (:func:`build`), written at ``model``
    when ``keep`` (else run from memory: ranking candidates are many); without, ``model`` is run as it is (the
    FP32 reference)."""
    t0 = time.perf_counter()
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    float_ops: list[str] = []
    runnable: Any = Path(model)
    if base is not None:
        float_ops, runnable = build(base, fmt, list(keep_float or []), model if keep else None, data_name, spill=model)
    x = [np.asarray(p) for p in _parts(data)]
    res, runs = [], []
    times: list[float] = []  # one variant run image by image (a static batch-1 engine): its per-image times
    for v in variants:
        outs, run = prepare(
            runnable,
            fmt,
            x,
            v.get("float_precision"),
            static=bool(v.get("static")),
            fixed=fixed_batch,
            times=times if len(variants) == 1 else None,
            threads=threads,
        )
        key = variant_key(v)
        np.savez(folder / f"outputs.{key}.npz", **outs)  # type: ignore[arg-type]  # numpy's stub: any **key could be allow_pickle
        res.append({**v, "key": key, "outputs": str(folder / f"outputs.{key}.npz")})
        runs.append(run)
    if time_s > 0 and len(times) >= MIN_TIMED_IMAGES + TIMED_WARMUP:
        # the held-out images were just run one by one on the engine that is timed: those runs are its latency
        # sample (a ViT's work does not depend on the pixels), so no second timing pass is needed
        res[0]["latency_ms"] = float(np.median(times[TIMED_WARMUP:]))
    elif time_s > 0:
        for v, ms in zip(res, timed_interleaved(runs, seconds=time_s), strict=True):
            v["latency_ms"] = ms
    del runs
    if base is not None and not keep and isinstance(runnable, (str, Path)):  # a big candidate spilled to disk
        for f in (Path(runnable), Path(runnable).parent / (data_name or f"{Path(runnable).name}.data")):
            f.unlink(missing_ok=True)
    return {"variants": res, "float_ops": float_ops, "seconds": time.perf_counter() - t0}


MIN_TIMED_IMAGES = 30  # per-image runs that are enough for a latency (fewer: a separate timing pass)
TIMED_WARMUP = 3  # the first runs of a fresh engine (allocations, caches) are not counted


# -- running a candidate ----------------------------------------------------------------------------------------------------
def prepare(
    path: Any,
    fmt: str,
    x: np.ndarray | list[np.ndarray],
    float_precision: str | None,
    static: bool = False,
    batch: int = 16,
    fixed: int | None = None,
    times: list[float] | None = None,
    threads: int | None = None,
) -> tuple[dict[str, np.ndarray], Callable[[], object]]:
    """Outputs on the held-out images of a (quantized) model on the CPU, and a batch-1 run to time it with.
    ``path``: a file, or a model in memory (an ``ov.Model``, which is not changed; an ONNX model's bytes).
    ``x``: the images, or for a dynamic-size model a list of arrays, one per input size (outputs follow that order;
    the batch-1 run and ``times`` are of the first size).
    ``times``: where a model run image by image (OpenVINO ``static``) appends each image's wall time (ms).
    ``threads``: inference threads (default: the runtime's, all cores; a Ray task runs with its share).

    OpenVINO ``static``: the model reshaped to batch 1, as ``vitedge compile`` makes latency engines, and
    run image by image.  It is measured, not assumed equal to the dynamic model: on an AMX CPU the static
    batch-1 INT8 engine of a real ViT-S agreed visibly less with FP32 (mean cosine 0.985 vs 0.999).
    """
    parts = list(x) if isinstance(x, list) else [x]
    sizes = len(parts)
    ns = [len(p) for p in parts]
    if fixed:  # a fixed-batch model takes exactly that many images: pad the last batch, time one batch
        batch, static = fixed, False
        parts = [pad_batch(p, -(-len(p) // fixed) * fixed) for p in parts]
    one = np.ascontiguousarray(parts[0][: fixed or 1])
    outs: list[list[np.ndarray]] = []  # per batch, the outputs in order
    if fmt == "openvino":
        cfg = {
            "PERFORMANCE_HINT": "LATENCY",
            **({"INFERENCE_PRECISION_HINT": float_precision} if float_precision else {}),
            **({"INFERENCE_NUM_THREADS": int(threads)} if threads else {}),
        }
        if static:
            batch = 1
        if not isinstance(path, (str, Path)):
            path = path.clone()  # compiling reshapes and rewrites it: the caller's model stays as it was
        # static batch 1 as compile builds it: a dynamic-size model keeps its height and width dynamic
        shape = ([1, parts[0].shape[1], -1, -1] if sizes > 1 else [1, *parts[0].shape[1:]]) if static else None
        compiled = compiled_model(path, "CPU", cfg, shape=shape)
        req = compiled.create_infer_request()
        names = [o.get_any_name() for o in compiled.outputs]
        for k, xs in enumerate(parts):
            for i in range(0, len(xs), batch):
                t0 = time.perf_counter()
                got = req.infer({0: xs[i : i + batch]})
                if times is not None and batch == 1 and k == 0:
                    times.append((time.perf_counter() - t0) * 1e3)
                outs.append([np.array(got[o]) for o in compiled.outputs])  # copies: the request's tensors are reused by the next call
        run = lambda: req.infer({0: one})  # noqa: E731 - keeps compiled/req alive with the closure
    else:
        sess = session(path, precision="int8", threads=threads)
        name = sess.get_inputs()[0].name
        names = [o.name for o in sess.get_outputs()]
        outs = [sess.run(None, {name: xs[i : i + batch]}) for xs in parts for i in range(0, len(xs), batch)]
        run = lambda: sess.run(None, {name: one})  # noqa: E731
    # each size's padding (a fixed batch) is cut off before the sizes are joined
    bounds = np.cumsum([0] + [-(-len(p) // batch) for p in parts])
    joined = {
        name: np.concatenate([np.concatenate([o[k] for o in outs[bounds[j] : bounds[j + 1]]])[: ns[j]] for j in range(sizes)]) for k, name in enumerate(names)
    }
    return joined, run


def timed_interleaved(runs: list[Callable[[], object]], rounds: int = 8, seconds: float = 6.0, min_runs: int = 3, max_runs: int = 6) -> list[float]:
    """Median wall time (ms) of each of ``runs``, timed in interleaved rounds (:func:`vitedge.timing.interleaved`,
    order reversed every other round), so that a machine whose speed drifts (shared hosts, frequency changes)
    slows every run alike and the comparison between them holds.  After 3 warm-up runs each, each runs once
    untimed then ``min_runs`` to ``max_runs`` times per round, within its share of ``seconds``."""
    slot = Slot(seconds / rounds / max(1, len(runs)), min_runs, max(min_runs, max_runs))
    samples = interleaved(runs, rounds, slot, warmup=Slot(0.0, 3, 3), alternate=True, wake=True)
    return [float(np.median(flat_samples(s))) for s in samples]


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

    return [
        op.get_friendly_name()
        for op in ov_model.get_ordered_ops()
        if op.get_type_name() == "ScaledDotProductAttention"
        or (op.get_type_name() == "MatMul" and not is_const(op.input_value(0)) and not is_const(op.input_value(1)))
    ]


def float_ops_openvino(ov_model) -> list[str]:
    """MatMul/Convolution ops whose activation input is not fake-quantized (i.e. run in float)."""
    out = []
    for op in ov_model.get_ordered_ops():
        if op.get_type_name() in ("MatMul", "Convolution"):
            if op.input_value(0).get_node().get_type_name() != "FakeQuantize":
                out.append(op.get_friendly_name())
    return out


# -- QDQ ONNX: the helpers live in vitedge.graph (imported on use: it loads onnx); these names are the search's -------------
def variant_key(v: dict) -> str:
    return f"{v.get('float_precision') or 'default'}.{'static' if v.get('static') else 'dynamic'}"


def time_models(fmt: str, models: list[dict], sample: Data, fixed_batch: int | None = None, seconds: float = 6.0) -> list[float]:
    """Batch-1 latency (ms, median) of each ``{"path", "float_precision", "static"}``, timed in interleaved rounds
    in this one process so that a machine whose speed drifts slows every model alike (at the first size of ``sample``)."""
    x = [np.asarray(p[: fixed_batch or 1]) for p in _parts(sample)]
    runs = [prepare(Path(m["path"]), fmt, x, m.get("float_precision"), static=bool(m.get("static")), fixed=fixed_batch)[1] for m in models]
    return timed_interleaved(runs, seconds=seconds)


def reference_outputs(fmt: str, source: str, data: Data, out: str, fixed_batch: int | None = None) -> str:
    """The FP32 model's outputs on the images in ``data``, made as the held-out reference is: OpenVINO at f32 for an
    OpenVINO search, ONNX Runtime otherwise."""
    outs, _ = prepare(Path(source), fmt, [np.asarray(p) for p in _parts(data)], "f32" if fmt == "openvino" else None, fixed=fixed_batch)
    np.savez(out, **outs)  # type: ignore[arg-type]  # numpy's stub: any **key could be allow_pickle
    return out


CALLS: dict[str, Callable[..., Any]] = {"quantize_base": quantize_base, "measure": measure, "time_models": time_models, "reference_outputs": reference_outputs}
