"""One engine, many sizes: `vitedge export --dynamic-size` on a tiny ViT (64 px, patch 16; bounds 32..128).

The exported graph, its ONNX Runtime and OpenVINO engines and a compiled OpenVINO engine are run at square
and non-square sizes against the PyTorch model; preprocessing keeps the aspect ratio; sizes outside the
bounds and options that do not go together are refused with one line.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from test_tensorrt import _keep_scratch_onnx, fake_gpu  # noqa: F401  (fixture)

import vitedge
from vitedge import export_onnx, load_model
from vitedge.backends.tensorrt import compute_profile, size_profile
from vitedge.cli.main import main as cli
from vitedge.compilation import compile_model
from vitedge.data import ImageSet
from vitedge.errors import InputError, ModelNotSupported, ShapeMismatch, VitedgeError
from vitedge.manifest import Manifest
from vitedge.models.loading import save_checkpoint
from vitedge.preprocess import DynamicSize, Preprocessing
from vitedge.quantization import Target, quantize
from vitedge.quantization.calibration import EvalSet, StreamingBatches, size_key, size_mix
from vitedge.quantization.fidelity import _to_npy
from vitedge.validation import EngineSpec, validate

SIZES = [(64, 64), (48, 80), (96, 64)]  # the export's size, portrait-ish and landscape-ish


@pytest.fixture(scope="module")
def spec():
    torch.manual_seed(0)
    model = vitedge.VisionTransformer(img_size=64, patch_size=16, num_classes=7, d_model=64, num_heads=2, num_layers=2, d_ff=128, dropout=0.0)
    with torch.no_grad():  # a position table far from zero, so that a wrong interpolation shows
        model.pos_embed.normal_(0, 1.0)
    return load_model(model.eval())


@pytest.fixture(scope="module")
def dyn_onnx(tmp_path_factory, spec):
    """The tiny ViT saved as a checkpoint and exported by the CLI with --dynamic-size and explicit bounds."""
    folder = tmp_path_factory.mktemp("dyn")
    ckpt = save_checkpoint(spec, folder / "tiny.safetensors")
    out = folder / "tiny.onnx"
    res = CliRunner().invoke(cli, ["export", str(ckpt), "-o", str(out), "--dynamic-size", "--min-size", "32", "--max-size", "128"])
    assert res.exit_code == 0, res.output
    assert "verified on random 48x80 inputs" in res.output
    assert "dynamic size: any height and width from 32 to 128, multiples of 16" in res.output
    return out


def _torch(spec, x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return spec.model(torch.from_numpy(x)).numpy()


def test_manifest_records_bounds_and_dynamic_input(dyn_onnx):
    man = json.loads((dyn_onnx.parent / "tiny.onnx.vitedge.json").read_text())
    assert man["preprocessing"]["dynamic_size"] == {"min": 32, "max": 128, "multiple": 16}
    assert man["inputs"][0]["shape"] == ["batch", 3, "height", "width"]
    assert man["model"]["graph"]["input_size"].startswith("dynamic")
    checks = man["verification"]["checks"]
    sizes = {tuple(c["size"]) for c in checks.values()}
    assert {(64, 64), (48, 80), (96, 64), (32, 32), (128, 128)} <= sizes  # square, non-square and both bounds
    assert all(c["passed"] for c in checks.values())
    assert Manifest.find(dyn_onnx)[1].dynamic_size == DynamicSize(32, 128, 16)


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_engines_match_pytorch_at_several_sizes(dyn_onnx, spec, backend):
    rng = np.random.default_rng(1)
    options = {"config": {"INFERENCE_PRECISION_HINT": "f32"}} if backend == "openvino" else {}
    with vitedge.load(dyn_onnx, backend=backend, **options) as eng:
        for h, w in SIZES:
            x = rng.standard_normal((2, 3, h, w)).astype(np.float32)
            ref = _torch(spec, x)
            out = eng.infer(x)
            assert out.shape == ref.shape
            assert np.abs(out - ref).max() <= 1e-4 + 1e-3 * np.abs(ref).max(), (backend, h, w)


def test_fixed_size_graph_would_be_wrong(spec):
    """What the in-graph interpolation buys: the model's output at 48x80 differs from any fixed-size
    computation that ignores the position table's size (so the test above can fail)."""
    x = np.random.default_rng(2).standard_normal((1, 3, 48, 80)).astype(np.float32)
    ref = _torch(spec, x)
    with torch.inference_mode():
        pos = spec.model.interpolate_pos_embed(3, 5)
        assert pos.shape == (1, 16, 64)
        spec.model.pos_embed.data, saved = torch.zeros_like(spec.model.pos_embed), spec.model.pos_embed.data.clone()
        try:
            other = spec.model(torch.from_numpy(x)).numpy()
        finally:
            spec.model.pos_embed.data = saved
    assert np.abs(other - ref).max() > 1e-2


