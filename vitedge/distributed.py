"""Independent evaluations on a Ray cluster (``--ray``): vitedge's only contact with Ray.

vitedge schedules nothing itself.  A caller cuts its work into shards, and :func:`run_shards` runs one
plain ``ray.remote`` task per shard, with Ray's own retries (``max_retries``): a task whose worker process
dies (killed, out of memory, its node lost) runs again, on any eligible node, from the start of its shard.
An exception raised by the shard's own code is not retried (it would fail the same way again): the shard
fails for good at once.  A shard that fails for good stops the run with a one-line error that names it;
the caller writes nothing.

Results that depend on the CPU's instruction sets (an OpenVINO engine runs bf16 on a CPU with AMX or
AVX-512 BF16 and f32 elsewhere) must not mix machines: with ``isa=...`` a shard runs only on the nodes whose
instruction sets (:func:`vitedge.sysinfo.instruction_sets`, reported by a probe task on each node) equal
the target's, selected with Ray's built-in ``ray.io/node-id`` node label; no such node is a one-line error.

Ray is imported inside the functions: without ``--ray`` it is never loaded (``pip install "vitedge[ray]"``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import BackendUnavailable, VitedgeError
from .sysinfo import isa_summary, machine_info

#: how often a shard whose worker died is run again before it counts as failed for good
DEFAULT_RETRIES = 3


@dataclass(frozen=True)
class RayOptions:
    """Where and how to run on Ray: ``address`` None or ``"auto"``: the cluster this machine belongs to (``RAY_ADDRESS``,
    else the one ``ray start`` started here), else a new local one; else a cluster address (``HOST:6379``,
    ``ray://HOST:10001``).  ``latency_node``: see :func:`on_node`.  ``shard_size``: images per task (default: two shards per CPU of the cluster, a
    multiple of the evaluation batch)."""

    address: str | None = None
    latency_node: str | None = None  # the node (IP or ID) that measures latency; None: the driver's
    shard_size: int | None = None
    max_retries: int = DEFAULT_RETRIES

    @classmethod
    def of(cls, value: RayOptions | str | bool | None) -> RayOptions | None:
        """``--ray`` as given to the API: None/False (no Ray), True or ``"auto"``, an address, or options."""
        if value is None or value is False:
            return None
        if isinstance(value, RayOptions):
            return value
        return cls(None if value is True or str(value).lower() == "auto" else str(value))


@dataclass
class Node:
    """A node of the cluster as a probe task running on it saw it."""

    node_id: str
    ip: str
    cpu: str
    isa: dict[str, bool | None]
    shards: int = 0  # shards whose result came from this node

    def describe(self) -> str:
        return f"{self.ip} ({self.cpu}; {isa_summary({'instruction_sets': self.isa})})"


@dataclass
class ShardRun:
    """The results of :func:`run_shards`, in shard order, and the nodes that computed them."""

    results: list[Any]
    nodes: list[Node]
    driver: Node | None  # this process's node, when it is part of the cluster
    restricted: list[str] = field(default_factory=list)  # nodes left out because their ISA differs from the target's

    def summary(self) -> dict:
        return {
            "nodes": [{"node_id": n.node_id, "ip": n.ip, "cpu": n.cpu, "shards": n.shards} for n in self.nodes if n.shards],
            "shards": len(self.results),
            "left_out_for_isa": self.restricted,
        }


def connect(options: RayOptions) -> None:
    """Connect to Ray unless this process already is (a notebook's ``ray.init``, the tests'): that connection is used
    as it is.  A connection made here lasts until the process ends (Ray closes it, and stops a local cluster it
    started, at exit), so the steps of one command share it."""
    try:
        import ray
    except ImportError:
        raise BackendUnavailable("--ray needs Ray, which is not installed", 'pip install "vitedge[ray]"') from None
    if ray.is_initialized():
        return
    try:
        # workers' output (progress bars, library logs) stays in Ray's logs; errors come back as exceptions
        ray.init(address=options.address, log_to_driver=False, include_dashboard=False, logging_level=logging.ERROR)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = options.address or "this machine's cluster"
        raise VitedgeError(f"cannot connect to Ray at {where}: {str(exc).splitlines()[0]}", "start it with `ray start --head` or give --ray ADDRESS") from None


def cluster_cpus() -> int:
    """The CPUs of the cluster (what the default shard size is cut for)."""
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def nodes() -> tuple[list[Node], Node | None]:
    """Every alive node as seen from a probe task pinned to it (its CPU and instruction sets), and the driver's node."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe = ray.remote(num_cpus=0)(_probe)
    alive = [n["NodeID"] for n in ray.nodes() if n.get("Alive")]
    seen = ray.get([probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(nid, soft=False)).remote() for nid in alive])
    found = [Node(nid, ip, cpu, isa) for nid, (ip, cpu, isa) in zip(alive, seen, strict=True)]
    try:
        here = ray.get_runtime_context().get_node_id()
    except Exception:  # a Ray Client driver runs outside the cluster
        here = None
    return found, next((n for n in found if n.node_id == here), None)


def _probe() -> tuple[str, str, dict]:
    """On a node: its IP, CPU model and instruction sets."""
    import ray

    info = machine_info()
    return ray.util.get_node_ip_address(), info["cpu"], info["instruction_sets"]


