"""ALBEF pre-training: ITC + ITM with hard negatives + image-conditioned MLM, optional momentum distillation.

Li, Selvaraju, Gotmare, Joty, Xiong, Hoi, "Align before Fuse: Vision and Language Representation Learning
with Momentum Distillation", NeurIPS 2021 (code: salesforce/ALBEF `models/model_pretrain.py`).

Where we follow the paper / reference code:
  * ITC = symmetric InfoNCE on L2-normalised [CLS] projections with a learnable, clamped temperature.
  * ITM on the fused [CLS]: for each pair one positive, one hard-negative image for its text and one
    hard-negative text for its image, drawn from softmax(ITC similarity) over non-matching pairs.
  * MLM: BERT 80/10/10 masking at 15 %, the masked text goes through the text encoder, then the fusion
    encoder attending to the (unmasked) image, then the MLM head (tied to the word embeddings).
  * Momentum distillation (optional): an EMA copy of the whole model gives soft ITC targets (over the
    batch and, with `queue_size > 0`, a queue of past momentum features) and soft MLM targets,
    mixed with weight `distill_alpha`.

Where we deviate (each on purpose):
  * Rank independence. ITC gathers embeddings across ranks *with gradient* (open_clip local loss), and
    ITM samples hard negatives from the GLOBAL batch: image tokens and text hidden states are gathered
    with gradient (BLIP `all_gather_with_grad` style). ALBEF computes ITC against momentum features and
    samples negatives within each GPU's local batch, so its result depends on the number of GPUs.
  * Per-sample randomness comes from `keyed_uniform(batch.sample_keys, ...)` (distinct salts for MLM and
    ITM), so masks and negatives do not depend on how the batch is split; torch's global RNG otherwise.
  * `image_ids`: captions of the same image are positives in ITC and are never drawn as ITM negatives
    (ALBEF pre-training uses only the diagonal).
  * The in-batch ITC columns are the online features (gradient to both towers); queue columns are
    momentum features, as in ALBEF. ALBEF uses momentum features for the in-batch columns too.
  * The queue starts empty and only filled entries are used (ALBEF starts it with random unit vectors);
    it is filled in `on_step_end()` with the features of every micro-batch of the step, so gradient
    accumulation sees the same queue as one large batch. Queue entries keep their image ids. (The EMA
    update and the queue are `vlp.models.momentum`'s `ema_update_` and `FeatureQueue`.)
  * MLM distillation uses the log-softmax over the vocabulary (ALBEF's code used the sequence axis, a typo,
    salesforce/ALBEF#58); [SEP] is never masked; random replacement tokens are non-special.
  * `distill_alpha` is constant (ALBEF ramps it from 0 over the first epoch).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal, Optional

import torch
from torch import Tensor

from pydantic import Field

from vlp.config import MethodConfig, RunConfig, Section
from vlp.models.losses import (
    all_gather_no_grad,
    all_gather_with_grad,
    contrastive_loss,
    itm_loss,
    mask_tokens,
    mlm_loss,
    pad_length,
    rank,
    sample_hard_negatives,
    world_size,
)
from vlp.methods.base import PretrainMethod
from vlp.models.fusion import ImageKV
from vlp.models.model import VLModel
from vlp.models.momentum import FeatureQueue, ema_update_, itc_distillation, momentum_copy
from vlp.models.rng import sample_uniforms
from vlp.models.roi import box_regions
from vlp.types import Batch, PairOutput

class LossWeights(Section):
    itc: float = Field(1.0, ge=0)
    itm: float = Field(1.0, ge=0)
    mlm: float = Field(1.0, ge=0)


class AlbefConfig(MethodConfig):
    """The `method:` section of ALBEF (`name: albef`)."""

    name: Literal["albef"] = "albef"
    mlm_prob: float = Field(0.15, ge=0, le=1)
    itm_hard_negatives: bool = True  # ITM negatives drawn from softmax(ITC similarity); false = uniform
    momentum_distill: bool = False
    momentum: float = Field(0.995, ge=0, lt=1)
    queue_size: int = Field(0, ge=0)  # 0 = no queue; ALBEF uses 65536
    distill_alpha: float = Field(0.4, ge=0, le=1)
    loss_weights: LossWeights = Field(default_factory=LossWeights)


SALT_MLM = 0x4D4C4D  # "MLM": token masking draws
SALT_ITM = 0x49544D  # "ITM": hard-negative draws

# state_dict names of the queue before it moved into `FeatureQueue` (v0.1 checkpoints) -> current names
LEGACY_QUEUE_KEYS = {"image_queue": "queue.image", "text_queue": "queue.text", "queue_ids": "queue.ids",
                     "queue_ptr": "queue.ptr", "queue_count": "queue.count"}


class Albef(PretrainMethod):
    """ALBEF pre-training objective around a `VLModel` (see the module docstring for deviations).

    Args:
        model: the `VLModel` to train (held as `.model`).
        cfg: the `method` config section.
        mask_id: the [MASK] token id.
        special_ids: ids never masked nor used as random MLM replacements.
        vocab_size: tokenizer vocabulary size V.

    State (in `state_dict`, so checkpoints resume exactly): `model`; with `momentum_distill` also
    `model_m` (frozen EMA copy, `vlp.models.momentum.momentum_copy`) and, with `queue_size > 0`, `queue`
    (a `FeatureQueue`: `queue.image` / `queue.text` (K, E), `queue.ids` (K,) (-1 = empty), `queue.ptr` and
    `queue.count` (0-d long)). Checkpoints written before the queue moved into `FeatureQueue` hold these as
    `image_queue`, `text_queue`, `queue_ids`, `queue_ptr`, `queue_count`: they still load (renamed on load,
    `LEGACY_QUEUE_KEYS`), and the old names stay readable as properties.

    Capabilities (`vlp.methods.base`): pixels in; ranked by ITC with the ITC top-k re-ranked by ITM (ALBEF's
    protocol), and by ITM over all pairs when `eval.itm_all` asks; retrieval fine-tuning keeps ITC + ITM
    with ITC-sampled hard negatives and drops MLM (ALBEF §4 / `Retrieval.py`).
    """

    name = "albef"
    config_class = AlbefConfig
    inputs = frozenset({"images", "image_ids"})
    retrieval_protocols = ("itc_itm", "itm_all")
    itm_all_from_text_states = True  # the text encoder never sees the image: encode each text once
    retrieval_finetune_overrides = ("method.loss_weights.mlm=0", "method.itm_hard_negatives=true")
    demo_config = "demo"
    in_demo_by_default = True
    # MLM is the mean over every rank's masked tokens (global_token_mean); mlm_acc is a per-rank ratio
    rank_independent_parts = ("itc", "itm", "itm_acc", "mlm", "loss")

    def __init__(
        self,
        model: VLModel,
        cfg: AlbefConfig,
        *,
        mask_id: int,
        special_ids: Iterable[int],
        vocab_size: int,
    ) -> None:
        super().__init__()
        if cfg.queue_size > 0 and not cfg.momentum_distill:
            raise ValueError("method.queue_size > 0 needs method.momentum_distill: true "
                             "(the queue holds momentum-model features)")
        if not 0.0 <= cfg.momentum < 1.0:
            raise ValueError(f"method.momentum must be in [0, 1), got {cfg.momentum}")
        if model.fusion.cfg.type != "cross":
            raise ValueError(f"ALBEF fuses by cross-attention from text to image tokens: model.fusion.type must be "
                             f"'cross', got {model.fusion.cfg.type!r} (the single-stream methods are uniter and cmal)")
        self.model = model
        self.cfg = cfg
        self.mask_id = int(mask_id)
        self.vocab_size = int(vocab_size)
        self.register_buffer("special_ids", torch.tensor(sorted(int(i) for i in special_ids), dtype=torch.long),
                             persistent=False)
        self.model_m: VLModel | None = momentum_copy(model) if cfg.momentum_distill else None
        self.queue: FeatureQueue | None = None  # momentum features of past steps (ITC columns)
        if cfg.momentum_distill and cfg.queue_size > 0:
            dim = model.cfg.embed_dim
            self.queue = FeatureQueue(cfg.queue_size, {"image": dim, "text": dim})

    @classmethod
    def from_config(cls, cfg: RunConfig, model: VLModel, tokenizer: Any, class_words: Any = None) -> "Albef":
        """Build from a run config and a tokenizer exposing `mask_id`, `special_ids`, `vocab_size`.
        `class_words` (the object lexicon) is accepted for a uniform builder signature; ALBEF has no use for it."""
        return cls(model, cfg.method, mask_id=tokenizer.mask_id, special_ids=tokenizer.special_ids,
                   vocab_size=tokenizer.vocab_size)

    def unused_parameters(self) -> set[str]:
        """Parameters only a zero-weight loss would reach: the MLM head without MLM (retrieval fine-tuning),
        the ITM head without ITM, the ITC projections and temperature without ITC (hard negatives read them
        only under no_grad), the fusion encoder without ITM and MLM."""
        w = self.cfg.loss_weights
        weight_of = {"mlm_head": w.mlm, "itm_head": w.itm, "vision_proj": w.itc, "text_proj": w.itc, "temp": w.itc,
                     "fusion": abs(w.itm) + abs(w.mlm)}
        return {name for name, param in self.named_parameters()
                if param.requires_grad and name.startswith("model.") and weight_of.get(name.split(".")[1], 1) == 0}

    def itm_pair_inputs(self, images: Tensor, region_boxes: Optional[Tensor] = None,
                        region_mask: Optional[Tensor] = None) -> tuple[Tensor, ...]:
        """"itm_all" per-image part: the ViT tokens (B, 1+P, Dv) (boxes are not used)."""
        return (self.model.encode_image(images).tokens,)

    def itm_pair_scores(self, image_tokens: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Matched-class ITM logit (P,) of P (image tokens, text) pairs through the fusion encoder."""
        return self.model.itm_score(image_tokens, input_ids, attention_mask)

    # ------------------------------------------------------------------------------------ downstream
    @property
    def pair_dims(self) -> tuple[int, int]:
        """(D, Dr): width of `encode_pair`'s cls and of its region vectors (the ViT width)."""
        return int(self.model.cfg.text.width), int(self.model.cfg.vision.width)

    def encode_pair(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor,
                    region_boxes: Optional[Tensor] = None, region_mask: Optional[Tensor] = None,
                    region_feats: Optional[Tensor] = None) -> PairOutput:
        """Downstream encoding of (image, text) pairs: the fused [CLS] (B, D) of text cross-attending to the
        image tokens (the ITM pass of pre-training, ALBEF's fine-tuning input) and, when boxes (B, N, 4|7)
        are given, RoIAlign features (B, N, Dv) of the ViT grid at them (for REC; ALBEF itself grounds by
        Grad-CAM, which has no trainable head — see `vlp.tasks.rec`).

        `region_feats` (precomputed detector features, `task.region_features`) is refused with a
        ValueError: ALBEF encodes pixels with its ViT and has no input for detector features."""
        images = self.require_pixels(images, region_feats)
        image = self.model.encode_image(images)
        text = self.model.encode_text(input_ids, attention_mask)
        cls = self.model.fuse(text, attention_mask, image.tokens).cls
        if region_boxes is None:
            return PairOutput(cls)
        return PairOutput(cls, *box_regions(image.grid, region_boxes, region_mask))

    @property
    def has_queue(self) -> bool:
        return self.queue is not None

    def _load_from_state_dict(self, state_dict: dict[str, Tensor], prefix: str, *args: Any, **kwargs: Any) -> None:
        """Rename the queue buffers of checkpoints written before `FeatureQueue` (`LEGACY_QUEUE_KEYS`)."""
        for old, new in LEGACY_QUEUE_KEYS.items():
            if prefix + old in state_dict and prefix + new not in state_dict:
                state_dict[prefix + new] = state_dict.pop(prefix + old)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ------------------------------------------------------------------------------------ forward
    def itm_steps(self, steps: int) -> Optional[int]:
        """Every step trains ITM when its loss weight is positive (ITC, ITM and MLM are summed each step)."""
        return int(steps) if self.cfg.loss_weights.itm > 0 else 0

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        """One ALBEF step's losses.

        Returns `loss` (weighted by `cfg.loss_weights`, differentiable) and detached `itc`, `itm`, `mlm`,
        `itm_acc` (accuracy over the 3B ITM pairs), `mlm_acc` (over masked tokens). A loss with weight 0
        is skipped (reported as 0).
        """
        if batch.images is None:
            raise ValueError("ALBEF needs images in the batch (batch.images is None)")
        ids, attn = batch.input_ids, batch.attention_mask
        size, device = ids.shape[0], ids.device
        image_ids = batch.image_ids
        if image_ids is None:  # every row is its own image, unique across ranks (not across steps)
            image_ids = torch.arange(size, device=device) + rank() * size
        weights = self.cfg.loss_weights

        image_tokens = self.model.encode_image(batch.images).tokens  # (B, N, Dv)
        text_hidden = self.model.encode_text(ids, attn)  # (B, T, D)
        image_emb = self.model.image_embed(image_tokens)  # (B, E)
        text_emb = self.model.text_embed(text_hidden)  # (B, E)
        temp = self.model.temperature()
        ids_global = all_gather_no_grad(image_ids)  # (G,)

        image_tokens_m = None
        distill = self.model_m is not None
        alpha = self.cfg.distill_alpha if distill else 0.0
        zero = image_emb.sum() * 0.0
        parts: dict[str, Tensor] = {}

        itc_kwargs: dict[str, Any] = {}
        if distill:
            with torch.no_grad():
                image_tokens_m = self.model_m.encode_image(batch.images).tokens
                image_emb_m = self.model_m.image_embed(image_tokens_m)
                text_emb_m = self.model_m.text_embed(self.model_m.encode_text(ids, attn))
                # ids made up for this batch only must not match later batches: store -1 (never positive)
                queued_ids = ids_global if batch.image_ids is not None else torch.full_like(ids_global, -1)
                itc_kwargs = itc_distillation(image_emb_m, text_emb_m, temp, alpha, self.queue, queued_ids,
                                              stage=self.training)  # enqueued after the optimizer step

        # ------------------------------------------------------------------------------------ ITC
        if weights.itc != 0:
            parts["itc"] = contrastive_loss(image_emb, text_emb, temp, image_ids, gather=True, **itc_kwargs)
        else:
            parts["itc"] = zero

        # ------------------------------------------------------------------------------------ ITM
        # The fusion passes (ITM's three, MLM's) share one K/V projection of each image (`ImageKV`)
        image_kv: Optional[ImageKV] = None
        if weights.itm != 0:
            parts["itm"], parts["itm_acc"], image_kv = self._itm(
                batch, image_tokens, text_hidden, attn, image_emb, text_emb, temp, image_ids, ids_global)
        else:
            parts["itm"], parts["itm_acc"] = zero, zero.detach()

        # ------------------------------------------------------------------------------------ MLM
        if weights.mlm != 0:
            local = torch.arange(size, device=device)  # this rank's images: rows 0..B-1 of the ITM projection
            images = image_kv.take(local) if image_kv is not None else self.model.image_kv(image_tokens)
            parts["mlm"], parts["mlm_acc"] = self._mlm(batch, images, image_tokens_m, alpha)
        else:
            parts["mlm"], parts["mlm_acc"] = zero, zero.detach()

        loss = weights.itc * parts["itc"] + weights.itm * parts["itm"] + weights.mlm * parts["mlm"]
        out = {"loss": loss}
        out.update({k: v.detach() for k, v in parts.items()})
        return out

    def _uniforms(self, batch: Batch, shape: tuple[int, ...], salt: int) -> Tensor:
        return sample_uniforms(batch.sample_keys, len(batch), shape, salt, batch.input_ids.device)

    def _itm(
        self,
        batch: Batch,
        image_tokens: Tensor,
        text_hidden: Tensor,
        attn: Tensor,
        image_emb: Tensor,
        text_emb: Tensor,
        temp: Tensor,
        image_ids: Tensor,
        ids_global: Tensor,
    ) -> tuple[Tensor, Tensor, ImageKV]:
        """ITM over B positives + 2B hard negatives drawn from the global batch; returns (loss, accuracy, the
        images' K/V projection, whose rows 0..B-1 are this rank's images: MLM reuses them).

        The images are projected to the fusion K/V once: this rank's B (one process: the negatives are among
        them), plus the B drawn negatives when distributed (they may live on other ranks)."""
        size = image_tokens.shape[0]
        with torch.no_grad():
            if self.cfg.itm_hard_negatives:
                sim_i2t = image_emb @ all_gather_no_grad(text_emb).t() / temp
                sim_t2i = text_emb @ all_gather_no_grad(image_emb).t() / temp
            else:  # uniform over the other images' pairs
                sim_i2t = sim_t2i = torch.zeros(size, ids_global.shape[0], device=image_emb.device)
            draws = self._uniforms(batch, (2,), SALT_ITM)
            neg_image, neg_text = sample_hard_negatives(
                sim_i2t, sim_t2i, image_ids, ids_global, draws[:, 0], draws[:, 1])

        # Gather (with gradient) what the negatives are drawn from; texts padded to the longest rank's T.
        length = text_hidden.shape[1]
        if world_size() > 1:
            length = int(all_gather_no_grad(torch.tensor([length], device=attn.device)).max())
        text_hidden = pad_length(text_hidden, length)
        attn = pad_length(attn, length)
        text_hidden_all = all_gather_with_grad(text_hidden)
        attn_all = all_gather_no_grad(attn)
        images = self.model.itm_image_kv(image_tokens, neg_image)  # one K/V projection for the 3B rows

        fused = self.model.fuse(
            torch.cat([text_hidden, text_hidden, text_hidden_all[neg_text]]),
            torch.cat([attn, attn, attn_all[neg_text]]),
            images,
        )
        logits = self.model.itm_logits(fused.cls)  # (3B, 2)
        labels = torch.cat([torch.ones(size, dtype=torch.long, device=logits.device),
                            torch.zeros(2 * size, dtype=torch.long, device=logits.device)])
        accuracy = (logits.argmax(dim=1) == labels).float().mean()
        return itm_loss(logits, labels), accuracy, images

    @torch.no_grad()
    def token_counts(self, batch: Batch) -> dict[str, Tensor]:
        """{"mlm": masked tokens of `batch`}, the rank's whole step batch (the trainer sums it over ranks:
        MLM is then the mean over the global batch's masked tokens however the step is cut into micro-batches,
        `vlp.models.losses.global_token_mean`). Empty with MLM off, or without sample keys (the masks would
        draw from the global RNG)."""
        if self.cfg.loss_weights.mlm == 0 or batch.sample_keys is None:
            return {}
        return {"mlm": (self.mask(batch)[1] != -100).sum()}

    def mask(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """The MLM input of `batch`: (masked_ids (B, T), labels (B, T), -100 = not predicted).

        Row b depends only on `batch.sample_keys[b]` when keys are set (else on torch's global RNG).
        """
        ids = batch.input_ids
        uniforms = self._uniforms(batch, (ids.shape[1], 3), SALT_MLM)
        return mask_tokens(ids, batch.attention_mask, self.special_ids, self.mask_id, self.vocab_size,
                           self.cfg.mlm_prob, uniforms=uniforms)

    def _mlm(
        self, batch: Batch, images: ImageKV, image_tokens_m: Tensor | None, alpha: float
    ) -> tuple[Tensor, Tensor]:
        """Image-conditioned MLM (+ momentum soft targets) on `images`, the batch's images projected to the fusion
        K/V (B rows); returns (loss, accuracy over masked tokens)."""
        attn = batch.attention_mask
        masked_ids, labels = self.mask(batch)
        selected = labels != -100
        fused = self.model.fuse(self.model.encode_text(masked_ids, attn), attn, images).text
        logits = self.model.mlm_logits(fused[selected])  # (M, V): only the masked positions
        targets = labels[selected]
        soft = None
        if image_tokens_m is not None and alpha > 0:
            with torch.no_grad():
                fused_m = self.model_m.fuse(self.model_m.encode_text(masked_ids, attn), attn, image_tokens_m).text
                soft = torch.softmax(self.model_m.mlm_logits(fused_m[selected]).float(), dim=-1)
        loss = mlm_loss(logits, targets, soft_targets=soft, alpha=alpha, name="mlm")  # global-batch mean
        accuracy = (logits.argmax(dim=-1) == targets).float().sum() / max(int(targets.numel()), 1)
        return loss, accuracy.detach()

    # ------------------------------------------------------------------------------- step end
    @torch.no_grad()
    def on_step_end(self) -> None:
        """After each optimizer step: clamp the temperature, EMA-update the momentum model
        (p_m = m * p_m + (1 - m) * p, ALBEF `_momentum_update`), then enqueue this step's momentum features."""
        self.model.clamp_temperature_()
        if self.model_m is None:
            return
        ema_update_(self.model, self.model_m, self.cfg.momentum)
        if self.queue is not None:
            self.queue.flush()

    @torch.no_grad()
    def reset_momentum(self) -> None:
        """Copy the online weights into the momentum model and empty the queue (call after loading new
        weights into `.model` alone, e.g. fine-tuning from a checkpoint; a full method state_dict already
        carries both)."""
        if self.model_m is None:
            return
        self.model_m.load_state_dict(self.model.state_dict())
        if self.queue is not None:
            self.queue.reset()
