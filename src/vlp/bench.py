"""`vlp bench`: throughput of a pre-training step, world rendering, peak memory and MFU.

MFU = achieved model FLOP/s divided by the matmul peak *measured in the same run* on the same
device and dtype (a large square matmul), not a datasheet number, so CPU and GPU readings compare
honestly. Model FLOPs of a step are counted by `torch.utils.flop_counter.FlopCounterMode` over one
whole training step (forward and backward of every pass the method makes: for ALBEF the ITC
encoders, three ITM fusion passes and the MLM pass), so no per-method formula can drift.
"""

from __future__ import annotations

import resource
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from vlp.build import build_tokenizer, world_class_words
from vlp.config import RunConfig, load_config
from vlp.data.datasets import PairDataset, collate
from vlp.data.world import World
from vlp.methods import build_method
from vlp.models.model import VLModel
from vlp.train.launch import select_device
from vlp.train.loop import Trainer
from vlp.types import Batch


def world_batch(cfg: RunConfig, batch_size: int, device: torch.device) -> tuple[Batch, Any]:
    """A real training batch of the world at the config's image size (captions, boxes, region labels):
    every method gets the inputs it trains on (CMAL needs boxes and its class lexicon), and methods
    compared in one run see the same batch. Returns (batch, tokenizer)."""
    world = World(seed=cfg.data.world_seed, image_size=cfg.model.vision.image_size, sizes={"train": batch_size})
    tokenizer = build_tokenizer(cfg, world)
    data = PairDataset(world.split("train"), tokenizer, cfg.data.max_text_len, max_words=cfg.data.max_text_len)
    per_image = data.captions_per_image  # one caption of each of `batch_size` images: ITM needs other images
    batch = collate([data[i * per_image + i % per_image] for i in range(batch_size)])
    batch.sample_keys = torch.arange(batch_size)
    return batch.to(device), tokenizer


def matmul_peak_flops(device: torch.device, dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """Measured dense-matmul FLOP/s on this device and dtype (the MFU denominator)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_train_step(
    config: str = "albef_tiny", overrides: list[str] | None = None, batch_size: int | None = None,
    steps: int = 5, warmup: int = 2,
) -> dict[str, float]:
    """Samples/s, step time, peak memory and MFU of `steps` optimizer steps on one real world batch.

    `config` is a config name or path, optionally followed by `:key=value,key=value` overrides of that
    config alone (e.g. `demo:method.loss_weights.itm=0,method.loss_weights.mlm=0`, ALBEF's ITC-only cost),
    applied after the shared `overrides`.

    A method that samples one task per step (CMAL `task_mixing: ratio`) is timed over `steps` consecutive
    steps of its task schedule, so the mean step time is the one training sees (use enough steps for the
    mix to show: the ratio 1:3:2 needs ~12+); FLOPs are counted on the first step's task.

    The step timed is the trainer's own (`Trainer.train_step`: autocast, GradScaler, gradient
    accumulation and clipping, LR schedule, `on_step_end`), built from the config's `train` section.
    """
    name, _, own = config.partition(":")  # CONFIG[:key=value,key=value]: overrides of this config alone
    cfg = load_config(name, [*(overrides or []), *[o for o in own.split(",") if o]])
    device = select_device(cfg.train.device)
    batch_size = batch_size or cfg.train.batch_size
    batch, tokenizer = world_batch(cfg, batch_size, device)
    torch.manual_seed(0)
    model = VLModel(cfg.model, vocab_size=tokenizer.vocab_size, pad_id=tokenizer.pad_id)
    method = build_method(cfg, model, tokenizer, class_words=world_class_words()).to(device)  # a world batch
    # The trainer's step on the one batch: the global batch is this batch; the schedule covers every call.
    cfg.train.batch_size = batch_size
    cfg.train.steps = max(cfg.train.steps, steps + warmup + 1)
    cfg.train.tensorboard = False
    cfg.train.progress = False
    with tempfile.TemporaryDirectory(prefix="vlp-bench-") as out_dir:
        trainer = Trainer(cfg, method, list(range(batch_size)), lambda items: batch, out_dir=out_dir)
        dtype = trainer.amp_dtype
        method.train()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

        with FlopCounterMode(display=False) as counter:
            trainer.train_step(batch)
        step_flops = counter.get_total_flops()
        for _ in range(warmup):
            trainer.train_step(batch)
        _sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            trainer.train_step(batch)
        _sync(device)
        step_s = (time.perf_counter() - start) / steps
    result = {
        "config": str(config),
        "method": cfg.method.name,
        "device": str(device),
        "precision": cfg.train.precision,
        "batch_size": batch_size,
        "params_M": sum(p.numel() for p in method.parameters()) / 1e6,
        "step_s": step_s,
        "samples_per_s": batch_size / step_s,
        "peak_rss_GiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }
    model_flops = step_flops / step_s
    peak = matmul_peak_flops(device, dtype or torch.float32)
    result.update({"GFLOP_per_step": step_flops / 1e9, "model_TFLOPs": model_flops / 1e12, "matmul_peak_TFLOPs": peak / 1e12, "mfu": model_flops / peak})
    if device.type == "cuda":
        result["peak_gpu_mem_GiB"] = torch.cuda.max_memory_allocated(device) / 2**30
    return result


def compare_train_steps(
    configs: Sequence[str], overrides: list[str] | None = None, batch_size: int | None = None, steps: int = 5,
    warmup: int = 2,
) -> list[dict[str, float]]:
    """`bench_train_step` for several configs in one process, one after the other on the same machine
    state; each row gains `step_vs_first` = its step time / the first config's (e.g. CMAL vs baseline)."""
    rows = [bench_train_step(c, overrides, batch_size, steps, warmup) for c in configs]
    for row in rows:
        row["step_vs_first"] = row["step_s"] / rows[0]["step_s"]
    return rows


def bench_world(image_size: int = 64, count: int = 200) -> dict[str, float]:
    """World rendering samples/s on one core (one process, the DataLoader-worker situation)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        split = World(seed=0, image_size=image_size).split("train")
        split[0]
        start = time.perf_counter()
        for i in range(count):
            split[i]
        seconds = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
    return {"image_size": image_size, "samples_per_s_per_core": count / seconds}
