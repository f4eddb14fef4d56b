"""Every step's options, declared once.

:class:`ExportOptions`, :class:`QuantizeOptions`, :class:`CompileOptions` and :class:`ValidateOptions`
are frozen dataclasses: each field is one option, with its type, default, allowed values and help
text (an :class:`Spec` in the field's metadata).  Everything else is generated from them:

* the recipe JSON Schema of each step (:func:`recipe_schema` assembles the whole recipe's), with the
  backend choices read from :mod:`vitedge.backends.registry` when the schema is made;
* the click options of ``vitedge export/quantize/compile/validate/benchmark``
  (:func:`vitedge.cli._common.options_of`);
* the step's options in a recipe run (:meth:`StepOptions.from_mapping`).

Like Optimum's ``QuantizationConfig``, an options object is plain typed data with named ways to make
it (``from_mapping`` for a recipe step, ``take`` for a command's keyword arguments); the steps
themselves still check values that need the model or the machine (e.g. ``--batch 0``).
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from .backends import registry
from .compare import wilson_interval
from .errors import VitedgeError

# the choices and defaults the steps use (vitedge.quantization, .compilation and .export import them from here)
PRECISIONS = ("int8", "fp16", "auto")  # auto: INT8, or the float model where INT8 does not pay on this CPU
METHODS = ("minmax", "percentile", "entropy")  # activation range calibration
ENGINE_PRECISIONS = ("fp32", "fp16", "bf16", "int8")  # what vitedge benchmark builds; each backend's offer is in its registry entry
HINTS = ("latency", "throughput")
PRECISION_HINTS = ("f32", "bf16", "f16")
CI_METHODS = ("agresti-min", "bootstrap")
DEFAULT_OPSET = 18
MIN_OPSET, MAX_OPSET = 13, 21
DEFAULT_AGREEMENT = 0.98  # INT8 fidelity target: top-1 agreement with FP32, classifiers
DEFAULT_COSINE = 0.995  # INT8 fidelity target: minimum per-image output cosine, other outputs
DEFAULT_BUDGET_S = 600.0  # wall time of the INT8 search after the default candidate
MIN_CALIB = 16  # fewer calibration images than this is refused unless asked for


@dataclass(frozen=True)
class Spec:
    """What one option is, beyond its Python type and default (kept in the field's metadata)."""

    help: str
    choices: tuple[str, ...] = ()
    backends: str | None = None  # the choices are the registered backends with this capability
    minimum: float | None = None
    maximum: float | None = None
    schema: dict | None = None  # recipe JSON Schema of the value, where the type alone does not say it
    recipe: bool = True  # False: CLI only (a recipe gives its data files under `data:`, or the option is about display)
    required: bool = False  # a recipe must give it
    flag: str | None = None  # the CLI name when it is not --field-name
    short: str | None = None  # e.g. "-t"
    switches: tuple[tuple[str, str, str], ...] = ()  # (flag, value, help): flags that each set one value (--int8)
    cli_default: str | None = None  # the CLI's text form of the default ("dynamic", "1,4,8")
    parse: Callable[[str], Any] | None = None  # CLI text -> value; a ValueError's message is the error shown
    cli_range: bool = False  # the CLI refuses values outside minimum/maximum (else the step's own check says why)
    metavar: str | None = None
    path: Mapping[str, bool] | None = None  # a file or folder: click.Path's exists / dir_okay / file_okay
    shown_default: str | None = None  # the default shown in help when the step decides it at run time
    # earlier CLI spellings, kept for one release as hidden aliases that print a deprecation line; a long one
    # ("--samples") is also the recipe key it had ("samples"), accepted with the same warning
    renamed_from: tuple[str, ...] = ()
    flag_value: str | None = None  # the value of the bare flag, for an option whose value may be left out (--ray)


def option(default: Any = None, help: str = "", **spec: Any) -> Any:
    """A dataclass field that is an option (``default`` plus the :class:`Spec` keywords)."""
    return field(default=default, metadata={"vitedge": Spec(help, **spec)})


@dataclass(frozen=True)
class OptionField:
    """One declared option: the dataclass field's name, default and type with its :class:`Spec`."""

    name: str
    default: Any
    type: Any
    spec: Spec

    @property
    def base_type(self) -> Any:
        """The type without ``None`` (``int | None`` -> ``int``)."""
        args = [a for a in typing.get_args(self.type) if a is not type(None)]
        return args[0] if typing.get_origin(self.type) in (typing.Union, _UnionType) and len(args) == 1 else self.type

    def json_schema(self) -> dict:
        s = self.spec
        if s.schema is not None:
            out = dict(s.schema)
        elif s.backends:
            out = {"enum": registry.names(s.backends)}
        elif s.choices:
            out = {"enum": list(s.choices)}
        else:
            out = _type_schema(self.base_type)
            bounds = {k: v for k, v in (("minimum", s.minimum), ("maximum", s.maximum)) if v is not None}
            (out["items"] if out.get("type") == "array" else out).update(bounds)
        out["description"] = s.help
        if self.default is not None and self.default is not False:
            out["default"] = _jsonable(self.default)
        return out


_UnionType = type(int | None)


def _type_schema(tp) -> dict:
    if tp is bool:
        return {"type": "boolean"}
    if tp is int:
        return {"type": "integer"}
    if tp is float:
        return {"type": "number"}
    if tp is Path:
        return {"type": "string", "minLength": 1}
    if tp is str:
        return {"type": "string"}
    if typing.get_origin(tp) is tuple:
        return {"type": "array", "items": _type_schema(typing.get_args(tp)[0]), "minItems": 1}
    raise TypeError(f"no JSON Schema for option type {tp!r}: give Spec(schema=...)")


def _jsonable(value):
    return [_jsonable(v) for v in value] if isinstance(value, tuple) else str(value) if isinstance(value, Path) else value


class StepOptions:
    """The behaviour every step's options dataclass shares."""

    STEP: ClassVar[str]
    __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]  # every step's options are a dataclass
    RULES: ClassVar[dict] = {}  # JSON Schema constraints between fields (added to the step's schema)

    @classmethod
    def fields(cls) -> list[OptionField]:
        hints = typing.get_type_hints(cls)
        return [OptionField(f.name, f.default, hints[f.name], f.metadata["vitedge"]) for f in dataclasses.fields(cls)]

    @classmethod
    def recipe_fields(cls) -> list[OptionField]:
        return [f for f in cls.fields() if f.spec.recipe]

    @classmethod
    def recipe_schema(cls) -> dict:
        """The JSON Schema of this step in a recipe (unknown keys refused)."""
        fields = cls.recipe_fields()
        out: dict = {"type": "object", "additionalProperties": False, "properties": {f.name: f.json_schema() for f in fields}}
        required = [f.name for f in fields if f.spec.required]
        if required:
            out["required"] = required
        return {**out, **cls.RULES}

    @classmethod
    def renamed_keys(cls) -> dict[str, str]:
        """Old recipe key -> its new name (from each field's ``renamed_from``), kept for one release."""
        return {old[2:].replace("-", "_"): f.name for f in cls.recipe_fields() for old in f.spec.renamed_from if old.startswith("--")}

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], resolve: Callable[[str], str] | None = None):
        """The options a recipe step gives (already schema-checked); path options go through ``resolve``
        (the recipe makes them relative to its file)."""
        kw = dict(values)
        for f in cls.fields():
            if f.name in kw and f.base_type is Path and kw[f.name] is not None:
                kw[f.name] = Path(resolve(kw[f.name]) if resolve else kw[f.name])
            elif f.name in kw and typing.get_origin(f.base_type) is tuple:
                kw[f.name] = tuple(kw[f.name])
        return cls(**kw)

    @classmethod
    def take(cls, kwargs: dict):
        """The options among a command's keyword arguments, removed from ``kwargs`` (what remains is the rest)."""
        return cls(**{f.name: kwargs.pop(f.name) for f in cls.fields() if f.name in kwargs})


