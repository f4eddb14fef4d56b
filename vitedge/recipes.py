"""Recipes: the whole pipeline (export -> quantize -> compile -> validate) in one YAML file.

A recipe is validated against :func:`schema` (JSON Schema, checked with ``jsonschema``) when it
is loaded; errors name the file, the line and the key.  Paths inside a recipe are relative to the
recipe file.  :func:`run_recipe` runs the steps into one output folder; a step whose inputs
(content hashes of its input files) and options are unchanged is not redone.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, overload

import yaml

from ._io import sha256_file, write_json_atomic
from ._shipped import folder as shipped_folder
from ._version import __version__
from .artifact import check_output, companions
from .backends import registry
from .compilation import compile_model
from .data import ImageSet
from .errors import FileProblem, VitedgeError
from .export import export_onnx
from .manifest import BUNDLE_FILE, Manifest
from .models.loading import REFERENCE_CHECKPOINT, load_model
from .options import STEPS, CompileOptions, ExportOptions, QuantizeOptions, ValidateOptions
from .quantization import FidelityNotMet, quantize
from .ui import deprecated
from .validation import validate

# the shipped recipes/ folder, from the installed package (wheel or editable install)
RECIPES_DIR = shipped_folder("recipes")
STATE_FILE = ".vitedge-run.json"

_PATH = {"type": "string", "minLength": 1}


def schema() -> dict[str, Any]:
    """The recipe JSON Schema: the top level here, each step's from its options dataclass
    (:mod:`vitedge.options`), with the backend choices of the registry (a backend registered later is accepted too)."""
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "vitedge recipe",
        "type": "object",
        "additionalProperties": False,
        "required": ["name", "model", "steps"],
        "properties": {
            "name": {"type": "string", "pattern": "^[A-Za-z0-9_.-]+$", "description": "short identifier"},
            "description": {"type": "string", "description": "one line shown by `vitedge recipes`"},
            "model": {
                "description": "checkpoint file / Hugging Face folder (relative to the recipe), a preset name, 'reference', or an ONNX file",
                "type": "string",
                "minLength": 1,
            },
            "img_size": {"type": "integer", "minimum": 16, "description": "input resolution (default: the model's)"},
            "data": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "calibration": {**_PATH, "description": "calibration images (folder, .npy or .npz)"},
                    "validation": {**_PATH, "description": "validation images (class/image folders give top-1/top-5)"},
                    "labelled": {"type": "boolean", "description": "use class folders as labels (default: when the model's labels match)"},
                },
            },
            "steps": {
                "type": "object",
                "additionalProperties": False,
                "required": ["export"],
                "properties": {name: opts.recipe_schema() for name, opts in STEPS.items()},
            },
        },
    }


@dataclass
class Recipe:
    name: str
    path: Path | None  # the YAML file (None for recipes built in code)
    data: dict
    base_dir: Path = field(default_factory=Path.cwd)

    @property
    def description(self) -> str:
        return self.data.get("description", "")

    @overload
    def resolve(self, value: str) -> str: ...
    @overload
    def resolve(self, value: None) -> None: ...
    def resolve(self, value: str | None) -> str | None:
        """A path relative to the recipe file; preset names and 'reference' pass through."""
        if value is None:
            return None
        p = Path(value)
        if p.is_absolute():
            return str(p.resolve())  # normalised: no "..", symlinks followed as the OS does
        cand = self.base_dir / p
        if cand.exists() or "/" in value or p.suffix:
            return str(cand.resolve())  # "recipes/../calibration_data" -> ".../calibration_data"
        return value  # a preset name or "reference"

    def with_changes(self, **changes) -> Recipe:
        """A copy with top-level or dotted keys changed (e.g. ``{"steps.quantize.calib_samples": 8}``)."""
        data = copy.deepcopy(self.data)
        for dotted, value in changes.items():
            node = data
            *parents, last = dotted.split(".")
            for k in parents:
                node = node.setdefault(k, {})
            node[last] = value
        _upgrade(data, self.path or Path("<recipe>"))
        _validate(data, self.path or Path("<recipe>"), None)
        return Recipe(data["name"], self.path, data, self.base_dir)


def _line_index(text: str) -> dict[tuple, int]:
    """JSON path (tuple of keys) -> 1-based line number, from the YAML node tree."""
    lines: dict[tuple, int] = {}

    def walk(node, path):
        lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                key = k.value
                lines[path + (key,)] = k.start_mark.line + 1
                walk(v, path + (key,))
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                walk(v, path + (i,))

    root = yaml.compose(text)
    if root is not None:
        walk(root, ())
    return lines


def _upgrade(data: Any, path: Path) -> None:
    """Rename, in place, the step keys renamed in this release (``renamed_from`` in :mod:`vitedge.options`:
    ``quantize.samples`` -> ``calib_samples``, ``validate.samples`` -> ``val_samples``, ``compile.target`` ->
    ``backend``, ``export.val_images`` -> ``val``; a ``MIN,OPT,MAX`` ``compile.img_size`` -> ``img_size_profile``),
    with one deprecation line each: old recipes keep working for one release."""
    steps = data.get("steps") if isinstance(data, dict) else None
    if not isinstance(steps, dict):
        return  # the schema says what is wrong
    moves = {name: opts.renamed_keys() for name, opts in STEPS.items()}
    moves["compile"] = {**moves["compile"], "img_size": "img_size_profile"}
    for name, renames in moves.items():
        step = steps.get(name)
        if not isinstance(step, dict):
            continue
        for old, new in renames.items():
            if old not in step or (old == "img_size" and not isinstance(step[old], str)):
                continue
            if new in step:
                raise VitedgeError(f"{path}: steps.{name} gives both {old} and {new}", f"keep {new} only ({old} is its old name)")
            deprecated(f"steps.{name}.{old}", f"steps.{name}.{new}", where=str(path))
            step[new] = step.pop(old)


def _validate(data: Any, path: Path, text: str | None) -> None:
    import jsonschema

    validator = jsonschema.Draft202012Validator(schema())
    errors = sorted(validator.iter_errors(data), key=lambda e: (len(e.absolute_path), list(map(str, e.absolute_path))))
    if not errors:
        return
    err = jsonschema.exceptions.best_match(errors)
    keypath = tuple(err.absolute_path)
    where = ".".join(map(str, keypath)) or "(top level)"
    if err.validator == "additionalProperties":
        extra = sorted(set(err.instance) - set(err.schema.get("properties", {})))
        if extra:
            keypath = keypath + (extra[0],)
            where = ".".join(map(str, keypath))
            allowed = ", ".join(err.schema.get("properties", {}))
            msg = f"unknown key {extra[0]!r} (allowed: {allowed})"
        else:
            msg = err.message
    else:
        msg = err.message
    line = ""
    if text is not None:
        idx = _line_index(text)
        while keypath and keypath not in idx:
            keypath = keypath[:-1]
        if keypath in idx:
            line = f":{idx[keypath]}"
    raise VitedgeError(f"{path}{line}: {where}: {msg}", "see `vitedge recipes --schema` for the recipe format")


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe.  ``path`` may also be the name of a shipped recipe."""
    path = Path(path)
    if not path.exists() and not path.suffix and (RECIPES_DIR / f"{path}.yaml").exists():
        path = RECIPES_DIR / f"{path}.yaml"
    if not path.exists():
        raise FileProblem(f"recipe {path} does not exist", "run `vitedge recipes` to list the shipped ones")
    text = path.read_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise VitedgeError(f"{path}{line}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    _upgrade(data, path)
    _validate(data, path, text)
    return Recipe(data["name"], path, data, path.parent.resolve())


@dataclass
class BrokenRecipe:
    """A recipe file in a listed folder that does not load; ``error`` is its one-line message."""

    name: str  # the file's stem
    path: Path
    error: str


def scan_recipes(folder: str | Path = RECIPES_DIR) -> list[Recipe | BrokenRecipe]:
    """Every ``*.yaml`` of ``folder`` in file-name order: a :class:`Recipe`, or a :class:`BrokenRecipe`
    for a file that does not load (one bad file does not hide the others)."""
    found: list[Recipe | BrokenRecipe] = []
    for p in sorted(Path(folder).glob("*.yaml")):
        try:
            found.append(load_recipe(p))
        except VitedgeError as exc:
            found.append(BrokenRecipe(p.stem, p, str(exc)))
        except OSError as exc:  # unreadable file
            found.append(BrokenRecipe(p.stem, p, f"{p}: cannot be read ({exc.strerror or exc})"))
        except UnicodeDecodeError as exc:
            found.append(BrokenRecipe(p.stem, p, f"{p}: not a text file ({exc.reason} at byte {exc.start})"))
    return found


def list_recipes(folder: str | Path = RECIPES_DIR) -> list[Recipe]:
    """The recipes of ``folder`` that load (see :func:`scan_recipes` for the broken ones too)."""
    return [r for r in scan_recipes(folder) if isinstance(r, Recipe)]


# ------------------------------------------------------------------------------------------
# running
# ------------------------------------------------------------------------------------------
@dataclass
class StepResult:
    step: str
    status: str  # "done" | "cached"
    outputs: list[str]
    seconds: float
    summary: str = ""


@dataclass
class RunResult:
    recipe: str
    out_dir: Path
    steps: list[StepResult]
    engine: Path | None
    report: dict | None = None
    missed: str | None = None  # a random-weight preset's INT8 missed its fidelity target: the run went on, and exits 1


def _key(step: str, options: dict, inputs: list[Path]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"step": step, "options": options, "vitedge": __version__}, sort_keys=True, default=str).encode())
    for p in inputs:
        p = Path(p)
        files = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
        for f in files:
            h.update(str(f.relative_to(p) if p.is_dir() else f.name).encode())
            h.update(sha256_file(f).encode())
    return h.hexdigest()


