"""`vlp finetune TASK` / `vlp eval TASK`: fine-tune a pre-trained method on a downstream task and score it.

    from vlp.finetune import finetune, evaluate_task
    run = finetune("ve", checkpoint="runs/demo/cmal")      # or checkpoint=None: same method from scratch
    metrics = evaluate_task(run)                            # val / test metrics of the fine-tuned model

A fine-tuning run directory holds `config.yaml` (model + method of the checkpoint, train + task of the
fine-tuning config), `tokenizer.json` (the checkpoint's), `metrics.jsonl`, `checkpoint/` (the task
module: `backbone.*` + `head.*`) and `eval.json`.

Configs: `finetune_<task>` (shipped) gives `train` and `task`; the model, method and tokenizer come from
the pre-trained checkpoint (`task.checkpoint`), or, for "from scratch", from `task.init` (a pre-training
config) with fresh weights, so the two differ only by pre-training. The task module is trained by the
pre-training `Trainer` (AMP, accumulation, DDP, exact resume); evaluation runs on rank 0 at the end.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from vlp.config import RunConfig, build_config, dump_config, load_config
from vlp.data.records import TaskData
from vlp.data.tokenizer import TextTokenizer
from vlp.data.world import World
from vlp.tasks.common import RecordDataset, TaskModule, predictions, task_collate
from vlp.tasks.nlvr2 import NLVR2Dataset, NLVR2Task, nlvr2_metrics
from vlp.tasks.rec import RECDataset, RECTask, rec_metrics
from vlp.tasks.ve import VEDataset, VETask, ve_metrics
from vlp.tasks.vqa import VQADataset, VQATask, answer_vocabulary, vqa_metrics
from vlp.train import launch
from vlp.train.checkpoint import load_model_weights
from vlp.train.loop import Trainer

FINETUNE_SECTIONS = ("train", "eval", "task")  # taken from the fine-tuning config; the rest from the checkpoint

# Retrieval fine-tuning continues the pre-training method with only its retrieval objectives:
#   fusion models (ALBEF §4 fine-tuning): ITC + ITM with ITC-sampled hard negatives, no MLM;
#   single-stream models (UNITER / CMAL, no ITC): ITM only, ranked by ITM over all pairs.
RETRIEVAL_OBJECTIVES = {
    "albef": ["method.loss_weights.mlm=0", "method.itm_hard_negatives=true"],
    "cmal": ["method.task_mixing=sum", "method.task_weights.itm=1", "method.task_weights.amc=0",
             "method.task_weights.wrc=0"],
}


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


def _rec_settings(data: TaskData, split: str) -> dict[str, dict[str, Any]]:
    """REC is scored on ground-truth candidates and, when every record has them, on detected proposals."""
    settings = {"gt_": {"boxes": "gt"}}
    if all(r.proposals for r in data.splits[split]):
        settings["det_"] = {"boxes": "proposals"}
    return settings


def _answers(cfg: RunConfig, data: TaskData) -> list[str]:
    """The VQA answer classes of this data (cached on it: head size and targets must agree)."""
    if data.answer_vocab is None or not data.answer_vocab:
        data.answer_vocab = answer_vocabulary(data.splits["train"], None, cfg.task.answer_vocab_size)
    return data.answer_vocab


TASKS: dict[str, TaskSpec] = {
    "ve": TaskSpec(VEDataset, lambda backbone, cfg, data: VETask(backbone, dropout=cfg.task.dropout),
                   lambda pred, dataset: ve_metrics(pred, dataset.records)),
    "rec": TaskSpec(RECDataset, lambda backbone, cfg, data: RECTask(backbone, cfg.task.dropout),
                    lambda pred, dataset: rec_metrics(dataset.chosen_boxes(pred), dataset.records),
                    lambda cfg, data: {"boxes": cfg.task.rec_boxes}, _rec_settings),
    "nlvr2": TaskSpec(NLVR2Dataset, lambda backbone, cfg, data: NLVR2Task(backbone, cfg.task.dropout),
                      lambda pred, dataset: nlvr2_metrics(pred, dataset.records)),
    "vqa": TaskSpec(VQADataset, lambda backbone, cfg, data: VQATask(backbone, len(_answers(cfg, data)), cfg.task.dropout),
                    vqa_metrics, lambda cfg, data: {"answer_vocab": _answers(cfg, data)}),
}


def register_task(name: str, spec: TaskSpec) -> None:
    """Add a downstream task to `TASKS` (the task modules register themselves at import)."""
    TASKS[name] = spec


# ------------------------------------------------------------------------------------------ config
def finetune_config(task: str | None = None, checkpoint: str | Path | None = None,
                    config: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """The resolved fine-tuning config.

    `config` (default: the shipped `finetune_<task>`) provides train / eval / task; model, method and data
    come from `checkpoint`'s config.yaml (or `task.init` when there is no checkpoint). `overrides` apply
    last (e.g. `task.train_size=500`). `checkpoint` wins over `task.checkpoint` of the config.
    """
    if config is None:
        if task is None:
            raise ValueError("finetune needs a task name (ve, rec, vqa, nlvr2, retrieval) or a config")
        config = f"finetune_{task}"
    ft = load_config(config, overrides).model_dump(mode="json")
    if task is not None and ft["task"]["name"] != task:
        ft["task"]["name"] = task
    if checkpoint is not None:
        ft["task"]["checkpoint"] = str(checkpoint)
    source = ft["task"]["checkpoint"]
    if source is not None:
        base = load_config(_checkpoint_dir(source) / "config.yaml").model_dump(mode="json")
    else:
        base = load_config(ft["task"]["init"]).model_dump(mode="json")
    raw = {k: (ft[k] if k in FINETUNE_SECTIONS else v) for k, v in base.items()}
    objective = RETRIEVAL_OBJECTIVES.get(raw["method"]["name"], []) if raw["task"]["name"] == "retrieval" else []
    # overrides may also target model / method / data (e.g. train.device, model.fusion.depth for tests)
    return build_config(raw, [*objective, *(overrides or [])], source=str(config))


def _checkpoint_dir(path: str | Path) -> Path:
    p = Path(path)
    if (p / "checkpoint").is_dir():
        p = p / "checkpoint"
    if not (p / "config.yaml").is_file():
        raise FileNotFoundError(f"{p / 'config.yaml'} not found: task.checkpoint must be a vlp pre-training run "
                                "or checkpoint directory")
    return p


# ------------------------------------------------------------------------------------------ parts
def build_backbone(cfg: RunConfig) -> tuple[nn.Module, TextTokenizer]:
    """The pre-trained method of `task.checkpoint` (all its weights, strict) with its tokenizer, or the
    method of `task.init` freshly initialised (seeded by train.seed) with a tokenizer trained on the world."""
    from vlp.api import build_run_method, build_tokenizer, build_world

    torch.manual_seed(cfg.train.seed)
    if cfg.task.checkpoint is None:
        tokenizer = build_tokenizer(cfg, build_world(cfg))
        return build_run_method(cfg, tokenizer), tokenizer
    path = _checkpoint_dir(cfg.task.checkpoint)
    tokenizer = TextTokenizer.load(path / "tokenizer.json")
    method = build_run_method(cfg, tokenizer)
    load_model_weights(path, method)
    return method, tokenizer


def task_data(cfg: RunConfig) -> TaskData:
    """The task's records per split (train + `task.eval_splits`) and their image source."""
    name = cfg.task.name
    splits = ["train", *[s for s in cfg.task.eval_splits if s != "train"]]
    if cfg.task.data == "world":
        from vlp.data.world_tasks import world_task_data

        world = World(seed=cfg.data.world_seed, image_size=cfg.model.vision.image_size)
        counts = {s: (cfg.task.train_size if s == "train" else cfg.task.eval_size) for s in splits}
        return world_task_data(world, name, splits, counts)
    data = read_task_files(cfg, splits)
    for split in list(data.splits):  # caps: the first train_size / eval_size records of each split
        cap = cfg.task.train_size if split == "train" else cfg.task.eval_size
        if cap > 0:
            data.splits[split] = data.splits[split][:cap]
    return data