# -- parsers of CLI text --------------------------------------------------------------------------
def parse_batch(text: str) -> int | str:
    """``'dynamic'`` or a positive integer (the export's batch)."""
    if str(text).lower() == "dynamic":
        return "dynamic"
    try:
        return int(text)
    except ValueError:
        raise ValueError("use 'dynamic' or a positive integer") from None


def parse_batch_sizes(text: str) -> tuple[int, ...]:
    """``"1,4,8"`` -> ``(1, 4, 8)``."""
    try:
        sizes = tuple(int(v) for v in str(text).replace(" ", "").split(",") if v)
    except ValueError:
        sizes = ()
    if not sizes or any(s < 1 for s in sizes):
        raise ValueError("use comma-separated positive integers, e.g. 1,4,8")
    return sizes


def parse_img_size(text: str) -> int:
    """One resolution (an integer); a ``MIN,OPT,MAX`` range is ``--img-size-profile`` now."""
    try:
        return int(text)
    except ValueError:
        if "," in str(text):
            raise ValueError(f"{text!r} is not one integer: a TensorRT MIN,OPT,MAX range is --img-size-profile {text}") from None
        raise ValueError(f"{text!r} is not an integer") from None


def parse_size(text: str) -> tuple[int, int] | None:
    """``"HxW"`` (or one number for a square) -> ``(height, width)``; empty -> None (``--size``)."""
    if text is None or str(text) == "":
        return None
    parts = str(text).lower().replace(" ", "").split("x")
    try:
        sides = tuple(int(v) for v in parts)
    except ValueError:
        sides = ()
    if len(sides) == 1:
        sides = sides * 2
    if len(sides) != 2 or min(sides) < 1:
        raise ValueError("use HEIGHTxWIDTH in pixels, e.g. 240x320 (or one number for a square)")
    return sides[0], sides[1]


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """``"224x224,240x320"`` -> ``[(224, 224), (240, 320)]`` (:func:`parse_size` each)."""
    return [s for s in (parse_size(part) for part in str(text).split(",")) if s is not None]


