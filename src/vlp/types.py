"""The few types every layer agrees on (architecture spec, "The few types everything agrees on").

`Batch` is the one container handed from data collation to methods, tasks and the trainer.
Fields that a source cannot provide stay `None`; collation pads variable-length fields and
records masks, so a consumer never has to guess lengths.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Optional

import torch
from torch import Tensor


@dataclass
class Batch:
    """One collated mini-batch.

    Shapes (B = batch, T = tokens, N = regions):
      images          (B, 3, H, W) float, normalised (see `vlp.data.transforms`)
      input_ids       (B, T) long, `[CLS] ... [SEP] [PAD]...`
      attention_mask  (B, T) long/bool, 1 = real token
      image_ids       (B,) long, the image index of each row: rows with the same id are positives
                      of each other in contrastive losses (several captions of one image).
      region_boxes    (B, N, 4) normalised x1, y1, x2, y2 (or (B, N, 7) with w, h, w*h)
      region_labels   (B, N) long, class id + 1 (0 = background / unknown / padding)
      region_mask     (B, N) bool, True = a real region
      region_feats    (B, N, D) float, precomputed detector features (instead of / besides images)
      labels          (B,) task label (VE class, NLVR2 truth, ...)
      answers         (B, A) float soft VQA targets
      target_boxes    (B, 4) REC target
      pair_index      (B,) long, NLVR2: which pair a row belongs to
      neg_input_ids / neg_attention_mask (B, T): attribute-swapped hard-negative captions
      sample_keys     (B,) long, unique per (seed, epoch, dataset row); set by the trainer. Methods
                      seed per-sample randomness (masking, negative sampling) from it
                      (`vlp.models.rng.keyed_uniform`), so a result does not depend on how a global
                      batch is split over ranks or accumulation micro-batches, and resume is exact.
      skipped         tuple of `vlp.data.skips.BadSample`: the items of this batch that could not be decoded
                      and were dropped (`--skip-bad`, `SkippingCollate`); () when none. A batch whose every
                      item was bad has 0 rows. `slice` gives them to the slice starting at row 0 only, so
                      micro-batches never count them twice.
    """

    input_ids: Tensor
    attention_mask: Tensor
    images: Optional[Tensor] = None
    image_ids: Optional[Tensor] = None
    region_boxes: Optional[Tensor] = None
    region_labels: Optional[Tensor] = None
    region_mask: Optional[Tensor] = None
    region_feats: Optional[Tensor] = None
    labels: Optional[Tensor] = None
    answers: Optional[Tensor] = None
    target_boxes: Optional[Tensor] = None
    pair_index: Optional[Tensor] = None
    neg_input_ids: Optional[Tensor] = None
    neg_attention_mask: Optional[Tensor] = None
    sample_keys: Optional[Tensor] = None
    skipped: tuple[Any, ...] = ()  # vlp.data.skips.BadSample items

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        """Move every tensor field to `device` (floats keep their dtype; AMP casts inside the model)."""
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            moved[f.name] = value.to(device, non_blocking=non_blocking) if isinstance(value, Tensor) else value
        return replace(self, **moved)

    def pin_memory(self) -> "Batch":
        """Every tensor field in page-locked host memory (the DataLoader's `pin_memory=True` calls this on a CUDA
        run): the trainer's `to(device, non_blocking=True)` then copies asynchronously."""
        pinned = {}
        for f in fields(self):
            value = getattr(self, f.name)
            pinned[f.name] = value.pin_memory() if isinstance(value, Tensor) else value
        return replace(self, **pinned)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def slice(self, start: int, stop: int) -> "Batch":
        """Rows [start, stop) of every tensor field (used for gradient-accumulation micro-batches)."""
        sliced = {}
        for f in fields(self):
            value = getattr(self, f.name)
            sliced[f.name] = value[start:stop] if isinstance(value, Tensor) else value
        sliced["skipped"] = self.skipped if start == 0 else ()  # counted once over a partition into slices
        return replace(self, **sliced)


@dataclass
class PairOutput:
    """What a pre-trained method hands a downstream head for a batch of (image, text) pairs
    (`method.encode_pair`, docs/contracts.md "Downstream").

      cls          (B, D) the fused [CLS] state of each pair (classification heads: VE, VQA, NLVR2, ITM)
      regions      (B, N, Dr) one vector per given region box (REC candidate scoring), None when no boxes
                   were given. Fusion models (ALBEF) return RoIAlign features of the image grid (not
                   text-conditioned; the REC head conditions them on `cls`); single-stream models (CMAL)
                   return the unified encoder's outputs at the region slots (text-conditioned, UNITER).
      region_mask  (B, N) bool, True = a real region (None when `regions` is None)
    """

    cls: Tensor
    regions: Optional[Tensor] = None
    region_mask: Optional[Tensor] = None

