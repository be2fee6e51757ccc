"""CMAL region inputs, both ways: precomputed detector features (BUTD / UNITER npz, `vlp.data.regions`) and
images without boxes (grid cells, `vlp.methods.cmal.Cmal.regions`).

Fixtures are written in the exact on-disk schemas (cmal.md §3.1; UNITER's per-image npz names): a directory of
`<image_id>.npz` (features, norm_bb, soft_labels, conf, or pixel `boxes` + image_w / image_h) and one npz of
many images (image_ids, features (I, Nmax, D), norm_bb / boxes, num_boxes, soft_labels).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlp.api import pretrain
from vlp.build import method_class_of
from vlp.config import ConfigError, build_config
from vlp.data.datasets import CaptionRows, collate, read_caption_file
from vlp.data.regions import (
    NpzBundle,
    NpzDirectory,
    RegionCaptionDataset,
    adaptive_num_regions,
    open_pretrain_source,
    open_region_features,
    read_class_vocab,
    soft_labels_to_classes,
    train_caption_tokenizer,
)
from vlp.methods.cmal import Cmal
from vlp.models.anchors import build_lexicon, grid_cell_boxes
from vlp.models.model import VLModel
from vlp.types import Batch

D = 16  # feature dim of the fixtures
VOCAB = ["dog", "cat", "frisbee", "refrigerator,fridge", "tennis racket", "car", "tree"]  # class k = line k
DOG, CAT, FRISBEE, FRIDGE, RACKET, CAR, TREE = range(7)
IMAGES = {  # image_id: (region classes, captions naming some of them)
    "coco_1": ([DOG, FRISBEE, TREE], ["a dog catches a frisbee", "two dogs play near a tree"]),
    "coco_2": ([CAT, FRIDGE], ["a cat sits on the fridge", "a cat near a white refrigerator"]),
    "coco_3": ([CAR, TREE, DOG], ["a red car parked by a tree", "a dog looks at a car"]),
    "coco_4": ([RACKET, CAT], ["a tennis racket on the floor", "a cat and a racket"]),
}


pytestmark = pytest.mark.usefixtures("one_thread")


# ================================================================================ fixture writers
def soft_labels(classes: list[int], num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """(N, C+1) distributions, column 0 = background, peaked (0.8) at column class + 1."""
    soft = rng.dirichlet(np.full(num_classes + 1, 0.5), size=len(classes)).astype(np.float32) * 0.2
    soft[np.arange(len(classes)), np.asarray(classes) + 1] += 0.8
    return soft


def open_source(cfg):
    """`open_pretrain_source` with the feature width the run's method class declares (as `pretrain` does)."""
    return open_pretrain_source(cfg, method_class_of(cfg).region_feature_dim(cfg))


def norm_boxes(n: int, rng: np.random.Generator, columns: int = 6) -> np.ndarray:
    """(n, columns) normalised x1, y1, x2, y2 [, w, h [, w*h]]."""
    xy = rng.uniform(0.0, 0.5, (n, 2))
    wh = rng.uniform(0.1, 0.5, (n, 2))
    full = np.concatenate([xy, xy + wh, wh, wh[:, :1] * wh[:, 1:]], axis=1).astype(np.float32)
    return full[:, :columns]


def write_directory(root: Path, seed: int = 0) -> tuple[Path, dict[str, dict[str, np.ndarray]]]:
    """Layout (a): <root>/feats/<image_id>.npz per image of IMAGES; returns (dir, arrays written)."""
    rng = np.random.default_rng(seed)
    folder = root / "feats"
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for image_id, (classes, _) in IMAGES.items():
        n = len(classes)
        arrays = {
            "features": rng.normal(size=(n, D)).astype(np.float16),  # BUTD dumps are often float16
            "norm_bb": norm_boxes(n, rng, 6),
            "soft_labels": soft_labels(classes, len(VOCAB), rng),
            "conf": np.linspace(0.9, 0.3, n).astype(np.float32),
        }
        np.savez(folder / f"{image_id}.npz", **arrays)
        written[image_id] = arrays
    return folder, written


