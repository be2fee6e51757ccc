"""WebDataset shards: writing them (`vlp data shard`) and streaming them into training (`data.source: webdataset`).

Layout (img2dataset's): a shard is a tar file whose members are grouped by key, one sample per key:

    000000123.jpg | .png | .webp   the image (bytes of the original file, or a PNG for the world)
    000000123.txt                  its caption (UTF-8)
    000000123.json                 metadata {"key", "caption", "image_id", ...}

`write_shards` writes `shard-000000.tar`, `shard-000001.tar`, ... (`shard_size` samples each) plus a
`shards.json` index (samples per shard) from any iterable of `ShardPair`s: the embedded world's train pairs
(`world_pairs`, image-major like `PairDataset`: sample = one (image, caption) pair), a Karpathy caption file
(`karpathy_pairs`) or an image folder with a `{filename: caption | [captions]}` JSON (`folder_pairs`).

Reading (`ShardDataset`, an `IterableDataset`): `data.urls` is a brace pattern (`dir/shard-{000000..000012}.tar`,
expanded as webdataset does) or a list of them; local paths only. Tar members are read with webdataset's
`tar_file_iterator` (webdataset==1.0.2).

Order (deterministic, so a resumed run continues at the same sample; cf. `vlp.train.sampler`): the stream is
read by S = world_size x max(1, data.num_workers) streams ("slots": one per (rank, DataLoader worker)). Each
shard is cut into g = ceil(S / num_shards) interleaved *units* (unit (j, q) = samples i of shard j with
i % g == q; g = 1, whole shards, whenever there are at least S shards). Epoch e permutes the units with a
generator seeded by (train.seed, e) and slot s takes units s, s + S, s + 2S, ... of that permutation, so every
sample is read by exactly one slot per epoch. A slot's stream is its units of epoch 0, then of epoch 1, ...
(resampling: a run longer than the data reshuffles every epoch). Within a unit, samples come in the order of
a shuffle buffer of `data.shuffle_buffer` (seeded by (seed, epoch, shard, part)), computed on sample indices
alone (`buffer_order`), so skipping the first k samples of a unit reads no image bytes of the skipped ones,
and whole units are skipped from the per-shard counts without opening them.

Step mapping (the Trainer): step k of rank r is one batch of B/W samples from worker k mod n (n = max(1,
num_workers); the DataLoader takes batches from its workers round-robin), i.e. from slot r * n + k mod n. A
run resumed at step k0 gives DataLoader worker w the role k0 + w mod n and skips the samples that role's slot
produced before k0, so the loss sequence of a stopped-and-resumed run equals the uninterrupted one. The
layout (world size, num_workers) must stay the same across a resume (the checkpoint records it).

Sample keys (`Batch.sample_keys`, methods seed their masking from them): `seed * KEY_SEED_STRIDE + epoch * N
+ start(j) + i` for member i of shard j (start(j) = samples in the shards before j, N = all samples), unique
per (seed, epoch, sample) as the map-style sampler's keys are. `image_id`: the json's "image_id" (an int < 2**32:
captions of one image are ITC positives) + k * IMAGE_ID_STRIDE for shards in the k-th folder of data.urls (ids
of two shard sets never meet), else `NO_IMAGE_ID + start(j) + i` (every sample its own image).

Shards carry pixels and captions only (like data.source: karpathy): no region boxes, so a region method
(CMAL) uses grid cells.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import math
import os
import random
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.shardlists import expand_urls as wds_expand_urls
from webdataset.tariterators import base_plus_ext, tar_file_iterator
from webdataset.writer import TarWriter

from vlp.config import ConfigError, RunConfig, load_config
from vlp.data.datasets import collate
from vlp.data.formats.karpathy import read_karpathy
from vlp.data.regions import PretrainSource, read_class_vocab, train_caption_tokenizer
from vlp.data.skips import BadSample, DataError, skip_or_raise
from vlp.data.tokenizer import TextTokenizer
from vlp.data.transforms import image_to_tensor
from vlp.data.world import World
from vlp.seeds import KEY_SEED_STRIDE, epoch_seed

logger = logging.getLogger("vlp.data.shards")

SHARD_NAME = "shard-{:06d}.tar"
INDEX_FILE = "shards.json"  # written beside the shards: samples and bytes per shard (no header scan needed)
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
IMAGE_ID_STRIDE = 1 << 32  # json image ids (< 2**32) of the shards of the k-th folder of data.urls: + k * stride
NO_IMAGE_ID = 1 << 56  # image ids of samples whose json names none start here (never meet a json id)
_META = re.compile(r"__[^/]*__($|/)")  # webdataset's skipped metadata members


# ------------------------------------------------------------------------------------------ urls
def expand_urls(urls: str | Sequence[str]) -> list[Path]:
    """`data.urls` (a brace pattern such as `dir/shard-{000000..000012}.tar`, or a list of patterns) -> the
    shard paths in order. FileNotFoundError naming the first missing shard and its pattern; ValueError for
    no shard at all, a duplicate, or a remote URL (only local paths are read)."""
    patterns = [urls] if isinstance(urls, str) else list(urls)
    if not patterns:
        raise ValueError("data.urls is empty: give a shard pattern such as 'shards/shard-{000000..000012}.tar'")
    paths: list[Path] = []
    seen: set[Path] = set()
    for pattern in patterns:
        if not isinstance(pattern, str) or not pattern.strip():
            raise ValueError(f"data.urls holds {pattern!r}: every entry must be a shard path or brace pattern")
        if re.match(r"^[a-z][a-z0-9+.-]*://", pattern) or pattern.startswith("pipe:"):
            raise ValueError(f"data.urls entry {pattern!r} is not a local path: vlp reads local shards only "
                             f"(copy them to disk first)")
        for expanded in wds_expand_urls(pattern):  # webdataset's: braces, `a::b` lists, $WDS_ variables
            path = Path(expanded)
            if not path.is_file():
                raise FileNotFoundError(f"shard not found: {path} (from data.urls pattern {pattern!r}); check the "
                                        f"pattern's range against the shards `vlp data shard` wrote")
            if path.resolve() in seen:
                raise ValueError(f"shard {path} is listed twice by data.urls {patterns!r}: it would be read twice "
                                 f"per epoch")
            seen.add(path.resolve())
            paths.append(path)
    return paths


def brace_pattern(out_dir: str | Path, count: int) -> str:
    """The data.urls pattern of `count` shards written by `write_shards` into `out_dir`."""
    if count < 1:
        raise ValueError(f"no shard to name (count {count})")
    return str(Path(out_dir) / f"shard-{{{0:06d}..{count - 1:06d}}}.tar")


# ------------------------------------------------------------------------------------------ writing
@dataclass(frozen=True)
class ShardPair:
    """One sample to write: encoded image bytes, their extension (jpg | png | webp), the caption and extra
    json metadata (e.g. image_id)."""

    image: bytes
    ext: str
    caption: str
    meta: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ShardSummary:
    """What `write_shards` wrote: the shard paths, the samples in each and the data.urls pattern."""

    out_dir: Path
    paths: tuple[Path, ...]
    counts: tuple[int, ...]

    @property
    def samples(self) -> int:
        return sum(self.counts)

    @property
    def pattern(self) -> str:
        return brace_pattern(self.out_dir, len(self.paths))

    def summary(self) -> str:
        return (f"wrote {self.samples} samples in {len(self.paths)} shards to {self.out_dir}\n"
                f"data.urls: {self.pattern}\n"
                f"train on them: --set data.source=webdataset --set 'data.urls={self.pattern}'")


def write_shards(pairs: Iterable[ShardPair], out_dir: str | Path, shard_size: int = 1000,
                 source: str = "") -> ShardSummary:
    """Write `pairs` as `out_dir/shard-000000.tar`, ... of `shard_size` samples each (the last may be
    shorter) and the index `shards.json`. Keys are the global sample number, 9 digits (`000000123`); the
    json holds {"key", "caption", **meta}. Shards are written to `.tmp` names and renamed when complete, and
    a tar's member times are 0, so the same pairs give the same bytes.

    ValueError when `out_dir` already holds shards (a shorter rewrite would leave stale ones behind a pattern),
    for shard_size < 1 or when `pairs` is empty. An error while writing (a bad source entry) removes the shards
    this call wrote, so the fixed command can be run again."""
    if isinstance(shard_size, bool) or int(shard_size) < 1:
        raise ValueError(f"--shard-size must be a positive number of samples per shard, got {shard_size}")
    out = Path(out_dir)
    if out.is_dir() and any(out.glob("shard-*.tar")):
        raise ValueError(f"{out} already holds shards (shard-*.tar): write into an empty folder or delete them first")
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    counts: list[int] = []
    handle = writer = None

    def finish() -> None:
        writer.close()
        handle.close()
        os.replace(paths[-1].with_name(paths[-1].name + ".tmp"), paths[-1])

    try:
        for number, pair in enumerate(pairs):
            if number % shard_size == 0:
                if writer is not None:
                    finish()
                paths.append(out / SHARD_NAME.format(len(paths)))
                counts.append(0)
                handle = open(paths[-1].with_name(paths[-1].name + ".tmp"), "wb")
                writer = TarWriter(handle, encoder=False, mtime=0)  # an int: a float mtime adds a pax header per member
            ext = pair.ext.lower().replace("jpeg", "jpg")
            if ext not in IMAGE_EXTENSIONS:
                raise ValueError(f"sample {number}: image extension {pair.ext!r} is not one of {IMAGE_EXTENSIONS}")
            key = f"{number:09d}"
            meta = {"key": key, "caption": pair.caption, **pair.meta}
            writer.write({"__key__": key, ext: pair.image, "txt": pair.caption.encode("utf-8"),
                          "json": json.dumps(meta, sort_keys=True).encode("utf-8")})
            counts[-1] += 1
        if writer is not None:
            finish()
    except BaseException:  # a bad source entry: leave no partial shard set behind (the folder held none)
        if writer is not None and not handle.closed:
            writer.close()
            handle.close()
        for path in paths:
            path.unlink(missing_ok=True)
            path.with_name(path.name + ".tmp").unlink(missing_ok=True)
        raise
    if not paths:
        raise ValueError(f"nothing to write into {out}: the source holds no (image, caption) pair")
    index = {"format": "vlp-shards/1", "source": source, "samples": sum(counts), "pattern": brace_pattern(out, len(paths)),
             "shards": {p.name: {"samples": c, "bytes": p.stat().st_size} for p, c in zip(paths, counts)}}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=1) + "\n")
    return ShardSummary(out, tuple(paths), tuple(counts))


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def world_pairs(world: World, pairs: Optional[int] = None, captions_per_image: int = 5) -> Iterator[ShardPair]:
    """The first `pairs` (image, caption) rows of the world's train split, image-major (row r = image
    r // 5, caption r % 5: `PairDataset`'s rows, so a budget is a prefix); None = the whole split. Each image
    is rendered once and written as PNG (lossless) beside each of its captions."""
    split = world.split("train")
    total = len(split) * captions_per_image
    count = total if pairs is None else int(pairs)
    if not 1 <= count <= total:
        raise ValueError(f"{count} pairs requested but the world's train split has {len(split)} images x "
                         f"{captions_per_image} captions = {total}; lower --limit or raise data.train_images")
    for image_index in range(math.ceil(count / captions_per_image)):
        sample = split[image_index]
        image = _png(sample.image)
        for caption_index in range(min(captions_per_image, count - image_index * captions_per_image)):
            yield ShardPair(image, "png", sample.captions[caption_index],
                            {"image_id": image_index, "caption_index": caption_index, "split": "train",
                             "world_seed": world.seed, "scene_id": int(sample.scene_id)})


def _image_file(path: Path, where: str) -> tuple[bytes, str]:
    """The bytes and extension of an image file to store: jpg / png / webp as they are (checked to open),
    other formats re-encoded as PNG. Errors name the file and `where` it was listed."""
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path} ({where}); fix the image root or remove the entry")
    ext = path.suffix.lower().lstrip(".").replace("jpeg", "jpg")
    try:
        with Image.open(path) as img:
            if ext in IMAGE_EXTENSIONS:
                img.verify()
                return path.read_bytes(), ext
            img.load()
            buffer = io.BytesIO()
            img.convert("RGB").save(buffer, format="PNG")
            return buffer.getvalue(), "png"
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ValueError(f"cannot decode image {path} ({where}): {exc}; re-export it or remove the entry") from exc


def karpathy_pairs(captions: str | Path, image_root: str | Path, split: str = "train") -> Iterator[ShardPair]:
    """(image, caption) pairs of one split of a Karpathy caption file (`vlp.data.formats.karpathy`: Karpathy's
    dataset_*.json, or an ALBEF/BLIP list, whose split is its file name's), image-major, images under
    `image_root` stored as they are. json: image_id (the image's index), image (its path), caption_index."""
    data = read_karpathy(captions, image_root, split=None)
    if split not in data.splits:
        raise ValueError(f"{captions} has no {split!r} split (has: {', '.join(sorted(data.splits))}); pick one with --split")
    for image_index, record in enumerate(data.splits[split]):
        image, ext = _image_file(Path(image_root) / record.image_id, f"{captions}, image {record.image_id}")
        for caption_index, caption in enumerate(record.captions):
            yield ShardPair(image, ext, caption,
                            {"image_id": image_index, "image": record.image_id, "caption_index": caption_index})


def folder_pairs(image_root: str | Path, captions: str | Path) -> Iterator[ShardPair]:
    """(image, caption) pairs of an image folder and a captions JSON `{filename: caption | [captions]}`
    (filenames relative to `image_root`), in the JSON's order. Errors name the file and the entry."""
    file = Path(captions)
    if not file.is_file():
        raise FileNotFoundError(f"captions file not found: {file}; expected JSON {{filename: caption or [captions]}}")
    try:
        table = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{file} is not valid JSON ({exc}); expected {{filename: caption or [captions]}}") from exc
    if not isinstance(table, dict) or not table:
        raise ValueError(f"{file} must be a non-empty JSON object {{filename: caption or [captions]}}, "
                         f"got {type(table).__name__}")
    for image_index, (name, value) in enumerate(table.items()):
        texts = [value] if isinstance(value, str) else value
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t.strip() for t in texts):
            raise ValueError(f"{file} entry {name!r}: the caption must be a non-empty string or a list of them, "
                             f"got {value!r:.100}")
        image, ext = _image_file(Path(image_root) / name, f"{file} entry {name!r}")
        for caption_index, caption in enumerate(texts):
            yield ShardPair(image, ext, caption, {"image_id": image_index, "image": name, "caption_index": caption_index})


def write_source_shards(out_dir: str | Path, shard_size: int = 1000, source: str = "world",
                        config: str | Path | None = None, overrides: Optional[list[str]] = None,
                        limit: Optional[int] = None, captions: str | Path | None = None,
                        image_root: str | Path | None = None, split: str = "train") -> ShardSummary:
    """`vlp data shard`: write the shards of one source into `out_dir`.

    world:    the first `limit` (image, caption) pairs of the train split of the world of `config` (+ `overrides`;
              data.world_seed, data.train_images, model.vision.image_size; default: the defaults); `limit` None =
              the config's data.budget, 0 = the whole split.
    karpathy: `captions` (a Karpathy / ALBEF caption file) + `image_root`, split `split`.
    folder:   `image_root` + `captions` (JSON {filename: caption or [captions]}).
    ConfigError naming the missing option."""
    if source == "world":
        cfg = load_config(config, overrides)
        world = World(seed=cfg.data.world_seed, image_size=cfg.model.vision.image_size,
                      sizes={"train": cfg.data.train_images})
        if limit is not None and limit < 0:
            raise ConfigError(f"--limit must be >= 0 pairs (0 = the whole train split), got {limit}")
        pairs = cfg.data.budget if limit is None else (limit or None)
        return write_shards(world_pairs(world, pairs), out_dir, shard_size, source=f"world seed {cfg.data.world_seed}")
    if source not in ("karpathy", "folder"):
        raise ConfigError(f"unknown shard source {source!r}: world, karpathy or folder")
    missing = [flag for flag, value in (("--captions", captions), ("--image-root", image_root)) if value is None]
    if missing:
        raise ConfigError(f"--from {source} needs {' and '.join(missing)} (" + (
            "the Karpathy caption file and the folder its image paths are relative to)" if source == "karpathy" else
            "the image folder and a JSON {filename: caption or [captions]})"))
    pairs_of = karpathy_pairs(captions, image_root, split) if source == "karpathy" else folder_pairs(image_root, captions)
    return write_shards(pairs_of, out_dir, shard_size, source=f"{source} {captions}")


# ------------------------------------------------------------------------------------------ reading
def _member_key(name: str) -> Optional[tuple[str, str]]:
    """(sample key, lower-case extension) of a tar member as webdataset groups it; None for members it skips
    (metadata `__*__`, names without an extension)."""
    if _META.match(name) or ("/" not in name and name.startswith("__") and name.endswith("__")):
        return None
    prefix, suffix = base_plus_ext(name)
    return None if prefix is None else (prefix, suffix.lower())


def _shard_error(path: Path, exc: BaseException) -> ValueError:
    return ValueError(f"shard {path} is not a readable tar file ({exc}); rewrite it (vlp data shard) or drop it "
                      f"from data.urls")


def count_samples(path: Path) -> int:
    """Samples (key groups) in a shard, from its tar headers alone (member data is seeked over)."""
    count, last = 0, None
    try:
        with tarfile.open(path, mode="r:*") as tar:  # compressed shards too (read through, not seeked)
            for member in tar:
                key = _member_key(member.name) if member.isreg() else None
                if key is not None and key[0] != last:
                    count, last = count + 1, key[0]
    except (tarfile.TarError, OSError) as exc:
        raise _shard_error(path, exc) from exc
    return count


def shard_counts(paths: Sequence[Path]) -> list[int]:
    """Samples per shard: from the `shards.json` index beside a shard when it lists it with the shard's
    current size, else counted from the tar headers."""
    indexes: dict[Path, dict] = {}
    counts = []
    for path in paths:
        if path.parent not in indexes:
            index_file = path.parent / INDEX_FILE
            try:
                indexes[path.parent] = json.loads(index_file.read_text()).get("shards", {}) if index_file.is_file() else {}
            except (ValueError, OSError, AttributeError):
                indexes[path.parent] = {}
        entry = indexes[path.parent].get(path.name)
        if isinstance(entry, dict) and entry.get("bytes") == path.stat().st_size and isinstance(entry.get("samples"), int):
            counts.append(int(entry["samples"]))
        else:
            counts.append(count_samples(path))
    return counts


def read_members(path: Path, keep: Callable[[int], bool] = lambda i: True,
                 extensions: Optional[set[str]] = None) -> Iterator[tuple[int, str, dict[str, bytes]]]:
    """(sample index, key, {extension: bytes}) of the samples of a shard whose index passes `keep`, in tar order,
    read with webdataset's `tar_file_iterator`: members of other samples (and extensions outside
    `extensions`) are not read into memory."""
    state = {"index": -1, "last": None, "kept": False}

    def select(name: str) -> bool:
        key = _member_key(name)
        if key is None:
            return False
        if key[0] != state["last"]:
            state["index"] += 1
            state["last"] = key[0]
            state["kept"] = keep(state["index"])
        return state["kept"] and (extensions is None or key[1] in extensions)

    group: dict[str, bytes] = {}
    group_index, group_key = -1, ""
    try:
        with open(path, "rb") as handle:
            for member in tar_file_iterator(handle, select_files=select):
                if state["index"] != group_index:
                    if group_index >= 0:
                        yield group_index, group_key, group
                    group, group_index, group_key = {}, state["index"], state["last"]
                ext = _member_key(member["fname"])[1]
                if ext in group:
                    raise ValueError(f"shard {path}: sample {group_index} ({state['last']}) has two .{ext} members; "
                                     f"keys must be unique within a shard")
                group[ext] = member["data"]
    except (tarfile.TarError, OSError) as exc:
        raise _shard_error(path, exc) from exc
    if group_index >= 0:
        yield group_index, group_key, group


def buffer_order(count: int, buffer: int, rng: random.Random) -> list[int]:
    """The order a shuffle buffer of `buffer` entries emits items 0..count-1 in (webdataset's shuffle: fill
    the buffer, then each new item replaces a random entry, which is emitted; the rest are shuffled at the
    end). Computed on indices alone, so a reader can skip emitted items without reading them; at any time at
    most `buffer` read items wait to be emitted. buffer <= 1: the identity."""
    if buffer <= 1 or count <= 1:
        return list(range(count))
    order: list[int] = []
    pool: list[int] = []
    for index in range(count):
        if len(pool) < buffer:
            pool.append(index)
            continue
        slot = rng.randrange(buffer)
        order.append(pool[slot])
        pool[slot] = index
    rng.shuffle(pool)
    return order + pool


def _unit_rng(seed: int, epoch: int, shard: int, part: int) -> random.Random:
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFFFFFFFFFF, int(epoch), int(shard), int(part)]).generate_state(2)
    return random.Random((int(state[0]) << 32) | int(state[1]))


