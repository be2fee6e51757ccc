"""WebDataset shards (`vlp data shard`, `data.source: webdataset`, vlp.data.shards): writer round trip, url
expansion, the (rank, worker) split, training and sample-exact resume on a stream, corrupt members."""

from __future__ import annotations

import io
import json
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader
from webdataset.writer import TarWriter

from vlp.cli.main import main
from vlp.config import ConfigError, DataConfig, RunConfig, TrainConfig, build_config
from vlp.data.datasets import collate
from vlp.data.shards import (
    IMAGE_ID_STRIDE,
    NO_IMAGE_ID,
    ShardDataset,
    brace_pattern,
    count_samples,
    expand_urls,
    read_members,
    shard_counts,
    world_pairs,
    write_shards,
    write_source_shards,
)
from vlp.data.skips import SKIPPED_FILE, BadSample, DataError
from vlp.data.transforms import image_to_tensor
from vlp.data.unpaired import pretrain_source
from vlp.methods import method_class
from vlp.models.rng import keyed_uniform
from vlp.train import Trainer
from vlp.train.checkpoint import read_trainer_state
from vlp.train.sampler import KEY_SEED_STRIDE
from vlp.types import Batch

pytestmark = pytest.mark.usefixtures("one_thread")

PAIRS, SHARD_SIZE = 30, 7  # 6 world images x 5 captions in shards of 7, 7, 7, 7, 2 samples


@pytest.fixture(scope="module")
def shards(tmp_path_factory, world):
    return write_shards(world_pairs(world, PAIRS), tmp_path_factory.mktemp("shards"), SHARD_SIZE, source="test")


def _png(seed: int, size: tuple[int, int] = (12, 10)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)


# ------------------------------------------------------------------------------------------ writing
def test_world_shards_round_trip(shards, world, tok):
    """Counts, index, member names, and every sample read back = the world's pair (caption, pixels, image)."""
    assert shards.counts == (7, 7, 7, 7, 2) and shards.samples == PAIRS
    assert [p.name for p in shards.paths] == [f"shard-{i:06d}.tar" for i in range(5)]
    assert shards.pattern == str(shards.out_dir / "shard-{000000..000004}.tar")
    index = json.loads((shards.out_dir / "shards.json").read_text())
    assert index["samples"] == PAIRS and index["shards"]["shard-000004.tar"]["samples"] == 2
    assert [count_samples(p) for p in shards.paths] == [7, 7, 7, 7, 2]
    with tarfile.open(shards.paths[1]) as tar:  # img2dataset layout, global keys
        assert tar.getnames()[:3] == ["000000007.json", "000000007.png", "000000007.txt"]
    dataset = ShardDataset(shards.pattern, tok, 40, 32, shuffle_buffer=0)
    assert len(dataset) == PAIRS
    split = world.split("train")
    for row in range(PAIRS):
        item = dataset[row]
        sample = split[row // 5]
        assert item["caption"] == sample.captions[row % 5]
        assert item["image_id"] == row // 5 and item["row"] == row  # seed 0, epoch 0: the position
        assert torch.equal(item["image"], image_to_tensor(sample.image, 32))  # PNG: lossless


def test_folder_and_karpathy_shards_keep_image_bytes(tmp_path, tok):
    root = tmp_path / "images"
    root.mkdir()
    Image.fromarray(_png(0)).save(root / "a.png")
    Image.fromarray(_png(1)).save(root / "b.jpg", quality=90)
    Image.fromarray(_png(2)).save(root / "c.bmp")  # not a shard format: stored as PNG, same pixels
    table = tmp_path / "captions.json"
    table.write_text(json.dumps({"a.png": "a red square", "b.jpg": ["one cat", "two cats"], "c.bmp": "blue"}))
    folder = out = write_source_shards(tmp_path / "folder", 3, "folder", captions=table, image_root=root)
    assert out.counts == (3, 1)
    members = [(key, group) for path in out.paths for _, key, group in read_members(path)]
    assert [g["txt"].decode() for _, g in members] == ["a red square", "one cat", "two cats", "blue"]
    assert members[1][1]["jpg"] == (root / "b.jpg").read_bytes() == members[2][1]["jpg"]
    assert members[0][1]["png"] == (root / "a.png").read_bytes()
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(members[3][1]["png"]))), _png(2))
    assert [json.loads(g["json"])["image_id"] for _, g in members] == [0, 1, 1, 2]
    dataset = ShardDataset(out.pattern, tok, 40, 12)
    assert dataset[1]["image_id"] == dataset[2]["image_id"] == 1  # captions of one image: ITC positives

    karpathy = tmp_path / "coco_karpathy_train.json"  # an ALBEF list: the split is its file name's
    karpathy.write_text(json.dumps([{"image": "b.jpg", "caption": ["x y", "z"]}, {"image": "a.png", "caption": "w"}]))
    out = write_source_shards(tmp_path / "karpathy", 10, "karpathy", captions=karpathy, image_root=root)
    groups = [g for _, _, g in read_members(out.paths[0])]
    assert [g["txt"].decode() for g in groups] == ["x y", "z", "w"] and groups[0]["jpg"] == (root / "b.jpg").read_bytes()
    both = ShardDataset([folder.pattern, out.pattern], tok, 40, 12)  # json image ids 0.. in each folder
    assert [both[i]["image_id"] for i in (0, 3, 4, 6)] == [0, 2, IMAGE_ID_STRIDE, IMAGE_ID_STRIDE + 1]
    with pytest.raises(ValueError, match="already holds shards"):
        write_source_shards(tmp_path / "karpathy", 10, "karpathy", captions=karpathy, image_root=root)
    table.write_text(json.dumps({"a.png": "one", "b.jpg": "two", "c.bmp": "three", "gone.png": "missing"}))
    with pytest.raises(FileNotFoundError, match=r"images/gone\.png.*entry 'gone\.png'"):
        write_source_shards(tmp_path / "bad", 3, "folder", captions=table, image_root=root)
    assert list((tmp_path / "bad").iterdir()) == []  # the shard written before the error is removed
    with pytest.raises(ConfigError, match="--captions"):
        write_source_shards(tmp_path / "bad", 3, "karpathy", image_root=root)