def write_captions(root: Path, schema: str = "plain") -> Path:
    """Captions of IMAGES: `plain` [{image_id, caption}], `albef` (one record per caption, with image path)."""
    records = []
    for image_id, (_, captions) in IMAGES.items():
        for caption in captions:
            record = {"image_id": image_id, "caption": caption}
            if schema == "albef":
                record["image"] = f"val2014/{image_id}.jpg"
            records.append(record)
    path = root / "captions.json"
    path.write_text(json.dumps(records))
    return path


def write_vocab(root: Path, lines: list[str] = VOCAB) -> Path:
    path = root / "objects_vocab.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


# ================================================================================ npz layouts
def test_directory_layout_reads_back_exactly(tmp_path):
    folder, written = write_directory(tmp_path)
    rng = np.random.default_rng(1)
    pixel = np.array([[10.0, 20.0, 50.0, 60.0], [0.0, 0.0, 100.0, 80.0]], dtype=np.float32)
    np.savez(folder / "pix.npz", features=rng.normal(size=(2, D)).astype(np.float32), boxes=pixel,
             image_w=np.array(100.0), image_h=np.array(80.0))
    (folder / "broken.npz").write_bytes(b"not a zip")  # lazily read: only an error when asked for
    reader = open_region_features(folder, feat_dim=D, num_classes=len(VOCAB))
    assert isinstance(reader, NpzDirectory)
    for image_id, arrays in written.items():
        rec = reader[image_id]
        assert rec.features.dtype == np.float32 and np.array_equal(rec.features, arrays["features"].astype(np.float32))
        assert rec.boxes.shape == (len(IMAGES[image_id][0]), 7)
        assert np.array_equal(rec.boxes[:, :6], arrays["norm_bb"])  # stored w, h kept as UNITER does
        assert np.allclose(rec.boxes[:, 6], arrays["norm_bb"][:, 4] * arrays["norm_bb"][:, 5])
        assert np.array_equal(rec.soft_labels, arrays["soft_labels"]) and np.array_equal(rec.conf, arrays["conf"])
        assert rec.labels.tolist() == [c + 1 for c in IMAGES[image_id][0]]  # class id + 1
    pix = reader["pix"]
    assert np.allclose(pix.boxes, [[0.1, 0.25, 0.5, 0.75, 0.4, 0.5, 0.2], [0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    assert pix.labels is None and pix.soft_labels is None
    with pytest.raises(ValueError, match=re.escape(str(folder / "broken.npz"))):
        reader["broken"]


def test_bundle_layout_reads_back_exactly(tmp_path):
    rng = np.random.default_rng(2)
    ids = ["img_a", "img_b", "img_c"]
    counts = np.array([3, 1, 0])
    nmax = 4
    features = rng.normal(size=(3, nmax, D)).astype(np.float32)
    boxes = np.stack([norm_boxes(nmax, rng, 4) for _ in ids])
    soft = np.stack([soft_labels([0, 6, 2, 5], len(VOCAB), rng) for _ in ids])
    path = tmp_path / "bundle.npz"
    np.savez(path, image_ids=np.array(ids), features=features, norm_bb=boxes, num_boxes=counts, soft_labels=soft)
    reader = open_region_features(path, feat_dim=D, num_classes=len(VOCAB))
    assert isinstance(reader, NpzBundle) and reader.image_ids == ids
    for row, image_id in enumerate(ids):
        rec = reader[image_id]
        n = counts[row]
        assert rec.num_regions == n
        assert np.array_equal(rec.features, features[row, :n])
        assert np.array_equal(rec.boxes[:, :4], boxes[row, :n])
        wh = boxes[row, :n, 2:4] - boxes[row, :n, 0:2]
        assert np.allclose(rec.boxes[:, 4:6], wh) and np.allclose(rec.boxes[:, 6], wh[:, 0] * wh[:, 1])
        assert np.array_equal(rec.soft_labels, soft[row, :n])
        assert rec.labels.tolist() == [1, 7, 3, 6][:n]
    assert reader.missing(["img_a", "nope"]) == ["nope"]


def test_soft_label_argmax_fix_vs_faithful(tmp_path):
    """cmal.md §12 quirk 1: the reference `argmax(p[:, 1:-1])` can never pick the last class."""
    soft = np.array([[0.10, 0.20, 0.30, 0.40],    # last class wins: fix -> 3, faithful -> 2
                     [0.90, 0.05, 0.03, 0.02],    # background wins: still an object class (1)
                     [0.00, 0.50, 0.10, 0.40]], dtype=np.float32)
    assert soft_labels_to_classes(soft).tolist() == [3, 1, 1]
    assert soft_labels_to_classes(soft, faithful=True).tolist() == [2, 1, 1]
    np.savez(tmp_path / "x.npz", features=np.zeros((3, D), np.float32), norm_bb=norm_boxes(3, np.random.default_rng(0)),
             soft_labels=soft)
    assert NpzDirectory(tmp_path, feat_dim=D)["x"].labels.tolist() == [3, 1, 1]
    assert NpzDirectory(tmp_path, feat_dim=D, faithful_labels=True)["x"].labels.tolist() == [2, 1, 1]


def test_adaptive_number_of_regions(tmp_path):
    """UNITER: N = clip(#{conf > 0.2}, min_bb, max_bb), first N regions kept."""
    conf = np.array([0.9, 0.8, 0.5, 0.3, 0.25, 0.1, 0.05, 0.01])
    assert adaptive_num_regions(conf, 0.2, 2, 100) == 5
    assert adaptive_num_regions(conf, 0.2, 7, 100) == 7
    assert adaptive_num_regions(conf, 0.2, 1, 3) == 3
    assert adaptive_num_regions(conf, 0.2, 10, 100) == 8  # never more than present
    n = len(conf)
    features = np.arange(n * D, dtype=np.float32).reshape(n, D)
    np.savez(tmp_path / "a.npz", features=features, norm_bb=norm_boxes(n, np.random.default_rng(0)), conf=conf)
    rec = NpzDirectory(tmp_path, adaptive=True, conf_th=0.2, min_bb=2, max_bb=100)["a"]
    assert np.array_equal(rec.features, features[:5]) and rec.boxes.shape == (5, 7)
    assert NpzDirectory(tmp_path)["a"].num_regions == n  # off by default
    np.savez(tmp_path / "b.npz", features=features, norm_bb=norm_boxes(n, np.random.default_rng(0)))
    with pytest.raises(KeyError, match=r"b\.npz.*need the array 'conf'.*adaptive_regions: false"):
        NpzDirectory(tmp_path, adaptive=True)["b"]


# ================================================================================ bad inputs
def _bad_npz(folder: Path, name: str, **arrays) -> Path:
    path = folder / f"{name}.npz"
    np.savez(path, **arrays)
    return path


def test_bad_directory_inputs_name_the_file_and_fix(tmp_path):
    rng = np.random.default_rng(3)
    feats, bb = rng.normal(size=(3, D)).astype(np.float32), norm_boxes(3, rng)
    soft = soft_labels([0, 1, 2], len(VOCAB), rng)
    cases = {
        "nofeat": ({"norm_bb": bb}, KeyError, r"missing array 'features'"),
        "nobox": ({"features": feats}, KeyError, r"missing array 'norm_bb'.*or 'boxes'"),
        "rows": ({"features": feats, "norm_bb": bb[:2]}, ValueError, r"'norm_bb' must have shape \(3, 4 \| 6 \| 7\)"),
        "cols": ({"features": feats, "norm_bb": bb[:, :5]}, ValueError, r"'norm_bb' must have shape"),
        "flat": ({"features": feats.reshape(-1), "norm_bb": bb}, ValueError, r"'features' must be a numeric \(N, D\)"),
        "outside": ({"features": feats, "norm_bb": bb * 3}, ValueError,
                    r"boxes outside \[0, 1\].*store them as 'boxes' together with 'image_w' and 'image_h'"),
        "xywh": ({"features": feats, "boxes": np.array([[0.5, 0.5, 0.2, 0.2]] * 3)}, ValueError, r"x2 < x1"),
        "dim": ({"features": feats[:, :8], "norm_bb": bb}, ValueError,
                r"dim 8 but the model is configured for 16.*set method.region_feat_dim: 8"),
        "vocab": ({"features": feats, "norm_bb": bb, "soft_labels": soft[:, :5]}, ValueError,
                  r"soft_labels have 5 columns but the class vocabulary has 7 classes.*data.class_vocab"),
        "conf": ({"features": feats, "norm_bb": bb, "conf": np.ones(2)}, ValueError, r"'conf' must have shape \(3,\)"),
    }
    reader = NpzDirectory(tmp_path, feat_dim=D, num_classes=len(VOCAB))
    for name, (arrays, error, message) in cases.items():
        path = _bad_npz(tmp_path, name, **arrays)
        with pytest.raises(error, match=re.escape(str(path)) + ".*" + message):
            reader[name]
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "ghost.npz")) + ".*<image_id>.npz"):
        reader["ghost"]
    with pytest.raises(FileNotFoundError, match=r"region features not found: .*nothere.*directory of <image_id>.npz"):
        open_region_features(tmp_path / "nothere")


