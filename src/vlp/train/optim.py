"""Optimiser and learning-rate schedule (AdamW, linear warm-up then cosine decay).

Weight decay is applied only to weight matrices: biases, norm gains, embeddings, position / CLS tokens and
temperatures are excluded (the usual ViT/BERT recipe), see `param_groups`.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from vlp.config import TrainConfig

NO_DECAY_NAME_PARTS = ("embed", "norm", "token", "temp")


def no_weight_decay(name: str, param: torch.Tensor) -> bool:
    """True for parameters that must not be decayed: ndim < 2 or a name containing
    'embed', 'norm', 'token' or 'temp' (case-insensitive)."""
    lowered = name.lower()
    return param.ndim < 2 or any(part in lowered for part in NO_DECAY_NAME_PARTS)


def param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """Split the trainable parameters of `module` into a decayed and a non-decayed group.

    Frozen parameters (`requires_grad=False`, e.g. momentum copies) are left out; tied parameters appear
    once. Empty groups are dropped. Each group carries a `name` ("decay" / "no_decay") for logging.
    """
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, param in module.named_parameters():  # deduplicates tied parameters
        if not param.requires_grad:
            continue
        (no_decay if no_weight_decay(name, param) else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": float(weight_decay), "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError(f"{type(module).__name__} has no trainable parameters (all have requires_grad=False)")
    return groups


def build_optimizer(method: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over `param_groups(method, cfg.weight_decay)` with `cfg.lr` and `cfg.betas`.

    Uses the fused CUDA kernel when every trainable parameter lives on a CUDA device.
    """
    groups = param_groups(method, cfg.weight_decay)
    params = [p for g in groups for p in g["params"]]
    fused = all(p.is_cuda and p.is_floating_point() for p in params)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=1e-8, fused=fused or None)


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the base LR for the optimiser step with 0-based index `step`.

    Warm-up: `(step + 1) / warmup_steps` for `step < warmup_steps` (the first step already learns; the
    factor reaches 1 at step `warmup_steps - 1`). Then cosine from 1 down to `min_lr_ratio`, reached at
    `step == total_steps` and held afterwards:
    `min + (1 - min) * 0.5 * (1 + cos(pi * (step - warmup) / (total - warmup)))`.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> LambdaLR:
    """`LambdaLR` following `lr_factor` with the config's warm-up, total steps and floor.

    The schedule function is a closure, so a scheduler state dict holds only counters: resuming with a
    changed `steps` (e.g. to extend a run) follows the new config.
    """
    if not 0.0 <= cfg.min_lr_ratio <= 1.0:
        raise ValueError(f"train.min_lr_ratio must be in [0, 1], got {cfg.min_lr_ratio}")
    if cfg.warmup_steps < 0:
        raise ValueError(f"train.warmup_steps must be >= 0, got {cfg.warmup_steps}")
    warmup, total, floor = int(cfg.warmup_steps), int(cfg.steps), float(cfg.min_lr_ratio)

    def factor(step: int) -> float:
        return lr_factor(step, warmup, total, floor)

    return LambdaLR(optimizer, factor)
