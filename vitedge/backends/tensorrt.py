"""TensorRT backend: serialized engines for NVIDIA GPUs.

Building (``vitedge compile --target tensorrt``) uses the ``tensorrt`` Python API (TensorRT 10;
8.6+ also works): the ONNX is parsed with ``OnnxParser`` into an explicit-batch network, the
builder config gets the precision flags (FP16 from an FP32 ONNX; INT8 from a QDQ ONNX, i.e.
explicit quantization, with FP16 for the float layers), one optimisation profile (min/opt/max
batch, and resolution when the ONNX has dynamic height/width), a workspace memory-pool limit and a
timing cache file, and the engine is serialized to ``.engine``.  The TensorRT version and the GPU
(name, compute capability) go into the manifest; :func:`check_compat` refuses to load an engine
on another TensorRT version or GPU architecture, because TensorRT engines are not portable.

TensorRT is an optional extra (``pip install "vitedge[tensorrt]"``) that needs an NVIDIA GPU with
its driver.  Where it is missing, every entry point raises :class:`BackendUnavailable` saying so.
The pure functions here (:func:`compute_profile`, :func:`inspect_onnx`, :func:`check_compat`,
:func:`builder_flags`) run anywhere and are tested without a GPU.

Running uses device buffers from PyTorch (a CUDA build of torch) or, failing that, ``cuda-python``.
One execution context per engine, serialised by a lock: concurrent callers are safe; create one
engine per thread (or per CUDA stream) to run them in parallel.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .._onnx import QDQ_OPS
from ..errors import (
    BackendUnavailable,
    FileProblem,
    ModelNotSupported,
    ShapeMismatch,
    VitedgeError,
)
from ..manifest import Manifest
from .base import Engine
from .registry import Backend, register

log = logging.getLogger("vitedge")

INSTALL_HINT = 'install it with: pip install "vitedge[tensorrt]" on a machine with an NVIDIA GPU and its CUDA driver'
DEFAULT_MAX_BATCH = 32

# ONNX ops the reference ViT export uses that TensorRT 10's ONNX parser supports (opset <= 20)
TRT_SUPPORTED_OPS = {
    "Add", "Cast", "Concat", "Constant", "ConstantOfShape", "Conv", "Div", "Equal", "Erf", "Expand", "Flatten", "Gather",
    "Gelu", "Gemm", "Identity", "LayerNormalization", "MatMul", "Mul", "Pow", "ReduceMean", "Relu", "Reshape", "Shape",
    "Sigmoid", "Slice", "Softmax", "Split", "Sqrt", "Squeeze", "Sub", "Tanh", "Transpose", "Unsqueeze", "Where",
    "QuantizeLinear", "DequantizeLinear", "Range", "Tile", "ReduceSum", "ReduceMax", "Neg", "Exp", "Clip", "Less",
    "Greater", "Not", "And", "Or", "Max", "Min", "Abs", "Einsum", "BatchNormalization", "GlobalAveragePool", "Pad",
    "ScaledDotProductAttention",
}
_UNSUPPORTED_HINT = {
    "MatMulInteger": "ONNX Runtime's QOperator format; quantize with QDQ format for TensorRT",
    "QLinearMatMul": "ONNX Runtime's QOperator format; quantize with QDQ format for TensorRT",
    "DynamicQuantizeLinear": "dynamic quantization; TensorRT needs static QDQ (vitedge quantize --backend tensorrt)",
}


# -- availability -------------------------------------------------------------------------------
def tensorrt_status() -> str | None:
    """None when TensorRT can build/run here, else the reason it cannot (one line)."""
    if importlib.util.find_spec("tensorrt") is None:
        return "TensorRT is not installed (no Python module 'tensorrt')"
    gpu = gpu_info()
    if gpu is None:
        return "no NVIDIA GPU is visible (CUDA reports no device)"
    return None


def require_tensorrt() -> None:
    reason = tensorrt_status()
    if reason:
        raise BackendUnavailable(f"{reason}: TensorRT engines need TensorRT and an NVIDIA GPU", INSTALL_HINT)


def gpu_info() -> dict | None:
    """Name and compute capability of CUDA device 0, or None when there is none."""
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(0)
            return {"name": torch.cuda.get_device_name(0), "compute_capability": f"{major}.{minor}"}
    except Exception:  # torch without CUDA, or a broken driver
        pass
    if importlib.util.find_spec("cuda") is not None:
        try:
            from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
        except ImportError:
            try:
                from cuda import cudart  # older cuda-python
            except ImportError:
                return None
        try:
            err, props = cudart.cudaGetDeviceProperties(0)
            if int(err) == 0:
                name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
                return {"name": name.strip("\x00"), "compute_capability": f"{props.major}.{props.minor}"}
        except Exception:  # no driver / no device
            return None
    return None


# -- pure helpers (tested without a GPU) --------------------------------------------------------
@dataclass
class OnnxInfo:
    input_name: str
    shape: list  # ints, or names/None for dynamic dims
    output_names: list[str]
    ops: set[str] = field(default_factory=set)
    has_qdq: bool = False
    fp16_weights: bool = False
    opset: int | None = None

    @property
    def dynamic_axes(self) -> list[int]:
        return [i for i, d in enumerate(self.shape) if not (isinstance(d, int) and d > 0)]


def inspect_onnx(path: Path) -> OnnxInfo:
    """What TensorRT will be given: input shape and dynamic axes, ops, quantization, precision."""
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # DecodeError and friends
        raise FileProblem(f"{path} is not a readable ONNX file ({type(exc).__name__})", "re-export it with vitedge export") from None
    inits = {i.name for i in proto.graph.initializer}
    inputs = [v for v in proto.graph.input if v.name not in inits]
    if len(inputs) != 1:
        raise VitedgeError(f"{path.name} has {len(inputs)} inputs; vitedge engines take one image tensor")
    dims = [d.dim_value if d.dim_value else (d.dim_param or None) for d in inputs[0].type.tensor_type.shape.dim]
    ops = {n.op_type for n in proto.graph.node}
    return OnnxInfo(
        input_name=inputs[0].name, shape=dims, output_names=[o.name for o in proto.graph.output], ops=ops,
        has_qdq=bool(ops & QDQ_OPS),
        fp16_weights=any(t.data_type == onnx.TensorProto.FLOAT16 for t in proto.graph.initializer),
        opset=next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None),
    )


def check_onnx_for_tensorrt(info: OnnxInfo) -> None:
    """Refuse ONNX that TensorRT's parser cannot take, naming the op and what to do instead."""
    if len(info.shape) != 4:
        raise ShapeMismatch(f"input {info.input_name} has shape {info.shape}, not (N, C, H, W)")
    if not (isinstance(info.shape[1], int) and info.shape[1] > 0):
        raise VitedgeError(f"input {info.input_name} has a dynamic channel dimension", "re-export with a fixed channel count")
    bad = sorted(op for op in info.ops if op in _UNSUPPORTED_HINT)
    if bad:
        raise ModelNotSupported(f"TensorRT cannot parse {bad[0]} nodes", _UNSUPPORTED_HINT[bad[0]])
    unknown = sorted(info.ops - TRT_SUPPORTED_OPS)
    if unknown:
        log.warning("ops not in vitedge's TensorRT list (the parser decides): %s", ", ".join(unknown))


