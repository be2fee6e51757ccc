"""Shared fixtures: a small world (32 px) and its tokenizer, built once per session.

Test modules that need another world size define their own `world` / `tok` fixtures, which take
precedence over these (pytest fixture overriding).
"""

import pytest

from vlp.data.tokenizer import TextTokenizer
from vlp.data.world import World


@pytest.fixture(scope="session")
def world() -> World:
    return World(seed=1, image_size=32, sizes={"train": 40, "val": 8, "test": 8})


@pytest.fixture(scope="session")
def tok(world) -> TextTokenizer:
    return TextTokenizer.train_on_world(world, vocab_size=500, num_scenes=30)
