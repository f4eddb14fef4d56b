"""What a measurement uses and competes for: this process's memory, the machine's load, its cores and threads.

``validate`` records the peak resident memory of opening and running each engine (:class:`RssPeak`), the
load average before and after timing with a warning when other processes competed for the cores
(:func:`load_record`), reads how many cores other processes leave free (:func:`read_cpu`), runs the FP32
reference and the engines with a thread count that fits them (:meth:`CpuReading.fitting_threads`,
:func:`reference_thread_count`) and withholds a speed-up that the machine's load would distort
(:func:`speedup_withheld`).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import VitedgeError


# ------------------------------------------------------------------------------------------
# memory
# ------------------------------------------------------------------------------------------
class RssPeak:
    """Samples this process's resident memory in a thread; ``peak_mb`` and ``increase_mb`` after exit."""

    def __init__(self, interval: float = 0.005):
        import psutil

        self._proc = psutil.Process()
        self.interval = interval
        self.baseline = self.peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            self._stop.wait(self.interval)

    def __enter__(self) -> RssPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)

    @property
    def peak_mb(self) -> float:
        return self.peak / 2**20

    @property
    def increase_mb(self) -> float:
        return max(0, self.peak - self.baseline) / 2**20


# ------------------------------------------------------------------------------------------
# cores and threads
# ------------------------------------------------------------------------------------------
def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity), else the machine's logical cores."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def reference_thread_count(threads: int | None, fitting: int | None = None) -> int:
    """The FP32 reference's thread count: as given, else ``fitting`` (the cores other processes leave free,
    :meth:`CpuReading.fitting_threads`, which the engines get too), else every usable core - what the ONNX
    Runtime and OpenVINO engines use by default, so that the speed-up compares like with like."""
    if threads is None:
        return fitting or usable_cores()
    if int(threads) < 1:
        raise VitedgeError(f"--reference-threads {threads} must be >= 1")
    return int(threads)


def torch_threads() -> int:
    """PyTorch's intra-op thread count (process-wide: a PyTorch reference sets it)."""
    import torch

    return torch.get_num_threads()


def set_torch_threads(n: int) -> None:
    import torch

    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


# ------------------------------------------------------------------------------------------
# machine load
# ------------------------------------------------------------------------------------------
#: the 1-minute load average per usable core above which the machine counts as busy.  The reading
#: taken after timing includes vitedge's own threads (at most about one per core), so a load above
#: one per core means other processes competed for the cores.
BUSY_LOAD_PER_CORE = 1.0


def load_average() -> list[float] | None:
    """The 1-, 5- and 15-minute load averages (``os.getloadavg``), or None where the OS has none."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def busy_machine_warning(readings: Sequence[Sequence[float] | None], cores: int, per_core: float = BUSY_LOAD_PER_CORE) -> str | None:
    """The warning to give when a 1-minute load average in ``readings`` (``[1 min, 5 min, 15 min]`` each,
    None if unknown) is above ``per_core`` times ``cores``; None when the machine was quiet."""
    ones = [float(r[0]) for r in readings if r]
    if not ones or max(ones) <= per_core * cores:
        return None
    return (
        f"the machine was busy (load {max(ones):.2f} on {cores} core{'s' if cores != 1 else ''}): "
        "timings and speed-ups are unreliable; re-run on a quiet machine"
    )


def load_record(start, before, after, cores: int) -> dict:
    """``machine.load`` in a report: the load averages around timing and whether the machine was busy."""
    warning = busy_machine_warning([start, before, after], cores)
    return {
        "at_start": start,
        "before_timing": before,
        "after_timing": after,
        "cores": cores,
        "busy_load_per_core": BUSY_LOAD_PER_CORE,
        "busy": warning is not None,
        "warning": warning,
    }


# ------------------------------------------------------------------------------------------
# free cores, and when a speed-up cannot be measured
# ------------------------------------------------------------------------------------------
#: fewer cores than this left free by other processes: no thread count fits, and a speed-up measured now is withheld
MIN_FREE_CORES = 0.5
#: the PyTorch reference slower than this factor times its own 1-thread run: its threads waited for cores
#: (OpenMP threads spin at a barrier for a core another process holds; seen at 200x on a 2-core machine at load 4)
MAX_THREAD_SLOWDOWN = 3.0


@dataclass(frozen=True)
class CpuReading:
    """How busy this process's cores were with *other* processes during a short sample (:func:`read_cpu`).

    ``others`` is in cores' worth of CPU time (2.0: two cores fully taken), this process's own CPU time
    excluded; ``load`` the load averages at the time (recorded, not used: they include vitedge's own past work).
    """

    cores: int
    others: float
    load: list[float] | None = None

    @property
    def free(self) -> float:
        return max(0.0, self.cores - self.others)

    def fitting_threads(self) -> int:
        """The thread count that fits the free cores (at least 1, at most every core)."""
        return max(1, min(self.cores, int(self.free + 0.5)))

    def to_dict(self) -> dict:
        return {"cores": self.cores, "busy_with_others": round(self.others, 2), "free": round(self.free, 2), "load_average": self.load}


def read_cpu(sample_s: float = 0.25) -> CpuReading:
    """Sample how busy this process's cores (its CPU affinity) are with other processes, for ``sample_s`` seconds.

    Per-core busy time from the kernel's counters (``psutil.cpu_times(percpu=True)``; steal counts as busy),
    minus this process's own CPU time in the same interval.  Call it while vitedge itself is idle.  Tests
    replace this function (``vitedge.resources.read_cpu``) to give a reading of their choosing.
    """
    import psutil

    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = list(range(psutil.cpu_count() or 1))
    me = psutil.Process()

    def busy() -> tuple[float, float]:
        per = psutil.cpu_times(percpu=True)
        total = sum(sum(per[i]) - per[i].idle - getattr(per[i], "iowait", 0.0) for i in cpus if i < len(per))
        own = me.cpu_times()
        return total, own.user + own.system

    t0, (b0, own0) = time.perf_counter(), busy()
    time.sleep(sample_s)
    t1, (b1, own1) = time.perf_counter(), busy()
    others = max(0.0, (b1 - b0) - (own1 - own0)) / max(t1 - t0, 1e-6)
    return CpuReading(len(cpus), min(float(len(cpus)), others), load_average())


def speedup_withheld(readings: Sequence[CpuReading], threads: int, calibration: tuple[float, float] | None = None) -> str | None:
    """Why a speed-up measured now would be distorted by other processes (None: it holds).

    ``readings``: the free cores around timing; fewer than :data:`MIN_FREE_CORES` free in any of them and no
    thread count fits.  ``calibration``: the PyTorch reference's median (ms) at ``threads`` threads in the timed
    rounds and at 1 thread just before: more than :data:`MAX_THREAD_SLOWDOWN` times slower with its threads
    means they waited for cores other processes held (one thread cannot wait for another).
    """
    for r in readings:
        if r.free < MIN_FREE_CORES:
            return f"other processes kept {r.others:.1f} of {r.cores} core{'s' if r.cores != 1 else ''} busy (less than {MIN_FREE_CORES:g} core free)"
    if calibration is not None:
        many, one = calibration
        if many > MAX_THREAD_SLOWDOWN * one:
            return (
                f"the FP32 reference ran {many / one:.1f}x slower at {threads} threads ({many:.2f} ms) than at 1 thread "
                f"({one:.2f} ms): its threads waited for cores other processes held"
            )
    return None
