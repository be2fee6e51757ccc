"""Referring expression comprehension (RefCOCO / RefCOCO+ / RefCOCOg): which region does the expression name?

Input: the image, the expression, and a set of candidate regions. Three settings (`RECDataset(boxes=...)`),
the first two as RefCOCO papers report them:
  * "gt": the candidates are the ground-truth boxes of all objects of the image (`RefRecord.candidates`)
    and the target is `RefRecord.target_index` (exactly one positive);
  * "proposals" ("detected"): the candidates are detector boxes (`RefRecord.proposals`); none of them is
    the target box itself, so every proposal with IoU >= 0.5 with the target is a positive
    (multi-positive target; a row with no such proposal has no target and is left out of the loss).
  * "features": precomputed region features instead of pixels (`task.region_features`, image source
    `vlp.data.regions.RegionFeatureSource`): the candidates are the feature file's regions of the image,
    each with its own detector feature (UNITER runs REC on the BUTD regions it has features for, cmal.md
    §3.1, §9). It is the "proposals" setting on those boxes: positives = regions with IoU >= 0.5 with
    the target box (label -1, `region_targets`), prediction = the best region, correct when ITS box has
    IoU >= 0.5 with the target. `vlp.finetune` reports it as `feat_acc` (`<split>/feat_acc`,
    `feat_acc_<group>`), not `det_acc`: `det_` is the records' own proposals scored on pixels, and the
    two need not be the same detector's boxes. Nothing else is reported with features (no pixels to
    pool ground-truth candidates from). Its ceiling is the share of expressions whose target some
    feature region overlaps at IoU >= 0.5 (`no_target` in training logs the rest).
UNITER trains on GT boxes and evaluates on detected ones (cmal.md §9, "REC"); all work here.

Head (UNITER-style supervised region scoring, cmal.md §9): each region vector r (B, N, Dr) from
`PairOutput.regions` is projected to the text width, r' = Linear(Dr -> D)(r), and scored together with
the pair's fused [CLS] c (B, D): score = MLP([r'; c; r' * c]) -> 1, the MLP being UNITER's `mlp 2`
(Linear -> GELU -> LayerNorm -> Linear, here `ClassifierHead(3D, 1, hidden=D)`). Conditioning on c is
what makes one head serve both kinds of backbone:
  * ALBEF (`Albef.encode_pair`) returns RoIAlign features of the ViT grid: they do not depend on the
    expression, so the expression reaches the score only through c (and r' * c);
  * CMAL / UNITER (single-stream) return the unified encoder's outputs at the region slots, already
    text-conditioned; c then adds the pair-level summary.
ALBEF itself grounds expressions without any trained head (weakly supervised: Grad-CAM of its ITM
cross-attention mass inside each detected box, anchors.md §2 "Other metrics"); this module is our
supervised head instead, trained with box supervision as UNITER does, so backbones are compared on
one protocol.

Loss: softmax cross-entropy over the valid candidates of each row (padding regions masked to -inf);
with several positives, -log of the summed softmax mass of the positives. Prediction: the arg-max
region. Metric (`rec_metrics`): accuracy (%) = share of expressions whose predicted box has IoU >= 0.5
with the target box, overall and per `RefRecord.group` (RefCOCO testA / testB). Boxes are normalised
continuous xyxy, so IoU uses no "+1 pixel" term: RefCOCO's `computeIoU` adds 1 to widths because its
boxes are inclusive integer pixel boxes (anchors.md §2), which does not apply to normalised boxes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, Optional

import torch
from torch import Tensor, nn

from vlp.data.records import Box, ImageSource, RefRecord
from vlp.tasks.common import ClassifierHead, RecordDataset, TaskModule, accuracy
from vlp.types import Batch, PairOutput

REC_IOU = 0.5
"""IoU threshold of a correct grounding (RefCOCO protocol) and of a positive proposal (detected setting)."""

BoxSetting = Literal["gt", "proposals", "features"]


def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise IoU of boxes a (..., N, 4) and b (..., M, 4), normalised continuous xyxy -> (..., N, M).

    Leading dimensions broadcast, so `box_iou(boxes (B,N,4), target[:, None] (B,1,4))` gives (B, N, 1).
    No "+1 pixel" term (module docstring). Two boxes whose union has zero area have IoU 0.
    """
    if a.shape[-1] < 4 or b.shape[-1] < 4:
        raise ValueError(f"box_iou expects boxes (..., 4); got {tuple(a.shape)} and {tuple(b.shape)}")
    a = a[..., :4].float()
    b = b[..., :4].float()
    lt = torch.maximum(a[..., :, None, :2], b[..., None, :, :2])  # (..., N, M, 2)
    rb = torch.minimum(a[..., :, None, 2:], b[..., None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=-1)
    area_a = (a[..., 2] - a[..., 0]).clamp(min=0) * (a[..., 3] - a[..., 1]).clamp(min=0)  # (..., N)
    area_b = (b[..., 2] - b[..., 0]).clamp(min=0) * (b[..., 3] - b[..., 1]).clamp(min=0)  # (..., M)
    union = area_a[..., :, None] + area_b[..., None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=torch.finfo(union.dtype).tiny), torch.zeros_like(union))


