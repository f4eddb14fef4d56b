"""The README as written: its Python blocks run, its commands exist, its install advice holds.

Every ```python block of README.md is run unchanged, in order, as a script in a fresh folder laid out
like a checkout (``recipes/`` and ``calibration_data/`` beside it).  A block that names a file a README
shell command writes (``vitedge ... -o PATH``) gets that command run first, extracted from the README
too.  The slow test runs the quick start's ``vitedge run recipes/quickstart.yaml -o out/quickstart``
as written (about a minute on 2 cores); the fast one puts a stand-in bundle at ``out/quickstart`` (the
session's FP32 reference export, bundled by a one-step recipe) and runs the blocks on it.
"""

from __future__ import annotations

import ast
import re
import shlex
import subprocess
import sys
from pathlib import Path

import doc_blocks
import pytest
import yaml
from doc_blocks import ROOT, VITEDGE, blocks

README = ROOT / "README.md"


code_blocks = blocks


def shell_commands(text: str, program: str = "vitedge") -> list[str]:
    """``program ...`` commands of the ```bash blocks (comments dropped, ``a && b`` chains split)."""
    cmds = []
    for block in code_blocks(text, "bash"):
        for line in block.splitlines():
            line = line.split(" #")[0].strip() if not line.lstrip().startswith("#") else ""
            for part in line.split("&&"):
                part = part.strip()
                if part.startswith(program + " ") and not re.search(r"[\[|]", part):  # not a synopsis line
                    cmds.append(part)
    return cmds


def output_of(cmd: str) -> str | None:
    args = shlex.split(cmd)
    for flag in ("-o", "--output"):
        if flag in args:
            return args[args.index(flag) + 1]
    return None


def string_literals(code: str) -> list[str]:
    return [n.value for n in ast.walk(ast.parse(code)) if isinstance(n, ast.Constant) and isinstance(n.value, str)]


