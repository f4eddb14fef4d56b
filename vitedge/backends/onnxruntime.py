"""ONNX Runtime backend: the embedded default that runs everywhere.

A compiled ONNX Runtime engine (``vitedge compile --backend onnxruntime``) is the graph already
optimised at the portable "extended" level; loading it runs only the fast hardware-specific passes.
The thread count recorded at compile time is used unless ``threads=`` is given.  CUDA / TensorRT
execution providers are used when the installed onnxruntime has them (``providers=`` overrides).
``InferenceSession.run`` is thread-safe, so one engine serves concurrent callers without a lock.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .._io import needs_external_data
from .._onnx import INTEGER_KERNEL_OPS
from ..errors import VitedgeError, first_line
from ..manifest import Manifest
from .base import Engine, mac_summary
from .registry import Backend, register

OPT_LEVELS = ("disable", "basic", "extended", "all")


def disabled_optimizers(precision: str | None) -> list[str]:
    """ONNX Runtime optimizers to turn off for a model of this precision.

    INT8 QDQ with static shapes: MatMulAddFusion would turn each MatMul + bias into a float Gemm before
    the QDQ fusion runs, and the Gemm (no quantized output) would never become an integer kernel; without
    it, every DequantizeLinear -> MatMul pair becomes MatMulIntegerToFloat.
    """
    return ["MatMulAddFusion"] if precision == "int8" else []


def _optimization_level(name: str):
    import onnxruntime as ort

    levels = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    if name not in levels:
        raise VitedgeError(f"unknown ONNX Runtime optimisation level {name!r}", f"use one of {', '.join(levels)}")
    return levels[name]


def session_options(threads: int | None = None, optimized_model_path: str | None = None, opt_level: str = "all"):
    """The options of vitedge's engines: ``threads`` intra-op threads (default: every core), one inter-op
    thread, sequential execution, quiet."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = threads or (os.cpu_count() or 1)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = _optimization_level(opt_level)
    if optimized_model_path:
        so.optimized_model_filepath = optimized_model_path
    return so


def session(
    model, options=None, *, threads: int | None = None, opt_level: str | None = None, precision: str | None = None, providers: Sequence[str] | None = None
):
    """An ONNX Runtime ``InferenceSession``: every one vitedge (and its benchmarks) opens is made here.

    ``model``: a path, the serialized bytes or an ``onnx.ModelProto``.  ``options``: a ``SessionOptions``
    (default: ONNX Runtime's own, quiet), with ``threads`` intra-op threads and the ``opt_level`` graph
    optimisation level when given.  ``precision``: the model's, to turn off the optimizers that would spoil
    it (:func:`disabled_optimizers`).  ``providers``: default the CPU only.  Errors are ONNX Runtime's own:
    the caller says what could not be loaded.
    """
    import onnxruntime as ort

    so = options
    if so is None:
        so = ort.SessionOptions()
        so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = int(threads)
    if opt_level:
        so.graph_optimization_level = _optimization_level(opt_level)
    if hasattr(model, "SerializeToString"):
        model = model.SerializeToString()
    return ort.InferenceSession(
        model if isinstance(model, bytes) else str(model),
        so,
        providers=list(providers or ["CPUExecutionProvider"]),
        disabled_optimizers=disabled_optimizers(precision),
    )


def available_providers(prefer_gpu: bool = True) -> list[str]:
    import onnxruntime as ort

    have = ort.get_available_providers()
    order = (["TensorrtExecutionProvider", "CUDAExecutionProvider"] if prefer_gpu else []) + ["CPUExecutionProvider"]
    return [p for p in order if p in have]


