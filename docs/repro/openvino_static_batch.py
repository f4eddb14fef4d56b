"""Minimal reproduction: why OpenVINO's static batch-1 INT8 engine of the DINOv2 classifier is less faithful.

See docs/openvino_static_batch.md.  Self-contained (numpy + openvino), runs in seconds, no model files.

The graph is the classifier head of ``benchmarks/real_models.py`` as NNCF quantizes it:

    tokens [N, 257, 384] -> CLS token (Gather) --------------------\\
                         -> patch tokens (Slice) -> ReduceMean(axis 1, keep_dims=False) -> Concat [N, 768]
    -> Multiply by a per-channel [1, 768] constant (NNCF's SmoothQuant scale) -> FakeQuantize (256 levels)
    -> MatMul with int8 weights (identity here, so the output *is* the quantized features)

The OpenVINO CPU plugin computes a ReduceMean(keep_dims=False) that has a per-channel FakeQuantize fused
into it with channel 0's quantization parameters for every channel.  In the static-shape engine the
per-channel FakeQuantize is moved through the Concat onto the ReduceMean (and fused); with a dynamic batch
the Multiply stays between Concat and FakeQuantize, nothing is moved, and the result is right.  Rewriting
the ReduceMean as keep_dims=True + Squeeze (same values) stops the fusion and fixes the static engine.
"""

import numpy as np
import openvino as ov
import openvino.opset13 as op

T, C = 257, 384
LO, HI = np.float32(-0.96), np.float32(0.95)  # the FakeQuantize range NNCF calibrated on the real model
STEP = (HI - LO) / 255
rng = np.random.default_rng(0)
SCALE = rng.uniform(0.1, 0.4, (1, 2 * C)).astype(np.float32)  # SmoothQuant-like per-channel scale
# token features with a per-channel offset (like a LayerNorm output: channels differ, tokens vary around them)
X = (rng.normal(0, 1.5, (1, 1, C)) + rng.normal(0, 1.0, (16, T, C))).astype(np.float32)


def fake_quantize(v):
    return np.round((np.clip(v, LO, HI) - LO) / STEP) * STEP + LO


def head(concat: bool, keep_dims_rewrite: bool = False) -> ov.Model:
    p = op.parameter(ov.PartialShape([-1, T, C]), ov.Type.f32, name="tokens")
    patches = op.slice(p, op.constant([1]), op.constant([T]), op.constant([1]), op.constant([1]))
    if keep_dims_rewrite:
        mean = op.squeeze(op.reduce_mean(patches, op.constant([1]), True), op.constant([1]))
    else:
        mean = op.reduce_mean(patches, op.constant([1]), False)
    f = op.concat([op.gather(p, op.constant(np.int64(0)), op.constant(np.int64(1))), mean], 1) if concat else mean
    n = 2 * C if concat else C
    f = op.multiply(f, op.constant(SCALE[:, -n:]))
    f = op.fake_quantize(f, op.constant(LO), op.constant(HI), op.constant(LO), op.constant(HI), 256)
    w = op.multiply(op.convert(op.constant(np.eye(n, dtype=np.int8)), ov.Type.f32), op.constant(np.ones((n, 1), np.float32)))
    return ov.Model([op.matmul(f, w, False, True)], [p], "head")


def run(model: ov.Model, static: bool) -> tuple[np.ndarray, str]:
    if static:
        model.reshape({model.inputs[0]: [1, T, C]})
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    req = compiled.create_infer_request()
    out = np.concatenate([np.array(req.infer({0: X[i : i + 1]})[compiled.outputs[0]]) for i in range(len(X))])
    fused = [o.get_rt_info()["originalLayersNames"].astype(str) for o in compiled.get_runtime_model().get_ordered_ops()
             if o.get_rt_info()["layerType"].astype(str) == "Reduce"]
    return out, fused[0]


def main() -> None:
    print(f"OpenVINO {ov.__version__}")
    mean = X[:, 1:].mean(1)
    cases = [("CLS + patch mean -> Concat -> SmoothQuant Multiply -> FQ", True, False),
             ("same, ReduceMean rewritten keep_dims=True + Squeeze", True, True),
             ("patch mean -> SmoothQuant Multiply -> FQ (no Concat)", False, False)]
    print(f"{'graph':58s} {'engine':8s} {'max error':>10s} {'channels wrong':>15s}  Reduce node fused with")
    for name, concat, rewrite in cases:
        want = fake_quantize((np.concatenate([X[:, 0], mean], 1) if concat else mean) * SCALE[:, -(2 * C if concat else C):])
        for static in (True, False):
            out, fused = run(head(concat, rewrite), static)
            err = np.abs(out - want) / STEP
            wrong = int((err.max(0) > 0.5).sum())
            print(f"{name:58s} {'static' if static else 'dynamic':8s} {err.max():7.1f} q. {wrong:8d} / {out.shape[1]}   {fused}")
    # what the fused ReduceMean computes: every channel quantized with the first channel's scale
    out, _ = run(head(False), True)
    first = fake_quantize(mean * SCALE[0, C])
    print(f"\nfused ReduceMean+FQ == every channel with channel 0's scale: {np.abs(out - first).max() < 1e-4 * STEP + 1e-6}")


if __name__ == "__main__":
    main()