def test_bad_bundle_inputs_name_the_file_and_fix(tmp_path):
    rng = np.random.default_rng(4)
    good = {"image_ids": np.array(["a", "b"]), "features": rng.normal(size=(2, 3, D)).astype(np.float32),
            "norm_bb": np.stack([norm_boxes(3, rng, 4)] * 2), "num_boxes": np.array([3, 2])}
    cases = [
        ({k: v for k, v in good.items() if k != "num_boxes"}, KeyError, r"missing array 'num_boxes'"),
        ({**good, "features": good["features"][0]}, ValueError, r"'features' must have shape \(2, Nmax, D\)"),
        ({**good, "num_boxes": np.array([3, 4])}, ValueError, r"'num_boxes' must lie in \[0, Nmax=3\]"),
        ({**good, "norm_bb": good["norm_bb"][:, :2]}, ValueError, r"'norm_bb' must have shape \(2, 3, k\)"),
        ({**good, "image_ids": np.array(["a", "a"])}, ValueError, r"'a' appears twice"),
        ({**good, "image_ids": np.array(["a", None], dtype=object)}, ValueError, r"unicode arrays"),
    ]
    for i, (arrays, error, message) in enumerate(cases):
        path = tmp_path / f"bundle{i}.npz"
        np.savez(path, **arrays)
        with pytest.raises(error, match=re.escape(str(path)) + ".*" + message):
            NpzBundle(path, feat_dim=D)
    path = tmp_path / "good.npz"
    np.savez(path, **good)
    with pytest.raises(ValueError, match=re.escape(str(path)) + r" image 'a' \(row 0\).*region_feat_dim: 16"):
        NpzBundle(path, feat_dim=32)["a"]
    with pytest.raises(KeyError, match=re.escape(str(path)) + ".*do not list it"):
        NpzBundle(path)["zzz"]


