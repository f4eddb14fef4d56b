"""`vitedge validate --ray`: the accuracy pass on a Ray cluster gives the numbers of a local run, to the last digit.

A real local Ray cluster (2 CPUs, started once for the module), the real reference digits ViT exported to ONNX and
run by ONNX Runtime and OpenVINO, the real held-out digit images.  Worker faults are real too: a task kills its own
worker process (SIGKILL) and Ray runs it again.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from vitedge import distributed  # noqa: E402
from vitedge.data import ImageSet  # noqa: E402
from vitedge.errors import VitedgeError  # noqa: E402
from vitedge.sysinfo import instruction_sets  # noqa: E402
from vitedge.validation import EngineSpec, _accuracy_outputs, _Inputs, _open_engine, _open_reference, _shard_outputs, _ShardJob, _task_reference, validate  # noqa: E402

FAST = dict(time_budget=0.02, rounds=2, warmup=1, min_runs=2, batch_sizes=(1, 2), eval_batch=4, worst=5)
SAMPLES = 24
SHARDS = distributed.RayOptions(shard_size=8)  # 3 shards of 2 evaluation batches


@pytest.fixture(scope="module", autouse=True)
def local_cluster():
    # the kill tests' ImageSet subclasses live in this module, which the workers cannot import: send them by value
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def engines(ref_onnx):
    return [EngineSpec(ref_onnx, "onnxruntime"), EngineSpec(ref_onnx, "openvino", {"config": {"INFERENCE_PRECISION_HINT": "f32"}})]


@pytest.fixture(scope="module")
def images(val_dir) -> ImageSet:
    return ImageSet.from_path(val_dir).sample(SAMPLES, seed=3)


@pytest.fixture(scope="module")
def local_report(engines, images):
    return validate(engines, "reference", data=images, **FAST)


def _accuracy_part(report) -> list:
    """Everything a report says about accuracy: per model, its accuracy and its comparison with the reference."""
    return [(m["name"], m["accuracy"], m["vs_reference"]) for m in report.data["models"]]


@dataclass
class _KillsItsWorker(ImageSet):
    """Images whose reading SIGKILLs the Ray worker process reading them: once (the first shard to start leaves
    ``marker``), or every time (``marker`` None).  The driver's own reading (for timing) is left alone."""

    marker: str | None = None
    driver_pid: int = 0

    def batches(self, pre, batch_size=8, min_count=1):
        if os.getpid() != self.driver_pid and (self.marker is None or not Path(self.marker).exists()):
            if self.marker is not None:
                Path(self.marker).touch()
            os.kill(os.getpid(), signal.SIGKILL)
        return super().batches(pre, batch_size, min_count)


def _killing(images: ImageSet, marker: Path | None) -> _KillsItsWorker:
    return _KillsItsWorker(images.source, list(images.paths), list(images.labels), marker=None if marker is None else str(marker), driver_pid=os.getpid())


# -- the same numbers, faults ----------------------------------------------------------------------------------------
def test_ray_gives_the_local_numbers_even_when_a_worker_is_killed(engines, images, local_report, tmp_path):
    """A task SIGKILLs its own worker mid-shard; Ray runs it again and the merged report is the local one, to the last digit."""
    marker = tmp_path / "killed-once"
    rep = validate(engines, "reference", data=_killing(images, marker), ray=SHARDS, out_dir=tmp_path / "report", **FAST)
    assert marker.exists()  # a worker did die mid-shard
    assert json.dumps(_accuracy_part(rep)) == json.dumps(_accuracy_part(local_report))
    assert rep.data["data"] == local_report.data["data"]
    ray_settings = rep.data["settings"]["ray"]
    assert ray_settings["shards"] == 3 and ray_settings["shard_size"] == 8 and sum(n["shards"] for n in ray_settings["nodes"]) == 3
    # latency is measured on one node, the driver's, and the report says which, with its instruction sets
    ip = ray.util.get_node_ip_address()
    assert ray_settings["latency_node"].startswith(ip) and "AVX2" in ray_settings["latency_node"]
    assert any(f"latency and throughput were measured on one node: {ip}" in f for f in rep.data["findings"])
    assert (tmp_path / "report" / "report.json").is_file()


@pytest.mark.slow
def test_latency_on_a_named_node(engines, images, local_report, tmp_path):
    """--latency-node: the measurement runs as a task pinned to that node (here the only one); the report is written here."""
    ip = ray.util.get_node_ip_address()
    rep = validate(engines, "reference", data=images, ray=SHARDS, latency_node=ip, out_dir=tmp_path, **FAST)
    assert json.dumps(_accuracy_part(rep)) == json.dumps(_accuracy_part(local_report))
    assert rep.data["settings"]["ray"]["latency_node"].startswith(ip) and (tmp_path / "report.json").is_file()


