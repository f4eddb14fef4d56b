"""Artifacts: one manifest per file (named from the full file name), atomic replacement that says what
it replaced, refusal of a manifest that describes another file, and one-line errors (with nothing left
behind) for OS errors on the output path."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

import vitedge
from vitedge.artifact import Artifact
from vitedge.cli.main import main as cli
from vitedge.compilation import compile_model
from vitedge.errors import FileProblem
from vitedge.manifest import Manifest


def _leftovers(folder):
    return [p.name for p in folder.rglob(".vitedge-*")]


def test_same_stem_artifacts_do_not_clobber(ref_onnx, tmp_path):
    xml = compile_model(ref_onnx, tmp_path / "engine.xml", target="openvino")
    onnx_ = compile_model(ref_onnx, tmp_path / "engine.onnx", target="onnxruntime")
    assert isinstance(xml, Artifact) and xml.manifest_path.name == "engine.xml.vitedge.json"
    assert onnx_.manifest_path.name == "engine.onnx.vitedge.json"
    assert Manifest.load(xml.manifest_path).backend == "openvino"
    assert Manifest.load(onnx_.manifest_path).backend == "onnxruntime"
    with vitedge.load(tmp_path / "engine.xml") as a, vitedge.load(tmp_path / "engine.onnx") as b:
        assert (a.backend, b.backend) == ("openvino", "onnxruntime")
    # the artifact knows its files, and they are the ones on disk
    assert sorted(p.name for p in xml.files) == ["engine.bin", "engine.xml"] and xml.size_bytes > 0
    assert Artifact.open(tmp_path / "engine.xml").manifest.files == xml.manifest.files


def test_replacing_an_output_says_so(ref_onnx, tmp_path):
    out = tmp_path / "m.onnx"
    first = compile_model(ref_onnx, out, target="onnxruntime")
    res = CliRunner().invoke(cli, ["compile", str(ref_onnx), "--backend", "onnxruntime", "--batch", "dynamic", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert "replaced the existing m.onnx, m.onnx.vitedge.json" in " ".join(res.stderr.split())
    second = Artifact.open(out)
    assert second.manifest.compile["batch"] == "dynamic" and first.manifest.compile["batch"] == 1
    assert second.manifest.files["m.onnx"] != first.manifest.files["m.onnx"]
    assert _leftovers(tmp_path) == []


def test_manifest_describing_another_file_is_refused(ref_onnx, tmp_path):
    # vitedge 0.1 named manifests by stem: engine.vitedge.json for engine.onnx AND engine.xml
    shutil.copy(ref_onnx, tmp_path / "engine.onnx")
    compile_model(ref_onnx, tmp_path / "engine.xml", target="openvino")
    (tmp_path / "engine.xml.vitedge.json").unlink()
    man = Manifest.load(Manifest.sidecar_path(ref_onnx))
    man.artifact = "engine.onnx"
    (tmp_path / "engine.vitedge.json").write_text(json.dumps(man.to_dict()))
    with pytest.raises(FileProblem, match="engine.vitedge.json describes engine.onnx, not engine.xml.*re-create it"):
        vitedge.load(tmp_path / "engine.xml")
    res = CliRunner().invoke(cli, ["predict", str(tmp_path / "engine.xml"), str(ref_onnx)])
    assert res.exit_code == 2 and "describes engine.onnx, not engine.xml" in res.stderr
    # the legacy manifest still opens the file it describes
    with vitedge.load(tmp_path / "engine.onnx") as eng:
        assert eng.backend == "onnxruntime"
    # and writing engine.onnx anew retires the legacy manifest that described it
    compile_model(ref_onnx, tmp_path / "engine.onnx", target="onnxruntime")
    assert not (tmp_path / "engine.vitedge.json").exists() and (tmp_path / "engine.onnx.vitedge.json").exists()


def test_output_under_a_file_is_one_line(ref_onnx, tmp_path):
    (tmp_path / "afile").write_text("x")
    res = CliRunner().invoke(cli, ["compile", str(ref_onnx), "-o", str(tmp_path / "afile" / "m.onnx")])
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot write") and "afile" in lines[0], res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


@contextlib.contextmanager
def _read_only(folder):
    """Make ``folder`` unwritable, for root too (the file system's immutable attribute); restore it after."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        undo = ["chmod", "755", str(folder)]
    else:
        if shutil.which("chattr") is None:
            pytest.skip("running as root, and there is no chattr to make a folder immutable")
        if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode:
            pytest.skip("running as root, and this file system has no immutable attribute (chattr +i failed)")
        undo = ["chattr", "-i", str(folder)]
    try:
        yield
    finally:
        subprocess.run(undo, check=True)


def test_read_only_folder_is_one_line(ref_onnx, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    with _read_only(ro):
        res = CliRunner().invoke(cli, ["compile", str(ref_onnx), "-o", str(ro / "m.onnx")])
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot write"), res.stderr
    assert "Permission denied" in lines[0] or "Operation not permitted" in lines[0]
    assert list(ro.iterdir()) == []


def _small_file_limit():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with EFBIG instead of killing the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))


def test_disk_full_is_one_line_and_leaves_nothing(ref_onnx, tmp_path):
    """A real write failure: the OS refuses to grow a file past RLIMIT_FSIZE (EFBIG), like a full disk."""
    out = tmp_path / "out"
    out.mkdir()
    res = subprocess.run([sys.executable, "-m", "vitedge", "quantize", str(ref_onnx), "--fp16", "-o", str(out / "m.fp16.onnx")],
                         capture_output=True, text=True, preexec_fn=_small_file_limit, timeout=300)
    assert res.returncode == 2, res.stderr[-2000:]
    lines = res.stderr.strip().splitlines()
    assert lines[-1].startswith("error: cannot write") and "File too large" in lines[-1], res.stderr[-2000:]
    assert list(out.iterdir()) == []


def test_artifact_unpacks_and_loads(ref_onnx, tmp_path):
    art = compile_model(ref_onnx, tmp_path / "m.onnx", target="onnxruntime")
    path, man = art
    assert path == tmp_path / "m.onnx" and man is art.manifest
    x = np.zeros((1, *man.inputs[0].shape[1:]), np.float32)
    with art.load() as a, art.load("openvino", config={"INFERENCE_PRECISION_HINT": "f32"}) as b:
        np.testing.assert_allclose(a.infer(x), b.infer(x), atol=1e-4)
    with pytest.raises(FileProblem, match="has no vitedge manifest"):
        Artifact.open(shutil.copy(ref_onnx, tmp_path / "bare.onnx"))
