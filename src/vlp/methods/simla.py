"""SIMLA pre-training: single-stream multi-level alignment (ITC + ITM + XMM (MLM and MIM) + PSL).

Khan, Kumar BG, Yu, Schulter, Chandraker, Fu, "Single-Stream Multi-Level Alignment for Vision-Language
Pretraining", ECCV 2022 (code: codezakh/SIMLA `models/pretrain.py`). Spec: `simla_vlmixer.md` §1 (the
paper body was not readable; the spec follows the code), §1.6 (the code's quirks), §3, §4.

Architecture (§1.1). A ViT and ONE shared BERT-style encoder whose every layer has self-attention,
cross-attention and an MLP (`model.text.cross_attention: true`, `model.fusion.depth: 0`), run in three modes:
  * text        (no image): the ITC text encoder;
  * multimodal  (text queries cross-attend to the ViT tokens): ITM, MLM, PSL's keyword attention;
  * image query (the masked ViT tokens are the queries, cross-attending to the caption): MIM.
The method owns what the paper adds: the MIM `mask_token`, `mim_head`, `concept_head`, the visual
tokenizer giving MIM its targets, a momentum (EMA) copy of all of it and the feature queues.

Objectives (§1.2; total = weighted sum, all weights 1 as in the code):
  (a) ITC with momentum distillation: `contrastive_loss` with soft targets alpha * softmax(momentum
      similarity) + (1 - alpha) * one-hot over the global batch and the queue (`_itc`).
  (b) ITM with hard negatives drawn from softmax(ITC similarity), one negative image per text and one
      negative text per image (`_itm`).
  (c) XMM = MLM(text | image) (`_mlm`) + MIM(image | text) (`_mim`): BERT 80/10/10 masking at 15 % with
      the text cross-attending to the unmasked image; BEiT block masking of ~29 % of the patches (75 of
      256), the masked patches' embeddings replaced by `mask_token`, the masked ViT output fed as queries
      to the shared encoder attending to the caption, CE against discrete codes at masked patches; both
      mixed (1 - alpha) hard + alpha soft with the momentum model's predictions (same masks).
  (d) PSL (`_psl`, `psl_targets`): keywords = the positions most attended by [CLS] in the last layer of
      the MOMENTUM encoder (multimodal, online image), per-head top-k then top-n by count; a concept head
      on the normalised image embedding predicts them: BCE mixing the multi-hot keywords (1 - alpha) and
      sigmoid(momentum concept logits) (alpha), mean over B x V.

Where we follow the reference code: the shared encoder and its three modes; momentum 0.995 on everything
but the ITM head; queues of momentum features; temperature learnt and clamped to [0.001, 0.5]; PSL from
the 256-d normalised projection (§1.6.5); alpha ramped linearly over the first steps (`alpha_ramp_steps`,
the code ramps over epoch 0; 0 = constant).

The reference code's quirks (§1.6), each fixed by default and reproduced with `faithful_quirks: true`:
  1. MIM targets from an independent random crop: ours are codes of the very image the ViT sees (one view),
     so the code at a masked patch describes that patch. (The flag cannot reproduce two crops: vlp's
     pipeline has one view; there is nothing to reproduce it with.)
  2. MIM image queries attend to the caption's EMBEDDING-layer output (and the momentum pass to the online
     embeddings): ours attend to the contextual text-mode states of the caption (the momentum pass to the
     momentum model's), which the step computes for ITC anyway. Faithful: embedding-layer output, online.
  3. Image tokens entering the shared encoder get BERT text position embeddings 0..N on top of the ViT's:
     ours get only the embedding LayerNorm (`TextEncoder.embed_features`). Faithful: positions added
     (needs model.text.max_len >= 1 + patches).
  4. PSL keywords may be [SEP], [PAD] (zero-count positions) or other specials; only [CLS] is zeroed: ours
     exclude every special and padding position and only positions with a non-zero count become keywords
     (per-head top-k is clamped to the caption length: the code crashes below 4 tokens). Faithful: [CLS]
     zeroed only, top-n taken whatever the counts.
  6. MLM distillation's log-softmax over the sequence axis (ALBEF typo, salesforce/ALBEF#58): ours over the
     vocabulary. Faithful: `log_softmax(dim=1)` over the full (B, T, V) logits, as the code.
Other deviations, on purpose: DALL-E dVAE codes (8192, a download) are replaced by vlp's own k-means
visual tokenizer (`vlp.models.visual_tokenizer.PatchTokenizer`, fitted before step 0 on the first
`tokenizer_images` training images or loaded from `vlp tokenizer image`); ITC columns are the global
batch's online features (gradient to both towers) plus queued momentum features and ITM negatives come from
the global batch (rank independence, as vlp's ALBEF; SIMLA samples per GPU and uses momentum columns);
captions of the same image are ITC positives and never ITM negatives (§1.6.8); the queue need not start
full (empty rows are not used) but its length must be a multiple of the global batch, as the code asserts;
[SEP] is never masked (`mask_tokens`); masks and negatives come from per-sample keyed randomness.

Step cost (simla_tiny, B = 64, FlopCounterMode, alpha > 0; issue 12): ~105 GFLOP a step against ~34 for
albef_tiny at the same widths, because the paper's step runs four ViT passes (online plain and masked, each with
a backward, and their momentum copies: ~41 GFLOP, more than ALBEF's whole step), MIM's image-as-query passes
(~43 GFLOP with its ViT), and ITM over 3B pairs through all shared layers from the embeddings (~25 GFLOP; ALBEF's
ITM runs only its fusion layers on cached text states). What the step does not compute: states no loss reads
(the last layer runs at the [CLS] for ITM and at the masked tokens / patches for MLM / MIM, `read_positions`),
the images' cross-attention keys/values once per pass row (ITM's 3B rows and MLM's B project each image once:
`ImageKV`, 115 -> 105 GFLOP), and, with `model.length_buckets`, padding past each bucket's longest caption (text,
ITM, MLM and PSL passes).

Shapes: B batch, T tokens, P patches, Dv ViT width (= D, the shared encoder's width: image tokens are its
queries in MIM), E ITC width, V text vocabulary, Vi visual-token vocabulary.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from vlp.config import MethodConfig, RunConfig, Section
from vlp.methods.base import PretrainMethod
from vlp.models.fusion import FusionOutput
from vlp.models.layers import ImageKV
from vlp.models.losses import (
    IGNORE_INDEX,
    all_gather_no_grad,
    all_gather_with_grad,
    contrastive_loss,
    global_token_mean,
    itm_loss,
    mask_tokens,
    mlm_loss,
    rank,
    pad_length,
    sample_hard_negatives,
    world_size,
)
from vlp.models.masking import BlockMaskGenerator
from vlp.models.model import VLModel
from vlp.models.momentum import FeatureQueue, ema_update_, itc_distillation, momentum_copy
from vlp.models.rng import sample_uniforms
from vlp.models.roi import box_regions
from vlp.models.visual_tokenizer import PatchTokenizer
from vlp.types import Batch, PairOutput

SALT_MLM = 0x534D4C  # "SML": text masking draws
SALT_ITM = 0x534954  # "SIT": hard-negative draws
SALT_MIM = 0x534D49  # "SMI": block-mask draws


class SimlaLossWeights(Section):
    itc: float = Field(1.0, ge=0)
    itm: float = Field(1.0, ge=0)
    mlm: float = Field(1.0, ge=0)
    mim: float = Field(1.0, ge=0)
    psl: float = Field(1.0, ge=0)


class SimlaLossRamps(Section):
    """Optimizer steps over which each objective's weight ramps linearly from 0 to its `loss_weights` value
    (0 = full weight from step 0, as the reference). Not in the paper; tried against the from-scratch plateau
    (ITM and MIM at full weight hold the text [CLS] near constant for ~400 steps): ramping ITM and MIM over 150
    steps did not shorten it (README "SIMLA in the demo"), so every shipped config leaves it off."""

    itc: int = Field(0, ge=0)
    itm: int = Field(0, ge=0)
    mlm: int = Field(0, ge=0)
    mim: int = Field(0, ge=0)
    psl: int = Field(0, ge=0)


class SimlaConfig(MethodConfig):
    """The `method:` section of SIMLA (`name: simla`); defaults are the reference's (§1.2-1.4)."""

    name: Literal["simla"] = "simla"
    mlm_prob: float = Field(0.15, ge=0.0, le=1.0)
    itm_hard_negatives: bool = True  # ITM negatives from softmax(ITC similarity); false = uniform
    momentum: float = Field(0.995, ge=0.0, lt=1.0)
    queue_size: int = Field(0, ge=0)  # momentum-feature queue length, a multiple of train.batch_size (SIMLA 65536)
    alpha: float = Field(0.4, ge=0.0, le=1.0)  # weight of the momentum soft targets (ITC, MLM, MIM, PSL)
    alpha_ramp_steps: int = Field(0, ge=0)  # alpha ramps linearly from 0 over these steps (SIMLA: epoch 0)
    mim_mask_ratio: float = Field(75 / 256, gt=0.0, lt=1.0)  # patches masked per image (SIMLA 75 of 256)
    mim_min_block_ratio: float = Field(16 / 256, gt=0.0, le=1.0)  # smallest block, as a share of the patches
    mim_min_aspect: float = Field(0.3, gt=0.0, le=1.0)
    image_vocab_size: int = Field(8192, ge=2)  # visual-token codes (SIMLA: the dVAE's 8192)
    tokenizer_downsample: int = Field(2, ge=1)  # codes of a half-resolution view, as the dVAE's 128 px view
    tokenizer_images: int = Field(2000, ge=1)  # training images the visual tokenizer is fitted on
    tokenizer_seed: int = Field(0, ge=0)
    visual_tokenizer: Optional[str] = None  # a fitted tokenizer file (`vlp tokenizer image`); None = fit at start
    psl_keywords_per_head: int = Field(4, ge=1)  # top-k positions per attention head
    psl_keywords: int = Field(5, ge=1)  # keywords per caption (top-n positions by count)
    faithful_quirks: bool = False  # reproduce the reference code's quirks 2, 3, 4, 6 (module docstring)
    loss_weights: SimlaLossWeights = Field(default_factory=SimlaLossWeights)
    loss_ramp_steps: SimlaLossRamps = Field(default_factory=SimlaLossRamps)


