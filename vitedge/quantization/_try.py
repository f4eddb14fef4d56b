"""One try of the INT8 fidelity search, run in a child process: ``python -m vitedge.quantization._try JOB.json``.

The parent (``fidelity.py``) writes the job (source model, backend, :class:`Int8Config`, where the
preprocessed calibration and held-out arrays are) and reads ``result.json`` back.  A crash inside a
native library (seen: a malloc corruption in NNCF's quantile estimator) or a hang kills this
process only; the parent records it in the table and goes on with the next try.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path

import numpy as np

from .._io import save_onnx
from ..errors import first_line
from .nncf_int8 import pad_to_multiple


def _batches(x: np.ndarray, fixed: int | None, input_name: str | None):
    """Calibration items for NNCF: one image at a time (NNCF's statistics assume it), or the model's fixed batch.
    NNCF's ONNX backend takes {input name: array}, its OpenVINO backend the array."""
    bs = fixed or 1
    for i in range(0, len(x), bs):
        b = np.ascontiguousarray(pad_to_multiple(x[i : i + bs], bs))
        yield {input_name: b} if input_name else b


class _Reiterable:
    def __init__(self, x, fixed, input_name: str | None = None):
        self.x, self.fixed, self.input_name = x, fixed, input_name

    def __iter__(self):
        return _batches(self.x, self.fixed, self.input_name)

    def __len__(self):
        return -(-len(self.x) // (self.fixed or 1))


def run(job: dict) -> dict:
    from .nncf_int8 import Int8Config, Validation, dedicate_qdq, float_names, float_ops_onnx, float_ops_openvino, graph_roles, \
        ov_attention_matmuls, quantize_nncf

    t0 = time.perf_counter()
    cfg = Int8Config.from_dict(job["config"])
    src, out = Path(job["source"]), Path(job["output"])
    calib = np.load(job["calib"], mmap_mode="r")
    x = np.load(job["eval"], mmap_mode="r")
    ref = dict(np.load(job["reference"]))
    if job.get("float_reference"):  # no quantization: the FP32 model at the CPU's float precision, for comparison
        out = src
        return {"status": "ok", "float_ops": [], "quantize_seconds": 0.0, "seconds": time.perf_counter() - t0,
                "variants": _measure_variants(job, out, x, ref)}
    import onnx

    proto = onnx.load(str(src))
    roles = graph_roles(proto)
    ignored = float_names(cfg, roles)
    validation = None
    if cfg.accuracy_control:
        validation = Validation(np.asarray(x), ref, job["classifier"], job["ac_max_drop"], job["ac_max_float_layers"],
                                input_name=None if job["backend"] == "openvino" else proto.graph.input[0].name)
    data = _Reiterable(calib, job.get("fixed_batch"), None if job["backend"] == "openvino" else proto.graph.input[0].name)
    if job["backend"] == "openvino":
        import openvino as ov

        model = ov.convert_model(str(src))
        if cfg.attention_float:
            ignored = sorted(set(ignored) | set(ov_attention_matmuls(model)))
        q = quantize_nncf(model, data, len(data), cfg, ignored, validation)
        ov.save_model(q, str(out))  # weights stored as int8
        kept = float_ops_openvino(q)
    else:
        q = quantize_nncf(proto, data, len(data), cfg, ignored, validation)
        dedicate_qdq(q)  # ONNX Runtime fuses a Q/DQ pair into an integer MatMul only when it has one reader
        save_onnx(q, out, job["data_name"])
        kept = float_ops_onnx(q)
    t_quant = time.perf_counter() - t0
    return {"status": "ok", "float_ops": kept, "quantize_seconds": t_quant, "variants": _measure_variants(job, out, x, ref),
            "seconds": time.perf_counter() - t0}


def _measure_variants(job: dict, model: Path, x, ref: dict) -> list[dict]:
    """Outputs (saved next to the job for the parent to compare) and latency, per float precision and engine
    shape; all variants are timed in interleaved rounds, with the model of ``job["compare"]`` (the float
    reference times the chosen INT8 try beside itself, so the two are compared in the same conditions)."""
    from ..compare import match_outputs
    from .nncf_int8 import prepare, timed_interleaved

    variants, runs = [], []
    folder = Path(job["result"]).parent
    x = np.asarray(x)
    for fp in job["float_precisions"]:
        for static in ([True, False] if job["backend"] == "openvino" and not job.get("fixed_batch") else [False]):
            outs, run = prepare(model, job["backend"], x, fp, static=static, fixed=job.get("fixed_batch"))
            key = f"{fp or 'default'}.{'static' if static else 'dynamic'}"
            np.savez(folder / f"outputs.{key}.npz", **match_outputs(ref, outs, "the quantized model", check_shapes=False))
            variants.append({"float_precision": fp, "static": static, "key": key})
            runs.append(run)
    other = job.get("compare")
    if other:
        runs.append(prepare(Path(other["path"]), job["backend"], x[:1], other["float_precision"], static=other["static"],
                            fixed=job.get("fixed_batch"))[1])
    latencies = timed_interleaved(runs)
    for v, ms in zip(variants, latencies):
        v["latency_ms"] = ms
        if other:
            v["compare_latency_ms"] = latencies[-1]
    return variants


def main() -> int:
    job_path = Path(sys.argv[1])
    job = json.loads(job_path.read_text())
    result_path = Path(job["result"])
    try:
        res = run(job)
    except BaseException as exc:  # noqa: BLE001 - everything is reported to the parent
        name, msg = type(exc).__name__, first_line(exc, 300)
        res = {"status": "failed", "error": name if msg == name else f"{name}: {msg}", "trace": traceback.format_exc()[-4000:]}
        print(res["trace"], file=sys.stderr)
    tmp = result_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(res))
    tmp.replace(result_path)
    return 0 if res["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
