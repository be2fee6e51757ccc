"""Unpaired pre-training streams (VLMixer, `vlp.data.unpaired`): the world's unpaired_images / unpaired_text
splits, user data (`data.source: unpaired_files`: BUTD npz + a sentences file) and pre-training's choice."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import vlp.pretrain
from vlp.config import ConfigError, build_config
from vlp.data.datasets import PairDataset, collate
from vlp.data.unpaired import (
    UnpairedDataset,
    UnpairedFeatureDataset,
    open_unpaired_source,
    pretrain_source,
    read_sentences,
    wants_unpaired,
    world_pretrain_dataset,
)
from vlp.methods import METHODS
from vlp.types import Batch

from test_method_contract import assert_resume_is_exact

pytestmark = pytest.mark.usefixtures("one_thread")

D = 8  # feature dim of the npz fixtures
VOCAB = ["dog", "cat", "frisbee", "refrigerator,fridge", "tree"]  # class k = line k
IMAGES = {"img_a": [0, 2, 4], "img_b": [1, 3], "img_c": [4]}  # image id -> region classes
SENTENCES = ["a dog runs on the grass", "", "   ", "two cats sleep near a fridge", "a tree in the wind", ""]


@pytest.fixture(scope="module")
def unpaired(world, tok) -> UnpairedDataset:
    return UnpairedDataset(world.split("unpaired_images"), world.split("unpaired_text"), tok, 40, max_words=40)


# ================================================================================ world streams
def test_rows_map_to_unrelated_images_and_sentences(unpaired, world):
    images, texts = world.split("unpaired_images"), world.split("unpaired_text")
    assert unpaired.num_images == len(images) and unpaired.num_sentences == 5 * len(texts)
    assert len(unpaired) == max(unpaired.num_images, unpaired.num_sentences)  # the shorter stream cycles
    for row in (0, 7, 12345, unpaired.num_images + 3, len(unpaired) - 1):
        image_index, sentence_index = unpaired.locate(row)
        assert (image_index, sentence_index) == (row % unpaired.num_images, row % unpaired.num_sentences)
        assert unpaired.sentence(sentence_index) == texts.scene(sentence_index // 5).captions[sentence_index % 5]
    assert unpaired.locate(-1) == unpaired.locate(len(unpaired) - 1)
    with pytest.raises(IndexError):
        unpaired.locate(len(unpaired))
    assert len(UnpairedDataset(images, texts, unpaired.tokenizer, 40, num_rows=17)) == 17


def test_no_caption_is_ever_seen_with_its_own_image(unpaired, world):
    images, texts = world.split("unpaired_images"), world.split("unpaired_text")
    for row in range(0, 1500, 5):  # 300 rows, every caption slot of the text scenes
        image_index, sentence_index = unpaired.locate(row)
        image_scene, text_scene = images.scene(image_index), texts.scene(sentence_index // 5)
        assert image_scene.scene_id != text_scene.scene_id
        assert unpaired.sentence(sentence_index) not in image_scene.captions, row
    # the streams come from disjoint scenes: no text scene is any image scene (ids, nor the same scene graph)
    n = 200
    image_scenes = [images.scene(i) for i in range(n)]
    text_scenes = [texts.scene(i) for i in range(n)]
    assert not {s.scene_id for s in image_scenes} & {s.scene_id for s in text_scenes}
    graph = lambda s: tuple((o.class_id, o.colour, o.box) for o in s.objects)  # noqa: E731
    assert not {graph(s) for s in image_scenes} & {graph(s) for s in text_scenes}
    assert {s.split for s in image_scenes} == {"unpaired_images"} and {s.split for s in text_scenes} == {"unpaired_text"}


def test_items_collate_into_a_batch_and_are_deterministic(unpaired, world, tok):
    rows = [3, 0, unpaired.num_images + 3, 41]
    items = [unpaired[r] for r in rows]
    for row, item in zip(rows, items):
        image_index, sentence_index = unpaired.locate(row)
        sample = world.split("unpaired_images")[image_index]
        assert item["image_id"] == image_index and item["sentence_id"] == sentence_index and item["row"] == row
        assert item["caption"] == unpaired.sentence(sentence_index)
        assert item["region_labels"].tolist() == [o.class_id + 1 for o in sample.objects]
        assert torch.equal(item["input_ids"], tok.encode([item["caption"]], 40, max_words=40)[0][0])
    assert items[0]["image_id"] == items[2]["image_id"] and items[0]["caption"] != items[2]["caption"]
    batch = collate(items)
    assert isinstance(batch, Batch)
    size = world.image_size
    assert batch.images.shape == (4, 3, size, size)
    n = max(int(i["region_boxes"].shape[0]) for i in items)
    assert batch.region_boxes.shape == (4, n, 4) and batch.region_labels.shape == (4, n)
    assert batch.region_mask.sum(1).tolist() == [int(i["region_boxes"].shape[0]) for i in items]
    assert batch.input_ids.shape[0] == 4 and batch.input_ids[:, 0].eq(tok.cls_id).all()
    assert batch.image_ids.tolist() == [r % unpaired.num_images for r in rows]
    assert batch.sample_keys.tolist() == rows
    fresh = UnpairedDataset(world.split("unpaired_images"), world.split("unpaired_text"), tok, 40, max_words=40)
    again = fresh[41]  # same row -> same item (a pure function of the row: step-exact resume)
    assert again["caption"] == items[3]["caption"] and torch.equal(again["image"], items[3]["image"])
    assert torch.equal(again["input_ids"], items[3]["input_ids"])
    assert torch.equal(again["region_boxes"], items[3]["region_boxes"])


@pytest.mark.slow
def test_vlmixer_on_the_world_streams_resumes_step_exactly(unpaired, tok, tmp_path):
    """The trainer draws from both unpaired streams with step-exact resume: 8 steps straight equal 4 steps, a
    crash in step 5 and a resume (same losses, bit-identical weights)."""
    assert_resume_is_exact("vlmixer", tok, unpaired, tmp_path, 8)


def test_text_only_split_cannot_be_the_image_stream(world, tok):
    texts = world.split("unpaired_text")
    with pytest.raises(ValueError, match=r"has no image: the image stream must be a split with images"):
        UnpairedDataset(texts, texts, tok, 40)[0]


# ================================================================================ user data
def write_features(root: Path, bundle: bool = False, labels: bool = True) -> Path:
    """BUTD / UNITER npz of IMAGES: a folder of <image_id>.npz, or one multi-image npz (`bundle`)."""
    rng = np.random.default_rng(0)
    per_image = {}
    for image_id, classes in IMAGES.items():
        n = len(classes)
        xy = rng.uniform(0.0, 0.5, (n, 2))
        wh = rng.uniform(0.1, 0.4, (n, 2))
        arrays = {"features": rng.normal(size=(n, D)).astype(np.float16),
                  "norm_bb": np.concatenate([xy, xy + wh, wh], axis=1).astype(np.float32)}
        if labels:
            soft = np.full((n, len(VOCAB) + 1), 0.02, np.float32)
            soft[np.arange(n), np.asarray(classes) + 1] = 0.9
            arrays["soft_labels"] = soft
        per_image[image_id] = arrays
    if not bundle:
        folder = root / "feats"
        folder.mkdir()
        for image_id, arrays in per_image.items():
            np.savez(folder / f"{image_id}.npz", **arrays)
        return folder
    nmax = max(len(c) for c in IMAGES.values())
    stacked = {}
    for key in per_image["img_a"]:
        out = np.zeros((len(IMAGES), nmax, per_image["img_a"][key].shape[1]), np.float32)
        for i, arrays in enumerate(per_image.values()):
            out[i, : arrays[key].shape[0]] = arrays[key]
        stacked[key] = out
    path = root / "feats.npz"
    np.savez(path, image_ids=np.array(list(IMAGES)), num_boxes=np.array([len(c) for c in IMAGES.values()]), **stacked)
    return path


def user_cfg(tmp_path: Path, **data):
    sentences = tmp_path / "sentences.txt"
    if not sentences.exists():
        sentences.write_text("\n".join(SENTENCES) + "\n", encoding="utf-8")
    vocab = tmp_path / "objects_vocab.txt"
    vocab.write_text("\n".join(VOCAB) + "\n")
    base = {"source": "unpaired_files", "features": str(tmp_path / "feats"), "sentences": str(sentences),
            "class_vocab": str(vocab), "tokenizer": "captions", "vocab_size": 200, "max_text_len": 16}
    return build_config({"method": {"name": "cmal", "region_feat_dim": D}, "data": {**base, **data}})


@pytest.mark.parametrize("bundle", [False, True])
def test_unpaired_files_source_yields_regions_and_sentences(tmp_path, bundle):
    features = write_features(tmp_path, bundle=bundle)
    source = open_unpaired_source(user_cfg(tmp_path, features=str(features)), region_feat_dim=D)
    dataset = source.dataset
    assert isinstance(dataset, UnpairedFeatureDataset) and source.collate_fn is collate
    assert source.class_words[3] == ("refrigerator", "fridge")
    assert dataset.image_ids == (list(IMAGES) if bundle else sorted(IMAGES))  # bundle order / sorted file stems
    kept = [s for s in SENTENCES if s.strip()]  # blank lines skipped
    assert dataset.sentences == kept and dataset.num_sentences == 3 and len(dataset) == 3
    for word in ("dog", "fridge", "refrigerator", "frisbee", "tree"):
        assert source.tokenizer.is_whole_word(word), word  # class words forced whole
    items = [dataset[r] for r in range(len(dataset))]
    for row, item in enumerate(items):
        image_id = dataset.image_ids[row % 3]
        assert item["caption"] == kept[row] and item["image_id"] == row % 3 and "image" not in item
        assert item["region_feats"].shape == (len(IMAGES[image_id]), D) and item["region_feats"].dtype == torch.float32
        assert item["region_boxes"].shape == (len(IMAGES[image_id]), 7)
        assert item["region_labels"].tolist() == [c + 1 for c in IMAGES[image_id]]
    batch = collate(items)
    assert batch.images is None and batch.region_feats.shape == (3, 3, D) and batch.region_labels.shape == (3, 3)
    assert batch.region_mask.sum(1).tolist() == [len(IMAGES[i]) for i in dataset.image_ids]
    assert len(UnpairedFeatureDataset(dataset.features, kept, source.tokenizer, 16, num_rows=7)) == 7


def test_unpaired_files_errors_name_the_file_and_the_key(tmp_path):
    write_features(tmp_path)
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match=r"sentences file not found: .*nope\.txt"):
        open_unpaired_source(user_cfg(tmp_path, sentences=str(missing)))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"empty\.txt holds no sentence"):
        read_sentences(empty)
    with pytest.raises(ConfigError, match=r"needs data.sentences"):
        open_unpaired_source(user_cfg(tmp_path, sentences=None))
    with pytest.raises(ConfigError, match=r"data.tokenizer: world"):
        open_unpaired_source(user_cfg(tmp_path, tokenizer="world"))
    with pytest.raises(ValueError, match=r"features have dim 8 but the model is configured for 5"):
        open_unpaired_source(user_cfg(tmp_path), region_feat_dim=5)
    unlabelled = tmp_path / "u"
    unlabelled.mkdir()
    with pytest.raises(ConfigError, match=r"carry no soft_labels"):
        open_unpaired_source(user_cfg(tmp_path, features=str(write_features(unlabelled, labels=False))))


# ================================================================================ pre-training's choice
class FakeUnpairedMethod:
    """Stands for a method class that declares the unpaired streams (only what the choice reads)."""

    inputs = frozenset({"images", "region_boxes", "region_labels", "unpaired_text", "unpaired_images"})

    @classmethod
    def region_feature_dim(cls, cfg):
        return D


class FakePixelUnpairedMethod(FakeUnpairedMethod):
    @classmethod
    def region_feature_dim(cls, cfg):
        return None


def test_pretrain_picks_the_streams_by_the_methods_inputs(tmp_path, world, tok):
    assert vlp.pretrain.pretrain_source is pretrain_source  # pretrain makes exactly this choice
    assert vlp.pretrain.world_pretrain_dataset is world_pretrain_dataset
    albef = METHODS["albef"]
    assert wants_unpaired(FakeUnpairedMethod) and not wants_unpaired(albef)
    cfg = build_config({"method": {"name": "albef"}, "data": {"budget": 10}})
    assert pretrain_source(cfg, FakeUnpairedMethod) is None  # the world
    unpaired = world_pretrain_dataset(cfg, world, tok, FakeUnpairedMethod)
    assert isinstance(unpaired, UnpairedDataset) and len(unpaired) == 5 * len(world.split("unpaired_text"))
    assert unpaired.images_split.name == "unpaired_images" and unpaired.text_split.name == "unpaired_text"
    paired = world_pretrain_dataset(cfg, world, tok, albef)
    assert isinstance(paired, PairDataset) and len(paired) == 10  # budget = prefix of train pairs

    write_features(tmp_path)
    files = user_cfg(tmp_path)
    assert isinstance(pretrain_source(files, FakeUnpairedMethod).dataset, UnpairedFeatureDataset)
    with pytest.raises(ConfigError, match=r"method 'cmal' trains on \(image, caption\) pairs"):
        pretrain_source(files, METHODS["cmal"])
    with pytest.raises(ConfigError, match=r"encodes pixels and cannot use them"):
        pretrain_source(files, FakePixelUnpairedMethod)
    regions = build_config({"method": {"name": "cmal", "region_feat_dim": D},
                            "data": {"source": "regions", "features": str(tmp_path / "feats")}})
    with pytest.raises(ConfigError, match=r"pre-trains without image-text pairs, but data.source: regions"):
        pretrain_source(regions, FakeUnpairedMethod)
