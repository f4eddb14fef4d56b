"""What a measurement uses and competes for: this process's memory, the machine's load, its cores and threads.

``validate`` records the peak resident memory of opening and running each engine (:class:`RssPeak`), the
load average before and after timing with a warning when other processes competed for the cores
(:func:`load_record`), and gives the FP32 reference as many threads as the engines use
(:func:`reference_thread_count`).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence

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


def reference_thread_count(threads: int | None) -> int:
    """The FP32 reference's thread count: as given, else every usable core - what the ONNX Runtime and
    OpenVINO engines use by default, so that the speed-up compares like with like."""
    if threads is None:
        return usable_cores()
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
