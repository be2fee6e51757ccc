"""Region single-stream methods must use the image (issue 11): the region features carry the object class,
and CMAL's AMC / WRC get worse when each sample is given another image's region content."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vlp.config import build_config
from vlp.data.datasets import PairDataset, collate
from vlp.data.lexicon import CLASSES, class_words
from vlp.data.world import World
from vlp.methods import build_method
from vlp.models.model import VLModel
from vlp.models.regions import RegionInputs

pytestmark = pytest.mark.usefixtures("one_thread")
WORDS = [class_words(k) for k in range(len(CLASSES))]
MODEL = {"size": "tiny", "vision": {"image_size": 32, "patch_size": 8, "width": 32, "depth": 1, "heads": 2},
         "text": {"width": 32, "depth": 0, "heads": 2, "max_len": 48}, "fusion": {"type": "single", "depth": 2, "heads": 2}}


@pytest.fixture(scope="module")
def big_world() -> World:
    return World(seed=1, image_size=32, sizes={"train": 300, "val": 8, "test": 100})


def make(tok, name: str, **method):
    cfg = build_config({"model": MODEL, "method": {"name": name, **method}})
    torch.manual_seed(0)
    return build_method(cfg, VLModel(cfg.model, vocab_size=tok.vocab_size, pad_id=tok.pad_id), tok, class_words=WORDS)


def rows(world: World, tok, split: str, n: int):
    data = PairDataset(world.split(split), tok, 40)
    batch = collate([data[i] for i in range(0, 5 * n, 5)])  # one caption of each of n images
    batch.sample_keys = torch.arange(n)
    return batch


def probe_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor) -> float:
    """Test accuracy of a one-hidden-layer MLP fit on (train_x, train_y) (the issue's region-class probe)."""
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.LayerNorm(train_x.shape[1]), torch.nn.Linear(train_x.shape[1], 128),
                              torch.nn.GELU(), torch.nn.Linear(128, len(CLASSES)))
    opt = torch.optim.AdamW(mlp.parameters(), lr=3e-3, weight_decay=0.01)
    for _ in range(150):
        loss = F.cross_entropy(mlp(train_x), train_y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return (mlp(test_x).argmax(-1) == test_y).float().mean().item()


@pytest.mark.slow
def test_region_class_probe_pixels_far_above_chance_vit_grid_not(big_world, tok):
    """The object class is readable from `region_source: pixels` features of unseen images (measured 0.87 at
    32 px; chance 1/18), and much less from the RoI-pooled grid of an untrained ViT (`vit`, v0.1)."""
    found = {}
    for source in ("pixels", "vit"):
        method = make(tok, "cmal", region_source=source).eval()
        feats = []
        for split, n in (("train", 300), ("test", 100)):
            batch = rows(big_world, tok, split, n)
            with torch.no_grad():
                regions = method.regions(batch)
            keep = regions.mask & (regions.labels > 0)
            feats.append((regions.feats[keep], regions.labels[keep] - 1))
        found[source] = probe_accuracy(*feats[0], *feats[1])
    assert found["pixels"] > 0.6, found  # chance 0.056
    assert found["pixels"] > found["vit"] + 0.2, found


def shuffled(regions: RegionInputs) -> RegionInputs:
    """Every sample gets the next sample's region CONTENT (features) with its own boxes, labels and mask."""
    order = torch.roll(torch.arange(regions.feats.shape[0]), 1)
    return RegionInputs(regions.feats[order], regions.boxes, regions.labels, regions.mask)


def wrc_top1(method, batch, regions: RegionInputs, pairs: torch.Tensor) -> float:
    """Share of anchor tokens whose most similar region (cosine of the encoder outputs) is one they name."""
    attn = batch.attention_mask
    txt_h, reg_h = method.encode_joint_pair(method.word_vectors(batch.input_ids, attn), method.region_vectors(regions),
                                            regions.boxes, attn, regions.mask)
    sim = torch.einsum("btd,bnd->btn", F.normalize(txt_h, dim=-1), F.normalize(reg_h, dim=-1))
    sim = sim.masked_fill(~regions.mask[:, None, :], float("-inf"))
    anchors = pairs.any(dim=2)
    best = sim.argmax(dim=2, keepdim=True)
    return pairs.gather(2, best).squeeze(2)[anchors].float().mean().item()


@pytest.mark.slow
def test_cmal_amc_and_wrc_use_the_region_content(big_world, tok):
    """After 150 summed AMC + WRC steps, giving each unseen sample another image's region content (same
    boxes and labels) lowers AMC's word accuracy and WRC's top-1: the tasks read the image, not only the
    positions and the swapped-in word (v0.1's ViT-grid regions: 51 % -> 47 % and 81 % -> 78 %)."""
    world_rows = PairDataset(big_world.split("train"), tok, 40)
    method = make(tok, "cmal", task_mixing="sum", task_weights={"itm": 0, "amc": 3, "wrc": 2}).train()
    opt = torch.optim.AdamW(method.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    for step in range(150):
        idx = torch.randint(0, len(world_rows), (48,), generator=g).tolist()
        batch = collate([world_rows[i] for i in idx])
        batch.sample_keys = torch.tensor(idx) + 10_000 * step
        out = method(batch)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    method.eval()
    test = rows(big_world, tok, "test", 100)
    with torch.no_grad():
        regions = method.regions(test)
        pairs = method.anchors(test, regions)
        clean, mixed = method.amc(test, regions, pairs), method.amc(test, shuffled(regions), pairs)
        wrc_clean, wrc_mixed = wrc_top1(method, test, regions, pairs), wrc_top1(method, test, shuffled(regions), pairs)
    print(f"AMC word {clean['acc_word']:.3f} -> {mixed['acc_word']:.3f}, region {clean['acc_region']:.3f} -> "
          f"{mixed['acc_region']:.3f}; WRC top-1 {wrc_clean:.3f} -> {wrc_mixed:.3f}")
    # measured: word 0.35 -> 0.14, WRC 0.58 -> 0.41. AMC's region accuracy does not move (0.82 -> 0.81) and
    # is not asserted: its targets are swapped regions (they hold the anchor word: the associative design)
    # and masked ones (zeroed), so their own content never reaches the region classifier.
    assert clean["acc_word"] > mixed["acc_word"] + 0.1
    assert wrc_clean > wrc_mixed + 0.08
