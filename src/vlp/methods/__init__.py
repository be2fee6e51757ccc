"""Pre-training methods: each an `nn.Module` around a `VLModel` (see `docs/contracts.md`, "Methods").

`build_method(cfg, model, tokenizer)` picks the class named by `cfg.method.name`; a method registers
its builder (`from_config(cfg, model, tokenizer)`) in `METHODS`.
"""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

from vlp.config import RunConfig
from vlp.methods.albef import Albef

METHODS: dict[str, Callable[[RunConfig, Any, Any], nn.Module]] = {
    "albef": Albef.from_config,
}


def build_method(cfg: RunConfig, model: nn.Module, tokenizer: Any) -> nn.Module:
    """The pre-training method `cfg.method.name` around `model`.

    `tokenizer` must expose `pad_id`, `mask_id`, `cls_id`, `special_ids` and `vocab_size`.
    """
    name = cfg.method.name
    if name not in METHODS:
        raise ValueError(f"unknown method '{name}' (known: {', '.join(sorted(METHODS))})")
    return METHODS[name](cfg, model, tokenizer)


__all__ = ["Albef", "METHODS", "build_method"]
