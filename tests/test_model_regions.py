"""vlp.models.regions: region inputs from boxes on an image grid, from precomputed features, from grid cells."""

from __future__ import annotations

import pytest
import torch

from vlp.config import build_config
from vlp.data.lexicon import CLASSES, class_words
from vlp.methods.cmal import Cmal
from vlp.models.model import VLModel
from vlp.models.regions import RegionInputBuilder, RegionInputs, boxes_to_7d, grid_cell_boxes
from vlp.models.roi import region_features

BOXES = torch.tensor([[[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0], [0.25, 0.0, 0.75, 1.0]]]).repeat(2, 1, 1)
LABELS = torch.tensor([[3, 5, 7], [2, 4, 6]])
MASK = torch.tensor([[True, True, False], [True, True, True]])


def builder(**kw) -> RegionInputBuilder:
    args = dict(max_regions=10, whole_image_region=False, grid_regions=2, feat_dim=4, grid_width=4)
    args.update(kw)
    return RegionInputBuilder(**args)


def test_layout_keeps_the_first_regions_and_fills_defaults():
    boxes, labels, mask = builder(max_regions=2).layout(BOXES.double(), None, None)
    assert boxes.shape == (2, 2, 4) and boxes.dtype == torch.float32
    assert labels.tolist() == [[0, 0], [0, 0]] and labels.dtype == torch.long and mask.all()
    _, labels, mask = builder(max_regions=2).layout(BOXES, LABELS, MASK)
    assert labels.tolist() == [[3, 5], [2, 4]] and mask.tolist() == [[True, True], [True, True]]


def test_prepend_whole_region():
    boxes, labels, mask = RegionInputBuilder.prepend_whole(boxes_to_7d(BOXES), LABELS, MASK)
    assert boxes.shape == (2, 4, 7) and boxes[1, 0].tolist() == [0, 0, 1, 1, 1, 1, 1]
    assert labels[:, 0].tolist() == [0, 0] and mask[:, 0].all() and torch.equal(mask[:, 1:], MASK)
    boxes4, _, _ = RegionInputBuilder.prepend_whole(BOXES, LABELS, MASK)
    assert boxes4[0, 0].tolist() == [0, 0, 1, 1]


def test_from_boxes_pools_the_grid_at_the_boxes():
    grid = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    out = builder().from_boxes(grid, BOXES, LABELS, MASK)
    assert isinstance(out, RegionInputs)
    torch.testing.assert_close(out.feats, region_features(grid, BOXES))
    assert torch.equal(out.boxes, boxes_to_7d(BOXES))
    assert out.labels.tolist() == [[3, 5, 0], [2, 4, 6]]  # padded regions get label 0
    # the whole-image region pools the whole grid, i.e. the mean over its cells (RoIAlign of [0,0,1,1])
    whole = builder(whole_image_region=True).from_boxes(lambda: grid, BOXES)
    assert whole.feats.shape == (2, 4, 4)
    whole_box = torch.tensor([[[0.0, 0.0, 1.0, 1.0]]]).expand(2, 1, 4)
    torch.testing.assert_close(whole.feats[:, 0], region_features(grid, whole_box)[:, 0])


def test_from_boxes_checks_before_encoding():
    def explode():
        raise AssertionError("the grid must not be computed for a misconfigured call")

    with pytest.raises(ValueError, match=r"region_feat_dim=8, but these regions are RoI-pooled from the images"):
        builder(feat_dim=8).from_boxes(explode, BOXES)
    with pytest.raises(ValueError, match=r"image grid must be \(B, 4, h, w\)"):
        builder().from_boxes(torch.zeros(2, 5, 3, 3), BOXES)


def test_from_features_used_as_is_with_whole_region_mean_of_real_regions():
    feats = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)
    out = builder().from_features(feats, BOXES, LABELS, MASK)
    assert torch.equal(out.feats, feats) and out.labels.tolist() == [[3, 5, 0], [2, 4, 6]]
    whole = builder(whole_image_region=True, max_regions=3).from_features(feats, BOXES, LABELS, MASK)
    assert torch.equal(whole.feats[0, 0], feats[0, :2].mean(0))  # the padded third region is left out
    assert torch.equal(whole.feats[1, 0], feats[1].mean(0)) and whole.labels[:, 0].tolist() == [0, 0]
    with pytest.raises(ValueError, match=r"region_feats have dim 4 but CMAL's region embedding takes 6 .* "
                                         r"set method.region_feat_dim: 4"):
        builder(feat_dim=6, owner="CMAL").from_features(feats, BOXES)
    with pytest.raises(ValueError, match=r"must share \(B, N\)"):
        builder().from_features(feats[:, :2], BOXES)


def test_cell_boxes_and_builder_validation():
    cells = builder(grid_regions=3).cell_boxes(2, "cpu")
    assert cells.shape == (2, 9, 4) and torch.equal(cells[1], grid_cell_boxes(3))
    with pytest.raises(ValueError, match="max_regions >= 1"):
        builder(max_regions=0)


@pytest.mark.parametrize("source", ["vit", "pixels"])
def test_cmal_delegates_to_the_builder_with_its_config(source):
    cfg = build_config({
        "model": {"size": "tiny", "vision": {"image_size": 32, "patch_size": 8, "width": 32, "depth": 1, "heads": 2},
                  "text": {"width": 32, "depth": 0, "heads": 2, "max_len": 32},
                  "fusion": {"type": "single", "depth": 1, "heads": 2}},
        "method": {"name": "cmal", "max_regions": 2, "grid_regions": 2, "region_source": source, "region_pixels": 4},
    })
    torch.manual_seed(0)
    model = VLModel(cfg.model, vocab_size=100, pad_id=0)
    tok_like = type("Tok", (), {"mask_id": 3, "special_ids": frozenset({0, 1, 2, 3}), "vocab_size": 100,
                                "is_whole_word": lambda self, i: False, "word_id": lambda self, w: None})()
    with pytest.warns(UserWarning, match="no whole-word token"):  # a vocabulary without the class words
        method = Cmal.from_config(cfg, model, tok_like, class_words=[class_words(k) for k in range(len(CLASSES))])
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = method.region_inputs(images, BOXES, LABELS, MASK)
        grid = model.encode_image(images).grid if source == "vit" else images  # pixels: RoIAlign of the image
    want = method.region_builder.from_boxes(grid, BOXES, LABELS, MASK)
    assert got.feats.shape == (2, 2, 32 if source == "vit" else 3 * 4 * 4)
    for a, b in zip((got.feats, got.boxes, got.labels, got.mask), (want.feats, want.boxes, want.labels, want.mask)):
        assert torch.equal(a, b)
    assert method.encode_regions(images, None)[1].shape == (2, 2, 7)  # grid_regions^2 = 4 cells, first 2 kept
    method.cfg.max_regions = 4  # the builder follows the live config
    assert method.region_builder.max_regions == 4
    assert method.encode_regions(images, None)[1].shape == (2, 4, 7)
