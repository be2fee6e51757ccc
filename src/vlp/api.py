"""The Python API; the CLI (`vlp ...`) is a thin shell over these functions.

    from vlp.api import pretrain, evaluate_checkpoint, finetune, show_world
    run_dir = pretrain("albef_tiny", overrides=["train.steps=50"])
    metrics = evaluate_checkpoint(run_dir / "checkpoint")
    run = finetune("ve", checkpoint=run_dir)

This module only gathers the public functions of the run layer, whose modules import one way:
`build` (world, tokenizer, method, checkpoints) <- `taskdata` (downstream records, user files, region
features) <- `evaluate` (retrieval by the method's protocols) <- `pretrain`, `finetune` <- `demo`.
It adds the figures: `show_world` and `show_method` (a method's inspection figure, `vlp show METHOD`).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from vlp.build import (
    EVAL_SPLIT_SIZE, build_run_method, build_tokenizer, build_world, checkpoint_dir, class_words_for,
    load_checkpoint_method, load_checkpoint_model, retrieval_set, world_class_words,
)
from vlp.data.corpora.openmoji import build_openmoji
from vlp.data.render import render_grid, render_task_grid
from vlp.data.world import World
from vlp.data.world_tasks import world_task_data
from vlp.demo import (
    DEMO_COLUMNS, DEMO_TASKS, DOWNSTREAM_METRICS, demo, demo_methods, downstream_table, method_row, text_floor_row,
)
from vlp.evaluate import evaluate_checkpoint, evaluate_method
from vlp.finetune import evaluate_task, finetune, finetune_config
from vlp.methods import METHODS, method_class
from vlp.pretrain import fit_prepared_state, pretrain
from vlp.report import report_data_efficiency


def show_world(
    out: str | Path, split: str = "train", count: int = 16, image_size: int = 64, seed: int = 0, task: str | None = None
) -> Path:
    """Render `count` samples of a world split to a PNG grid (captions, boxes, a hard negative).

    With `task` ("ve", "rec", "vqa", "nlvr2") the grid shows that task's first `count` records of the
    split with their labels instead (`vlp.data.world_tasks`; REC: target green, other objects red,
    proposals dashed blue).
    """
    world = World(seed=seed, image_size=image_size)
    if task is not None:
        data = world_task_data(world, task, split, count)
        return render_task_grid(task, data.splits[split], data.images, out)
    data = world.split(split)
    samples = [data[i] for i in range(min(count, len(data)))]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    render_grid(samples, out)
    return out


def show_method(method: str, out: str | Path, **options: Any) -> Path:
    """Write method `method`'s inspection figure (its class's `figure` module, e.g. CMAL's associative
    prompt) to `out`; `options` go to that module's `show(out, config=..., checkpoint=..., ...)`.
    ValueError naming the methods that have a figure when this one has none."""
    cls = method_class(method)
    if cls.figure is None:
        have = [name for name, c in METHODS.items() if c.figure is not None]
        raise ValueError(f"method '{method}' has no inspection figure (methods with one: {', '.join(have) or 'none'})")
    return importlib.import_module(cls.figure).show(out, **options)


__all__ = [
    "DEMO_COLUMNS", "DEMO_TASKS", "DOWNSTREAM_METRICS", "EVAL_SPLIT_SIZE", "build_openmoji", "build_run_method", "build_tokenizer", "build_world",
    "checkpoint_dir", "class_words_for", "demo", "demo_methods", "downstream_table", "evaluate_checkpoint",
    "evaluate_method", "evaluate_task", "finetune", "finetune_config", "fit_prepared_state", "load_checkpoint_method",
    "load_checkpoint_model", "method_class", "method_row", "pretrain", "report_data_efficiency", "retrieval_set", "show_method", "show_world", "text_floor_row",
    "world_class_words",
]