def region_targets(labels: Tensor, region_boxes: Tensor, region_mask: Tensor, target_boxes: Tensor,
                   threshold: float = REC_IOU) -> Tensor:
    """The positive regions of each row -> (B, N) bool.

    labels (B,): the target's region index in the "gt" setting, -1 in the "proposals" setting;
    region_boxes (B, N, 4|7), region_mask (B, N) bool, target_boxes (B, 4).
    A row with label k >= 0 has exactly region k positive; a row with label -1 has every valid region
    with IoU >= `threshold` with its target box positive (possibly none). The dataset and the loss both
    call this, so an item's "region_targets" and what the loss trains on cannot disagree.
    """
    num = region_boxes.shape[1]
    if bool((labels >= num).any()):
        raise ValueError(f"REC target index {int(labels.max())} outside the batch's {num} regions")
    one_hot = torch.arange(num, device=labels.device)[None, :] == labels[:, None]
    by_iou = box_iou(region_boxes, target_boxes[:, None, :]).squeeze(-1) >= threshold  # (B, N)
    return torch.where(labels[:, None] >= 0, one_hot, by_iou) & region_mask.bool()


def rec_loss(scores: Tensor, positives: Tensor) -> tuple[Tensor, Tensor]:
    """Multi-positive softmax cross-entropy over regions.

    scores (B, N) with padding already at -inf; positives (B, N) bool. Per row:
    logsumexp(scores) - logsumexp(scores[positives]) = -log(sum of the softmax over the positives), i.e.
    plain cross-entropy when there is one positive. Rows without a positive (a detected setting in which
    no proposal overlaps the target enough) contribute nothing. Returns (mean loss over rows with a
    positive (0 with a gradient path when there are none), has_positive (B,) bool).
    """
    scores = scores.float()
    has_pos = positives.any(dim=1)
    # A row without positives uses all its valid regions as "positives": its term is exactly 0 with a
    # zero gradient, and no logsumexp over an all -inf row (whose backward would be NaN) is formed.
    pos = torch.where(has_pos[:, None], positives, torch.isfinite(scores))
    terms = torch.logsumexp(scores, dim=1) - torch.logsumexp(scores.masked_fill(~pos, float("-inf")), dim=1)
    loss = (terms * has_pos).sum() / has_pos.sum().clamp(min=1)
    return loss, has_pos


