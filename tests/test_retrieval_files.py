"""Retrieval fine-tuning and evaluation on user Karpathy files (`vlp finetune retrieval --data files`,
`vlp eval retrieval --data files`): both Karpathy layouts, the eval set's ground truth, an ALBEF run that
writes and re-scores eval.json identically, a learning check, CMAL on box-less images, bad input."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from vlp.cli.main import main
from vlp.config import load_config
from vlp.data.records import CaptionRecord
from vlp.data.tokenizer import TextTokenizer
from vlp.finetune import evaluate_task, file_retrieval_set, retrieval_files
from vlp.tasks.retrieval import recall_at_k

pytestmark = pytest.mark.usefixtures("one_thread")

# one colour per eval image, so a caption naming the colour has exactly one matching image
COLOURS = {"red": (220, 30, 30), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (240, 220, 30),
           "purple": (140, 50, 190), "orange": (245, 140, 20)}
SHAPES = ("circle", "square")
TRAIN_PER_COLOUR = 4
# caption counts of the test images (COCO has 5-7 per image: other counts must work)
TEST_COUNTS = (5, 3, 6, 5, 5, 5)

RUN = ["--set", "train.batch_size=12", "--set", "train.log_every=1", "--set", "train.warmup_steps=1",
       "--set", "train.progress=false", "--set", "train.tensorboard=false", "--set", "data.train_images=40",
       "--set", "data.num_workers=0", "--set", "model.vision.image_size=32", "--set", "model.vision.depth=1",
       "--set", "model.text.depth=1", "--set", "model.fusion.depth=1", "--set", "eval.k_rerank=3"]


def _captions(colour: str, shape: str, count: int) -> list[str]:
    pool = [f"a {colour} {shape}", f"a {colour} shape", f"one {colour} {shape} on grey", f"the {shape} is {colour}",
            f"{colour}", f"a picture of a {colour} object"]
    return pool[:count]


def _draw(path: Path, colour: str, shape: str, seed: int) -> None:
    rng = random.Random(seed)
    image = Image.new("RGB", (48, 48), (235, 235, 235))
    side = rng.randint(22, 34)
    x, y = rng.randint(0, 48 - side), rng.randint(0, 48 - side)
    draw = ImageDraw.Draw(image)
    (draw.ellipse if shape == "circle" else draw.rectangle)([x, y, x + side, y + side], fill=COLOURS[colour])
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def _images(root: Path) -> list[tuple[str, str, list[str]]]:
    """(split, path relative to root, captions) of every fixture image, drawn under `root`."""
    items, k = [], 0
    for split, repeats in (("train", TRAIN_PER_COLOUR), ("val", 1), ("test", 1)):
        for rep in range(repeats):
            for c, colour in enumerate(COLOURS):
                shape = SHAPES[(c + rep) % 2]
                rel = f"{split}2014/{split}_{k:03d}.png"
                _draw(root / rel, colour, shape, seed=k)
                items.append((split, rel, _captions(colour, shape, TEST_COUNTS[c] if split == "test" else 5)))
                k += 1
    return items


@pytest.fixture(scope="module")
def fixture(tmp_path_factory) -> dict:
    return write_fixture(tmp_path_factory.mktemp("karpathy"))


def write_fixture(tmp: Path) -> dict:
    """Images + both Karpathy layouts: ALBEF/BLIP per-split lists (train one row per caption, val/test one
    row per image with a caption list) and Karpathy's original dataset_coco.json (every split in one file;
    every other train image is "restval", which joins train)."""
    root = tmp / "coco"
    items = _images(root)
    lists = {}
    for split in ("train", "val", "test"):
        rows = [r for r in items if r[0] == split]
        if split == "train":
            data = [{"image": rel, "caption": c, "image_id": f"coco_{i}"} for i, (_, rel, caps) in enumerate(rows)
                    for c in caps]
        else:
            data = [{"image": rel, "caption": caps} for _, rel, caps in rows]
        lists[split] = tmp / f"coco_karpathy_{split}.json"
        lists[split].write_text(json.dumps(data), encoding="utf-8")
    original = {"dataset": "coco", "images": [
        {"filepath": rel.split("/")[0], "filename": rel.split("/")[1], "split": split if split != "train" or i % 2
         else "restval", "sentences": [{"raw": c, "tokens": c.split()} for c in caps]}
        for i, (split, rel, caps) in enumerate(items)]}
    full = tmp / "dataset_coco.json"
    full.write_text(json.dumps(original), encoding="utf-8")
    return {"tmp": tmp, "root": root, "items": items, "lists": lists, "original": full}


def _files(fx: dict, layout: str, splits=("train", "val", "test")) -> list[str]:
    paths = {s: (fx["lists"][s] if layout == "lists" else fx["original"]) for s in splits}
    return ["--set", "task.data=files", "--set", f"task.image_root={fx['root']}",
            *[a for s, p in paths.items() for a in ("--set", f"task.annotations.{s}={p}")]]


def _overrides(args: list[str]) -> list[str]:
    return [a for a in args if a != "--set"]


@pytest.fixture(scope="module")
def tokenizer() -> TextTokenizer:
    """The real BERT vocabulary: only for `needs_minilm` tests."""
    return TextTokenizer.bert_uncased()


# --------------------------------------------------------------------------- the eval set, by hand
@pytest.mark.needs_minilm
@pytest.mark.parametrize("layout", ["lists", "original"])
def test_eval_set_ground_truth_by_hand(fixture, tokenizer, layout):
    """Every test image against all of its split's captions: a text's positive is its image, an image's
    positives are all its captions (3, 5 or 6 here); eval.num_images keeps the first N images. Both layouts
    read the same records (restval joins train), whatever task.name the config carries."""
    cfg = load_config("finetune_retrieval", _overrides(_files(fixture, layout)) + ["task.name=ve"])
    data = retrieval_files(cfg, ["train", "test"])
    tests = [r for r in fixture["items"] if r[0] == "test"]
    assert data.splits["test"] == [CaptionRecord(rel, tuple(caps)) for _, rel, caps in tests]
    assert len(data.splits["train"]) == len(COLOURS) * TRAIN_PER_COLOUR  # restval images are train
    cfg = load_config("finetune_retrieval", _overrides(_files(fixture, layout)) + ["model.vision.image_size=32"])
    rset = file_retrieval_set(cfg, data, tokenizer)  # eval.num_images=100 > 6: all test images
    assert rset.images.shape == (6, 3, 32, 32) and rset.captions == [c for _, _, caps in tests for c in caps]
    starts = [0, 5, 8, 14, 19, 24]
    assert rset.img2txt == [list(range(s, s + n)) for s, n in zip(starts, TEST_COUNTS)]
    assert rset.txt2img.tolist() == [i for i, n in enumerate(TEST_COUNTS) for _ in range(n)]
    assert rset.input_ids.shape[0] == sum(TEST_COUNTS) and rset.region_boxes is None and rset.hard_image is None
    first = file_retrieval_set(cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"num_images": 2})}), data,
                               tokenizer)
    assert first.images.shape[0] == 2 and first.img2txt == [[0, 1, 2, 3, 4], [5, 6, 7]]
    assert torch.equal(first.images, rset.images[:2])


def test_recall_of_a_hand_made_score_matrix_with_uneven_captions():
    """The shared recall code (`recall_at_k`) on the file set's ground truth (3 images with 2, 1, 3
    captions): image→text counts the best of an image's captions, text→image its one image."""
    img2txt = [[0, 1], [2], [3, 4, 5]]
    txt2img = torch.tensor([0, 0, 1, 2, 2, 2])
    scores = torch.tensor([  # (I, Tn)
        [0.1, 0.9, 0.8, 0.0, 0.0, 0.0],  # image 0: its caption 1 is top -> rank 0
        [0.9, 0.0, 0.5, 0.0, 0.0, 0.0],  # image 1: caption 0 beats its only caption 2 -> rank 1
        [0.0, 0.0, 0.0, 0.1, 0.2, 0.3],  # image 2: caption 5 top -> rank 0
    ])
    m = recall_at_k(scores, txt2img, img2txt, ks=(1, 2))
    assert m["txt_r1"] == pytest.approx(200 / 3) and m["txt_r2"] == 100.0
    # text→image (columns): t0 -> image 1 first (miss@1), t1 -> 0 ok, t2 -> 0 first (miss), t3..t5 -> 2 ok
    assert m["img_r1"] == pytest.approx(400 / 6) and m["img_r2"] == 100.0
    assert m["r_mean"] == pytest.approx((200 / 3 + 100 + 400 / 6 + 100) / 4)


