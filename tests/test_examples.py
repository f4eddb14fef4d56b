"""examples/realtime as its README writes it: every command of its ```bash blocks runs, in order.

The commands run unchanged in a fresh folder laid out like a checkout (``examples/`` and
``calibration_data/`` beside it), with one addition to keep them short: ``stream.py`` runs that
classify get ``--max-frames N`` (documented in the README).  The video commands need the optional
``vitedge[video]`` extra; without it they must stop with a one-line error that says how to install it.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import doc_blocks
import pytest
from doc_blocks import FENCE, ROOT, VITEDGE

EXAMPLE = ROOT / "examples" / "realtime"
STREAM = EXAMPLE / "stream.py"
HAS_VIDEO = importlib.util.find_spec("imageio") is not None
INSTALL_VIDEO = 'pip install "vitedge[video]"'
MAX_FRAMES = 12


def bash_commands(readme: Path) -> list[str]:
    cmds = []
    for kind, body in FENCE.findall(readme.read_text()):
        if kind == "bash":
            cmds += [line.strip() for line in body.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return cmds


def checkout_like(tmp: Path) -> Path:
    return doc_blocks.checkout_like(tmp, ("examples", "calibration_data"))


def argv(cmd: str) -> list[str]:
    args = shlex.split(cmd, comments=True)
    if args[0] == "vitedge":
        return [str(VITEDGE), *args[1:]]
    if args[0] in ("python", "python3"):
        return [sys.executable, *args[1:]]
    raise AssertionError(f"examples/realtime/README.md: unexpected command {cmd!r}")


def run(args: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def assert_one_line_video_error(res: subprocess.CompletedProcess, cmd: str) -> None:
    assert res.returncode != 0, f"`{cmd}` without the video extra exited 0:\n{res.stdout}{res.stderr}"
    err = res.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, f"`{cmd}`: not a one-line error:\n{err}"
    assert INSTALL_VIDEO in err, err


def run_commands(work: Path, cmds: list[str]) -> None:
    for cmd in cmds:
        args = argv(cmd)
        video = "--make-video" in args or "--video" in args
        if "stream.py" in cmd and "--make-video" not in args:
            args += ["--max-frames", str(MAX_FRAMES)]
        res = run(args, work)
        if video and not HAS_VIDEO:
            assert_one_line_video_error(res, cmd)
            continue
        assert res.returncode == 0, f"`{cmd}` failed:\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"
        if "stream.py" in cmd and "--make-video" not in args:
            done = re.findall(r"^summary: (\d+) frames", res.stdout, re.M)
            assert done and 0 < int(done[0]) <= MAX_FRAMES, res.stdout  # a live source may drop some


@pytest.mark.e2e  # export, two compiles, an INT8 quantization with its fidelity check: about a minute on 2 cores
def test_realtime_readme_commands_run_as_written(tmp_path):
    cmds = bash_commands(EXAMPLE / "README.md")
    assert any("stream.py" in c for c in cmds) and any(c.startswith("vitedge ") for c in cmds)
    run_commands(checkout_like(tmp_path), cmds)


@pytest.mark.e2e
def test_realtime_readme_stream_commands_run_as_written(tmp_path, ref_onnx):
    """The README's stream.py commands, on the engine its `vitedge compile ... -o ref.ov.xml` names
    (compiled here from the session's reference export; the full command list is the slow test)."""
    from vitedge.compilation import compile_model

    work = checkout_like(tmp_path)
    cmds = bash_commands(EXAMPLE / "README.md")
    assert any("-o ref.ov.xml" in c and c.startswith("vitedge compile") for c in cmds)
    compile_model(ref_onnx, work / "ref.ov.xml", target="openvino")
    stream_cmds = [c for c in cmds if "stream.py" in c]
    assert len(stream_cmds) >= 3
    run_commands(work, stream_cmds)


def test_realtime_readme_vitedge_commands_name_real_options():
    """Every `vitedge SUB --flag` of the example's README is an option of that sub-command."""
    from click.testing import CliRunner

    from vitedge.cli import main

    cmds = [c for c in bash_commands(EXAMPLE / "README.md") if c.startswith("vitedge ")]
    assert cmds
    for cmd in cmds:
        args = shlex.split(cmd, comments=True)[1:]
        sub = args[0]
        assert sub in main.commands, f"`{cmd}`: vitedge has no sub-command {sub!r}"
        res = CliRunner().invoke(main, [sub, "--help"])
        for flag in (a.split("=")[0] for a in args if a.startswith("-")):
            assert re.search(rf"(^|[\s,/]){re.escape(flag)}(?![\w-])", res.output, re.M), f"`{cmd}`: `vitedge {sub}` has no option {flag}"


def test_stream_max_frames_stops_after_n_frames(tmp_path, ref_onnx):
    res = run([sys.executable, str(STREAM), str(ref_onnx), "--frames", str(ROOT / "calibration_data/digits/val"),
               "--fps", "0", "--max-frames", "7", "--json"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["frames"] == 7 and summary["dropped"] == 0


@pytest.mark.skipif(HAS_VIDEO, reason="the video extra (imageio) is installed here")
def test_make_video_without_the_video_extra_is_one_line(tmp_path):
    cmd = f"{STREAM} --make-video clip.mp4 --frames {ROOT / 'calibration_data/digits/val'}"
    res = run([sys.executable, *shlex.split(cmd)], tmp_path)
    assert_one_line_video_error(res, cmd)
    assert not (tmp_path / "clip.mp4").exists()


@pytest.mark.parametrize("args, message", [
    (["--frames", "no_such_folder"], "no_such_folder"),
    (["--video", "no_such_clip.mp4"], "no_such_clip.mp4" if HAS_VIDEO else INSTALL_VIDEO),
])
def test_stream_bad_source_is_one_line(tmp_path, ref_onnx, args, message):
    res = run([sys.executable, str(STREAM), str(ref_onnx), *args, "--max-frames", "3"], tmp_path, timeout=120)
    err = res.stderr.strip()
    assert res.returncode != 0 and "Traceback" not in err and len(err.splitlines()) == 1 and message in err, err


def test_stream_corrupt_frame_ends_the_run_with_one_line(tmp_path, ref_onnx):
    """A frame the source cannot decode stops the run with one line (it used to leave the pipeline waiting forever)."""
    import shutil

    frames = tmp_path / "frames" / "4"
    frames.mkdir(parents=True)
    shutil.copy(next((ROOT / "calibration_data/digits/val/4").glob("*.png")), frames / "a.png")
    (frames / "b.png").write_bytes(b"not a png")
    res = run([sys.executable, str(STREAM), str(ref_onnx), "--frames", str(tmp_path / "frames"), "--fps", "0", "--no-loop"],
              tmp_path, timeout=120)
    err = res.stderr.strip()
    assert res.returncode != 0 and "Traceback" not in err and len(err.splitlines()) == 1 and "b.png" in err, err


@pytest.mark.e2e
def test_compile_settings_runs_as_the_readme_writes_it(tmp_path, ref_onnx):
    """`python examples/realtime/compile_settings.py ref.onnx` (the README's command), with few timing rounds."""
    cmd = re.search(r"`(python examples/realtime/compile_settings\.py [^`]+)`", (EXAMPLE / "README.md").read_text()).group(1)
    work = checkout_like(tmp_path)
    shutil_copy_artifact(ref_onnx, work / "ref.onnx")
    res = run([*argv(cmd), "--rounds", "1", "--iters", "2"], work)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "openvino batch=1 bf16" in res.stdout and "onnxruntime batch=dynamic" in res.stdout, res.stdout


def shutil_copy_artifact(src: Path, dst: Path) -> None:
    """Copy an exported ONNX file with its manifest (named after the file)."""
    import shutil

    shutil.copy(src, dst)
    for side in src.parent.glob(src.name + ".*"):
        shutil.copy(side, dst.parent / (dst.name + side.name[len(src.name):]))
