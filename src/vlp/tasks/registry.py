"""The downstream tasks by name: how each is built, fed and scored (`vlp finetune TASK`).

`TASKS[name]` is a `TaskSpec`: the dataset class, the task module around a pre-trained method, the metric,
extra dataset arguments and the evaluation settings. Retrieval is not here: it is the pre-training method
itself with its retrieval objectives (`vlp.finetune`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from vlp.config import RunConfig
from vlp.data.records import VE_LABELS, TaskData
from vlp.tasks.common import RecordDataset, TaskModule
from vlp.tasks.nlvr2 import NLVR2_LABELS, NLVR2Dataset, NLVR2Task, nlvr2_metrics
from vlp.tasks.rec import RECDataset, RECTask, rec_metrics
from vlp.tasks.ve import VEDataset, VETask, ve_metrics
from vlp.tasks.vqa import VQADataset, VQATask, answer_vocabulary, vqa_metrics


@dataclass(frozen=True)
class TaskSpec:
    """How a task is built: dataset class (+ extra constructor arguments from the config and data), module
    builder, metric over (predictions, dataset)."""

    dataset: type[RecordDataset]
    module: Callable[[nn.Module, RunConfig, TaskData], TaskModule]
    metrics: Callable[[torch.Tensor, Any], dict[str, float]]
    dataset_kwargs: Callable[[RunConfig, TaskData], dict[str, Any]] = lambda cfg, data: {}
    # evaluation settings: metric-name prefix -> extra dataset kwargs (REC: ground-truth and detected boxes)
    eval_settings: Callable[[TaskData, str], dict[str, dict[str, Any]]] = lambda data, split: {"": {}}
    # names of the head's classes, index = class id (None: REC picks a candidate region); saved with a
    # fine-tuning run (`task.json`) so that predictions on other data need none of the training data
    labels: Callable[[RunConfig, TaskData], Optional[list[str]]] = lambda cfg, data: None
    # puts a run's saved `labels` back into data (VQA: the answer vocabulary its head was trained on)
    restore_labels: Callable[[TaskData, Sequence[str]], None] = lambda data, labels: None


def _rec_settings(data: TaskData, split: str) -> dict[str, dict[str, Any]]:
    """REC is scored on ground-truth candidates and, when every record has them, on detected proposals;
    with precomputed region features (`task.region_features`) only on the feature regions, as `feat_acc`
    (`vlp.tasks.rec` module docstring)."""
    if callable(getattr(data.images, "region_features", None)):
        return {"feat_": {"boxes": "features"}}
    settings = {"gt_": {"boxes": "gt"}}
    if all(r.proposals for r in data.splits[split]):
        settings["det_"] = {"boxes": "proposals"}
    return settings


def _rec_boxes(cfg: RunConfig) -> str:
    """REC training candidates: `task.rec_boxes` (default gt), or the feature regions with `task.region_features`."""
    if cfg.task.region_features is not None:
        return "features"
    return cfg.task.rec_boxes or "gt"


def _answers(cfg: RunConfig, data: TaskData) -> list[str]:
    """The VQA answer classes of this data (cached on it: head size and targets must agree)."""
    if data.answer_vocab is None or not data.answer_vocab:
        data.answer_vocab = answer_vocabulary(data.splits["train"], None, cfg.task.answer_vocab_size)
    return data.answer_vocab


def _restore_answers(data: TaskData, answers: Sequence[str]) -> None:
    """The answer classes of a fine-tuned VQA run (its saved `task.json`), in head order."""
    data.answer_vocab = list(answers)


TASKS: dict[str, TaskSpec] = {
    "ve": TaskSpec(VEDataset, lambda backbone, cfg, data: VETask(backbone, dropout=cfg.task.dropout),
                   lambda pred, dataset: ve_metrics(pred, dataset.records), labels=lambda cfg, data: list(VE_LABELS)),
    "rec": TaskSpec(RECDataset, lambda backbone, cfg, data: RECTask(backbone, cfg.task.dropout),
                    lambda pred, dataset: rec_metrics(dataset.chosen_boxes(pred), dataset.records),
                    lambda cfg, data: {"boxes": _rec_boxes(cfg)}, _rec_settings),
    "nlvr2": TaskSpec(NLVR2Dataset, lambda backbone, cfg, data: NLVR2Task(backbone, cfg.task.dropout),
                      lambda pred, dataset: nlvr2_metrics(pred, dataset.records), labels=lambda cfg, data: list(NLVR2_LABELS)),
    "vqa": TaskSpec(VQADataset, lambda backbone, cfg, data: VQATask(backbone, len(_answers(cfg, data)), cfg.task.dropout),
                    vqa_metrics, lambda cfg, data: {"answer_vocab": _answers(cfg, data)}, labels=_answers,
                    restore_labels=_restore_answers),
}


__all__ = ["TASKS", "TaskSpec"]
