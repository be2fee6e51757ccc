"""Bad data and damaged files (issue 14): an undecodable image or a region-feature npz with NaN gives the same
one-line error with 0 or N data workers; `--skip-bad` drops such samples, counts them in skipped_records.json
and refuses beyond data.max_bad_fraction; an all-bad batch still counts as a step; resume keeps the counts."""

from __future__ import annotations

import io
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset

from vlp.cli.main import main
from vlp.config import ConfigError, DataConfig, RunConfig, TrainConfig, load_config
from vlp.data.datasets import ImageCaptionDataset, RetrievalSet, collate
from vlp.data.regions import NpzBundle, NpzDirectory, RegionCaptionDataset
from vlp.data.skips import (
    SKIPPED_FILE,
    BadSample,
    DataError,
    SkipLedger,
    SkippingCollate,
    unwrap_worker_error,
    wilson_lower,
)
from vlp.data.tokenizer import TextTokenizer
from vlp.train import Trainer
from vlp.train.checkpoint import read_trainer_state
from vlp.train.sampler import StepSampler
from vlp.types import Batch

from test_trainer import ToyData, collate as toy_collate, toy, train_records

pytestmark = pytest.mark.usefixtures("one_thread")

COLOURS = ("red", "green", "blue", "yellow", "purple")
NUM_IMAGES = 40
BAD = {7: "truncated", 23: "garbage"}  # image index -> how it is broken

# one epoch of the 40 one-caption images in one step (one thread: the test machine's cores are shared)
RUN = ["--set", "data.source=karpathy", "--set", "data.tokenizer=captions", "--set", "data.vocab_size=120",
       "--set", "data.budget=null", "--set", "data.max_text_len=12", "--set", "model.vision.image_size=16",
       "--set", "model.vision.depth=1", "--set", "model.text.depth=1", "--set", "model.fusion.depth=1",
       "--set", "train.batch_size=40", "--set", "train.steps=1", "--set", "train.log_every=1",
       "--set", "train.warmup_steps=1", "--set", "train.ckpt_every=0", "--set", "train.progress=false",
       "--set", "train.tensorboard=false", "--set", "train.device=cpu", "--set", "data.num_workers=0",
       "--set", "train.threads=1"]


# ================================================================================ fixtures
def _png(path: Path, colour: int) -> None:
    pixels = np.zeros((12, 12, 3), dtype=np.uint8)
    pixels[..., colour % 3] = 60 + 5 * colour
    Image.fromarray(pixels).save(path)


def _truncated_jpeg(path: Path) -> None:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buffer, "JPEG")
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])  # a download cut off half-way


def write_images(root: Path, bad: dict[int, str]) -> Path:
    """NUM_IMAGES images (one caption each) under root/images, the `bad` ones broken; returns the captions file."""
    images = root / "images"
    images.mkdir(parents=True)
    records = []
    for i in range(NUM_IMAGES):
        name = f"{i:03d}.jpg" if i in bad else f"{i:03d}.png"
        if bad.get(i) == "truncated":
            _truncated_jpeg(images / name)
        elif bad.get(i) == "garbage":
            (images / name).write_bytes(b"this is not an image, just bytes\n" * 8)
        else:
            _png(images / name, i)
        records.append({"image": name, "caption": [f"a {COLOURS[i % 5]} square number {i % 7}"]})
    captions = root / "captions.json"
    captions.write_text(json.dumps(records))
    return captions


