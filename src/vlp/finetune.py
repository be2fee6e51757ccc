"""`vlp finetune TASK` / `vlp eval TASK`: fine-tune a pre-trained method on a downstream task and score it.

    from vlp.finetune import finetune, evaluate_task
    run = finetune("ve", checkpoint="runs/demo/cmal")      # or checkpoint=None: same method from scratch
    metrics = evaluate_task(run)                            # val / test metrics of the fine-tuned model

A fine-tuning run directory holds `config.yaml` (model + method of the checkpoint, train + task of the
fine-tuning config), `tokenizer.json` (the checkpoint's), `task.json` (the task and its head's class
names: `write_task_info`), `metrics.jsonl`, `checkpoint/` (the task module: `backbone.*` + `head.*`) and
`eval.json`.

Configs: `finetune_<task>` (shipped) gives `train` and `task`; the model, method and tokenizer come from
the pre-trained checkpoint (`task.checkpoint`), or, for "from scratch", from `task.init` (a pre-training
config) with fresh weights, so the two differ only by pre-training. The task module is trained by the
pre-training `Trainer` (AMP, accumulation, DDP, exact resume); evaluation runs on rank 0 at the end.

Retrieval is the method itself with its retrieval objectives (the `--set` overrides its class declares in
`retrieval_finetune_overrides`), scored like pre-training (`vlp.evaluate.evaluate_method`) on `eval.split`: the world's caption pairs by default, or with
`task.data: files` user COCO / Flickr30K Karpathy files (`retrieval_files`: ALBEF/BLIP per-split lists or
Karpathy's dataset_*.json, images under `task.image_root`; `RecordPairDataset` for training,
`vlp.taskdata.file_retrieval_set` for the eval set with every caption of each image). The run directory is a
checkpoint `vlp eval retrieval --checkpoint` re-scores with the same numbers.

Precomputed region features (`task.region_features`, cmal.md §3.1, §9): the records' images are replaced by
their BUTD / UNITER regions (`vlp.taskdata.attach_region_features` -> `vlp.data.regions.RegionFeatureSource`), read with
the run's `data.*` region options (from the checkpoint's config, so a checkpoint pre-trained with
`data.source: regions` brings its class vocabulary). No image folder is read. Checked at start, each with
the key and the fix (`check_region_features`, `open_task_region_features`): the method's class must take
features (`region_feature_dim`), `method.region_feat_dim` must be the features' D (not 0), and every record's
image must have features (or, with `task.skip_bad`, its records are dropped and counted). REC then scores
the feature regions and reports `feat_acc` (`vlp.tasks.rec`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from vlp.build import build_run_method, build_tokenizer, build_world, checkpoint_dir, retrieval_set
from vlp.config import RunConfig, build_config, dump_config, load_config
from vlp.data.datasets import PairDataset, RecordPairDataset, collate
from vlp.data.records import TaskData
from vlp.data.shards import open_shard_dataset
from vlp.data.tokenizer import TextTokenizer
from vlp.evaluate import evaluate_method
from vlp.methods import method_class
from vlp.taskdata import check_region_features, file_retrieval_set, retrieval_files, task_data
from vlp.tasks.common import RecordDataset, TaskModule, predictions, task_collate
from vlp.tasks.registry import TASKS
from vlp.train import launch
from vlp.train.checkpoint import METRICS_FILE, CheckpointError, load_model_weights
from vlp.train.cpu import configure_cpu
from vlp.train.launch import select_device
from vlp.train.loop import Trainer, claim_out_dir, read_metrics
from vlp.train.precision import autocast_dtype

FINETUNE_SECTIONS = ("train", "eval", "task")  # taken from the fine-tuning config; the rest from the checkpoint
TASK_FILE = "task.json"  # a fine-tuning run's task and class names (`write_task_info`)



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
    own = [o for o in overrides or [] if o.split("=", 1)[0].strip().split(".")[0] in FINETUNE_SECTIONS]
    ft = load_config(config, own).model_dump(mode="json")  # every override is applied again at the end
    if task is not None and ft["task"]["name"] != task:
        ft["task"]["name"] = task
    if checkpoint is not None:
        ft["task"]["checkpoint"] = str(checkpoint)
    source = ft["task"]["checkpoint"]
    if source is not None:
        base = load_config(checkpoint_dir(source) / "config.yaml").model_dump(mode="json")
    else:
        base = load_config(ft["task"]["init"]).model_dump(mode="json")
    raw = {k: (ft[k] if k in FINETUNE_SECTIONS else v) for k, v in base.items()}
    objective = []
    if raw["task"]["name"] == "retrieval":  # the method's own retrieval objective (its class declares it)
        objective = list(method_class(str(raw["method"]["name"])).retrieval_finetune_overrides)
    # overrides may also target model / method / data (e.g. train.device, model.fusion.depth for tests)
    return build_config(raw, [*objective, *(overrides or [])], source=str(config))


# ------------------------------------------------------------------------------------------ parts
def build_backbone(cfg: RunConfig) -> tuple[nn.Module, TextTokenizer]:
    """The pre-trained method of `task.checkpoint` (all its weights, strict) with its tokenizer, or the
    method of `task.init` freshly initialised (seeded by train.seed) with a tokenizer trained on the world."""
    torch.manual_seed(cfg.train.seed)
    if cfg.task.checkpoint is None:
        tokenizer = build_tokenizer(cfg, build_world(cfg))
        return build_run_method(cfg, tokenizer), tokenizer
    path = checkpoint_dir(cfg.task.checkpoint)
    tokenizer = TextTokenizer.load(path / "tokenizer.json")
    method = build_run_method(cfg, tokenizer)
    fresh = tuple(method.separately_clipped())  # heads on detached inputs (a first retrieval stage) may start
    missing, unexpected = load_model_weights(path, method, strict=not fresh)  # fresh in a fine-tune
    unexplained = [k for k in missing if not k.startswith(fresh)]
    if unexplained or unexpected:
        raise CheckpointError(f"checkpoint {path} does not match {type(method).__name__} (missing: "
                              f"{', '.join(unexplained[:8]) or '-'}; not in the model: {', '.join(unexpected[:8]) or '-'})")
    return method, tokenizer


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
    spec = TASKS[cfg.task.name]
    out: dict[str, float] = {}
    for split in cfg.task.eval_splits:
        for prefix, extra in spec.eval_settings(data, split).items():
            dataset = task_dataset(cfg, data, split, tokenizer, **extra)
            pred = predictions(module, dataset, cfg.eval.batch_size, device, amp_dtype=autocast_dtype(cfg.train.precision, device))
            out.update({f"{split}/{prefix}{k}": v for k, v in spec.metrics(pred, dataset).items()})
    return out


# ------------------------------------------------------------------------------------------ entry points
def finetune(task: str | None = None, checkpoint: str | Path | None = None, config: str | Path | None = None,
             overrides: list[str] | None = None, resume: str | Path | None = None, overwrite: bool = False) -> Path:
    """Fine-tune on a downstream task, evaluate on `task.eval_splits` (retrieval: `eval.split`); returns the
    run directory.

    `resume` (a fine-tuning run or its checkpoint directory) continues an interrupted fine-tune exactly, as
    pre-training does (same arguments otherwise: the run's losses and eval.json equal an uninterrupted run's);
    a finished run only gets its eval.json written again. Without it, a `train.out_dir` that already holds a
    run is an error (`vlp.train.loop.RunExistsError`) unless `overwrite`, which removes that run's outputs."""
    if resume is not None and overwrite:
        raise ValueError("resume and overwrite exclude each other: resume continues the run, overwrite starts it over")
    cfg = finetune_config(task, checkpoint, config, overrides)
    check_region_features(cfg)  # before the backbone is built: a method that cannot take features fails now
    out_dir = Path(cfg.train.out_dir)
    with launch.distributed_session(cfg.train.device):
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        if resume is None:  # before anything is built or written: an earlier run is refused, or cleared (overwrite)
            claim_out_dir(out_dir, overwrite)
        backbone, tokenizer = build_backbone(cfg)
        if cfg.task.name == "retrieval":
            module, train_set, collate_fn, evaluate, data = _retrieval_parts(cfg, backbone, tokenizer, rank)
        else:
            data = task_data(cfg)
            module = build_task(cfg, backbone, data)
            train_set, collate_fn = task_dataset(cfg, data, "train", tokenizer), task_collate

            def evaluate(trained: nn.Module, device: torch.device) -> dict[str, float]:
                return evaluate_splits(trained, cfg, data, tokenizer, device)
        skipped = getattr(data, "skipped", None)
        if skipped:  # --skip-bad: never silent — counted in eval.json and printed with the first reasons
            print(f"{cfg.task.name}: {skipped}", file=sys.stderr)
        if rank == 0:  # only once the data is read and checked: a failed start leaves no run directory
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "config.yaml").write_text(dump_config(cfg))
            tokenizer.save(out_dir / "tokenizer.json")
            write_task_info(out_dir, cfg, data)
        launch.barrier()  # the other ranks' Trainer checks that tokenizer.json exists

        def eval_fn(trained: nn.Module, step: int) -> dict[str, float]:
            return evaluate(trained, trainer.device)

        trainer = Trainer(cfg, module, train_set, collate_fn, out_dir, eval_fn=eval_fn,
                          tokenizer_json=str(out_dir / "tokenizer.json"), side_files=[out_dir / TASK_FILE])
        records = trainer.fit(resume=resume)
        if rank == 0:
            # a resume of a finished run evaluates nothing: its final evaluation is in metrics.jsonl
            final = [r for r in records or read_metrics(out_dir / METRICS_FILE) if any(k.startswith("eval/") for k in r)]
            metrics = {k[len("eval/"):]: v for k, v in final[-1].items() if k.startswith("eval/")} if final else {}
            metrics.update({"task": cfg.task.name, "checkpoint": cfg.task.checkpoint, "steps": cfg.train.steps,
                            "train_examples": len(train_set)})
            if getattr(data, "skipped", None) is not None:  # user files (world retrieval: data is None)
                metrics["skipped_records"] = data.skipped.count
            (out_dir / "eval.json").write_text(json.dumps(metrics, indent=2))
    return out_dir