def size_text(text: str) -> str:
    """``--size`` checked (:func:`parse_sizes`) and kept as text, ``"HxW[,HxW...]"``: the step parses it."""
    return ",".join(f"{h}x{w}" for h, w in parse_sizes(text))


def _one_of(*alternatives: dict) -> dict:
    return {"oneOf": list(alternatives)}


_AUTO_MERGE = {"required": ["merge_tokens"], "properties": {"merge_tokens": {"const": "auto"}}}


# -- the steps -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ExportOptions(StepOptions):
    """``vitedge export`` / a recipe's ``steps.export``."""

    STEP: ClassVar[str] = "export"
    # val / max_drop / backend only mean something to the merge_tokens auto search, which needs the images
    RULES: ClassVar[dict] = {
        "dependentSchemas": {"val": _AUTO_MERGE, "max_drop": _AUTO_MERGE, "backend": _AUTO_MERGE},
        "if": _AUTO_MERGE,
        "then": {"required": ["val"]},
    }

    opset: int = option(
        DEFAULT_OPSET,
        f"ONNX opset ({MIN_OPSET}-{MAX_OPSET}; below 17 uses the TorchScript exporter, LayerNorm decomposed).",
        minimum=MIN_OPSET,
        maximum=MAX_OPSET,
    )
    batch: int | str = option(
        "dynamic", "'dynamic' or a fixed batch size.", parse=parse_batch, schema=_one_of({"const": "dynamic"}, {"type": "integer", "minimum": 1})
    )
    # a recipe's img_size is top-level: every step uses it
    img_size: int | None = option(None, "Input resolution (position embeddings are interpolated).", minimum=16, recipe=False, shown_default="the model's")
    calib: Path | None = option(
        None,
        "Representative images: the ONNX file is checked against PyTorch on a few of them.",
        path={"exists": True},
        recipe=False,
        shown_default="a few shipped calibration images",
        renamed_from=("--images",),
    )
    merge_tokens: int | str = option(
        0,
        "Token merging (ToMe; lossy, opt-in): merge R tokens in every block but the last, so later blocks run "
        "on fewer tokens (0: off).  'auto' picks the largest R whose top-1 drop on --val stays within --max-drop.",
        metavar="R|auto",
        cli_default="0",
        schema=_one_of({"type": "integer", "minimum": 0}, {"const": "auto"}),
    )
    merge_every: int = option(
        1,
        "Merge in every N-th block only (1: every block but the last).  Fewer merges cost fewer small ops; --merge-tokens auto chooses it.",
        minimum=1,
        metavar="N",
    )
    val: Path | None = option(
        None,
        "Held-out images for --merge-tokens auto (class sub-folders give labels; without labels, top-1 changes are counted).",
        path={"exists": True},
        shown_default="none; required by --merge-tokens auto",
        renamed_from=("--val-images",),
    )
    max_drop: float | None = option(None, "Top-1 points --merge-tokens auto may lose on --val.", minimum=0, shown_default="0.5")
    backend: str | None = option(
        None,
        "Backend --merge-tokens auto times its candidates on: the engine `vitedge compile --backend` builds by default, precision included.",
        backends="compile",
        shown_default="onnxruntime",
    )
    dynamic_size: bool = option(
        False,
        "One graph for many input sizes: any height and width that is a multiple of the patch, within --min-size/--max-size "
        "(position table interpolated in the graph; images keep their aspect ratio).",
    )
    min_size: int | None = option(None, "Smallest height/width of a --dynamic-size export.", minimum=16, shown_default="half the model's size")
    max_size: int | None = option(None, "Largest height/width of a --dynamic-size export.", minimum=16, shown_default="twice the model's size")

    def export_kwargs(self) -> dict:
        """Keyword arguments of :func:`vitedge.export.export_onnx` (``images``, from ``calib``, is the caller's: it lists the folder)."""
        return {
            "opset": self.opset,
            "batch": None if self.batch == "dynamic" else self.batch,
            "img_size": self.img_size,
            "merge_tokens": self.merge_tokens,
            "merge_every": self.merge_every,
            "val_images": self.val,
            "max_drop": self.max_drop,
            "backend": self.backend,
            "dynamic_size": self.dynamic_size,
            "min_size": self.min_size,
            "max_size": self.max_size,
        }