@pytest.fixture(scope="module")
def karpathy(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("bad_images")
    captions = write_images(root, BAD)
    return {"root": root, "captions": captions, "images": root / "images"}


def _data(fx: dict) -> list[str]:
    return ["--set", f"data.captions={fx['captions']}", "--set", f"data.image_root={fx['images']}"]


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def skipped_run(karpathy, tmp_path_factory) -> Path:
    """`vlp pretrain --skip-bad` over the 40 images, 2 of them broken, limit 10 %."""
    out = tmp_path_factory.mktemp("skip_run") / "run"
    code = main(["pretrain", "--config", "albef_tiny", "--out", str(out), "--skip-bad", *RUN, *_data(karpathy),
                 "--set", "data.max_bad_fraction=0.1"])
    assert code == 0
    return out


# ================================================================================ one-line errors
@pytest.mark.parametrize("kind", ["truncated", "garbage"])
def test_undecodable_image_is_the_same_one_line_error_with_0_and_1_workers(tmp_path, capsys, kind):
    """One broken image among 8 (one step of 8 rows reads them all): the CLI prints one `error:` line naming
    the file and the caption record, identical with the image decoded in the main process or in a worker."""
    captions = write_images(tmp_path, {3: kind})
    records = json.loads(captions.read_text())[:8]
    captions.write_text(json.dumps(records))
    errors = []
    for workers in (0, 1):
        code = main(["pretrain", "--config", "albef_tiny", "--out", str(tmp_path / f"run{workers}"), *RUN,
                     "--set", f"data.captions={captions}", "--set", f"data.image_root={tmp_path / 'images'}",
                     "--set", "train.steps=1", "--set", "train.batch_size=8", "--set", f"data.num_workers={workers}"])
        err = capsys.readouterr().err
        assert code == 2, err
        assert "Traceback" not in err and "Caught" not in err and "worker" not in err, err
        errors.append(_error_lines(err))
    assert errors[0] == errors[1] and len(errors[0]) == 1
    line = errors[0][0]
    assert f"{captions} record 3: cannot decode image {tmp_path / 'images' / '003.jpg'}" in line
    assert line.endswith("re-export it or remove it from the annotation file")


def test_worker_error_keeps_its_type_message_and_the_worker_traceback_as_a_note(tmp_path):
    """The Python API: a Trainer whose loader worker hits a bad sample raises the worker's own exception."""

    class Broken(Dataset):
        def __len__(self) -> int:
            return 8

        def __getitem__(self, i: int):
            raise DataError(BadSample("undecodable image", "x.jpg", f"cannot decode image x.jpg (row {i})"))

    loader = torch.utils.data.DataLoader(Broken(), batch_size=2, num_workers=1)
    with pytest.raises(DataError) as caught:
        next(iter(loader))
    assert str(caught.value).startswith("Caught DataError in DataLoader worker process 0")  # torch's wrapping
    original = unwrap_worker_error(caught.value)
    assert type(original) is DataError and str(original) == "cannot decode image x.jpg (row 0)"
    assert any("Original Traceback" in note for note in original.__notes__)
    plain = ValueError("not from a worker")
    assert unwrap_worker_error(plain) is plain
    cfg = RunConfig(train=TrainConfig(steps=1, batch_size=2, tensorboard=False, progress=False, device="cpu"),
                    data=DataConfig(num_workers=1))
    with pytest.raises(DataError) as caught:
        Trainer(cfg, toy(0), Broken(), toy_collate, tmp_path / "run").fit()
    assert re.fullmatch(r"cannot decode image x\.jpg \(row \d\)", str(caught.value))


# ================================================================================ --skip-bad
def test_skip_bad_trains_and_writes_skipped_records(skipped_run):
    report = json.loads((skipped_run / SKIPPED_FILE).read_text())
    assert report["seen"] == NUM_IMAGES and report["skipped"] == 2  # one epoch: every row once
    assert report["fraction"] == pytest.approx(2 / NUM_IMAGES) and report["max_fraction"] == 0.1
    assert report["by_reason"] == {"undecodable image": 2}
    assert sorted(Path(e["where"]).name for e in report["examples"]) == ["007.jpg", "023.jpg"]
    assert all("cannot decode image" in e["detail"] and "captions.json record" in e["detail"]
               for e in report["examples"])
    records = [json.loads(line) for line in (skipped_run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == [1] and math.isfinite(train[0]["loss"]) and train[0]["skipped"] == 2
    # the ledger is in the checkpoint (resume continues its counts)
    assert read_trainer_state(skipped_run)["extra"]["skips"]["skipped"] == 2


def test_skip_bad_refuses_beyond_max_bad_fraction(karpathy, tmp_path, capsys):
    """2 bad of 40 > 1 %: judged at the end (40 < 100 samples: too few to judge before), here the one step of
    40 rows, refused before it trains."""
    out = tmp_path / "run"
    code = main(["pretrain", "--config", "albef_tiny", "--out", str(out), "--skip-bad", *RUN, *_data(karpathy),
                 "--set", "data.max_bad_fraction=0.01"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    (line,) = _error_lines(err)
    assert line.startswith("error: 2 of 40 samples (5.0 %) were bad (undecodable image: 2), more than "
                           "data.max_bad_fraction = 0.01 allows; first: ")
    assert "007.jpg" in line and "023.jpg" in line
    assert line.endswith("repair or remove them, or raise data.max_bad_fraction (e.g. --set data.max_bad_fraction=0.1)")
    assert json.loads((out / SKIPPED_FILE).read_text())["skipped"] == 2


def test_eval_retrieval_on_files_skips_and_reports_undecodable_images(karpathy, skipped_run, tmp_path, capsys):
    files = ["--data", "files", "--set", f"task.annotations.test={karpathy['captions']}",
             "--set", f"task.image_root={karpathy['images']}", "--set", "eval.num_images=0",
             "--set", "eval.k_rerank=2"]
    assert main(["eval", "retrieval", "--checkpoint", str(skipped_run), *files]) == 2
    (line,) = _error_lines(capsys.readouterr().err)
    assert f"cannot decode image {karpathy['images'] / '007.jpg'}" in line
    out = tmp_path / "eval"
    assert main(["eval", "retrieval", "--checkpoint", str(skipped_run), *files, "--skip-bad", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "retrieval: skipped 2 bad record(s):" in err and "007.jpg" in err and "023.jpg" in err
    metrics = json.loads((out / "eval.json").read_text())
    assert metrics["skipped_records"] == 2 and metrics["num_images"] == NUM_IMAGES - 2


def test_retrieval_finetune_on_files_skips_undecodable_training_and_eval_images(karpathy, skipped_run, tmp_path,
                                                                               capsys):
    """`vlp finetune retrieval --data files --skip-bad`: the 2 broken images are skipped in training (the
    trainer's ledger, skipped_records.json) and left out of the eval set (eval.json's skipped_records)."""
    out = tmp_path / "ft"
    code = main(["finetune", "retrieval", "--checkpoint", str(skipped_run), "--data", "files", "--skip-bad",
                 "--out", str(out), *RUN[2:],  # not data.source
                 "--set", f"task.annotations.train={karpathy['captions']}",
                 "--set", f"task.annotations.test={karpathy['captions']}", "--set", f"task.image_root={karpathy['images']}",
                 "--set", "task.train_size=0", "--set", "eval.num_images=0", "--set", "eval.k_rerank=2",
                 "--set", "data.max_bad_fraction=0.1"])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / SKIPPED_FILE).read_text())
    assert (report["seen"], report["skipped"], report["by_reason"]) == (40, 2, {"undecodable image": 2})
    metrics = json.loads((out / "eval.json").read_text())
    assert metrics["skipped_records"] == 2 and metrics["num_images"] == NUM_IMAGES - 2


def test_missing_image_is_an_error_at_construction_or_a_bad_sample_with_skip_bad(karpathy, tmp_path):
    records = json.loads(karpathy["captions"].read_text())[:4] + [{"image": "gone.png", "caption": ["a square"]}]
    captions = tmp_path / "captions.json"
    captions.write_text(json.dumps(records))
    tokenizer = TextTokenizer.from_vocab(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "square"])
    with pytest.raises(FileNotFoundError, match=r"captions\.json record 4: image not found: .*gone\.png"):
        ImageCaptionDataset(captions, karpathy["images"], tokenizer, 8, 16)
    dataset = ImageCaptionDataset(captions, karpathy["images"], tokenizer, 8, 16, skip_bad=True)
    assert dataset[0]["image"].shape == (3, 16, 16)
    gone = dataset[4]
    assert isinstance(gone, BadSample) and gone.reason == "missing image" and gone.where.endswith("gone.png")
    assert "captions.json record 4: image file not found" in gone.detail


def test_retrieval_set_on_bad_drops_the_image_with_its_captions(karpathy):
    tokenizer = TextTokenizer.from_vocab(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "square"])
    with pytest.raises(DataError, match=r"captions\.json record 7: cannot decode image .*007\.jpg"):
        RetrievalSet.from_karpathy_json(karpathy["captions"], karpathy["images"], tokenizer, 8, 16)
    bad: list[str] = []
    rset = RetrievalSet.from_karpathy_json(karpathy["captions"], karpathy["images"], tokenizer, 8, 16,
                                           on_bad=bad.append)
    assert len(bad) == 2 and "007.jpg" in bad[0] and "023.jpg" in bad[1]
    assert rset.num_images == NUM_IMAGES - 2 and rset.num_texts == NUM_IMAGES - 2
    assert rset.captions[7] == "a yellow square number 1"  # image 8's caption moved up: image 7 is gone
    assert rset.txt2img.tolist() == list(range(NUM_IMAGES - 2))


# ================================================================================ region features
def _features(n: int = 3, dim: int = 4) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    xy = rng.uniform(0.0, 0.4, (n, 2))
    return {"features": rng.normal(size=(n, dim)).astype(np.float32),
            "norm_bb": np.concatenate([xy, xy + 0.3], axis=1).astype(np.float32)}


def test_nan_features_name_the_file_and_the_array(tmp_path):
    folder = tmp_path / "feats"
    folder.mkdir()
    good, nan_feats, inf_boxes = _features(), _features(), _features()
    nan_feats["features"][[0, 2], [1, 3]] = np.nan
    nan_feats["features"][1, 0] = np.inf
    inf_boxes["norm_bb"][1, 2] = np.inf
    for name, arrays in (("good", good), ("123", nan_feats), ("box", inf_boxes)):
        np.savez(folder / f"{name}.npz", **arrays)
    features = NpzDirectory(folder)
    with pytest.raises(DataError) as caught:
        features["123"]
    assert str(caught.value).startswith(f"{folder / '123.npz'}: array 'features' of image '123' holds 3 non-finite "
                                        f"value(s) (NaN or inf) among its 12; re-extract")
    assert caught.value.sample.reason == "non-finite features"
    with pytest.raises(DataError, match=re.escape(f"{folder / 'box.npz'}: array 'norm_bb' of image 'box' holds 1 "
                                                  f"non-finite value(s)")):
        features["box"]
    # one npz of many images: the row is named
    bundle = tmp_path / "bundle.npz"
    np.savez(bundle, image_ids=np.array(["good", "123"]), features=np.stack([good["features"], nan_feats["features"]]),
             norm_bb=np.stack([good["norm_bb"], nan_feats["norm_bb"]]), num_boxes=np.array([3, 3]))
    with pytest.raises(DataError, match=re.escape(f"{bundle} image '123' (row 1): array 'features' holds 3 non-finite")):
        NpzBundle(bundle)["123"]
    # in a dataset: the error, or with skip_bad a counted BadSample
    captions = tmp_path / "captions.json"
    captions.write_text(json.dumps([{"image_id": i, "caption": f"a thing {i}"} for i in ("good", "123", "box")]))
    tokenizer = TextTokenizer.from_vocab(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "thing"])
    strict = RegionCaptionDataset(captions, features, tokenizer, 8)
    assert strict[0]["region_feats"].shape == (3, 4)
    with pytest.raises(DataError, match=r"array 'features' of image '123' holds 3 non-finite"):
        strict[1]
    lenient = RegionCaptionDataset(captions, features, tokenizer, 8, skip_bad=True)
    marker = lenient[1]
    assert isinstance(marker, BadSample) and marker.reason == "non-finite features"
    assert marker.where == str(folder / "123.npz")
    batch = SkippingCollate(collate)([lenient[i] for i in range(3)])
    assert len(batch) == 1 and [s.reason for s in batch.skipped] == ["non-finite features"] * 2
    assert batch.sample_keys.tolist() == [0]


# ================================================================================ collate, ledger, batches
def test_skipping_collate_and_batch_slices_count_each_bad_sample_once():
    items = [(0, torch.zeros(3, 2, 2), torch.zeros(4)), BadSample("r", "a", "d"), (2, torch.ones(3, 2, 2), torch.ones(4)),
             (3, torch.ones(3, 2, 2), torch.ones(4))]
    batch = SkippingCollate(toy_collate)(items)
    assert len(batch) == 3 and batch.sample_keys.tolist() == [0, 2, 3] and len(batch.skipped) == 1
    parts = [batch.slice(0, 2), batch.slice(2, 3)]
    assert [len(p.skipped) for p in parts] == [1, 0]
    assert batch.to("cpu").skipped == batch.skipped
    empty = SkippingCollate(toy_collate)([BadSample("r", "a", "d"), BadSample("r", "b", "d")])
    assert isinstance(empty, Batch) and len(empty) == 0 and len(empty.skipped) == 2
    plain = SkippingCollate(toy_collate)([items[0]])
    assert plain.skipped == () and torch.equal(plain.labels, toy_collate([items[0]]).labels)


def test_ledger_limit_is_judged_once_enough_samples_were_seen():
    ledger = SkipLedger(max_fraction=0.1)
    ledger.add(8, [BadSample("undecodable image", "a.jpg", "d")])  # 1 of 8: too few to judge (< 10 seen)
    assert not ledger.over_limit() and ledger.over_limit(final=True)
    ledger.add(8, [BadSample("undecodable image", "b.jpg", "d")])  # 2 of 16 = 12.5 %; lower bound 3.5 %
    assert wilson_lower(2, 16) == pytest.approx(0.0349, abs=1e-3) and not ledger.over_limit()
    ledger.add(8, [BadSample("non-finite features", "c.npz", "d")] * 6)  # 8 of 24 = 33 %; lower bound 18 %
    assert ledger.over_limit()
    with pytest.raises(DataError, match=r"^8 of 24 samples \(33\.3 %\) were bad \(non-finite features: 6, "
                                        r"undecodable image: 2\), more than data\.max_bad_fraction = 0\.1 allows; "
                                        r"first: a\.jpg; b\.jpg; c\.npz; repair"):
        ledger.check()
    restored = SkipLedger(0.1)
    restored.load_state_dict(json.loads(json.dumps(ledger.state_dict())))
    assert restored.report() == ledger.report()
    everything = SkipLedger(1.0)
    everything.add(4, [BadSample("r", "w", "d")] * 4)
    assert not everything.over_limit(final=True)  # 1 = never refuse
    strict = SkipLedger(0.0)
    strict.add(100, [BadSample("r", "w", "d")])
    assert strict.over_limit()  # 0 = refuse at the first bad sample, however many were seen
    with pytest.raises(ConfigError, match="max_bad_fraction"):
        load_config("albef_tiny", ["data.max_bad_fraction=1.5"])


# ================================================================================ trainer: all-bad step, resume
class BadRows(Dataset):
    """ToyData whose `bad` rows cannot be decoded (returned as BadSamples: skipping on)."""

    skip_bad = True

    def __init__(self, bad, n: int = 16) -> None:
        self.data, self.bad = ToyData(n), {int(i) for i in bad}

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        if i in self.bad:
            return BadSample("undecodable image", f"img{i}.jpg", f"cannot decode image img{i}.jpg")
        return self.data[i]


def _cfg(steps: int, **train) -> RunConfig:
    base = dict(steps=steps, batch_size=4, lr=1e-2, warmup_steps=3, log_every=1, ckpt_every=2, grad_clip=1.0,
                tensorboard=False, progress=False, device="cpu", seed=3)
    base.update(train)
    return RunConfig(train=TrainConfig(**base), data=DataConfig(num_workers=0, max_bad_fraction=0.5))


def test_a_step_whose_items_are_all_bad_counts_but_changes_nothing(tmp_path):
    """Step 2's four rows are all bad: no forward, no weight / EMA change, no metrics record; the step counts
    (the LR schedule of steps 3-4 is that of a clean run) and the four are in skipped_records.json."""
    all_bad = StepSampler(16, 4, seed=3).rank_rows(1).indices.tolist()
    one = Trainer(_cfg(1), toy(0), BadRows(all_bad), toy_collate, tmp_path / "one")
    one.fit()
    two = Trainer(_cfg(2), toy(0), BadRows(all_bad), toy_collate, tmp_path / "two")
    two.fit()
    assert two.method.calls == one.method.calls == 1 and two.scheduler.last_epoch == 2
    for (name, a), b in zip(one.method.state_dict().items(), two.method.state_dict().values()):
        assert torch.equal(a, b), name
    bad_run = Trainer(_cfg(4), toy(0), BadRows(all_bad), toy_collate, tmp_path / "bad")
    clean_run = Trainer(_cfg(4), toy(0), BadRows([]), toy_collate, tmp_path / "clean")
    bad, clean = train_records(bad_run.fit()), train_records(clean_run.fit())
    assert [r["step"] for r in bad] == [1, 3, 4] and [r["skipped"] for r in bad] == [0, 4, 4]
    assert [r["lr"] for r in bad] == [clean[0]["lr"], clean[2]["lr"], clean[3]["lr"]]
    report = json.loads((tmp_path / "bad" / SKIPPED_FILE).read_text())
    assert report["seen"] == 16 and report["skipped"] == 4 and report["by_reason"] == {"undecodable image": 4}
    assert sorted(e["where"] for e in report["examples"]) == sorted(f"img{i}.jpg" for i in all_bad)


def test_resume_with_a_ledger_is_exact(tmp_path):
    """8 steps with grad_accum 2 over rows of which 3 are bad (partial and possibly empty steps) == 4 steps,
    crash, resume + 4 steps: identical losses, final state and skipped_records.json."""
    bad_rows = [1, 6, 11]
    cfg = _cfg(8, grad_accum=2, ckpt_every=4)
    straight = Trainer(cfg, toy(0), BadRows(bad_rows), toy_collate, tmp_path / "a")
    rec_a = train_records(straight.fit())
    sampler = StepSampler(16, 4, seed=3)
    forwards = [0 if sum(int(i) not in bad_rows for i in sampler.rank_rows(s).indices) < 2 else 2 for s in range(8)]
    assert sum(f == 0 for f in forwards[:4]) < 4
    crashed = Trainer(cfg, toy(0, crash_at_call=sum(forwards[:5]) + 1), BadRows(bad_rows), toy_collate, tmp_path / "b")
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashed.fit()
    assert read_trainer_state(tmp_path / "b")["step"] == 4
    resumed = Trainer(cfg, toy(123), BadRows(bad_rows), toy_collate, tmp_path / "b")
    rec_b = train_records(resumed.fit(resume=tmp_path / "b"))
    exact = ("step", "loss", "mse", "reg", "lr", "grad_norm", "skipped")
    assert [{k: r[k] for k in exact} for r in rec_b] == [{k: r[k] for k in exact} for r in rec_a if r["step"] > 4]
    assert rec_b and rec_b[0]["skipped"] > 0  # the resumed run started from the checkpoint's counts
    for (name, a), b in zip(straight.method.state_dict().items(), resumed.method.state_dict().values()):
        assert torch.equal(a, b), name
    report_a = json.loads((tmp_path / "a" / SKIPPED_FILE).read_text())
    assert json.loads((tmp_path / "b" / SKIPPED_FILE).read_text()) == report_a
    assert report_a["seen"] == 32 and report_a["skipped"] == 6  # two epochs of 16 rows, 3 bad each