def _parse_triple(value, what: str) -> tuple[int, int, int]:
    if isinstance(value, str):
        try:
            parts = [int(v) for v in value.replace(" ", "").split(",") if v]
        except ValueError:
            raise VitedgeError(f"{what} {value!r} is not 'min,opt,max' integers", "e.g. --profile 1,8,32") from None
    elif isinstance(value, int):
        parts = [value]
    else:
        parts = [int(v) for v in value]
    if len(parts) == 1:
        parts = parts * 3
    if len(parts) != 3:
        raise VitedgeError(f"{what} {value!r} needs 1 or 3 numbers (min,opt,max)", "e.g. --profile 1,8,32")
    lo, opt, hi = parts
    if not 1 <= lo <= opt <= hi:
        raise VitedgeError(f"{what} {lo},{opt},{hi} must satisfy 1 <= min <= opt <= max", "e.g. --profile 1,8,32")
    return lo, opt, hi


def compute_profile(shape: list, *, batch: int | None = None, profile=None, hint: str = "latency",
                    img_size=None, max_batch: int = DEFAULT_MAX_BATCH) -> dict[str, tuple[int, ...]]:
    """Optimisation-profile shapes ``{"min", "opt", "max"}`` for an (N, C, H, W) input.

    * fixed ``batch`` (or a static batch in the ONNX): min = opt = max = that batch;
    * dynamic batch: ``profile`` gives ``min,opt,max`` batch sizes; default 1, (1 for latency,
      8 for throughput), ``max_batch``;
    * dynamic height/width: ``img_size`` (one size, or ``min,opt,max``) - required then, because a
      ViT's position embeddings fix the resolution it was trained for.
    """
    if len(shape) != 4:
        raise ShapeMismatch(f"input shape {shape} is not (N, C, H, W)")
    n, c, h, w = shape
    static_n = n if isinstance(n, int) and n > 0 else None
    if static_n is not None and batch is not None and batch != static_n:
        raise ShapeMismatch(f"the ONNX has a fixed batch of {static_n}, not {batch}", f"use --batch {static_n} or re-export with --batch dynamic")
    fixed = batch or static_n
    if fixed is not None:
        if profile is not None and _parse_triple(profile, "profile") != (fixed,) * 3:
            raise VitedgeError(f"--profile {profile} conflicts with the fixed batch {fixed}", "use --batch dynamic with --profile")
        b = (fixed, fixed, fixed)
    elif profile is not None:
        b = _parse_triple(profile, "profile")
    else:
        opt = 1 if hint == "latency" else min(8, max_batch)
        b = (1, opt, max_batch)
    if not (isinstance(c, int) and c > 0):
        raise VitedgeError("the channel dimension is dynamic", "re-export with a fixed channel count")
    spatial = []
    for name, d in (("height", h), ("width", w)):
        if isinstance(d, int) and d > 0:
            if img_size is not None and _parse_triple(img_size, "img_size") != (d, d, d):
                raise ShapeMismatch(f"the ONNX has a fixed {name} of {d}, not {img_size}",
                                   "re-export the model at that size (vitedge export --img-size)")
            spatial.append((d, d, d))
        else:
            if img_size is None:
                raise VitedgeError(f"the ONNX has a dynamic {name}", "give --img-size SIZE or MIN,OPT,MAX for the profile")
            spatial.append(_parse_triple(img_size, "img_size"))
    return {k: (b[i], c, spatial[0][i], spatial[1][i]) for i, k in enumerate(("min", "opt", "max"))}


