"""`vitedge export`: PyTorch ViT -> ONNX, proven against PyTorch before it is written.

The file is produced in a scratch folder, checked with ``onnx.checker``, run by ONNX Runtime on the
same random and real inputs as PyTorch, and only then moved to its destination together with its
manifest.  A failed check leaves nothing behind.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import token_merging
from ._io import EXPORT_EXTERNAL_WEIGHT_BYTES
from .artifact import Artifact, check_output, writing
from .backends.onnxruntime import session
from .compare import output_metrics
from .data import ImageSet, default_check_images
from .errors import InputError, ModelNotSupported, VitedgeError, first_line
from .manifest import Manifest, TensorSpec
from .models.loading import ModelSpec, load_model
from .models.tome import Matching, matching
from .models.vit import VisionTransformer, graph_options
from .options import DEFAULT_OPSET, MAX_OPSET, MIN_OPSET  # declared with the export options
from .preprocess import DynamicSize
from .token_merging import describe, token_counts

log = logging.getLogger("vitedge")

INPUT_NAME = "pixel_values"
OUTPUT_NAME = "logits"


@dataclass
class Tolerance:
    atol: float = 1e-4
    rtol: float = 1e-3  # relative to the largest reference magnitude

    def limit(self, ref: np.ndarray) -> float:
        return self.atol + self.rtol * float(np.abs(ref).max())


def compare_outputs(ref: np.ndarray, out: np.ndarray) -> dict:
    """Agreement numbers between a reference and a candidate output (same shape): :func:`vitedge.compare.output_metrics`."""
    return output_metrics(ref, out)


def _verification_inputs(spec: ModelSpec, images: list[Path] | None, batch: int | None, sizes: DynamicSize | None = None) -> dict[str, np.ndarray]:
    """Random inputs (and real images) at the model's size; for a dynamic-size export, random inputs at every
    size of :meth:`DynamicSize.check_sizes` too (keys ``random HxW``)."""
    h, w = spec.preprocessing.img_size
    c = spec.config.in_channels if spec.config else 3
    n = batch or 2
    rng = np.random.default_rng(0)
    sets = {"random": rng.standard_normal((n, c, h, w)).astype(np.float32)}
    for sh, sw in sizes.check_sizes(h)[1:] if sizes else []:  # the first is the target, checked above
        sets[f"random {sh}x{sw}"] = rng.standard_normal((n, c, sh, sw)).astype(np.float32)
    if images and c == 3:  # real images are RGB; other channel counts are checked on random inputs only
        arr = spec.preprocessing.fixed().batch(images[: max(n, 4)])
        if batch:  # fixed batch: use exactly that many
            idx = np.arange(batch) % len(arr)
            arr = arr[idx]
        sets["images"] = arr
    return sets


def _task(spec: ModelSpec, ref: np.ndarray) -> str:
    """classification when the output is class logits, else features."""
    if spec.config is not None:
        return "classification" if spec.config.num_classes > 0 else "features"
    return "classification" if ref.ndim == 2 and (spec.labels or ref.shape[1] > 1) else "features"


MATCH_PREFIX = "token_merging_picks_"  # the tensors of a merged graph that hold each merge's picks (tome.Matching)


class _WithPicks(torch.nn.Module):
    """A token-merging model that also returns every merge's picks, so that the exported graph names them: the
    check then runs PyTorch with the graph's own picks, and near-ties that two implementations break differently
    cannot fail it.  The outputs are removed from the file afterwards (the tensors stay, by name)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor):
        with matching(Matching()) as m:
            y = self.model(x)
        return (y, *m.picked)


