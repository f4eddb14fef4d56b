"""Validation and benchmark reports: ``report.json`` (schema below), ``report.md``, ``report.html``.

A :class:`Report` wraps one JSON document.  The document is checked against :data:`SCHEMA`
(JSON Schema 2020-12) before anything is written, and the three files are written atomically.
``report.md`` and ``report.html`` are rendered from the Jinja2 templates in ``vitedge/templates``
(HTML autoescaped).  ``report.html`` is self-contained: inline CSS, inline SVG plots (latency distribution at batch 1,
accuracy vs latency for every model compared, the attention maps' correlation, drawn here) and the
attention maps of the most moved images as PNG data URIs; no scripts, no external files.

Schema outline (``docs/validate.md`` explains every field)::

    schema: "vitedge.report/1"      kind: "validate" | "benchmark"      created, vitedge_version
    machine: {cpu, cores, instruction_sets{...}, memory_gb, os, load_average, versions{...},
              load: {at_start, before_timing, after_timing, cores, busy_load_per_core, busy, warning | null}}
    settings: {data, samples, batch_sizes, timing{...}, rounds, reference_threads, torch_threads, ci_level, ci_method, gates}
    data: {source, images, labelled, classes, skipped[]}
    models: [ {name, role: reference|engine, backend, precision, artifact, format, options,
               size_bytes, load_s, peak_rss_mb, rss_increase_mb,
               accuracy: {top1, top5, top1_ci95, top5_ci95} | null,
               vs_reference: {top1_drop_pp, top1_drop_ci95_pp, top5_drop_pp, top5_drop_ci95_pp,
                              top1_agreement, top1_agreement_ci95, top5_agreement, cosine_mean,
                              cosine_min, snr_db, max_abs_error, discordant{...}, worst[...],
                              outputs{name: {shape, cosine_mean, cosine_min, max_abs_error, snr_db}}?} | null,
               latency: {batch, runs, p50_ms, p90_ms, p99_ms, mean_ms, std_ms, min_ms, max_ms,
                         median_ci95_ms, samples_ms[]},
               throughput: [{batch, images_per_s, p50_ms, runs}],
               speedup (median of per-round paired ratios; null when withheld),
               speedup_spread: {method, rounds, ratio_iqr, ratio_min, ratio_max, ratios[], ratio_of_medians} (absent when withheld),
               throughput_speedup{batch: x}, precision_breakdown | null, gate_failures[],
               attention: {kind, images, correlation{mean, median, min, p10}, top10_overlap{mean, median, min},
                           per_image[{image, correlation, top10_overlap}], moved[{..., engine_map, reference_map}]} | null} ]
    gates: {max_drop_pp, min_speedup, strict, passed, failures[], unchecked[]}
    speedup_verdict: {measurable, reason | null, warning | null, cpu{at_start, before_timing}, reference_threads,
                      reference_p50_ms, reference_single_thread_p50_ms | null}
    findings: [str]
    ranking, pareto: [name], recommended: name | null, skipped: [{name, reason}]   (benchmark)
"""

from __future__ import annotations

import datetime as _dt
import functools
import html as _html
import json
import math
from pathlib import Path
from typing import Any

from . import attention
from ._io import atomic_dir, commit_files
from .errors import FileProblem, VitedgeError

SCHEMA_ID = "vitedge.report/1"

_NUM = {"type": "number"}
_NUM_OR_NULL = {"type": ["number", "null"]}
_INTERVAL = {"type": ["array", "null"], "items": _NUM, "minItems": 2, "maxItems": 2}
_STR_OR_NULL = {"type": ["string", "null"]}

_LATENCY = {
    "type": "object",
    "required": ["batch", "runs", "p50_ms", "p90_ms", "p99_ms", "mean_ms", "samples_ms"],
    "properties": {
        "batch": {"type": "integer", "minimum": 1},
        "runs": {"type": "integer", "minimum": 1},
        "p50_ms": _NUM,
        "p90_ms": _NUM,
        "p99_ms": _NUM,
        "mean_ms": _NUM,
        "std_ms": _NUM,
        "min_ms": _NUM,
        "max_ms": _NUM,
        "median_ci95_ms": _INTERVAL,
        "samples_ms": {"type": "array", "items": _NUM},
    },
}

