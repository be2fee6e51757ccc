"""CMAL pre-training: anchor-point masking + swap feature filling (AMC), word-region contrast (WRC), ITM.

Ma, Li, Li, Huang, "CMAL: A Novel Cross-Modal Associative Learning Framework for Vision-Language
Pre-Training", ACM MM 2022 (arXiv 2410.12595; code zhizhi111/cmal, a UNITER fork). Section numbers (§)
refer to the implementation spec `cmal.md`.

Pipeline of one AMC step (§2, §5), for a batch of captions and the regions of their images:

  1. anchors   A = W ⊕ R: token t names the object class of region i          (`detect_anchors`, §3.3)
  2. partner   π(t) uniform among t's matching regions                          (`sample_partner`)
  3. masking   all text anchors + 15 % BERT MLM elsewhere; partner regions swapped, 25 % of the other
               labelled regions masked                                          (`anchor_mask`, §5)
  4. UMSE      e^w (word vectors) and e^v = LN_v(W_v v) (region vectors)        (§4)
  5. CMAP      text slot t <- e^v_π(t); region slot π(t) <- e^w_t              (`swap_fill`, §5)
  6. slot terms each slot adds its OWN position/type (text) or box/type (region) embedding, then LN
  7. CMAI      the single-stream encoder over [text ; regions]                  (`FusionEncoder.encode_joint`, §6)
  8. CMAC      word head (tied MLM head) at text targets, region classifier at swapped/masked regions
                                                                               (`amc_loss`, §7)

WRC (§8.1) and ITM (§8.2) run the same encoder on the clean (un-masked, un-swapped) pair.

Where we follow the reference code [CODE]: anchor lexicon with the §3.2 morphology rules; every anchor
occurrence masked at 100 %; partners uniform, regions re-used by several tokens (quirk 3); a region
swapped with several tokens receives the word vector of the LAST such token (quirk 3, "last wins" —
reproduced and tested); positions/boxes not swapped; MLM 15 % (80/10/10) on non-anchor tokens and 25 %
masking of non-anchor regions, both computed in the same pass; at least one text and one region target
per sample (UNITER: "if nothing is selected, token 0 is masked"; "one random region is masked"); the
two AMC cross-entropies are batch means summed unweighted (quirk 7, reproduced: it is a plain sum);
ITM: 50 % of rows get another image's regions, 2-way CE on the fused [CLS]; UNITER's OT alignment is off
(quirk 6, reproduced: we have none); task sampling ITM:AMC:WRC = 1:3:2; τ init 0.07, clamped.

Where we deviate or choose (each also a config flag where both behaviours matter):
  * Region inputs (§3.1, §11.1), chosen per batch by what it carries (`Cmal.regions`; made by
    `vlp.models.regions.RegionInputBuilder`):
      - `batch.region_feats` (precomputed BUTD / UNITER detector features, `data.source: regions`, read
        by `vlp.data.regions`): used as is, no RoIAlign, as the reference code does. The region
        embedding's input dim is `method.region_feat_dim` (BUTD: 2048), a config field so the model is
        built before data is read and checkpoints rebuild exactly. Labels come from the soft_labels
        with quirk 1 FIXED by default (`argmax(p[:, 1:])`; `data.region_labels_faithful: true`
        reproduces `argmax(p[:, 1:-1])`; see `vlp.data.regions.soft_labels_to_classes`).
      - images + `region_boxes` (the world): RoIAlign features of the ground-truth boxes on our own ViT
        patch grid (§11.1); labels are the world's classes (no argmax, so quirk 1 does not arise).
      - images without boxes (`data.source: karpathy`): a `method.grid_regions` x `grid_regions` grid of
        cells as regions (§11.1 "fixed grid cells"), RoI-pooled the same way, labels 0.
    Without labels (grid cells, features without soft_labels, boxes without labels) nothing can be an
    anchor: CMAL warns ONCE per cause (`warnings.warn`), `anchor_rate` is logged as 0, AMC reduces to
    MLM on the text (no swaps; label-0 regions have no class target) and WRC to 0 (no pairs) — finite,
    never NaN, never a silent wrong number (§11.1: "raise a clear warning/counter, never a silent zero").
    `whole_image_region` prepends a [0,0,1,1] region with label 0 (our addition; with precomputed
    features its feature is the mean of the real regions'). `max_regions` keeps the first N regions
    (BUTD dumps are sorted by confidence).
  * Quirk 4 (scale mismatch: raw word embedding swapped with a LayerNormed region vector):
    `umse_norm: sphere` (default, FIX) maps both e^w and e^v onto the sphere of radius sqrt(d)
    (x * sqrt(d) / ||x||: the norm a LayerNorm output has before its affine), so swapped vectors are
    scale-compatible as §4's "separate hypersphere spaces" asks; `umse_norm: none` reproduces the code.
  * `unimodal_layers` k (§4, [INFERRED]): 0 = code-faithful (e^w is the word embedding); k > 0 runs the
    text encoder's first k blocks over `text.embed(ids)` and k method-owned blocks over the region
    embeddings (masked regions hidden first) before the swap. The region-fill word vectors then come
    from a second text pass in which only the anchors show their real word, so no text slot sees an
    anchor's word through its context.
  * Quirk 5 (masked regions): a masked region's vector e^v is set to exactly 0 in `swap_fill` (the code
    zeroes the raw feature, which after img_linear + LN becomes the constant LN_v(β_v)). Neither has a
    learned mask embedding; the slot keeps its box and type embedding. Masked regions are drawn among
    labelled regions only (label 0 has no AMC target).
  * Text anchors carry [MASK] in `masked_ids` (the code keeps the id and overwrites the vector); the
    vector at the slot is the swapped region vector either way, so the encoder input is the same.
  * Quirk 2 (WRC with padding inside the softmax and / (L_t·N)): FIXED by default (padding masked, mean
    over anchor pairs, samples without anchors excluded); `wrc_faithful: true` reproduces the code.
  * ITM negatives come from the local (micro-)batch, uniformly among rows of another image (UNITER draws
    a random image of the dataset); rows without any other image in the batch stay positive. ITM uses
    `VLModel.itm_head` on the fused [CLS] directly (no tanh pooler), like every method of this library.
  * Task sampling (`task_mixing: ratio`) draws one task per optimizer step from a counter-based hash of
    (train seed, step counter); the counter is a buffer advanced in `on_step_end`, saved in checkpoints,
    so a resumed run draws the same tasks, every rank and every accumulation micro-batch of a step run
    the same task, and the draw does not depend on the batch. `task_mixing: sum` computes all three
    with `task_weights` normalised by their sum (cmal.md §8.3: same expected objective as 1:3:2).
    In eval mode all three are computed and weighted by the normalised `task_ratio`.
  * Per-sample randomness (partners, masks, negatives) is keyed by `batch.sample_keys`
    (`keyed_uniform`), so it does not depend on how the batch is split; torch's RNG when keys are None.

The task is partly solvable by copying across the swapped pair (region slot π(t) holds the word vector
that text slot t must predict): that is the paper's "associative" design, reproduced as is.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pydantic import Field

from vlp.config import MethodConfig, RunConfig, Section
from vlp.methods.base import PretrainMethod
from vlp.models.anchors import (
    LexiconTable,
    RegionEmbedding,
    anchor_rate,
    build_lexicon,
    detect_anchors,
    sample_partner,
    sample_uniform_index,
)
from vlp.models.layers import BERT_LN_EPS, Block
from vlp.models.losses import IGNORE_INDEX, itm_loss, mask_tokens, mlm_loss
from vlp.models.model import VLModel
from vlp.models.regions import RegionInputBuilder, RegionInputs
from vlp.models.rng import keyed_uniform, sample_uniforms
from vlp.types import Batch, PairOutput

SALT_PARTNER = 0x434D50  # "CMP": partner choice per token
SALT_TEXT = 0x434D54  # "CMT": MLM draws per token (select, 80/10/10, random id)
SALT_REGION = 0x434D52  # "CMR": region masking per region
SALT_FALLBACK = 0x434D46  # "CMF": the forced region when a sample has no region target
SALT_ITM = 0x434D49  # "CMI": negative or not, which negative
SALT_TASK = 0x434D4B  # "CMK": task of a step

TAU_MIN, TAU_MAX = 0.001, 0.5
TASKS = ("itm", "amc", "wrc")


class TaskMix(Section):
    """Per-task numbers (cmal.md §8.3): sampling ratios or loss weights of ITM, AMC, WRC."""

    itm: float = 1.0
    amc: float = 3.0
    wrc: float = 2.0


class CmalConfig(MethodConfig):
    """The `method:` section of CMAL (`name: cmal`; cmal.md §5, §8, §11; choices in the module docstring)."""

    name: Literal["cmal"] = "cmal"
    mlm_prob: float = 0.15
    region_mask_prob: float = 0.25  # non-anchor regions masked in AMC (hard-coded 0.25 in the code)
    unimodal_layers: int = 0  # UMSE Transformer layers per modality before the swap; 0 = code-faithful
    umse_norm: Literal["none", "sphere"] = "sphere"  # none = code-faithful (quirk 4); sphere = both on radius sqrt(d)
    task_mixing: Literal["ratio", "sum"] = "ratio"  # ratio: one task per step (UNITER); sum: weighted sum
    task_ratio: TaskMix = Field(default_factory=TaskMix)  # ITM:AMC:WRC = 1:3:2 [CODE]
    task_weights: TaskMix = Field(default_factory=TaskMix)  # 'sum' mode, normalised by their sum
    itm_neg_prob: float = 0.5  # UNITER ITM: share of rows whose image is replaced
    wrc_temperature: float = 0.07  # initial WRC tau (learnable, clamped to [0.001, 0.5])
    wrc_faithful: bool = False  # true = code's WRC normalisation (padding in softmax, / L_t*N; quirk 2)
    max_regions: int = 100  # BUTD max_bb
    whole_image_region: bool = False  # prepend a [0,0,1,1] region with label 0 (our addition)
    # Input dim D of the region embedding. 0 = the ViT width (features RoI-pooled from the ViT grid);
    # precomputed detector features (data.source: regions, task.region_features) need their D here
    # (BUTD: 2048) so the model is built before data is read.
    region_feat_dim: int = 0
    grid_regions: int = 3  # images without boxes: a g x g grid of cells as regions (label 0, no anchors)


# ------------------------------------------------------------------------------------------ masking
@dataclass
class AnchorMasking:
    """Output of `anchor_mask` (cmal.md §5, §11.3). B = batch, T = tokens, N = regions.

    masked_ids:     (B, T) long, [MASK] at every text anchor; BERT 80/10/10 at the MLM-selected tokens.
    txt_labels:     (B, T) long, original id at anchors and MLM-selected tokens, -100 elsewhere.
    region_swapped: (B, N) bool, regions that are the partner of some text anchor (π(T_A)).
    region_masked:  (B, N) bool, other labelled regions masked (never swapped ones).
    region_targets: (B, N) long, region label (class id + 1) at swapped | masked regions, -100 elsewhere.
    """

    masked_ids: Tensor
    txt_labels: Tensor
    region_swapped: Tensor
    region_masked: Tensor
    region_targets: Tensor


def _special_tensor(special_ids: Iterable[int] | Tensor, device: torch.device) -> Tensor:
    if isinstance(special_ids, Tensor):
        return special_ids.to(device=device, dtype=torch.long).reshape(-1)
    return torch.tensor(sorted(int(i) for i in special_ids), dtype=torch.long, device=device)


def anchor_mask(
    input_ids: Tensor,
    attention_mask: Tensor,
    partner: Tensor,
    region_labels: Tensor,
    region_mask: Optional[Tensor],
    *,
    special_ids: Iterable[int] | Tensor,
    mask_id: int,
    vocab_size: int,
    text_uniforms: Tensor,
    region_uniforms: Tensor,
    fallback_uniforms: Optional[Tensor] = None,
    mlm_prob: float = 0.15,
    region_mask_prob: float = 0.25,
    ensure_targets: bool = True,
) -> AnchorMasking:
    """Anchor-point masking of CMAL's AMC task (cmal.md §5 / §11.3), deterministic given the uniforms.

    Text: every anchor (partner >= 0) -> [MASK], label = its id (100 %, [CODE]); every other real,
    non-special token is selected with p = `mlm_prob` and BERT-masked 80/10/10 (`mask_tokens`).
    Regions: the partners π(T_A) are "swapped" (target = their label); every other real region with a
    label > 0 is masked with p = `region_mask_prob`. With `ensure_targets` ([CODE], UNITER): a sample
    with no text target gets its first real non-special token masked; a sample with no swapped or
    masked region gets one labelled region (uniform, by `fallback_uniforms`) masked.

    Args:
        input_ids, attention_mask: (B, T).
        partner: (B, T) long from `sample_partner` (-1 = not an anchor).
        region_labels: (B, N) long, class id + 1 (0 = background / padding).
        region_mask: (B, N) bool real regions, or None (all real).
        special_ids, mask_id, vocab_size: tokenizer ids (specials are never masked nor drawn).
        text_uniforms: (B, T, 3) in [0, 1): select, 80/10/10 choice, random id (as `mask_tokens`).
        region_uniforms: (B, N) in [0, 1): region masking draws.
        fallback_uniforms: (B,) in [0, 1): which region a target-less sample masks (None: the first).
        mlm_prob, region_mask_prob: selection probabilities.

    Returns:
        AnchorMasking.
    """
    B, T = input_ids.shape
    N = region_labels.shape[1]
    device = input_ids.device
    if partner.shape != (B, T):
        raise ValueError(f"partner must have shape {(B, T)}, got {tuple(partner.shape)}")
    if region_uniforms.shape != (B, N):
        raise ValueError(f"region_uniforms must have shape {(B, N)}, got {tuple(region_uniforms.shape)}")
    special = _special_tensor(special_ids, device)
    real = attention_mask.bool()
    is_anchor = (partner >= 0) & real
    eligible = real & ~torch.isin(input_ids, special)

    masked_ids, txt_labels = mask_tokens(
        input_ids, eligible & ~is_anchor, special, mask_id, vocab_size, mlm_prob, uniforms=text_uniforms
    )
    masked_ids = torch.where(is_anchor, torch.full_like(input_ids, mask_id), masked_ids)
    txt_labels = torch.where(is_anchor, input_ids, txt_labels)
    if ensure_targets:
        first = eligible.long().argmax(dim=1)  # first real non-special token
        need = ~(txt_labels != IGNORE_INDEX).any(dim=1) & eligible.any(dim=1)
        force = need[:, None] & (torch.arange(T, device=device)[None, :] == first[:, None])
        masked_ids = torch.where(force, torch.full_like(input_ids, mask_id), masked_ids)
        txt_labels = torch.where(force, input_ids, txt_labels)

    regions = torch.arange(N, device=device)
    hits = (partner[:, :, None] == regions[None, None, :]) & is_anchor[:, :, None]  # (B, T, N)
    swapped = hits.any(dim=1)
    real_regions = region_labels > 0
    if region_mask is not None:
        real_regions = real_regions & region_mask.bool()
    candidates = real_regions & ~swapped
    masked = candidates & (region_uniforms < region_mask_prob)
    if ensure_targets:
        need = ~(swapped | masked).any(dim=1)
        u = fallback_uniforms if fallback_uniforms is not None else torch.zeros(B, device=device)
        pick = sample_uniform_index(candidates, u)  # -1 when nothing is labelled
        masked = masked | (need[:, None] & (regions[None, :] == pick[:, None]))
    targets = torch.where(swapped | masked, region_labels.long(), torch.full_like(region_labels.long(), IGNORE_INDEX))
    return AnchorMasking(masked_ids, txt_labels, swapped, masked, targets)


# ------------------------------------------------------------------------------------------ swap
def swap_fill(
    word_emb: Tensor,
    region_emb: Tensor,
    partner: Tensor,
    region_masked: Optional[Tensor] = None,
    word_source: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """CMAP swap feature filling (cmal.md §5): the hybrid cross-modal associative prompt.

    text slot t (anchor)      <- region_emb[π(t)]
    region slot i ∈ π(T_A)    <- word vector of the LAST token t with π(t) = i (quirk 3, [CODE] "last wins")
    region slot i masked      <- 0 (quirk 5: no learned mask embedding; see the module docstring)
    everything else           unchanged (bit-for-bit copies: torch.where + gather, no arithmetic)

    Positions, token types and boxes are NOT part of these vectors: the caller adds each slot's own
    position/type (text: `TextEncoder.embed(word_embeds=...)`) or box/type (`RegionEmbedding.finish`)
    after the swap, so a swapped vector is "visual content in a word slot" and vice versa.

    Args:
        word_emb: (B, T, d) text-slot vectors e^w.
        region_emb: (B, N, d) region vectors e^v.
        partner: (B, T) long, -1 = not an anchor.
        region_masked: (B, N) bool or None. A region that is both masked and swapped is swapped.
        word_source: (B, T, d) vectors sent to the region slots (default `word_emb`); with unimodal
            layers the source is encoded from the unmasked anchors, the text slots from the masked text.

    Returns:
        (hybrid_word (B, T, d), hybrid_region (B, N, d)).
    """
    B, T, d = word_emb.shape
    N = region_emb.shape[1]
    if partner.shape != (B, T):
        raise ValueError(f"partner must have shape {(B, T)}, got {tuple(partner.shape)}")
    source = word_emb if word_source is None else word_source
    is_anchor = partner >= 0
    if N == 0:
        return word_emb, region_emb
    gathered = region_emb.gather(1, partner.clamp(min=0)[:, :, None].expand(B, T, d))
    hybrid_word = torch.where(is_anchor[:, :, None], gathered, word_emb)

    positions = torch.arange(T, device=partner.device)
    hits = (partner[:, :, None] == torch.arange(N, device=partner.device)[None, None, :])  # (B, T, N)
    last = torch.where(hits, positions[None, :, None], -1).amax(dim=1)  # (B, N) last pointing token
    swapped = last >= 0
    from_word = source.gather(1, last.clamp(min=0)[:, :, None].expand(B, N, d))
    hybrid_region = region_emb
    if region_masked is not None:
        hybrid_region = torch.where(region_masked[:, :, None], torch.zeros_like(region_emb), hybrid_region)
    hybrid_region = torch.where(swapped[:, :, None], from_word, hybrid_region)
    return hybrid_word, hybrid_region


# ------------------------------------------------------------------------------------------ losses
class AmcOutput(NamedTuple):
    """loss_word, loss_region: differentiable scalars; acc_word, acc_region: detached accuracies."""

    loss_word: Tensor
    loss_region: Tensor
    acc_word: Tensor
    acc_region: Tensor


def amc_loss(
    txt_hidden: Tensor,
    reg_hidden: Tensor,
    txt_labels: Tensor,
    region_targets: Tensor,
    word_head: Callable[[Tensor], Tensor],
    region_head: Callable[[Tensor], Tensor],
) -> AmcOutput:
    """Associative mapping classification (cmal.md §7).

    Word term: vocabulary CE of `word_head` (the tied MLM head) at every labelled text position (anchors
    and MLM tokens); region term: (C+1)-way CE of `region_head` at every targeted region (swapped and
    masked). Each is the mean over the selected positions of the whole batch; a term with no position is
    exactly 0 (still attached to the graph) and its accuracy 0. The heads run on the selected rows only.

    Args:
        txt_hidden: (B, T, d) encoder outputs of the text slots.
        reg_hidden: (B, N, d) encoder outputs of the region slots.
        txt_labels: (B, T) long, -100 = no target.
        region_targets: (B, N) long class id + 1, -100 = no target.
        word_head: (M, d) -> (M, V); region_head: (M, d) -> (M, C+1).
    """
    sel_t = txt_labels != IGNORE_INDEX
    sel_r = region_targets != IGNORE_INDEX
    word_logits = word_head(txt_hidden[sel_t])
    region_logits = region_head(reg_hidden[sel_r])
    word_targets, reg_targets = txt_labels[sel_t], region_targets[sel_r]
    loss_word = mlm_loss(word_logits, word_targets)
    loss_region = mlm_loss(region_logits, reg_targets)
    with torch.no_grad():
        acc_word = (word_logits.argmax(-1) == word_targets).float().sum() / max(int(word_targets.numel()), 1)
        acc_region = (region_logits.argmax(-1) == reg_targets).float().sum() / max(int(reg_targets.numel()), 1)
    return AmcOutput(loss_word, loss_region, acc_word, acc_region)


def wrc_loss(
    txt_hidden: Tensor,
    reg_hidden: Tensor,
    anchor_pairs: Tensor,
    txt_mask: Tensor,
    reg_mask: Tensor,
    log_tau: Tensor,
    faithful: bool = False,
) -> Tensor:
    """Word-region contrastive loss at anchor pairs (cmal.md §8.1).

    s_{t,i} = cos(H^w_t, H^v_i) / τ with τ = exp(log_tau) clamped to [0.001, 0.5];
    P(t, i) = softmax of s over all (t, i) pairs of the sample;  L = -(1/|A|) Σ_{(t,i) ∈ A} log P(t, i).

    Default (FIX of quirk 2): padded tokens/regions are left out of the softmax, the sum is divided by
    |A|, samples without anchors are excluded from the batch mean (0 when no sample has one).
    `faithful=True` reproduces the reference code: padded positions take part with similarity 0 (zero
    vectors), the sum is divided by T·N (the padded sizes) and every sample counts in the batch mean.

    Args:
        txt_hidden: (B, T, d); reg_hidden: (B, N, d) encoder outputs of the clean pair.
        anchor_pairs: (B, T, N) bool.
        txt_mask: (B, T) 1 = real token; reg_mask: (B, N) True = real region.
        log_tau: 0-d tensor, log of the temperature.

    Returns:
        0-d loss (float32).
    """
    B, T, _ = txt_hidden.shape
    N = reg_hidden.shape[1]
    tau = log_tau.float().exp().clamp(TAU_MIN, TAU_MAX)
    u = F.normalize(txt_hidden.float(), dim=-1)
    z = F.normalize(reg_hidden.float(), dim=-1)
    sim = torch.einsum("btd,bnd->btn", u, z) / tau  # (B, T, N)
    valid = txt_mask.bool()[:, :, None] & reg_mask.bool()[:, None, :]
    pairs = anchor_pairs.bool() & valid
    if faithful:
        sim = torch.where(valid, sim, torch.zeros_like(sim))
        log_p = sim.reshape(B, -1).log_softmax(dim=-1).reshape(B, T, N)
        per_sample = -torch.where(pairs, log_p, torch.zeros_like(log_p)).sum(dim=(1, 2)) / max(T * N, 1)
        return per_sample.mean() if B else sim.sum() * 0.0
    any_valid = valid.reshape(B, -1).any(dim=1)
    sim = sim.masked_fill(~valid & any_valid[:, None, None], float("-inf"))
    log_p = sim.reshape(B, -1).log_softmax(dim=-1).reshape(B, T, N)
    count = pairs.sum(dim=(1, 2))
    per_sample = -torch.where(pairs, log_p, torch.zeros_like(log_p)).sum(dim=(1, 2)) / count.clamp_min(1)
    has = (count > 0).float()
    return (per_sample * has).sum() / has.sum().clamp_min(1.0)


# ------------------------------------------------------------------------------------------ heads
class RegionClassifier(nn.Module):
    """UNITER `RegionClassification`: Linear d->d, GELU, LayerNorm, Linear d->C+1 (class 0 = background)."""

    def __init__(self, width: int, num_labels: int, init_std: float = 0.02) -> None:
        super().__init__()
        self.dense = nn.Linear(width, width)
        self.act = nn.GELU(approximate="none")
        self.norm = nn.LayerNorm(width, eps=BERT_LN_EPS)
        self.out = nn.Linear(width, num_labels)
        for linear in (self.dense, self.out):
            nn.init.trunc_normal_(linear.weight, std=init_std, a=-2 * init_std, b=2 * init_std)
            nn.init.zeros_(linear.bias)

    def forward(self, hidden: Tensor) -> Tensor:
        """hidden (..., d) -> logits (..., C+1)."""
        return self.out(self.norm(self.act(self.dense(hidden))))


def _sphere(x: Tensor) -> Tensor:
    """x * sqrt(d) / ||x|| (0 stays 0): the norm of a LayerNorm output before its affine."""
    return F.normalize(x, dim=-1) * math.sqrt(x.shape[-1])


# ------------------------------------------------------------------------------------------ method
class Cmal(PretrainMethod):
    """CMAL pre-training objective around a single-stream `VLModel` (module docstring: choices & quirks).

    Args:
        model: a `VLModel` with `fusion.type: single` (held as `.model`).
        cfg: the `method` config section.
        lexicon: the class -> token table (`build_lexicon`); C = `lexicon.num_classes`.
        mask_id, special_ids, vocab_size: tokenizer ids.
        seed: keys the per-step task draw (the run's `train.seed`).

    Own modules / state: `region_embed` (RegionEmbedding Dv -> d), `region_head` (d -> C+1),
    `region_blocks` (k unimodal region layers, empty for k = 0), `log_tau` (WRC temperature, init
    log 0.07) and the buffer `task_step` (optimizer steps taken, drives the task draw; checkpointed).
    The word head is `model.mlm_head` (tied to the word embeddings), the ITM head `model.itm_head`.

    Capabilities (`vlp.methods.base`): regions are part of every input (the world's boxes, precomputed
    detector features, or grid cells); ranked by ITM over all pairs (no ITC: UNITER's protocol);
    retrieval fine-tuning keeps ITM alone; inspection figure `vlp show cmal` (the associative prompt).
    """

    name = "cmal"
    config_class = CmalConfig
    inputs = frozenset({"images", "region_boxes", "region_labels", "region_feats", "image_ids"})
    retrieval_protocols = ("itm_all",)
    retrieval_finetune_overrides = ("method.task_mixing=sum", "method.task_weights.itm=1",
                                    "method.task_weights.amc=0", "method.task_weights.wrc=0")
    figure = "vlp.figures.cmal_prompt"
    demo_config = "demo_cmal"
    in_demo_by_default = True
    # ITM negatives come from the local micro-batch and AMC / WRC are means over each rank's own targets
    rank_independent_parts = ("anchor_rate", "anchors_per_caption")

    # parameters each task reaches (others reach the shared encoder, embeddings and region embedding)
    TASK_PARAMETERS = {"itm": ("model.itm_head.",), "amc": ("region_head.", "model.mlm_head."), "wrc": ("log_tau",)}

    @classmethod
    def region_feature_dim(cls, cfg: RunConfig) -> Optional[int]:
        """`method.region_feat_dim`: the width of precomputed detector features (0 = regions are RoI-pooled
        from the ViT grid, so the region embedding takes the ViT width)."""
        return int(cfg.method.region_feat_dim)

    def unused_parameters(self) -> set[str]:
        """The ITC projections and temperature of the shared model (CMAL has no ITC) and the fusion's own image
        input layers (regions enter through `region_embed`); the heads of tasks that
        may not run in a step (every task's under 'ratio' mixing, zero-weight tasks under 'sum'); the ViT
        when regions are precomputed features (`region_feat_dim` > 0)."""
        if self.cfg.task_mixing == "ratio":
            off = set(TASKS)
        else:
            off = {t for t in TASKS if getattr(self.cfg.task_weights, t) == 0}
        # the shared model's ITC parts, and the single-stream fusion's own image input path (CMAL feeds its
        # region embedding to `encode_joint` instead)
        prefixes = ["model.vision_proj.", "model.text_proj.", "model.temp", "model.fusion.image_proj.",
                    "model.fusion.image_norm.", "model.fusion.modality_embed."]
        prefixes += [p for task in off for p in self.TASK_PARAMETERS[task]]
        if self.cfg.region_feat_dim > 0:  # precomputed features: batches carry no pixels
            prefixes.append("model.vision.")
        return {name for name, param in self.named_parameters()
                if param.requires_grad and any(name.startswith(p) for p in prefixes)}

    def __init__(
        self,
        model: VLModel,
        cfg: CmalConfig,
        lexicon: LexiconTable,
        *,
        mask_id: int,
        special_ids: Iterable[int],
        vocab_size: int,
        seed: int = 0,
    ) -> None:
        super().__init__()
        mcfg = model.cfg
        if mcfg.fusion.type != "single":
            raise ValueError("CMAL needs the single-stream encoder: set model.fusion.type: single")
        if lexicon.vocab_size != vocab_size:
            raise ValueError(f"the lexicon covers {lexicon.vocab_size} ids but the tokenizer has {vocab_size}: "
                             f"build it with the run's tokenizer")
        if not 0 <= cfg.unimodal_layers <= mcfg.text.depth:
            raise ValueError(f"method.unimodal_layers={cfg.unimodal_layers} must be in [0, model.text.depth="
                             f"{mcfg.text.depth}] (the text side uses the text encoder's first layers)")
        if mcfg.text.type_vocab < 2:
            raise ValueError("CMAL needs model.text.type_vocab >= 2 (type 1 marks the region slots, as UNITER)")
        for name in ("task_ratio", "task_weights"):
            mix = getattr(cfg, name)
            values = [getattr(mix, t) for t in TASKS]
            if min(values) < 0 or sum(values) <= 0:
                raise ValueError(f"method.{name} must be >= 0 with a positive sum, got {mix}")
        for name in ("mlm_prob", "region_mask_prob", "itm_neg_prob"):
            if not 0.0 <= getattr(cfg, name) <= 1.0:
                raise ValueError(f"method.{name} must be in [0, 1], got {getattr(cfg, name)}")
        if not TAU_MIN <= cfg.wrc_temperature <= TAU_MAX:
            raise ValueError(f"method.wrc_temperature must be in [{TAU_MIN}, {TAU_MAX}], got {cfg.wrc_temperature}")
        if cfg.max_regions < 1:
            raise ValueError(f"method.max_regions must be >= 1, got {cfg.max_regions}")
        if cfg.region_feat_dim < 0:
            raise ValueError(f"method.region_feat_dim must be >= 0 (0 = the ViT width), got {cfg.region_feat_dim}")
        if cfg.grid_regions < 1:
            raise ValueError(f"method.grid_regions must be >= 1 (a g x g grid of cells), got {cfg.grid_regions}")
        if lexicon.unmapped:
            warnings.warn(
                f"CMAL lexicon: {len(lexicon.unmapped)} of {lexicon.num_classes} classes have no whole-word token "
                f"(class ids {list(lexicon.unmapped)[:10]}): regions of these classes never form anchors; add their "
                f"words to the tokenizer vocabulary (see the anchor_rate metric)",
                stacklevel=2,
            )
        self.model = model
        self.cfg = cfg
        self.lexicon = lexicon
        self.mask_id, self.vocab_size, self.seed = int(mask_id), int(vocab_size), int(seed)
        width = mcfg.text.width
        self.register_buffer("special_ids", torch.tensor(sorted(int(i) for i in special_ids), dtype=torch.long),
                             persistent=False)
        self.register_buffer("class_token", lexicon.class_token.clone(), persistent=False)
        self.region_feat_dim = cfg.region_feat_dim or mcfg.vision.width  # D of region_feats (or the ViT grid)
        self.region_embed = RegionEmbedding(self.region_feat_dim, width, mcfg.fusion.dropout, mcfg.init_std)
        self.region_head = RegionClassifier(width, lexicon.num_classes + 1, mcfg.init_std)
        self.region_blocks = nn.ModuleList(
            Block(width, mcfg.fusion.heads, mcfg.fusion.mlp_ratio, norm="post", dropout=mcfg.fusion.dropout)
            for _ in range(cfg.unimodal_layers)
        )
        for block in self.region_blocks:
            for module in block.modules():
                if isinstance(module, nn.Linear):
                    nn.init.trunc_normal_(module.weight, std=mcfg.init_std, a=-2 * mcfg.init_std, b=2 * mcfg.init_std)
                    nn.init.zeros_(module.bias)
        self.log_tau = nn.Parameter(torch.tensor(math.log(cfg.wrc_temperature)))
        self.register_buffer("task_step", torch.zeros((), dtype=torch.long))
        self._warned: set[str] = set()  # no-anchor causes already warned about (once each)

    @classmethod
    def from_config(
        cls, cfg: RunConfig, model: VLModel, tokenizer: Any, class_words: Optional[Sequence[Iterable[str]]] = None
    ) -> "Cmal":
        """Build from a run config, a tokenizer (`mask_id`, `special_ids`, `vocab_size`, `is_whole_word`,
        `word_id`) and the class words (index = class id). `class_words` defaults to
        `tokenizer.class_words` when the tokenizer carries them; methods may not import `vlp.data`, so the
        caller (api layer) passes `[vlp.data.lexicon.class_words(k) for k in range(len(CLASSES))]`."""
        if class_words is None:
            class_words = getattr(tokenizer, "class_words", None)
        if class_words is None:
            raise ValueError(
                "CMAL needs the object class words for its anchor lexicon: call "
                "Cmal.from_config(cfg, model, tokenizer, class_words=[vlp.data.lexicon.class_words(k) "
                "for k in range(len(vlp.data.lexicon.CLASSES))])"
            )
        lexicon = build_lexicon(class_words, tokenizer)
        return cls(model, cfg.method, lexicon, mask_id=tokenizer.mask_id, special_ids=tokenizer.special_ids,
                   vocab_size=tokenizer.vocab_size, seed=cfg.train.seed)

    # ------------------------------------------------------------------------------ randomness
    def _uniforms(self, batch: Batch, shape: tuple[int, ...], salt: int) -> Tensor:
        return sample_uniforms(batch.sample_keys, len(batch), shape, salt, batch.input_ids.device)

    def task_for_step(self, step: int) -> str:
        """The task 'ratio' mixing runs at optimizer step `step`: P(task) ∝ task_ratio (seeded, batch-free)."""
        ratio = self.cfg.task_ratio
        weights = torch.tensor([getattr(ratio, t) for t in TASKS], dtype=torch.float64)
        cdf = (weights / weights.sum()).cumsum(0)
        u = float(keyed_uniform(torch.tensor([int(step)]), (1,), SALT_TASK * 1_000_003 + self.seed)[0, 0])
        index = int((cdf <= u).sum())
        index = min(index, len(TASKS) - 1)
        while weights[index] == 0:  # rounding at the top edge: the last task with weight
            index -= 1
        return TASKS[index]

    # ------------------------------------------------------------------------------ inputs
    @property
    def region_builder(self) -> RegionInputBuilder:
        """Makes the region inputs from the current `method` config (`vlp.models.regions`)."""
        cfg = self.cfg
        return RegionInputBuilder(cfg.max_regions, cfg.whole_image_region, cfg.grid_regions, self.region_feat_dim,
                                  self.model.cfg.vision.width, owner="CMAL")

    def regions(self, batch: Batch) -> RegionInputs:
        """The batch's regions, by what it carries (module docstring "Region inputs"; cmal.md §3.1, §11.1):

          region_feats + region_boxes     precomputed detector features, used as is   (`feature_inputs`)
          images + region_boxes           RoIAlign on the ViT grid at the boxes        (`region_inputs`)
          images, no region_boxes         grid_regions^2 grid cells, labels 0          (`region_inputs`)
        Label-less inputs (grid cells, features without soft_labels, boxes without labels) cannot form
        anchors: warned once per cause (`_warn_no_anchors`); the losses stay finite.
        """
        if batch.region_feats is not None:
            if batch.region_boxes is None:
                raise ValueError("CMAL got batch.region_feats without batch.region_boxes: every precomputed region "
                                 "needs its normalised box")
            if batch.region_labels is None:
                self._warn_no_anchors("the precomputed region features carry no soft_labels (every region label is 0)")
            return self.feature_inputs(batch.region_feats, batch.region_boxes, batch.region_labels, batch.region_mask)
        if batch.images is None:
            raise ValueError("CMAL needs images in the batch (region features are pooled from the ViT grid) or "
                             "precomputed batch.region_feats")
        if batch.region_boxes is None:
            g = self.cfg.grid_regions
            self._warn_no_anchors(f"the batch has images but no region boxes, so CMAL uses a {g}x{g} grid of cells "
                                  f"as regions (method.grid_regions), all labelled 0")
            return self.region_inputs(batch.images, self.region_builder.cell_boxes(len(batch), batch.images.device))
        if batch.region_labels is None:
            self._warn_no_anchors("the batch has region boxes but no region labels (every region label is 0)")
        return self.region_inputs(batch.images, batch.region_boxes, batch.region_labels, batch.region_mask)

    def _warn_no_anchors(self, cause: str) -> None:
        """Warn ONCE per cause (per method instance) that the inputs cannot form anchors (§11.1)."""
        if cause in self._warned:
            return
        self._warned.add(cause)
        warnings.warn(
            f"CMAL: {cause}, so there are NO anchor points (no region names an object class): AMC reduces to "
            f"masked-token prediction without swaps (plain MLM on the text; label-0 regions have no class target) "
            f"and WRC has no word-region pairs (its loss is 0); anchor_rate is logged as 0. To train CMAL's "
            f"associative tasks, provide region boxes with class labels, or precomputed detector features with "
            f"soft_labels plus data.class_vocab (the detector's objects_vocab.txt).",
            UserWarning,
            stacklevel=3,
        )

    def region_inputs(self, images: Tensor, region_boxes: Tensor, region_labels: Optional[Tensor] = None,
                      region_mask: Optional[Tensor] = None) -> RegionInputs:
        """`regions` from raw tensors: images (B,3,H,W), boxes (B,N,4|7) normalised xyxy, labels (B,N) or None
        (all 0: ITM does not use labels), mask (B,N) bool or None (all real) -> RoIAlign features of the
        boxes on the ViT grid (B,N',Dv), N' = min(N, max_regions) (+1 with `whole_image_region`)
        (`RegionInputBuilder.from_boxes`)."""
        return self.region_builder.from_boxes(lambda: self.model.encode_image(images).grid, region_boxes,
                                              region_labels, region_mask)

    def feature_inputs(self, region_feats: Tensor, region_boxes: Tensor, region_labels: Optional[Tensor] = None,
                       region_mask: Optional[Tensor] = None) -> RegionInputs:
        """Precomputed detector features (cmal.md §3.1, UNITER's BUTD inputs) used as is, no RoIAlign
        (`RegionInputBuilder.from_features`): region_feats (B,N,D) with D = `method.region_feat_dim`,
        region_boxes (B,N,4|7), labels (B,N) or None (all 0: no anchors), mask (B,N) or None (all real).
        The first `max_regions` regions; with `whole_image_region` a [0,0,1,1] region (label 0) first whose
        feature is the mean of the sample's real region features (our addition)."""
        return self.region_builder.from_features(region_feats, region_boxes, region_labels, region_mask)

    def _norm(self, x: Tensor) -> Tensor:
        return _sphere(x) if self.cfg.umse_norm == "sphere" else x

    def _word_vectors(self, ids: Tensor, attn: Tensor) -> Tensor:
        """UMSE text side e^w (B,T,d): the word embedding (k = 0) or k text layers over embed(ids)."""
        text = self.model.text
        if self.cfg.unimodal_layers == 0:
            return self._norm(text.word_embeddings(ids))
        x = text.embed(ids)
        for block in text.blocks[: self.cfg.unimodal_layers]:
            x = block(x, mask=attn)
        return self._norm(x)

    def _region_vectors(self, regions: RegionInputs, hide: Optional[Tensor] = None) -> Tensor:
        """UMSE region side e^v (B,N,d): LN_v(W_v v) (k = 0) or k region layers over the full embedding."""
        e = self.region_embed.project(regions.feats)
        if self.region_blocks:
            if hide is not None:
                e = e.masked_fill(hide[:, :, None], 0.0)
            e = self.region_embed.finish(e, regions.boxes, self._region_type())
            for block in self.region_blocks:
                e = block(e, mask=regions.mask)
        return self._norm(e)

    def _region_type(self) -> Tensor:
        return self.model.text.token_type_embeddings.weight[1]

    def _encode(self, word_vecs: Tensor, region_vecs: Tensor, boxes: Tensor, attn: Tensor,
                region_mask: Tensor) -> tuple[Tensor, Tensor]:
        """Slot terms after the swap, then the single-stream encoder: -> (text (B,T,d), regions (B,N,d)).

        text   x^w = Dropout(LN(ẽ^w + P[t] + S[0]))           (`TextEncoder.embed(word_embeds=...)`)
        region x^v = Dropout(LN(ẽ^v + LN_p(W_p b) + S[1]))    (`RegionEmbedding.finish`, S = text type rows)
        """
        T = word_vecs.shape[1]
        x_w = self.model.text.embed(word_embeds=word_vecs)
        x_v = self.region_embed.finish(region_vecs, boxes, self._region_type())
        joint = torch.cat([x_w, x_v], dim=1)
        joint_mask = torch.cat([attn.bool(), region_mask.bool()], dim=1)
        out = self.model.fusion.encode_joint(joint, joint_mask)
        return out[:, :T], out[:, T:]

    # ------------------------------------------------------------------------------ tasks
    def anchors(self, batch: Batch, regions: RegionInputs) -> Tensor:
        """(B, T, N) anchor pairs of the batch (regions after `max_regions` / whole-image region)."""
        return detect_anchors(batch.input_ids, regions.labels, self.class_token, batch.attention_mask, regions.mask)

    def mask(self, batch: Batch, regions: RegionInputs, pairs: Tensor) -> tuple[Tensor, AnchorMasking]:
        """Partners π (B, T) and the AMC masking of the batch; row b depends only on sample_keys[b]."""
        ids, attn = batch.input_ids, batch.attention_mask
        T, N = ids.shape[1], regions.labels.shape[1]
        partner = sample_partner(pairs, self._uniforms(batch, (T,), SALT_PARTNER))
        masking = anchor_mask(
            ids, attn, partner, regions.labels, regions.mask,
            special_ids=self.special_ids, mask_id=self.mask_id, vocab_size=self.vocab_size,
            text_uniforms=self._uniforms(batch, (T, 3), SALT_TEXT),
            region_uniforms=self._uniforms(batch, (N,), SALT_REGION),
            fallback_uniforms=self._uniforms(batch, (1,), SALT_FALLBACK)[:, 0],
            mlm_prob=self.cfg.mlm_prob, region_mask_prob=self.cfg.region_mask_prob,
        )
        return partner, masking

    def amc(self, batch: Batch, regions: RegionInputs, pairs: Tensor) -> dict[str, Tensor]:
        """AMC (§5, §7): returns amc_word, amc_region (differentiable), acc_word, acc_region."""
        ids, attn = batch.input_ids, batch.attention_mask
        partner, masking = self.mask(batch, regions, pairs)
        source_ids = torch.where(partner >= 0, ids, masking.masked_ids)  # anchors show their real word
        if self.cfg.unimodal_layers == 0:
            word_vecs, source = self._word_vectors(source_ids, attn), None  # anchor slots are overwritten
        else:
            word_vecs, source = self._word_vectors(masking.masked_ids, attn), self._word_vectors(source_ids, attn)
        region_vecs = self._region_vectors(regions, hide=masking.region_masked)
        hybrid_w, hybrid_r = swap_fill(word_vecs, region_vecs, partner, masking.region_masked, source)
        txt_h, reg_h = self._encode(hybrid_w, hybrid_r, regions.boxes, attn, regions.mask)
        out = amc_loss(txt_h, reg_h, masking.txt_labels, masking.region_targets, self.model.mlm_logits,
                       self.region_head)
        return {"amc_word": out.loss_word, "amc_region": out.loss_region,
                "acc_word": out.acc_word, "acc_region": out.acc_region}

    def wrc(self, batch: Batch, regions: RegionInputs, pairs: Tensor) -> Tensor:
        """WRC (§8.1) on the clean pair."""
        attn = batch.attention_mask
        txt_h, reg_h = self._encode(self._word_vectors(batch.input_ids, attn), self._region_vectors(regions),
                                    regions.boxes, attn, regions.mask)
        return wrc_loss(txt_h, reg_h, pairs, attn, regions.mask, self.log_tau, faithful=self.cfg.wrc_faithful)

    def itm_rows(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """(rows (B,), negative (B,) bool): whose regions each caption is paired with in ITM.

        A row is a negative with p = itm_neg_prob (keyed draw); its regions come from a row of another
        image (uniform among them; `image_ids`, or every row its own image when None). Rows of a batch
        holding a single image stay positive.
        """
        B, device = len(batch), batch.input_ids.device
        image_ids = batch.image_ids if batch.image_ids is not None else torch.arange(B, device=device)
        draws = self._uniforms(batch, (2,), SALT_ITM)
        other = image_ids[:, None] != image_ids[None, :]
        other_row = sample_uniform_index(other, draws[:, 1])
        negative = (draws[:, 0] < self.cfg.itm_neg_prob) & (other_row >= 0)
        return torch.where(negative, other_row, torch.arange(B, device=device)), negative

    def itm(self, batch: Batch, regions: RegionInputs) -> tuple[Tensor, Tensor]:
        """ITM (§8.2): with p = itm_neg_prob a row's regions come from a row of another image -> (loss, acc)."""
        ids, attn = batch.input_ids, batch.attention_mask
        rows, negative = self.itm_rows(batch)
        region_vecs = self._region_vectors(regions)[rows]
        txt_h, _ = self._encode(self._word_vectors(ids, attn), region_vecs, regions.boxes[rows], attn,
                                regions.mask[rows])
        logits = self.model.itm_logits(txt_h[:, 0])
        labels = (~negative).long()
        accuracy = (logits.argmax(dim=1) == labels).float().mean()
        return itm_loss(logits, labels), accuracy.detach()

    # ------------------------------------------------------------------------------ downstream

    @property
    def pair_dims(self) -> tuple[int, int]:
        """(D, Dr) of `encode_pair`: both the unified encoder's width."""
        width = int(self.model.cfg.text.width)
        return width, width

    def encode_pair(self, images: Optional[Tensor], input_ids: Tensor, attention_mask: Tensor,
                    region_boxes: Optional[Tensor] = None, region_mask: Optional[Tensor] = None,
                    region_feats: Optional[Tensor] = None) -> PairOutput:
        """Downstream encoding (UNITER / CMAL fine-tuning, cmal.md §9): the clean [text ; regions] sequence
        through the unified encoder, as in the ITM task (no masking, no swap).

        cls = the output at [CLS] (B, D); regions = the outputs at the region slots (B, N, D), conditioned
        on the text by self-attention (UNITER's REC head scores these). Regions are, as in pre-training
        (`regions`, cmal.md §3.1, §11.1):
          * `region_feats` (B, N, Dv) with their `region_boxes` (B, N, 4|7) and `region_mask` (B, N):
            precomputed detector features used as is (`feature_inputs`, no RoIAlign; `images` may be None;
            Dv must be `method.region_feat_dim`) — UNITER / CMAL fine-tune on the BUTD features
            (`task.region_features`);
          * else RoIAlign of the ViT grid of `images` (B, 3, H, W) at the given boxes (REC candidates, or an
            image's object boxes) or, without boxes, at `grid_regions`² grid cells.
        The `whole_image_region` slot, when configured, is encoded but not returned, so `regions[:, i]` is
        region i. More than `method.max_regions` regions is an error (REC candidates must all be scored).
        """
        if region_feats is not None:
            if region_boxes is None:
                raise ValueError("CMAL.encode_pair got region_feats without region_boxes: every precomputed region "
                                 "needs its normalised box")
        elif images is None:
            raise ValueError("CMAL.encode_pair needs images (regions are pooled from the ViT grid) or precomputed "
                             "region_feats with their region_boxes")
        elif region_boxes is None:
            region_boxes = self.region_builder.cell_boxes(images.shape[0], images.device)
            region_mask = None
        if region_boxes.shape[1] > self.cfg.max_regions:
            raise ValueError(f"{region_boxes.shape[1]} regions per image exceed method.max_regions="
                             f"{self.cfg.max_regions}: raise it (e.g. --set method.max_regions=N) to encode them all")
        if region_feats is not None:
            regions = self.feature_inputs(region_feats, region_boxes, None, region_mask)
        else:
            regions = self.region_inputs(images, region_boxes, None, region_mask)
        txt_h, reg_h = self._encode(self._word_vectors(input_ids, attention_mask), self._region_vectors(regions),
                                    regions.boxes, attention_mask, regions.mask)
        skip = 1 if self.cfg.whole_image_region else 0
        return PairOutput(txt_h[:, 0], reg_h[:, skip:], regions.mask[:, skip:])

    # ------------------------------------------------------------------------------ retrieval
    def encode_regions(self, images: Tensor, region_boxes: Optional[Tensor],
                       region_mask: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
        """Per-image part of the ITM input, computed once per image for retrieval:
        (region vectors e^v (B,N,d), 7-d boxes (B,N,7), region mask (B,N) bool), clean (no masking).
        `region_boxes=None` (images without boxes, e.g. user Karpathy files): `grid_regions`² grid cells,
        as in training (`regions`) and `encode_pair`."""
        if region_boxes is None:
            region_boxes = self.region_builder.cell_boxes(images.shape[0], images.device)
            region_mask = None
        regions = self.region_inputs(images, region_boxes, None, region_mask)
        return self._region_vectors(regions), regions.boxes, regions.mask

    def itm_pair_inputs(self, images: Tensor, region_boxes: Optional[Tensor],
                        region_mask: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
        """"itm_all" per-image part: `encode_regions`."""
        return self.encode_regions(images, region_boxes, region_mask)

    def itm_pair_scores(self, region_vecs: Tensor, boxes: Tensor, region_mask: Tensor, input_ids: Tensor,
                        attention_mask: Tensor) -> Tensor:
        """"itm_all" pair scores: `itm_scores_from_regions`."""
        return self.itm_scores_from_regions(region_vecs, boxes, region_mask, input_ids, attention_mask)

    def itm_scores_from_regions(self, region_vecs: Tensor, boxes: Tensor, region_mask: Tensor,
                                input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """ITM positive logit (P,) of P pairs from `encode_regions` rows (P,N,·) and texts (P,T): one
        single-stream forward per pair over the clean [text ; regions] (no masking, no swap)."""
        txt_h, _ = self._encode(self._word_vectors(input_ids, attention_mask), region_vecs, boxes,
                                attention_mask, region_mask)
        return self.model.itm_logits(txt_h[:, 0])[:, 1]

    def itm_scores(self, images: Tensor, region_boxes: Tensor, region_mask: Optional[Tensor], input_ids: Tensor,
                   attention_mask: Tensor) -> Tensor:
        """ITM positive-class logit (P,) of P (image, text) pairs, as in the ITM task on a clean pair
        (UNITER retrieval score): images (P,3,H,W), region_boxes (P,N,4) xyxy, region_mask (P,N) bool or
        None, input_ids / attention_mask (P,T). Rows are independent (eval mode: no dropout)."""
        return self.itm_scores_from_regions(*self.encode_regions(images, region_boxes, region_mask),
                                            input_ids, attention_mask)

    # ------------------------------------------------------------------------------ forward
    def forward(self, batch: Batch) -> dict[str, Tensor]:
        """One CMAL step.

        Returns `loss` and detached parts: `itm`, `itm_acc`, `amc` (= amc_word + amc_region), `amc_word`,
        `amc_region`, `acc_word`, `acc_region`, `wrc`, `tau`, and always `anchor_rate` (share of captions
        with >= 1 anchor) and `anchors_per_caption`. With `task_mixing: ratio` in training mode only the
        step's task runs and only its parts are returned; in 'sum' mode or eval mode all three run.
        """
        regions = self.regions(batch)
        pairs = self.anchors(batch, regions)
        rate, per_caption = anchor_rate(pairs)
        if self.training and self.cfg.task_mixing == "ratio":
            run = {self.task_for_step(int(self.task_step)): 1.0}
        else:
            mix = self.cfg.task_weights if self.training else self.cfg.task_ratio
            total = sum(getattr(mix, t) for t in TASKS)
            run = {t: getattr(mix, t) / total for t in TASKS if getattr(mix, t) > 0}
        parts: dict[str, Tensor] = {}
        loss = regions.feats.sum() * 0.0
        if "itm" in run:
            parts["itm"], parts["itm_acc"] = self.itm(batch, regions)
            loss = loss + run["itm"] * parts["itm"]
        if "amc" in run:
            parts.update(self.amc(batch, regions, pairs))
            parts["amc"] = parts["amc_word"] + parts["amc_region"]  # quirk 7: unweighted sum of the two means
            loss = loss + run["amc"] * parts["amc"]
        if "wrc" in run:
            parts["wrc"] = self.wrc(batch, regions, pairs)
            parts["tau"] = self.log_tau.exp().clamp(TAU_MIN, TAU_MAX)
            loss = loss + run["wrc"] * parts["wrc"]
        out = {"loss": loss}
        out.update({k: v.detach() for k, v in parts.items()})
        out["anchor_rate"], out["anchors_per_caption"] = rate.detach(), per_caption.detach()
        return out

    @torch.no_grad()
    def on_step_end(self) -> None:
        """After each optimizer step: clamp τ into [0.001, 0.5] (§8.1), clamp the ITC temperature of the
        shared model, and advance the task counter."""
        self.log_tau.clamp_(math.log(TAU_MIN), math.log(TAU_MAX))
        self.model.clamp_temperature_()
        self.task_step.add_(1)


__all__ = [
    "AmcOutput",
    "AnchorMasking",
    "RegionInputs",
    "Cmal",
    "RegionClassifier",
    "amc_loss",
    "anchor_mask",
    "swap_fill",
    "wrc_loss",
]