# --------------------------------------------------------------------------- fine-tune + re-score
def test_albef_finetune_on_lists_then_rescore_reproduces_eval_json(fixture, tmp_path, capsys):
    out = tmp_path / "ft"
    args = ["finetune", "retrieval", "--out", str(out), *RUN, "--set", "train.steps=2",
            "--set", "task.train_size=50", *_files(fixture, "lists", ("train", "test"))]
    assert main(args) == 0, capsys.readouterr().err
    metrics = json.loads((out / "eval.json").read_text())
    assert metrics["num_images"] == 6 and metrics["num_texts"] == sum(TEST_COUNTS)
    assert metrics["train_examples"] == 50 and metrics["skipped_records"] == 0
    for key in ("itc/txt_r1", "itc/img_r10", "itc/r_mean", "itm/txt_r1", "itm/img_r5", "itm/r_mean"):
        assert 0.0 <= metrics[key] <= 100.0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["mlm"] == 0.0 and r["itc"] > 0 for r in records if "loss" in r)  # retrieval objectives only
    # `vlp eval retrieval` on the saved run: task.data / annotations come from its config
    rescored = tmp_path / "rescore"
    assert main(["eval", "retrieval", "--checkpoint", str(out), "--out", str(rescored)]) == 0
    again = json.loads((rescored / "eval.json").read_text())
    assert again == {k: metrics[k] for k in again}
    assert evaluate_task(out) == {k: metrics[k] for k in again if k != "skipped_records"}  # the Python API
    # ... and on another split of the other layout given on the command line
    capsys.readouterr()
    assert main(["eval", "retrieval", "--checkpoint", str(out), "--data", "files",
                 "--set", f"task.annotations.val={fixture['original']}", "--set", "eval.split=val",
                 "--set", "eval.num_images=4"]) == 0
    table = capsys.readouterr().out
    assert float(next(line for line in table.splitlines() if "| num_images " in line).split("|")[2]) == 4


