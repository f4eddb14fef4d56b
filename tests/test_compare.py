"""`vitedge.compare`, the one comparator: checked against numbers worked out by hand (literal values)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from vitedge import compare
from vitedge.errors import VitedgeError


# -- matching ------------------------------------------------------------------------------------
def test_outputs_match_by_position_when_names_differ():
    a, b = np.zeros((2, 3)), np.ones((2, 4))
    got = compare.match_outputs({"logits": a, "pooled": b}, {"out0": a + 1, "out1": b + 1})
    assert list(got) == ["logits", "pooled"]
    assert (got["logits"] == 1).all() and (got["pooled"] == 2).all()


def test_outputs_match_by_name_before_position():
    a, b = np.zeros((2, 3)), np.ones((2, 3))
    got = compare.match_outputs({"logits": a, "pooled": b}, {"pooled": b + 5, "logits": a + 7})
    assert list(got) == ["logits", "pooled"] and (got["logits"] == 7).all() and (got["pooled"] == 6).all()


def test_output_count_and_shape_mismatch_are_one_line_errors():
    ref = {"logits": np.zeros((2, 10))}
    with pytest.raises(VitedgeError, match="onnxruntime int8 has 2 outputs but the reference 1"):
        compare.match_outputs(ref, {"a": np.zeros((2, 10)), "b": np.zeros((2, 10))}, "onnxruntime int8")
    with pytest.raises(VitedgeError, match=r"outputs \(5,\) for 'logits' but the reference \(10,\)") as info:
        compare.match_outputs(ref, {"x": np.zeros((2, 5))}, "eng")
    assert "\n" not in str(info.value)
    assert compare.match_outputs(ref, {"x": np.zeros((2, 5))}, check_shapes=False)["logits"].shape == (2, 5)


# -- per output ----------------------------------------------------------------------------------
def test_cosine_of_known_vectors():
    ref = np.array([[1.0, 0.0], [1.0, 2.0], [1.0, 0.0], [3.0, 4.0]])
    out = np.array([[0.0, 1.0], [2.0, 4.0], [1.0, 1.0], [-3.0, -4.0]])
    assert compare.cosine(ref, out) == pytest.approx([0.0, 1.0, 0.7071068, -1.0], abs=1e-7)
    # images are flattened: a (N, tokens, dim) map gives one cosine per image
    assert compare.cosine(np.ones((2, 3, 4)), np.ones((2, 3, 4))) == pytest.approx([1.0, 1.0])


def test_snr_of_a_known_signal_and_noise():
    ref = np.array([[3.0, 4.0]])  # energy 25
    assert compare.snr_db(ref, np.array([[3.0, 4.5]])) == pytest.approx(20.0)  # noise 0.25: 10*log10(100)
    assert compare.snr_db(ref, np.array([[3.0, 9.0]])) == pytest.approx(0.0)  # noise 25
    assert compare.snr_db(ref, ref) == math.inf


def test_output_metrics_numbers():
    ref = np.array([[3.0, 4.0], [1.0, 0.0]])
    out = np.array([[3.0, 4.5], [1.0, 0.0]])
    m = compare.output_metrics(ref, out)
    assert m["max_abs_error"] == pytest.approx(0.5) and m["mean_abs_error"] == pytest.approx(0.125)
    assert m["max_rel_error"] == pytest.approx(0.125)  # 0.5 / max |ref| 4
    assert m["snr_db"] == pytest.approx(10 * math.log10(26 / 0.25))
    assert m["cosine_min"] == pytest.approx(0.9984604, abs=1e-7)  # 27 / (5 * sqrt(29.25))
    assert m["cosine_mean"] == pytest.approx(0.9992302, abs=1e-7)
    assert m["top1_agreement"] == 1.0 and m["finite"] is True
    assert compare.output_metrics(ref, np.full_like(ref, np.nan))["finite"] is False
    assert "top1_agreement" not in compare.output_metrics(np.ones((2, 3, 4)), np.ones((2, 3, 4)))


def test_per_output_keeps_the_chosen_keys_and_json_snr():
    ref = {"tokens": np.ones((2, 3, 4)), "pooled": np.array([[3.0, 4.0], [3.0, 4.0]])}
    outs = {"tokens": np.ones((2, 3, 4)), "pooled": np.array([[3.0, 4.5], [3.0, 4.5]])}
    per = compare.per_output(ref, outs)
    assert per["tokens"] == {"shape": [3, 4], "cosine_min": pytest.approx(1.0), "cosine_mean": pytest.approx(1.0),
                             "max_abs_error": 0.0, "snr_db": math.inf, "finite": True}
    assert per["pooled"]["snr_db"] == pytest.approx(20.0)
    assert compare.per_output(ref, outs, json_snr=True)["tokens"]["snr_db"] is None
    assert "shape" not in compare.per_output(ref, outs, shape=False)["pooled"]


# -- intervals -----------------------------------------------------------------------------------
def test_wilson_interval_reference_values():
    assert compare.wilson_interval(90, 100) == pytest.approx([0.826, 0.945], abs=5e-4)
    assert compare.wilson_interval(10, 10) == pytest.approx([0.7225, 1.0], abs=5e-4)
    assert compare.wilson_interval(0, 10) == pytest.approx([0.0, 0.2775], abs=5e-4)
    assert compare.wilson_interval(0, 0) == [0.0, 1.0]


def test_paired_drop_agresti_min_reference_values():
    ref_ok = np.array([True] * 360 + [False] * 40)
    eng_ok = ref_ok.copy()
    eng_ok[:10] = False  # 10 images only the reference gets right
    eng_ok[360:362] = True  # 2 only the engine gets right
    d = compare.paired_drop(ref_ok, eng_ok)
    assert d["reference_only"] == 10 and d["engine_only"] == 2
    assert d["drop_pp"] == pytest.approx(2.0)  # (10 - 2) / 400
    assert d["ci95_pp"] == pytest.approx([0.2429, 3.7372], abs=5e-4)
    # no discordant image: drop 0, and the adjusted interval still has a width
    assert compare.paired_drop(ref_ok, ref_ok)["ci95_pp"] == pytest.approx([-0.4876, 0.4876], abs=5e-4)  # 1.96 / 402
    boot = compare.paired_drop(ref_ok, eng_ok, method="bootstrap")
    assert boot["drop_pp"] == pytest.approx(2.0) and boot["ci95_pp"][0] < 2.0 < boot["ci95_pp"][1]
    assert compare.paired_drop(ref_ok, ref_ok, method="bootstrap")["ci95_pp"] == [0.0, 0.0]
    with pytest.raises(VitedgeError, match="unknown confidence-interval method"):
        compare.paired_drop(ref_ok, eng_ok, method="exact")


# -- classifiers ---------------------------------------------------------------------------------
def test_classification_agreement_accuracy_and_paired_drop():
    ref = np.array([[5.0, 1.0, 0.0], [0.0, 5.0, 1.0], [1.0, 0.0, 5.0], [5.0, 4.0, 0.0]])
    out = np.array([[5.0, 1.0, 0.0], [0.0, 5.0, 1.0], [1.0, 0.0, 5.0], [4.0, 5.0, 0.0]])  # the last image flips
    y = np.array([0, 1, 2, 0])
    vs = compare.classification(ref, out, names=["d/0/a.png", "d/1/b.png", "d/2/c.png", "d/0/d.png"],
                                class_names=["zero", "one", "two"], y=y, worst=2)
    assert vs["top1_agreement"] == 0.75 and vs["top5_agreement"] == 1.0 and vs["disagreements"] == 1
    assert vs["top1_agreement_ci95"] == pytest.approx([0.3006, 0.9544], abs=5e-4)
    assert vs["top1_drop_pp"] == pytest.approx(25.0) and vs["top5_drop_pp"] == 0.0
    assert vs["discordant"] == {"top1_reference_only": 1, "top1_engine_only": 0, "top5_reference_only": 0, "top5_engine_only": 0}
    assert vs["worst"][0] == {"image": "0/d.png", "cosine": pytest.approx(40 / 41), "reference_top1": "zero",
                              "engine_top1": "one", "label": "zero"}
    assert len(vs["worst"]) == 2 and vs["snr_db"] == pytest.approx(10 * math.log10(119 / 2))
    acc = compare.accuracy(out, y)
    assert acc["top1"] == 0.75 and acc["top5"] == 1.0 and acc["top1_ci95"] == pytest.approx([0.3006, 0.9544], abs=5e-4)
    same = compare.classification(ref, ref, names=["a"] * 4, class_names=["zero", "one", "two"])
    assert same["snr_db"] is None and same["top1_drop_pp"] is None and same["worst"][0]["label"] is None


def test_topk_is_stable_on_ties():
    assert compare.topk(np.array([[1.0, 3.0, 3.0, 0.0]]), 3).tolist() == [[1, 2, 0]]


def test_features_vs_reference_per_output():
    ref = {"tokens": np.ones((2, 3, 4)), "pooled": np.array([[3.0, 4.0], [3.0, 4.0]])}
    outs = {"tokens": np.ones((2, 3, 4)), "pooled": np.array([[3.0, 4.5], [3.0, 4.5]])}
    vs = compare.features(ref, outs)
    assert vs["top1_agreement"] is None and vs["snr_db"] is None  # the first output is identical
    assert vs["outputs"]["pooled"]["snr_db"] == pytest.approx(20.0) and vs["finite"] is True


def test_top1_loss_labelled_and_unlabelled():
    vs = {"top1_drop_pp": 1.5, "top1_drop_ci95_pp": [0.2, 2.8], "top1_agreement": 0.9, "top1_agreement_ci95": [0.826, 0.945]}
    assert compare.top1_loss(vs, labelled=True) == (1.5, [0.2, 2.8])
    value, ci = compare.top1_loss(vs, labelled=False)  # disagreement, its interval turned around
    assert value == pytest.approx(10.0) and ci == pytest.approx([5.5, 17.4])
