"""Object-level word <-> region pieces: the class lexicon, anchor detection, partner sampling, region embedding.

CMAL (Ma, Li, Li, Huang, ACM MM 2022; spec `cmal.md`) pairs caption tokens with regions whose object
class the token names ("anchor points"). These pieces are method-agnostic (any object-level method or
task can use them), so they live in `models/` (torch only; the tokenizer is duck-typed):

* `build_lexicon(class_words, tokenizer)` -> `LexiconTable`: class k -> the whole-word token ids that
  name it, as a dense `(C, V)` BoolTensor for vectorised lookup (cmal.md §3.2, §11.2).
* `detect_anchors(input_ids, region_labels, table)` -> `(B, T, N)` anchor pairs A = W ⊕ R (§3.3).
* `sample_partner(anchor_pairs, uniforms)` -> `(B, T)` one partner region per text anchor, uniform
  among its matches (§3.3, "for AMC each text anchor t gets one partner π(t)").
* `anchor_rate(anchor_pairs)`: share of captions with an anchor and mean anchors per caption (§11.2:
  "count and report the anchor rate" — a vocabulary that splits class words silently kills anchors).
* `RegionEmbedding`: UNITER/CMAL region inputs `LN(W_v v)` and `LN(W_p b)` with the 7-d box
  `[x1, y1, x2, y2, w, h, w*h]` (§3.1, §4, §11.4). `boxes_to_7d` and `grid_cell_boxes` (a g x g grid of
  cells as "regions" for images without boxes, §11.1) live in `vlp.models.regions`, re-exported here.

Region labels follow `vlp.types.Batch`: class id + 1, 0 = background / unknown / padding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from vlp.data.lexicon import morphology_variants  # pure text rule, shared with vlp.data.regions
from vlp.models.layers import BERT_LN_EPS
from vlp.models.regions import boxes_to_7d, grid_cell_boxes  # re-exported: they lived here before


# ------------------------------------------------------------------------------------------ lexicon
@dataclass
class LexiconTable:
    """Class -> token lexicon Φ (cmal.md §3.2).

    class_token: (C, V) bool, `class_token[k, v]` = token id v names class k (0-based class ids).
    words: per class, the surface words that were kept (whole tokens of the vocabulary), sorted.
    unmapped: class ids with no token at all (such classes can never form an anchor).
    """

    class_token: Tensor
    words: tuple[tuple[str, ...], ...]
    unmapped: tuple[int, ...]

    @property
    def num_classes(self) -> int:
        return int(self.class_token.shape[0])

    @property
    def vocab_size(self) -> int:
        return int(self.class_token.shape[1])

    def token_ids(self, class_id: int) -> list[int]:
        """Sorted token ids of class `class_id` (0-based)."""
        return self.class_token[class_id].nonzero().squeeze(1).tolist()

    def to(self, device: torch.device | str) -> "LexiconTable":
        return LexiconTable(self.class_token.to(device), self.words, self.unmapped)

    @classmethod
    def from_ids(
        cls, token_ids: Sequence[Iterable[int]], vocab_size: int, words: Optional[Sequence[Iterable[str]]] = None
    ) -> "LexiconTable":
        """Build from explicit token ids per class (e.g. a saved lexicon); ValueError for ids outside [0, V)."""
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
        table = torch.zeros(len(token_ids), vocab_size, dtype=torch.bool)
        for k, ids in enumerate(token_ids):
            ids = [int(i) for i in ids]
            bad = [i for i in ids if not 0 <= i < vocab_size]
            if bad:
                raise ValueError(
                    f"lexicon ids {bad} of class {k} are outside the vocabulary [0, {vocab_size}): the lexicon was "
                    f"built for another tokenizer; rebuild it with build_lexicon(class_words, tokenizer)"
                )
            if ids:
                table[k, torch.tensor(ids, dtype=torch.long)] = True
        kept = tuple(tuple(sorted(w)) for w in words) if words is not None else tuple(() for _ in token_ids)
        unmapped = tuple(k for k in range(len(token_ids)) if not bool(table[k].any()))
        return cls(table, kept, unmapped)




def build_lexicon(
    class_words: Sequence[Iterable[str]],
    tokenizer: Any,
    synonyms: Optional[Mapping[int, Iterable[str]]] = None,
    morphology: bool = True,
) -> LexiconTable:
    """The lexicon Φ: class k -> the set of whole-word token ids that name it (cmal.md §3.2, §11.2).

    For class k, every phrase of `class_words[k]` (plus `synonyms[k]`) is split on spaces, each word s
    is expanded with `morphology_variants(s)` (the reference code's rules), and only strings that are ONE
    whole, non-special token of the tokenizer survive (`tokenizer.is_whole_word`, then
    `tokenizer.word_id`). Multi-word names contribute each word separately (as in the code: "tennis
    racket" anchors both "tennis" and "racket").

    Follows the code, generalised: the paper's "synonym lexicon" is the world's own synonyms and plurals
    (`vlp.data.lexicon.class_words`), which the caller passes in `class_words`; user data can add
    `synonyms` (e.g. {k: ["fridge"]}).

    Args:
        class_words: C iterables of words/phrases, index = 0-based class id (a bare str is one phrase).
        tokenizer: exposes `is_whole_word(str) -> bool`, `word_id(str) -> int`, `vocab_size`.
        synonyms: optional extra words per class id.
        morphology: apply the §3.2 plural/singular rules (False: exact words only).

    Returns:
        LexiconTable with `class_token` (C, V) bool and `unmapped` (classes with no token).

    Raises:
        ValueError: a tokenizer id outside [0, vocab_size), or a synonym for an unknown class.
    """
    num_classes = len(class_words)
    vocab_size = int(tokenizer.vocab_size)
    extra = {int(k): list(v) for k, v in (synonyms or {}).items()}
    unknown = sorted(k for k in extra if not 0 <= k < num_classes)
    if unknown:
        raise ValueError(f"synonyms given for class ids {unknown}, but there are {num_classes} classes (0-based)")
    ids_per_class: list[set[int]] = []
    words_per_class: list[set[str]] = []
    for k, phrases in enumerate(class_words):
        phrases = [phrases] if isinstance(phrases, str) else list(phrases)
        phrases += extra.get(k, [])
        candidates: set[str] = set()
        for phrase in phrases:
            for word in str(phrase).split():
                candidates |= morphology_variants(word) if morphology else {word.lower()}
        kept = {w for w in candidates if tokenizer.is_whole_word(w)}
        ids = {int(tokenizer.word_id(w)) for w in kept}
        ids_per_class.append(ids)
        words_per_class.append(kept)
    return LexiconTable.from_ids([sorted(i) for i in ids_per_class], vocab_size, words_per_class)


# ------------------------------------------------------------------------------------------ anchors
def detect_anchors(
    input_ids: Tensor,
    region_labels: Tensor,
    table: LexiconTable | Tensor,
    attention_mask: Optional[Tensor] = None,
    region_mask: Optional[Tensor] = None,
) -> Tensor:
    """Anchor pairs A = {(t, i) : w_t ∈ Φ(c_i)} (cmal.md §3.3, the anchor operator ⊕).

    Every occurrence of a class token is an anchor (T_A holds all of them). Regions with label 0
    (background / padding) and padded tokens never match; special tokens never do (the lexicon holds
    whole words only). Quirk 1 of the reference (`argmax(p[:, 1:-1])` drops the last class) does not
    arise: labels here are hard ground-truth classes, used as given.

    Args:
        input_ids: (B, T) long token ids.
        region_labels: (B, N) long, class id + 1 in [0, C] (0 = background / padding).
        table: a `LexiconTable` or its (C, V) bool `class_token`.
        attention_mask: (B, T) 1 = real token, or None (all real).
        region_mask: (B, N) True = real region, or None (all real).

    Returns:
        anchor_pairs: (B, T, N) bool.

    Raises:
        ValueError: labels outside [0, C], token ids outside [0, V) of the lexicon, or mismatched shapes.
    """
    class_token = table.class_token if isinstance(table, LexiconTable) else table
    if class_token.dim() != 2 or class_token.dtype != torch.bool:
        raise ValueError(
            f"lexicon table must be a (C, V) bool tensor, got {class_token.dtype} {tuple(class_token.shape)}"
        )
    if input_ids.dim() != 2 or region_labels.dim() != 2 or input_ids.shape[0] != region_labels.shape[0]:
        raise ValueError(
            f"expected input_ids (B, T) and region_labels (B, N); got {tuple(input_ids.shape)} and "
            f"{tuple(region_labels.shape)}"
        )
    if input_ids.dtype.is_floating_point or region_labels.dtype.is_floating_point:
        raise ValueError("input_ids and region_labels must be integer tensors")
    num_classes, vocab_size = class_token.shape
    if region_labels.numel() and (int(region_labels.min()) < 0 or int(region_labels.max()) > num_classes):
        raise ValueError(
            f"region_labels must be class id + 1 in [0, {num_classes}] (0 = background/padding), got values in "
            f"[{int(region_labels.min())}, {int(region_labels.max())}]: the labels and the lexicon disagree on "
            f"the number of classes"
        )
    if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab_size):
        raise ValueError(
            f"input_ids hold ids in [{int(input_ids.min())}, {int(input_ids.max())}] but the lexicon covers a "
            f"vocabulary of {vocab_size}: build the lexicon with the tokenizer that encoded the text"
        )
    B, T = input_ids.shape
    N = region_labels.shape[1]
    # Row 0 of the extended table is background: it matches nothing.
    extended = torch.cat([class_token.new_zeros(1, vocab_size), class_token], dim=0).to(input_ids.device)
    flat = region_labels.long()[:, None, :] * vocab_size + input_ids.long()[:, :, None]  # (B, T, N)
    pairs = extended.reshape(-1)[flat]
    if attention_mask is not None:
        pairs = pairs & attention_mask.bool()[:, :, None]
    if region_mask is not None:
        pairs = pairs & region_mask.bool()[:, None, :]
    return pairs.reshape(B, T, N)


def sample_uniform_index(allowed: Tensor, uniforms: Tensor) -> Tensor:
    """Inverse-CDF draw of one allowed index per row, uniform among the allowed ones.

    With m allowed columns and u ∈ [0, 1), picks the (floor(u*m)+1)-th allowed column (integer CDF, so
    every allowed column has probability exactly 1/m for u uniform on a fine grid).

    Args:
        allowed: (..., K) bool.
        uniforms: (...) floats in [0, 1).

    Returns:
        (...) long index in [0, K), -1 where no column is allowed.
    """
    if uniforms.shape != allowed.shape[:-1]:
        raise ValueError(f"uniforms must have shape {tuple(allowed.shape[:-1])}, got {tuple(uniforms.shape)}")
    cdf = allowed.long().cumsum(dim=-1)
    count = cdf[..., -1] if allowed.shape[-1] else torch.zeros_like(uniforms, dtype=torch.long)
    threshold = torch.floor(uniforms.double() * count.double()).long()
    threshold = torch.minimum(threshold, (count - 1).clamp_min(0))
    index = (cdf <= threshold[..., None]).sum(dim=-1)
    return torch.where(count > 0, index, torch.full_like(index, -1))


def sample_partner(anchor_pairs: Tensor, uniforms: Tensor) -> Tensor:
    """π(t): one partner region per text anchor, uniform among its matching regions (cmal.md §3.3, [CODE]).

    Several tokens may pick the same region (no dedupe, as the reference code).

    Args:
        anchor_pairs: (B, T, N) bool from `detect_anchors`.
        uniforms: (B, T) in [0, 1), e.g. `keyed_uniform(sample_keys, (T,), salt)`.

    Returns:
        partner: (B, T) long region index, -1 where t is not an anchor.
    """
    if anchor_pairs.dim() != 3:
        raise ValueError(f"anchor_pairs must be (B, T, N), got {tuple(anchor_pairs.shape)}")
    return sample_uniform_index(anchor_pairs.bool(), uniforms)


def anchor_rate(anchor_pairs: Tensor) -> tuple[Tensor, Tensor]:
    """(share of captions with >= 1 text anchor, mean number of text anchor positions |T_A| per caption).

    anchor_pairs (B, T, N) bool -> two 0-d float tensors (0 for an empty batch).
    """
    per_caption = anchor_pairs.any(dim=-1).sum(dim=-1).float()  # (B,)
    if per_caption.numel() == 0:
        zero = per_caption.new_zeros(())
        return zero, zero.clone()
    return (per_caption > 0).float().mean(), per_caption.mean()


# ------------------------------------------------------------------------------------------ regions
class RegionEmbedding(nn.Module):
    """UNITER/CMAL region input (cmal.md §4, §11.4), split at the point where CMAL swaps features.

      project(v)        = LN_v(W_v v + β_v)                              (B,N,Dv) -> (B,N,d)   "e^v"
      finish(e, b, s)   = Dropout(LN(e + LN_p(W_p b7 + β_p) + s))        (B,N,d)  -> (B,N,d)   "x^v"

    `s` is the region type embedding (UNITER uses the text's token-type row 1). Boxes are not swapped:
    `finish` adds a slot's own box to whatever vector occupies the slot.
    Weights: truncated normal (std `init_std`, cut at 2 std), zero biases, LayerNorm 1/0 (BERT init).
    """

    def __init__(self, vision_width: int, width: int, dropout: float = 0.0, init_std: float = 0.02) -> None:
        super().__init__()
        self.feat_proj = nn.Linear(vision_width, width)
        self.feat_norm = nn.LayerNorm(width, eps=BERT_LN_EPS)
        self.box_proj = nn.Linear(7, width)
        self.box_norm = nn.LayerNorm(width, eps=BERT_LN_EPS)
        self.out_norm = nn.LayerNorm(width, eps=BERT_LN_EPS)
        self.drop = nn.Dropout(dropout)
        for linear in (self.feat_proj, self.box_proj):
            nn.init.trunc_normal_(linear.weight, std=init_std, a=-2 * init_std, b=2 * init_std)
            nn.init.zeros_(linear.bias)

    def project(self, feats: Tensor) -> Tensor:
        """feats (B,N,Dv) -> e^v (B,N,d)."""
        return self.feat_norm(self.feat_proj(feats))

    def finish(self, embeds: Tensor, boxes: Tensor, type_embed: Optional[Tensor] = None) -> Tensor:
        """embeds (B,N,d), boxes (B,N,4|7), type_embed (d,) or None -> x^v (B,N,d)."""
        x = embeds + self.box_norm(self.box_proj(boxes_to_7d(boxes).to(embeds.dtype)))
        if type_embed is not None:
            x = x + type_embed
        return self.drop(self.out_norm(x))

    def forward(self, feats: Tensor, boxes: Tensor, type_embed: Optional[Tensor] = None) -> Tensor:
        """feats (B,N,Dv), boxes (B,N,4|7) -> (B,N,d) = finish(project(feats), boxes, type_embed)."""
        return self.finish(self.project(feats), boxes, type_embed)


__all__ = [
    "LexiconTable",
    "RegionEmbedding",
    "anchor_rate",
    "boxes_to_7d",
    "build_lexicon",
    "detect_anchors",
    "grid_cell_boxes",
    "morphology_variants",
    "sample_partner",
    "sample_uniform_index",
]