@pytest.mark.parametrize(("target", "name"), [("openvino", "tiny.ov.xml"), ("onnxruntime", "tiny.ort.onnx")])
def test_compiled_engine_at_static_batch_runs_any_size_in_bounds(dyn_onnx, spec, tmp_path, target, name):
    """compile's static batch 1 (latency) fixes the batch only: height and width stay free (OpenVINO reshape, ONNX set_static_batch)."""
    path, man = compile_model(dyn_onnx, tmp_path / name, target=target, precision_hint="f32" if target == "openvino" else None)
    assert man.dynamic_size == DynamicSize(32, 128, 16)
    assert man.inputs[0].shape == [1, 3, "height", "width"]
    assert {tuple(k.split()[1].split("x")) for k in man.verification["checks"] if " " in k} >= {("48", "80"), ("96", "64")}
    x = np.random.default_rng(3).standard_normal((3, 3, 96, 64)).astype(np.float32)
    with vitedge.load(path) as eng:
        out = eng.infer(x)
    ref = _torch(spec, x)
    assert np.abs(out - ref).max() <= 1e-3 + 1e-2 * np.abs(ref).max()


@pytest.mark.parametrize("shape", [(1, 3, 144, 64), (1, 3, 16, 64), (1, 3, 64, 56)])
def test_out_of_bounds_size_is_one_line_error(dyn_onnx, shape):
    with vitedge.load(dyn_onnx) as eng, pytest.raises(ShapeMismatch) as err:
        eng.infer(np.zeros(shape, np.float32))
    assert "\n" not in str(err.value) and "32 to 128, multiples of 16" in str(err.value)


def test_preprocessing_keeps_aspect_ratio():
    sizes = DynamicSize(32, 128, 16)
    assert sizes.fit(400, 300, 64) == (64, 80)  # landscape: short side (height) to 64, width 85 rounded to 80
    assert sizes.fit(300, 600, 64) == (128, 64)  # portrait 1:2
    assert sizes.fit(1000, 100, 64) == (32, 128)  # too elongated: the long side capped, the short side clamped
    pre = Preprocessing(img_size=(64, 64), dynamic_size={"min": 32, "max": 128, "multiple": 16})
    images = [Image.new("RGB", (400, 300), "red"), Image.new("RGB", (300, 600), "blue"), Image.new("RGB", (800, 600), "green")]
    groups = pre.batches(images)
    assert [(idx, x.shape) for idx, x in groups] == [([0, 2], (2, 3, 64, 80)), ([1], (1, 3, 128, 64))]
    with pytest.raises(ShapeMismatch):
        pre.batch(images)  # two sizes cannot make one batch
    assert Preprocessing.from_dict(pre.to_dict()) == pre  # the bounds survive the manifest
    assert "dynamic_size" not in Preprocessing(img_size=(64, 64)).to_dict()  # fixed-size manifests are unchanged
    assert pre.at(48, 80).batch(images[:1]).shape == (1, 3, 48, 80)
    assert pre.fixed().batch(images).shape == (3, 3, 64, 64) and pre.fixed().dynamic_size is None  # one size for any images


