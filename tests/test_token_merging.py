"""Token merging (ToMe): the merge arithmetic, the model with merging, the exported graph (ONNX Runtime and
OpenVINO against PyTorch with the same merging), the auto search, the CLI's errors and the recipe keys.

Fast: tiny random ViTs and the reference digits ViT; two ONNX exports in all (one fixed r, one auto)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from vitedge.cli import main
from vitedge.errors import InputError, VitedgeError
from vitedge.models.tome import bipartite_merge, max_merge, merged_count, tokens_per_block
from vitedge.models.vit import VisionTransformer

R = 4  # tokens merged per block in the exported tiny model: 17 -> 13 -> 9 -> 5


def _tiny(seed: int = 0, **overrides) -> VisionTransformer:
    torch.manual_seed(seed)
    cfg = dict(img_size=64, patch_size=16, d_model=32, num_heads=2, num_layers=4, d_ff=64, num_classes=10, dropout=0.0)
    return VisionTransformer(**{**cfg, **overrides}).eval()


def _logits(model: VisionTransformer, x: torch.Tensor, r: int) -> np.ndarray:
    saved = model.merge_tokens
    model.merge_tokens = r
    try:
        with torch.inference_mode():
            return model(x).numpy()
    finally:
        model.merge_tokens = saved


# ------------------------------------------------------------------------------------------
# arithmetic
# ------------------------------------------------------------------------------------------
def test_tokens_per_block_vit_b16_r8():
    counts = tokens_per_block(197, 12, 8)
    assert counts == [197 - 8 * i for i in range(12)]
    assert counts[0] == 197 and counts[-1] == 109 and len(counts) == 12


def test_tokens_per_block_r0_is_constant_and_negative_r_refused():
    assert tokens_per_block(197, 12, 0) == [197] * 12
    with pytest.raises(ValueError):
        tokens_per_block(197, 12, -1)


def test_tokens_per_block_clips_r_to_set_a():
    # 17 tokens: set A (even positions after CLS) holds (n - 1) // 2 tokens, so at most 8, then 4, then 2 merge
    assert tokens_per_block(17, 4, 100) == [17, 9, 5, 3]
    assert [merged_count(n, 100) for n in (17, 9, 5, 3, 2, 1)] == [8, 4, 2, 1, 0, 0]
    assert merged_count(197, 8) == 8 and merged_count(197, 0) == 0
    # the last block merges nothing: only num_layers - 1 merges
    assert tokens_per_block(17, 1, 8) == [17]


@pytest.mark.parametrize("n, layers", [(17, 4), (197, 12), (50, 6)])
def test_max_merge_is_the_largest_r_leaving_four_tokens(n, layers):
    hi = max_merge(n, layers)
    assert hi >= 1
    assert tokens_per_block(n, layers, hi)[-1] >= 4
    assert tokens_per_block(n, layers, hi + 1)[-1] < 4
    assert max_merge(17, 4) == 7


# ------------------------------------------------------------------------------------------
# one merge
# ------------------------------------------------------------------------------------------
def _xs(b=2, n=17, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, n, d, generator=g, dtype=torch.float64), torch.randn(b, n, 6, generator=g, dtype=torch.float64)


def test_merge_r0_is_identity():
    x, metric = _xs()
    out, size = bipartite_merge(x, None, metric, 0)
    assert torch.equal(out, x)
    assert torch.equal(size, torch.ones(2, 17, 1, dtype=x.dtype))


@pytest.mark.parametrize("r", [1, 3, 8])
def test_merge_shapes_cls_and_conservation(r):
    x, metric = _xs()
    out, size = bipartite_merge(x, None, metric, r)
    assert out.shape == (2, 17 - r, 8) and size.shape == (2, 17 - r, 1)
    assert torch.equal(out[:, 0], x[:, 0]) and torch.equal(size[:, 0], torch.ones(2, 1, dtype=x.dtype))  # CLS untouched
    assert torch.allclose(size.sum(dim=(1, 2)), torch.full((2,), 17.0, dtype=x.dtype))  # every patch counted once
    assert ((size >= 1) & (size == size.round())).all()
    torch.testing.assert_close((out * size).sum(dim=1), x.sum(dim=1), atol=1e-5, rtol=0)  # size-weighted sum kept


def test_chained_merges_conserve_size_and_weighted_sum():
    x, metric = _xs(n=33, seed=1)
    out, size = x, None
    for step in range(3):
        out, size = bipartite_merge(out, size, torch.randn(2, out.shape[1], 6, dtype=x.dtype, generator=torch.Generator().manual_seed(step)), 5)
    assert out.shape[1] == 33 - 15
    assert torch.allclose(size.sum(dim=(1, 2)), torch.full((2,), 33.0, dtype=x.dtype))
    assert size.max() > 1
    torch.testing.assert_close((out * size).sum(dim=1), x.sum(dim=1), atol=1e-5, rtol=0)


def test_merging_two_identical_tokens_yields_that_token():
    x, _ = _xs(b=1, n=9, d=8, seed=2)
    x[:, 2] = x[:, 1]  # an A token (position 2) equal to a B token (position 1)
    out, size = bipartite_merge(x, None, x.clone(), 1)  # metric = x: their cosine is 1, the best match
    assert out.shape[1] == 8
    merged = (size[0, :, 0] == 2).nonzero().flatten().tolist()
    assert len(merged) == 1 and size[0].sum() == 9
    torch.testing.assert_close(out[0, merged[0]], x[0, 1], atol=1e-12, rtol=0)
    # every other token is an original one, unchanged
    rest = [i for i in range(8) if i != merged[0]]
    originals = [x[0, j] for j in range(9) if j not in (1, 2)]
    for i in rest:
        assert any(torch.equal(out[0, i], o) for o in originals)


# ------------------------------------------------------------------------------------------
# the model
# ------------------------------------------------------------------------------------------
def test_model_merge_0_is_unchanged_and_r_changes_logits_finitely():
    model = _tiny()
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    before = _logits(model, x, 0)
    merged = _logits(model, x, R)
    after = _logits(model, x, 0)
    assert model.merge_tokens == 0
    assert np.array_equal(before, after)
    assert np.isfinite(merged).all()
    assert np.abs(merged - before).max() > 1e-4


def test_model_merges_each_image_on_its_own():
    model = _tiny()
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    together = _logits(model, x, R)
    alone = np.concatenate([_logits(model, x[i : i + 1], R) for i in range(3)])
    np.testing.assert_allclose(together, alone, atol=1e-5, rtol=0)


def test_proportional_attention_makes_merging_duplicates_exact():
    # with no position embedding and a constant image every patch token is the same: merging them loses
    # nothing, as long as attention weighs a merged token by its size (log(size) added to the logits)
    model = _tiny()
    with torch.no_grad():
        model.pos_embed.zero_()
    x = torch.full((2, 3, 64, 64), 0.3)
    plain, merged = _logits(model, x, 0), _logits(model, x, R)
    np.testing.assert_allclose(merged, plain, atol=1e-5, rtol=0)
    # without proportional attention the CLS token would see a different mix: the check can fail
    attn = model.blocks[0].attn
    tokens = torch.randn(1, 5, 32)
    with_size = attn(tokens, size=torch.tensor([[[1.0], [3.0], [1.0], [1.0], [1.0]]]))[0]
    assert not torch.allclose(with_size, attn(tokens)[0])


# ------------------------------------------------------------------------------------------
# the exported graph
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def merged_export(tmp_path_factory):
    from vitedge.export import export_onnx

    model = _tiny(seed=3)
    path, man = export_onnx(model, tmp_path_factory.mktemp("tome") / "m.onnx", merge_tokens=R, images=[])
    return model, path, man


def _check_input(batch: int = 3) -> np.ndarray:
    return np.random.default_rng(5).standard_normal((batch, 3, 64, 64)).astype(np.float32)


@pytest.mark.e2e
def test_export_records_merging_in_the_manifest(merged_export):
    model, path, man = merged_export
    tm = man.model["graph"]["token_merging"]
    assert tm["r"] == R and tm["tokens_per_block"] == [17, 13, 9, 5] and tm["lossy"] is True
    assert "search" not in tm
    assert json.loads(man.sidecar_path(path).read_text())["model"]["graph"]["token_merging"]["r"] == R
    assert model.merge_tokens == 0  # export restores the model
    assert man.verification["reference"] == "pytorch-fp32" and all(c["passed"] for c in man.verification["checks"].values())


@pytest.mark.e2e
def test_exported_graph_runs_fewer_tokens(merged_export):
    import onnx

    _, path, _ = merged_export
    inferred = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    token_dims = set()
    for vi in inferred.graph.value_info:
        dims = vi.type.tensor_type.shape.dim
        if len(dims) == 3 and dims[2].HasField("dim_value") and dims[2].dim_value == 32 and dims[1].HasField("dim_value"):
            token_dims.add(dims[1].dim_value)
    assert {17, 13, 9, 5} <= token_dims, token_dims


@pytest.mark.e2e
def test_onnxruntime_matches_pytorch_with_the_same_merging(merged_export):
    from vitedge.export import ort_session

    model, path, _ = merged_export
    x = _check_input()
    sess = ort_session(path)
    out = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    want = _logits(model, torch.from_numpy(x), R)
    np.testing.assert_allclose(out, want, atol=1e-4, rtol=0)
    assert np.abs(out - _logits(model, torch.from_numpy(x), 0)).max() > 1e-3  # and the graph really merges


@pytest.mark.e2e
def test_openvino_runs_the_merged_graph(merged_export):
    ov = pytest.importorskip("openvino")
    model, path, _ = merged_export
    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    for batch in (1, 3):
        x = _check_input(batch)
        out = compiled(x)[compiled.output(0)]
        np.testing.assert_allclose(out, _logits(model, torch.from_numpy(x), R), atol=1e-4, rtol=0)


def test_forced_picks_are_imposed_and_recorded():
    """tome.Matching records each merge's picks, and imposes given ones: the same picks give the same output, other
    picks another (what lets a check hold the choice equal between two implementations)."""
    from vitedge.models.tome import Matching, matching

    model, x = _tiny(seed=4), torch.from_numpy(_check_input(2))
    with torch.inference_mode(), matching(Matching()) as m:
        model.merge_tokens = R
        try:
            ref = model(x)
            with matching(Matching(forced=m.picked)) as again:
                same = model(x)
            with matching(Matching(forced=[torch.cat([p[:, :R], p[:, :R] * 0, p[:, 2 * R :]], 1) for p in m.picked])):  # all into B's first
                moved = model(x)
        finally:
            model.merge_tokens = 0
    assert len(m.picked) == 3 and all(p.shape == (2, R + (tokens_per_block(17, 4, R)[i] - 1) // 2) for i, p in enumerate(m.picked))
    assert torch.equal(ref, same) and [p.shape for p in again.picked] == [p.shape for p in m.picked]
    assert not torch.allclose(ref, moved)


def test_export_and_compile_check_a_merged_graph_with_its_own_picks(merged_export, tmp_path):
    """The export check runs PyTorch with the ONNX graph's picks (recorded per check); compile runs the source with the
    engine's picks, read from its twin; imposing other picks on the source changes its output (the picks are live)."""
    from vitedge import compile_model
    from vitedge.compilation import _check_inputs, _forced_reference, _picks

    _, path, man = merged_export
    assert all("picks_as_pytorch" in c and c["passed"] for c in man.verification["checks"].values())
    names = _picks(man)
    assert names == [f"token_merging_picks_{i}" for i in range(3)] and [o.name for o in man.outputs] == ["logits"]
    for target, suffix in (("onnxruntime", ".ort.onnx"), ("openvino", ".xml")):
        _, eng = compile_model(path, tmp_path / f"e{suffix}", target=target, precision_hint="bf16" if target == "openvino" else None)
        assert eng.verification["token_merging"] == "reference run with the engine's own picks"
    inputs = {"x": _check_input(2)}
    from vitedge.compilation import _engine_picks

    picks = _engine_picks(path, man.derive("t.onnx", "onnx", backend="onnxruntime"), names, inputs, tmp_path)
    same = _forced_reference(path, names, inputs, picks)["x"]["logits"]
    swapped = {"x": [np.concatenate([p[:, R : 2 * R] * 0, p[:, R : 2 * R], p[:, 2 * R :]], 1) for p in picks["x"]]}
    moved = _forced_reference(path, names, inputs, swapped)["x"]["logits"]
    assert np.allclose(same, _logits(merged_export[0], torch.from_numpy(inputs["x"]), R), atol=1e-4) and not np.allclose(same, moved, atol=1e-3)


