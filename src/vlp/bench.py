"""`vlp bench`: throughput of a pre-training step, world rendering, peak memory and MFU.

MFU = achieved model FLOP/s divided by the matmul peak *measured in the same run* on the same
device and dtype (a large square matmul), not a datasheet number, so CPU and GPU readings compare
honestly. Model FLOPs of a step are counted by `torch.utils.flop_counter.FlopCounterMode` over one
whole training step (forward and backward of every pass the method makes: for ALBEF the ITC
encoders, three ITM fusion passes and the MLM pass), so no per-method formula can drift.
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from vlp.config import RunConfig, load_config
from vlp.data.world import World
from vlp.methods import build_method
from vlp.models.model import VLModel
from vlp.types import Batch


@dataclass
class _SyntheticTokenizer:
    """Token ids for a synthetic batch: the benchmark measures compute, not text."""

    vocab_size: int
    pad_id: int = 0
    cls_id: int = 1
    sep_id: int = 2
    mask_id: int = 3
    unk_id: int = 4

    @property
    def special_ids(self) -> frozenset[int]:
        return frozenset({0, 1, 2, 3, 4})


def synthetic_batch(cfg: RunConfig, batch_size: int, text_len: int, vocab_size: int, device: torch.device) -> Batch:
    size = cfg.model.vision.image_size
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab_size, (batch_size, text_len), generator=gen)
    ids[:, 0], ids[:, -1] = 1, 2
    return Batch(
        input_ids=ids.to(device),
        attention_mask=torch.ones_like(ids).to(device),
        images=torch.randn(batch_size, 3, size, size, generator=gen).to(device),
        image_ids=torch.arange(batch_size).to(device),
        sample_keys=torch.arange(batch_size).to(device),
    )


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
    steps: int = 5, warmup: int = 2, text_len: int = 32,
) -> dict[str, float]:
    """Samples/s, step time, peak memory and MFU of `steps` optimizer steps on synthetic batches."""
    cfg = load_config(config, overrides)
    device = torch.device(cfg.train.device if cfg.train.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    batch_size = batch_size or cfg.train.batch_size
    vocab = cfg.model.text.vocab_size or max(cfg.data.vocab_size, 1000)
    tokenizer = _SyntheticTokenizer(vocab_size=vocab)
    torch.manual_seed(0)
    model = VLModel(cfg.model, vocab_size=vocab, pad_id=0)
    method = build_method(cfg, model, tokenizer).to(device)  # synthetic text: no lexicon (ALBEF-family)
    optimizer = torch.optim.AdamW(method.parameters(), lr=1e-4)
    batch = synthetic_batch(cfg, batch_size, text_len, vocab, device)
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.train.precision]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def one_step() -> float:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            out = method(batch)
        out["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if hasattr(method, "on_step_end"):
            method.on_step_end()
        return float(out["loss"].detach())

    with FlopCounterMode(display=False) as counter:
        one_step()
    step_flops = counter.get_total_flops()
    for _ in range(warmup):
        one_step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        one_step()
    _sync(device)
    step_s = (time.perf_counter() - start) / steps
    result = {
        "config": config,
        "device": str(device),
        "precision": cfg.train.precision,
        "batch_size": batch_size,
        "params_M": model.num_parameters() / 1e6,
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