def _retrieval_parts(cfg: RunConfig, method: nn.Module, tokenizer: Any, rank: int,
                     train: bool = True) -> tuple[nn.Module, Any, Any, Any, TaskData | None]:
    """Retrieval fine-tuning: the method itself (with its `retrieval_finetune_overrides`) on caption pairs,
    scored like pre-training (`evaluate_method`, by the method's retrieval protocols) on
    `eval.split` (the first `eval.num_images` images, every image against all the split's captions).

    `task.data: world`: the world's train pairs (`task.train_size` pairs, a prefix of the train split).
    `task.data: webdataset`: the pairs of the WebDataset shards `data.urls` (`vlp.data.shards`, streamed; the
    world's `eval.split`, or user Karpathy files when `task.annotations` names `eval.split`).
    `task.data: files`: the train split of user Karpathy files (`retrieval_files`; the first
    `task.train_size` (image, caption) pairs, image-major, 0 = all) and their `eval.split` (`file_retrieval_set`).
    Returns (module, train dataset, collate, evaluate(module, device), the file records or None);
    `train=False` (re-scoring) reads only the eval split and builds no train dataset."""
    if cfg.task.data == "webdataset" and cfg.eval.split in cfg.task.annotations:
        # streamed training pairs (data.urls), scored on the eval split of user Karpathy files
        dataset = open_shard_dataset(cfg, tokenizer) if train else None
        data = retrieval_files(cfg, [cfg.eval.split])
        rset = file_retrieval_set(cfg, data, tokenizer) if rank == 0 else None
    elif cfg.task.data in ("world", "webdataset"):
        world = build_world(cfg)
        if cfg.task.data == "webdataset":  # streamed training pairs (data.urls), e.g. shards of the world
            dataset = open_shard_dataset(cfg, tokenizer) if train else None
        else:
            dataset = PairDataset(world.split("train"), tokenizer, cfg.data.max_text_len, cfg.task.train_size,
                                  max_words=cfg.data.max_text_len) if train else None
        rset = retrieval_set(cfg, world, tokenizer) if rank == 0 else None
        data = None
    else:
        data = retrieval_files(cfg, ["train", cfg.eval.split] if train else [cfg.eval.split])
        dataset = None
        if train:
            records = data.splits["train"]
            pairs = sum(len(r.captions) for r in records)
            budget = pairs if cfg.task.train_size <= 0 else min(cfg.task.train_size, pairs)
            dataset = RecordPairDataset(records, data.images, tokenizer, cfg.data.max_text_len,
                                        cfg.model.vision.image_size, budget, max_words=cfg.data.max_text_len,
                                        skip_bad=cfg.task.skip_bad)
        rset = file_retrieval_set(cfg, data, tokenizer) if rank == 0 else None

    def evaluate(trained: nn.Module, device: torch.device) -> dict[str, float]:
        return evaluate_method(trained, rset, cfg, device)

    return method, dataset, collate, evaluate, data


