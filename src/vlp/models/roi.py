"""RoIAlign over a feature grid with `F.grid_sample` (He et al. 2017; torchvision `roi_align(aligned=True)`).

Boxes are normalised xyxy in [0, 1] of the image, so they are resolution-free. With the half-pixel
alignment of torchvision's `aligned=True` a normalised coordinate X sits at feature-map coordinate
X*w - 0.5 (pixel centres at integers), which is exactly `grid_sample`'s `align_corners=False`
convention for the normalised coordinate 2X - 1. Each of the s x s bins is sampled at
sampling_ratio x sampling_ratio regularly spaced points (the centres of a sub-grid of the bin),
bilinearly interpolated and averaged. Points within half a cell of the border are clamped to the
edge value (`padding_mode='border'`), as torchvision clamps them.

Differences from torchvision: `sampling_ratio` is fixed (torchvision's default -1 adapts it to the box
size), and points more than one cell outside the map read the edge value instead of 0 — only boxes
outside [0, 1] reach them.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def roi_align(grid: Tensor, boxes: Tensor, output_size: int = 2, sampling_ratio: int = 2) -> Tensor:
    """grid (B,C,h,w), boxes (B,N,4) normalised x1,y1,x2,y2 -> pooled features (B,N,C,s,s), s = output_size.

    Boxes with more than 4 columns (e.g. the 7-d [x1,y1,x2,y2,w,h,wh] of `Batch.region_boxes`) use the first 4.
    """
    if grid.dim() != 4 or boxes.dim() != 3 or boxes.shape[0] != grid.shape[0] or boxes.shape[-1] < 4:
        raise ValueError(f"expected grid (B,C,h,w) and boxes (B,N,4); got {tuple(grid.shape)} and {tuple(boxes.shape)}")
    B, C = grid.shape[:2]
    N, s, r = boxes.shape[1], output_size, sampling_ratio
    if N == 0:
        return grid.new_zeros(B, 0, C, s, s)
    boxes = boxes[..., :4].to(grid.dtype)
    # Offsets of the s*r sample points inside a box, as fractions of its side: bin i, sub-point j at (i + (j+0.5)/r) / s.
    steps = (torch.arange(s * r, device=grid.device, dtype=grid.dtype) + 0.5) / (s * r)
    x1, y1, x2, y2 = boxes.unbind(-1)  # each (B,N)
    xs = x1[..., None] + (x2 - x1)[..., None] * steps  # (B,N,s*r) normalised [0,1]
    ys = y1[..., None] + (y2 - y1)[..., None] * steps
    sr = s * r
    gx = xs[:, :, None, :].expand(B, N, sr, sr)  # varies along the last (x) axis
    gy = ys[:, :, :, None].expand(B, N, sr, sr)  # varies along rows (y)
    sample_grid = torch.stack([gx, gy], dim=-1).mul(2).sub(1).reshape(B, N * sr, sr, 2)
    samples = F.grid_sample(grid, sample_grid, mode="bilinear", padding_mode="border", align_corners=False)
    # (B,C,N*sr,sr) -> (B,C,N,s,r,s,r): average the r x r points of each bin.
    pooled = samples.view(B, C, N, s, r, s, r).mean(dim=(4, 6))
    return pooled.permute(0, 2, 1, 3, 4)


def region_features(grid: Tensor, boxes: Tensor, output_size: int = 2, sampling_ratio: int = 2) -> Tensor:
    """grid (B,C,h,w), boxes (B,N,4) normalised xyxy -> (B,N,C): RoIAlign then mean over the s x s bins."""
    return roi_align(grid, boxes, output_size, sampling_ratio).mean(dim=(-2, -1))


def box_regions(grid: Tensor, boxes: Tensor, mask: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Region vectors of an image grid at given boxes, for a downstream head (e.g. REC candidates of the
    fusion / dual-encoder baselines): grid (B,C,h,w), boxes (B,N,4|7) normalised (xyxy first) ->
    (features (B,N,C), mask (B,N) bool: `mask`, or all True)."""
    feats = region_features(grid, boxes[..., :4].float())
    real = torch.ones(feats.shape[:2], dtype=torch.bool, device=feats.device) if mask is None else mask.bool()
    return feats, real
