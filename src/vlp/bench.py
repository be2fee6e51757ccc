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

Each row also splits a step into the wait for data and its forward / backward / optimizer phases
(`bench_train_step`); `write_train_rows` saves the rows as `bench_train.csv` and the breakdown as
`bench_train.png` (`vlp bench train --out DIR`).
"""

from __future__ import annotations

import csv
import resource
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
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
from vlp.train.timing import PhaseClock
from vlp.types import Batch


# The phases of a training step `Trainer.train_step` bills with a `PhaseClock` (`data` is timed by the bench).
STEP_PHASES = ("forward", "backward", "optimizer")


def world_pairs(cfg: RunConfig, images: int, tokenizer: Any = None) -> tuple[PairDataset, Any]:
    """(image, caption) pairs of the first `images` world training images at the config's image size, tokenised
    by `tokenizer` (default: the config's, built on this world): (PairDataset, tokenizer). The world is a new
    one, so nothing of it is rendered (or cached) yet."""
    world = World(seed=cfg.data.world_seed, image_size=cfg.model.vision.image_size, sizes={"train": images})
    tokenizer = tokenizer if tokenizer is not None else build_tokenizer(cfg, world)
    data = PairDataset(world.split("train"), tokenizer, cfg.data.max_text_len, max_words=cfg.data.max_text_len)
    return data, tokenizer


def world_batch(cfg: RunConfig, batch_size: int, device: torch.device) -> tuple[Batch, Any]:
    """A real training batch of the world at the config's image size (captions, boxes, region labels):
    every method gets the inputs it trains on (CMAL needs boxes and its class lexicon), and methods
    compared in one run see the same batch. Returns (batch, tokenizer)."""
    data, tokenizer = world_pairs(cfg, batch_size)
    return pair_batch(data, batch_size).to(device), tokenizer


def pair_batch(data: PairDataset, batch_size: int) -> Batch:
    """One caption of each of the first `batch_size` images of `data` (ITM needs other images in the batch),
    caption i % captions_per_image of image i, collated on the CPU; `sample_keys` = 0..batch_size-1."""
    per_image = data.captions_per_image
    batch = collate([data[i * per_image + i % per_image] for i in range(batch_size)])
    batch.sample_keys = torch.arange(batch_size)
    return batch


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
    """Samples/s, step time and its phases, peak memory and MFU of `steps` optimizer steps on one real world
    batch, and the first step's loss (`loss_step0`: rows of one config that differ only in a setting meant to
    leave the result unchanged, e.g. `albef_tiny:model.length_buckets=1` vs `=3`, show the same value).

    `config` is a config name or path, optionally followed by `:key=value,key=value` overrides of that
    config alone (e.g. `demo:method.loss_weights.itm=0,method.loss_weights.mlm=0`, ALBEF's ITC-only cost),
    applied after the shared `overrides`.

    A method that samples one task per step (CMAL `task_mixing: ratio`) is timed over `steps` consecutive
    steps of its task schedule, so the mean step time is the one training sees (use enough steps for the
    mix to show: the ratio 1:3:2 needs ~12+). FLOPs are counted on one step after the timed ones (past step 0,
    where a ramped alpha of 0 skips SIMLA's soft targets); for a task-mixing method, that step's task.

    The step timed is the trainer's own (`Trainer.train_step`: autocast, GradScaler, gradient
    accumulation and clipping, LR schedule, `on_step_end`), built from the config's `train` section.
    `step_s` is its mean time and `samples_per_s` = batch size / `step_s` (the model's rate, data excluded).

    Step breakdown (per-step means, seconds; `vlp.train.timing.PhaseClock`, which synchronises the device at
    each boundary): `forward_s`, `backward_s`, `optimizer_s` (they sum to `step_s` up to the clock's own
    cost), and `data_s`, the time the loop waits for its next batch from the config's own DataLoader
    (`Trainer._loader`: `data.num_workers` workers rendering and collating world pairs, prefetching while the
    step runs, as in training; 0 workers = loading in the loop itself). One batch is fetched before every
    step, but the step trains on the fixed batch, so the weights, the losses and `loss_step0` are those of the
    fixed batch, whatever the loader yields. The loader reads a new world of `batch_size x (steps + warmup + 1)`
    images, so its samples are mostly rendered, not served by the world's sample cache: the data wait of a
    first epoch, the worst one. `data_s` near 0 means the workers keep up with the model; a large `data_s`
    means training would wait for data (more `data.num_workers`).
    """
    name, _, own = config.partition(":")  # CONFIG[:key=value,key=value]: overrides of this config alone
    cfg = load_config(name, [*(overrides or []), *[o for o in own.split(",") if o]])
    row_rss = _reset_peak_rss()  # this row's peak RSS, not the process's so far
    device = select_device(cfg.train.device)
    batch_size = batch_size or cfg.train.batch_size
    data, tokenizer = world_pairs(cfg, batch_size)
    batch = pair_batch(data, batch_size).to(device)
    torch.manual_seed(0)
    model = VLModel(cfg.model, vocab_size=tokenizer.vocab_size, pad_id=tokenizer.pad_id)
    method = build_method(cfg, model, tokenizer, class_words=world_class_words()).to(device)  # a world batch
    if method.images_to_prepare():  # state fitted before step 0 (SIMLA's visual tokenizer): on the batch's images
        method.prepare(batch.images)
    # The trainer's step on the one batch: the global batch is this batch; the schedule covers every call.
    cfg.train.batch_size = batch_size
    cfg.train.steps = max(cfg.train.steps, steps + warmup + 2)  # + the FLOP-counted step
    cfg.train.tensorboard = False
    cfg.train.progress = False
    with tempfile.TemporaryDirectory(prefix="vlp-bench-") as out_dir:
        # the config's own loader over world pairs not rendered yet (the data phase); every step trains on the
        # fixed batch
        loader_pairs, _ = world_pairs(cfg, batch_size * (steps + warmup + 1), tokenizer)
        trainer = Trainer(cfg, method, loader_pairs, collate, out_dir=out_dir)
        batches = iter(trainer._loader(0))
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

        trainer._next_batch(batches)  # the workers start and render ahead while the first steps run
        first, _ = trainer.train_step(batch)
        for _ in range(warmup):
            trainer._next_batch(batches)
            trainer.train_step(batch)
        _sync(device)
        trainer.phase_clock = PhaseClock(device)
        step_total = mm_total = data_total = 0.0
        for _ in range(steps):
            waited = time.perf_counter()
            trainer._next_batch(batches)
            start = time.perf_counter()
            trainer.train_step(batch)
            _sync(device)
            middle = time.perf_counter()
            for _ in range(reps):
                mm_a @ mm_b
            _sync(device)
            data_total += start - waited
            step_total += middle - start
            mm_total += time.perf_counter() - middle
        del batches  # the loader's workers stop
        step_s = step_total / steps
        peak = 2 * n**3 * reps * steps / mm_total
        phases = {f"{name}_s": trainer.phase_clock.seconds.get(name, 0.0) / steps for name in STEP_PHASES}
        trainer.phase_clock = None
        # FLOPs of one step after the timed ones, not of step 0: at step 0 SIMLA's alpha is 0 (ramped) and its
        # momentum soft-target passes are skipped, which under-counted its step by ~15 %
        with FlopCounterMode(display=False) as counter:
            trainer.train_step(batch)
        step_flops = counter.get_total_flops()
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
        "data_s": data_total / steps,
        **phases,
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


# The bars of `plot_step_phases`, in drawing order: the wait for data, then the step's own phases.
BREAKDOWN = ("data", *STEP_PHASES)


def write_train_rows(rows: Sequence[dict[str, Any]], out_dir: str | Path) -> tuple[Path, Path]:
    """Save `compare_train_steps` rows into `out_dir` (created): `bench_train.csv`, one line per config with
    every column any row has (empty where a row lacks it, e.g. `peak_gpu_mem_GiB` on CPU), and
    `bench_train.png` (`plot_step_phases`). Returns (csv path, png path)."""
    if not rows:
        raise ValueError("write_train_rows needs at least one row of `vlp bench train`")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "bench_train.csv"
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with open(csv_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
    return csv_path, plot_step_phases(rows, out / "bench_train.png")


def plot_step_phases(rows: Sequence[dict[str, Any]], png_path: str | Path) -> Path:
    """One horizontal stacked bar per row (config, first at the top): its `data_s`, `forward_s`, `backward_s`
    and `optimizer_s` in milliseconds, annotated with the row's samples/s. Drawn like `vlp.viz` (a
    `Figure` on the Agg canvas, no pyplot). A KeyError names a row without the breakdown."""
    missing = [str(row.get("config")) for row in rows if any(f"{p}_s" not in row for p in BREAKDOWN)]
    if missing:
        raise KeyError(f"rows without the step breakdown ({', '.join(f'{p}_s' for p in BREAKDOWN)}): {missing}")
    labels = [str(row["config"]) for row in rows]
    fig = Figure(figsize=(8.0, 1.2 + 0.5 * len(rows)), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    positions = list(range(len(rows)))[::-1]  # the first config at the top
    left = [0.0] * len(rows)
    for phase in BREAKDOWN:
        widths = [1e3 * float(row[f"{phase}_s"]) for row in rows]
        ax.barh(positions, widths, left=left, height=0.6, label=phase)
        left = [a + b for a, b in zip(left, widths)]
    for y, total, row in zip(positions, left, rows):
        ax.text(total, y, f" {float(row['samples_per_s']):.1f} samples/s", va="center", fontsize=8)
    ax.set_yticks(positions)
    ax.set_yticklabels(labels)
    ax.set_xlim(0, 1.3 * max(left + [1e-3]))  # room for the annotations
    ax.set_xlabel("ms per step (data wait + forward + backward + optimizer)")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="lower left", bbox_to_anchor=(0.0, 1.0), ncol=len(BREAKDOWN), frameon=False)  # above
    fig.tight_layout()
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path)
    return png_path


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
