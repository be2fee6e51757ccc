"""Counter-based, per-sample random numbers (keyed by `Batch.sample_keys`).

A method that masks tokens or samples negatives with the global torch RNG gets a result that depends on
how the global batch was split over ranks / accumulation micro-batches and on everything that consumed
random numbers before it. `keyed_uniform` instead derives every number from (sample key, salt, element
position) with a stateless hash, so row `b` of the output depends only on `keys[b]`: the same on CPU and
CUDA, in a batch of 1 or of 1024, before and after a resume.

The hash is SplitMix64 (Steele, Lea & Flood 2014, "Fast splittable pseudorandom number generators"; the
finaliser is Stafford's "Mix13"), computed with torch int64 ops. Two details make signed int64 behave like
the reference uint64 code:
  * `+` and `*` wrap around modulo 2**64 in two's complement, which gives the same bits as uint64;
  * `>>` on a negative int64 is arithmetic (copies the sign bit), so every logical right shift is followed
    by a mask that clears the `s` top bits.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

_MASK64 = (1 << 64) - 1
_GOLDEN_GAMMA = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB


def _signed(value: int) -> int:
    """A uint64 constant as the int64 with the same bits."""
    value &= _MASK64
    return value - (1 << 64) if value >= (1 << 63) else value


def _srl(x: Tensor, shift: int) -> Tensor:
    """Logical right shift of int64 bits (torch's `>>` is arithmetic on negative values)."""
    return (x >> shift) & ((1 << (64 - shift)) - 1)


def _mix64(z: Tensor) -> Tensor:
    """SplitMix64 finaliser (bijective on 64-bit values), int64 in, int64 out."""
    z = (z ^ _srl(z, 30)) * _signed(_MIX1)
    z = (z ^ _srl(z, 27)) * _signed(_MIX2)
    return z ^ _srl(z, 31)


def _mix64_int(z: int) -> int:
    """Python-int reference of `_mix64` (used for the salt, which is a Python int)."""
    z &= _MASK64
    z = ((z ^ (z >> 30)) * _MIX1) & _MASK64
    z = ((z ^ (z >> 27)) * _MIX2) & _MASK64
    return z ^ (z >> 31)


def keyed_uniform(keys: Tensor, shape: tuple[int, ...], salt: int) -> Tensor:
    """Uniform floats in [0, 1) that depend only on (key, salt, position).

    Args:
        keys: (B,) integer tensor, one key per sample (e.g. `Batch.sample_keys`).
        shape: per-sample shape S; element positions are numbered in row-major order, so the value at a
            position does not depend on trailing sizes (e.g. a token position's draws do not change when
            the padded length T changes, as long as the per-token inner shape is the same).
        salt: distinguishes independent streams for the same sample (e.g. MLM masking vs ITM negatives).

    Returns:
        (B, *S) float32 on `keys.device`, multiples of 2**-24 in [0, 1) (24 random bits, exact in float32).
    """
    if keys.dim() != 1:
        raise ValueError(f"keyed_uniform expects keys of shape (B,), got {tuple(keys.shape)}")
    if keys.dtype.is_floating_point or keys.dtype == torch.bool:
        raise TypeError(f"keyed_uniform expects integer keys, got {keys.dtype}")
    shape = tuple(int(s) for s in shape)
    count = 1
    for s in shape:
        count *= s
    salt_bits = _signed(_mix64_int(_mix64_int(int(salt)) + _GOLDEN_GAMMA))
    # Per-sample stream seed: a double mix of the key, xor-ed with the salt's own mix.
    seed = _mix64(_mix64(keys.to(torch.int64) + _signed(_GOLDEN_GAMMA)) ^ salt_bits)  # (B,)
    # Element n of the stream = mix(seed + (n + 1) * gamma): exactly SplitMix64's n-th output.
    counter = torch.arange(1, count + 1, device=keys.device, dtype=torch.int64) * _signed(_GOLDEN_GAMMA)
    bits = _mix64(seed[:, None] + counter[None, :])  # (B, count)
    top24 = _srl(bits, 40).to(torch.float32)
    return (top24 * (1.0 / (1 << 24))).reshape(keys.shape[0], *shape)


def sample_uniforms(keys: Tensor | None, batch_size: int, shape: tuple[int, ...], salt: int,
                    device: torch.device) -> Tensor:
    """(B, *shape) uniforms for a batch: keyed by the batch's `sample_keys` when the trainer set them
    (rank- and split-independent, exact on resume), else drawn from torch's global RNG."""
    if keys is not None:
        return keyed_uniform(keys.to(device), shape, salt)
    return torch.rand((batch_size, *shape), device=device)


def step_task(step: int, weights: Sequence[float], salt: int) -> int:
    """Index of the task one optimizer step runs under ratio mixing (UNITER / CMAL: one task per step):
    task k with probability weights[k] / sum(weights), drawn from (step, salt) alone, so a resumed run draws
    the same tasks, every rank and micro-batch of a step agree, and the draw does not depend on the batch."""
    w = torch.tensor([float(x) for x in weights], dtype=torch.float64)
    if w.numel() == 0 or float(w.min()) < 0 or float(w.sum()) <= 0:
        raise ValueError(f"task weights must be >= 0 with a positive sum, got {list(weights)}")
    cdf = (w / w.sum()).cumsum(0)
    u = float(keyed_uniform(torch.tensor([int(step)]), (1,), salt)[0, 0])
    index = min(int((cdf <= u).sum()), len(w) - 1)
    while w[index] == 0:  # rounding at the top edge: the last task with weight
        index -= 1
    return index