def _torch_export(
    model, dummy, path: Path, opset: int, dynamic_batch: bool, external: bool, sizes: DynamicSize | None = None, extra_outputs: list[str] | None = None
) -> None:
    """``sizes``: height and width are dynamic too, multiples of the patch within the bounds (the dynamo exporter
    is told so with derived dimensions, ``patch * grid``, so the model's divisibility check holds symbolically).
    ``extra_outputs``: names of the model's outputs after the first (opset 17 and newer)."""
    dims: dict[int, Any] = {0: torch.export.Dim("batch", min=1, max=4096)} if dynamic_batch else {}
    if sizes is not None:
        p = sizes.multiple
        dims[2] = p * torch.export.Dim("grid_h", min=sizes.min // p, max=sizes.max // p)
        dims[3] = p * torch.export.Dim("grid_w", min=sizes.min // p, max=sizes.max // p)
    with warnings.catch_warnings(), _quiet_torch_onnx():
        warnings.simplefilter("ignore")
        if opset >= 17:
            # positional form: works whatever the forward argument is called
            prog = torch.onnx.export(
                model,
                (dummy,),
                None,
                dynamo=True,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME, *(extra_outputs or [])],
                verbose=False,
                dynamic_shapes=(dims,) if dims else None,
            )
            assert prog is not None  # the dynamo exporter returns the program it built
            if sizes is not None:
                from .graph import name_input_dims  # onnx_ir: kept out of `import vitedge`

                name_input_dims(prog.model, {2: "height", 3: "width"})
            prog.save(str(path), external_data=external)
        else:  # opsets below 17 only exist in the TorchScript exporter (LayerNorm is decomposed)
            torch.onnx.export(
                model,
                (dummy,),
                str(path),
                dynamo=False,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                do_constant_folding=True,
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic_batch else None,
            )
            if external:  # one .data file beside the graph, as the dynamo path writes it
                import onnx

                proto = onnx.load(str(path))  # also reads any per-tensor files torch wrote
                for f in path.parent.iterdir():
                    if f != path:
                        f.unlink()
                onnx.save(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=path.name + ".data", size_threshold=1024)


def _size_range(spec: ModelSpec, dynamic_size: bool, min_size: int | None, max_size: int | None, opset: int, merge: int) -> DynamicSize | None:
    """``--dynamic-size`` and its bounds checked: default half to twice the model's size, at least 2 patches."""
    if not dynamic_size:
        if min_size is not None or max_size is not None:
            raise InputError("--min-size / --max-size bound a dynamic-size export", "add --dynamic-size, or use --img-size for one fixed size")
        return None
    if not isinstance(spec.model, VisionTransformer):
        raise ModelNotSupported(f"--dynamic-size needs a vitedge ViT (position table interpolated in the graph), not {type(spec.model).__name__}")
    if opset < 17:
        raise ModelNotSupported(f"--dynamic-size needs opset 17 or newer (got {opset}): the TorchScript exporter fixes the size", "use the default --opset 18")
    if merge:
        raise ModelNotSupported("--dynamic-size and --merge-tokens do not go together: token merging fixes the token count", "drop one of them")
    assert spec.config is not None  # a VisionTransformer always has its config
    p, target = spec.config.patch_size, min(spec.preprocessing.img_size)
    lo = min_size if min_size is not None else max(2 * p, target // 2 // p * p)
    hi = max_size if max_size is not None else 2 * target
    for flag, v in (("--min-size", lo), ("--max-size", hi)):
        if v % p:
            raise InputError(f"{flag} {v} is not a multiple of the patch size {p}", f"e.g. {flag} {max(2 * p, v // p * p)}")
    if not lo <= target <= hi:
        raise InputError(f"the model's size {target} is outside --min-size {lo} / --max-size {hi}", "the bounds must include it (or change --img-size)")
    return DynamicSize(lo, hi, p)


def _reason(exc: BaseException) -> str:
    """A short, one-line reason from an exporter exception (whose first line is often boilerplate)."""
    import re

    seen: list[BaseException] = []
    cause: BaseException | None = exc
    while cause is not None and len(seen) < 5:
        seen.append(cause)
        cause = cause.__cause__ or cause.__context__
    for e in reversed(seen):  # the root cause says most
        lines = [re.sub(r"\x1b\[[0-9;]*m", "", ln).strip() for ln in str(e).splitlines()]
        lines = [ln for ln in lines if ln]
        if lines:
            return f"{type(e).__name__}: {lines[0][:300]}"
    return type(seen[0]).__name__


class _quiet_torch_onnx:
    """The torch.onnx exporter logs progress lines at WARNING/INFO; keep the CLI readable."""

    def __enter__(self):
        self._levels = {}
        for name in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript"):
            lg = logging.getLogger(name)
            self._levels[name] = lg.level
            lg.setLevel(logging.ERROR)

    def __exit__(self, *exc):
        for name, lvl in self._levels.items():
            logging.getLogger(name).setLevel(lvl)


def _tensor_specs(model_proto) -> tuple[list[TensorSpec], list[TensorSpec]]:
    from onnx import helper

    def spec(v):
        dims = [d.dim_param or d.dim_value if (d.dim_param or d.dim_value) else "?" for d in v.type.tensor_type.shape.dim]
        return TensorSpec(v.name, dims, helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name)

    return [spec(v) for v in model_proto.graph.input], [spec(v) for v in model_proto.graph.output]


def embed_metadata(model_proto, manifest: Manifest) -> None:
    """Put the manifest essentials into the ONNX file itself (survives without the sidecar)."""
    essentials = {
        "model": manifest.model,
        "preprocessing": manifest.preprocessing,
        "labels": manifest.labels,
        "task": manifest.task,
        "precision": manifest.precision,
    }
    keep = [p for p in model_proto.metadata_props if p.key != "vitedge"]
    del model_proto.metadata_props[:]
    model_proto.metadata_props.extend(keep)
    entry = model_proto.metadata_props.add()
    entry.key, entry.value = "vitedge", json.dumps(essentials)


def ort_session(path: Path, threads: int | None = None):
    """An ONNX Runtime CPU session of an exported file, to check it (ONNX Runtime's default options)."""
    try:
        return session(path, threads=threads)
    except Exception as exc:  # onnxruntime raises its own exception types
        raise VitedgeError(f"ONNX Runtime cannot load {path}: {first_line(exc)}") from None


def _has_cls_only(model, wanted: bool) -> bool:
    return wanted and isinstance(model, VisionTransformer)


def _merge_setting(spec, merge_tokens, val_images, max_drop, opset: int, stage, every: int = 1, backend: str | None = None) -> tuple[int, int, object | None]:
    """``--merge-tokens`` / ``--merge-every`` resolved to ``(r, every)`` (``auto`` measures both), with the search when one ran."""
    auto = str(merge_tokens).strip().lower() == "auto"
    if every < 1:
        raise InputError(f"--merge-every {every} must be >= 1 (1: merge in every block)")
    if not auto:
        try:
            r = int(merge_tokens or 0)
        except (TypeError, ValueError):
            raise InputError(f"--merge-tokens must be a number of tokens or 'auto', got {merge_tokens!r}") from None
        if r < 0:
            raise InputError(f"--merge-tokens {r} must be >= 0")
        if max_drop is not None or val_images is not None or backend is not None:
            raise InputError("--max-drop / --val / --backend only apply to --merge-tokens auto", "use --merge-tokens auto, or drop them")
        if r == 0:
            return 0, 1, None
    elif every != 1:
        raise InputError("--merge-every is chosen by --merge-tokens auto", "drop --merge-every, or give a fixed --merge-tokens N")
    token_merging.check_mergeable(spec.model)
    if opset < 17:
        raise ModelNotSupported(f"token merging needs opset 17 or newer (got {opset})", "use the default --opset 18")
    if not auto:
        counts = token_merging.token_counts(spec.model, spec.preprocessing.img_size, r, every)
        if counts[-1] < 4:
            log.warning("--merge-tokens %d leaves %d token(s) for the last block: expect a large accuracy loss", r, counts[-1])
        return r, every, None
    if val_images is None:
        raise InputError(
            "--merge-tokens auto needs --val: a folder of held-out images to measure the top-1 drop on",
            "give one (class sub-folders for labels), or a fixed --merge-tokens N",
        )
    search = token_merging.choose_merge(
        spec,
        ImageSet.from_path(val_images),
        token_merging.DEFAULT_MAX_DROP if max_drop is None else max_drop,
        stage,
        backend=backend or "onnxruntime",
    )
    return search.r, search.every, search


def _graph_info(
    spec, cls_only: bool, merge: int, search, split_qkv: bool, sizes: DynamicSize | None = None, every: int = 1, picks: list[str] | None = None
) -> dict:
    """The manifest's ``model.graph``: how the exported graph differs from a plain forward pass."""
    info: dict[str, Any] = {"last_block": "cls_token_only" if _has_cls_only(spec.model, cls_only) else "all_tokens"}
    if sizes is not None:  # the bounds themselves are preprocessing's (dynamic_size): what every reader needs
        info["input_size"] = "dynamic (position table interpolated in the graph, bicubic)"
    if _has_cls_only(spec.model, True):
        info["qkv"] = "split" if split_qkv else "fused"
    if merge or search is not None:
        info["token_merging"] = describe(merge, token_counts(spec.model, spec.preprocessing.img_size, merge, every), search, every)
        if picks:
            info["token_merging"]["picks"] = picks  # tensors of the graph: tome.Matching per merge
    return info


def export_onnx(
    model: str | Path | torch.nn.Module | ModelSpec,
    output: str | Path,
    *,
    opset: int = DEFAULT_OPSET,
    batch: int | None = None,
    img_size: int | None = None,
    images: list[Path] | None = None,
    tolerance: Tolerance | None = None,
    on_stage: Callable[[str], None] | None = None,
    cls_only_last_block: bool = True,
    split_qkv: bool = True,
    merge_tokens: int | str = 0,
    merge_every: int = 1,
    val_images: str | Path | None = None,
    max_drop: float | None = None,
    backend: str | None = None,
    dynamic_size: bool = False,
    min_size: int | None = None,
    max_size: int | None = None,
) -> Artifact:
    """Export to ONNX and verify it.  ``batch=None`` means dynamic batch.

    ``cls_only_last_block``: the model's output reads the CLS token only, so the exported graph runs
    the last block's attention output projection, MLP and the final norm for that token alone (every
    token is still a key and a value).  Exact: the ONNX file is verified against the full PyTorch model.
    ``split_qkv``: the fused qkv projection is exported as three (query, key, value), each reshaped to heads
    on its own, so runtimes see the plain attention pattern (exact; ``benchmarks/exact_levers.md``).

    ``images`` are real images for the check (default: a few shipped ones when available; ``[]``
    for random inputs only).  ``on_stage`` is called with a short description of each step
    (the CLI shows it as a status line).

    ``merge_tokens``: token merging (ToMe, lossy and opt-in): ``r`` tokens merged in every ``merge_every``-th
    block but the last, so later blocks run on fewer tokens; the graph keeps static shapes and is verified
    against the PyTorch model with the same merging.  ``"auto"``: per schedule (every block, every other, every
    third) the largest ``r`` whose top-1 loss on ``val_images`` (a folder; class sub-folders give labels) is
    within ``max_drop`` points (default 0.5), then the one whose ``backend`` engine (default ``onnxruntime``)
    runs fastest, timed beside the unmerged engine - or no merging when none is faster; see
    :mod:`vitedge.token_merging`.

    ``dynamic_size``: the graph takes any height and width that is a multiple of the patch size, from
    ``min_size`` to ``max_size`` (default half to twice the model's size); the position table is interpolated
    in the graph (bicubic, CLS row kept), and the file is verified against PyTorch at several sizes, square and
    not (:meth:`~vitedge.preprocess.DynamicSize.check_sizes`).  The bounds go into the manifest's
    ``preprocessing.dynamic_size``; images then keep their aspect ratio (docs/resolution.md).

    Returns the :class:`~vitedge.artifact.Artifact` (it unpacks as ``path, manifest``); the manifest is
    written as ``<file name>.vitedge.json``.
    """
    stage = on_stage or (lambda text: None)
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ModelNotSupported(f"opset {opset} is not supported", f"choose an opset from {MIN_OPSET} to {MAX_OPSET} (default {DEFAULT_OPSET})")
    if batch is not None and batch < 1:
        raise VitedgeError(f"batch {batch} must be >= 1 (or 'dynamic')")
    output = Path(output)
    if output.suffix != ".onnx":
        raise VitedgeError(f"output {output} must end in .onnx")
    check_output(output)
    spec = load_model(model, img_size=img_size)  # a ModelSpec passes through (img_size still applies)
    if images is None:
        images = default_check_images()  # a few shipped real images, when available
    tolerance = tolerance or Tolerance()
    torch_model = spec.model.eval()
    bad = [name for name, t in torch_model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise VitedgeError(
            f"the model weights contain NaN/inf ({len(bad)} tensors, e.g. {bad[0]})", "the checkpoint is damaged or training diverged; nothing was exported"
        )
    merge, every, search = _merge_setting(spec, merge_tokens, val_images, max_drop, opset, stage, merge_every, backend)
    sizes = _size_range(spec, dynamic_size, min_size, max_size, opset, merge)
    preprocessing = replace(spec.preprocessing, dynamic_size=sizes)  # the spec may be the caller's: not edited
    h, w = spec.preprocessing.img_size
    c = spec.config.in_channels if spec.config else 3
    dummy = torch.zeros(batch or 2, c, h, w)
    n_bytes = sum(p.numel() * p.element_size() for p in torch_model.parameters())
    external = n_bytes > EXPORT_EXTERNAL_WEIGHT_BYTES

    stage("running PyTorch on the check inputs")
    inputs = _verification_inputs(spec, images, batch, sizes)
    refs, own_picks = {}, {}
    with torch.inference_mode(), graph_options(torch_model, merge=merge, merge_every=every):  # the reference merges tokens like the graph
        for k, v in inputs.items():
            with matching(Matching()) as m:
                refs[k] = torch_model(torch.from_numpy(v)).numpy()
            own_picks[k] = [p.numpy() for p in m.picked]
    pick_names = [f"{MATCH_PREFIX}{i}" for i in range(len(next(iter(own_picks.values()), [])))]
    if not all(np.isfinite(r).all() for r in refs.values()):
        raise VitedgeError("the PyTorch model itself produces NaN/inf on the verification inputs", "check the weights; nothing was exported")

    import onnx

    with writing(output) as draft:
        scratch, tmp = draft.scratch, draft.path
        stage(f"exporting with torch.onnx (opset {opset}" + (", external data)" if external else ")"))
        try:
            with torch.no_grad(), graph_options(torch_model, cls_only=cls_only_last_block, merge=merge, merge_every=every, split_qkv=split_qkv):
                traced = _WithPicks(torch_model) if pick_names else torch_model
                _torch_export(traced, dummy, tmp, opset, batch is None, external, sizes, pick_names)
        except Exception as exc:
            raise VitedgeError(f"torch.onnx.export failed: {_reason(exc)}", "try another --opset (below 17 uses the TorchScript exporter)") from None
        stage("onnx.checker")
        try:
            onnx.checker.check_model(str(tmp))  # path form handles external data / >2 GB
        except onnx.checker.ValidationError as exc:
            raise VitedgeError(f"exported ONNX fails onnx.checker: {first_line(exc, 1000)}") from None

        stage("verifying with ONNX Runtime against PyTorch")
        sess = ort_session(tmp)
        in_name = sess.get_inputs()[0].name
        checks = {}
        for key, x in inputs.items():
            out, *picks = sess.run(None, {in_name: x})
            ref = refs[key]
            if pick_names:  # token merging: PyTorch with the graph's own picks (a near-tie may be broken either way)
                with torch.inference_mode(), graph_options(torch_model, merge=merge, merge_every=every):
                    with matching(Matching(forced=[torch.from_numpy(np.asarray(p)) for p in picks])):
                        ref = torch_model(torch.from_numpy(x)).numpy()
            res = compare_outputs(ref, out)
            res["tolerance"] = tolerance.limit(ref)
            if pick_names:
                same = np.all([np.all(np.asarray(p) == q, axis=1) for p, q in zip(picks, own_picks[key], strict=True)], axis=0)
                res["picks_as_pytorch"] = round(float(np.mean(same)), 4)  # images whose every merge picked the same tokens
            res["passed"] = bool(res["finite"] and res["max_abs_error"] <= res["tolerance"])
            res["batch"] = int(x.shape[0])
            if sizes is not None:
                res["size"] = [int(x.shape[2]), int(x.shape[3])]
            checks[key] = res
        del sess
        failed = [k for k, r in checks.items() if not r["passed"]]
        if failed:
            r = checks[failed[0]]
            raise VitedgeError(
                f"ONNX output differs from PyTorch on {failed[0]} inputs: max abs error {r['max_abs_error']:.3g} > tolerance {r['tolerance']:.3g}",
                "try another --opset; report the model if it persists",
            )

        stage("writing the manifest")
        proto = onnx.load(str(tmp), load_external_data=False)
        for o in [o for o in proto.graph.output if o.name in pick_names]:  # the picks were for the check: tensors, not outputs
            proto.graph.output.remove(o)
        ins, outs = _tensor_specs(proto)
        manifest = Manifest(
            artifact=output.name,
            format="onnx",
            precision="fp32",
            backend=None,
            task=_task(spec, refs["random"]),
            model={**spec.model_info(), "graph": _graph_info(spec, cls_only_last_block, merge, search, split_qkv, sizes, every, pick_names)},
            preprocessing=preprocessing.to_dict(),
            labels=spec.labels,
            inputs=ins,
            outputs=outs,
            opset=opset,
            assumptions=list(spec.notes),
            verification={"reference": "pytorch-fp32", "checks": checks, "tolerance": {"atol": tolerance.atol, "rtol": tolerance.rtol}},
        )
        embed_metadata(proto, manifest)
        onnx.save(proto, str(tmp))  # external-data references are kept (load_external_data=False)
        artifact = draft.commit(manifest, sorted(p.name for p in scratch.iterdir()))
    return artifact
