"""Options declared once (vitedge.options): the recipe schema, the CLI and the step functions agree with them."""

from __future__ import annotations

from pathlib import Path

import inspect
import json

import jsonschema
import pytest
from click.testing import CliRunner

from vitedge.backends import registry
from vitedge.cli import main
from vitedge.errors import VitedgeError
from vitedge.manifest import CompileRecord, Manifest, QuantizationRecord
from vitedge.options import (
    CompileOptions,
    ExportOptions,
    QuantizeOptions,
    TimingOptions,
    ValidateOptions,
)
from vitedge.recipes import load_recipe, run_recipe, schema

# every visible option flag of the step options, as shipped (the old spellings are hidden aliases: tests/test_cli_language.py)
FLAGS = {
    "export": {"--opset", "--batch", "--img-size", "--calib", "--merge-tokens", "--merge-every", "--val", "--max-drop", "--backend", "--dynamic-size", "--min-size", "--max-size"},
    "quantize": {"--int8", "--fp16", "--auto", "--backend", "--calib", "--calib-samples", "--method", "--target-agreement",
                 "--target-cosine", "--search-budget", "--max-drop", "--min-calib", "--val", "--seed", "--reference", "--ray"},
    "compile": {"--backend", "--batch", "--img-size", "--img-size-profile", "--threads", "--hint", "--precision-hint", "--device",
                "--streams", "--blob", "--workspace-mb", "--profile", "--timing-cache"},
    "validate": {"--max-drop", "--min-speedup", "--reference-threads", "--strict", "--backend", "--precision-hint", "--ci-method",
                 "--worst", "--ray", "--latency-node", "--val-samples", "--rounds", "--runs", "--time-budget", "--batch-sizes", "--size"},
    "benchmark": {"--val-samples", "--rounds", "--runs", "--time-budget", "--batch-sizes"},
}
OPTIONS = {"export": ExportOptions, "quantize": QuantizeOptions, "compile": CompileOptions, "validate": ValidateOptions,
           "benchmark": TimingOptions}
# parameters that are the command's files, not step options (and the benchmark's own sweep settings)
NOT_STEP_OPTIONS = {"model", "output", "engines", "pre_json", "interpolation", "crop", "resize", "std", "mean", "pre_img_size"}
OWN = {"validate": {"val", "reference"}, "benchmark": {"calib", "val", "backends", "precisions", "max_drop", "strict", "img_size", "calib_samples", "ray"}}


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_cli_options_are_the_dataclass_fields(name):
    cls, cmd = OPTIONS[name], main.commands[name]
    params = [p for p in cmd.params if p.expose_value and p.name not in NOT_STEP_OPTIONS | OWN.get(name, set())]
    assert {p.name for p in params} == {f.name for f in cls.fields()}
    assert {o for p in params for o in p.opts} == FLAGS[name]
    fields = {f.name: f for f in cls.fields()}
    for p in params:
        f = fields[p.name]
        assert p.help and (p.help == f.spec.help or p.help in [h for _, _, h in f.spec.switches]), p.name
        if not f.spec.switches and f.base_type is not bool:
            assert p.default == (f.spec.cli_default if f.spec.cli_default is not None else f.default), p.name
            assert p.show_default == (f.spec.shown_default or True), p.name
            assert f.default is not None or f.spec.shown_default, f"{p.name}: a default of None needs a Spec(shown_default=...)"


def _schema_from_cli() -> dict:
    res = CliRunner().invoke(main, ["recipes", "--schema"])
    assert res.exit_code == 0, res.output
    return json.loads(res.output)


def _enums(node):
    if isinstance(node, dict):
        yield from ([node["enum"]] if "enum" in node else [])
        for v in node.values():
            yield from _enums(v)
    elif isinstance(node, list):
        for v in node:
            yield from _enums(v)


def test_recipes_schema_is_valid_json_schema():
    printed = _schema_from_cli()
    jsonschema.validators.validator_for(printed).check_schema(printed)
    steps = printed["properties"]["steps"]["properties"]
    assert steps["quantize"]["properties"]["backend"]["enum"] == registry.names("quantize")
    assert steps["compile"]["properties"]["backend"]["enum"] == registry.names("compile")
    assert steps["quantize"]["properties"]["precision"]["enum"] == ["int8", "fp16", "auto"]
    assert not [e for e in _enums(printed) if not isinstance(e, list) or not e]  # no placeholder left (was "<backends that quantize>")
    assert printed == json.loads(json.dumps(schema()))


def test_every_shipped_recipe_validates_against_the_printed_schema():
    import yaml

    from vitedge.recipes import RECIPES_DIR

    validator = jsonschema.Draft202012Validator(_schema_from_cli())
    shipped = sorted(RECIPES_DIR.glob("*.yaml"))
    assert shipped
    for path in shipped:
        assert not list(validator.iter_errors(yaml.safe_load(path.read_text()))), path.name


def _recipe(tmp_path, model, steps: dict):
    import yaml

    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump({"name": "r", "model": str(model), "steps": {"export": {}, **steps}}))
    return load_recipe(p)


def test_recipe_precision_auto_reaches_quantize(tmp_path, ref_onnx):
    recipe = _recipe(tmp_path, ref_onnx, {"quantize": {"precision": "auto", "backend": "tensorrt"}})
    assert QuantizeOptions.from_mapping(recipe.data["steps"]["quantize"]).precision == "auto"
    # quantize itself refuses auto for TensorRT (its INT8 is not chosen by speed here): the recipe's value got there
    with pytest.raises(VitedgeError, match="step 'quantize' failed: backend tensorrt has no auto quantization"):
        run_recipe(recipe, tmp_path / "out")