class SimlaHeads(nn.Module):
    """What SIMLA adds to the shared model: the MIM mask token (1, 1, Dv), zero-initialised as the code),
    the MIM head (D -> Vi) and the PSL concept head (E -> V, on the normalised image embedding, §1.6.5)."""

    def __init__(self, vision_width: int, width: int, embed_dim: int, image_vocab: int, vocab_size: int) -> None:
        super().__init__()
        self.mask_token = nn.Parameter(torch.zeros(1, 1, vision_width))
        self.mim_head = nn.Linear(width, image_vocab)
        self.concept_head = nn.Linear(embed_dim, vocab_size)


def psl_targets(cls_attention: Tensor, input_ids: Tensor, attention_mask: Tensor, vocab_size: int,
                keywords_per_head: int = 4, keywords: int = 5, exclude_ids: Optional[Tensor] = None,
                faithful: bool = False, cls_id: int = 0) -> Tensor:
    """PSL's hard keyword targets (§1.2 (d) steps 1-2): a (B, V) multi-hot over the caption's keywords.

    For every head, the `keywords_per_head` positions [CLS] attends to most; each position counts how many
    heads chose it; the `keywords` positions with the highest counts (ties: the earlier position) are the
    keywords, and their token ids are the targets.

    Args:
        cls_attention: (B, H, T) [CLS]-query self-attention probabilities of the last layer.
        input_ids, attention_mask: (B, T) the caption.
        vocab_size: V.
        exclude_ids: (S,) ids never keywords (specials) — ours: these and padding positions are excluded
            before counting, and only positions with a non-zero count are keywords.
        faithful: the reference code: nothing excluded before the top-k (padding included), the top-n taken
            whatever the counts, and only the [CLS] id zeroed afterwards (quirk §1.6.4).
        cls_id: the [CLS] id (zeroed in faithful mode).

    Returns:
        (B, V) float in {0, 1}.
    """
    B, H, T = cls_attention.shape
    scores = cls_attention.float()
    if not faithful:
        excluded = ~attention_mask.bool()
        if exclude_ids is not None:
            excluded = excluded | torch.isin(input_ids, exclude_ids.to(input_ids.device))
        scores = scores.masked_fill(excluded[:, None, :], float("-inf"))
    k = min(keywords_per_head, T)
    top = scores.topk(k, dim=-1)
    chosen = torch.isfinite(top.values)  # (B, H, k): excluded positions never count
    counts = torch.zeros(B, T, device=scores.device)
    counts.scatter_add_(1, top.indices.reshape(B, H * k), chosen.reshape(B, H * k).float())
    # ties broken towards the earlier position: counts are integers, so subtract a fraction of the position
    order = counts - torch.arange(T, device=counts.device) / (T + 1)
    n = min(keywords, T)
    positions = order.topk(n, dim=-1).indices  # (B, n)
    keep = torch.ones_like(positions, dtype=torch.bool) if faithful else counts.gather(1, positions) > 0
    targets = torch.zeros(B, vocab_size, device=scores.device)
    targets.scatter_(1, input_ids.gather(1, positions), keep.float())
    if faithful:
        targets[:, cls_id] = 0.0
    return targets


