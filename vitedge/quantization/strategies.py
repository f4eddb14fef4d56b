"""How each backend's files are quantized: one strategy per backend, declared on its registration.

:func:`vitedge.quantization.quantize` is the front door: it checks the arguments, opens the model, plans
the calibration and held-out data, measures the FP32 reference and writes the artifact with its manifest.
What differs per backend is asked of the backend's :class:`Quantizer` (``Backend.quantizer`` in
:mod:`vitedge.backends.registry`, an import path resolved on first use):

* :meth:`Quantizer.int8` / :meth:`Quantizer.fp16` write the file (``auto`` is INT8 with the float model as a
  candidate, for strategies that offer it);
* :attr:`Quantizer.format` is the written file's manifest format, :attr:`Quantizer.measured_by` the backend
  whose engine measures it here (TensorRT's Q/DQ file is run by ONNX Runtime), :meth:`Quantizer.engine_options`
  how that engine is opened to run it as it will be deployed, :meth:`Quantizer.finish_onnx` a last edit of an
  ONNX file, :attr:`Quantizer.verification_note` what the manifest must say about the measurement.

The strategies shipped with vitedge: NNCF through the fidelity search for ONNX Runtime (QDQ ONNX) and OpenVINO
(IR), and ONNX Runtime's quantizer with NVIDIA's Q/DQ placement for TensorRT.  A new backend brings its own
subclass; ``tests/toy_backend.py`` shows one.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

from .._io import commit_files, json_safe, save_onnx
from ..backends.openvino import default_precision_hint
from ..backends.tensorrt import drop_stale_value_info
from ..data import ImageSet
from ..errors import GateFailed, VitedgeError
from ..manifest import Manifest
from ..sysinfo import isa_summary
from ..ui import note
from . import fidelity as fid
from . import sensitivity, tensorrt_qdq
from .calibration import DataPlan, EvalSet, StreamingBatches
from .fidelity import FidelityResult, Target
from .fp16 import FP16_KEEP_FLOAT, convert_onnx_fp16, openvino_fp16
from .nncf_int8 import ESTIMATORS, Int8Config
from .roles import graph_roles
from .worker import Worker

log = logging.getLogger("vitedge")


@dataclass
class Job:
    """Everything a strategy needs to write one quantized file (the front door fills it in)."""

    src: Path  # the FP32 ONNX model
    parent: Manifest  # its manifest
    out: Path  # where to write (a path in the artifact's scratch folder; the final name is ``output.name``)
    output: Path  # the artifact's final path
    scratch: Path
    backend: str
    precision: str  # int8 | fp16 | auto
    method: str
    plan: DataPlan
    ev: EvalSet
    target: Target
    search_budget: float
    enforce: bool  # False: a random-weight preset (measured, not held to the target)
    samples: int | None
    fixed_batch: int | None  # a fixed-batch model is fed batches of exactly that size
    worker: Worker | None = None  # the search's worker process, started early by the front door (``uses_worker``)
    ray: Any = None  # distributed.RayOptions: the search's independent items as Ray tasks (``--ray``)

    @property
    def calib(self) -> ImageSet:
        """The calibration images: INT8 always has them (:func:`plan_data` refuses INT8 without)."""
        assert self.plan.calib is not None
        return self.plan.calib


@dataclass
class Outcome:
    """What a strategy wrote: the manifest's quantization section, extra files beside the artifact, the search."""

    info: dict
    precision: str  # what the file is: int8 | fp16 | fp32 (``auto`` chose the float model)
    report_files: list[str] = field(default_factory=list)
    fidelity: FidelityResult | None = None
    stream: StreamingBatches | None = None  # the calibration stream (its skipped images are reported)
    measured: dict | None = None  # the written file's agreement on the held-out images, when the strategy measured it
    measured_as: str | None = None  # ... and the engine it measured it as


