"""Seeds every layer agrees on: the per-epoch generator seed and the sample-key layout.

Both the map-style sampler (`vlp.train.sampler`) and the shard stream (`vlp.data.shards`) order an epoch
with `epoch_seed(seed, epoch)` and key a sample as `seed * KEY_SEED_STRIDE + epoch * N + index`, so that
methods seeding per-sample randomness from `Batch.sample_keys` see the same kind of key from either source.
It sits below data/ and train/ so that both can import it.
"""

from __future__ import annotations

import numpy as np

KEY_SEED_STRIDE = 1 << 40  # room for 2**40 (epoch, row) pairs per seed before keys of two seeds could meet


def epoch_seed(seed: int, epoch: int) -> int:
    """The 63-bit generator seed of epoch `epoch` (a SeedSequence hash of (seed, epoch))."""
    entropy = [int(seed) & 0xFFFFFFFFFFFFFFFF, int(epoch)]
    state = np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


__all__ = ["KEY_SEED_STRIDE", "epoch_seed"]