def test_dataset_fails_fast_on_missing_features(tmp_path):
    folder, _ = write_directory(tmp_path)
    captions = write_captions(tmp_path)
    (folder / "coco_3.npz").unlink()
    tok = train_caption_tokenizer([c for _, caps in IMAGES.values() for c in caps], 200, read_class_vocab(write_vocab(tmp_path)))
    with pytest.raises(FileNotFoundError, match=r"missing for 1 of the 4 images of .*captions\.json.*coco_3\.npz"):
        RegionCaptionDataset(captions, NpzDirectory(folder, feat_dim=D), tok, 16)
    # a budget that stops before coco_3 never needs it
    assert len(RegionCaptionDataset(captions, NpzDirectory(folder, feat_dim=D), tok, 16, budget=4)) == 4


# ================================================================================ captions, vocab, tokenizer
def test_caption_file_schemas(tmp_path):
    albef = write_captions(tmp_path, "albef")  # one record per caption, merged per image
    entries = read_caption_file(albef, require_image=True)
    assert [e.image_id for e in entries] == list(IMAGES)
    assert [e.captions for e in entries] == [tuple(caps) for _, caps in IMAGES.values()]
    assert entries[1].image == "val2014/coco_2.jpg" and entries[1].record == 2
    coco = tmp_path / "captions_train2014.json"
    coco.write_text(json.dumps({"images": [{"id": 7, "file_name": "x/7.jpg"}, {"id": 9, "file_name": "x/9.jpg"}],
                                "annotations": [{"image_id": 9, "caption": "b"}, {"image_id": 7, "caption": "a"},
                                                {"image_id": 9, "caption": "c"}]}))
    entries = read_caption_file(coco)
    assert [(e.image_id, e.image, e.captions) for e in entries] == [("9", "x/9.jpg", ("b", "c")), ("7", "x/7.jpg", ("a",))]
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps([{"image_id": "q", "caption": ["x", "y"]}, {"caption": "z"}]))
    with pytest.raises(ValueError, match=r"plain\.json record 1 must be an object with 'caption' and 'image' or 'image_id'"):
        read_caption_file(plain)
    plain.write_text(json.dumps([{"image_id": "q", "caption": ["x", "y"]}]))
    with pytest.raises(ValueError, match=r"record 0 must be an object with 'image' and 'caption'"):
        read_caption_file(plain, require_image=True)
    rows = CaptionRows([2, 1, 3], budget=4)
    assert [rows.locate(r) for r in range(4)] == [(0, 0), (0, 1), (1, 0), (2, 0)] and rows.num_images == 3
    with pytest.raises(ValueError, match="budget=7 pairs exceeds.*data.budget: null"):
        CaptionRows([2, 1, 3], budget=7)


