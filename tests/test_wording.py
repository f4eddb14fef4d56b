"""What a newcomer reads (issue 24): output that never wraps numbers, sizes and INT8 settings described truly,
close matches for mistyped names, and chart axes that reach every point."""

from __future__ import annotations

import re

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import vitedge
from vitedge.backends import registry
from vitedge.cli.main import main as cli
from vitedge.errors import FileProblem, VitedgeError
from vitedge.report import latency_svg
from vitedge.ui import err_console, size_change


def test_non_terminal_output_never_wraps(capsys):
    """Piped or logged output (not a terminal) keeps table cells and long lines whole."""
    res = CliRunner().invoke(cli, ["backends"])
    assert res.exit_code == 0, res.output
    row = next(line for line in res.stdout.splitlines() if "onnxruntime" in line)
    assert "int8, fp16, auto" in row, res.stdout  # at 80 columns the cell broke after "fp16,"
    line = "agreement with FP32 on 360 images: " + "x" * 120 + " cosine min 0.99020 mean 0.999100"
    err_console.print(line)  # a plain print, without soft_wrap
    assert line in capsys.readouterr().err


@pytest.mark.parametrize(
    "new,old,text",
    [(1_000, 3_600, "3.6x smaller than FP32"), (3_000, 1_000, "3.0x larger than FP32"), (1_010, 1_000, "about the size of FP32")],
)
def test_size_change_wording(new, old, text):
    assert size_change(new, old, "FP32") == text


def _conv_net(path):
    """A small classifier with no attention: Conv, ReLU, global pooling, a linear head."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w")
    fc = numpy_helper.from_array(rng.standard_normal((8, 5)).astype(np.float32), "fc")
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("MatMul", ["f", "fc"], ["logits"], name="head"),
    ]
    graph = helper.make_graph(
        nodes, "convnet", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 5])], [w, fc],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_attention_core_float_only_for_a_model_with_attention(tmp_path, ref_onnx):
    quantizer = registry.get("onnxruntime").quantization()
    assert "attention core float" in quantizer.base_config(ref_onnx).describe()  # a ViT: its attention core stays float
    conv = quantizer.base_config(_conv_net(tmp_path / "conv.onnx"))
    assert not conv.attention_float and "attention" not in conv.describe()


def test_close_matches_are_suggested(tmp_path):
    with pytest.raises(FileProblem, match="did you mean 'vit_small'"):
        vitedge.load_model("vit_smal")
    with pytest.raises(VitedgeError, match="unknown backend 'openvno' — did you mean 'openvino'"):
        registry.get("openvno")
    res = CliRunner().invoke(cli, ["compile", "x.onnx", "--backend", "openvno"])
    assert res.exit_code == 2 and "Did you mean 'openvino'?" in res.stderr, res.output
    res = CliRunner().invoke(cli, ["export", "vit_smal", "-o", str(tmp_path / "m.onnx")])
    assert res.exit_code == 2 and "did you mean 'vit_small'?" in res.stderr, res.output


def test_latency_axis_reaches_every_point():
    """A slow reference (a busy machine: ~2 s) beside fast engines: a labelled tick at or past the slowest point."""
    def model(name, role, samples):
        return {"name": name, "role": role, "latency": {"samples_ms": samples, "p50_ms": float(np.median(samples))}}

    models = [model("pytorch", "reference", list(np.linspace(1900, 2600, 50))), model("int8", "engine", list(np.linspace(9, 14, 50)))]
    svg = latency_svg(models)
    ticks = [float(t) for t in re.findall(r'text-anchor="middle">([0-9.e+-]+)</text>', svg)]
    dots = [float(x) for x in re.findall(r'<circle cx="([0-9.]+)"', svg)]
    tick_x = [float(x) for x in re.findall(r'<line x1="([0-9.]+)" y1="15"', svg)]
    assert max(ticks) >= 2600 and min(ticks) <= 9, ticks
    assert max(dots) <= max(tick_x) and min(dots) >= min(tick_x)
