"""The Python API; the CLI (`vlp ...`) is a thin shell over these functions.

    from vlp.api import pretrain, evaluate_checkpoint, show_world
    run_dir = pretrain("albef_tiny", overrides=["train.steps=50"])
    metrics = evaluate_checkpoint(run_dir / "checkpoint")

A run directory holds: `config.yaml` (resolved), `tokenizer.json`, `metrics.jsonl`, `checkpoint/`,
`eval.json`, `loss_curve.png` and `retrieval_examples.png`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from vlp.config import RunConfig, dump_config, load_config
from vlp.data.datasets import PairDataset, RetrievalSet, collate
from vlp.data.tokenizer import TextTokenizer
from vlp.data import lexicon
from vlp.data.render import render_grid
from vlp.data.world import World
from vlp.methods import build_method
from vlp.models.model import VLModel
from vlp.tasks.retrieval import eval_mode, evaluate_retrieval, evaluate_retrieval_itm_all, retrieval_examples
from vlp.train.checkpoint import load_model_weights
from vlp.train import launch
from vlp.train.loop import Trainer
from vlp.viz import plot_loss_curve, plot_retrieval_examples

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
        world = build_world(cfg)
        tokenizer = build_tokenizer(cfg, world)
        if rank == 0:
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "config.yaml").write_text(dump_config(cfg))
            tokenizer.save(out_dir / "tokenizer.json")
        launch.barrier()  # the other ranks' Trainer checks that tokenizer.json exists
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        model = VLModel(cfg.model, vocab_size=tokenizer.vocab_size, pad_id=tokenizer.pad_id)
        method = build_method(cfg, model, tokenizer, class_words=world_class_words())
        dataset = PairDataset(
            world.split("train"), tokenizer, cfg.data.max_text_len, cfg.data.budget, max_words=cfg.data.max_text_len
        )
        # Same on every rank: the Trainer calls eval_fn on rank 0 only, but every rank must take part in
        # the barrier that follows an eval (with eval_fn=None a rank skips it and rank 0 is left waiting).
        evaluate = cfg.method.name in RETRIEVAL_EVAL_METHODS
        rset = retrieval_set(cfg, world, tokenizer) if evaluate and rank == 0 else None

        def eval_fn(trained: torch.nn.Module, step: int) -> dict[str, float]:
            return evaluate_method(trained, rset, cfg, trainer.device)

        trainer = Trainer(
            cfg, method, dataset, collate, out_dir,
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


def _checkpoint_files(checkpoint: str | Path) -> Path:
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
    path = _checkpoint_files(checkpoint)
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
    path = _checkpoint_files(checkpoint)
    cfg = load_config(path / "config.yaml", overrides)
    tokenizer = TextTokenizer.load(path / "tokenizer.json")
    model = VLModel(cfg.model, vocab_size=tokenizer.vocab_size, pad_id=tokenizer.pad_id)
    method = build_method(cfg, model, tokenizer, class_words=world_class_words())
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
    """Retrieval metrics of a pre-trained checkpoint on the world's eval split: ITC and ITM re-ranked for
    ALBEF-style models, ITM over all pairs for CMAL (see `evaluate_method`)."""
    cfg, tokenizer, method = load_checkpoint_method(checkpoint, overrides)
    device = resolve_device(cfg.train.device)
    method.to(device).eval()
    world = build_world(cfg)
    rset = retrieval_set(cfg, world, tokenizer)
    metrics = evaluate_method(method, rset, cfg, device)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "eval.json").write_text(json.dumps(metrics, indent=2))
        if cfg.method.name not in ITM_ALL_EVAL_METHODS:  # the example figure ranks by ITC
            write_retrieval_figure(method.model, rset, cfg, device, out / "retrieval_examples.png")
    return metrics


def show_world(out: str | Path, split: str = "train", count: int = 16, image_size: int = 64, seed: int = 0) -> Path:
    """Render `count` samples of a world split to a PNG grid (captions, boxes, a hard negative)."""
    world = World(seed=seed, image_size=image_size)
    data = world.split(split)
    samples = [data[i] for i in range(min(count, len(data)))]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    render_grid(samples, out)
    return out


# Same protocol for both methods: ITM score over all (image, text) pairs of the same test images (CMAL has
# no ITC); the baseline's own ITC ranking is shown beside it.
DEMO_COLUMNS = ["method", "pairs", "steps", "run_s", "t2i_R@1", "i2t_R@1", "r_mean", "hardneg",
                "itc_t2i_R@1", "itc_r_mean", "chance_R@1"]
DEMO_CONFIGS = {"albef": "demo", "cmal": "demo_cmal"}


def demo(out_dir: str | Path = "runs/demo", overrides: list[str] | None = None,
         methods: tuple[str, ...] = ("albef", "cmal")) -> str:
    """Pre-train the tiny baseline and CMAL on the same world pairs for the same steps, evaluate both on
    the same test images, return the side-by-side metrics table (also written to `out_dir/results.md`).

    Sized to finish within 10 minutes on 2 CPU cores (see README for measured figures). `overrides`
    apply to both runs.
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
        rows.append(_demo_row(method, cfg, seconds, metrics))
    table = format_table(rows, DEMO_COLUMNS)
    (out_dir / "results.md").write_text(table + "\n")
    return table


def _demo_row(method: str, cfg: RunConfig, seconds: float, m: dict[str, float]) -> dict[str, Any]:
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