_VS_REF = {
    "type": ["object", "null"],
    "required": ["top1_agreement", "top5_agreement", "cosine_mean", "cosine_min", "snr_db", "worst"],
    "properties": {
        "top1_drop_pp": _NUM_OR_NULL,
        "top1_drop_ci95_pp": _INTERVAL,
        "top5_drop_pp": _NUM_OR_NULL,
        "top5_drop_ci95_pp": _INTERVAL,
        "top1_agreement": _NUM_OR_NULL,
        "top1_agreement_ci95": _INTERVAL,
        "top5_agreement": _NUM_OR_NULL,
        "cosine_mean": _NUM,
        "cosine_min": _NUM,
        "snr_db": _NUM_OR_NULL,
        "max_abs_error": _NUM,
        "discordant": {"type": "object"},
        # per output (models with several outputs or a non-classifier head; top-1 fields are null for the latter)
        "outputs": {
            "type": "object",
            "additionalProperties": {
                "type": "object",
                "required": ["cosine_mean", "cosine_min", "max_abs_error", "snr_db"],
                "properties": {
                    "shape": {"type": "array"},
                    "cosine_mean": _NUM,
                    "cosine_min": _NUM,
                    "max_abs_error": _NUM,
                    "snr_db": _NUM_OR_NULL,
                    "finite": {"type": "boolean"},
                },
            },
        },
        "worst": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["image", "cosine", "reference_top1", "engine_top1"],
                "properties": {
                    "image": {"type": "string"},
                    "cosine": _NUM,
                    "reference_top1": {"type": "string"},
                    "engine_top1": {"type": "string"},
                    "label": _STR_OR_NULL,
                },
            },
        },
    },
}

_AGREEMENT = {
    "type": "object",
    "required": ["image", "correlation", "top10_overlap"],
    "properties": {"image": {"type": "string"}, "correlation": _NUM, "top10_overlap": _NUM},
}

# where the engine looks against the reference (vitedge.validation._AttentionMaps); null when not compared
_ATTENTION = {
    "type": ["object", "null"],
    "required": ["kind", "images", "correlation", "top10_overlap", "per_image", "moved"],
    "properties": {
        "kind": {"enum": list(attention.KINDS)},
        "images": {"type": "integer", "minimum": 1},
        "correlation": {"type": "object", "required": ["mean", "median", "min"], "additionalProperties": _NUM},
        "top10_overlap": {"type": "object", "required": ["mean", "median", "min"], "additionalProperties": _NUM},
        "per_image": {"type": "array", "items": _AGREEMENT},
        "moved": {
            "type": "array",
            "items": {**_AGREEMENT, "required": [*_AGREEMENT["required"], "engine_map", "reference_map"]},
        },
    },
}

_MODEL = {
    "type": "object",
    "required": ["name", "role", "backend", "precision", "size_bytes", "load_s", "latency", "throughput", "speedup", "accuracy", "vs_reference"],
    "properties": {
        "name": {"type": "string"},
        "role": {"enum": ["reference", "engine"]},
        "backend": {"type": "string"},
        "precision": {"type": "string"},
        "artifact": _STR_OR_NULL,
        "format": _STR_OR_NULL,
        "options": {"type": "object"},
        "size_bytes": {"type": ["integer", "null"], "minimum": 0},
        "load_s": _NUM,
        "peak_rss_mb": _NUM_OR_NULL,
        "rss_increase_mb": _NUM_OR_NULL,
        "accuracy": {
            "type": ["object", "null"],
            "required": ["top1", "top5"],
            "properties": {"top1": _NUM, "top5": _NUM, "top1_ci95": _INTERVAL, "top5_ci95": _INTERVAL},
        },
        "vs_reference": _VS_REF,
        "latency": _LATENCY,
        "throughput": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["batch", "images_per_s"],
                "properties": {"batch": {"type": "integer"}, "images_per_s": _NUM, "p50_ms": _NUM, "runs": {"type": "integer"}},
            },
        },
        "speedup": _NUM_OR_NULL,  # null: withheld on a busy machine (the report's speedup_verdict says why)
        # how the speed-up was measured: per-round paired ratios (reference / engine), their spread
        "speedup_spread": {
            "type": "object",
            "required": ["rounds", "ratio_iqr"],
            "properties": {
                "method": {"type": "string"},
                "rounds": {"type": "integer", "minimum": 1},
                "ratio_iqr": _INTERVAL,
                "ratio_min": _NUM,
                "ratio_max": _NUM,
                "ratios": {"type": "array", "items": _NUM},
                "ratio_of_medians": _NUM,
            },
        },
        "throughput_speedup": {"type": "object", "additionalProperties": _NUM},
        "precision_breakdown": {"type": ["object", "null"]},
        "attention": _ATTENTION,
        "gate_failures": {"type": "array", "items": {"type": "string"}},
    },
}

