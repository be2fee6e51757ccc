"""Rank / world-size queries and feature collectives for the trainer and methods.

The gathers and `global_token_mean` (a position-mean loss, e.g. MLM, as the mean over every rank's positions)
are implemented in `vlp.models.losses` (the losses need them, and `models/` may import only torch); this
module is their home for `train/` and re-exports them, plus `all_reduce_mean` for logging.
All functions are no-ops (return their input / 0 / 1) when no process group is initialised.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from vlp.models.losses import (
    all_gather_no_grad,
    all_gather_with_grad,
    global_token_mean,
    is_distributed,
    rank,
    step_token_totals,
    world_size,
)

__all__ = ["is_distributed", "rank", "world_size", "all_gather_with_grad", "all_gather_no_grad", "all_reduce_mean",
           "global_token_mean", "step_token_totals"]


@torch.no_grad()
def all_reduce_mean(x: Tensor) -> Tensor:
    """Mean of `x` over ranks (a detached float copy; `x` itself is left untouched). For logging."""
    y = x.detach().float().clone()
    if world_size() == 1:
        return y
    dist.all_reduce(y, op=dist.ReduceOp.SUM)
    return y / world_size()
