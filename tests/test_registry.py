"""The backend registry: one module plus one registration adds a backend everywhere.

``toy_backend`` (next to this file) is such a module.  Importing it registers the backend; every
place that offers a choice of backends must then offer it, and must not offer it where the toy
cannot do the job (it does not quantize).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from vitedge import load
from vitedge.backends import registry
from vitedge.benchmarking import candidates
from vitedge.cli import main as cli
from vitedge.compilation import compile_model
from vitedge.errors import VitedgeError
from vitedge.manifest import Manifest
from vitedge.recipes import load_recipe


@pytest.fixture()
def toy():
    import toy_backend  # noqa: F401  (registers on import)

    registry.register(toy_backend.BACKEND)  # a previous test may have unregistered it
    yield toy_backend.BACKEND
    registry.unregister("toy")


def test_builtin_backends_and_capabilities():
    assert registry.names()[:3] == ["onnxruntime", "openvino", "tensorrt"]
    assert registry.for_file("m.xml").name == "openvino" and registry.for_file("m.blob").name == "openvino"
    assert registry.for_file("m.onnx").name == "onnxruntime" and registry.for_file("m.plan").name == "tensorrt"
    assert registry.for_file("m.txt") is None
    with pytest.raises(VitedgeError, match="unknown backend 'nope'.*onnxruntime"):
        registry.get("nope")


def test_toy_backend_appears_everywhere(toy, ref_onnx, tmp_path, val_dir):
    runner = CliRunner()
    # listed, with what it can do
    res = runner.invoke(cli, ["backends", "--json"])
    rows = {r["name"]: r for r in json.loads(res.output)}
    assert rows["toy"]["available"] and rows["toy"]["runs"] == [".toy"] and rows["toy"]["quantize"] == ["fp16"]
    # compile: the CLI choice, the default name, the backend's own option, verification through vitedge.load
    res = runner.invoke(cli, ["compile", str(ref_onnx), "--backend", "toy", "-o", str(tmp_path / "m.toy")])
    assert res.exit_code == 0, res.output
    path = tmp_path / "m.toy"
    out, man = compile_model(ref_onnx, tmp_path / "n.toy", target="toy", shout="hi")
    assert man.backend == "toy" and man.format == "toy" and man.compile["shout"] == "hi"
    assert man.verification["checks"]["random"]["cosine_min"] > 0.9999
    with pytest.raises(VitedgeError, match="--shout is an option of toy, not onnxruntime"):
        compile_model(ref_onnx, tmp_path / "x.onnx", target="onnxruntime", shout="hi")
    # the runtime opens it by suffix and by manifest, and the CLI runs it
    with load(path) as eng:
        assert type(eng).__name__ == "ToyEngine"
        with load(ref_onnx) as ref:
            x = np.random.default_rng(0).standard_normal((2, *ref.input_shape[1:])).astype(np.float32)
            np.testing.assert_allclose(eng.infer(x), ref.infer(x), rtol=1e-4, atol=1e-4)
    res = runner.invoke(cli, ["predict", str(path), str(val_dir), "--json", "-k", "1"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(cli, ["predict", str(ref_onnx), str(val_dir), "--json", "-k", "1", "--backend", "toy"])
    assert res.exit_code == 0, res.output
    # benchmark candidates and recipes
    assert [c.name for c in candidates(["toy"])] == ["toy fp32"]
    assert "toy fp32" in [c.name for c in candidates()]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"name": "r", "model": "preset:vit_tiny", "steps": {"export": {}, "compile": {"backend": "toy"}}}))
    assert load_recipe(recipe).data["steps"]["compile"]["backend"] == "toy"
    # quantize goes through the toy's own strategy (FP16 only), measured against FP32 like every backend's file
    res = runner.invoke(cli, ["quantize", str(ref_onnx), "--fp16", "--backend", "toy", "-o", str(tmp_path / "q.onnx")])
    assert res.exit_code == 0, res.output
    man = Manifest.find(tmp_path / "q.onnx")[1]
    assert man.backend == "toy" and man.precision == "fp16" and man.quantization["tool"].startswith("toy:")
    assert man.verification["engine"] == "onnxruntime" and man.verification["agreement"]["top1_agreement"] >= 0.99
    # ... and not where it cannot do the job
    res = runner.invoke(cli, ["quantize", str(ref_onnx), "--int8", "--backend", "toy", "-o", str(tmp_path / "q8.onnx")])
    assert res.exit_code == 2 and "no int8 quantization" in res.output and not (tmp_path / "q8.onnx").exists()
    steps = {"export": {}, "quantize": {"precision": "fp16", "backend": "toy"}}
    recipe.write_text(yaml.safe_dump({"name": "r", "model": "preset:vit_tiny", "steps": steps}))
    assert load_recipe(recipe).data["steps"]["quantize"]["backend"] == "toy"
    steps["quantize"]["backend"] = "toyy"
    recipe.write_text(yaml.safe_dump({"name": "r", "model": "preset:vit_tiny", "steps": steps}))
    with pytest.raises(VitedgeError, match="backend"):
        load_recipe(recipe)


def test_unregistered_backend_is_gone(toy, tmp_path):
    registry.unregister("toy")
    assert "toy" not in registry.names()
    res = CliRunner().invoke(cli, ["compile", "x.onnx", "--backend", "toy"])
    assert res.exit_code == 2 and "'toy' is not one of" in res.output


def test_pytorch_is_a_backend_like_the_others(ref_spec, ref_onnx, val_dir):
    """A checkpoint opens as the FP32 reference engine, through the same load() and predict()."""
    from vitedge.data import list_images

    assert "pytorch" in registry.names("run") and "pytorch" not in registry.names("compile")
    images = list_images(val_dir)[:8]
    with load(ref_onnx) as onnx_eng, load("reference", backend="pytorch") as torch_eng:
        assert type(torch_eng).__name__ == "PyTorchEngine" and torch_eng.backend == "pytorch"
        a = [p.indices[0] for p in onnx_eng.predict(images, top_k=1)]
        b = [p.indices[0] for p in torch_eng.predict(images, top_k=1)]
        assert a == b
    res = CliRunner().invoke(cli, ["predict", "reference", str(images[0]), "--backend", "pytorch", "--json", "-k", "1"])
    assert res.exit_code == 0, res.output