def test_albef_learns_colour_retrieval_on_the_original_file(fixture, tmp_path):
    """40 steps from scratch on Karpathy's dataset_coco.json (train + restval) put R@1 of the held-out
    test images (one per colour) well above chance (100/6 % text→image; measured 100 % both ways, ~83 %
    after 30 steps, chance-level at 5)."""
    from vlp.finetune import finetune

    out = tmp_path / "learn"
    args = _overrides([*RUN, "--set", "train.steps=40", "--set", "train.lr=1e-3", "--set", "task.train_size=0",
                       "--set", "eval.itm_all=false", *_files(fixture, "original", ("train", "test"))])
    metrics = json.loads((finetune("retrieval", overrides=[f"train.out_dir={out}", *args]) / "eval.json").read_text())
    assert metrics["train_examples"] == len(COLOURS) * TRAIN_PER_COLOUR * 5  # every pair (task.train_size=0)
    chance = 100.0 / len(COLOURS)
    assert metrics["chance_r1"] == pytest.approx(chance)
    assert metrics["itc/img_r1"] > 3 * chance and metrics["itc/txt_r1"] > 3 * chance, metrics


def test_cmal_scores_box_less_images_with_grid_regions(fixture, tmp_path):
    """CMAL (no ITC) fine-tunes with ITM and is ranked by ITM over all pairs, its regions being grid cells."""
    out = tmp_path / "cmal"
    with pytest.warns(UserWarning, match=r"no region boxes, so CMAL uses a 3x3 grid of cells"):
        code = main(["finetune", "retrieval", "--out", str(out), *RUN, "--set", "task.init=cmal_tiny",
                     "--set", "train.steps=1", "--set", "task.train_size=12", "--set", "eval.num_images=3",
                     *_files(fixture, "lists", ("train", "test"))])
    assert code == 0
    metrics = json.loads((out / "eval.json").read_text())
    assert metrics["itm_forwards"] == 3 * 14 and 0.0 <= metrics["itm_all/r_mean"] <= 100.0


# --------------------------------------------------------------------------- bad input
def test_missing_image_is_an_error_naming_it_or_a_counted_skip(fixture, tmp_path, capsys):
    rows = json.loads(fixture["lists"]["test"].read_text())
    rows.append({"image": "test2014/nothere.png", "caption": ["a red circle"]})
    broken = tmp_path / "coco_karpathy_test.json"
    broken.write_text(json.dumps(rows))
    args = ["--set", f"task.annotations.test={broken}"]
    assert main(["finetune", "retrieval", "--out", str(tmp_path / "run"), *RUN, "--set", "train.steps=1",
                 *_files(fixture, "lists", ("train",)), *args]) == 2
    err = capsys.readouterr().err
    assert "coco_karpathy_test.json record 6: image not found" in err and "nothere.png" in err
    cfg = load_config("finetune_retrieval", _overrides([*_files(fixture, "lists", ("train",)), *args])
                      + ["task.skip_bad=true"])
    data = retrieval_files(cfg, ["test"])
    assert data.skipped.count == 1 and "nothere.png" in data.skipped.reasons[0] and len(data.splits["test"]) == 6


def test_absent_split_and_malformed_file_name_the_file_and_the_fix(fixture, tmp_path, capsys):
    base = ["retrieval", "--out", str(tmp_path / "run"), *RUN, "--set", "train.steps=1"]
    # Karpathy's original file has no "compositional" images
    assert main(["finetune", *base, *_files(fixture, "original", ("train", "compositional")),
                 "--set", "eval.split=compositional"]) == 2
    err = capsys.readouterr().err
    assert "dataset_coco.json holds no images of split 'compositional'" in err and "eval.split" in err
    # no file given for the eval split
    assert main(["finetune", *base, *_files(fixture, "lists", ("train",))]) == 2
    err = capsys.readouterr().err
    assert "task.annotations has no file for split 'test'" in err and "task.annotations.test=" in err
    # not JSON
    bad = tmp_path / "coco_karpathy_test.json"
    bad.write_text('[{"image": "x.png", "caption": ')
    cfg = load_config("finetune_retrieval", _overrides(_files(fixture, "lists", ("train",)))
                      + [f"task.annotations.test={bad}"])
    with pytest.raises(ValueError, match=r"coco_karpathy_test\.json is not valid JSON"):
        retrieval_files(cfg, ["test"])
    cfg = load_config("finetune_retrieval", [f"task.annotations.test={bad}", "task.data=files"])
    with pytest.raises(ValueError, match=r"needs task\.image_root"):
        retrieval_files(cfg, ["test"])
