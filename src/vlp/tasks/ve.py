"""Visual entailment (SNLI-VE): does the image entail, contradict, or leave open a hypothesis?

Input: premise image + hypothesis text through the method's pair encoder; a `ClassifierHead` on the
fused [CLS] gives 3 logits (order `vlp.data.records.VE_LABELS`: entailment, neutral, contradiction).
Loss: 3-way cross-entropy. UNITER/CMAL train this head with BCE on one-hot targets ("instance-level BCE",
cmal.md §9); with one-hot targets and a softmax decision the two share the argmax, CE is the ALBEF
choice and the one we use. Metric: accuracy (%) on val / test, as SNLI-VE papers report it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlp.data.records import VE_LABELS, VERecord
from vlp.tasks.common import ClassifierHead, RecordDataset, TaskModule, accuracy
from vlp.types import Batch


class VEDataset(RecordDataset):
    """`VERecord`s -> items: premise image (+ its regions when known), hypothesis ids, label."""

    def item(self, record: VERecord) -> dict[str, Any]:
        item = self.image_item(record.image_id)
        item["input_ids"] = self.text_ids(record.hypothesis)
        item["label"] = int(record.label)
        return item


class VETask(TaskModule):
    """Backbone + 3-way classifier on the pair's fused [CLS]."""

    def __init__(self, backbone: nn.Module, dropout: float = 0.1) -> None:
        super().__init__(backbone)
        dim, _ = backbone.pair_dims
        self.head = ClassifierHead(dim, len(VE_LABELS), dropout=dropout)

    def logits(self, batch: Batch) -> Tensor:
        """(B, 3) logits, columns in `VE_LABELS` order."""
        return self.head(self.encode(batch).cls)

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        if batch.labels is None:
            raise ValueError("VE batches need labels (0 entailment, 1 neutral, 2 contradiction)")
        logits = self.logits(batch)
        loss = F.cross_entropy(logits.float(), batch.labels)
        acc = (logits.argmax(dim=1) == batch.labels).float().mean()
        return {"loss": loss, "acc": acc.detach()}

    def predict(self, batch: Batch) -> Tensor:
        return self.logits(batch).argmax(dim=1)


def ve_metrics(pred: Tensor, records: list[VERecord]) -> dict[str, float]:
    """accuracy (%) overall and per gold class (a classifier that predicts one class scores 100 on it and
    0 on the others: the per-class numbers show it)."""
    target = torch.tensor([r.label for r in records])
    out = {"acc": accuracy(pred, target)}
    for k, name in enumerate(VE_LABELS):
        sel = target == k
        if bool(sel.any()):
            out[f"acc_{name}"] = accuracy(pred[sel], target[sel])
    return out


__all__ = ["VEDataset", "VETask", "ve_metrics"]
