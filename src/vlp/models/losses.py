"""Pure pre-training losses: ITC (contrastive), ITM (+ hard-negative sampling), MLM (+ BERT masking).

Each loss is one small function of tensors (open_clip `loss.py` style), so ALBEF, SIMLA and the other
methods share them and each is tested on hand-computed cases. References:

* ALBEF: Li, Selvaraju, Gotmare, Joty, Xiong, Hoi, "Align before Fuse: Vision and Language Representation
  Learning with Momentum Distillation", NeurIPS 2021 (paper eqs. 1-6; code salesforce/ALBEF
  `models/model_pretrain.py`, `models/model_retrieval.py`).
* CLIP / open_clip `ClipLoss` (local_loss=True + gather_with_grad) for the cross-rank ITC.
* BERT (Devlin et al. 2019) 80/10/10 masking, as in ALBEF's `mask()`.

The cross-rank gathers live here, next to the losses that need them (open_clip keeps `gather_features`
in `loss.py` as well): `models/` may import torch only, so the trainer's `vlp.train.distributed`
re-exports them rather than the other way round.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100


# ------------------------------------------------------------------------------ distributed helpers
def is_distributed() -> bool:
    """True when a default process group is initialised (any world size)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank in the default group (0 when not distributed)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of processes in the default group (1 when not distributed)."""
    return dist.get_world_size() if is_distributed() else 1


def all_gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate `x` (N, ...) from every rank along dim 0 -> (world*N, ...), differentiably.

    The backward sums, for each rank's slice, the gradients of every rank's loss (reduce-scatter), so a
    loss computed from local rows against gathered columns, averaged over ranks by DDP, has exactly the
    gradient of the same loss on the full batch (open_clip `gather_features(gather_with_grad=True)`).
    Every rank must pass the same shape. Returns `x` itself when not distributed.
    """
    if world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    with warnings.catch_warnings():  # deprecated in favour of _functional_collectives; same semantics
        warnings.simplefilter("ignore", FutureWarning)
        parts = all_gather(x.contiguous())
    return torch.cat(parts, dim=0)


@torch.no_grad()
def all_gather_no_grad(x: Tensor) -> Tensor:
    """Concatenate `x` (N, ...) from every rank along dim 0, without gradient (ids, momentum features)."""
    if world_size() == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x)
    return torch.cat(parts, dim=0)


# ------------------------------------------------------------------ means over the global batch's positions
class StepTokenTotals:
    """The global count of the positions each named position-mean loss averages over in one optimiser step
    (every rank, every accumulation micro-batch), set by the trainer around the step (`step_token_totals`).

    `totals[name]` = that count (summed over ranks); `scale` = world_size x grad_accum, so that the trainer's
    division by grad_accum and DDP's average over ranks leave the global mean. `seen[name]` sums this rank's
    local counts as the losses report them, for the trainer's check that the method counted what it averages.
    """

    def __init__(self, totals: dict[str, Tensor], scale: int) -> None:
        self.totals = totals
        self.scale = scale
        self.seen: dict[str, Tensor] = {}


_STEP_TOTALS: StepTokenTotals | None = None


@contextmanager
def step_token_totals(totals: dict[str, Tensor], scale: int) -> Iterator[StepTokenTotals]:
    """Within the block, `global_token_mean(..., name)` of a name in `totals` divides by that step total
    (times `scale`) instead of all-reducing the count of its own micro-batch. Yields the `StepTokenTotals`."""
    global _STEP_TOTALS
    previous, _STEP_TOTALS = _STEP_TOTALS, StepTokenTotals(totals, scale)
    try:
        yield _STEP_TOTALS
    finally:
        _STEP_TOTALS = previous