def test_predict_per_image_size_and_given_size(dyn_onnx, spec, tmp_path):
    files = []
    for i, (w, h) in enumerate([(400, 300), (300, 600), (64, 64)]):
        arr = np.random.default_rng(i).integers(0, 255, (h, w, 3), dtype=np.uint8)
        files.append(tmp_path / f"im{i}.png")
        Image.fromarray(arr).save(files[-1])
    with vitedge.load(dyn_onnx) as eng:
        preds = eng.predict(files, top_k=7)
        pre = eng.preprocessing
        for f, p in zip(files, preds, strict=True):  # each image run alone at its own size gives the same answer
            x = pre.batch([f])
            assert p.indices[0] == int(_torch(spec, x).argmax())
        fixed = eng.predict(files, top_k=1, size=(48, 80))
        assert [p.indices[0] for p in fixed] == [int(v) for v in _torch(spec, pre.at(48, 80).batch(files)).argmax(1)]
    res = CliRunner().invoke(cli, ["predict", str(dyn_onnx), str(files[0]), "--size", "48x80", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)[0]["top"][0]["index"] == fixed[0].indices[0]
    res = CliRunner().invoke(cli, ["predict", str(dyn_onnx), str(files[0]), "--size", "48x"])
    assert res.exit_code != 0 and "HEIGHTxWIDTH" in res.output


def test_bad_options_are_refused(spec, tmp_path):
    out = tmp_path / "x.onnx"
    with pytest.raises(InputError, match="--dynamic-size"):
        export_onnx(spec, out, min_size=32)
    with pytest.raises(InputError, match="multiple of the patch size 16"):
        export_onnx(spec, out, dynamic_size=True, min_size=40)
    with pytest.raises(InputError, match="outside"):
        export_onnx(spec, out, dynamic_size=True, min_size=80)
    with pytest.raises(ModelNotSupported, match="opset 17"):
        export_onnx(spec, out, dynamic_size=True, opset=14)
    with pytest.raises(ModelNotSupported, match="merge-tokens"):
        export_onnx(spec, out, dynamic_size=True, merge_tokens=1)
    with pytest.raises(VitedgeError, match="2 patches"):
        DynamicSize(16, 64, 16)
    assert not out.exists()


MIX = ["64x64", "48x80", "96x64", "32x32", "128x128"]  # the sizes export verified at: its own, portrait, landscape, bounds


@pytest.mark.parametrize("backend,suffix", [("onnxruntime", ".onnx"), ("openvino", ".xml")])
def test_int8_is_calibrated_on_the_size_mix_and_held_to_the_target_at_each_size(dyn_onnx, tmp_path, calib_dir, backend, suffix):
    out = tmp_path / f"q{suffix}"
    path, man = quantize(dyn_onnx, out, precision="int8", backend=backend, calib=calib_dir, target=Target(agreement=0.5), search_budget=0)
    assert man.quantization["calibration"]["sizes"] == MIX
    agreement = man.verification["agreement"]
    assert list(agreement["per_size"]) == MIX
    assert {m["images"] for m in agreement["per_size"].values()} == {man.verification["images"]}  # every image at every size
    worst = min(agreement["per_size"].values(), key=lambda m: (m["top1_agreement"], m["cosine_min"]))
    assert agreement["size"] in MIX and agreement["top1_agreement"] == worst["top1_agreement"]
    table = (tmp_path / f"q{suffix}.fidelity.md").read_text()
    assert "## The chosen candidate at each input size" in table and "| 128x128 |" in table
    # where the written file looks against the FP32 model, in the manifest and the search's table
    maps = man.verification["attention"]
    assert maps["kind"] == "rollout" and maps["size"] == "64x64" and maps["images"] == len(maps["per_image"]) == man.verification["images"]
    assert 0.9 < maps["correlation"]["min"] <= maps["correlation"]["median"] <= 1.0
    assert man.quantization["fidelity"]["attention"]["correlation"] == maps["correlation"]
    assert "## Where the chosen candidate looks" in table
    assert json.loads((tmp_path / f"q{suffix}.fidelity.json").read_text())["attention"]["images"] == maps["images"]
    assert man.dynamic_size == DynamicSize(32, 128, 16)
    rng = np.random.default_rng(3)
    with vitedge.load(path, backend=backend) as q, vitedge.load(dyn_onnx) as ref:
        for h, w in SIZES + [(32, 128)]:
            x = rng.standard_normal((2, 3, h, w)).astype(np.float32)
            a, b = q.infer(x), ref.infer(x)
            cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
            assert a.shape == (2, 7) and cos.min() > 0.99, (h, w, cos)


def test_the_worst_size_decides_the_target(calib_dir):
    """Pooled over sizes, one flipped image out of 100 is 99 % agreement; at its size it is 95 %: the target misses."""
    pre = Preprocessing(img_size=(64, 64), dynamic_size=DynamicSize(32, 128, 16))
    sizes = size_mix(pre)
    assert list(map(size_key, sizes)) == MIX
    ev = EvalSet(ImageSet.from_path(calib_dir).sample(20), pre, "test", None, ["batch", 3, "height", "width"], sizes=sizes)
    assert [tuple(x.shape[2:]) for x in ev.parts_arrays()] == sizes and len(ev) == 20
    ref = np.eye(7, dtype=np.float32)[np.arange(100) % 7] * 5
    ev._ref_outputs, ev._ref = {"logits": ref}, ref
    out = ref.copy()
    out[3 * 20 + 4] = np.roll(out[3 * 20 + 4], 1)  # one image flips at the 4th size (32x32)
    m = ev.measure(out)
    assert m["size"] == "32x32" and m["top1_agreement"] == pytest.approx(0.95) and m["images"] == 20
    assert m["per_size"]["64x64"]["top1_agreement"] == 1.0
    assert not Target(agreement=0.98).check(m, True, None)


def test_calibration_takes_the_sizes_in_turn_and_is_stored_per_size(calib_dir, tmp_path):
    pre = Preprocessing(img_size=(64, 64), dynamic_size=DynamicSize(32, 128, 16))
    ims = ImageSet.from_path(calib_dir).sample(23)
    stream = StreamingBatches(ims, pre, 4, min_count=1, sizes=size_mix(pre))
    shapes = [tuple(b.shape[2:]) for b in stream]
    assert len(shapes) == len(stream) and sorted(set(shapes)) == sorted(size_mix(pre))
    files = _to_npy(tmp_path / "calib.npy", stream)
    assert [f.split(".")[-2] for f in files] == MIX
    assert [len(np.load(f)) for f in files] == [5, 5, 5, 4, 4]  # image i at size i mod 5


def test_int8_refuses_arrays_of_one_size_for_a_dynamic_size_export(dyn_onnx, tmp_path):
    arrays = tmp_path / "calib.npy"
    np.save(arrays, np.random.default_rng(0).standard_normal((40, 3, 64, 64)).astype(np.float32))
    with pytest.raises(ModelNotSupported) as err:
        quantize(dyn_onnx, tmp_path / "q.onnx", precision="int8", calib=arrays)
    assert "dynamic-size" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "q.onnx").exists()