def evaluate_task(run: str | Path, overrides: list[str] | None = None) -> dict[str, float]:
    """Re-evaluate a fine-tuning run directory (or its checkpoint/) on its task's eval splits."""
    path = Path(run)
    ckpt = path / "checkpoint" if (path / "checkpoint").is_dir() else path
    if not (ckpt / "config.yaml").is_file():
        raise FileNotFoundError(f"{ckpt / 'config.yaml'} not found: pass a `vlp finetune` run directory")
    raw = yaml.safe_load((ckpt / "config.yaml").read_text())
    cfg = build_config(raw, overrides, source=str(ckpt / "config.yaml"))
    tokenizer = TextTokenizer.load(ckpt / "tokenizer.json")
    method = build_run_method(cfg, tokenizer)
    device = select_device(cfg.train.device)
    print(f"[eval] {configure_cpu(cfg.train, 0, device).describe()}", file=sys.stderr, flush=True)
    if cfg.task.name == "retrieval":
        load_model_weights(ckpt, method)
        _, _, _, evaluate, _ = _retrieval_parts(cfg, method.to(device), tokenizer, rank=0, train=False)
        return evaluate(method, device)
    data = task_data(cfg)
    info = read_task_info(path)
    if info is not None and info.get("labels") is not None:  # the classes the head was trained on
        TASKS[cfg.task.name].restore_labels(data, info["labels"])
    module = build_task(cfg, method, data)
    load_model_weights(ckpt, module)
    module.to(device)
    return evaluate_splits(module, cfg, data, tokenizer, device)