def read_positions(selected: Tensor) -> tuple[Tensor, Tensor]:
    """The positions a pass reads, for `TextEncoder.forward_from_embeddings(read=...)`: selected (B, T) bool ->
    (read (B, K) long, valid (B, K) bool), K = max(1, the most positions selected in a row). Row b holds its
    selected positions in increasing order, then 0s (valid False), so `states[valid]` of the (B, K, D) read
    states lists the same rows in the same order as `full_states[selected]`."""
    counts = selected.sum(dim=1)
    K = max(1, int(counts.max())) if selected.shape[0] else 1
    order = torch.sort((~selected).to(torch.uint8), dim=1, stable=True).indices[:, :K]  # selected first, in order
    valid = torch.arange(order.shape[1], device=selected.device) < counts[:, None]
    return order.masked_fill(~valid, 0), valid


def psl_loss(concept_logits: Tensor, hard: Tensor, soft: Optional[Tensor], alpha: float) -> Tensor:
    """(1 - alpha) * BCE(z, hard) + alpha * BCE(z, soft), each the mean over all B x V entries (§1.2 (d))."""
    loss = F.binary_cross_entropy_with_logits(concept_logits.float(), hard)
    if soft is None or alpha == 0:
        return loss
    return (1.0 - alpha) * loss + alpha * F.binary_cross_entropy_with_logits(concept_logits.float(), soft.float())