class Quantizer:
    """One backend's quantization: subclass and declare it on the backend's registration."""

    format = "onnx"  # the manifest format of the file written
    measured_by = "onnxruntime"  # the backend whose engine measures the written file on this machine
    default_method = "minmax"
    verification_note: str | None = None
    #: the engine that runs the FP32 model for the reference outputs (backend name, ``vitedge.load`` options)
    reference: tuple[str, dict] = ("onnxruntime", {})
    #: INT8 runs in a worker process (:mod:`.worker`): the front door starts it before it reads the images
    uses_worker = False

    def int8(self, job: Job) -> Outcome:
        raise VitedgeError(f"backend {job.backend} has no int8 quantization")

    def fp16(self, job: Job) -> Outcome:
        raise VitedgeError(f"backend {job.backend} has no fp16 quantization")

    def quantize(self, job: Job) -> Outcome:
        return self.fp16(job) if job.precision == "fp16" else self.int8(job)

    def engine_options(self, info: dict) -> dict:
        """Options of the engine that measures the written file (``vitedge.load``'s keywords)."""
        return {}

    def finish_onnx(self, proto) -> None:
        """A last in-place edit of a written ONNX file (after its metadata is embedded)."""


def _onnx_fp16(job: Job) -> Outcome:
    res = convert_onnx_fp16(job.src, job.out, job.ev)  # overflow guard: nodes whose tensors overflow FP16 stay FP32
    info = {
        "tool": "onnxruntime.transformers.float16 (keep_io_types)",
        "io": "float32",
        "excluded_nodes": res.kept,
        "kept_float_op_types": FP16_KEEP_FLOAT,
        "overflow_guard": dict(res.guard, checked_on=job.ev.source),
    }
    _fp16_notes(job, info, f", {len(res.kept)} nodes kept in FP32")
    return Outcome(info, "fp16")


def _fp16_notes(job: Job, info: dict, kept: str) -> None:
    guard = info["overflow_guard"]
    n_over = len(guard.get("kept_fp32_for_overflow", []))
    if guard.get("fp16_compute_safe") is False:
        note(f"activations exceed FP16 ({guard['hot_tensor_count']} tensors): {guard['advice']}")
    note(f"FP16 for {job.backend}: inputs/outputs FP32{kept}" + (f" ({n_over} of them because their activations overflow FP16)" if n_over else ""))


