"""CLIP-style contrastive pre-training: a dual encoder trained with ITC alone (the CMCL family).

Radford et al., "Learning Transferable Visual Models From Natural Language Supervision", ICML 2021;
conventions of open_clip (`open_clip/loss.py::ClipLoss`, `model.py::CLIP`). It is the contrastive baseline
the data-efficiency claims of CMAL, SIMLA and VLMixer are measured against: no fusion encoder, no ITM,
no MLM, only the symmetric InfoNCE between the ViT's and the text encoder's [CLS] projections.

Where we follow open_clip:
  * Learnable logit scale s = exp(logit_scale), initialised to 1/0.07 and clamped to at most 100
    (open_clip clamps `logit_scale.exp()` in the loss' caller: `logit_scale.exp().clamp(max=100)`;
    here the parameter itself is clamped after each step as well, like `model.logit_scale.clamp_(0, ln 100)`
    in open_clip's training loop).
  * `local_loss=True, gather_with_grad=True` semantics: each rank scores its own rows against the
    features of every rank, gathered with gradient, and the loss is the mean of the image→text and
    text→image cross-entropies (`vlp.models.losses.contrastive_loss` with `gather=True`), so the result
    does not depend on how the global batch is split over ranks.
  * Embeddings are L2-normalised linear projections of the [CLS] states (ALBEF/CLIP's `vision_proj` /
    `text_proj` of the shared `VLModel`).

Where we deviate:
  * With `batch.image_ids`, captions of the same image are positives of each other (the target is spread
    over them), as everywhere in vlp; open_clip treats only the diagonal as positive, which makes a
    second caption of the same image in the batch a negative.
  * The shared `VLModel`'s fusion encoder, ITM head, MLM head and ALBEF temperature are frozen
    (`requires_grad=False`): a dual encoder has none of them. CLIP configs give the fusion depth 0.

Downstream, a dual encoder has no cross-modal [CLS]: `encode_pair` returns the InferSent-style pair
vector [text [CLS] ; image [CLS] ; t ⊙ v] (t, v the unit ITC embeddings) for the task heads (an MLP),
and RoIAlign features of the ViT grid at the given boxes for REC, as the ALBEF-style baseline does.
Retrieval ranks by ITC only.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any, Literal, Optional

import torch
from pydantic import Field
from torch import Tensor, nn

from vlp.config import MethodConfig, RunConfig
from vlp.methods.base import PretrainMethod
from vlp.models.losses import all_gather_no_grad, contrastive_loss, rank
from vlp.models.model import VLModel
from vlp.models.roi import box_regions
from vlp.types import Batch, PairOutput


class ClipConfig(MethodConfig):
    """The `method:` section of the contrastive baseline (`name: clip`)."""

    name: Literal["clip"] = "clip"
    init_temperature: float = Field(0.07, gt=0)  # logit scale starts at 1 / 0.07 (open_clip)
    max_logit_scale: float = Field(100.0, gt=0)  # open_clip's clamp of exp(logit_scale)


class Clip(PretrainMethod):
    """ITC-only dual-encoder pre-training around a `VLModel` (module docstring: conventions and choices).

    Own state: `logit_scale` (0-d parameter, log of the scale). The ITC parts of `.model` (ViT, text
    encoder, `vision_proj`, `text_proj`) train; its fusion, ITM / MLM heads and `temp` are frozen.
    """

    name = "clip"
    config_class = ClipConfig
    inputs = frozenset({"images", "image_ids"})
    retrieval_protocols = ("itc",)
    retrieval_finetune_overrides = ()  # fine-tuning keeps the one objective it has
    demo_config = "demo_clip"
    in_demo_by_default = False  # `vlp demo --methods albef cmal clip`: the default demo stays within 10 minutes
    rank_independent_parts = ("itc", "loss", "logit_scale", "itc_acc")

    FROZEN = ("fusion.", "itm_head.", "mlm_head.", "temp")  # parts of the shared VLModel a dual encoder lacks

    def __init__(self, model: VLModel, cfg: ClipConfig) -> None:
        super().__init__()
        if not 0.0 < cfg.init_temperature <= 1.0:
            raise ValueError(f"method.init_temperature must be in (0, 1], got {cfg.init_temperature}")
        if cfg.max_logit_scale < 1.0 / cfg.init_temperature:
            raise ValueError(f"method.max_logit_scale={cfg.max_logit_scale} is below the initial scale "
                             f"1 / init_temperature = {1.0 / cfg.init_temperature:g}")
        self.model = model
        self.cfg = cfg
        for name, param in model.named_parameters():  # the tied MLM decoder is listed once, under text.
            if name.startswith(self.FROZEN):
                param.requires_grad_(False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg.init_temperature)))

    @classmethod
    def from_config(cls, cfg: RunConfig, model: nn.Module, tokenizer: Any,
                    class_words: Optional[Sequence[Iterable[str]]] = None) -> "Clip":
        """Build around `model`; the tokenizer and class words are not needed (no masking, no anchors)."""
        return cls(model, cfg.method)

    # ------------------------------------------------------------------------------ training
    def scale(self) -> Tensor:
        """exp(logit_scale) clamped to `max_logit_scale` (differentiable below the clamp)."""
        return self.logit_scale.exp().clamp(max=self.cfg.max_logit_scale)

    def embed(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(image tokens (B,1+P,Dv), text states (B,T,D), unit image embedding v (B,E), unit text embedding t (B,E))."""
        image_tokens = self.model.encode_image(images).tokens
        text_hidden = self.model.encode_text(input_ids, attention_mask)
        return image_tokens, text_hidden, self.model.image_embed(image_tokens), self.model.text_embed(text_hidden)

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        """`loss` = ITC = ½ (CE(s · V Tᵀ) + CE(s · T Vᵀ)) against the global batch; parts `itc`,
        `logit_scale` (the clamped s) and `itc_acc` (share of this rank's image→text argmax on a positive)."""
        if batch.images is None:
            raise ValueError("CLIP needs images in the batch (batch.images is None)")
        _, _, image_emb, text_emb = self.embed(batch.images, batch.input_ids, batch.attention_mask)
        scale = self.scale()
        loss = contrastive_loss(image_emb, text_emb, 1.0 / scale, batch.image_ids, gather=True)
        with torch.no_grad():  # image -> text top-1 over the global batch's texts
            best = (image_emb @ all_gather_no_grad(text_emb).t()).argmax(dim=1)
            if batch.image_ids is not None:
                hit = all_gather_no_grad(batch.image_ids)[best] == batch.image_ids
            else:
                hit = best == torch.arange(len(batch), device=best.device) + rank() * len(batch)
        return {"loss": loss, "itc": loss.detach(), "logit_scale": scale.detach(), "itc_acc": hit.float().mean()}

    @torch.no_grad()
    def on_step_end(self) -> None:
        """Clamp the logit scale into [0, ln max_logit_scale] (open_clip's training loop)."""
        self.logit_scale.clamp_(0.0, math.log(self.cfg.max_logit_scale))

    # ------------------------------------------------------------------------------ downstream
    @property
    def pair_dims(self) -> tuple[int, int]:
        """(D, Dr): D = text width + ViT width + E of the pair vector, Dr = the ViT width."""
        mcfg = self.model.cfg
        return int(mcfg.text.width + mcfg.vision.width + mcfg.embed_dim), int(mcfg.vision.width)

    def encode_pair(self, images: Optional[Tensor], input_ids: Tensor, attention_mask: Tensor,
                    region_boxes: Optional[Tensor] = None, region_mask: Optional[Tensor] = None,
                    region_feats: Optional[Tensor] = None) -> PairOutput:
        """cls = [text [CLS] (B,D_t) ; image [CLS] (B,D_v) ; t ⊙ v (B,E)] (no cross-modal fusion in a dual
        encoder); with boxes (B,N,4|7), RoIAlign features (B,N,D_v) of the ViT grid at them (REC).
        Precomputed region features are refused (the dual encoder encodes pixels)."""
        images = self.require_pixels(images, region_feats)
        image = self.model.encode_image(images)
        text_hidden = self.model.encode_text(input_ids, attention_mask)
        image_emb, text_emb = self.model.image_embed(image.tokens), self.model.text_embed(text_hidden)
        cls = torch.cat([text_hidden[:, 0], image.tokens[:, 0], text_emb * image_emb], dim=-1)
        if region_boxes is None:
            return PairOutput(cls)
        return PairOutput(cls, *box_regions(image.grid, region_boxes, region_mask))


__all__ = ["Clip", "ClipConfig"]
