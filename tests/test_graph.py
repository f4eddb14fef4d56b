"""vitedge.graph: lookups, dead-node removal, bypass, Q/DQ edits and extra outputs, on real exported and
NNCF-quantized models, checked with ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from vitedge import graph
from vitedge.errors import VitedgeError
from vitedge.quantization.roles import graph_roles


def _copy(proto):
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    return out


def _run(proto, x, optimize: bool = True) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if not optimize:  # the graph exactly as written
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})


@pytest.fixture(scope="module")
def fp32(ref_onnx):
    return onnx.load(str(ref_onnx))


@pytest.fixture(scope="module")
def images(ref_onnx, calib_dir):
    """16 digit calibration images, preprocessed for the reference model."""
    import vitedge

    paths = sorted(p for p in calib_dir.rglob("*") if p.suffix.lower() in (".png", ".jpg"))[:16]
    with vitedge.load(ref_onnx) as e:
        return e.preprocessing.batch(paths)


@pytest.fixture(scope="module")
def quantized(fp32, images):
    """NNCF quantization of the reference model, cached per setting.  ``plain``: no SmoothQuant and no bias
    correction (the two steps that change float weights/biases); ``float_weights``: weights stay float behind
    Q/DQ pairs instead of being stored as int8."""
    import nncf
    from nncf.quantization.advanced_parameters import (
        AdvancedQuantizationParameters,
        AdvancedSmoothQuantParameters,
    )

    cache: dict = {}

    def make(ignored: tuple[str, ...] = (), plain: bool = False, float_weights: bool = False):
        key = (ignored, plain, float_weights)
        if key not in cache:
            kw: dict = {"backend_params": {"compress_weights": False}} if float_weights else {}
            if plain:
                kw.update(smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=-1), disable_bias_correction=True)
            name = fp32.graph.input[0].name
            data = nncf.Dataset([{name: images[i : i + 1]} for i in range(len(images))])
            cache[key] = nncf.quantize(
                _copy(fp32), data, model_type=nncf.ModelType.TRANSFORMER, preset=nncf.QuantizationPreset.MIXED,
                subset_size=len(images), ignored_scope=nncf.IgnoredScope(names=list(ignored)) if ignored else None,
                advanced_parameters=AdvancedQuantizationParameters(**kw))
        return _copy(cache[key])

    return make


# -- lookups and generic edits ----------------------------------------------------------------------------------------------
def test_producers_and_consumers_match_the_proto(fp32):
    """The def-use chains agree with the graph as written: every node input's producer writes it, every reader reads it."""
    producers, consumers = graph.name_maps(fp32)
    written = {o: n.name for n in fp32.graph.node for o in n.output}
    assert {t: n.name for t, n in producers.items()} == written
    for n in fp32.graph.node:
        for t in n.input:
            assert n.name in {c.name for c in consumers[t]}
    read = {t for n in fp32.graph.node for t in n.input}
    assert {t for t, c in consumers.items() if c} == read


def test_constant_behind_follows_dequantize_to_the_weight(fp32, quantized):
    """The weight behind a MatMul is found through DequantizeLinear: the roles of the quantized graph are the float one's."""
    assert graph_roles(quantized()) == graph_roles(fp32)
    model = graph.as_model(quantized())
    mm = next(n for n in model.graph if n.name == graph_roles(fp32).fc2[0])
    assert mm.inputs[1].producer().op_type == "DequantizeLinear"
    w = graph.constant_behind(mm.inputs[1])
    assert w.dtype.name == "INT8" and w.shape[0] >= 2 * w.shape[1]  # fc2: d_ff -> d_model, stored as int8
    assert graph.constant_behind(mm.inputs[0]) is None  # an activation


