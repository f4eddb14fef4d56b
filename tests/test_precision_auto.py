"""``vitedge quantize --auto``: INT8 where it pays on this CPU, else the FP32 model at the CPU's float precision."""

from __future__ import annotations

import numpy as np
import openvino as ov
import pytest

from vitedge.quantization import fidelity as fid
from vitedge.quantization.fidelity import FidelityResult, Row, Target
from vitedge.quantization.nncf_int8 import Int8Config


def _row(status: str, ms: float, agreement: float, fp: str | None = "bf16") -> Row:
    return Row(1, "default", Int8Config(), fp, status, metrics={"top1_agreement": agreement, "cosine_min": 0.999, "finite": True},
               latency_ms=ms, drop_pp=0.0)


def _result(int8_ms: float, int8_ok: bool, float_ms: float, float_agreement: float) -> FidelityResult:
    chosen = _row("met" if int8_ok else "missed", int8_ms, 0.99 if int8_ok else 0.90)
    ref = _row("reference", float_ms, float_agreement)
    return FidelityResult(Target(), int8_ok, chosen, [chosen], None, True, 1.0, ref)


@pytest.mark.parametrize("int8_ms, int8_ok, float_ms, float_agreement, float_wins", [
    (10.0, True, 20.0, 1.0, False),   # INT8 twice as fast: INT8
    (20.0, True, 10.0, 1.0, True),    # float faster and faithful: float
    (10.0, True, 9.9, 1.0, False),    # within 3 %: a tie goes to INT8
    (20.0, True, 10.0, 0.95, False),  # float faster but misses the target: INT8
    (10.0, False, 30.0, 0.99, True),  # INT8 misses the target, float meets it: float even though slower
])
def test_the_faster_faithful_model_wins(int8_ms, int8_ok, float_ms, float_agreement, float_wins):
    res = _result(int8_ms, int8_ok, float_ms, float_agreement)
    assert res.float_wins is float_wins
    why = res.choice()
    assert why.startswith("bf16" if float_wins else "INT8"), why


def test_a_preset_picks_the_fastest_sound_variant_not_a_broken_one():
    """Random-weight presets choose on speed, but a variant whose outputs are far from all its siblings' is broken
    (seen: OpenVINO's static f32 engine of a token-merged INT8 ViT-S, cosine 0.61 vs 0.99), never chosen."""
    def variant(ms, cos):
        r = _row("missed", ms, 0.2)
        r.metrics["cosine_min"] = cos
        return r

    sound = [variant(19.1, 0.9874), variant(22.7, 0.9873), variant(22.4, 0.9878)]
    broken = variant(18.9, 0.6070)
    assert fid._sound(sound + [broken]) == sound
    assert min(fid._sound(sound + [broken]), key=lambda r: r.latency_ms) is sound[0]
    near = [variant(10.0, 0.9990), variant(9.0, 0.9975)]  # 2.5x the error but within 0.01 of it: INT8 noise, kept
    assert fid._sound(near) == near


def _has_fake_quantize(xml) -> bool:
    return any(op.get_type_name() == "FakeQuantize" for op in ov.Core().read_model(str(xml)).get_ordered_ops())


@pytest.mark.e2e
def test_auto_records_why_and_writes_what_it_chose(ref_onnx, tmp_path):
    from vitedge import compile_model, quantize, validate

    path, man = quantize(ref_onnx, tmp_path / "m.xml", precision="auto", backend="openvino")
    choice = man.quantization["choice"]
    assert choice["asked"] == "auto" and choice["why"] and "AVX2" in choice["cpu"]
    assert man.precision == ("int8" if choice["chosen"] == "int8" else "fp32")
    assert _has_fake_quantize(path) is (man.precision == "int8")
    engine, eman = compile_model(path, tmp_path / "e.xml", target="openvino")
    assert eman.precision == man.precision if man.precision == "int8" else eman.precision in ("fp32", "bf16")
    rep = validate([engine], ref_onnx, samples=16, time_budget=0.05, rounds=1, warmup=1, min_runs=3, batch_sizes=(1,))
    assert any("quantize --auto" in n and choice["why"] in n for n in rep.data["findings"])  # the report says why


@pytest.mark.e2e
def test_auto_writes_the_measured_float_model_when_it_wins(ref_onnx, tmp_path, monkeypatch, digit_batch):
    """Force the float branch (on this CPU INT8 usually wins for the small reference model) and check the
    written file is the unquantized model, recorded as such, and compiled at the precision that was measured."""
    from vitedge import compile_model, load, quantize
    from vitedge.backends.openvino import default_precision_hint

    monkeypatch.setattr(fid.FidelityResult, "float_wins", property(lambda self: True))
    path, man = quantize(ref_onnx, tmp_path / "m.xml", precision="auto", backend="openvino")
    assert man.precision == "fp32" and not _has_fake_quantize(path)
    fp = default_precision_hint("int8")  # the float precision the search measured: bf16 on BF16 CPUs, else f32
    assert man.quantization["float_precision"] == fp and man.quantization["choice"]["chosen"] == fp
    assert (tmp_path / "m.bin").stat().st_size > 0.9 * ref_onnx.stat().st_size  # FP32 weights, not INT8
    engine, eman = compile_model(path, tmp_path / "e.xml", target="openvino")
    assert eman.precision == ("bf16" if fp == "bf16" else "fp32")
    with load(ref_onnx) as ref, load(engine) as eng:
        a, b = ref.infer(digit_batch), eng.infer(digit_batch)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() > (0.999 if fp == "bf16" else 0.99999)


def test_auto_is_refused_where_there_is_nothing_to_choose(ref_onnx, tmp_path):
    from vitedge import quantize
    from vitedge.errors import VitedgeError

    with pytest.raises(VitedgeError, match="no auto quantization"):
        quantize(ref_onnx, tmp_path / "m.onnx", precision="auto", backend="tensorrt")
    assert not (tmp_path / "m.onnx").exists()


def test_random_weights_choose_on_speed_alone():
    """A preset's predictions mean nothing: agreement cannot veto the faster model either way."""
    res = _result(20.0, False, 10.0, 0.10)
    res.enforced = False
    assert res.float_wins and "speed alone" in res.choice()
    res = _result(10.0, False, 20.0, 1.0)
    res.enforced = False
    assert not res.float_wins and res.choice().startswith("INT8")
