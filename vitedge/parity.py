"""Preprocessing parity: is the deployed engine fed the way the model was trained?

Accuracy lost between a reference pipeline and a deployed one is often preprocessing, not
quantization.  :func:`check_parity` runs the same raw images through the reference's own
preprocessing (a timm data config, a Hugging Face image-processor config, a vitedge checkpoint or
manifest) and through the engine's bundled preprocessing, then reports

* every field that differs (size, resize, crop, interpolation, channel order, scale, mean/std),
* the largest pixel difference between the two input tensors,
* the top-1 agreement each difference costs on its own, and all of them together (the engine's
  predictions on reference-preprocessed images are the baseline).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from .data import ImageSet
from .errors import VitedgeError
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
    return report
