"""`vlp predict TASK --run DIR`: per-example predictions of a fine-tuned task run, as JSON lines.

    from vlp.predict import predict_task
    summary = predict_task("vqa", "runs/vqa", "preds.jsonl", split="val",
                           overrides=["task.data=files", "task.annotations.val=[q.json, a.json]", "task.image_root=img"])

The run is loaded with `vlp.inference.load_run` (its method, head and `task.json` class names); the records
come from the same readers as `vlp finetune` / `vlp eval` (`task.data`: `world`, `easy-vqa`, `files` with
`task.annotations.<split>` and `task.image_root`; `task.region_features` too), but only `split` is read and,
for user files, every record of it (no `task.eval_size` cap; the world generates `task.eval_size` records),
so the training annotations are not needed. The run's own settings apply unless overridden (`--data`,
`--set`). Batches, autocast precision (`train.precision`) and eval mode are those of `vlp eval TASK`, so
the predictions are the ones its accuracy counts.

Output, one JSON object per example in record order:
  ve     {"id": pair_id, "prediction": "entailment" | "neutral" | "contradiction", "score": p}
  vqa    {"id": question_id, "prediction": answer, "score": p}
  nlvr2  {"id": identifier, "prediction": "true" | "false", "score": p}
  rec    {"id": ref_id, "prediction": [x1, y1, x2, y2] (normalised box of the chosen candidate),
          "region": its index among the candidates, "score": p}
`score` is the model's probability of its prediction (`vlp.inference.TASK_PROBABILITIES`: softmax over the
classes / candidate regions; VQA: the sigmoid of the answer's logit, its head being trained with a binary
cross-entropy per answer). For VQAv2 files (`task.data: files`) it also writes the official result file,
`<out stem>_vqa_results.json` = [{"question_id": int, "answer": str}], for the VQA evaluation server.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

import torch
from torch.utils.data import DataLoader

from vlp.config import RunConfig
from vlp.data.records import TaskData
from vlp.data.world import World
from vlp.data.world_tasks import world_task_data
from vlp.finetune import task_dataset
from vlp.inference import TASK_PROBABILITIES, load_run
from vlp.taskdata import attach_region_features, check_region_features, read_task_files
from vlp.tasks.common import task_collate
from vlp.tasks.retrieval import eval_mode
from vlp.tasks.registry import TASKS
from vlp.train.cpu import configure_cpu
from vlp.train.launch import select_device
from vlp.train.precision import autocast_dtype

RECORD_IDS = {"ve": "pair_id", "vqa": "question_id", "nlvr2": "identifier", "rec": "ref_id"}  # the example's id field
VQA_RESULTS_SUFFIX = "_vqa_results.json"


def prediction_data(cfg: RunConfig, split: str) -> TaskData:
    """The records of `split` of the configured data (`task.data`), with their image source; region features
    attached when `task.region_features` is set. ValueError when the split is empty or absent."""
    check_region_features(cfg)
    if cfg.task.data == "world":
        world = World(seed=cfg.data.world_seed, image_size=cfg.model.vision.image_size)
        data = world_task_data(world, cfg.task.name, [split], {split: cfg.task.eval_size})
    else:
        data = read_task_files(cfg, [split])
    data = attach_region_features(cfg, data)
    if not data.splits.get(split):
        have = ", ".join(s for s, rows in data.splits.items() if rows) or "none"
        raise ValueError(f"the {cfg.task.name} data ({cfg.task.data}) has no records in split '{split}' (splits with "
                         f"records: {have}); pick one with --split")
    return data


def predict_task(task: str, run: str | Path, out: str | Path, split: str = "test",
                 overrides: Optional[list[str]] = None) -> dict[str, Any]:
    """Write the predictions of fine-tuned run `run` (task `task`) on `split` to `out` (JSON lines, module
    docstring); returns {"examples", "out", "vqa_results" (path or None), "skipped"}. ValueError when the
    run is not a fine-tuned `task` run."""
    if task not in TASKS:
        raise ValueError(f"unknown task '{task}' (predict covers: {', '.join(TASKS)}; retrieval: use vlp embed or "
                         f"vlp eval retrieval)")
    cfg, tokenizer, method, module, labels = load_run(run, overrides)
    if module is None or cfg.task.name != task:
        what = f"a {cfg.task.name} fine-tuning run" if module is not None else "not a fine-tuned task run"
        raise ValueError(f"{run} is {what}: vlp predict {task} needs a `vlp finetune {task}` run directory")
    device = select_device(cfg.train.device)
    print(f"[predict] {configure_cpu(cfg.train, 0, device).describe()}", file=sys.stderr, flush=True)
    module.to(device)
    data = prediction_data(cfg, split)
    if labels is not None:
        TASKS[task].restore_labels(data, labels)  # the head's classes, whatever the new data's answers are
    skipped = getattr(data, "skipped", None)
    if skipped:
        print(f"{task}: {skipped}", file=sys.stderr)
    dataset = task_dataset(cfg, data, split, tokenizer)
    amp_dtype = autocast_dtype(cfg.train.precision, device)
    loader = DataLoader(dataset, batch_size=cfg.eval.batch_size, shuffle=False, collate_fn=task_collate)
    probs = []
    with eval_mode(module), torch.no_grad():
        for batch in loader:
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                probs.extend(TASK_PROBABILITIES[task](module, batch.to(device)).float().cpu())
    rows = []
    for record, p in zip(dataset.records, probs):
        best = int(p.argmax())
        row: dict[str, Any] = {"id": getattr(record, RECORD_IDS[task])}
        if task == "rec":
            row["prediction"] = [round(float(v), 6) for v in dataset.candidate_boxes(record)[best]]
            row["region"] = best
        else:
            row["prediction"] = labels[best]
        row["score"] = float(p[best])
        rows.append(row)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    results = None
    if task == "vqa" and cfg.task.data == "files":  # VQAv2 files: the evaluation server's format too
        results = path.with_name(path.stem + VQA_RESULTS_SUFFIX)
        results.write_text(json.dumps([{"question_id": _question_number(r["id"]), "answer": r["prediction"]}
                                       for r in rows]))
    return {"examples": len(rows), "out": str(path), "vqa_results": None if results is None else str(results),
            "skipped": getattr(skipped, "count", 0)}


def _question_number(question_id: str) -> int:
    """A VQAv2 question id as the official result format's int (ValueError naming a non-numeric one)."""
    try:
        return int(question_id)
    except ValueError:
        raise ValueError(f"question id {question_id!r} is not an integer: the official VQA result format needs "
                         f"the VQAv2 files' integer question ids") from None


__all__ = ["RECORD_IDS", "VQA_RESULTS_SUFFIX", "prediction_data", "predict_task"]
