"""OpenVINO backend: fastest on Intel/AMD CPUs (and other OpenVINO devices)."""

from __future__ import annotations

import os
import queue
from pathlib import Path

import numpy as np

from ..errors import VitedgeError
from ..manifest import Manifest
from .base import Engine


def core():
    import openvino as ov

    return ov.Core()


class OpenVINOEngine(Engine):
    """Runs an IR (``.xml``/``.bin``) or a compiled blob.  Thread-safe via a pool of infer requests."""

    backend = "openvino"

    def __init__(self, artifact: Path, manifest: Manifest, device: str = "CPU", config: dict | None = None, requests: int = 2):
        super().__init__(artifact, manifest)
        c = core()
        cfg = {"PERFORMANCE_HINT": "LATENCY", **(manifest.compile.get("openvino_config", {}) if manifest else {}), **(config or {})}
        try:
            if artifact.suffix == ".blob":
                with open(artifact, "rb") as f:
                    self.compiled = c.import_model(f.read(), device, cfg)
            else:
                self.compiled = c.compile_model(c.read_model(str(artifact)), device, cfg)
        except Exception as exc:  # openvino raises RuntimeError with long traces
            raise VitedgeError(f"OpenVINO cannot load {artifact} on {device}: {str(exc).strip().splitlines()[0][:240]}") from None
        self._outputs = list(self.compiled.outputs)
        self._names = [o.get_any_name() for o in self._outputs]
        self._pool: queue.Queue = queue.Queue()
        for _ in range(max(1, requests)):
            self._pool.put(self.compiled.create_infer_request())

    def _run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        req = self._pool.get()  # each caller gets its own infer request: safe for concurrent use
        try:
            res = req.infer({0: batch})
            return {n: np.array(res[o]) for n, o in zip(self._names, self._outputs)}
        finally:
            self._pool.put(req)

    def _release(self) -> None:
        self._pool = queue.Queue()
        del self.compiled