def _congruent_below(limit: int, residue: int, modulus: int) -> int:
    """#{j in [0, limit): j % modulus == residue} for 0 <= residue < modulus, limit >= 0."""
    return (limit - residue + modulus - 1) // modulus if limit > residue else 0


class ShardDataset(IterableDataset):
    """Pre-training pairs streamed from WebDataset shards (module docstring for order, keys and resume).

    Args:
        urls: `data.urls` (brace pattern(s) of local tar files).
        tokenizer, max_len, max_words: captions are tokenised as `PairDataset` does.
        image_size: images are resized to image_size x image_size (bicubic; `image_to_tensor`).
        seed: train.seed (epoch order, shuffle buffers, sample keys).
        shuffle_buffer: data.shuffle_buffer (0 or 1 = shard order within a unit).
        skip_bad: a corrupt sample (undecodable image, missing image or caption, unreadable json) is a
            `vlp.data.skips.BadSample` item instead of a `DataError` naming the shard and the member.

    Item (collated by `vlp.data.datasets.collate`): image (3, S, S) float32, caption str, input_ids (T,) long,
    pad_id int, image_id int, row int (the sample key), shard int, member int.

    `len()` is the samples of one epoch. `dataset[i]` reads sample i in shard order (epoch 0 key), for
    inspection and `distinct_images`. Iterating the dataset yields this process's share of epoch
    `set_epoch(e)` (rank from torch.distributed, DataLoader worker); the Trainer uses `step_stream` instead.
    """

    def __init__(self, urls: str | Sequence[str], tokenizer: TextTokenizer, max_len: int, image_size: int,
                 seed: int = 0, shuffle_buffer: int = 1000, max_words: int = 30, skip_bad: bool = False) -> None:
        if max_len < 2:
            raise ValueError(f"max_len must be >= 2 to hold [CLS] and [SEP], got {max_len}")
        self.paths = expand_urls(urls)
        self.counts = shard_counts(self.paths)
        self.starts = [0, *itertools.accumulate(self.counts)][:-1]
        self.total = sum(self.counts)
        folders = list(dict.fromkeys(path.parent.resolve() for path in self.paths))
        self.folder_of = [folders.index(path.parent.resolve()) for path in self.paths]  # shard -> folder index
        if self.total == 0:
            raise ValueError(f"the shards of data.urls {urls!r} hold no sample (tar files without key.ext members)")
        self.tokenizer, self.max_len, self.max_words = tokenizer, max_len, max_words
        self.image_size, self.seed = image_size, int(seed)
        self.shuffle_buffer, self.skip_bad = int(shuffle_buffer), bool(skip_bad)
        self.epoch = 0
        self._cursor: Optional[tuple[int, int, Iterator]] = None  # (shard, next member, reader) for dataset[i]
        self._warned_parts = False

    # ---------------------------------------------------------------- layout
    def __len__(self) -> int:
        return self.total

    def parts(self, streams: int) -> int:
        """g: units per shard for `streams` readers (1 when there are at least as many shards)."""
        return max(1, math.ceil(streams / len(self.paths)))

    def unit_size(self, shard: int, part: int, parts: int) -> int:
        """Samples of unit (shard, part) when shards are cut into `parts` interleaved units."""
        return _congruent_below(self.counts[shard], part, parts)

    def slot_units(self, epoch: int, slot: int, streams: int) -> list[tuple[int, int]]:
        """The (shard, part) units stream `slot` of `streams` reads in `epoch`, in order."""
        parts = self.parts(streams)
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
        permutation = torch.randperm(len(self.paths) * parts, generator=generator)[slot::streams].tolist()
        return [divmod(unit, parts) for unit in permutation]

    def epoch_members(self, epoch: int, slot: int, streams: int) -> list[tuple[int, int]]:
        """(shard, member) of every sample stream `slot` yields in `epoch`, in order, without reading a shard."""
        parts = self.parts(streams)
        out = []
        for shard, part in self.slot_units(epoch, slot, streams):
            size = self.unit_size(shard, part, parts)
            order = buffer_order(size, self.shuffle_buffer, _unit_rng(self.seed, epoch, shard, part))
            out.extend((shard, part + position * parts) for position in order)
        return out

    def stream_state(self, num_workers: int) -> dict:
        """What fixes the stream besides train.seed and the batch (stored in checkpoints, compared on resume)."""
        return {"stream_workers": max(1, int(num_workers)), "shards": len(self.paths), "shard_samples": self.total,
                "shuffle_buffer": self.shuffle_buffer}

    # ---------------------------------------------------------------- items
    def _bad(self, reason: str, shard: int, member: int, key: str, detail: str) -> BadSample:
        """A corrupt sample: `DataError` naming the shard and member, or with skip_bad its `BadSample`
        (`vlp.data.skips`: the trainer drops and counts it, up to data.max_bad_fraction)."""
        where = f"{self.paths[shard]} member {key}"
        message = (f"shard {where} (sample {member} of the shard): {reason} ({detail}); rewrite the shard without it, "
                   f"or count and skip such samples with data.skip_bad=true (--skip-bad)")
        return skip_or_raise(DataError(BadSample(reason, where, message)), self.skip_bad)

    def decode(self, shard: int, member: int, key: str, group: dict[str, bytes], epoch: int) -> Any:
        """The item of sample `member` (tar key `key`, raw {extension: bytes}) of shard `shard` in `epoch`."""
        position = self.starts[shard] + member
        meta: dict = {}
        if "json" in group:
            try:
                meta = json.loads(group["json"].decode("utf-8"))
                if not isinstance(meta, dict):
                    raise ValueError(f"a JSON {type(meta).__name__}, not an object")
            except (ValueError, UnicodeDecodeError) as exc:
                return self._bad("unreadable metadata", shard, member, key, f".json: {exc}")
        caption = None
        if "txt" in group:
            try:
                caption = group["txt"].decode("utf-8").strip()
            except UnicodeDecodeError as exc:
                return self._bad("unreadable caption", shard, member, key, f".txt is not UTF-8: {exc}")
        elif isinstance(meta.get("caption"), str):
            caption = meta["caption"].strip()
        if not caption:
            return self._bad("missing caption", shard, member, key, f"members: {sorted(group) or 'none'}; need a "
                             f"non-empty .txt or a json 'caption'")
        ext = next((e for e in IMAGE_EXTENSIONS if e in group), None)
        if ext is None:
            return self._bad("missing image", shard, member, key, f"members: {sorted(group)}; need one of "
                             f"{', '.join('.' + e for e in IMAGE_EXTENSIONS)}")
        try:
            with Image.open(io.BytesIO(group[ext])) as img:
                img.load()
                rgb = img.convert("RGB")
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
            return self._bad("undecodable image", shard, member, key, f".{ext}: {exc}")
        image_id = meta.get("image_id")
        if isinstance(image_id, bool) or not isinstance(image_id, int) or not 0 <= image_id < IMAGE_ID_STRIDE:
            image_id = NO_IMAGE_ID + position
        else:
            image_id += self.folder_of[shard] * IMAGE_ID_STRIDE
        input_ids, _ = self.tokenizer.encode([caption], self.max_len, max_words=self.max_words)
        return {"image": image_to_tensor(rgb, self.image_size), "caption": caption, "input_ids": input_ids[0],
                "pad_id": self.tokenizer.pad_id, "image_id": image_id,
                "row": self.seed * KEY_SEED_STRIDE + epoch * self.total + position, "shard": shard, "member": member}

    def read_unit(self, shard: int, part: int, parts: int, epoch: int, skip: int = 0) -> Iterator[Any]:
        """The items of unit (shard, part) in `epoch` after its first `skip` (whose images are not read)."""
        size = self.unit_size(shard, part, parts)
        order = buffer_order(size, self.shuffle_buffer, _unit_rng(self.seed, epoch, shard, part))
        wanted = [part + position * parts for position in order[skip:]]
        if not wanted:
            return
        needed = set(wanted)
        pending: dict[int, tuple[str, dict[str, bytes]]] = {}
        emitted = 0
        for member, key, group in read_members(self.paths[shard], needed.__contains__):
            pending[member] = key, group
            while emitted < len(wanted) and wanted[emitted] in pending:
                member_out = wanted[emitted]
                yield self.decode(shard, member_out, *pending.pop(member_out), epoch)
                emitted += 1
            if emitted == len(wanted):
                return
        raise ValueError(f"shard {self.paths[shard]} ended after fewer samples than its count "
                         f"({self.counts[shard]}): it changed since it was indexed; rewrite shards.json or the shard")

    def slot_stream(self, slot: int, streams: int, skip: int = 0) -> Iterator[Any]:
        """The endless stream of items of `slot` (epoch 0, 1, ...) after its first `skip` samples: whole units
        are skipped from their counts, the rest within a unit without reading skipped images."""
        parts = self.parts(streams)
        if parts > 1 and not self._warned_parts:
            self._warned_parts = True
            logger.warning("%d shards for %d streams (ranks x data workers): each shard is read by %d streams, each "
                           "keeping every %d-th sample; write at least %d shards to read every shard once",
                           len(self.paths), streams, parts, parts, streams)
        epoch, empty_epochs = 0, 0
        while True:
            produced = 0
            for shard, part in self.slot_units(epoch, slot, streams):
                size = self.unit_size(shard, part, parts)
                produced += size
                if skip >= size:
                    skip -= size
                    continue
                yield from self.read_unit(shard, part, parts, epoch, skip)
                skip = 0
            empty_epochs = 0 if produced else empty_epochs + 1
            if empty_epochs >= 1000:
                raise ValueError(f"stream {slot} of {streams} got no sample in 1000 epochs: the shards hold "
                                 f"{self.total} samples in {len(self.paths)} shards; write more samples or use fewer "
                                 f"data workers")
            epoch += 1

    def step_stream(self, start_step: int, end_step: int, per_rank: int, rank: int, world_size: int,
                    num_workers: int) -> IterableDataset:
        """The iterable the Trainer's DataLoader reads steps [start_step, end_step) of `rank` from (batches of
        `per_rank` items, `num_workers` workers; module docstring "Step mapping")."""
        return StepStream(self, start_step, end_step, per_rank, rank, world_size, num_workers)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        workers, worker = (1, 0) if info is None else (info.num_workers, info.id)
        dist = torch.distributed.is_available() and torch.distributed.is_initialized()
        rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if dist else (0, 1)
        streams = world * workers
        parts = self.parts(streams)
        for shard, part in self.slot_units(self.epoch, rank * workers + worker, streams):
            yield from self.read_unit(shard, part, parts, self.epoch)

    def __getitem__(self, index: int) -> Any:
        if index < 0:
            index += self.total
        if not 0 <= index < self.total:
            raise IndexError(f"sample {index} out of range for {self.total} shard samples")
        shard = int(np.searchsorted(np.asarray(self.starts), index, side="right")) - 1
        member = index - self.starts[shard]
        if self._cursor is None or self._cursor[0] != shard or self._cursor[1] > member:
            self._cursor = (shard, 0, read_members(self.paths[shard]))
        reader = self._cursor[2]
        for got, key, group in reader:
            if got == member:
                self._cursor = (shard, got + 1, reader)
                return self.decode(shard, member, key, group, 0)
        raise ValueError(f"shard {self.paths[shard]} holds fewer samples than its count ({self.counts[shard]})")

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_cursor": None}  # an open reader does not travel to DataLoader workers


