"""The region single stream shared by UNITER-style methods (CMAL, the UNITER baseline): regions in, ITM out.

UNITER (Chen et al., ECCV 2020) and CMAL (cmal.md §3, §6, §8.2, §9) read an image as a set of regions and
run ONE Transformer over [text ; regions]. What they share lives here, so that a method adds only what its
paper adds (CMAL: anchors, swaps, AMC, WRC; the UNITER baseline: MLM, masked region classification):

  * `RegionStreamConfig`: the `method:` fields of region inputs, masking probabilities and ITM negatives;
  * `RegionClassifier`: UNITER's region classification head (d -> C+1);
  * `RegionSingleStream`: a mixin for `PretrainMethod` subclasses holding `.model` (a single-stream
    `VLModel`), `.cfg` (a `RegionStreamConfig`), `.region_embed` and `.region_head`. It makes the region
    inputs of a batch (`regions`), runs the encoder over a pair (`encode_joint_pair`), draws ITM negatives
    and computes ITM (`itm`), and gives every downstream entry point of the method contract
    (`encode_pair`, `itm_pair_inputs` / `itm_pair_scores` for ranking by ITM over all pairs).

Region features of images with boxes (`method.region_source`, cmal.md §3.1, §11.1):
  * `pixels` (default): RoIAlign of the image's own pixels at each box, `region_pixels` x `region_pixels`
    bins flattened, (B, N, 3*s*s). The region embedding's linear layer is then a learnt patch embedding of
    the box (as ViLT embeds patches). Why: the reference feeds frozen detector features, which encode the
    object class by construction; RoIAlign of our ViT's 8x8 grid does not (an MLP probe finds the world's
    object class at 8-12 %, chance 5.6 %, whatever the ViT's training; the pixels of the same boxes give
    95 %), and without class-bearing regions CMAL's AMC / WRC are solved from positions and the
    swapped-in word and ITM stays at chance (issue 11). Pixels add no supervision beyond the boxes.
  * `vit`: RoIAlign of the ViT patch grid (cmal.md §11.1 "pool the image encoder's features at the boxes";
    v0.1's only choice), mean over 2 x 2 bins, (B, N, vision width). Kept for comparison and for v0.1
    checkpoints (their flat config dumps load as `vit`).
Precomputed detector features (`batch.region_feats`, `method.region_feat_dim` > 0) are used as is, and
images without boxes use a `grid_regions` x `grid_regions` grid of cells, pooled as above.
"""

from __future__ import annotations

import math
import warnings
from typing import Literal, Optional

import torch
from pydantic import Field
from torch import Tensor, nn

from vlp.config import MethodConfig, RunConfig
from vlp.models.anchors import RegionEmbedding, sample_uniform_index
from vlp.models.buckets import run_in_length_buckets
from vlp.models.first_stage import FirstStageHead
from vlp.models.layers import BERT_LN_EPS
from vlp.models.losses import itm_loss
from vlp.models.model import VLModel
from vlp.models.regions import RegionInputBuilder, RegionInputs
from vlp.models.rng import sample_uniforms, step_task
from vlp.types import Batch, PairOutput

RegionSource = Literal["pixels", "vit"]


