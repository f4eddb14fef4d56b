"""ONNX files vitedge did not export: read what they say, assume the rest and say so."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import VitedgeError
from .manifest import Manifest, TensorSpec


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
