"""The accuracy pass of ``vitedge validate``: locally vs on a local Ray cluster, and a projection to N nodes.

    python benchmarks/distributed.py                                   # 2,000 images, vit_small @224, 2 Ray workers
    python benchmarks/distributed.py --images 48 --model reference --out /tmp/distributed.md   # a smoke run

The images are the shared photos (``--photos``, default ``/work/shared/photos/imagenet-samples``) read again and
again until there are ``--images`` of them: the list repeats the same paths, nothing is copied.  The model is
exported to FP32 ONNX in a temporary folder; the FP32 ONNX file is the reference (ONNX Runtime) and the same file
run by ONNX Runtime is the engine, so every image goes through two models, as in a one-engine ``validate``.

Both sides run the same function, ``vitedge.validation._shard_outputs`` (open the models, preprocess, run):

* **local**: once, in this process, over every image (the engines use every core, as without ``--ray``);
* **Ray**: one task per shard on ``ray.init(num_cpus=--workers)``, shards of whole evaluation batches, two per
  worker (the ``--ray`` default), through ``vitedge.distributed.run_shards``; the merged outputs are checked to be
  the local ones, bit for bit.

Then ``W`` more tasks, one per worker and all at once (as the timed run ran them), measure what a task costs before
its first image (opening the models: ``o``; the first batch twice, cold and warm) and the per-image cost inside a
task (``c``: the whole shard minus one batch) while ``W`` tasks share the node, so ``c`` is what a node with ``W``
workers really gives each of them (on this 2-core machine the workers compete for the cores).
The driver's overhead ``D`` (starting workers, imports, the nodes' probes, scheduling, merging) is the Ray wall
time minus the tasks' share of it.  Projection for N nodes of this machine's kind, ``W`` workers each, ``n``
images in two shards per worker: ``T(N) = D + 2 * (o + c * n / (2 * N * W))``.  This machine has 2 cores, so 2
workers compete with each other (and with the engines' own threads): the local-vs-Ray ratio here shows the
overhead, not a speed-up.

Writes a markdown table to ``benchmarks/distributed.md`` (``--out``).  Measure on a quiet machine.
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
PHOTOS = Path("/work/shared/photos/imagenet-samples")


def _images(photos: Path, n: int):
    from vitedge.data import ImageSet, list_images

    found = list_images(photos)
    if not found:
        sys.exit(f"no images in {photos}: pass --photos DIR")
    paths = [found[i % len(found)] for i in range(n)]  # read again and again, never copied
    return ImageSet(str(photos), paths, [None] * n)


def _same(a, b) -> bool:
    return a.names == b.names and all(x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x) for x, y in zip(a.outputs, b.outputs, strict=True))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--photos", type=Path, default=PHOTOS)
    ap.add_argument("--model", default="vit_small", help="preset or 'reference' (default vit_small @224, random weights)")
    ap.add_argument("--workers", type=int, default=2, help="CPUs of the local Ray cluster (one shard task each)")
    ap.add_argument("--eval-batch", type=int, default=16)
    ap.add_argument("--nodes", default="1,2,4,8,16", help="node counts of the projection")
    ap.add_argument("--project", type=int, default=50_000, help="images of the projection (besides --images)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "distributed.md")
    args = ap.parse_args(argv)

    import ray

    from vitedge import distributed, export_onnx, load_model
    from vitedge.resources import reference_thread_count
    from vitedge.sysinfo import machine_summary
    from vitedge.validation import EngineSpec, _Outputs, _shard_outputs, _ShardJob, _subset

    images = _images(args.photos, args.images)
    b = args.eval_batch
    with tempfile.TemporaryDirectory() as tmp:
        onnx = Path(tmp) / "model.onnx"
        export_onnx(load_model(args.model), onnx)
        job = _ShardJob(str(onnx), [EngineSpec(onnx, "onnxruntime")], None, reference_thread_count(None), b)  # validate's defaults

        t0 = time.perf_counter()
        local = _shard_outputs(job, images)
        t_local = time.perf_counter() - t0
        print(f"local: {args.images} images in {t_local:.1f} s", flush=True)

        ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
        try:
            size = math.ceil(math.ceil(args.images / (2 * args.workers)) / b) * b
            starts = range(0, args.images, size)
            shards = [_subset(images, range(i, min(i + size, args.images))) for i in starts]
            names = [f"shard {k + 1}" for k in range(len(shards))]
            t0 = time.perf_counter()
            run = distributed.run_shards(_timed, job, shards, names, distributed.RayOptions())
            t_ray = time.perf_counter() - t0
            task_s = [r[0] for r in run.results]
            assert _same(_Outputs.merged([r[1] for r in run.results], images.source), local), "the Ray outputs differ from the local ones"
            # the costs with W tasks at once, one per worker, as the shards ran: c is a worker's speed on a busy node
            costs = distributed.run_shards(_costs, job, shards[: args.workers], [f"costs {k}" for k in range(args.workers)], distributed.RayOptions()).results
            cold, small, full = (float(np.mean(v)) for v in zip(*costs, strict=True))
        finally:
            ray.shutdown()
    print(f"ray: {len(shards)} shards of {size} on {args.workers} workers in {t_ray:.1f} s (outputs identical)", flush=True)

    n0 = len(shards[0])
    c = (full - small) / (n0 - b) if n0 > b else small / n0  # seconds per image inside a task (tiny runs: opening included)
    o = max(small - b * c, 0.0) if n0 > b else 0.0  # seconds per task before its first image, models' libraries loaded
    o_cold = max(cold - b * c, 0.0)  # the same in a fresh worker: imports the libraries first
    waves = math.ceil(len(shards) / args.workers)
    drv = max(t_ray - waves * float(np.mean(task_s)), 0.0)
    lines = [
        "# The accuracy pass on Ray: overhead here, projection to N nodes",
        "",
        f"`python benchmarks/distributed.py {' '.join(argv if argv is not None else sys.argv[1:])}`".replace(" `", "`"),
        "",
        f"Machine: {machine_summary()}; Python {platform.python_version()}, Ray {ray.__version__}.",
        f"Model: {args.model} exported to FP32 ONNX; reference and engine both ONNX Runtime (two models per image).",
        f"Images: {args.images} (the photos of {args.photos}, read repeatedly), evaluation batch {b}.",
        "",
        "| run | wall time (s) | images/s |",
        "|---|---:|---:|",
        f"| local (one process, every core) | {t_local:.1f} | {args.images / t_local:.1f} |",
        f"| Ray, {args.workers} workers, {len(shards)} shards of {size} | {t_ray:.1f} | {args.images / t_ray:.1f} |",
        "",
        (
            f"Per task before its first image (opening the models) o = {o:.2f} s ({o_cold:.2f} s in a fresh worker, imports included); "
            f"per image inside a task c = {1000 * c:.1f} ms, measured with {args.workers} tasks running at once on this node "
            f"(the local run: {1000 * t_local / args.images:.1f} ms per image); "
            f"driver overhead (workers, probes, scheduling, merging) D = {drv:.2f} s."
        ),
        "",
        f"Projection, N nodes like this one with {args.workers} workers each, two shards per worker: T(N) = D + 2 (o + c n / (2 N W)), "
        f"with c as measured with W tasks sharing a node. Check: for N = 1 and the {args.images:,} images it gives "
        f"{drv + 2 * (o + c * args.images / (2 * args.workers)):.1f} s; the Ray run above took {t_ray:.1f} s.",
        "",
        "| nodes | " + " | ".join(f"{n:,} images (s)" for n in (args.images, args.project)) + " |",
        "|---:|---:|---:|",
    ]
    for nodes in (int(v) for v in args.nodes.split(",")):
        cols = [drv + 2 * (o + c * n / (2 * nodes * args.workers)) for n in (args.images, args.project)]
        lines.append(f"| {nodes} | " + " | ".join(f"{v:.1f}" for v in cols) + " |")
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    return 0


def _timed(job, shard):
    """A shard task that also says how long it took (from its start, imports and opening the models included)."""
    from vitedge.validation import _shard_outputs

    t0 = time.perf_counter()
    out = _shard_outputs(job, shard)
    return time.perf_counter() - t0, out


def _costs(job, shard):
    """In one (fresh) worker: the first evaluation batch cold (imports, opening), again warm, then the whole shard: the
    per-task and per-image costs of the projection, measured apart from the timed run."""
    from vitedge.validation import _shard_outputs, _subset

    first = _subset(shard, range(min(job.eval_batch, len(shard))))
    took = []
    for part in (first, first, shard):
        t0 = time.perf_counter()
        _shard_outputs(job, part)
        took.append(time.perf_counter() - t0)
    return tuple(took)


if __name__ == "__main__":
    raise SystemExit(main())