def test_tensorrt_profile_covers_the_bounds(dyn_onnx):
    man = Manifest.find(dyn_onnx)[1]
    assert size_profile(man) == (32, 64, 128)
    shapes = compute_profile(["batch", 3, "height", "width"], img_size=size_profile(man), profile="1,1,4")
    assert shapes == {"min": (1, 3, 32, 32), "opt": (1, 3, 64, 64), "max": (4, 3, 128, 128)}
    assert size_profile(man, "48,64,96") == (48, 64, 96)
    with pytest.raises(ShapeMismatch):
        size_profile(man, "32,64,256")  # beyond the export's bounds: the graph was not verified there


def test_tensorrt_compile_against_the_fake_builds_one_profile_over_the_bounds(dyn_onnx, fake_gpu, monkeypatch, tmp_path):  # noqa: F811 (fixture)
    """compile -t tensorrt against the fake TensorRT/CUDA of test_tensorrt.py (its "GPU" is ONNX Runtime running
    the ONNX the parser was given): the profile spans the export's bounds, and compile's verification runs the
    engine at the square, non-square and bound sizes."""
    trt, seen = fake_gpu(version="10.7.0")
    _keep_scratch_onnx(monkeypatch, seen, tmp_path)
    path, man = compile_model(dyn_onnx, tmp_path / "e.engine", target="tensorrt", batch="dynamic", profile="1,2,4")
    assert seen["profile"][1:] == ((1, 3, 32, 32), (2, 3, 64, 64), (4, 3, 128, 128))
    assert man.compile["profile"] == {"min": [1, 3, 32, 32], "opt": [2, 3, 64, 64], "max": [4, 3, 128, 128]}
    checks = man.verification["checks"]
    assert {"random 48x80", "random 96x64", "random 32x32", "random 128x128"} <= set(checks)
    assert all(r["cosine_min"] > 0.99 for r in checks.values())
    with pytest.raises(ShapeMismatch, match="outside this dynamic-size"):
        compile_model(dyn_onnx, tmp_path / "f.engine", target="tensorrt", img_size="32,64,256")


