"""Timing: the one interleaved timer, and the statistics of what it measures.

Every latency vitedge reports comes from :func:`interleaved`: ``validate`` and ``benchmark`` (through
``validate``), the INT8 fidelity search (``quantization.candidates.timed_interleaved``) and the scripts
in ``benchmarks/``.  It times several callables in *rounds*, each round running every callable in turn,
so that a change in machine speed (another process, a shared host's neighbours, frequency changes)
hits every callable alike and a ratio between two of them, taken round by round, holds
(:func:`paired_speedup`).  What differs between the callers - how long a callable runs per round, the
warm-up, whether the order is reversed every other round, an untimed run and a pause between
callables, extra rounds until a median is stable - is a parameter, so each keeps its own method.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, replace

import numpy as np

from .compare import CI_LEVEL, z_value
from .errors import VitedgeError
from .ui import progress


@dataclass(frozen=True)
class Slot:
    """How long a callable runs in one go: at least ``min_runs`` times, then until ``seconds`` have passed
    since the first run started, and never more than ``max_runs`` times (None: no cap).  The cap wins over
    ``min_runs``; ``Slot(0, n, n)`` is exactly ``n`` runs."""

    seconds: float = 0.0
    min_runs: int = 1
    max_runs: int | None = None


def run_for(fn: Callable[[], object], slot: Slot) -> list[float]:
    """Wall times (ms) of ``fn``'s runs in one :class:`Slot`."""
    out: list[float] = []
    start = time.perf_counter()
    while (slot.max_runs is None or len(out) < slot.max_runs) and (len(out) < slot.min_runs or time.perf_counter() - start < slot.seconds):
        t0 = time.perf_counter_ns()
        fn()
        out.append((time.perf_counter_ns() - t0) / 1e6)
    return out


def interleaved(
    fns: Sequence[Callable[[], object]],
    rounds: int,
    slot: Slot,
    *,
    warmup: Slot = Slot(0.0, 0, 0),
    alternate: bool = True,
    wake: bool = False,
    pause_s: float = 0.0,
    until_stable: float | None = None,
    description: str | None = None,
) -> list[list[list[float]]]:
    """Latency samples (ms) of each of ``fns``, per round: ``[[runs of round 0], [runs of round 1], ...]`` per callable.

    Each callable is first warmed up alone (``warmup``, one after the other).  Then ``rounds`` rounds: in each,
    every callable runs for one ``slot`` in turn, in reverse order every other round when ``alternate`` (no
    callable always follows the same one).  Before its slot a callable may wait ``pause_s`` seconds (the
    previous runtime's worker threads spin for a while after a run and would steal the cores) and run once
    untimed (``wake``: wakes its own thread pool).

    ``until_stable``: then add rounds (at most ``rounds`` more) while the 95 % CI of a callable's median is
    wider than this fraction of it; such a round times the unstable callables and the first one (the
    baseline, so that the round stays paired with it), each at least once, and gives the others an empty
    list.  ``description``: show a progress bar.
    """
    for fn in fns:
        run_for(fn, warmup)
    rounds = max(1, rounds)
    samples: list[list[list[float]]] = [[] for _ in fns]
    order = list(range(len(fns)))
    with ExitStack() as stack:
        advance, grow = _bar(stack, description, rounds * len(fns))

        def play(k: int, chosen: set[int], s: Slot) -> None:
            for i in order[::-1] if alternate and k % 2 else order:
                if i not in chosen:
                    samples[i].append([])
                    continue
                if pause_s:
                    time.sleep(pause_s)
                if wake:
                    fns[i]()
                samples[i].append(run_for(fns[i], s))
                advance()

        for k in range(rounds):
            play(k, set(order), slot)
        if until_stable is not None:
            for k in range(rounds, 2 * rounds):
                shaky = {i for i in order if median_rel_width(flat_samples(samples[i])) > until_stable}
                if not shaky:
                    break
                shaky.add(0)  # keep the round paired: the baseline is timed in it too
                grow(len(shaky))
                play(k, shaky, replace(slot, min_runs=1))
    return samples


