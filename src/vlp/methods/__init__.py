"""Pre-training methods: each an `nn.Module` around a `VLModel` (see `docs/contracts.md`, "Methods").

`build_method(cfg, model, tokenizer, class_words)` picks the class named by `cfg.method.name`; a method
registers its builder (`from_config(cfg, model, tokenizer, class_words=None)`) in `METHODS`.
`class_words[k]` are the words naming object class k (the detector's label vocabulary): methods may not
import `vlp.data`, so the caller passes them (CMAL's anchor lexicon needs them; ALBEF ignores them).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional, Sequence

from torch import nn

from vlp.config import RunConfig
from vlp.methods.albef import Albef
from vlp.methods.cmal import Cmal

METHODS: dict[str, Callable[..., nn.Module]] = {
    "albef": Albef.from_config,
    "cmal": Cmal.from_config,
}


def build_method(
    cfg: RunConfig, model: nn.Module, tokenizer: Any, class_words: Optional[Sequence[Iterable[str]]] = None
) -> nn.Module:
    """The pre-training method `cfg.method.name` around `model`.

    `tokenizer` must expose `pad_id`, `mask_id`, `cls_id`, `special_ids` and `vocab_size`.
    """
    name = cfg.method.name
    if name not in METHODS:
        raise ValueError(f"unknown method '{name}' (known: {', '.join(sorted(METHODS))})")
    return METHODS[name](cfg, model, tokenizer, class_words=class_words)


__all__ = ["Albef", "Cmal", "METHODS", "build_method"]
