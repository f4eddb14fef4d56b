"""TensorRT: what can be checked without TensorRT or a GPU, and the real build where both exist.

On machines without them (these machines) the build/run tests skip with the reason that
``tensorrt_status()`` gives; everything else - the ONNX TensorRT consumes, the optimisation
profiles, the builder flags, the version/GPU compatibility check and every error path - runs here.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

import vitedge
from vitedge.backends.tensorrt import (
    TRT_SUPPORTED_OPS, OnnxInfo, builder_flags, check_compat, check_onnx_for_tensorrt, compute_profile, inspect_onnx,
    tensorrt_status,
)
from vitedge.cli.main import main as cli
from vitedge.compilation import compile_model
from vitedge.errors import BackendUnavailable, ShapeMismatch, VitedgeError
from vitedge.manifest import Manifest

REASON = tensorrt_status()
needs_trt = pytest.mark.skipif(REASON is not None, reason=f"TensorRT build/run needs TensorRT and an NVIDIA GPU: {REASON}")
without_trt = pytest.mark.skipif(REASON is None, reason="TensorRT and a GPU are present: the unavailability path cannot occur")


@pytest.fixture(scope="module")
def qdq_onnx(tmp_path_factory, ref_onnx, calib_dir):
    from vitedge.quantization import quantize

    path, _ = quantize(ref_onnx, tmp_path_factory.mktemp("trt") / "int8.onnx", precision="int8", backend="tensorrt",
                       calib=calib_dir, samples=16)
    return path


# -- the ONNX TensorRT consumes ---------------------------------------------------------------
def test_fp32_export_is_what_tensorrt_takes(ref_onnx):
    info = inspect_onnx(ref_onnx)
    assert info.input_name == "pixel_values" and info.shape[1:] == [3, 64, 64] and info.dynamic_axes == [0]
    assert info.output_names == ["logits"] and not info.has_qdq and not info.fp16_weights and info.opset == 18
    assert info.ops <= TRT_SUPPORTED_OPS, f"ops TensorRT's parser may not take: {info.ops - TRT_SUPPORTED_OPS}"
    check_onnx_for_tensorrt(info)
    assert builder_flags(info, None) == (["FP16"], "fp16")
    assert builder_flags(info, "f32") == ([], "fp32") and builder_flags(info, "bf16") == (["BF16"], "bf16")


def test_qdq_int8_is_explicit_quantization(qdq_onnx):
    info = inspect_onnx(qdq_onnx)
    assert info.has_qdq and info.ops <= TRT_SUPPORTED_OPS
    check_onnx_for_tensorrt(info)
    assert builder_flags(info, None) == (["INT8", "FP16"], "int8")
    assert builder_flags(info, "f32") == (["INT8"], "int8")


def test_qoperator_onnx_is_refused():
    info = OnnxInfo("x", [None, 3, 64, 64], ["y"], ops={"MatMulInteger", "Add"})
    with pytest.raises(VitedgeError, match="cannot parse MatMulInteger.*QDQ"):
        check_onnx_for_tensorrt(info)
    with pytest.raises(VitedgeError, match="dynamic channel"):
        check_onnx_for_tensorrt(OnnxInfo("x", [None, None, 64, 64], ["y"]))


# -- optimisation profiles --------------------------------------------------------------------
def test_profile_dynamic_batch_defaults():
    assert compute_profile(["batch", 3, 64, 64]) == {"min": (1, 3, 64, 64), "opt": (1, 3, 64, 64), "max": (32, 3, 64, 64)}
    assert compute_profile(["batch", 3, 64, 64], hint="throughput")["opt"] == (8, 3, 64, 64)
    assert compute_profile([None, 3, 224, 224], profile="2,4,16") == {"min": (2, 3, 224, 224), "opt": (4, 3, 224, 224), "max": (16, 3, 224, 224)}
    assert compute_profile(["N", 3, 8, 8], profile=(1, 1, 1))["max"] == (1, 3, 8, 8)


def test_profile_fixed_batch():
    assert set(compute_profile(["batch", 3, 64, 64], batch=4).values()) == {(4, 3, 64, 64)}
    assert set(compute_profile([2, 3, 64, 64]).values()) == {(2, 3, 64, 64)}
    with pytest.raises(ShapeMismatch):
        compute_profile([2, 3, 64, 64], batch=4)
    with pytest.raises(VitedgeError, match="conflicts with the fixed batch"):
        compute_profile(["batch", 3, 64, 64], batch=4, profile="1,4,8")


def test_profile_dynamic_resolution():
    p = compute_profile(["b", 3, "h", "w"], img_size="160,224,320", profile="1,2,8")
    assert p == {"min": (1, 3, 160, 160), "opt": (2, 3, 224, 224), "max": (8, 3, 320, 320)}
    assert set(compute_profile(["b", 3, "h", "w"], img_size=224, batch=1).values()) == {(1, 3, 224, 224)}
    with pytest.raises(VitedgeError, match="dynamic height.*--img-size"):
        compute_profile(["b", 3, "h", "w"])
    with pytest.raises(VitedgeError, match="fixed height of 64"):
        compute_profile(["b", 3, 64, 64], img_size=224)


@pytest.mark.parametrize("bad,match", [("4,2,1", "min <= opt <= max"), ("0,1,2", "min <= opt <= max"), ("a,b,c", "min,opt,max"),
                                       ("1,2", "1 or 3 numbers")])
def test_profile_bad_values(bad, match):
    with pytest.raises(VitedgeError, match=match):
        compute_profile(["batch", 3, 64, 64], profile=bad)


# -- engine portability -----------------------------------------------------------------------
BUILT = {"version": "10.7.0", "gpu": "NVIDIA A10", "compute_capability": "8.6", "hardware_compatibility": "none", "version_compatible": False}


def test_compat_same_platform_and_same_architecture():
    check_compat(BUILT, {"version": "10.7.0", "gpu": "NVIDIA A10", "compute_capability": "8.6"})
    check_compat(BUILT, {"version": "10.7.0", "gpu": "NVIDIA RTX A6000", "compute_capability": "8.6"})  # same SM: allowed


def test_compat_refuses_other_tensorrt_version():
    with pytest.raises(VitedgeError, match=r"built with TensorRT 10\.7\.0 but TensorRT 10\.8\.0 is installed.*rebuild") as ei:
        check_compat(BUILT, {"version": "10.8.0", "gpu": "NVIDIA A10", "compute_capability": "8.6"})
    assert "\n" not in str(ei.value)
    check_compat({**BUILT, "version_compatible": True}, {"version": "10.8.0", "gpu": "NVIDIA A10", "compute_capability": "8.6"})
    with pytest.raises(VitedgeError, match="TensorRT 10.7.0"):
        check_compat({**BUILT, "version_compatible": True}, {"version": "11.0.0", "gpu": "NVIDIA A10", "compute_capability": "8.6"})


def test_compat_refuses_other_gpu_architecture():
    with pytest.raises(VitedgeError, match=r"built for NVIDIA A10 \(compute capability 8\.6\) but this GPU is NVIDIA T4 \(compute capability 7\.5\)"):
        check_compat(BUILT, {"version": "10.7.0", "gpu": "NVIDIA T4", "compute_capability": "7.5"})
    check_compat({**BUILT, "hardware_compatibility": "ampere_plus"}, {"version": "10.7.0", "gpu": "NVIDIA L4", "compute_capability": "8.9"})
    with pytest.raises(VitedgeError, match="does not say which TensorRT version"):
        check_compat({}, {"version": "10.7.0"})


# -- error paths on a machine without TensorRT -------------------------------------------------
@without_trt
def test_compile_says_what_is_missing_and_what_to_install(ref_onnx, tmp_path):
    with pytest.raises(BackendUnavailable) as ei:
        compile_model(ref_onnx, tmp_path / "e.engine", target="tensorrt")
    msg = str(ei.value)
    assert REASON in msg and "NVIDIA GPU" in msg and 'pip install "vitedge[tensorrt]"' in msg and "\n" not in msg
    assert list(tmp_path.iterdir()) == []


@without_trt
def test_cli_compile_tensorrt_unavailable(ref_onnx, tmp_path):
    res = CliRunner().invoke(cli, ["compile", str(ref_onnx), "-t", "tensorrt", "-o", str(tmp_path / "e.engine")])
    assert res.exit_code == 2
    assert res.stderr.startswith("error:") and "TensorRT is not installed" in res.stderr and "NVIDIA GPU" in res.stderr
    assert list(tmp_path.iterdir()) == []


def test_input_mistakes_are_reported_before_tensorrt_is_needed(ref_onnx, tmp_path):
    ov_xml, _ = compile_model(ref_onnx, tmp_path / "m.xml", target="openvino", verify=False)
    cases = [
        (dict(model=ov_xml), "TensorRT builds from ONNX"),
        (dict(profile="8,4,2", batch="dynamic"), "min <= opt <= max"),
        (dict(workspace_mb=4), "too small"),
        (dict(export_blob=True), "--blob is an option of openvino, not tensorrt"),
        (dict(output=tmp_path / "e.onnx"), "must end in .engine"),
    ]
    for kw, match in cases:
        kw = {"model": ref_onnx, "output": tmp_path / "e.engine", **kw}
        with pytest.raises(VitedgeError, match=match) as ei:
            compile_model(kw.pop("model"), kw.pop("output"), target="tensorrt", **kw)
        assert not isinstance(ei.value, BackendUnavailable)
    assert not (tmp_path / "e.engine").exists()


def _fake_engine_files(tmp_path, ref_onnx, record):
    eng = tmp_path / "m.engine"
    eng.write_bytes(b"not a real engine")
    man = Manifest.load(Manifest.sidecar_path(ref_onnx)).derive(eng.name, "tensorrt", backend="tensorrt")
    man.compile = {"target": "tensorrt", **({"tensorrt": record} if record else {})}
    man.save(eng)
    return eng


@without_trt
def test_loading_an_engine_without_tensorrt(tmp_path, ref_onnx):
    eng = _fake_engine_files(tmp_path, ref_onnx, BUILT)
    with pytest.raises(BackendUnavailable, match='TensorRT is not installed.*pip install "vitedge\\[tensorrt\\]"'):
        vitedge.load(eng)


def test_loading_an_engine_without_build_record(tmp_path, ref_onnx):
    eng = _fake_engine_files(tmp_path, ref_onnx, None)
    with pytest.raises(VitedgeError, match="no TensorRT build record"):
        vitedge.load(eng)


def test_engine_without_manifest(tmp_path):
    (tmp_path / "x.engine").write_bytes(b"\x00" * 64)
    with pytest.raises(VitedgeError, match="no vitedge manifest"):
        vitedge.load(tmp_path / "x.engine")


# -- the real thing (NVIDIA GPU + TensorRT only) -----------------------------------------------
@needs_trt
@pytest.mark.tensorrt
@pytest.mark.parametrize("which", ["fp32", "int8"])
def test_build_load_and_refuse_other_platform(tmp_path, ref_onnx, qdq_onnx, val_dir, which):
    src = ref_onnx if which == "fp32" else qdq_onnx
    cache = tmp_path / "timing.cache"
    path, man = compile_model(src, tmp_path / "e.engine", target="tensorrt", batch="dynamic", profile="1,4,16", timing_cache=cache)
    rec = man.compile["tensorrt"]
    assert rec["version"] and rec["gpu"] and rec["compute_capability"] and cache.exists()
    assert man.compile["profile"]["max"][0] == 16 and man.precision == ("fp16" if which == "fp32" else "int8")
    images = [sorted((val_dir / str(c)).iterdir())[0] for c in range(10)]
    with vitedge.load(ref_onnx) as ref, vitedge.load(path) as eng:
        x = ref.preprocessing.batch(images)
        assert (eng.infer(x).argmax(1) == ref.infer(x).argmax(1)).mean() >= 0.9
        assert eng.infer(np.concatenate([x, x])).shape == (20, 10)  # beyond the profile max: chunked
    side = Manifest.sidecar_path(path)
    data = json.loads(side.read_text())
    data["compile"]["tensorrt"]["compute_capability"] = "1.0"
    side.write_text(json.dumps(data))
    with pytest.raises(VitedgeError, match="compute capability 1.0"):
        vitedge.load(path)
    shutil.rmtree(tmp_path)