class SharedEncoderRetrieval(nn.Module):
    """The retrieval protocols' model interface (`vlp.tasks.retrieval.RetrievalModel`) on a shared-encoder
    `VLModel`: what retrieval caches per text is [text-mode states ; embedding-layer output] on the feature
    axis (B, T, 2D), because the multimodal pass restarts from the embeddings (it cannot reuse text-mode
    states as ALBEF's fusion does): `text_embed` reads the first half, `fuse` the second."""

    def __init__(self, model: VLModel) -> None:
        super().__init__()
        self.model = model

    def encode_image(self, images: Tensor) -> Any:
        return self.model.encode_image(images)

    def image_embed(self, image_tokens: Tensor) -> Tensor:
        return self.model.image_embed(image_tokens)

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        embeddings = self.model.text.embed(input_ids)
        hidden = self.model.text.forward_from_embeddings(embeddings, attention_mask)
        return torch.cat([hidden, embeddings], dim=-1)

    def text_embed(self, text_states: Tensor) -> Tensor:
        return self.model.text_embed(text_states[..., : self.model.cfg.text.width])

    def fuse(self, text_states: Tensor, attention_mask: Tensor, image_tokens: Tensor,
             image_mask: Optional[Tensor] = None) -> FusionOutput:
        embeddings = text_states[..., self.model.cfg.text.width:]
        return self.model.encode_multimodal(None, attention_mask, image_tokens, image_mask, embeddings=embeddings)

    def itm_logits(self, cls: Tensor) -> Tensor:
        return self.model.itm_logits(cls)


