"""OpenVINO backend: fastest on Intel/AMD CPUs (and other OpenVINO devices).

Opens an IR (``.xml``/``.bin``) or a compiled blob (``.blob``, from ``vitedge compile --blob``).
The device and the properties recorded at compile time (performance hint, threads, streams,
inference precision) are used unless ``device=``/``config=`` override them.  When an IR has a blob
beside it that was exported by the same OpenVINO version for the same device, the blob is imported
instead of compiling the IR again (a faster cold start); ``use_blob=False`` turns that off.

Thread-safe: each call takes its own infer request from a pool (as many as OpenVINO recommends for
the hint, at least 2), so concurrent callers run in parallel on throughput engines.
"""

from __future__ import annotations

import queue
from pathlib import Path

import numpy as np

from ..errors import VitedgeError, first_line
from ..manifest import Manifest
from .base import Engine

_core = None


def core():
    """One shared ``ov.Core`` (creating it loads the device plugins)."""
    global _core
    if _core is None:
        import openvino as ov

        _core = ov.Core()
    return _core


def _blob_usable(artifact: Path, manifest: Manifest | None, device: str) -> Path | None:
    import openvino as ov

    info = (manifest.compile.get("blob") if manifest else None) or {}
    if not info or artifact.suffix != ".xml":
        return None
    blob = artifact.parent / info["file"]
    if blob.exists() and info.get("device") == device and info.get("openvino") == ov.__version__:
        return blob
    return None


class OpenVINOEngine(Engine):
    """Runs an IR or a compiled blob.  Thread-safe via a pool of infer requests."""

    backend = "openvino"

    def __init__(self, artifact: Path, manifest: Manifest, device: str | None = None, config: dict | None = None,
                 requests: int | None = None, use_blob: bool = True):
        super().__init__(artifact, manifest)
        import openvino as ov

        settings = manifest.compile if manifest and manifest.backend == "openvino" else {}
        device = device or settings.get("device") or "CPU"
        cfg = {"PERFORMANCE_HINT": "LATENCY", **settings.get("openvino_config", {}), **(config or {})}
        self.device = device
        blob = artifact if artifact.suffix == ".blob" else (_blob_usable(artifact, manifest, device) if use_blob else None)
        if artifact.suffix == ".blob":
            info = settings.get("blob") or {}
            if info.get("openvino") and info["openvino"] != ov.__version__:
                raise VitedgeError(f"{artifact.name} was exported by OpenVINO {info['openvino']}, this is {ov.__version__}",
                                   "open the .xml instead, or re-create the blob with vitedge compile --blob")
            if info.get("device") and info["device"] != device:
                raise VitedgeError(f"{artifact.name} was compiled for {info['device']}, not {device}",
                                   "open the .xml to compile for another device")
        c = core()
        try:
            if blob is not None:
                with open(blob, "rb") as f:
                    self.compiled = c.import_model(f.read(), device, cfg)
            else:
                self.compiled = c.compile_model(c.read_model(str(artifact)), device, cfg)
        except Exception as exc:  # openvino raises RuntimeError with long traces
            raise VitedgeError(f"OpenVINO cannot load {artifact} on {device}: {first_line(exc)}",
                               "is the file complete? re-create it with vitedge compile") from None
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
                requests = int(self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
            except Exception:  # not every device reports it
                requests = 2
        self._pool: queue.Queue = queue.Queue()
        for _ in range(max(2, requests)):
            self._pool.put(self.compiled.create_infer_request())

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

    def _run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        req = self._pool.get()  # each caller gets its own infer request: safe for concurrent use
        try:
            res = req.infer({0: batch})
            return {n: np.array(res[o]) for n, o in zip(self._names, self._outputs)}
        except RuntimeError as exc:
            raise VitedgeError(f"OpenVINO could not run a batch of shape {tuple(batch.shape)}: {first_line(exc, 200)}") from None
        finally:
            self._pool.put(req)

    def _release(self) -> None:
        self._pool = queue.Queue()
        del self.compiled
