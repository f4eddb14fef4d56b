"""Shared fixtures: the shipped reference model, its ONNX export, small random ViTs, data folders.

Expensive artifacts are built once per session and must be treated as read-only by tests
(copy them into ``tmp_path`` before modifying).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")

ROOT = Path(__file__).resolve().parent.parent
CALIB_DIR = ROOT / "calibration_data" / "digits" / "calib"
VAL_DIR = ROOT / "calibration_data" / "digits" / "val"


@pytest.fixture(scope="session")
def calib_dir() -> Path:
    return CALIB_DIR


@pytest.fixture(scope="session")
def val_dir() -> Path:
    """Held-out labelled images of the reference model (class/image layout)."""
    return VAL_DIR


@pytest.fixture(scope="session")
def ref_spec():
    from vitedge import load_model

    return load_model("reference")


@pytest.fixture(scope="session")
def ref_onnx(tmp_path_factory, ref_spec) -> Path:
    """The reference model exported to FP32 ONNX (dynamic batch), with its manifest."""
    from vitedge import export_onnx

    out = tmp_path_factory.mktemp("ref") / "ref.onnx"
    export_onnx(ref_spec, out)
    return out


def _ref_int8(tmp_path_factory, ref_onnx: Path, calib_dir: Path, backend: str, suffix: str) -> Path:
    from vitedge.quantization import quantize

    out = tmp_path_factory.mktemp(f"ref_int8_{backend}") / f"ref.int8{suffix}"
    path, man = quantize(ref_onnx, out, precision="int8", backend=backend, calib=calib_dir, samples=32)
    assert man.precision == "int8"
    return path


@pytest.fixture(scope="session")
def ref_int8_onnxruntime(tmp_path_factory, ref_onnx, calib_dir) -> Path:
    """The reference model quantized to INT8 for ONNX Runtime (QDQ ONNX) by ``vitedge quantize`` on 32 calibration
    images, for tests that need an INT8 artifact (tests of quantize itself make their own)."""
    return _ref_int8(tmp_path_factory, ref_onnx, calib_dir, "onnxruntime", ".onnx")


@pytest.fixture(scope="session")
def ref_int8_openvino(tmp_path_factory, ref_onnx, calib_dir) -> Path:
    """The reference model quantized to INT8 for OpenVINO (IR .xml + .bin), as :func:`ref_int8_onnxruntime`."""
    return _ref_int8(tmp_path_factory, ref_onnx, calib_dir, "openvino", ".xml")


@pytest.fixture(scope="session")
def tiny_vit():
    """A small random-weight ViT (shape tests only: its predictions mean nothing)."""
    import torch

    from vitedge import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=16, num_classes=7, d_model=64, num_heads=2, num_layers=2, d_ff=128, dropout=0.0).eval()


@pytest.fixture(scope="session")
def tiny_onnx(tmp_path_factory, tiny_vit) -> Path:
    from vitedge import export_onnx

    out = tmp_path_factory.mktemp("tiny") / "tiny.onnx"
    export_onnx(tiny_vit, out)
    return out


@pytest.fixture(scope="session")
def photo_dir(tmp_path_factory) -> Path:
    """Real colour photos: crops of the two photographs scikit-learn ships (china.jpg, flower.jpg)."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    out = tmp_path_factory.mktemp("photos")
    for name, arr in zip(("china", "flower"), load_sample_images().images):
        h, w, _ = arr.shape
        for i, (top, left) in enumerate([(0, 0), (0, w // 3), (h // 4, w // 2), (h // 3, 0), (h // 2, w // 4), (h // 5, w // 5), (0, w // 2), (h // 3, w // 3)]):
            Image.fromarray(arr[top : top + h // 2 + 20 * i, left : left + w // 2]).save(out / f"{name}_{i}.jpg", quality=92)
    return out


@pytest.fixture(scope="session")
def digit_images(val_dir) -> list[Path]:
    """One shipped validation image per digit class, classes in order."""
    return [sorted((val_dir / str(c)).iterdir())[0] for c in range(10)]


@pytest.fixture(scope="session")
def digit_batch(ref_onnx, digit_images):
    """``digit_images`` preprocessed for the reference model (10, C, H, W)."""
    import vitedge

    with vitedge.load(ref_onnx) as e:
        return e.preprocessing.batch(digit_images)


@pytest.fixture
def quiet_cpu(monkeypatch):
    """The machine read as quiet: no other process on this process's cores (``vitedge.resources.read_cpu``), so
    that a test of a gate gets a speed-up whatever the other jobs on this machine do (tests/test_busy_machine.py
    tests the busy readings)."""
    from vitedge import resources

    monkeypatch.setattr(resources, "read_cpu", lambda sample_s=0.25: resources.CpuReading(resources.usable_cores(), 0.0, resources.load_average()))
