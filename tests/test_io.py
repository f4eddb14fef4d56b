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
