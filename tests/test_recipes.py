"""Recipes: schema validation with file:line:key errors, shipped recipes, and end-to-end runs."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from vitedge.cli import main
from vitedge.errors import VitedgeError
from vitedge.recipes import RECIPES_DIR, list_recipes, load_recipe

SHIPPED = sorted(RECIPES_DIR.glob("*.yaml"))


def test_recipes_folder_ships_the_promised_set():
    names = {p.stem for p in SHIPPED}
    assert "quickstart" in names
    for preset in ("vit_tiny", "vit_small", "vit_base"):
        for variant in ("openvino_int8", "onnxruntime_int8", "openvino_fp16", "tensorrt_fp16", "tensorrt_int8"):
            assert f"{preset}_{variant}" in names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_every_shipped_recipe_validates_and_names_existing_data(path):
    r = load_recipe(path)
    assert r.name == path.stem
    assert r.description
    for key in ("calibration", "validation"):
        value = r.data.get("data", {}).get(key)
        if value:
            assert Path(r.resolve(value)).is_dir(), f"{path.name}: {key} folder {value} missing"


def _write(tmp_path, text):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def test_unknown_key_names_file_line_and_key(tmp_path):
    p = _write(tmp_path, "name: x\nmodel: reference\nsteps:\n  export: {}\n  quantize:\n    precision: int8\n    sampels: 10\n")
    with pytest.raises(VitedgeError) as e:
        load_recipe(p)
    msg = str(e.value)
    assert f"{p}:7:" in msg and "sampels" in msg and "\n" not in msg


def test_wrong_value_names_line(tmp_path):
    p = _write(tmp_path, "name: x\nmodel: reference\nsteps:\n  export: {opset: 99}\n")
    with pytest.raises(VitedgeError, match=r"r\.yaml:4: steps\.export\.opset"):
        load_recipe(p)


def test_missing_required_and_bad_yaml(tmp_path):
    with pytest.raises(VitedgeError, match="'steps' is a required property"):
        load_recipe(_write(tmp_path, "name: x\nmodel: reference\n"))
    with pytest.raises(VitedgeError, match=r"r\.yaml:3: not valid YAML"):
        load_recipe(_write(tmp_path, "name: x\nmodel: [unclosed\n"))
    with pytest.raises(VitedgeError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")


def test_paths_are_relative_to_the_recipe(tmp_path):
    (tmp_path / "imgs").mkdir()
    r = load_recipe(_write(tmp_path, "name: x\nmodel: vit_tiny\ndata: {calibration: imgs}\nsteps:\n  export: {}\n"))
    assert r.resolve("imgs") == str(tmp_path / "imgs")
    assert r.resolve("vit_tiny") == "vit_tiny"  # presets pass through


def test_cli_lists_recipes():
    res = CliRunner().invoke(main, ["recipes"])
    assert res.exit_code == 0
    assert len([l for l in res.output.splitlines() if l.strip() and not l.startswith("(")]) == len(list_recipes())
    assert "quickstart" in res.output


def test_cli_bad_recipe_exits_2_with_one_line(tmp_path):
    p = _write(tmp_path, "name: x\nmodel: reference\nbogus: 1\nsteps:\n  export: {}\n")
    res = CliRunner().invoke(main, ["run", str(p)])
    assert res.exit_code == 2
    assert "bogus" in res.output and ":3:" in res.output
