"""Calibration in bounded memory: peak memory must not grow with the number of calibration images.

ONNX Runtime: the reference model is calibrated on 8 and on 48 of the shipped digits images while
every output array ONNX Runtime returns is tracked by weak reference; the most bytes alive at once
is what the calibrator held.  Keeping every activation would add ``40 x`` the bytes of one image's
activations at the quantized ops (measured on the model); the growth must stay a small fraction of
that.  A control run feeding the whole set in one ``collect_data`` call (ONNX Runtime's documented
use) shows that the counter does catch kept activations.  OpenVINO/NNCF: peak RSS (VmHWM) of a
fresh process calibrating on 8 vs 96 images.
(Peak RSS on vit_small with 64 vs 1024 images: ``benchmarks/calibration_memory.py``.)
"""

from __future__ import annotations

import weakref

import numpy as np
import onnxruntime as ort
import pytest

from vitedge.data import ImageSet
from vitedge.manifest import Manifest
from vitedge.quantization import tensorrt_qdq
from vitedge.quantization.calibration import StreamingBatches

FEW, MANY = 8, 48  # whole batches of 8 (ONNX Runtime's own histogram collector needs equal batch shapes)


@pytest.fixture(scope="module")
def prepared(ref_onnx, tmp_path_factory):
    d = tmp_path_factory.mktemp("calmem")
    return tensorrt_qdq.prepare(ref_onnx, d / "prepared.onnx"), Manifest.find(ref_onnx)[1]


def _stream(calib_dir, man, n):
    ims = ImageSet.from_path(calib_dir).sample(n, 0)
    return StreamingBatches(ims, man.preprocessing_obj, tensorrt_qdq.CALIB_BATCH, min_count=1)


class _LiveOutputs:
    """Counts the bytes of ONNX Runtime outputs still alive (weak references) each time a session runs:
    the largest value is what a calibrator held at once.  The real session runs unchanged."""

    def __init__(self):
        self.refs: list = []
        self.max_alive = 0

    def alive(self) -> int:
        self.refs = [(r, b) for r, b in self.refs if r() is not None]
        return sum(b for _, b in self.refs)

    def install(self, monkeypatch):
        from onnxruntime.capi.onnxruntime_inference_collection import InferenceSession

        real = InferenceSession.run

        def run(sess, output_names, input_feed, run_options=None):
            self.max_alive = max(self.max_alive, self.alive())
            outs = real(sess, output_names, input_feed, run_options)
            self.refs += [(weakref.ref(o), o.nbytes) for o in outs if isinstance(o, np.ndarray)]
            return outs

        monkeypatch.setattr(InferenceSession, "run", run)
        return self


def _bytes_per_image(model, x: np.ndarray) -> int:
    """What one image's outputs of ``model`` occupy."""
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    outs = sess.run(None, {sess.get_inputs()[0].name: x[:1]})
    return sum(o.nbytes for o in outs)


@pytest.fixture(scope="module")
def activation_bytes(ref_onnx, calib_dir, tmp_path_factory) -> int:
    """Bytes of one image's activations at the inputs/outputs of every MatMul/Gemm/Conv (what calibration reads)."""
    import onnx

    man = Manifest.find(ref_onnx)[1]
    proto = onnx.load(str(ref_onnx))
    names = [t for nd in proto.graph.node if nd.op_type in tensorrt_qdq.QUANT_OP_TYPES for t in list(nd.input[:1]) + list(nd.output)]
    proto.graph.output.extend([onnx.helper.make_empty_tensor_value_info(t) for t in dict.fromkeys(names)])
    probe = tmp_path_factory.mktemp("probe") / "probe.onnx"
    onnx.save(proto, str(probe))
    x = next(iter(_stream(calib_dir, man, 1)))
    return _bytes_per_image(probe, x)


