"""ONNX files vitedge did not export: read what they say, assume the rest and say so.

A ViT ONNX made by transformers, timm, the TorchScript-based ``torch.onnx.export`` (opset 13-14,
LayerNorm decomposed into ReduceMean/Pow/Sqrt/Div) or anything else has no vitedge manifest.
:func:`ensure_manifest` builds one from the file itself:

* input and output names and shapes (fixed or dynamic batch, any names);
* the task: ``classification`` when the first output is ``(batch, classes)``, else ``features``
  (e.g. a dense token map ``(batch, tokens, dim)``); every output is compared with FP32 on its own;
* the preprocessing: from flags / a small JSON (:func:`preprocessing_from_options`), else the
  input size read from the file with the default rule of :mod:`vitedge.preprocessing_resolver`
  (crop_pct 0.875, bicubic, ImageNet mean/std) - every assumed value is recorded in the
  manifest's ``assumptions`` and printed.

A dynamic-size input without ``--img-size`` is an error: there is nothing to assume it from.
"""

from __future__ import annotations

import json
from pathlib import Path

from ._io import sha256_file
from .errors import FileProblem, ShapeMismatch, VitedgeError
from .manifest import Manifest, TensorSpec
from .preprocess import Preprocessing
from .preprocessing_resolver import resolve_preprocessing, sources_from_json
from .ui import note

FOREIGN_FAMILY = "foreign"
_FEATURE_NAMES = ("hidden", "token", "feature", "embed", "pooler", "map", "patch", "dense")


def _specs(values) -> list[TensorSpec]:
    from onnx import helper

    out = []
    for v in values:
        t = v.type.tensor_type
        dims = [d.dim_value if d.dim_value else (d.dim_param or "?") for d in t.shape.dim]
        out.append(TensorSpec(v.name, dims, helper.tensor_dtype_to_np_dtype(t.elem_type).name if t.elem_type else "float32"))
    return out


def _shape(spec: TensorSpec) -> str:
    return "(" + ", ".join(str(d) for d in spec.shape) + ")"


def _guess_task(outs: list[TensorSpec]) -> tuple[str, str]:
    """(task, why) from the output shapes and names."""
    if not outs:
        return "features", "the model declares no outputs"
    first = outs[0]
    rank = len(first.shape)
    named_like_features = any(k in first.name.lower() for k in _FEATURE_NAMES)
    if rank == 2 and not named_like_features:
        return "classification", f"task classification: output {first.name!r} {_shape(first)} read as class logits"
    why = f"rank {rank}" if rank != 2 else f"its name {first.name!r}"
    return "features", f"task features: output {first.name!r} {_shape(first)} is not class logits ({why}); agreement is measured per output"


def _layer_norm(ops: set[str]) -> str:
    if "LayerNormalization" in ops:
        return "LayerNormalization"
    if {"ReduceMean", "Sqrt"} <= ops:
        return "decomposed (ReduceMean/Pow/Sqrt/Div)"
    return "none found"


def is_foreign(manifest: Manifest | None) -> bool:
    """True for a manifest vitedge built from a file it did not export (or a child of one)."""
    return manifest is not None and (manifest.model or {}).get("family") == FOREIGN_FAMILY


def manifest_for_onnx(path: Path) -> Manifest:
    """A manifest from what an ONNX file says (vitedge metadata if embedded, else shapes and names)."""
    import onnx

    path = Path(path)
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and others
        raise FileProblem(f"{path} is not a readable ONNX file ({type(exc).__name__})", "check the file is complete") from None
    if not proto.graph.node:
        raise FileProblem(f"{path} is not a readable ONNX file (empty graph)", "check the file is complete")
    inits = {i.name for i in proto.graph.initializer}
    ins = [s for s in _specs(proto.graph.input) if s.name not in inits]
    outs = _specs(proto.graph.output)
    if not ins:
        raise VitedgeError(f"{path.name} declares no inputs", "is it a complete model?")
    meta = {p.key: p.value for p in proto.metadata_props}
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    man = Manifest(artifact=path.name, format="onnx", inputs=ins, outputs=outs, opset=opset)
    info = None
    if "vitedge" in meta:
        try:
            info = json.loads(meta["vitedge"])
        except json.JSONDecodeError:
            info = None
    if isinstance(info, dict):
        for k in ("model", "preprocessing", "labels", "task", "precision"):
            if info.get(k) is not None:
                setattr(man, k, info[k])
        return man
    ops = {n.op_type for n in proto.graph.node}
    man.task, why = _guess_task(outs)
    man.model = {
        "family": FOREIGN_FAMILY,
        "source": str(path.resolve()),
        "producer": f"{proto.producer_name} {proto.producer_version}".strip() or "unknown",
        "opset": opset,
        "layer_norm": _layer_norm(ops),
    }
    man.assumptions.append(why)
    if man.task == "classification":
        man.assumptions.append("no labels: classes are named by their index")
    return man