def test_dead_nodes_are_removed_and_bypass_rewires_readers(fp32, digit_batch):
    """A dead branch goes; an Identity bypassed leaves its readers on its input; outputs do not change."""
    from onnx import helper

    proto = _copy(fp32)
    x = digit_batch[:2]
    ref = _run(proto, x)
    first = proto.graph.node[0].output[0]
    proto.graph.node.extend([helper.make_node("Relu", [first], ["dead1"], name="dead_relu"),
                             helper.make_node("Neg", ["dead1"], ["dead2"], name="dead_neg")])
    assert graph.remove_dead(proto) == 2
    assert not {"dead_relu", "dead_neg"} & {n.name for n in proto.graph.node}

    model = graph.as_model(proto)
    softmax = next(n for n in model.graph if n.op_type == "Softmax")
    probs = softmax.outputs[0]
    readers = set(probs.consumers())
    ident = onnx_ir_node("Identity", [probs], "extra_identity")
    model.graph.insert_after(softmax, ident)
    graph.rewire(probs, ident.outputs[0], readers)
    assert set(ident.outputs[0].consumers()) == readers
    assert graph.bypass(ident)
    assert ident not in list(model.graph) and set(probs.consumers()) == readers
    assert not graph.bypass(model.graph.outputs[0].producer())  # a graph output keeps its producer
    for a, b in zip(ref, _run(graph.to_proto(model), x)):
        np.testing.assert_array_equal(a, b)


def onnx_ir_node(op: str, inputs, name: str):
    import onnx_ir as ir

    return ir.Node("", op, inputs, name=name)


def test_add_outputs_exposes_attention_probabilities(fp32, digit_batch):
    proto = _copy(fp32)
    probs = next(n.output[0] for n in proto.graph.node if n.op_type == "Softmax")
    n_out = len(proto.graph.output)
    assert graph.add_outputs(proto, [probs]) == [probs]
    assert graph.add_outputs(proto, [probs]) == []  # already an output
    assert [o.name for o in proto.graph.output][n_out:] == [probs]
    assert proto.graph.output[-1].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    outs = _run(proto, digit_batch[:3])
    np.testing.assert_array_equal(outs[0], _run(fp32, digit_batch[:3])[0])
    att = outs[-1]
    assert att.shape[0] == 3 and att.ndim == 4 and att.shape[-1] == att.shape[-2]  # (N, heads, tokens, tokens)
    np.testing.assert_allclose(att.sum(-1), 1.0, rtol=1e-5)
    with pytest.raises(VitedgeError, match="no value named"):
        graph.add_outputs(proto, ["no_such_tensor"])


# -- Q/DQ edits -------------------------------------------------------------------------------------------------------------
def test_dedicate_qdq_on_an_nncf_model_keeps_outputs_identical(quantized, images):
    """Every shared Q/DQ pair (q, k and v reading one LayerNorm output) gets one pair per reader; same numbers."""
    q = quantized()
    before = _run(q, images, optimize=False)
    n_q = [n.op_type for n in q.graph.node].count("QuantizeLinear")
    float_before = graph.float_ops(q)
    added = graph.dedicate_qdq(q)  # a ModelProto: edited in place
    assert added == 2 * len(graph_roles(q).blocks)  # q, k, v share one pair in each of the 4 blocks
    assert [n.op_type for n in q.graph.node].count("QuantizeLinear") == n_q + added
    onnx.checker.check_model(q)
    model = graph.as_model(q)
    for dq in (n for n in model.graph if n.op_type == "DequantizeLinear"):
        if dq.inputs[0].producer() is not None:  # an activation pair
            assert len(dq.outputs[0].consumers()) == 1 or any(c.op_type == "Shape" for c in dq.outputs[0].consumers())
    assert graph.float_ops(q) == float_before
    for a, b in zip(before, _run(q, images, optimize=False)):
        np.testing.assert_array_equal(a, b)
    assert graph.dedicate_qdq(q) == 0


