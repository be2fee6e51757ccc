"""Region inputs of object-level methods: features, 7-d boxes, labels and mask of up to N regions per image.

UNITER-style single-stream models (CMAL; VLMixer's visual tokens) read an image as a set of regions.
`RegionInputBuilder` makes them in the three ways the library supports (CMAL spec `cmal.md` §3.1, §11.1):

* `from_features`: precomputed detector features (BUTD / UNITER dumps) used as is, no RoIAlign, as the
  UNITER / CMAL reference code does;
* `from_boxes`: RoIAlign of the boxes on an image grid: the ViT patch grid (§11.1: "pool the image
  encoder's features at the boxes"; 2 x 2 bins averaged) or the pixels (s x s bins flattened);
* `cell_boxes` + `from_boxes`: a g x g grid of cells as the boxes of images that have none (§11.1 "fixed
  grid cells"), labels 0.

Both ways keep the first `max_regions` regions (detector dumps are sorted by confidence) and, with
`whole_image_region`, put a [0, 0, 1, 1] region with label 0 first (our addition). Boxes are normalised
x1, y1, x2, y2 in [0, 1]; inputs carry the 7-d UNITER box [x1, y1, x2, y2, w, h, w*h] (`boxes_to_7d`).
Labels follow `vlp.types.Batch`: class id + 1, 0 = background / unknown / padding.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor

from vlp.models.roi import region_features, roi_align


def boxes_to_7d(boxes: Tensor) -> Tensor:
    """(..., 4) normalised [x1, y1, x2, y2] -> (..., 7) [x1, y1, x2, y2, w, h, w*h] (cmal.md §3.1).

    (..., 7) input is returned unchanged.
    """
    if boxes.shape[-1] == 7:
        return boxes
    if boxes.shape[-1] != 4:
        raise ValueError(f"boxes must have 4 (x1, y1, x2, y2) or 7 columns, got {tuple(boxes.shape)}")
    x1, y1, x2, y2 = boxes.unbind(-1)
    w, h = x2 - x1, y2 - y1
    return torch.stack([x1, y1, x2, y2, w, h, w * h], dim=-1)


def grid_cell_boxes(g: int, device: torch.device | str | None = None) -> Tensor:
    """(g*g, 4) normalised x1, y1, x2, y2 boxes of a g x g grid of cells, row-major from the top-left.

    cmal.md §11.1: "for user data without boxes: fixed grid cells as regions". Cell (r, c) is row r*g + c
    with box [c/g, r/g, (c+1)/g, (r+1)/g]; the cells tile [0, 1]^2 exactly.
    """
    if g < 1:
        raise ValueError(f"a grid of cells needs g >= 1, got {g}")
    edges = torch.linspace(0.0, 1.0, g + 1, device=device)
    y1, x1 = torch.meshgrid(edges[:-1], edges[:-1], indexing="ij")
    y2, x2 = torch.meshgrid(edges[1:], edges[1:], indexing="ij")
    return torch.stack([x1, y1, x2, y2], dim=-1).reshape(g * g, 4)


@dataclass
class RegionInputs:
    """Region inputs of a batch: feats (B,N,Dv), boxes (B,N,7), labels (B,N) long, mask (B,N) bool."""

    feats: Tensor
    boxes: Tensor
    labels: Tensor
    mask: Tensor


GridSource = Union[Tensor, Callable[[], Tensor]]


@dataclass(frozen=True)
class RegionInputBuilder:
    """Makes `RegionInputs` from boxes on an image grid or from precomputed features (module docstring).

    Args:
        max_regions: regions kept per image (the first ones), >= 1.
        whole_image_region: put a [0,0,1,1] region with label 0 first.
        grid_regions: g of the g x g cells used for images without boxes (`cell_boxes`), >= 1.
        feat_dim: Dv, the region feature width the consumer (e.g. a region embedding) takes.
        grid_width: channels C of the image grid that `from_boxes` pools (the ViT width, or 3 for pixels).
        owner: the name error messages give the consumer (e.g. "CMAL").
        pool_size: 0 = RoIAlign with 2 x 2 bins averaged, a (C,) feature per box (ViT grids); s > 0 = s x s
            bins flattened, a (C*s*s,) feature per box (pixels: a learnt patch embedding of the box).
            `feat_dim` must equal C (pool 0) or C*s*s.
    """

    max_regions: int
    whole_image_region: bool
    grid_regions: int
    feat_dim: int
    grid_width: int
    owner: str = "the method"
    pool_size: int = 0

    def __post_init__(self) -> None:
        if self.max_regions < 1 or self.grid_regions < 1 or self.pool_size < 0:
            raise ValueError(f"RegionInputBuilder needs max_regions >= 1, grid_regions >= 1 and pool_size >= 0, "
                             f"got {self.max_regions}, {self.grid_regions} and {self.pool_size}")

    @property
    def pooled_dim(self) -> int:
        """The width of `from_boxes` features: C (pool 0) or C*s*s."""
        return self.grid_width * (self.pool_size ** 2 if self.pool_size else 1)

    # ------------------------------------------------------------------------------ layout
    def layout(self, boxes: Tensor, labels: Optional[Tensor], mask: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """The first `max_regions` regions: boxes (B,n,4|7) float, labels (B,n) long (None -> 0), mask (B,n)."""
        n = self.max_regions
        boxes = boxes[:, :n].float()
        labels = (torch.zeros(boxes.shape[:2], dtype=torch.long, device=boxes.device) if labels is None
                  else labels[:, :n].long())
        mask = torch.ones_like(labels, dtype=torch.bool) if mask is None else mask[:, :n].bool()
        return boxes, labels, mask

    @staticmethod
    def prepend_whole(boxes: Tensor, labels: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """A [0,0,1,1] (+ w, h, wh) region with label 0 in front: boxes (B,n+1,4|7), labels, mask (B,n+1)."""
        B = boxes.shape[0]
        whole = boxes.new_tensor([0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0][: boxes.shape[-1]])  # xyxy (+ w, h, wh)
        return (torch.cat([whole.expand(B, 1, -1), boxes], dim=1), torch.cat([labels.new_zeros(B, 1), labels], dim=1),
                torch.cat([mask.new_ones(B, 1), mask], dim=1))

    def cell_boxes(self, batch_size: int, device: torch.device | str | None = None) -> Tensor:
        """(B, g*g, 4) `grid_cell_boxes(grid_regions)` for every image of a batch (a broadcast view)."""
        return grid_cell_boxes(self.grid_regions, device=device).expand(batch_size, -1, -1)

    # ------------------------------------------------------------------------------ inputs
    def from_boxes(self, grid: GridSource, boxes: Tensor, labels: Optional[Tensor] = None,
                   mask: Optional[Tensor] = None) -> RegionInputs:
        """RoIAlign features of the boxes on an image grid (cmal.md §11.1): pooled per `pool_size`.

        Args:
            grid: the image grid (B, C, h, w) (e.g. `VLModel.encode_image(images).grid`, or the pixels), or a function
                returning it, called after the inputs are checked (a misconfigured call fails before the
                image encoder runs).
            boxes: (B, N, 4 | 7) normalised x1, y1, x2, y2 [, w, h, w*h].
            labels: (B, N) long class id + 1, or None (all 0).
            mask: (B, N) bool real regions, or None (all real).

        Returns:
            RegionInputs with N' = min(N, max_regions) (+1 with `whole_image_region`) regions; labels of
            padded regions are 0.
        """
        if self.feat_dim != self.pooled_dim:
            raise ValueError(
                f"method.region_feat_dim={self.feat_dim}, but these regions are RoI-pooled from the images "
                f"(features of width {self.pooled_dim}): set method.region_feat_dim: 0 for image inputs, or feed "
                f"precomputed batch.region_feats of dim {self.feat_dim}"
            )
        boxes, labels, mask = self.layout(boxes, labels, mask)
        if self.whole_image_region:
            boxes, labels, mask = self.prepend_whole(boxes, labels, mask)
        labels = torch.where(mask, labels, torch.zeros_like(labels))
        grid = grid() if callable(grid) else grid
        if grid.dim() != 4 or grid.shape[1] != self.grid_width:
            raise ValueError(f"the image grid must be (B, {self.grid_width}, h, w), got {tuple(grid.shape)}")
        if self.pool_size:
            feats = roi_align(grid, boxes[..., :4], self.pool_size).flatten(2)
        else:
            feats = region_features(grid, boxes[..., :4])
        return RegionInputs(feats, boxes_to_7d(boxes), labels, mask)

    def from_features(self, feats: Tensor, boxes: Tensor, labels: Optional[Tensor] = None,
                      mask: Optional[Tensor] = None) -> RegionInputs:
        """Precomputed detector features (cmal.md §3.1, UNITER's BUTD inputs) used as is, no RoIAlign.

        Args:
            feats: (B, N, Dv) float, Dv = `feat_dim` (ValueError naming method.region_feat_dim otherwise).
            boxes: (B, N, 4 | 7) normalised x1, y1, x2, y2 [, w, h, w*h].
            labels: (B, N) long class id + 1, or None (all 0: no anchors).
            mask: (B, N) bool real regions, or None (all real).

        Returns:
            RegionInputs with the first `max_regions` regions; with `whole_image_region` a [0,0,1,1] region
            (label 0) first whose feature is the mean of the sample's real region features (our addition).
        """
        dim = int(feats.shape[-1])
        if dim != self.feat_dim:
            raise ValueError(
                f"batch.region_feats have dim {dim} but {self.owner}'s region embedding takes {self.feat_dim} "
                f"(method.region_feat_dim; 0 = the ViT width): set method.region_feat_dim: {dim}"
            )
        if feats.shape[:2] != boxes.shape[:2]:
            raise ValueError(f"region_feats {tuple(feats.shape)} and region_boxes {tuple(boxes.shape)} "
                             f"must share (B, N)")
        boxes, labels, mask = self.layout(boxes, labels, mask)
        feats = feats[:, : self.max_regions].float()
        if self.whole_image_region:
            weight = mask.to(feats.dtype)[:, :, None]
            mean = (feats * weight).sum(dim=1, keepdim=True) / weight.sum(dim=1, keepdim=True).clamp_min(1.0)
            feats = torch.cat([mean, feats], dim=1)
            boxes, labels, mask = self.prepend_whole(boxes, labels, mask)
        labels = torch.where(mask, labels, torch.zeros_like(labels))
        return RegionInputs(feats, boxes_to_7d(boxes), labels, mask)


__all__ = ["RegionInputBuilder", "RegionInputs", "boxes_to_7d", "grid_cell_boxes"]