def preprocessing_from_options(
    *,
    img_size: int | None = None,
    mean=None,
    std=None,
    resize: int | None = None,
    crop: bool | None = None,
    interpolation: str | None = None,
    json_path: str | Path | None = None,
    input_shape: list | None = None,
) -> tuple[Preprocessing, list[str]]:
    """Preprocessing for a model without a manifest: from flags, a small JSON, and the ONNX input shape.

    Resolved by :func:`vitedge.preprocessing_resolver.resolve_preprocessing` (flags override the
    JSON; what nothing states follows the default rule).  Returns the preprocessing and the list of
    what had to be assumed.  JSON: ``img_size, resize, center_crop, interpolation, mean, std, scale,
    channel_order`` - or a Hugging Face ``preprocessor_config.json`` / timm data config, read as
    those libraries would.
    """
    sources: dict = {}
    if json_path:
        sources, _ = sources_from_json(json_path)
    hw = list((input_shape or [])[2:4])
    fixed_hw = tuple(hw) if len(hw) == 2 and all(isinstance(d, int) and d > 0 for d in hw) else None
    flags = {"img_size": img_size, "resize": resize, "center_crop": crop, "interpolation": interpolation, "mean": mean, "std": std}
    try:
        pre = resolve_preprocessing(fixed_hw, **sources, flags=flags)
    except VitedgeError as exc:
        if "input size is not known" in str(exc):
            raise VitedgeError("the model's input size is dynamic and no preprocessing was given", "pass --img-size (and --mean/--std)") from None
        raise
    if fixed_hw is not None and tuple(pre.img_size) != fixed_hw:
        size = pre.img_size
        raise ShapeMismatch(
            f"preprocessing makes {size[0]}x{size[1]} images but the model takes {fixed_hw[0]}x{fixed_hw[1]}",
            f"use --img-size {fixed_hw[0]}" if fixed_hw[0] == fixed_hw[1] else "match the model's input size",
        )
    return pre, list(pre.assumed)


_OPTION_KEYS = ("img_size", "mean", "std", "resize", "crop", "interpolation", "json_path")


def resolve_options(given, input_shape: list | None) -> Preprocessing | None:
    """A :class:`Preprocessing` from what a caller gave: one itself, a dict of
    :func:`preprocessing_from_options` keywords (``img_size, mean, std, resize, crop, interpolation,
    json_path``; resolved against the model's input shape), a JSON file path, or None."""
    if given is None or isinstance(given, Preprocessing):
        return given
    if isinstance(given, (str, Path)):
        given = {"json_path": given}
    if not isinstance(given, dict):
        raise VitedgeError(f"preprocessing {type(given).__name__} is not understood", "pass a Preprocessing, a dict of options or a JSON file")
    opts = dict(given)
    if "center_crop" in opts:
        opts["crop"] = opts.pop("center_crop")
    unknown = sorted(set(opts) - set(_OPTION_KEYS))
    if unknown:
        raise VitedgeError(f"unknown preprocessing options {', '.join(unknown)}", f"use {', '.join(_OPTION_KEYS)}")
    pre, _ = preprocessing_from_options(**{k: v for k, v in opts.items() if v is not None}, input_shape=input_shape)
    return pre


def check_input_size(man: Manifest, pre: Preprocessing, artifact: Path) -> None:
    """A one-line error when ``pre`` makes images of another size than the artifact's fixed input."""
    hw = man.inputs[0].shape[2:4] if man.inputs else []
    if len(hw) == 2 and all(isinstance(d, int) and d > 0 for d in hw) and tuple(hw) != tuple(pre.img_size):
        raise ShapeMismatch(
            f"preprocessing makes {pre.img_size[0]}x{pre.img_size[1]} images but {artifact.name} takes {hw[0]}x{hw[1]}",
            f"use --img-size {hw[0]}" if hw[0] == hw[1] else "match the model's input size",
        )


def _same(stored: dict, pre: Preprocessing) -> bool:
    a, b = Preprocessing.from_dict(stored).to_dict(), pre.to_dict()
    a.pop("assumed", None), b.pop("assumed", None)
    return a == b


def describe(man: Manifest, artifact: Path) -> list[str]:
    """Lines saying what vitedge read from a foreign file and what it assumed (for printing)."""
    ins = ", ".join(f"{s.name!r} {_shape(s)}" for s in man.inputs)
    outs = ", ".join(f"{s.name!r} {_shape(s)}" for s in man.outputs)
    m = man.model or {}
    lines = [
        (
            f"{artifact.name} has no vitedge manifest: input {ins}; output{'s' if len(man.outputs) > 1 else ''} {outs} "
            f"({m.get('producer', '?')}, opset {m.get('opset', '?')}, LayerNorm {m.get('layer_norm', '?')})"
        )
    ]
    batch = man.inputs[0].shape[0] if man.inputs and man.inputs[0].shape else None
    if isinstance(batch, int) and batch > 0:
        lines.append(f"{artifact.name} has a fixed batch of {batch}: other batch sizes run in chunks of {batch}")
    lines += [f"assumed {a}" for a in man.assumptions]
    return lines


