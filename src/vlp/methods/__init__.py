"""Pre-training methods: the registry. A method is one file here, one config and one line in `METHODS`.

The contract every method follows (what it computes, what it declares about itself) is
`vlp.methods.base.PretrainMethod`; nothing outside this package names a method: the trainer, evaluation,
fine-tuning, data sources, the CLI and the demo ask the registered class. Registering a method also
registers its config section (`vlp.config.register_method_config`), so `method: {name: NAME, ...}`
validates against it.

`build_method(cfg, model, tokenizer, class_words)` builds the method `cfg.method.name`; `class_words[k]`
are the words naming object class k (the detector's label vocabulary): methods may not import
`vlp.data`, so the caller passes them (CMAL's anchor lexicon needs them; the others ignore them).
"""

from __future__ import annotations

from typing import Any, Iterable, Optional, Sequence

from torch import nn

from vlp.config import ConfigError, RunConfig, register_method_config
from vlp.methods.albef import Albef
from vlp.methods.base import PretrainMethod
from vlp.methods.clip import Clip
from vlp.methods.cmal import Cmal
from vlp.methods.simla import Simla
from vlp.methods.uniter import Uniter
from vlp.methods.vlmixer import VLMixer

METHODS: dict[str, type[PretrainMethod]] = {cls.name: cls for cls in (
    Albef,
    Cmal,
    Clip,
    Uniter,
    Simla,
    VLMixer,
)}

for _method in METHODS.values():
    register_method_config(_method.config_class)


def method_class(name: str) -> type[PretrainMethod]:
    """The registered class of method `name` (ConfigError naming the known ones otherwise)."""
    if name not in METHODS:
        raise ConfigError(f"unknown method '{name}' (known: {', '.join(sorted(METHODS))}); a config needs "
                          f"method.name set to one of them")
    return METHODS[name]


def build_method(
    cfg: RunConfig, model: nn.Module, tokenizer: Any, class_words: Optional[Sequence[Iterable[str]]] = None
) -> PretrainMethod:
    """The pre-training method `cfg.method.name` around `model`.

    `tokenizer` must expose `pad_id`, `mask_id`, `cls_id`, `special_ids` and `vocab_size`.
    """
    return method_class(cfg.method.name).from_config(cfg, model, tokenizer, class_words=class_words)


__all__ = ["METHODS", "PretrainMethod", "build_method", "method_class"]