def run(args: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def checkout_like(tmp: Path) -> Path:
    """A working folder where the README's relative paths mean what they mean in a checkout."""
    return doc_blocks.checkout_like(tmp, ("recipes", "calibration_data"))


def stand_in_bundle(work: Path, onnx: Path, name: str) -> None:
    """A loadable bundle folder at ``work/name`` around ``onnx``, made by `vitedge run` of a one-step recipe."""
    from vitedge.recipes import load_recipe, run_recipe

    recipe = work / "stand_in.yaml"
    recipe.write_text(yaml.safe_dump({"name": "stand_in", "model": str(onnx), "steps": {"export": {}}}))
    run_recipe(load_recipe(recipe), work / name)


def run_python_blocks(work: Path) -> list[str]:
    text = README.read_text()
    blocks = code_blocks(text, "python")
    assert blocks, "README.md has no ```python blocks"
    producers = {output_of(c): c for c in shell_commands(text) if output_of(c)}
    outputs = []
    for i, code in enumerate(blocks, 1):
        for name in string_literals(code):
            if name in producers and not (work / name).exists():
                cmd = producers[name]
                res = run([str(VITEDGE), *shlex.split(cmd)[1:]], work)
                assert res.returncode == 0, f"README command `{cmd}` failed:\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"
        script = work / f"readme_block_{i}.py"
        script.write_text(code)
        res = run([sys.executable, script.name], work)
        assert res.returncode == 0, f"README python block {i} fails as written:\n{code}\n--- stderr:\n{res.stderr[-3000:]}"
        outputs.append(res.stdout)
    return outputs


def _check_quickstart_output(outputs: list[str]) -> None:
    first = outputs[0]
    assert "Prediction" in first or "label" in first, first
    # the quick-start block prints the shape of the logits of the batch it built
    assert "(2, 10)" in first, first


@pytest.mark.e2e
def test_readme_python_blocks_run_as_written(tmp_path, ref_onnx):
    work = checkout_like(tmp_path)
    text = README.read_text()
    made = {output_of(c): c for c in shell_commands(text)}
    assert "out/quickstart" in made and made["out/quickstart"].startswith("vitedge run recipes/quickstart.yaml"), made
    stand_in_bundle(work, ref_onnx, "out/quickstart")
    _check_quickstart_output(run_python_blocks(work))


@pytest.mark.e2e  # runs the quick start's `vitedge run recipes/quickstart.yaml` as written: about a minute
def test_readme_quickstart_then_python_blocks_run_as_written(tmp_path):
    _check_quickstart_output(run_python_blocks(checkout_like(tmp_path)))


def test_readme_python_blocks_use_shipped_inputs_only():
    """Every relative file a Python block opens ships with vitedge or is made by a README command."""
    text = README.read_text()
    made = {output_of(c) for c in shell_commands(text)}
    for code in code_blocks(text, "python"):
        for name in string_literals(code):
            if re.search(r"\.(png|jpe?g|bmp|webp|pth|pt|bin|safetensors)$", name):
                assert (ROOT / name).exists() or name in made, f"README python block uses {name!r}, which is not shipped"


def test_readme_vitedge_commands_name_real_options():
    """Every `vitedge SUB --flag` in the README's shell blocks is a flag of that sub-command."""
    import click
    from click.testing import CliRunner

    from vitedge.cli import main

    for cmd in shell_commands(README.read_text()):
        args = shlex.split(cmd)[1:]
        words = [a for a in args if not a.startswith("-")]
        command, path = main, []
        while words and isinstance(command, click.Group):
            assert words[0] in command.commands, f"README command `{cmd}`: no sub-command {words[0]!r}"
            command = command.commands[words[0]]
            path.append(words.pop(0))
        helptext = CliRunner().invoke(main, [*path, "--help"]).output
        for flag in (a.split("=")[0] for a in args if a.startswith("--")):
            assert flag in helptext, f"README command `{cmd}`: `vitedge {' '.join(path)}` has no option {flag}"


# ------------------------------------------------------------------------------------------
# install advice
# ------------------------------------------------------------------------------------------
def _pip_installs(text: str) -> list[list[str]]:
    found = []
    for m in re.finditer(r"pip install ([^`\n&#]+)", text):
        found.append(shlex.split(m.group(1).strip().rstrip(")").strip()))
    return found


def test_install_advice_names_real_extras_and_never_timm_or_torchvision():
    tomllib = pytest.importorskip("tomllib")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    texts = [README.read_text()] + [p.read_text() for p in (ROOT / "examples").rglob("README.md")]
    installs = [args for t in texts for args in _pip_installs(t)]
    assert installs
    for args in installs:
        for arg in args:
            name = re.split(r"[\[<>=!~ ]", arg)[0].lower()
            assert name not in ("timm", "torchvision"), f"install advice installs {arg}: it breaks timm/transformers here"
            for extra in re.findall(r"\[([\w,-]+)\]", arg):
                for e in extra.split(","):
                    assert e in extras, f"`pip install {' '.join(args)}`: pyproject.toml has no extra {e!r}"
    # transformers comes with the dev extra, as the README says; timm and torchvision with none
    assert any(d.startswith("transformers") for d in extras["dev"])
    assert "transformers" in README.read_text().split("## Install")[1].split("\n## ")[0]
    for deps in extras.values():
        assert not any(re.match(r"(timm|torchvision)\b", d) for d in deps)


def test_timm_checkpoints_load_without_timm_or_torchvision(tmp_path):
    """The README says vitedge reads timm checkpoints without timm: true with both unimportable."""
    code = (
        "import sys\n"
        "sys.modules['timm'] = None\n"
        "sys.modules['torchvision'] = None\n"
        "import torch, vitedge\n"
        "m = vitedge.VisionTransformer(img_size=32, patch_size=16, num_classes=5, d_model=64, num_heads=2, num_layers=1, d_ff=128)\n"
        "torch.save(m.state_dict(), 'vit_tiny_patch16.pth')\n"
        "spec = vitedge.load_model('vit_tiny_patch16.pth')\n"
        "assert spec.config.num_classes == 5 and spec.config.img_size == 32, spec.config\n"
        "print('ok')\n"
    )
    res = run([sys.executable, "-c", code], tmp_path, timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]