# -- compile -------------------------------------------------------------------------------------
def compile_onnxruntime(
    src: Path, man: Manifest, scratch: Path, out_name: str, *, batch, threads, hint, precision_hint, device, img_size=None, opt_level: str = "extended"
) -> tuple[list[str], dict, str]:
    import onnx
    import onnxruntime as ort

    from ..graph import gemm_linears, set_static_batch

    if src.suffix != ".onnx":
        raise VitedgeError(f"{src.name} is an OpenVINO IR: ONNX Runtime runs ONNX files", "compile the ONNX file, or use --backend openvino")
    if precision_hint not in (None, "f32"):
        raise VitedgeError(f"ONNX Runtime on CPU has no {precision_hint} precision hint", "make an FP16/INT8 model with vitedge quantize, then compile it")
    if device not in (None, "CPU", "cpu"):
        raise VitedgeError(f"--device {device} applies to OpenVINO", "ONNX Runtime picks CUDA/TensorRT providers itself when installed")
    work = src
    big = needs_external_data(src)
    proto = onnx.load(str(src), load_external_data=True)
    # linear layers on a symbolic token count (a dynamic-size export, some foreign exports) as 2-D Gemms: ONNX Runtime
    # fuses their bias only there (float models; a quantized graph's MatMuls are its integer kernels' business)
    linears = gemm_linears(proto, batch) if man.precision in (None, "fp32") else 0
    if batch is not None:
        set_static_batch(proto, batch)
    if batch is not None or linears:
        work = scratch / "static.onnx"
        onnx.save(proto, str(work), save_as_external_data=big, location="static.onnx.data" if big else None)
    del proto
    so = session_options(threads, optimized_model_path=str(scratch / out_name), opt_level=opt_level)
    if big:
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name", out_name + ".data")
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    try:
        # CPU provider only: a model optimised for CUDA/TensorRT nodes would not load on a CPU
        session(work, so, precision=man.precision)
    except Exception as exc:  # onnxruntime raises its own exception types
        raise VitedgeError(f"ONNX Runtime cannot optimise {src.name}: {first_line(exc)}") from None
    files = [out_name] + ([out_name + ".data"] if (scratch / (out_name + ".data")).exists() else [])
    settings = {
        "opt_level": opt_level,
        "gemm_linears": linears,
        "runtime_opt_level": "all",  # hardware-specific layout passes run at load, in milliseconds
        "threads": threads,
        "providers": available_providers(),
        "onnxruntime": ort.__version__,
    }
    return files, settings, man.precision


# -- which precision layers really ran in --------------------------------------------------------
def onnx_precision_breakdown(path: Path) -> dict | None:
    """Static view of an ONNX graph as ONNX Runtime's CPU provider runs it: MatMul/Gemm/Conv fed by
    DequantizeLinear on both inputs (QDQ) or integer ops run in INT8, the rest in their tensor type."""
    import onnx
    from onnx import shape_inference

    try:
        model = onnx.load(str(path), load_external_data=False)
        model = shape_inference.infer_shapes(model)
    except Exception:  # shape inference fails on some custom-domain graphs
        return None
    g = model.graph
    shapes, types = {}, {}
    for v in list(g.value_info) + list(g.input) + list(g.output):
        t = v.type.tensor_type
        shapes[v.name] = [d.dim_value if d.dim_value > 0 else 1 for d in t.shape.dim]
        types[v.name] = t.elem_type
    for init in g.initializer:
        shapes[init.name] = list(init.dims)
        types[init.name] = init.data_type
    from .. import graph

    producer, _ = graph.name_maps(model)
    layers = []
    for n in g.node:
        if n.op_type not in ("MatMul", "Gemm", "Conv") and n.op_type not in INTEGER_KERNEL_OPS:
            continue
        out = shapes.get(n.output[0])
        a = shapes.get(n.input[0])
        w_idx = 3 if n.op_type in ("QLinearMatMul", "QLinearConv") else 1
        w = shapes.get(n.input[w_idx]) if len(n.input) > w_idx else None
        if not out or not a:
            continue
        if "Conv" in n.op_type:
            k = int(np.prod(w[1:])) if w else 1
        elif n.op_type == "Gemm":
            trans_a = next((at.i for at in n.attribute if at.name == "transA"), 0)
            k = a[0] if trans_a else a[-1]
        else:
            k = a[-1]
        if n.op_type in INTEGER_KERNEL_OPS:
            prec = "int8"
        else:
            dq = [producer.get(i) is not None and producer[i].op_type == "DequantizeLinear" for i in n.input[:2]]
            if all(dq):
                prec = "int8"
            else:
                et = types.get(n.output[0], 1)
                prec = {1: "fp32", 10: "fp16", 16: "bf16"}.get(et, str(et))
                if any(dq):
                    prec += " (int8 weights)"
        layers.append({"name": n.name, "type": n.op_type, "precision": prec, "macs": int(np.prod(out)) * int(k)})
    return mac_summary(layers, "onnx graph (QDQ-fed or integer MatMul/Gemm/Conv run as INT8 kernels in ONNX Runtime CPU)")