class RegionStreamConfig(MethodConfig):
    """`method:` fields every region single-stream method has (the module docstring explains the choices)."""

    mlm_prob: float = Field(0.15, ge=0, le=1)
    region_mask_prob: float = Field(0.25, ge=0, le=1)  # regions masked for region classification (CMAL: non-anchor ones)
    itm_neg_prob: float = Field(0.5, ge=0, le=1)  # UNITER ITM: share of rows whose regions come from another image
    max_regions: int = Field(100, ge=1)  # BUTD max_bb
    whole_image_region: bool = False  # prepend a [0,0,1,1] region with label 0 (our addition)
    # Input dim D of the region embedding for precomputed detector features (data.source: regions,
    # task.region_features; BUTD: 2048), so the model is built before data is read. 0 = regions come from
    # images (`region_source`).
    region_feat_dim: int = Field(0, ge=0)
    region_source: RegionSource = "pixels"  # images with boxes: RoIAlign of the pixels, or of the ViT grid
    region_pixels: int = Field(8, ge=1)  # 'pixels': s of the s x s RoIAlign bins per box (feature dim 3*s*s)
    grid_regions: int = Field(3, ge=1)  # images without boxes: a g x g grid of cells as regions (label 0)
    # A cheap first retrieval stage (`vlp.models.first_stage`, a deviation, opt-in): a small bi-encoder on the
    # detached slot vectors, trained by ITC beside the method without changing its updates. Retrieval then
    # ranks by it and re-ranks the top eval.k_rerank by ITM ("itc_rerank"), linear in the set size.
    first_stage: bool = False
    first_stage_dim: int = Field(128, ge=1)  # its embedding width E


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


def image_region_dim(cfg: RegionStreamConfig, vision_width: int) -> int:
    """Dv of the region features a method's region embedding takes: `region_feat_dim` when set
    (precomputed features), else 3*s*s ('pixels') or the ViT width ('vit')."""
    if cfg.region_feat_dim > 0:
        return int(cfg.region_feat_dim)
    return 3 * cfg.region_pixels ** 2 if cfg.region_source == "pixels" else int(vision_width)


def check_region_stream(model: VLModel, cfg: RegionStreamConfig) -> None:
    """ValueError naming the key and the fix when `model` / `cfg` cannot run a region single stream."""
    mcfg = model.cfg
    if mcfg.fusion.type != "single":
        raise ValueError("region single-stream methods need the single-stream encoder: set model.fusion.type: single")
    if mcfg.text.type_vocab < 2:
        raise ValueError("region single-stream methods need model.text.type_vocab >= 2 (type 1 marks the region "
                         "slots, as UNITER)")
    for name in ("mlm_prob", "region_mask_prob", "itm_neg_prob"):
        if not 0.0 <= getattr(cfg, name) <= 1.0:
            raise ValueError(f"method.{name} must be in [0, 1], got {getattr(cfg, name)}")
    if cfg.max_regions < 1:
        raise ValueError(f"method.max_regions must be >= 1, got {cfg.max_regions}")
    if cfg.region_feat_dim < 0:
        raise ValueError(f"method.region_feat_dim must be >= 0 (0 = regions from images), got {cfg.region_feat_dim}")
    if cfg.grid_regions < 1:
        raise ValueError(f"method.grid_regions must be >= 1 (a g x g grid of cells), got {cfg.grid_regions}")
    if cfg.region_pixels < 1:
        raise ValueError(f"method.region_pixels must be >= 1 (s of the s x s RoIAlign bins), got {cfg.region_pixels}")


