"""The UNITER-style single-stream baseline (vlp.methods.uniter): masking, task mixing, losses, learning."""

from __future__ import annotations

import math

import pytest
import torch

from vlp.config import ConfigError, build_config
from vlp.data.datasets import PairDataset, collate
from vlp.data.lexicon import CLASSES, class_words
from vlp.data.world import World
from vlp.methods import build_method, method_class
from vlp.methods.uniter import Uniter, region_mask
from vlp.models.losses import IGNORE_INDEX
from vlp.models.model import VLModel

pytestmark = pytest.mark.usefixtures("one_thread")
WORDS = [class_words(k) for k in range(len(CLASSES))]


def make_uniter(tok, seed: int = 0, **method) -> Uniter:
    cfg = build_config({
        "model": {"size": "tiny", "vision": {"image_size": 32, "patch_size": 8, "width": 32, "depth": 1, "heads": 2},
                  "text": {"width": 32, "depth": 0, "heads": 2, "max_len": 48},
                  "fusion": {"type": "single", "depth": 2, "heads": 2}},
        "method": {"name": "uniter", **method}})
    torch.manual_seed(seed)
    return build_method(cfg, VLModel(cfg.model, vocab_size=tok.vocab_size, pad_id=tok.pad_id), tok, class_words=WORDS)


@pytest.fixture(scope="module")
def batch(world, tok):
    dataset = PairDataset(world.split("train"), tok, 40)
    out = collate([dataset[i] for i in range(0, 96, 3)][:16])
    out.sample_keys = torch.arange(16)
    return out


def test_region_mask_by_hand():
    labels = torch.tensor([[3, 0, 5, 2], [0, 0, 0, 0], [1, 4, 0, 0]])
    real = torch.tensor([[True, True, True, False], [True, True, False, False], [True, True, True, True]])
    uniforms = torch.tensor([[0.1, 0.0, 0.9, 0.0], [0.0, 0.0, 0.0, 0.0], [0.9, 0.9, 0.0, 0.0]])
    got = region_mask(labels, real, uniforms, fallback=torch.tensor([0.0, 0.0, 0.99]), prob=0.15)
    # row 0: region 0 drawn (0.1 < 0.15); region 1 unlabelled and region 3 padding never; region 2 not drawn
    # row 1: nothing labelled, nothing masked; row 2: none drawn -> the fallback picks the 2nd labelled one
    assert got.tolist() == [[True, False, False, False], [False, False, False, False], [False, True, False, False]]


def test_forward_sum_mode_parts_and_gradients(tok, batch):
    method = make_uniter(tok, task_mixing="sum").train()
    out = method(batch)
    assert {"loss", "mlm", "mlm_acc", "mrc", "mrc_acc", "itm", "itm_acc", "labelled_region_rate"} == set(out)
    assert all(torch.isfinite(v) and v.dim() == 0 for v in out.values())
    assert out["loss"].item() == pytest.approx(((3 * out["mlm"] + 2 * out["mrc"] + out["itm"]) / 6).item(), rel=1e-5)
    assert out["mlm"].item() == pytest.approx(math.log(tok.vocab_size), abs=1.0)  # untrained: near uniform
    assert out["mrc"].item() == pytest.approx(math.log(len(CLASSES) + 1), abs=0.7)
    assert out["labelled_region_rate"].item() == 1.0  # every world region has a class
    out["loss"].backward()
    for name in ("region_embed.feat_proj.weight", "region_head.out.weight", "model.itm_head.weight",
                 "model.fusion.blocks.0.attn.qkv.weight"):
        param = dict(method.named_parameters()).get(name)
        if param is not None:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert all(p.grad is None for n, p in method.named_parameters() if n.startswith("model.vision."))


def test_ratio_mode_one_task_per_step_3_2_1(tok, batch):
    method = make_uniter(tok)
    tasks = [method.task_for_step(s) for s in range(3000)]
    for task, p in (("mlm", 3 / 6), ("mrc", 2 / 6), ("itm", 1 / 6)):
        assert abs(tasks.count(task) / 3000 - p) < 4 * math.sqrt(p * (1 - p) / 3000)
    assert method.itm_steps(3000) == tasks.count("itm")
    method.train()
    out = method(batch)
    assert sum(k in out for k in ("mlm", "mrc", "itm")) == 1
    method.on_step_end()
    assert int(method.task_step) == 1
    assert make_uniter(tok, task_mixing="sum").itm_steps(40) == 40


