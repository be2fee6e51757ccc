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
    accumulation sees the same queue as one large batch. Queue entries keep their image ids.
  * MLM distillation uses the log-softmax over the vocabulary (ALBEF's code used the sequence axis, a typo,
    salesforce/ALBEF#58); [SEP] is never masked; random replacement tokens are non-special.
  * `distill_alpha` is constant (ALBEF ramps it from 0 over the first epoch).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlp.config import MethodConfig, RunConfig
from vlp.models.losses import (
    all_gather_no_grad,
    all_gather_with_grad,
    contrastive_loss,
    itm_loss,
    mask_tokens,
    mlm_loss,
    rank,
    sample_hard_negatives,
    world_size,
)
from vlp.models.model import VLModel
from vlp.models.rng import sample_uniforms
from vlp.models.roi import region_features
from vlp.types import Batch, PairOutput

SALT_MLM = 0x4D4C4D  # "MLM": token masking draws
SALT_ITM = 0x49544D  # "ITM": hard-negative draws


def _pad_length(x: Tensor, length: int) -> Tensor:
    """Right-pad dim 1 of x (B, T, ...) with zeros to `length`."""
    extra = length - x.shape[1]
    if extra == 0:
        return x
    pad = [0, 0] * (x.dim() - 2) + [0, extra]
    return F.pad(x, pad)


class Albef(nn.Module):
    """ALBEF pre-training objective around a `VLModel` (see the module docstring for deviations).

    Args:
        model: the `VLModel` to train (held as `.model`).
        cfg: the `method` config section.
        mask_id: the [MASK] token id.
        special_ids: ids never masked nor used as random MLM replacements.
        vocab_size: tokenizer vocabulary size V.

    State (in `state_dict`, so checkpoints resume exactly): `model`; with `momentum_distill` also
    `model_m` (frozen EMA copy) and, with `queue_size > 0`, `image_queue` / `text_queue` (K, E),
    `queue_ids` (K,) (-1 = empty), `queue_ptr` and `queue_count` (0-d long).
    """

    def __init__(
        self,
        model: VLModel,
        cfg: MethodConfig,
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
        self.model = model
        self.cfg = cfg
        self.mask_id = int(mask_id)
        self.vocab_size = int(vocab_size)
        self.register_buffer("special_ids", torch.tensor(sorted(int(i) for i in special_ids), dtype=torch.long),
                             persistent=False)
        self.model_m: VLModel | None = None
        self._pending: list[tuple[Tensor, Tensor, Tensor]] = []
        if cfg.momentum_distill:
            self.model_m = copy.deepcopy(model)
            self.model_m.requires_grad_(False)
            if cfg.queue_size > 0:
                dim = model.cfg.embed_dim
                self.register_buffer("image_queue", torch.zeros(cfg.queue_size, dim))
                self.register_buffer("text_queue", torch.zeros(cfg.queue_size, dim))
                self.register_buffer("queue_ids", torch.full((cfg.queue_size,), -1, dtype=torch.long))
                self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
                self.register_buffer("queue_count", torch.zeros((), dtype=torch.long))

    @classmethod
    def from_config(cls, cfg: RunConfig, model: VLModel, tokenizer: Any, class_words: Any = None) -> "Albef":
        """Build from a run config and a tokenizer exposing `mask_id`, `special_ids`, `vocab_size`.
        `class_words` (the object lexicon) is accepted for a uniform builder signature; ALBEF has no use for it."""
        return cls(model, cfg.method, mask_id=tokenizer.mask_id, special_ids=tokenizer.special_ids,
                   vocab_size=tokenizer.vocab_size)

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
        if region_feats is not None:
            raise ValueError("ALBEF encodes pixels (its ViT image tokens): it cannot take precomputed region features "
                             "(task.region_features); use a region-input method such as CMAL (method.name: cmal, or "
                             "a CMAL checkpoint) or drop task.region_features and give task.image_root")
        if images is None:
            raise ValueError("ALBEF.encode_pair needs images (B, 3, H, W)")
        image = self.model.encode_image(images)
        text = self.model.encode_text(input_ids, attention_mask)
        cls = self.model.fuse(text, attention_mask, image.tokens).cls
        if region_boxes is None:
            return PairOutput(cls)
        regions = region_features(image.grid, region_boxes[..., :4].float())
        mask = (torch.ones(regions.shape[:2], dtype=torch.bool, device=regions.device) if region_mask is None
                else region_mask.bool())
        return PairOutput(cls, regions, mask)

    @property
    def has_queue(self) -> bool:
        return self.model_m is not None and self.cfg.queue_size > 0

    # ------------------------------------------------------------------------------------ forward
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
                image_cols_m = all_gather_no_grad(image_emb_m)  # (G, E)
                text_cols_m = all_gather_no_grad(text_emb_m)
                if self.training and self.has_queue:
                    # ids made up for this batch only must not match later batches: store -1 (never positive)
                    queued_ids = ids_global if batch.image_ids is not None else torch.full_like(ids_global, -1)
                    self._pending.append((image_cols_m, text_cols_m, queued_ids))
                    while sum(f[0].shape[0] for f in self._pending[1:]) >= self.cfg.queue_size:
                        self._pending.pop(0)  # forwards without a step: only the newest K rows can survive
                if self.has_queue:
                    filled = int(self.queue_count)
                    queue_i, queue_t = self.image_queue[:filled], self.text_queue[:filled]
                    itc_kwargs.update(image_queue=queue_i, text_queue=queue_t, queue_ids=self.queue_ids[:filled])
                    image_cols_m = torch.cat([image_cols_m, queue_i], dim=0)
                    text_cols_m = torch.cat([text_cols_m, queue_t], dim=0)
                t = temp.detach()
                itc_kwargs.update(
                    soft_i2t=torch.softmax((image_emb_m @ text_cols_m.t()).float() / t, dim=1),
                    soft_t2i=torch.softmax((text_emb_m @ image_cols_m.t()).float() / t, dim=1),
                    alpha=alpha,
                )

        # ------------------------------------------------------------------------------------ ITC
        if weights.itc != 0:
            parts["itc"] = contrastive_loss(image_emb, text_emb, temp, image_ids, gather=True, **itc_kwargs)
        else:
            parts["itc"] = zero

        # ------------------------------------------------------------------------------------ ITM
        if weights.itm != 0:
            parts["itm"], parts["itm_acc"] = self._itm(
                batch, image_tokens, text_hidden, attn, image_emb, text_emb, temp, image_ids, ids_global)
        else:
            parts["itm"], parts["itm_acc"] = zero, zero.detach()

        # ------------------------------------------------------------------------------------ MLM
        if weights.mlm != 0:
            parts["mlm"], parts["mlm_acc"] = self._mlm(batch, image_tokens, image_tokens_m, alpha)
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
    ) -> tuple[Tensor, Tensor]:
        """ITM over B positives + 2B hard negatives drawn from the global batch; returns (loss, accuracy)."""
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
        text_hidden = _pad_length(text_hidden, length)
        attn = _pad_length(attn, length)
        image_tokens_all = all_gather_with_grad(image_tokens)
        text_hidden_all = all_gather_with_grad(text_hidden)
        attn_all = all_gather_no_grad(attn)

        fused = self.model.fuse(
            torch.cat([text_hidden, text_hidden, text_hidden_all[neg_text]]),
            torch.cat([attn, attn, attn_all[neg_text]]),
            torch.cat([image_tokens, image_tokens_all[neg_image], image_tokens]),
        )
        logits = self.model.itm_logits(fused.cls)  # (3B, 2)
        labels = torch.cat([torch.ones(size, dtype=torch.long, device=logits.device),
                            torch.zeros(2 * size, dtype=torch.long, device=logits.device)])
        accuracy = (logits.argmax(dim=1) == labels).float().mean()
        return itm_loss(logits, labels), accuracy

    def mask(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """The MLM input of `batch`: (masked_ids (B, T), labels (B, T), -100 = not predicted).

        Row b depends only on `batch.sample_keys[b]` when keys are set (else on torch's global RNG).
        """
        ids = batch.input_ids
        uniforms = self._uniforms(batch, (ids.shape[1], 3), SALT_MLM)
        return mask_tokens(ids, batch.attention_mask, self.special_ids, self.mask_id, self.vocab_size,
                           self.cfg.mlm_prob, uniforms=uniforms)

    def _mlm(
        self, batch: Batch, image_tokens: Tensor, image_tokens_m: Tensor | None, alpha: float
    ) -> tuple[Tensor, Tensor]:
        """Image-conditioned MLM (+ momentum soft targets); returns (loss, accuracy over masked tokens)."""
        attn = batch.attention_mask
        masked_ids, labels = self.mask(batch)
        selected = labels != -100
        fused = self.model.fuse(self.model.encode_text(masked_ids, attn), attn, image_tokens).text
        logits = self.model.mlm_logits(fused[selected])  # (M, V): only the masked positions
        targets = labels[selected]
        soft = None
        if image_tokens_m is not None and alpha > 0:
            with torch.no_grad():
                fused_m = self.model_m.fuse(self.model_m.encode_text(masked_ids, attn), attn, image_tokens_m).text
                soft = torch.softmax(self.model_m.mlm_logits(fused_m[selected]).float(), dim=-1)
        loss = mlm_loss(logits, targets, soft_targets=soft, alpha=alpha)
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
        online = list(self.model.parameters())
        ema = list(self.model_m.parameters())
        torch._foreach_lerp_(ema, online, 1.0 - self.cfg.momentum)  # ema += (1 - m) * (p - ema)
        for buf_m, buf in zip(self.model_m.buffers(), self.model.buffers()):
            buf_m.copy_(buf)
        if self._pending:
            image, text, ids = (torch.cat(parts) for parts in zip(*self._pending))
            self._pending.clear()
            self._enqueue(image, text, ids)

    @torch.no_grad()
    def reset_momentum(self) -> None:
        """Copy the online weights into the momentum model and empty the queue (call after loading new
        weights into `.model` alone, e.g. fine-tuning from a checkpoint; a full method state_dict already
        carries both)."""
        if self.model_m is None:
            return
        self.model_m.load_state_dict(self.model.state_dict())
        self._pending.clear()
        if self.has_queue:
            self.image_queue.zero_()
            self.text_queue.zero_()
            self.queue_ids.fill_(-1)
            self.queue_ptr.zero_()
            self.queue_count.zero_()

    @torch.no_grad()
    def _enqueue(self, image: Tensor, text: Tensor, ids: Tensor) -> None:
        """Write (n, E) features into the ring buffers at `queue_ptr` (the last K if n > K)."""
        capacity = self.cfg.queue_size
        if image.shape[0] > capacity:
            image, text, ids = image[-capacity:], text[-capacity:], ids[-capacity:]
        count = image.shape[0]
        slots = (self.queue_ptr + torch.arange(count, device=self.queue_ptr.device)) % capacity
        self.image_queue[slots] = image.to(self.image_queue.dtype)
        self.text_queue[slots] = text.to(self.text_queue.dtype)
        self.queue_ids[slots] = ids.to(self.queue_ids.dtype)
        self.queue_ptr.copy_((self.queue_ptr + count) % capacity)
        self.queue_count.copy_((self.queue_count + count).clamp(max=capacity))
