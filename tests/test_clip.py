"""The CLIP-style contrastive baseline (`vlp.methods.clip`): its loss against a hand-written open_clip
reference, the clamped logit scale, the frozen fusion parts, learning, and the whole CLI path — it plugs in
through its file, its registry line and its config only, and pre-trains, evaluates, fine-tunes every task
and joins the demo."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import fit_full_batch
from vlp.build import world_class_words
from vlp.cli.main import main
from vlp.config import build_config, load_config
from vlp.data.datasets import PairDataset, collate
from vlp.methods import build_method
from vlp.methods.clip import Clip
from vlp.models.model import VLModel

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["model.vision.image_size=32", "model.vision.depth=1", "model.text.depth=1", "model.vision.width=32",
        "model.text.width=32", "model.vision.heads=2", "model.text.heads=2", "model.embed_dim=16"]


def tiny_clip(tok, seed: int = 0) -> Clip:
    cfg = build_config(load_config("demo_clip").model_dump(mode="json"), TINY)
    torch.manual_seed(seed)
    return build_method(cfg, VLModel(cfg.model, vocab_size=tok.vocab_size, pad_id=tok.pad_id), tok,
                        class_words=world_class_words())


def batch_of(world, tok, rows: int = 8):
    data = PairDataset(world.split("train"), tok, 40, max_words=40)
    per = data.captions_per_image
    batch = collate([data[i * per + i % per] for i in range(rows)])
    batch.sample_keys = torch.arange(rows)
    return batch


def test_loss_is_open_clips_symmetric_cross_entropy(world, tok):
    """Distinct images: the loss is open_clip's ClipLoss (local_loss, 1 rank): ½ (CE(s·VTᵀ, i) + CE(s·TVᵀ, i))."""
    method = tiny_clip(tok).train()
    batch = batch_of(world, tok)
    out = method(batch)
    with torch.no_grad():
        _, _, v, t = method.embed(batch.images, batch.input_ids, batch.attention_mask)
        s = 1.0 / 0.07
        labels = torch.arange(8)
        reference = (F.cross_entropy(s * v @ t.T, labels) + F.cross_entropy(s * t @ v.T, labels)) / 2
    assert out["loss"].item() == pytest.approx(reference.item(), rel=1e-5)
    assert out["logit_scale"].item() == pytest.approx(s, rel=1e-6)
    assert set(out) == {"loss", "itc", "logit_scale", "itc_acc"}


def test_captions_of_one_image_are_positives_of_each_other(world, tok):
    method = tiny_clip(tok).train()
    batch = batch_of(world, tok)
    batch.image_ids = torch.tensor([0, 0, 1, 2, 3, 4, 5, 6])  # rows 0 and 1 show the same image
    with torch.no_grad():
        _, _, v, t = method.embed(batch.images, batch.input_ids, batch.attention_mask)
        logits = (1.0 / 0.07) * v @ t.T
        target = torch.eye(8)
        target[0, 1] = target[1, 0] = 1.0
        target = target / target.sum(1, keepdim=True)
        reference = (-(target * logits.log_softmax(1)).sum(1).mean() - (target * logits.T.log_softmax(1)).sum(1).mean()) / 2
    assert method(batch)["loss"].item() == pytest.approx(reference.item(), rel=1e-5)


def test_logit_scale_is_clamped_and_fusion_is_frozen(tok):
    method = tiny_clip(tok)
    with torch.no_grad():
        method.logit_scale.fill_(math.log(500.0))
    assert method.scale().item() == pytest.approx(100.0)
    method.on_step_end()
    assert method.logit_scale.item() == pytest.approx(math.log(100.0))
    frozen = {n for n, p in method.named_parameters() if not p.requires_grad}
    assert any(n.startswith("model.itm_head.") for n in frozen) and "model.temp" in frozen
    assert not any(n.startswith(("model.vision.", "model.text.", "model.vision_proj.")) for n in frozen)
    assert method.unused_parameters() == set()
    cfg = build_config(load_config("demo_clip").model_dump(mode="json"), [*TINY, "method.max_logit_scale=5"])
    with pytest.raises(ValueError, match="max_logit_scale"):
        Clip(VLModel(cfg.model, vocab_size=tok.vocab_size), cfg.method)


def test_itc_learns_to_match_images_and_captions(world, tok):
    method = tiny_clip(tok).train()
    batch = batch_of(world, tok, rows=16)
    losses, out = fit_full_batch(method, batch, steps=40, lr=2e-3)
    first = losses[0]
    assert out["loss"].item() < 0.5 * first
    assert out["itc_acc"].item() >= 4 / 16  # chance 1/16 (measured 7/16)


RUN = ["--set", "train.steps=2", "--set", "train.batch_size=8", "--set", "train.log_every=1",
       "--set", "train.warmup_steps=1", "--set", "train.progress=false", "--set", "train.tensorboard=false",
       "--set", "data.train_images=40", "--set", "data.budget=100", "--set", "eval.num_images=6",
       "--set", "model.vision.depth=1", "--set", "model.text.depth=1"]
FT = ["--set", "train.steps=2", "--set", "train.batch_size=4", "--set", "train.log_every=1",
      "--set", "train.warmup_steps=1", "--set", "train.progress=false", "--set", "train.tensorboard=false",
      "--set", "task.train_size=8", "--set", "task.eval_size=6", "--set", "eval.num_images=6"]


@pytest.mark.slow
def test_clip_through_the_cli(tmp_path, capsys):
    """pretrain -> eval retrieval (ITC, reproduces the run's numbers) -> finetune every task -> demo."""
    pre = tmp_path / "pre"
    assert main(["pretrain", "--config", "demo_clip", "--out", str(pre), *RUN]) == 0
    final = json.loads((pre / "eval.json").read_text())
    assert 0.0 <= final["eval/itc/r_mean"] <= 100.0 and "eval/itm_all/r_mean" not in final
    assert (pre / "retrieval_examples.png").is_file() and (pre / "loss_curve.png").is_file()
    assert main(["eval", "retrieval", "--checkpoint", str(pre), "--out", str(tmp_path / "ev")]) == 0
    again = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert again["itc/r_mean"] == pytest.approx(final["eval/itc/r_mean"])
    keys = {"ve": "test/acc", "rec": "test/gt_acc", "vqa": "test/acc", "nlvr2": "test/acc", "retrieval": "itc/r_mean"}
    for task, key in keys.items():
        out = tmp_path / f"ft_{task}"
        assert main(["finetune", task, "--checkpoint", str(pre), "--out", str(out), *FT]) == 0, task
        metrics = json.loads((out / "eval.json").read_text())
        assert 0.0 <= metrics[key] <= 100.0 and metrics["checkpoint"] == str(pre), task
    capsys.readouterr()
    assert main(["demo", "--methods", "clip", "--out", str(tmp_path / "demo"), "--tasks", "ve",
                 *RUN, "--set", "task.train_size=8", "--set", "task.eval_size=6"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("| clip"))
    assert "| itc " in row
    assert any(line.startswith("| scratch") for line in out.splitlines())
