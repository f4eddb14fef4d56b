"""One CLI language (issue 24): one name per concept across every command, defaults shown by click, and the
old spellings kept for one release as hidden aliases that print a deprecation line and do exactly what the
new name does.  Everything is read from the real ``vitedge`` click group, sub-groups included."""

from __future__ import annotations

import json
import re
from pathlib import Path

import click
import pytest
import yaml
from click.testing import CliRunner

from doc_blocks import ROOT
from vitedge.cli import main
from vitedge.recipes import load_recipe, schema
from vitedge.ui import REMOVED_IN

# concept -> its one name, and the other names it has had or might be given (none may be a visible option)
CONCEPTS = {
    "calibration images": ("--calib", {"--images", "--calibration", "--calib-dir", "--calib-images", "--calib-data"}),
    "held-out / validation images": ("--val", {"--data", "-d", "--val-images", "--val-dir", "--validation", "--held-out", "--eval-images"}),
    "how many calibration images": ("--calib-samples", {"--samples", "--num-calib", "--n-calib", "--calibration-samples"}),
    "how many validation images": ("--val-samples", {"--samples", "--num-samples", "--n-samples", "--val-count"}),
    "what the command writes": ("--output", {"--out-dir", "--output-dir", "--outdir", "--out", "--out-file", "--output-folder"}),
    "the runtime": ("--backend", {"--target", "-t", "--runtime", "--engine-backend"}),
}
SYNONYMS = {s for _, names in CONCEPTS.values() for s in names}

# the deprecated spellings, per command: the old name -> the new one (removed in the next minor release)
OLD = {
    ("export", "--images"): "--calib",
    ("export", "--val-images"): "--val",
    ("quantize", "--samples"): "--calib-samples",
    ("compile", "--target"): "--backend",
    ("compile", "-t"): "--backend",
    ("validate", "-d"): "--val",
    ("validate", "--data"): "--val",
    ("validate", "--out-dir"): "--output",
    ("validate", "--samples"): "--val-samples",
    ("benchmark", "--data"): "--val",
    ("benchmark", "--out-dir"): "--output",
    ("benchmark", "--samples"): "--val-samples",
    ("check parity", "--data"): "--val",
    ("check parity", "--samples"): "--val-samples",
}


def _commands(group: click.Group = main, prefix: str = ""):
    """(full name, command) of every command, sub-groups' commands included."""
    for name, cmd in sorted(group.commands.items()):
        full = f"{prefix}{name}"
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, full + " ")
        else:
            yield full, cmd


def _command(full: str) -> click.Command:
    return dict(_commands())[full]


def _options(cmd: click.Command, hidden: bool = False) -> list[click.Option]:
    return [p for p in cmd.params if isinstance(p, click.Option) and p.hidden == hidden]


COMMANDS = [name for name, _ in _commands()]


def test_every_command_is_walked():
    assert {"export", "quantize", "compile", "predict", "validate", "benchmark", "run", "check parity", "recipes", "backends"} <= set(COMMANDS)


@pytest.mark.parametrize("name", COMMANDS)
def test_one_name_per_concept(name):
    cmd = _command(name)
    for o in _options(cmd):
        spelled = set(o.opts) & SYNONYMS
        assert not spelled, f"vitedge {name}: {'/'.join(o.opts)} spells a concept another way; use {_canonical(spelled.pop())}"
    for o in _options(cmd, hidden=True):  # a hidden option is a deprecated spelling, and a listed one
        assert o.expose_value is False and len(o.opts) == 1, f"vitedge {name}: hidden {o.opts} is not a deprecated alias"
        assert (name, o.opts[0]) in OLD, f"vitedge {name}: {o.opts[0]} is hidden but not in OLD"
    for (cmd_name, old), new in OLD.items():
        if cmd_name == name:
            assert any(old in o.opts for o in _options(cmd, hidden=True)), f"vitedge {name}: {old} should still work"
            assert any(new in o.opts for o in _options(cmd)), f"vitedge {name}: {new} is missing"


def _canonical(synonym: str) -> str:
    return " or ".join(canon for canon, names in CONCEPTS.values() if synonym in names)


KIND = {"integer range": "integer", "float range": "float", "file": "path", "directory": "path"}  # a range or a file/folder: same kind


def test_a_flag_means_one_thing_everywhere():
    """The same flag has the same kind of value in every command (--img-size an integer, -o always --output)."""
    kinds: dict[str, set[str]] = {}
    for name, cmd in _commands():
        for o in _options(cmd):
            for flag in o.opts + o.secondary_opts:
                kinds.setdefault(flag, set()).add("flag" if o.is_flag else KIND.get(o.type.name, o.type.name))
            if "-o" in o.opts:
                assert "--output" in o.opts, f"vitedge {name}: -o is {o.opts}"
    mixed = {flag: k for flag, k in kinds.items() if len(k) > 1}
    assert not mixed, f"flags with different kinds of value across commands: {mixed}"
    assert kinds["--img-size"] == {"integer"}