def global_token_mean(sums: Tensor, count: Tensor | int, name: str | None = None) -> Tensor:
    """Sum(s) over this rank's positions -> this rank's share of the mean over the positions of all ranks.

    A position-mean loss (MLM: cross-entropy over the masked tokens) computed as a per-rank mean weights a
    token by 1 / (its rank's count): 2 ranks and 1 process on the same global batch then differ whenever
    the ranks mask different numbers of tokens. Here the count is all-reduced (one collective, no grad) and
    the result is `sums / global_count * world_size`: DDP's gradient average over ranks (and the logged mean
    over ranks) then is exactly the mean over every rank's positions. Single-process it is `sums / count`,
    bit for bit. Every rank must call it the same number of times (a collective), even with no position.

    Under `step_token_totals` holding `name` (the trainer, for a method with `token_counts`), the divisor is
    that step's global count over all accumulation micro-batches and no collective runs: the step's loss is
    then the mean over the global batch's positions however it is cut into micro-batches.

    Args:
        sums: any shape, e.g. a scalar loss sum or a stack of several sums over the same positions.
        count: this rank's number of positions (int or integer tensor).
        name: the loss's name in the trainer's step totals (e.g. "mlm"), or None.

    Returns:
        `sums`' shape; 0 where no rank has a position.
    """
    count = torch.as_tensor(count, device=sums.device)
    scope = _STEP_TOTALS
    if scope is not None and name is not None and name in scope.totals:
        scope.seen[name] = scope.seen[name] + count.detach() if name in scope.seen else count.detach()
        return sums / scope.totals[name].to(sums.device).clamp_min(1) * scope.scale
    if world_size() == 1:
        return sums / count.clamp_min(1)
    total = count.detach().to(torch.float64).clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return sums / total.to(sums.dtype).clamp_min(1) * world_size()


# ------------------------------------------------------------------------------------------- ITC
def pad_length(x: Tensor, length: int) -> Tensor:
    """Right-pad dim 1 of x (B, T, ...) with zeros to `length` (texts of several ranks gathered together)."""
    extra = length - x.shape[1]
    if extra == 0:
        return x
    return F.pad(x, [0, 0] * (x.dim() - 2) + [0, extra])


def contrastive_targets(row_ids: Tensor, col_ids: Tensor) -> Tensor:
    """Multi-positive targets: row i's mass spread evenly over the columns with its image id.

    Args:
        row_ids: (B,) image id of each row.
        col_ids: (C,) image id of each column (negative ids, e.g. -1, never match a real image).

    Returns:
        (B, C) float, rows sum to 1 (ALBEF retrieval fine-tune `sim_targets = pos_idx / pos_idx.sum(1)`).
    """
    positive = (row_ids[:, None] == col_ids[None, :]).float()
    return positive / positive.sum(dim=1, keepdim=True).clamp_min(1.0)


def soft_cross_entropy(
    logits: Tensor,
    soft_targets: Tensor,
    dim: int = -1,
    valid: Tensor | None = None,
    *,
    log_probs: Tensor | None = None,
) -> Tensor:
    """Cross-entropy against soft targets: the mean over rows of -sum_c q[c] * log_softmax(logits)[c].

    The distillation term of ALBEF (paper eq. 6, ITC and MLM) and SIMLA (ITC, MLM, MIM): q = the softmax of
    momentum-model logits, mixed or not with one-hot targets. The softmax runs over `dim`, the class axis
    (ALBEF's and SIMLA's released MLM code used the sequence axis, a typo: salesforce/ALBEF#58). Computed
    in float32 (`logits.float()`).

    Args:
        logits: (..., C, ...) with the C classes on `dim`, e.g. (B, C) or (B, T, V).
        soft_targets: logits-shaped, each row a distribution over `dim` (not checked).
        dim: the class axis.
        valid: rows-shaped bool (logits' shape without `dim`) or None. With it only valid rows count:
            the sum over them divided by their number (exactly 0, still attached to the graph, when none
            is valid), e.g. the masked positions of MLM / MIM.
        log_probs: `log_softmax(logits.float(), dim)` when the caller has it already (`mlm_loss` shares one
            log-softmax, and so one backward, between its hard and soft terms); `logits` is then unused.

    Returns:
        scalar.
    """
    if log_probs is None:
        log_probs = F.log_softmax(logits.float(), dim=dim)
    per_row = -(soft_targets.float() * log_probs).sum(dim=dim)
    if valid is None:
        return per_row.mean()
    return torch.where(valid, per_row, torch.zeros_like(per_row)).sum() / valid.sum().clamp_min(1)


