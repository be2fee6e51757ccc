"""Vision Transformer image encoder (Dosovitskiy et al. 2021; layout of timm / ALBEF's `VisionTransformer`).

Conv patchify -> prepend CLS -> add learned position embeddings -> pre-LN Blocks -> final LayerNorm.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from vlp.config import VisionConfig
from vlp.models.layers import VIT_LN_EPS, Block


@dataclass
class ImageOutput:
    """What the image encoder returns.

    tokens: (B, 1+P, Dv) final-LN token states, CLS first, then the P = h*w patches row-major.
    grid:   (B, Dv, h, w) the patch tokens as a feature map (for RoIAlign / region features).
    """

    tokens: Tensor
    grid: Tensor

    @property
    def cls(self) -> Tensor:
        """(B, Dv) the CLS token."""
        return self.tokens[:, 0]


class VisionTransformer(nn.Module):
    """ViT over (B, 3, S, S) images with S = cfg.image_size, patches of cfg.patch_size."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        if cfg.image_size % cfg.patch_size != 0:
            raise ValueError(
                f"vision.image_size {cfg.image_size} is not divisible by vision.patch_size {cfg.patch_size}"
            )
        self.cfg = cfg
        self.grid_size = cfg.image_size // cfg.patch_size
        num_patches = self.grid_size**2
        self.patch_embed = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + num_patches, cfg.width))
        self.pos_drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(
            Block(cfg.width, cfg.heads, cfg.mlp_ratio, norm="pre", dropout=cfg.dropout) for _ in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(cfg.width, eps=VIT_LN_EPS)

    def forward(self, images: Tensor, patch_mask: Optional[Tensor] = None,
                mask_token: Optional[Tensor] = None) -> ImageOutput:
        """images (B, 3, S, S) -> ImageOutput(tokens (B, 1+P, Dv), grid (B, Dv, S/p, S/p)).

        Masked image modelling (BEiT; SIMLA, spec simla_vlmixer.md §1.2 (c)): with `patch_mask` (B, P) bool
        (True = masked, row-major) the embeddings of the masked patches are replaced by `mask_token`
        (1, 1, Dv) before the position embeddings are added (`x * (1 - w) + mask_token * w`). The mask token
        belongs to the method that masks (it is not a parameter of every ViT)."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
        H, W = images.shape[-2:]
        size, patch = self.cfg.image_size, self.cfg.patch_size
        if (H, W) != (size, size):
            not_div = f"; {H}x{W} is not even divisible by the patch size {patch}" if H % patch or W % patch else ""
            raise ValueError(
                f"expected {size}x{size} images (model.vision.image_size), got {H}x{W}{not_div}: "
                f"resize the images or set data.image_size and model.vision.image_size to match"
            )
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # (B, P, Dv)
        if patch_mask is not None:
            if mask_token is None or patch_mask.shape != x.shape[:2]:
                raise ValueError(f"patch_mask must be (B, P) = {tuple(x.shape[:2])} and come with a mask_token, "
                                 f"got {tuple(patch_mask.shape)}")
            w = patch_mask.unsqueeze(-1).to(x.dtype)
            x = x * (1 - w) + mask_token.to(x.dtype) * w
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.pos_drop(x)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        B, D, g = x.shape[0], x.shape[2], self.grid_size
        grid = x[:, 1:].transpose(1, 2).reshape(B, D, g, g)
        return ImageOutput(tokens=x, grid=grid)

    @property
    def num_tokens(self) -> int:
        """1 + P."""
        return 1 + self.grid_size**2

    def flops(self) -> int:
        """Forward matmul FLOPs for one image."""
        P, D, p = self.grid_size**2, self.cfg.width, self.cfg.patch_size
        patchify = 2 * P * (3 * p * p) * D
        return patchify + sum(block.flops(self.num_tokens) for block in self.blocks)
