"""Which matrix op of a ViT graph is what: patch embedding, encoder blocks (Q/K/V, attention core, output
projection, fc1, fc2), head - found from weights and data flow, not names, so ONNX files vitedge did not export
(timm, transformers, torch.onnx) work too.  The INT8 search reverts these groups to float
(:func:`structural_groups`); NNCF and TensorRT's placement keep some of them float by rule.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..backends.onnxruntime import onnx_precision_breakdown


@dataclass
class GraphRoles:
    """Names of the matrix ops of a ViT graph, by the part of the network they belong to."""

    patch_embed: list[str] = field(default_factory=list)
    blocks: list[list[str]] = field(default_factory=list)  # weight MatMuls of each encoder block, in order
    fc2: list[str] = field(default_factory=list)
    attention: list[str] = field(default_factory=list)  # MatMuls of two activations (Q·Kᵀ, softmax·V)
    head: list[str] = field(default_factory=list)
    token_merging: list[str] = field(default_factory=list)  # ToMe similarity MatMuls: always float (they pick tokens)
    # matrix ops that never see the image's values, only its size: a dynamic-size graph resampling its position table
    # (vitedge's two bicubic weight products); always float, and no part of a block
    position: list[str] = field(default_factory=list)

    def group(self, name: str) -> list[str]:
        if name == "patch_embed":
            return self.patch_embed
        if name == "first_block":
            return self.blocks[0] if self.blocks else []
        if name == "last_block":
            return self.blocks[-1] if self.blocks else []
        if name == "fc2":
            return self.fc2
        raise KeyError(name)


def graph_roles(model) -> GraphRoles:
    """Find the patch embedding, the encoder blocks, each block's fc2 and the attention core in an ONNX graph.

    A weight MatMul/Gemm whose input width is at least twice its output width is an MLP's second layer
    (fc2); the fc2s close the encoder blocks, so everything between two fc2s is one block.  A Conv
    before the first block is the patch embedding; weight ops after the last fc2 are the head.
    """
    from ..graph import MATRIX_OPS, as_model, constant_behind, node_name

    roles = GraphRoles()
    ops: list[tuple[str, str, int | None, int | None]] = []  # (name, op type, input width, output width)
    graph = as_model(model).graph
    seen = {id(v) for v in graph.inputs}  # values the image's pixels reach (not through its shape)
    for n in graph:
        if n.op_type not in ("Shape", "Size") and any(v is not None and id(v) in seen for v in n.inputs):
            seen.update(id(v) for v in n.outputs)
        if n.op_type not in MATRIX_OPS:
            continue
        if not any(v is not None and id(v) in seen for v in n.inputs):
            roles.position.append(node_name(n))
            continue
        w = constant_behind(n.inputs[1]) if len(n.inputs) > 1 else None
        if w is None:
            if n.op_type == "MatMul" and constant_behind(n.inputs[0]) is None:
                # token merging's similarity (read by the max/argmax of the matching), else the attention core
                merging = any(r.op_type in ("ReduceMax", "ArgMax", "TopK") for r in n.outputs[0].consumers())
                (roles.token_merging if merging else roles.attention).append(node_name(n))
            continue
        dims = list(w.shape)
        if len(dims) != 2:
            ops.append((node_name(n), n.op_type, None, None))
            continue
        trans_b = n.op_type == "Gemm" and bool(n.attributes.get_int("transB"))
        k, m = (dims[1], dims[0]) if trans_b else (dims[0], dims[1])
        ops.append((node_name(n), n.op_type, k, m))
    widths = [m for *_, m in ops if m]
    d_model = max(set(widths), key=widths.count) if widths else None  # the residual width: most MatMuls write it
    current: list[str] = []
    for name, op_type, k, m in ops:
        if op_type == "Conv" and not roles.blocks and not current:
            roles.patch_embed.append(name)
            continue
        current.append(name)
        if k and m and m == d_model and k >= 2 * m:  # fc2: d_ff -> d_model closes a block
            roles.fc2.append(name)
            roles.blocks.append(current)
            current = []
    roles.head = current if roles.blocks else []
    return roles


@dataclass(frozen=True)
class Group:
    """Matrix ops that go back to float together, with their share of the model's multiply-adds."""

    name: str
    ops: tuple[str, ...]
    share: float
    block: int | None = None  # the encoder block it belongs to


def merge(groups: list[Group], name: str) -> Group:
    """One group of all of ``groups``' ops (e.g. a whole block)."""
    return Group(name, tuple(o for g in groups for o in g.ops), sum(g.share for g in groups), groups[0].block if groups else None)


def structural_groups(roles: GraphRoles, macs: dict[str, int]) -> list[Group]:
    """Per block: Q/K/V projections, attention core, output projection, fc1, fc2 (a block's weight ops are in that
    order: the last three are proj, fc1, fc2); then the patch embedding and the head.  Shares are of all matrix ops."""
    total = float(sum(macs.values())) or 1.0

    def group(name: str, ops: list[str], block: int | None = None) -> Group | None:
        ops = [o for o in ops if o]
        return Group(name, tuple(ops), sum(macs.get(o, 0) for o in ops) / total, block) if ops else None

    attn = roles.attention
    per_block_attn = len(attn) == 2 * len(roles.blocks)
    out: list[Group | None] = [group("patch embedding", roles.patch_embed)]
    for b, ops in enumerate(roles.blocks):
        core = attn[2 * b : 2 * b + 2] if per_block_attn else []
        if len(ops) >= 4:
            parts = [("q/k/v", ops[:-3]), ("attention core", core), ("attention out", [ops[-3]]), ("fc1", [ops[-2]]), ("fc2", [ops[-1]])]
        else:
            parts = [("attention core", core)] + [(f"op {i}", [o]) for i, o in enumerate(ops)]
        out += [group(f"block {b} {what}", o, b) for what, o in parts]
    if attn and not per_block_attn:
        out.append(group("attention core", attn))
    out.append(group("head", roles.head))
    return [g for g in out if g is not None]


def matrix_macs(source: Path) -> dict[str, int]:
    """Multiply-adds of every matrix op of the FP32 ONNX model, by node name."""
    info = onnx_precision_breakdown(source) or {"layers": []}
    return {layer["name"]: int(layer["macs"]) for layer in info["layers"]}