class RegionSingleStream:
    """Mixin of region single-stream methods (module docstring). Put it before `PretrainMethod` in the bases.

    The host sets `model` (VLModel, fusion 'single'), `cfg` (RegionStreamConfig with `task_mixing`,
    `task_ratio`, `task_weights`), `seed`, the buffer `task_step`, `region_embed`, `region_feat_dim` and
    `_warned` (`init_region_stream` sets the last three), and the class attributes `OWNER` (name in
    messages), `ITM_SALT` (keys its ITM draws), `TASKS`, `TASK_SALT`, `TASK_PARAMETERS` (task mixing). Hooks it may override:
    `word_vectors`, `region_vectors` (the vectors that enter the encoder's slots) and `no_label_consequence`
    (what label-less regions mean for its objectives, for the once-per-cause warning).
    """

    model: VLModel
    cfg: RegionStreamConfig
    region_embed: RegionEmbedding
    region_feat_dim: int
    _warned: set[str]
    OWNER: str = "the method"
    ITM_SALT: int = 0x55_49_54_4D  # "UITM"
    no_label_consequence: str = "objectives that need region classes get no targets"
    # task mixing (UNITER: one task per step): the host's task names (fields of its cfg.task_ratio /
    # task_weights, one of them "itm"), the salt of its step draw, and each task's own head parameters
    TASKS: tuple[str, ...] = ()
    TASK_SALT: int = 0
    TASK_PARAMETERS: dict[str, tuple[str, ...]] = {}
    seed: int
    task_step: Tensor

    def init_region_stream(self, model: VLModel, cfg: RegionStreamConfig) -> None:
        """Check the config and set `region_feat_dim`, `region_embed`, `_warned` (call after nn.Module init)."""
        check_region_stream(model, cfg)
        mcfg = model.cfg
        self.region_feat_dim = image_region_dim(cfg, mcfg.vision.width)
        self.region_embed = RegionEmbedding(self.region_feat_dim, mcfg.text.width, mcfg.fusion.dropout, mcfg.init_std)
        self._warned = set()

    @classmethod
    def region_feature_dim(cls, cfg: RunConfig) -> Optional[int]:
        """`method.region_feat_dim`: the width of precomputed detector features (0 = regions are RoI-pooled
        from the images, `method.region_source`)."""
        return int(cfg.method.region_feat_dim)

    def unused_parameters(self) -> set[str]:
        """What a region single stream never trains (`region_unused_prefixes`) and the heads of tasks that may
        not run in a step (`unused_task_prefixes`)."""
        prefixes = self.region_unused_prefixes() + self.unused_task_prefixes()
        return {name for name, param in self.named_parameters()
                if param.requires_grad and any(name.startswith(p) for p in prefixes)}

    def region_unused_prefixes(self) -> list[str]:
        """Parameter-name prefixes a region single stream never trains: the shared model's ITC parts and the
        fusion's own image input path (regions enter through `region_embed`), and the ViT when regions are
        pixels or precomputed features."""
        prefixes = ["model.vision_proj.", "model.text_proj.", "model.temp", "model.fusion.image_proj.",
                    "model.fusion.image_norm.", "model.fusion.modality_embed."]
        if self.cfg.region_feat_dim > 0 or self.cfg.region_source == "pixels":
            prefixes.append("model.vision.")
        return prefixes

    # ------------------------------------------------------------------------------ first retrieval stage
    def init_first_stage(self) -> None:
        """Build the first-stage head when `method.first_stage` (call LAST in the host's `__init__`: built
        after every other module, it leaves their initial weights unchanged)."""
        mcfg = self.model.cfg
        self.first_stage = (FirstStageHead(mcfg.text.width, self.cfg.first_stage_dim, mcfg.fusion.heads,
                                           mcfg.text.max_len, mcfg.init_std) if self.cfg.first_stage else None)

    def separately_clipped(self) -> tuple[str, ...]:
        """The first-stage head is clipped on its own (`vlp.models.first_stage`)."""
        return ("first_stage.",) if self.first_stage is not None else ()

    def first_stage_terms(self, batch: Batch, regions: RegionInputs) -> dict[str, Tensor]:
        """{"first_stage": ITC loss, "first_stage_acc"} of the first-stage head on the batch's clean word and
        region vectors (computed without gradient), or {} without the head. The host adds the loss (weight
        1) to its own: no gradient of it reaches the method's parameters."""
        if self.first_stage is None:
            return {}
        with torch.no_grad():
            word_vecs = self.word_vectors(batch.input_ids, batch.attention_mask)
            region_vecs = self.region_vectors(regions)
        text_emb = self.first_stage.text_embed(word_vecs, batch.attention_mask)
        image_emb = self.first_stage.image_embed(region_vecs, regions.boxes, regions.mask)
        loss, accuracy = self.first_stage.loss(image_emb, text_emb, batch.image_ids)
        return {"first_stage": loss, "first_stage_acc": accuracy}

    def retrieval_protocols_for(self, itm_all: bool) -> tuple[str, ...]:
        """With the first-stage head: "itc_rerank" (linear in the set size), plus "itm_all" when `eval.itm_all`
        asks; without it: "itm_all" (UNITER's protocol)."""
        if self.first_stage is None:
            return ("itm_all",)
        return ("itm_all", "itc_rerank") if itm_all else ("itc_rerank",)

    def first_stage_image_embeds(self, region_vecs: Tensor, boxes: Tensor, region_mask: Tensor) -> Tensor:
        """"itc_rerank" image embeddings (B, E) from `itm_pair_inputs` rows."""
        return self.first_stage.image_embed(region_vecs, boxes, region_mask)

    def first_stage_text_embeds(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """"itc_rerank" text embeddings (B, E)."""
        return self.first_stage.text_embed(self.word_vectors(input_ids, attention_mask), attention_mask)

    # ------------------------------------------------------------------------------ task mixing
    def check_task_mix(self) -> None:
        """ValueError unless `task_ratio` and `task_weights` are >= 0 with a positive sum over `TASKS`."""
        for name in ("task_ratio", "task_weights"):
            values = [getattr(getattr(self.cfg, name), t) for t in self.TASKS]
            if min(values) < 0 or sum(values) <= 0:
                raise ValueError(f"method.{name} must be >= 0 with a positive sum, got {getattr(self.cfg, name)}")

    def task_for_step(self, step: int) -> str:
        """The task 'ratio' mixing runs at optimizer step `step`: P(task) ∝ task_ratio, drawn from (train seed,
        step) alone (`vlp.models.rng.step_task`), so resumed runs, ranks and micro-batches agree."""
        weights = [getattr(self.cfg.task_ratio, t) for t in self.TASKS]
        return self.TASKS[step_task(step, weights, self.TASK_SALT * 1_000_003 + self.seed)]

    def tasks_to_run(self) -> dict[str, float]:
        """{task: loss weight} of this forward: the step's one task (weight 1) under 'ratio' mixing in
        training (the counter `task_step` is advanced in `on_step_end`); otherwise every task with a weight,
        normalised by their sum (`task_weights` in training, `task_ratio` in eval mode)."""
        if self.training and self.cfg.task_mixing == "ratio":
            return {self.task_for_step(int(self.task_step)): 1.0}
        mix = self.cfg.task_weights if self.training else self.cfg.task_ratio
        total = sum(getattr(mix, t) for t in self.TASKS)
        return {t: getattr(mix, t) / total for t in self.TASKS if getattr(mix, t) > 0}

    def unused_task_prefixes(self) -> list[str]:
        """Parameter prefixes of the heads of tasks that may not run in a step (`TASK_PARAMETERS`): every
        task's under 'ratio' mixing, zero-weight tasks under 'sum'."""
        if self.cfg.task_mixing == "ratio":
            off = set(self.TASKS)
        else:
            off = {t for t in self.TASKS if getattr(self.cfg.task_weights, t) == 0}
        return [p for task in off for p in self.TASK_PARAMETERS[task]]

    def itm_steps(self, steps: int) -> int:
        """How many of the first `steps` optimizer steps train ITM: every step under 'sum' mixing with an ITM
        weight, else the steps whose task draw (`task_for_step`) is ITM. Single-stream ITM sits at its
        prior for ~450-500 ITM steps at the tiny sizes (README), so every ranking is reported with this."""
        if self.cfg.task_mixing == "sum":
            return int(steps) if self.cfg.task_weights.itm > 0 else 0
        return sum(self.task_for_step(step) == "itm" for step in range(int(steps)))

    # ------------------------------------------------------------------------------ randomness
    def _uniforms(self, batch: Batch, shape: tuple[int, ...], salt: int) -> Tensor:
        return sample_uniforms(batch.sample_keys, len(batch), shape, salt, batch.input_ids.device)

    # ------------------------------------------------------------------------------ inputs
    @property
    def region_builder(self) -> RegionInputBuilder:
        """Makes the region inputs from the current `method` config (`vlp.models.regions`)."""
        cfg = self.cfg
        if cfg.region_source == "pixels" and cfg.region_feat_dim == 0:
            channels, pool = 3, cfg.region_pixels
        else:
            channels, pool = self.model.cfg.vision.width, 0
        return RegionInputBuilder(cfg.max_regions, cfg.whole_image_region, cfg.grid_regions, self.region_feat_dim,
                                  channels, owner=self.OWNER, pool_size=pool)

    def regions(self, batch: Batch) -> RegionInputs:
        """The batch's regions, by what it carries (cmal.md §3.1, §11.1):

          region_feats + region_boxes     precomputed detector features, used as is   (`feature_inputs`)
          images + region_boxes           RoIAlign at the boxes (`region_source`)     (`region_inputs`)
          images, no region_boxes         grid_regions^2 grid cells, labels 0          (`region_inputs`)
        Label-less inputs are warned about once per cause (`_warn_no_labels`).
        """
        owner = self.OWNER
        if batch.region_feats is not None:
            if batch.region_boxes is None:
                raise ValueError(f"{owner} got batch.region_feats without batch.region_boxes: every precomputed "
                                 f"region needs its normalised box")
            if batch.region_labels is None:
                self._warn_no_labels("the precomputed region features carry no soft_labels (every region label is 0)")
            return self.feature_inputs(batch.region_feats, batch.region_boxes, batch.region_labels, batch.region_mask)
        if batch.images is None:
            raise ValueError(f"{owner} needs images in the batch (regions are pooled from them) or precomputed "
                             f"batch.region_feats")
        if batch.region_boxes is None:
            g = self.cfg.grid_regions
            self._warn_no_labels(f"the batch has images but no region boxes, so {owner} uses a {g}x{g} grid of "
                                 f"cells as regions (method.grid_regions), all labelled 0")
            return self.region_inputs(batch.images, self.region_builder.cell_boxes(len(batch), batch.images.device))
        if batch.region_labels is None:
            self._warn_no_labels("the batch has region boxes but no region labels (every region label is 0)")
        return self.region_inputs(batch.images, batch.region_boxes, batch.region_labels, batch.region_mask)

    def _warn_no_labels(self, cause: str) -> None:
        """Warn ONCE per cause (per method instance) that no region carries a class (cmal.md §11.1)."""
        if cause in self._warned:
            return
        self._warned.add(cause)
        warnings.warn(
            f"{self.OWNER}: {cause}, so no region names an object class: {self.no_label_consequence}; provide "
            f"region boxes with class labels, or precomputed detector features with soft_labels plus "
            f"data.class_vocab (the detector's objects_vocab.txt).",
            UserWarning,
            stacklevel=3,
        )

    def region_inputs(self, images: Tensor, region_boxes: Tensor, region_labels: Optional[Tensor] = None,
                      region_mask: Optional[Tensor] = None) -> RegionInputs:
        """Regions of images (B,3,H,W) at boxes (B,N,4|7) normalised xyxy, labels (B,N) or None (all 0), mask
        (B,N) bool or None (all real) -> RoIAlign features (B,N',Dv) of the pixels or of the ViT grid
        (`region_source`), N' = min(N, max_regions) (+1 with `whole_image_region`)."""
        if self.cfg.region_source == "pixels" and self.cfg.region_feat_dim == 0:
            grid = images.float()
        else:
            def grid() -> Tensor:
                return self.model.encode_image(images).grid
        return self.region_builder.from_boxes(grid, region_boxes, region_labels, region_mask)

    def feature_inputs(self, region_feats: Tensor, region_boxes: Tensor, region_labels: Optional[Tensor] = None,
                       region_mask: Optional[Tensor] = None) -> RegionInputs:
        """Precomputed detector features (cmal.md §3.1, UNITER's BUTD inputs) used as is, no RoIAlign
        (`RegionInputBuilder.from_features`): region_feats (B,N,D) with D = `method.region_feat_dim`,
        region_boxes (B,N,4|7), labels (B,N) or None (all 0), mask (B,N) or None (all real)."""
        return self.region_builder.from_features(region_feats, region_boxes, region_labels, region_mask)

    # ------------------------------------------------------------------------------ encoder
    def word_vectors(self, ids: Tensor, attn: Tensor) -> Tensor:
        """Text slot vectors before the position / type terms (B,T,d): the word embeddings (UNITER)."""
        return self.model.text.word_embeddings(ids)

    def region_vectors(self, regions: RegionInputs, hide: Optional[Tensor] = None) -> Tensor:
        """Region slot vectors before the box / type terms (B,N,d): LN_v(W_v v); `hide` (B,N) bool -> 0
        (a masked region: UNITER zeroes the feature, CMAL the vector, cmal.md quirk 5)."""
        e = self.region_embed.project(regions.feats)
        if hide is not None:
            e = e.masked_fill(hide[:, :, None], 0.0)
        return e

    def region_type(self) -> Tensor:
        """(d,) the region slots' type embedding: the text's token-type row 1 (UNITER)."""
        return self.model.text.token_type_embeddings.weight[1]

    def encode_joint_pair(self, word_vecs: Tensor, region_vecs: Tensor, boxes: Tensor, attn: Tensor,
                          region_mask: Tensor) -> tuple[Tensor, Tensor]:
        """Slot terms, then the single-stream encoder (cmal.md §6): -> (text (B,T,d), regions (B,N,d)).

        text   x^w = Dropout(LN(e^w + P[t] + S[0]))           (`TextEncoder.embed(word_embeds=...)`)
        region x^v = Dropout(LN(e^v + LN_p(W_p b) + S[1]))    (`RegionEmbedding.finish`, S = text type rows)

        The encoder runs per length bucket (`model.length_buckets`, `vlp.models.buckets`): each bucket's
        [text cut to its longest caption ; all N regions]; text states past a row's bucket length are 0.
        """
        x_w = self.model.text.embed(word_embeds=word_vecs)
        x_v = self.region_embed.finish(region_vecs, boxes, self.region_type())
        return run_in_length_buckets(self._encode_joint_rows, attn, self.model.length_buckets, text=(x_w,),
                                     rows=(x_v, region_mask))

    def _encode_joint_rows(self, attn: Tensor, x_w: Tensor, x_v: Tensor, region_mask: Tensor) -> tuple[Tensor, Tensor]:
        """The single-stream encoder over [x_w (b,L,d) ; x_v (b,N,d)] with masks attn (b,L), region_mask (b,N)
        -> (text (b,L,d), regions (b,N,d))."""
        L = x_w.shape[1]
        joint = torch.cat([x_w, x_v], dim=1)
        joint_mask = torch.cat([attn.bool(), region_mask.bool()], dim=1)
        out = self.model.fusion.encode_joint(joint, joint_mask)
        return out[:, :L], out[:, L:]

    # ------------------------------------------------------------------------------ ITM
    def itm_rows(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """(rows (B,), negative (B,) bool): whose regions each caption is paired with in ITM.

        A row is a negative with p = itm_neg_prob (keyed draw); its regions come from a row of another
        image (uniform among them; `image_ids`, or every row its own image when None). Rows of a batch
        holding a single image stay positive. UNITER draws a random image of the dataset; the local batch
        keeps the draw keyed and DDP-independent.
        """
        B, device = len(batch), batch.input_ids.device
        image_ids = batch.image_ids if batch.image_ids is not None else torch.arange(B, device=device)
        draws = self._uniforms(batch, (2,), self.ITM_SALT)
        other = image_ids[:, None] != image_ids[None, :]
        other_row = sample_uniform_index(other, draws[:, 1])
        negative = (draws[:, 0] < self.cfg.itm_neg_prob) & (other_row >= 0)
        return torch.where(negative, other_row, torch.arange(B, device=device)), negative

    def itm(self, batch: Batch, regions: RegionInputs) -> tuple[Tensor, Tensor]:
        """ITM (cmal.md §8.2, UNITER): with p = itm_neg_prob a row's regions come from a row of another image;
        2-way CE on the fused [CLS] -> (loss, accuracy)."""
        ids, attn = batch.input_ids, batch.attention_mask
        rows, negative = self.itm_rows(batch)
        region_vecs = self.region_vectors(regions)[rows]
        txt_h, _ = self.encode_joint_pair(self.word_vectors(ids, attn), region_vecs, regions.boxes[rows], attn,
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
        on the text by self-attention (UNITER's REC head scores these). Regions are, as in pre-training:
          * `region_feats` (B, N, Dv) with their `region_boxes` (B, N, 4|7) and `region_mask` (B, N):
            precomputed detector features used as is (`images` may be None; Dv = `method.region_feat_dim`);
          * else RoIAlign of `images` (B, 3, H, W) (`region_source`) at the given boxes (REC candidates, or
            an image's object boxes) or, without boxes, at `grid_regions`² grid cells.
        The `whole_image_region` slot, when configured, is encoded but not returned, so `regions[:, i]` is
        region i. More than `method.max_regions` regions is an error (REC candidates must all be scored).
        """
        owner = self.OWNER
        if region_feats is not None:
            if region_boxes is None:
                raise ValueError(f"{owner}.encode_pair got region_feats without region_boxes: every precomputed "
                                 f"region needs its normalised box")
        elif images is None:
            raise ValueError(f"{owner}.encode_pair needs images (regions are pooled from them) or precomputed "
                             f"region_feats with their region_boxes")
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
        txt_h, reg_h = self.encode_joint_pair(self.word_vectors(input_ids, attention_mask),
                                              self.region_vectors(regions), regions.boxes, attention_mask,
                                              regions.mask)
        skip = 1 if self.cfg.whole_image_region else 0
        return PairOutput(txt_h[:, 0], reg_h[:, skip:], regions.mask[:, skip:])

    # ------------------------------------------------------------------------------ retrieval
    def encode_regions(self, images: Tensor, region_boxes: Optional[Tensor],
                       region_mask: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
        """Per-image part of the ITM input, computed once per image for retrieval:
        (region vectors (B,N,d), 7-d boxes (B,N,7), region mask (B,N) bool), clean (no masking).
        `region_boxes=None` (images without boxes): `grid_regions`² grid cells, as in training."""
        if region_boxes is None:
            region_boxes = self.region_builder.cell_boxes(images.shape[0], images.device)
            region_mask = None
        regions = self.region_inputs(images, region_boxes, None, region_mask)
        return self.region_vectors(regions), regions.boxes, regions.mask

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
        txt_h, _ = self.encode_joint_pair(self.word_vectors(input_ids, attention_mask), region_vecs, boxes,
                                          attention_mask, region_mask)
        return self.model.itm_logits(txt_h[:, 0])[:, 1]

    def itm_scores(self, images: Tensor, region_boxes: Tensor, region_mask: Optional[Tensor], input_ids: Tensor,
                   attention_mask: Tensor) -> Tensor:
        """ITM positive-class logit (P,) of P (image, text) pairs (UNITER retrieval score): images
        (P,3,H,W), region_boxes (P,N,4) xyxy, region_mask (P,N) bool or None, input_ids / attention_mask
        (P,T). Rows are independent (eval mode: no dropout)."""
        return self.itm_scores_from_regions(*self.encode_regions(images, region_boxes, region_mask),
                                            input_ids, attention_mask)


def sphere(x: Tensor) -> Tensor:
    """x * sqrt(d) / ||x|| (0 stays 0): the norm of a LayerNorm output before its affine."""
    return nn.functional.normalize(x, dim=-1) * math.sqrt(x.shape[-1])


__all__ = ["RegionClassifier", "RegionSingleStream", "RegionSource", "RegionStreamConfig", "check_region_stream",
           "image_region_dim", "sphere"]
