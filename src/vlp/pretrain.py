"""`vlp pretrain`: pre-train a method on the configured data; returns the run directory.

    from vlp.pretrain import pretrain
    run_dir = pretrain("albef_tiny", overrides=["train.steps=50"])

A run directory holds: `config.yaml` (resolved), `tokenizer.json`, `metrics.jsonl`, `checkpoint/`,
`eval.json`, `loss_curve.png` and, for methods that rank by ITC, `retrieval_examples.png`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from vlp.build import build_tokenizer, build_world, method_class_of, retrieval_set, world_class_words
from vlp.config import RunConfig, dump_config, load_config
from vlp.data.datasets import collate, distinct_images
from vlp.data.unpaired import pretrain_source, world_pretrain_dataset
from vlp.evaluate import evaluate_method, has_itc, write_retrieval_figure
from vlp.methods import METHODS, build_method
from vlp.models.model import VLModel
from vlp.train import launch
from vlp.train.loop import Trainer, claim_out_dir
from vlp.viz import plot_loss_curve


def pretrain(config: str | Path | RunConfig, overrides: list[str] | None = None, resume: str | Path | None = None,
             overwrite: bool = False) -> Path:
    """Pre-train the method `method.name` on the configured data; returns the run directory.

    Works unchanged under `torchrun` (DDP; gloo on CPU, NCCL on CUDA). Evaluation (retrieval by the
    method's protocols, on the world's test split, for runs trained on the world), plots and the final
    table are produced on rank 0. `resume` continues a run exactly (a run or checkpoint directory); without
    it, a `train.out_dir` that already holds a run is an error (`vlp.train.loop.RunExistsError`) unless
    `overwrite`, which removes that run's outputs first.
    """
    if resume is not None and overwrite:
        raise ValueError("resume and overwrite exclude each other: resume continues the run, overwrite starts it over")
    cfg = config if isinstance(config, RunConfig) else load_config(config, overrides)
    method_cls = method_class_of(cfg)
    out_dir = Path(cfg.train.out_dir)
    with launch.distributed_session(cfg.train.device):
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        if resume is None:  # before anything is built or written: an earlier run is refused, or cleared (overwrite)
            claim_out_dir(out_dir, overwrite)
        # User data (data.source: regions | karpathy, vlp.data.regions; unpaired_files, vlp.data.unpaired)
        # brings its own tokenizer, dataset, collate function and class words; the embedded world is built
        # for data.source: world only (unpaired streams for a method with "unpaired_text" in its inputs).
        source = pretrain_source(cfg, method_cls)
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
            dataset, collate_fn = world_pretrain_dataset(cfg, world, tokenizer, method_cls), collate
        else:
            dataset, collate_fn = source.dataset, source.collate_fn
        # Same on every rank: the Trainer calls eval_fn on rank 0 only, but every rank must take part in
        # the barrier that follows an eval (with eval_fn=None a rank skips it and rank 0 is left waiting).
        # Retrieval is evaluated on the world's test split, so only for runs trained on the world.
        evaluate = source is None and bool(method_cls.retrieval_protocols)
        rset = retrieval_set(cfg, world, tokenizer) if evaluate and rank == 0 else None

        def eval_fn(trained: torch.nn.Module, step: int) -> dict[str, float]:
            metrics = evaluate_method(trained, rset, cfg, trainer.device)
            itm_steps = trained.itm_steps(step)  # ITM's share of the steps, reported beside its ranking
            return metrics if itm_steps is None else {**metrics, "itm_steps": float(itm_steps)}

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
        if evaluate and rank == 0 and has_itc(method):  # the example figure ranks by ITC
            write_retrieval_figure(method, rset, cfg, trainer.device, out_dir / "retrieval_examples.png")
    return out_dir


def fit_prepared_state(config: str | Path | RunConfig, out: str | Path, overrides: list[str] | None = None,
                       images: int | None = None) -> tuple[Path, dict[str, float]]:
    """`vlp tokenizer image`: fit the method's data-dependent state (its `prepared_state`, e.g. SIMLA's
    visual tokenizer) on the first `images` distinct training images of the config's pre-training data (default:
    the count the method asks for, e.g. `method.tokenizer_images`), exactly as pre-training would before step
    0, and write it to `out` (a file the config can then name, e.g. `method.visual_tokenizer`).
    Returns (path, fit statistics). ValueError for a method with nothing to fit."""
    cfg = config if isinstance(config, RunConfig) else load_config(config, overrides)
    method_cls = method_class_of(cfg)
    if method_cls.prepared_state is None:
        have = [name for name, cls in METHODS.items() if cls.prepared_state is not None]
        raise ValueError(f"method '{cfg.method.name}' fits nothing before training (methods that do: "
                         f"{', '.join(have) or 'none'})")
    source = pretrain_source(cfg, method_cls)
    world = build_world(cfg) if source is None else None
    tokenizer = build_tokenizer(cfg, world) if source is None else source.tokenizer
    model = VLModel(cfg.model, vocab_size=tokenizer.vocab_size, pad_id=tokenizer.pad_id)
    method = build_method(cfg, model, tokenizer,
                          class_words=world_class_words() if source is None else source.class_words)
    count = images if images is not None else method.images_to_prepare()
    if count <= 0:
        raise ValueError(f"{method_cls.__name__} has nothing to fit with this config (a fitted file is named "
                         f"already, or the objective that needs it has weight 0); pass --images N to fit anyway")
    dataset = world_pretrain_dataset(cfg, world, tokenizer, method_cls) if source is None else source.dataset
    pixels = distinct_images(dataset, count)
    stats = method.prepare(pixels)
    path = getattr(method, method_cls.prepared_state).save(out, images=int(pixels.shape[0]), **stats)
    return path, {**stats, "images": float(pixels.shape[0])}


__all__ = ["fit_prepared_state", "pretrain"]
