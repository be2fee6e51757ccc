"""Evaluating a pre-trained method: retrieval by the protocols its class declares, from a run or a checkpoint.

`evaluate_method` asks the method (`retrieval_protocols_for(eval.itm_all)`) how it ranks and runs
`vlp.tasks.retrieval.evaluate_method_retrieval`; `evaluate_checkpoint` rebuilds a checkpoint's method and
scores it on the world's split or on user Karpathy files.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

from vlp.build import build_world, load_checkpoint_method, retrieval_set
from vlp.config import RunConfig
from vlp.data.datasets import RetrievalSet
from vlp.methods import PretrainMethod
from vlp.taskdata import file_retrieval_set, retrieval_files
from vlp.tasks.retrieval import evaluate_method_retrieval, retrieval_examples
from vlp.train.cpu import configure_cpu
from vlp.train.launch import select_device
from vlp.train.precision import autocast_dtype
from vlp.viz import plot_retrieval_examples


def evaluate_method(method: PretrainMethod, rset: RetrievalSet, cfg: RunConfig, device: torch.device) -> dict[str, float]:
    """Retrieval metrics of a pre-trained method by its declared protocols (`vlp.methods.base`): its headline
    protocol (ITC, ITC + ITM re-ranking, or ITM over all pairs), plus ITM over all pairs when `eval.itm_all`
    asks and the method has it; `eval.batch_size`, `eval.k_rerank`, autocast at the training precision; progress
    lines on stderr for long loops unless `train.progress` is false."""
    return evaluate_method_retrieval(
        method, rset, method.retrieval_protocols_for(cfg.eval.itm_all), batch_size=cfg.eval.batch_size,
        k_rerank=cfg.eval.k_rerank, device=device, amp_dtype=autocast_dtype(cfg.train.precision, device),
        progress=cfg.train.progress)


def has_itc(method: PretrainMethod) -> bool:
    """Whether the method ranks by ITC (the example figure shows ITC's top images)."""
    return any(p in ("itc", "itc_itm") for p in method.retrieval_protocols)


def write_retrieval_figure(method: PretrainMethod, rset: RetrievalSet, cfg: RunConfig, device: torch.device,
                           png: Path) -> None:
    """`retrieval_examples.png`: query captions with their ITC top images (methods with ITC)."""
    queries, topk = retrieval_examples(method.itc_model, rset, num_queries=6, k=5, batch_size=cfg.eval.batch_size,
                                       device=device, progress=cfg.train.progress)
    plot_retrieval_examples(rset.captions, rset.images, queries, topk, rset.txt2img, png)


def evaluate_checkpoint(
    checkpoint: str | Path, overrides: list[str] | None = None, out_dir: str | Path | None = None
) -> dict[str, Any]:
    """Retrieval metrics of a pre-trained (or retrieval fine-tuned) checkpoint by its method's protocols
    (`evaluate_method`), on the first `eval.num_images`
    images of `eval.split` against all their captions.

    The set is the world's split, or, with `task.data: files` (in the overrides, e.g. `task.data=files`,
    `task.annotations.test=coco_karpathy_test.json`, `task.image_root=...`, or in the config of a run
    fine-tuned on files), the split of user Karpathy files (`vlp.taskdata.retrieval_files`; every caption
    of each image is kept, `eval.num_images` 0 = all images). Skipped bad records (`task.skip_bad`) are
    printed and counted as `skipped_records`."""
    cfg, tokenizer, method = load_checkpoint_method(checkpoint, overrides)
    device = select_device(cfg.train.device)
    print(f"[eval] {configure_cpu(cfg.train, 0, device).describe()}", file=sys.stderr, flush=True)
    method.to(device).eval()
    skipped = None
    if cfg.task.data == "files":
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
        if has_itc(method):  # the example figure ranks by ITC
            write_retrieval_figure(method, rset, cfg, device, out / "retrieval_examples.png")
    return metrics


__all__ = ["evaluate_checkpoint", "evaluate_method", "has_itc", "write_retrieval_figure"]