class RECDataset(RecordDataset):
    """`RefRecord`s -> items: image, expression ids, candidate regions and the target.

    Item keys: "image" (3, H, W); "input_ids" (T,); "region_boxes" (N, 4) normalised xyxy = the record's
    candidates (boxes="gt") or proposals (boxes="proposals"); "target_box" (4,); "label" = the target's
    region index ("gt") or -1 ("proposals": positives are found by IoU); "region_targets" (N,) bool, the
    positives (`region_targets`; for inspection: `task_collate` drops it and the loss recomputes it from
    "label", "region_boxes" and "target_box"). Region labels of the image source are dropped: they
    describe the source's boxes, not these candidates.

    boxes="features" (module docstring; the image source yields precomputed regions): no "image";
    "region_feats" (N, D), "region_boxes" (N, 7) and "region_labels" (N,) | None are the feature file's
    regions of the image (the candidates), "label" = -1 (positives by IoU).

    Raises ValueError at construction when `boxes` is unknown, with boxes="proposals" when a record has
    no proposals (naming it), and when boxes="features" and the image source disagree (features need a
    source of precomputed regions; such a source has no pixels for "gt" / "proposals"), so a run fails
    before it trains.
    """

    def __init__(self, records: Sequence[RefRecord], images: ImageSource, tokenizer: Any, max_len: int = 40,
                 image_size: Optional[int] = None, boxes: BoxSetting = "gt") -> None:
        super().__init__(records, images, tokenizer, max_len, image_size)
        if boxes not in ("gt", "proposals", "features"):
            raise ValueError(f"RECDataset: boxes must be 'gt' (ground-truth candidates), 'proposals' "
                             f"(detected setting) or 'features' (precomputed regions), got {boxes!r}")
        if boxes == "features" and self.feature_source is None:
            raise ValueError("RECDataset(boxes='features') scores the regions of precomputed features: the image "
                             "source must yield them (task.region_features / vlp.data.regions.RegionFeatureSource)")
        if boxes != "features" and self.feature_source is not None:
            raise ValueError(f"RECDataset(boxes={boxes!r}) pools candidate boxes from pixels, but the image source "
                             f"yields precomputed region features (task.region_features): use boxes='features' "
                             f"(the feature file's regions are the candidates; leave task.rec_boxes unset)")
        self.boxes = boxes
        if boxes == "proposals":
            for record in self.records:
                if not record.proposals:
                    raise ValueError(
                        f"RECDataset(boxes='proposals'): referring expression {record.ref_id!r} (image "
                        f"{record.image_id!r}) has no proposals; give detections for every record or use boxes='gt'")

    def candidate_boxes(self, record: RefRecord) -> tuple[Box, ...]:
        """The boxes this dataset scores for `record` (candidates, proposals or the feature regions' xyxy,
        per `self.boxes`)."""
        if self.boxes == "features":
            boxes = self.feature_source.region_features(record.image_id).boxes[:, :4]
            return tuple(tuple(float(v) for v in row) for row in boxes.tolist())
        return record.candidates if self.boxes == "gt" else record.proposals

    def item(self, record: RefRecord) -> dict[str, Any]:
        item = self.image_item(record.image_id, with_regions=False)  # the candidates are this item's regions
        if self.boxes == "features":  # image_item gave the feature regions: they are the candidates
            boxes = item["region_boxes"]
        else:
            boxes = torch.tensor(self.candidate_boxes(record), dtype=torch.float32).reshape(-1, 4)
        target = torch.tensor(record.target_box, dtype=torch.float32)
        label = record.target_index if self.boxes == "gt" else -1
        item["input_ids"] = self.text_ids(record.expression)
        item["region_boxes"] = boxes
        item["target_box"] = target
        item["label"] = label
        valid = torch.ones(1, len(boxes), dtype=torch.bool)
        item["region_targets"] = region_targets(torch.tensor([label]), boxes[None], valid, target[None])[0]
        return item

    def chosen_boxes(self, pred: Tensor) -> Tensor:
        """Predicted region indices (K,) for the first K records -> their boxes (K, 4) (for `rec_metrics`)."""
        pred = pred.long().cpu()
        if pred.dim() != 1 or pred.shape[0] > len(self.records):
            raise ValueError(f"chosen_boxes: expected (K,) indices with K <= {len(self.records)}, "
                             f"got {tuple(pred.shape)}")
        out = torch.empty(pred.shape[0], 4)
        for k, (record, index) in enumerate(zip(self.records, pred.tolist())):
            boxes = self.candidate_boxes(record)
            if not 0 <= index < len(boxes):
                raise ValueError(f"chosen_boxes: index {index} outside the {len(boxes)} regions of "
                                 f"referring expression {record.ref_id!r}")
            out[k] = torch.tensor(boxes[index])
        return out