def test_recipe_tensorrt_options_reach_compile(tmp_path, ref_onnx):
    trt = {"workspace_mb": 2048, "profile": "1,8,32", "timing_cache": "trt.cache", "img_size_profile": "28,28,28"}
    recipe = _recipe(tmp_path, ref_onnx, {"compile": {"backend": "tensorrt", **trt}})
    kw = CompileOptions.from_mapping(recipe.data["steps"]["compile"], recipe.resolve).compile_kwargs()
    assert kw["workspace_mb"] == 2048 and kw["profile"] == "1,8,32" and kw["img_size"] == "28,28,28"
    assert kw["timing_cache"] == tmp_path / "trt.cache"  # relative to the recipe
    # given to another target, compile refuses the TensorRT option: the recipe's value got there
    other = _recipe(tmp_path, ref_onnx, {"compile": {"backend": "onnxruntime", "workspace_mb": 2048}})
    with pytest.raises(VitedgeError, match="step 'compile' failed: --workspace-mb is an option of tensorrt, not onnxruntime"):
        run_recipe(other, tmp_path / "out")


@pytest.mark.parametrize("step, value", [("quantize", {"precision": "int4"}), ("compile", {"backend": "onnxruntime", "profile": "big"}),
                                         ("compile", {"backend": "onnxruntime", "streams": "many"}),
                                         ("validate", {"batch_sizes": [0]})])
def test_recipe_refuses_bad_step_options_naming_the_key(tmp_path, step, value):
    with pytest.raises(VitedgeError, match=rf"r\.yaml:\d+: steps\.{step}\.\w+"):
        _recipe(tmp_path, "reference", {step: value})


def test_cli_parsers_refuse_bad_text_with_the_fix():
    res = CliRunner().invoke(main, ["export", "reference", "-o", "x.onnx", "--batch", "many"])
    assert res.exit_code == 2 and "use 'dynamic' or a positive integer" in res.output
    res = CliRunner().invoke(main, ["validate", ".", "--batch-sizes", "1,0"])
    assert res.exit_code == 2 and "use comma-separated positive integers" in res.output


def _defaults(fn) -> dict:
    return {k: p.default for k, p in inspect.signature(fn).parameters.items() if p.default is not inspect.Parameter.empty}


def test_defaults_are_those_of_the_step_functions():
    from vitedge.compilation import compile_model
    from vitedge.export import export_onnx
    from vitedge.quantization import quantize
    from vitedge.validation import validate

    for cls, fn, kwargs in ((ExportOptions, export_onnx, ExportOptions().export_kwargs()),
                            (QuantizeOptions, quantize, {**QuantizeOptions(precision="int8").quantize_kwargs(), "target": None}),
                            (CompileOptions, compile_model, CompileOptions().compile_kwargs()),
                            (ValidateOptions, validate, ValidateOptions().validate_kwargs())):
        assert _defaults(fn).items() >= kwargs.items(), cls.__name__


def test_quantization_constants_are_declared_once():
    """The choices and defaults the steps use are assigned in vitedge/options.py and nowhere else in the package."""
    import ast

    import vitedge

    names = {"METHODS", "PRECISIONS", "ENGINE_PRECISIONS", "DEFAULT_AGREEMENT", "DEFAULT_COSINE", "DEFAULT_BUDGET_S", "MIN_CALIB", "HINTS", "PRECISION_HINTS"}
    root = Path(vitedge.__file__).parent
    assigned = {}
    for path in root.rglob("*.py"):
        for node in ast.parse(path.read_text()).body:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
            for t in targets:
                if isinstance(t, ast.Name) and t.id in names:
                    assigned.setdefault(t.id, []).append(str(path.relative_to(root)))
    assert set(assigned) == names and all(v == ["options.py"] for v in assigned.values()), assigned
    from vitedge import options, quantization

    assert quantization.METHODS is options.METHODS and quantization.Target is options.Target


def test_max_drop_is_given_once_and_reaches_the_target():
    opts = QuantizeOptions(precision="int8", max_drop=0.5, target_agreement=0.97)
    kw = opts.quantize_kwargs()
    assert kw["target"].max_drop == 0.5 and kw["target"].agreement == 0.97 and "max_drop" not in kw  # once: in the target


def test_manifest_sections_typed(tmp_path, ref_onnx):
    from vitedge.compilation import compile_model

    _, man = compile_model(ref_onnx, tmp_path / "m.ort.onnx", target="onnxruntime", threads=1)
    rec = man.compile_record
    assert (rec.target, rec.batch, rec.hint, rec.threads, rec.source) == ("onnxruntime", 1, "latency", 1, ref_onnx.name)
    assert rec.compile_seconds is not None and rec.compile_seconds > 0
    # the compile options a manifest records are named as the options are (but --backend, recorded as the
    # manifest's `target`: the manifest format predates the option's rename and is unchanged)
    echoed = {"target", "batch", "hint", "precision_hint", "threads", "device"}
    option_names = {"backend" if f == "target" else f for f in echoed}
    assert option_names <= {f.name for f in CompileOptions.fields()} and echoed <= set(CompileRecord.__dataclass_fields__)
    assert echoed & set(man.compile) == echoed - {"device"}  # ONNX Runtime has no device
    assert Manifest.load(Manifest.sidecar_path(tmp_path / "m.ort.onnx")).compile_record == rec
    q = QuantizationRecord.of({"method": "entropy", "fidelity": {"met": True}, "unknown": 1, "choice": None})
    assert (q.method, q.fidelity, q.choice, q.excluded_nodes) == ("entropy", {"met": True}, None, [])
