"""The Python API; the CLI (`vlp ...`) is a thin shell over these functions.

    from vlp.api import pretrain, evaluate_checkpoint, show_world
    run_dir = pretrain("albef_tiny", overrides=["train.steps=50"])
    metrics = evaluate_checkpoint(run_dir / "checkpoint")

A run directory holds: `config.yaml` (resolved), `tokenizer.json`, `metrics.jsonl`, `checkpoint/`,
`eval.json`, `loss_curve.png` and `retrieval_examples.png`.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from vlp.config import RunConfig, dump_config, load_config
from vlp.data.datasets import PairDataset, RetrievalSet, collate
from vlp.data.tokenizer import TextTokenizer
from vlp.data import lexicon
from vlp.data.render import render_grid
from vlp.data.world import World, WorldSplit
from vlp.methods import build_method
from vlp.methods.cmal import Cmal, swap_fill
from vlp.models.losses import IGNORE_INDEX
from vlp.models.model import VLModel
from vlp.tasks.retrieval import eval_mode, evaluate_retrieval, evaluate_retrieval_itm_all, retrieval_examples
from vlp.train.checkpoint import load_model_weights
from vlp.train import launch
from vlp.train.loop import Trainer
from vlp.train.sampler import KEY_SEED_STRIDE
from vlp.viz import (
    CmalPromptRegion, CmalPromptToken, CmalPromptView, plot_cmal_prompt, plot_loss_curve, plot_retrieval_examples,
)

EVAL_SPLIT_SIZE = 1000  # images in each of val / test / compositional
# Methods evaluated by retrieval at the end of pre-training. ALBEF: ITC ranking + ITM re-ranking over ViT
# tokens (`evaluate_retrieval`). CMAL trains no ITC and feeds region embeddings to a single-stream
# encoder: it is ranked by its ITM score over ALL (image, text) pairs (UNITER convention,
# `evaluate_retrieval_itm_all`), I·Tn = 5·I² forwards, so CMAL configs keep eval.num_images small
# (100 images -> 50k pairs on CPU).
RETRIEVAL_EVAL_METHODS = {"albef", "cmal"}
ITM_ALL_EVAL_METHODS = {"cmal"}


def build_world(cfg: RunConfig) -> World:
    """The embedded world at the model's image size; budgets are prefixes of its train split."""
    return World(
        seed=cfg.data.world_seed,
        image_size=cfg.model.vision.image_size,
        sizes={
            "train": cfg.data.train_images,
            "val": EVAL_SPLIT_SIZE,
            "test": EVAL_SPLIT_SIZE,
            "compositional": EVAL_SPLIT_SIZE,
        },
    )


def world_class_words() -> list[set[str]]:
    """Words naming each object class of the world (index = class id): CMAL's anchor lexicon."""
    return [lexicon.class_words(k) for k in range(len(lexicon.CLASSES))]


def class_words_for(cfg: RunConfig) -> list:
    """The object-class vocabulary a run's method was built with: the world's lexicon, or the detector's
    `data.class_vocab` (objects_vocab.txt) for precomputed regions; none for box-less user images.
    Rebuilding a checkpoint's method needs the same list (CMAL's region head has one class per entry)."""
    if cfg.data.source == "world":
        return world_class_words()
    if cfg.data.class_vocab is not None:
        from vlp.data.regions import read_class_vocab

        return read_class_vocab(cfg.data.class_vocab)
    return []


def build_tokenizer(cfg: RunConfig, world: World) -> TextTokenizer:
    if cfg.data.tokenizer == "bert":
        return TextTokenizer.bert_uncased()
    return TextTokenizer.train_on_world(world, vocab_size=cfg.data.vocab_size)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is visible; use train.device=cpu or auto")
    return torch.device(name)


def retrieval_set(cfg: RunConfig, world: World, tokenizer: TextTokenizer) -> RetrievalSet:
    if cfg.eval.num_images > EVAL_SPLIT_SIZE:
        raise ValueError(f"eval.num_images={cfg.eval.num_images} exceeds the world's {cfg.eval.split} split ({EVAL_SPLIT_SIZE} images)")
    return RetrievalSet.build(
        world.split(cfg.eval.split), tokenizer, cfg.data.max_text_len, cfg.eval.num_images, max_words=cfg.data.max_text_len
    )