@pytest.mark.e2e  # exports, compiles and times several engines (or quantizes twice): tens of seconds
def test_int8_of_a_merged_export_is_held_to_the_unmerged_reference(ref_spec, ref_onnx, calib_dir, tmp_path):
    """quantize --reference: calibration runs on the merged graph, the target and agreement are measured against the
    unmerged FP32 export (both losses); a reference with other outputs is refused before any work."""
    from vitedge import export_onnx
    from vitedge.quantization import FidelityNotMet, quantize

    merged, _ = export_onnx(ref_spec, tmp_path / "m.onnx", merge_tokens=2)
    try:
        _, man = quantize(merged, tmp_path / "q.onnx", calib=calib_dir, reference=ref_onnx, search_budget=0)
    except FidelityNotMet as exc:  # the stacked losses may miss the target: the file is written all the same
        man = exc.manifest
    assert man.verification["reference"].startswith(f"fp32 onnx ({ref_onnx.name}")
    _, own = quantize(merged, tmp_path / "q2.onnx", calib=calib_dir, search_budget=0)
    assert own.verification["reference"].startswith("fp32 onnx (m.onnx")
    assert man.verification["agreement"]["cosine_mean"] < own.verification["agreement"]["cosine_mean"]  # merging's loss is in it
    maps = own.verification["attention"]  # a merged graph has no map: said, not faked
    assert maps["available"] is False and "merges tokens" in maps["reason"]
    other, _ = export_onnx(_tiny(), tmp_path / "other.onnx")
    with pytest.raises(VitedgeError, match="--reference other.onnx (does not take the same input|preprocesses images differently)"):
        quantize(merged, tmp_path / "q3.onnx", calib=calib_dir, reference=other)
    assert not (tmp_path / "q3.onnx").exists()


