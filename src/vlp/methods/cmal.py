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
  * Region inputs (§3.1, §11.1), chosen per batch by what it carries (`regions`, shared with the UNITER
    baseline in `vlp.models.single_stream`; made by `vlp.models.regions.RegionInputBuilder`):
      - `batch.region_feats` (precomputed BUTD / UNITER detector features, `data.source: regions`, read
        by `vlp.data.regions`): used as is, no RoIAlign, as the reference code does. The region
        embedding's input dim is `method.region_feat_dim` (BUTD: 2048), a config field so the model is
        built before data is read and checkpoints rebuild exactly. Labels come from the soft_labels
        with quirk 1 FIXED by default (`argmax(p[:, 1:])`; `data.region_labels_faithful: true`
        reproduces `argmax(p[:, 1:-1])`; see `vlp.data.regions.soft_labels_to_classes`).
      - images + `region_boxes` (the world): RoIAlign of the ground-truth boxes (§11.1) on the image's
        pixels (`region_source: pixels`, default: s x s bins flattened, a learnt patch embedding of the
        box, so the region says what it is, as a detector's feature does) or on our ViT's patch grid
        (`region_source: vit`, v0.1: it carries no class, so AMC / WRC were solved without the image and
        ITM stayed at chance; issue 11); labels are the world's classes (no argmax, so quirk 1 does not
        arise).
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
    `umse_norm: none` (default, reproduces the code) keeps it; `umse_norm: sphere` maps both e^w and e^v
    onto the sphere of radius sqrt(d) (x * sqrt(d) / ||x||: the norm a LayerNorm output has before its
    affine), so swapped vectors are scale-compatible as §4's "separate hypersphere spaces" asks. v0.1
    defaulted to sphere; measured on the world it makes the swapped-in word as large as the box term
    (~4 % of it in the code), a copy shortcut for AMC (issue 11), so the default follows the code.
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
  * Quirk 2 (WRC with padding inside the softmax and / (L_t·N)): padding is masked out of the softmax by
    default; the scale follows the code (`wrc_scale: reference`: / L_t·N_v of the real sizes, every sample
    counts); `wrc_scale: anchor_pairs` (v0.1's default) is a mean over anchor pairs, ~39x the code's
    scale, which dominated the gradients reaching the image side; `wrc_faithful: true` reproduces the
    code entirely.
  * `swap: false` (ablation, ours): AMC without the associative prompt: anchors stay [MASK] and their
    partner regions are masked (zeroed) instead of receiving each other's vectors; same targets.
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

from vlp.config import RunConfig, Section
from vlp.methods.base import PretrainMethod
from vlp.models.anchors import (
    LexiconTable,
    anchor_rate,
    build_lexicon,
    detect_anchors,
    sample_partner,
    sample_uniform_index,
)
from vlp.models.layers import Block
from vlp.models.losses import IGNORE_INDEX, mask_tokens, mlm_loss
from vlp.models.model import VLModel
from vlp.models.regions import RegionInputs
from vlp.models.single_stream import (
    RegionClassifier,
    RegionSingleStream,
    RegionStreamConfig,
    sphere,
)
from vlp.types import Batch

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

    itm: float = Field(1.0, ge=0)
    amc: float = Field(3.0, ge=0)
    wrc: float = Field(2.0, ge=0)


class CmalConfig(RegionStreamConfig):
    """The `method:` section of CMAL (`name: cmal`; cmal.md §5, §8, §11; choices in the module docstring).

    Region inputs, `mlm_prob`, `region_mask_prob` (non-anchor regions masked in AMC; hard-coded 0.25 in the
    code) and `itm_neg_prob` are the shared `RegionStreamConfig` fields."""

    name: Literal["cmal"] = "cmal"
    unimodal_layers: int = Field(0, ge=0)  # UMSE Transformer layers per modality before the swap; 0 = code-faithful
    umse_norm: Literal["none", "sphere"] = "none"  # none = code-faithful (quirk 4); sphere = both on radius sqrt(d)
    task_mixing: Literal["ratio", "sum"] = "ratio"  # ratio: one task per step (UNITER); sum: weighted sum
    task_ratio: TaskMix = Field(default_factory=TaskMix)  # ITM:AMC:WRC = 1:3:2 [CODE]
    task_weights: TaskMix = Field(default_factory=TaskMix)  # 'sum' mode, normalised by their sum
    wrc_temperature: float = Field(0.07, gt=0)  # initial WRC tau (learnable, clamped to [0.001, 0.5])
    wrc_faithful: bool = False  # true = code's WRC normalisation (padding in softmax, / L_t*N; quirk 2)
    wrc_scale: Literal["reference", "anchor_pairs"] = "reference"  # per-sample sum / (L_t*N) as the code; or / |A|
    swap: bool = True  # false = ablation: anchors masked, partner regions masked, no swap feature filling


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
    scale: Literal["reference", "anchor_pairs"] = "anchor_pairs",
) -> Tensor:
    """Word-region contrastive loss at anchor pairs (cmal.md §8.1).

    s_{t,i} = cos(H^w_t, H^v_i) / τ with τ = exp(log_tau) clamped to [0.001, 0.5];
    P(t, i) = softmax of s over all (t, i) pairs of the sample;  L = -(1/|A|) Σ_{(t,i) ∈ A} log P(t, i).

    FIX of quirk 2 (unless `faithful`): padded tokens/regions are left out of the softmax. Then the scale:
      * `scale="anchor_pairs"`: each sample's sum is divided by its |A|, samples without anchors are
        excluded from the batch mean (0 when no sample has one) — a mean per anchor pair;
      * `scale="reference"` (the code's scale, the method's default): each sample's sum is divided by
        L_t·N_v, its real token count times its real region count (the code divides by the padded sizes,
        so its scale also depends on the batch's padding), and every sample counts in the batch mean.
        With ~2 anchor pairs among ~12 x 5 slots the per-pair mean is ~30-40x larger, and it dominated
        the gradients reaching the vision side (issue 11: grad norm 0.93 vs AMC 0.11 vs ITM 0.017).
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
    total = -torch.where(pairs, log_p, torch.zeros_like(log_p)).sum(dim=(1, 2))
    if scale == "reference":
        slots = txt_mask.bool().sum(dim=1) * reg_mask.bool().sum(dim=1)
        return (total / slots.clamp_min(1)).mean() if B else sim.sum() * 0.0
    if scale != "anchor_pairs":
        raise ValueError(f"wrc_loss scale must be 'reference' or 'anchor_pairs', got {scale!r}")
    count = pairs.sum(dim=(1, 2))
    per_sample = total / count.clamp_min(1)
    has = (count > 0).float()
    return (per_sample * has).sum() / has.sum().clamp_min(1.0)


# ------------------------------------------------------------------------------------------ method
class Cmal(RegionSingleStream, PretrainMethod):
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
    retrieval_protocols = ("itm_all", "itc_rerank")  # itc_rerank with method.first_stage only
    retrieval_finetune_overrides = ("method.task_mixing=sum", "method.task_weights.itm=1",
                                    "method.task_weights.amc=0", "method.task_weights.wrc=0")
    figure = "vlp.figures.cmal_prompt"
    demo_config = "demo_cmal"
    in_demo_by_default = True
    # ITM negatives come from the local micro-batch and AMC / WRC are means over each rank's own targets
    rank_independent_parts = ("anchor_rate", "anchors_per_caption")

    OWNER = "CMAL"
    ITM_SALT = SALT_ITM
    TASKS = TASKS
    TASK_SALT = SALT_TASK
    no_label_consequence = (
        "there are NO anchor points, so AMC reduces to masked-token prediction without swaps (plain MLM on the "
        "text; label-0 regions have no class target) and WRC has no word-region pairs (its loss is 0); "
        "anchor_rate is logged as 0. To train CMAL's associative tasks, the regions need class labels")

    # parameters each task reaches (others reach the shared encoder, embeddings and region embedding)
    TASK_PARAMETERS = {"itm": ("model.itm_head.",), "amc": ("region_head.", "model.mlm_head."), "wrc": ("log_tau",)}

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
        if lexicon.vocab_size != vocab_size:
            raise ValueError(f"the lexicon covers {lexicon.vocab_size} ids but the tokenizer has {vocab_size}: "
                             f"build it with the run's tokenizer")
        if not 0 <= cfg.unimodal_layers <= mcfg.text.depth:
            raise ValueError(f"method.unimodal_layers={cfg.unimodal_layers} must be in [0, model.text.depth="
                             f"{mcfg.text.depth}] (the text side uses the text encoder's first layers)")
        if not TAU_MIN <= cfg.wrc_temperature <= TAU_MAX:
            raise ValueError(f"method.wrc_temperature must be in [{TAU_MIN}, {TAU_MAX}], got {cfg.wrc_temperature}")
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
        self.init_region_stream(model, cfg)  # region_feat_dim, region_embed, _warned
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
        self.check_task_mix()
        self.init_first_stage()  # last: method.first_stage's head (a deviation, vlp.models.first_stage)

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

    # ------------------------------------------------------------------------------ UMSE vectors
    def _norm(self, x: Tensor) -> Tensor:
        return sphere(x) if self.cfg.umse_norm == "sphere" else x

    def word_vectors(self, ids: Tensor, attn: Tensor) -> Tensor:
        """UMSE text side e^w (B,T,d): the word embedding (k = 0) or k text layers over embed(ids)."""
        text = self.model.text
        if self.cfg.unimodal_layers == 0:
            return self._norm(text.word_embeddings(ids))
        x = text.embed(ids)
        for block in text.blocks[: self.cfg.unimodal_layers]:
            x = block(x, mask=attn)
        return self._norm(x)

    def region_vectors(self, regions: RegionInputs, hide: Optional[Tensor] = None) -> Tensor:
        """UMSE region side e^v (B,N,d): LN_v(W_v v) (k = 0; `hide` is applied by `swap_fill`) or k region
        layers over the full embedding (`hide`: regions zeroed before those layers)."""
        e = self.region_embed.project(regions.feats)
        if self.region_blocks:
            if hide is not None:
                e = e.masked_fill(hide[:, :, None], 0.0)
            e = self.region_embed.finish(e, regions.boxes, self.region_type())
            for block in self.region_blocks:
                e = block(e, mask=regions.mask)
        return self._norm(e)

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
        if not self.cfg.swap:  # ablation: anchors stay [MASK], their partner regions are masked (zeroed)
            hidden = masking.region_masked | masking.region_swapped
            word_vecs = self.word_vectors(masking.masked_ids, attn)
            region_vecs = self.region_vectors(regions, hide=hidden)
            hybrid_w, hybrid_r = swap_fill(word_vecs, region_vecs, torch.full_like(partner, -1), hidden)
        else:
            source_ids = torch.where(partner >= 0, ids, masking.masked_ids)  # anchors show their real word
            if self.cfg.unimodal_layers == 0:
                word_vecs, source = self.word_vectors(source_ids, attn), None  # anchor slots are overwritten
            else:
                word_vecs, source = self.word_vectors(masking.masked_ids, attn), self.word_vectors(source_ids, attn)
            region_vecs = self.region_vectors(regions, hide=masking.region_masked)
            hybrid_w, hybrid_r = swap_fill(word_vecs, region_vecs, partner, masking.region_masked, source)
        txt_h, reg_h = self.encode_joint_pair(hybrid_w, hybrid_r, regions.boxes, attn, regions.mask)
        out = amc_loss(txt_h, reg_h, masking.txt_labels, masking.region_targets, self.model.mlm_logits,
                       self.region_head)
        return {"amc_word": out.loss_word, "amc_region": out.loss_region,
                "acc_word": out.acc_word, "acc_region": out.acc_region}

    def wrc(self, batch: Batch, regions: RegionInputs, pairs: Tensor) -> Tensor:
        """WRC (§8.1) on the clean pair."""
        attn = batch.attention_mask
        txt_h, reg_h = self.encode_joint_pair(self.word_vectors(batch.input_ids, attn), self.region_vectors(regions),
                                              regions.boxes, attn, regions.mask)
        return wrc_loss(txt_h, reg_h, pairs, attn, regions.mask, self.log_tau, faithful=self.cfg.wrc_faithful,
                        scale=self.cfg.wrc_scale)

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
        run = self.tasks_to_run()
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
        first_stage = self.first_stage_terms(batch, regions)  # {} unless method.first_stage
        if first_stage:
            parts.update(first_stage)
            loss = loss + first_stage["first_stage"]
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