def _ray_field(what: str = "the accuracy pass (benchmark: the builds too)", where: str = "latency is still measured here") -> Any:
    """``--ray [auto|ADDRESS]`` (a field of each command that has it)."""
    return option(
        None,
        f"Run {what} on a Ray cluster: 'auto' (this machine's cluster, else a new "
        f'local one) or its address; {where}. Needs pip install "vitedge[ray]" (docs/distributed.md).',
        recipe=False,
        flag_value="auto",
        metavar="auto|ADDRESS",
        shown_default="off: everything on this machine",
    )


@dataclass(frozen=True)
class QuantizeOptions(StepOptions):
    """``vitedge quantize`` / a recipe's ``steps.quantize``.  ``max_drop`` is given once, here: :meth:`target`
    carries it into the INT8 fidelity target, and :meth:`quantize_kwargs` into the TensorRT sensitivity search."""

    STEP: ClassVar[str] = "quantize"

    precision: str | None = option(
        None,
        "int8 (calibrated), fp16, or auto (INT8 where it pays on this CPU).",
        choices=PRECISIONS,
        required=True,
        switches=(
            ("--int8", "int8", "INT8 with calibration (MatMul/Gemm/Conv; LayerNorm/Softmax/GELU stay float)."),
            ("--fp16", "fp16", "FP16 weights/math, FP32 inputs/outputs."),
            (
                "--auto",
                "auto",
                (
                    "INT8 where it pays: run the INT8 search, measure the FP32 model at this CPU's fastest float precision "
                    "(bf16 on AVX-512 BF16/AMX CPUs) the same way, and write the faster one that meets the fidelity target."
                ),
            ),
        ),
    )
    backend: str = option(
        "onnxruntime",
        "Target runtime: onnxruntime/tensorrt write .onnx (QDQ), openvino writes IR .xml+.bin (in a recipe, the default is the compile step's backend).",
        backends="quantize",
    )
    calib: Path | None = option(
        None,
        "Calibration images: folder (recursive, class sub-folders allowed) or preprocessed .npy/.npz. Required for INT8 except for the reference model.",
        path={},
        recipe=False,
        shown_default="the shipped images, reference model only",
    )
    calib_samples: int | None = option(
        None, "Calibration images to use (sampled with --seed).", minimum=1, shown_default="all, up to 300", renamed_from=("--samples",)
    )
    method: str | None = option(
        None, "Activation range calibration (entropy for --backend tensorrt, as NVIDIA's tools do).", choices=METHODS, shown_default="minmax; tensorrt: entropy"
    )
    target_agreement: float = option(
        DEFAULT_AGREEMENT, "INT8 fidelity target for classifiers: top-1 agreement with FP32 on held-out images.", minimum=0, maximum=1
    )
    target_cosine: float = option(
        DEFAULT_COSINE, "INT8 fidelity target for other outputs (features, dense maps): minimum per-image output cosine.", minimum=0, maximum=1
    )
    search_budget: float = option(
        DEFAULT_BUDGET_S,
        "When the default INT8 misses the target, time allowed for the search (ranking, reverting groups, whole-model "
        "settings; 0: default only). Every candidate is written to <out>.fidelity.md/.json.",
        minimum=0,
        metavar="SECONDS",
    )
    max_drop: float | None = option(
        None,
        "Also bound the top-1 points INT8 may lose (on --val labels, else vs FP32 predictions). "
        "TensorRT: the most sensitive layers are kept in float until it fits (<out>.sensitivity.md/.json).",
        minimum=0,
        shown_default="no bound",
    )
    min_calib: int = option(MIN_CALIB, "Fewest calibration images accepted; lower it only if you know the ranges will still be representative.", minimum=1)
    val: Path | None = option(
        None, "Held-out images for the agreement numbers and --max-drop.", path={}, recipe=False, shown_default="a held-out part of --calib"
    )
    seed: int = option(0, "Seed for sampling and the held-out split.")
    reference: str | None = option(
        None,
        "FP32 ONNX model the fidelity target and agreement are measured against, e.g. an unmerged export when the input "
        "merges tokens, so that the target covers both losses.",
        recipe=False,
        shown_default="the input model",
    )
    ray: str | None = _ray_field(
        "the INT8 search's independent evaluations (the ranking of the groups, the whole-model settings)",
        "the candidates that build on each other run here; -o must be on a filesystem every node mounts",
    )

    def target(self):
        """The INT8 fidelity target (:class:`Target`), ``max_drop`` included."""
        return Target(self.target_agreement, self.target_cosine, self.max_drop)

    def quantize_kwargs(self) -> dict:
        """Keyword arguments of :func:`vitedge.quantization.quantize` (all but the files and ``preprocessing``)."""
        return {
            "precision": self.precision,
            "backend": self.backend,
            "calib": self.calib,
            "samples": self.calib_samples,
            "method": self.method,
            "val": self.val,
            "seed": self.seed,
            "target": self.target(),
            "search_budget": self.search_budget,
            "min_calib": self.min_calib,
            "reference": self.reference,
            "ray": self.ray,
        }