SCHEMA: dict = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": SCHEMA_ID,
    "title": "vitedge validation / benchmark report",
    "type": "object",
    "required": ["schema", "kind", "created", "machine", "settings", "data", "models", "gates", "findings"],
    "properties": {
        "schema": {"const": SCHEMA_ID},
        "kind": {"enum": ["validate", "benchmark"]},
        "created": {"type": "string"},
        "vitedge_version": {"type": "string"},
        "machine": {
            "type": "object",
            "required": ["cpu", "instruction_sets"],
            "properties": {"cpu": {"type": "string"}, "instruction_sets": {"type": "object"}},
        },
        "settings": {"type": "object"},
        "data": {
            "type": "object",
            "required": ["source", "images", "labelled"],
            "properties": {
                "source": {"type": "string"},
                "images": {"type": "integer", "minimum": 1},
                "labelled": {"type": "boolean"},
                "skipped": {"type": "array"},
            },
        },
        "models": {"type": "array", "minItems": 2, "items": _MODEL},
        "gates": {
            "type": "object",
            "required": ["passed", "failures"],
            "properties": {
                "max_drop_pp": _NUM_OR_NULL,
                "min_speedup": _NUM_OR_NULL,
                "passed": {"type": "boolean"},
                "failures": {"type": "array", "items": {"type": "string"}},
                "unchecked": {"type": "array", "items": {"type": "string"}},
            },
        },
        # whether the speed-ups could be measured here, and why not (vitedge.resources.speedup_withheld)
        "speedup_verdict": {
            "type": "object",
            "required": ["measurable", "reason"],
            "properties": {"measurable": {"type": "boolean"}, "reason": _STR_OR_NULL, "warning": _STR_OR_NULL},
        },
        "findings": {"type": "array", "items": {"type": "string"}},
        "ranking": {"type": "array", "items": {"type": "string"}},
        "pareto": {"type": "array", "items": {"type": "string"}},
        "recommended": _STR_OR_NULL,
        "skipped": {"type": "array", "items": {"type": "object", "required": ["name", "reason"]}},
    },
}


def check_schema(data: dict) -> None:
    """Raise :class:`VitedgeError` if ``data`` does not match :data:`SCHEMA`."""
    import jsonschema

    errors = sorted(jsonschema.Draft202012Validator(SCHEMA).iter_errors(data), key=lambda e: list(map(str, e.absolute_path)))
    if errors:
        e = errors[0]
        where = "/".join(map(str, e.absolute_path)) or "<root>"
        raise VitedgeError(f"report does not match its schema at {where}: {e.message[:200]}", "this is a vitedge bug, please report it")


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


# ------------------------------------------------------------------------------------------
# formatting helpers
# ------------------------------------------------------------------------------------------
def _pct(v: float | None, digits: int = 2) -> str:
    return "–" if v is None else f"{100 * v:.{digits}f} %"


def _pp(v: float | None, ci: list | None = None) -> str:
    if v is None:
        return "–"
    s = f"{v:+.2f} pp"
    if ci:
        s += f" [{ci[0]:+.2f}, {ci[1]:+.2f}]"
    return s


def _ms(v: float | None) -> str:
    if v is None:
        return "–"
    return f"{v:.3f}" if v < 1 else f"{v:.2f}" if v < 100 else f"{v:.1f}"


def _mb(b: int | float | None) -> str:
    return "–" if b is None else f"{b / 1e6:.2f} MB" if b < 1e9 else f"{b / 1e9:.2f} GB"


def _num(v: Any, fmt: str) -> str:
    if v is None:
        return "–"
    if isinstance(v, float) and math.isinf(v):
        return "∞"
    return format(v, fmt)


def speedup_text(m: dict) -> str:
    """A model's speed-up for a table: ``2.42x``, or ``not measurable`` when it was withheld on a busy machine."""
    return "not measurable" if m.get("speedup") is None else f"{m['speedup']:.2f}x"


def _accuracy_text(vs: dict) -> str:
    """An engine's accuracy against the reference in a few words: the top-1 drop with labels, the top-1
    agreement without, the worst output's SNR for models that are not classifiers."""
    if vs.get("top1_drop_pp") is not None:
        return f"top-1 drop {_pp(vs['top1_drop_pp'], vs['top1_drop_ci95_pp'])}"
    if vs.get("top1_agreement") is not None:
        return f"top-1 agreement {_pct(vs['top1_agreement'])}"
    outputs = vs.get("outputs") or {}
    worst = min((o["snr_db"] for o in outputs.values() if o["snr_db"] is not None), default=None)
    return f"{len(outputs)} outputs, worst SNR {_num(worst, '.1f')} dB"


