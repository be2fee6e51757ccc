"""Text-only floors: what a task's text alone explains (world.md "Labels": every task is reported next to its
text-only floor — hypothesis-only VE, question-only VQA, statement-only NLVR2).

A bag-of-words (unigrams + bigrams of lower-cased words) multinomial logistic regression is fit on the
train split's text and labels (full batch, L2, zero-initialised, so the result is a pure function of the
records) and scored with the task's metric on an evaluation split: VE accuracy, NLVR2 accuracy, and for VQA
the official VQA accuracy of the predicted answer (classes: the most common normalised answer of each
training question). A number a vision-language model reaches is only read as vision-language where it
clears this floor; the floor of a well-built task sits near chance (VE 33.3, NLVR2 50).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from vlp.data.records import NLVR2Record, TaskData, VERecord, VQARecord
from vlp.tasks.vqa_metric import evaluate_vqa, normalize_answer

_WORD = re.compile(r"[a-z0-9]+")
TEXT_FLOOR_TASKS = ("ve", "vqa", "nlvr2")


def text_features(text: str) -> list[str]:
    """Lower-cased word unigrams and bigrams of `text`."""
    words = _WORD.findall(text.lower())
    return words + [f"{a} {b}" for a, b in zip(words, words[1:])]


def bag_of_words(texts: Sequence[str], vocab: dict[str, int] | None = None,
                 min_count: int = 1) -> tuple[Tensor, dict[str, int]]:
    """(N, V) float counts of `texts` over `vocab` (built from `texts` when None: features seen at least
    `min_count` times), and the vocab. Features outside the vocab are dropped."""
    features = [text_features(t) for t in texts]
    if vocab is None:
        counts = Counter(f for fs in features for f in fs)
        vocab = {f: i for i, f in enumerate(sorted(f for f, c in counts.items() if c >= min_count))}
    x = torch.zeros(len(texts), len(vocab))
    for row, fs in enumerate(features):
        for f in fs:
            col = vocab.get(f)
            if col is not None:
                x[row, col] += 1.0
    return x, vocab


def fit_logistic(x: Tensor, y: Tensor, num_classes: int, steps: int = 300, lr: float = 0.1,
                 weight_decay: float = 1e-3) -> tuple[Tensor, Tensor]:
    """Multinomial logistic regression on x (N, V) -> y (N,) long: (W (V, K), b (K,)), full-batch Adam from
    zeros with an L2 penalty `weight_decay` · ||W||²."""
    w = torch.zeros(x.shape[1], num_classes, requires_grad=True)
    b = torch.zeros(num_classes, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=lr)
    for _ in range(steps):
        loss = F.cross_entropy(x @ w + b, y) + weight_decay * w.pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return w.detach(), b.detach()


def _text_and_label(task: str, record: Any) -> tuple[str, Any]:
    if task == "ve" and isinstance(record, VERecord):
        return record.hypothesis, int(record.label)
    if task == "nlvr2" and isinstance(record, NLVR2Record):
        return record.statement, int(record.label)
    if task == "vqa" and isinstance(record, VQARecord):
        answers = Counter(normalize_answer(a) for a in record.answers)
        return record.question, answers.most_common(1)[0][0]
    raise ValueError(f"text-only floors exist for {', '.join(TEXT_FLOOR_TASKS)}; got task {task!r} with a "
                     f"{type(record).__name__}")


def text_only_floor(task: str, data: TaskData, split: str = "test", steps: int = 300) -> dict[str, float]:
    """The text-only floor of `task` on `data`: fit on `data.splits["train"]`, score on `data.splits[split]`.

    Returns `text_only_acc` (%, the task's headline metric: VE / NLVR2 accuracy, VQA official accuracy),
    `chance` (% of the uniform guess: 1/K for VE and NLVR2, the best constant answer's VQA accuracy for
    VQA), and the record counts. ValueError for another task or a missing split."""
    if task not in TEXT_FLOOR_TASKS:
        raise ValueError(f"text-only floors exist for {', '.join(TEXT_FLOOR_TASKS)}, not {task!r}")
    for name in ("train", split):
        if not data.splits.get(name):
            raise ValueError(f"the {task} data has no records in split '{name}' (has: {', '.join(data.splits)})")
    train = [_text_and_label(task, r) for r in data.splits["train"]]
    test_records = data.splits[split]
    test = [_text_and_label(task, r) for r in test_records]
    classes = sorted({label for _, label in train}, key=str)
    index = {label: i for i, label in enumerate(classes)}
    x, vocab = bag_of_words([t for t, _ in train])
    y = torch.tensor([index[label] for _, label in train])
    w, b = fit_logistic(x, y, len(classes), steps=steps)
    pred = (bag_of_words([t for t, _ in test], vocab)[0] @ w + b).argmax(dim=1).tolist()
    out = {"train_records": float(len(train)), "eval_records": float(len(test))}
    if task == "vqa":
        answers = {r.question_id: classes[p] for r, p in zip(test_records, pred)}
        out["text_only_acc"] = float(evaluate_vqa(answers, test_records)["overall"])
        common = Counter(label for _, label in train).most_common(1)[0][0]
        out["chance"] = float(evaluate_vqa({r.question_id: common for r in test_records}, test_records)["overall"])
        return out
    truth = [label for _, label in test]
    out["text_only_acc"] = 100.0 * sum(classes[p] == t for p, t in zip(pred, truth)) / len(truth)
    out["chance"] = 100.0 / (3 if task == "ve" else 2)
    return out


__all__ = ["TEXT_FLOOR_TASKS", "bag_of_words", "fit_logistic", "text_features", "text_only_floor"]
