"""Preprocessing (image -> float32 CHW) and image sets (folders, npy/npz, sampling, corrupt files)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vitedge import Preprocessing, VitedgeError
from vitedge.errors import FileProblem, ShapeMismatch
from vitedge.data import ImageSet, default_check_images, label_indices, list_images
from vitedge.preprocess import load_image, parse_floats

RAW = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), scale=1.0)  # output = pixel values


def _save(arr: np.ndarray, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


# ------------------------------------------------------------------------------------------
# geometry
# ------------------------------------------------------------------------------------------
def _wide_image() -> np.ndarray:
    """200x100 (WxH): black left quarter, white centre half, black right quarter."""
    img = np.zeros((100, 200, 3), np.uint8)
    img[:, 50:150] = 255
    return img


def test_resize_shorter_side_then_center_crop():
    pre = Preprocessing(img_size=50, resize=50, center_crop=True, interpolation="nearest", **RAW)
    out = pre(_wide_image())
    assert out.shape == (3, 50, 50) and out.dtype == np.float32
    assert (out == 255).all()  # 200x100 -> 100x50, the centre 50x50 is the white block
    tall = np.ascontiguousarray(_wide_image().transpose(1, 0, 2))  # 100x200: white band in the middle rows
    assert (pre(tall) == 255).all()


def test_resize_straight_to_size_keeps_the_whole_image():
    pre = Preprocessing(img_size=50, resize=None, center_crop=False, interpolation="nearest", **RAW)
    out = pre(_wide_image())
    assert out.shape == (3, 50, 50)
    assert (out[:, :, :12] == 0).all() and (out[:, :, 13:37] == 255).all() and (out[:, :, 38:] == 0).all()


def test_non_square_target():
    pre = Preprocessing(img_size=(32, 48), resize=None, center_crop=False, interpolation="bilinear")
    assert pre(_wide_image()).shape == (3, 32, 48)


@pytest.mark.parametrize("hw", [(23, 37), (41, 29), (30, 43), (50, 50)])
def test_shortest_edge_and_crop_match_hugging_face(hw):
    """Same numbers as transformers' PIL image processor (shortest-edge resize, floor-centred crop)."""
    transformers = pytest.importorskip("transformers")
    cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    proc = cls(size={"shortest_edge": 20}, crop_size={"height": 16, "width": 16}, do_center_crop=True, resample=2,
               image_mean=[0.5] * 3, image_std=[0.5] * 3)
    arr = np.random.default_rng(sum(hw)).integers(0, 256, (*hw, 3), dtype=np.uint8)
    want = proc(images=Image.fromarray(arr), return_tensors="np")["pixel_values"][0]
    mine = Preprocessing(img_size=16, resize=20, center_crop=True, interpolation="bilinear", mean=(0.5,) * 3, std=(0.5,) * 3)(arr)
    np.testing.assert_allclose(mine, want, atol=1e-6)


def test_resize_smaller_than_crop_still_gives_the_crop_size():
    pre = Preprocessing(img_size=32, resize=20, center_crop=True, interpolation="bilinear")
    assert pre(np.zeros((10, 10, 3), np.uint8)).shape == (3, 32, 32)


# ------------------------------------------------------------------------------------------
# values and channel order
# ------------------------------------------------------------------------------------------
def test_scale_mean_std():
    img = np.zeros((8, 8, 3), np.uint8)
    img[..., 0], img[..., 1], img[..., 2] = 255, 51, 0
    pre = Preprocessing(img_size=8, resize=None, center_crop=False, mean=(0.5, 0.2, 0.1), std=(0.25, 0.5, 2.0))
    out = pre(img)
    np.testing.assert_allclose(out[:, 0, 0], [(1 - 0.5) / 0.25, (0.2 - 0.2) / 0.5, (0 - 0.1) / 2.0], atol=1e-6)
    assert np.ptp(out, axis=(1, 2)).max() == 0


