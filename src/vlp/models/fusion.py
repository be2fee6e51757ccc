"""Multimodal fusion encoders.

type 'cross'  — ALBEF (Li et al. 2021): the text hidden states go through `depth` post-LN BERT layers
                that add cross-attention from text queries to the image tokens (keys/values of the
                vision width). Only the text stream is updated; `image` in the output is None.
type 'single' — UNITER (Chen et al. 2020) / CMAL single stream: image tokens are projected to the text
                width (Linear + LN, UNITER's `img_linear` + `img_layer_norm`), a modality-type
                embedding is added to both streams, the image follows the text, and `depth` post-LN
                self-attention Blocks run over the joint sequence with the joint padding mask.

In both the fused [CLS] (text position 0) is the pair representation for ITM.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from vlp.config import FusionConfig
from vlp.models.layers import BERT_LN_EPS, Block, ImageKV


@dataclass
class FusionOutput:
    """text (B,T,D) fused text states; image (B,N,D) fused image states or None ('cross'); cls (B,D) = text[:, 0]."""

    text: Tensor
    image: Optional[Tensor]
    cls: Tensor


class FusionEncoder(nn.Module):
    """Fuses text hidden states (B,T,width) with image tokens (B,N,vision_width)."""

    def __init__(self, cfg: FusionConfig, width: int, vision_width: int) -> None:
        super().__init__()
        self.cfg, self.width, self.vision_width = cfg, width, vision_width
        cross_dim = vision_width if cfg.type == "cross" else None
        self.blocks = nn.ModuleList(
            Block(width, cfg.heads, cfg.mlp_ratio, cross_dim=cross_dim, norm="post", dropout=cfg.dropout)
            for _ in range(cfg.depth)
        )
        if cfg.type == "single":
            self.image_proj = nn.Linear(vision_width, width)
            self.image_norm = nn.LayerNorm(width, eps=BERT_LN_EPS)
            self.modality_embed = nn.Embedding(2, width)  # 0 = text, 1 = image

    def project_image(self, image_tokens: Tensor) -> Tensor:
        """'single' only: image_tokens (B,N,Dv) -> LN(Linear(x)) + image-type embedding, (B,N,D)."""
        return self.image_norm(self.image_proj(image_tokens)) + self.modality_embed.weight[1]

    def image_kv(self, image_tokens: Tensor, image_mask: Optional[Tensor] = None,
                 rows: Optional[Tensor] = None) -> ImageKV:
        """'cross' only: image_tokens (U,N,Dv) projected to every layer's keys/values once -> ImageKV whose pass
        rows are `rows` (B,) indices into the U images (default: each image once, in order)."""
        if self.cfg.type != "cross":
            raise ValueError("image_kv is for cross-attention fusion (model.fusion.type: cross); a single-stream "
                             "fusion updates the image tokens in every layer, so there is no fixed K/V to share")
        return ImageKV.project(self.blocks, image_tokens, image_mask, rows)

    def encode_joint(self, joint: Tensor, joint_mask: Optional[Tensor] = None) -> Tensor:
        """'single' only: the self-attention stack over an already assembled sequence (B,L,D), mask (B,L)."""
        for block in self.blocks:
            joint = block(joint, mask=joint_mask)
        return joint

    def forward(
        self,
        text: Tensor,
        attention_mask: Optional[Tensor],
        image_tokens: Tensor | ImageKV,
        image_mask: Optional[Tensor] = None,
    ) -> FusionOutput:
        """text (B,T,D), attention_mask (B,T) 1 = real token, image_tokens (B,N,Dv), image_mask (B,N) or None = all valid.

        'cross' also takes an `ImageKV` of B pass rows (its own mask; `image_mask` must be None)."""
        if isinstance(image_tokens, ImageKV):
            if self.cfg.type != "cross" or image_mask is not None:
                raise ValueError("an ImageKV is for cross-attention fusion and carries its own mask (image_mask=None)")
            rows, x = image_tokens.rows, text
            context_mask = None if image_tokens.mask is None else image_tokens.mask[rows]
            for block, kv in zip(self.blocks, image_tokens.kv):
                x = block(x, mask=attention_mask, context_kv=kv[rows], context_mask=context_mask)
            return FusionOutput(text=x, image=None, cls=x[:, 0])
        if image_tokens.shape[-1] != self.vision_width:
            raise ValueError(f"image tokens have width {image_tokens.shape[-1]}, fusion expects {self.vision_width}")
        if self.cfg.type == "cross":
            x = text
            for block in self.blocks:
                x = block(x, mask=attention_mask, context=image_tokens, context_mask=image_mask)
            return FusionOutput(text=x, image=None, cls=x[:, 0])
        B, T, _ = text.shape
        N = image_tokens.shape[1]
        joint = torch.cat([text + self.modality_embed.weight[0], self.project_image(image_tokens)], dim=1)
        joint_mask = None
        if attention_mask is not None or image_mask is not None:
            tm = torch.ones(B, T, dtype=torch.bool, device=text.device) if attention_mask is None else attention_mask.bool()
            im = torch.ones(B, N, dtype=torch.bool, device=text.device) if image_mask is None else image_mask.bool()
            joint_mask = torch.cat([tm, im], dim=1)
        out = self.encode_joint(joint, joint_mask)
        return FusionOutput(text=out[:, :T], image=out[:, T:], cls=out[:, 0])

    def flops(self, text_len: int, image_len: int) -> int:
        """Forward matmul FLOPs for one pair with text_len text tokens and image_len image tokens."""
        if self.cfg.type == "cross":
            return sum(block.flops(text_len, image_len) for block in self.blocks)
        project = 2 * image_len * self.vision_width * self.width
        return project + sum(block.flops(text_len + image_len) for block in self.blocks)
