"""Length buckets: run an encoder on sub-batches of similar caption length instead of the padded batch.

Captions of the world average ~12 tokens but a batch pads to its longest (24-30), and the text encoder,
the ALBEF fusion and the single-stream joint pass cost time in proportion to the padded length. With
`model.length_buckets: k` > 1 the rows are sorted by length, cut into k contiguous groups of (nearly)
equal row counts, and each group runs with its text cut to the group's longest row: the same rows per
step, the same result at every real position up to float rounding (attention never reads a padded key,
and every other operation is per position). Outputs are put back in the original row order, padded back
to the batch length T; positions past a row's group length are exactly 0. Nothing downstream reads them:
MLM / AMC / tags select labelled (real) positions, ITC / ITM read [CLS], WRC and mean-pooling mask padded
slots, and a later encoder pass masks them as keys.

A row's length is its extent (last real position + 1), so masks with holes (VLMixer's tag slots) are cut
safely. k = 1 calls the function on the whole batch: exactly the unbucketed code path. Rows never
interact inside the encoders, so the grouping changes no randomness (masks are drawn per sample before
the encoder; dropout, when configured, draws differently per group shape).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Callable, Optional, Union

import torch
from torch import Tensor

Outputs = Union[Tensor, tuple[Optional[Tensor], ...]]


def bucket_rows(attention_mask: Tensor, buckets: int) -> list[tuple[Tensor, int]]:
    """The groups of `run_in_length_buckets`: [(rows (b,) long, length L)] covering every row once.

    attention_mask (B, T), 1 / True = real token. Rows are sorted by extent (last real position + 1; a
    row with no real token counts as 1 when T > 0) and split into min(buckets, B) contiguous groups whose sizes
    differ by at most one; adjacent groups of equal length are merged (no padding is saved by splitting
    them). One host sync (the group lengths)."""
    _check_buckets(buckets)
    B, T = attention_mask.shape
    positions = torch.arange(1, T + 1, device=attention_mask.device)
    if T:
        extent = torch.where(attention_mask.bool(), positions, 0).amax(dim=1).clamp_min(1)
    else:
        extent = torch.zeros(B, dtype=torch.long, device=attention_mask.device)
    extent_sorted, order = extent.sort(stable=True)
    k = max(min(buckets, B), 1)
    base, extra = divmod(B, k)
    sizes = [base + 1] * extra + [base] * (k - extra)
    ends = torch.tensor(sizes, device=extent.device).cumsum(0) - 1
    lengths = extent_sorted[ends].tolist() if B else []
    groups: list[tuple[int, int, int]] = []  # (start, stop, length) in sorted order
    start = 0
    for size, length in zip(sizes, lengths):
        if groups and groups[-1][2] == length:
            groups[-1] = (groups[-1][0], start + size, length)
        else:
            groups.append((start, start + size, int(length)))
        start += size
    return [(order[a:b], length) for a, b, length in groups]


def run_in_length_buckets(
    fn: Callable[..., Outputs],
    attention_mask: Optional[Tensor],
    buckets: int,
    text: Sequence[Tensor] = (),
    rows: Sequence[Optional[Tensor]] = (),
) -> Outputs:
    """fn(mask, *text, *rows) run per length bucket, reassembled as if run on the whole batch.

    Args:
        fn: called as fn(mask (b, L), *text (b, L, ...), *rows (b, ...)) for each group of b rows cut to
            the group's length L. Returns a text-shaped tensor (b, L, ...), or a tuple whose first item is
            text-shaped and whose other items are row-shaped (b, ...) or None.
        attention_mask: (B, T), 1 / True = real token; None = run fn once on everything (no cutting).
        buckets: k >= 1; 1 = fn on the whole batch (exactly the unbucketed path).
        text: tensors (B, T, ...) cut with the mask (token ids, embeddings, hidden states).
        rows: per-row tensors (B, ...) or None, only indexed (image tokens and their mask, regions).

    Returns fn's outputs for all B rows in the original order: the text-shaped one padded back to (B, T, ...)
    with zeros past each group's length, the row-shaped ones (B, ...).
    """
    _check_buckets(buckets)
    if buckets == 1 or attention_mask is None or attention_mask.numel() == 0:
        return fn(attention_mask, *text, *rows)
    groups = bucket_rows(attention_mask, buckets)
    if len(groups) == 1 and groups[0][1] == attention_mask.shape[1]:  # nothing to cut: one call, no reindexing
        return fn(attention_mask, *text, *rows)
    T = attention_mask.shape[1]
    pieces: list[tuple[Optional[Tensor], ...]] = []
    returns_tuple = False
    for index, length in groups:
        mask_g = attention_mask[:, :length].index_select(0, index)
        text_g = [x[:, :length].index_select(0, index) for x in text]
        rows_g = [None if r is None else r.index_select(0, index) for r in rows]
        out = fn(mask_g, *text_g, *rows_g)
        returns_tuple = isinstance(out, tuple)
        pieces.append(out if returns_tuple else (out,))
    order = torch.cat([index for index, _ in groups])
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
    padded = [_pad_length(piece[0], T) for piece in pieces]
    outputs: list[Optional[Tensor]] = [torch.cat(padded).index_select(0, inverse)]
    for i in range(1, len(pieces[0])):
        parts = [piece[i] for piece in pieces]
        outputs.append(None if parts[0] is None else torch.cat(parts).index_select(0, inverse))
    return tuple(outputs) if returns_tuple else outputs[0]


def _check_buckets(buckets: int) -> None:
    if buckets < 1:
        raise ValueError(f"length buckets must be >= 1, got {buckets}: set model.length_buckets to 1 or more")


def _pad_length(x: Tensor, length: int) -> Tensor:
    """x (b, L, ...) -> (b, length, ...) with zeros after position L."""
    if x.shape[1] == length:
        return x
    return torch.cat([x, x.new_zeros(x.shape[0], length - x.shape[1], *x.shape[2:])], dim=1)