def test_latency_node_must_be_a_node_of_the_cluster(engines, images):
    with pytest.raises(VitedgeError, match=r"^--latency-node 203.0.113.9 is not a node of the Ray cluster — give one of "):
        validate(engines, "reference", data=images, ray=SHARDS, latency_node="203.0.113.9", **FAST)
    with pytest.raises(VitedgeError, match=r"^--latency-node names a node of a Ray cluster — add --ray$"):
        validate(engines, "reference", data=images, latency_node="203.0.113.9", **FAST)


def test_every_image_gets_the_same_outputs(engines, images):
    """Per image, not just the summary: each shard's outputs, merged, are the local pass's arrays bit for bit."""
    job = _ShardJob("reference", engines, None, 1, 4)
    run = distributed.run_shards(_shard_outputs, job, [images], ["all"], SHARDS)  # one task, for the arrays' sake
    sharded = distributed.run_shards(_shard_outputs, job, [_subset(images, i, i + 8) for i in range(0, SAMPLES, 8)], ["a", "b", "c"], SHARDS)
    notes: list[str] = []
    base, _ = _open_reference("reference", engines, notes, None, 1)
    models = [base, *[_open_engine(s, None, notes) for s in engines]]
    try:
        local = _accuracy_outputs(models, _Inputs(images, 4))
    finally:
        for m in models:
            m.close()
    for merged in (run.results[0], type(local).merged(sharded.results, images.source)):
        assert merged.names == local.names and merged.labels == local.labels
        for theirs, ours in zip(merged.outputs, local.outputs, strict=True):
            assert theirs.keys() == ours.keys() and all(np.array_equal(theirs[k], ours[k]) for k in ours)


def test_a_random_preset_reference_goes_to_the_tasks_with_the_drivers_weights(tiny_onnx):
    """Every task would otherwise draw random weights of its own: the shards' references would all differ."""
    notes: list[str] = []
    base, acc_ref = _open_reference("vit_tiny", [EngineSpec(tiny_onnx)], notes, None, 1)
    try:
        assert acc_ref is None and _task_reference("vit_tiny", base, acc_ref) is base.engine.spec
        assert _task_reference("reference", base, base) == "reference"  # a separate accuracy reference: opened by its path
    finally:
        base.close()


def _subset(images: ImageSet, start: int, stop: int) -> ImageSet:
    return ImageSet(images.source, images.paths[start:stop], images.labels[start:stop])


def test_a_shard_of_unreadable_images_is_skipped_as_locally(ref_onnx, val_dir, tmp_path):
    data = tmp_path / "data"
    (data / "0").mkdir(parents=True)
    for i in range(8):  # the first shard: files that are not images
        (data / "0" / f"broken{i}.png").write_bytes(b"not a png")
    (data / "1").mkdir()
    for image in sorted((val_dir / "1").iterdir())[:8]:  # the second shard: real images
        shutil.copy(image, data / "1" / image.name)
    kw = {**FAST, "seed": 0}
    local = validate([EngineSpec(ref_onnx, "onnxruntime")], "reference", data=data, **kw)
    on_ray = validate([EngineSpec(ref_onnx, "onnxruntime")], "reference", data=data, ray=SHARDS, **kw)
    assert len(on_ray.data["data"]["skipped"]) == 8 and on_ray.data["data"] == local.data["data"]
    assert json.dumps(_accuracy_part(on_ray)) == json.dumps(_accuracy_part(local))


def test_a_shard_that_fails_for_good_is_named_and_no_report_is_written(engines, images, tmp_path):
    out = tmp_path / "report"
    failed = r"^shard \d of 3 \(images \d+-\d+ of .*\) failed for good: its worker process died \(no retries: max_retries=0\)"
    with pytest.raises(VitedgeError, match=failed) as exc:
        validate(engines, "reference", data=_killing(images, None), ray=distributed.RayOptions(shard_size=8, max_retries=0), out_dir=out, **FAST)
    assert "\n" not in str(exc.value)
    assert not out.exists()