class StepStream(IterableDataset):
    """Rank `rank`'s items for steps [start_step, end_step), `per_rank` per step, for a DataLoader with
    `num_workers` workers and batch_size `per_rank` (round-robin over workers: step k comes from worker
    (k - start_step) mod n, which plays slot rank * n + k mod n)."""

    def __init__(self, dataset: ShardDataset, start_step: int, end_step: int, per_rank: int, rank: int,
                 world_size: int, num_workers: int) -> None:
        self.dataset, self.start_step, self.end_step = dataset, int(start_step), int(end_step)
        self.per_rank, self.rank, self.world_size = int(per_rank), int(rank), int(world_size)
        self.workers = max(1, int(num_workers))

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        worker = 0 if info is None else info.id
        if info is not None and info.num_workers != self.workers:
            raise RuntimeError(f"StepStream built for {self.workers} workers runs in a DataLoader of {info.num_workers}")
        role = (worker + self.start_step) % self.workers
        before = _congruent_below(self.start_step, role, self.workers)
        steps = _congruent_below(self.end_step, role, self.workers) - before
        stream = self.dataset.slot_stream(self.rank * self.workers + role, self.world_size * self.workers,
                                          skip=before * self.per_rank)
        return itertools.islice(stream, steps * self.per_rank)


# ------------------------------------------------------------------------------------------ source
def shard_captions(paths: Sequence[Path], count: int) -> list[str]:
    """The first `count` captions of the shards in data.urls order (.txt, else the json's "caption"; samples
    without one are passed over), reading no image."""
    texts: list[str] = []
    for path in paths:
        for _, _, group in read_members(path, extensions={"txt", "json"}):
            caption = None
            try:
                if "txt" in group:
                    caption = group["txt"].decode("utf-8")
                elif "json" in group:
                    caption = json.loads(group["json"].decode("utf-8")).get("caption")
            except (ValueError, UnicodeDecodeError, AttributeError):
                caption = None
            if isinstance(caption, str) and caption.strip():
                texts.append(caption.strip())
                if len(texts) >= count:
                    return texts
    return texts