def builder_flags(info: OnnxInfo, precision_hint: str | None) -> tuple[list[str], str]:
    """Names of ``trt.BuilderFlag`` to set, and the engine's precision for the manifest.

    FP32 ONNX: FP16 by default (``precision_hint='f32'`` keeps FP32/TF32, ``'bf16'`` sets BF16).
    QDQ ONNX: INT8 (explicit quantization: the scales come from the Q/DQ nodes, no calibrator),
    plus FP16 for the layers left in float unless ``f32`` is asked for.
    FP16 ONNX: FP16.
    """
    hint = precision_hint or "f16"
    float_flag = {"f16": ["FP16"], "bf16": ["BF16"], "f32": []}[hint]
    if info.has_qdq:
        return ["INT8"] + float_flag, "int8"
    if info.fp16_weights:
        return ["FP16"], "fp16"
    return float_flag, {"f16": "fp16", "bf16": "bf16", "f32": "fp32"}[hint]


def _major_minor(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split(".")[:3] if p.isdigit())


def check_compat(built: dict, current: dict) -> None:
    """Refuse an engine built for another TensorRT version or GPU architecture.

    ``built`` is ``manifest.compile["tensorrt"]`` (``version``, ``gpu``, ``compute_capability``,
    ``hardware_compatibility``, ``version_compatible``); ``current`` the same keys for this machine.
    Engines only run on the TensorRT version that built them (unless built version-compatible) and
    on GPUs of the same compute capability (unless built with a hardware-compatibility level).
    A different GPU model of the same architecture only gets a warning.
    """
    bv, cv = built.get("version"), current.get("version")
    if not bv:
        raise VitedgeError("the engine's manifest does not say which TensorRT version built it", "rebuild it with vitedge compile --target tensorrt")
    if bv != cv and not (built.get("version_compatible") and _major_minor(bv)[:1] == _major_minor(cv or "0")[:1]):
        raise VitedgeError(f"this engine was built with TensorRT {bv} but TensorRT {cv} is installed",
                           f"rebuild it here with vitedge compile --target tensorrt, or install tensorrt=={bv}")
    bcc, ccc = built.get("compute_capability"), current.get("compute_capability")
    if bcc != ccc and built.get("hardware_compatibility", "none") in (None, "none"):
        raise VitedgeError(
            f"this engine was built for {built.get('gpu')} (compute capability {bcc}) but this GPU is {current.get('gpu')} (compute capability {ccc})",
            "TensorRT engines only run on the GPU architecture they were built for: rebuild it on this machine with vitedge compile --target tensorrt",
        )
    if built.get("gpu") != current.get("gpu"):
        log.warning("engine built on %s, running on %s (same compute capability %s)", built.get("gpu"), current.get("gpu"), ccc)