def test_class_vocab_lexicon_and_caption_tokenizer(tmp_path):
    classes = read_class_vocab(write_vocab(tmp_path))
    assert classes[FRIDGE] == ("refrigerator", "fridge") and classes[RACKET] == ("tennis racket",)
    bad = tmp_path / "bad_vocab.txt"
    bad.write_text("dog\n\ncat\n")
    with pytest.raises(ValueError, match=r"bad_vocab\.txt line 2 is blank"):
        read_class_vocab(bad)
    captions = [c for _, caps in IMAGES.values() for c in caps]
    tok = train_caption_tokenizer(captions, 120, classes)
    for word in ("dog", "dogs", "cat", "fridge", "refrigerator", "tennis", "racket", "frisbee", "tree", "car"):
        assert tok.is_whole_word(word), word  # class words (and their plurals seen in captions) stay whole
    lexicon = build_lexicon(classes, tok)
    assert not lexicon.unmapped
    assert {tok.word_id("fridge"), tok.word_id("refrigerator")} <= set(lexicon.token_ids(FRIDGE))
    assert tok.word_id("dogs") in lexicon.token_ids(DOG)
    assert train_caption_tokenizer(captions, 120, classes).get_vocab() == tok.get_vocab()  # deterministic
    with pytest.raises(ValueError, match=r"data.vocab_size=20 is too small"):
        train_caption_tokenizer(captions, 20, classes)


def test_open_pretrain_source_config_errors(tmp_path):
    folder, _ = write_directory(tmp_path)
    captions = write_captions(tmp_path)
    base = {"method": {"name": "cmal", "region_feat_dim": D},
            "data": {"source": "regions", "captions": str(captions), "features": str(folder),
                     "tokenizer": "captions", "vocab_size": 200, "budget": None}}

    def cfg(**data):
        return build_config({**base, "data": {**base["data"], **data}})

    with pytest.raises(ConfigError, match=r"soft_labels, but data.class_vocab is not set"):
        open_source(cfg())
    with pytest.raises(ConfigError, match=r"data.tokenizer: world .* set data.tokenizer: bert"):
        open_source(cfg(tokenizer="world", class_vocab=str(write_vocab(tmp_path))))
    with pytest.raises(ConfigError, match=r"needs data.features"):
        open_source(cfg(features=None))
    with pytest.raises(ConfigError, match=r"data.source: karpathy needs data.image_root"):
        open_source(cfg(source="karpathy"))
    with pytest.raises(ConfigError, match=r"method 'albef' encodes pixels and cannot use them"):
        open_source(build_config({**base, "method": {"name": "albef"}}))
    with pytest.raises(ConfigError, match=r"unknown config key 'data.featurs'"):
        build_config({"data": {"featurs": "x"}})


