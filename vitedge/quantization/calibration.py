"""Calibration and evaluation data for quantization.

* :func:`plan_data` turns ``--calib``/``--val``/``--calib-samples``/``--seed`` into a deterministic
  calibration subset and a held-out evaluation set (``--val`` if given, else a seeded part of the
  calibration folder that calibration never sees).
* :class:`StreamingBatches` feeds a calibrator batch by batch (with a progress bar), so neither the
  images nor the activations of the whole set are held in memory at once.
* :class:`EvalSet` holds the (small) evaluation set and computes agreement with FP32.

A dynamic-size model (``vitedge export --dynamic-size``) is quantized on a mix of the sizes it will serve
(:func:`size_mix`): the calibration images take the sizes in turn, every held-out image is measured at every
size, and the fidelity target must hold at each size (:meth:`EvalSet.measure` reports the worst size at the top
level and every size under ``per_size``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import compare
from ..backends.base import pad_batch
from ..data import SHIPPED_CALIBRATION, ImageSet, label_indices
from ..errors import ShapeMismatch, VitedgeError
from ..manifest import Manifest
from ..models.loading import REFERENCE_CHECKPOINT
from ..options import MIN_CALIB
from ..preprocess import Preprocessing
from ..ui import progress

log = logging.getLogger("vitedge")

DEFAULT_SAMPLES = 300  # calibration images used when --calib-samples is not given (NNCF's default too)
HOLDOUT_FRACTION = 0.2  # part of the calibration folder kept for evaluation when --val is absent, at least ...
CALIB_KEEP = 150  # ... and more where the folder has more than this many images for calibration, up to MAX_HOLDOUT
MIN_FOR_HOLDOUT = 10
MAX_HOLDOUT = 200  # one flip moves agreement by 0.5 points at 200 images (5 points at 20)
EVAL_CACHE_BYTES = 512 * 1024 * 1024  # evaluation arrays kept in memory up to this size
SHIPPED_DIGITS = SHIPPED_CALIBRATION / "digits" / "calib"


def size_mix(pre: Preprocessing | None) -> list[tuple[int, int]] | None:
    """The (height, width) sizes a dynamic-size model is calibrated and held to its target at: the sizes its export
    was verified at (:meth:`~vitedge.preprocess.DynamicSize.check_sizes`: its own square size, a portrait and a
    landscape size, and both bounds).  None for a fixed-size model."""
    if pre is None or pre.dynamic_size is None:
        return None
    return pre.dynamic_size.check_sizes(min(pre.img_size))


def size_key(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


def is_reference_model(manifest: Manifest) -> bool:
    src = str((manifest.model or {}).get("source", ""))
    return bool(src) and Path(src).name == REFERENCE_CHECKPOINT.name


def subset(ims: ImageSet, idx) -> ImageSet:
    idx = [int(i) for i in idx]
    if ims.arrays is not None:
        return ImageSet(ims.source, [], [ims.labels[i] for i in idx], arrays=ims.arrays[idx])
    return ImageSet(ims.source, [ims.paths[i] for i in idx], [ims.labels[i] for i in idx])


@dataclass
class DataPlan:
    calib: ImageSet | None  # what the calibrator sees (None for FP16)
    eval: ImageSet | None  # held-out images for agreement / max-drop (None: no real images at hand)
    eval_source: str  # human description of where the evaluation images come from
    calib_source: str | None = None
    notes: list[str] = field(default_factory=list)


def _check_fits(ims: ImageSet, manifest: Manifest, pre: Preprocessing | None, what: str) -> None:
    shape = manifest.inputs[0].shape if manifest.inputs else None
    if shape:
        ims.check_shape(shape)
        if ims.arrays is None and pre is not None:
            hw = list(shape[2:4])
            if all(isinstance(d, int) for d in hw) and tuple(hw) != tuple(pre.img_size):
                raise ShapeMismatch(
                    f"the manifest preprocessing makes {pre.img_size} images but the model takes {tuple(shape)}",
                    "fix the preprocessing in the model's .vitedge.json",
                )
    if ims.arrays is None and pre is None:
        raise VitedgeError(
            f"{what} {ims.source} holds images but the model has no preprocessing in its manifest",
            "export the model with vitedge, or pass preprocessed arrays as .npy/.npz",
        )


def plan_data(
    manifest: Manifest, pre: Preprocessing | None, *, precision: str, calib, val, samples: int | None, seed: int, min_calib: int = MIN_CALIB
) -> DataPlan:
    """Choose calibration and evaluation sets, deterministically for a seed.

    INT8 calibration on fewer than ``min_calib`` images is refused: ranges from a handful of images
    do not describe deployment data, and nothing would be left to measure on.
    """
    if min_calib < 1:
        raise VitedgeError(f"--min-calib {min_calib} must be >= 1")
    notes: list[str] = []
    calib_set = None
    if calib is not None:
        calib_set = ImageSet.from_path(calib)
    elif is_reference_model(manifest) and SHIPPED_DIGITS.is_dir():
        calib_set = ImageSet.from_path(SHIPPED_DIGITS)
        notes.append(f"calibration images: the shipped digits set ({SHIPPED_DIGITS})")
    elif precision in ("int8", "auto"):
        raise VitedgeError(
            "INT8 needs calibration images (--calib DIR, .npy or .npz)",
            "the shipped digits images only suit the reference model; give ~100-500 images like your deployment data",
        )
    if calib_set is not None:
        _check_fits(calib_set, manifest, pre, "calibration data")
    val_set = ImageSet.from_path(val) if val is not None else None
    if val_set is not None:
        _check_fits(val_set, manifest, pre, "validation data")

    if precision not in ("int8", "auto"):  # FP16: nothing to calibrate, everything can be used for evaluation
        if val_set is not None:
            return DataPlan(None, val_set, f"--val {val_set.source}", notes=notes)
        if calib_set is not None:
            return DataPlan(None, calib_set, f"calibration images {calib_set.source}", notes=notes)
        return DataPlan(None, None, "random inputs (no images given)", notes=notes + ["no images given: FP16 verified on random inputs only; pass --val DIR"])

    assert calib_set is not None  # INT8 without calibration images was refused above
    n = len(calib_set)
    if val_set is not None:
        pool, eval_set, eval_source = calib_set, val_set, f"--val {val_set.source}"
    elif n >= MIN_FOR_HOLDOUT:
        k = min(MAX_HOLDOUT, max(1, int(round(n * HOLDOUT_FRACTION)), n - CALIB_KEEP))
        perm = np.random.default_rng(seed).permutation(n)
        hold, rest = np.sort(perm[:k]), np.sort(perm[k:])
        pool, eval_set = subset(calib_set, rest), subset(calib_set, hold)
        eval_source = f"{k} held-out images of {calib_set.source} (seed {seed}, not used for calibration)"
    else:
        pool, eval_set = calib_set, calib_set
        eval_source = f"the {n} calibration images themselves (too few to hold any out; pass --val DIR)"
        notes.append(f"only {n} calibration images: agreement is measured on them; pass --val DIR for an honest number")
    want = samples if samples is not None else min(DEFAULT_SAMPLES, len(pool))
    if samples is not None and samples < 1:
        raise VitedgeError(f"--calib-samples {samples} must be >= 1")
    if min(want, len(pool)) < min_calib:
        held = "" if pool is calib_set else f" ({len(calib_set) - len(pool)} more are held out to measure agreement)"
        have = f"--calib-samples {samples}" if samples is not None and samples < len(pool) else f"{calib_set.source} gives {len(pool)}{held}"
        raise VitedgeError(
            f"INT8 calibration needs at least {min_calib} images, but {have}",
            "give ~100-500 images like your deployment data (and --val DIR for measuring), or pass --min-calib N to go lower",
        )
    if want > len(pool):
        held = "" if pool is calib_set else f" ({len(calib_set) - len(pool)} held out for evaluation; pass --val DIR to use all)"
        raise VitedgeError(
            f"asked for {want} calibration samples but {calib_set.source} has only {len(pool)} usable for calibration{held}",
            "lower --calib-samples or add images",
        )
    chosen = pool.sample(want, seed)
    return DataPlan(chosen, eval_set, eval_source, calib_source=calib_set.source, notes=notes)


class StreamingBatches:
    """Re-iterable stream of preprocessed calibration batches, with a progress bar per pass.

    Unreadable images are skipped (and counted in :attr:`skipped`); fewer usable images than
    ``min_count`` raise a one-line error.  An error raised while a library iterates is kept in
    :attr:`error`, so the caller can re-raise it instead of the library's wrapper.
    """

    def __init__(
        self,
        ims: ImageSet,
        pre: Preprocessing | None,
        batch_size: int,
        min_count: int,
        label: str = "calibrating",
        pad: bool = False,
        sizes: list[tuple[int, int]] | None = None,
    ):
        self.ims, self.pre, self.batch_size, self.min_count, self.label = ims, pre, batch_size, min_count, label
        self.pad = pad  # fixed-batch models: the last, short batch is filled up by repeating its last image
        self.error: VitedgeError | None = None
        self.seen = 0
        # a dynamic-size model: image i is given at sizes[i % len(sizes)], size by size (a batch holds one size)
        self.sizes = sizes
        n = len(sizes) if sizes else 1
        self._parts = [(subset(ims, range(k, len(ims), n)) if sizes else ims, pre.at(*sizes[k]) if sizes and pre else pre) for k in range(n)]
        self._parts = [(part, p) for part, p in self._parts if len(part)]

    def __len__(self) -> int:
        return sum(-(-len(part) // self.batch_size) for part, _ in self._parts)

    def __iter__(self) -> Iterator[np.ndarray]:
        self.seen = 0
        good = 0
        try:
            with progress() as bar:
                task = bar.add_task(self.label, total=len(self.ims))
                for part, pre in self._parts:
                    for b in part.batches(pre, self.batch_size):
                        self.seen += len(b.x)
                        good += len(b.x)
                        bar.update(task, completed=self.seen)
                        yield pad_batch(b.x, self.batch_size) if self.pad else b.x
            if good < self.min_count:
                raise VitedgeError(
                    f"only {good} usable images in {self.ims.source} ({self.skipped} unreadable), {self.min_count} needed",
                    "add images or lower --calib-samples",
                )
        except VitedgeError as exc:
            self.error = exc
            raise

    @property
    def skipped(self) -> int:
        return sum(len(part.skipped) for part, _ in self._parts)

    def raise_if_failed(self, exc: BaseException) -> None:
        """Turn a library failure caused by our data into our own one-line error."""
        if self.error is not None:
            raise self.error from None
        if isinstance(exc, VitedgeError):
            raise exc


def _chunks(x: np.ndarray, bs: int) -> Iterator[np.ndarray]:
    for i in range(0, len(x), bs):
        yield x[i : i + bs]


class EvalSet:
    """Held-out images with FP32 reference logits; measures a candidate against them.

    ``sizes`` (a dynamic-size model, :func:`size_mix`): every image is measured at each (height, width); the outputs
    run size by size (all images at the first size, then at the second...), and :meth:`measure` holds the worst size
    up to the target."""

    def __init__(
        self, ims: ImageSet | None, pre: Preprocessing | None, source: str, class_names, input_shape, seed: int = 0, sizes: list[tuple[int, int]] | None = None
    ):
        self.source = source
        self.ims = ims
        self.sizes = sizes if ims is not None and ims.arrays is None and pre is not None else None
        self.pres = [pre.at(*hw) for hw in self.sizes] if self.sizes and pre is not None else [pre]
        self.pre = pre
        self._xs: list[np.ndarray] | None = None
        self.labels: np.ndarray | None = None
        self.random = ims is None
        self._ref: np.ndarray | None = None
        self._ref_outputs: dict[str, np.ndarray] = {}
        self._pending: Callable[[], Any] | None = None
        self.skipped = 0
        if ims is None:  # no images: random inputs in the model's shape (FP16 only)
            c, h, w = (d if isinstance(d, int) else 3 for d in input_shape[1:4]) if len(input_shape) == 4 else (3, 224, 224)
            self._xs = [np.random.default_rng(seed).standard_normal((8, c, h, w)).astype(np.float32)]
            self.count = 8
            return
        fixed = [d for d in input_shape[1:] if isinstance(d, int)]
        item = 4 * (sum(3 * h * w for h, w in self.sizes) if self.sizes else int(np.prod(fixed or [3 * 224 * 224])))
        if item * len(ims) <= EVAL_CACHE_BYTES:
            loaded = [ims.load_all(p) for p in self.pres]
            self._xs = [b.x for b in loaded]
            lbls = loaded[0].labels
        else:
            lbls = [lbl for b in ims.batches(self.pres[0], 32) for lbl in b.labels]
        if lbls and all(lbl is not None for lbl in lbls):
            try:
                self.labels = label_indices(lbls, class_names, ims.source)
            except VitedgeError:
                if class_names:
                    raise
                self.labels = None  # a model without labels (e.g. a foreign ONNX): folder names are no class indices
        self.count = len(lbls)
        self.skipped = len(ims.skipped)

    def __len__(self) -> int:
        """Images (each is measured once per size of a dynamic-size model)."""
        return self.count

    @property
    def labelled(self) -> bool:
        return self.labels is not None

    def batches(self, bs: int = 64) -> Iterator[np.ndarray]:
        """The images in batches of one size: all of them at each size in turn (one size for a fixed-size model)."""
        for part in self.parts(bs):
            yield from part

    def parts_arrays(self) -> list[np.ndarray]:
        """Per size, all the images as one array (loads them when they were too many to keep)."""
        return [np.concatenate(list(part)) for part in self.parts()]

    def parts(self, bs: int = 64) -> list[Iterator[np.ndarray]]:
        """Per size, the images in batches (one part for a fixed-size model)."""
        if self._xs is not None:
            return [_chunks(x, bs) for x in self._xs]
        assert self.ims is not None  # without images, __init__ made random inputs
        ims = self.ims
        return [(b.x for b in ims.batches(p, bs)) for p in self.pres]

    def logits(self, engine) -> np.ndarray:
        return np.concatenate([engine.infer(x) for x in self.batches()])

    def outputs(self, engine) -> dict[str, np.ndarray]:
        """Every output of the engine on the evaluation set, by name."""
        parts = [engine.infer_all(x) for x in self.batches()]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def set_reference(self, engine) -> None:
        """The FP32 reference: ``engine``'s outputs on the evaluation set."""
        self._ref_outputs = self.outputs(engine)
        first = engine.output_names[0] if engine.output_names else None
        self._ref = self._ref_outputs[first] if first in self._ref_outputs else next(iter(self._ref_outputs.values()))
        self._pending = None

    def defer_reference(self, open_engine: Callable[[], Any]) -> None:
        """Compute the reference when it is first needed, from the engine that ``open_engine()`` opens (a context
        manager), so that the INT8 search can run it while its worker calibrates (:meth:`resolve_reference`)."""
        self._pending = open_engine

    def resolve_reference(self) -> None:
        """Compute a deferred reference now (nothing when it is there)."""
        if self._pending is not None:
            with self._pending() as engine:
                self.set_reference(engine)

    @property
    def ref(self) -> np.ndarray | None:
        """The reference's first output (class logits for a classifier)."""
        self.resolve_reference()
        return self._ref

    @property
    def ref_outputs(self) -> dict[str, np.ndarray]:
        """Every output of the reference, by name."""
        self.resolve_reference()
        return self._ref_outputs

    def measure_outputs(self, outs: dict[str, np.ndarray]) -> dict:
        """:meth:`measure` on the first output; for models with several outputs or non-classifier outputs
        (e.g. a dense token map) also cosine / max abs error / SNR per output, under ``outputs``."""
        outs = compare.match_outputs(self.ref_outputs, outs, "the quantized model", check_shapes=False)
        names = list(self.ref_outputs)
        res = self.measure(outs[names[0]])
        assert self.ref is not None  # measure() checked
        if len(names) > 1 or self.ref.ndim != 2:
            res["outputs"] = compare.per_output(self.ref_outputs, outs, compare.OUTPUT_KEYS + ("top1_agreement",))
        return res

    def measure(self, out: np.ndarray) -> dict:
        """Agreement of candidate logits with FP32 (+ accuracies when labelled).  At several sizes: the numbers of the
        worst size (lowest top-1 agreement, else lowest minimum cosine), its ``size``, and every size's under ``per_size``."""
        assert self.ref is not None, "set_reference() first"
        if not self.sizes or len(self.sizes) == 1:
            return self._measure(self.ref, np.asarray(out))
        n = len(self.ref) // len(self.sizes)
        per = {size_key(hw): self._measure(self.ref[k * n : (k + 1) * n], np.asarray(out)[k * n : (k + 1) * n]) for k, hw in enumerate(self.sizes)}
        worst = min(per, key=lambda k: (per[k].get("finite", True), per[k].get("top1_agreement", 1.0), per[k]["cosine_min"]))
        return {**per[worst], "size": worst, "per_size": per}

    def _measure(self, ref: np.ndarray, out: np.ndarray) -> dict:
        res = compare.output_metrics(ref, out)
        res["images"] = int(len(out))
        if self.labels is not None and ref.ndim == 2:
            res["top1_fp32"] = float(compare.correct(ref, self.labels)[0].mean())
            res["top1"] = float(compare.correct(out, self.labels)[0].mean())
        return res

    def drop_pp(self, metrics: dict) -> float:
        """The --max-drop quantity: top-1 points lost on labels, else % disagreement with FP32."""
        if "top1" in metrics:
            return 100.0 * (metrics["top1_fp32"] - metrics["top1"])
        return 100.0 * (1.0 - metrics.get("top1_agreement", 1.0))

    @property
    def drop_kind(self) -> str:
        return "top-1 accuracy drop (labelled)" if self.labelled else "top-1 disagreement with FP32"
