"""File helpers in vitedge._io."""

def test_onnx_external_data_threshold(tmp_path, monkeypatch):
    """One threshold decides when an ONNX model's weights go to a .data file beside it."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    import vitedge._io as io

    w = numpy_helper.from_array(np.ones((64, 64), np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 64])], [w])
    proto = helper.make_model(graph)
    io.save_onnx(proto, tmp_path / "small.onnx")
    assert not io.needs_external_data(proto) and not io.needs_external_data(tmp_path / "small.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small.onnx"]
    monkeypatch.setattr(io, "EXTERNAL_DATA_BYTES", 1000)  # 16 kB of weights is now "big"
    io.save_onnx(proto, tmp_path / "big.onnx")
    assert (tmp_path / "big.onnx.data").exists() and io.needs_external_data(tmp_path / "big.onnx")
    np.testing.assert_array_equal(numpy_helper.to_array(onnx.load(str(tmp_path / "big.onnx")).graph.initializer[0]), np.ones((64, 64)))


def test_one_definition_of_quantized():
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    from vitedge._onnx import INTEGER_KERNEL_OPS, QDQ_OPS, QUANTIZED_OPS, onnx_precision, quantized_ops

    def model(nodes, inits, dtype=onnx.TensorProto.FLOAT):
        vi = [helper.make_tensor_value_info("x", dtype, [1, 4]), helper.make_tensor_value_info("y", dtype, [1, 4])]
        return helper.make_model(helper.make_graph(nodes, "g", vi[:1], vi[1:], inits))

    w32 = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    fp32 = model([helper.make_node("MatMul", ["x", "w"], ["y"])], [w32])
    fp16 = model([helper.make_node("MatMul", ["x", "w"], ["y"])], [numpy_helper.from_array(np.ones((4, 4), np.float16), "w")],
                 onnx.TensorProto.FLOAT16)
    qdq = model([helper.make_node("QuantizeLinear", ["x", "s"], ["q"]), helper.make_node("DequantizeLinear", ["q", "s"], ["d"]),
                 helper.make_node("MatMul", ["d", "w"], ["y"])], [w32, numpy_helper.from_array(np.float32(0.1), "s")])
    assert [onnx_precision(m) for m in (fp32, fp16, qdq)] == ["fp32", "fp16", "int8"]
    assert quantized_ops(fp32) == set() and quantized_ops(qdq) == {"QuantizeLinear", "DequantizeLinear"}
    assert QDQ_OPS <= QUANTIZED_OPS and INTEGER_KERNEL_OPS <= QUANTIZED_OPS and not QDQ_OPS & INTEGER_KERNEL_OPS