@dataclass(frozen=True)
class CompileOptions(StepOptions):
    """``vitedge compile`` / a recipe's ``steps.compile``.  The backend-specific options (OpenVINO: streams,
    export_blob; TensorRT: workspace_mb, profile, timing_cache) are refused by the other targets."""

    STEP: ClassVar[str] = "compile"

    backend: str = option(
        "onnxruntime",
        "Backend that builds the engine; `vitedge backends` lists them and what this machine can run.",
        backends="compile",
        required=True,
        renamed_from=("--target", "-t"),
    )
    batch: int | str = option(
        "auto",
        "'auto' (static 1 for --hint latency, dynamic for throughput), 'dynamic' or a fixed size.",
        schema=_one_of({"enum": ["auto", "dynamic"]}, {"type": "integer", "minimum": 1}),
    )
    img_size: int | None = option(
        None,
        "Resolution of a model name/checkpoint (exported at that size), or the size of a dynamic-size ONNX.",
        minimum=16,
        parse=parse_img_size,
        shown_default="the model's",
    )
    img_size_profile: str | None = option(
        None,
        "TensorRT, dynamic-size ONNX: MIN,OPT,MAX resolutions of the optimisation profile (instead of one --img-size).",
        schema={"type": "string", "pattern": r"^\d+,\d+,\d+$"},
        metavar="MIN,OPT,MAX",
        shown_default="--img-size only",
    )
    threads: int | None = option(None, "Inference threads.", minimum=1, cli_range=True, shown_default="all cores")
    hint: str = option("latency", "Optimise for one request at a time (latency) or many in parallel (throughput).", choices=HINTS)
    precision_hint: str | None = option(
        None,
        "Precision of the ops computed in float (OpenVINO's device default is bf16 on AVX-512 BF16 CPUs).",
        choices=PRECISION_HINTS,
        shown_default="OpenVINO: device default, f32 for INT8 models; TensorRT: f16",
    )
    device: str | None = option(None, "OpenVINO device (CPU, GPU, NPU, AUTO, ...).", shown_default="CPU")
    streams: int | str | None = option(
        None, "OpenVINO streams (a number or AUTO).", schema=_one_of({"type": "integer", "minimum": 1}, {"const": "AUTO"}), shown_default="from --hint"
    )
    export_blob: bool = option(False, "OpenVINO: also write the compiled blob (.blob) for a fast cold start.", flag="--blob")
    workspace_mb: int | None = option(None, "TensorRT: builder workspace memory limit.", minimum=1, shown_default="1024")
    profile: str | None = option(
        None,
        "TensorRT: MIN,OPT,MAX batch sizes of the optimisation profile.",
        schema={"type": "string", "pattern": r"^\d+,\d+,\d+$"},
        shown_default="1,1,32 latency / 1,8,32 throughput",
    )
    timing_cache: Path | None = option(
        None, "TensorRT: timing cache file, read if it exists and updated (faster rebuilds).", path={"dir_okay": False}, shown_default="none"
    )

    def compile_kwargs(self) -> dict:
        """Keyword arguments of :func:`vitedge.compilation.compile_model` (all but the files and ``preprocessing``):
        ``backend`` is its ``target``, and ``img_size`` is one size or the TensorRT ``MIN,OPT,MAX`` profile."""
        if self.img_size is not None and self.img_size_profile is not None:
            raise VitedgeError("--img-size and --img-size-profile both give the resolution", "give one of them")
        named = {f.name: getattr(self, f.name) for f in self.fields() if f.name not in ("backend", "img_size", "img_size_profile")}
        return {**named, "target": self.backend, "img_size": self.img_size_profile or self.img_size}