# -- build (needs TensorRT and a GPU) -----------------------------------------------------------
def build_engine(src: Path, man: Manifest, scratch: Path, out_name: str, *, batch: int | None, hint: str,
                 precision_hint: str | None, workspace_mb: int, profile, timing_cache, img_size) -> tuple[list[str], dict, str]:
    """Build a serialized engine into ``scratch/out_name``; returns (files, settings, precision).

    Everything that can be checked without TensorRT (the ONNX, the profile, the options) is checked
    first, so those mistakes are reported on any machine.
    """
    if src.suffix != ".onnx":
        raise VitedgeError(f"{src.name} is an OpenVINO IR: TensorRT builds from ONNX", "compile the ONNX (FP32, or INT8 QDQ from vitedge quantize --backend tensorrt)")
    if workspace_mb is None or int(workspace_mb) < 16:
        raise VitedgeError(f"workspace {workspace_mb} MB is too small", "give --workspace-mb 16 or more (default 1024)")
    info = inspect_onnx(src)
    check_onnx_for_tensorrt(info)
    shapes = compute_profile(info.shape, batch=batch, profile=profile, hint=hint, img_size=img_size)
    flags, precision = builder_flags(info, precision_hint)
    require_tensorrt()

    import tensorrt as trt

    gpu = gpu_info() or {}
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    major = _major_minor(trt.__version__)[0]
    # TensorRT 10 networks are always explicit-batch (the flag is deprecated); 8.x needs it
    net_flags = 0 if major >= 10 else 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(net_flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(src)):
        errs = [str(parser.get_error(i).desc()) for i in range(parser.num_errors)]
        raise VitedgeError(f"TensorRT's ONNX parser rejected {src.name}: {errs[0] if errs else 'unknown error'}",
                           "check the opset (13-20) and ops; re-export with vitedge export")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
    for name in flags:
        config.set_flag(getattr(trt.BuilderFlag, name))
    prof = builder.create_optimization_profile()
    prof.set_shape(info.input_name, shapes["min"], shapes["opt"], shapes["max"])
    config.add_optimization_profile(prof)
    cache_path = Path(timing_cache) if timing_cache else None
    cache_bytes = cache_path.read_bytes() if cache_path and cache_path.exists() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise VitedgeError(f"TensorRT could not build an engine from {src.name}", "see the TensorRT log above; try a larger --workspace-mb")
    (scratch / out_name).write_bytes(bytes(serialized))
    if cache_path:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    settings = {
        "tensorrt": {"version": trt.__version__, "gpu": gpu.get("name"), "compute_capability": gpu.get("compute_capability"),
                     "hardware_compatibility": "none", "version_compatible": False},
        "flags": flags, "profile": {k: list(v) for k, v in shapes.items()}, "workspace_mb": int(workspace_mb),
        "timing_cache": str(cache_path) if cache_path else None,
    }
    return [out_name], settings, precision