def on_node(node: str, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` in a task pinned to ``node`` (its IP or node ID): how latency is measured on a node that is not the
    driver's.  The task takes no CPU: the shard tasks it starts need them, and it times only once they are done."""
    import ray
    from ray.exceptions import RayTaskError
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    found, _ = nodes()
    match = next((n for n in found if node in (n.ip, n.node_id)), None)
    if match is None:
        raise VitedgeError(f"--latency-node {node} is not a node of the Ray cluster", f"give one of {', '.join(n.ip for n in found)} (or a node ID)")
    strategy = NodeAffinitySchedulingStrategy(match.node_id, soft=False)
    ref = ray.remote(fn).options(num_cpus=0, max_retries=0, scheduling_strategy=strategy).remote(*args)
    try:
        return ray.get(ref)
    except RayTaskError as exc:  # the task's own error (a vitedge error's one line), as if raised here
        raise (exc.cause if exc.cause is not None else exc) from None
    except BaseException:
        ray.cancel(ref, force=True)
        raise


def run_shards(
    fn: Callable[[Any, Any], Any],
    job: Any,
    shards: Sequence[Any],
    names: Sequence[str],
    options: RayOptions,
    *,
    isa: dict[str, bool | None] | None = None,
    why_isa: str = "",
) -> ShardRun:
    """``[fn(job, shard) for shard in shards]``, one Ray task per shard (``job`` is sent once through the object store).

    ``names``: how the error message names each shard.  ``isa``: run only on nodes with exactly these
    instruction sets (``why_isa`` says which results depend on them, for the error when no node has them).
    Ctrl-C cancels the tasks and raises KeyboardInterrupt; a shard that fails for good raises a
    :class:`~vitedge.errors.VitedgeError` naming it, after cancelling the others."""
    connect(options)
    import ray
    from ray.exceptions import RayError

    found, driver = nodes()
    eligible, restricted = eligible_nodes(found, isa, why_isa)
    task_options: dict[str, Any] = {"num_cpus": 1, "max_retries": options.max_retries, "retry_exceptions": False}
    if restricted:
        task_options["label_selector"] = node_selector(eligible)
    remote = ray.remote(_on_node).options(**task_options)
    job_ref = ray.put(job)
    refs = [remote.remote(fn, job_ref, shard) for shard in shards]
    index = {ref: i for i, ref in enumerate(refs)}
    results: list[Any] = [None] * len(refs)
    by_id = {n.node_id: n for n in found}
    try:
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            i = index[ready[0]]
            try:
                node_id, results[i] = ray.get(ready[0])
            except RayError as exc:
                cause = _cause(exc, options.max_retries)
                raise VitedgeError(f"{names[i]} failed for good: {cause}", "nothing was written; fix the cause and run again") from None
            if node_id in by_id:
                by_id[node_id].shards += 1
    except BaseException:  # a failed shard, Ctrl-C: stop the others, leave nothing running
        for ref in refs:
            ray.cancel(ref, force=True)
        raise
    return ShardRun(results, found, driver, [n.describe() for n in restricted])


def eligible_nodes(found: list[Node], isa: dict[str, bool | None] | None, why_isa: str = "") -> tuple[list[Node], list[Node]]:
    """(the nodes a shard may run on, the nodes left out because their instruction sets are not ``isa``); ``isa``
    None: every node.  No eligible node is a one-line error saying which results need the target's CPU."""
    if isa is None:
        return found, []
    eligible = [n for n in found if n.isa == isa]
    if not eligible:
        raise VitedgeError(
            f"no Ray node has the target CPU's instruction sets ({isa_summary({'instruction_sets': isa})}), which {why_isa} depend on",
            "add a node of the same CPU type to the cluster, or validate without --ray",
        )
    return eligible, [n for n in found if n.isa != isa]


def node_selector(eligible: list[Node]) -> dict[str, str]:
    """A task's ``label_selector`` for these nodes: Ray labels every node with its ID (``ray.io/node-id``), so a retry
    may still go to any of them."""
    return {"ray.io/node-id": f"in({','.join(n.node_id for n in eligible)})"}


def _on_node(fn: Callable[[Any, Any], Any], job: Any, shard: Any) -> tuple[str, Any]:
    """The task: ``fn(job, shard)`` and the node it ran on."""
    import ray

    return ray.get_runtime_context().get_node_id(), fn(job, shard)


def _cause(exc: BaseException, retries: int) -> str:
    """One line: the shard's own error (a vitedge error's message as is), or how its worker died."""
    from ray.exceptions import NodeDiedError, RayTaskError, TaskCancelledError, WorkerCrashedError

    if isinstance(exc, RayTaskError):
        cause = exc.cause if exc.cause is not None else exc
        text = str(cause) if isinstance(cause, VitedgeError) else f"{type(cause).__name__}: {cause}"
        return " ".join(text.split("\n")[0].split())
    if isinstance(exc, TaskCancelledError):
        return "its task was cancelled"
    if isinstance(exc, (WorkerCrashedError, NodeDiedError)):
        what = "its worker process died" if isinstance(exc, WorkerCrashedError) else "its node died"
        return what + (f" {retries + 1} times (Ray ran it again {retries} times)" if retries else " (no retries: max_retries=0)")
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