def _first_meta(path: Path) -> dict:
    for _, _, group in read_members(path, keep=lambda i: i == 0, extensions={"json"}):
        try:
            meta = json.loads(group.get("json", b"{}").decode("utf-8"))
            return meta if isinstance(meta, dict) else {}
        except (ValueError, UnicodeDecodeError):
            return {}
    return {}


def shard_tokenizer(cfg: RunConfig, paths: Sequence[Path], class_words: Sequence[Sequence[str]]) -> TextTokenizer:
    """The tokenizer of a shard run (`data.tokenizer`):
      bert     the packaged BERT uncased vocabulary;
      captions WordPiece of data.vocab_size learnt on the first data.tokenizer_captions captions of the shards
               (data.urls order; class words forced whole): a pure function of the shards, the same on every rank
               and on resume;
      world    the embedded world's tokenizer (as data.source: world), only for shards written from the world
               with the run's data.world_seed (their json says so), else a ConfigError."""
    d = cfg.data
    if d.tokenizer == "bert":
        return TextTokenizer.bert_uncased()
    if d.tokenizer == "world":
        meta = _first_meta(paths[0])
        if meta.get("world_seed") != d.world_seed:
            found = "were not written from the embedded world" if "world_seed" not in meta else \
                f"were written from world_seed {meta['world_seed']}"
            raise ConfigError(f"data.tokenizer: world is the embedded world's vocabulary (world_seed {d.world_seed}), but "
                              f"the shards ({paths[0]}) {found}; set data.tokenizer: captions (WordPiece learnt on the "
                              f"shards' captions) or bert")
        world = World(seed=d.world_seed, image_size=cfg.model.vision.image_size, sizes={"train": d.train_images})
        return TextTokenizer.train_on_world(world, vocab_size=d.vocab_size)
    texts = shard_captions(paths, d.tokenizer_captions)
    if not texts:
        raise ConfigError(f"the shards of data.urls ({paths[0]}, ...) hold no caption (.txt or json 'caption') to "
                          f"learn data.tokenizer: captions from")
    return train_caption_tokenizer(texts, d.vocab_size, class_words)