def read_task_files(cfg: RunConfig, splits: list[str]) -> TaskData:
    """Records of user files (`task.data: files`, `task.annotations`, `task.image_root`) or of the
    packaged easy-VQA set (`task.data: easy-vqa`), through the `vlp.data.formats` readers."""
    from vlp.data import formats

    task, files, root, skip = cfg.task.name, cfg.task.annotations, cfg.task.image_root, cfg.task.skip_bad
    if cfg.task.data == "easy-vqa":
        if task != "vqa":
            raise ValueError(f"task.data=easy-vqa is a VQA set; got task {task}")
        return formats.read_easy_vqa(skip_bad=skip)
    if cfg.task.data != "files":
        raise ValueError(f"task.data must be world, easy-vqa or files, got '{cfg.task.data}'")
    if task == "rec":
        if not {"refs", "instances"} <= set(files):
            raise ValueError("RefCOCO needs task.annotations {refs: refs(unc).json, instances: instances.json}")
        return formats.read_refcoco(files["refs"], files["instances"], root, skip_bad=skip)
    merged = formats.FormatData(task)
    for split in splits:
        if split not in files:
            raise ValueError(f"task.annotations has no file for split '{split}' (has: {', '.join(files) or 'none'})")
        entry = files[split]
        if task == "vqa":
            if not (isinstance(entry, list) and len(entry) == 2):
                raise ValueError(f"VQAv2 split '{split}' needs [questions.json, annotations.json] in task.annotations")
            part = formats.read_vqav2(entry[0], entry[1], root, split=split, skip_bad=skip)
        else:
            reader = {"ve": formats.read_snli_ve, "nlvr2": formats.read_nlvr2, "retrieval": formats.read_karpathy}[task]
            part = reader(entry, root, split=split, skip_bad=skip)
        merged.splits[split] = part.splits.get(split, [])
        merged.images = part.images
        merged.skipped.merge(part.skipped)
    return merged


