"""BEiT block masking of image patches, batched and driven by per-sample uniforms (torch only).

Masked image modelling (BEiT; SIMLA's MIM, spec `simla_vlmixer.md` §1.2 (c)) hides ~40 % (BEiT) or
75 / 256 patches (SIMLA) of the patch grid as a union of rectangular blocks. This follows BEiT's
`MaskingGenerator((h, w), num_masking_patches, min_num_patches, max_num_patches, min_aspect, max_aspect)`
(Bao, Dong, Piao, Wei, "BEiT: BERT Pre-Training of Image Transformers", ICLR 2022, Algorithm 1; code
microsoft/unilm `beit/masking_generator.py`, which SIMLA's `masking_generator.py` copies):

    until the mask holds num_masking_patches patches, or 10 attempts in a row fail:
        budget = min(num_masking_patches - masked, max_num_patches)
        area   ~ U(min_num_patches, budget)           (Python's random.uniform: either order of the bounds)
        aspect = exp(U(log min_aspect, log max_aspect))
        h, w   = round(sqrt(area * aspect)), round(sqrt(area / aspect))     (round half to even, as Python)
        if h < H and w < W (strict, as BEiT):
            top ~ U{0..H-h}, left ~ U{0..W-w}
            new = patches of the block not masked yet
            accept the block if 0 < new <= budget

Differences from BEiT, each on purpose:
  * Randomness: attempt a of sample b reads uniforms[b, a] = (area, aspect, top, left) in [0, 1) (pass
    `vlp.models.rng.sample_uniforms(batch.sample_keys, B, generator.uniform_shape, salt, device)`), so
    row b depends only on its key: the same mask in any batch, on any rank, after a resume. BEiT draws
    from Python's global `random` in the DataLoader workers.
  * Batched: the loop runs over a fixed number of attempts A (uniforms.shape[1]) for the whole batch,
    never over samples; a sample that is done (budget spent, or `max_failures` failures in a row) stops
    changing. BEiT's loop has no cap: a sample still going after A attempts keeps what it has (with
    SIMLA's settings and A = 64, none of 20 000 keyed samples was still going; at A = 32, 10 were).
    Given the same draws, the masks equal BEiT's (`tests/test_masking.py` runs a line-by-line port).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
from torch import Tensor

BLOCK_DRAWS = 4  # uniforms per attempt: target area, log-aspect, top, left
DEFAULT_ATTEMPTS = 64  # attempts per sample a caller draws uniforms for (the second dim of `uniforms`)


class BlockMasks(NamedTuple):
    """mask: (B, h*w) bool, row-major patch order (True = masked).
    blocks: (B, A, 4) long, attempt a's rectangle [top, left, height, width] (drawn, accepted or not;
        zeros for attempts not run because every sample was done).
    accepted: (B, A) bool, whether attempt a's block was added to the mask."""

    mask: Tensor
    blocks: Tensor
    accepted: Tensor