def test_keep_float_on_attention_equals_nncf_ignored_scope(quantized, images, fp32):
    """Reverting Q·Kᵀ's Q/DQ gives what NNCF makes with that MatMul ignored (same data, NNCF defaults)."""
    op = graph_roles(fp32).attention[0]
    q = quantized()
    assert op not in graph.float_ops(q)
    assert graph.keep_float(q, [op]) == [op]
    assert op in graph.float_ops(q)
    ignored = quantized(ignored=(op,))
    assert sorted(n.op_type for n in q.graph.node) == sorted(n.op_type for n in ignored.graph.node)
    for a, b in zip(_run(q, images), _run(ignored, images)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_keep_float_on_weight_ops_equals_nncf_ignored_scope(quantized, images, fp32):
    """q (whose input pair k and v share) and fc2 reverted = NNCF with both ignored; k and v keep their pair."""
    roles = graph_roles(fp32)
    ops = (roles.blocks[0][0], roles.fc2[0])
    q = graph.as_model(quantized(plain=True, float_weights=True))
    k = next(n for n in q.graph if n.name == roles.blocks[0][1])
    shared = k.inputs[0]
    assert {n.name for n in shared.consumers()} >= {ops[0], roles.blocks[0][1]}
    assert graph.keep_float(q, reversed(ops)) == list(ops)  # graph order
    assert ops[0] not in {n.name for n in shared.consumers()} and k.inputs[0] is shared
    for name in ops:  # the float weight itself, no Q/DQ left on it
        node = next(n for n in q.graph if n.name == name)
        assert node.inputs[1].is_initializer() and node.inputs[1].const_value.dtype.name == "FLOAT"
    ignored = quantized(ignored=ops, plain=True, float_weights=True)
    for a, b in zip(_run(graph.to_proto(q), images), _run(ignored, images)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_keep_float_on_every_matrix_op_gives_the_fp32_outputs(quantized, images, fp32):
    q = quantized(plain=True, float_weights=True)
    ops = [n.name for n in q.graph.node if n.op_type in graph.MATRIX_OPS]
    already = graph.float_ops(q)
    assert already == graph_roles(fp32).attention[1::2]  # softmax·V: NNCF leaves it in float
    assert graph.keep_float(q, ops) == [n for n in ops if n not in already]
    assert sorted(graph.float_ops(q)) == sorted(ops)
    assert [n.op_type for n in q.graph.node].count("DequantizeLinear") <= 1  # only the input's pair read by a Shape may stay
    for a, b in zip(_run(q, images), _run(fp32, images)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_keep_float_refuses_integer_weights_and_unknown_names(quantized, fp32):
    q = quantized()  # NNCF's default: weights stored as int8 behind a DequantizeLinear only
    before = q.SerializeToString()
    with pytest.raises(VitedgeError, match="stored as integers"):
        graph.keep_float(q, [graph_roles(fp32).fc2[0]])
    with pytest.raises(VitedgeError, match="no node named"):
        graph.keep_float(q, ["nope"])
    assert q.SerializeToString() == before  # nothing changed


def test_qdq_scheme_and_float_ops(quantized, fp32):
    assert graph.qdq_scheme(quantized()) in ("U8S8", "S8S8")
    assert graph.qdq_scheme(fp32) == "S8 weights only"
    assert sorted(graph.float_ops(fp32)) == sorted(n.name for n in fp32.graph.node if n.op_type in graph.MATRIX_OPS)
    assert graph.float_ops(quantized()) == graph_roles(fp32).attention[1::2]  # NNCF leaves softmax·V in float


def test_keep_float_copies_a_shared_layout_op_for_the_reverted_op_only():
    """x -> Q/DQ -> Transpose read by two MatMuls: reverting one gives it float x through its own Transpose;
    the other keeps reading the quantized x."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = rng.standard_normal((2, 8, 5)).astype(np.float32)
    inits = [numpy_helper.from_array(np.array(0.05, np.float32), "s"), numpy_helper.from_array(np.array(0, np.uint8), "zp"),
             numpy_helper.from_array(w, "w")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq"], name="q"),
             helper.make_node("DequantizeLinear", ["xq", "s", "zp"], ["xd"], name="dq"),
             helper.make_node("Transpose", ["xd"], ["xt"], perm=[0, 2, 1], name="t"),
             helper.make_node("MatMul", ["xt", "w"], ["a"], name="mm_a"),
             helper.make_node("MatMul", ["xt", "w"], ["b"], name="mm_b")]
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 3, 5]) for n in ("a", "b")]
    g = helper.make_graph(nodes, "shared", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8, 3])], outs, inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)])
    x = rng.uniform(0, 10, (2, 8, 3)).astype(np.float32)
    _, b_before = _run(model, x)
    assert graph.keep_float(model, ["mm_a"]) == ["mm_a"]
    onnx.checker.check_model(model)
    a, b = _run(model, x)
    np.testing.assert_allclose(a, x.transpose(0, 2, 1) @ w, rtol=1e-5)  # float x
    np.testing.assert_array_equal(b, b_before)  # still quantized
    assert not np.allclose(b, a, rtol=1e-4)
    assert [n.op_type for n in model.graph.node].count("Transpose") == 2