class Simla(PretrainMethod):
    """SIMLA's objectives around a shared-encoder `VLModel` (module docstring: modes, quirks, deviations).

    State (`state_dict`): `model`, `heads` (`SimlaHeads`), `visual_tokenizer` (its codebook), `model_m` and
    `heads_m` (frozen EMA copies), `queue` (with `queue_size > 0`), `step` (0-d long: optimizer steps taken,
    for the alpha ramp), so a resume is exact.

    Capabilities: pixels in; ranked by ITC with the top-k re-ranked by ITM (the code's protocol), and by ITM
    over all pairs with `eval.itm_all`; retrieval fine-tuning keeps ITC + ITM (§1.5).
    """

    name = "simla"
    config_class = SimlaConfig
    inputs = frozenset({"images", "image_ids"})
    retrieval_protocols = ("itc_itm", "itm_all")
    retrieval_finetune_overrides = ("method.loss_weights.mlm=0", "method.loss_weights.mim=0",
                                    "method.loss_weights.psl=0", "method.itm_hard_negatives=true")
    prepared_state = "visual_tokenizer"
    demo_config = "demo_simla"
    figure = "vlp.figures.simla_xmm"
    # MLM and MIM are means over every rank's masked tokens / patches (global_token_mean); PSL is a mean
    # over each rank's rows
    rank_independent_parts = ("itc", "itm", "itm_acc", "mlm", "mim")

    def __init__(self, model: VLModel, cfg: SimlaConfig, *, mask_id: int, cls_id: int, special_ids: Any,
                 vocab_size: int, global_batch: int) -> None:
        super().__init__()
        if not model.shared_encoder:
            raise ValueError("SIMLA needs the shared encoder: set model.text.cross_attention=true and "
                             "model.fusion.depth=0 (configs simla_tiny / simla_base do)")
        vision, text = model.cfg.vision, model.cfg.text
        if vision.width != text.width:
            raise ValueError(f"SIMLA feeds ViT tokens to the shared encoder as queries (MIM), so model.vision.width "
                             f"must equal model.text.width, got {vision.width} and {text.width}")
        if cfg.queue_size and cfg.queue_size % global_batch:
            raise ValueError(f"method.queue_size={cfg.queue_size} must be a multiple of the global batch "
                             f"train.batch_size={global_batch} (SIMLA's queue asserts it): e.g. "
                             f"{max(1, cfg.queue_size // global_batch) * global_batch}")
        grid = vision.image_size // vision.patch_size
        if cfg.faithful_quirks and text.max_len < 1 + grid * grid:
            raise ValueError(f"method.faithful_quirks adds text positions to the {1 + grid * grid} image tokens "
                             f"(quirk 3) but model.text.max_len is {text.max_len}: raise it or turn the flag off")
        if cfg.faithful_quirks and model.length_buckets > 1:
            raise ValueError(f"method.faithful_quirks reads MLM logits at padded positions (quirk 6), which length "
                             f"buckets zero, but model.length_buckets is {model.length_buckets}: set "
                             f"model.length_buckets=1 or turn the flag off")
        self.model, self.cfg = model, cfg
        self.mask_id, self.cls_id, self.vocab_size = int(mask_id), int(cls_id), int(vocab_size)
        self.register_buffer("special_ids", torch.tensor(sorted(int(i) for i in special_ids), dtype=torch.long),
                             persistent=False)
        self.heads = SimlaHeads(vision.width, text.width, model.cfg.embed_dim, cfg.image_vocab_size, vocab_size)
        nn.init.trunc_normal_(self.heads.mim_head.weight, std=model.cfg.init_std)
        nn.init.zeros_(self.heads.mim_head.bias)
        nn.init.trunc_normal_(self.heads.concept_head.weight, std=model.cfg.init_std)
        nn.init.zeros_(self.heads.concept_head.bias)
        self.visual_tokenizer = PatchTokenizer(cfg.image_vocab_size, vision.patch_size, cfg.tokenizer_downsample)
        self.model_m = momentum_copy(model)
        self.heads_m = momentum_copy(self.heads)
        self.queue = (FeatureQueue(cfg.queue_size, {"image": model.cfg.embed_dim, "text": model.cfg.embed_dim})
                      if cfg.queue_size else None)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        patches = grid * grid
        self.block_masks = BlockMaskGenerator(
            (grid, grid), max(1, round(cfg.mim_mask_ratio * patches)),
            min_num_patches=max(1, round(cfg.mim_min_block_ratio * patches)), min_aspect=cfg.mim_min_aspect)

    @classmethod
    def from_config(cls, cfg: RunConfig, model: VLModel, tokenizer: Any, class_words: Any = None) -> "Simla":
        """Build from a run config and a tokenizer exposing `mask_id`, `cls_id`, `special_ids`, `vocab_size`;
        with `method.visual_tokenizer` the fitted tokenizer file is loaded (else `prepare` fits one)."""
        method = cls(model, cfg.method, mask_id=tokenizer.mask_id, cls_id=tokenizer.cls_id,
                     special_ids=tokenizer.special_ids, vocab_size=tokenizer.vocab_size,
                     global_batch=cfg.train.batch_size)
        if cfg.method.visual_tokenizer:
            method.visual_tokenizer.load(cfg.method.visual_tokenizer)
        return method

    # ------------------------------------------------------------------------------------ preparation
    def images_to_prepare(self) -> int:
        """The visual tokenizer is fitted before step 0 when MIM is on and no fitted one was loaded."""
        needed = self.cfg.loss_weights.mim != 0 and not self.visual_tokenizer.is_fitted
        return self.cfg.tokenizer_images if needed else 0

    def prepare(self, images: Tensor) -> dict[str, float]:
        """Fit the visual tokenizer (k-means of half-resolution patches) on training images (n, 3, H, W)."""
        return self.visual_tokenizer.fit(images, seed=self.cfg.tokenizer_seed)

    # ------------------------------------------------------------------------------------ bookkeeping
    def unused_parameters(self) -> set[str]:
        """Parameters only a zero-weight loss reaches: the MLM head without MLM, the mask token and MIM head
        without MIM, the concept head without PSL, the ITM head without ITM, projections and temperature
        without ITC and PSL (hard negatives read them under no_grad), the cross-attention without ITM, MLM
        and MIM."""
        w = self.cfg.loss_weights
        weight_of = {"model.mlm_head": w.mlm, "heads.mask_token": w.mim, "heads.mim_head": w.mim,
                     "heads.concept_head": w.psl, "model.itm_head": w.itm,
                     "model.text_proj": w.itc, "model.temp": w.itc,
                     "model.vision_proj": abs(w.itc) + abs(w.psl)}
        unused = set()
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            key = ".".join(name.split(".")[:2])
            if weight_of.get(key, 1) == 0 or (".cross." in name or ".norm_cross." in name) and \
                    abs(w.itm) + abs(w.mlm) + abs(w.mim) == 0:
                unused.add(name)
        return unused

    def itm_steps(self, steps: int) -> Optional[int]:
        """Every step trains ITM when its weight is positive (the objectives are summed each step), but step 0
        of a ramped ITM weight (`loss_ramp_steps.itm`), whose weight is 0 there."""
        if self.cfg.loss_weights.itm <= 0:
            return 0
        return max(0, int(steps) - 1) if self.cfg.loss_ramp_steps.itm else int(steps)

    def current_weights(self) -> dict[str, float]:
        """Each objective's weight at this step: `loss_weights`, ramped linearly from 0 over its
        `loss_ramp_steps` (0 = no ramp)."""
        ramps = self.cfg.loss_ramp_steps
        return {k: getattr(self.cfg.loss_weights, k) * (min(1.0, float(self.step) / getattr(ramps, k))
                                                         if getattr(ramps, k) else 1.0)
                for k in ("itc", "itm", "mlm", "mim", "psl")}

    def current_alpha(self) -> float:
        """alpha, ramped linearly from 0 over `alpha_ramp_steps` optimizer steps (the code: over epoch 0)."""
        ramp = self.cfg.alpha_ramp_steps
        return self.cfg.alpha * (min(1.0, float(self.step) / ramp) if ramp else 1.0)

    @torch.no_grad()
    def on_step_end(self) -> None:
        """Clamp the temperature, EMA-update the momentum model and heads, enqueue momentum features."""
        self.model.clamp_temperature_()
        ema_update_(self.model, self.model_m, self.cfg.momentum)
        ema_update_(self.heads, self.heads_m, self.cfg.momentum)
        if self.queue is not None:
            self.queue.flush()
        self.step += 1

    @torch.no_grad()
    def reset_momentum(self) -> None:
        """Copy the online weights into the momentum copies and empty the queue (after loading `.model`)."""
        self.model_m.load_state_dict(self.model.state_dict())
        self.heads_m.load_state_dict(self.heads.state_dict())
        if self.queue is not None:
            self.queue.reset()

    # ------------------------------------------------------------------------------------ downstream
    @property
    def pair_dims(self) -> tuple[int, int]:
        """(D, Dr): the fused [CLS] width and the region width (the ViT width)."""
        return int(self.model.cfg.text.width), int(self.model.cfg.vision.width)

    @property
    def itc_model(self) -> nn.Module:
        return SharedEncoderRetrieval(self.model)

    def encode_pair(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor,
                    region_boxes: Optional[Tensor] = None, region_mask: Optional[Tensor] = None,
                    region_feats: Optional[Tensor] = None) -> PairOutput:
        """The multimodal-mode [CLS] (B, D) of each pair (SIMLA's fine-tuning input) and, with boxes
        (B, N, 4|7), RoIAlign features (B, N, Dv) of the ViT grid (for REC; SIMLA grounds by Grad-CAM)."""
        images = self.require_pixels(images, region_feats)
        image = self.model.encode_image(images)
        cls = self.model.encode_multimodal(input_ids, attention_mask, image.tokens).cls
        if region_boxes is None:
            return PairOutput(cls)
        return PairOutput(cls, *box_regions(image.grid, region_boxes, region_mask))

    def itm_pair_inputs(self, images: Tensor, region_boxes: Optional[Tensor] = None,
                        region_mask: Optional[Tensor] = None) -> tuple[Tensor, ...]:
        """"itm_all" per-image part: the ViT tokens (B, 1+P, Dv)."""
        return (self.model.encode_image(images).tokens,)

    def itm_pair_scores(self, image_tokens: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Matched-class ITM logit (P,) of P (image tokens, text) pairs (multimodal mode)."""
        return self.model.itm_score(image_tokens, input_ids, attention_mask)

    # ------------------------------------------------------------------------------------ forward
    def _uniforms(self, batch: Batch, shape: tuple[int, ...], salt: int) -> Tensor:
        return sample_uniforms(batch.sample_keys, len(batch), shape, salt, batch.input_ids.device)

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        """One SIMLA step's losses: `loss` (weighted sum) and detached `itc`, `itm`, `mlm`, `mim`, `psl`,
        `itm_acc`, `mlm_acc`, `mim_acc`, `psl_keywords` (mean keywords per caption), `alpha`. A loss with
        weight 0 is skipped (reported as 0)."""
        if batch.images is None:
            raise ValueError("SIMLA needs images in the batch (batch.images is None)")
        ids, attn = batch.input_ids, batch.attention_mask
        size, device = ids.shape[0], ids.device
        image_ids = batch.image_ids
        if image_ids is None:  # every row is its own image, unique across ranks
            image_ids = torch.arange(size, device=device) + rank() * size
        weights, alpha = self.cfg.loss_weights, self.current_alpha()
        faithful = self.cfg.faithful_quirks

        image_tokens = self.model.encode_image(batch.images).tokens  # (B, 1+P, Dv)
        embeddings = self.model.text.embed(ids)  # (B, T, D) embedding-layer output
        text_hidden = self.model.text.forward_from_embeddings(embeddings, attn)  # text mode (B, T, D)
        image_emb = self.model.image_embed(image_tokens)  # (B, E)
        text_emb = self.model.text_embed(text_hidden)
        temp = self.model.temperature()
        ids_global = all_gather_no_grad(image_ids)
        zero = image_emb.sum() * 0.0
        parts: dict[str, Tensor] = {"alpha": torch.tensor(alpha)}

        with torch.no_grad():
            image_tokens_m = self.model_m.encode_image(batch.images).tokens
            image_emb_m = self.model_m.image_embed(image_tokens_m)
            text_hidden_m = self.model_m.encode_text(ids, attn)
            text_emb_m = self.model_m.text_embed(text_hidden_m)

        if weights.itc != 0:
            queued_ids = ids_global if batch.image_ids is not None else torch.full_like(ids_global, -1)
            distill = itc_distillation(image_emb_m, text_emb_m, temp, alpha, self.queue, queued_ids,
                                       stage=self.training)
            parts["itc"] = contrastive_loss(image_emb, text_emb, temp, image_ids, gather=True, **distill)
        else:
            parts["itc"] = zero
        # the multimodal passes (ITM's three, MLM's) share one K/V projection of each image (`ImageKV`)
        image_kv: Optional[ImageKV] = None
        if weights.itm != 0:
            parts["itm"], parts["itm_acc"], image_kv = self._itm(batch, image_tokens, embeddings, image_emb, text_emb,
                                                                 temp, image_ids, ids_global)
        else:
            parts["itm"], parts["itm_acc"] = zero, zero.detach()
        if weights.mlm != 0:
            local = torch.arange(size, device=device)  # this rank's images: rows 0..B-1 of the ITM projection
            images = image_kv.take(local) if image_kv is not None else self.model.image_kv(image_tokens)
            parts["mlm"], parts["mlm_acc"] = self._mlm(batch, images, image_tokens, image_tokens_m, alpha)
        else:
            parts["mlm"], parts["mlm_acc"] = zero, zero.detach()
        if weights.mim != 0:
            context = embeddings if faithful else text_hidden
            context_m = embeddings.detach() if faithful else text_hidden_m
            parts["mim"], parts["mim_acc"] = self._mim(batch, context, context_m, alpha)
        else:
            parts["mim"], parts["mim_acc"] = zero, zero.detach()
        if weights.psl != 0:
            parts["psl"], parts["psl_keywords"] = self._psl(batch, image_tokens.detach(), image_emb, image_emb_m,
                                                            alpha)
        else:
            parts["psl"], parts["psl_keywords"] = zero, zero.detach()

        loss = sum(weight * parts[k] for k, weight in self.current_weights().items())
        out = {"loss": loss}
        out.update({k: v.detach() for k, v in parts.items()})
        return out

    def _itm(self, batch: Batch, image_tokens: Tensor, embeddings: Tensor, image_emb: Tensor, text_emb: Tensor,
             temp: Tensor, image_ids: Tensor, ids_global: Tensor) -> tuple[Tensor, Tensor, ImageKV]:
        """ITM over B positives + 2B hard negatives from the global batch (§1.2 (b)); (loss, accuracy, the
        images' K/V projection, which MLM's pass reuses)."""
        attn = batch.attention_mask
        size = attn.shape[0]
        with torch.no_grad():
            if self.cfg.itm_hard_negatives:
                sim_i2t = image_emb @ all_gather_no_grad(text_emb).t() / temp
                sim_t2i = text_emb @ all_gather_no_grad(image_emb).t() / temp
            else:
                sim_i2t = sim_t2i = torch.zeros(size, ids_global.shape[0], device=image_emb.device)
            draws = self._uniforms(batch, (2,), SALT_ITM)
            neg_image, neg_text = sample_hard_negatives(sim_i2t, sim_t2i, image_ids, ids_global, draws[:, 0],
                                                        draws[:, 1])
        length = embeddings.shape[1]
        if world_size() > 1:
            length = int(all_gather_no_grad(torch.tensor([length], device=attn.device)).max())
        embeddings, attn = pad_length(embeddings, length), pad_length(attn, length)
        embeddings_all = all_gather_with_grad(embeddings)
        attn_all = all_gather_no_grad(attn)
        images = self.model.itm_image_kv(image_tokens, neg_image)  # one K/V projection for the 3B rows (and MLM)
        # multimodal mode on the 3B pairs; only the [CLS] is read, so the last layer runs at position 0 alone
        cls = self.model.text.forward_from_embeddings(
            torch.cat([embeddings, embeddings, embeddings_all[neg_text]]), torch.cat([attn, attn, attn_all[neg_text]]),
            images, read=torch.zeros(3 * size, 1, dtype=torch.long, device=attn.device))[:, 0]
        logits = self.model.itm_logits(cls)  # (3B, 2)
        labels = torch.cat([torch.ones(size, dtype=torch.long, device=logits.device),
                            torch.zeros(2 * size, dtype=torch.long, device=logits.device)])
        return itm_loss(logits, labels), (logits.argmax(dim=1) == labels).float().mean().detach(), images

    @torch.no_grad()
    def token_counts(self, batch: Batch) -> dict[str, Tensor]:
        """{"mlm": masked tokens, "mim": masked patches} of `batch`, the rank's whole step batch, for the
        objectives that are on (the trainer sums them over ranks: MLM and MIM are then means over the global
        batch however the step is cut into micro-batches, `vlp.models.losses.global_token_mean`). Empty without
        sample keys (the masks would draw from the global RNG)."""
        if batch.sample_keys is None:
            return {}
        counts = {}
        if self.cfg.loss_weights.mlm != 0:
            counts["mlm"] = (self.mask(batch)[1] != IGNORE_INDEX).sum()
        if self.cfg.loss_weights.mim != 0:
            counts["mim"] = self.mim_mask(batch).sum()
        return counts

    def mask(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """The MLM input: (masked_ids (B, T), labels (B, T), -100 = not predicted); keyed per sample."""
        ids = batch.input_ids
        uniforms = self._uniforms(batch, (ids.shape[1], 3), SALT_MLM)
        return mask_tokens(ids, batch.attention_mask, self.special_ids, self.mask_id, self.vocab_size,
                           self.cfg.mlm_prob, uniforms=uniforms)

    def _mlm(self, batch: Batch, images: ImageKV, image_tokens: Tensor, image_tokens_m: Tensor,
             alpha: float) -> tuple[Tensor, Tensor]:
        """MLM(text | image), §1.2 (c): the masked caption in multimodal mode attending to the unmasked image
        (`images`: its K/V projection, shared with ITM; `image_tokens` (B,1+P,Dv) for the faithful full pass);
        (1 - alpha) CE + alpha soft CE against the momentum model's predictions; (loss, accuracy)."""
        attn = batch.attention_mask
        masked_ids, labels = self.mask(batch)
        selected = labels != IGNORE_INDEX
        targets = labels[selected]
        if self.cfg.faithful_quirks and alpha > 0:  # quirk 6: the soft term's log-softmax over the sequence axis
            hidden = self.model.encode_multimodal(masked_ids, attn, image_tokens).text
            logits_full = self.model.mlm_logits(hidden)  # (B, T, V)
            with torch.no_grad():
                soft = torch.softmax(self.model_m.mlm_logits(
                    self.model_m.encode_multimodal(masked_ids, attn, image_tokens_m).text).float(), dim=-1)
            nll = -F.log_softmax(logits_full[selected].float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            seq_soft = -(soft * F.log_softmax(logits_full.float(), dim=1)).sum(-1)  # (B, T)
            # both terms: means over the global batch's masked tokens (one count all-reduce)
            means = global_token_mean(torch.stack([nll.sum(), seq_soft[selected].sum()]), selected.sum(), "mlm")
            loss = (1 - alpha) * means[0] + alpha * means[1]
            logits = logits_full[selected]
        else:  # the last layer at the masked positions only (the states nothing reads are not computed)
            read, valid = read_positions(selected)
            hidden = self.model.text.forward_from_embeddings(self.model.text.embed(masked_ids), attn, images,
                                                             read=read)
            logits = self.model.mlm_logits(hidden[valid])  # (M, V), as hidden[selected] of the full states
            soft = None
            if alpha > 0:
                with torch.no_grad():
                    hidden_m = self.model_m.text.forward_from_embeddings(self.model_m.text.embed(masked_ids), attn,
                                                                         image_tokens_m, read=read)
                    soft = torch.softmax(self.model_m.mlm_logits(hidden_m[valid]).float(), dim=-1)
            loss = mlm_loss(logits, targets, soft_targets=soft, alpha=alpha, name="mlm")  # global-batch mean
        accuracy = (logits.argmax(dim=-1) == targets).float().sum() / max(int(targets.numel()), 1)
        return loss, accuracy.detach()

    def mim_mask(self, batch: Batch) -> Tensor:
        """The MIM patch mask (B, P) bool, BEiT blocks keyed per sample (§1.2 (c))."""
        uniforms = self._uniforms(batch, self.block_masks.uniform_shape, SALT_MIM)
        return self.block_masks(uniforms)

    def _image_queries(self, model: VLModel, mask_token: Tensor, images: Tensor, patch_mask: Tensor,
                       context: Tensor, attn: Tensor, masked_only: bool = False) -> Tensor:
        """Image-as-query mode: the masked ViT output (B, 1+P, Dv) through the shared encoder attending to
        `context` (B, T, D) -> the patch states (B, P, D) (CLS dropped); with `masked_only` the states of the
        masked patches alone (M, D), row-major as `states[patch_mask]` (MIM reads nothing else, so the last
        layer runs at those positions only)."""
        tokens = model.vision(images, patch_mask=patch_mask, mask_token=mask_token).tokens
        queries = model.text.embed_features(tokens, positions=self.cfg.faithful_quirks)
        if not masked_only:
            return model.text.forward_from_embeddings(queries, None, context, attn)[:, 1:]
        read, valid = read_positions(patch_mask)
        return model.text.forward_from_embeddings(queries, None, context, attn, read=read + 1)[valid]  # CLS at 0

    def _mim(self, batch: Batch, context: Tensor, context_m: Tensor, alpha: float) -> tuple[Tensor, Tensor]:
        """MIM(image | text), §1.2 (c): CE of the visual-token codes at the masked patches, (1 - alpha) hard +
        alpha soft from the momentum model (same mask); (loss, accuracy over masked patches)."""
        images, attn = batch.images, batch.attention_mask
        patch_mask = self.mim_mask(batch)  # (B, P)
        targets = self.visual_tokenizer.encode(images)  # (B, P)
        states = self._image_queries(self.model, self.heads.mask_token, images, patch_mask, context, attn,
                                     masked_only=True)
        logits = self.heads.mim_head(states)  # (M, Vi)
        hard_targets = targets[patch_mask]
        soft = None
        if alpha > 0:
            with torch.no_grad():
                states_m = self._image_queries(self.model_m, self.heads_m.mask_token, images, patch_mask,
                                               context_m, attn, masked_only=True)
                soft = torch.softmax(self.heads_m.mim_head(states_m).float(), dim=-1)
        loss = mlm_loss(logits, hard_targets, soft_targets=soft, alpha=alpha, name="mim")  # global-batch mean
        accuracy = (logits.argmax(dim=-1) == hard_targets).float().sum() / max(int(hard_targets.numel()), 1)
        return loss, accuracy.detach()

    def keyword_targets(self, batch: Batch, image_tokens: Tensor) -> Tensor:
        """PSL hard targets (B, V): keywords from the momentum encoder's last-layer [CLS] self-attention over
        the caption in multimodal mode with the ONLINE image tokens (§1.2 (d), §1.6.4)."""
        ids, attn = batch.input_ids, batch.attention_mask
        with torch.no_grad():
            attention = self.model_m.text.cls_attention(self.model_m.text.embed(ids), attn, image_tokens)
        return psl_targets(attention, ids, attn, self.vocab_size, self.cfg.psl_keywords_per_head,
                           self.cfg.psl_keywords, exclude_ids=self.special_ids, faithful=self.cfg.faithful_quirks,
                           cls_id=self.cls_id)

    def _psl(self, batch: Batch, image_tokens: Tensor, image_emb: Tensor, image_emb_m: Tensor,
             alpha: float) -> tuple[Tensor, Tensor]:
        """PSL, §1.2 (d): the concept head on the normalised image embedding against the keywords (hard) and
        sigmoid(momentum concept logits) (soft); (loss, mean keywords per caption)."""
        hard = self.keyword_targets(batch, image_tokens)
        soft = torch.sigmoid(self.heads_m.concept_head(image_emb_m).float()) if alpha > 0 else None
        loss = psl_loss(self.heads.concept_head(image_emb), hard, soft, alpha)
        return loss, hard.sum(dim=1).mean().detach()


__all__ = ["SharedEncoderRetrieval", "Simla", "SimlaConfig", "SimlaHeads", "psl_loss", "psl_targets", "read_positions"]
