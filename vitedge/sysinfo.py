"""The machine a measurement ran on: CPU model, cores, instruction sets, memory, library versions.

Printed with every benchmark and stored in every report, because a latency number means nothing
without the machine.  Instruction sets are read from ``/proc/cpuinfo`` flags (Linux); elsewhere
they are reported as unknown rather than guessed.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

from .manifest import library_versions
from .ui import err_console

# report name -> /proc/cpuinfo flag(s); any listed flag present means "yes"
ISA_FLAGS: dict[str, tuple[str, ...]] = {
    "AVX2": ("avx2",),
    "FMA": ("fma",),
    "AVX-512F": ("avx512f",),
    "AVX-512 VNNI": ("avx512_vnni",),
    "AVX-VNNI": ("avx_vnni",),
    "AVX-512 BF16": ("avx512_bf16",),
    "AVX-512 FP16": ("avx512_fp16",),
    "AMX-BF16": ("amx_bf16",),
    "AMX-INT8": ("amx_int8",),
}


def _cpuinfo(path: str = "/proc/cpuinfo") -> tuple[str | None, set[str] | None]:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return None, None
    model, flags = None, None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "cpu model", "hardware") and model is None:
            model = value.strip()
        elif key in ("flags", "features") and flags is None:
            flags = set(value.split())
        if model and flags is not None:
            break
    return model, flags


def instruction_sets(flags: set[str] | None = None) -> dict[str, bool | None]:
    """``{"AVX2": True, "AVX-512 VNNI": True, ...}``; values are None when flags are unknown."""
    if flags is None:
        _, flags = _cpuinfo()
    if flags is None:
        return dict.fromkeys(ISA_FLAGS)
    return {name: any(f in flags for f in want) for name, want in ISA_FLAGS.items()}


def machine_info() -> dict:
    """Everything about the machine that a latency figure depends on (JSON-serialisable)."""
    import psutil

    model, flags = _cpuinfo()
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = None
    return {
        "cpu": model or platform.processor() or platform.machine() or "unknown",
        "arch": platform.machine(),
        "logical_cores": psutil.cpu_count(logical=True),
        "physical_cores": psutil.cpu_count(logical=False),
        "usable_cores": affinity,
        "instruction_sets": instruction_sets(flags),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "os": f"{platform.system()} {platform.release()}",
        "load_average": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "versions": library_versions(),
    }


def isa_summary(info: dict | None = None) -> str:
    """``"AVX2 yes, AVX-512F yes, AVX-512 VNNI yes, AVX-512 BF16 yes, AMX no"``."""
    isa = (info or machine_info())["instruction_sets"]
    shown = ["AVX2", "AVX-512F", "AVX-512 VNNI", "AVX-512 BF16"]
    parts = [f"{k} {'?' if isa.get(k) is None else ('yes' if isa[k] else 'no')}" for k in shown]
    amx = [isa.get("AMX-INT8"), isa.get("AMX-BF16")]
    parts.append("AMX " + ("?" if None in amx else ("yes" if any(amx) else "no")))
    return ", ".join(parts)


def machine_summary(info: dict | None = None) -> str:
    """One line: ``AMD EPYC, 2 cores (2 logical), 23 GB; AVX2 yes, ...``."""
    info = info or machine_info()
    cores = info.get("usable_cores") or info.get("logical_cores")
    phys = info.get("physical_cores")
    core_txt = f"{cores} cores" + (f" ({phys} physical)" if phys and phys != cores else "")
    return f"{info['cpu']}, {core_txt}, {info['memory_gb']:g} GB RAM; {isa_summary(info)}"


def print_machine(info: dict | None = None) -> dict:
    """Print the machine line on stderr (with every benchmark) and return the info."""
    info = info or machine_info()
    err_console.print(f"[bold]machine:[/] {machine_summary(info)}", soft_wrap=True, highlight=False)
    return info
