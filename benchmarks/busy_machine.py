#!/usr/bin/env python
"""Speed-ups on a busy machine (issue #24 item 1): ``validate`` and ``benchmark``, quiet and then with two CPU burners.

    python benchmarks/busy_machine.py                    # the shipped reference model; a few minutes on 2 cores
    python benchmarks/busy_machine.py --quick            # tiny budgets: a smoke run (numbers not worth quoting)

The goal: a speed-up reported while two other processes keep the cores busy is within 2x of the one measured on
the quiet machine, or it is withheld ("speed-up not measurable here: ..."), never a figure such as the 614x the
quick start once printed at load 3-5.  Each phase runs ``vitedge.validate`` (the quick start's engine: the
reference model in ONNX Runtime INT8, against PyTorch eager FP32) and ``vitedge.benchmark`` (ONNX Runtime and
OpenVINO, FP32 and INT8) with the same settings.  The burners are plain Python busy loops in their own processes,
bounded in time and killed when the phase ends, whatever happens.  The script prints the machine line with its
instruction sets and the load average before and after each phase, waits for the load to settle before the
quiet phase, and writes ``benchmarks/busy_machine.md`` (``--out``) with one row per engine: the quiet speed-up,
the one under the burners (or why it was withheld), their ratio and whether it holds.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from ablation import settle  # noqa: E402

BURN = "import time\nend = time.time() + {seconds}\nwhile time.time() < end:\n    pass\n"


@contextmanager
def burners(n: int, seconds: float):
    """``n`` processes that each keep one core busy for at most ``seconds``; killed on leaving."""
    procs = [subprocess.Popen([sys.executable, "-c", BURN.format(seconds=seconds)]) for _ in range(n)]
    try:
        time.sleep(2.0)  # let the scheduler see them
        yield procs
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()


def build_engine(work: Path, calib_samples: int) -> Path:
    """The quick start's engine: the reference model exported, quantized to INT8 for ONNX Runtime."""
    from vitedge import export_onnx, load_model, quantize

    fp32 = work / "reference.onnx"
    if not fp32.exists():
        export_onnx(load_model("reference"), fp32)
    int8 = work / "reference.int8.onnx"
    if not int8.exists():
        quantize(fp32, int8, precision="int8", backend="onnxruntime", calib=ROOT / "calibration_data" / "digits" / "calib", samples=calib_samples)
    return int8


def phase(name: str, engine: Path, work: Path, kw: dict) -> dict:
    """``validate`` and ``benchmark`` once; what each said about its engines' speed-ups."""
    from vitedge import benchmark, validate

    load0 = os.getloadavg()
    print(f"[{name}] load before: {' / '.join(f'{v:.2f}' for v in load0)}", flush=True)
    val = validate(engine, "reference", out_dir=work / name / "validate", **kw)
    bench = benchmark(
        "reference", out_dir=work / name / "benchmark", backends=("onnxruntime", "openvino"), precisions=("fp32", "int8"), max_drop=None, **kw
    )
    load1 = os.getloadavg()
    print(f"[{name}] load after: {' / '.join(f'{v:.2f}' for v in load1)}", flush=True)
    out = {"load_before": load0, "load_after": load1, "rows": {}}
    for what, rep in (("validate", val), ("benchmark", bench)):
        verdict = rep.data["speedup_verdict"]
        out[what] = verdict
        for e in rep.engines:
            out["rows"][(what, e["name"])] = e["speedup"]
        print(f"[{name}] {what}: {rep.summary()}", flush=True)
    return out


def holds(quiet: float | None, busy: float | None) -> str:
    """The goal for one engine: withheld under the burners, or within 2x of the quiet figure."""
    if busy is None:
        return "yes (withheld)"
    if quiet is None:
        return "– (quiet run withheld)"
    return "yes" if quiet / 2 <= busy <= 2 * quiet else "**no**"


def render(machine: str, settings: str, quiet: dict, busy: dict) -> str:
    def sp(v: float | None) -> str:
        return "not measurable" if v is None else f"{v:.2f}x"

    def load(p: dict) -> str:
        return f"{p['load_before'][0]:.2f} → {p['load_after'][0]:.2f}"

    lines = [
        "# Speed-ups on a busy machine: quiet vs two CPU burners",
        "",
        "`python benchmarks/busy_machine.py` (issue #24 item 1). Goal: under two CPU-burning processes a reported",
        "speed-up is within 2x of the quiet one, or withheld (`speed-up not measurable here: ...`).",
        "",
        f"- machine: {machine}",
        f"- settings: {settings}",
        f"- 1-minute load before → after: quiet {load(quiet)}, burners {load(busy)}",
        "",
        "| command | engine | quiet speed-up | speed-up with 2 burners | burners / quiet | holds |",
        "|---|---|---:|---:|---:|---|",
    ]
    for key, q in quiet["rows"].items():
        b = busy["rows"].get(key)
        ratio = f"{b / q:.2f}" if q and b else "–"
        lines.append(f"| {key[0]} | {key[1]} | {sp(q)} | {sp(b)} | {ratio} | {holds(q, b)} |")
    lines.append("")
    for what in ("validate", "benchmark"):
        for label, p in (("quiet", quiet), ("burners", busy)):
            v = p[what]
            lines.append(f"- {what}, {label}: " + ("speed-up measured" if v["measurable"] else f"speed-up not measurable here: {v['reason']}"))
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny budgets and few images (a smoke run)")
    ap.add_argument("--time-budget", type=float, default=None, help="timed seconds per model at batch 1 (default 3, quick 0.1)")
    ap.add_argument("--val-samples", "--samples", dest="samples", type=int, default=None, help="validation images (default 120, quick 20; --samples: its old name)")
    ap.add_argument("--out", type=Path, default=HERE / "busy_machine.md")
    ap.add_argument("--work", type=Path, default=HERE / "runs" / "busy_machine")
    args = ap.parse_args(argv)

    from vitedge.sysinfo import machine_summary, print_machine

    info = print_machine()
    args.work.mkdir(parents=True, exist_ok=True)
    budget = args.time_budget or (0.1 if args.quick else 3.0)
    samples = args.samples or (20 if args.quick else 120)
    kw = dict(time_budget=budget, rounds=3 if args.quick else 8, samples=samples, batch_sizes=(1,))
    engine = build_engine(args.work, 32 if args.quick else 80)
    settle((os.cpu_count() or 1) / 2, timeout=30 if args.quick else 180)  # the builds loaded the machine
    quiet = phase("quiet", engine, args.work, kw)
    with burners(2, seconds=600):
        busy = phase("burners", engine, args.work, kw)
    settings = f"reference digits ViT, {samples} images, batch 1, {kw['rounds']} rounds, {budget:g} s per model"
    text = render(machine_summary(info), settings, quiet, busy)
    args.out.write_text(text)
    print(text)
    return 0 if all(holds(q, busy["rows"].get(k)) != "**no**" for k, q in quiet["rows"].items()) else 1


if __name__ == "__main__":
    sys.exit(main())
