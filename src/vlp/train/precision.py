"""The one map from `train.precision` to the autocast dtype, for training, evaluation and benchmarks."""

from __future__ import annotations

import warnings
from typing import Optional

import torch

from vlp.train.cpu import resolve_precision

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_dtype(precision: str, device: torch.device, warn: bool = False) -> Optional[torch.dtype]:
    """The autocast dtype of `precision` on `device` (None = fp32, no autocast).

    fp16 needs CUDA: on CPU it falls back to bf16; bf16 on a GPU without bf16 support falls back to fp16
    (with a GradScaler in training); bf16 / fp16 on a CPU without bf16 hardware falls back to fp32
    (`vlp.train.cpu.resolve_precision`; VLP_FORCE_CPU_BF16=1 keeps it). `warn` says so once per call (the
    trainer warns; evaluation does not)."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision '{precision}' (known: {', '.join(PRECISIONS)})")
    precision, note = resolve_precision(precision, device.type)
    if note is not None and warn:
        warnings.warn(note, stacklevel=3)
    dtype = PRECISIONS[precision]
    if dtype is torch.float16 and device.type != "cuda":
        if warn:
            warnings.warn("train.precision=fp16 needs CUDA; using bf16 autocast on CPU instead", stacklevel=3)
        return torch.bfloat16
    if dtype is torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        if warn:
            warnings.warn("this GPU has no bf16 support; using fp16 autocast with a GradScaler", stacklevel=3)
        return torch.float16
    return dtype
