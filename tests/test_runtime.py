"""The runtime: `vitedge.load` for every artifact kind, predict/infer, batching, threads, closing, errors."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import vitedge
from vitedge.cli.main import main as cli
from vitedge.compilation import compile_model
from vitedge.errors import FileProblem, VitedgeError
from vitedge.manifest import Manifest


@pytest.fixture(scope="module")
def compiled(tmp_path_factory, ref_onnx):
    d = tmp_path_factory.mktemp("rt")
    ort_path, _ = compile_model(ref_onnx, d / "e.ort.onnx", target="onnxruntime")
    ov_path, _ = compile_model(ref_onnx, d / "e.ov.xml", target="openvino", export_blob=True, precision_hint="f32")
    ov_dyn, _ = compile_model(ref_onnx, d / "d.ov.xml", target="openvino", batch="dynamic", hint="throughput", precision_hint="f32")
    return {"onnx": ref_onnx, "ort": ort_path, "ov": ov_path, "blob": d / "e.ov.blob", "ov_dyn": ov_dyn}


@pytest.fixture(scope="module")
def images(digit_images):
    return digit_images


@pytest.fixture(scope="module")
def batch(digit_batch):
    return digit_batch


@pytest.mark.parametrize("kind,backend", [("onnx", "onnxruntime"), ("ort", "onnxruntime"), ("ov", "openvino"), ("blob", "openvino"),
                                          ("ov_dyn", "openvino")])
def test_every_artifact_loads_and_agrees(compiled, batch, kind, backend):
    with vitedge.load(compiled["onnx"]) as ref:
        want = ref.infer(batch)
    with vitedge.load(compiled[kind]) as eng:
        assert eng.backend == backend
        got = eng.infer(batch)
    assert got.shape == (10, 10)
    np.testing.assert_allclose(got, want, atol=2e-3)
    assert (got.argmax(1) == np.arange(10)).mean() >= 0.9  # one image per class, classes in order


def test_load_by_manifest_and_bundle_folder(tmp_path, compiled, batch):
    # a bundle: engine files + engine.vitedge.json in one folder
    src = compiled["ov"]
    for name in (src.name, src.with_suffix(".bin").name):
        shutil.copy(src.parent / name, tmp_path / name)
    man = Manifest.load(Manifest.sidecar_path(src))
    (tmp_path / "engine.vitedge.json").write_text(json.dumps(man.to_dict()))
    with vitedge.load(tmp_path) as a, vitedge.load(Manifest.sidecar_path(src)) as b:
        np.testing.assert_allclose(a.infer(batch), b.infer(batch), atol=1e-5)
    with vitedge.load(compiled["onnx"], backend="openvino") as c:  # another backend than the file's own
        assert c.backend == "openvino" and c.infer(batch[:2]).shape == (2, 10)


def test_predict_accepts_paths_pil_and_uint8(compiled, images):
    with vitedge.load(compiled["ort"]) as eng:
        from_paths = eng.predict(images, top_k=3)
        pil = [Image.open(p).convert("RGB") for p in images]
        from_pil = eng.predict(pil, top_k=3)
        from_arrays = eng.predict([np.asarray(im) for im in pil], top_k=3)
        single = eng.predict(images[4])
    assert [p.labels[0] for p in from_paths] == [str(c) for c in range(10)]
    for a, b, c in zip(from_paths, from_pil, from_arrays):
        assert a.indices == b.indices == c.indices and np.allclose(a.probs, c.probs)
        assert len(a.labels) == 3 and a.probs == sorted(a.probs, reverse=True) and 0 < sum(a.probs) <= 1 + 1e-6
    assert len(single) == 1 and len(single[0].labels) == 5 and single[0].labels[0] == "4"


@pytest.mark.parametrize("kind", ["ort", "ov"])
@pytest.mark.parametrize("n", [1, 3, 10])
def test_fixed_batch_engine_serves_any_batch(compiled, batch, kind, n):
    with vitedge.load(compiled[kind]) as eng, vitedge.load(compiled["ov_dyn" if kind == "ov" else "onnx"]) as dyn:
        assert eng.fixed_batch == 1 and dyn.fixed_batch is None
        np.testing.assert_allclose(eng.infer(batch[:n]), dyn.infer(batch[:n]), atol=1e-4)


def test_padding_of_a_fixed_batch_4_engine(tmp_path, ref_onnx, batch):
    path, _ = compile_model(ref_onnx, tmp_path / "b4.onnx", target="onnxruntime", batch=4)
    with vitedge.load(path) as eng, vitedge.load(ref_onnx) as ref:
        assert eng.fixed_batch == 4
        for n in (1, 4, 6, 9):  # 6 = 4 + 2 padded, 9 = 4 + 4 + 1 padded
            got = eng.infer(batch[:n])
            assert got.shape == (n, 10)
            np.testing.assert_allclose(got, ref.infer(batch[:n]), atol=1e-4)


@pytest.mark.parametrize("kind", ["ort", "ov", "ov_dyn"])
def test_concurrent_callers_get_their_own_results(compiled, batch, kind):
    with vitedge.load(compiled[kind]) as eng:
        want = [eng.infer(batch[i : i + 1 + i % 3]) for i in range(8)]
        errors, mismatches = [], []

        def worker(tid):
            try:
                for r in range(15):
                    i = (tid + r) % 8
                    if not np.allclose(eng.infer(batch[i : i + 1 + i % 3]), want[i], atol=1e-5):
                        mismatches.append((tid, i))
            except Exception as exc:  # surfaced below
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(t,)) for t in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors and not mismatches


@pytest.mark.parametrize("kind", ["ort", "ov", "blob"])
def test_close_and_context_manager(compiled, batch, kind):
    eng = vitedge.load(compiled[kind])
    eng.infer(batch[:1])
    eng.close()
    eng.close()  # idempotent
    with pytest.raises(VitedgeError, match="closed"):
        eng.infer(batch[:1])
    with vitedge.load(compiled[kind]) as e2:
        e2.infer(batch[:1])
    assert e2._closed
    with pytest.raises(VitedgeError, match="closed"):
        e2.predict(np.zeros((64, 64, 3), np.uint8))


def test_wrong_inputs_are_one_line_errors(compiled, batch):
    with vitedge.load(compiled["ort"]) as eng:
        for bad in (np.zeros((1, 3, 32, 32), np.float32), np.zeros((64, 64), np.float32), np.zeros((1, 1, 3, 64, 64), np.float32)):
            with pytest.raises(VitedgeError) as ei:
                eng.infer(bad)
            assert "\n" not in str(ei.value)
        with pytest.raises(VitedgeError, match="is not an image"):
            eng.predict(np.zeros((64, 64, 3), np.float32))
        with pytest.raises(FileProblem):
            eng.predict(["no/such/image.png"])


@pytest.mark.parametrize("suffix", [".onnx", ".xml", ".blob"])
def test_corrupt_engine_file(tmp_path, compiled, suffix):
    src = {".onnx": compiled["ort"], ".xml": compiled["ov"], ".blob": compiled["blob"]}[suffix]
    bad = tmp_path / f"bad{suffix}"
    bad.write_bytes(b"\x00garbage" * 100)
    if suffix == ".xml":
        (tmp_path / "bad.bin").write_bytes(b"\x00" * 10)
    man = Manifest.find(src)[1]
    man.artifact = bad.name
    man.save(bad)
    with pytest.raises(VitedgeError) as ei:
        vitedge.load(bad)
    msg = str(ei.value)
    if suffix == ".blob":  # the IR's manifest: it records no size for a blob of this name
        assert "\n" not in msg and "cannot load" in msg and bad.name in msg
    else:  # named before the runtime's parser sees it
        assert "\n" not in msg and f"{bad.name} is truncated: 800 of {src.stat().st_size:,} bytes" in msg


def test_load_errors(tmp_path):
    with pytest.raises(FileProblem):
        vitedge.load(tmp_path / "none.onnx")
    (tmp_path / "x.xml").write_text("<net/>")
    with pytest.raises(VitedgeError, match="no vitedge manifest"):
        vitedge.load(tmp_path / "x.xml")


def test_predict_cli_errors(compiled, tmp_path):
    r = CliRunner().invoke(cli, ["predict", str(compiled["ort"]), str(tmp_path / "missing.png")])
    assert r.exit_code == 2 and r.stderr.strip().startswith("error:") and "does not exist" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    (tmp_path / "broken.png").write_bytes(b"not a png")
    r = CliRunner().invoke(cli, ["predict", str(compiled["ort"]), str(tmp_path / "broken.png")])
    assert r.exit_code == 2 and "cannot be read" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = CliRunner().invoke(cli, ["predict", str(tmp_path / "nope.onnx"), str(tmp_path / "broken.png")])
    assert r.exit_code == 2 and "does not exist" in r.stderr


def test_predict_skips_an_unreadable_image(compiled, images, tmp_path):
    """One unreadable image in a folder: a warning, the good images' results, exit 0 (as calibration skips it)."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    for p in images[:3]:
        shutil.copy(p, folder / p.name)
    (folder / "broken.png").write_bytes(b"not a png")
    r = CliRunner().invoke(cli, ["predict", str(compiled["ort"]), str(folder), "--json", "-k", "1"])
    assert r.exit_code == 0, r.stderr
    got = json.loads(r.stdout)
    assert sorted(Path(g["image"]).name for g in got) == sorted(p.name for p in images[:3])
    assert "1 of 4 images could not be read and were skipped" in r.stderr
    with vitedge.load(compiled["ort"]) as eng:  # the same predictions as the images alone
        want = eng.predict(sorted(folder.glob("digit*")), top_k=1)
    assert [g["top"][0]["index"] for g in got] == [w.indices[0] for w in want]
    # --strict keeps the old behaviour: the first unreadable image is an error, nothing printed
    r = CliRunner().invoke(cli, ["predict", str(compiled["ort"]), str(folder), "--strict"])
    assert r.exit_code == 2 and r.stdout == "" and "broken.png cannot be read" in r.stderr


def test_predict_skips_but_fails_when_none_readable(compiled, tmp_path):
    (tmp_path / "a.png").write_bytes(b"not a png")
    (tmp_path / "b.jpg").write_bytes(b"")
    r = CliRunner().invoke(cli, ["predict", str(compiled["ort"]), str(tmp_path)])
    assert r.exit_code == 2 and r.stdout == ""
    assert r.stderr.strip().splitlines()[-1].startswith("error: none of the 2 images could be read; the first: image")