def test_export_refuses_bad_settings_before_writing(tmp_path):
    from vitedge.errors import ModelNotSupported
    from vitedge.export import export_onnx

    model = _tiny()
    out = tmp_path / "bad.onnx"
    with pytest.raises(ModelNotSupported, match="opset 17"):
        export_onnx(model, out, opset=14, merge_tokens=2, images=[])
    with pytest.raises(InputError, match="needs --val:"):
        export_onnx(model, out, merge_tokens="auto", images=[])
    with pytest.raises(InputError, match="only apply to --merge-tokens auto"):
        export_onnx(model, out, merge_tokens=2, max_drop=1.0, images=[])
    headless = _tiny(num_classes=0)
    with pytest.raises(ModelNotSupported, match="classifiers"):
        export_onnx(headless, out, merge_tokens=2, images=[])
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------
# the CLI
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, message", [
    (["--merge-tokens", "-1"], "must be >= 0"),
    (["--merge-tokens", "abc"], "number of tokens or 'auto'"),
    (["--merge-tokens", "auto"], "needs --val:"),
    (["--max-drop", "1"], "only apply to --merge-tokens auto"),
    (["--merge-tokens", "4", "--max-drop", "1"], "only apply to --merge-tokens auto"),
    (["--merge-tokens", "2", "--opset", "14"], "opset 17 or newer"),
], ids=["negative", "not-a-number", "auto-without-images", "max-drop-without-auto", "max-drop-with-fixed-r", "old-opset"])
def test_cli_refuses_bad_merge_options_with_one_line(tmp_path, args, message):
    out = tmp_path / "out.onnx"
    res = CliRunner().invoke(main, ["export", "reference", "-o", str(out), *args])
    assert res.exit_code == 2, res.output
    errors = [line for line in res.output.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0], res.output
    assert "Traceback" not in res.output
    assert not out.exists() and list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------
