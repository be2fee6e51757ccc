"""Process-group setup from the environment `torchrun` provides.

`torchrun --nproc_per_node=N -m vlp.cli.main train ...` sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT for every process. `init_distributed()` turns that into a process group (gloo on CPU, NCCL
on CUDA, with the process bound to GPU LOCAL_RANK); without those variables (or with WORLD_SIZE=1) it
does nothing, so the same code runs single-process. `shutdown()` destroys the group again;
`distributed_session()` wraps both for scripts.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from datetime import timedelta
from typing import Iterator

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 1800.0


def env_world_size() -> int:
    """WORLD_SIZE from the environment (1 when not launched by torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def env_local_rank() -> int:
    """LOCAL_RANK from the environment (0 when not launched by torchrun)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def select_device(preference: str = "auto") -> torch.device:
    """The device this process trains on.

    `auto` = CUDA when available (GPU LOCAL_RANK under torchrun) else CPU; `cuda` without a GPU raises.
    """
    if preference not in ("auto", "cpu", "cuda"):
        raise ValueError(f"unknown device '{preference}' (expected auto, cpu or cuda)")
    if preference == "cpu" or (preference == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is available: use train.device=auto or cpu")
    local_rank = env_local_rank()
    if local_rank >= torch.cuda.device_count():
        raise RuntimeError(
            f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA device(s) are visible; "
            "launch at most one process per GPU"
        )
    return torch.device("cuda", local_rank)


def init_distributed(device: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """Create the default process group from torchrun's environment variables if needed.

    Returns True when this call created the group (the caller then owns `shutdown()`), False when the
    run is single-process or a group already exists. The backend is NCCL when the process trains on
    CUDA (after `torch.cuda.set_device(LOCAL_RANK)`), gloo otherwise.
    """
    if dist.is_available() and dist.is_initialized():
        return False
    world = env_world_size()
    if world <= 1:
        return False
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed support")
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(
            f"WORLD_SIZE={world} but {', '.join(missing)} not set: launch with torchrun "
            "(python -m torch.distributed.run --nproc_per_node=N ...)"
        )
    target = select_device(device)
    if target.type == "cuda":
        torch.cuda.set_device(target)
        dist.init_process_group("nccl", timeout=timedelta(seconds=timeout_s), device_id=target)
    else:
        dist.init_process_group("gloo", timeout=timedelta(seconds=timeout_s))
    return True


def shutdown() -> None:
    """Destroy the default process group if one exists."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Synchronise all ranks (no-op single-process)."""
    if dist.is_available() and dist.is_initialized():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


@contextmanager
def distributed_session(device: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S) -> Iterator[bool]:
    """`with distributed_session(): ...` initialises from torchrun's environment and always destroys the
    group it created on exit (also on errors). Yields whether a group was created."""
    created = init_distributed(device, timeout_s)
    try:
        yield created
    finally:
        if created:
            shutdown()