@pytest.mark.parametrize("method", ["minmax", "entropy", "percentile"])
def test_ort_calibration_keeps_no_activations(prepared, calib_dir, tmp_path, method, activation_bytes, monkeypatch):
    model, man = prepared
    name = man.inputs[0].name
    held = {}
    for n in (FEW, MANY):
        scratch = tmp_path / f"{method}_{n}"
        scratch.mkdir()
        live = _LiveOutputs().install(monkeypatch)
        tensorrt_qdq.calibrate(model, _stream(calib_dir, man, n), name, method, scratch)
        monkeypatch.undo()
        held[n] = live.max_alive
        assert (scratch / "ranges.json").stat().st_size > 100
    keep_all_cost = (MANY - FEW) * activation_bytes  # what keeping every activation would add
    assert keep_all_cost > 1_000_000  # the check has something to see
    assert held[MANY] - held[FEW] < 0.05 * keep_all_cost, (method, held, keep_all_cost)
    # at most one chunk of batches is held at a time, whatever the number of images
    chunk = tensorrt_qdq.CHUNK_BATCHES if method == "minmax" else tensorrt_qdq.HIST_CHUNK_BATCHES
    assert held[MANY] <= chunk * tensorrt_qdq.CALIB_BATCH * max(activation_bytes, 1) * 4


def test_measurement_catches_kept_activations(prepared, calib_dir, tmp_path, activation_bytes, monkeypatch):
    """Control: ONNX Runtime's calibrator fed the whole set in one collect_data call (its documented use)
    holds every activation at once, and the counter sees it."""
    import contextlib
    import io

    from onnxruntime.quantization.calibrate import create_calibrator

    model, man = prepared
    name = man.inputs[0].name
    held = {}
    for n in (FEW, MANY):
        live = _LiveOutputs().install(monkeypatch)
        cal = create_calibrator(model, tensorrt_qdq.QUANT_OP_TYPES, augmented_model_path=str(tmp_path / f"aug_{n}.onnx"),
                                calibrate_method=tensorrt_qdq._method("entropy"))
        with contextlib.redirect_stdout(io.StringIO()):
            cal.collect_data(tensorrt_qdq._ListReader(list(_stream(calib_dir, man, n)), name))
        held[n] = live.max_alive  # outputs alive at once during collect_data
        monkeypatch.undo()
        del cal
    keep_all_cost = (MANY - FEW) * activation_bytes
    assert held[MANY] - held[FEW] > 0.5 * keep_all_cost, (held, keep_all_cost)


_NNCF_CHILD = r"""
import sys
from vitedge.data import ImageSet
from vitedge.manifest import Manifest
import numpy as np, openvino as ov
from vitedge.quantization.calibration import StreamingBatches
from vitedge.quantization.fidelity import _to_npy
from vitedge.quantization.nncf_int8 import Int8Config, quantize_nncf
from vitedge.quantization.candidates import _Calibration
model, calib, n, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
man = Manifest.find(model)[1]
# what vitedge quantize does: the parent streams the images into a .npy, the try maps it in
from pathlib import Path
_to_npy(Path(out + ".npy"), StreamingBatches(ImageSet.from_path(calib).sample(n, 0), man.preprocessing_obj, 8, min_count=1))
data = _Calibration([np.load(out + ".npy", mmap_mode="r")], None)
ov.save_model(quantize_nncf(ov.convert_model(model), data, len(data), Int8Config(), []), out)
def kb(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])
print("HWM", kb("VmHWM"))
"""


@pytest.mark.e2e
def test_openvino_nncf_calibration_memory_flat(ref_onnx, calib_dir, tmp_path, activation_bytes):
    """NNCF runs OpenVINO (not Python allocations): peak RSS of a fresh process, 8 vs 96 images."""
    import os
    import subprocess
    import sys

    peaks = {}
    for n in (8, 96):
        proc = subprocess.run([sys.executable, "-c", _NNCF_CHILD, str(ref_onnx), str(calib_dir), str(n), str(tmp_path / f"q{n}.xml")],
                              capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="2"), timeout=300)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("HWM ")]
        assert line, proc.stderr[-2000:]
        peaks[n] = int(line[0].split()[1]) * 1024
        assert (tmp_path / f"q{n}.xml").exists()
    keep_all_cost = 88 * activation_bytes
    assert keep_all_cost > 30_000_000
    assert peaks[96] - peaks[8] < 0.2 * keep_all_cost, (peaks, keep_all_cost)