class OnnxRuntimeEngine(Engine):
    backend = "onnxruntime"

    def __init__(self, artifact: Path, manifest: Manifest, threads: int | None = None, providers: list[str] | None = None, opt_level: str | None = None):
        super().__init__(artifact, manifest)
        import onnxruntime as ort

        settings = manifest.compile if manifest and manifest.backend == "onnxruntime" else {}
        threads = threads or settings.get("threads")
        opt_level = opt_level or settings.get("runtime_opt_level", "all")
        if providers is not None:
            unknown = [p for p in providers if p not in ort.get_available_providers()]
            if unknown:
                raise VitedgeError(
                    f"ONNX Runtime provider {unknown[0]} is not in this onnxruntime build", f"available: {', '.join(ort.get_available_providers())}"
                )
        self.threads = threads or (os.cpu_count() or 1)
        try:
            self.session = session(
                artifact,
                session_options(threads, opt_level=opt_level),
                providers=providers or available_providers(),
                precision=manifest.precision if manifest is not None else None,
            )
        except Exception as exc:  # onnxruntime raises its own exception types
            raise VitedgeError(f"ONNX Runtime cannot load {artifact}: {first_line(exc)}", "is the file complete? re-create it with vitedge compile") from None
        self.providers = self.session.get_providers()
        self._names = [o.name for o in self.session.get_outputs()]
        self._input = self.session.get_inputs()[0].name
        self._opt_level = opt_level
        self._attention_session: tuple[Any, list[str]] | None = None  # built by the first attention() call

    def _run_attention(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        # a second session on an in-memory copy of the graph with the attention Softmax outputs added as outputs
        with self._lock:
            if self._attention_session is None:
                self._attention_session = self._attention_copy()
        sess, names = self._attention_session
        return dict(zip(names, sess.run(names, {self._input: batch}), strict=True))

    def _attention_copy(self):
        import onnx

        from .. import graph

        proto = onnx.load(str(self.artifact), load_external_data=True)
        names = graph.attention_probabilities(proto)
        if not names:
            raise VitedgeError(
                f"{self.artifact.name} has no attention Softmax that vitedge can find (a Softmax read by the probabilities-times-values MatMul)",
                "attention maps need the attention written out as MatMul/Softmax/MatMul, as vitedge export writes it",
            )
        graph.add_outputs(proto, names)
        try:
            options = session_options(self.threads, opt_level=self._opt_level)
            sess = session(proto, options, providers=self.providers, precision=self.manifest.precision if self.manifest else None)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise VitedgeError(f"ONNX Runtime cannot load {self.artifact.name} with its attention exposed: {first_line(exc)}") from None
        return sess, names

    def precision_breakdown(self) -> dict | None:
        return onnx_precision_breakdown(self.artifact) if self.artifact.suffix == ".onnx" else None

    def _run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        # InferenceSession.run is thread-safe: concurrent callers need no lock
        return dict(zip(self._names, self.session.run(None, {self._input: batch}), strict=True))

    def _release(self) -> None:
        # Engine.close() calls this once no run is in flight
        del self.session
        self._attention_session = None


BACKEND = register(
    Backend(
        name="onnxruntime",
        summary="ONNX Runtime, the embedded default that runs everywhere (CPU; CUDA/TensorRT providers when installed)",
        engine=OnnxRuntimeEngine,
        runs=(".onnx",),
        compiler=compile_onnxruntime,
        engine_suffix=".onnx",
        engine_name="{stem}.ort.onnx",
        engine_format="onnx",
        quantize=("int8", "fp16", "auto"),
        quantized_suffix=".onnx",
        quantizer="vitedge.quantization.strategies:ONNXRUNTIME",
        benchmark={"fp32": None, "fp16": None, "int8": None},
    )
)