def contrastive_loss(
    image_emb: Tensor,
    text_emb: Tensor,
    temperature: Tensor | float,
    image_ids: Tensor | None = None,
    gather: bool = True,
    *,
    soft_i2t: Tensor | None = None,
    soft_t2i: Tensor | None = None,
    alpha: float = 0.0,
    image_queue: Tensor | None = None,
    text_queue: Tensor | None = None,
    queue_ids: Tensor | None = None,
) -> Tensor:
    """Symmetric image-text InfoNCE (ALBEF ITC, paper eq. 1-2; CLIP).

    Columns are the global batch (gathered with gradient across ranks when `gather`, open_clip
    local-loss style: this rank's B rows against all world*B columns, positives offset by rank*B), then
    the optional queues. With `image_ids`, every column with the row's image id is a positive and the
    target is spread evenly over them (ALBEF's retrieval fine-tune; ALBEF *pre-training* uses only the
    diagonal, which treats a second caption of the same image as a negative; we fix that whenever ids
    are given). Without ids, only the diagonal is positive and queue entries are always negatives.

    Momentum distillation (ALBEF eq. 6): targets = alpha * soft + (1 - alpha) * hard, where `soft_i2t`
    / `soft_t2i` are the caller's softmax of momentum similarities over the *same* columns.

    Args:
        image_emb, text_emb: (B, E) L2-normalised embeddings of this rank's rows (row i = pair i).
        temperature: scalar; logits = similarity / temperature.
        image_ids: (B,) long or None.
        gather: gather columns across ranks (no-op when not distributed).
        soft_i2t, soft_t2i: (B, C) soft targets with C = world*B + K (K = queue length), or None.
        alpha: weight of the soft targets.
        image_queue, text_queue: (K, E) extra columns (ALBEF momentum-feature queues; no gradient).
        queue_ids: (K,) image ids of the queue entries (-1 = never positive), used with `image_ids`.

    Returns:
        scalar: 0.5 * (loss_i2t + loss_t2i), each the mean over this rank's rows.
    """
    batch = image_emb.shape[0]
    if text_emb.shape[0] != batch:
        raise ValueError(f"image_emb has {batch} rows but text_emb has {text_emb.shape[0]}")
    if gather and world_size() > 1:
        image_cols = all_gather_with_grad(image_emb)
        text_cols = all_gather_with_grad(text_emb)
        offset = rank() * batch
        col_ids = all_gather_no_grad(image_ids) if image_ids is not None else None
    else:
        image_cols, text_cols, offset = image_emb, text_emb, 0
        col_ids = image_ids
    num_queue = 0
    if image_queue is not None or text_queue is not None:
        if image_queue is None or text_queue is None or image_queue.shape[0] != text_queue.shape[0]:
            raise ValueError("image_queue and text_queue must be given together, with the same length")
        num_queue = image_queue.shape[0]
        image_cols = torch.cat([image_cols, image_queue.to(image_cols.dtype)], dim=0)
        text_cols = torch.cat([text_cols, text_queue.to(text_cols.dtype)], dim=0)

    logits_i2t = image_emb @ text_cols.t() / temperature  # (B, C)
    logits_t2i = text_emb @ image_cols.t() / temperature  # (B, C)

    if image_ids is not None:
        if num_queue:
            if queue_ids is None:
                queue_ids = torch.full((num_queue,), -1, dtype=col_ids.dtype, device=col_ids.device)
            col_ids = torch.cat([col_ids, queue_ids.to(col_ids)], dim=0)
        hard = contrastive_targets(image_ids, col_ids)
    else:
        diagonal = torch.arange(batch, device=image_emb.device) + offset
        hard = F.one_hot(diagonal, num_classes=logits_i2t.shape[1]).float()

    targets_i2t, targets_t2i = hard, hard
    if soft_i2t is not None or soft_t2i is not None:
        if soft_i2t is None or soft_t2i is None:
            raise ValueError("soft_i2t and soft_t2i must be given together")
        if soft_i2t.shape != hard.shape or soft_t2i.shape != hard.shape:
            raise ValueError(f"soft targets must have shape {tuple(hard.shape)} (rows x global batch + queue), "
                             f"got {tuple(soft_i2t.shape)} and {tuple(soft_t2i.shape)}")
        targets_i2t = alpha * soft_i2t.float() + (1.0 - alpha) * hard
        targets_t2i = alpha * soft_t2i.float() + (1.0 - alpha) * hard
    return 0.5 * (soft_cross_entropy(logits_i2t, targets_i2t, dim=1)
                  + soft_cross_entropy(logits_t2i, targets_t2i, dim=1))


