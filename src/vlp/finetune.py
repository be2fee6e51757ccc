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

Retrieval is the method itself with its retrieval objectives (`RETRIEVAL_OBJECTIVES`), scored like
pre-training (`vlp.api.evaluate_method`) on `eval.split`: the world's caption pairs by default, or with
`task.data: files` user COCO / Flickr30K Karpathy files (`retrieval_files`: ALBEF/BLIP per-split lists or
Karpathy's dataset_*.json, images under `task.image_root`; `RecordPairDataset` for training,
`file_retrieval_set` for the eval set with every caption of each image). The run directory is a
checkpoint `vlp eval retrieval --checkpoint` re-scores with the same numbers.

Precomputed region features (`task.region_features`, cmal.md §3.1, §9): the records' images are replaced by
their BUTD / UNITER regions (`attach_region_features` -> `vlp.data.regions.RegionFeatureSource`), read with
the run's `data.*` region options (from the checkpoint's config, so a checkpoint pre-trained with
`data.source: regions` brings its class vocabulary). No image folder is read. Checked at start, each with
the key and the fix (`check_region_features`, `open_task_region_features`): the method must take features
(CMAL; ALBEF encodes pixels), `method.region_feat_dim` must be the features' D (not 0), and every record's
image must have features (or, with `task.skip_bad`, its records are dropped and counted). REC then scores
the feature regions and reports `feat_acc` (`vlp.tasks.rec`).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from vlp.config import ConfigError, RunConfig, build_config, dump_config, load_config
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


