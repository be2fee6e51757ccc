"""`vlp bench`: throughput of a pre-training step, world rendering, peak memory and MFU.

MFU = achieved model FLOP/s divided by the matmul peak *measured in the same run* on the same
device and dtype (a large square matmul), not a datasheet number, so CPU and GPU readings compare
honestly. The peak is measured interleaved with the timed steps (one matmul after each step), so both
see the same machine load; peak RSS is the row's own (the kernel's high-water mark is reset before each
config where Linux allows it, else the column is `peak_rss_process_GiB`, the process's peak so far).
`cpu_matmul_peaks` reports the CPU's capability and its fp32 and bf16 matmul rates (bf16 without
AVX-512 BF16 / AMX is emulated and far slower: `vlp.train.cpu`). Model FLOPs of a step are counted by `torch.utils.flop_counter.FlopCounterMode` over one
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
from vlp.train.cpu import cpu_bf16_support, cpu_capability
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


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int = 512, seconds: float = 0.3) -> float:
    """FLOP/s of n x n matmuls repeated for about `seconds` (after one untimed call)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    _sync(device)
    count, start = 0, time.perf_counter()
    while True:
        a @ b
        _sync(device)
        count += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return 2 * n**3 * count / elapsed


def cpu_matmul_peaks(n: int = 512, seconds: float = 0.3) -> dict[str, Any]:
    """The CPU's dispatch capability, whether bf16 matmul has hardware support (`vlp.train.cpu`) and the
    fp32 and bf16 n x n matmul rates measured now, at the current torch thread count."""
    fast, reason = cpu_bf16_support()
    cpu = torch.device("cpu")
    return {
        "cpu_capability": cpu_capability(),
        "bf16_matmul": f"{'fast' if fast else 'slow'} ({reason})",
        "torch_threads": torch.get_num_threads(),
        "fp32_matmul_GFLOPs": matmul_rate(cpu, torch.float32, n, seconds) / 1e9,
        "bf16_matmul_GFLOPs": matmul_rate(cpu, torch.bfloat16, n, seconds) / 1e9,
    }


def _reset_peak_rss() -> bool:
    """Reset this process's RSS high-water mark (Linux >= 4.0: "5" > /proc/self/clear_refs); False when not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> float:
    """VmHWM of /proc/self/status (the peak since the last reset), else getrusage's process peak."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0  # KiB on Linux


def bench_train_step(
    config: str = "albef_tiny", overrides: list[str] | None = None, batch_size: int | None = None,
    steps: int = 5, warmup: int = 2,
) -> dict[str, float]:
    """Samples/s, step time, peak memory and MFU of `steps` optimizer steps on one real world batch, and the
    first step's loss (`loss_step0`: rows of one config that differ only in a setting meant to leave the result
    unchanged, e.g. `albef_tiny:model.length_buckets=1` vs `=3`, show the same value).

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
    row_rss = _reset_peak_rss()  # this row's peak RSS, not the process's so far
    device = select_device(cfg.train.device)
    batch_size = batch_size or cfg.train.batch_size
    batch, tokenizer = world_batch(cfg, batch_size, device)
    torch.manual_seed(0)
    model = VLModel(cfg.model, vocab_size=tokenizer.vocab_size, pad_id=tokenizer.pad_id)
    method = build_method(cfg, model, tokenizer, class_words=world_class_words()).to(device)  # a world batch
    if method.images_to_prepare():  # state fitted before step 0 (SIMLA's visual tokenizer): on the batch's images
        method.prepare(batch.images)
    # The trainer's step on the one batch: the global batch is this batch; the schedule covers every call.
    cfg.train.batch_size = batch_size
    cfg.train.steps = max(cfg.train.steps, steps + warmup + 1)
    cfg.train.tensorboard = False
    cfg.train.progress = False
    with tempfile.TemporaryDirectory(prefix="vlp-bench-") as out_dir:
        trainer = Trainer(cfg, method, list(range(batch_size)), lambda items: batch, out_dir=out_dir)
        dtype = trainer.amp_dtype
        # MFU denominator: an n x n matmul of the step's dtype after every timed step (same machine load).
        # bf16 on a CPU without bf16 hardware (only when forced, VLP_FORCE_CPU_BF16=1) is ~50x slower: smaller n.
        slow_bf16 = device.type == "cpu" and dtype is not None and not cpu_bf16_support()[0]
        n = 512 if slow_bf16 else 2048
        reps = 10 if device.type == "cuda" else 1  # a 2048 matmul is microseconds on a GPU: time a few
        mm_a = torch.randn(n, n, device=device, dtype=dtype or torch.float32)
        mm_b = torch.randn(n, n, device=device, dtype=dtype or torch.float32)
        mm_a @ mm_b
        method.train()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

        with FlopCounterMode(display=False) as counter:
            first, _ = trainer.train_step(batch)
        step_flops = counter.get_total_flops()
        for _ in range(warmup):
            trainer.train_step(batch)
        _sync(device)
        step_total = mm_total = 0.0
        for _ in range(steps):
            start = time.perf_counter()
            trainer.train_step(batch)
            _sync(device)
            middle = time.perf_counter()
            for _ in range(reps):
                mm_a @ mm_b
            _sync(device)
            step_total += middle - start
            mm_total += time.perf_counter() - middle
        step_s = step_total / steps
        peak = 2 * n**3 * reps * steps / mm_total
        del mm_a, mm_b
    runtime = trainer.runtime
    precision = runtime.effective_precision
    if precision != cfg.train.precision:
        precision += f" ({cfg.train.precision} asked)"
    result = {
        "config": str(config),
        "method": cfg.method.name,
        "device": str(device),
        "precision": precision,
        "threads": runtime.threads,
        "batch_size": batch_size,
        "params_M": sum(p.numel() for p in method.parameters()) / 1e6,
        "step_s": step_s,
        "samples_per_s": batch_size / step_s,
        # the first step's loss (same seed, weights and batch in every row): settings that must not change the
        # result (e.g. model.length_buckets) show the same value
        "loss_step0": float(first["loss"]),
        "peak_rss_GiB" if row_rss else "peak_rss_process_GiB": _peak_rss_bytes() / 2**30,
    }
    model_flops = step_flops / step_s
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