# -- runtime ------------------------------------------------------------------------------------
class _Buffers:
    """Device memory through torch (CUDA build) or cuda-python."""

    def __init__(self):
        try:
            import torch

            if torch.cuda.is_available():
                self.torch, self.stream = torch, torch.cuda.Stream()
                return
        except ImportError:
            pass
        self.torch = None
        try:
            from cuda.bindings import runtime as cudart
        except ImportError:
            try:
                from cuda import cudart
            except ImportError:
                raise BackendUnavailable("running TensorRT engines needs a CUDA build of torch or cuda-python", "pip install cuda-python") from None
        self.cudart = cudart
        err, self.stream = cudart.cudaStreamCreate()

    @property
    def handle(self) -> int:
        return self.stream.cuda_stream if self.torch else int(self.stream)

    def run(self, context, engine, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import tensorrt as trt

        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        outs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        for n, x in inputs.items():
            context.set_input_shape(n, tuple(x.shape))
        if self.torch:
            t = self.torch
            keep = {}
            for n, x in inputs.items():
                keep[n] = t.from_numpy(np.ascontiguousarray(x.astype(trt.nptype(engine.get_tensor_dtype(n))))).cuda()
                context.set_tensor_address(n, keep[n].data_ptr())
            for n in outs:
                dt = trt.nptype(engine.get_tensor_dtype(n))
                keep[n] = t.empty(tuple(context.get_tensor_shape(n)), dtype=t.from_numpy(np.zeros(1, dt)).dtype, device="cuda")
                context.set_tensor_address(n, keep[n].data_ptr())
            with t.cuda.stream(self.stream):
                if not context.execute_async_v3(self.handle):
                    raise VitedgeError("TensorRT failed to run the engine")
            self.stream.synchronize()
            return {n: keep[n].cpu().numpy().astype(np.float32) for n in outs}
        cu = self.cudart
        ptrs, results = [], {}
        try:
            for n, x in inputs.items():
                x = np.ascontiguousarray(x.astype(trt.nptype(engine.get_tensor_dtype(n))))
                _, p = cu.cudaMalloc(x.nbytes)
                ptrs.append(p)
                cu.cudaMemcpy(p, x.ctypes.data, x.nbytes, cu.cudaMemcpyKind.cudaMemcpyHostToDevice)
                context.set_tensor_address(n, p)
            for n in outs:
                results[n] = np.empty(tuple(context.get_tensor_shape(n)), trt.nptype(engine.get_tensor_dtype(n)))
                _, p = cu.cudaMalloc(results[n].nbytes)
                ptrs.append(p)
                context.set_tensor_address(n, p)
            if not context.execute_async_v3(self.handle):
                raise VitedgeError("TensorRT failed to run the engine")
            cu.cudaStreamSynchronize(self.stream)
            for n in outs:
                cu.cudaMemcpy(results[n].ctypes.data, context.get_tensor_address(n), results[n].nbytes,
                              cu.cudaMemcpyKind.cudaMemcpyDeviceToHost)
        finally:
            for p in ptrs:
                cu.cudaFree(p)
        return {n: v.astype(np.float32) for n, v in results.items()}


def current_platform() -> dict:
    import tensorrt as trt

    gpu = gpu_info() or {}
    return {"version": trt.__version__, "gpu": gpu.get("name"), "compute_capability": gpu.get("compute_capability")}


class TensorRTEngine(Engine):
    """A deserialized ``.engine``; refuses engines built for another TensorRT version or GPU."""

    backend = "tensorrt"

    def __init__(self, artifact: Path, manifest: Manifest, **options: Any):
        super().__init__(artifact, manifest)
        if options:
            raise VitedgeError(f"TensorRT engines take no options ({', '.join(options)})")
        built = (manifest.compile or {}).get("tensorrt")
        if not built:
            raise VitedgeError(f"{artifact.name} has no TensorRT build record in its manifest", "rebuild it with vitedge compile --target tensorrt")
        require_tensorrt()
        check_compat(built, current_platform())
        import tensorrt as trt

        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(Path(artifact).read_bytes())
        if self._engine is None:
            raise FileProblem(f"TensorRT cannot deserialize {artifact}", "the file is corrupt or from another TensorRT build: rebuild it")
        # one execution context (and one set of device buffers): calls borrow it in turn with Engine._take,
        # so they run one at a time, and the ones waiting for it get a VitedgeError when the engine is closed
        self._contexts = [self._engine.create_execution_context()]
        self._buffers = _Buffers()
        self._input = self.input_name

    def _run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        hi = ((self.manifest.compile.get("profile") or {}).get("max") or [len(batch)])[0]
        if len(batch) > hi:  # beyond the profile's max batch: run in chunks
            parts = [self._run(batch[i : i + hi]) for i in range(0, len(batch), hi)]
            return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        context = self._take(self._contexts)  # one execution context: callers run one at a time
        try:
            return self._buffers.run(context, self._engine, {self._input: batch})
        finally:
            self._give(self._contexts, context)

    def _release(self) -> None:
        # Engine.close() calls this once no run is in flight, so the context is back in its list
        self._contexts.clear()
        self._engine = self._runtime = None


def compile_tensorrt(src: Path, man: Manifest, scratch: Path, out_name: str, *, batch, threads, hint, precision_hint, device,
                     img_size=None, workspace_mb=None, profile=None, timing_cache=None) -> tuple[list[str], dict, str]:
    """The registry's compile entry: :func:`build_engine` with its defaults (workspace 1024 MB)."""
    return build_engine(src, man, scratch, out_name, batch=batch, hint=hint, precision_hint=precision_hint,
                        workspace_mb=1024 if workspace_mb is None else workspace_mb, profile=profile,
                        timing_cache=timing_cache, img_size=img_size)


BACKEND = register(Backend(
    name="tensorrt",
    summary="NVIDIA TensorRT on NVIDIA GPUs (and Jetson): a serialized .engine tied to the GPU and TensorRT version",
    engine=TensorRTEngine,
    runs=(".engine", ".plan"),
    compiler=compile_tensorrt,
    compile_options=("workspace_mb", "profile", "timing_cache"),
    engine_suffix=".engine",
    engine_name="{stem}.engine",
    engine_format="tensorrt",
    quantize=("int8", "fp16"),
    quantized_suffix=".onnx",
    benchmark={"fp32": "f32", "fp16": "f16", "int8": None},
    status=tensorrt_status,
))
