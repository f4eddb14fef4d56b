"""Measure the compile settings that decide `vitedge compile`'s defaults (batch-1 latency).

For one ONNX model, compiles ONNX Runtime and OpenVINO engines with a dynamic batch and with a
static batch of 1 (and OpenVINO with f32 / bf16 inference precision), then times single-image
inference, interleaving the engines round by round so that load from other processes hits all of
them alike.  Prints median and p99 latency per engine.

    python examples/realtime/compile_settings.py model.onnx [--rounds 20] [--iters 25]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

import vitedge
from vitedge.compilation import compile_model

VARIANTS = [
    ("onnxruntime", "dynamic", None),
    ("onnxruntime", 1, None),
    ("openvino", "dynamic", "f32"),
    ("openvino", 1, "f32"),
    ("openvino", "dynamic", "bf16"),
    ("openvino", 1, "bf16"),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--iters", type=int, default=25)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        engines = {}
        for target, batch, prec in VARIANTS:
            name = f"{target} batch={batch}" + (f" {prec}" if prec else "")
            out = Path(tmp) / (f"e{len(engines)}" + (".onnx" if target == "onnxruntime" else ".xml"))
            path, _ = compile_model(args.model, out, target=target, batch=batch, precision_hint=prec, threads=args.threads, verify=False)
            engines[name] = vitedge.load(path)
        shape = [1] + [d for d in engines[next(iter(engines))].input_shape[1:]]
        x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        times: dict[str, list[float]] = {k: [] for k in engines}
        for e in engines.values():
            for _ in range(5):
                e.infer(x)
        for _ in range(args.rounds):
            for name, e in engines.items():
                for _ in range(args.iters):
                    t = time.perf_counter()
                    e.infer(x)
                    times[name].append(time.perf_counter() - t)
        print(f"{args.model.name}, input {tuple(shape)}, {args.rounds * args.iters} runs each")
        print(f"{'engine':<34} {'p50 ms':>8} {'p99 ms':>8}")
        for name, ts in times.items():
            ms = np.asarray(ts) * 1e3
            print(f"{name:<34} {np.median(ms):8.3f} {np.percentile(ms, 99):8.3f}")
        for e in engines.values():
            e.close()


if __name__ == "__main__":
    main()
