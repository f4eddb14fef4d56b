"""A toy backend, written the way a third party would add one: this module plus its registration.

It "compiles" an ONNX file into a ``.toy`` file (the same bytes) and runs it with ONNX Runtime's
basic graph optimisations only.  tests/test_registry.py imports it and checks that the backend
shows up everywhere vitedge offers a choice of backends.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort

from vitedge.backends.base import Engine
from vitedge.backends.registry import Backend, register
from vitedge.errors import VitedgeError
from vitedge.quantization.strategies import Job, Outcome, Quantizer


def compile_toy(src: Path, man, scratch: Path, out_name: str, *, batch, threads, hint, precision_hint, device, img_size=None,
                shout=None):
    if src.suffix != ".onnx":
        raise VitedgeError(f"{src.name}: the toy backend compiles ONNX files only")
    shutil.copyfile(src, scratch / out_name)
    return [out_name], {"toy": True, "shout": shout}, man.precision


class ToyEngine(Engine):
    backend = "toy"

    def __init__(self, artifact: Path, manifest, **options):
        super().__init__(artifact, manifest)
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        self.session = ort.InferenceSession(Path(artifact).read_bytes(), so, providers=["CPUExecutionProvider"])
        self._names = [o.name for o in self.session.get_outputs()]

    def _run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        return dict(zip(self._names, self.session.run(None, {self.session.get_inputs()[0].name: batch})))


class ToyQuantizer(Quantizer):
    """FP16 only: ONNX Runtime's float16 converter (inputs and outputs stay FP32); ONNX Runtime measures the file."""

    def fp16(self, job: Job) -> Outcome:
        import onnx
        from onnxruntime.transformers.float16 import convert_float_to_float16

        onnx.save(convert_float_to_float16(onnx.load(str(job.src)), keep_io_types=True), str(job.out))
        return Outcome({"tool": "toy: onnxruntime.transformers.float16"}, "fp16")


BACKEND = register(Backend(name="toy", summary="test backend: ONNX bytes run by ONNX Runtime (basic optimisations)",
                           engine=ToyEngine, runs=(".toy",), compiler=compile_toy, compile_options=("shout",),
                           engine_suffix=".toy", engine_name="{stem}.toy", engine_format="toy", benchmark={"fp32": None},
                           quantize=("fp16",), quantized_suffix=".onnx", quantizer=ToyQuantizer()))