# auto: choosing r on validation images
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def unlabelled_dir(tmp_path_factory, val_dir):
    """30 held-out digit images in one folder: no labels, so the search counts top-1 changes."""
    folder = tmp_path_factory.mktemp("unlabelled")
    for i, p in enumerate(sorted(val_dir.rglob("*.png"))[::12][:30]):
        shutil.copy(p, folder / f"img_{i:03d}.png")
    assert len(list(folder.iterdir())) == 30
    return folder


def test_auto_with_a_generous_budget_takes_the_largest_r(ref_spec, val_dir):
    from vitedge.data import ImageSet
    from vitedge.token_merging import choose_merge

    hi = max_merge(17, ref_spec.config.num_layers)
    search = choose_merge(ref_spec, ImageSet.from_path(val_dir).sample(60), max_drop=100, backend=None)  # on accuracy alone
    assert search.labelled and search.r == hi == 7 and search.images == 60 and search.every == 1 and not search.timings
    assert search.to_dict()["measure"] == "paired top-1 drop"
    assert all(t.within_budget for t in search.trials) and search.trials[-1].r == hi
    assert ref_spec.model.merge_tokens == 0


def test_auto_with_no_budget_keeps_only_rs_that_change_nothing(ref_spec, unlabelled_dir):
    from vitedge.data import ImageSet
    from vitedge.token_merging import choose_merge

    search = choose_merge(ref_spec, ImageSet.from_path(unlabelled_dir), max_drop=0, backend=None)
    assert not search.labelled and search.images == 30
    rs = [t.r for t in search.trials]
    assert rs == sorted(rs) and len(rs) == len(set(rs)) >= 2
    for t in search.trials:
        assert t.within_budget == (t.top1_loss_pp == 0)
        if t.r <= search.r:
            assert t.top1_loss_pp == 0 and t.top1_agreement == 1.0
    # bisection: the chosen r is within budget and r + 1 was measured over it (unless r is the largest)
    if search.r < max_merge(17, ref_spec.config.num_layers):
        over = {t.r: t for t in search.trials}[search.r + 1]
        assert not over.within_budget and over.top1_loss_pp > 0