def test_mrc_targets_are_the_masked_regions_classes(tok, batch, monkeypatch):
    """MRC scores exactly the regions `region_mask` picks from the keyed draws, against their classes, and
    those regions (only those) enter the encoder as zero vectors."""
    import vlp.methods.uniter as uniter_module
    from vlp.models.rng import keyed_uniform

    method = make_uniter(tok, task_mixing="sum", region_mask_prob=0.5)
    regions = method.regions(batch)
    N = regions.labels.shape[1]
    want = region_mask(regions.labels, regions.mask, keyed_uniform(batch.sample_keys, (N,), uniter_module.SALT_REGION),
                       keyed_uniform(batch.sample_keys, (1,), uniter_module.SALT_FALLBACK)[:, 0], 0.5)
    captured = {}
    monkeypatch.setattr(uniter_module, "mlm_loss", lambda logits, targets: captured.update(targets=targets) or
                        logits.sum() * 0)
    seen = {}
    original = method.encode_joint_pair
    monkeypatch.setattr(method, "encode_joint_pair", lambda w, r, *a: seen.update(regions=r) or original(w, r, *a))
    method.mrc(batch, regions)
    assert want.any(dim=1).all()  # >= 1 masked region per sample (every world image has objects)
    assert torch.equal(captured["targets"], regions.labels[want])
    assert (captured["targets"] > 0).all() and not (captured["targets"] == IGNORE_INDEX).any()
    zero = (seen["regions"] == 0).all(dim=-1)
    assert torch.equal(zero & regions.mask, want)


def test_mlm_ignores_specials_and_always_has_a_target(tok, batch):
    method = make_uniter(tok, mlm_prob=0.0)  # nothing drawn: every caption still masks one token
    regions = method.regions(batch)
    loss, acc = method.mlm(batch, regions)
    assert torch.isfinite(loss) and loss.item() > 0


def test_config_errors(tok):
    with pytest.raises(ValueError, match=r"method.task_ratio must be >= 0"):
        make_uniter(tok, task_ratio={"mlm": 0, "mrc": 0, "itm": 0})
    with pytest.raises(ValueError, match=r"region_mask_prob.*(must be in \[0, 1\]|less than or equal to 1)"):
        make_uniter(tok, region_mask_prob=2.0)
    with pytest.raises(ConfigError, match=r"'method.swap' belongs to method 'cmal'"):
        build_config({"method": {"name": "uniter", "swap": False}})
    assert method_class("uniter").demo_config == "demo_uniter"


@pytest.mark.slow
def test_uniter_mrc_reads_unseen_images(tok):
    """150 summed steps on 96 world pairs: on 48 unseen images masked region classification is far above
    chance (1/19; measured 0.20-0.32). The masked region's own content is hidden, so the class comes from the
    caption's words bound to the region's box and neighbours."""
    world = World(seed=1, image_size=32, sizes={"train": 200, "val": 8, "test": 48})
    train_rows = PairDataset(world.split("train"), tok, 40)
    test_rows = PairDataset(world.split("test"), tok, 40)
    train = collate([train_rows[i] for i in range(0, 5 * 96, 5)])
    test = collate([test_rows[i] for i in range(0, 5 * 48, 5)])
    method = make_uniter(tok, task_mixing="sum", task_weights={"mlm": 1, "mrc": 1, "itm": 1}).train()
    fit_rekeyed(method, train, steps=150, lr=2e-3)
    method.eval()
    test.sample_keys = torch.arange(len(test))
    with torch.no_grad():
        _, mrc_acc = method.mrc(test, method.regions(test))
    assert mrc_acc.item() > 0.15, mrc_acc


@pytest.mark.slow
@pytest.mark.parametrize("name", ["uniter", "cmal"])
def test_single_stream_itm_learns_its_pairs(tok, name):
    """ITM alone on 32 images, a fresh negative draw every step: the 2-way loss leaves its log 2 plateau and
    the pairs are told apart (measured: acc 0.94 at step 200). It generalises only much later: on 1000
    images ITM stays at chance for 400+ steps at these sizes, whatever the region features (README)."""
    batch_rows = PairDataset(world_32_train(), tok, 40)
    train = collate([batch_rows[i] for i in range(0, 160, 5)])
    weights = {"uniter": {"mlm": 0, "mrc": 0, "itm": 1}, "cmal": {"amc": 0, "wrc": 0, "itm": 1}}[name]
    cfg = build_config({
        "model": {"size": "tiny", "vision": {"image_size": 32, "patch_size": 8, "width": 32, "depth": 1, "heads": 2},
                  "text": {"width": 64, "depth": 0, "heads": 2, "max_len": 48},
                  "fusion": {"type": "single", "depth": 2, "heads": 2}},
        "method": {"name": name, "task_mixing": "sum", "task_weights": weights}})
    torch.manual_seed(0)
    method = build_method(cfg, VLModel(cfg.model, vocab_size=tok.vocab_size, pad_id=tok.pad_id), tok,
                          class_words=WORDS).train()
    accs = [out["itm_acc"].item() for out in fit_rekeyed(method, train, steps=240, lr=1e-3)]
    assert sum(accs[-20:]) / 20 > 0.8, accs[-20:]  # chance 0.5


def fit_rekeyed(method, batch, steps: int, lr: float) -> list[dict]:
    """`steps` AdamW steps on one batch whose sample keys change every step (fresh masks and ITM negatives,
    unlike `conftest.fit_full_batch`): the outputs of every step."""
    opt = torch.optim.AdamW(method.parameters(), lr=lr)
    outs = []
    for step in range(steps):
        batch.sample_keys = torch.arange(len(batch)) + 1000 * step
        out = method(batch)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        outs.append(out)
    return outs


def world_32_train():
    return World(seed=1, image_size=32, sizes={"train": 100, "val": 8, "test": 8}).split("train")
