"""Unpaired pre-training data (VLMixer, simla_vlmixer.md §2): an image-only stream and a text-only stream.

Unpaired VLP never sees an image with its own caption. A row of these datasets therefore carries ONE image
of the image stream and ONE sentence of the text stream that are **unrelated**: they come from different
scenes (the world) or different files (user data). A method reads them as two independent batches that
happen to be collated together (`Batch.images` / `region_*` = the image stream, `Batch.input_ids` = the
text stream); it must never treat a row's sentence as a description of the row's image.

Row mapping (both datasets; I = `num_images`, S = `num_sentences`):

    row r  ->  image  r % I   (its regions: boxes + detector class labels; never its captions)
               sentence r % S

The length is `num_rows` when given, else max(I, S): every item of the longer stream once per epoch and
the shorter stream cycled. Items are pure functions of the row, so the trainer's `StepSampler` (a seeded
permutation of rows per epoch) makes both streams resume step-exactly.

- `UnpairedDataset`: the embedded world's `unpaired_images` and `unpaired_text` splits (world.md
  "Unpaired view": disjoint seed ranges, so no scene is shared). Text scenes are flattened, scene-major:
  sentence s = caption `s % captions_per_text_scene` of text scene `s // captions_per_text_scene`. The
  image split's captions are never read.
- `UnpairedFeatureDataset` / `open_unpaired_source` (`data.source: unpaired_files`): user data, an image
  corpus as precomputed detector output (the BUTD / UNITER npz schema of `data.source: regions`, read by
  `vlp.data.regions.open_region_features`, with `soft_labels` for the class labels and `data.class_vocab`
  naming the classes) and a UTF-8 text file of sentences (`data.sentences`, one per line, blank lines
  skipped).
- `pretrain_source` / `world_pretrain_dataset`: the choice `vlp.pretrain` makes. A method asks for the
  unpaired streams by declaring "unpaired_text" in its class's `inputs` (a capability, whatever the method).

`Batch.image_ids` holds the image index of each row. Rows r and r + I share an image (when S > I) but
never a sentence within an epoch of max(I, S) rows; text-side contrastive losses must therefore key on the
row (`Batch.sample_keys`), not on `image_ids`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch.utils.data import Dataset

from vlp.config import ConfigError, RunConfig
from vlp.data.datasets import PairDataset, _regions, _sample_name, collate
from vlp.data.regions import (
    NpzBundle,
    PretrainSource,
    RegionFeatures,
    open_pretrain_source,
    open_region_features,
    read_class_vocab,
    train_caption_tokenizer,
)
from vlp.data.shards import open_shard_source
from vlp.data.skips import BadSample, DataError, skip_or_raise
from vlp.data.tokenizer import TextTokenizer
from vlp.data.transforms import image_to_tensor

UNPAIRED_INPUT = "unpaired_text"  # the `inputs` entry by which a method asks for the unpaired streams


# ------------------------------------------------------------------------------------------ rows
class _UnpairedRows(Dataset):
    """Row -> (image index, sentence index) of two independent streams (module docstring)."""

    def __init__(self, num_images: int, num_sentences: int, tokenizer: TextTokenizer, max_len: int,
                 max_words: int, num_rows: Optional[int]) -> None:
        if num_images < 1:
            raise ValueError("the unpaired image stream is empty: it needs at least one image")
        if num_sentences < 1:
            raise ValueError("the unpaired text stream is empty: it needs at least one sentence")
        if max_len < 2:
            raise ValueError(f"max_len must be >= 2 to hold [CLS] and [SEP], got {max_len}")
        if num_rows is not None and (isinstance(num_rows, bool) or num_rows < 1):
            raise ValueError(f"num_rows must be a positive number of rows (or None = max of the streams), got {num_rows}")
        self.num_images, self.num_sentences = int(num_images), int(num_sentences)
        self.num_rows = int(num_rows) if num_rows is not None else max(self.num_images, self.num_sentences)
        self.tokenizer, self.max_len, self.max_words = tokenizer, max_len, max_words

    def __len__(self) -> int:
        return self.num_rows

    def locate(self, row: int) -> tuple[int, int]:
        """Row -> (image index, sentence index): (row % num_images, row % num_sentences)."""
        if row < 0:
            row += len(self)
        if not 0 <= row < len(self):
            raise IndexError(f"row {row} out of range for an unpaired dataset of {len(self)} rows")
        return row % self.num_images, row % self.num_sentences

    def text_part(self, sentence: str, sentence_index: int, row: int) -> dict[str, Any]:
        input_ids, _ = self.tokenizer.encode([sentence], self.max_len, max_words=self.max_words)
        return {"caption": sentence, "input_ids": input_ids[0], "pad_id": self.tokenizer.pad_id,
                "sentence_id": sentence_index, "row": row}


# ------------------------------------------------------------------------------------------ world
class UnpairedDataset(_UnpairedRows):
    """The world's unpaired streams: images of `images_split` and sentences of `text_split`, unrelated.

    Row r -> image `r % num_images` of `images_split` (pixels, object boxes and class labels; its
    captions are never read) and sentence `s = r % num_sentences` of `text_split` = caption
    `s % captions_per_text_scene` of text scene `s // captions_per_text_scene`. The two splits come from
    disjoint scenes (world.md), so a row's sentence never describes its image. Length: `num_rows`, else
    max(num_images, num_sentences) (the shorter stream cycles). `num_sentences` = len(text_split) *
    captions_per_text_scene.

    Item (collated by `vlp.data.datasets.collate` into a `Batch`):
      image          (3, H, W) float32, normalised        - image stream
      region_boxes   (N, 4) float32 normalised xyxy        - image stream (the image's objects)
      region_labels  (N,) long, class id + 1               - image stream
      image_id       int, the image index in images_split  - image stream (-> Batch.image_ids)
      caption        str, the sentence (NOT a caption of the image)   - text stream
      input_ids      (T,) long, [CLS] ... [SEP];  pad_id int          - text stream
      sentence_id    int, the sentence index (not collated; for inspection)
      row            int (-> Batch.sample_keys)
    """

    def __init__(
        self,
        images_split: Sequence[Any],
        text_split: Sequence[Any],
        tokenizer: TextTokenizer,
        max_len: int,
        image_size: Optional[int] = None,
        captions_per_text_scene: int = 5,
        max_words: int = 30,
        num_rows: Optional[int] = None,
    ) -> None:
        if captions_per_text_scene < 1:
            raise ValueError(f"captions_per_text_scene must be >= 1, got {captions_per_text_scene}")
        super().__init__(len(images_split), len(text_split) * captions_per_text_scene, tokenizer, max_len,
                         max_words, num_rows)
        self.images_split, self.text_split = images_split, text_split
        self.image_size = image_size
        self.captions_per_text_scene = captions_per_text_scene

    def sentence(self, sentence_index: int) -> str:
        """Sentence `sentence_index` of the text stream (scene-major; the scene is built, never rendered)."""
        scene_index, caption_index = divmod(sentence_index, self.captions_per_text_scene)
        scene_of = getattr(self.text_split, "scene", None)  # WorldSplit: the scene graph only, no pixels
        sample = scene_of(scene_index) if callable(scene_of) else self.text_split[scene_index]
        captions = list(sample.captions)
        if len(captions) < self.captions_per_text_scene:
            raise ValueError(
                f"text {_sample_name(sample, scene_index)} has {len(captions)} captions, but the unpaired text "
                f"stream reads {self.captions_per_text_scene} per scene; lower captions_per_text_scene"
            )
        return captions[caption_index]

    def __getitem__(self, row: int) -> dict[str, Any]:
        if row < 0:
            row += len(self)
        image_index, sentence_index = self.locate(row)
        sample = self.images_split[image_index]
        if sample.image is None:
            raise ValueError(f"{_sample_name(sample, image_index)} has no image: the image stream must be a split "
                             f"with images (unpaired_images), not a text-only one")
        boxes, labels = _regions(sample)
        return {"image": image_to_tensor(sample.image, self.image_size), "region_boxes": boxes,
                "region_labels": labels, "image_id": image_index,
                **self.text_part(self.sentence(sentence_index), sentence_index, row)}


# ------------------------------------------------------------------------------------------ user data
def read_sentences(path: str | Path) -> list[str]:
    """A UTF-8 text file, one sentence per line -> the non-blank lines, stripped, in file order.

    FileNotFoundError / ValueError naming the file when it is missing, not UTF-8 or holds no sentence.
    """
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"sentences file not found: {file}; data.sentences must be a UTF-8 text file with "
                                f"one sentence per line")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{file} is not UTF-8 text ({exc}); data.sentences must be UTF-8, one sentence per line") from exc
    sentences = [line.strip() for line in text.splitlines() if line.strip()]
    if not sentences:
        raise ValueError(f"{file} holds no sentence (empty or only blank lines); data.sentences needs one sentence "
                         f"per line")
    return sentences


def feature_image_ids(features: RegionFeatures) -> list[str]:
    """Every image id of a feature source, in a fixed order: a bundle's `image_ids` order, a directory's
    sorted `<image_id>.npz` stems (listing only; no file is read)."""
    if isinstance(features, NpzBundle):
        return features.image_ids
    return sorted(p.stem for p in Path(features.path).glob("*.npz") if p.is_file())


class UnpairedFeatureDataset(_UnpairedRows):
    """User data's unpaired streams: images as precomputed detector regions, sentences from a text file.

    Row r -> image `image_ids[r % num_images]` of `features` and sentence `sentences[r % num_sentences]`,
    unrelated (different corpora). Length: `num_rows`, else max(num_images, num_sentences).
    `image_ids` defaults to every image of the features (`feature_image_ids`). The first image is read at
    construction, so schema errors (feature dim, vocabulary) surface before training; `has_labels` says
    whether it carries soft_labels (class labels).

    Item (collated by `collate`; no pixels):
      region_feats (N, D) float32, region_boxes (N, 7) float32, region_labels (N,) long | None,
      image_id int (index into `image_ids`), caption str (the sentence), input_ids (T,), pad_id,
      sentence_id int, row.
    Features that cannot be used (`RegionFeatures.read`) are a `DataError` naming the file, or with `skip_bad`
    (data.skip_bad) the row's item is that `BadSample` (counted by the trainer, `vlp.data.skips`).
    """

    def __init__(
        self,
        features: RegionFeatures,
        sentences: Sequence[str],
        tokenizer: TextTokenizer,
        max_len: int,
        max_words: int = 30,
        num_rows: Optional[int] = None,
        image_ids: Optional[Sequence[str]] = None,
        skip_bad: bool = False,
    ) -> None:
        self.features = features
        self.skip_bad = bool(skip_bad)
        self.image_ids = list(image_ids) if image_ids is not None else feature_image_ids(features)
        if not self.image_ids:
            raise ValueError(f"no region features found in {features.path} (data.features): expected "
                             f"<image_id>.npz files or a multi-image .npz")
        self.sentences = list(sentences)
        super().__init__(len(self.image_ids), len(self.sentences), tokenizer, max_len, max_words, num_rows)
        if not skip_bad:
            self.has_labels = features[self.image_ids[0]].labels is not None
            return
        for image_id in self.image_ids:  # the first image that reads (bad ones are skipped when met)
            try:
                self.has_labels = features.read(image_id).labels is not None
                return
            except DataError:
                continue
        self.has_labels = features.read(self.image_ids[0]).labels is not None  # none reads: the first one's error

    def __getitem__(self, row: int) -> dict[str, Any] | BadSample:
        if row < 0:
            row += len(self)
        image_index, sentence_index = self.locate(row)
        try:
            record = self.features.read(self.image_ids[image_index])
        except DataError as error:
            return skip_or_raise(error, self.skip_bad)
        return {"region_feats": torch.from_numpy(record.features), "region_boxes": torch.from_numpy(record.boxes),
                "region_labels": None if record.labels is None else torch.from_numpy(record.labels),
                "image_id": image_index,
                **self.text_part(self.sentences[sentence_index], sentence_index, row)}


def open_unpaired_source(cfg: RunConfig, region_feat_dim: Optional[int] = None) -> PretrainSource:
    """The pre-training data of `data.source: unpaired_files` (module docstring).

    `data.features` (BUTD / UNITER npz: a folder of `<image_id>.npz` or one multi-image npz, with
    `soft_labels`; the `data.region_*` / `adaptive_regions` options as for `data.source: regions`),
    `data.class_vocab` (the detector's objects_vocab.txt: the class words handed to the method) and
    `data.sentences` (UTF-8, one sentence per line). Tokenizer: `data.tokenizer: bert`, or `captions`
    (WordPiece of `data.vocab_size` learnt on the sentences, class words forced whole). `data.budget` (a
    number of PAIRS) does not apply: the dataset has max(images, sentences) rows.
    `region_feat_dim`: the feature width the method takes (0 = the ViT width), None = not checked.
    ConfigError naming the key for a missing or unusable setting.
    """
    d = cfg.data
    if d.source != "unpaired_files":
        raise ConfigError(f"open_unpaired_source reads data.source: unpaired_files, got {d.source!r}")
    if d.tokenizer == "world":
        raise ConfigError("data.tokenizer: world is the embedded world's vocabulary and does not cover user text; with "
                          "data.source: unpaired_files set data.tokenizer: bert (packaged BERT uncased) or captions "
                          "(WordPiece learnt on data.sentences, class words kept whole)")
    missing = [key for key in ("features", "sentences", "class_vocab") if getattr(d, key) is None]
    if missing:
        raise ConfigError(
            "data.source: unpaired_files needs " + ", ".join(f"data.{k}" for k in missing) + " (data.features: the image "
            "corpus as detector output, a .npz of many images or a folder of <image_id>.npz with soft_labels; "
            "data.class_vocab: the detector's objects_vocab.txt; data.sentences: a text file, one sentence per line)")
    class_words = read_class_vocab(d.class_vocab)
    sentences = read_sentences(d.sentences)
    reader = open_region_features(
        d.features,
        feat_dim=None if region_feat_dim is None else (region_feat_dim or cfg.model.vision.width),
        num_classes=len(class_words),
        faithful_labels=d.region_labels_faithful,
        adaptive=d.adaptive_regions, conf_th=d.region_conf_th, min_bb=d.region_min_bb, max_bb=d.region_max_bb,
    )
    if d.tokenizer == "bert":
        tokenizer = TextTokenizer.bert_uncased()
    else:
        tokenizer = train_caption_tokenizer(sentences, d.vocab_size, class_words)
    dataset = UnpairedFeatureDataset(reader, sentences, tokenizer, d.max_text_len, max_words=d.max_text_len,
                                     skip_bad=d.skip_bad)
    if not dataset.has_labels:
        raise ConfigError(f"the region features ({d.features}) carry no soft_labels: the unpaired image stream needs "
                          f"detector class labels (soft_labels (N, C+1), column 0 = background)")
    return PretrainSource(tokenizer, dataset, collate, class_words)


# ------------------------------------------------------------------------------------------ choice
def wants_unpaired(method_cls: Any) -> bool:
    """Whether a method class pre-trains on the unpaired streams ("unpaired_text" in its `inputs`)."""
    return UNPAIRED_INPUT in getattr(method_cls, "inputs", ())


def pretrain_source(cfg: RunConfig, method_cls: Any) -> Optional[PretrainSource]:
    """The user-data source of a pre-training run, None for the embedded world (`world_pretrain_dataset`).

    regions | karpathy -> `open_pretrain_source` (paired; refused for an unpaired method: pairs would leak);
    webdataset         -> `vlp.data.shards.open_shard_source` (paired, streamed from tar shards; refused likewise);
    unpaired_files     -> `open_unpaired_source` (refused for a paired method, and for one that takes no
                          precomputed region features: `region_feature_dim(cfg)` None).
    """
    source = cfg.data.source
    if source == "world":
        return None
    unpaired = wants_unpaired(method_cls)
    dim = method_cls.region_feature_dim(cfg)
    if source == "unpaired_files":
        if not unpaired:
            raise ConfigError(f"data.source: unpaired_files holds unpaired images and sentences, but method "
                              f"{cfg.method.name!r} trains on (image, caption) pairs; use a method that declares "
                              f"'unpaired_text' in its inputs (e.g. vlmixer), or data.source: regions | karpathy")
        if dim is None:
            raise ConfigError(f"data.source: unpaired_files feeds precomputed region features without images: method "
                              f"{cfg.method.name!r} encodes pixels and cannot use them (use data.source: world)")
        return open_unpaired_source(cfg, dim)
    if unpaired:
        raise ConfigError(f"method {cfg.method.name!r} pre-trains without image-text pairs, but data.source: {source} "
                          f"holds pairs; use data.source: world (its unpaired_images / unpaired_text splits) or "
                          f"unpaired_files (data.features + data.sentences)")
    if source == "webdataset":
        return open_shard_source(cfg)
    return open_pretrain_source(cfg, dim)


def world_pretrain_dataset(cfg: RunConfig, world: Any, tokenizer: TextTokenizer, method_cls: Any) -> Dataset:
    """The world's pre-training dataset: `PairDataset` over the train split (budget = prefix of pairs), or
    for an unpaired method `UnpairedDataset(unpaired_images, unpaired_text)` (data.budget, a number of
    pairs, does not apply; the rows are the streams' size, `World(sizes=...)`: 20000 images and 20000 x 5
    sentences by default, built lazily per item)."""
    d = cfg.data
    if wants_unpaired(method_cls):
        return UnpairedDataset(world.split("unpaired_images"), world.split("unpaired_text"), tokenizer,
                               d.max_text_len, max_words=d.max_text_len)
    return PairDataset(world.split("train"), tokenizer, d.max_text_len, d.budget, max_words=d.max_text_len)


__all__ = [
    "UnpairedDataset",
    "UnpairedFeatureDataset",
    "feature_image_ids",
    "open_unpaired_source",
    "pretrain_source",
    "read_sentences",
    "wants_unpaired",
    "world_pretrain_dataset",
]