def test_bgr_order():
    img = np.zeros((8, 8, 3), np.uint8)
    img[..., 0] = 255  # pure red
    kw = dict(img_size=8, resize=None, center_crop=False, **RAW)
    rgb = Preprocessing(channel_order="RGB", **kw)(img)
    bgr = Preprocessing(channel_order="BGR", **kw)(img)
    assert (rgb[0] == 255).all() and (rgb[2] == 0).all()
    assert (bgr[2] == 255).all() and (bgr[0] == 0).all()
    photo = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    np.testing.assert_array_equal(Preprocessing(channel_order="BGR", **kw)(photo), Preprocessing(channel_order="RGB", **kw)(photo)[::-1])


def test_arrays_and_pil_give_what_the_file_gives(calib_dir, tmp_path):
    pre = Preprocessing(img_size=64, resize=None, center_crop=False, interpolation="bilinear", mean=(0.5,) * 3, std=(0.5,) * 3)
    path = sorted(calib_dir.rglob("*.png"))[7]
    from_file = pre(path)
    from_str = pre(str(path))
    with Image.open(path) as im:
        pil = im.copy()
    rgb = np.asarray(pil.convert("RGB"))
    grey = np.asarray(pil.convert("L"))
    assert np.ptp(from_file) > 0  # a real digit, not a blank
    for other in (from_str, pre(pil), pre(pil.convert("RGB")), pre(rgb), pre(grey), pre(grey[..., None])):
        np.testing.assert_array_equal(other, from_file)
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])
    np.testing.assert_array_equal(pre(rgba), from_file)  # alpha dropped
    batch = pre.batch([path, pil, rgb])
    assert batch.shape == (3, 3, 64, 64)
    np.testing.assert_array_equal(batch[2], from_file)
    # a photo of another size and format goes through the same path
    jpg = _save(np.random.default_rng(1).integers(0, 256, (40, 30, 3), dtype=np.uint8), tmp_path / "x.jpg")
    np.testing.assert_array_equal(pre(jpg), pre(Image.open(jpg)))