class Report:
    """One validation or benchmark result; ``report.data`` is the ``report.json`` document."""

    files: dict[str, Path]  # the files written, set by validate() when it was given an out_dir

    def __init__(self, data: dict):
        self.data = data

    # -- access -----------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path) -> Report:
        path = Path(path)
        if path.is_dir():
            path = path / "report.json"
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileProblem(f"report {path} does not exist") from None
        except json.JSONDecodeError as exc:
            raise FileProblem(f"{path} is not valid JSON ({exc})") from None
        check_schema(data)
        return cls(data)

    def to_dict(self) -> dict:
        return self.data

    @property
    def models(self) -> list[dict]:
        return self.data["models"]

    @property
    def reference(self) -> dict:
        return next(m for m in self.models if m["role"] == "reference")

    @property
    def engines(self) -> list[dict]:
        return [m for m in self.models if m["role"] == "engine"]

    def engine(self, name: str) -> dict:
        for m in self.engines:
            if m["name"] == name:
                return m
        raise KeyError(name)

    @property
    def passed(self) -> bool:
        return bool(self.data["gates"]["passed"])

    @property
    def failures(self) -> list[str]:
        return list(self.data["gates"]["failures"])

    @property
    def labelled(self) -> bool:
        return bool(self.data["data"]["labelled"])

    @property
    def warnings(self) -> list[str]:
        """What makes the timings doubtful, once each: the busy-machine warning and a withheld speed-up's reason."""
        load = self.data["machine"].get("load") or {}
        verdict = self.data.get("speedup_verdict") or {}
        return [w for w in (load.get("warning"), verdict.get("warning")) if w]

    def summary(self) -> str:
        """One line per engine: drop, cosine, speed-up ("speed-up not measurable here: why" when withheld),
        then the warnings (a recipe's table shows this, cached re-runs included)."""
        lines = []
        for e in self.engines:
            vs = e["vs_reference"]
            speed = f"speed-up {e['speedup']:.2f}x" if e["speedup"] is not None else "speed-up not measurable"
            lines.append(f"{e['name']}: {_accuracy_text(vs)}, cosine {vs['cosine_mean']:.5f}, p50 {_ms(e['latency']['p50_ms'])} ms, {speed}")
        return "\n".join(lines + [f"warning: {w}" for w in self.warnings])

    # -- tables -----------------------------------------------------------------------------
    def _rows(self) -> tuple[list[str], list[list[str]]]:
        lab = self.labelled
        head = ["model", "backend", "precision"]
        head += ["top-1", "top-1 drop (95% CI)"] if lab else ["top-1 agree"]
        head += ["cosine", "SNR dB", "p50 ms", "p90 ms", "p99 ms", "speed-up", "best img/s", "size", "load s", "RSS +MB"]
        rows = []
        for m in self._ordered():
            vs = m.get("vs_reference") or {}
            acc = m.get("accuracy") or {}
            lat = m["latency"]
            best_tp = max((t["images_per_s"] for t in m["throughput"]), default=None)
            row = [m["name"] + (" (ref)" if m["role"] == "reference" else ""), m["backend"], m["precision"]]
            if lab:
                row += [_pct(acc.get("top1")), _pp(vs.get("top1_drop_pp"), vs.get("top1_drop_ci95_pp")) if vs else "–"]
            else:
                row += [_pct(vs.get("top1_agreement")) if vs else "(ref)"]
            row += [
                _num(vs.get("cosine_mean"), ".5f") if vs else "1",
                _num(vs.get("snr_db"), ".1f") if vs else "∞",
                _ms(lat["p50_ms"]),
                _ms(lat["p90_ms"]),
                _ms(lat["p99_ms"]),
                speedup_text(m),
                _num(best_tp, ".1f"),
                _mb(m.get("size_bytes")),
                _num(m.get("load_s"), ".2f"),
                "–" if m.get("rss_increase_mb") is None else f"{m['rss_increase_mb']:.0f}",
            ]
            rows.append(row)
        return head, rows

    def rich_table(self):
        """A compact table for the terminal (the files carry every column)."""
        from rich.table import Table

        lab = self.labelled
        t = Table(title=f"vitedge {self.data['kind']}: {self.data['data']['images']} images; latency at batch 1", title_justify="left")
        cols = ["model", "top-1" if lab else "agree", "drop pp (95% CI)" if lab else "", "cosine", "p50 ms", "p99 ms", "speed-up", "size"]
        for i, h in enumerate(c for c in cols if c):
            t.add_column(h, justify="left" if i == 0 else "right")
        pareto = set(self.data.get("pareto") or [])
        rec = self.data.get("recommended")
        for m in self._ordered():
            vs = m.get("vs_reference") or {}
            acc = m.get("accuracy") or {}
            ref = m["role"] == "reference"
            row = [m["name"] + (" (ref)" if ref else "")]
            if lab:
                row += [_pct(acc.get("top1")), "–" if ref else _pp(vs.get("top1_drop_pp"), vs.get("top1_drop_ci95_pp")).replace(" pp", "")]
            else:
                row += ["(ref)" if ref else _pct(vs.get("top1_agreement"))]
            row += [
                "1" if ref else _num(vs.get("cosine_mean"), ".5f"),
                _ms(m["latency"]["p50_ms"]),
                _ms(m["latency"]["p99_ms"]),
                speedup_text(m),
                _mb(m.get("size_bytes")),
            ]
            style = "bold green" if m["name"] == rec else ("green" if m["name"] in pareto else None)
            t.add_row(*row, style=style)
        return t

    def _ordered(self) -> list[dict]:
        order = self.data.get("ranking") or [m["name"] for m in self.models]
        by_name = {m["name"]: m for m in self.models}
        out = [self.reference] + [by_name[n] for n in order if n in by_name and by_name[n]["role"] == "engine"]
        return out + [m for m in self.engines if m not in out]

    # -- markdown and html: templates/report.md.j2 and templates/report.html.j2 ------------------
    def _context(self) -> dict:
        d = self.data
        head, rows = self._rows()
        sizes = sorted({t["batch"] for m in self.models for t in m["throughput"]})
        throughput = {m["name"]: {t["batch"]: t["images_per_s"] for t in m["throughput"]} for m in self.models}
        return {
            "d": d,
            "data": d["data"],
            "gates": d["gates"],
            "gate_line": gate_line(d["gates"]),
            "ref": self.reference,
            "engines": self.engines,
            "head": head,
            "rows": rows,
            "pareto": set(d.get("pareto") or []),
            "throughput_head": ["model"] + [f"batch {b}" for b in sizes],
            "throughput_rows": [[m["name"]] + [_num(throughput[m["name"]].get(b), ".1f") for b in sizes] for m in self.models],
        }

    def markdown(self) -> str:
        return _template("report.md.j2").render(self._context()).rstrip() + "\n"

    def html(self) -> str:
        from markupsafe import Markup

        d = self.data
        return _template("report.html.j2").render(
            self._context(),
            latency_svg=Markup(latency_svg(self.models)),
            accuracy_svg=Markup(accuracy_latency_svg(self.models, self.labelled, d.get("pareto") or [])),
            correlation_svg={m["name"]: Markup(correlation_svg(m["attention"])) for m in self.engines if m.get("attention")},
            moved_png={m["name"]: [moved_png_uri(x) for x in m["attention"]["moved"]] for m in self.engines if m.get("attention")},
            settings_json=json.dumps({k: v for k, v in d.items() if k != "models"}, indent=1)[:20000],
        )

    # -- files ------------------------------------------------------------------------------
    def write(self, out_dir: str | Path) -> dict[str, Path]:
        """Write report.json, report.md and report.html into ``out_dir`` (all or nothing)."""
        check_schema(self.data)
        out_dir = Path(out_dir)
        files = {"report.json": json.dumps(self.data, indent=1, allow_nan=True) + "\n", "report.md": self.markdown(), "report.html": self.html()}
        with atomic_dir(out_dir) as scratch:
            for name, text in files.items():
                (scratch / name).write_text(text, encoding="utf-8")
            dests = {name: out_dir / name for name in files}
            commit_files(scratch, dests)
        return dests