@dataclass(frozen=True)
class RayOption(StepOptions):
    """``--ray`` of ``vitedge benchmark`` (``vitedge validate`` has it among its :class:`ValidateOptions`)."""

    STEP: ClassVar[str] = "ray"

    ray: str | None = _ray_field()


@dataclass(frozen=True)
class TimingOptions(StepOptions):
    """How engines are timed (``vitedge validate`` and ``vitedge benchmark``)."""

    STEP: ClassVar[str] = "timing"

    val_samples: int | None = option(
        None, "Use a seeded sample of N validation images.", minimum=1, cli_range=True, shown_default="all", renamed_from=("--samples",)
    )
    rounds: int = option(
        10,
        "Interleaved timing rounds (reference, engine 1, ..., reference, ...); the speed-up is the median of the per-round ratios reference/engine.",
        minimum=1,
        cli_range=True,
    )
    runs: int | None = option(
        None, "Exact number of timed runs at batch 1 (instead of the time budget).", minimum=1, cli_range=True, shown_default="--time-budget decides"
    )
    time_budget: float = option(5.0, "Seconds of timed runs per model at batch 1 (extended up to 2x until the median is stable).", minimum=0.01, cli_range=True)
    batch_sizes: tuple[int, ...] = option((1, 4, 8), "Batch sizes of the throughput sweep.", minimum=1, cli_default="1,4,8", parse=parse_batch_sizes)


