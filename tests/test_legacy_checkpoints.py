"""v0.1 checkpoints (tests/data/legacy_v0_1, written before the momentum queue and region inputs moved into
`vlp.models`) load strictly into freshly built methods.

The method config is built here from the checkpoint's model section and the method fields that shape the
state dict, not through the config loader (which has its own compatibility tests), so this test follows
only the state-dict keys."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from vlp.config import build_config
from vlp.data.lexicon import CLASSES, class_words
from vlp.data.tokenizer import TextTokenizer
from vlp.methods import build_method
from vlp.methods.albef import LEGACY_QUEUE_KEYS
from vlp.models.model import VLModel

LEGACY = Path(__file__).parent / "data" / "legacy_v0_1"
# method fields that decide which tensors a method holds, and their shapes
SHAPING = {"albef": ("momentum_distill", "queue_size"),
           "cmal": ("unimodal_layers", "region_feat_dim", "max_regions", "whole_image_region", "grid_regions")}


def _fresh_method(name: str):
    raw = yaml.safe_load((LEGACY / name / "config.yaml").read_text())
    model = {k: v for k, v in raw["model"].items() if k != "name"}
    method = {"name": name, **{k: raw["method"][k] for k in SHAPING[name]}}
    if name == "cmal":
        method["region_source"] = "vit"  # v0.1's only region features (the loader adds it to v0.1 dumps)
    cfg = build_config({"model": model, "method": method})
    tok = TextTokenizer.load(LEGACY / name / "tokenizer.json")
    torch.manual_seed(0)
    vl = VLModel(cfg.model, vocab_size=tok.vocab_size, pad_id=tok.pad_id)
    words = [class_words(k) for k in range(len(CLASSES))]  # the world's lexicon (data.source: world)
    return build_method(cfg, vl, tok, class_words=words)


@pytest.mark.parametrize("name", ["albef", "cmal"])
def test_legacy_checkpoint_loads_strictly(name):
    state = load_file(str(LEGACY / name / "model.safetensors"))
    method = _fresh_method(name)
    method.load_state_dict(state, strict=True)
    own = method.state_dict()
    for key, value in state.items():  # every saved tensor landed, under its old or its new name
        assert torch.equal(own[LEGACY_QUEUE_KEYS.get(key, key)], value), key


def test_legacy_albef_queue_is_restored_into_the_feature_queue():
    state = load_file(str(LEGACY / "albef" / "model.safetensors"))
    assert set(LEGACY_QUEUE_KEYS) <= set(state)  # the file really has the old names
    method = _fresh_method("albef")
    method.load_state_dict(state, strict=True)
    assert method.queue.capacity == 32 and int(method.queue.count) == int(state["queue_count"]) > 0
    assert torch.equal(method.queue.image, state["image_queue"]) and torch.equal(method.queue.ids, state["queue_ids"])
    # new checkpoints use the new names, and they load back
    again = _fresh_method("albef")
    again.load_state_dict(method.state_dict(), strict=True)
    assert torch.equal(again.queue.text, state["text_queue"])


@pytest.mark.parametrize("name", ["albef", "cmal"])
def test_v0_1_checkpoint_evaluates_to_the_numbers_it_was_written_with(name, tmp_path):
    """`vlp eval retrieval --checkpoint` on a v0.1 checkpoint (flat method section, old queue keys) loads it
    through the current config loader and method and reproduces the eval.json v0.1 wrote at the end of
    its run; `vlp finetune` starts from it."""
    from vlp.cli.main import main

    written = json.loads((LEGACY / name / "eval.json").read_text())
    out = tmp_path / "eval"
    assert main(["eval", "retrieval", "--checkpoint", str(LEGACY / name), "--out", str(out),
                 "--set", "train.device=cpu"]) == 0
    again = json.loads((out / "eval.json").read_text())
    compared = [k for k in again if f"eval/{k}" in written and "/" in k]
    assert compared, again
    for key in compared:
        assert again[key] == pytest.approx(written[f"eval/{key}"], abs=1e-4), key
    ft = tmp_path / "ft"
    assert main(["finetune", "ve", "--checkpoint", str(LEGACY / name), "--out", str(ft), "--set", "train.steps=1",
                 "--set", "train.batch_size=4", "--set", "task.train_size=4", "--set", "task.eval_size=4",
                 "--set", "train.progress=false", "--set", "train.tensorboard=false"]) == 0