class NNCFQuantizer(Quantizer):
    """NNCF INT8 through the fidelity search (:mod:`.fidelity`): quantize once, revert harmful groups by graph edits.
    ``auto`` adds the FP32 model, run at the CPU's fastest float precision, as a candidate."""

    tool = "NNCF"
    uses_worker = True

    def base_config(self, src: Path) -> Int8Config:
        """vitedge's default NNCF configuration for this runtime and the model at ``src``."""
        return Int8Config()

    def variants(self, fixed_batch: int | None) -> list[dict]:
        """The engines a candidate is measured as, the one ``vitedge compile`` builds by default first."""
        return [{"float_precision": None, "static": False}]

    def int8(self, job: Job) -> Outcome:
        if job.ev.random:
            raise VitedgeError("INT8 needs held-out images to measure against FP32", "pass --val DIR or more --calib images")
        stream = StreamingBatches(
            job.calib,
            job.parent.preprocessing_obj,
            32,
            min_count=min(job.samples or 1, len(job.calib)),
            label="preparing calibration images",
            sizes=job.ev.sizes,
        )
        work = job.scratch / "search"
        work.mkdir()
        base = self.base_config(job.src)
        if job.method != "minmax":
            base = base.but(estimator=job.method)
        res = fid.search(
            job.src,
            self.format,
            stream,
            job.ev,
            work,
            target=job.target,
            budget_s=job.search_budget,
            fixed_batch=job.fixed_batch,
            base_config=base,
            variants=self.variants(job.fixed_batch),
            final_name=job.output.name,
            classifier=job.parent.task == "classification",
            float_candidate=job.precision == "auto",
            enforce=job.enforce,
            worker=job.worker,
            ray=job.ray,
        )
        fid.copy_chosen(res, job.out, self.format)
        tj, tm = f"{job.output.name}.fidelity.json", f"{job.output.name}.fidelity.md"
        fid.write_table(res, job.scratch / tj, job.scratch / tm, model=job.src.name, backend=job.backend, eval_source=job.ev.source, images=len(job.ev))
        c = res.chosen
        info = {
            "tool": f"nncf {version('nncf')} ({self.tool})",  # NNCF itself is imported by the worker only
            "model_type": "TRANSFORMER",
            "preset": "MIXED",
            "method": job.method,
            "per_channel": True,
            "config": c.config.to_dict(),
            "configuration": c.describe(),
            "range_estimator": ESTIMATORS[c.config.estimator],
            "kept_float_groups": list(c.kept),
            "float_mac_share": c.float_share,
            "excluded_nodes": fid.kept_float(res),
            "float_precision": c.float_precision,
            "engine_batch": c.engine_batch,
            "fidelity": {
                "target": job.target.describe(res.classifier),
                "met": res.met,
                "verdict": c.verdict,
                "agreement_interval": c.interval,
                "images": c.metrics.get("images"),
                "chosen_candidate": c.no,
                "candidates": len({r.no for r in res.rows}),
                "table": tm,
                "summary": res.summary(),
            },
        }
        self.describe_int8(job, info)
        shutil.rmtree(work, ignore_errors=True)
        precision = self._auto(res, job, info) if job.precision == "auto" else "int8"
        row = res.reference if precision == "fp32" and res.reference is not None else c  # what was written, as it was measured
        batch = row.engine_batch
        shape = None if batch is None else "dynamic batch" if batch == "dynamic" else f"static batch {batch}"
        parts = [p for p in (row.float_precision and f"float parts {row.float_precision}", shape) if p]
        engine = f"{self.measured_by} ({', '.join(parts)})" if parts else self.measured_by
        return Outcome(info, precision, [tj, tm], res, stream, row.metrics, engine)

    def describe_int8(self, job: Job, info: dict) -> None:
        """Add what is particular to this runtime's INT8 file to the manifest's quantization section."""

    def write_float(self, src: Path, out: Path) -> None:
        """The FP32 model in this runtime's format (``--auto`` chose it)."""
        import onnx

        save_onnx(onnx.load(str(src)), out, f"{out.name}.data")

    def _auto(self, res: FidelityResult, job: Job, info: dict) -> str:
        """``--auto``: keep the INT8 file, or write the FP32 model (run at the CPU's float precision) when it meets
        the target and INT8 is no faster here.  Returns the precision written (``int8`` / ``fp32``)."""
        why, ref = res.choice(), res.reference
        info["choice"] = {"asked": "auto", "chosen": (ref.float_precision or "fp32") if res.float_wins and ref else "int8", "why": why, "cpu": isa_summary()}
        log.info("--auto chose %s", why)
        if not res.float_wins or ref is None:  # (float_wins needs a measured reference)
            return "int8"
        for f in (job.out, job.out.with_suffix(".bin"), job.out.parent / f"{job.out.name}.data"):  # the INT8 files
            f.unlink(missing_ok=True)
        self.write_float(job.src, job.out)  # the file that was measured
        info.update(
            float_precision=ref.float_precision,
            excluded_nodes=[],
            kept_float_groups=[],
            float_mac_share=1.0,
            tool=f"none: FP32 weights, run at {ref.float_precision or 'fp32'}",
        )
        return "fp32"


