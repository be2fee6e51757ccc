"""vlp.models.masking: BEiT block masking, batched and keyed (SIMLA's MIM: 75 of 16 x 16 patches)."""

from __future__ import annotations

import math

import pytest
import torch

from vlp.models.masking import BLOCK_DRAWS, DEFAULT_ATTEMPTS, BlockMaskGenerator
from vlp.models.rng import keyed_uniform

SALT = 0x4D494D  # any salt: the tests only need fixed streams
GRID = (16, 16)


SIMLA = BlockMaskGenerator(GRID, 75, min_num_patches=16, min_aspect=0.3)  # simla_vlmixer.md §1.2 (c)


def uniforms(keys, attempts: int = DEFAULT_ATTEMPTS) -> torch.Tensor:
    return keyed_uniform(torch.as_tensor(keys), (attempts, BLOCK_DRAWS), SALT)


def beit_reference(u: list[list[float]], height: int, width: int, num_masking_patches: int, min_num_patches: int,
                   min_aspect: float) -> list[list[int]]:
    """microsoft/unilm beit/masking_generator.py `MaskingGenerator.__call__` / `_mask`, line by line, with
    Python's `random` calls replaced by this sample's uniforms, one row (area, aspect, top, left) per attempt."""
    max_num_patches = num_masking_patches
    log_aspect_ratio = (math.log(min_aspect), math.log(1 / min_aspect))
    mask = [[0] * width for _ in range(height)]
    draws = iter(u)

    def _mask(max_mask_patches):
        delta = 0
        for _attempt in range(10):
            ua, ur, ut, ul = next(draws)
            target_area = min_num_patches + (max_mask_patches - min_num_patches) * ua  # random.uniform
            aspect_ratio = math.exp(log_aspect_ratio[0] + (log_aspect_ratio[1] - log_aspect_ratio[0]) * ur)
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if w < width and h < height:
                top = min(int(ut * (height - h + 1)), height - h)  # random.randint(0, height - h)
                left = min(int(ul * (width - w + 1)), width - w)
                num_masked = sum(mask[i][j] for i in range(top, top + h) for j in range(left, left + w))
                if 0 < h * w - num_masked <= max_mask_patches:
                    for i in range(top, top + h):
                        for j in range(left, left + w):
                            if mask[i][j] == 0:
                                mask[i][j] = 1
                                delta += 1
            if delta > 0:
                break
        return delta

    mask_count = 0
    try:
        while mask_count < num_masking_patches:
            max_mask_patches = min(num_masking_patches - mask_count, max_num_patches)
            delta = _mask(max_mask_patches)
            if delta == 0:
                break
            mask_count += delta
    except StopIteration:  # out of attempts (the batched version's cap)
        pass
    return mask


def test_matches_beit_masking_generator_on_the_same_draws():
    keys = list(range(300))
    u = uniforms(keys)
    assert SIMLA.uniform_shape == (DEFAULT_ATTEMPTS, BLOCK_DRAWS) == tuple(u.shape[1:])
    got = SIMLA(u)
    for b in range(len(keys)):
        want = beit_reference(u[b].double().tolist(), 16, 16, 75, 16, 0.3)
        assert got[b].reshape(16, 16).long().tolist() == want, b
    # other settings too: BEiT's own (40 % of 14 x 14, min block 16) and a small grid with small blocks
    u = uniforms(range(100), 128)
    got = BlockMaskGenerator((14, 14), 75, min_num_patches=16)(u)
    small = BlockMaskGenerator((5, 7), 12, min_num_patches=2, min_aspect=0.5)(u)
    for b in range(100):
        assert got[b].reshape(14, 14).long().tolist() == beit_reference(u[b].double().tolist(), 14, 14, 75, 16, 0.3)
        assert small[b].reshape(5, 7).long().tolist() == beit_reference(u[b].double().tolist(), 5, 7, 12, 2, 0.5)


def test_counts_on_simla_settings():
    mask = SIMLA(uniforms(range(1000)))
    assert mask.shape == (1000, 256) and mask.dtype == torch.bool
    counts = mask.sum(dim=1)
    assert (counts <= 75).all() and (counts >= 16).all()
    assert counts.float().mean() > 70  # BEiT's rule nearly always fills the budget


def test_mask_is_the_union_of_accepted_rectangles():
    out = SIMLA.with_blocks(uniforms(range(64)))
    rows, cols = torch.arange(16), torch.arange(16)
    for b in range(64):
        union = torch.zeros(16, 16, dtype=torch.bool)
        covered = 0
        for (top, left, h, w), ok in zip(out.blocks[b].tolist(), out.accepted[b].tolist()):
            if not ok:
                continue
            rect = ((rows >= top) & (rows < top + h))[:, None] & ((cols >= left) & (cols < left + w))[None, :]
            assert 0 < int((rect & ~union).sum()) <= 75 - covered  # each block adds 0 < new <= budget
            covered += int((rect & ~union).sum())
            union |= rect
        assert torch.equal(union.reshape(-1), out.mask[b])
        assert 1 <= int(out.accepted[b].sum()) < 75


def test_keyed_rows_are_reproducible_distinct_and_batch_independent():
    keys = torch.arange(5000, 5016)
    mask = SIMLA(uniforms(keys))
    assert torch.equal(mask, SIMLA(uniforms(keys)))  # same keys, same masks
    assert len({tuple(row.tolist()) for row in mask}) == 16  # different rows differ
    for subset in ([3], [15, 2, 7], list(range(0, 16, 2))):  # other batch compositions
        part = SIMLA(uniforms(keys[subset]))
        assert torch.equal(part, mask[subset])


def test_validation_and_edge_cases():
    u = uniforms(range(4))
    assert not BlockMaskGenerator(GRID, 0)(u).any()  # nothing to mask
    with pytest.raises(ValueError, match="uniforms must be"):
        SIMLA(u[..., :3])
    with pytest.raises(ValueError, match="num_masking_patches"):
        BlockMaskGenerator(GRID, 300)
    with pytest.raises(ValueError, match="min_aspect"):
        BlockMaskGenerator(GRID, 75, min_aspect=0.0)
    with pytest.raises(ValueError, match="min_aspect <= max_aspect"):
        BlockMaskGenerator(GRID, 75, min_aspect=2.0)
    capped = BlockMaskGenerator(GRID, 75, max_num_patches=20).with_blocks(u)  # BEiT's cap on each block's budget
    for b in range(4):
        blocks = capped.blocks[b][capped.accepted[b]]
        assert (blocks[:, 2] * blocks[:, 3] <= 20 + 16).all()  # area ~ U(16, 20), rounding of h and w aside