def gate_line(gates: dict) -> str:
    """The gates that were set, in words (``max drop 0.5 pp, min speed-up 2x``); a gate not set is not mentioned."""
    parts = []
    if gates.get("max_drop_pp") is not None:
        parts.append(f"max drop {gates['max_drop_pp']:g} pp" + (" (upper end of the 95% CI)" if gates.get("strict") else ""))
    if gates.get("min_speedup") is not None:
        parts.append(f"min speed-up {gates['min_speedup']:g}x")
    return ", ".join(parts) or "none"


def load_text(reading: list | None) -> str:
    """``1.52 / 1.10 / 0.87`` (1-, 5-, 15-minute load averages), or ``unknown``."""
    return " / ".join(f"{v:.2f}" for v in reading) if reading else "unknown"


def _machine_line(m: dict) -> str:
    isa = m.get("instruction_sets", {})
    have = [k for k, v in isa.items() if v]
    cores = m.get("usable_cores") or m.get("logical_cores")
    return f"{m.get('cpu')}, {cores} cores, {m.get('memory_gb')} GB; {' '.join(have) or 'ISA unknown'}"


def _shares(breakdown: dict) -> str:
    """``int8 90.0 %, fp32 10.0 %``: the share of multiply-accumulates per precision, largest first."""
    return ", ".join(f"{k} {100 * v:.1f} %" for k, v in sorted(breakdown.get("mac_share", {}).items(), key=lambda kv: -kv[1]))