class OnnxRuntimeQuantizer(NNCFQuantizer):
    """QDQ ONNX for ONNX Runtime, written by NNCF's ONNX backend; the attention core stays float (ONNX Runtime's
    int8 attention MatMuls are slow and lossy); each reader of an activation gets its own Q/DQ pair."""

    tool = "QDQ ONNX for ONNX Runtime"

    def base_config(self, src: Path) -> Int8Config:
        """The attention core in float, when the model has one (a conv net has none: nothing to say or keep)."""
        return super().base_config(src).but(attention_float=bool(graph_roles(src).attention))

    def describe_int8(self, job: Job, info: dict) -> None:
        import onnx

        from .. import graph

        info["scheme"] = graph.qdq_scheme(onnx.load(str(job.out), load_external_data=False))

    def fp16(self, job: Job) -> Outcome:
        return _onnx_fp16(job)


class OpenVINOQuantizer(NNCFQuantizer):
    """An OpenVINO IR written by NNCF's OpenVINO backend, measured as OpenVINO will run it: float parts in bf16 and
    f32 on CPUs with BF16, static batch 1 (what ``vitedge compile`` builds for latency) and dynamic batch."""

    format = "openvino"
    measured_by = "openvino"
    tool = "OpenVINO IR"
    reference = ("openvino", {"config": {"INFERENCE_PRECISION_HINT": "f32"}})  # FP32 math, several times ONNX Runtime's speed

    def variants(self, fixed_batch: int | None) -> list[dict]:
        fps = ["bf16", "f32"] if default_precision_hint("int8") == "bf16" else ["f32"]
        shapes = [False] if fixed_batch else [True, False]
        return [{"float_precision": fp, "static": s} for fp in fps for s in shapes]

    def write_float(self, src: Path, out: Path) -> None:
        import openvino as ov

        ov.save_model(ov.convert_model(str(src)), str(out), compress_to_fp16=False)

    def engine_options(self, info: dict) -> dict:
        fp = info.get("float_precision")
        return {"config": {"INFERENCE_PRECISION_HINT": fp}} if fp else {}

    def fp16(self, job: Job) -> Outcome:
        guard = openvino_fp16(job.src, job.out, job.ev)  # FP32 scan marks what FP16 cannot hold; compiled CPU output checked
        info = {
            "tool": "openvino.save_model(compress_to_fp16=True)",
            "excluded_nodes": [],
            "overflow_guard": dict(guard, checked_on=job.ev.source),
            "notes": ["weights stored as FP16; the CPU plugin decides the compute precision"],
        }
        _fp16_notes(job, info, "")
        return Outcome(info, "fp16")


