"""Choosing how many tokens to merge (``vitedge export --merge-tokens auto``).

Token merging (:mod:`vitedge.models.tome`) trades accuracy for speed; how much depends on the model
and the images.  :func:`choose_merge` measures it on the user's validation images with PyTorch (the
same model the exported graph is verified against): the FP32 model without merging is the reference,
and each candidate ``r`` is scored by its top-1 loss - the paired top-1 drop on labelled images, else
the share of images whose top-1 changes (an upper bound of the drop).  It returns the largest ``r``
whose loss stays within ``max_drop`` percentage points, with every measured candidate, which go into
the manifest so that the choice can be checked.

The loss grows with ``r`` (each step merges more, earlier), so the search bisects between 0 and the
largest useful ``r``; every tried ``r`` is recorded, so a non-monotone model shows in the table.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch

from .compare import classification, top1_loss
from .data import ImageSet, label_indices
from .errors import InputError, ModelNotSupported
from .models.tome import max_merge, tokens_per_block
from .models.vit import VisionTransformer, graph_options

log = logging.getLogger("vitedge")

DEFAULT_MAX_DROP = 1.0  # top-1 points the merged model may lose on the validation images
MIN_IMAGES = 20  # fewer images cannot resolve a 1-point drop at all
BATCH = 16


@dataclass(frozen=True)
class MergeTrial:
    """One measured ``r``: tokens merged per block, and what it cost on the validation images."""

    r: int
    tokens_last_block: int
    top1_loss_pp: float  # paired top-1 drop (labelled) or 100 - agreement with the unmerged model
    top1_loss_ci95_pp: list[float]
    top1_agreement: float
    cosine_min: float
    within_budget: bool


@dataclass
class MergeSearch:
    """What ``--merge-tokens auto`` measured and chose."""

    r: int
    trials: list[MergeTrial]
    labelled: bool
    max_drop: float
    images: int

    def to_dict(self) -> dict:
        return {
            "max_drop_pp": self.max_drop,
            "images": self.images,
            "measure": "paired top-1 drop" if self.labelled else "top-1 changes vs the unmerged FP32 model",
            "trials": [asdict(t) for t in self.trials],
        }


def token_counts(model, img_size: tuple[int, int], r: int) -> list[int]:
    """Tokens entering each block of ``model`` (a vitedge ViT) at ``img_size`` with ``r`` merged per block."""
    p = model.config.patch_size
    n = (img_size[0] // p) * (img_size[1] // p) + 1
    return tokens_per_block(n, model.config.num_layers, r)


def check_mergeable(model) -> None:
    if not isinstance(model, VisionTransformer):
        raise ModelNotSupported(
            f"token merging needs a model vitedge builds (got {type(model).__name__})",
            "export from a checkpoint, model folder or preset; ONNX files cannot be re-merged",
        )
    if model.config.num_classes <= 0:
        raise ModelNotSupported("token merging is for classifiers (the model has no head)", "export without --merge-tokens")


def _logits(model, x: np.ndarray, r: int) -> np.ndarray:
    with torch.inference_mode(), graph_options(model, merge=r):
        return np.concatenate([model(torch.from_numpy(x[i : i + BATCH])).numpy() for i in range(0, len(x), BATCH)])


def choose_merge(spec, images: ImageSet, max_drop: float = DEFAULT_MAX_DROP, on_stage: Callable[[str], None] | None = None) -> MergeSearch:
    """The largest ``r`` whose top-1 loss on ``images`` is within ``max_drop`` points, and every trial."""
    stage = on_stage or (lambda text: None)
    model = spec.model.eval()
    check_mergeable(model)
    if max_drop < 0:
        raise InputError(f"--max-drop {max_drop} must be >= 0 (top-1 points)")
    if len(images) < MIN_IMAGES:
        raise InputError(
            f"{images.source} has {len(images)} images; choosing --merge-tokens auto needs at least {MIN_IMAGES}",
            "give a folder of held-out validation images (class sub-folders for labels), or a fixed --merge-tokens N",
        )
    stage(f"reading {len(images)} validation images")
    batch = images.load_all(spec.preprocessing, min_count=MIN_IMAGES)
    # folder names are classes only for a model that has classes to match (a random-weight preset has none)
    labelled = all(lbl is not None for lbl in batch.labels) and not str(spec.source).startswith("preset:")
    y = label_indices(batch.labels, spec.labels, images.source) if labelled else None
    class_names = spec.labels or [str(i) for i in range(model.config.num_classes)]
    hi = max_merge(token_counts(model, spec.preprocessing.img_size, 0)[0], model.config.num_layers)
    trials: dict[int, MergeTrial] = {}

    stage(f"running the unmerged model on {len(batch.x)} validation images")
    ref = _logits(model, batch.x, 0)

    def measure(r: int) -> MergeTrial:
        stage(f"measuring token merging r={r} on {len(batch.x)} images (try {len(trials) + 1}, r between 0 and {hi})")
        vs = classification(ref, _logits(model, batch.x, r), names=batch.names, class_names=class_names, y=y)
        loss, ci = top1_loss(vs, labelled)
        trial = MergeTrial(
            r,
            token_counts(model, spec.preprocessing.img_size, r)[-1],
            round(float(loss), 3),
            [round(float(v), 3) for v in ci],
            float(vs["top1_agreement"]),
            float(vs["cosine_min"]),
            bool(loss <= max_drop),
        )
        trials[r] = trial
        log.info("token merging r=%d: top-1 loss %.2f points (%s)", r, loss, "within budget" if trial.within_budget else "over budget")
        return trial

    lo = 0  # r known to be within budget (0: no merging, by definition)
    top = hi + 1  # smallest r known to be over budget
    while top - lo > 1:
        mid = (lo + top) // 2
        if measure(mid).within_budget:
            lo = mid
        else:
            top = mid
    what = "top-1 drop" if labelled else "top-1 changes vs the unmerged model"
    log.info("token merging: r=%d chosen (%s within %.2f points on %d images)", lo, what, max_drop, len(batch.x))
    return MergeSearch(lo, [trials[r] for r in sorted(trials)], labelled, max_drop, len(batch.x))


def describe(r: int, counts: list[int], search: MergeSearch | None = None) -> dict:
    """The manifest's ``model.graph.token_merging`` entry."""
    out = {
        "r": r,
        "tokens_per_block": counts,
        "lossy": counts[0] != counts[-1],
        "method": "ToMe: bipartite soft matching on attention keys, size-weighted means, proportional attention",
    }
    if search is not None:
        out["search"] = search.to_dict()
    return out


__all__ = ["DEFAULT_MAX_DROP", "MergeSearch", "MergeTrial", "check_mergeable", "choose_merge", "describe", "token_counts"]
