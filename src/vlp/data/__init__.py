"""Data: the embedded world, tokenisation, image transforms, datasets and collation into `vlp.types.Batch`.

Only numpy, Pillow, tokenizers and torch tensors (for collation) are used here; never vlp.models or
vlp.methods. `World` is imported lazily so that `import vlp.data.tokenizer` stays cheap.
"""

from __future__ import annotations

from typing import Any

from vlp.data.datasets import PairDataset, RetrievalSet, collate
from vlp.data.tokenizer import TextTokenizer, pre_caption
from vlp.data.transforms import CLIP_MEAN, CLIP_STD, image_to_tensor, load_image

__all__ = [
    "World",
    "TextTokenizer",
    "pre_caption",
    "PairDataset",
    "RetrievalSet",
    "collate",
    "image_to_tensor",
    "load_image",
    "CLIP_MEAN",
    "CLIP_STD",
]


def __getattr__(name: str) -> Any:
    if name == "World":
        from vlp.data.world import World

        return World
    raise AttributeError(f"module 'vlp.data' has no attribute {name!r}")
