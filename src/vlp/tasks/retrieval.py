"""Image-text retrieval evaluation: recall@K with ITC ranking and ALBEF-style ITM re-ranking.

Protocol (research notes, anchors §2 "Retrieval eval (ALBEF `Retrieval.py::evaluation` + `itm_eval`)"):

1. Encode every image and every text once; ITC similarity `sims = image_emb @ text_emb.T`
   (L2-normalised embeddings, no temperature).
2. Re-rank (`k_rerank > 0`): for each image its top-k texts by ITC, for each text its top-k images;
   score those (image, text) pairs with the ITM head (positive-class logit of `fuse` on the cached
   unimodal text states, = `VLModel.itm_score` without re-encoding the text per pair). ALBEF keeps the ITM logit
   only (`rerank_score="itm"`, default); BLIP / LAVIS add the ITC similarity (`"itm+itc"`). Cells that
   were not re-ranked are filled with −inf (ALBEF: −100; −inf keeps them below any logit).
3. ALBEF shards image rows across ranks, fills a zero-initialised score matrix per rank and sums it
   with `all_reduce(SUM)`; that only works because each row is owned by exactly one rank. vlp runs the
   evaluation in a single process (rank 0) over the whole matrix, so there is no reduction to get wrong.
4. `itm_eval`: image→text rank = best rank over the image's ground-truth captions (COCO convention);
   text→image rank = rank of its one image; R@K = 100·mean(rank < K); `txt_r_mean`, `img_r_mean` and
   `r_mean` are means of the R@Ks (naming as in ALBEF: `txt_r*` = text retrieval = image→text).

Ties (ALBEF's `argsort` breaks them arbitrarily): vlp counts every tie against the model — the rank of a
ground truth is the number of *non*-ground-truth candidates whose score is >= the (best) ground-truth
score. A constant score matrix therefore gives R@K = 0 for K below the number of negatives, never 100.
NaN scores are treated as −inf (a NaN ground truth is a miss).

Models without ITC (CMAL, UNITER-style single stream) use `evaluate_retrieval_itm_all` instead: the ITM
score of every (image, text) pair ranks both directions (I·Tn forwards; small sets only), or, with a first
retrieval stage (`vlp.models.first_stage`, `method.first_stage`), `evaluate_retrieval_itc_rerank`: the first
stage's cosine ranks and its top k per query are re-ranked by ITM, (I + Tn)·k forwards, as in step 2.

Attribute-binding probes (world.md "Attribute binding must matter"), two-alternative forced choices
scored against the pair's own image with the protocol's scoring function (ITC cosine under `itc/`, the
ITM positive logit under `itm/` and `itm_all/`); a probe is won when the true caption scores strictly
above the false one (a tie or a NaN is lost, like the pessimistic ranks above); chance is 50 %:

  `<p>/hard_neg_acc`       hard pairs (`hard_*` fields): a caption vs the same caption with the colours
                           of two objects swapped ("a red circle and a blue star" vs "a blue circle and
                           a red star"). Needs binding colour to the right object.
  `<p>/colour_probe_acc`   colour probes (`colour_probe_*` fields, `attach_colour_probes`): one object's
                           caption vs the same caption with another colour ("a red circle" vs "a blue
                           circle"; `vlp.data.world.colour_probe`). Needs only seeing the colour of the
                           named object, so it separates "cannot see colour" from "cannot bind it".
                           Reported when the set carries them: `RetrievalSet.build` fills the hard
                           pairs itself, the colour probes come from `attach_colour_probes(rset, split,
                           tokenizer, max_len, max_words)` on the same world split.

Each accuracy `K` (percent) comes with its 95 % Wilson score interval on the binomial, `K_ci_low` and
`K_ci_high` (percent; `binomial_ci95`): with a few hundred probes the interval is several points wide,
so a difference between methods inside it is noise.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import chain
from typing import Any, Callable, Iterator, Literal, Optional, Protocol, Sequence

import torch
from torch import Tensor

from vlp.progress import Progress

__all__ = [
    "RetrievalModel",
    "RetrievalData",
    "RetrievalScores",
    "retrieval_ranks",
    "recall_at_k",
    "chance_recall",
    "hard_negative_accuracy",
    "binomial_ci95",
    "pair_accuracy_metrics",
    "attach_colour_probes",
    "compute_retrieval_scores",
    "evaluate_retrieval",
    "evaluate_method_retrieval",
    "evaluate_retrieval_itm_all",
    "evaluate_retrieval_itc_rerank",
    "fused_itm_pairs",
    "score_pair_rows",
    "headline_r_mean",
    "retrieval_metrics",
    "retrieval_examples",
    "default_example_queries",
]

RerankScore = Literal["itm", "itm+itc"]


class RetrievalModel(Protocol):
    """What retrieval needs from a model (the `VLModel` contract, docs/contracts.md)."""

    def encode_image(self, images: Tensor) -> Any:  # -> ImageOutput with `.tokens` (B, 1+P, Dv)
        ...

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:  # (B, T, D)
        ...

    def image_embed(self, image_tokens: Tensor) -> Tensor:  # (B, E), L2-normalised
        ...

    def text_embed(self, text_hidden: Tensor) -> Tensor:  # (B, E), L2-normalised
        ...

    def fuse(self, text_hidden: Tensor, attention_mask: Tensor, image_tokens: Tensor) -> Any:
        ...  # -> FusionOutput with `.cls` (B, D)

    def itm_logits(self, cls: Tensor) -> Tensor:  # (B, 2), column 1 = matched
        ...


class RetrievalData(Protocol):
    """What retrieval needs from a `vlp.data.datasets.RetrievalSet`.

    images (I, 3, H, W); input_ids / attention_mask (Tn, T); txt2img (Tn,) long; img2txt list of I lists.
    Optional hard negatives (H pairs): hard_image (H,) long image index, hard_pos_ids / hard_pos_mask and
    hard_neg_ids / hard_neg_mask (H, T): a true caption and its attribute-swapped twin.
    Optional colour probes (P pairs, `attach_colour_probes`): colour_probe_image (P,) long image index,
    colour_probe_pos_ids / _pos_mask and colour_probe_neg_ids / _neg_mask (P, T): one object's true
    caption and the same caption with another colour word.
    """

    images: Tensor
    input_ids: Tensor
    attention_mask: Tensor
    txt2img: Tensor
    img2txt: list[list[int]]


# ============================================================================== metrics (pure tensors)
def _positive_mask(
    txt2img: Tensor, img2txt: Optional[Sequence[Sequence[int]]], n_images: int, n_texts: int
) -> Tensor:
    """Bool (I, Tn): True where text t is a ground-truth caption of image i.

    Built from `txt2img`; `img2txt`, when given, must describe the same pairs (it is checked, since a
    silent disagreement would make one direction's recall meaningless).
    """
    txt2img = torch.as_tensor(txt2img, dtype=torch.long).cpu()
    if txt2img.shape != (n_texts,):
        raise ValueError(f"txt2img has shape {tuple(txt2img.shape)}, expected ({n_texts},) (one image per text)")
    if n_texts and (int(txt2img.min()) < 0 or int(txt2img.max()) >= n_images):
        raise ValueError(f"txt2img holds image indices outside [0, {n_images})")
    mask = torch.zeros(n_images, n_texts, dtype=torch.bool)
    mask[txt2img, torch.arange(n_texts)] = True
    if img2txt is not None:
        if len(img2txt) != n_images:
            raise ValueError(f"img2txt has {len(img2txt)} entries, expected {n_images} (one per image)")
        lengths = torch.tensor([len(t) for t in img2txt], dtype=torch.long)
        rows = torch.repeat_interleave(torch.arange(n_images), lengths)
        cols = torch.tensor(list(chain.from_iterable(img2txt)), dtype=torch.long)
        other = torch.zeros_like(mask)
        other[rows, cols] = True
        if not torch.equal(mask, other):
            raise ValueError("img2txt and txt2img describe different image-caption pairs")
    empty = (~mask.any(dim=1)).nonzero().flatten()
    if empty.numel():
        raise ValueError(f"images without any ground-truth caption: {empty[:10].tolist()}")
    return mask


def _nan_to_neg_inf(x: Tensor) -> Tensor:
    x = x.detach().float()
    return torch.where(torch.isnan(x), torch.full_like(x, float("-inf")), x)


def retrieval_ranks(
    sim_i2t: Tensor,
    txt2img: Tensor,
    img2txt: Optional[Sequence[Sequence[int]]] = None,
    sim_t2i: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """0-based ranks of the ground truth, ties counted against the model (module docstring).

    Args:
        sim_i2t: (I, Tn) image→text scores (higher = better).
        txt2img: (Tn,) long, the image of each text.
        img2txt: optional list of I lists of text indices (checked against `txt2img`).
        sim_t2i: (Tn, I) text→image scores; default `sim_i2t.T` (after ITM re-ranking the two
            directions have different matrices, as in ALBEF's `score_matrix_i2t` / `_t2i`).

    Returns:
        rank_i2t (I,) long: #non-GT texts scoring >= the image's best GT caption
            (= ALBEF's `min` over GT positions in `argsort(-score)` when there are no ties);
        rank_t2i (Tn,) long: #other images scoring >= the text's GT image.
    """
    if sim_i2t.dim() != 2:
        raise ValueError(f"sim_i2t must be (I, Tn), got shape {tuple(sim_i2t.shape)}")
    n_images, n_texts = sim_i2t.shape
    if sim_t2i is None:
        sim_t2i = sim_i2t.T
    if sim_t2i.shape != (n_texts, n_images):
        raise ValueError(f"sim_t2i has shape {tuple(sim_t2i.shape)}, expected ({n_texts}, {n_images})")
    device = sim_i2t.device
    pos = _positive_mask(txt2img, img2txt, n_images, n_texts).to(device)  # (I, Tn)

    s_i2t = _nan_to_neg_inf(sim_i2t)
    best_gt = s_i2t.masked_fill(~pos, float("-inf")).amax(dim=1, keepdim=True)  # (I, 1)
    rank_i2t = ((s_i2t >= best_gt) & ~pos).sum(dim=1)

    s_t2i = _nan_to_neg_inf(sim_t2i.to(device))
    gt_img = torch.as_tensor(txt2img, dtype=torch.long, device=device).unsqueeze(1)  # (Tn, 1)
    gt_score = s_t2i.gather(1, gt_img)  # (Tn, 1)
    rank_t2i = ((s_t2i >= gt_score) & ~pos.T).sum(dim=1)
    return rank_i2t.cpu(), rank_t2i.cpu()


def recall_at_k(
    sim_i2t: Tensor,
    txt2img: Tensor,
    img2txt: Optional[Sequence[Sequence[int]]] = None,
    ks: Sequence[int] = (1, 5, 10),
    sim_t2i: Optional[Tensor] = None,
) -> dict[str, float]:
    """Recall@K in percent, ALBEF `itm_eval` (anchors §2, step 4) with pessimistic ties.

    Args:
        sim_i2t: (I, Tn) image→text scores; `sim_t2i` (Tn, I) optional (default `sim_i2t.T`).
        txt2img: (Tn,) long; img2txt: optional list of I lists (COCO: 5 captions per image).
        ks: the K values.

    Returns:
        `txt_r{k}` (image→text, "text retrieval"), `img_r{k}` (text→image) for each k, `txt_r_mean`,
        `img_r_mean` (means over ks) and `r_mean` (mean of all 2·len(ks) recalls); floats in [0, 100].
    """
    rank_i2t, rank_t2i = retrieval_ranks(sim_i2t, txt2img, img2txt, sim_t2i)
    ks_t = torch.as_tensor(list(ks), dtype=torch.long)
    txt = (rank_i2t.unsqueeze(1) < ks_t).double().mean(dim=0) * 100.0  # (len(ks),)
    img = (rank_t2i.unsqueeze(1) < ks_t).double().mean(dim=0) * 100.0
    out: dict[str, float] = {}
    for j, k in enumerate(ks):
        out[f"txt_r{k}"] = float(txt[j])
    for j, k in enumerate(ks):
        out[f"img_r{k}"] = float(img[j])
    out["txt_r_mean"] = float(txt.mean())
    out["img_r_mean"] = float(img.mean())
    out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2.0
    return out


def chance_recall(k: int, n_images: int, captions_per_image: Optional[int] = None) -> float:
    """Expected R@K (percent) of a random ranking, for "× chance" reporting.

    `captions_per_image=None`: text→image (one GT among `n_images`): 100·min(k, n)/n.
    Otherwise image→text: `c = captions_per_image` GTs among `n_images·c` texts; a hit needs at least one
    GT in the top k: 100·(1 − C(N−c, k) / C(N, k)).
    """
    if n_images <= 0 or k <= 0:
        raise ValueError(f"chance_recall needs k > 0 and n_images > 0, got k={k}, n_images={n_images}")
    if captions_per_image is None:
        return 100.0 * min(k, n_images) / n_images
    c = int(captions_per_image)
    n = n_images * c
    k = min(k, n)
    return 100.0 * (1.0 - math.comb(n - c, k) / math.comb(n, k))


def hard_negative_accuracy(pos_scores: Tensor, neg_scores: Tensor) -> float:
    """Percent of pairs whose true caption scores strictly above its attribute-swapped twin.

    pos_scores, neg_scores: (H,). A tie (or a NaN) is a failure. Empty input gives NaN.
    """
    if pos_scores.shape != neg_scores.shape or pos_scores.dim() != 1:
        raise ValueError(f"expected two (H,) tensors, got {tuple(pos_scores.shape)} and {tuple(neg_scores.shape)}")
    if pos_scores.numel() == 0:
        return float("nan")
    return float((pos_scores.float() > neg_scores.float()).double().mean() * 100.0)


def binomial_ci95(successes: int, n: int) -> tuple[float, float]:
    """95 % Wilson score interval (percent) of a success rate `successes / n`.

    Wilson rather than the normal approximation: it stays inside [0, 100], is not empty at 0 or n
    successes, always contains the point estimate, and its width shrinks like 1 / sqrt(n).
    (nan, nan) for n = 0.
    """
    if n < 0 or not 0 <= successes <= max(n, 0):
        raise ValueError(f"binomial_ci95 needs 0 <= successes <= n, got successes={successes}, n={n}")
    if n == 0:
        return float("nan"), float("nan")
    z = 1.959963984540054  # the 97.5 % standard-normal quantile
    p = successes / n
    denominator = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1.0 - p) / n + z * z / (4 * n * n)) / denominator
    # the exact interval contains p and ends at 0 (1) for 0 (n) successes; clamp away float rounding
    return 100.0 * min(max(0.0, centre - half), p), 100.0 * max(min(1.0, centre + half), p)


def pair_accuracy_metrics(pos_scores: Tensor, neg_scores: Tensor, key: str) -> dict[str, float]:
    """`{key: accuracy, key_ci_low, key_ci_high}` (percent) of a two-alternative probe: the share of pairs
    whose true text scores strictly above the false one (`hard_negative_accuracy`: ties and NaNs lose) and
    its 95 % Wilson interval (`binomial_ci95`). pos_scores, neg_scores: (P,); empty input gives NaNs."""
    accuracy = hard_negative_accuracy(pos_scores, neg_scores)
    wins = int((pos_scores.float() > neg_scores.float()).sum())
    low, high = binomial_ci95(wins, pos_scores.numel())
    return {key: accuracy, f"{key}_ci_low": low, f"{key}_ci_high": high}


# ============================================================================== model evaluation
@dataclass
class RetrievalScores:
    """Everything `evaluate_retrieval` scores, kept for plotting and inspection (CPU, float32).

    sim_itc (I, Tn) ITC cosine similarities; score_i2t (I, Tn) / score_t2i (Tn, I) re-ranked scores
    (−inf outside the ITC top-k; None when k_rerank = 0); hard_itc_* / hard_itm_* (H,) ITC cosine / ITM
    logit of each hard pair's true caption and of its attribute-swapped twin against the pair's image
    (None when the set has no hard negatives; the ITM ones also when k_rerank = 0); probe_itc_* /
    probe_itm_* (P,) the same for the colour probes (true caption of one object vs another colour).
    itm_forwards: number of (image, text) pairs run through the fusion encoder.
    """

    sim_itc: Tensor
    score_i2t: Optional[Tensor] = None
    score_t2i: Optional[Tensor] = None
    hard_itc_pos: Optional[Tensor] = None
    hard_itc_neg: Optional[Tensor] = None
    hard_itm_pos: Optional[Tensor] = None
    hard_itm_neg: Optional[Tensor] = None
    probe_itc_pos: Optional[Tensor] = None
    probe_itc_neg: Optional[Tensor] = None
    probe_itm_pos: Optional[Tensor] = None
    probe_itm_neg: Optional[Tensor] = None
    itm_forwards: int = 0


def _model_device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def _autocast(device: torch.device, amp_dtype: Optional[torch.dtype]):
    return torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=amp_dtype is not None)


# Progress of the evaluation loops (`vlp.progress`: a bar on a terminal, else a line on stderr every ~10 s of a
# long loop). The public evaluations take `progress: bool`; their loops take the phase name to show, None = silent.
def _phase(progress: bool, name: str) -> Optional[str]:
    """`name` when progress is shown, else None."""
    return name if progress else None


def _sub(phase: Optional[str], part: str) -> Optional[str]:
    """The phase name of one part of `phase` ("hard pairs" -> "hard pairs: ITM true"); None stays None."""
    return None if phase is None else f"{phase}: {part}"


def _progress(phase: Optional[str], total: int, unit: str) -> Progress:
    """The reporter of one loop over `total` units: "retrieval: <phase>", silent when `phase` is None."""
    return Progress(f"retrieval: {phase}", total, enabled=phase is not None, unit=unit)


def _encode_images(
    model: RetrievalModel, images: Tensor, batch_size: int, device: torch.device, amp_dtype: Optional[torch.dtype],
    progress: Optional[str] = None,
) -> tuple[Tensor, Tensor]:
    """Image tokens (I, 1+P, Dv) and ITC embeddings (I, E), on `device`, float32. `progress`: the phase name
    shown while encoding (None = silent)."""
    tokens, embeds = [], []
    with _progress(progress, images.shape[0], "images") as bar:
        for start in range(0, images.shape[0], batch_size):
            chunk = images[start : start + batch_size].to(device, non_blocking=True)
            with _autocast(device, amp_dtype):
                tok = model.encode_image(chunk).tokens
                emb = model.image_embed(tok)
            tokens.append(tok.float())
            embeds.append(emb.float())
            bar.update(chunk.shape[0])
    return torch.cat(tokens), torch.cat(embeds)


def _real_length(attention_mask: Tensor) -> int:
    """Columns up to the last one holding a real token in any row (trailing all-padding columns can be
    dropped: with masked attention they change no real token's state, and positions are unchanged)."""
    used = attention_mask.bool().any(dim=0).nonzero()
    return int(used.max()) + 1 if used.numel() else 1


def _encode_texts(
    model: RetrievalModel,
    input_ids: Tensor,
    attention_mask: Tensor,
    batch_size: int,
    device: torch.device,
    amp_dtype: Optional[torch.dtype],
    progress: Optional[str] = None,
) -> tuple[Tensor, Tensor]:
    """Unimodal text states (Tn, T', D) (autocast dtype, kept for ITM) and ITC embeddings (Tn, E) float32.

    T' = `_real_length(attention_mask)`: trailing all-padding columns are not encoded. `progress`: the phase
    name shown while encoding (None = silent).
    """
    length = _real_length(attention_mask)
    input_ids, attention_mask = input_ids[:, :length], attention_mask[:, :length]
    hidden, embeds = [], []
    with _progress(progress, input_ids.shape[0], "texts") as bar:
        for start in range(0, input_ids.shape[0], batch_size):
            ids = input_ids[start : start + batch_size].to(device)
            mask = attention_mask[start : start + batch_size].to(device)
            with _autocast(device, amp_dtype):
                h = model.encode_text(ids, mask)
                emb = model.text_embed(h)
            hidden.append(h)
            embeds.append(emb.float())
            bar.update(ids.shape[0])
    return torch.cat(hidden), torch.cat(embeds)


IMAGE_KV_BLOCK = 64  # images projected to the fusion keys/values at a time in `fused_itm_pairs` (bounded memory)


def fused_itm_pairs(
    model: RetrievalModel,
    image_tokens: Tensor,
    text_hidden: Tensor,
    attention_mask: Tensor,
    img_idx: Tensor,
    txt_idx: Tensor,
    batch_size: int,
    device: torch.device,
    amp_dtype: Optional[torch.dtype],
    progress: Optional[str] = None,
) -> Tensor:
    """ITM positive-class logits (P,) for the pairs (image_tokens[img_idx[p]], text txt_idx[p]).

    image_tokens (I, 1+P, Dv), text_hidden (Tn, T, D) cached unimodal text states, attention_mask (Tn, T),
    all on device. Equals `model.itm_score(image_tokens[i], input_ids[t], attention_mask[t])` without
    re-running the text encoder per pair (ALBEF's `evaluation` likewise reuses its `text_feats`): one
    batched `fuse` + `itm_logits` call per chunk of `batch_size` pairs. Pairs are processed in order of
    text length and each chunk is cut to its longest text (fusion cost grows with T); results are
    returned in the input order.

    A model whose fusion cross-attends to fixed image tokens (`model.shares_image_kv`: ALBEF) projects each
    image to the fusion keys/values once per block of `IMAGE_KV_BLOCK` images instead of once per pair
    (a pair's text is short, so the projection of its 1+P image tokens was ~40 % of its fusion FLOPs at
    the tiny size): pairs are grouped by image block, then sorted by text length within the block.
    `progress`: the phase name shown while scoring (None = silent).
    """
    n_pairs = img_idx.numel()
    positions = torch.arange(1, attention_mask.shape[1] + 1, device=attention_mask.device)
    text_len = (attention_mask.bool() * positions).amax(dim=1)  # (Tn,) last real column + 1
    share_kv = bool(getattr(model, "shares_image_kv", False))
    block_size = IMAGE_KV_BLOCK if share_kv else max(image_tokens.shape[0], 1)
    block = img_idx // block_size
    order = torch.argsort(block * (attention_mask.shape[1] + 1) + text_len[txt_idx], stable=True)
    img_sorted, txt_sorted = img_idx[order], txt_idx[order]
    block_counts = torch.bincount(block, minlength=int(block.max()) + 1 if n_pairs else 0).tolist()
    out = torch.empty(n_pairs, dtype=torch.float32, device=device)
    block_start = 0
    with _progress(progress, n_pairs, "pairs") as bar:
        for b, count in enumerate(block_counts):
            if count == 0:
                continue
            first_image = b * block_size
            images = image_tokens[first_image : first_image + block_size]
            with _autocast(device, amp_dtype):
                images = model.image_kv(images) if share_kv else images
            for start in range(block_start, block_start + count, batch_size):
                stop = min(start + batch_size, block_start + count)
                ii = img_sorted[start:stop] - first_image
                tt = txt_sorted[start:stop]
                length = max(int(text_len[tt].max()), 1)
                with _autocast(device, amp_dtype):
                    context = images.take(ii) if share_kv else images[ii]
                    fused = model.fuse(text_hidden[tt, :length], attention_mask[tt, :length], context)
                    score = model.itm_logits(fused.cls)[:, 1]
                out[order[start:stop]] = score.float()
                bar.update(stop - start)
            block_start += count
    return out


def _rerank(
    sims: Tensor,
    k_rerank: int,
    rerank_score: RerankScore,
    score_pairs: Callable[[Tensor, Tensor], Tensor],
) -> tuple[Tensor, Tensor, int]:
    """ALBEF re-ranking (anchors §2, step 2): (score_i2t (I, Tn), score_t2i (Tn, I), #pairs scored).

    The top `k_rerank` of `sims` (I, Tn) per image and per text are scored by `score_pairs(img_idx (P,),
    txt_idx (P,)) -> (P,)` (ALBEF: its fusion ITM; single-stream methods: their ITM pass); "itm+itc" adds the
    first-stage similarity (BLIP / LAVIS). Entries outside a query's top-k are -inf. The candidate pairs of
    both directions are de-duplicated before scoring (a pair found by both the image's and the text's top-k
    is scored once: the model is in eval mode, so its score is the same).
    """
    if rerank_score not in ("itm", "itm+itc"):
        raise ValueError(f"rerank_score must be 'itm' or 'itm+itc', got {rerank_score!r}")
    n_images, n_texts = sims.shape
    device = sims.device
    k_t, k_i = min(k_rerank, n_texts), min(k_rerank, n_images)
    top_txt = sims.topk(k_t, dim=1).indices  # (I, k_t)
    top_img = sims.T.topk(k_i, dim=1).indices  # (Tn, k_i)
    i2t_img = torch.arange(n_images, device=device).repeat_interleave(k_t)
    i2t_txt = top_txt.reshape(-1)
    t2i_txt = torch.arange(n_texts, device=device).repeat_interleave(k_i)
    t2i_img = top_img.reshape(-1)
    pair_ids = torch.cat([i2t_img * n_texts + i2t_txt, t2i_img * n_texts + t2i_txt])
    unique, inverse = torch.unique(pair_ids, return_inverse=True)
    itm = score_pairs(unique // n_texts, unique % n_texts).to(device)
    if rerank_score == "itm+itc":
        itm = itm + sims.reshape(-1)[unique]
    scored = itm[inverse]
    n_i2t = i2t_img.numel()
    score_i2t = torch.full((n_images, n_texts), float("-inf"), device=device)
    score_i2t[i2t_img, i2t_txt] = scored[:n_i2t]
    score_t2i = torch.full((n_texts, n_images), float("-inf"), device=device)
    score_t2i[t2i_txt, t2i_img] = scored[n_i2t:]
    return score_i2t, score_t2i, int(unique.numel())


# The progress phase names of the probe pairs, by their field prefix or metric name.
_PROBE_PHASES = {"hard": "hard pairs", "probe": "colour probes", "hard_neg_acc": "hard pairs",
                 "colour_probe_acc": "colour probes"}


def _pair_fields(rset: Any, prefix: str) -> Optional[tuple[Tensor, Tensor, Tensor, Tensor, Tensor]]:
    """(image (P,), pos_ids, pos_mask, neg_ids, neg_mask (P, T)) of the probe pairs `prefix`_* of a set,
    or None when it has none."""
    names = ("image", "pos_ids", "pos_mask", "neg_ids", "neg_mask")
    values = [getattr(rset, f"{prefix}_{n}", None) for n in names]
    if any(v is None for v in values) or values[0].numel() == 0:
        return None
    return tuple(values)  # type: ignore[return-value]


def _hard_fields(rset: Any) -> Optional[tuple[Tensor, Tensor, Tensor, Tensor, Tensor]]:
    return _pair_fields(rset, "hard")


def _probe_fields(rset: Any) -> Optional[tuple[Tensor, Tensor, Tensor, Tensor, Tensor]]:
    return _pair_fields(rset, "colour_probe")


def attach_colour_probes(rset: Any, samples: Sequence[Any], tokenizer: Any, max_len: int, max_words: int = 30) -> Any:
    """Add the world's colour probes (`vlp.data.world.colour_probe`) of a retrieval set's images to it.

    `samples` is the split the set was built from (`RetrievalSet.build(split, ...)`: image i of the set
    is `samples[i]`); a `WorldSplit` is read through its `scene(i)` fast path (no rendering). Sets
    `rset.colour_probe_image` (P,) long and `colour_probe_pos_ids` / `_pos_mask` / `_neg_ids` /
    `_neg_mask` (P, T) from `tokenizer.encode(texts, max_len, max_words=max_words)`, one probe per image
    that has one and whose two texts still differ after tokenisation (the rule `RetrievalSet.build`
    applies to hard pairs). Returns `rset`; a set without any probe is left unchanged.
    """
    n_images = int(rset.images.shape[0])
    scene = getattr(samples, "scene", None)
    image: list[int] = []
    texts: list[str] = []
    for i in range(n_images):
        probe = getattr(scene(i) if callable(scene) else samples[i], "colour_probe", None)
        if probe is None:
            continue
        ids, mask = tokenizer.encode(list(probe), max_len, max_words=max_words)
        if not torch.equal(ids[0] * mask[0], ids[1] * mask[1]):
            image.append(i)
            texts.extend(probe)
    if image:
        ids, mask = tokenizer.encode(texts, max_len, max_words=max_words)
        rset.colour_probe_image = torch.tensor(image, dtype=torch.long)
        rset.colour_probe_pos_ids, rset.colour_probe_pos_mask = ids[0::2], mask[0::2]
        rset.colour_probe_neg_ids, rset.colour_probe_neg_mask = ids[1::2], mask[1::2]
    return rset


@contextmanager
def eval_mode(model: Any) -> Iterator[None]:
    """Run the body with `model` in eval mode, restoring training mode afterwards."""
    was_training = bool(getattr(model, "training", False))
    if hasattr(model, "eval"):
        model.eval()
    try:
        yield
    finally:
        if was_training and hasattr(model, "train"):
            model.train()


def _score_pairs(
    model: RetrievalModel,
    fields: tuple[Tensor, Tensor, Tensor, Tensor, Tensor],
    image_tokens: Tensor,
    image_emb: Tensor,
    with_itm: bool,
    batch_size: int,
    device: torch.device,
    amp_dtype: Optional[torch.dtype],
    progress: Optional[str] = None,
) -> tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor]]:
    """Scores of P probe pairs (true text, false text) against each pair's image: ITC cosines (P,) of
    both texts and, when `with_itm`, their ITM positive logits (P,) (2P fusion forwards); CPU float32.

    fields: image index (P,) and pos_ids / pos_mask / neg_ids / neg_mask (P, T); image_tokens
    (I, 1+P', Dv) and image_emb (I, E) of the whole set, on `device`. `progress`: the probes' phase name
    (e.g. "hard pairs"; None = silent)."""
    p_img, pos_ids, pos_mask, neg_ids, neg_mask = (t.to(device) for t in fields)
    p_img = p_img.long()
    pos_hidden, pos_emb = _encode_texts(model, pos_ids, pos_mask, batch_size, device, amp_dtype,
                                        _sub(progress, "encode true texts"))
    neg_hidden, neg_emb = _encode_texts(model, neg_ids, neg_mask, batch_size, device, amp_dtype,
                                        _sub(progress, "encode false texts"))
    img_emb = image_emb[p_img]
    itc_pos = (img_emb * pos_emb).sum(-1).cpu()
    itc_neg = (img_emb * neg_emb).sum(-1).cpu()
    if not with_itm:
        return itc_pos, itc_neg, None, None
    idx = torch.arange(p_img.numel(), device=device)  # pair p = (image p_img[p], text p)
    itm_pos = fused_itm_pairs(model, image_tokens, pos_hidden, pos_mask, p_img, idx, batch_size, device, amp_dtype,
                              progress=_sub(progress, "ITM true")).cpu()
    itm_neg = fused_itm_pairs(model, image_tokens, neg_hidden, neg_mask, p_img, idx, batch_size, device, amp_dtype,
                              progress=_sub(progress, "ITM false")).cpu()
    return itc_pos, itc_neg, itm_pos, itm_neg


@torch.no_grad()
def compute_retrieval_scores(
    model: RetrievalModel,
    rset: RetrievalData,
    batch_size: int = 128,
    k_rerank: int = 16,
    device: Optional[torch.device | str] = None,
    amp_dtype: Optional[torch.dtype] = None,
    rerank_score: RerankScore = "itm",
    progress: bool = True,
) -> RetrievalScores:
    """Score a retrieval set with a model: ITC similarities, ITM re-ranked matrices, hard pairs, colour probes.

    See `evaluate_retrieval` for the arguments. Runs in eval mode (restored afterwards), single process.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if k_rerank < 0:
        raise ValueError(f"k_rerank must be >= 0 (0 = ITC only), got {k_rerank}")
    if rerank_score not in ("itm", "itm+itc"):
        raise ValueError(f"rerank_score must be 'itm' or 'itm+itc', got {rerank_score!r}")
    device = torch.device(device) if device is not None else _model_device(model)
    with eval_mode(model):
        image_tokens, image_emb = _encode_images(model, rset.images, batch_size, device, amp_dtype,
                                                 _phase(progress, "encode images"))
        input_ids = rset.input_ids.to(device)
        attention_mask = rset.attention_mask.to(device)
        text_hidden, text_emb = _encode_texts(model, input_ids, attention_mask, batch_size, device, amp_dtype,
                                              _phase(progress, "encode texts"))
        sims = image_emb @ text_emb.T  # (I, Tn), anchors §2 step 1: cosine, no temperature
        scores = RetrievalScores(sim_itc=sims.cpu())

        if k_rerank > 0:
            every_pair = k_rerank >= max(sims.shape)  # the top k of every query is every candidate
            rerank_phase = _phase(progress, "ITM all pairs" if every_pair else "ITM re-rank")

            def fused_itm(img_idx: Tensor, txt_idx: Tensor) -> Tensor:
                return fused_itm_pairs(model, image_tokens, text_hidden, attention_mask, img_idx, txt_idx,
                                       batch_size, device, amp_dtype, progress=rerank_phase)

            s_i2t, s_t2i, forwards = _rerank(sims, k_rerank, rerank_score, fused_itm)
            scores.score_i2t, scores.score_t2i, scores.itm_forwards = s_i2t.cpu(), s_t2i.cpu(), forwards

        for prefix, fields in (("hard", _hard_fields(rset)), ("probe", _probe_fields(rset))):
            if fields is None:
                continue
            itc_pos, itc_neg, itm_pos, itm_neg = _score_pairs(
                model, fields, image_tokens, image_emb, k_rerank > 0, batch_size, device, amp_dtype,
                _phase(progress, _PROBE_PHASES[prefix]))
            setattr(scores, f"{prefix}_itc_pos", itc_pos)
            setattr(scores, f"{prefix}_itc_neg", itc_neg)
            if itm_pos is not None:
                setattr(scores, f"{prefix}_itm_pos", itm_pos)
                setattr(scores, f"{prefix}_itm_neg", itm_neg)
                scores.itm_forwards += 2 * int(itm_pos.numel())
    return scores


def evaluate_retrieval(
    model: RetrievalModel,
    rset: RetrievalData,
    batch_size: int = 128,
    k_rerank: int = 16,
    device: Optional[torch.device | str] = None,
    amp_dtype: Optional[torch.dtype] = None,
    rerank_score: RerankScore = "itm",
    progress: bool = True,
) -> dict[str, float]:
    """Image↔text retrieval metrics of `model` on `rset` (anchors §2, ALBEF `evaluation` + `itm_eval`).

    Args:
        model: a `VLModel` (or anything with its encode_image / encode_text / image_embed / text_embed /
            fuse / itm_logits methods).
        rset: a `RetrievalSet`: images (I, 3, H, W), input_ids / attention_mask (Tn, T), txt2img (Tn,),
            img2txt, and optionally hard_image (H,) / hard_pos_* / hard_neg_* (H, T).
        batch_size: images / texts / (image, text) pairs per forward.
        k_rerank: ITC candidates re-ranked by ITM per query; 0 = ITC only (no ITM forwards at all).
        device: default the model's device. amp_dtype: autocast dtype (None = fp32).
        rerank_score: "itm" (ALBEF: ITM positive logit) or "itm+itc" (BLIP / LAVIS: logit + ITC cosine).
        progress: report the encoding and ITM loops as they run (`vlp.progress.Progress`: a bar on a
            terminal, else a line on stderr about every 10 s of a long loop); False = silent.

    Cost: I image + Tn text unimodal encodes (+ 2H hard-negative and 2P colour-probe texts); ITM fusion
    forwards at most (I·min(k, Tn) + Tn·min(k, I)) ≈ (I + Tn)·k — pairs proposed by both directions are
    scored once — plus 2H + 2P for the probes (reported as `itm_forwards`). Memory: image tokens (I, 1+P, Dv), text
    states (Tn, T, D) and two (I, Tn) float32 score matrices.

    Returns (all values float; recalls and accuracies in percent):
        `itc/txt_r{1,5,10}`, `itc/img_r{1,5,10}`, `itc/txt_r_mean`, `itc/img_r_mean`, `itc/r_mean`;
        the same under `itm/` when k_rerank > 0 (R@K with K > k_rerank is a lower bound: a ground truth
        outside the ITC top-k counts as a miss); `itc/hard_neg_acc` (ITC cosine) and `itm/hard_neg_acc`
        (ITM logit, whatever `rerank_score`) if the set has hard negatives, the ITM one only when
        k_rerank > 0; likewise `itc/colour_probe_acc` / `itm/colour_probe_acc` if it has colour probes;
        each of these with `_ci_low` / `_ci_high` (95 % Wilson interval); `num_images`, `num_texts`, `chance_r1`
        (text→image R@1 of a random ranking = 100 / I); `itm_forwards`.
        Top-ranked images for plotting come from `retrieval_examples`.
    """
    scores = compute_retrieval_scores(model, rset, batch_size, k_rerank, device, amp_dtype, rerank_score, progress)
    return retrieval_metrics(scores, rset.txt2img, getattr(rset, "img2txt", None))


def retrieval_metrics(
    scores: RetrievalScores, txt2img: Tensor, img2txt: Optional[Sequence[Sequence[int]]] = None
) -> dict[str, float]:
    """The metrics dict of `evaluate_retrieval` from precomputed `RetrievalScores`."""
    n_images, n_texts = scores.sim_itc.shape
    metrics: dict[str, float] = {f"itc/{k}": v for k, v in recall_at_k(scores.sim_itc, txt2img, img2txt).items()}
    if scores.score_i2t is not None and scores.score_t2i is not None:
        itm = recall_at_k(scores.score_i2t, txt2img, img2txt, sim_t2i=scores.score_t2i)
        metrics.update({f"itm/{k}": v for k, v in itm.items()})
    for key, pos, neg in (
        ("itc/hard_neg_acc", scores.hard_itc_pos, scores.hard_itc_neg),
        ("itm/hard_neg_acc", scores.hard_itm_pos, scores.hard_itm_neg),
        ("itc/colour_probe_acc", scores.probe_itc_pos, scores.probe_itc_neg),
        ("itm/colour_probe_acc", scores.probe_itm_pos, scores.probe_itm_neg),
    ):
        if pos is not None and neg is not None:
            metrics.update(pair_accuracy_metrics(pos, neg, key))
    return _with_set_sizes(metrics, n_images, n_texts, scores.itm_forwards)


def default_example_queries(img2txt: Sequence[Sequence[int]], num_queries: int) -> list[int]:
    """The first caption of `num_queries` images spread evenly over the set (not 5 captions of image 0)."""
    n_images = len(img2txt)
    num = min(num_queries, n_images)
    if num <= 0:
        return []
    picks = torch.linspace(0, n_images - 1, num).round().long().tolist()
    return [int(img2txt[i][0]) for i in picks]


@torch.no_grad()
def retrieval_examples(
    model: RetrievalModel,
    rset: RetrievalData,
    num_queries: int = 6,
    k: int = 5,
    batch_size: int = 128,
    device: Optional[torch.device | str] = None,
    amp_dtype: Optional[torch.dtype] = None,
    k_rerank: int = 16,
    rerank_score: RerankScore = "itm",
    queries: Optional[Sequence[int]] = None,
    progress: bool = True,
) -> tuple[list[int], Tensor]:
    """Top-k retrieved images for a few text queries, ranked like `evaluate_retrieval` (for plotting).

    Queries default to `default_example_queries(rset.img2txt, num_queries)`. Only those Q texts are
    ranked: ITC over all images, then the top-`max(k_rerank, k)` re-scored by ITM (Q·max(k_rerank, k)
    forwards) when k_rerank > 0; the order is then the re-ranked one. `progress`: report the image encoding
    (as `evaluate_retrieval`).

    Returns:
        (queries: list of Q text indices, topk: LongTensor (Q, min(k, I)) image indices, best first).
    """
    if rerank_score not in ("itm", "itm+itc"):
        raise ValueError(f"rerank_score must be 'itm' or 'itm+itc', got {rerank_score!r}")
    if queries is None:
        queries = default_example_queries(rset.img2txt, num_queries)
    queries = [int(q) for q in queries]
    n_images = rset.images.shape[0]
    k_out = min(k, n_images)
    if not queries:
        return [], torch.empty(0, k_out, dtype=torch.long)
    device = torch.device(device) if device is not None else _model_device(model)
    with eval_mode(model):
        image_tokens, image_emb = _encode_images(model, rset.images, batch_size, device, amp_dtype,
                                                 _phase(progress, "examples: encode images"))
        q = torch.tensor(queries, dtype=torch.long)
        ids = rset.input_ids[q].to(device)
        mask = rset.attention_mask[q].to(device)
        text_hidden, text_emb = _encode_texts(model, ids, mask, batch_size, device, amp_dtype)
        sims = text_emb @ image_emb.T  # (Q, I)
        if k_rerank <= 0:
            return queries, sims.topk(k_out, dim=1).indices.cpu()
        n_cand = min(max(k_rerank, k_out), n_images)
        cand = sims.topk(n_cand, dim=1).indices  # (Q, n_cand)
        txt_idx = torch.arange(len(queries), device=device).repeat_interleave(n_cand)
        img_idx = cand.reshape(-1)
        itm = fused_itm_pairs(model, image_tokens, text_hidden, mask, img_idx, txt_idx, batch_size, device, amp_dtype)
        itm = itm.view(len(queries), n_cand)
        if rerank_score == "itm+itc":
            itm = itm + sims.gather(1, cand)
        order = itm.topk(k_out, dim=1).indices
        return queries, cand.gather(1, order).cpu()


# ============================================================================== ITM over all pairs
def evaluate_retrieval_itm_all(
    scorer: Callable[..., Tensor],
    rset: RetrievalData,
    batch_size: int = 128,
    device: Optional[torch.device | str] = None,
    encode: Optional[Callable[..., Sequence[Tensor]]] = None,
    amp_dtype: Optional[torch.dtype] = None,
    progress: bool = True,
) -> dict[str, float]:
    """Retrieval for a model without ITC (UNITER convention): rank by the ITM score of EVERY (image, text) pair.

    `scorer(*image_rows, input_ids (P,T), attention_mask (P,T)) -> (P,)` scores P pairs (higher = match),
    where `image_rows` are the per-image inputs of the P pairs' images. Per-image inputs are computed once
    per image: `encode(images (B,3,H,W), region_boxes (B,N,4), region_mask (B,N)) -> tuple of (B, ...)`
    tensors (e.g. `Cmal.encode_regions`: ViT + RoIAlign + region projection), then gathered per chunk;
    with `encode=None` they are the raw `(images, region_boxes, region_mask)` rows, so e.g.
    `Cmal.itm_scores` can be passed directly (it then re-encodes the image of every pair). tasks/ does
    not import methods/: the model enters only through these callables; they run under `no_grad`, and
    the caller puts the model in eval mode.

    Cost: I image encodes plus I·Tn single-stream ITM forwards (+ 2H hard pairs, + 2P colour probes), in chunks of
    `batch_size` pairs (texts cut to the chunk's longest); with COCO's 5 captions per image that is
    5·I² forwards, quadratic in the set size, so keep the set small on CPU: 100 images → 50k pairs,
    1000 images → 5M pairs (UNITER's 1k-image COCO test needs a GPU cluster for this). Memory: the
    per-image cache and one (I, Tn) float32 score matrix.

    Args:
        rset: images, input_ids / attention_mask, txt2img / img2txt, optionally region_boxes (I,N,4) /
            region_mask (I,N) (required by region-based scorers), hard_image / hard_pos_* / hard_neg_* and
            colour_probe_image / colour_probe_pos_* / colour_probe_neg_*.
        batch_size: images per `encode` call and pairs per `scorer` call.
        device: where the inputs are moved (default cpu). amp_dtype: autocast dtype (None = fp32).
        progress: report the image encoding and the pair scoring as they run (as `evaluate_retrieval`).

    Returns:
        `itm_all/txt_r{1,5,10}`, `itm_all/img_r{1,5,10}`, `itm_all/{txt,img}_r_mean`, `itm_all/r_mean`,
        `itm_all/hard_neg_acc` (ITM score of the true caption vs its attribute-swapped twin, when the set
        has hard pairs), `itm_all/colour_probe_acc` (one object's caption vs another colour, when it has
        colour probes), each with `_ci_low` / `_ci_high` (95 % Wilson interval), `num_images`,
        `num_texts`, `chance_r1`, `itm_forwards` (= I·Tn + 2H + 2P).
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    n_images, n_texts = int(rset.images.shape[0]), int(rset.input_ids.shape[0])
    with torch.no_grad():
        cache = _image_rows(rset, encode, batch_size, device, amp_dtype, _phase(progress, "encode images"))
        # all pairs, image-major: pair p = (p // Tn, p % Tn)
        img_idx = torch.arange(n_images).repeat_interleave(n_texts)
        txt_idx = torch.arange(n_texts).repeat(n_images)
        score = score_pair_rows(scorer, cache, img_idx, rset.input_ids, rset.attention_mask, txt_idx,
                                batch_size, device, amp_dtype,
                                progress=_phase(progress, "ITM all pairs")).view(n_images, n_texts)
        metrics = {f"itm_all/{k}": v for k, v in recall_at_k(score, rset.txt2img, getattr(rset, "img2txt", None)).items()}
        forwards = n_images * n_texts
        for key, fields in (("hard_neg_acc", _hard_fields(rset)), ("colour_probe_acc", _probe_fields(rset))):
            if fields is not None:
                pos, neg = _probe_pair_scores(scorer, cache, fields, batch_size, device, amp_dtype,
                                              _phase(progress, _PROBE_PHASES[key]))
                metrics.update(pair_accuracy_metrics(pos, neg, f"itm_all/{key}"))
                forwards += 2 * pos.numel()
    return _with_set_sizes(metrics, n_images, n_texts, forwards)


def _with_set_sizes(metrics: dict[str, float], n_images: int, n_texts: int, forwards: float) -> dict[str, float]:
    """`metrics` plus `num_images`, `num_texts`, `chance_r1` and `itm_forwards` (the keys every protocol reports)."""
    metrics["num_images"] = float(n_images)
    metrics["num_texts"] = float(n_texts)
    metrics["chance_r1"] = chance_recall(1, n_images)
    metrics["itm_forwards"] = float(forwards)
    return metrics


def _image_rows(rset: RetrievalData, encode: Optional[Callable[..., Sequence[Tensor]]], batch_size: int,
                device: torch.device, amp_dtype: Optional[torch.dtype],
                progress: Optional[str] = None) -> list[Optional[Tensor]]:
    """The per-image inputs of a pair scorer for every image of the set, computed once per image:
    `encode(images, region_boxes, region_mask)` per chunk, or the raw rows when `encode` is None.
    `progress`: the phase name shown while encoding (None, or no `encode`: silent)."""
    boxes = getattr(rset, "region_boxes", None)
    rmask = getattr(rset, "region_mask", None)
    parts: list[list[Optional[Tensor]]] = []
    n_images = int(rset.images.shape[0])
    with _progress(progress if encode is not None else None, n_images, "images") as bar:
        for start in range(0, n_images, batch_size):
            sl = slice(start, start + batch_size)
            rows = (rset.images[sl].to(device),
                    None if boxes is None else boxes[sl].to(device),
                    None if rmask is None else rmask[sl].to(device))
            if encode is not None:
                with _autocast(device, amp_dtype):
                    rows = tuple(encode(*rows))
            parts.append(list(rows))
            bar.update(min(batch_size, n_images - start))
    return [None if parts[0][j] is None else torch.cat([p[j] for p in parts]) for j in range(len(parts[0]))]


def score_pair_rows(scorer: Callable[..., Tensor], cache: Sequence[Optional[Tensor]], img_idx: Tensor,
                    input_ids: Tensor, attention_mask: Tensor, txt_idx: Tensor, batch_size: int,
                    device: torch.device, amp_dtype: Optional[torch.dtype], progress: Optional[str] = None) -> Tensor:
    """`scorer(*cache rows of img_idx, input_ids[txt_idx], attention_mask[txt_idx]) -> (P,)` float32 on CPU,
    in chunks of `batch_size` pairs. Pairs run in order of text length and each chunk is cut to its longest
    text (a single-stream pass costs ∝ text + regions; on the world this halves the padded tokens per pair,
    issue 15); the scores come back in the input order. `progress`: the phase name shown while scoring
    (None = silent)."""
    positions = torch.arange(1, attention_mask.shape[1] + 1)
    text_len = (attention_mask.bool().cpu() * positions).amax(dim=1)  # (Tn,) last real column + 1
    order = torch.argsort(text_len[txt_idx], stable=True)
    out = torch.empty(img_idx.numel(), dtype=torch.float32)
    with _progress(progress, img_idx.numel(), "pairs") as bar:
        for start in range(0, img_idx.numel(), batch_size):
            chunk = order[start : start + batch_size]
            i = img_idx[chunk].to(device)
            t = txt_idx[chunk]
            length = max(int(text_len[t].max()), 1)
            rows = [None if c is None else c[i] for c in cache]
            with _autocast(device, amp_dtype):
                score = scorer(*rows, input_ids[t][:, :length].to(device), attention_mask[t][:, :length].to(device))
            out[chunk] = score.detach().float().reshape(-1).cpu()
            bar.update(chunk.numel())
    return out


def _probe_pair_scores(scorer: Callable[..., Tensor], cache: Sequence[Optional[Tensor]],
                       fields: tuple[Tensor, Tensor, Tensor, Tensor, Tensor], batch_size: int,
                       device: torch.device, amp_dtype: Optional[torch.dtype],
                       progress: Optional[str] = None) -> tuple[Tensor, Tensor]:
    """Pair scores (P,) of the true and the false text of P probe pairs against each pair's image.
    `progress`: the probes' phase name (e.g. "hard pairs"; None = silent)."""
    p_img, pos_ids, pos_mask, neg_ids, neg_mask = fields
    p_img, idx = p_img.long().cpu(), torch.arange(p_img.numel())
    pos = score_pair_rows(scorer, cache, p_img, pos_ids.cpu(), pos_mask.cpu(), idx, batch_size, device, amp_dtype,
                          _sub(progress, "ITM true"))
    neg = score_pair_rows(scorer, cache, p_img, neg_ids.cpu(), neg_mask.cpu(), idx, batch_size, device, amp_dtype,
                          _sub(progress, "ITM false"))
    return pos, neg


# ============================================================================== first stage + ITM re-rank
def evaluate_retrieval_itc_rerank(
    scorer: Callable[..., Tensor],
    image_embed: Callable[..., Tensor],
    text_embed: Callable[[Tensor, Tensor], Tensor],
    rset: RetrievalData,
    k_rerank: int = 16,
    batch_size: int = 128,
    device: Optional[torch.device | str] = None,
    encode: Optional[Callable[..., Sequence[Tensor]]] = None,
    amp_dtype: Optional[torch.dtype] = None,
    progress: bool = True,
) -> dict[str, float]:
    """Retrieval for a model without ITC but with a first stage (`vlp.models.first_stage`): rank by the first
    stage's cosine, re-rank each query's top `k_rerank` by the ITM score (ALBEF / BLIP's two stages).

    `encode` / `scorer` as in `evaluate_retrieval_itm_all` (per-image inputs once per image; ITM logits of
    P pairs); `image_embed(*image rows) -> (B, E)` and `text_embed(input_ids, attention_mask) -> (B, E)` the
    first stage's L2-normalised embeddings. Cost: I + Tn first-stage encodes and at most (I + Tn)·k ITM
    passes (pairs proposed by both directions scored once), + 2H + 2P for the probes: linear in the set
    size, where `evaluate_retrieval_itm_all` is quadratic. R@K with K > k_rerank is a lower bound (a ground
    truth outside the first stage's top k is a miss), as for ALBEF's `itm/`. `progress`: report the encoding
    and ITM loops as they run (as `evaluate_retrieval`).

    Returns `itc/...` (the first stage alone) and `itm/...` (re-ranked) recalls and probe accuracies with
    their intervals, in the keys of `evaluate_retrieval`, plus `num_images`, `num_texts`, `chance_r1`,
    `itm_forwards`.
    """
    if k_rerank < 1:
        raise ValueError(f"the first-stage protocol re-ranks the top k by ITM: eval.k_rerank must be >= 1, got {k_rerank}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    n_images, n_texts = int(rset.images.shape[0]), int(rset.input_ids.shape[0])
    img2txt = getattr(rset, "img2txt", None)

    def embed_texts(ids: Tensor, mask: Tensor, phase: Optional[str]) -> Tensor:
        length = _real_length(mask)
        out = []
        with _progress(phase, ids.shape[0], "texts") as bar:
            for start in range(0, ids.shape[0], batch_size):
                with _autocast(device, amp_dtype):
                    out.append(text_embed(ids[start : start + batch_size, :length].to(device),
                                          mask[start : start + batch_size, :length].to(device)).float())
                bar.update(out[-1].shape[0])
        return torch.cat(out)

    with torch.no_grad():
        cache = _image_rows(rset, encode, batch_size, device, amp_dtype, _phase(progress, "encode images"))
        image_emb = []
        with _progress(_phase(progress, "first-stage image embeddings"), n_images, "images") as bar:
            for start in range(0, n_images, batch_size):
                with _autocast(device, amp_dtype):
                    image_emb.append(image_embed(*[None if c is None else c[start : start + batch_size]
                                                   for c in cache]).float())
                bar.update(image_emb[-1].shape[0])
        image_emb = torch.cat(image_emb)
        text_emb = embed_texts(rset.input_ids, rset.attention_mask, _phase(progress, "encode texts"))
        sims = image_emb @ text_emb.T  # (I, Tn)

        def itm(img_idx: Tensor, txt_idx: Tensor) -> Tensor:
            return score_pair_rows(scorer, cache, img_idx.cpu(), rset.input_ids, rset.attention_mask,
                                   txt_idx.cpu(), batch_size, device, amp_dtype, _phase(progress, "ITM re-rank"))

        score_i2t, score_t2i, forwards = _rerank(sims, k_rerank, "itm", itm)
        metrics = {f"itc/{k}": v for k, v in recall_at_k(sims.cpu(), rset.txt2img, img2txt).items()}
        metrics.update({f"itm/{k}": v for k, v in recall_at_k(score_i2t.cpu(), rset.txt2img, img2txt,
                                                                sim_t2i=score_t2i.cpu()).items()})
        for key, fields in (("hard_neg_acc", _hard_fields(rset)), ("colour_probe_acc", _probe_fields(rset))):
            if fields is None:
                continue
            p_img, pos_ids, pos_mask, neg_ids, neg_mask = fields
            phase = _phase(progress, _PROBE_PHASES[key])
            p_emb = image_emb[p_img.long().to(device)]
            itc_pos = (p_emb * embed_texts(pos_ids, pos_mask, _sub(phase, "encode true texts"))).sum(-1).cpu()
            itc_neg = (p_emb * embed_texts(neg_ids, neg_mask, _sub(phase, "encode false texts"))).sum(-1).cpu()
            metrics.update(pair_accuracy_metrics(itc_pos, itc_neg, f"itc/{key}"))
            pos, neg = _probe_pair_scores(scorer, cache, fields, batch_size, device, amp_dtype, phase)
            metrics.update(pair_accuracy_metrics(pos, neg, f"itm/{key}"))
            forwards += 2 * pos.numel()
    return _with_set_sizes(metrics, n_images, n_texts, forwards)


# ============================================================================== by the method's protocol
# The headline R-mean of each protocol, best first: what a table shows for "retrieval".
HEADLINE_KEYS = ("itm_all/r_mean", "itm/r_mean", "itc/r_mean")


def evaluate_method_retrieval(
    method: Any,
    rset: RetrievalData,
    protocols: Sequence[str],
    batch_size: int = 128,
    k_rerank: int = 16,
    device: Optional[torch.device | str] = None,
    amp_dtype: Optional[torch.dtype] = None,
    progress: bool = True,
) -> dict[str, float]:
    """Retrieval metrics of a pre-training method by the protocols it declares (`vlp.methods.base`):

      "itc"      ITC ranking of `method.itc_model` (`evaluate_retrieval` with k_rerank = 0);
      "itc_itm"  the same, ITC top-`k_rerank` re-ranked by ITM (ALBEF);
      "itm_all"  the ITM score of every pair (`evaluate_retrieval_itm_all` with `method.itm_pair_inputs`
                 per image and `method.itm_pair_scores` per pair: UNITER / CMAL; a method with
                 `itm_all_from_text_states` (ALBEF) scores every pair through its cached text states);
      "itc_rerank" the first stage of a single-stream method (`method.first_stage_image_embeds` /
                 `first_stage_text_embeds`) ranks, its top-`k_rerank` are re-ranked by `itm_pair_scores`
                 (`evaluate_retrieval_itc_rerank`, keys `itc/` and `itm/`).

    The method is put in eval mode for the call; `progress` reports its loops (as `evaluate_retrieval`).
    Returns the union of the protocols' metrics (`itc/`, `itm/`, `itm_all/` keys, plus `num_images`,
    `num_texts`, `chance_r1`, `itm_forwards` summed over the protocols and each protocol's own count as
    `itm/itm_forwards` / `itm_all/itm_forwards`).
    ValueError for an unknown protocol or an empty list (a method without a retrieval protocol)."""
    if not protocols:
        raise ValueError(f"{type(method).__name__} declares no retrieval protocol (retrieval_protocols is empty)")
    metrics: dict[str, float] = {}
    forwards = 0.0
    with eval_mode(method):
        for protocol in protocols:
            if protocol in ("itc", "itc_itm"):
                part = evaluate_retrieval(method.itc_model, rset, batch_size=batch_size,
                                          k_rerank=k_rerank if protocol == "itc_itm" else 0,
                                          device=device, amp_dtype=amp_dtype, progress=progress)
            elif protocol == "itm_all" and getattr(method, "itm_all_from_text_states", False):
                # every pair re-ranked = all pairs, through the cached text states (ALBEF: each text is
                # encoded once, not once per pair; the same ITM logits)
                everything = max(int(rset.images.shape[0]), int(rset.input_ids.shape[0]))
                scores = compute_retrieval_scores(method.itc_model, rset, batch_size=batch_size, k_rerank=everything,
                                                  device=device, amp_dtype=amp_dtype, progress=progress)
                part = {f"itm_all/{k[4:]}": v for k, v in
                        retrieval_metrics(scores, rset.txt2img, getattr(rset, "img2txt", None)).items()
                        if k.startswith("itm/")}
                part["itm_forwards"] = float(scores.itm_forwards)
            elif protocol == "itm_all":
                part = evaluate_retrieval_itm_all(method.itm_pair_scores, rset, batch_size=batch_size,
                                                  device=device, encode=method.itm_pair_inputs, amp_dtype=amp_dtype,
                                                  progress=progress)
            elif protocol == "itc_rerank":
                part = evaluate_retrieval_itc_rerank(
                    method.itm_pair_scores, method.first_stage_image_embeds, method.first_stage_text_embeds, rset,
                    k_rerank=k_rerank, batch_size=batch_size, device=device, encode=method.itm_pair_inputs,
                    amp_dtype=amp_dtype, progress=progress)
            else:
                raise ValueError(f"unknown retrieval protocol '{protocol}' (known: itc, itc_itm, itm_all, itc_rerank)")
            count = part.pop("itm_forwards", 0.0)
            forwards += count
            if protocol != "itc":  # each protocol's own cost, next to its recalls (`itm/`, `itm_all/`)
                part[f"{'itm_all' if protocol == 'itm_all' else 'itm'}/itm_forwards"] = count
            metrics.update(part)
    metrics["itm_forwards"] = forwards
    return metrics


def headline_r_mean(metrics: dict[str, Any], prefix: str = "") -> Optional[float]:
    """The R-mean a table shows for retrieval: ITM over all pairs when measured, else ITM re-ranked, else
    ITC (`HEADLINE_KEYS`); `prefix` e.g. "eval/". None when no protocol was measured."""
    for key in HEADLINE_KEYS:
        if prefix + key in metrics:
            return float(metrics[prefix + key])
    return None
