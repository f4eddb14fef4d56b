"""The wheel carries its data: shipped recipes and calibration images are package resources.

``recipes/`` and ``calibration_data/`` stay at the top of the repository and are mapped into the
package as ``vitedge._shipped.recipes`` / ``vitedge._shipped.calibration_data`` (pyproject.toml,
vitedge/_shipped/__init__.py).  The fast tests check that the code finds them through
importlib.resources; the slow one builds the wheel, installs it into a fresh virtual environment and
runs ``vitedge recipes`` and ``vitedge run quickstart`` from a folder outside the checkout.
"""

from __future__ import annotations

import logging
import os
import shutil
import site
import subprocess
import sys
import zipfile
from importlib import resources
from pathlib import Path

import pytest

from vitedge import _shipped
from vitedge.data import SHIPPED_CALIBRATION
from vitedge.recipes import RECIPES_DIR, list_recipes

ROOT = Path(__file__).resolve().parent.parent


def test_shipped_folders_are_package_resources(caplog):
    with caplog.at_level(logging.WARNING, logger="vitedge"):
        for name, used in (("recipes", RECIPES_DIR), ("calibration_data", SHIPPED_CALIBRATION)):
            root = resources.files(f"vitedge._shipped.{name}")
            assert isinstance(root, Path) and root.is_dir()
            assert _shipped.folder(name) == root == used
    assert not caplog.records  # no fallback to the checkout: the installed package knows its data


def test_every_recipe_of_the_repository_is_listed():
    assert {r.path.name for r in list_recipes()} == {p.name for p in (ROOT / "recipes").glob("*.yaml")}
    assert all(r.path.parent == RECIPES_DIR for r in list_recipes())


def test_shipped_recipes_data_resolves_inside_the_shipped_calibration_data():
    # in a wheel as in a checkout recipes/ and calibration_data/ are siblings, so ../calibration_data works
    for r in list_recipes():
        for key in ("calibration", "validation"):
            value = r.data.get("data", {}).get(key)
            if value:
                path = Path(r.resolve(value)).resolve()
                assert path.is_dir() and path.is_relative_to(SHIPPED_CALIBRATION.resolve()), (r.name, key, value)


def test_every_subpackage_is_listed_for_the_wheel():
    tomllib = pytest.importorskip("tomllib")
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    code = {".".join(d.relative_to(ROOT).parts) for d in [ROOT / "vitedge", *(ROOT / "vitedge").rglob("*")]
            if d.is_dir() and d.name != "__pycache__" and any(f.is_file() for f in d.iterdir())}
    assert code <= listed, f"add {sorted(code - listed)} to [tool.setuptools] packages in pyproject.toml"
    assert config["package-dir"] == {"vitedge._shipped.recipes": "recipes", "vitedge._shipped.calibration_data": "calibration_data"}


# ------------------------------------------------------------------------------------------
# the real thing: build, install into a fresh venv, run from elsewhere
# ------------------------------------------------------------------------------------------
def _run(cmd, cwd, env, timeout):
    res = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{cmd} exited {res.returncode}\n--- stdout\n{res.stdout[-4000:]}\n--- stderr\n{res.stderr[-4000:]}"
    return res


@pytest.mark.e2e
def test_wheel_install_lists_and_runs_the_shipped_recipes(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}

    # 1. build from a copy of what the build needs (no build/ or egg-info left in the checkout)
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in ("vitedge", "recipes", "calibration_data"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", src, "-w", tmp_path / "dist"],
         tmp_path, env, 600)
    (wheel,) = (tmp_path / "dist").glob("vitedge-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder in ("recipes", "calibration_data"):
        for f in (ROOT / folder).rglob("*"):
            if f.is_file() and f.suffix not in (".py", ".pyc"):
                assert f"vitedge/_shipped/{f.relative_to(ROOT).as_posix()}" in names, f"{f} is not in the wheel"

    # 2. a fresh venv: the wheel in its own site-packages, the dependencies (torch, ...) from this
    #    environment's site-packages through a .pth of plain paths, which does not run this
    #    environment's own .pth files (so not the import hook of an editable vitedge install)
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], tmp_path, env, 300)
    py = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    purelib = Path(_run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path, env, 60).stdout.strip())
    outer = [p for p in site.getsitepackages() if Path(p).is_dir()]
    (purelib / "_outer_site_packages.pth").write_text("".join(f"{p}\n" for p in outer))
    # --ignore-installed: this environment's vitedge (seen through the .pth) is not to be uninstalled
    _run([sys.executable, "-m", "pip", "--python", py, "install", "--no-deps", "--no-index", "--ignore-installed", "-q", wheel],
         tmp_path, env, 300)

    # 3. from a folder outside the checkout
    work = tmp_path / "elsewhere"
    work.mkdir()
    where = _run([py, "-c", "import vitedge, vitedge.recipes as r, vitedge.data as d; print(vitedge.__file__); print(r.RECIPES_DIR); "
                            "print(d.SHIPPED_CALIBRATION)"], work, env, 300).stdout.split()
    assert len(where) == 3 and all(Path(p).is_relative_to(purelib / "vitedge") for p in where), where
    vitedge_cli = venv / ("Scripts/vitedge.exe" if os.name == "nt" else "bin/vitedge")
    listed = _run([vitedge_cli, "recipes"], work, env, 300).stdout
    assert "quickstart" in listed and "vit_tiny_openvino_int8" in listed
    _run([vitedge_cli, "run", "quickstart"], work, env, 1800)
    out = work / "runs" / "quickstart"
    assert (out / "engine.onnx").exists() and (out / "engine.onnx.vitedge.json").exists()
    assert (out / "report" / "report.json").exists()


@pytest.mark.e2e
def test_installing_vitedge_leaves_another_torch_alone(tmp_path):
    """vitedge asks for a torch range, not a pin: in an environment whose torch is another build (here a
    CUDA 2.5.1 as a GPU user would have it), pip's resolver installs no torch for vitedge."""
    env_dir = tmp_path / "gpu-env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True)
    site_dir = next(env_dir.glob("lib/python*/site-packages"))
    dist = site_dir / "torch-2.5.1+cu121.dist-info"  # what `pip install torch` from the CUDA index leaves
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: torch\nVersion: 2.5.1+cu121\n")
    (dist / "INSTALLER").write_text("pip\n")
    (dist / "RECORD").write_text("")
    report = tmp_path / "resolve.json"
    res = subprocess.run([sys.executable, "-m", "pip", "--python", str(env_dir / "bin" / "python"), "install", "--dry-run",
                          "--quiet", "--report", str(report), str(ROOT)], capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    import json

    install = {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in json.loads(report.read_text())["install"]}
    assert "vitedge" in install and "torch" not in install, sorted(install)
    assert not any(name.startswith("nvidia-") for name in install), sorted(install)
