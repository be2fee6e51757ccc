"""Downstream fine-tuning on precomputed region features (`task.region_features`, cmal.md §3.1, §9): items and
batches carry region_feats instead of images, CMAL encodes them, tasks learn from them, REC scores the feature
regions, and `vlp finetune ve` runs end to end from SNLI-VE files with no image folder.

Fixtures are written in the exact npz schemas `vlp.data.regions` reads (as tests/test_cmal_regions.py does):
a folder of `<image_id>.npz` (features, norm_bb, soft_labels) and one npz of many images (image_ids, features
(I, Nmax, D), norm_bb, num_boxes). The colour of an image lives ONLY in its features (a fixed direction), so a
task that beats chance has read them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from vlp.cli.main import main
from vlp.config import ConfigError, build_config
from vlp.data.records import NLVR2Record, RefRecord, VERecord, VQARecord
from vlp.data.regions import RegionFeatureSource, open_region_features
from vlp.data.tokenizer import SPECIAL_TOKENS, TextTokenizer
from vlp.finetune import finetune, finetune_config, task_data
from vlp.methods import build_method
from vlp.models.model import VLModel
from vlp.tasks.common import predictions, task_collate
from vlp.tasks.nlvr2 import NLVR2Dataset
from vlp.tasks.rec import RECDataset, RECTask, rec_metrics
from vlp.tasks.ve import VEDataset, VETask, ve_metrics
from vlp.tasks.vqa import VQADataset
from conftest import tiny_albef, fit_full_batch

pytestmark = pytest.mark.usefixtures("one_thread")

D = 8  # feature dim of the fixtures
COLOUR = {"red": 1.0, "blue": -1.0}  # sign of the colour direction (feature 0) in an image's coloured region
NOISE = 0.5  # std of the other feature dims (larger: 32 training images get memorised instead)
QUADRANTS = [(0.0, 0.0), (0.5, 0.0), (0.0, 0.5), (0.5, 0.5)]


def quadrant_box(q: int) -> list[float]:
    """Normalised x1, y1, x2, y2, w, h of a 0.4-wide box inside quadrant q (UNITER's 6-column norm_bb)."""
    x, y = QUADRANTS[q]
    return [x + 0.05, y + 0.05, x + 0.45, y + 0.45, 0.4, 0.4]


def image_regions(index: int, colours: list[str], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Features (N, D) and norm_bb (N, 6) of one image: region k is in quadrant (index + k) % 4 and, when
    colours[k] is a colour, its feature 0 is +-2 (red / blue); every feature has NOISE on dims 1..D-1."""
    feats = np.zeros((len(colours), D), dtype=np.float32)
    feats[:, 1:] = NOISE * rng.normal(size=(len(colours), D - 1))
    for k, colour in enumerate(colours):
        feats[k, 0] = 2.0 * COLOUR.get(colour, 0.0) + 0.2 * rng.normal()
    boxes = np.array([quadrant_box((index + k) % 4) for k in range(len(colours))], dtype=np.float32)
    return feats, boxes


def write_feature_dir(folder: Path, images: dict[str, list[str]], seed: int = 0, dim: int = D) -> Path:
    """Layout (a): <folder>/<image_id>.npz with features (float16, as BUTD dumps), norm_bb (N, 6) and
    soft_labels (N, 3): background, red, blue (uncoloured regions lean to background)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for index, (image_id, colours) in enumerate(images.items()):
        feats, boxes = image_regions(index, colours, rng)
        if dim != D:
            feats = np.concatenate([feats, np.zeros((len(feats), dim - D), np.float32)], axis=1)[:, :dim]
        soft = np.full((len(colours), 3), 0.1, dtype=np.float32)
        for k, colour in enumerate(colours):
            soft[k, {"red": 1, "blue": 2}.get(colour, 0)] = 0.8
        np.savez(folder / f"{image_id}.npz", features=feats.astype(np.float16), norm_bb=boxes, soft_labels=soft)
    return folder


def write_bundle(path: Path, images: dict[str, list[str]], seed: int = 0) -> Path:
    """Layout (b): one npz of many images, padded to Nmax with num_boxes."""
    rng = np.random.default_rng(seed)
    nmax = max(len(c) for c in images.values())
    feats = np.zeros((len(images), nmax, D), np.float32)
    boxes = np.zeros((len(images), nmax, 6), np.float32)
    for index, colours in enumerate(images.values()):
        f, b = image_regions(index, colours, rng)
        feats[index, : len(colours)], boxes[index, : len(colours)] = f, b
    np.savez(path, image_ids=np.array(list(images), dtype=str), features=feats, norm_bb=boxes,
             num_boxes=np.array([len(c) for c in images.values()], dtype=np.int64))
    return path


def ve_images(n: int, offset: int = 0) -> dict[str, list[str]]:
    """n images "img<i>": one coloured region (red for even i, blue for odd) among 2-3 uncoloured ones."""
    out = {}
    for i in range(offset, offset + n):
        colours = ["none"] * (2 + i % 2)
        colours[(i // 2) % len(colours)] = "red" if i % 2 == 0 else "blue"
        out[f"img{i}"] = colours
    return out


def ve_records(images: dict[str, list[str]], suffix: str = ".jpg") -> list[VERecord]:
    """Two hypotheses per image ("the picture is red / blue"): entailment when it names the image's colour,
    contradiction otherwise — decidable only from the features."""
    out = []
    for image_id, colours in images.items():
        colour = next(c for c in colours if c in COLOUR)
        for said in ("red", "blue"):
            out.append(VERecord(f"{image_id}-{said}", image_id + suffix, f"the picture is {said}",
                                0 if said == colour else 2))
    return out


@pytest.fixture(scope="module")
def tok() -> TextTokenizer:
    return TextTokenizer.from_vocab([*SPECIAL_TOKENS, "the", "picture", "is", "red", "blue", "thing", "left",
                                     "right"])


def tiny_cmal(tok: TextTokenizer, **method):
    """A one-layer single-stream CMAL of width 32 reading D-dim features."""
    cfg = build_config({
        "model": {"size": "tiny", "vision": {"image_size": 32, "patch_size": 8, "width": 32, "depth": 1, "heads": 2},
                  "text": {"width": 32, "depth": 0, "heads": 2, "max_len": 32},
                  "fusion": {"type": "single", "depth": 1, "heads": 2}},
        "method": {"name": "cmal", "region_feat_dim": D, "max_regions": 8, "task_mixing": "sum", **method},
    })
    torch.manual_seed(0)
    model = VLModel(cfg.model, vocab_size=tok.vocab_size, pad_id=tok.pad_id)
    return build_method(cfg, model, tok, class_words=[{"red"}, {"blue"}])


def source(path: Path) -> RegionFeatureSource:
    return RegionFeatureSource(open_region_features(path, feat_dim=D, num_classes=2))


# ================================================================================ items and batches
def test_items_and_batches_carry_region_feats_and_no_images(tmp_path, tok):
    images = ve_images(4)
    feats = source(write_feature_dir(tmp_path / "feats", images))
    data = VEDataset(ve_records(images), feats, tok, max_len=8)  # ids "img0.jpg" find img0.npz (stem rule)
    item = data[0]
    assert "image" not in item and item["region_feats"].shape == (2, D) and item["region_feats"].dtype == torch.float32
    # labels: red -> 1; an uncoloured region leans to background, which labels exclude -> 1 as well
    assert item["region_boxes"].shape == (2, 7) and item["region_labels"].tolist() == [1, 1]
    batch = task_collate([data[i] for i in range(len(data))])
    assert batch.images is None and batch.region_feats.shape == (8, 3, D) and batch.region_boxes.shape == (8, 3, 7)
    assert batch.region_mask.sum(1).tolist() == [2, 2, 3, 3, 2, 2, 3, 3]  # padded to the batch's most regions
    assert torch.equal(batch.region_feats[2, :3], torch.from_numpy(feats.region_features("img1").features))
    with pytest.raises(ValueError, match=r"no pixels.*task.region_features"):
        feats.load("img0.jpg")
    # NLVR2: each side of a pair reads its own image's features
    pairs = NLVR2Dataset([NLVR2Record("p0", "img0.png", "img1.png", "the left is red", True)], feats, tok, max_len=8)
    left, right = pairs[0]["pair"]
    assert "image" not in left and left["region_feats"].shape == (2, D) and right["region_feats"].shape == (3, D)
    pair_batch = task_collate([pairs[0]])
    assert pair_batch.images is None and pair_batch.region_feats.shape == (2, 3, D)
    # VQA items too
    vqa = VQADataset([VQARecord("q0", "img2.jpg", "is the picture red", ("yes",) * 10)], feats, tok, max_len=8,
                     answer_vocab=["yes", "no"])
    assert "image" not in vqa[0] and vqa[0]["region_feats"].shape == (2, D) and vqa[0]["answers"].tolist() == [1.0, 0.0]
    # one npz of many images works the same; ids with folders match by file stem
    bundle = RegionFeatureSource(open_region_features(write_bundle(tmp_path / "all.npz", images), feat_dim=D))
    assert RegionFeatureSource.candidates("val2014/img3.jpg") == ["val2014/img3.jpg", "val2014/img3", "img3.jpg",
                                                                  "img3"]
    rec = bundle.region_features("val2014/img3.jpg")
    assert rec.features.shape == (3, D) and rec.labels is None
    # a record whose image has no features fails at construction, naming it and where it was looked for
    with pytest.raises(FileNotFoundError, match=r"1 of the 5 images.*'img9\.jpg'.*img9\.npz"):
        VEDataset([*ve_records(images), VERecord("x", "img9.jpg", "the picture is red", 0)], feats, tok)


# ================================================================================ encode_pair
def test_cmal_encode_pair_on_features(tmp_path, tok):
    cmal = tiny_cmal(tok).eval()
    images = ve_images(4)
    data = VEDataset(ve_records(images), source(write_feature_dir(tmp_path / "feats", images)), tok, max_len=8)
    batch = task_collate([data[i] for i in range(4)])
    out = cmal.encode_pair(None, batch.input_ids, batch.attention_mask, batch.region_boxes, batch.region_mask,
                           region_feats=batch.region_feats)
    assert out.cls.shape == (4, 32) and out.regions.shape == (4, 3, 32)
    assert torch.equal(out.region_mask, batch.region_mask)
    # the output follows the features: other features, other [CLS] and region vectors
    other = cmal.encode_pair(None, batch.input_ids, batch.attention_mask, batch.region_boxes, batch.region_mask,
                             region_feats=batch.region_feats.flip(0))
    assert not torch.allclose(out.cls, other.cls) and not torch.allclose(out.regions, other.regions)
    # padding regions do not leak: changing a padded feature changes nothing
    padded = batch.region_feats.clone()
    padded[~batch.region_mask] = 100.0
    same = cmal.encode_pair(None, batch.input_ids, batch.attention_mask, batch.region_boxes, batch.region_mask,
                            region_feats=padded)
    assert torch.allclose(out.cls, same.cls, atol=1e-5)
    # the task module passes them (no images in the batch)
    assert torch.allclose(VETask(cmal).eval().encode(batch).cls, out.cls, atol=1e-6)
    with pytest.raises(ValueError, match="region_feats without region_boxes"):
        cmal.encode_pair(None, batch.input_ids, batch.attention_mask, region_feats=batch.region_feats)
    with pytest.raises(ValueError, match=r"dim 8 .*method.region_feat_dim: 8"):
        tiny_cmal(tok, region_feat_dim=0).encode_pair(None, batch.input_ids, batch.attention_mask,
                                                      batch.region_boxes, batch.region_mask,
                                                      region_feats=batch.region_feats)
    # ALBEF encodes pixels: a clear error naming the way out
    albef = tiny_albef(tok)
    with pytest.raises(ValueError, match=r"ALBEF encodes pixels.*CMAL.*task.region_features"):
        VETask(albef).encode(batch)


# ================================================================================ learning
def test_ve_learns_the_colour_only_the_features_carry(tmp_path, tok):
    """VE where the answer is entailment iff the hypothesis names the colour in the features (an XOR of
    text and feature): 32 training images, 60 steps, then 16 held-out images well above the 50 % of one class
    (measured over feature seeds 0-2: 100 / 94 / 100 %)."""
    train_images, test_images = ve_images(32), ve_images(16, offset=32)
    feats = source(write_feature_dir(tmp_path / "feats", {**train_images, **test_images}))
    train = VEDataset(ve_records(train_images), feats, tok, max_len=8)
    test = VEDataset(ve_records(test_images), feats, tok, max_len=8)
    task = VETask(tiny_cmal(tok), dropout=0.0)
    batch = task_collate([train[i] for i in range(len(train))])
    losses, out = fit_full_batch(task, batch, 60, lr=3e-3)
    metrics = ve_metrics(predictions(task, test, batch_size=32), test.records)
    assert metrics["acc"] >= 80.0, metrics


def test_rec_scores_the_feature_regions(tmp_path, tok):
    """REC on feature regions: candidates = the image's feature regions, positives by IoU >= 0.5 with the
    target box (which is not any region's exact box); after training, held-out expressions pick the region
    whose feature has the named colour (measured: 100 % over feature seeds 0-2)."""
    images = {f"img{i}": (["red", "blue", "none"] if i % 2 == 0 else ["blue", "none", "red"]) for i in range(24)}
    feats = source(write_feature_dir(tmp_path / "feats", images))

    def records(ids: list[str]) -> list[RefRecord]:
        out = []
        for image_id in ids:
            index, colours = int(image_id[3:]), images[image_id]
            for colour in ("red", "blue"):
                q = (index + colours.index(colour)) % 4
                x1, y1, x2, y2 = quadrant_box(q)[:4]
                target = (x1 + 0.04, y1, x2 + 0.04, y2)  # IoU 0.82 with the region, 0 with the others
                out.append(RefRecord(f"{image_id}-{colour}", image_id, f"the {colour} thing", target, (target,), 0,
                                     group="testA" if colour == "red" else "testB"))
        return out

    train_records, test_records = records([f"img{i}" for i in range(16)]), records([f"img{i}" for i in range(16, 24)])
    with pytest.raises(ValueError, match="boxes='features'"):
        RECDataset(train_records, feats, tok, max_len=8, boxes="gt")
    train = RECDataset(train_records, feats, tok, max_len=8, boxes="features")
    item = train[0]
    assert "image" not in item and item["region_feats"].shape == (3, D) and item["label"] == -1
    assert item["region_targets"].tolist() == [True, False, False]  # img0: red is region 0
    assert train[2]["region_targets"].tolist() == [False, False, True]  # img1: red is region 2
    task = RECTask(tiny_cmal(tok), dropout=0.0)
    batch = task_collate([train[i] for i in range(len(train))])
    losses, out = fit_full_batch(task, batch, 40, lr=3e-3)
    assert float(out["no_target"]) == 0.0
    test = RECDataset(test_records, feats, tok, max_len=8, boxes="features")
    pred = predictions(task, test, batch_size=8)
    chosen = test.chosen_boxes(pred)  # the chosen feature regions' boxes
    expect = torch.from_numpy(feats.region_features(test_records[0].image_id).boxes[int(pred[0]), :4])
    assert torch.allclose(chosen[0], expect)
    metrics = rec_metrics(chosen, test_records)
    assert metrics["acc"] >= 87.5 and set(metrics) == {"acc", "acc_testA", "acc_testB"}, metrics


# ================================================================================ CLI end to end
TINY = ["--set", "task.init=cmal_tiny", "--set", f"method.region_feat_dim={D}", "--set", "train.steps=3",
        "--set", "train.batch_size=4", "--set", "train.log_every=1", "--set", "train.warmup_steps=1",
        "--set", "train.progress=false", "--set", "train.tensorboard=false", "--set", "data.train_images=40",
        "--set", "model.vision.depth=1", "--set", "model.fusion.depth=1", "--set", "task.eval_splits=[test]"]


def snli_ve_files(tmp_path: Path, images: dict[str, list[str]]) -> list[str]:
    """SNLI-VE JSONL train/test files (Flickr30K_ID = the image number) -> their config overrides."""
    rows = [{"gold_label": ["entailment", "neutral", "contradiction"][r.label], "sentence2": r.hypothesis,
             "Flickr30K_ID": r.image_id.removesuffix(".jpg"), "pairID": r.pair_id} for r in ve_records(images)]
    paths = {}
    for split, part in (("train", rows[:6]), ("test", rows[6:])):
        paths[split] = tmp_path / f"snli_ve_{split}.jsonl"
        paths[split].write_text("\n".join(json.dumps(r) for r in part) + "\n")
    return ["task.data=files", "task.eval_splits=[test]", f"task.annotations.train={paths['train']}",
            f"task.annotations.test={paths['test']}"]


def cli_sets(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def test_cli_finetune_ve_on_features_without_images(tmp_path, capsys):
    """`vlp finetune ve --set task.region_features=DIR` from scratch on a tiny CMAL, SNLI-VE files, no image
    folder anywhere; `vlp eval ve --run` re-scores it identically."""
    images = {str(1000 + i): colours for i, colours in enumerate(ve_images(5).values())}
    feats = write_feature_dir(tmp_path / "feats", images)
    files = cli_sets(snli_ve_files(tmp_path, images))
    out = tmp_path / "run"
    assert main(["finetune", "ve", "--out", str(out), *TINY, *files, "--set", f"task.region_features={feats}",
                 "--set", "task.image_root=/nonexistent/images"]) == 0  # the image root is not read
    metrics = json.loads((out / "eval.json").read_text())
    assert metrics["train_examples"] == 6 and 0.0 <= metrics["test/acc"] <= 100.0
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["loss"] > 0
    capsys.readouterr()
    assert main(["eval", "ve", "--run", str(out)]) == 0
    table = capsys.readouterr().out
    value = next(line for line in table.splitlines() if "| test/acc " in line).split("|")[2]
    assert float(value) == pytest.approx(metrics["test/acc"], abs=0.01)


def test_finetune_rec_on_refcoco_files_reports_feat_acc(tmp_path):
    """RefCOCO files + features, no images: REC trains and is scored on the feature regions (`feat_acc`,
    per testA / testB group); there are no pixels for the ground-truth candidates (no `gt_acc`)."""
    names = {f"COCO_train2014_{k:012d}": ["red", "blue", "none"] for k in range(1, 5)}
    feats = write_feature_dir(tmp_path / "feats", names)
    images, annotations, refs = [], [], []
    for index, name in enumerate(names):
        k = index + 1
        images.append({"id": k, "file_name": f"{name}.jpg", "width": 100, "height": 100})
        for region, colour in enumerate(("red", "blue")):
            x1, y1, x2, y2 = (100 * v for v in quadrant_box((index + region) % 4)[:4])
            annotations.append({"id": 10 * k + region, "image_id": k, "bbox": [x1 + 4, y1, x2 - x1, y2 - y1],
                                "category_id": 1})
            refs.append({"ref_id": 10 * k + region, "ann_id": 10 * k + region, "image_id": k,
                         "split": "train" if k <= 2 else ("testA" if region == 0 else "testB"),
                         "sentences": [{"sent_id": 10 * k + region, "sent": f"the {colour} thing"}]})
    (tmp_path / "instances.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    (tmp_path / "refs.json").write_text(json.dumps(refs))
    out = finetune("rec", overrides=[
        "task.init=cmal_tiny", f"method.region_feat_dim={D}", f"task.region_features={feats}", "task.data=files",
        f"task.annotations.refs={tmp_path / 'refs.json'}", f"task.annotations.instances={tmp_path / 'instances.json'}",
        "task.eval_splits=[testA,testB]", "train.steps=2", "train.batch_size=4", "train.warmup_steps=1",
        "train.progress=false", "train.tensorboard=false", "data.train_images=40", "model.vision.depth=1",
        "model.fusion.depth=1", f"train.out_dir={tmp_path / 'run'}"])
    metrics = json.loads((out / "eval.json").read_text())
    assert metrics["train_examples"] == 4 and not any("gt_acc" in k or "det_acc" in k for k in metrics)
    assert 0.0 <= metrics["testA/feat_acc"] <= 100.0 and 0.0 <= metrics["testB/feat_acc_testB"] <= 100.0


# ================================================================================ errors
def test_errors_name_the_key_and_the_fix(tmp_path, capsys):
    images = {str(1000 + i): colours for i, colours in enumerate(ve_images(5).values())}
    feats = write_feature_dir(tmp_path / "feats", images)
    base = snli_ve_files(tmp_path, images)
    cmal = ["task.init=cmal_tiny", f"method.region_feat_dim={D}", f"task.region_features={feats}", *base]
    # ALBEF cannot take features: refused before anything is built (and at the method itself, above)
    with pytest.raises(ConfigError, match=r"method 'albef' encodes pixels.*drop task.region_features"):
        finetune("ve", overrides=[f"task.region_features={feats}", *base])
    assert main(["finetune", "ve", *cli_sets([*base, f"task.region_features={feats}"])]) == 2
    assert "encodes pixels" in capsys.readouterr().err
    # CMAL built for ViT-grid regions (region_feat_dim 0)
    with pytest.raises(ConfigError, match=r"method.region_feat_dim.*--set method.region_feat_dim=D"):
        task_data(finetune_config("ve", overrides=[*cmal, "method.region_feat_dim=0"]))
    # wrong feature dim: found at start, from the first image's features
    wide = write_feature_dir(tmp_path / "wide", images, dim=D + 4)
    with pytest.raises(ConfigError, match=r"features have dim 12 .*method.region_feat_dim is 8.*region_feat_dim: 12"):
        task_data(finetune_config("ve", overrides=[*cmal, f"task.region_features={wide}"]))
    # an image without features: named with where it was looked for; --skip-bad counts it instead
    (feats / "1003.npz").unlink()
    with pytest.raises(FileNotFoundError, match=r"task.region_features: no region features for 1 of the 2 images of "
                                                r"the ve split 'test'.*'1003\.jpg'.*1003\.npz"):
        task_data(finetune_config("ve", overrides=cmal))
    data = task_data(finetune_config("ve", overrides=[*cmal, "task.skip_bad=true"]))
    assert data.skipped.count == 2 and "1003.jpg" in data.skipped.reasons[0] and len(data.splits["test"]) == 2
    assert isinstance(data.images, RegionFeatureSource)
    with pytest.raises(FileNotFoundError, match="task.region_features not found"):
        task_data(finetune_config("ve", overrides=[*cmal, f"task.region_features={tmp_path / 'nope'}"]))
    # REC: candidates are the feature regions; an explicit pixel setting is refused
    with pytest.raises(ConfigError, match="leave task.rec_boxes unset"):
        task_data(finetune_config("rec", overrides=[*cmal, "task.rec_boxes=gt"]))
