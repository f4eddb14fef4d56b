"""Choosing how many tokens to merge (``vitedge export --merge-tokens auto``).

Token merging (:mod:`vitedge.models.tome`) trades accuracy for speed; how much depends on the model
and the images.  :func:`choose_merge` measures it on the user's validation images with PyTorch (the
same model the exported graph is verified against): the FP32 model without merging is the reference,
and each candidate ``r`` is scored by its top-1 loss - the paired top-1 drop on labelled images, else
the share of images whose top-1 changes (an upper bound of the drop).

The loss grows with ``r`` (each step merges more, earlier), so for each schedule (merge in every block,
every other block, every third block) the search bisects between 0 and the largest useful ``r`` for the
largest ``r`` within ``max_drop`` points.  Accuracy alone does not decide: on a CPU each merge costs a dozen
small ops whatever ``r`` is, and a bf16/AMX engine's matrix products shrink less than their token counts, so
a merged engine can be slower than the unmerged one (``benchmarks/token_merging.md``).  So each schedule's
setting is exported, compiled for the backend the user names (the engine ``vitedge compile`` builds by
default, precision included) and timed beside the unmerged engine in interleaved rounds; the fastest wins,
and none when no merged engine is faster.  Every trial and timing goes into the manifest.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from .compare import classification, top1_loss
from .data import ImageSet, label_indices
from .errors import InputError, ModelNotSupported
from .models.tome import linear_share_removed, max_merge, tokens_per_block
from .models.vit import VisionTransformer, graph_options

log = logging.getLogger("vitedge")

DEFAULT_MAX_DROP = 0.5  # top-1 points the merged model may lose on the validation images
MIN_IMAGES = 20  # fewer images cannot resolve a 1-point drop at all
BATCH = 16


SCHEDULES = (1, 2, 3)  # merge in every block, every other block, every third block (tome.merges_at)
TIMING_ROUNDS = 8
TIMING_SECONDS = 8.0  # all candidates together


@dataclass(frozen=True)
class MergeTrial:
    """One measured ``r`` (tokens merged in every ``every``-th block), and what it cost on the validation images."""

    r: int
    tokens_last_block: int
    top1_loss_pp: float  # paired top-1 drop (labelled) or 100 - agreement with the unmerged model
    top1_loss_ci95_pp: list[float]
    top1_agreement: float
    cosine_min: float
    within_budget: bool
    every: int = 1
    linear_share_removed: float = 0.0  # of the blocks' linear-layer multiply-adds


@dataclass(frozen=True)
class MergeTiming:
    """The engine that ``vitedge compile --backend B`` builds from one merge setting, timed beside the unmerged one."""

    r: int
    every: int
    status: str  # "timed", or why the setting has no engine (its export or compile check refused it)
    ms: float | None = None  # median batch-1 latency
    speedup: float | None = None  # median of the per-round ratios to the unmerged engine
    speedup_iqr: list[float] | None = None
    precision: str | None = None


@dataclass
class MergeSearch:
    """What ``--merge-tokens auto`` measured and chose."""

    r: int
    trials: list[MergeTrial]
    labelled: bool
    max_drop: float
    images: int
    every: int = 1
    backend: str | None = None
    timings: list[MergeTiming] = field(default_factory=list)
    reason: str = ""

    def to_dict(self) -> dict:
        return {
            "max_drop_pp": self.max_drop,
            "images": self.images,
            "measure": "paired top-1 drop" if self.labelled else "top-1 changes vs the unmerged FP32 model",
            "trials": [asdict(t) for t in self.trials],
            "speed": {"backend": self.backend, "engines": [asdict(t) for t in self.timings]} if self.backend else None,
            "chosen": {"r": self.r, "every": self.every, "why": self.reason},
        }


def token_counts(model, img_size: tuple[int, int], r: int, every: int = 1) -> list[int]:
    """Tokens entering each block of ``model`` (a vitedge ViT) at ``img_size`` with ``r`` merged in every ``every``-th block."""
    p = model.config.patch_size
    n = (img_size[0] // p) * (img_size[1] // p) + 1
    return tokens_per_block(n, model.config.num_layers, r, every)


def check_mergeable(model) -> None:
    if not isinstance(model, VisionTransformer):
        raise ModelNotSupported(
            f"token merging needs a model vitedge builds (got {type(model).__name__})",
            "export from a checkpoint, model folder or preset; ONNX files cannot be re-merged",
        )
    if model.config.num_classes <= 0:
        raise ModelNotSupported("token merging is for classifiers (the model has no head)", "export without --merge-tokens")


def _logits(model, x: np.ndarray, r: int, every: int = 1) -> np.ndarray:
    with torch.inference_mode(), graph_options(model, merge=r, merge_every=every):
        return np.concatenate([model(torch.from_numpy(x[i : i + BATCH])).numpy() for i in range(0, len(x), BATCH)])


def choose_merge(
    spec,
    images: ImageSet,
    max_drop: float = DEFAULT_MAX_DROP,
    on_stage: Callable[[str], None] | None = None,
    backend: str | None = "onnxruntime",
    schedules: tuple[int, ...] = SCHEDULES,
) -> MergeSearch:
    """The merge setting to export: per schedule (merge in every block, every other, every third), the largest
    ``r`` whose top-1 loss on ``images`` is within ``max_drop`` points; then, with ``backend``, the one whose
    engine (as ``vitedge compile --backend`` builds it, precision included) runs fastest, timed beside the
    unmerged engine - and no merging at all when none is faster.  ``backend=None``: on accuracy alone (the
    largest ``r`` of the every-block schedule), for a machine where timing means nothing."""
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
    n_tokens = token_counts(model, spec.preprocessing.img_size, 0)[0]
    trials: dict[tuple[int, int], MergeTrial] = {}

    stage(f"running the unmerged model on {len(batch.x)} validation images")
    ref = _logits(model, batch.x, 0)

    def measure(r: int, every: int, hi: int) -> MergeTrial:
        stage(f"measuring token merging r={r} every {every} block(s) on {len(batch.x)} images (try {len(trials) + 1}, r between 0 and {hi})")
        vs = classification(ref, _logits(model, batch.x, r, every), names=batch.names, class_names=class_names, y=y)
        loss, ci = top1_loss(vs, labelled)
        counts = token_counts(model, spec.preprocessing.img_size, r, every)
        trial = MergeTrial(
            r,
            counts[-1],
            round(float(loss), 3),
            [round(float(v), 3) for v in ci],
            float(vs["top1_agreement"]),
            float(vs["cosine_min"]),
            bool(loss <= max_drop),
            every,
            round(linear_share_removed(counts), 4),
        )
        trials[(r, every)] = trial
        log.info("token merging r=%d every %d: top-1 loss %.2f points (%s)", r, every, loss, "within budget" if trial.within_budget else "over budget")
        return trial

    best: dict[int, int] = {}
    for every in schedules if backend else schedules[:1]:
        hi = max_merge(n_tokens, model.config.num_layers, every)
        lo, top = 0, hi + 1  # lo: within budget (0: no merging, by definition); top: smallest r known over budget
        while top - lo > 1:
            mid = (lo + top) // 2
            if measure(mid, every, hi).within_budget:
                lo = mid
            else:
                top = mid
        if lo:
            best[every] = lo
    ordered = [trials[k] for k in sorted(trials, key=lambda k: (k[1], k[0]))]
    what = "top-1 drop" if labelled else "top-1 changes vs the unmerged model"
    search = MergeSearch(0, ordered, labelled, max_drop, len(batch.x), backend=backend)
    if not best:
        search.reason = f"no merging keeps the {what} within {max_drop:g} points on {len(batch.x)} images"
    elif backend is None:
        search.r, search.every = best.get(1, 0), 1
        search.reason = f"the largest r within {max_drop:g} points ({what}; speed not measured)"
    else:
        if _timer is None:
            raise InputError("timing merge settings needs vitedge.compilation (import vitedge)", "import vitedge before calling choose_merge")
        search.timings = _timer(spec, [(r, k) for k, r in best.items()], backend, stage)
        faster = [t for t in search.timings if t.status == "timed" and t.r and (t.speedup or 0) > 1.0]
        if faster:
            win = max(faster, key=lambda t: t.speedup or 0)
            search.r, search.every = win.r, win.every
            search.reason = f"the fastest {backend} engine within {max_drop:g} points ({what}): {win.speedup:.2f}x the unmerged one"
        else:
            search.reason = f"no merge setting within {max_drop:g} points made the {backend} engine faster than the unmerged one on this machine"
    log.info("token merging: r=%d every %d chosen (%s)", search.r, search.every, search.reason)
    return search


#: measures the speed of merge settings (``time_settings(spec, [(r, every), ...], backend, stage)``): export and
#: compile sit above this module, so :mod:`vitedge.compilation` registers it (:func:`register_timer`) on import
_timer: Callable[..., list[MergeTiming]] | None = None


def register_timer(fn: Callable[..., list[MergeTiming]]) -> None:
    global _timer
    _timer = fn


def describe(r: int, counts: list[int], search: MergeSearch | None = None, every: int = 1) -> dict:
    """The manifest's ``model.graph.token_merging`` entry."""
    out = {
        "r": r,
        "every": every,
        "tokens_per_block": counts,
        "linear_share_removed": round(linear_share_removed(counts), 4),
        "lossy": counts[0] != counts[-1],
        "method": "ToMe: bipartite soft matching on attention keys, size-weighted means, proportional attention",
    }
    if search is not None:
        out["search"] = search.to_dict()
    return out


__all__ = [
    "DEFAULT_MAX_DROP",
    "SCHEDULES",
    "MergeSearch",
    "MergeTiming",
    "MergeTrial",
    "register_timer",
    "check_mergeable",
    "choose_merge",
    "describe",
    "token_counts",
]
