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
import time

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


def _refused_in_seconds(args: list[str], cwd) -> list[str]:
    """Run the real CLI (a fresh process); the output check must refuse before any work: exit 2, one line."""
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "vitedge", *args], capture_output=True, text=True, cwd=cwd, timeout=120)
    seconds = time.perf_counter() - t0
    assert res.returncode == 2, res.stderr[-2000:]
    assert "Traceback" not in res.stderr, res.stderr[-2000:]
    lines = [ln for ln in res.stderr.strip().splitlines() if not ln.startswith("machine:")]
    assert len(lines) == 1 and lines[0].startswith("error: cannot write"), res.stderr
    assert seconds < 60, f"refused only after {seconds:.0f} s"  # start-up of a busy machine; the work takes minutes
    return lines


@pytest.mark.parametrize("command", ["validate", "run", "benchmark", "quantize", "export"])
def test_unwritable_output_refused_before_work(command, ref_onnx, tmp_path):
    """`validate -o`, `run -o` and the other writers under a file (unwritable for root too): one line, exit 2,
    nothing written, before the work (minutes of it for validate, run and benchmark)."""
    (tmp_path / "afile").write_text("x")
    out = tmp_path / "afile" / "report"
    args = {
        "validate": ["validate", str(ref_onnx), "-o", str(out)],
        "run": ["run", "quickstart", "-o", str(out)],
        "benchmark": ["benchmark", "reference", "-o", str(out)],
        "quantize": ["quantize", str(ref_onnx), "--fp16", "-o", str(out / "m.fp16.onnx")],
        "export": ["export", "reference", "-o", str(out / "m.onnx")],
    }[command]
    lines = _refused_in_seconds(args, tmp_path)
    assert "afile is a file, not a folder" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_read_only_output_folder_refused_before_work(ref_onnx, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    with _read_only(ro):
        lines = _refused_in_seconds(["validate", str(ref_onnx), "-o", str(ro / "report")], tmp_path)
    assert "Permission denied" in lines[0] or "Operation not permitted" in lines[0]
    assert list(ro.iterdir()) == []


def test_output_that_is_a_file_refused(tmp_path):
    from vitedge.artifact import check_output

    (tmp_path / "afile").write_text("x")
    with pytest.raises(FileProblem, match="it is a file, not a folder"):
        check_output(tmp_path / "afile", folder=True)
    with pytest.raises(FileProblem, match="it is a folder"):
        check_output(tmp_path, folder=False)
    assert check_output(tmp_path / "new" / "deeper", folder=True) == tmp_path / "new" / "deeper"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]  # the probe created nothing


# -- damaged files are named before (size) or after (hash) a runtime's parser fails ----------------------------
@pytest.fixture(scope="module")
def ov_engine(tmp_path_factory, ref_onnx):
    return compile_model(ref_onnx, tmp_path_factory.mktemp("ov") / "engine.xml", target="openvino").path


def _copy_artifact(src, dest_dir):
    man = Manifest.load(Manifest.sidecar_path(src))
    for name in [*man.files, Manifest.sidecar_path(src).name]:
        shutil.copy(src.parent / name, dest_dir / name)
    return dest_dir / src.name


def _one_line_error(args) -> str:
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    return lines[0]


@pytest.mark.parametrize("name", ["engine.bin", "engine.xml"])
def test_truncated_openvino_file_is_named(ov_engine, tmp_path, digit_images, name):
    engine = _copy_artifact(ov_engine, tmp_path)
    full = (tmp_path / name).stat().st_size
    os.truncate(tmp_path / name, 1000)
    with pytest.raises(FileProblem, match=rf"^{name} is truncated: 1,000 of {full:,} bytes — copy it again, or re-run `vitedge compile`"):
        vitedge.load(engine)
    line = _one_line_error(["predict", str(engine), str(digit_images[0])])
    assert f"{name} is truncated: 1,000 of {full:,} bytes" in line


def test_changed_openvino_file_is_named_when_the_parser_fails(ov_engine, tmp_path):
    engine = _copy_artifact(ov_engine, tmp_path)
    text = engine.read_bytes()
    engine.write_bytes(text[:200] + b"#" * 64 + text[264:])  # same size, broken XML
    with pytest.raises(FileProblem, match=r"^engine.xml has changed since vitedge wrote it \(its SHA-256 is not the manifest's\)"):
        vitedge.load(engine)


def test_truncated_onnx_compile_is_named(ref_onnx, tmp_path):
    model = _copy_artifact(ref_onnx, tmp_path)
    full = model.stat().st_size
    os.truncate(model, full // 2)
    line = _one_line_error(["compile", str(model), "--backend", "openvino", "-o", str(tmp_path / "e.xml")])
    assert f"{model.name} is truncated: {full // 2:,} of {full:,} bytes — copy it again, or re-run `vitedge export`" in line
    line = _one_line_error(["quantize", str(model), "--fp16", "-o", str(tmp_path / "q.onnx")])
    assert f"{model.name} is truncated" in line
    # a manifest from before sizes were recorded: the hash names the file once the parser fails
    side = Manifest.sidecar_path(model)
    side.write_text(json.dumps({k: v for k, v in json.loads(side.read_text()).items() if k != "sizes"}))
    line = _one_line_error(["compile", str(model), "--backend", "openvino", "-o", str(tmp_path / "e.xml")])
    assert f"{model.name} has changed since vitedge wrote it" in line and "re-run `vitedge export`" in line
    # no manifest at all: the parser's failure comes with a hint
    side.unlink()
    line = _one_line_error(["compile", str(model), "--backend", "openvino", "-o", str(tmp_path / "e.xml")])
    assert "is not a readable ONNX file" in line and "check the file is complete" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == [model.name]