def test_bad_image_inputs(tmp_path):
    pre = Preprocessing.for_size(32)
    with pytest.raises(VitedgeError, match="dtype float32 .* is not an image"):
        pre(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(ShapeMismatch):
        pre(np.zeros((8, 8, 2), np.uint8))
    with pytest.raises(FileProblem):
        pre(tmp_path / "missing.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(FileProblem):
        load_image(tmp_path / "broken.png")
    with pytest.raises(VitedgeError, match="no images given"):
        pre.batch([])


def test_preprocessing_config():
    pre = Preprocessing.for_size(224)  # the one default rule: floor(224 / 0.875), as timm
    assert pre.resize == 256 and pre.center_crop and pre.img_size == (224, 224) and pre.interpolation == "bicubic"
    assert Preprocessing() == pre and Preprocessing(img_size=32).resize == 36 and Preprocessing(img_size=32, resize=None).resize is None
    assert Preprocessing.from_dict({**pre.to_dict(), "future_field": 1}) == pre
    assert Preprocessing(img_size=[10, 20]).img_size == (10, 20)
    with pytest.raises(VitedgeError, match="unknown interpolation 'cubic'"):
        Preprocessing(interpolation="cubic")
    with pytest.raises(VitedgeError, match="unknown channel order"):
        Preprocessing(channel_order="RGBA")
    with pytest.raises(VitedgeError, match="std > 0"):
        Preprocessing(std=(0.5, 0.0, 0.5))
    assert parse_floats("0.1, 0.2,0.3") == (0.1, 0.2, 0.3)
    with pytest.raises(VitedgeError, match="mean needs 3 numbers, got 2"):
        parse_floats("0.1,0.2", what="mean")
    with pytest.raises(VitedgeError, match="is not a comma-separated list"):
        parse_floats("a,b,c")


# ------------------------------------------------------------------------------------------
# image sets
# ------------------------------------------------------------------------------------------
def test_labelled_folder(val_dir):
    s = ImageSet.from_path(val_dir)
    assert len(s) == 360 and s.labelled
    assert sorted(set(s.labels)) == [str(i) for i in range(10)]
    assert all(p.parent.name == lbl for p, lbl in zip(s.paths, s.labels))
    y = label_indices(s.labels, [str(i) for i in range(10)], str(val_dir))
    assert y.dtype == np.int64 and np.bincount(y).min() >= 30


def test_flat_and_mixed_folders_are_unlabelled(calib_dir, tmp_path):
    pngs = sorted(calib_dir.rglob("*.png"))[:3]
    for i, p in enumerate(pngs):
        shutil.copy(p, tmp_path / f"{i}.png")
    flat = ImageSet.from_path(tmp_path)
    assert len(flat) == 3 and flat.labels == [None] * 3 and not flat.labelled
    (tmp_path / "cat").mkdir()
    shutil.copy(pngs[0], tmp_path / "cat" / "c.png")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / ".hidden.png").write_bytes(b"")
    mixed = ImageSet.from_path(tmp_path)
    assert len(mixed) == 4 and not mixed.labelled
    single = ImageSet.from_path(tmp_path / "0.png")
    assert len(single) == 1 and single.paths == [tmp_path / "0.png"]


def test_corrupt_images_are_skipped_and_counted(calib_dir, tmp_path):
    good = sorted(calib_dir.rglob("*.png"))[:10]
    for i, p in enumerate(good):
        _save(np.asarray(Image.open(p).convert("RGB")), tmp_path / str(i % 2) / f"img{i}.png")
    data = (tmp_path / "0" / "img0.png").read_bytes()
    (tmp_path / "0" / "truncated.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "1" / "random.jpg").write_bytes(np.random.default_rng(0).bytes(500))
    s = ImageSet.from_path(tmp_path)
    assert len(s) == 12
    pre = Preprocessing(img_size=16, resize=None, center_crop=False)
    batches = list(s.batches(pre, batch_size=4))
    assert [len(b.x) for b in batches] == [4, 4, 2]
    assert sum(len(b.names) for b in batches) == 10
    skipped = sorted(Path(p).name for p, _ in s.skipped)
    assert skipped == ["random.jpg", "truncated.png"]
    assert all("cannot be read" in why for _, why in s.skipped)
    for b in batches:
        assert b.x.shape[1:] == (3, 16, 16) and b.x.dtype == np.float32
        assert all(Path(n).parent.name == lbl for n, lbl in zip(b.names, b.labels))
    everything = s.load_all(pre)
    assert everything.x.shape == (10, 3, 16, 16) and len(s.skipped) == 2  # counted afresh, not doubled
    with pytest.raises(VitedgeError, match="only 10 usable images .* \\(2 unreadable\\), 11 needed"):
        list(s.batches(pre, 4, min_count=11))
    with pytest.raises(VitedgeError, match="images need preprocessing"):
        list(s.batches(None))


def test_deterministic_sample(val_dir):
    s = ImageSet.from_path(val_dir)
    a, b, c = s.sample(20, seed=0), s.sample(20, seed=0), s.sample(20, seed=1)
    assert a.paths == b.paths and a.labels == b.labels and len(a) == 20
    assert a.paths != c.paths
    assert a.paths == sorted(a.paths)  # keeps the set's order
    assert all(s.labels[s.paths.index(p)] == lbl for p, lbl in zip(a.paths, a.labels))
    assert s.sample(None) is s and s.sample(1000) is s
    with pytest.raises(VitedgeError, match="sample size 0 must be >= 1"):
        s.sample(0)


def test_npy_and_npz(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((10, 3, 16, 16)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    s = ImageSet.from_path(tmp_path / "x.npy")
    assert len(s) == 10 and not s.labelled
    got = list(s.batches(None, batch_size=4))
    assert [len(b.x) for b in got] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate([b.x for b in got]), x)
    s.check_shape(["batch", 3, 16, 16])
    with pytest.raises(VitedgeError, match=r"x\.npy: arrays of shape \(3, 16, 16\) do not match the model input \(3, 32, 32\)"):
        s.check_shape(["batch", 3, 32, 32])
    sub = s.sample(4, seed=3)
    assert sub.arrays.shape == (4, 3, 16, 16) and np.array_equal(sub.arrays, s.sample(4, seed=3).arrays)

    np.savez(tmp_path / "d.npz", x=x.astype(np.float64), y=np.arange(10) % 3)
    d = ImageSet.from_path(tmp_path / "d.npz")
    assert d.labelled and d.labels[:4] == ["0", "1", "2", "0"] and d.arrays.dtype == np.float32
    np.savez(tmp_path / "f.npz", images=x, labels=(np.arange(10) % 3).astype(np.float32))
    assert ImageSet.from_path(tmp_path / "f.npz").labels[:3] == ["0", "1", "2"]
    assert d.fingerprint() == s.fingerprint()  # same array content (float64 -> float32), same hash
    assert sub.fingerprint() != s.fingerprint()


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: np.save(p / "a.npy", np.zeros((3, 16, 16), np.float32)), r"a\.npy: array of shape \(3, 16, 16\) is not \(N, C, H, W\)"),
        (lambda p: np.save(p / "a.npy", np.full((2, 3, 4, 4), np.nan, np.float32)), r"a\.npy contains NaN or inf"),
        (lambda p: (p / "a.npy").write_bytes(b"\x93NUMPY garbage"), r"a\.npy cannot be read as a numpy file"),
        (lambda p: np.savez(p / "a.npz"), r"a\.npz is an empty \.npz"),
        (lambda p: np.savez(p / "a.npz", x=np.zeros((4, 3, 2, 2)), y=np.arange(3)), r"a\.npz: 3 labels for 4 images"),
        (lambda p: np.save(p / "a.npy", np.array([["a"]] * 4).reshape(1, 1, 2, 2)), r"a\.npy: array of dtype <U1 is not numeric"),
        (lambda p: (p / "a.csv").write_text("1,2"), r"a\.csv is neither an image folder nor a \.npy/\.npz file"),
    ],
)
def test_bad_array_files(tmp_path, make, message):
    make(tmp_path)
    (path,) = list(tmp_path.iterdir())
    with pytest.raises(VitedgeError, match=message):
        ImageSet.from_path(path)