# ------------------------------------------------------------------------------------------- ITM
def itm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Image-text matching cross-entropy (ALBEF eq. 4). logits (M, 2), labels (M,) in {0, 1}."""
    return F.cross_entropy(logits.float(), labels)


def _inverse_cdf(weights: Tensor, allowed: Tensor, uniforms: Tensor) -> Tensor:
    """Sample one column per row of `weights` (B, C) >= 0 with `uniforms` (B,) in [0, 1).

    Picks the first column whose cumulative weight exceeds u * row total; that column always has positive
    weight. A rounding overshoot (u * total == total) falls back to the row's last allowed column.
    """
    cdf = weights.cumsum(dim=1)
    threshold = uniforms.to(cdf.dtype)[:, None] * cdf[:, -1:]
    index = (cdf <= threshold).sum(dim=1)
    columns = torch.arange(weights.shape[1], device=weights.device)
    last_allowed = torch.where(allowed, columns, -1).amax(dim=1)
    return torch.minimum(index, last_allowed)


def _sample_negative(sim: Tensor, positive: Tensor, uniforms: Tensor) -> Tensor:
    """One negative column per row: p(j) = softmax over the row's non-positive columns of sim."""
    negative = ~positive
    logits = sim.detach().float().masked_fill(positive, float("-inf"))
    weights = torch.softmax(logits, dim=1)
    degenerate = ~torch.isfinite(weights).all(dim=1) | (weights.sum(dim=1) <= 0)
    weights = torch.where(degenerate[:, None], negative.float(), weights).masked_fill(positive, 0.0)
    return _inverse_cdf(weights, negative, uniforms)


def sample_hard_negatives(
    sim_i2t: Tensor,
    sim_t2i: Tensor,
    image_ids_local: Tensor,
    image_ids_global: Tensor,
    uniforms_img: Tensor,
    uniforms_txt: Tensor,
) -> tuple[Tensor, Tensor]:
    """ALBEF hard negatives for ITM (paper §3.2, code `model_pretrain.py`), deterministic given uniforms.

    For text b, a negative image j is drawn with probability softmax(sim_t2i[b])_j renormalised over the
    columns whose image id differs from b's; for image b, a negative text likewise from sim_i2t[b].
    Following ALBEF's retrieval code we exclude every column with the same image id (ALBEF pre-training
    only zeroes the diagonal, so another caption of the same image can be drawn as a "negative"). ALBEF
    adds 1e-4 to the softmax and zeroes positives; we renormalise exactly over negatives instead and fall
    back to uniform weights over the negatives only for rows whose weights are not finite or sum to 0.

    Args:
        sim_i2t: (B, G) similarities of this rank's images to the G global texts (no gradient needed).
        sim_t2i: (B, G) similarities of this rank's texts to the G global images.
        image_ids_local: (B,) image ids of this rank's rows.
        image_ids_global: (G,) image ids of the global rows (text j and image j share id j's image).
        uniforms_img: (B,) in [0, 1), drives the negative image of each text.
        uniforms_txt: (B,) in [0, 1), drives the negative text of each image.

    Returns:
        neg_image_index (B,) and neg_text_index (B,), long indices into the global batch.

    Raises:
        ValueError: if some row has no column with a different image id.
    """
    positive = image_ids_local[:, None] == image_ids_global[None, :]  # (B, G)
    if not bool((~positive).any(dim=1).all()):
        raise ValueError(
            "ITM hard-negative sampling needs at least 2 distinct images in the (global) batch: some row has "
            "no caption/image of another image to use as a negative. Increase the batch size or shuffle the "
            "data so a batch does not contain only captions of one image."
        )
    neg_image_index = _sample_negative(sim_t2i, positive, uniforms_img)
    neg_text_index = _sample_negative(sim_i2t, positive, uniforms_txt)
    return neg_image_index, neg_text_index