@pytest.mark.needs_minilm
def test_bert_tokenizer_source_maps_class_words(tmp_path):
    folder, _ = write_directory(tmp_path)
    cfg = build_config({"method": {"name": "cmal", "region_feat_dim": D},
                        "data": {"source": "regions", "captions": str(write_captions(tmp_path)), "features": str(folder),
                                 "class_vocab": str(write_vocab(tmp_path)), "tokenizer": "bert", "budget": None}})
    source = open_source(cfg)
    assert source.tokenizer.vocab_size == 30522
    lexicon = build_lexicon(source.class_words, source.tokenizer)
    assert source.tokenizer.word_id("fridge") in lexicon.token_ids(FRIDGE)
    # BERT's vocabulary splits "frisbee" (fris ##bee) and "racket": such words can never be anchors (§11.2),
    # which is why data.tokenizer: captions forces class words whole; CMAL warns about unmapped classes.
    assert lexicon.unmapped == (FRISBEE,) and lexicon.words[RACKET] == ("tennis",)


# ================================================================================ collate
def test_collate_pads_variable_regions():
    rng = torch.Generator().manual_seed(0)

    def item(row: int, n: int, labelled: bool = True) -> dict:
        return {"input_ids": torch.arange(2 + row), "pad_id": 0, "image_id": row, "row": row,
                "region_feats": torch.randn(n, D, generator=rng), "region_boxes": torch.rand(n, 7, generator=rng),
                "region_labels": torch.arange(1, n + 1) if labelled else None}

    items = [item(0, 2), item(1, 5), item(2, 0)]
    batch = collate(items)
    assert batch.images is None
    assert batch.region_feats.shape == (3, 5, D) and batch.region_boxes.shape == (3, 5, 7)
    assert batch.region_mask.tolist() == [[True] * 2 + [False] * 3, [True] * 5, [False] * 5]
    for i, it in enumerate(items):
        n = it["region_feats"].shape[0]
        assert torch.equal(batch.region_feats[i, :n], it["region_feats"])
        assert torch.equal(batch.region_boxes[i, :n], it["region_boxes"])
        assert (batch.region_feats[i, n:] == 0).all() and (batch.region_labels[i, n:] == 0).all()
    assert batch.region_labels.tolist() == [[1, 2, 0, 0, 0], [1, 2, 3, 4, 5], [0] * 5]
    assert batch.attention_mask.sum(1).tolist() == [2, 3, 4] and batch.sample_keys.tolist() == [0, 1, 2]
    assert collate([item(0, 2, False), item(1, 3, False)]).region_labels is None  # no soft_labels: None
    assert collate([item(0, 2, False), item(1, 3)]).region_labels.tolist() == [[0, 0, 0], [1, 2, 3]]
    with pytest.raises(ValueError, match="share one feature dim"):
        collate([item(0, 2), {**item(1, 2), "region_feats": torch.zeros(2, D + 1)}])
    with pytest.raises(ValueError, match="1 of 2 items have 'region_feats'"):
        collate([item(0, 2), {k: v for k, v in item(1, 2).items() if k != "region_feats"}])