def _model_inputs(model: str) -> list[Path]:
    """Files whose content decides the export: the checkpoint (or the shipped reference's)."""
    p = REFERENCE_CHECKPOINT if model == "reference" else Path(model)
    return [p] if p.exists() else []


def _artifact_inputs(artifact: Path) -> list[Path]:
    """An artifact's files: itself, its weights/data files and its manifest."""
    files = [artifact.parent / n for n in companions(artifact.parent, artifact.name)]
    side = Manifest.sidecar_path(artifact)
    return files + ([side] if side.exists() else [])


class _Runner:
    def __init__(self, recipe: Recipe, out_dir: Path, force: bool, log: Callable[[str], None]):
        self.recipe, self.out, self.force, self.log = recipe, out_dir, force, log
        self.state_path = out_dir / STATE_FILE
        self.state = {} if force or not self.state_path.exists() else json.loads(self.state_path.read_text())
        self.results: list[StepResult] = []

    def step(self, name: str, options: dict, inputs: list[Path], outputs: list[Path], fn: Callable[[], str]) -> None:
        key = _key(name, options, inputs)
        prev = self.state.get(name)
        if (
            not self.force
            and prev
            and prev["key"] == key
            and all(p.exists() for p in outputs)
            and all((self.out / f).exists() and sha256_file(self.out / f) == h for f, h in prev.get("hashes", {}).items())
        ):
            self.results.append(StepResult(name, "cached", [str(p) for p in outputs], 0.0, prev.get("summary", "")))
            self.log(f"{name}: unchanged, skipped")
            return
        self.log(f"{name}: running")
        t0 = time.perf_counter()
        try:
            summary = fn() or ""
        except VitedgeError as exc:
            self.state.pop(name, None)
            self._save()
            raise type(exc)(f"recipe {self.recipe.name}: step '{name}' failed: {exc}") from None
        files = [p for out in outputs for p in (_artifact_inputs(out) if out.suffix != ".json" else [out]) if p.exists()]
        self.state[name] = {
            "key": key,
            "summary": summary,
            "hashes": {str(p.relative_to(self.out)): sha256_file(p) for p in files if p.is_relative_to(self.out)},
        }
        self._save()
        self.results.append(StepResult(name, "done", [str(p) for p in outputs], time.perf_counter() - t0, summary))

    def _save(self) -> None:
        write_json_atomic(self.state_path, self.state)