# ------------------------------------------------------------------------------------------- MLM
def mask_tokens(
    input_ids: Tensor,
    attention_mask: Tensor,
    special_ids: Iterable[int] | Tensor,
    mask_id: int,
    vocab_size: int,
    mlm_prob: float = 0.15,
    uniforms: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """BERT masking (80 % [MASK], 10 % random token, 10 % unchanged), as in ALBEF `mask()`.

    Each real (attention_mask = 1), non-special token is selected with probability `mlm_prob`. Deviations
    from ALBEF's code, both deliberate: ALBEF never masks [PAD]/[CLS] but can mask [SEP]; we never mask any
    special id. ALBEF's random replacement draws from the whole vocabulary (specials included); we draw
    uniformly from the non-special ids.

    Args:
        input_ids: (B, T) long.
        attention_mask: (B, T), 1 / True = real token.
        special_ids: ids never selected and never used as random replacements ([PAD], [CLS], [SEP], ...);
            a tensor or any iterable of ints (e.g. a frozenset).
        mask_id: the [MASK] id.
        vocab_size: V; random replacements are drawn from [0, V) minus `special_ids`.
        mlm_prob: selection probability.
        uniforms: (B, T, 3) in [0, 1) or None: [..., 0] selects, [..., 1] picks mask/random/keep,
            [..., 2] picks the random token. Pass `keyed_uniform(sample_keys, (T, 3), salt)` for results that
            depend only on the sample; None draws them with `torch.rand(generator=generator)` (the generator,
            if any, must live on `input_ids.device`).

    Returns:
        masked_ids (B, T) long and labels (B, T) long: the original id where selected, -100 elsewhere.
    """
    batch, length = input_ids.shape
    device = input_ids.device
    if uniforms is None:
        uniforms = torch.rand((batch, length, 3), generator=generator, device=device)
    elif uniforms.shape != (batch, length, 3):
        raise ValueError(f"uniforms must have shape {(batch, length, 3)}, got {tuple(uniforms.shape)}")
    if isinstance(special_ids, Tensor):
        special = special_ids.to(device=device, dtype=torch.long).reshape(-1)
    else:  # a list, tuple or (frozen)set such as `TextTokenizer.special_ids`
        special = torch.tensor(sorted(int(i) for i in special_ids), dtype=torch.long, device=device)
    allowed = torch.ones(vocab_size, dtype=torch.bool, device=device)
    allowed[special[(special >= 0) & (special < vocab_size)]] = False
    candidates = allowed.nonzero().squeeze(1)  # non-special ids
    if candidates.numel() == 0:
        raise ValueError("mask_tokens: every id in the vocabulary is special; nothing to draw random tokens from")

    eligible = attention_mask.bool() & ~torch.isin(input_ids, special)
    selected = eligible & (uniforms[..., 0] < mlm_prob)
    to_mask = selected & (uniforms[..., 1] < 0.8)
    to_random = selected & (uniforms[..., 1] >= 0.8) & (uniforms[..., 1] < 0.9)
    pick = (uniforms[..., 2] * candidates.numel()).long().clamp_(0, candidates.numel() - 1)
    random_tokens = candidates[pick]

    masked_ids = torch.where(to_mask, torch.full_like(input_ids, mask_id), input_ids)
    masked_ids = torch.where(to_random, random_tokens, masked_ids)
    labels = torch.where(selected, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    return masked_ids, labels


def mask_tokens_at_least_one(
    input_ids: Tensor,
    eligible: Tensor,
    special_ids: Iterable[int] | Tensor,
    mask_id: int,
    vocab_size: int,
    prob: float,
    uniforms: Tensor,
) -> tuple[Tensor, Tensor]:
    """`mask_tokens` over the `eligible` (B, T) positions, plus UNITER's rule "if nothing is selected, a token
    is masked": a row with an eligible position but no draw gets its first eligible position replaced by
    [MASK] and labelled. uniforms: (B, T, 3) as `mask_tokens`. Returns (masked_ids, labels) (B, T)."""
    masked_ids, labels = mask_tokens(input_ids, eligible, special_ids, mask_id, vocab_size, prob, uniforms=uniforms)
    eligible = eligible.bool()
    first = eligible.long().argmax(dim=1)
    need = ~(labels != IGNORE_INDEX).any(dim=1) & eligible.any(dim=1)
    force = need[:, None] & (torch.arange(input_ids.shape[1], device=input_ids.device)[None, :] == first[:, None])
    masked_ids = torch.where(force, torch.full_like(input_ids, mask_id), masked_ids)
    labels = torch.where(force, input_ids, labels)
    return masked_ids, labels


def mlm_loss(
    logits: Tensor,
    labels: Tensor,
    soft_targets: Tensor | None = None,
    alpha: float = 0.0,
    name: str | None = None,
) -> Tensor:
    """Masked-language-model cross-entropy, mean over the labelled positions of the global batch (ALBEF eq. 3).

    The mean is over every rank's labelled positions (`global_token_mean`; `name` selects the trainer's step
    total, which extends it over the accumulation micro-batches): 2 ranks train exactly like 1 process with
    the same global batch. Any position-mean classification over selected positions uses it the same way
    (MIM over masked patches, MRC over masked regions, tag prediction).

    With `soft_targets` (momentum distillation, ALBEF eq. 6 for MLM): (1 - alpha) * CE + alpha * soft CE,
    where the soft CE (`soft_cross_entropy`, over the labelled positions) is -sum_v soft[v] log p[v] over
    the vocabulary axis. (ALBEF's released pre-training code took the log-softmax over the *sequence* axis,
    `dim=1`; a typo acknowledged in salesforce/ALBEF#58. We use the vocabulary axis.)

    Args:
        logits: (B, T, V), or (M, V) for positions already gathered (e.g. only the masked ones).
        labels: (B, T) (or (M,)) long, -100 = not predicted.
        soft_targets: logits-shaped probabilities (e.g. softmax of momentum-model logits) or None.
        alpha: weight of the soft term.
        name: the loss's name in the trainer's step totals (`step_token_totals`, e.g. "mlm"), or None.

    Returns:
        scalar; exactly 0 (still attached to the graph) when no position of any rank is labelled. A
        collective in a distributed run: every rank calls it, with or without labelled positions.
    """
    valid = labels != IGNORE_INDEX
    log_probs = F.log_softmax(logits.float(), dim=-1)
    safe_labels = torch.where(valid, labels, torch.zeros_like(labels))
    nll = -log_probs.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)
    sums = [torch.where(valid, nll, torch.zeros_like(nll)).sum()]
    if soft_targets is not None:
        if soft_targets.shape != logits.shape:
            raise ValueError(f"soft_targets must have the logits' shape {tuple(logits.shape)}, "
                             f"got {tuple(soft_targets.shape)}")
        per_row = -(soft_targets.float() * log_probs).sum(dim=-1)  # soft_cross_entropy's rows
        sums.append(torch.where(valid, per_row, torch.zeros_like(per_row)).sum())
    means = global_token_mean(torch.stack(sums), valid.sum(), name)  # one count all-reduce for both terms
    if soft_targets is None:
        return means[0]
    return (1.0 - alpha) * means[0] + alpha * means[1]