# ================================================================================ method
def tiny_cmal(**method) -> tuple[Cmal, object]:
    cfg = build_config({
        "model": {"size": "tiny", "vision": {"image_size": 32, "patch_size": 8, "width": 32, "depth": 1, "heads": 2},
                  "text": {"width": 32, "depth": 0, "heads": 2, "max_len": 32},
                  "fusion": {"type": "single", "depth": 1, "heads": 2}},
        "method": {"name": "cmal", "task_mixing": "sum", **method},
    })
    classes = [tuple(line.split(",")) for line in VOCAB]  # as read_class_vocab returns them
    tok = train_caption_tokenizer([c for _, caps in IMAGES.values() for c in caps], 200, classes)
    torch.manual_seed(0)
    model = VLModel(cfg.model, vocab_size=tok.vocab_size, pad_id=tok.pad_id)
    return Cmal.from_config(cfg, model, tok, classes), tok


def feature_batch(tok, labelled: bool = True) -> Batch:
    ids, attn = tok.encode(["a dog catches a frisbee", "a cat on the fridge"], 16)
    feats = torch.randn(2, 3, D, generator=torch.Generator().manual_seed(0))
    boxes = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0], [0.2, 0.2, 0.6, 0.9]]).expand(2, 3, 4)
    labels = torch.tensor([[DOG + 1, FRISBEE + 1, 0], [CAT + 1, FRIDGE + 1, TREE + 1]])
    return Batch(input_ids=ids, attention_mask=attn, image_ids=torch.arange(2), region_feats=feats,
                 region_boxes=boxes, region_labels=labels if labelled else None,
                 region_mask=torch.tensor([[True, True, False], [True, True, True]]), sample_keys=torch.arange(2))


def test_cmal_reads_region_feats_instead_of_the_vit():
    method, tok = tiny_cmal(region_feat_dim=D)
    assert method.region_embed.feat_proj.in_features == D
    batch = feature_batch(tok)
    regions = method.regions(batch)
    assert torch.equal(regions.feats, batch.region_feats) and regions.boxes.shape == (2, 3, 7)
    assert regions.labels.tolist() == [[DOG + 1, FRISBEE + 1, 0], [CAT + 1, FRIDGE + 1, TREE + 1]]
    out = method.train()(batch)
    assert out["anchor_rate"].item() == 1.0 and out["anchors_per_caption"].item() == 2.0
    assert all(torch.isfinite(v) for v in out.values())
    out["loss"].backward()
    assert method.region_embed.feat_proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in method.model.vision.parameters())  # the ViT is not run
    whole, _ = tiny_cmal(region_feat_dim=D, whole_image_region=True)
    regions = whole.regions(batch)
    assert torch.allclose(regions.feats[0, 0], batch.region_feats[0, :2].mean(0))  # mean of the REAL regions
    assert regions.labels[:, 0].tolist() == [0, 0] and regions.boxes[0, 0].tolist() == [0, 0, 1, 1, 1, 1, 1]
    with pytest.raises(ValueError, match=r"region_feats have dim 16 .* set method.region_feat_dim: 16"):
        tiny_cmal()[0].regions(batch)  # configured for the ViT width (32)
    with pytest.raises(ValueError, match=r"region_feat_dim=16, but these regions are RoI-pooled from the images"):
        method.region_inputs(torch.zeros(2, 3, 32, 32), batch.region_boxes)


def test_features_without_soft_labels_warn_once_and_stay_finite():
    method, tok = tiny_cmal(region_feat_dim=D)
    batch = feature_batch(tok, labelled=False)
    with pytest.warns(UserWarning, match=r"precomputed region features carry no soft_labels.*NO anchor points.*"
                                         r"WRC has no word-region pairs.*soft_labels plus data.class_vocab") as caught:
        out = method.train()(batch)
        method(batch)
    assert sum("NO anchor points" in str(w.message) for w in caught) == 1  # once
    assert out["anchor_rate"].item() == 0.0 and out["wrc"].item() == 0.0 and out["amc_region"].item() == 0.0
    assert all(torch.isfinite(v) for v in out.values()) and out["amc_word"].item() > 0


