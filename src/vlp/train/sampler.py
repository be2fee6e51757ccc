"""Step-indexed, deterministic data order (exact, O(1) resume from any step).

The stream of training rows is the concatenation of per-epoch permutations: epoch `e` is
`torch.randperm(N, generator=seeded(seed, e))`. Global step `k` consumes stream rows `[k*B, (k+1)*B)`
(B = global batch; a step may straddle an epoch boundary). Rank `r` of `W` takes the contiguous slice
`[r*B/W, (r+1)*B/W)` of that global batch, and gradient accumulation splits a rank's slice into
`grad_accum` consecutive micro-batches. Because the position is a pure function of the step, resuming at
step `k` costs nothing (no replay of earlier epochs) and the rows of a step do not depend on the number
of ranks, accumulation micro-batches or DataLoader workers.

Every row also gets a `sample_key = seed * KEY_SEED_STRIDE + epoch * N + dataset_index`: unique per
(seed, epoch, dataset row), so methods can derive per-sample randomness from it (`Batch.sample_keys`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from vlp.seeds import KEY_SEED_STRIDE, epoch_seed  # re-exported: the sampler's keys and epoch order


@dataclass(frozen=True)
class StepRows:
    """The rows one rank consumes at one step."""

    indices: Tensor  # (B/W,) long, dataset indices in consumption order
    keys: Tensor  # (B/W,) long, sample keys (see module docstring)
    epochs: Tensor  # (B/W,) long, the epoch each row belongs to


class StepSampler:
    """Deterministic step -> rows mapping; see the module docstring for the exact order.

    Args:
        dataset_len: number of rows N in the (map-style) dataset.
        batch_size: the global batch B per optimiser step (all ranks and micro-batches together).
        world_size, rank: the data-parallel layout.
        grad_accum: micro-batches per step; `B` must be divisible by `world_size * grad_accum`.
        seed: the run seed (epoch permutations and sample keys depend on it).
    """

    def __init__(
        self,
        dataset_len: int,
        batch_size: int,
        world_size: int = 1,
        rank: int = 0,
        grad_accum: int = 1,
        seed: int = 0,
    ) -> None:
        if dataset_len <= 0:
            raise ValueError(f"the training dataset is empty (len {dataset_len}); check data.budget / the split")
        if batch_size <= 0 or world_size <= 0 or grad_accum <= 0:
            raise ValueError(
                f"train.batch_size ({batch_size}), world size ({world_size}) and train.grad_accum "
                f"({grad_accum}) must all be positive"
            )
        if batch_size % (world_size * grad_accum) != 0:
            raise ValueError(
                f"train.batch_size={batch_size} (the global batch) must be divisible by world_size * "
                f"grad_accum = {world_size} * {grad_accum} = {world_size * grad_accum}; e.g. use "
                f"batch_size={max(1, batch_size // (world_size * grad_accum)) * world_size * grad_accum}"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside [0, world_size={world_size})")
        self.dataset_len = int(dataset_len)
        self.batch_size = int(batch_size)
        self.world_size = int(world_size)
        self.rank = int(rank)
        self.grad_accum = int(grad_accum)
        self.seed = int(seed)
        self.per_rank = self.batch_size // self.world_size
        self.micro_batch = self.per_rank // self.grad_accum
        self._perms: dict[int, Tensor] = {}
        self._recent: dict[int, StepRows] = {}

    def epoch_permutation(self, epoch: int) -> Tensor:
        """The dataset order of `epoch` (cached; at most a few epochs are kept)."""
        perm = self._perms.get(epoch)
        if perm is None:
            generator = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
            perm = torch.randperm(self.dataset_len, generator=generator)
            if len(self._perms) >= 4:
                self._perms.pop(min(self._perms))
            self._perms[epoch] = perm
        return perm

    def stream_rows(self, start: int, stop: int) -> StepRows:
        """Rows `[start, stop)` of the concatenated epoch stream."""
        if start < 0 or stop < start:
            raise ValueError(f"invalid stream range [{start}, {stop})")
        n = self.dataset_len
        index_parts, epoch_parts = [], []
        position = start
        while position < stop:  # one slice per epoch touched (usually one)
            epoch, offset = divmod(position, n)
            take = min(stop - position, n - offset)
            index_parts.append(self.epoch_permutation(epoch)[offset:offset + take])
            epoch_parts.append(torch.full((take,), epoch, dtype=torch.long))
            position += take
        if not index_parts:
            empty = torch.empty(0, dtype=torch.long)
            return StepRows(indices=empty, keys=empty, epochs=empty)
        indices = index_parts[0] if len(index_parts) == 1 else torch.cat(index_parts)
        epochs = epoch_parts[0] if len(epoch_parts) == 1 else torch.cat(epoch_parts)
        keys = epochs * n + indices + self.seed * KEY_SEED_STRIDE
        return StepRows(indices=indices, keys=keys, epochs=epochs)

    def global_rows(self, step: int) -> StepRows:
        """All B rows of global step `step` (0-based), in rank-major order."""
        return self.stream_rows(step * self.batch_size, (step + 1) * self.batch_size)

    def rank_rows(self, step: int) -> StepRows:
        """This rank's contiguous B/W rows of step `step` (the last few steps are cached: the loader's
        batch sampler and the trainer both ask for them)."""
        rows = self._recent.get(step)
        if rows is None:
            start = step * self.batch_size + self.rank * self.per_rank
            rows = self.stream_rows(start, start + self.per_rank)
            if len(self._recent) >= 32:
                self._recent.pop(next(iter(self._recent)))
            self._recent[step] = rows
        return rows

    def epoch_at(self, step: int) -> float:
        """Fractional epoch reached after `step` optimiser steps (samples seen / N)."""
        return step * self.batch_size / self.dataset_len

    def state(self) -> dict:
        """What fixes the order (stored in checkpoints to detect an order change on resume)."""
        return {"seed": self.seed, "dataset_len": self.dataset_len, "batch_size": self.batch_size}


class StepBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Yields this rank's dataset indices for steps `start_step .. end_step - 1` (one list per step),
    for use as a DataLoader `batch_sampler`: the DataLoader then produces exactly one collated batch
    per optimiser step, whatever its number of workers."""

    def __init__(self, sampler: StepSampler, start_step: int, end_step: int) -> None:
        self.sampler = sampler
        self.start_step = int(start_step)
        self.end_step = int(end_step)

    def __iter__(self):
        for step in range(self.start_step, self.end_step):
            yield self.sampler.rank_rows(step).indices.tolist()

    def __len__(self) -> int:
        return max(0, self.end_step - self.start_step)