_INTERRUPTED = """
import os, sys, time
from dataclasses import dataclass
from pathlib import Path
import ray
from vitedge.data import ImageSet
from vitedge.validation import validate

@dataclass
class Stalls(ImageSet):
    marker: str = ""
    driver_pid: int = 0

    def batches(self, pre, batch_size=8, min_count=1):
        if os.getpid() != self.driver_pid:  # a shard task: say so, then hang until cancelled
            Path(self.marker).touch()
            time.sleep(300)
        return super().batches(pre, batch_size, min_count)

engine, data, marker, out = sys.argv[1:]
ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
images = ImageSet.from_path(data).sample(16)
stalls = Stalls(images.source, images.paths, images.labels, marker=marker, driver_pid=os.getpid())
validate(engine, "reference", data=stalls, ray=True, out_dir=out, runs=2, rounds=1, batch_sizes=(1,))
"""


@pytest.mark.slow
def test_ctrl_c_leaves_no_report(ref_onnx, val_dir, tmp_path):
    marker, out = tmp_path / "shard-started", tmp_path / "report"
    proc = subprocess.Popen([sys.executable, "-c", _INTERRUPTED, str(ref_onnx), str(val_dir), str(marker), str(out)], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert marker.exists(), "no shard task started"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode != 0 and "KeyboardInterrupt" in err
    assert not out.exists()


# -- instruction sets ---------------------------------------------------------------------------------------------
def test_workers_report_their_instruction_sets():
    nodes, driver = distributed.nodes()
    assert driver is not None and driver in nodes and driver.isa == instruction_sets()


def test_shards_go_only_to_nodes_with_the_target_isa():
    found, driver = distributed.nodes()
    assert driver is not None
    other = distributed.Node("ab" * 28, "203.0.113.9", "another CPU", {k: not v for k, v in driver.isa.items()})
    eligible, left_out = distributed.eligible_nodes([*found, other], driver.isa)
    assert eligible == found and left_out == [other]
    # the selector Ray schedules the shards by: a task runs on an eligible node, never on another
    where = ray.remote(num_cpus=1)(lambda: ray.get_runtime_context().get_node_id())
    assert ray.get(where.options(label_selector=distributed.node_selector(eligible)).remote(), timeout=60) == driver.node_id
    with pytest.raises(ray.exceptions.TaskUnschedulableError):
        ray.get(where.options(label_selector=distributed.node_selector([other])).remote(), timeout=60)


def test_no_node_with_the_target_isa_is_refused_in_one_line():
    other = {k: not v for k, v in instruction_sets().items()}
    with pytest.raises(VitedgeError, match=r"^no Ray node has the target CPU's instruction sets .* which openvino int8's outputs depend on — "):
        distributed.run_shards(_shard_outputs, None, [None], ["shard 1 of 1"], distributed.RayOptions(), isa=other, why_isa="openvino int8's outputs")


@pytest.mark.slow
def test_benchmark_builds_and_accuracy_on_ray_give_the_local_numbers(tmp_path):
    """`vitedge benchmark --ray`: each build is a Ray task, the accuracy pass is sharded; the ranking's numbers are the local run's."""
    from vitedge.benchmarking import benchmark

    kw = dict(backends=["onnxruntime", "openvino"], precisions=["fp32"], samples=32, runs=2, rounds=1, batch_sizes=(1,))
    local = benchmark("reference", out_dir=tmp_path / "local", **kw)
    on_ray = benchmark("reference", out_dir=tmp_path / "ray", ray=distributed.RayOptions(shard_size=16), **kw)
    assert [m["name"] for m in on_ray.data["models"]] == [m["name"] for m in local.data["models"]] == ["pytorch fp32", "onnxruntime fp32", "openvino fp32"]
    assert json.dumps(_accuracy_part(on_ray)) == json.dumps(_accuracy_part(local))
    assert on_ray.data["settings"]["ray"]["shards"] == 2 and (tmp_path / "ray" / "report.json").is_file()


# -- the command -------------------------------------------------------------------------------------------------------
def test_cli_ray_flag(ref_onnx, val_dir, tmp_path):
    from click.testing import CliRunner

    from vitedge.cli.main import main

    args = ["validate", str(ref_onnx), "-r", "reference", "--val", str(val_dir), "--val-samples", "8", "--runs", "2", "--rounds", "1"]
    res = CliRunner().invoke(main, [*args, "--batch-sizes", "1", "-o", str(tmp_path), "--ray"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    settings = json.loads((tmp_path / "report.json").read_text())["settings"]
    assert settings["ray"]["address"] == "auto" and settings["ray"]["shards"] >= 1


def test_without_ray_flag_ray_is_never_imported(ref_onnx, val_dir, tmp_path):
    code = (
        "import sys\nfrom vitedge.cli.main import main\n"
        f"try:\n    main(['validate', {str(ref_onnx)!r}, '-r', 'reference', '--data', {str(val_dir)!r}, '--samples', '8', "
        f"'--runs', '2', '--rounds', '1', '--batch-sizes', '1', '-o', {str(tmp_path)!r}])\n"
        "except SystemExit as e:\n    assert not e.code, e.code\n"
        "print('ray' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip().splitlines()
    assert out[-1] == "False" and (tmp_path / "report.json").is_file()


# -- the INT8 search's independent evaluations -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def token_model(tmp_path_factory):
    """The token-outlier ViT (its default INT8 misses the target, so the search ranks its groups) and its photo crops."""
    from outlier_vit import exported_case, token_outlier_vit

    d = tmp_path_factory.mktemp("token")
    return exported_case(token_outlier_vit(0), d, "token"), d


@pytest.mark.e2e  # two searches of tens of seconds each
def test_the_search_ranks_on_ray_as_it_does_here(token_model, tmp_path):
    """quantize --ray: the ranking's groups run as Ray tasks (one core each) and score as they do in the local worker;
    the search then reverts the same groups and writes the same choice."""
    from vitedge.quantization import quantize

    path, d = token_model
    kw = dict(backend="onnxruntime", calib=d / "calib", val=d / "val", search_budget=180)
    _, here = quantize(path, tmp_path / "here.onnx", **kw)
    _, there = quantize(path, tmp_path / "there.onnx", ray=distributed.RayOptions(), **kw)
    local, remote = (json.loads((tmp_path / f"{k}.onnx.fidelity.json").read_text()) for k in ("here", "there"))
    assert not local["ray"] and remote["ray"] and remote["ray"][0]["items"] >= 3
    scores = {k: {r["group"]: r["divergence"] for r in t["ranking"]} for k, t in (("here", local), ("there", remote))}
    assert scores["here"].keys() == scores["there"].keys() and all(v is not None for v in scores["there"].values())
    for group, d_here in scores["here"].items():
        assert scores["there"][group] == pytest.approx(d_here, rel=1e-4, abs=1e-7), group
    assert there.quantization["kept_float_groups"] == here.quantization["kept_float_groups"]
    assert "- on Ray: " in (tmp_path / "there.onnx.fidelity.md").read_text()


def test_a_search_item_that_fails_costs_that_item_and_a_missing_file_is_named(tmp_path):
    from vitedge.errors import FileProblem
    from vitedge.quantization.worker import ray_calls

    assert "error" in ray_calls({}, [("time_models", {"fmt": "onnx", "models": [{"path": str(tmp_path)}], "sample": []})])
    with pytest.raises(FileProblem, match="not on this Ray node"):
        ray_calls({}, [("measure", {"fmt": "onnx", "model": "m.onnx", "data": str(tmp_path / "gone.npy"), "out_dir": str(tmp_path), "variants": []})])


def test_ray_is_refused_where_there_is_no_search(ref_onnx, tmp_path):
    from vitedge.quantization import quantize

    with pytest.raises(VitedgeError, match="--ray runs the INT8 search") as err:
        quantize(ref_onnx, tmp_path / "h.onnx", precision="fp16", ray="auto")
    assert "\n" not in str(err.value) and not (tmp_path / "h.onnx").exists()


@pytest.mark.parametrize("size", [pytest.param(None, marks=pytest.mark.e2e), (48, 80)])  # (the default suite keeps --size)
def test_a_dynamic_size_engine_on_ray_gives_the_local_numbers(tmp_path_factory, val_dir, size):
    """--size reaches the shard tasks: each model is fed at that size there as here (without it, a dynamic-size engine
    at its own size, as here)."""
    import torch

    import vitedge
    from vitedge import export_onnx, load_model

    torch.manual_seed(0)
    tiny = vitedge.VisionTransformer(img_size=64, patch_size=16, num_classes=10, d_model=64, num_heads=2, num_layers=2, d_ff=128, dropout=0.0)
    onnx, _ = export_onnx(load_model(tiny.eval()), tmp_path_factory.mktemp("dyn") / "dyn.onnx", dynamic_size=True, min_size=32, max_size=128, images=[])
    engine = EngineSpec(onnx, "openvino", {"config": {"INFERENCE_PRECISION_HINT": "f32"}})
    images = ImageSet.from_path(val_dir).sample(16, seed=1)
    here = validate([engine], onnx, data=images, size=size, **FAST)
    there = validate([engine], onnx, data=images, size=size, ray=distributed.RayOptions(shard_size=8), **FAST)
    assert json.dumps(_accuracy_part(there)) == json.dumps(_accuracy_part(here))
    assert there.data["settings"]["ray"]["shards"] == 2 and there.data["settings"].get("size") == (list(size) if size else None)