@dataclass(frozen=True)
class BlockMaskGenerator:
    """BEiT's `MaskingGenerator(input_size, num_masking_patches, min_num_patches, max_num_patches, min_aspect,
    max_aspect)` as a batched, deterministic function of per-sample uniforms (module docstring).

    Args:
        input_size: (H, W) patches (SIMLA: (16, 16)).
        num_masking_patches: the most patches masked per sample (SIMLA: 75; BEiT: 0.4 * H * W).
        min_num_patches: the smallest target block area (BEiT's pre-training default and SIMLA: 16; the
            class default of BEiT's generator is 4).
        max_num_patches: the largest target block area (None: num_masking_patches).
        min_aspect, max_aspect: block aspect (h / w) range, drawn log-uniformly (None: 1 / min_aspect).
        attempts: A, the attempts per sample `uniform_shape` asks uniforms for (BEiT has no cap); the
            generator runs as many attempts as the uniforms it is given cover.
        max_failures: a sample stops after this many failed attempts in a row (BEiT: 10).

    Example (SIMLA's MIM: 75 of 16 x 16 patches, blocks of >= 16 patches, aspect 0.3 - 3.3)::

        generator = BlockMaskGenerator((16, 16), 75)
        u = sample_uniforms(batch.sample_keys, B, generator.uniform_shape, SALT_MIM, device)
        mim_mask = generator(u)  # (B, 256) bool
    """

    input_size: tuple[int, int]
    num_masking_patches: int
    min_num_patches: int = 16
    max_num_patches: Optional[int] = None
    min_aspect: float = 0.3
    max_aspect: Optional[float] = None
    attempts: int = DEFAULT_ATTEMPTS
    max_failures: int = 10

    def __post_init__(self) -> None:
        height, width = (int(x) for x in self.input_size)
        if height < 1 or width < 1:
            raise ValueError(f"input_size must be (H, W) with H, W >= 1, got {self.input_size}")
        if not 0 <= self.num_masking_patches <= height * width:
            raise ValueError(f"num_masking_patches must be in [0, {height * width}], got {self.num_masking_patches}")
        if self.min_num_patches < 0:
            raise ValueError(f"min_num_patches must be >= 0, got {self.min_num_patches}")
        if not self.min_aspect > 0:
            raise ValueError(f"min_aspect must be > 0, got {self.min_aspect}")
        if not self.min_aspect <= (self.max_aspect if self.max_aspect is not None else 1.0 / self.min_aspect):
            raise ValueError(f"need min_aspect <= max_aspect, got {self.min_aspect} and {self.max_aspect}")
        if self.attempts < 1 or self.max_failures < 1:
            raise ValueError(f"attempts and max_failures must be >= 1, got {self.attempts} and {self.max_failures}")

    @property
    def uniform_shape(self) -> tuple[int, int]:
        """Per-sample shape of the uniforms to draw: (attempts, BLOCK_DRAWS)."""
        return self.attempts, BLOCK_DRAWS

    def __call__(self, uniforms: Tensor) -> Tensor:
        """uniforms (B, A, BLOCK_DRAWS) in [0, 1) -> (B, H*W) bool mask (True = masked), row-major patches."""
        return self.with_blocks(uniforms).mask

    def with_blocks(self, uniforms: Tensor) -> BlockMasks:
        """The masks of `__call__` together with every attempt's block and whether it was accepted.

        A = uniforms.shape[1] attempts are run (at most; fewer once every sample is done)."""
        if uniforms.dim() != 3 or uniforms.shape[-1] != BLOCK_DRAWS:
            raise ValueError(f"uniforms must be (B, attempts, {BLOCK_DRAWS}), got {tuple(uniforms.shape)}")
        height, width = (int(x) for x in self.input_size)
        num_masking_patches, min_num_patches, max_failures = (self.num_masking_patches, self.min_num_patches,
                                                              self.max_failures)
        max_block = num_masking_patches if self.max_num_patches is None else int(self.max_num_patches)
        max_aspect = self.max_aspect if self.max_aspect is not None else 1.0 / self.min_aspect
        log_lo, log_hi = math.log(self.min_aspect), math.log(max_aspect)
        B, A = uniforms.shape[:2]
        device = uniforms.device
        u = uniforms.to(torch.float64)  # BEiT computes in Python floats (float64)
        rows = torch.arange(height, device=device)
        cols = torch.arange(width, device=device)
        mask = torch.zeros(B, height, width, dtype=torch.bool, device=device)
        masked = torch.zeros(B, dtype=torch.long, device=device)
        failures = torch.zeros(B, dtype=torch.long, device=device)
        blocks = torch.zeros(B, A, 4, dtype=torch.long, device=device)
        accepted = torch.zeros(B, A, dtype=torch.bool, device=device)
        for attempt in range(A):
            draw = u[:, attempt]
            budget = (num_masking_patches - masked).clamp(max=max_block)  # BEiT's max_mask_patches
            active = (masked < num_masking_patches) & (failures < max_failures)
            area = min_num_patches + draw[:, 0] * (budget - min_num_patches)  # random.uniform(min, budget)
            aspect = torch.exp(log_lo + draw[:, 1] * (log_hi - log_lo))
            h = torch.round(torch.sqrt(area * aspect)).long()
            w = torch.round(torch.sqrt(area / aspect)).long()
            fits = (h < height) & (w < width)
            # random.randint(0, H - h) = floor(u * (H - h + 1)), clamped (u rounding up; blocks that do not fit)
            top = torch.minimum(torch.floor(draw[:, 2] * (height - h + 1)).long(), height - h).clamp(min=0)
            left = torch.minimum(torch.floor(draw[:, 3] * (width - w + 1)).long(), width - w).clamp(min=0)
            in_rows = (rows[None, :] >= top[:, None]) & (rows[None, :] < (top + h)[:, None])  # (B, H)
            in_cols = (cols[None, :] >= left[:, None]) & (cols[None, :] < (left + w)[:, None])  # (B, W)
            block = in_rows[:, :, None] & in_cols[:, None, :]  # (B, H, W)
            new = (block & ~mask).sum(dim=(1, 2))
            accept = active & fits & (new > 0) & (new <= budget)
            mask |= block & accept[:, None, None]
            masked += torch.where(accept, new, torch.zeros_like(new))
            failures = torch.where(accept, torch.zeros_like(failures), failures + 1)
            blocks[:, attempt] = torch.stack([top, left, h, w], dim=1)
            accepted[:, attempt] = accept
            if attempt % 16 == 15 and not bool(((masked < num_masking_patches) & (failures < max_failures)).any()):
                break  # every sample is done (one host sync per 16 attempts); later attempts would change nothing
        return BlockMasks(mask.reshape(B, height * width), blocks, accepted)


__all__ = ["BLOCK_DRAWS", "BlockMaskGenerator", "BlockMasks", "DEFAULT_ATTEMPTS"]