@pytest.mark.e2e  # exports, compiles and times several engines (or quantizes twice): tens of seconds
def test_auto_times_every_schedule_and_never_picks_a_slower_engine(ref_spec, val_dir):
    """With a backend, each schedule's best r is exported, compiled and timed beside the unmerged engine; the pick is
    the fastest of those faster than unmerged, or no merging at all."""
    from vitedge.data import ImageSet
    from vitedge.token_merging import SCHEDULES, choose_merge

    search = choose_merge(ref_spec, ImageSet.from_path(val_dir).sample(40), max_drop=100, backend="onnxruntime")
    assert {t.every for t in search.trials} == set(SCHEDULES)
    for every in SCHEDULES:  # the largest useful r of each schedule is within a 100-point budget
        assert max(t.r for t in search.trials if t.every == every) == max_merge(17, ref_spec.config.num_layers, every)
    timed = {(t.r, t.every): t for t in search.timings}
    assert (0, 1) in timed and len(timed) == 1 + len(SCHEDULES) and all(t.status == "timed" and t.ms > 0 for t in timed.values())
    assert timed[(0, 1)].speedup == pytest.approx(1.0)
    faster = [t for t in search.timings if t.r and t.speedup > 1]
    if faster:
        win = timed[(search.r, search.every)]
        assert win.speedup == max(t.speedup for t in faster) and "fastest onnxruntime engine" in search.reason
    else:
        assert search.r == 0 and "faster than the unmerged one" in search.reason
    d = search.to_dict()
    assert d["speed"]["backend"] == "onnxruntime" and d["chosen"] == {"r": search.r, "every": search.every, "why": search.reason}