def test_missing_and_empty_data(tmp_path):
    with pytest.raises(FileProblem):
        ImageSet.from_path(tmp_path / "nowhere")
    with pytest.raises(FileProblem):
        ImageSet.from_path(tmp_path)


def test_fingerprint_follows_content(calib_dir, tmp_path):
    for p in sorted(calib_dir.rglob("*.png"))[:3]:
        shutil.copy(p, tmp_path / p.name)
    before = ImageSet.from_path(tmp_path).fingerprint()
    assert ImageSet.from_path(tmp_path).fingerprint() == before
    target = sorted(tmp_path.iterdir())[0]
    _save(np.zeros((8, 8), np.uint8), target)
    assert ImageSet.from_path(tmp_path).fingerprint() != before


def test_label_indices():
    names = ["cat", "dog", "eel"]
    assert label_indices(["dog", "cat", "eel"], names, "src").tolist() == [1, 0, 2]
    assert label_indices(["2", "0"], names, "src").tolist() == [2, 0]  # index-named folders
    assert label_indices(["7", "3"], None, "src").tolist() == [7, 3]  # no names: folder indices
    assert label_indices(["3"], ["0", "1", "2", "3"], "src").tolist() == [3]
    with pytest.raises(VitedgeError, match="src: class folder 'fox' matches no model label"):
        label_indices(["cat", "fox"], names, "src")
    with pytest.raises(VitedgeError, match="src: class folder '5' matches no model label"):
        label_indices(["5"], names, "src")  # index out of range for a 3-class model
    with pytest.raises(VitedgeError, match="src has unlabelled images"):
        label_indices([None], names, "src")


def test_default_check_images():
    imgs = default_check_images()
    assert imgs and 1 <= len(imgs) <= 8
    assert all(p.exists() and p.suffix == ".png" for p in imgs)
    assert len({p.parent.name for p in imgs}) > 1  # spread over classes, not the first folder only
    assert list_images(imgs[0].parent)
