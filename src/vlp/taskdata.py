"""Downstream data of a run: task records per split, user files, precomputed region features.

`task_data(cfg)` gives the records of `task.name` (the world's labels, user files through the
`vlp.data.formats` readers, or the packaged easy-VQA set) with their image source; with
`task.region_features` the images are replaced by their precomputed regions (`attach_region_features`),
after `check_region_features` asked the method's class whether it takes them. `retrieval_files` and
`file_retrieval_set` read user Karpathy files for retrieval fine-tuning and evaluation.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vlp.build import method_class_of
from vlp.config import ConfigError, RunConfig
from vlp.data import formats
from vlp.data.datasets import RetrievalSet
from vlp.data.records import TaskData
from vlp.data.regions import RegionFeatureSource, open_region_features, read_class_vocab
from vlp.data.world import World
from vlp.data.world_tasks import world_task_data
from vlp.tasks.common import RecordDataset
from vlp.tasks.registry import TASKS


def task_data(cfg: RunConfig) -> TaskData:
    """The task's records per split (train + `task.eval_splits`) and their image source."""
    name = cfg.task.name
    splits = ["train", *[s for s in cfg.task.eval_splits if s != "train"]]
    check_region_features(cfg)
    if cfg.task.data == "world":
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


def check_region_features(cfg: RunConfig) -> None:
    """ConfigError, before anything is built, when `task.region_features` cannot work with this run:
    retrieval (reads caption pairs, not task records), a method that encodes pixels (its class says `region_feature_dim` None), one whose
    `method.region_feat_dim` is 0 (its region embedding takes ViT-grid features), or an explicit
    `task.rec_boxes` (with features the candidates are the feature regions). No-op without the key."""
    t = cfg.task
    if t.region_features is None:
        return
    if t.name == "retrieval":
        raise ConfigError("task.region_features is for the record tasks (ve, rec, vqa, nlvr2); retrieval fine-tuning "
                          "reads caption pairs: pre-train / continue on features with data.source: regions instead, "
                          "or drop task.region_features")
    feat_dim = method_class_of(cfg).region_feature_dim(cfg)
    if feat_dim is None:
        raise ConfigError(
            f"task.region_features gives precomputed region features instead of images, but method "
            f"{cfg.method.name!r} encodes pixels and cannot take them: use a method that takes region features "
            f"(task.init: a config of such a method, or one of its checkpoints), or drop task.region_features "
            f"and give task.image_root")
    if feat_dim <= 0:
        source = (f"the checkpoint {t.checkpoint} was pre-trained on image regions (RoIAlign of the ViT grid) and "
                  f"cannot read detector features: fine-tune a checkpoint pre-trained on features (data.source: "
                  f"regions), or start from scratch with --set method.region_feat_dim=D" if t.checkpoint is not None
                  else "set it to the features' dim D: --set method.region_feat_dim=D (BUTD: 2048)")
        raise ConfigError(f"task.region_features needs method.region_feat_dim = the features' dim, but it is "
                          f"{feat_dim} (0 = regions RoI-pooled from the ViT grid); {source}")
    if t.name == "rec" and t.rec_boxes is not None:
        raise ConfigError(f"task.rec_boxes={t.rec_boxes} pools candidate boxes from pixels; with task.region_features "
                          f"the candidates are the feature file's regions of each image (metric feat_acc): leave "
                          f"task.rec_boxes unset")


def open_task_region_features(cfg: RunConfig, probe: Sequence[str] = ()) -> Any:
    """`task.region_features` opened as a `RegionFeatureSource`, with pre-training's `data.*` options (class
    vocabulary, faithful labels, adaptive N) and `feat_dim` = `method.region_feat_dim`. The features of the
    first image id in `probe` that has some are read now, so a wrong feature dim or schema fails before
    training (ConfigError naming both keys for the dim)."""
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
    want = method_class_of(cfg).region_feature_dim(cfg)
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
    image size; no boxes (region methods rank with grid-cell regions) and no hard negatives. With
    `task.skip_bad` an undecodable image is left out with its captions and counted in `data.skipped`."""
    records = data.splits[cfg.eval.split]
    count = len(records) if cfg.eval.num_images <= 0 else min(cfg.eval.num_images, len(records))
    return RetrievalSet.build(records, tokenizer, cfg.data.max_text_len, count, captions_per_image=None,
                              image_size=cfg.model.vision.image_size, max_words=cfg.data.max_text_len,
                              image_source=data.images, on_bad=data.skipped.add if cfg.task.skip_bad else None)


__all__ = ["attach_region_features", "check_region_features", "file_retrieval_set", "open_task_region_features",
           "read_task_files", "retrieval_files", "task_data"]