def test_cli_data_shard_prints_the_pattern(tmp_path, capsys):
    out = tmp_path / "cli"
    code = main(["data", "shard", "--out", str(out), "--shard-size", "4", "--limit", "9",
                 "--set", "data.train_images=2", "--set", "model.vision.image_size=32"])
    assert code == 0
    printed = capsys.readouterr().out
    assert f"data.urls: {out}/shard-{{000000..000002}}.tar" in printed
    assert [count_samples(p) for p in expand_urls(str(out / "shard-{000000..000002}.tar"))] == [4, 4, 1]
    assert main(["data", "shard", "--out", str(out)]) == 2  # refuses to write over shards
    assert "already holds shards" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ urls
def test_brace_expansion_lists_and_errors(shards):
    folder = shards.out_dir
    assert expand_urls(shards.pattern) == list(shards.paths)
    assert expand_urls([str(folder / "shard-{000003..000004}.tar"), str(folder / "shard-000000.tar")]) == \
        [shards.paths[3], shards.paths[4], shards.paths[0]]
    assert brace_pattern(folder, 13) == str(folder / "shard-{000000..000012}.tar")
    with pytest.raises(FileNotFoundError, match=r"shard-000005\.tar"):
        expand_urls(str(folder / "shard-{000000..000009}.tar"))
    with pytest.raises(ValueError, match="not a local path"):
        expand_urls("s3://bucket/shard-{000000..000001}.tar")
    with pytest.raises(ValueError, match="listed twice"):
        expand_urls([shards.pattern, str(shards.paths[2])])
    # the index is only trusted for a shard of the size it recorded; otherwise the headers are counted
    assert shard_counts(list(shards.paths)) == [7, 7, 7, 7, 2]