def test_grid_cells_for_images_without_boxes():
    cells = grid_cell_boxes(3)
    assert cells.shape == (9, 4) and cells[4].tolist() == pytest.approx([1 / 3, 1 / 3, 2 / 3, 2 / 3])
    assert torch.allclose(((cells[:, 2] - cells[:, 0]) * (cells[:, 3] - cells[:, 1])).sum(), torch.tensor(1.0))
    method, tok = tiny_cmal(grid_regions=2)
    ids, attn = tok.encode(["a dog catches a frisbee", "a cat on the fridge"], 16)
    batch = Batch(input_ids=ids, attention_mask=attn, images=torch.randn(2, 3, 32, 32), image_ids=torch.arange(2),
                  sample_keys=torch.arange(2))
    with pytest.warns(UserWarning, match=r"no region boxes, so CMAL uses a 2x2 grid of cells"):
        regions = method.regions(batch)
    assert regions.boxes.shape == (2, 4, 7) and torch.equal(regions.boxes[0, :, :4], grid_cell_boxes(2))
    assert (regions.labels == 0).all() and regions.mask.all()


# ================================================================================ end to end
RUN = ["model.fusion.depth=1", "train.steps=6", "train.batch_size=4", "train.log_every=2", "train.warmup_steps=1",
       "train.progress=false", "train.tensorboard=false", "train.device=cpu", "train.ckpt_every=0",
       "data.num_workers=0", "data.max_text_len=16", "data.budget=null", "data.tokenizer=captions", "data.vocab_size=200"]


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_pretrain_on_precomputed_regions_end_to_end(tmp_path):
    folder, _ = write_directory(tmp_path)
    run = pretrain("cmal_tiny", [
        *RUN, "data.source=regions", f"data.captions={write_captions(tmp_path)}", f"data.features={folder}",
        f"data.class_vocab={write_vocab(tmp_path)}", f"method.region_feat_dim={D}", f"train.out_dir={tmp_path / 'run'}",
    ])
    records = _records(run)
    assert [r["step"] for r in records] == [2, 4, 6]  # no world retrieval eval for user data
    assert all(math.isfinite(v) for r in records for k, v in r.items() if isinstance(v, float))
    assert all(r["anchor_rate"] > 0.9 for r in records) and all(r["anchors_per_caption"] >= 1 for r in records)
    assert {"amc_word", "amc_region", "wrc"} <= {k for r in records for k in r}
    assert (run / "checkpoint" / "model.safetensors").is_file() and (run / "tokenizer.json").is_file()
    # the checkpoint rebuilds with the detector's class vocabulary (region head size) and loads strictly
    from vlp.api import load_checkpoint_method

    cfg, _, method = load_checkpoint_method(run)
    assert cfg.data.source == "regions" and method.region_head is not None


def test_pretrain_on_images_without_boxes_uses_grid_cells(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    records = []
    for i, (_, captions) in enumerate(IMAGES.values()):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(root / f"{i}.png")
        records.append({"image": f"{i}.png", "caption": captions})
    captions = tmp_path / "karpathy.json"
    captions.write_text(json.dumps(records))
    with pytest.warns(UserWarning, match=r"no region boxes, so CMAL uses a 3x3 grid of cells") as caught:
        run = pretrain("cmal_tiny", [
            *RUN, "data.source=karpathy", f"data.captions={captions}", f"data.image_root={root}",
            "model.vision.image_size=32", "model.vision.depth=1", "method.task_mixing=sum",
            f"train.out_dir={tmp_path / 'run'}",
        ])
    grid = [w for w in caught if "grid of cells" in str(w.message)]
    assert len(grid) == 1 and issubclass(grid[0].category, UserWarning)  # warned once over 6 steps
    assert "NO anchor points" in str(grid[0].message) and "provide region boxes with class labels" in str(grid[0].message)
    records = _records(run)
    assert [r["step"] for r in records] == [2, 4, 6]
    for r in records:
        assert r["anchor_rate"] == 0.0 and r["wrc"] == 0.0 and r["amc_region"] == 0.0
        assert all(math.isfinite(r[k]) for k in ("loss", "itm", "amc_word", "amc", "wrc"))