@dataclass(frozen=True)
class ValidateOptions(TimingOptions):
    """``vitedge validate`` / a recipe's ``steps.validate`` (the timing options included)."""

    STEP: ClassVar[str] = "validate"

    max_drop: float | None = option(None, "Gate: max top-1 drop in percentage points (exit 1 if exceeded).", minimum=0, shown_default="no gate")
    min_speedup: float | None = option(
        None,
        "Gate: min batch-1 speed-up over the FP32 reference (exit 1 if missed, exit 3 if the machine is too busy to measure it).",
        minimum=0,
        shown_default="no gate",
    )
    reference_threads: int | None = option(
        None,
        "Threads of the FP32 reference (PyTorch intra-op, or ONNX Runtime for an .onnx reference); the engines use as many.",
        minimum=1,
        cli_range=True,
        shown_default="the cores other processes leave free (every usable core on a quiet machine)",
    )
    strict: bool = option(False, "Gate on the upper end of the drop's 95% confidence interval, not the estimate.")
    backend: str | None = option(
        None, "Run the engines with this backend (e.g. an ONNX file with OpenVINO).", backends="run", recipe=False, shown_default="each engine's own"
    )
    precision_hint: str | None = option(
        None, "OpenVINO inference precision for the engines (INFERENCE_PRECISION_HINT).", choices=PRECISION_HINTS, recipe=False, shown_default="device default"
    )
    ci_method: str = option("agresti-min", "Paired confidence interval of the accuracy drop.", choices=CI_METHODS)
    worst: int = option(10, "How many worst images to list per engine.", minimum=0, cli_range=True)
    ray: str | None = _ray_field()
    latency_node: str | None = option(
        None,
        "With --ray: measure latency and throughput on this Ray node (its IP or node ID).",
        recipe=False,
        metavar="NODE",
        shown_default="this machine",
    )
    size: str | None = option(
        None,
        "Feed every model the images at HEIGHTxWIDTH (dynamic-size engines; a PyTorch reference runs any size); several "
        "sizes, comma-separated, give one report per size and a summary.",
        parse=size_text,
        metavar="HxW[,HxW...]",
        shown_default="each model's own size",
        recipe=False,
    )

    def validate_kwargs(self) -> dict:
        """Keyword arguments of :func:`vitedge.validation.validate` (the engines' backend and precision hint go
        into their :class:`~vitedge.validation.EngineSpec`)."""
        kw = {f.name: getattr(self, f.name) for f in self.fields() if f.name not in ("backend", "precision_hint", "val_samples")}
        return {**kw, "samples": self.val_samples}


STEPS: dict[str, type[StepOptions]] = {o.STEP: o for o in (ExportOptions, QuantizeOptions, CompileOptions, ValidateOptions)}


# -- the INT8 fidelity target ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    """What "keeps the predictions" means.  Classifiers: top-1 agreement with FP32 (and, with
    ``max_drop``, the top-1 points lost on labelled images).  Other outputs: the minimum per-image
    cosine of every output."""

    agreement: float = DEFAULT_AGREEMENT
    cosine: float = DEFAULT_COSINE
    max_drop: float | None = None  # top-1 percentage points (labelled: accuracy; else disagreement)

    def __post_init__(self):
        for name, v in (("target agreement", self.agreement), ("target cosine", self.cosine)):
            if not (0.0 <= v <= 1.0):
                raise VitedgeError(f"{name} {v} must be between 0 and 1", "e.g. --target-agreement 0.98")

    def describe(self, classifier: bool) -> str:
        if classifier:
            s = f"top-1 agreement >= {100 * self.agreement:.1f}%"
            return s + (f" and top-1 drop <= {self.max_drop:g} pp" if self.max_drop is not None else "")
        return f"min output cosine >= {self.cosine:g}"

    def check(self, m: dict, classifier: bool, drop_pp: float | None) -> bool:
        """Met by the point estimate (what the search acts on; :meth:`verdict` adds the interval)."""
        if not m.get("finite", True):
            return False
        if classifier:
            ok = m.get("top1_agreement", 1.0) >= self.agreement - 1e-12
            return ok and (self.max_drop is None or drop_pp is None or drop_pp <= self.max_drop + 1e-9)
        return _min_cosine(m) >= self.cosine - 1e-12

    def verdict(self, m: dict, classifier: bool, drop_pp: float | None) -> tuple[str, list[float] | None]:
        """``met`` / ``missed`` when the agreement's Wilson interval lies on one side of the target, else
        ``not separable`` (the point estimate is on the side :meth:`check` says); with the interval."""
        if not classifier or "top1_agreement" not in m or not m.get("images"):
            return ("met" if self.check(m, classifier, drop_pp) else "missed"), None
        n = int(m["images"])
        lo, hi = wilson_interval(int(round(m["top1_agreement"] * n)), n)
        if not self.check(m, classifier, drop_pp):
            return ("missed" if hi < self.agreement or not m.get("finite", True) else "not separable"), [lo, hi]
        return ("met" if lo >= self.agreement else "not separable"), [lo, hi]


def _min_cosine(m: dict) -> float:
    """The smallest per-image cosine over every output of a measurement (``outputs`` when there are several)."""
    outs = m.get("outputs")
    return min(o["cosine_min"] for o in outs.values()) if outs else m["cosine_min"]