def test_merge_every_schedule_counts_and_export(tmp_path):
    """--merge-every K merges in blocks 0, K, 2K, ... (never the last); the graph runs those token counts and
    matches PyTorch with the same schedule."""
    from vitedge import export_onnx
    from vitedge.models.tome import linear_share_removed, merges_at

    assert merges_at(4, 2) == [True, False, True, False] and merges_at(4, 1) == [True, True, True, False]
    assert tokens_per_block(17, 4, 4, every=2) == [17, 13, 13, 9]
    assert linear_share_removed([17, 13, 13, 9]) == pytest.approx(1 - 52 / 68)
    with pytest.raises(ValueError):
        merges_at(4, 0)
    path, man = export_onnx(_tiny(), tmp_path / "e2.onnx", merge_tokens=R, merge_every=2)
    tm = man.model["graph"]["token_merging"]
    assert tm["every"] == 2 and tm["tokens_per_block"] == [17, 13, 13, 9] and tm["linear_share_removed"] == pytest.approx(1 - 52 / 68, abs=1e-4)
    with pytest.raises(InputError, match="--merge-every"):
        export_onnx(_tiny(), tmp_path / "bad.onnx", merge_tokens="auto", merge_every=2, val_images=tmp_path)


def test_auto_needs_enough_images(ref_spec, tmp_path, unlabelled_dir):
    from vitedge.data import ImageSet
    from vitedge.token_merging import choose_merge

    for p in sorted(unlabelled_dir.iterdir())[:5]:
        shutil.copy(p, tmp_path / p.name)
    with pytest.raises(InputError, match="at least 20"):
        choose_merge(ref_spec, ImageSet.from_path(tmp_path), max_drop=1)
    with pytest.raises(InputError, match="must be >= 0"):
        choose_merge(ref_spec, ImageSet.from_path(unlabelled_dir), max_drop=-1)


@pytest.mark.e2e
def test_cli_auto_export_records_and_prints_the_trials(ref_spec, tmp_path, unlabelled_dir):
    from vitedge.data import ImageSet
    from vitedge.token_merging import choose_merge

    out = tmp_path / "auto.onnx"
    res = CliRunner().invoke(main, ["export", "reference", "-o", str(out), "--merge-tokens", "auto",
                                    "--val", str(unlabelled_dir), "--max-drop", "5"])
    assert res.exit_code == 0, res.output
    tm = json.loads((tmp_path / "auto.onnx.vitedge.json").read_text())["model"]["graph"]["token_merging"]
    search = tm["search"]
    assert search["max_drop_pp"] == 5 and search["images"] == 30
    assert search["measure"] == "top-1 changes vs the unmerged FP32 model"
    expected = choose_merge(ref_spec, ImageSet.from_path(unlabelled_dir), max_drop=5)  # accuracy: PyTorch on CPU, deterministic
    assert [(t["r"], t["every"]) for t in search["trials"]] == [(t.r, t.every) for t in expected.trials]
    assert [t["top1_loss_pp"] for t in search["trials"]] == [t.top1_loss_pp for t in expected.trials]
    timed = {(t["r"], t["every"]) for t in search["speed"]["engines"]}  # speed: measured, so the pick is one of them
    assert (tm["r"], tm["every"]) in timed or tm["r"] == 0
    assert tm["tokens_per_block"] == tokens_per_block(17, 4, tm["r"], tm["every"])
    for t in search["trials"]:
        assert f"merge r={t['r']}" in res.output
    assert f"r={tm['r']}" in res.output and "chosen" in res.output


# ------------------------------------------------------------------------------------------
# recipes
# ------------------------------------------------------------------------------------------
def test_shipped_tome_recipe_merges_8_tokens():
    from vitedge.recipes import load_recipe

    r = load_recipe("vit_base_tome_openvino")
    assert r.data["steps"]["export"]["merge_tokens"] == 8
    assert r.data["model"] == "vit_base" and r.data["steps"]["compile"]["backend"] == "openvino"


@pytest.mark.parametrize("export, problem", [
    ("{merge_tokens: -1}", "merge_tokens"),
    ("{merge_tokens: abc}", "merge_tokens"),
    ("{merge_tokens: auto}", "'val' is a required property"),
    ("{merge_tokens: 8, max_drop: 1}", "merge_tokens"),
    ("{max_drop: 1}", "merge_tokens"),
    ("{val: v}", "merge_tokens"),
    ("{merge_tokens: auto, val: v, max_drop: -1}", "max_drop"),
])
def test_recipe_schema_checks_the_merge_keys(tmp_path, export, problem):
    from vitedge.recipes import load_recipe

    p = tmp_path / "r.yaml"
    p.write_text(f"name: x\nmodel: vit_tiny\nsteps:\n  export: {export}\n")
    with pytest.raises(VitedgeError) as e:
        load_recipe(p)
    assert "r.yaml:4: steps.export" in str(e.value) and problem in str(e.value)


