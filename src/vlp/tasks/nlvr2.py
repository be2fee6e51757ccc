"""NLVR2: is a statement about a pair of images (left, right) true?

Input: each example is two image-text pairs, (left image, statement) and (right image, statement).
`NLVR2Dataset` items use `task_collate`'s "pair" convention (`vlp.tasks.common`): an item holds its two
sub-items, which become consecutive rows 2k (left) and 2k+1 (right) of the batch, both carrying the
statement, the example's `label` (0 false / 1 true) and its `pair_index`.

Head (UNITER's "paired" NLVR2 variant): the backbone encodes the two pairs independently
(`encode_pair`), their fused [CLS] vectors (D each) are concatenated in left-right order into one 2D
vector, and a `ClassifierHead(2D, 2)` gives the true/false logits. Loss: 2-way cross-entropy. Metric:
accuracy (%) on dev / test-P, as NLVR2 papers report it.

Why not ALBEF's NLVR2 model: ALBEF splits each fusion layer's cross-attention between the two images
(and pre-trains that with an extra "text assignment" stage), and UNITER / CMAL's best variant
("paired-attn", cmal.md §9) adds attention between the two passes. Both change the inside of a
backbone's fusion (a single-stream CMAL has no cross-attention to split at all); concatenating pooled
outputs works for every method exposing `encode_pair`, unchanged, so backbones are compared on one head.
It is the weaker variant (no token-level interaction between the two images), reported as such.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlp.data.records import NLVR2Record
from vlp.tasks.common import ClassifierHead, RecordDataset, TaskModule, accuracy
from vlp.types import Batch

NLVR2_LABELS = ("false", "true")  # the head's classes, index = class id (= int(record.label))


class NLVR2Dataset(RecordDataset):
    """`NLVR2Record`s -> items {"pair": [left, right]}.

    Each sub-item: "image" (3, H, W) (+ "region_boxes" / "region_labels" when the image source knows
    them; with precomputed region features, `task.region_features`, each side's own "region_feats" /
    "region_boxes" / "region_labels" instead of the image), "input_ids" (T,) of the statement (the same
    in both), "label" int (1 = true), "pair_index" = the dataset row, "row" = the dataset row (->
    `Batch.sample_keys`, the same for both halves), "image_id" = 2 * row + side (0 left, 1 right), "pad_id".
    """

    @classmethod
    def record_image_ids(cls, record: NLVR2Record) -> tuple[str, ...]:
        return (record.left_image_id, record.right_image_id)

    def item(self, record: NLVR2Record) -> dict[str, Any]:
        ids = self.text_ids(record.statement)
        sides = []
        for image_id in (record.left_image_id, record.right_image_id):
            sub = self.image_item(image_id)
            sub["input_ids"] = ids
            sub["label"] = int(record.label)
            sides.append(sub)
        return {"pair": sides}

    def __getitem__(self, row: int) -> dict[str, Any]:
        item = self.item(self.records[row])
        for side, sub in enumerate(item["pair"]):
            sub["pair_index"] = row
            sub["row"] = row
            sub["image_id"] = 2 * row + side
            sub["pad_id"] = self.tokenizer.pad_id
        return item


class NLVR2Task(TaskModule):
    """Backbone + 2-way classifier on the concatenated [CLS] of the left and right passes (module docstring).

    forward(batch) -> {"loss", "acc"}; predict(batch) -> (B / 2,) 0/1 per example. A batch has 2·P rows,
    rows 2k and 2k+1 being the left and right image of example k (same `pair_index` and label).
    """

    def __init__(self, backbone: nn.Module, dropout: float = 0.1) -> None:
        super().__init__(backbone)
        dim, _ = backbone.pair_dims
        self.head = ClassifierHead(2 * dim, 2, dropout=dropout)

    @staticmethod
    def check_pairs(batch: Batch) -> None:
        """ValueError unless the rows come in (left, right) pairs: an even count with pair_index[2k] ==
        pair_index[2k+1] (e.g. a micro-batch split at an odd row, or shuffled rows, fail here)."""
        if batch.pair_index is None:
            raise ValueError("NLVR2 batches need pair_index; build them with NLVR2Dataset + task_collate")
        rows = len(batch)
        if rows % 2:
            raise ValueError(f"NLVR2: a batch holds (left, right) row pairs, got an odd number of rows ({rows})")
        left, right = batch.pair_index[0::2], batch.pair_index[1::2]
        bad = (left != right).nonzero()
        if bad.numel():
            k = int(bad[0, 0])
            raise ValueError(f"NLVR2: rows {2 * k} and {2 * k + 1} belong to different examples (pair_index "
                             f"{int(left[k])} != {int(right[k])}); rows 2k and 2k+1 must be one example's two images")

    def logits(self, batch: Batch) -> Tensor:
        """(B / 2, 2) logits (column 1 = true)."""
        self.check_pairs(batch)
        cls = self.encode(batch).cls  # (2P, D), rows left, right, left, right, ...
        return self.head(cls.reshape(cls.shape[0] // 2, 2 * cls.shape[1]))  # (P, 2D) = [left; right]

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        if batch.labels is None:
            raise ValueError("NLVR2 batches need labels (0 false, 1 true)")
        logits = self.logits(batch)
        labels = batch.labels[0::2]
        if not torch.equal(labels, batch.labels[1::2]):
            raise ValueError("NLVR2: the two rows of an example carry different labels")
        loss = F.cross_entropy(logits.float(), labels)
        acc = (logits.argmax(dim=1) == labels).float().mean()
        return {"loss": loss, "acc": acc.detach()}

    def predict(self, batch: Batch) -> Tensor:
        return self.logits(batch).argmax(dim=1)


def nlvr2_metrics(pred: Tensor, records: list[NLVR2Record]) -> dict[str, float]:
    """Accuracy (%) over examples, and per gold label ("acc_true", "acc_false": a constant predictor
    scores 100 on one and 0 on the other)."""
    target = torch.tensor([int(r.label) for r in records])
    out = {"acc": accuracy(pred, target)}
    for value, name in ((1, "true"), (0, "false")):
        sel = target == value
        if bool(sel.any()):
            out[f"acc_{name}"] = accuracy(pred[sel], target[sel])
    return out


__all__ = ["NLVR2_LABELS", "NLVR2Dataset", "NLVR2Task", "nlvr2_metrics"]