def build_task(cfg: RunConfig, backbone: nn.Module, data: TaskData) -> TaskModule:
    if cfg.task.name not in TASKS:
        raise ValueError(f"unknown task '{cfg.task.name}' (known: {', '.join(sorted(TASKS))})")
    return TASKS[cfg.task.name].module(backbone, cfg, data)


def task_dataset(cfg: RunConfig, data: TaskData, split: str, tokenizer: Any, **extra: Any) -> RecordDataset:
    if split not in data.splits:
        raise ValueError(f"the {cfg.task.name} data has no '{split}' split (has: {', '.join(data.splits)})")
    spec = TASKS[cfg.task.name]
    kwargs = {**spec.dataset_kwargs(cfg, data), **extra}
    return spec.dataset(data.splits[split], data.images, tokenizer, max_len=cfg.data.max_text_len,
                        image_size=cfg.model.vision.image_size, **kwargs)


def evaluate_splits(module: TaskModule, cfg: RunConfig, data: TaskData, tokenizer: Any,
                    device: torch.device) -> dict[str, float]:
    """`<split>/<metric>` for every eval split (predictions in eval mode, no grad)."""
    from vlp.api import _amp_dtype

    spec = TASKS[cfg.task.name]
    out: dict[str, float] = {}
    for split in cfg.task.eval_splits:
        for prefix, extra in spec.eval_settings(data, split).items():
            dataset = task_dataset(cfg, data, split, tokenizer, **extra)
            pred = predictions(module, dataset, cfg.eval.batch_size, device, amp_dtype=_amp_dtype(cfg, device))
            out.update({f"{split}/{prefix}{k}": v for k, v in spec.metrics(pred, dataset).items()})
    return out


