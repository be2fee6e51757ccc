"""Training: the step-exact, method-agnostic loop (`Trainer`), checkpoints, optimiser/schedule,
deterministic step sampler and process-group setup."""

from vlp.train.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_model_weights,
    resolve_checkpoint,
    save_checkpoint,
)
from vlp.train.loop import Trainer, seed_everything
from vlp.train.optim import build_optimizer, build_scheduler, param_groups
from vlp.train.sampler import StepSampler

__all__ = [
    "Trainer",
    "seed_everything",
    "CheckpointError",
    "save_checkpoint",
    "load_checkpoint",
    "load_model_weights",
    "resolve_checkpoint",
    "build_optimizer",
    "build_scheduler",
    "param_groups",
    "StepSampler",
]