# ------------------------------------------------------------------------------------------ split
def test_every_sample_is_read_by_one_rank_and_worker_per_epoch(shards, tok):
    """2 ranks x 2 workers = 4 streams over 5 shards: each epoch's streams partition the 30 samples; epochs are
    reshuffled; what a stream yields is that plan (keys carry the epoch), also after skipping into it."""
    dataset = ShardDataset(shards.pattern, tok, 40, 32, seed=5, shuffle_buffer=4)
    every = sorted((shard, member) for shard, count in enumerate(shards.counts) for member in range(count))
    orders = []
    for epoch in range(3):
        plan = [dataset.epoch_members(epoch, slot, 4) for slot in range(4)]
        assert sorted(m for part in plan for m in part) == every
        orders.append(plan)
    assert orders[0] != orders[1] != orders[2]
    slot = 3
    expected = [(e, m) for e in range(3) for m in dataset.epoch_members(e, slot, 4)]
    stream = dataset.slot_stream(slot, 4)
    got = [next(stream) for _ in range(len(expected))]
    starts = [0, 7, 14, 21, 28]
    assert [(i["shard"], i["member"]) for i in got] == [m for _, m in expected]
    assert [i["row"] for i in got] == [5 * KEY_SEED_STRIDE + e * PAIRS + starts[s] + m for e, (s, m) in expected]
    skipped = dataset.slot_stream(slot, 4, skip=9)
    assert [next(skipped)["row"] for _ in range(len(expected) - 9)] == [i["row"] for i in got[9:]]
    dataset.set_epoch(1)  # plain iteration (one process, no workers): the whole of epoch 1, once
    assert [(i["shard"], i["member"]) for i in dataset] == dataset.epoch_members(1, 0, 1)
    assert sorted(dataset.epoch_members(1, 0, 1)) == every


def test_fewer_shards_than_workers(tmp_path, world, tok, caplog):
    """1 shard for 2 ranks x 2 DataLoader workers: no 'No samples found'; the shard is split into 4 interleaved
    parts, and over the first epoch every sample comes out exactly once."""
    out = write_shards(world_pairs(world, 10), tmp_path / "one", 10)
    dataset = ShardDataset(out.pattern, tok, 40, 32, shuffle_buffer=3)
    assert dataset.parts(4) == 4
    keys = []
    with caplog.at_level(logging.WARNING, logger="vlp.data.shards"):
        for rank in range(2):
            loader = DataLoader(dataset.step_stream(0, 8, 2, rank, 2, 2), batch_size=2, num_workers=2, collate_fn=collate)
            batches = list(loader)
            assert len(batches) == 8 and all(len(b) == 2 for b in batches)
            keys += [k for b in batches for k in b.sample_keys.tolist()]
    first_epoch = sorted(k for k in keys if k < 10)  # seed 0: key = epoch * 10 + position
    assert first_epoch == list(range(10))
    dataset._warned_parts = False
    with caplog.at_level(logging.WARNING, logger="vlp.data.shards"):
        next(dataset.slot_stream(0, 4))
    assert "1 shards for 4 streams" in caplog.text and "write at least 4 shards" in caplog.text