TASKS: dict[str, TaskSpec] = {
    "ve": TaskSpec(VEDataset, lambda backbone, cfg, data: VETask(backbone, dropout=cfg.task.dropout),
                   lambda pred, dataset: ve_metrics(pred, dataset.records)),
    "rec": TaskSpec(RECDataset, lambda backbone, cfg, data: RECTask(backbone, cfg.task.dropout),
                    lambda pred, dataset: rec_metrics(dataset.chosen_boxes(pred), dataset.records),
                    lambda cfg, data: {"boxes": _rec_boxes(cfg)}, _rec_settings),
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
        from vlp.api import checkpoint_dir

        base = load_config(checkpoint_dir(source) / "config.yaml").model_dump(mode="json")
    else:
        base = load_config(ft["task"]["init"]).model_dump(mode="json")
    raw = {k: (ft[k] if k in FINETUNE_SECTIONS else v) for k, v in base.items()}
    objective = RETRIEVAL_OBJECTIVES.get(raw["method"]["name"], []) if raw["task"]["name"] == "retrieval" else []
    # overrides may also target model / method / data (e.g. train.device, model.fusion.depth for tests)
    return build_config(raw, [*objective, *(overrides or [])], source=str(config))


# ------------------------------------------------------------------------------------------ parts
def build_backbone(cfg: RunConfig) -> tuple[nn.Module, TextTokenizer]:
    """The pre-trained method of `task.checkpoint` (all its weights, strict) with its tokenizer, or the
    method of `task.init` freshly initialised (seeded by train.seed) with a tokenizer trained on the world."""
    from vlp.api import build_run_method, build_tokenizer, build_world, checkpoint_dir

    torch.manual_seed(cfg.train.seed)
    if cfg.task.checkpoint is None:
        tokenizer = build_tokenizer(cfg, build_world(cfg))
        return build_run_method(cfg, tokenizer), tokenizer
    path = checkpoint_dir(cfg.task.checkpoint)
    tokenizer = TextTokenizer.load(path / "tokenizer.json")
    method = build_run_method(cfg, tokenizer)
    load_model_weights(path, method)
    return method, tokenizer


def task_data(cfg: RunConfig) -> TaskData:
    """The task's records per split (train + `task.eval_splits`) and their image source."""
    name = cfg.task.name
    splits = ["train", *[s for s in cfg.task.eval_splits if s != "train"]]
    check_region_features(cfg)
    if cfg.task.data == "world":
        from vlp.data.world_tasks import world_task_data

        world = World(seed=cfg.data.world_seed, image_size=cfg.model.vision.image_size)
        counts = {s: (cfg.task.train_size if s == "train" else cfg.task.eval_size) for s in splits}
        return attach_region_features(cfg, world_task_data(world, name, splits, counts))
    data = attach_region_features(cfg, read_task_files(cfg, splits))
    for split in list(data.splits):  # caps: the first train_size / eval_size records of each split
        cap = cfg.task.train_size if split == "train" else cfg.task.eval_size
        if cap > 0:
            data.splits[split] = data.splits[split][:cap]
    return data


def read_task_files(cfg: RunConfig, splits: list[str]) -> TaskData:
    """Records of user files (`task.data: files`, `task.annotations`, `task.image_root`) or of the
    packaged easy-VQA set (`task.data: easy-vqa`), through the `vlp.data.formats` readers. With
    `task.region_features` no image folder is read or checked (the readers get no image root): the
    records' images are checked against the features instead (`attach_region_features`)."""
    from vlp.data import formats

    task, files, root, skip = cfg.task.name, cfg.task.annotations, cfg.task.image_root, cfg.task.skip_bad
    if cfg.task.region_features is not None and task != "retrieval":
        root = None  # images are their precomputed regions: no pixels are read, so none must exist
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


# ------------------------------------------------------------------------------------------ region features
REGION_FEATURE_METHODS = ("cmal",)  # methods whose encode_pair takes precomputed region_feats


def check_region_features(cfg: RunConfig) -> None:
    """ConfigError, before anything is built, when `task.region_features` cannot work with this run:
    retrieval (reads caption pairs, not task records), a method that encodes pixels (ALBEF), a CMAL whose
    `method.region_feat_dim` is 0 (its region embedding takes ViT-grid features), or an explicit
    `task.rec_boxes` (with features the candidates are the feature regions). No-op without the key."""
    t = cfg.task
    if t.region_features is None:
        return
    if t.name == "retrieval":
        raise ConfigError("task.region_features is for the record tasks (ve, rec, vqa, nlvr2); retrieval fine-tuning "
                          "reads caption pairs: pre-train / continue on features with data.source: regions instead, "
                          "or drop task.region_features")
    if cfg.method.name not in REGION_FEATURE_METHODS:
        raise ConfigError(
            f"task.region_features gives precomputed region features instead of images, but method "
            f"{cfg.method.name!r} encodes pixels and cannot take them: use a region-input method such as CMAL "
            f"(task.init: a CMAL config such as cmal_tiny, or a CMAL checkpoint), or drop task.region_features "
            f"and give task.image_root")
    if cfg.method.region_feat_dim <= 0:
        source = (f"the checkpoint {t.checkpoint} was pre-trained on image regions (RoIAlign of the ViT grid) and "
                  f"cannot read detector features: fine-tune a checkpoint pre-trained on features (data.source: "
                  f"regions), or start from scratch with --set method.region_feat_dim=D" if t.checkpoint is not None
                  else "set it to the features' dim D: --set method.region_feat_dim=D (BUTD: 2048)")
        raise ConfigError(f"task.region_features needs method.region_feat_dim = the features' dim, but it is "
                          f"{cfg.method.region_feat_dim} (0 = regions RoI-pooled from the ViT grid); {source}")
    if t.name == "rec" and t.rec_boxes is not None:
        raise ConfigError(f"task.rec_boxes={t.rec_boxes} pools candidate boxes from pixels; with task.region_features "
                          f"the candidates are the feature file's regions of each image (metric feat_acc): leave "
                          f"task.rec_boxes unset")


def open_task_region_features(cfg: RunConfig, probe: Sequence[str] = ()) -> Any:
    """`task.region_features` opened as a `RegionFeatureSource`, with pre-training's `data.*` options (class
    vocabulary, faithful labels, adaptive N) and `feat_dim` = `method.region_feat_dim`. The features of the
    first image id in `probe` that has some are read now, so a wrong feature dim or schema fails before
    training (ConfigError naming both keys for the dim)."""
    from vlp.data.regions import RegionFeatureSource, open_region_features, read_class_vocab

    t, d = cfg.task, cfg.data
    path = Path(t.region_features)
    if not path.exists():
        raise FileNotFoundError(f"task.region_features not found: {path}; give one .npz of many images or a folder "
                                f"of <image_id>.npz (the schema of pre-training's data.features)")
    num_classes = len(read_class_vocab(d.class_vocab)) if d.class_vocab is not None else None
    reader = open_region_features(path, feat_dim=None, num_classes=num_classes,
                                  faithful_labels=d.region_labels_faithful, adaptive=d.adaptive_regions,
                                  conf_th=d.region_conf_th, min_bb=d.region_min_bb, max_bb=d.region_max_bb)
    source = RegionFeatureSource(reader)
    want = cfg.method.region_feat_dim
    first = next((i for i in probe if source.key(i) is not None), None)
    if first is not None:
        dim = int(source.region_features(first).features.shape[1])
        if dim != want:
            fix = ("the checkpoint's region embedding takes that dim: use features of the detector it was "
                   "pre-trained on" if t.checkpoint is not None else f"set method.region_feat_dim: {dim}")
            raise ConfigError(f"task.region_features ({path}): features have dim {dim} (image {first!r}) but "
                              f"method.region_feat_dim is {want}; {fix}")
    reader.feat_dim = want  # every later read checks it too
    return source


def attach_region_features(cfg: RunConfig, data: TaskData) -> TaskData:
    """With `task.region_features`: make `data.images` the `RegionFeatureSource`, after checking that every
    record's image(s) of every split have features. Records without are an error naming a few image ids and
    where they were looked for, or, with `task.skip_bad`, dropped and counted in `data.skipped` (as missing
    images are). Without the key, `data` is returned unchanged."""
    if cfg.task.region_features is None:
        return data
    dataset = TASKS[cfg.task.name].dataset if cfg.task.name in TASKS else RecordDataset
    ids_of = dataset.record_image_ids
    source = open_task_region_features(cfg, probe=[i for rows in data.splits.values() for r in rows for i in ids_of(r)])
    skipped = getattr(data, "skipped", None)
    for split, rows in data.splits.items():
        needed = [i for r in rows for i in ids_of(r)]
        absent_ids = source.missing(needed)  # distinct, in record order
        if not absent_ids:
            continue
        if not (cfg.task.skip_bad and skipped is not None):
            raise FileNotFoundError(source.missing_message(absent_ids, len(set(needed)),
                                                           f"the {cfg.task.name} split '{split}'"))
        missing = set(absent_ids)
        kept = []
        for r in rows:
            absent = [i for i in ids_of(r) if i in missing]
            if absent:
                skipped.add(f"{cfg.task.name} split '{split}': no region features for image {absent[0]!r} "
                            f"(looked up as {source.location(absent[0])})")
            else:
                kept.append(r)
        data.splits[split] = kept
    data.images = source
    return data


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
    """Fine-tune on a downstream task, evaluate on `task.eval_splits` (retrieval: `eval.split`); returns the
    run directory."""
    cfg = finetune_config(task, checkpoint, config, overrides)
    check_region_features(cfg)  # before the backbone is built: a method that cannot take features fails now
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
            if getattr(data, "skipped", None) is not None:  # user files (world retrieval: data is None)
                metrics["skipped_records"] = data.skipped.count
            (out_dir / "eval.json").write_text(json.dumps(metrics, indent=2))
    return out_dir


def retrieval_files(cfg: RunConfig, splits: list[str]) -> TaskData:
    """Caption records of user Karpathy files for `splits` (`task.data: files`), read by `read_task_files`
    (`vlp.data.formats.read_karpathy`): `task.annotations` maps each split to its file — an ALBEF/BLIP list
    (`coco_karpathy_test.json`, `flickr30k_train.json`: the whole file is that split) or Karpathy's original
    `dataset_coco.json` / `dataset_flickr30k.json` (the same file under every split: each image's "split"
    picks it; restval joins train). Images resolve under `task.image_root` (`FolderImages`); a missing or
    malformed record raises naming it and the file, or is counted with `task.skip_bad` (`--skip-bad`).
    A split with no images is an error naming the file. Works whatever `task.name` the config carries
    (a pre-training checkpoint scored by `vlp eval retrieval --data files`)."""
    if cfg.task.data != "files":
        raise ValueError(f"retrieval on user files needs task.data=files (--data files), got '{cfg.task.data}'")
    if cfg.task.image_root is None:
        raise ValueError("retrieval on user Karpathy files needs task.image_root: the folder the files' image paths "
                         "are relative to (COCO: the folder holding train2014/ and val2014/; Flickr30K: flickr30k-images/)")
    for split in splits:
        if split not in cfg.task.annotations:
            have = ", ".join(cfg.task.annotations) or "none"
            raise ValueError(
                f"task.annotations has no file for split '{split}' (has: {have}); give it, e.g. --set "
                f"task.annotations.{split}=coco_karpathy_{split}.json (ALBEF/BLIP list) or the same dataset_coco.json "
                f"(Karpathy's original file) for every split")
    if cfg.task.name != "retrieval":
        cfg = cfg.model_copy(update={"task": cfg.task.model_copy(update={"name": "retrieval"})})
    data = read_task_files(cfg, splits)
    for split in splits:
        if not data.splits.get(split):
            skipped = getattr(data, "skipped", None)
            note = f" ({skipped.count} bad record(s) skipped with --skip-bad)" if skipped else ""
            raise ValueError(
                f"{cfg.task.annotations[split]} holds no images of split '{split}'{note}: Karpathy's original "
                f"dataset_*.json marks each image's split (train, restval, val, test); an ALBEF/BLIP list is one split "
                f"per file. Point task.annotations.{split} at the right file, or pick another eval.split (val | test)")
    return data


def file_retrieval_set(cfg: RunConfig, data: TaskData, tokenizer: Any) -> Any:
    """The `RetrievalSet` of user files: the first `eval.num_images` images of `eval.split` (0, or more than
    the split has = all of them) with ALL their captions (COCO 5-7, Flickr 5), resized to the model's
    image size; no boxes (CMAL ranks with grid-cell regions) and no hard negatives."""
    from vlp.data.datasets import RetrievalSet

    records = data.splits[cfg.eval.split]
    count = len(records) if cfg.eval.num_images <= 0 else min(cfg.eval.num_images, len(records))
    return RetrievalSet.build(records, tokenizer, cfg.data.max_text_len, count, captions_per_image=None,
                              image_size=cfg.model.vision.image_size, max_words=cfg.data.max_text_len,
                              image_source=data.images)


def _retrieval_parts(cfg: RunConfig, method: nn.Module, tokenizer: Any, rank: int,
                     train: bool = True) -> tuple[nn.Module, Any, Any, Any, TaskData | None]:
    """Retrieval fine-tuning: the method itself (with `RETRIEVAL_OBJECTIVES`) on caption pairs, scored like
    pre-training (`evaluate_method`: ITC + ITM re-ranking for fusion models, ITM over all pairs for CMAL) on
    `eval.split` (the first `eval.num_images` images, every image against all the split's captions).

    `task.data: world`: the world's train pairs (`task.train_size` pairs, a prefix of the train split).
    `task.data: files`: the train split of user Karpathy files (`retrieval_files`; the first
    `task.train_size` (image, caption) pairs, image-major, 0 = all) and their `eval.split` (`file_retrieval_set`).
    Returns (module, train dataset, collate, evaluate(module, device), the file records or None);
    `train=False` (re-scoring) reads only the eval split and builds no train dataset."""
    from vlp.api import build_world, evaluate_method, retrieval_set
    from vlp.data.datasets import PairDataset, RecordPairDataset, collate

    if cfg.task.data == "world":
        world = build_world(cfg)
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
                                        cfg.model.vision.image_size, budget, max_words=cfg.data.max_text_len)
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
    from vlp.api import build_run_method, resolve_device

    method = build_run_method(cfg, tokenizer)
    device = resolve_device(cfg.train.device)
    if cfg.task.name == "retrieval":
        load_model_weights(ckpt, method)
        _, _, _, evaluate, _ = _retrieval_parts(cfg, method.to(device), tokenizer, rank=0, train=False)
        return evaluate(method, device)
    data = task_data(cfg)
    module = build_task(cfg, method, data)
    load_model_weights(ckpt, module)
    module.to(device)
    return evaluate_splits(module, cfg, data, tokenizer, device)


__all__ = ["TASKS", "TaskSpec", "attach_region_features", "check_region_features", "evaluate_task",
           "file_retrieval_set", "finetune", "finetune_config", "open_task_region_features", "register_task",
           "retrieval_files"]
