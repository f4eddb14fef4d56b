"""Recipes: schema validation with file:line:key errors, shipped recipes, and end-to-end runs."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from vitedge.cli import main
from vitedge.errors import FileProblem, VitedgeError
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
    with pytest.raises(FileProblem):
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


# ------------------------------------------------------------------------------------------
# end-to-end runs
# ------------------------------------------------------------------------------------------
from vitedge.recipes import run_recipe  # noqa: E402


def _fast(recipe, **extra):
    """Shorter timing for tests; everything else as shipped."""
    return recipe.with_changes(**{"steps.validate.time_budget": 0.3, **extra})


@pytest.mark.e2e
def test_quickstart_end_to_end_then_cached(tmp_path):
    import vitedge

    recipe = _fast(load_recipe("quickstart"))
    res = run_recipe(recipe, tmp_path / "qs")
    assert [s.step for s in res.steps] == ["export", "quantize", "compile", "validate"]
    assert all(s.status == "done" for s in res.steps)
    rep = res.report
    eng = rep["models"][-1] if "models" in rep else None
    assert eng is not None
    # the bundle: one folder, loadable, with the report beside the engine
    assert (tmp_path / "qs" / "report" / "report.html").exists()
    # the data paths it reports are normalised (the recipe names ../calibration_data)
    report_text = (tmp_path / "qs" / "report" / "report.json").read_text()
    assert "calibration_data" in report_text and "/../" not in report_text
    with vitedge.load(tmp_path / "qs") as engine:
        assert engine.manifest.precision == "int8"
        assert engine.predict([next((recipe.base_dir / "../calibration_data/digits/val/4").glob("*.png"))])[0].labels[0] == "4"
    # a second run does no work
    again = run_recipe(recipe, tmp_path / "qs")
    assert [s.status for s in again.steps] == ["cached"] * 4
    # changing one option redoes that step and the ones after it, not the export
    changed = run_recipe(recipe.with_changes(**{"steps.quantize.calib_samples": 50}), tmp_path / "qs")
    assert [s.status for s in changed.steps] == ["cached", "done", "done", "done"]
    # --force redoes everything
    forced = run_recipe(recipe.with_changes(**{"steps.quantize.calib_samples": 50}), tmp_path / "qs", force=True)
    assert [s.status for s in forced.steps] == ["done"] * 4
    # a file a step wrote that is gone (here the export's manifest) redoes that step
    (tmp_path / "qs" / "model.onnx.vitedge.json").unlink()
    redone = run_recipe(recipe.with_changes(**{"steps.quantize.calib_samples": 50}), tmp_path / "qs")
    assert redone.steps[0].status == "done"


# the quickstart test runs an ONNX Runtime INT8 recipe end to end; the other two kinds are in the slow set
@pytest.mark.parametrize("name", [pytest.param("vit_tiny_openvino_int8", marks=pytest.mark.e2e), pytest.param("vit_tiny_openvino_fp16", marks=pytest.mark.slow),
                                  pytest.param("vit_tiny_onnxruntime_int8", marks=pytest.mark.slow)])
def test_cpu_recipes_run(tmp_path, name):
    import vitedge

    recipe = _fast(load_recipe(name), img_size=32, **({"steps.quantize.calib_samples": 16} if "int8" in name else {}), **{"steps.validate.val_samples": 16})
    res = run_recipe(recipe, tmp_path / name)
    assert all(s.status == "done" for s in res.steps)
    with vitedge.load(tmp_path / name) as engine:
        assert engine.backend == recipe.data["steps"]["compile"]["backend"]
        assert engine.manifest.precision == recipe.data["steps"]["quantize"]["precision"]
    assert (tmp_path / name / "report" / "report.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("name", [f"vit_{p}_{v}" for p in ("small", "base") for v in ("openvino_int8", "openvino_fp16", "onnxruntime_int8")])
def test_cpu_recipes_run_full_size(tmp_path, name):
    res = run_recipe(_fast(load_recipe(name)), tmp_path / name)
    assert all(s.status == "done" for s in res.steps)


@pytest.mark.e2e
def test_tensorrt_recipe_stops_with_clear_message_and_keeps_earlier_steps(tmp_path):
    from vitedge.errors import VitedgeError

    try:
        import tensorrt  # noqa: F401

        pytest.skip("TensorRT is installed here: the recipe would really run")
    except ImportError:
        pass
    recipe = _fast(load_recipe("vit_tiny_tensorrt_fp16"), img_size=32)
    with pytest.raises(VitedgeError, match=r"step 'compile' failed: .*TensorRT") as e:
        run_recipe(recipe, tmp_path / "trt")
    assert "\n" not in str(e.value)
    assert (tmp_path / "trt" / "model.onnx").exists() and (tmp_path / "trt" / "model.fp16.onnx").exists()
    assert not (tmp_path / "trt" / "engine.engine").exists()


# ------------------------------------------------------------------------------------------
# listing with a broken recipe, normalised data paths
# ------------------------------------------------------------------------------------------
def _recipe_folder(tmp_path):
    """Two good recipes and, between them, one that does not validate."""
    folder = tmp_path / "recipes"
    folder.mkdir()
    (folder / "a_good.yaml").write_text("name: a_good\ndescription: first\nmodel: reference\nsteps:\n  export: {}\n")
    (folder / "b_broken.yaml").write_text("name: b_broken\nmodel: reference\nsteps:\n  export: {opset: 99}\n")
    (folder / "c_good.yaml").write_text("name: c_good\ndescription: third\nmodel: vit_tiny\nsteps:\n  export: {}\n")
    return folder


def test_list_recipes_skips_a_broken_one_and_scan_reports_it(tmp_path):
    from vitedge.recipes import BrokenRecipe, scan_recipes

    folder = _recipe_folder(tmp_path)
    assert [r.name for r in list_recipes(folder)] == ["a_good", "c_good"]
    found = scan_recipes(folder)
    assert [type(r).__name__ for r in found] == ["Recipe", "BrokenRecipe", "Recipe"]
    broken = found[1]
    assert isinstance(broken, BrokenRecipe) and broken.name == "b_broken" and broken.path == folder / "b_broken.yaml"
    assert "b_broken.yaml:4: steps.export.opset" in broken.error and "\n" not in broken.error


def test_cli_lists_the_good_recipes_and_the_broken_one_with_its_error(tmp_path):
    folder = _recipe_folder(tmp_path)
    res = CliRunner().invoke(main, ["recipes", str(folder)])
    assert res.exit_code == 1, res.output  # listed, but a recipe is broken
    lines = [l for l in res.output.splitlines() if l.strip()]
    assert any(l.startswith("a_good") and "first" in l for l in lines)
    assert any(l.startswith("c_good") and "third" in l for l in lines)
    broken = [l for l in lines if l.startswith("b_broken")]
    assert len(broken) == 1 and "broken" in broken[0] and "steps.export.opset" in broken[0], res.output
    assert "Traceback" not in res.output


def test_cli_lists_a_folder_of_good_recipes_with_exit_0(tmp_path):
    folder = _recipe_folder(tmp_path)
    (folder / "b_broken.yaml").unlink()
    res = CliRunner().invoke(main, ["recipes", str(folder)])
    assert res.exit_code == 0, res.output
    assert "a_good" in res.output and "c_good" in res.output


def test_data_paths_are_normalised(tmp_path):
    (tmp_path / "data" / "imgs").mkdir(parents=True)
    (tmp_path / "recipes").mkdir()
    p = tmp_path / "recipes" / "r.yaml"
    p.write_text("name: x\nmodel: ../models/m.pth\ndata: {calibration: ../data/imgs}\nsteps:\n  export: {}\n")
    r = load_recipe(p)
    assert r.resolve("../data/imgs") == str((tmp_path / "data" / "imgs").resolve())
    assert r.resolve("../models/m.pth") == str((tmp_path / "models" / "m.pth").resolve())  # not there (yet): normalised too
    assert r.resolve(str(tmp_path / "recipes" / ".." / "data" / "imgs")) == str((tmp_path / "data" / "imgs").resolve())
    # the shipped quickstart names ../calibration_data: no ".." in what it resolves to
    qs = load_recipe("quickstart")
    for key in ("calibration", "validation"):
        resolved = qs.resolve(qs.data["data"][key])
        assert ".." not in Path(resolved).parts and Path(resolved).is_dir(), resolved