@pytest.fixture(scope="module")
def mixed_photos(tmp_path_factory):
    """Unlabelled images of three aspect ratios."""
    folder = tmp_path_factory.mktemp("mixed")
    for i, (w, h) in enumerate([(400, 300), (300, 600), (64, 64), (500, 320), (240, 320), (90, 60)]):
        Image.fromarray(np.random.default_rng(10 + i).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"im{i}.png")
    return folder


@pytest.mark.parametrize("size", [None, "48x80"])
def test_validate_feeds_one_size_and_the_pytorch_reference_follows(dyn_onnx, mixed_photos, spec, tmp_path, size):
    ckpt = dyn_onnx.parent / "tiny.safetensors"
    rep = validate(
        EngineSpec(dyn_onnx, "openvino", {"config": {"INFERENCE_PRECISION_HINT": "f32"}}),
        ckpt,
        data=mixed_photos,
        batch_sizes=(1,),
        size=size,
        time_budget=0.05,
        rounds=1,
        warmup=1,
        min_runs=2,
        out_dir=tmp_path / "rep",
    )
    vs = rep.engines[0]["vs_reference"]
    assert vs["top1_agreement"] == 1.0 and vs["cosine_min"] > 0.9999  # the reference (PyTorch) saw the same pixels
    findings = rep.data["findings"]
    if size is None:
        assert any("fed at its size 64x64" in f for f in findings)
    else:
        assert rep.data["settings"]["size"] == [48, 80] and any("at 48x80 (--size)" in f for f in findings)
    for bad, says in (("512x80", "outside this dynamic-size"), ("50x80", "not a multiple of the patch size 16")):
        res = CliRunner().invoke(cli, ["validate", str(dyn_onnx), "--reference", str(ckpt), "--val", str(mixed_photos), "--size", bad])
        assert res.exit_code != 0 and says in res.output, res.output


def test_validate_several_sizes_writes_a_report_per_size_and_a_summary(dyn_onnx, mixed_photos, tmp_path):
    ckpt = dyn_onnx.parent / "tiny.safetensors"
    out = tmp_path / "rep"
    args = ["validate", str(dyn_onnx), "--reference", str(ckpt), "--val", str(mixed_photos), "--size", "48x80,64x64", "-o", str(out)]
    res = CliRunner().invoke(cli, args + ["--batch-sizes", "1", "--rounds", "1", "--runs", "2"])
    assert res.exit_code == 0, res.output
    for key in ("48x80", "64x64"):
        rep = json.loads((out / key / "report.json").read_text())
        assert rep["settings"]["size"] == [int(v) for v in key.split("x")]
        assert rep["models"][1]["vs_reference"]["top1_agreement"] == 1.0
    summary = (out / "sizes.md").read_text()
    assert "## 48x80" in summary and "## 64x64" in summary and "speed-up" in summary
    assert set(json.loads((out / "sizes.json").read_text())) == {"48x80", "64x64"}