# ------------------------------------------------------------------------------------------ training
class StreamToy(nn.Module):
    """A regression on the batch's pixels and tokens with per-sample keyed noise: its losses follow the data
    order and the sample keys; `crash_at_call` simulates a kill."""

    def __init__(self, vocab: int, crash_at_call: int | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(3, 1)
        self.embed = nn.Embedding(vocab, 1)
        self.crash_at_call, self.calls, self.keys, self.image_ids = crash_at_call, 0, [], []

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        self.calls += 1
        if self.calls == self.crash_at_call:
            raise RuntimeError("simulated crash")
        self.keys.append(batch.sample_keys.tolist())
        self.image_ids.append(batch.image_ids.tolist())
        target = keyed_uniform(batch.sample_keys, (1,), salt=1)
        pred = self.lin(batch.images.mean((2, 3))) + self.embed(batch.input_ids).mean(1)
        return {"loss": (pred - target).pow(2).mean()}


def _stream_cfg(urls: str, workers: int, **train) -> RunConfig:
    base = dict(steps=9, batch_size=4, lr=1e-2, warmup_steps=1, log_every=1, ckpt_every=5, tensorboard=False,
                progress=False, device="cpu", seed=3)
    base.update(train)
    return RunConfig(train=TrainConfig(**base), data=DataConfig(source="webdataset", urls=urls, num_workers=workers))


def _losses(records: list[dict]) -> list[float]:
    return [r["loss"] for r in records if "loss" in r]


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_at_the_same_sample(shards, tok, tmp_path, workers):
    """9 steps straight == 7 steps, kill, resume from the step-5 checkpoint: identical losses and sample keys
    (the 36 samples run past the 30 of the shards: the resumed stream is in its second epoch)."""
    cfg = _stream_cfg(shards.pattern, workers)

    def dataset():
        return ShardDataset(shards.pattern, tok, 16, 32, seed=3, shuffle_buffer=4)

    straight = StreamToy(tok.vocab_size)
    records = Trainer(cfg, straight, dataset(), collate, tmp_path / "a").fit()
    crashed = StreamToy(tok.vocab_size, crash_at_call=8)
    with pytest.raises(RuntimeError, match="simulated crash"):
        Trainer(cfg, crashed, dataset(), collate, tmp_path / "b").fit()
    resumed = StreamToy(tok.vocab_size)
    rest = Trainer(cfg, resumed, dataset(), collate, tmp_path / "b").fit(resume=tmp_path / "b")
    assert _losses(rest) == _losses(records)[5:]
    assert crashed.keys[:5] + resumed.keys == straight.keys
    keys = [k for step in straight.keys for k in step]
    assert len(set(keys)) == 36 and {(k - 3 * KEY_SEED_STRIDE) // PAIRS for k in keys} == {0, 1}
    # the keys are the samples' own (position = key mod 30; world pairs: image = position // 5)
    assert [(k - 3 * KEY_SEED_STRIDE) % PAIRS // 5 for k in keys] == [i for step in straight.image_ids for i in step]
    state = read_trainer_state(tmp_path / "a")["extra"]["data"]  # a resume with other workers warns
    assert state["stream_workers"] == max(1, workers) and state["shards"] == 5 and state["shard_samples"] == PAIRS


def test_pretrain_on_shards(shards, tmp_path):
    """`vlp pretrain` with data.source: webdataset (ALBEF, tokenizer learnt on the shards' captions) runs its steps."""
    from vlp.pretrain import pretrain

    run = pretrain("albef_tiny", [
        "model.vision.image_size=32", "model.vision.depth=1", "model.text.depth=1", "model.fusion.depth=1",
        "train.steps=6", "train.batch_size=4", "train.log_every=1", "train.warmup_steps=1", "train.ckpt_every=0",
        "train.progress=false", "train.tensorboard=false", "train.device=cpu", "data.num_workers=0",
        "data.max_text_len=16", "data.tokenizer=captions", "data.vocab_size=200", "data.source=webdataset",
        f"data.urls={shards.pattern}", f"train.out_dir={tmp_path / 'run'}"])
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 6 and all(np.isfinite(losses))


def test_retrieval_finetune_reads_shards(shards, tmp_path):
    """`vlp finetune retrieval --data webdataset`: the training pairs stream from data.urls (the shards of the
    world's train pairs), scored on the world's eval split."""
    from vlp.finetune import finetune
    from vlp.pretrain import pretrain

    tiny = ["model.vision.image_size=32", "model.vision.depth=1", "model.text.depth=1", "model.fusion.depth=1",
            "train.batch_size=4", "train.log_every=1", "train.warmup_steps=1", "train.ckpt_every=0",
            "train.progress=false", "train.tensorboard=false", "train.device=cpu", "data.num_workers=0"]
    run = pretrain("albef_tiny", [*tiny, "train.steps=2", "data.max_text_len=16", "data.tokenizer=captions",
                                  "data.vocab_size=200", "data.source=webdataset", f"data.urls={shards.pattern}",
                                  f"train.out_dir={tmp_path / 'pre'}"])
    out = finetune("retrieval", checkpoint=run, overrides=[
        *tiny, "train.steps=3", "task.data=webdataset", f"data.urls={shards.pattern}", "eval.num_images=4",
        "eval.itm_all=false", f"train.out_dir={tmp_path / 'ft'}"])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert len([r for r in records if "loss" in r]) == 3
    metrics = json.loads((out / "eval.json").read_text())
    assert metrics["num_images"] == 4 and 0 <= metrics["itm/r_mean"] <= 100


def test_source_config_errors(shards, tmp_path):
    albef = method_class("albef")
    cfg = build_config({"method": {"name": "albef"}}, ["data.source=webdataset", "data.tokenizer=captions"])
    with pytest.raises(ConfigError, match="data.urls"):
        pretrain_source(cfg, albef)
    cfg = build_config({"method": {"name": "albef"}},
                       ["data.source=webdataset", f"data.urls={shards.pattern}", "data.tokenizer=world", "data.world_seed=7"])
    with pytest.raises(ConfigError, match="world_seed 1"):  # the conftest world is seed 1
        pretrain_source(cfg, albef)
    cfg = build_config({"method": {"name": "albef"}}, ["data.source=webdataset", f"data.urls={shards.pattern}",
                                                      "data.tokenizer=captions", "data.vocab_size=200",
                                                      "data.tokenizer_captions=12"])
    source = pretrain_source(cfg, albef)
    assert isinstance(source.dataset, ShardDataset) and len(source.dataset) == PAIRS and source.class_words == []
    cfg = build_config({"method": {"name": "vlmixer"}}, ["data.source=webdataset", f"data.urls={shards.pattern}"])
    with pytest.raises(ConfigError, match="holds pairs"):
        pretrain_source(cfg, method_class("vlmixer"))


# ------------------------------------------------------------------------------------------ corrupt
def _corrupt_shard(path: Path) -> None:
    """4 samples: good, undecodable png, no caption, good."""
    good = io.BytesIO()
    Image.fromarray(_png(3)).save(good, format="PNG")
    with open(path, "wb") as handle, TarWriter(handle, encoder=False) as tar:
        tar.write({"__key__": "s0", "png": good.getvalue(), "txt": b"a good one"})
        tar.write({"__key__": "s1", "png": b"not a png at all", "txt": b"broken image"})
        tar.write({"__key__": "s2", "png": good.getvalue(), "json": b'{"image_id": 4}'})
        tar.write({"__key__": "s3", "png": good.getvalue(), "txt": b"another good one"})


def test_corrupt_member_is_an_error_naming_it_or_a_counted_skip(tmp_path, tok):
    shard = tmp_path / "bad-000000.tar"
    _corrupt_shard(shard)
    strict = ShardDataset(str(shard), tok, 16, 8, shuffle_buffer=0)
    assert strict[0]["caption"] == "a good one" and strict[0]["image_id"] == NO_IMAGE_ID + 0
    with pytest.raises(DataError, match=rf"shard {shard} member s1 .*undecodable image \(\.png: .*data\.skip_bad"):
        strict[1]
    with pytest.raises(DataError, match=rf"shard {shard} member s2 .*missing caption"):
        strict[2]
    lenient = ShardDataset(str(shard), tok, 16, 8, shuffle_buffer=0, skip_bad=True)
    bad = lenient[1]
    assert isinstance(bad, BadSample) and bad.reason == "undecodable image" and bad.where == f"{shard} member s1"
    assert lenient[2].reason == "missing caption" and lenient[3]["caption"] == "another good one"

    # training counts them: 2 steps x 4 samples = 2 epochs of the shard, 2 bad each
    cfg = _stream_cfg(str(shard), 0, steps=2, ckpt_every=0)
    cfg.data.skip_bad, cfg.data.max_bad_fraction = True, 0.6
    method = StreamToy(tok.vocab_size)
    Trainer(cfg, method, lenient, collate, tmp_path / "run").fit()
    report = json.loads((tmp_path / "run" / SKIPPED_FILE).read_text())
    assert report["seen"] == 8 and report["skipped"] == 4
    assert report["by_reason"] == {"missing caption": 2, "undecodable image": 2}
    assert [len(k) for k in method.keys] == [2, 2]
    with pytest.raises(DataError, match="member s1"):  # skipping off: the first corrupt one stops training
        Trainer(_stream_cfg(str(shard), 0, steps=2, ckpt_every=0), StreamToy(tok.vocab_size), strict, collate,
                tmp_path / "strict").fit()
