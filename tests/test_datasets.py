"""Transforms, PairDataset + collate, RetrievalSet (world and Karpathy JSON)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from vlp.data.datasets import PairDataset, RetrievalSet, collate
from vlp.data.tokenizer import TextTokenizer, pre_caption
from vlp.data.transforms import CLIP_MEAN, CLIP_STD, image_to_tensor, load_image, tensor_to_image
from vlp.data.world import World
from vlp.types import Batch

IMAGE = 32
MAX_LEN = 24


@pytest.fixture(scope="module")
def world() -> World:
    return World(seed=1, image_size=IMAGE, sizes={"train": 40, "val": 8, "test": 8})


@pytest.fixture(scope="module")
def tok(world: World) -> TextTokenizer:
    return TextTokenizer.train_on_world(world, vocab_size=500, num_scenes=30)


# ---------------------------------------------------------------- transforms
def test_image_to_tensor_normalises_to_minus_one_one() -> None:
    img = np.zeros((4, 6, 3), dtype=np.uint8)
    img[1, 2] = (255, 0, 128)
    t = image_to_tensor(img)
    assert t.shape == (3, 4, 6) and t.dtype == torch.float32
    assert t[:, 0, 0].tolist() == [-1.0, -1.0, -1.0]
    assert t[0, 1, 2].item() == 1.0 and t[1, 1, 2].item() == -1.0  # channel-first, red in channel 0
    assert t[2, 1, 2].item() == pytest.approx((128 / 255 - 0.5) / 0.5, abs=1e-6)
    assert np.array_equal(tensor_to_image(t), img)


def test_image_to_tensor_clip_stats_and_resize() -> None:
    img = np.full((5, 7, 3), 255, dtype=np.uint8)
    t = image_to_tensor(img, size=9, mean=CLIP_MEAN, std=CLIP_STD)
    assert t.shape == (3, 9, 9)
    expected = [(1.0 - m) / s for m, s in zip(CLIP_MEAN, CLIP_STD)]
    assert t[:, 4, 4].tolist() == pytest.approx(expected, rel=1e-5)
    pil = Image.fromarray(np.full((3, 3), 0, dtype=np.uint8), mode="L")  # greyscale -> RGB
    assert torch.all(image_to_tensor(pil, size=3) == -1.0)


def test_image_to_tensor_rejects_bad_arrays() -> None:
    with pytest.raises(ValueError, match="uint8 array of shape"):
        image_to_tensor(np.zeros((4, 4, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="uint8 array of shape"):
        image_to_tensor(np.zeros((4, 4), dtype=np.uint8))
    with pytest.raises(TypeError, match="numpy uint8"):
        image_to_tensor([[0]])  # type: ignore[arg-type]


def test_load_image_missing_and_corrupt_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"missing\.png"):
        load_image(tmp_path / "missing.png", 8)
    bad = tmp_path / "garbage.jpg"
    bad.write_bytes(b"\x00\x01 definitely not a jpeg" * 10)
    with pytest.raises(ValueError, match=r"cannot decode image .*garbage\.jpg.*re-export it or remove it"):
        load_image(bad, 8)


# ---------------------------------------------------------------- PairDataset
def test_pair_dataset_rows_are_image_major(world: World, tok: TextTokenizer) -> None:
    split = world.split("train")
    ds = PairDataset(split, tok, max_len=MAX_LEN, budget=None)
    assert len(ds) == 5 * len(split)
    item = ds[7]
    sample = split[1]
    assert item["image_id"] == 1 and item["row"] == 7
    assert item["caption"] == sample.captions[2]
    assert tok.decode(item["input_ids"]) == pre_caption(sample.captions[2])
    assert item["input_ids"][0].item() == tok.cls_id and item["input_ids"][-1].item() == tok.sep_id
    assert torch.equal(item["image"], image_to_tensor(sample.image))
    assert item["region_labels"].tolist() == [o.class_id + 1 for o in sample.objects]
    assert item["region_boxes"].shape == (len(sample.objects), 4)
    assert torch.allclose(item["region_boxes"], torch.tensor([list(o.box_norm) for o in sample.objects]))


def test_pair_dataset_budget_is_a_prefix(world: World, tok: TextTokenizer) -> None:
    split = world.split("train")
    full = PairDataset(split, tok, max_len=MAX_LEN, budget=None)
    small = PairDataset(split, tok, max_len=MAX_LEN, budget=12)
    assert len(small) == 12
    assert small[11]["caption"] == full[11]["caption"] and small[11]["image_id"] == 2
    assert small[-1]["row"] == 11
    with pytest.raises(IndexError, match="row 12 out of range"):
        small[12]
    with pytest.raises(ValueError, match=rf"budget=1000 pairs exceeds the split.*= {5 * len(split)} rows"):
        PairDataset(split, tok, max_len=MAX_LEN, budget=1000)


def test_pair_dataset_missing_captions_names_the_sample(world: World, tok: TextTokenizer) -> None:
    real = world.split("train")[0]
    broken = SimpleNamespace(index=0, scene_id=77, image=real.image, objects=real.objects, captions=[], hard_pairs=[])
    ds = PairDataset([broken], tok, max_len=MAX_LEN, budget=None)
    with pytest.raises(ValueError, match=r"sample 0 \(scene 77\) has 0 captions"):
        ds[0]


def _item(ids: list[int], boxes: list[list[float]], labels: list[int], image_id: int, row: int) -> dict:
    return {
        "image": torch.full((3, 2, 2), float(row)),
        "caption": "unused",
        "input_ids": torch.tensor(ids),
        "pad_id": 0,
        "image_id": image_id,
        "region_boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "region_labels": torch.tensor(labels, dtype=torch.long),
        "row": row,
    }


def test_collate_pads_text_and_regions_by_hand() -> None:
    items = [
        _item([2, 9, 3], [[0.1, 0.1, 0.5, 0.5]], [4], image_id=3, row=15),
        _item([2, 9, 8, 7, 3], [[0.0, 0.0, 0.2, 0.2], [0.5, 0.5, 1.0, 1.0], [0.2, 0.3, 0.4, 0.5]], [1, 2, 18],
              image_id=3, row=16),
    ]
    batch = collate(items)
    assert isinstance(batch, Batch) and len(batch) == 2
    assert batch.input_ids.tolist() == [[2, 9, 3, 0, 0], [2, 9, 8, 7, 3]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch.region_boxes.shape == (2, 3, 4)
    assert torch.equal(batch.region_boxes[0], torch.tensor([[0.1, 0.1, 0.5, 0.5], [0, 0, 0, 0], [0, 0, 0, 0]]))
    assert torch.equal(batch.region_boxes[1], items[1]["region_boxes"])
    assert batch.region_labels.tolist() == [[4, 0, 0], [1, 2, 18]]
    assert batch.region_mask.tolist() == [[True, False, False], [True, True, True]]
    assert batch.image_ids.tolist() == [3, 3]
    assert batch.sample_keys.tolist() == [15, 16]
    assert batch.images.shape == (2, 3, 2, 2) and batch.images[1].eq(16.0).all()


def test_collate_rejects_mixed_tokenizers_and_empty() -> None:
    a = _item([2, 3], [], [], 0, 0)
    b = dict(_item([101, 102], [], [], 1, 1), pad_id=5)
    with pytest.raises(ValueError, match="different tokenizers"):
        collate([a, b])
    with pytest.raises(ValueError, match="empty"):
        collate([])


def test_collate_world_batch_through_dataloader(world: World, tok: TextTokenizer) -> None:
    ds = PairDataset(world.split("train"), tok, max_len=MAX_LEN, budget=20)
    loader = torch.utils.data.DataLoader(ds, batch_size=8, shuffle=False, collate_fn=collate)
    batch = next(iter(loader))
    assert batch.images.shape == (8, 3, IMAGE, IMAGE)
    assert batch.sample_keys.tolist() == list(range(8))
    assert batch.image_ids.tolist() == [0] * 5 + [1] * 3
    counts = [len(world.split("train")[i].objects) for i in range(2)]
    assert batch.region_mask.sum(1).tolist() == [counts[0]] * 5 + [counts[1]] * 3
    assert batch.region_mask.shape[1] == max(counts)
    assert (batch.region_labels[~batch.region_mask] == 0).all()
    assert (batch.region_labels[batch.region_mask] > 0).all()
    assert batch.input_ids.shape[1] <= MAX_LEN
    assert (batch.input_ids[batch.attention_mask == 0] == tok.pad_id).all()


# ---------------------------------------------------------------- RetrievalSet (world)
def test_retrieval_set_ground_truth_is_consistent(world: World, tok: TextTokenizer) -> None:
    split = world.split("test")
    rs = RetrievalSet.build(split, tok, max_len=MAX_LEN, num_images=4)
    assert rs.images.shape == (4, 3, IMAGE, IMAGE) and rs.num_images == 4 and rs.num_texts == 20
    assert rs.input_ids.shape[0] == rs.attention_mask.shape[0] == 20
    assert rs.txt2img.tolist() == [i // 5 for i in range(20)]
    assert rs.img2txt == [list(range(5 * i, 5 * i + 5)) for i in range(4)]
    for image, texts in enumerate(rs.img2txt):
        assert all(rs.txt2img[t].item() == image for t in texts)
    assert rs.captions[7] == split[1].captions[2]
    assert torch.equal(rs.images[3], image_to_tensor(split[3].image))
    with pytest.raises(ValueError, match="num_images=99 is out of range: the split has 8 images"):
        RetrievalSet.build(split, tok, max_len=MAX_LEN, num_images=99)


def test_retrieval_set_hard_negatives(world: World, tok: TextTokenizer) -> None:
    split = world.split("test")
    rs = RetrievalSet.build(split, tok, max_len=64, num_images=8, max_words=64)  # nothing truncated
    assert rs.hard_image.tolist() == list(range(8))  # eval scenes always have a hard pair
    assert rs.hard_pos_mask.shape == rs.hard_pos_ids.shape and rs.hard_neg_mask.shape == rs.hard_neg_ids.shape
    for row in range(8):
        positive, negative = split[row].hard_pairs[0]
        pos = rs.hard_pos_ids[row][rs.hard_pos_mask[row].bool()]
        neg = rs.hard_neg_ids[row][rs.hard_neg_mask[row].bool()]
        assert tok.decode(pos) == positive and tok.decode(neg) == negative
        assert pos.shape == neg.shape and (pos != neg).sum().item() == 2  # exactly two colour words swapped


def test_retrieval_set_skips_hard_pairs_truncated_to_identity(world: World, tok: TextTokenizer) -> None:
    real = world.split("test")[0]
    late = ("a circle and a red star", "a circle and a blue star")  # the swap lies past max_len=5
    early = ("a red circle and a blue star", "a blue circle and a red star")
    samples = [
        SimpleNamespace(index=0, image=real.image, objects=real.objects, captions=real.captions, hard_pairs=[late, early]),
        SimpleNamespace(index=1, image=real.image, objects=real.objects, captions=real.captions, hard_pairs=[late]),
    ]
    rs = RetrievalSet.build(samples, tok, max_len=5, num_images=2)
    assert rs.hard_image.tolist() == [0]
    assert tok.decode(rs.hard_pos_ids[0]) == "a red circle"
    assert tok.decode(rs.hard_neg_ids[0]) == "a blue circle"


# ---------------------------------------------------------------- RetrievalSet (Karpathy JSON)
def _karpathy_fixture(tmp_path: Path) -> tuple[Path, Path, list[dict]]:
    root = tmp_path / "images"
    (root / "val2014").mkdir(parents=True)
    Image.fromarray(np.full((10, 14, 3), 255, dtype=np.uint8)).save(root / "val2014" / "a.png")
    Image.fromarray(np.zeros((20, 20), dtype=np.uint8), mode="L").save(root / "val2014" / "b.jpg")
    records = [
        {"image": "val2014/a.png", "caption": [f"A white image, number {i}." for i in range(5)]},
        {"image": "val2014/b.jpg", "caption": [f"a black image {i}" for i in range(6)]},
    ]
    path = tmp_path / "coco_karpathy_test.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    return path, root, records


def test_karpathy_json_loads(tmp_path: Path, tok: TextTokenizer) -> None:
    path, root, _ = _karpathy_fixture(tmp_path)
    rs = RetrievalSet.from_karpathy_json(path, root, tok, max_len=MAX_LEN, image_size=16)
    assert rs.images.shape == (2, 3, 16, 16)
    assert torch.allclose(rs.images[0], torch.ones(3, 16, 16))
    assert torch.allclose(rs.images[1], -torch.ones(3, 16, 16), atol=0.02)
    assert rs.txt2img.tolist() == [0] * 5 + [1] * 6
    assert rs.img2txt == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9, 10]]
    assert rs.captions[6] == "a black image 1"
    assert rs.input_ids.shape[0] == 11 and rs.hard_image is None


def test_karpathy_json_missing_image_names_record_and_path(tmp_path: Path, tok: TextTokenizer) -> None:
    path, root, records = _karpathy_fixture(tmp_path)
    records[1]["image"] = "val2014/gone.jpg"
    path.write_text(json.dumps(records), encoding="utf-8")
    with pytest.raises(FileNotFoundError, match=r"record 1: image not found: .*val2014/gone\.jpg"):
        RetrievalSet.from_karpathy_json(path, root, tok, max_len=MAX_LEN, image_size=16)


def test_karpathy_json_corrupt_image_names_path(tmp_path: Path, tok: TextTokenizer) -> None:
    path, root, _ = _karpathy_fixture(tmp_path)
    (root / "val2014" / "b.jpg").write_bytes(b"garbage bytes, not a jpeg" * 4)
    with pytest.raises(ValueError, match=r"record 1: cannot decode image .*b\.jpg.*re-export it or remove it"):
        RetrievalSet.from_karpathy_json(path, root, tok, max_len=MAX_LEN, image_size=16)


def test_karpathy_json_empty_captions_and_missing_file(tmp_path: Path, tok: TextTokenizer) -> None:
    path, root, records = _karpathy_fixture(tmp_path)
    records[0]["caption"] = []
    path.write_text(json.dumps(records), encoding="utf-8")
    with pytest.raises(ValueError, match=r"record 0 \(val2014/a\.png\) has an empty caption list"):
        RetrievalSet.from_karpathy_json(path, root, tok, max_len=MAX_LEN, image_size=16)
    with pytest.raises(FileNotFoundError, match=r"annotation file not found: .*nothere\.json"):
        RetrievalSet.from_karpathy_json(tmp_path / "nothere.json", root, tok, max_len=MAX_LEN, image_size=16)
    path.write_text("[{]", encoding="utf-8")
    with pytest.raises(ValueError, match="is not valid JSON"):
        RetrievalSet.from_karpathy_json(path, root, tok, max_len=MAX_LEN, image_size=16)
