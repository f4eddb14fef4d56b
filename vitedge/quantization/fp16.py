"""FP16: ONNX with half-precision weights and math (FP32 inputs/outputs), or OpenVINO IR with FP16 weights.

FP16 stops at 65504.  Real ViTs have residual streams and LayerNorm inputs that go past that
(outlier channels of large models, or a badly scaled fine-tune); a plain conversion then returns
inf/NaN.  :func:`convert_onnx_fp16` guards against it:

1. the FP32 model runs on the calibration images with every float tensor reduced in-graph to its
   largest magnitude (streamed: only a running max per tensor is kept);
2. every node that produces or reads a tensor above ``FP16_MAX / margin`` stays FP32, on top of the
   op types that always stay FP32 (LayerNorm, Softmax, reductions, Pow/Sqrt/Exp/Log);
3. the FP16 model is run on the same images, again with every tensor checked: if a tensor is
   inf/NaN or saturated where FP32 was finite, the nodes where that starts are kept FP32 too and the
   model is converted again (a few rounds); if it cannot be made finite, it is an error.

The nodes kept FP32, why, and the check's result go into the manifest (``quantization.overflow_guard``).
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeGuard

import numpy as np

from .._io import save_onnx
from ..backends.onnxruntime import session
from ..backends.openvino import compiled_model
from ..errors import VitedgeError, first_line
from ..export import compare_outputs

log = logging.getLogger("vitedge")

# ops whose statistics/exponentials overflow or lose too much in half precision: kept in float32
FP16_KEEP_FLOAT = [
    "LayerNormalization",
    "Softmax",
    "ReduceMean",
    "ReduceSum",
    "Pow",
    "Sqrt",
    "Exp",
    "Log",
    "SimplifiedLayerNormalization",
    "SkipLayerNormalization",
]
FP16_MAX = 65504.0
DEFAULT_MARGIN = 2.0  # keep FP32 where calibration saw more than FP16_MAX / margin (head-room for unseen images)
MAX_ROUNDS = 8
SCAN_BATCH = 16  # images per run of an instrumented model
MAX_CHECK_IMAGES = 256  # the overflow scan/check looks at no more than this many images (recorded in the manifest)
_STAT_PREFIX = "vitedge_stat__"
_FLOATS = None  # filled lazily: onnx float element types


def _float_types():
    global _FLOATS
    if _FLOATS is None:
        from onnx import TensorProto

        _FLOATS = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}
    return _FLOATS


# -- data --------------------------------------------------------------------------------------------
def _as_source(data) -> Callable[[], Iterator[np.ndarray]] | None:
    """Accepts None, an object with ``.batches()`` (EvalSet), a zero-arg callable, a batch array, or a list of batches."""
    if data is None:
        return None
    if isinstance(data, np.ndarray):  # one batch
        return lambda: iter([data])
    if hasattr(data, "batches") and callable(data.batches):
        return lambda: data.batches()
    if callable(data):
        return data
    items = list(data)
    return lambda: iter(items)


def _chunks(source, fixed_batch: int | None, limit: int | None = None) -> Iterator[np.ndarray]:
    """Re-chunk batches to at most SCAN_BATCH images (or exactly ``fixed_batch``, padding the last one),
    stopping after ``limit`` images (default MAX_CHECK_IMAGES)."""
    size = fixed_batch or SCAN_BATCH
    left = MAX_CHECK_IMAGES if limit is None else limit
    for x in source():
        x = np.asarray(x, np.float32)
        for i in range(0, len(x), size):
            if left <= 0:
                return
            c = x[i : i + min(size, left)] if not fixed_batch else x[i : i + size]
            left -= len(c)
            if fixed_batch and len(c) < fixed_batch:
                c = np.concatenate([c, np.repeat(c[-1:], fixed_batch - len(c), axis=0)])
            yield c


# -- instrumentation: every float tensor -> (max |x|, finite?) computed inside the graph --------------
def _tensor_types(proto) -> dict[str, int]:
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(proto)
    except Exception as exc:
        log.debug("shape inference failed (%s)", exc)
        inferred = proto
    g = inferred.graph
    types = {}
    for vi in list(g.value_info) + list(g.input) + list(g.output):
        if vi.type.HasField("tensor_type"):
            types[vi.name] = vi.type.tensor_type.elem_type
    return types


def _instrument(proto) -> tuple[object, list[str], dict[str, int]]:
    """A copy of ``proto`` with two scalar outputs per float activation: max |x| and sum(x - x)
    (0 when every element is finite, NaN otherwise)."""
    import onnx_ir as ir

    from .. import graph

    types = _tensor_types(proto)
    floats = _float_types()
    model = graph.as_model(proto)  # a view: the statistics nodes are added to it, ``proto`` stays as it is
    g = model.graph
    vals = graph.values(model)
    names = [v.name for v in g.inputs if v.name and not v.is_initializer()] + [v.name for n in g for v in n.outputs if v.name]
    watched = []
    seen = set()

    def add(op: str, inputs: list, name: str, out: str, **attrs):
        node = ir.node(op, inputs, attrs, name=name)
        node.outputs[0].name = out
        g.append(node)
        return node.outputs[0]

    for k, t in enumerate(names):
        if t in seen or vals[t].is_initializer() or types.get(t) not in floats:
            continue
        seen.add(t)
        p = f"{_STAT_PREFIX}{k}"
        src = vals[t]
        if types[t] != ir.DataType.FLOAT:
            src = add("Cast", [src], f"{p}_cast", f"{p}_f32", to=ir.DataType.FLOAT)
        mx = add("ReduceMax", [add("Abs", [src], f"{p}_absn", f"{p}_abs")], f"{p}_maxn", f"{p}_max", keepdims=0)
        fin = add("ReduceSum", [add("Sub", [src, src], f"{p}_subn", f"{p}_diff")], f"{p}_finn", f"{p}_fin", keepdims=0)
        for v in (mx, fin):
            v.type, v.shape = ir.TensorType(ir.DataType.FLOAT), ir.Shape([])
        g.outputs.extend([mx, fin])
        watched.append(t)
    return graph.to_proto(model), watched, {t: types[t] for t in watched}


@dataclass
class TensorStats:
    """Running statistics of every float tensor over a stream of batches (constant memory)."""

    max_abs: dict[str, float] = field(default_factory=dict)
    nonfinite: set[str] = field(default_factory=set)
    types: dict[str, int] = field(default_factory=dict)  # ONNX element type each tensor is declared with
    outputs: list[np.ndarray] = field(default_factory=list)  # the model's first output (logits), for comparison
    images: int = 0

    @property
    def fp16_overflow(self) -> set[str]:
        """Tensors that are inf/NaN, or declared FP16 yet beyond its range.  (ONNX Runtime's CPU provider
        runs FP16 ops that lack a CPU kernel in FP32 and may skip the rounding to FP16 in between; an FP16
        device would get inf there, so such tensors count as overflowing.)"""
        from onnx import TensorProto

        return set(self.nonfinite) | {t for t, m in self.max_abs.items() if self.types.get(t) == TensorProto.FLOAT16 and m > FP16_MAX}


def scan_tensors(proto, data, workdir: Path) -> TensorStats:
    """Run ``proto`` with ONNX Runtime on ``data`` and keep per-tensor max |x| and inf/NaN flags."""

    source = _as_source(data)
    inst, watched, types = _instrument(proto)
    path = Path(workdir) / f"scan_{id(inst)}.onnx"
    save_onnx(inst, path)
    del inst
    sess = session(path, opt_level="disable")  # scan the graph as written
    inp = sess.get_inputs()[0]
    fixed = inp.shape[0] if inp.shape and isinstance(inp.shape[0], int) else None
    first = sess.get_outputs()[0].name
    all_outs = [o.name for o in sess.get_outputs()]
    max_names = [o for o in all_outs if o.startswith(_STAT_PREFIX) and o.endswith("_max")]
    fin_names = [o for o in all_outs if o.startswith(_STAT_PREFIX) and o.endswith("_fin")]
    out_names = [first] + max_names + fin_names
    stats = TensorStats(types=types)
    n = len(max_names)
    for x in _chunks(source, fixed):
        res = sess.run(out_names, {inp.name: x})
        stats.outputs.append(np.asarray(res[0], np.float32))
        stats.images += len(x)
        for t, m, f in zip(watched, res[1 : 1 + n], res[1 + n :], strict=True):
            m, f = float(m), float(f)
            if not np.isfinite(f) or not np.isfinite(m):
                stats.nonfinite.add(t)
            if np.isfinite(m):
                stats.max_abs[t] = max(stats.max_abs.get(t, 0.0), m)
            else:
                stats.max_abs[t] = float("inf")
    del sess
    path.unlink(missing_ok=True)
    Path(str(path) + ".data").unlink(missing_ok=True)
    if not stats.images:
        raise VitedgeError("no images to check the FP16 conversion on")
    return stats


# -- conversion -----------------------------------------------------------------------------------
@dataclass
class Fp16Result:
    kept: list[str]  # every node left in FP32 (op-type list + overflow guard)
    guard: dict  # what the overflow guard found and did (goes into the manifest)


def _convert(proto, block_nodes: set[str], direct: bool = True):
    import onnx
    from onnxruntime.transformers.float16 import (
        DEFAULT_OP_BLOCK_LIST,
        convert_float_to_float16,
    )

    cp = onnx.ModelProto()
    cp.CopyFrom(proto)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            root = logging.getLogger()
            was, root.disabled = root.disabled, True
            try:
                half = convert_float_to_float16(
                    cp, keep_io_types=True, op_block_list=list(DEFAULT_OP_BLOCK_LIST) + FP16_KEEP_FLOAT, node_block_list=sorted(block_nodes)
                )
            finally:
                root.disabled = was
        from .. import graph

        model = graph.as_model(half)
        if direct:
            _skip_fp16_roundtrips(model)
        toposort(model)
        return graph.to_proto(model)
    except Exception as exc:
        raise VitedgeError(f"FP16 conversion failed: {type(exc).__name__}: {first_line(exc, 200)}") from None


def _skip_fp16_roundtrips(model) -> int:
    """The ORT converter links two FP32 nodes through FP16 (Cast to FP16, then back to FP32), which
    overflows exactly where the guard kept nodes in FP32: FP32 readers get the FP32 tensor directly
    (``model``: an ``ir.Model``).  Returns how many round trips were skipped."""
    import onnx_ir as ir

    from .. import graph

    def cast_to(node, dtype) -> TypeGuard[ir.Node]:
        return node is not None and node.op_type == "Cast" and node.attributes.get_int("to") == dtype

    skipped = 0
    for up in list(model.graph):
        fp16 = up.inputs[0] if cast_to(up, ir.DataType.FLOAT) else None
        down = fp16.producer() if fp16 is not None else None
        if cast_to(down, ir.DataType.FLOAT16) and (fp32 := down.inputs[0]) is not None and (fp32.dtype or ir.DataType.FLOAT) == ir.DataType.FLOAT:
            skipped += graph.bypass(up, fp32)  # the FP16 Cast nobody reads any more goes in toposort()
    return skipped


def toposort(model) -> None:
    """Put the nodes in topological order and drop the Casts nobody reads (the ORT converter appends its
    Casts at the end, which ONNX forbids and strict consumers such as ``onnx.reference`` reject).
    Takes an ``ir.Model`` or an ``onnx.ModelProto`` (edited in place)."""
    from .. import graph

    graph.tidy(model)


def _name_nodes(proto) -> None:
    seen = set()
    for i, n in enumerate(proto.graph.node):
        if not n.name or n.name in seen:
            n.name = f"{n.op_type}_{i}"
        seen.add(n.name)


def _bad_fp16(t: str, s16: TensorStats, s32: TensorStats) -> bool:
    """Tensor that FP16 broke: inf/NaN (or an FP16 tensor past its range) where FP32 was finite."""
    if t in s32.nonfinite:
        return False
    return t in s16.fp16_overflow


def convert_onnx_fp16(model: Path, out: Path, data=None, *, margin: float = DEFAULT_MARGIN, max_rounds: int = MAX_ROUNDS, guard: bool = True) -> Fp16Result:
    """FP16 ONNX (FP32 I/O) that stays finite on ``data``: overflow-prone nodes are kept in FP32.

    ``data``: preprocessed batches to check on (an ``EvalSet``, a list of arrays, or a zero-arg
    callable returning an iterator of arrays); without it only the op-type list applies.
    ``guard=False`` gives the plain conversion (op-type list only), for comparison.
    """
    import onnx

    proto = onnx.load(str(model))
    _name_nodes(proto)
    g = proto.graph
    op_kept = [n.name for n in g.node if n.op_type in FP16_KEEP_FLOAT]
    info: dict = {"threshold": FP16_MAX / margin, "margin": margin, "checked": False}
    block: dict[str, str] = {}  # node name -> reason
    source = _as_source(data) if guard else None
    if source is None:
        half = _convert(proto, set(), direct=guard)
        if guard:
            info["note"] = "no images to check on: only the op-type list kept FP32"
    else:
        from .. import graph

        producer, consumers = graph.name_maps(proto)  # tensor name -> node(s), the stats are per tensor name
        with tempfile.TemporaryDirectory(prefix="vitedge_fp16_") as tmp:
            s32 = scan_tensors(proto, source, Path(tmp))
            ref = np.concatenate(s32.outputs)
            s32.outputs = []
            limit = FP16_MAX / margin
            # tensors too large for FP16 (with head-room): their producer and every reader stay FP32
            hot = {t: m for t, m in s32.max_abs.items() if m > limit and np.isfinite(m)}
            for init in g.initializer:  # weights past the FP16 range would be clipped: their readers stay FP32
                if init.data_type == onnx.TensorProto.FLOAT and consumers.get(init.name):
                    arr = onnx.numpy_helper.to_array(init)
                    if arr.size and float(np.abs(arr).max()) > FP16_MAX:
                        hot[init.name] = float(np.abs(arr).max())
            for t, m in hot.items():
                if t in producer:
                    block.setdefault(graph.node_name(producer[t]), f"output {t} reaches |x|={m:.4g}")
                for c in consumers.get(t, []):
                    block.setdefault(graph.node_name(c), f"reads {t} (|x|={m:.4g})")
            info["hot_tensors"] = {t: hot[t] for t in sorted(hot, key=lambda k: -hot[k])[:50]}
            info["hot_tensor_count"] = len(hot)
            info["largest_fp32_activation"] = max((m for m in s32.max_abs.values() if np.isfinite(m)), default=0.0)
            if s32.nonfinite:
                info["fp32_nonfinite_tensors"] = sorted(s32.nonfinite)[:20]
            rounds = []
            for r in range(max_rounds):
                half = _convert(proto, set(block))
                s16 = scan_tensors(half, source, Path(tmp))
                out16 = np.concatenate(s16.outputs)
                bad = [t for t in s16.max_abs.keys() | s16.nonfinite if t in producer and _bad_fp16(t, s16, s32)]
                rounds.append({"round": r + 1, "kept_fp32": len(block), "bad_tensors": len(bad), "output_finite": bool(np.isfinite(out16).all())})
                if not bad and np.isfinite(out16).all():
                    break
                badset = set(bad)
                # where the trouble starts: bad tensors none of whose float activation inputs are bad, and
                # every bad tensor FP16 cannot hold even in principle (FP32 saw it past 65504)
                origins = [
                    producer[t] for t in bad if not any(i is not None and i.name in badset for i in producer[t].inputs) or s32.max_abs.get(t, 0.0) > FP16_MAX
                ]
                new = 0
                for nd in origins:
                    for o in (v.name or "" for v in nd.outputs):  # "" (unnamed): nobody reads it by name
                        if graph.node_name(nd) not in block:
                            block[graph.node_name(nd)] = f"inf/NaN in FP16 check (round {r + 1})"
                            new += 1
                        for c in consumers.get(o, []):
                            if graph.node_name(c) not in block:
                                block[graph.node_name(c)] = f"reads {o}, inf/NaN in FP16 check (round {r + 1})"
                                new += 1
                if not new:
                    break
            else:
                half = _convert(proto, set(block))
                s16 = scan_tensors(half, source, Path(tmp))
                out16 = np.concatenate(s16.outputs)
                bad = [t for t in s16.max_abs.keys() | s16.nonfinite if t in producer and _bad_fp16(t, s16, s32)]
            if bad or not np.isfinite(out16).all():
                raise VitedgeError(
                    f"FP16 still overflows after keeping {len(block) + len(op_kept)} nodes in FP32 (first bad tensor: {sorted(bad)[0] if bad else 'output'})",
                    "use FP32 or BF16 for this model (e.g. OpenVINO, whose CPU plugin runs BF16), or fix the activations' scale",
                )
            finite16 = [m for t, m in s16.max_abs.items() if np.isfinite(m) and s16.types.get(t) == onnx.TensorProto.FLOAT16]
            info.update(
                checked=True,
                images=s32.images,
                rounds=rounds,
                agreement_on_check_images=compare_outputs(ref, out16),
                largest_fp16_activation=max(finite16, default=0.0),  # over the tensors left in FP16
                headroom=FP16_MAX / max(max(finite16, default=1e-30), 1e-30),
            )
    save_onnx(half, out)
    info["kept_fp32_for_overflow"] = [{"node": k, "reason": v} for k, v in block.items() if k not in op_kept]
    kept = op_kept + [k for k in block if k not in op_kept]
    return Fp16Result(kept, info)


# -- OpenVINO ------------------------------------------------------------------------------------
def openvino_fp16(model: Path, out_xml: Path, data=None) -> dict:
    """OpenVINO IR with FP16-compressed weights, checked for inf/NaN on ``data`` as compiled for the CPU.

    ``compress_to_fp16`` only stores weights as FP16; the device picks the compute precision (the CPU
    plugin: BF16 on CPUs with AVX-512 BF16/AMX, FP16 on some ARM CPUs, else FP32; BF16 has FP32's
    range).  With ``data``, the FP32 model is scanned like the ONNX guard does; tensors beyond
    ``FP16_MAX / 2`` are listed and the IR is flagged ``fp16_compute_safe: false`` (an IR cannot carry
    per-op precision: run such a model with inference precision f32/bf16 on devices that compute in
    FP16).  The compiled CPU model is then checked for inf/NaN.  Returns what was found.
    """
    import openvino as ov

    source = _as_source(data)
    info: dict = {}
    if source is not None:  # the same FP32 scan as the ONNX guard: what FP16 arithmetic could not hold
        import onnx

        proto = onnx.load(str(model))
        with tempfile.TemporaryDirectory(prefix="vitedge_fp16_") as tmp:
            s32 = scan_tensors(proto, source, Path(tmp))
        del proto
        limit = FP16_MAX / DEFAULT_MARGIN
        hot = {t: m for t, m in s32.max_abs.items() if m > limit and np.isfinite(m)}
        info.update(
            threshold=limit,
            hot_tensors={t: hot[t] for t in sorted(hot, key=lambda k: -hot[k])[:50]},
            hot_tensor_count=len(hot),
            largest_fp32_activation=max((m for m in s32.max_abs.values() if np.isfinite(m)), default=0.0),
            fp16_compute_safe=not hot,
        )
        if hot:
            info["advice"] = "activations exceed FP16: on devices that compute in FP16 (GPU, some ARM CPUs) set INFERENCE_PRECISION_HINT to f32 (or bf16)"
    try:
        ov_model = ov.convert_model(str(model))
        ov.save_model(ov_model, str(out_xml), compress_to_fp16=True)
    except Exception as exc:
        raise VitedgeError(f"OpenVINO FP16 conversion failed: {first_line(exc, 200)}") from None
    if source is None:
        return info
    compiled = compiled_model(out_xml, "CPU")
    prec = str(compiled.get_property("INFERENCE_PRECISION_HINT"))
    shape0 = compiled.inputs[0].get_partial_shape()[0]
    fixed = shape0.get_length() if shape0.is_static else None
    finite, n, largest = True, 0, 0.0
    for x in _chunks(source, fixed):
        y = np.asarray(compiled(x)[0])
        n += len(x)
        finite &= bool(np.isfinite(y).all())
        if np.isfinite(y).any():
            largest = max(largest, float(np.abs(y[np.isfinite(y)]).max()))
    del compiled
    info.update(checked=True, cpu_inference_precision=prec, images=n, output_finite=finite, largest_output=largest)
    if not finite:
        raise VitedgeError(
            f"the FP16 IR gives inf/NaN on the CPU (inference precision {prec}) on {n} check images",
            "compile with inference precision f32, or use --backend onnxruntime (overflow-guarded FP16)",
        )
    return info