class TensorRTQuantizer(Quantizer):
    """A symmetric QDQ ONNX for TensorRT's explicit quantization, written by ONNX Runtime's quantizer with NVIDIA's
    placement (attention core and GEMVs in float, one shared Q/DQ pair per tensor); ``--max-drop`` keeps the most
    sensitive layers in float (:mod:`.sensitivity`).  TensorRT cannot run here: ONNX Runtime measures the file."""

    default_method = "entropy"  # NVIDIA's Model Optimizer calibrates INT8 with entropy
    verification_note = (
        "TensorRT is not installed here: the QDQ file was executed by ONNX Runtime (same Q/DQ arithmetic); "
        "build the engine with `vitedge compile --backend tensorrt` on the GPU machine"
    )

    def fp16(self, job: Job) -> Outcome:
        return _onnx_fp16(job)

    def finish_onnx(self, proto) -> None:
        drop_stale_value_info(proto)  # TensorRT parses the file as typed: no stale value_info types on weights

    def int8(self, job: Job) -> Outcome:
        fixed, ev, method, max_drop = job.fixed_batch, job.ev, job.method, job.target.max_drop
        stream = StreamingBatches(
            job.calib, job.parent.preprocessing_obj, fixed or 8, min_count=min(job.samples or 1, len(job.calib)), pad=fixed is not None, sizes=job.ev.sizes
        )
        prepared = tensorrt_qdq.prepare(job.src, job.scratch / "prepared.onnx")
        cfg = tensorrt_qdq.tensorrt_config(prepared)  # NVIDIA's placement: attention core and GEMVs stay float
        note(
            f"INT8 {cfg.label} for {job.backend} ({method} calibration): {cfg.reason} "
            f"({len(cfg.float_roles.get('attention', []))} attention MatMuls, {len(cfg.float_roles.get('gemv', []))} GEMVs, "
            f"{len(cfg.float_roles.get('small', []))} small MatMuls in float)"
        )
        cache = tensorrt_qdq.calibrate(prepared, stream, job.parent.inputs[0].name, method, job.scratch, symmetric=cfg.activation_symmetric)
        tensorrt_qdq.quantize_qdq(prepared, job.out, cache, cfg, method)
        info = {
            "method": method,
            "per_channel": True,
            "op_types": ["MatMul", "Gemm", "Conv"],
            "tool": "onnxruntime.quantization.quantize_static (QDQ)",
            "config": cfg.to_dict(),
            "excluded_nodes": [],
            "float_by_placement": cfg.float_roles,
            "placement": "NVIDIA (modelopt INT8 rules): MHA core and GEMVs in float, one shared Q/DQ pair per tensor",
        }
        out = Outcome(info, "int8", stream=stream)
        if max_drop is None:
            return out
        output = job.output
        full = sensitivity._run(job.out, ev)
        nodes = tensorrt_qdq.quantizable_nodes(prepared, cfg)
        report = {
            "model": job.src.name,
            "backend": job.backend,
            "method": method,
            "scheme": cfg.label,
            "eval_set": ev.source,
            "images": len(ev),
            "drop_kind": ev.drop_kind,
            "max_drop": max_drop,
            "full_int8_drop_pp": full["drop_pp"],
            "kept_float": [],
            "steps": [],
        }
        rj, rm = f"{output.name}.sensitivity.json", f"{output.name}.sensitivity.md"
        note(f"all layers INT8: {ev.drop_kind} {full['drop_pp']:.2f} pp on {ev.source} (budget {max_drop} pp); ranking {len(nodes)} layers")
        ranking = sensitivity.rank_layers(prepared, cache, cfg, method, nodes, ev, job.scratch)
        report["layers"] = ranking
        keep: list[str]
        if full["drop_pp"] <= max_drop + 1e-9:
            report["result"] = "budget met with every layer in INT8"
            met, keep = True, []
        else:
            keep, best, steps, met = sensitivity.search(prepared, job.out, cache, cfg, method, ranking, ev, max_drop, full, job.scratch)
            report.update(kept_float=keep if met else [], steps=steps)
            report["result"] = (
                f"budget met keeping {len(keep)} of {len(nodes)} layers in float"
                if met
                else f"budget NOT met: keeping {len(keep)} of {len(nodes)} layers in float still loses {best['drop_pp']:.2f} pp"
            )
        sensitivity.write_report(job.scratch / rj, job.scratch / rm, json_safe(report))
        if not met:  # the report is useful on its own: keep it, but write no model
            commit_files(job.scratch, {rj: output.parent / rj, rm: output.parent / rm})
            raise GateFailed(
                f"--max-drop {max_drop} pp cannot be met: {report['result']} on {ev.source} (sensitivity table: {output.parent / rm})",
                "raise --max-drop, give more or better calibration images, or try --method percentile/entropy",
            )
        info["excluded_nodes"] = keep  # on top of the placement's float nodes (float_by_placement)
        info["max_drop"] = {
            "budget_pp": max_drop,
            "full_int8_drop_pp": full["drop_pp"],
            "kept_float": keep,
            "report": rm,
            "measured_on": ev.source,
            "metric": ev.drop_kind,
        }
        note(f"kept {len(keep)} most sensitive layers in float: {', '.join(keep) or 'none'}")
        out.report_files += [rj, rm]
        return out


ONNXRUNTIME = OnnxRuntimeQuantizer()
OPENVINO = OpenVINOQuantizer()
TENSORRT = TensorRTQuantizer()