def test_attention_maps_follow_the_input_size(dyn_onnx):
    """engine.attention on a dynamic-size engine: the maps have the patch grid of the size the image was fed at."""
    image = Image.fromarray(np.random.default_rng(5).integers(0, 255, (300, 400, 3), dtype=np.uint8))
    with vitedge.load(dyn_onnx) as eng:
        assert eng.attention([image], kind="rollout").shape == (1, 4, 5)  # 300x400 -> 64x80 -> 4x5 patches
        assert eng.attention(eng.preprocessing.at(96, 64).batch([image]), kind="cls").shape[-2:] == (6, 4)


def test_calibration_memory_is_estimated_at_the_largest_size(dyn_onnx):
    """NNCF gets every matrix op's input back per calibration item: a dynamic-size model is sized at its largest size."""
    from vitedge.quantization import candidates

    small, large = (candidates._matrix_input_bytes(str(dyn_onnx), hw=hw) for hw in ((32, 32), (128, 128)))
    assert small and large and large > 10 * small  # 65 tokens vs 5, and attention grows with their square


@pytest.mark.parametrize("side", [14, 37])
def test_bicubic_weights_resample_as_torch_interpolate(side):
    """The position table is resampled by two weight products (a graph Resize costs ONNX Runtime milliseconds per
    inference); they give F.interpolate's bicubic, up and down, square or not."""
    import torch.nn.functional as F

    from vitedge.models.vit import bicubic_weights

    table = torch.randn(1, 32, side, side, generator=torch.Generator().manual_seed(side))
    for gh, gw in [(side, side), (18, 18), (7, 7), (12, 20), (40, 31)]:
        want = F.interpolate(table, size=(gh, gw), mode="bicubic", align_corners=False)[0]
        got = torch.einsum("hi,dij,wj->dhw", bicubic_weights(side, gh), table[0], bicubic_weights(side, gw))
        assert torch.allclose(got, want, atol=5e-5), (gh, gw, float((got - want).abs().max()))


def test_position_resampling_is_no_block_and_stays_float(dyn_onnx):
    """The two products that resample the position table never see the image's values: graph_roles sets them apart
    (not an attention core, not part of block 0), and INT8 keeps them float."""
    import onnx

    from vitedge.quantization.nncf_int8 import Int8Config, float_names
    from vitedge.quantization.roles import graph_roles
    from vitedge.quantization.tensorrt_qdq import tensorrt_float_nodes

    roles = graph_roles(onnx.load(str(dyn_onnx)))
    assert len(roles.position) == 2 and len(roles.attention) == 4 and len(roles.blocks) == 2 and roles.patch_embed
    assert not set(roles.position) & {op for block in roles.blocks for op in block}
    assert set(roles.position) <= set(float_names(Int8Config(), roles))
    assert tensorrt_float_nodes(dyn_onnx)["position"] == roles.position


@pytest.mark.parametrize("batch", [None, 2])
def test_linear_layers_become_gemms_for_onnx_runtime(dyn_onnx, batch):
    """On a symbolic token count the exporter writes MatMul + Add, whose bias ONNX Runtime adds separately; the
    compile-time rewrite gives 2-D Gemms with the bias inside, the same numbers at any size (and batch)."""
    import onnx
    import onnxruntime as ort

    from vitedge.graph import gemm_linears

    proto = onnx.load(str(dyn_onnx))
    before = sum(n.op_type == "Gemm" for n in proto.graph.node)
    assert gemm_linears(proto, batch) == 12  # q, k, v, projection, fc1, fc2 of 2 blocks
    onnx.checker.check_model(proto)
    assert sum(n.op_type == "Gemm" for n in proto.graph.node) == before + 12
    plain = ort.InferenceSession(str(dyn_onnx), providers=["CPUExecutionProvider"])
    gemm = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(5)
    for h, w in SIZES + [(128, 32)]:
        x = {"pixel_values": rng.standard_normal((batch or 3, 3, h, w)).astype(np.float32)}
        np.testing.assert_allclose(gemm.run(None, x)[0], plain.run(None, x)[0], atol=1e-5)
    assert gemm_linears(proto, batch) == 0  # nothing left to rewrite