def ensure_manifest(
    path: str | Path,
    preprocessing: Preprocessing | dict | str | Path | None = None,
    labels: list[str] | None = None,
    *,
    announce: bool = True,
    require_preprocessing: bool = True,
    hash_file: bool = True,
) -> tuple[Path, Manifest]:
    """The artifact and its manifest; for a foreign ONNX file, one is built from the file itself.

    ``preprocessing`` (a :class:`Preprocessing`, or options for :func:`resolve_options`, e.g.
    from the CLI flags) and ``labels`` fill in what a
    file without a manifest does not say; for an artifact that has a manifest they are an error
    (its manifest already says how it is fed).  Without ``preprocessing`` a fixed-size model gets
    ImageNet-style defaults at its input size (listed as assumptions); a dynamic-size one raises a
    one-line error, or (``require_preprocessing=False``) is left without preprocessing.
    ``announce`` prints what was read and assumed.  Nothing is written here.
    """
    artifact, man = Manifest.find(path)
    if not artifact.exists():
        raise FileProblem(f"artifact {artifact} named by the manifest does not exist")
    if isinstance(preprocessing, dict) and not any(v is not None for v in preprocessing.values()):
        preprocessing = None
    if man is not None:
        if preprocessing is not None and man.preprocessing and not isinstance(preprocessing, Preprocessing):
            raise VitedgeError(
                f"{artifact.name} has a vitedge manifest with its own preprocessing", "drop the preprocessing flags: they are for ONNX files without a manifest"
            )
        preprocessing = resolve_options(preprocessing, man.inputs[0].shape if man.inputs else None)
        if preprocessing is not None and man.preprocessing and not _same(man.preprocessing, preprocessing):
            raise VitedgeError(
                f"{artifact.name} has a vitedge manifest with its own preprocessing", "drop the preprocessing flags: they are for ONNX files without a manifest"
            )
        if preprocessing is not None and not man.preprocessing:
            check_input_size(man, preprocessing, artifact)
            man.preprocessing = preprocessing.to_dict()
            man.assumptions.extend(f"preprocessing {a}" for a in preprocessing.assumed)
        if labels is not None:
            man.labels = list(labels)
        return artifact, man
    if artifact.suffix.lower() != ".onnx":
        raise VitedgeError(f"{artifact} has no vitedge manifest ({Manifest.sidecar_path(artifact).name})", "only ONNX files can be used without one")
    man = manifest_for_onnx(artifact)
    preprocessing = resolve_options(preprocessing, man.inputs[0].shape)
    if man.preprocessing and preprocessing is not None:  # embedded vitedge metadata (copied file without its sidecar)
        if not _same(man.preprocessing, preprocessing):
            raise VitedgeError(
                f"{artifact.name} carries vitedge metadata with its own preprocessing",
                "drop the preprocessing flags: they are for ONNX files without a manifest",
            )
    if not man.preprocessing:
        if preprocessing is None:
            shape = man.inputs[0].shape if man.inputs else None
            try:
                preprocessing, _ = preprocessing_from_options(input_shape=shape)
            except VitedgeError:
                if require_preprocessing:
                    raise VitedgeError(
                        f"{artifact.name} has a dynamic input size {_shape(man.inputs[0])} and no vitedge manifest",
                        "pass --img-size (and --mean/--std, or --preprocessing FILE)",
                    ) from None
                preprocessing = None
        if preprocessing is not None:
            check_input_size(man, preprocessing, artifact)
            man.preprocessing = preprocessing.to_dict()
            man.assumptions.extend(f"preprocessing {a}" for a in preprocessing.assumed)
    if labels is not None:
        man.labels = list(labels)
        man.assumptions = [a for a in man.assumptions if not a.startswith("no labels")]
    if labels is not None and man.outputs and len(man.outputs[0].shape) == 2:
        n = man.outputs[0].shape[1]
        if isinstance(n, int) and n != len(labels):
            raise VitedgeError(f"{len(labels)} labels given but {artifact.name} outputs {n} classes")
    if hash_file and not man.files:
        man.files = {artifact.name: sha256_file(artifact)}
    if announce:
        for line in describe(man, artifact):
            note(line)
    return artifact, man


__all__ = ["manifest_for_onnx", "preprocessing_from_options", "resolve_options", "ensure_manifest", "is_foreign", "describe", "check_input_size"]
