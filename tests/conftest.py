"""Shared fixtures: a small world (32 px) and its tokenizer, built once per session.

Test modules that need another world size define their own `world` / `tok` fixtures, which take
precedence over these (pytest fixture overriding).
"""

import pytest
import torch

from vlp.data.tokenizer import TextTokenizer
from vlp.data.world import World


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls on a shared 2-core box run much faster single-threaded: a module opts in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`; the thread count is restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_albef(tok, image_size: int = 32):
    """A one-layer-per-tower ALBEF method (seeded) for downstream-task tests."""
    from vlp.config import build_config
    from vlp.methods import build_method
    from vlp.models.model import VLModel

    cfg = build_config({"model": "tiny", "method": {"name": "albef"}},
                       [f"model.vision.image_size={image_size}", "model.vision.depth=1", "model.text.depth=1",
                        "model.fusion.depth=1"])
    torch.manual_seed(0)
    return build_method(cfg, VLModel(cfg.model, vocab_size=tok.vocab_size, pad_id=tok.pad_id), tok)


def fit_full_batch(module, batch, steps: int, lr: float) -> tuple[list, dict]:
    """`steps` AdamW steps on one fixed batch (the downstream learning tests): the per-step losses and the
    last step's outputs."""
    opt = torch.optim.AdamW(module.parameters(), lr=lr)
    losses, out = [], {}
    for _ in range(steps):
        out = module(batch)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(float(out["loss"].detach()))
    return losses, out


@pytest.fixture(scope="session")
def world() -> World:
    return World(seed=1, image_size=32, sizes={"train": 40, "val": 8, "test": 8})


@pytest.fixture(scope="session")
def tok(world) -> TextTokenizer:
    return TextTokenizer.train_on_world(world, vocab_size=500, num_scenes=30)