def _amp_dtype(cfg: RunConfig, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for evaluation: the training precision, with fp16 falling back to bf16 on CPU."""
    amp = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.train.precision]
    return torch.bfloat16 if amp is torch.float16 and device.type == "cpu" else amp


def run_retrieval_eval(model: VLModel, rset: RetrievalSet, cfg: RunConfig, device: torch.device) -> dict[str, float]:
    """Fusion-model retrieval: ITC ranking + ITC top-k re-ranked by ITM (ALBEF protocol); with
    `eval.itm_all` also the ITM score over all pairs (`itm_all/*`, the protocol CMAL is ranked by)."""
    amp = _amp_dtype(cfg, device)
    metrics = evaluate_retrieval(
        model, rset, batch_size=cfg.eval.batch_size, k_rerank=cfg.eval.k_rerank, device=device, amp_dtype=amp
    )
    if cfg.eval.itm_all:
        with eval_mode(model):
            itm_all = evaluate_retrieval_itm_all(
                lambda image_tokens, ids, mask: model.itm_score(image_tokens, ids, mask), rset,
                batch_size=cfg.eval.batch_size, device=device, amp_dtype=amp,
                encode=lambda images, boxes, region_mask: (model.encode_image(images).tokens,),
            )
        metrics.update({k: v for k, v in itm_all.items() if k.startswith("itm_all/") or k == "itm_forwards"})
    return metrics


def run_itm_all_eval(method: Any, rset: RetrievalSet, cfg: RunConfig, device: torch.device) -> dict[str, float]:
    """CMAL retrieval: ITM score of every (image, text) pair of `rset` (cost I·Tn single-stream forwards;
    see `evaluate_retrieval_itm_all`). Region features are computed once per image (`encode_regions`)."""
    with eval_mode(method):
        return evaluate_retrieval_itm_all(
            method.itm_scores_from_regions, rset, batch_size=cfg.eval.batch_size,
            device=device, encode=method.encode_regions, amp_dtype=_amp_dtype(cfg, device),
        )


def write_retrieval_figure(model: VLModel, rset: RetrievalSet, cfg: RunConfig, device: torch.device, png: Path) -> None:
    queries, topk = retrieval_examples(model, rset, num_queries=6, k=5, batch_size=cfg.eval.batch_size, device=device)
    plot_retrieval_examples(rset.captions, rset.images, queries, topk, rset.txt2img, png)


def pretrain(config: str | Path | RunConfig, overrides: list[str] | None = None, resume: str | Path | None = None) -> Path:
    """Pre-train a method on the configured data; returns the run directory.

    Works unchanged under `torchrun` (DDP; gloo on CPU, NCCL on CUDA). Evaluation, plots and the
    final table are produced on rank 0.
    """
    cfg = config if isinstance(config, RunConfig) else load_config(config, overrides)
    out_dir = Path(cfg.train.out_dir)
    with launch.distributed_session(cfg.train.device):
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        # User data (data.source: regions | karpathy, vlp.data.regions) brings its own tokenizer, dataset,
        # collate function and class words; the embedded world is built for data.source: world only.
        from vlp.data.regions import open_pretrain_source

        source = open_pretrain_source(cfg) if cfg.data.source != "world" else None
        world = build_world(cfg) if source is None else None
        tokenizer = build_tokenizer(cfg, world) if source is None else source.tokenizer
        if rank == 0:
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "config.yaml").write_text(dump_config(cfg))
            tokenizer.save(out_dir / "tokenizer.json")
        launch.barrier()  # the other ranks' Trainer checks that tokenizer.json exists
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        model = VLModel(cfg.model, vocab_size=tokenizer.vocab_size, pad_id=tokenizer.pad_id)
        method = build_method(cfg, model, tokenizer,
                              class_words=world_class_words() if source is None else source.class_words)
        if source is None:
            dataset = PairDataset(
                world.split("train"), tokenizer, cfg.data.max_text_len, cfg.data.budget, max_words=cfg.data.max_text_len
            )
            collate_fn = collate
        else:
            dataset, collate_fn = source.dataset, source.collate_fn
        # Same on every rank: the Trainer calls eval_fn on rank 0 only, but every rank must take part in
        # the barrier that follows an eval (with eval_fn=None a rank skips it and rank 0 is left waiting).
        # Retrieval is evaluated on the world's test split, so only for runs trained on the world.
        evaluate = source is None and cfg.method.name in RETRIEVAL_EVAL_METHODS
        rset = retrieval_set(cfg, world, tokenizer) if evaluate and rank == 0 else None

        def eval_fn(trained: torch.nn.Module, step: int) -> dict[str, float]:
            return evaluate_method(trained, rset, cfg, trainer.device)

        trainer = Trainer(
            cfg, method, dataset, collate_fn, out_dir,
            eval_fn=eval_fn if evaluate else None, tokenizer_json=str(out_dir / "tokenizer.json"),
        )
        records = trainer.fit(resume=resume)
        if rank == 0:
            final = [r for r in records if any(k.startswith("eval/") for k in r)]
            if final:
                (out_dir / "eval.json").write_text(json.dumps(final[-1], indent=2))
            plot_loss_curve(out_dir / "metrics.jsonl", out_dir / "loss_curve.png")
        if evaluate and rank == 0 and cfg.method.name not in ITM_ALL_EVAL_METHODS:  # ITC-ranked figure: no ITC in CMAL
            write_retrieval_figure(method.model, rset, cfg, trainer.device, out_dir / "retrieval_examples.png")
    return out_dir


def build_run_method(cfg: RunConfig, tokenizer: TextTokenizer) -> torch.nn.Module:
    """A freshly initialised `VLModel` wrapped in the run's method, built with the run's class vocabulary
    (`class_words_for`): the shape every checkpoint of `cfg` loads into."""
    model = VLModel(cfg.model, vocab_size=tokenizer.vocab_size, pad_id=tokenizer.pad_id)
    return build_method(cfg, model, tokenizer, class_words=class_words_for(cfg))


def checkpoint_dir(checkpoint: str | Path) -> Path:
    """The checkpoint directory of `checkpoint` (a checkpoint or the run directory holding one), checked
    to hold config, tokenizer and weights."""
    path = Path(checkpoint)
    if (path / "checkpoint").is_dir():
        path = path / "checkpoint"
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {path} (pass the run's checkpoint/ folder)")
    for name in ("config.yaml", "tokenizer.json", "model.safetensors"):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path / name} is missing: {path} is not a complete vlp checkpoint")
    return path


def load_checkpoint_model(
    checkpoint: str | Path, overrides: list[str] | None = None
) -> tuple[RunConfig, TextTokenizer, VLModel]:
    """Rebuild config (+ `overrides`, e.g. eval settings), tokenizer and the shared `VLModel` from a
    checkpoint directory or the run directory holding one (method-owned modules are not loaded: use
    `load_checkpoint_method` for those)."""
    path = checkpoint_dir(checkpoint)
    cfg = load_config(path / "config.yaml", overrides)
    tokenizer = TextTokenizer.load(path / "tokenizer.json")
    model = VLModel(cfg.model, vocab_size=tokenizer.vocab_size, pad_id=tokenizer.pad_id)
    load_model_weights(path, model, prefix="model.")
    return cfg, tokenizer, model


def load_checkpoint_method(
    checkpoint: str | Path, overrides: list[str] | None = None
) -> tuple[RunConfig, TextTokenizer, torch.nn.Module]:
    """Like `load_checkpoint_model` but the whole pre-training method (its `VLModel` as `.model` plus the
    modules the method owns, e.g. CMAL's region embedding, region layers, region head and WRC τ),
    strictly loaded: every saved tensor must fit the rebuilt method."""
    path = checkpoint_dir(checkpoint)
    cfg = load_config(path / "config.yaml", overrides)
    tokenizer = TextTokenizer.load(path / "tokenizer.json")
    method = build_run_method(cfg, tokenizer)
    load_model_weights(path, method)
    return cfg, tokenizer, method


def evaluate_method(method: torch.nn.Module, rset: RetrievalSet, cfg: RunConfig, device: torch.device) -> dict[str, float]:
    """Retrieval metrics of a pre-trained method by its protocol: ITM over all pairs for single-stream
    methods without ITC (CMAL, `ITM_ALL_EVAL_METHODS`), ITC + ITM re-ranking (+ `eval.itm_all`) otherwise."""
    if cfg.method.name in ITM_ALL_EVAL_METHODS:
        return run_itm_all_eval(method, rset, cfg, device)
    return run_retrieval_eval(method.model, rset, cfg, device)


def evaluate_checkpoint(
    checkpoint: str | Path, overrides: list[str] | None = None, out_dir: str | Path | None = None
) -> dict[str, Any]:
    """Retrieval metrics of a pre-trained (or retrieval fine-tuned) checkpoint: ITC and ITM re-ranked for
    ALBEF-style models, ITM over all pairs for CMAL (see `evaluate_method`), on the first `eval.num_images`
    images of `eval.split` against all their captions.

    The set is the world's split, or, with `task.data: files` (in the overrides, e.g. `task.data=files`,
    `task.annotations.test=coco_karpathy_test.json`, `task.image_root=...`, or in the config of a run
    fine-tuned on files), the split of user Karpathy files (`vlp.finetune.retrieval_files`; every caption
    of each image is kept, `eval.num_images` 0 = all images). Skipped bad records (`task.skip_bad`) are
    printed and counted as `skipped_records`."""
    cfg, tokenizer, method = load_checkpoint_method(checkpoint, overrides)
    device = resolve_device(cfg.train.device)
    method.to(device).eval()
    skipped = None
    if cfg.task.data == "files":
        from vlp.finetune import file_retrieval_set, retrieval_files

        data = retrieval_files(cfg, [cfg.eval.split])
        rset = file_retrieval_set(cfg, data, tokenizer)
        skipped = getattr(data, "skipped", None)
        if skipped:
            print(f"retrieval: {skipped}", file=sys.stderr)
    else:
        rset = retrieval_set(cfg, build_world(cfg), tokenizer)
    metrics = evaluate_method(method, rset, cfg, device)
    if skipped is not None:
        metrics["skipped_records"] = skipped.count
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "eval.json").write_text(json.dumps(metrics, indent=2))
        if cfg.method.name not in ITM_ALL_EVAL_METHODS:  # the example figure ranks by ITC
            write_retrieval_figure(method.model, rset, cfg, device, out / "retrieval_examples.png")
    return metrics


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
        from vlp.data.render import render_task_grid
        from vlp.data.world_tasks import world_task_data

        data = world_task_data(world, task, split, count)
        return render_task_grid(task, data.splits[split], data.images, out)
    data = world.split(split)
    samples = [data[i] for i in range(min(count, len(data)))]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    render_grid(samples, out)
    return out


# ------------------------------------------------------------------------------ downstream table
# The headline metric of each task (its test split; retrieval: R-mean of ITM over all pairs, the protocol
# every method has) -> its table column.
DOWNSTREAM_METRICS = {"ve": ("VE_acc", "test/acc"), "rec": ("REC_acc", "test/gt_acc"), "vqa": ("VQA_acc", "test/acc"),
                      "nlvr2": ("NLVR2_acc", "test/acc"), "retrieval": ("ret_r_mean", "itm_all/r_mean")}
# `vlp demo`'s compact downstream fine-tunes (README "Results"): one short epoch per task (80 steps of 16),
# scored on 250 test examples, ~13 s each on 2 CPU cores; the full-length table is benchmarks/downstream.py
# with the shipped finetune_<task> configs (400 steps of 32).
DEMO_FINETUNE = ["train.steps=80", "train.batch_size=16", "train.warmup_steps=8", "train.log_every=40",
                 "task.train_size=1280", "task.eval_size=250", "task.eval_splits=[test]"]
DEMO_TASKS = ("ve", "rec", "vqa")


def downstream_table(starts: list[tuple[str, str | Path | None]], tasks: tuple[str, ...] | list[str],
                     out_dir: str | Path, overrides: list[str] | None = None,
                     on_row: Any = None) -> list[dict[str, Any]]:
    """Fine-tune every start on every task and return one row per start: the task's headline test metric
    (`DOWNSTREAM_METRICS`), REC also on proposals (`REC_det_acc`), and the wall seconds per task.

    starts: (name, checkpoint) pairs; checkpoint None = "from scratch" (`task.init` freshly initialised,
    so the difference to a checkpoint row is what pre-training buys). Every run uses the shipped
    `finetune_<task>` config plus `overrides` (the same for every row) and writes to out_dir/<name>/<task>.
    `on_row(rows)` is called after each task with the rows so far (progress printing).
    """
    from vlp.finetune import finetune

    unknown = [task for task in tasks if task not in DOWNSTREAM_METRICS]
    if unknown:  # before any fine-tuning starts
        raise ValueError(f"unknown task(s) {', '.join(unknown)} (known: {', '.join(DOWNSTREAM_METRICS)})")
    out_dir = Path(out_dir)
    rows: list[dict[str, Any]] = []
    for name, checkpoint in starts:
        row: dict[str, Any] = {"start": name}
        for task in tasks:
            begin = time.time()
            run = finetune(task, checkpoint, overrides=[f"train.out_dir={out_dir / name / task}",
                                                        "train.progress=false", *(overrides or [])])
            metrics = json.loads((run / "eval.json").read_text())
            column, key = DOWNSTREAM_METRICS[task]
            row[column] = round(float(metrics[key]), 1)
            if task == "rec" and "test/det_acc" in metrics:
                row["REC_det_acc"] = round(float(metrics["test/det_acc"]), 1)
            row[f"{task}_s"] = round(time.time() - begin)
            if on_row is not None:
                on_row([*rows, row])
        rows.append(row)
    return rows


# Same protocol for both methods: ITM score over all (image, text) pairs of the same test images (CMAL has
# no ITC); the baseline's own ITC ranking is shown beside it.
DEMO_COLUMNS = ["method", "pairs", "steps", "run_s", "t2i_R@1", "i2t_R@1", "r_mean", "hardneg",
                "itc_t2i_R@1", "itc_r_mean", "chance_R@1"]
DEMO_CONFIGS = {"albef": "demo", "cmal": "demo_cmal"}


def demo(out_dir: str | Path = "runs/demo", overrides: list[str] | None = None,
         methods: tuple[str, ...] = ("albef", "cmal"), tasks: tuple[str, ...] = DEMO_TASKS) -> str:
    """Pre-train the tiny baseline and CMAL on the same world pairs for the same steps, evaluate both on
    the same test images, then fine-tune each checkpoint and a from-scratch model briefly on `tasks`
    (`DEMO_FINETUNE`); return both tables (also written to `out_dir/results.md`).

    Sized to finish within 10 minutes on 2 CPU cores (see README for measured figures). `overrides`
    apply to every run (pre-training and fine-tuning), after the demo's own settings.
    """
    from vlp.viz import format_table

    out_dir = Path(out_dir)
    rows = []
    for method in methods:
        if method not in DEMO_CONFIGS:
            raise ValueError(f"unknown demo method '{method}' (known: {', '.join(DEMO_CONFIGS)})")
        run_overrides = [f"train.out_dir={out_dir / method}", *(overrides or [])]
        cfg = load_config(DEMO_CONFIGS[method], run_overrides)
        start = time.time()
        run_dir = pretrain(cfg)
        seconds = time.time() - start
        metrics = json.loads((run_dir / "eval.json").read_text())
        rows.append(method_row(method, cfg, seconds, metrics))
    text = "Pre-training: retrieval on the test images\n\n" + format_table(rows, DEMO_COLUMNS)
    if tasks:
        starts = [*[(m, out_dir / m) for m in methods], ("scratch", None)]
        task_rows = downstream_table(starts, tasks, out_dir / "finetune", [*DEMO_FINETUNE, *(overrides or [])])
        steps = load_config(f"finetune_{tasks[0]}", [*DEMO_FINETUNE, *(overrides or [])]).train.steps
        text += (f"\n\nFine-tuning ({steps} steps per task; scratch = the baseline without pre-training): "
                 f"test accuracy %\n\n" + format_table(task_rows))
    (out_dir / "results.md").write_text(text + "\n")
    return text


def method_row(method: str, cfg: RunConfig, seconds: float, m: dict[str, float]) -> dict[str, Any]:
    """One table row; metrics a method does not produce (CMAL has no ITC) are left out (printed "-")."""
    row: dict[str, Any] = {
        "method": method,
        "pairs": cfg.data.budget,
        "steps": cfg.train.steps,
        "run_s": round(seconds),  # pre-training + evaluation wall time
        "chance_R@1": round(100.0 / cfg.eval.num_images, 2),
    }
    columns = {"t2i_R@1": "itm_all/img_r1", "i2t_R@1": "itm_all/txt_r1", "r_mean": "itm_all/r_mean",
               "hardneg": "itm_all/hard_neg_acc", "itc_t2i_R@1": "itc/img_r1", "itc_r_mean": "itc/r_mean"}
    for column, key in columns.items():
        value = m.get(f"eval/{key}", m.get(key))
        if value is not None:
            row[column] = round(float(value), 1)
    return row


# ------------------------------------------------------------------------------ CMAL prompt figure
CMAL_SHOW_IMAGE_PX = 256  # the image is shown upscaled (nearest) to this side
CMAL_SHOW_CAPTIONS = 5  # captions per image in PairDataset (training row = index * 5 + caption)


def build_cmal_show(
    config: str | Path | RunConfig, checkpoint: str | Path | None, overrides: list[str] | None, split: str,
    index: int, caption: int,
) -> tuple[RunConfig, TextTokenizer, Cmal, WorldSplit]:
    """(config, tokenizer, `Cmal` method, world split) exactly as training builds them: from a config
    (the tokenizer is re-trained on the world, as `pretrain` does) or from a checkpoint (config +
    tokenizer + model weights; the method's own heads stay untrained: anchors, masking and the swap do
    not depend on weights). `split` / `index` / `caption` are checked before the tokenizer is built."""
    if checkpoint is not None:
        cfg, tokenizer, model = load_checkpoint_model(checkpoint, overrides)
    else:
        cfg = config if isinstance(config, RunConfig) else load_config(config, overrides)
        tokenizer, model = None, None
    if cfg.method.name != "cmal":
        raise ValueError(f"`cmal show` needs a CMAL run (method.name: cmal), but "
                         f"{checkpoint if checkpoint is not None else config} has method.name: {cfg.method.name}")
    world = build_world(cfg)
    if split == "unpaired_text":
        raise ValueError("the unpaired_text split has no images (text only): pick an image split")
    data = world.split(split)
    if not 0 <= index < len(data):
        raise ValueError(f"--index {index} is out of range: the {split} split of this config has {len(data)} "
                         f"images (valid: 0..{len(data) - 1})")
    captions = min(len(data[index].captions), CMAL_SHOW_CAPTIONS)
    if not 0 <= caption < captions:
        raise ValueError(f"--caption {caption} is out of range: training uses {captions} captions of {split}[{index}] "
                         f"(valid: 0..{captions - 1})")
    if tokenizer is None:
        tokenizer = build_tokenizer(cfg, world)
        torch.manual_seed(cfg.train.seed)
        model = VLModel(cfg.model, vocab_size=tokenizer.vocab_size, pad_id=tokenizer.pad_id)
    method = build_method(cfg, model, tokenizer, class_words=class_words_for(cfg))
    if not isinstance(method, Cmal):
        raise ValueError(f"method.name: cmal built a {type(method).__name__}, not vlp.methods.cmal.Cmal")
    return cfg, tokenizer, method.eval(), data


def cmal_sample_key(row: int, seed: int = 0) -> int:
    """The sample key the trainer gives dataset row `row` in the first epoch of a run with
    `train.seed = seed` (`vlp.train.sampler`: seed * KEY_SEED_STRIDE + epoch * N + row, epoch 0).
    CMAL's partners and masks are a pure function of this key."""
    if row < 0 or seed < 0:
        raise ValueError(f"row and seed must be >= 0, got row={row}, seed={seed}")
    return int(seed) * KEY_SEED_STRIDE + int(row)


@torch.no_grad()
def cmal_prompt_view(
    method: Cmal, tokenizer: TextTokenizer, data: WorldSplit, index: int, caption: int = 0, seed: int = 0,
    max_len: int = 40, title: str = "",
) -> CmalPromptView:
    """What CMAL's associative prompt puts where for caption `caption` of `data[index]`, as plain data
    (`vlp.viz.CmalPromptView`), computed with the training code path.

    The sample goes through `PairDataset` + `collate` (row = index * 5 + caption, the row it has in
    training), gets the sample key `cmal_sample_key(row, seed)`, then `method.regions`, `method.anchors`
    and `method.mask` give the partners π and the masking, and `swap_fill` itself is run on index-coded
    vectors (text slot t holds t + 1, region slot i holds -(i + 1)) so the region content after the swap,
    "last pointing token wins" included, is read from what `swap_fill` returns, not re-derived here.
    ValueError for an index / caption outside the split; RuntimeError if the tensors disagree (a bug).
    """
    dataset = PairDataset(data, tokenizer, max_len, captions_per_image=CMAL_SHOW_CAPTIONS, max_words=max_len)
    if not (0 <= index < len(data) and 0 <= caption < CMAL_SHOW_CAPTIONS):
        raise ValueError(f"sample {index} caption {caption} is outside the {len(data)}-image split "
                         f"({CMAL_SHOW_CAPTIONS} captions per image)")
    row = index * CMAL_SHOW_CAPTIONS + caption
    batch = collate([dataset[row]])
    key = cmal_sample_key(row, seed)
    batch.sample_keys = torch.tensor([key], dtype=torch.long)
    device = next(method.parameters()).device
    batch = batch.to(device)
    regions = method.regions(batch)
    pairs = method.anchors(batch, regions)
    partner, masking = method.mask(batch, regions, pairs)
    T, N = batch.input_ids.shape[1], regions.labels.shape[1]
    word_code = torch.arange(1, T + 1, dtype=torch.float64, device=device)[None, :, None]
    region_code = -torch.arange(1, N + 1, dtype=torch.float64, device=device)[None, :, None]
    hybrid_word, hybrid_region = swap_fill(word_code, region_code, partner, masking.region_masked)
    hybrid_word, hybrid_region = hybrid_word[0, :, 0].long().tolist(), hybrid_region[0, :, 0].long().tolist()

    sample = data[index]
    offset = 1 if method.cfg.whole_image_region else 0
    ids, masked_ids = batch.input_ids[0].tolist(), masking.masked_ids[0].tolist()
    labels_txt, special = masking.txt_labels[0].tolist(), {int(i) for i in tokenizer.special_ids}
    pi, matches = partner[0].tolist(), pairs[0]
    piece = tokenizer.backend.id_to_token

    def region_name(i: int) -> str:
        label = int(regions.labels[0, i])
        if label == 0:
            return "whole image" if offset and i == 0 else "background"
        obj = sample.objects[i - offset]
        class_name = lexicon.CLASSES[label - 1].name
        if obj.class_id != label - 1:
            raise RuntimeError(f"region {i} has label {class_name} but object {i - offset} is a {obj.class_name}")
        return f"{obj.colour} {class_name}"

    names = [region_name(i) for i in range(N)]
    tokens = []
    for t in range(T):
        if not batch.attention_mask[0, t]:
            continue
        content = hybrid_word[t]
        if content < 0:  # the slot holds a region's visual vector
            kind, after = "anchor", f"⟨R{-content - 1} {names[-content - 1]}⟩"
        elif ids[t] in special:
            kind, after = "special", piece(ids[t])
        elif labels_txt[t] != IGNORE_INDEX:
            new = masked_ids[t]
            kind = "mlm_mask" if new == tokenizer.mask_id else ("mlm_kept" if new == ids[t] else "mlm_random")
            after = piece(new)
        else:
            kind, after = "plain", piece(ids[t])
        tokens.append(CmalPromptToken(
            position=t, piece=piece(ids[t]), kind=kind, after=after, partner=int(pi[t]),
            matches=tuple(int(i) for i in matches[t].nonzero().flatten().tolist())))
    region_views = []
    for i in range(N):
        if not regions.mask[0, i]:
            continue
        content = hybrid_region[i]
        if content > 0:
            status, after = "anchor", f"word '{piece(ids[content - 1])}'"
        elif content == 0:
            status, after = "masked", "0 (masked)"
        else:
            status, after = "plain", "visual"
        if status == "anchor" and not bool(masking.region_swapped[0, i]):
            raise RuntimeError(f"swap_fill filled region {i} with a word but anchor_mask did not mark it swapped")
        if status == "masked" and not bool(masking.region_masked[0, i]):
            raise RuntimeError(f"swap_fill zeroed region {i} but anchor_mask did not mark it masked")
        x1, y1, x2, y2 = (float(v) for v in regions.boxes[0, i, :4].tolist())
        region_views.append(CmalPromptRegion(
            index=i, box=(x1, y1, x2, y2), name=names[i], status=status, after=after,
            filled_from=content - 1 if content > 0 else -1,
            pointing=tuple(t for t in range(T) if pi[t] == i)))
    cfg = method.cfg
    anchors = sum(1 for t in tokens if t.kind == "anchor")
    notes = (
        f"Sample key {key} = the key the trainer gives row {row} ({len(data)}-image split, caption {caption}) in "
        f"epoch 0 of a run with train.seed = {seed}; partners and masks are a pure function of it.",
        f"{anchors} anchor token(s): each names an object class of some region; its slot holds the visual vector "
        f"e^v of its partner region π(t) (uniform among the regions it names) and its label is the original word. "
        f"Other tokens: {cfg.mlm_prob * 100:g} % MLM (80 % [MASK], 10 % random, 10 % kept). Regions: partners get the word "
        f"vector of the LAST token pointing to them (quirk 3); {cfg.region_mask_prob * 100:g} % of the other labelled "
        f"regions are masked (vector 0).",
        "Positions and boxes are NOT swapped: a text slot keeps its own position + type-0 embedding and a region "
        "slot its own box + type-1 embedding; only the content vectors move (cmal.md §5).",
    )
    return CmalPromptView(image=sample.image, caption=sample.captions[caption], tokens=tuple(tokens),
                          regions=tuple(region_views), title=title, notes=notes)


def show_cmal(
    out: str | Path, config: str | Path | RunConfig = "cmal_tiny", checkpoint: str | Path | None = None,
    split: str = "train", index: int = 0, seed: int = 0, overrides: list[str] | None = None, caption: int = 0,
) -> Path:
    """Write a PNG of what CMAL's associative prompt puts where for caption `caption` of sample `index`
    of `split` (anchors, partner regions, masked tokens and regions, region slots after the swap).

    The method is built from `config` (default `cmal_tiny`) or from a checkpoint directory (its config +
    tokenizer); `seed` picks the sample key (`cmal_sample_key`), so different seeds show different masks.
    ValueError for a non-CMAL config or an out-of-range index / caption. Returns the path written.
    """
    cfg, tokenizer, method, data = build_cmal_show(config, checkpoint, overrides, split, index, caption)
    source = f"checkpoint {checkpoint}" if checkpoint is not None else (
        "config" if isinstance(config, RunConfig) else str(config))
    title = f"CMAL associative prompt · {source} · {split}[{index}] caption {caption} · seed {seed}"
    view = cmal_prompt_view(method, tokenizer, data, index, caption, seed, cfg.data.max_text_len, title)
    out = Path(out)
    plot_cmal_prompt(view, out, image_px=CMAL_SHOW_IMAGE_PX)
    return out
