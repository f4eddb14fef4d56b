"""Preprocessing parity: is the deployed engine fed the way the model was trained?

Accuracy lost between a reference pipeline and a deployed one is often preprocessing, not
quantization.  :func:`check_parity` runs the same raw images through the reference's own
preprocessing (a timm data config, a Hugging Face image-processor config, a vitedge checkpoint or
manifest) and through the engine's bundled preprocessing, then reports

* every field that differs (size, resize, crop, interpolation, channel order, scale, mean/std),
* the largest pixel difference between the two input tensors,
* the top-1 agreement each difference costs on its own, and all of them together (the engine's
  predictions on reference-preprocessed images are the baseline),
* the command that fixes it (:attr:`ParityReport.fix`): ``vitedge set-preprocessing``, which rewrites the
  preprocessing recorded in the engine's manifest (:func:`set_preprocessing`).  The engine file is not touched:
  preprocessing runs before it, and every vitedge reader takes it from the manifest.
"""

from __future__ import annotations

import shlex
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from .data import ImageSet
from .errors import FileProblem, InputError, VitedgeError
from .foreign import check_input_size
from .manifest import MANIFEST_SUFFIX, Manifest
from .models.loading import load_model
from .preprocess import Preprocessing, load_image
from .preprocessing_resolver import resolve_preprocessing, sources_from_json, sources_near
from .runtime import load

FIELDS = ("img_size", "resize", "center_crop", "interpolation", "channel_order", "scale", "mean", "std")


def preprocessing_from_timm(cfg: dict) -> Preprocessing:
    """A timm data config / ``pretrained_cfg`` / hub ``config.json``, read by the one resolver."""
    return resolve_preprocessing(timm=cfg)


def reference_preprocessing(source: str | Path) -> tuple[Preprocessing, str]:
    """The reference's preprocessing and where it came from, by the rules of
    :func:`vitedge.preprocessing_resolver.resolve_preprocessing` (what the model loader uses too).

    ``source``: a timm config JSON, a Hugging Face ``preprocessor_config.json`` (or its folder),
    a vitedge checkpoint / manifest / artifact, a timm checkpoint folder, a preset name or ``reference``.
    """
    p = Path(source)
    if p.is_dir():
        sources, found = sources_near(p)
        timm = sources.get("timm")
        if timm is None and "hf" in sources:
            return resolve_preprocessing(hf=sources["hf"]), f"Hugging Face image processor ({found})"
        if timm is not None and "input_size" in (timm.get("pretrained_cfg") or timm):
            return resolve_preprocessing(timm=timm), f"timm data config ({found})"
        # otherwise the checkpoint in the folder says the rest (e.g. its input size)
    if p.suffix == ".json" and not p.name.endswith(MANIFEST_SUFFIX):
        sources, where = sources_from_json(p)
        if "manifest" in sources:
            raise VitedgeError(f"{p} is neither a timm data config nor a Hugging Face preprocessor config")
        return resolve_preprocessing(**sources), where
    if p.exists() and (p.name.endswith(MANIFEST_SUFFIX) or p.suffix in (".onnx", ".xml", ".blob", ".engine")):
        _, man = Manifest.find(p)
        if man is None or not man.preprocessing:
            raise VitedgeError(f"{p} carries no preprocessing to compare with")
        return Preprocessing.from_dict(man.preprocessing), f"manifest of {p.name}"
    spec = load_model(str(source))
    return spec.preprocessing, f"checkpoint {spec.source}"


@dataclass
class FieldDiff:
    field: str
    reference: object
    engine: object
    top1_agreement: float | None  # engine top-1 with only this field as the engine has it


@dataclass
class ParityReport:
    reference_source: str
    images: int
    differences: list[FieldDiff] = field(default_factory=list)
    max_abs_input_diff: float | None = None
    top1_agreement: float | None = None  # engine(engine preprocessing) vs engine(reference preprocessing)
    notes: list[str] = field(default_factory=list)
    fix: str | None = None  # the command that gives the engine the reference's preprocessing (None: none can)

    @property
    def ok(self) -> bool:
        return not self.differences and (self.max_abs_input_diff is None or self.max_abs_input_diff < 1e-3)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ok"] = self.ok
        return d


