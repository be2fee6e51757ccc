"""The CPU a run actually has: torch's thread count and whether bf16 pays off there.

Threads. torch defaults to one intra-op thread per core it can see, whatever else runs: next to a
DataLoader worker (a process of its own) on a 2-core machine a tiny ALBEF step measured 12 s with the
default threads against 1.05 s with one thread per process (oversubscribed OpenMP threads spin and
wait on each other). `train.threads` (0 = auto) sets the count once per command: auto = the cores this
process may run on (`os.sched_getaffinity`) / the processes on this host (torchrun's LOCAL_WORLD_SIZE)
- `data.num_workers`, at least 1. `VLP_THREADS=N` is the default of `train.threads: 0` (for commands
whose recorded settings should not change with the machine, e.g. a resumable report).

bf16 on CPU. Without AVX-512 BF16 or AMX, bf16 matmul is emulated: ~1 GFLOP/s against ~55 fp32 on the
machine that measured it, and a bf16-autocast training step 7.7x slower than fp32. On such a CPU
`train.precision: bf16` (and fp16, which runs as bf16 on CPU) falls back to fp32 with a warning;
`VLP_FORCE_CPU_BF16=1` keeps bf16. CUDA runs are not affected.

`configure_cpu` does both for a command and returns a `RuntimeInfo` whose `describe()` line heads the
run (the trainer prints it and writes `runtime.json` into the run directory).
"""

from __future__ import annotations

import functools
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import torch

THREADS_ENV = "VLP_THREADS"
FORCE_BF16_ENV = "VLP_FORCE_CPU_BF16"
FAST_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
CPUINFO = "/proc/cpuinfo"
# What the issue measured on a CPU without bf16 hardware (AVX2 / AVX-512 without BF16).
SLOWDOWN_NOTE = "bf16 matmul ~1 GFLOP/s vs ~55 fp32; a bf16-autocast step measured 7.7x slower"


# ------------------------------------------------------------------------------------------- threads
def available_cores() -> int:
    """The cores this process may run on (its affinity mask, e.g. under taskset or a container's cpuset),
    else `os.cpu_count()`."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # macOS / Windows have no sched_getaffinity
        return max(1, os.cpu_count() or 1)


def processes_per_host() -> int:
    """The training processes sharing this host: torchrun's LOCAL_WORLD_SIZE (1 outside torchrun)."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def choose_threads(requested: int, data_workers: int, processes_per_host: int = 1,
                   cores: Optional[int] = None) -> int:
    """Intra-op threads of one process: `requested` when > 0; 0 = auto = this process's share of the
    cores (`cores` // `processes_per_host`) minus its `data_workers` (each a process of its own), at least 1."""
    if requested < 0:
        raise ValueError(f"train.threads must be >= 0 (0 = auto), got {requested}")
    if requested > 0:
        return int(requested)
    cores = available_cores() if cores is None else cores
    return max(1, cores // max(1, processes_per_host) - max(0, data_workers))


def apply_threads(n: int) -> int:
    """Set torch's intra-op threads to `n` (and its inter-op threads, when torch still allows it: that
    count is fixed once parallel work has started); returns `torch.get_num_threads()`."""
    if n < 1:
        raise ValueError(f"thread count must be >= 1, got {n}")
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    try:
        if torch.get_num_interop_threads() != n:
            torch.set_num_interop_threads(n)
    except RuntimeError:  # "cannot set number of interop threads after parallel work has started"
        pass
    return torch.get_num_threads()


# ---------------------------------------------------------------------------------------------- bf16
@functools.lru_cache(maxsize=8)
def _cpu_flags(path: str) -> Optional[frozenset[str]]:
    """The CPU feature flags of `path` (/proc/cpuinfo: `flags` on x86, `Features` on ARM); None when unreadable."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in ("flags", "features"):
            return frozenset(value.split())
    return None


def cpu_capability() -> str:
    """torch's CPU dispatch level (`DEFAULT`, `AVX2`, `AVX512`, ...)."""
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except Exception:  # pragma: no cover - very old torch
        return "unknown"


def cpu_bf16_support(cpuinfo: str | Path = CPUINFO, capability: Optional[str] = None) -> tuple[bool, str]:
    """Whether bf16 matmul runs in hardware on this CPU, and a one-phrase reason.

    Fast iff /proc/cpuinfo lists avx512_bf16 or amx_bf16, or torch's capability names AMX. When cpuinfo
    cannot be read the capability decides (AVX-512 alone does not mean BF16: not fast, "flags unknown")."""
    capability = cpu_capability() if capability is None else capability
    flags = _cpu_flags(str(cpuinfo))
    if "AMX" in capability.upper():
        return True, f"capability {capability}"
    if flags is None:
        return False, f"capability {capability}, bf16 flags unknown ({cpuinfo} unreadable)"
    found = [f for f in FAST_BF16_FLAGS if f in flags]
    if found:
        return True, f"capability {capability}, {' '.join(found)}"
    return False, f"capability {capability}, no avx512_bf16/amx_bf16"


def _forced() -> bool:
    return os.environ.get(FORCE_BF16_ENV, "").strip().lower() not in ("", "0", "false", "no")


def resolve_precision(precision: str, device_type: str) -> tuple[str, Optional[str]]:
    """The precision a run on `device_type` uses for `train.precision` = `precision`, and a warning when
    it differs: on a CPU without bf16 hardware (`cpu_bf16_support`) bf16 and fp16 (bf16 on CPU) fall back
    to fp32 unless VLP_FORCE_CPU_BF16=1. Anything else (CUDA, fp32, a CPU with support) is unchanged."""
    if device_type != "cpu" or precision not in ("bf16", "fp16"):
        return precision, None
    fast, reason = cpu_bf16_support()
    if fast or _forced():
        return precision, None
    as_bf16 = " (fp16 runs as bf16 on CPU)" if precision == "fp16" else ""
    return "fp32", (f"train.precision={precision}{as_bf16} is slow on this CPU ({reason}: {SLOWDOWN_NOTE}); "
                    f"training in fp32 instead. Set {FORCE_BF16_ENV}=1 to keep {precision}.")


# ---------------------------------------------------------------------------------------- the command
@dataclass
class RuntimeInfo:
    """What `configure_cpu` chose for this process (`describe()` is the run's header line)."""

    device: str
    cores: int
    processes_per_host: int
    data_workers: int
    requested_threads: int  # train.threads (0 = auto)
    threads_source: str  # "train.threads" | "VLP_THREADS" | "auto"
    threads: int  # torch.get_num_threads() after applying
    cpu_capability: str
    bf16_fast: bool
    bf16_reason: str
    precision: str  # train.precision
    effective_precision: str  # what the run uses (fp32 after a CPU fallback)
    precision_note: Optional[str] = None

    def describe(self) -> str:
        return describe_runtime(self)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "header": self.describe()}


