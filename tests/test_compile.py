"""`train.compile` (issue 15): torch.compile of the encoders or of the whole method, eager by default."""

from __future__ import annotations

import pytest

from test_method_contract import build
from vlp.config import ConfigError, build_config
from vlp.data.datasets import PairDataset, collate
from vlp.train.loop import Trainer, compile_encoders

pytestmark = pytest.mark.usefixtures("one_thread")


def test_compile_modes_are_validated():
    assert build_config({"model": "tiny", "method": {"name": "albef"}}).train.compile == "off"
    with pytest.raises(ConfigError, match="compile"):
        build_config({"model": "tiny", "method": {"name": "albef"}, "train": {"compile": "all"}})


def test_compile_encoders_compiles_each_stack_in_place(tok):
    _, method = build("albef", tok)
    names = sorted(n for n, _ in method.named_parameters())
    assert compile_encoders(method, backend="eager") == ["model.vision", "model.text", "model.fusion"]
    assert sorted(n for n, _ in method.named_parameters()) == names  # checkpoints keep their keys
    assert method.model.vision._compiled_call_impl is not None and method.model.itm_head._compiled_call_impl is None


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["encoders", "method"])
def test_a_compiled_step_equals_the_eager_step(mode, world, tok, tmp_path):
    data = PairDataset(world.split("train"), tok, 40, max_words=40)
    losses = {}
    for compile_mode in ("off", mode):
        cfg, method = build("albef", tok, steps=2, compile=compile_mode, compile_backend="eager")
        records = Trainer(cfg, method, data, collate, tmp_path / compile_mode).fit()
        losses[compile_mode] = [r["loss"] for r in records if "loss" in r]
    assert len(losses["off"]) == 2 and losses[mode] == pytest.approx(losses["off"], rel=1e-5)