def _value(pre: Preprocessing, name: str):
    v = getattr(pre, name)
    return list(v) if isinstance(v, tuple) else v


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(np.isclose(float(x), float(y), rtol=1e-4, atol=1e-6) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and bool(np.isclose(float(a), float(b), rtol=1e-4))
    return a == b


def check_parity(engine_path: str | Path, reference: str | Path, data: str | Path, *, samples: int = 64, seed: int = 0) -> ParityReport:
    """Compare the engine's bundled preprocessing with the reference's on real images."""
    ref_pre, where = reference_preprocessing(reference)
    images = ImageSet.from_path(data).sample(samples, seed)
    if images.arrays is not None:
        raise VitedgeError("parity needs raw images (a folder), not preprocessed arrays")
    with load(engine_path) as engine:
        eng_pre = engine.preprocessing.fixed()  # a dynamic-size engine: compared at its own size, like a fixed export
        report = ParityReport(where, len(images))
        diffs = [f for f in FIELDS if not _same(_value(ref_pre, f), _value(eng_pre, f))]
        if eng_pre.resize is None and ref_pre.resize is None and "center_crop" in diffs:
            diffs.remove("center_crop")  # no resize step: the crop flag has no effect
        raws = [load_image(p) for p in images.paths]
        x_ref = ref_pre.batch(raws)
        x_eng = eng_pre.batch(raws)
        fixed = [d for d in engine.input_shape[2:] if isinstance(d, int) and d > 0]
        runnable = not fixed or tuple(x_ref.shape[2:]) == tuple(engine.input_shape[2:])
        if x_ref.shape == x_eng.shape:
            report.max_abs_input_diff = float(np.abs(x_ref - x_eng).max())
        else:
            report.notes.append(f"input tensors differ in shape: reference {x_ref.shape[1:]}, engine {x_eng.shape[1:]}")
        if not runnable:
            report.notes.append(f"the engine's input is fixed at {engine.input_shape[2:]}: the reference size cannot run, agreement not measured")
        classify = engine.manifest.task == "classification"
        base = engine.infer(x_ref).argmax(-1) if runnable and classify else None
        for f in diffs:
            agree = None
            if base is not None:
                only = replace(ref_pre, **{f: getattr(eng_pre, f)})
                if not fixed or tuple(only.img_size) == tuple(engine.input_shape[2:]):
                    agree = float((engine.infer(only.batch(raws)).argmax(-1) == base).mean())
            report.differences.append(FieldDiff(f, _value(ref_pre, f), _value(eng_pre, f), agree))
        if base is not None:
            report.top1_agreement = float((engine.infer(x_eng).argmax(-1) == base).mean())
        if report.differences and (not fixed or tuple(ref_pre.img_size) == tuple(engine.input_shape[2:])):
            report.fix = fix_command(engine_path, reference, ref_pre, [d.field for d in report.differences])
        elif report.differences:
            report.notes.append(f"the engine's input is fixed at {engine.input_shape[2:]}: re-export and compile it at the reference's size")
    return report


#: the preprocessing fields ``vitedge set-preprocessing`` sets by a flag, and the flag
_FLAGS = {"img_size": "--img-size", "resize": "--resize", "interpolation": "--interpolation", "mean": "--mean", "std": "--std"}


def fix_command(engine_path: str | Path, reference: str | Path, ref_pre: Preprocessing, fields: list[str]) -> str:
    """``vitedge set-preprocessing ENGINE ...``: the flags that set ``fields`` to the reference's values, or
    ``--reference REF`` (every field) when a flag cannot say one (scale, channel order, no resize, a non-square size)."""
    args = ["vitedge", "set-preprocessing", str(engine_path)]
    for f in fields:
        value = getattr(ref_pre, f)
        if f == "center_crop":
            args.append("--crop" if value else "--no-crop")
        elif f not in _FLAGS or value is None or (f == "img_size" and value[0] != value[1]):
            return shlex.join(["vitedge", "set-preprocessing", str(engine_path), "--reference", str(reference)])
        else:
            text = value[0] if f == "img_size" else ",".join(f"{v:g}" for v in value) if isinstance(value, tuple) else value
            args += [_FLAGS[f], str(text)]
    return shlex.join(args)


def set_preprocessing(path: str | Path, reference: str | Path | None = None, *, json_path: str | Path | None = None, **flags) -> tuple[Path, dict[str, tuple]]:
    """Correct the preprocessing recorded in an artifact's manifest; returns the manifest's path and
    ``{field: (old, new)}`` for what changed (nothing changed: nothing is written).

    The new preprocessing is the manifest's own, or the ``reference``'s (anything :func:`reference_preprocessing`
    reads), or a ``json_path`` (a small vitedge JSON, a Hugging Face or timm config), with ``flags`` on top
    (``img_size, resize, crop, interpolation, mean, std``).  It must fit a fixed input size.  The manifest is
    rewritten atomically (its content, and so its hash, changes; the artifact's files and their hashes do not),
    with a line in its assumptions saying what was set by hand."""
    artifact, man = Manifest.find(path)
    sidecar = Manifest.sidecar_path(artifact)
    if man is None or not sidecar.exists():
        raise FileProblem(
            f"{artifact.name} has no manifest of its own ({sidecar.name})",
            "ONNX files without a manifest take the preprocessing flags directly (predict, validate, quantize, compile)",
        )
    flags = {k: v for k, v in flags.items() if v is not None}
    if reference is None and json_path is None and not flags:
        raise InputError("nothing to set", "pass --reference, --preprocessing FILE or --img-size/--resize/--crop/--interpolation/--mean/--std")
    if json_path is not None:
        sources = sources_from_json(json_path)[0]
    else:
        base = reference_preprocessing(reference)[0] if reference is not None else man.preprocessing_obj
        sources = {"manifest": base if base is not None else {}}
    hw = man.inputs[0].shape[2:4] if man.inputs else []
    fixed_hw = tuple(hw) if len(hw) == 2 and all(isinstance(d, int) and d > 0 for d in hw) else None
    new = resolve_preprocessing(fixed_hw, **sources, flags=flags)
    check_input_size(man, new, artifact)
    old = Preprocessing.from_dict(man.preprocessing) if man.preprocessing else None
    changed = {f: (None if old is None else _value(old, f), _value(new, f)) for f in FIELDS if old is None or not _same(_value(old, f), _value(new, f))}
    if not changed:
        return sidecar, {}
    man.preprocessing = new.to_dict()
    said = ", ".join(f"{f} {v}" for f, (_, v) in changed.items())
    man.assumptions = [a for a in man.assumptions if not a.startswith("preprocessing ")]
    man.assumptions += [f"preprocessing {a}" for a in new.assumed] + [f"preprocessing set with vitedge set-preprocessing: {said}"]
    man.save(artifact)
    return sidecar, changed
