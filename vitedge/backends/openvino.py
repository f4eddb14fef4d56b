"""OpenVINO backend: fastest on Intel/AMD CPUs (and other OpenVINO devices).

Opens an IR (``.xml``/``.bin``) or a compiled blob (``.blob``, from ``vitedge compile --blob``).
The device and the properties recorded at compile time (performance hint, threads, streams,
inference precision) are used unless ``device=``/``config=`` override them.  When an IR has a blob
beside it that was exported by the same OpenVINO version for the same device, the blob is imported
instead of compiling the IR again (a faster cold start); ``use_blob=False`` turns that off.

Thread-safe: each call takes its own infer request from a pool (as many as OpenVINO recommends for
the hint, at least 2; ``requests=`` sets the number), so concurrent callers run in parallel on
throughput engines; the others wait for a free request, and a close() wakes them with an error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ModelNotSupported, ShapeMismatch, VitedgeError, first_line
from ..manifest import Manifest
from .base import Engine, mac_summary
from .registry import Backend, register

_core = None


def core():
    """One shared ``ov.Core`` (creating it loads the device plugins)."""
    global _core
    if _core is None:
        import openvino as ov

        _core = ov.Core()
    return _core


def split_keepdims_reductions(model) -> int:
    """Rewrite every ReduceMean/ReduceMax/ReduceSum with ``keep_dims=False`` as the same reduction with
    ``keep_dims=True`` followed by a Squeeze of those axes (in place; the values are identical).  Returns how many.

    Why: OpenVINO's CPU plugin (seen in 2026.4) fuses a per-channel FakeQuantize that follows such a reduction
    into it and then quantizes every channel with channel 0's parameters.  A mean-pooled classifier head with
    SmoothQuant lost up to 89 quantization steps on the pooled half of its input; it was what made static
    batch-1 INT8 engines less faithful than dynamic ones (docs/openvino_static_batch.md has the numbers and a
    minimal reproduction).  With keep_dims=True the plugin does not fuse, and the engine computes the IR."""
    from openvino import opset13 as ops

    makers = {"ReduceMean": ops.reduce_mean, "ReduceMax": ops.reduce_max, "ReduceSum": ops.reduce_sum}
    n = 0
    for node in model.get_ordered_ops():
        make = makers.get(node.get_type_name())
        if make is None or node.get_attributes().get("keep_dims", True):
            continue
        kept = make(node.input_value(0), node.input_value(1), True)
        squeezed = ops.squeeze(kept, node.input_value(1))
        kept.set_friendly_name(node.get_friendly_name() + "/keep_dims")
        squeezed.set_friendly_name(node.get_friendly_name())
        for target in list(node.output(0).get_target_inputs()):
            target.replace_source_output(squeezed.output(0))
        n += 1
    return n


def expose_attention(model) -> int:
    """Add the attention probabilities of every block to ``model``'s outputs (in place, after the existing ones, in
    block order); returns how many.

    A Softmax read by a MatMul (probabilities · V) is added as it is.  When OpenVINO converts an ONNX file it fuses
    each block's MatMul-Softmax-MatMul into one ``ScaledDotProductAttention`` op (seen with 2026.4), so the IR itself
    hides the probabilities: each such op gets a side branch computing ``softmax(q·kᵀ·scale + mask)`` from the op's
    own inputs (its q, k, scale and mask, so an INT8 IR's quantized q and k), while the op still computes the
    block's output, so the engine's outputs are unchanged."""
    import numpy as np
    from openvino import opset13 as ops

    probs = []
    for node in model.get_ordered_ops():
        kind = node.get_type_name()
        if kind == "Softmax" and _read_by_matmul(node.output(0)):
            probs.append(node.output(0))
        elif kind == "ScaledDotProductAttention":
            if node.get_attributes().get("causal"):
                raise ModelNotSupported(f"attention {node.get_friendly_name()} is causal: not a ViT encoder's", "attention maps are for ViT classifiers")
            q, k = node.input_value(0), node.input_value(1)
            logits = ops.matmul(q, k, False, True)
            if node.get_input_size() > 4:
                logits = ops.multiply(logits, node.input_value(4))
            else:
                depth = q.get_partial_shape()[-1]
                if depth.is_dynamic:
                    raise ModelNotSupported(f"attention {node.get_friendly_name()} has no scale and a dynamic head size")
                logits = ops.multiply(logits, ops.convert_like(ops.constant(np.float32(depth.get_length() ** -0.5)), logits))
            if node.get_input_size() > 3:
                mask = node.input_value(3)
                if mask.get_element_type().get_type_name() == "boolean":  # False: not attended
                    mask = ops.select(mask, ops.convert_like(ops.constant(np.float32(0)), logits), ops.convert_like(ops.constant(np.float32(-np.inf)), logits))
                logits = ops.add(logits, mask)
            soft = ops.softmax(logits, -1)
            soft.set_friendly_name(node.get_friendly_name() + "/attention_probabilities")
            probs.append(soft.output(0))
    if probs:
        model.add_outputs(probs)
    return len(probs)


def _read_by_matmul(output, depth: int = 4) -> bool:
    """Whether ``output`` is the first input of a MatMul, directly or through quantizers, converts and layout ops."""
    through = ("FakeQuantize", "Convert", "Reshape", "Transpose", "Squeeze", "Unsqueeze")
    for target in output.get_target_inputs():
        node = target.get_node()
        if node.get_type_name() == "MatMul" and target.get_index() == 0:
            return True
        if depth > 1 and node.get_type_name() in through and target.get_index() == 0 and _read_by_matmul(node.output(0), depth - 1):
            return True
    return False


def compiled_model(model, device: str = "CPU", config: dict | None = None, shape=None):
    """``model`` (an IR or ONNX path, or an ``ov.Model``, which is edited in place) compiled for ``device`` with
    ``config`` on the shared :func:`core`; ``shape``: the input reshaped to it first (e.g. ``[1, 3, 224, 224]``
    for a static batch 1).  Reductions are rewritten first (:func:`split_keepdims_reductions`), so IRs written
    elsewhere are not hit by OpenVINO's fused Reduce + FakeQuantize either."""
    import openvino as ov

    c = core()
    m = c.read_model(str(model)) if not isinstance(model, ov.Model) else model
    split_keepdims_reductions(m)
    if shape is not None:
        m.reshape({m.inputs[0]: ov.PartialShape(list(shape))})
    return c.compile_model(m, device, config or {})


def _blob_usable(artifact: Path, manifest: Manifest | None, device: str) -> Path | None:
    import openvino as ov

    info = (manifest.compile.get("blob") if manifest else None) or {}
    if not info or artifact.suffix != ".xml":
        return None
    blob = artifact.parent / info["file"]
    if blob.exists() and info.get("device") == device and info.get("openvino") == ov.__version__:
        return blob
    return None


# -- compile ------------------------------------------------------------------------------------
def openvino_config(hint: str, threads: int | None, streams: int | str | None, precision_hint: str | None) -> dict[str, str]:
    """The properties given to ``Core.compile_model`` (strings, as OpenVINO accepts them)."""
    cfg = {"PERFORMANCE_HINT": hint.upper()}
    if threads:
        cfg["INFERENCE_NUM_THREADS"] = str(int(threads))
    if streams is not None:
        cfg["NUM_STREAMS"] = str(streams).upper()
    if precision_hint:
        cfg["INFERENCE_PRECISION_HINT"] = precision_hint
    return cfg


def check_device(device: str) -> None:
    avail = core().available_devices
    base = device.split(":", 1)[0].split(".", 1)[0]
    if base in ("AUTO", "MULTI", "HETERO", "BATCH"):
        return
    if device not in avail and base not in {d.split(".", 1)[0] for d in avail}:
        raise VitedgeError(f"OpenVINO device {device!r} is not present on this machine", f"available: {', '.join(avail) or 'none'}")


def _type_name(value) -> str:
    return value.to_string() if hasattr(value, "to_string") else str(value)


_bf16: bool | None = None


def cpu_has_bf16() -> bool:
    """Whether OpenVINO computes BF16 natively on this CPU: its own answer (``OPTIMIZATION_CAPABILITIES``
    lists ``BF16``; it knows every ISA its kernels use: AVX-512 BF16, AMX, AVX2-VNNI-2), not our reading
    of the CPU flags."""
    global _bf16
    if _bf16 is None:
        try:
            _bf16 = "BF16" in core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
        except Exception:  # no CPU plugin (stripped OpenVINO build): nothing runs in BF16 then
            _bf16 = False
    return _bf16


def default_precision_hint(precision: str, device: str = "CPU") -> str | None:
    """OpenVINO's inference precision when none is asked for.

    INT8 models on a CPU with AVX-512 BF16 or AMX: ``bf16`` for the ops left in float (residual adds,
    LayerNorm, Softmax, GELU, attention glue).  With OpenVINO 2026.4 the INT8 FullyConnected kernels
    write bf16 directly, so no reorders are added, and the float glue moves half the bytes: measured
    faster on ViT-S/ViT-B (benchmarks/ablation.md; issue 9 saw the opposite with an older OpenVINO).
    Other CPUs: ``f32``.  FP32/FP16 models: the device default (bf16 where supported, ~1.5x faster).
    """
    if precision != "int8":
        return None
    return "bf16" if device.split(":", 1)[0] == "CPU" and cpu_has_bf16() else "f32"


def compile_openvino(
    src: Path, man: Manifest, scratch: Path, out_name: str, *, batch, threads, hint, precision_hint, device, img_size=None, streams=None, export_blob=False
) -> tuple[list[str], dict, str]:
    import openvino as ov

    device = device or "CPU"
    check_device(device)
    precision = man.precision
    try:
        model = ov.convert_model(str(src)) if src.suffix == ".onnx" else core().read_model(str(src))
    except Exception as exc:  # openvino raises RuntimeError/OpConversionFailure with long traces
        raise VitedgeError(f"OpenVINO cannot read {src.name}: {first_line(exc)}") from None
    if batch is not None:
        shape = list(model.inputs[0].get_partial_shape())
        if shape[0].is_static and shape[0].get_length() != batch:
            raise ShapeMismatch(
                f"{src.name} has a fixed batch of {shape[0].get_length()}, not {batch}",
                f"compile with --batch {shape[0].get_length()}, or re-export with --batch dynamic",
            )
        model.reshape({model.inputs[0]: ov.PartialShape([batch] + shape[1:])})
    rewritten = split_keepdims_reductions(model)  # the saved engine is right in any OpenVINO runtime, not only vitedge's
    # FP32 weights stay FP32 (save_model would halve them by default); FP16 inputs keep FP16
    ov.save_model(model, str(scratch / out_name), compress_to_fp16=precision == "fp16")
    files = [out_name, Path(out_name).with_suffix(".bin").name]
    # the INT8 fidelity search measured which float precision keeps the predictions on this CPU (f32 or bf16)
    searched = man.searched("float_precision") if device.split(":", 1)[0] == "CPU" else None
    cfg = openvino_config(hint, threads, streams, precision_hint or searched or default_precision_hint(precision, device))
    settings: dict[str, Any] = {"device": device, "openvino_config": cfg, "openvino": ov.__version__, "reductions_split": rewritten}
    try:
        compiled = compiled_model(scratch / out_name, device, cfg)
    except Exception as exc:
        raise VitedgeError(f"OpenVINO cannot compile {src.name} for {device}: {first_line(exc)}") from None
    settings["inference_precision"] = _type_name(compiled.get_property("INFERENCE_PRECISION_HINT")) if device == "CPU" else None
    if export_blob:
        blob = Path(out_name).with_suffix(".blob").name
        data = compiled.export_model()  # bytes, or io.BytesIO in recent OpenVINO releases
        (scratch / blob).write_bytes(data.getvalue() if hasattr(data, "getvalue") else data)
        files.append(blob)
        settings["blob"] = {"file": blob, "device": device, "openvino": ov.__version__}
    del compiled
    hint_used = precision_hint or searched
    if precision == "fp32" and hint_used in ("bf16", "f16"):
        precision = "bf16" if hint_used == "bf16" else "fp16"
    return files, settings, precision


# -- which precision layers really ran in --------------------------------------------------------
_OV_PREC = {"i8": "int8", "u8": "int8", "bf16": "bf16", "f16": "fp16", "f32": "fp32", "i32": "int32"}


def _dims(shape) -> list[int]:
    out = []
    for d in shape:
        try:
            v = int(d.get_length()) if hasattr(d, "get_length") else int(d)
        except Exception:  # dynamic dimension
            v = 1
        out.append(max(v, 1))
    return out


def openvino_precision_breakdown(compiled) -> dict:
    """Precision of every MatMul/FullyConnected/Convolution in OpenVINO's runtime graph and the MAC share of each."""
    layers = []
    for op in compiled.get_runtime_model().get_ordered_ops():
        ri = op.get_rt_info()
        if "layerType" not in ri:
            continue
        kind = ri["layerType"].astype(str)
        if kind not in ("FullyConnected", "MatMul", "Convolution", "Deconvolution"):
            continue
        prec = _OV_PREC.get(ri["runtimePrecision"].astype(str), ri["runtimePrecision"].astype(str)) if "runtimePrecision" in ri else "?"
        try:
            out = _dims(op.get_output_partial_shape(0))
            ins = [_dims(op.get_input_partial_shape(i)) for i in range(op.get_input_size())]
        except Exception:
            continue
        if kind == "FullyConnected" and len(ins) > 1:
            k = ins[1][-1]
        elif kind in ("Convolution", "Deconvolution") and len(ins) > 1:
            k = int(np.prod(ins[1][1:]))
        else:
            k = ins[0][-1] if ins and ins[0] else 1
        layers.append({"name": op.get_friendly_name(), "type": kind, "precision": prec, "macs": int(np.prod(out)) * int(k)})
    return mac_summary(layers, "openvino runtime model (runtimePrecision per layer; fused attention subgraphs not counted)")


class OpenVINOEngine(Engine):
    """Runs an IR or a compiled blob.  Thread-safe via a pool of infer requests (``requests=``; by default as many
    as the device recommends for the hint, at least 2): up to that many calls run at once, the others wait."""

    backend = "openvino"

    def __init__(
        self, artifact: Path, manifest: Manifest, device: str | None = None, config: dict | None = None, requests: int | None = None, use_blob: bool = True
    ):
        super().__init__(artifact, manifest)
        import openvino as ov

        settings = manifest.compile if manifest and manifest.backend == "openvino" else {}
        device = device or settings.get("device") or "CPU"
        cfg = {"PERFORMANCE_HINT": "LATENCY", **settings.get("openvino_config", {}), **(config or {})}
        self.device = device
        self._config = cfg
        self._attention_model: Any = None  # built by the first attention() call
        blob = artifact if artifact.suffix == ".blob" else (_blob_usable(artifact, manifest, device) if use_blob else None)
        if artifact.suffix == ".blob":
            info = settings.get("blob") or {}
            if info.get("openvino") and info["openvino"] != ov.__version__:
                raise VitedgeError(
                    f"{artifact.name} was exported by OpenVINO {info['openvino']}, this is {ov.__version__}",
                    "open the .xml instead, or re-create the blob with vitedge compile --blob",
                )
            if info.get("device") and info["device"] != device:
                raise VitedgeError(f"{artifact.name} was compiled for {info['device']}, not {device}", "open the .xml to compile for another device")
        try:
            if blob is not None:
                with open(blob, "rb") as f:
                    self.compiled = core().import_model(f.read(), device, cfg)
            else:
                self.compiled = compiled_model(artifact, device, cfg)
        except Exception as exc:  # openvino raises RuntimeError with long traces
            raise VitedgeError(
                f"OpenVINO cannot load {artifact} on {device}: {first_line(exc)}", "is the file complete? re-create it with vitedge compile"
            ) from None
        self.from_blob = blob is not None
        self._outputs = list(self.compiled.outputs)
        # OpenVINO may give an output several names (e.g. after a Cast from an FP16 ONNX): prefer the manifest's
        want = [o.name for o in manifest.outputs] if manifest else []
        self._names = []
        for i, o in enumerate(self._outputs):
            names = o.get_names()
            self._names.append(next((n for n in want if n in names), want[i] if len(want) == len(self._outputs) else o.get_any_name()))
        if requests is None:
            try:
                requests = max(2, int(self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
            except Exception:  # not every device reports it
                requests = 2
        elif int(requests) < 1:
            raise VitedgeError(f"requests={requests}: an OpenVINO engine needs at least 1 infer request")
        # each call borrows its own infer request (Engine._take waits for a free one, and wakes on close)
        self._pool: list = [self.compiled.create_infer_request() for _ in range(int(requests))]

    @property
    def properties(self) -> dict:
        """The properties the device actually applied (hint, threads, streams, precision)."""
        out = {}
        for key in ("PERFORMANCE_HINT", "INFERENCE_NUM_THREADS", "NUM_STREAMS", "INFERENCE_PRECISION_HINT"):
            try:
                v = self.compiled.get_property(key)
                out[key] = v.to_string() if hasattr(v, "to_string") else str(v)
            except Exception:  # property not supported by this device
                pass
        return out

    def precision_breakdown(self) -> dict | None:
        return openvino_precision_breakdown(self.compiled)

    def _run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        req = self._take(self._pool)  # each caller gets its own infer request: safe for concurrent use
        try:
            res = req.infer({0: batch})
            return {n: np.array(res[o]) for n, o in zip(self._names, self._outputs, strict=True)}
        except RuntimeError as exc:
            raise VitedgeError(f"OpenVINO could not run a batch of shape {tuple(batch.shape)}: {first_line(exc, 200)}") from None
        finally:
            self._give(self._pool, req)

    def _run_attention(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        # a second compiled model: the IR with its attention probabilities added as outputs (expose_attention)
        with self._lock:
            if self._attention_model is None:
                self._attention_model = self._attention_copy()
        compiled = self._attention_model
        added = list(compiled.outputs)[len(self._outputs) :]
        try:
            res = compiled.create_infer_request().infer({0: batch})  # a request of its own per call: thread-safe
        except RuntimeError as exc:
            raise VitedgeError(f"OpenVINO could not run a batch of shape {tuple(batch.shape)}: {first_line(exc, 200)}") from None
        return {f"attention_{i}": np.array(res[o]) for i, o in enumerate(added)}

    def _attention_copy(self):
        ir = self.artifact if self.artifact.suffix != ".blob" else self.artifact.with_suffix(".xml")
        if not ir.exists():
            raise VitedgeError(
                f"{self.artifact.name} is a compiled blob: its graph cannot be given extra outputs", "put the .xml/.bin it was compiled from beside it"
            )
        model = core().read_model(str(ir))
        if not expose_attention(model):
            raise VitedgeError(
                f"{ir.name} has no attention Softmax or ScaledDotProductAttention that vitedge can find",
                "attention maps need a ViT's attention as MatMul/Softmax/MatMul or OpenVINO's fused attention op",
            )
        try:
            return compiled_model(model, self.device, self._config)
        except Exception as exc:  # openvino raises RuntimeError with long traces
            raise VitedgeError(f"OpenVINO cannot compile {ir.name} with its attention exposed: {first_line(exc)}") from None

    def _release(self) -> None:
        # called by Engine.close() once no call is in flight: every request is back in the pool
        self._pool.clear()
        del self.compiled
        self._attention_model = None


BACKEND = register(
    Backend(
        name="openvino",
        summary="OpenVINO on Intel/AMD CPUs (and Intel GPUs/NPUs): IR .xml/.bin, optional compiled .blob",
        engine=OpenVINOEngine,
        runs=(".xml", ".blob"),
        compiler=compile_openvino,
        compile_options=("streams", "export_blob"),
        engine_suffix=".xml",
        engine_name="{stem}.ov.xml",
        engine_format="openvino",
        quantize=("int8", "fp16", "auto"),
        quantized_suffix=".xml",
        quantizer="vitedge.quantization.strategies:OPENVINO",
        benchmark={"fp32": "f32", "fp16": None, "bf16": "bf16", "int8": None},
    )
)
