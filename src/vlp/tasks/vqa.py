"""VQA as answer classification with soft targets (VQAv2 convention: UNITER / BUTD / CMAL heads).

Input: image + question through the method's pair encoder; a `ClassifierHead` on the fused [CLS] gives
one logit per answer of a fixed vocabulary (`build_answer_vocab`: the most frequent training answers, or
the source's own list: the world's, easy-vqa's). Target: each answer's exact leave-one-out VQA credit
(`vlp.tasks.vqa_metric.soft_targets`: 1/2/3/4+ of 10 humans -> 0.3/0.6/0.9/1.0). Loss: binary
cross-entropy with logits, summed over answers (UNITER: mean × number of answers). Prediction: argmax.
Metric: the official VQA accuracy (`evaluate_vqa`, answer normalisation + 10-choose-9 average), overall
and per answer type. ALBEF/BLIP instead generate and rank answers with a decoder; a classifier is the
UNITER/CMAL setting, which every backbone here supports.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import torch.nn.functional as F
from torch import Tensor, nn

from vlp.data.records import ImageSource, VQARecord
from vlp.tasks.common import ClassifierHead, RecordDataset, TaskModule
from vlp.tasks.vqa_metric import build_answer_vocab, evaluate_vqa, soft_targets
from vlp.types import Batch


def answer_vocabulary(train: Sequence[VQARecord], given: Optional[Sequence[str]] = None, top_k: int = 0) -> list[str]:
    """The answer classes: the source's list when it has one (`TaskData.answer_vocab`), else the `top_k`
    most frequent normalised training answers (0 = all of them)."""
    if given:
        return list(given)
    answers = [r.answers for r in train]
    return build_answer_vocab(answers, top_k if top_k > 0 else len({a for lst in answers for a in lst}))


class VQADataset(RecordDataset):
    """`VQARecord`s -> items: image (+ regions), question ids, "answers" = soft targets (V,)."""

    def __init__(self, records: Sequence[VQARecord], images: ImageSource, tokenizer: Any, max_len: int = 40,
                 image_size: Optional[int] = None, answer_vocab: Sequence[str] = ()) -> None:
        super().__init__(records, images, tokenizer, max_len, image_size)
        if not answer_vocab:
            raise ValueError("VQADataset needs an answer vocabulary (see vlp.tasks.vqa.answer_vocabulary)")
        self.answer_vocab = list(answer_vocab)
        self.targets = soft_targets([r.answers for r in self.records], self.answer_vocab)

    def __getitem__(self, row: int) -> dict[str, Any]:
        item = super().__getitem__(row)
        item["answers"] = self.targets[row]
        return item

    def item(self, record: VQARecord) -> dict[str, Any]:
        item = self.image_item(record.image_id)
        item["input_ids"] = self.text_ids(record.question)
        return item


class VQATask(TaskModule):
    """Backbone + answer classifier on the fused [CLS]."""

    def __init__(self, backbone: nn.Module, num_answers: int, dropout: float = 0.1) -> None:
        super().__init__(backbone)
        dim, _ = backbone.pair_dims
        self.head = ClassifierHead(dim, num_answers, dropout=dropout)

    def logits(self, batch: Batch) -> Tensor:
        return self.head(self.encode(batch).cls)

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        if batch.answers is None:
            raise ValueError("VQA batches need soft answer targets (Batch.answers, (B, V))")
        logits = self.logits(batch).float()
        loss = F.binary_cross_entropy_with_logits(logits, batch.answers) * batch.answers.shape[1]
        # credit of the argmax answer: the batch's VQA accuracy on in-vocabulary answers
        score = batch.answers.gather(1, logits.argmax(dim=1, keepdim=True)).mean()
        return {"loss": loss, "vqa_score": score.detach()}

    def predict(self, batch: Batch) -> Tensor:
        return self.logits(batch).argmax(dim=1)


def vqa_metrics(pred: Tensor, dataset: VQADataset) -> dict[str, float]:
    """Official VQA accuracy (%) of the predicted answers: `acc` overall and `acc_<answer type>`."""
    answers = {r.question_id: dataset.answer_vocab[int(i)] for r, i in zip(dataset.records, pred)}
    result = evaluate_vqa(answers, dataset.records)
    out = {"acc": result["overall"]}
    out.update({f"acc_{t or 'all'}": v for t, v in result["per_answer_type"].items() if t})
    return out


__all__ = ["VQADataset", "VQATask", "answer_vocabulary", "vqa_metrics"]