# ------------------------------------------------------------------------------------------ entry points
def finetune(task: str | None = None, checkpoint: str | Path | None = None, config: str | Path | None = None,
             overrides: list[str] | None = None) -> Path:
    """Fine-tune on a downstream task, evaluate on `task.eval_splits`; returns the run directory."""
    cfg = finetune_config(task, checkpoint, config, overrides)
    out_dir = Path(cfg.train.out_dir)
    with launch.distributed_session(cfg.train.device):
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        backbone, tokenizer = build_backbone(cfg)
        if rank == 0:
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "config.yaml").write_text(dump_config(cfg))
            tokenizer.save(out_dir / "tokenizer.json")
        launch.barrier()
        if cfg.task.name == "retrieval":
            module, train_set, collate_fn, evaluate = _retrieval_parts(cfg, backbone, tokenizer, rank)
        else:
            data = task_data(cfg)
            skipped = getattr(data, "skipped", None)
            if skipped:  # --skip-bad: never silent — counted in eval.json and printed with the first reasons
                print(f"{cfg.task.name}: {skipped}", file=sys.stderr)
            module = build_task(cfg, backbone, data)
            train_set, collate_fn = task_dataset(cfg, data, "train", tokenizer), task_collate

            def evaluate(trained: nn.Module, device: torch.device) -> dict[str, float]:
                return evaluate_splits(trained, cfg, data, tokenizer, device)

        def eval_fn(trained: nn.Module, step: int) -> dict[str, float]:
            return evaluate(trained, trainer.device)

        trainer = Trainer(cfg, module, train_set, collate_fn, out_dir, eval_fn=eval_fn,
                          tokenizer_json=str(out_dir / "tokenizer.json"))
        records = trainer.fit()
        if rank == 0:
            final = [r for r in records if any(k.startswith("eval/") for k in r)]
            metrics = {k[len("eval/"):]: v for k, v in final[-1].items() if k.startswith("eval/")} if final else {}
            metrics.update({"task": cfg.task.name, "checkpoint": cfg.task.checkpoint, "steps": cfg.train.steps,
                            "train_examples": len(train_set)})
            if cfg.task.name != "retrieval" and getattr(data, "skipped", None) is not None:
                metrics["skipped_records"] = data.skipped.count
            (out_dir / "eval.json").write_text(json.dumps(metrics, indent=2))
    return out_dir


def _retrieval_parts(cfg: RunConfig, method: nn.Module, tokenizer: Any, rank: int) -> tuple[nn.Module, Any, Any, Any]:
    """Retrieval fine-tuning: the method itself (with `RETRIEVAL_OBJECTIVES`) on the world's caption pairs
    (`task.train_size` pairs, a prefix of the train split), scored like pre-training (`evaluate_method`:
    ITC + ITM re-ranking for fusion models, ITM over all pairs for CMAL) on `eval.split`."""
    from vlp.api import build_world, evaluate_method, retrieval_set
    from vlp.data.datasets import PairDataset, collate

    if cfg.task.data != "world":
        raise ValueError("retrieval fine-tuning reads the world's caption pairs; for COCO/Flickr captions + images, "
                         "continue pre-training with `vlp pretrain --set data.source=karpathy` and its retrieval losses")
    world = build_world(cfg)
    dataset = PairDataset(world.split("train"), tokenizer, cfg.data.max_text_len, cfg.task.train_size,
                          max_words=cfg.data.max_text_len)
    rset = retrieval_set(cfg, world, tokenizer) if rank == 0 else None

    def evaluate(trained: nn.Module, device: torch.device) -> dict[str, float]:
        return evaluate_method(trained, rset, cfg, device)

    return method, dataset, collate, evaluate


def evaluate_task(run: str | Path, overrides: list[str] | None = None) -> dict[str, float]:
    """Re-evaluate a fine-tuning run directory (or its checkpoint/) on its task's eval splits."""
    path = Path(run)
    ckpt = path / "checkpoint" if (path / "checkpoint").is_dir() else path
    if not (ckpt / "config.yaml").is_file():
        raise FileNotFoundError(f"{ckpt / 'config.yaml'} not found: pass a `vlp finetune` run directory")
    raw = yaml.safe_load((ckpt / "config.yaml").read_text())
    cfg = build_config(raw, overrides, source=str(ckpt / "config.yaml"))
    tokenizer = TextTokenizer.load(ckpt / "tokenizer.json")
    from vlp.api import build_run_method, resolve_device

    method = build_run_method(cfg, tokenizer)
    device = resolve_device(cfg.train.device)
    if cfg.task.name == "retrieval":
        load_model_weights(ckpt, method)
        _, _, _, evaluate = _retrieval_parts(cfg, method.to(device), tokenizer, rank=0)
        return evaluate(method, device)
    data = task_data(cfg)
    module = build_task(cfg, method, data)
    load_model_weights(ckpt, module)
    module.to(device)
    return evaluate_splits(module, cfg, data, tokenizer, device)


__all__ = ["TASKS", "TaskSpec", "evaluate_task", "finetune", "finetune_config", "register_task"]