def describe_runtime(info: RuntimeInfo) -> str:
    """One line, e.g. `cpu: 2 cores available, torch threads 1 (auto: 2 cores - 1 data worker),
    capability AVX2, bf16 matmul slow`."""
    if info.threads_source == "auto":
        share = f"{info.cores} cores"
        if info.processes_per_host > 1:
            share += f" / {info.processes_per_host} processes"
        workers = f" - {info.data_workers} data worker{'s' if info.data_workers != 1 else ''}" if info.data_workers else ""
        why = f"auto: {share}{workers}"
    else:
        why = f"{info.threads_source}={info.threads}"
    speed = f"bf16 matmul {'fast' if info.bf16_fast else 'slow'}"
    line = (f"cpu: {info.cores} cores available, torch threads {info.threads} ({why}), capability "
            f"{info.cpu_capability}, {speed}")
    if info.device != "cpu":
        line = f"device {info.device}; {line}"
    if info.effective_precision != info.precision:
        line += f"; precision {info.precision} -> {info.effective_precision} ({FORCE_BF16_ENV}=1 keeps {info.precision})"
    return line


def _env_threads() -> int:
    text = os.environ.get(THREADS_ENV, "").strip()
    if not text:
        return 0
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{THREADS_ENV} must be a whole number of threads, got {text!r}") from None
    if value < 0:
        raise ValueError(f"{THREADS_ENV} must be >= 0 (0 = auto), got {value}")
    return value


def configure_cpu(train: Any, data_workers: int = 0, device: torch.device | str = "cpu") -> RuntimeInfo:
    """Apply a command's CPU settings: torch threads from `train.threads` (> 0 wins; else VLP_THREADS;
    else auto: the available cores / processes on this host - `data_workers`) and report the precision the
    run uses (`resolve_precision`; `vlp.train.precision.autocast_dtype` applies the same fallback).
    Idempotent: the trainer and the evaluation commands call it; `train` is a `TrainConfig`."""
    requested = int(getattr(train, "threads", 0) or 0)
    source = "train.threads"
    if requested < 0:
        raise ValueError(f"train.threads must be >= 0 (0 = auto), got {requested}")
    if requested == 0:
        requested, source = _env_threads(), THREADS_ENV
    if requested == 0:
        source = "auto"
    cores, procs = available_cores(), processes_per_host()
    threads = apply_threads(choose_threads(requested, data_workers, procs, cores))
    device = torch.device(device)
    fast, reason = cpu_bf16_support()
    precision = str(getattr(train, "precision", "fp32"))
    effective, note = resolve_precision(precision, device.type)
    return RuntimeInfo(
        device=str(device), cores=cores, processes_per_host=procs, data_workers=int(data_workers),
        requested_threads=requested, threads_source=source, threads=threads, cpu_capability=cpu_capability(),
        bf16_fast=fast, bf16_reason=reason, precision=precision, effective_precision=effective, precision_note=note,
    )


__all__ = ["RuntimeInfo", "apply_threads", "available_cores", "choose_threads", "configure_cpu", "cpu_bf16_support",
           "cpu_capability", "describe_runtime", "processes_per_host", "resolve_precision"]