class RECTask(TaskModule):
    """Backbone + per-region scoring head (module docstring). Regions are always passed to the backbone.

    forward(batch) -> {"loss", "acc" (arg-max region is a positive, over rows with one), "no_target"
    (share of rows without a positive region)}; predict(batch) -> (B,) index of the best region.
    """

    def __init__(self, backbone: nn.Module, dropout: float = 0.1) -> None:
        super().__init__(backbone)
        dim, region_dim = backbone.pair_dims
        self.region_proj = nn.Linear(region_dim, dim)
        self.head = ClassifierHead(3 * dim, 1, hidden=dim, dropout=dropout)

    def region_scores(self, out: PairOutput) -> Tensor:
        """PairOutput with regions (B, N, Dr), region_mask (B, N), cls (B, D) -> scores (B, N), padding -inf."""
        if out.regions is None or out.region_mask is None:
            raise ValueError("REC needs region vectors: the backbone returned none (were region boxes passed?)")
        regions = self.region_proj(out.regions)  # (B, N, D)
        cls = out.cls[:, None, :].expand_as(regions)
        scores = self.head(torch.cat([regions, cls, regions * cls], dim=-1)).squeeze(-1)
        return scores.float().masked_fill(~out.region_mask.bool(), float("-inf"))

    def scores(self, batch: Batch) -> Tensor:
        """(B, N) region scores of a batch (padding regions -inf)."""
        if batch.region_boxes is None or batch.region_mask is None:
            raise ValueError("REC batches need region_boxes (candidates or proposals); build them with RECDataset")
        if not bool(batch.region_mask.any(dim=1).all()):
            raise ValueError("REC: a row of the batch has no candidate region")
        return self.region_scores(self.encode(batch, with_regions=True))

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        if batch.labels is None or batch.target_boxes is None:
            raise ValueError("REC batches need labels (target index, -1 = by IoU) and target_boxes; build them "
                             "with RECDataset")
        scores = self.scores(batch)
        positives = region_targets(batch.labels, batch.region_boxes, batch.region_mask, batch.target_boxes)
        loss, has_pos = rec_loss(scores, positives)
        hit = positives.gather(1, scores.argmax(dim=1, keepdim=True)).squeeze(1)
        acc = hit[has_pos].float().mean() if bool(has_pos.any()) else scores.new_zeros(())
        return {"loss": loss, "acc": acc.detach(), "no_target": (~has_pos).float().mean()}

    def predict(self, batch: Batch) -> Tensor:
        return self.scores(batch).argmax(dim=1)


def rec_metrics(pred_boxes: Tensor, records: Sequence[RefRecord]) -> dict[str, float]:
    """RefCOCO accuracy (%): IoU(predicted box, target box) >= 0.5, normalised boxes without "+1".

    pred_boxes (K, 4), one per record in order (`RECDataset.chosen_boxes`). Returns "acc" over all and,
    when records carry groups (RefCOCO testA / testB), "acc_<group>" per non-empty group.
    """
    if pred_boxes.dim() != 2 or pred_boxes.shape != (len(records), 4):
        raise ValueError(f"rec_metrics: expected pred_boxes ({len(records)}, 4), got {tuple(pred_boxes.shape)}")
    target = torch.tensor([r.target_box for r in records], dtype=torch.float32)
    correct = box_iou(pred_boxes.float()[:, None, :], target[:, None, :])[:, 0, 0] >= REC_IOU  # (K,)
    ones = torch.ones_like(correct)
    out = {"acc": accuracy(correct, ones)}
    groups = sorted({r.group for r in records if r.group})
    for group in groups:
        sel = torch.tensor([r.group == group for r in records])
        out[f"acc_{group}"] = accuracy(correct[sel], ones[sel])
    return out


__all__ = ["REC_IOU", "RECDataset", "RECTask", "box_iou", "rec_loss", "rec_metrics", "region_targets"]