def test_recipe_passes_the_merge_keys_and_caches_on_them(tmp_path, monkeypatch):
    import vitedge.recipes
    from vitedge.recipes import load_recipe, run_recipe

    calls = []

    class _Manifest:
        verification = {"checks": {"random": {"max_abs_error": 0.0}}}

        def __init__(self, r):
            self.model = {"graph": {"token_merging": {"r": r}}}

    def fake_export(spec, output, **kw):  # records what the recipe asks for; the export itself is tested above
        calls.append(kw)
        Path(output).write_bytes(b"onnx")
        return Path(output), _Manifest(kw["merge_tokens"] if kw["merge_tokens"] != "auto" else 3)

    monkeypatch.setattr(vitedge.recipes, "export_onnx", fake_export)  # the name the recipe runner calls
    monkeypatch.setattr(vitedge.recipes, "load_model", lambda model, img_size=None: model)
    (tmp_path / "val").mkdir()
    (tmp_path / "val" / "a.png").write_bytes(b"one")
    p = tmp_path / "r.yaml"
    p.write_text("name: x\nmodel: vit_tiny\nimg_size: 32\nsteps:\n  export: {merge_tokens: auto, val: val, max_drop: 2.5}\n")
    recipe = load_recipe(p)
    out = tmp_path / "run"

    res = run_recipe(recipe, out)
    assert [s.status for s in res.steps] == ["done"] and "token merging r=3" in res.steps[0].summary
    assert calls[-1]["merge_tokens"] == "auto" and calls[-1]["max_drop"] == 2.5
    assert Path(calls[-1]["val_images"]) == tmp_path / "val"  # relative to the recipe
    assert [s.status for s in run_recipe(recipe, out).steps] == ["cached"]
    # each key, and the content of the validation images, is part of the cache key
    assert [s.status for s in run_recipe(recipe.with_changes(**{"steps.export.max_drop": 1.0}), out).steps] == ["done"]
    assert [s.status for s in run_recipe(recipe, out).steps] == ["done"]
    (tmp_path / "val" / "a.png").write_bytes(b"two")
    assert [s.status for s in run_recipe(recipe, out).steps] == ["done"]
    assert [s.status for s in run_recipe(recipe, out).steps] == ["cached"]
    fixed = recipe.with_changes(**{"steps.export": {"merge_tokens": 8}})
    assert [s.status for s in run_recipe(fixed, out).steps] == ["done"]
    assert calls[-1]["merge_tokens"] == 8 and calls[-1]["val_images"] is None and calls[-1]["max_drop"] is None
    assert [s.status for s in run_recipe(fixed.with_changes(**{"steps.export": {}}), out).steps] == ["done"]
    assert calls[-1]["merge_tokens"] == 0
    assert len(calls) == 6


def test_a_merged_fp32_reference_is_called_out_in_validate_notes():
    from types import SimpleNamespace

    from vitedge.validation import _note_merged_reference

    notes: list[str] = []
    _note_merged_reference(SimpleNamespace(model={"graph": {"token_merging": {"r": 4, "lossy": True}}}), "m.onnx", notes)
    _note_merged_reference(SimpleNamespace(model={"graph": {"last_block": "cls_token_only"}}), "plain.onnx", notes)
    assert len(notes) == 1 and "m.onnx" in notes[0] and "r=4" in notes[0] and "--reference" in notes[0]


@pytest.mark.parametrize("zero", ["00", " 0", 0, None])
def test_zero_spelled_any_way_means_no_merging(zero):
    from vitedge.export import _merge_setting

    assert _merge_setting(None, zero, None, None, 14, print) == (0, 1, None)  # no model or opset check when off