@functools.cache
def _template(name: str):
    """A report template (package data in vitedge/templates); HTML ones autoescape."""
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("vitedge", "templates"),
        autoescape=lambda name: name is not None and name.endswith(".html.j2"),
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters.update(
        pct=_pct, pp=_pp, ms=_ms, mb=_mb, num=_num, f=format, shares=_shares, cell=lambda c: str(c).replace("|", "\\|"), shape=lambda s: str(tuple(s or []))
    )
    env.globals["machine_line"] = _machine_line
    env.globals["load_text"] = load_text
    env.globals["threads_text"] = lambda n: "" if not n else f", {n} thread{'s' if n != 1 else ''}"
    return env.get_template(name)


# ------------------------------------------------------------------------------------------
# inline SVG plots (no plotting library needed)
# ------------------------------------------------------------------------------------------
_COLORS = ["#444444", "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]


def _nice_ticks(lo: float, hi: float, log: bool) -> list[float]:
    if log:
        ticks = []
        e = math.floor(math.log10(lo))
        while 10**e <= hi * 1.0001:
            for m in (1, 2, 5):
                v = m * 10**e
                if lo <= v <= hi:
                    ticks.append(v)
            e += 1
        return ticks or [lo, hi]
    span = hi - lo or 1.0
    step = 10 ** math.floor(math.log10(span / 5))
    for m in (1, 2, 5, 10):
        if span / (m * step) <= 6:
            step *= m
            break
    start = math.ceil(lo / step) * step
    out = []
    v = start
    while v <= hi + 1e-9:
        out.append(round(v, 10))
        v += step
    return out


def _fmt_tick(v: float) -> str:
    return f"{v:g}" if abs(v) >= 0.01 else f"{v:.1e}"


class _Axis:
    def __init__(self, lo: float, hi: float, a: float, b: float, log: bool):
        if log:
            lo, hi = max(lo, 1e-6), max(hi, lo * 1.01)
        elif hi <= lo:
            lo, hi = lo - 1, hi + 1
        self.lo, self.hi, self.a, self.b, self.log = lo, hi, a, b, log

    def __call__(self, v: float) -> float:
        if self.log:
            t = (math.log10(max(v, 1e-9)) - math.log10(self.lo)) / (math.log10(self.hi) - math.log10(self.lo))
        else:
            t = (v - self.lo) / (self.hi - self.lo)
        return self.a + t * (self.b - self.a)


def latency_svg(models: list[dict], width: int = 760) -> str:
    """Batch-1 latency distribution per model: dots for every run, box p25-p75, whiskers p5-p99, median line."""
    import numpy as np

    left, right, row_h, top = 190, 20, 34, 20
    height = top + row_h * len(models) + 40
    all_s = [s for m in models for s in (m["latency"]["samples_ms"] or [m["latency"]["p50_ms"]])]
    lo, hi = min(all_s), max(all_s)
    log = hi / max(lo, 1e-9) > 8
    x = _Axis(
        lo * (0.9 if log else 1) - (0 if log else 0.05 * (hi - lo)), hi * (1.1 if log else 1) + (0 if log else 0.05 * (hi - lo)), left, width - right, log
    )
    parts = [
        (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">')
    ]
    for t in _nice_ticks(x.lo, x.hi, log):
        px = x(t)
        parts.append(
            f'<line x1="{px:.1f}" y1="{top - 5}" x2="{px:.1f}" y2="{height - 35}" stroke="#e4e4e4"/>'
            f'<text x="{px:.1f}" y="{height - 22}" text-anchor="middle">{_fmt_tick(t)}</text>'
        )
    parts.append(
        f'<text x="{(left + width - right) / 2:.0f}" y="{height - 6}" text-anchor="middle">latency at batch 1, ms{" (log scale)" if log else ""}</text>'
    )
    rng = np.random.default_rng(0)
    for i, m in enumerate(models):
        cy = top + row_h * i + row_h / 2
        c = _COLORS[i % len(_COLORS)]
        s = np.asarray(m["latency"]["samples_ms"] or [m["latency"]["p50_ms"]], float)
        name = _html.escape(m["name"] + (" (ref)" if m["role"] == "reference" else ""))
        parts.append(f'<text x="{left - 8}" y="{cy + 4:.1f}" text-anchor="end">{name}</text>')
        shown = s if len(s) <= 150 else rng.choice(s, 150, replace=False)
        for v in shown:
            parts.append(f'<circle cx="{x(v):.1f}" cy="{cy + rng.uniform(-9, 9):.1f}" r="1.6" fill="{c}" fill-opacity="0.35"/>')
        p5, p25, p50, p75, p99 = np.percentile(s, [5, 25, 50, 75, 99])
        parts.append(
            f'<line x1="{x(p5):.1f}" y1="{cy:.1f}" x2="{x(p99):.1f}" y2="{cy:.1f}" stroke="{c}"/>'
            f'<rect x="{x(p25):.1f}" y="{cy - 7:.1f}" width="{max(x(p75) - x(p25), 1):.1f}" height="14" fill="none" stroke="{c}" stroke-width="1.5"/>'
            f'<line x1="{x(p50):.1f}" y1="{cy - 9:.1f}" x2="{x(p50):.1f}" y2="{cy + 9:.1f}" stroke="{c}" stroke-width="2.5"/>'
            f"<title>{name}: p50 {p50:.3f} ms, p99 {p99:.3f} ms</title>"
        )
    parts.append("</svg>")
    return "".join(parts)


def accuracy_latency_svg(models: list[dict], labelled: bool, pareto: list[str], width: int = 760, height: int = 360) -> str:
    """Top-1 accuracy (or agreement with FP32) against p50 latency, one point per model."""
    left, right, top, bottom = 70, 30, 20, 50
    pts = []
    for m in models:
        if labelled:
            y = (m.get("accuracy") or {}).get("top1")
        else:
            y = 1.0 if m["role"] == "reference" else (m.get("vs_reference") or {}).get("top1_agreement")
        if y is not None:
            pts.append((m, m["latency"]["p50_ms"], 100 * y))
    if not pts:
        return "<p>(no accuracy figures)</p>"
    xs, ys = [p[1] for p in pts], [p[2] for p in pts]
    log = max(xs) / max(min(xs), 1e-9) > 8
    xa = _Axis(
        min(xs) * 0.8 if log else min(xs) - 0.1 * (max(xs) - min(xs) or 1),
        max(xs) * 1.25 if log else max(xs) + 0.1 * (max(xs) - min(xs) or 1),
        left,
        width - right,
        log,
    )
    ylo, yhi = min(ys), max(ys)
    pad = max(0.5, 0.15 * (yhi - ylo))
    ya = _Axis(max(0.0, ylo - pad), min(100.0, yhi + pad) if yhi + pad > ylo - pad else yhi + 1, height - bottom, top, False)
    parts = [
        (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">')
    ]
    for t in _nice_ticks(xa.lo, xa.hi, log):
        parts.append(
            f'<line x1="{xa(t):.1f}" y1="{top}" x2="{xa(t):.1f}" y2="{height - bottom}" stroke="#e4e4e4"/>'
            f'<text x="{xa(t):.1f}" y="{height - bottom + 14}" text-anchor="middle">{_fmt_tick(t)}</text>'
        )
    for t in _nice_ticks(ya.lo, ya.hi, False):
        parts.append(
            f'<line x1="{left}" y1="{ya(t):.1f}" x2="{width - right}" y2="{ya(t):.1f}" stroke="#e4e4e4"/>'
            f'<text x="{left - 6}" y="{ya(t) + 4:.1f}" text-anchor="end">{_fmt_tick(t)}</text>'
        )
    parts.append(
        f'<text x="{(left + width - right) / 2:.0f}" y="{height - 12}" text-anchor="middle">p50 latency at batch 1, ms'
        f"{' (log scale)' if log else ''} — lower is better</text>"
    )
    ylab = "top-1 accuracy, %" if labelled else "top-1 agreement with FP32, %"
    parts.append(f'<text transform="translate(16,{(top + height - bottom) / 2:.0f}) rotate(-90)" text-anchor="middle">{ylab}</text>')
    front = sorted([p for p in pts if p[0]["name"] in pareto], key=lambda p: p[1])
    if len(front) > 1:
        path = " ".join(f"{xa(p[1]):.1f},{ya(p[2]):.1f}" for p in front)
        parts.append(f'<polyline points="{path}" fill="none" stroke="#2ca02c" stroke-dasharray="4 3"/>')
    placed: list[tuple[float, float, float, float]] = []  # label boxes already drawn
    for m, lx, ly in sorted(pts, key=lambda p: (p[1], -p[2])):
        c = _COLORS[models.index(m) % len(_COLORS)]
        name = _html.escape(m["name"] + (" (ref)" if m["role"] == "reference" else ""))
        px, py = xa(lx), ya(ly)
        shape = (
            f'<rect x="{px - 5:.1f}" y="{py - 5:.1f}" width="10" height="10" fill="{c}"/>'
            if m["role"] == "reference"
            else f'<circle cx="{px:.1f}" cy="{py:.1f}" r="5" fill="{c}"/>'
        )
        w = 6.2 * len(m["name"] + (" (ref)" if m["role"] == "reference" else ""))
        left_side = px + 8 + w > width - 4
        x0 = px - 8 - w if left_side else px + 8
        for dy in (-8, 14, -22, 28, -36, 42, -50, 56, -64, 70):
            box = (x0, py + dy - 10, x0 + w, py + dy + 2)
            if all(box[2] < b[0] or box[0] > b[2] or box[3] < b[1] or box[1] > b[3] for b in placed) and top <= box[1] and box[3] <= height - bottom + 14:
                break
        placed.append(box)
        ty = py + dy
        x2 = x0 + w if left_side else x0
        lead = f'<line x1="{px:.1f}" y1="{py:.1f}" x2="{x2:.1f}" y2="{ty - 4:.1f}" stroke="{c}" stroke-opacity="0.5"/>' if abs(dy) > 14 else ""
        parts.append(f'<g>{shape}<title>{name}: {lx:.3f} ms, {ly:.2f} %</title></g>{lead}<text x="{x0:.1f}" y="{ty:.1f}" fill="{c}">{name}</text>')
    parts.append("</svg>")
    return "".join(parts)


def correlation_svg(att: dict, width: int = 520, height: int = 150) -> str:
    """A histogram of the per-image correlation of an engine's attention maps with the reference's."""
    import numpy as np

    v = np.array([r["correlation"] for r in att["per_image"]], float)
    lo = min(float(v.min()), 0.99)
    counts, edges = np.histogram(v, bins=10, range=(lo, 1.0))
    left, right, top, bottom = 40, 15, 10, 36
    x = _Axis(lo, 1.0, left, width - right, False)
    y = _Axis(0, max(int(counts.max()), 1), height - bottom, top, False)
    parts = [
        (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">')
    ]
    for c, a, b in zip(counts, edges[:-1], edges[1:], strict=True):
        parts.append(
            f'<rect x="{x(a) + 1:.1f}" y="{y(c):.1f}" width="{max(x(b) - x(a) - 2, 1):.1f}" height="{y(0) - y(c):.1f}" fill="#21918c">'
            f"<title>{int(c)} images with correlation {a:.4f}–{b:.4f}</title></rect>"
        )
    parts.append(f'<line x1="{left}" y1="{y(0):.1f}" x2="{width - right}" y2="{y(0):.1f}" stroke="#888"/>')
    for t in (lo, (lo + 1) / 2, 1.0):
        parts.append(f'<text x="{x(t):.1f}" y="{height - bottom + 14}" text-anchor="middle">{t:.4g}</text>')
    parts.append(f'<text x="{left - 6}" y="{y(counts.max()) + 4:.1f}" text-anchor="end">{int(counts.max())}</text>')
    caption = f"correlation with the FP32 map, per image ({len(v)} images)"
    parts.append(f'<text x="{(left + width - right) / 2:.0f}" y="{height - 4}" text-anchor="middle">{caption}</text>')
    parts.append("</svg>")
    return "".join(parts)


def moved_png_uri(moved: dict) -> str:
    """The engine's and the reference's map of one image side by side (one colour scale), as a PNG data URI."""
    import base64

    import numpy as np

    ours, theirs = (attention.display_map(np.asarray(moved[k], float)) for k in ("engine_map", "reference_map"))
    lo, hi = float(min(ours.min(), theirs.min())), float(max(ours.max(), theirs.max()))
    side = 160
    size = (side, round(side * ours.shape[0] / ours.shape[1]))
    panels = [(attention.heatmap(ours, size, lo, hi), "engine"), (attention.heatmap(theirs, size, lo, hi), "FP32 reference")]
    return "data:image/png;base64," + base64.b64encode(attention.png_bytes(attention.side_by_side(panels, min_side=side))).decode()