def run_recipe(
    recipe: Recipe | str | Path, out_dir: str | Path | None = None, *, force: bool = False, log: Callable[[str], None] = lambda msg: None
) -> RunResult:
    """Run every step of ``recipe`` into ``out_dir`` (default ``runs/<name>``)."""
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    out = check_output(Path(out_dir) if out_dir else Path("runs") / recipe.name, folder=True)
    out.mkdir(parents=True, exist_ok=True)
    d, steps = recipe.data, recipe.data["steps"]
    data = d.get("data", {})
    model = recipe.resolve(d["model"])
    calib = recipe.resolve(data.get("calibration"))
    val = recipe.resolve(data.get("validation"))
    run = _Runner(recipe, out, force, log)
    missed = None

    # export (or take a given ONNX file as it is)
    exp = dict(steps.get("export") or {})
    if str(model).endswith(".onnx"):
        onnx_path = Path(model)
    else:
        onnx_path = out / "model.onnx"
        if str(exp.get("merge_tokens", "")).lower() == "auto" and "backend" not in exp and steps.get("compile"):
            exp["backend"] = steps["compile"].get("backend", "onnxruntime")  # auto times the engines the compile step builds
        eopts = ExportOptions.from_mapping(exp, recipe.resolve)  # the recipe's img_size sizes the model before export
        merge_val = eopts.val  # token merging's auto search measures on these

        def do_export():
            spec = load_model(model, img_size=d.get("img_size"))
            _, man = export_onnx(spec, onnx_path, **eopts.export_kwargs())
            err = max(c["max_abs_error"] for c in man.verification["checks"].values())
            merging = man.model.get("graph", {}).get("token_merging")
            every = (merging or {}).get("every", 1)
            extra = f"; token merging r={merging['r']}{f' every {every} blocks' if every > 1 else ''} (lossy)" if merging else ""
            return f"verified vs PyTorch, max abs error {err:.1e}{extra}"

        # the options (merge_tokens, val, max_drop included) and the content of the files read are the cache key
        run.step(
            "export",
            {**exp, "img_size": d.get("img_size")},
            _model_inputs(model) + ([merge_val] if merge_val and merge_val.exists() else []),
            [onnx_path],
            do_export,
        )
    current = onnx_path

    # quantize
    q = steps.get("quantize")
    if q:
        backend = q.get("backend") or (steps.get("compile") or {}).get("backend", "onnxruntime")
        q_path = out / f"model.{q['precision']}{registry.get(backend, 'quantize').quantized_suffix}"
        qopts = {**q, "backend": backend}
        # the fidelity search measures on a held-out part of the calibration images, so that the validate
        # step's numbers come from images the search never chose on
        quant = QuantizeOptions.from_mapping({**qopts, "calib": calib, "val": None if calib else val})

        def do_quantize():
            try:
                _, man = quantize(current, q_path, **quant.quantize_kwargs())
            except FidelityNotMet as exc:
                if not exc.random_weights or exc.manifest is None:
                    raise
                man = exc.manifest  # a preset recipe is a trial of random weights: the step's summary says the target was missed
            agree = man.verification.get("agreement", {})
            parts = [f"{k} {agree[k]:.4f}" for k in ("top1_agreement", "cosine_mean") if isinstance(agree.get(k), float)]
            rec = man.quantization_record
            if rec.fidelity:
                parts.append(f"fidelity target {'met' if rec.fidelity['met'] else 'NOT met'} ({rec.configuration})")
            return ", ".join(parts)

        run.step("quantize", qopts, _artifact_inputs(current) + ([Path(calib)] if calib else []), [q_path], do_quantize)
        current = q_path
        q_man = Manifest.load(Manifest.sidecar_path(q_path))  # (a cached step too)
        fidelity = q_man.quantization_record.fidelity
        if q_man.precision == "int8" and fidelity and not fidelity.get("met", True):
            missed = f"INT8 missed its fidelity target: {fidelity.get('summary')}"

    # compile
    c = steps.get("compile")
    engine = current
    if c:
        engine = out / f"engine{registry.get(c['backend'], 'compile').engine_suffix}"
        copts = CompileOptions.from_mapping(c, recipe.resolve)  # a timing_cache path is relative to the recipe

        def do_compile():
            compile_model(current, engine, **copts.compile_kwargs())
            return f"{copts.backend} engine"

        run.step("compile", c, _artifact_inputs(current), [engine], do_compile)

    # validate
    report = None
    v = steps.get("validate")
    if v is not None:
        rep_dir = out / "report"
        reference = model if not str(model).endswith(".onnx") else str(onnx_path)

        def do_validate():
            nonlocal report
            data_arg: str | ImageSet | None = val
            if val and data.get("labelled") is False:
                images = ImageSet.from_path(val)
                images.labels = [None] * len(images)  # class folders are not this model's labels
                data_arg = images
            rep = validate(engine, reference, data=data_arg, out_dir=rep_dir, **ValidateOptions.from_mapping(v).validate_kwargs())
            report = rep.to_dict()
            return rep.summary()

        run.step(
            "validate", {**v, "labelled": data.get("labelled")}, _artifact_inputs(engine) + ([Path(val)] if val else []), [rep_dir / "report.json"], do_validate
        )
        if report is None and (rep_dir / "report.json").exists():
            report = json.loads((rep_dir / "report.json").read_text())

    # the bundle: vitedge.load(out) opens the engine (with no compile step, the last artifact)
    if Manifest.sidecar_path(engine).exists():
        write_json_atomic(out / BUNDLE_FILE, {"engine": str(engine.relative_to(out)) if engine.is_relative_to(out) else str(engine.resolve())})
    return RunResult(recipe.name, out, run.results, engine, report, missed)