@pytest.mark.parametrize("name", COMMANDS)
def test_defaults_are_shown_by_click(name):
    """Every visible option is a flag, required, or has its default in the help as click prints it; none
    states its default only in prose."""
    cmd = _command(name)
    with main.make_context("vitedge", [name.split()[0]], resilient_parsing=True) as top:
        ctx = click.Context(cmd, info_name=name.split()[-1], parent=top)
        for o in _options(cmd):
            record = o.get_help_record(ctx)
            assert record is not None
            text = record[1]
            if not (o.is_flag or o.required):
                assert "[default: " in text, f"vitedge {name} {o.opts}: no default shown: {text!r}"
            assert not re.search(r"\((?:default|Default)[: ]|\bDefault: ", o.help or ""), f"vitedge {name} {o.opts}: default given in prose"


def _tmp_inputs(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "m.onnx").write_bytes(b"")
    (tmp_path / "imgs").mkdir()
    return {"file": str(tmp_path / "m.onnx"), "dir": str(tmp_path / "imgs")}


def _base_args(name: str, t: dict[str, str]) -> list[str]:
    return {
        "export": ["reference", "-o", "x.onnx"],
        "quantize": [t["file"], "-o", "x.onnx"],
        "compile": [t["file"]],
        "validate": [t["file"]],
        "benchmark": ["reference"],
        "check parity": [t["file"], "--reference", "reference"],
    }[name]


def _value(new: str, t: dict[str, str]) -> str:
    return {"--calib": t["dir"], "--val": t["dir"], "--output": t["dir"], "--backend": "openvino"}.get(new, "7")


@pytest.mark.parametrize("name, old", sorted(OLD))
def test_old_spelling_parses_as_the_new_one_with_one_deprecation_line(name, old, tmp_path, capsys):
    new, t = OLD[(name, old)], _tmp_inputs(tmp_path)
    cmd, base, value = _command(name), _base_args(name, t), _value(OLD[(name, old)], t)
    if name == "check parity" and new != "--val":
        base = base + ["--val", t["dir"]]
    with cmd.make_context(name, base + [new, value]) as ctx:
        wanted = dict(ctx.params)
    assert capsys.readouterr().err == ""
    with cmd.make_context(name, base + [old, value]) as ctx:
        got = dict(ctx.params)
    err = capsys.readouterr().err
    assert got == wanted
    assert err.strip() == f"warning: {old} is deprecated, use {new}; it will be removed in {REMOVED_IN}"
    assert err.count("\n") == 1


def test_old_spelling_is_checked_as_the_new_one(tmp_path):
    """An alias's value goes through the new option's type and range: same error, naming the new flag."""
    t = _tmp_inputs(tmp_path)
    res = CliRunner().invoke(main, ["validate", t["file"], "--samples", "0"])
    assert res.exit_code == 2 and "--val-samples" in res.output and "0 is not in the range x>=1" in res.output
    res = CliRunner().invoke(main, ["compile", t["file"], "-t", "nosuch"])
    assert res.exit_code == 2 and "'--backend'" in res.output


def test_two_old_spellings_of_one_option_are_refused(tmp_path):
    t = _tmp_inputs(tmp_path)
    res = CliRunner().invoke(main, ["validate", t["file"], "-d", t["dir"], "--data", t["dir"]])
    assert res.exit_code == 2 and "-d and --data are both --val now: give it once" in res.output


def test_compile_img_size_is_one_integer(tmp_path):
    t = _tmp_inputs(tmp_path)
    res = CliRunner().invoke(main, ["compile", t["file"], "--img-size", "224,256,384"])
    assert res.exit_code == 2 and "a TensorRT MIN,OPT,MAX range is --img-size-profile 224,256,384" in res.output
    with _command("compile").make_context("compile", [t["file"], "--img-size-profile", "224,256,384"]) as ctx:
        assert ctx.params["img_size_profile"] == "224,256,384" and ctx.params["img_size"] is None


