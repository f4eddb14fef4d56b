"""ONNX files vitedge did not export: read what they say, assume the rest and say so."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import VitedgeError
from .manifest import Manifest, TensorSpec
from .preprocess import Preprocessing


def _specs(values) -> list[TensorSpec]:
    from onnx import helper

    out = []
    for v in values:
        t = v.type.tensor_type
        dims = [d.dim_value if d.dim_value else (d.dim_param or "?") for d in t.shape.dim]
        out.append(TensorSpec(v.name, dims, helper.tensor_dtype_to_np_dtype(t.elem_type).name if t.elem_type else "float32"))
    return out


def manifest_for_onnx(path: Path) -> Manifest:
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and others
        raise VitedgeError(f"{path} is not a readable ONNX file ({type(exc).__name__})", "check the file is complete") from None
    inits = {i.name for i in proto.graph.initializer}
    ins = [s for s in _specs(proto.graph.input) if s.name not in inits]
    outs = _specs(proto.graph.output)
    meta = {p.key: p.value for p in proto.metadata_props}
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    man = Manifest(artifact=path.name, format="onnx", inputs=ins, outputs=outs, opset=opset)
    if "vitedge" in meta:
        info = json.loads(meta["vitedge"])
        for k in ("model", "preprocessing", "labels", "task", "precision"):
            if info.get(k) is not None:
                setattr(man, k, info[k])
    else:
        out0 = outs[0].shape if outs else []
        man.task = "classification" if len(out0) == 2 else "features"
        man.model = {"family": "foreign", "source": str(path), "producer": f"{proto.producer_name} {proto.producer_version}".strip()}
        man.assumptions.append("no vitedge manifest: preprocessing unknown, pass it explicitly")
    return man


def preprocessing_from_options(
    *, img_size: int | None = None, mean=None, std=None, resize: int | None = None, crop: bool | None = None,
    interpolation: str | None = None, json_path: str | Path | None = None, input_shape: list | None = None,
) -> tuple["Preprocessing", list[str]]:
    """Preprocessing for a model without a manifest: from flags, a small JSON, and the ONNX input shape.

    Returns the preprocessing and the list of what had to be assumed (to be printed).
    JSON keys: img_size, resize, center_crop, interpolation, mean, std, scale, channel_order.
    """
    from .preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocessing, parse_floats

    given: dict = {}
    if json_path:
        try:
            given.update(json.loads(Path(json_path).read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise VitedgeError(f"preprocessing JSON {json_path} cannot be read ({exc})") from None
    for key, value in (("img_size", img_size), ("resize", resize), ("center_crop", crop), ("interpolation", interpolation)):
        if value is not None:
            given[key] = value
    if mean is not None:
        given["mean"] = parse_floats(mean, 3, "mean")
    if std is not None:
        given["std"] = parse_floats(std, 3, "std")
    assumed = []
    if "img_size" not in given:
        dims = [d for d in (input_shape or [])[2:4]]
        if len(dims) == 2 and all(isinstance(d, int) and d > 0 for d in dims):
            given["img_size"] = dims
        else:
            raise VitedgeError("the model's input size is dynamic and no preprocessing was given", "pass --img-size (and --mean/--std)")
    size = given["img_size"]
    side = size if isinstance(size, int) else min(size)
    if "mean" not in given:
        given["mean"] = IMAGENET_MEAN
        assumed.append("mean = ImageNet (0.485, 0.456, 0.406)")
    if "std" not in given:
        given["std"] = IMAGENET_STD
        assumed.append("std = ImageNet (0.229, 0.224, 0.225)")
    if "resize" not in given and "center_crop" not in given:
        given["resize"] = int(round(side / 0.875))
        given["center_crop"] = True
        assumed.append(f"resize shorter side to {given['resize']} then center-crop {side} (crop 0.875)")
    elif given.get("center_crop") is False and "resize" not in given:
        given["resize"] = None
    if "interpolation" not in given:
        given["interpolation"] = "bilinear"
        assumed.append("bilinear interpolation")
    known = set(Preprocessing.__dataclass_fields__)
    unknown = sorted(set(given) - known)
    if unknown:
        raise VitedgeError(f"unknown preprocessing keys {', '.join(unknown)}", f"use {', '.join(sorted(known - {'assumed'}))}")
    pre = Preprocessing(**given)
    pre.assumed = list(assumed)
    return pre, assumed


def ensure_manifest(path: str | Path, preprocessing: "Preprocessing | None" = None, labels: list[str] | None = None) -> tuple[Path, Manifest]:
    """The artifact and its manifest; for a foreign ONNX file, one is built from the file itself.

    ``preprocessing`` (e.g. from :func:`preprocessing_from_options`) and ``labels`` override or fill
    in what the file does not say.  Nothing is written here.
    """
    artifact, man = Manifest.find(path)
    if man is None:
        if artifact.suffix != ".onnx":
            raise VitedgeError(f"{artifact} has no vitedge manifest", "only ONNX files can be used without one")
        man = manifest_for_onnx(artifact)
        if preprocessing is None and not man.preprocessing:
            preprocessing, _ = preprocessing_from_options(input_shape=man.inputs[0].shape if man.inputs else None)
    if preprocessing is not None:
        man.preprocessing = preprocessing.to_dict()
        man.assumptions = [a for a in man.assumptions if not a.startswith("no vitedge manifest")]
        man.assumptions.extend(f"preprocessing assumed: {a}" for a in preprocessing.assumed)
    if labels is not None:
        man.labels = list(labels)
    if not man.files:
        from ._io import sha256_file

        man.files = {artifact.name: sha256_file(artifact)}
    return artifact, man