def _require_urls(cfg: RunConfig) -> None:
    if not cfg.data.urls:
        raise ConfigError("data.source: webdataset needs data.urls: the shard pattern `vlp data shard` printed, e.g. "
                          "--set 'data.urls=shards/shard-{000000..000012}.tar' (a list of patterns is fine too)")


def open_shard_dataset(cfg: RunConfig, tokenizer: TextTokenizer) -> ShardDataset:
    """The `ShardDataset` of `data.urls` with the run's tokenizer, image size, seed and data options (also the
    train set of retrieval fine-tuning on shards). ConfigError when data.urls is not set."""
    d = cfg.data
    _require_urls(cfg)
    return ShardDataset(d.urls, tokenizer, d.max_text_len, cfg.model.vision.image_size, seed=cfg.train.seed,
                        shuffle_buffer=d.shuffle_buffer, max_words=d.max_text_len,
                        skip_bad=d.skip_bad)


def open_shard_source(cfg: RunConfig) -> PretrainSource:
    """The pre-training data of `data.source: webdataset`: tokenizer (`shard_tokenizer`), the `ShardDataset`,
    `collate` and the class words of data.class_vocab (none without it). data.budget does not apply: the
    shards are the data (write fewer to train on fewer)."""
    d = cfg.data
    if d.source != "webdataset":
        raise ConfigError(f"open_shard_source reads data.source: webdataset, got {d.source!r}")
    _require_urls(cfg)
    class_words = read_class_vocab(d.class_vocab) if d.class_vocab is not None else []
    tokenizer = shard_tokenizer(cfg, expand_urls(d.urls), class_words)
    return PretrainSource(tokenizer, open_shard_dataset(cfg, tokenizer), collate, class_words)


__all__ = [
    "ShardDataset",
    "ShardPair",
    "ShardSummary",
    "StepStream",
    "brace_pattern",
    "buffer_order",
    "count_samples",
    "expand_urls",
    "folder_pairs",
    "karpathy_pairs",
    "open_shard_dataset",
    "open_shard_source",
    "read_members",
    "shard_counts",
    "shard_tokenizer",
    "world_pairs",
    "write_shards",
    "write_source_shards",
]