def _bar(stack: ExitStack, description: str | None, total: int) -> tuple[Callable[[], None], Callable[[int], None]]:
    """(advance by one, grow the total by n) of a progress bar entered on ``stack``; no bar without a description."""
    if description is None:
        return (lambda: None), (lambda n: None)
    bar = stack.enter_context(progress())
    task = bar.add_task(description, total=total)
    return (lambda: bar.advance(task)), (lambda n: bar.update(task, total=(bar.tasks[0].total or 0) + n))


# ------------------------------------------------------------------------------------------
# statistics
# ------------------------------------------------------------------------------------------
def flat_samples(rounds: Sequence[Sequence[float]]) -> list[float]:
    """Every sample of a callable, round after round."""
    return [v for rnd in rounds for v in rnd]


def latency_stats(samples_ms: Sequence[float], batch: int = 1, keep: int = 1000) -> dict:
    """Percentiles, mean, spread and a distribution-free 95 % CI of the median; up to ``keep`` samples kept."""
    s = np.sort(np.asarray(samples_ms, float))
    n = len(s)
    p50, p90, p99 = np.percentile(s, [50, 90, 99])
    # distribution-free CI of the median from order statistics
    half = z_value(CI_LEVEL) * math.sqrt(n) / 2
    lo_i, hi_i = max(0, int(math.floor(n / 2 - half)) - 1), min(n - 1, int(math.ceil(n / 2 + half)))
    kept = s if n <= keep else np.asarray(samples_ms, float)[np.linspace(0, n - 1, keep).astype(int)]
    return {
        "batch": batch,
        "runs": n,
        "p50_ms": float(p50),
        "p90_ms": float(p90),
        "p99_ms": float(p99),
        "mean_ms": float(s.mean()),
        "std_ms": float(s.std()),
        "min_ms": float(s[0]),
        "max_ms": float(s[-1]),
        "median_ci95_ms": [float(s[lo_i]), float(s[hi_i])],
        "samples_ms": [round(float(v), 4) for v in kept],
    }


def median_rel_width(samples: Sequence[float]) -> float:
    """Width of the 95 % CI of the median, relative to the median."""
    st = latency_stats(samples, keep=0)
    lo, hi = st["median_ci95_ms"]
    return (hi - lo) / max(st["p50_ms"], 1e-9)


def paired_speedup(reference_rounds: Sequence[Sequence[float]], engine_rounds: Sequence[Sequence[float]]) -> dict:
    """The speed-up of an engine over the reference from rounds timed back to back (:func:`interleaved`).

    Round *i* gives one ratio: the reference's median time in round *i* / the engine's median time in
    round *i*.  ``speedup`` is the median of these ratios (what ``--min-speedup`` is checked against);
    ``ratio_iqr`` their 25th-75th percentile range, ``ratio_min``/``ratio_max`` the extremes, and
    ``ratio_of_medians`` the old, unpaired figure (median of all reference times / median of all engine
    times) for comparison.  A slow change in load that hits both models alike cancels in each ratio.
    Rounds where either side has no sample are skipped.
    """
    pairs = [(float(np.median(r)), float(np.median(e))) for r, e in zip(reference_rounds, engine_rounds, strict=True) if len(r) and len(e)]
    if not pairs:
        raise VitedgeError("no timing round has both the reference and the engine: cannot pair them")
    ratios = [r / max(e, 1e-12) for r, e in pairs]
    q1, med, q3 = (float(v) for v in np.percentile(ratios, [25, 50, 75]))
    ref_all, eng_all = flat_samples(reference_rounds), flat_samples(engine_rounds)
    return {
        "speedup": med,
        "method": "median of per-round ratios",
        "rounds": len(ratios),
        "ratio_iqr": [q1, q3],
        "ratio_min": float(min(ratios)),
        "ratio_max": float(max(ratios)),
        "ratios": [round(v, 4) for v in ratios],
        "ratio_of_medians": float(np.median(ref_all)) / max(float(np.median(eng_all)), 1e-12),
    }