# ------------------------------------------------------------------------------------------ task.json
def write_task_info(out_dir: Path, cfg: RunConfig, data: TaskData | None) -> None:
    """`<run>/task.json` (also copied into every checkpoint) = {"task": name, "labels": the head's class names
    (index = class id) or null}: what predictions on new data need besides the weights (`vlp predict`,
    `vlp.load`), e.g. the VQA answer vocabulary, which otherwise would have to be rebuilt from the training
    annotations. REC and retrieval have no classes (null)."""
    spec = TASKS.get(cfg.task.name)
    labels = spec.labels(cfg, data) if spec is not None and data is not None else None
    (out_dir / TASK_FILE).write_text(json.dumps({"task": cfg.task.name, "labels": labels}, indent=1))


def read_task_info(run: str | Path) -> dict[str, Any] | None:
    """The `task.json` of a fine-tuning run, given the run or its checkpoint/ directory: {"task", "labels"}.
    None when there is none (a pre-training run, or a fine-tune written before vlp saved it); ValueError
    naming the file when it is not such an object."""
    path = Path(run)
    folder = path.parent if path.name in ("checkpoint", "checkpoint.prev") and not (path / TASK_FILE).is_file() else path
    file = folder / TASK_FILE
    if not file.is_file():
        return None
    try:
        info = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{file}: not valid JSON ({err}); restore it from the fine-tuning run or run it again") from None
    labels = info.get("labels") if isinstance(info, dict) else None
    if not isinstance(info, dict) or not isinstance(info.get("task"), str) or not (
            labels is None or (isinstance(labels, list) and all(isinstance(x, str) for x in labels))):
        raise ValueError(f'{file}: expected {{"task": name, "labels": [str, ...] or null}}; restore it from the '
                         f'fine-tuning run or run it again')
    return info


__all__ = ["TASK_FILE", "build_backbone", "build_task", "evaluate_splits", "evaluate_task", "finetune",
           "finetune_config", "read_task_info", "task_dataset", "write_task_info"]