def test_old_spellings_give_the_same_result_end_to_end(ref_onnx, val_dir):
    """A whole command run with the old spellings prints the same result as with the new ones."""
    new = CliRunner().invoke(main, ["check", "parity", str(ref_onnx), "--reference", "reference", "--val", str(val_dir), "--val-samples", "8", "--json"])
    old = CliRunner().invoke(main, ["check", "parity", str(ref_onnx), "--reference", "reference", "--data", str(val_dir), "--samples", "8", "--json"])
    assert new.exit_code == old.exit_code == 0, (new.output, old.output)
    assert old.stdout == new.stdout and json.loads(new.stdout[: new.stdout.rindex("}") + 1])["ok"] is True
    assert "--data is deprecated, use --val" in old.stderr and "--samples is deprecated, use --val-samples" in old.stderr
    assert "deprecated" not in new.stderr


# -- recipes: the step keys mirror the options and were renamed alike ------------------------------------------------
OLD_KEYS = {"quantize": ("samples", "calib_samples", 40), "validate": ("samples", "val_samples", 20), "compile": ("target", "backend", "openvino")}


def _write(tmp_path: Path, name: str, steps: dict) -> Path:
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump({"name": name, "model": "reference", "steps": {"export": {}, **steps}}))
    return p


def test_recipe_old_keys_load_as_the_new_ones_with_a_warning(tmp_path, capsys):
    old = {step: {o: v} for step, (o, _, v) in OLD_KEYS.items()}
    new = {step: {n: v} for step, (_, n, v) in OLD_KEYS.items()}
    old["quantize"]["precision"] = new["quantize"]["precision"] = "int8"
    old["compile"]["img_size"] = "28,28,28"  # a MIN,OPT,MAX img_size is img_size_profile now
    new["compile"]["img_size_profile"] = "28,28,28"
    old["export"] = {"merge_tokens": "auto", "val_images": str(tmp_path)}
    new["export"] = {"merge_tokens": "auto", "val": str(tmp_path)}
    got = load_recipe(_write(tmp_path, "old", old)).data["steps"]
    err = capsys.readouterr().err
    wanted = load_recipe(_write(tmp_path, "new", new)).data["steps"]
    assert got == wanted
    assert "deprecated" not in capsys.readouterr().err
    for step, (o, n, _) in OLD_KEYS.items():
        assert f"steps.{step}.{o} is deprecated, use steps.{step}.{n}; it will be removed in {REMOVED_IN}" in err
    assert "steps.compile.img_size is deprecated, use steps.compile.img_size_profile" in err
    assert "steps.export.val_images is deprecated, use steps.export.val" in err


def test_recipe_giving_old_and_new_key_is_refused(tmp_path):
    from vitedge.errors import VitedgeError

    with pytest.raises(VitedgeError, match="steps.validate gives both samples and val_samples"):
        load_recipe(_write(tmp_path, "both", {"validate": {"samples": 5, "val_samples": 6}}))


def test_recipe_keys_mirror_the_option_names():
    """A step key is its option's flag without the dashes, so one name serves the CLI and the recipe."""
    steps = schema()["properties"]["steps"]["properties"]
    for step in ("export", "quantize", "compile", "validate"):
        cmd = _command(step)
        flags = {f for o in _options(cmd) for f in o.opts}
        for key in steps[step]["properties"]:
            flag = "--" + key.replace("_", "-")
            assert flag in flags or (step, key) in {("compile", "export_blob"), ("quantize", "precision")}, f"recipe steps.{step}.{key} has no option {flag}"


def test_shipped_recipes_use_the_new_keys():
    for p in sorted((ROOT / "recipes").glob("*.yaml")):
        steps = yaml.safe_load(p.read_text())["steps"]
        for step, (o, _, _) in OLD_KEYS.items():
            assert o not in (steps.get(step) or {}), f"{p.name}: steps.{step}.{o}"


# -- the docs call the CLI with the new names ---------------------------------------------------------------------------
DOCS = ["README.md", "docs/*.md", "examples/*/README.md", "calibration_data/README.md", "benchmarks/README.md"]


def test_docs_use_the_new_spellings():
    """No `vitedge CMD ...` in the README, docs or examples uses a deprecated spelling of that command."""
    found = []
    for pattern in DOCS:
        for path in sorted(ROOT.glob(pattern)):
            text = re.sub(r"\\\n\s*", " ", path.read_text())  # shell line continuations
            for n, line in enumerate(text.splitlines(), 1):
                for segment in line.split("vitedge ")[1:]:
                    words = re.split(r"[\s`\[\]|()]+", segment)
                    name = " ".join(words[:2]) if words[0] == "check" else words[0]
                    for w in words[1:]:
                        flag = w.split("=")[0]
                        if (name, flag) in OLD:
                            found.append(f"{path.relative_to(ROOT)}:{n}: vitedge {name} {flag} -> {OLD[(name, flag)]}")
    assert not found, "\n".join(found)
