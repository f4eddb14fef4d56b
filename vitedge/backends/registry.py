"""The backend registry: the one place that knows which backends exist and what each can do.

Every backend module declares a :class:`Backend` at its end and registers it::

    BACKEND = register(Backend(name="onnxruntime", engine=OnnxRuntimeEngine, runs=(".onnx",), ...))

``quantize``, ``compile``, ``vitedge.load``, ``benchmark``, the recipe schema and the CLI's choice
lists all read the registry, so adding a backend is one module plus its registration: a line in
:data:`BUILTIN` for a backend shipped with vitedge, or ``register(...)`` in the user's own module
(imported before use) for a third-party one.

The declaration is deliberately small and free of heavy imports: the backend's runtime library
(onnxruntime, openvino, tensorrt, torch) is imported only when an engine is opened or built.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import BackendUnavailable, VitedgeError

if TYPE_CHECKING:  # pragma: no cover
    from ..manifest import Manifest
    from .base import Engine

# the backends shipped with vitedge: their modules, imported on first use of the registry
BUILTIN = ("onnxruntime", "openvino", "tensorrt", "pytorch")

CAPABILITIES = ("run", "compile", "quantize", "benchmark")


@dataclass(frozen=True)
class Backend:
    """What one backend can do.

    name:           what users type (``--backend``, recipes, ``vitedge.load(backend=)``).
    engine:         the :class:`~vitedge.backends.base.Engine` subclass that runs its artifacts.
    runs:           file suffixes of the artifacts it runs, in order of preference (``.onnx``, ``.xml``).
    compiler:       ``compile(src, manifest, scratch, out_name, **options) -> (files, settings, precision)``,
                    or None when the backend cannot compile (it then runs what others wrote).
                    Every compiler takes ``batch, threads, hint, precision_hint, device, img_size``;
                    ``compile_options`` names the extra keywords only this backend takes.
    engine_suffix:  the suffix of the file ``compile`` writes, and ``engine_name`` its default name.
    engine_format:  the manifest ``format`` of that file.
    quantize:       the precisions ``vitedge quantize --backend NAME`` writes, and ``quantized_suffix``
                    the suffix of that file (an OpenVINO IR is ``.xml``; everything else is ONNX).
    quantizer:      how it quantizes: a :class:`vitedge.quantization.strategies.Quantizer`, or its import path
                    ``"module:attribute"`` (resolved on first use, so declaring it imports nothing heavy).
    benchmark:      the precisions ``vitedge benchmark`` builds and times for it, each with the compile
                    ``precision_hint`` that makes the engine compute in it (None: the file's own types).
    status:         ``() -> None`` when usable on this machine, else the reason it is not (one line).
    """

    name: str
    engine: type[Engine] | Callable[..., Engine]
    runs: tuple[str, ...]
    summary: str = ""
    compiler: Callable | None = None
    compile_options: tuple[str, ...] = ()
    engine_suffix: str | None = None
    engine_name: str = "{stem}{suffix}"
    engine_format: str = "onnx"
    quantize: tuple[str, ...] = ()
    quantized_suffix: str = ".onnx"
    quantizer: Any = None
    benchmark: Mapping[str, str | None] = field(default_factory=dict)
    status: Callable[[], str | None] = field(default=lambda: None)

    def can(self, capability: str) -> bool:
        if capability not in CAPABILITIES:
            raise ValueError(f"unknown capability {capability!r}")
        return {"run": True, "compile": self.compiler is not None, "quantize": bool(self.quantize), "benchmark": bool(self.benchmark)}[capability]

    def quantization(self):
        """This backend's quantization strategy (a :class:`~vitedge.quantization.strategies.Quantizer`)."""
        q = self.quantizer
        if isinstance(q, str):
            module, _, attr = q.partition(":")
            q = getattr(importlib.import_module(module), attr)
        if q is None:
            raise VitedgeError(f"backend {self.name} cannot quantize", f"backends that can: {', '.join(names('quantize'))}")
        return q

    def unavailable(self) -> str | None:
        """None when this backend can be used on this machine, else why not."""
        return self.status()

    def default_engine_name(self, stem: str) -> str:
        return self.engine_name.format(stem=stem, suffix=self.engine_suffix or "")


_REGISTRY: dict[str, Backend] = {}
_loaded = False


def register(backend: Backend) -> Backend:
    """Add (or replace) a backend; returns it, so a module can write ``BACKEND = register(Backend(...))``."""
    if not backend.name or not backend.name.isidentifier():
        raise ValueError(f"backend name {backend.name!r} must be a plain identifier")
    if not backend.runs or not all(s.startswith(".") for s in backend.runs):
        raise ValueError(f"backend {backend.name}: runs= needs file suffixes such as '.onnx'")
    if backend.quantize and backend.quantizer is None:
        raise ValueError(f"backend {backend.name}: quantize= needs quantizer= (how it quantizes)")
    if backend.compiler is not None and not backend.engine_suffix:
        raise ValueError(f"backend {backend.name}: a backend that compiles needs engine_suffix")
    _REGISTRY[backend.name] = backend
    return backend


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


def _load_builtin() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for mod in BUILTIN:
            importlib.import_module(f"{__package__}.{mod}")


def backends(capability: str | None = None) -> list[Backend]:
    """Registered backends (vitedge's own first, then others in registration order), optionally only those with ``capability``."""
    _load_builtin()
    ordered = sorted(_REGISTRY.values(), key=lambda b: BUILTIN.index(b.name) if b.name in BUILTIN else len(BUILTIN))
    return [b for b in ordered if capability is None or b.can(capability)]


def names(capability: str | None = None) -> list[str]:
    return [b.name for b in backends(capability)]


def get(name: str, capability: str | None = None) -> Backend:
    """The backend called ``name``; a one-line error naming the choices when unknown or not capable."""
    _load_builtin()
    b = _REGISTRY.get(str(name).lower())
    if b is None:
        raise VitedgeError(f"unknown backend {name!r}", f"choose from {', '.join(names(capability))}")
    if capability and not b.can(capability):
        raise VitedgeError(f"backend {b.name} cannot {capability}", f"backends that can: {', '.join(names(capability))}")
    return b


def for_file(path: str | Path) -> Backend | None:
    """The backend that runs a file of this suffix (the first registered one), or None."""
    suffix = Path(path).suffix.lower()
    return next((b for b in backends() if suffix in b.runs), None)


def require(backend: Backend) -> None:
    """Raise :class:`BackendUnavailable` with the reason when ``backend`` cannot be used here."""
    why = backend.unavailable()
    if why:
        raise BackendUnavailable(f"{backend.name} is not available on this machine: {why}")


def open_engine(name: str, artifact: Path, manifest: Manifest, **options) -> Engine:
    return get(name).engine(artifact, manifest, **options)
