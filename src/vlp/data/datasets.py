"""Datasets over the embedded world (and COCO-style retrieval files) and their collation into `Batch`.

- `PairDataset`: (image, caption) rows for pre-training, image-major (row r = image r // 5, caption
  r % 5), so a paired-data budget is simply a prefix of rows and budgets nest (1k ⊂ 4k ⊂ 16k ...).
- `collate`: stacks images, pads token ids and region boxes/labels, records masks, fills `sample_keys`.
- `RetrievalSet`: a fully materialised image/text retrieval benchmark (COCO convention, 5 captions per
  image) with the txt2img / img2txt ground truth ALBEF's `itm_eval` needs, plus attribute-swap hard
  negatives from the world; also loads ALBEF/BLIP `coco_karpathy_test.json` files.
- `read_caption_file`: the one parser of user caption JSON (ALBEF/BLIP Karpathy lists, plain
  `{"image_id", "caption"}` lists, COCO `captions_*.json`), grouped per image; used by
  `RetrievalSet.from_karpathy_json`, `ImageCaptionDataset` (pre-training on a captions file + image
  folder, no boxes) and `vlp.data.regions.RegionCaptionDataset` (precomputed region features).
- `CaptionRows`: image-major (image, caption) rows over per-image caption lists, with budget prefixes.
- `RecordPairDataset`: (image, caption) rows over `CaptionRecord`s + an `ImageSource` (retrieval
  fine-tuning on user Karpathy files); `RetrievalSet.build(records, ..., captions_per_image=None,
  image_source=...)` is its evaluation counterpart.

Undecodable samples (`vlp.data.skips`): the caption-file datasets raise `DataError` naming the file when an
image (or its precomputed regions) cannot be read, or with `skip_bad` return a `BadSample` in place of the
item (the trainer's `SkippingCollate` drops it and its `SkipLedger` counts it). `RetrievalSet.build` /
`from_karpathy_json` drop such an image (with its captions) when given `on_bad`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from vlp.data.records import ImageSource
from vlp.data.skips import BadSample, DataError, data_error, skip_or_raise
from vlp.data.tokenizer import TextTokenizer
from vlp.data.transforms import image_to_tensor, load_image
from vlp.types import Batch


def _sample_name(sample: Any, fallback_index: int) -> str:
    """Human-readable id of a world sample for error messages."""
    index = getattr(sample, "index", fallback_index)
    scene = getattr(sample, "scene_id", None)
    return f"sample {index}" + (f" (scene {scene})" if scene is not None else "")


def _regions(sample: Any) -> tuple[Tensor, Tensor]:
    """Object boxes (N, 4) float32 normalised xyxy and labels (N,) long = class_id + 1 (0 is padding)."""
    objects = list(sample.objects)
    if not objects:
        return torch.zeros((0, 4), dtype=torch.float32), torch.zeros((0,), dtype=torch.long)
    boxes = torch.tensor(np.asarray([o.box_norm for o in objects], dtype=np.float32).reshape(-1, 4))
    labels = torch.tensor([int(o.class_id) + 1 for o in objects], dtype=torch.long)
    return boxes, labels


class PairDataset(Dataset):
    """Map-style (image, caption) dataset over a world split, image-major.

    Row r -> image `r // captions_per_image`, caption `r % captions_per_image` of that image. With
    `budget` = B the dataset is rows [0, B): the first B pairs of the split, so budgets are nested prefixes
    (world spec: "paired-data budgets are prefixes of the train split"). Captions are normalised with
    `pre_caption(text, max_words)` (ALBEF: 30 words) and cut to `max_len` tokens.

    `__getitem__` returns a dict (collated by `collate`):
      image          (3, H, W) float32, normalised (`vlp.data.transforms.image_to_tensor`)
      caption        str, the raw caption
      input_ids      (T,) long, `[CLS] ... [SEP]` (tokenised here, in the worker; T <= max_len)
      pad_id         int, the tokenizer's [PAD] id (so `collate` needs no tokenizer)
      image_id       int, the image index in the split (rows of one image are ITC positives)
      region_boxes   (N, 4) float32 normalised x1, y1, x2, y2
      region_labels  (N,) long, class_id + 1
      row            int, the dataset row (becomes `Batch.sample_keys`)
    """

    def __init__(
        self,
        split: Sequence[Any],
        tokenizer: TextTokenizer,
        max_len: int,
        budget: Optional[int] = None,
        captions_per_image: int = 5,
        image_size: Optional[int] = None,
        max_words: int = 30,
    ) -> None:
        if captions_per_image < 1:
            raise ValueError(f"captions_per_image must be >= 1, got {captions_per_image}")
        if max_len < 2:
            raise ValueError(f"max_len must be >= 2 to hold [CLS] and [SEP], got {max_len}")
        available = len(split) * captions_per_image
        if budget is None:
            budget = available
        elif budget < 1:
            raise ValueError(f"budget must be a positive number of (image, caption) pairs, got {budget}")
        elif budget > available:
            raise ValueError(
                f"budget={budget} pairs exceeds the split: it has {len(split)} images x {captions_per_image} "
                f"captions = {available} rows; lower the budget or enlarge the split"
            )
        self.split = split
        self.tokenizer = tokenizer
        self.max_len = max_len
        self.budget = budget
        self.captions_per_image = captions_per_image
        self.image_size = image_size
        self.max_words = max_words

    def __len__(self) -> int:
        return self.budget

    def locate(self, row: int) -> tuple[int, int]:
        """Row -> (image index, caption index)."""
        return row // self.captions_per_image, row % self.captions_per_image

    def __getitem__(self, row: int) -> dict[str, Any]:
        if row < 0:
            row += len(self)
        if not 0 <= row < len(self):
            raise IndexError(f"row {row} out of range for a PairDataset of {len(self)} rows")
        image_index, caption_index = self.locate(row)
        sample = self.split[image_index]
        captions = list(sample.captions)
        if len(captions) < self.captions_per_image:
            raise ValueError(
                f"{_sample_name(sample, image_index)} has {len(captions)} captions, but PairDataset needs "
                f"{self.captions_per_image} per image; regenerate the split or lower captions_per_image"
            )
        if sample.image is None:
            raise ValueError(
                f"{_sample_name(sample, image_index)} has no image (a text-only split such as "
                f"unpaired_text); PairDataset needs a split with images"
            )
        caption = captions[caption_index]
        input_ids, _ = self.tokenizer.encode([caption], self.max_len, max_words=self.max_words)
        boxes, labels = _regions(sample)
        return {
            "image": image_to_tensor(sample.image, self.image_size),
            "caption": caption,
            "input_ids": input_ids[0],
            "pad_id": self.tokenizer.pad_id,
            "image_id": image_index,
            "region_boxes": boxes,
            "region_labels": labels,
            "row": row,
        }


def _pad_ragged(tensors: Sequence[Tensor], trailing: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """Right-pad a list of (N_i, *trailing) tensors with zeros to (B, max N_i, *trailing)."""
    num = max((int(t.shape[0]) for t in tensors), default=0)
    out = torch.zeros((len(tensors), num, *trailing), dtype=dtype)
    for i, t in enumerate(tensors):
        out[i, : t.shape[0]] = t
    return out


def collate(items: Sequence[dict[str, Any]]) -> Batch:
    """Collate dataset items (`PairDataset`, `ImageCaptionDataset`, `RegionCaptionDataset`) into a `Batch`.

    Text is right-padded with [PAD] to the longest row (attention_mask 1 = token). Regions, when the items
    carry them, are padded to the most regions in the batch N (features / boxes 0, labels 0, `region_mask`
    False for padding). Optional item keys, each all-or-nothing over the batch:
      image          (3, H, W)   -> images (B, 3, H, W)              (absent: images None)
      region_boxes   (N, 4 | 7)  -> region_boxes (B, N, 4 | 7), region_mask (B, N) bool
      region_labels  (N,) | None -> region_labels (B, N) long; None for every item -> None (no labels: the
                                    source cannot name objects, so no anchors; CMAL warns)
      region_feats   (N, D)      -> region_feats (B, N, D) float32 (precomputed detector features)
    Always: input_ids / attention_mask (B, T), image_ids (B,), sample_keys (B,) = dataset rows.
    """
    if len(items) == 0:
        raise ValueError("collate got an empty list of items")
    pad_ids = {int(item["pad_id"]) for item in items}
    if len(pad_ids) != 1:
        raise ValueError(f"items were tokenised with different tokenizers (pad ids {sorted(pad_ids)})")
    pad_id = pad_ids.pop()
    batch_size = len(items)
    for key in ("image", "region_boxes", "region_feats"):
        present = sum(key in item for item in items)
        if 0 < present < batch_size:
            raise ValueError(f"collate: {present} of {batch_size} items have '{key}': a batch must come from one source")

    width = max(int(item["input_ids"].shape[0]) for item in items)
    input_ids = torch.full((batch_size, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((batch_size, width), dtype=torch.long)
    for i, item in enumerate(items):
        ids = item["input_ids"]
        input_ids[i, : ids.shape[0]] = ids
        attention_mask[i, : ids.shape[0]] = 1

    batch = Batch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        images=torch.stack([item["image"] for item in items]) if "image" in items[0] else None,
        image_ids=torch.tensor([int(item["image_id"]) for item in items], dtype=torch.long),
        sample_keys=torch.tensor([int(item["row"]) for item in items], dtype=torch.long),
    )
    if "region_boxes" in items[0]:
        boxes = [item["region_boxes"] for item in items]
        columns = {int(b.shape[1]) for b in boxes}
        if len(columns) != 1:
            raise ValueError(f"collate: region_boxes of one batch must have the same columns, got {sorted(columns)}")
        counts = torch.tensor([int(b.shape[0]) for b in boxes])
        batch.region_boxes = _pad_ragged(boxes, (columns.pop(),), torch.float32)
        batch.region_mask = torch.arange(batch.region_boxes.shape[1])[None, :] < counts[:, None]
        labels = [item.get("region_labels") for item in items]
        if any(lab is not None for lab in labels):
            labels = [lab if lab is not None else torch.zeros(int(b.shape[0]), dtype=torch.long)
                      for lab, b in zip(labels, boxes)]
            batch.region_labels = _pad_ragged(labels, (), torch.long)
    if "region_feats" in items[0]:
        if batch.region_boxes is None:
            raise ValueError("collate: items carry region_feats but no region_boxes (every region needs its box)")
        feats = [item["region_feats"] for item in items]
        dims = {int(f.shape[1]) for f in feats}
        if len(dims) != 1:
            raise ValueError(f"collate: region_feats of one batch must share one feature dim, got {sorted(dims)}")
        if any(int(f.shape[0]) != int(b.shape[0]) for f, b in zip(feats, (item["region_boxes"] for item in items))):
            raise ValueError("collate: an item has a different number of region_feats and region_boxes rows")
        batch.region_feats = _pad_ragged(feats, (dims.pop(),), torch.float32)
    return batch


# ------------------------------------------------------------------------------------ caption files
@dataclass(frozen=True)
class CaptionEntry:
    """One image of a caption file and all its captions (records of the same image are merged).

    record:   index of the image's first record in the file (error messages point at it)
    image:    image path relative to an image root ("image" / COCO "file_name"), None when absent
    image_id: the image's key: the record's "image_id" when given, else the stem of `image`
              (`vlp.data.regions` looks up `<image_id>.npz`)
    captions: the raw captions, in file order
    """

    record: int
    image: Optional[str]
    image_id: str
    captions: tuple[str, ...]


def _caption_records(data: Any, file: Path) -> list[dict[str, Any]]:
    """The flat record list of a parsed caption JSON: a list as is; COCO `{"annotations", "images"}` ->
    one record per annotation with the image's `file_name` as "image" (when the images list names it)."""
    if isinstance(data, list):
        return data
    if isinstance(data, dict) and isinstance(data.get("annotations"), list):
        names: dict[str, str] = {}
        for index, image in enumerate(data.get("images") or []):
            if not isinstance(image, dict) or "id" not in image:
                raise ValueError(f"{file} images[{index}] must be an object with an 'id', got {image!r:.200}")
            if "file_name" in image:
                names[str(image["id"])] = str(image["file_name"])
        records = []
        for index, ann in enumerate(data["annotations"]):
            if not isinstance(ann, dict) or "image_id" not in ann or "caption" not in ann:
                raise ValueError(f"{file} annotations[{index}] must be an object with 'image_id' and 'caption', "
                                 f"got {ann!r:.200}")
            record = {"image_id": str(ann["image_id"]), "caption": ann["caption"]}
            if str(ann["image_id"]) in names:
                record["image"] = names[str(ann["image_id"])]
            records.append(record)
        return records
    raise ValueError(
        f"{file} must hold a JSON list of {{'image' and/or 'image_id', 'caption'}} records (ALBEF/BLIP Karpathy "
        f"files) or a COCO captions object with an 'annotations' list; got {type(data).__name__}"
    )


def _bad_record(message: str, on_bad: Optional[Callable[[str], None]]) -> None:
    """Raise ValueError(message), or hand it to `on_bad` (the caller then skips the record)."""
    if on_bad is None:
        raise ValueError(message)
    on_bad(message)


def read_caption_file(
    path: str | Path, require_image: bool = False, on_bad: Optional[Callable[[str], None]] = None
) -> list[CaptionEntry]:
    """Parse a caption JSON into per-image entries, in order of first appearance (image-major).

    Accepted schemas (cmal.md §9.1 data; ALBEF/BLIP annotation files, `anchors.md`):
      * ALBEF/BLIP Karpathy lists: `[{"image": "val2014/x.jpg", "caption": str | [str, ...], "image_id"?: ...}]`
        (`coco_karpathy_train.json` has one record per caption, `..._test.json` one per image with a list);
      * plain lists `[{"image_id": "coco_391895", "caption": str | [str, ...]}]` (no image path);
      * COCO `captions_*.json`: `{"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]}`.
    Records of one image (same "image", else same "image_id") are merged. `require_image`: every record
    must name an "image" path (sources that decode pixels). Errors name the file and record index.
    `on_bad`: when given, a bad record is passed to it as that error message and skipped instead of raising
    (`vlp.data.formats.read_karpathy(skip_bad=True)` counts them); file-level errors always raise.
    """
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"caption / retrieval annotation file not found: {file}")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{file} is not valid JSON ({exc}); expected a list of {{'image', 'caption'}} records") from exc
    records = _caption_records(data, file)
    if not records:
        raise ValueError(f"{file} must hold a non-empty list of {{'image': path, 'caption': [str, ...]}} records")
    need = "'image' and 'caption'" if require_image else "'caption' and 'image' or 'image_id'"
    order: list[str] = []
    first: dict[str, int] = {}
    images: dict[str, Optional[str]] = {}
    ids: dict[str, str] = {}
    caps_of: dict[str, list[str]] = {}
    for index, record in enumerate(records):
        where = f"{file} record {index}"
        has_key = isinstance(record, dict) and "caption" in record and (
            "image" in record if require_image else ("image" in record or "image_id" in record))
        if not has_key:
            _bad_record(f"{where} must be an object with {need} keys, got {record!r:.200}", on_bad)
            continue
        caps = record["caption"]
        if isinstance(caps, str):
            caps = [caps]
        if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
            _bad_record(f"{where}: 'caption' must be a string or a list of strings, got {caps!r:.200}", on_bad)
            continue
        image = str(record["image"]) if "image" in record else None
        image_id = str(record["image_id"]) if "image_id" in record else Path(str(image)).stem
        if not caps or not all(c.strip() for c in caps):
            _bad_record(f"{where} ({image if image is not None else image_id}) has an empty caption list or an "
                        f"empty caption; add captions or remove the record", on_bad)
            continue
        key = image if image is not None else image_id
        if key not in first:
            order.append(key)
            first[key], images[key], ids[key], caps_of[key] = index, image, image_id, []
        caps_of[key].extend(caps)
    return [CaptionEntry(first[k], images[k], ids[k], tuple(caps_of[k])) for k in order]


@dataclass
class CaptionRows:
    """Image-major (image, caption) rows over per-image caption counts, cut to a paired-data budget.

    Row r -> (image i, caption j) with rows of image i contiguous; `budget` keeps rows [0, budget), so
    budgets are nested prefixes (as `PairDataset`). counts: captions per image (I,).
    """

    counts: Sequence[int]
    budget: Optional[int] = None
    offsets: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.offsets = np.concatenate([[0], np.cumsum(np.asarray(self.counts, dtype=np.int64))])
        available = int(self.offsets[-1])
        if self.budget is None:
            self.budget = available
        elif self.budget < 1:
            raise ValueError(f"budget must be a positive number of (image, caption) pairs, got {self.budget}")
        elif self.budget > available:
            raise ValueError(
                f"budget={self.budget} pairs exceeds the data: {len(self.counts)} images with {available} captions "
                f"in all; lower data.budget or set data.budget: null to use every pair"
            )

    def __len__(self) -> int:
        return int(self.budget)

    def locate(self, row: int) -> tuple[int, int]:
        """Row -> (image index, caption index); IndexError outside [0, budget)."""
        if not 0 <= row < len(self):
            raise IndexError(f"row {row} out of range for {len(self)} (image, caption) rows")
        image = int(np.searchsorted(self.offsets, row, side="right")) - 1
        return image, row - int(self.offsets[image])

    @property
    def num_images(self) -> int:
        """Images with at least one row inside the budget."""
        return int(np.searchsorted(self.offsets, len(self), side="left"))


class CaptionRowDataset(Dataset):
    """Base of the caption-file datasets: image-major (image, caption) rows (`CaptionRows`, budget =
    prefix) over `groups` (one per image, each with `.captions`), every row's caption tokenised.

    Subclasses add the image side of a row with `image_part(image_index, group) -> dict` (pixels, or
    precomputed regions). Item: the image part plus caption str, input_ids (T,) long, pad_id,
    image_id (group index: captions of one image are ITC positives, never ITM negatives), row.

    A bad image part (`image_part` raises `vlp.data.skips.DataError`: undecodable image, unusable features)
    propagates, naming the file; with `skip_bad` the row's item is that `BadSample` instead.
    """

    def __init__(self, groups: Sequence[Any], tokenizer: TextTokenizer, max_len: int,
                 budget: Optional[int] = None, max_words: int = 30, skip_bad: bool = False) -> None:
        if max_len < 2:
            raise ValueError(f"max_len must be >= 2 to hold [CLS] and [SEP], got {max_len}")
        self.groups = list(groups)
        self.rows = CaptionRows([len(g.captions) for g in self.groups], budget)
        self.tokenizer, self.max_len, self.max_words = tokenizer, max_len, max_words
        self.skip_bad = bool(skip_bad)

    def __len__(self) -> int:
        return len(self.rows)

    def image_part(self, image_index: int, group: Any) -> dict[str, Any]:
        raise NotImplementedError(f"{type(self).__name__} must implement image_part(image_index, group)")

    def __getitem__(self, row: int) -> dict[str, Any] | BadSample:
        if row < 0:
            row += len(self)
        image_index, caption_index = self.rows.locate(row)
        group = self.groups[image_index]
        caption = group.captions[caption_index]
        try:
            image_part = self.image_part(image_index, group)
        except DataError as error:
            return skip_or_raise(error, self.skip_bad)
        input_ids, _ = self.tokenizer.encode([caption], self.max_len, max_words=self.max_words)
        return {**image_part, "caption": caption, "input_ids": input_ids[0],
                "pad_id": self.tokenizer.pad_id, "image_id": image_index, "row": row}


class ImageCaptionDataset(CaptionRowDataset):
    """Pre-training pairs from a caption file + image folder, without boxes (`data.source: karpathy`).

    Rows are image-major over `read_caption_file(captions, require_image=True)` entries (or `entries`,
    already parsed from that file; `CaptionRows`, budget = prefix). Every image path is checked at construction (fails fast, naming the record); pixels
    are decoded lazily per item (`load_image`, resized to `image_size`). Items carry no region keys, so a
    region method must make its own regions (CMAL: grid cells, no anchors; see `vlp.methods.cmal`).
    With `skip_bad` a missing image is not an error at construction: its rows become `BadSample`s ("missing
    image"), as the rows of an undecodable one do ("undecodable image").

    Item: image (3, S, S) float32, caption str, input_ids (T,) long, pad_id, image_id (entry index), row.
    """

    def __init__(
        self,
        captions: str | Path,
        image_root: str | Path,
        tokenizer: TextTokenizer,
        max_len: int,
        image_size: int,
        budget: Optional[int] = None,
        max_words: int = 30,
        entries: Optional[Sequence[CaptionEntry]] = None,
        skip_bad: bool = False,
    ) -> None:
        self.file = Path(captions)
        self.root = Path(image_root)
        self.entries = list(entries) if entries is not None else read_caption_file(self.file, require_image=True)
        super().__init__(self.entries, tokenizer, max_len, budget, max_words, skip_bad)
        for entry in self.entries[: self.rows.num_images]:
            image_path = self.root / str(entry.image)
            if not skip_bad and not image_path.is_file():
                raise FileNotFoundError(
                    f"{self.file} record {entry.record}: image not found: {image_path}; check data.image_root "
                    f"({self.root}) or remove the record"
                )
        self.image_size = image_size

    def image_part(self, image_index: int, entry: CaptionEntry) -> dict[str, Any]:
        path = self.root / str(entry.image)
        try:
            return {"image": load_image(path, self.image_size)}
        except FileNotFoundError as exc:
            raise data_error("missing image", path, exc, f"{self.file} record {entry.record}: {exc}") from exc
        except ValueError as exc:
            raise data_error("undecodable image", path, exc, f"{self.file} record {entry.record}: {exc}") from exc


class RecordPairDataset(CaptionRowDataset):
    """(image, caption) pairs over caption records + an image source: retrieval fine-tuning on user
    Karpathy files (`vlp finetune retrieval --data files`; records from `vlp.data.formats.read_karpathy`).

    records: `CaptionRecord`s (`.image_id`, `.captions`), images: an `ImageSource` (`FolderImages`).
    Rows are image-major over every caption of each image (`CaptionRows`; COCO 5-7 per image), cut to
    the first `budget` pairs (None = all). Pixels are decoded lazily per item and resized to
    `image_size`. Item (as `ImageCaptionDataset`, no region keys: CMAL uses grid cells): image
    (3, S, S), caption, input_ids (T,), pad_id, image_id (record index: captions of one image are ITC
    positives and never ITM negatives), row.
    `skip_bad`: undecodable images (`DataError` from the source) become `BadSample` items (counted by the
    trainer's `SkipLedger`) instead of raising.
    """

    def __init__(
        self,
        records: Sequence[Any],
        images: ImageSource,
        tokenizer: TextTokenizer,
        max_len: int,
        image_size: int,
        budget: Optional[int] = None,
        max_words: int = 30,
        skip_bad: bool = False,
    ) -> None:
        if images is None:
            raise ValueError("RecordPairDataset needs an image source (e.g. FolderImages(image_root))")
        self.records = list(records)
        if not self.records:
            raise ValueError("RecordPairDataset got no caption records")
        super().__init__(self.records, tokenizer, max_len, budget, max_words, skip_bad)
        self.images, self.image_size = images, image_size

    def image_part(self, image_index: int, record: Any) -> dict[str, Any]:
        return {"image": image_to_tensor(self.images.load(record.image_id), self.image_size)}


def _ground_truth(counts: Sequence[int]) -> tuple[Tensor, list[list[int]]]:
    """Captions per image -> (txt2img (sum counts,) long, img2txt list of caption-index lists)."""
    txt2img: list[int] = []
    img2txt: list[list[int]] = []
    for image_index, count in enumerate(counts):
        start = len(txt2img)
        img2txt.append(list(range(start, start + count)))
        txt2img.extend([image_index] * count)
    return torch.tensor(txt2img, dtype=torch.long), img2txt


@dataclass
class RetrievalSet:
    """An image-text retrieval benchmark held in memory (I images, C captions; C = 5I for the world).

    images          (I, 3, H, W) float32, normalised
    captions        list[str] (C,), the raw captions, image-major
    input_ids       (C, T) long;  attention_mask (C, T) long
    txt2img         (C,) long, the image of each caption
    img2txt         list of I lists: the caption indices of each image
    hard_image      (Hn,) long, image index of each hard pair (at most one per image; world only)
    hard_pos_ids / hard_pos_mask  (Hn, Tp): the true caption of that image's hard pair
    hard_neg_ids / hard_neg_mask  (Hn, Tn): the same caption with two objects' colours swapped
    The hard_* fields are None for sets without hard pairs (e.g. Karpathy JSON files).
    region_boxes    (I, N, 4) float32 normalised xyxy object boxes, padded to the most objects N
    region_labels   (I, N) long, class_id + 1 (0 = padding);  region_mask (I, N) bool, True = real box
    The region_* fields (for region-based methods, e.g. CMAL's ITM retrieval) are filled by `build` from
    the world samples' objects (as `collate` pads them) and are None for sets without boxes.
    """

    images: Tensor
    captions: list[str]
    input_ids: Tensor
    attention_mask: Tensor
    txt2img: Tensor
    img2txt: list[list[int]]
    hard_image: Optional[Tensor] = None
    hard_pos_ids: Optional[Tensor] = None
    hard_pos_mask: Optional[Tensor] = None
    hard_neg_ids: Optional[Tensor] = None
    hard_neg_mask: Optional[Tensor] = None
    region_boxes: Optional[Tensor] = None
    region_labels: Optional[Tensor] = None
    region_mask: Optional[Tensor] = None

    @property
    def num_images(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_texts(self) -> int:
        return len(self.captions)

    @classmethod
    def build(
        cls,
        split: Sequence[Any],
        tokenizer: TextTokenizer,
        max_len: int,
        num_images: Optional[int] = None,
        captions_per_image: Optional[int] = 5,
        image_size: Optional[int] = None,
        max_words: int = 30,
        image_source: Optional[ImageSource] = None,
        on_bad: Optional[Callable[[str], None]] = None,
    ) -> "RetrievalSet":
        """The first `num_images` images of a split with their first `captions_per_image` captions.

        `split` holds world samples (`.image` pixels, `.captions`, `.objects`, `.hard_pairs`) or, with
        `image_source`, caption records (`vlp.data.records.CaptionRecord`: `.image_id`, `.captions`) whose
        pixels `image_source.load(image_id)` gives (user Karpathy files: `FolderImages`, resized to
        `image_size`). `captions_per_image=None` keeps every caption of each image, so counts may differ
        (COCO has 5-7): a text's positive is its image, an image's positives are all its captions.

        World sets use a fixed 5 captions per image (COCO convention) so R@K is comparable across splits. Hard negatives:
        each image's first `hard_pairs` entry whose positive and negative still differ after
        `pre_caption(., max_words)` and truncation to `max_len` tokens (a swap past the cut would make
        the "negative" identical to the positive); images with no such pair contribute none.

        An image the source cannot decode (`vlp.data.skips.DataError`) is an error naming the file, or, with
        `on_bad` (e.g. the reader's `SkipReport.add` under `task.skip_bad`), passed to `on_bad` as that message and left out with its captions (the set then holds fewer images).
        """
        total = len(split)
        if num_images is None:
            num_images = total
        if not 1 <= num_images <= total:
            raise ValueError(f"num_images={num_images} is out of range: the split has {total} images")
        images: list[Tensor] = []
        captions: list[str] = []
        hard_image: list[int] = []
        hard_pos: list[str] = []
        hard_neg: list[str] = []
        counts: list[int] = []
        regions: Optional[list[tuple[Tensor, Tensor]]] = []
        for index in range(num_images):
            sample = split[index]
            sample_captions = list(sample.captions)
            count = len(sample_captions) if captions_per_image is None else captions_per_image
            if len(sample_captions) < max(count, 1):
                raise ValueError(
                    f"{_sample_name(sample, index)} has {len(sample_captions)} captions; a retrieval set needs "
                    f"{max(count, 1)} per image (regenerate the split or lower captions_per_image)"
                )
            try:
                pixels = sample.image if image_source is None else image_source.load(sample.image_id)
            except DataError as error:
                if on_bad is None:
                    raise
                on_bad(str(error))
                continue
            i = len(images)  # the image's index in the set (skipped images leave no gap)
            if regions is not None and hasattr(sample, "objects"):
                regions.append(_regions(sample))
            else:
                regions = None  # a sample without objects: the set carries no boxes
            images.append(image_to_tensor(pixels, image_size))
            captions.extend(sample_captions[:count])
            counts.append(count)
            for positive, negative in getattr(sample, "hard_pairs", None) or ():
                pair_ids, pair_mask = tokenizer.encode([positive, negative], max_len, max_words=max_words)
                if not torch.equal(pair_ids[0] * pair_mask[0], pair_ids[1] * pair_mask[1]):
                    hard_image.append(i)
                    hard_pos.append(positive)
                    hard_neg.append(negative)
                    break
        if not images:
            raise ValueError(f"none of the {num_images} images of the retrieval set could be decoded (all skipped); "
                             f"check the image files")
        num_images = len(images)
        input_ids, attention_mask = tokenizer.encode(captions, max_len, max_words=max_words)
        txt2img, img2txt = _ground_truth(counts)
        result = cls(
            images=torch.stack(images),
            captions=captions,
            input_ids=input_ids,
            attention_mask=attention_mask,
            txt2img=txt2img,
            img2txt=img2txt,
        )
        if hard_image:
            result.hard_image = torch.tensor(hard_image, dtype=torch.long)
            result.hard_pos_ids, result.hard_pos_mask = tokenizer.encode(hard_pos, max_len, max_words=max_words)
            result.hard_neg_ids, result.hard_neg_mask = tokenizer.encode(hard_neg, max_len, max_words=max_words)
        if regions is not None:
            n = max((int(b.shape[0]) for b, _ in regions), default=0)
            result.region_boxes = torch.zeros((num_images, n, 4), dtype=torch.float32)
            result.region_labels = torch.zeros((num_images, n), dtype=torch.long)
            result.region_mask = torch.zeros((num_images, n), dtype=torch.bool)
            for i, (boxes, labels) in enumerate(regions):
                k = int(boxes.shape[0])
                result.region_boxes[i, :k], result.region_labels[i, :k] = boxes, labels
                result.region_mask[i, :k] = True
        return result

    @classmethod
    def from_karpathy_json(
        cls,
        path: str | Path,
        image_root: str | Path,
        tokenizer: TextTokenizer,
        max_len: int,
        image_size: int,
        max_words: int = 30,
        on_bad: Optional[Callable[[str], None]] = None,
    ) -> "RetrievalSet":
        """Load an ALBEF/BLIP retrieval eval file (`coco_karpathy_test.json`, `flickr30k_test.json`).

        Schema: a JSON list of `{"image": path relative to image_root, "caption": [str, ...]}` (COCO has
        5-7 captions per image; all are kept, as ALBEF does), parsed by `read_caption_file` (so COCO
        `captions_*.json` with `file_name`s works too; records of one image are merged). Images are
        resized to image_size x image_size. Every record is validated before any image is decoded, so a
        broken file fails fast, naming the record index and the fix. An undecodable image is an error naming
        the record and the file (`vlp.data.skips.DataError`), or, with `on_bad`, passed to it as that message
        and left out with its captions.
        """
        file = Path(path)
        root = Path(image_root)
        entries = read_caption_file(file, require_image=True)
        image_paths: list[Path] = []
        per_image: list[tuple[str, ...]] = []
        for entry in entries:
            image_path = root / str(entry.image)
            if not image_path.is_file():
                raise FileNotFoundError(
                    f"{file} record {entry.record}: image not found: {image_path}; check image_root ({root}) or "
                    f"remove the record"
                )
            image_paths.append(image_path)
            per_image.append(entry.captions)

        loaded: list[Tensor] = []
        kept: list[tuple[str, ...]] = []
        for entry, image_path, captions_of in zip(entries, image_paths, per_image):
            try:
                loaded.append(load_image(image_path, image_size))
            except ValueError as exc:
                error = data_error("undecodable image", image_path, exc, f"{file} record {entry.record}: {exc}")
                if on_bad is None:
                    raise error from exc
                on_bad(str(error))
                continue
            kept.append(captions_of)
        if not loaded:
            raise ValueError(f"none of the {len(entries)} images of {file} could be decoded (all skipped); check the "
                             f"files under {root}")
        per_image = kept
        images = torch.stack(loaded)
        captions = [c for caps in per_image for c in caps]
        input_ids, attention_mask = tokenizer.encode(captions, max_len, max_words=max_words)
        txt2img, img2txt = _ground_truth([len(caps) for caps in per_image])
        return cls(
            images=images,
            captions=captions,
            input_ids=input_ids,
            attention_mask=attention_mask,
            txt2img=txt2img,
            img2txt=img2txt,
        )


def distinct_images(dataset: Dataset, count: int) -> Tensor:
    """The images (n, 3, H, W) of the first `count` distinct `image_id`s of a pair dataset, in row order
    (n < count when the dataset has fewer images). For methods that fit data-dependent state before the
    first step (`PretrainMethod.images_to_prepare`, e.g. SIMLA's visual tokenizer): a pure function of
    the dataset, so every rank gets the same images.

    Rows of one image are consecutive in vlp's image-major datasets; a `PairDataset` is read one row per
    image (its `captions_per_image` stride), so no image is rendered twice.

    Raises:
        ValueError: the dataset's items carry no "image" (e.g. precomputed region features only).
    """
    stride = int(getattr(dataset, "captions_per_image", 1) or 1)
    images: list[Tensor] = []
    seen: set[int] = set()
    for row in range(0, len(dataset), stride):
        if len(images) >= count:
            break
        item = dataset[row]
        if isinstance(item, BadSample):  # skipped (`skip_bad`): the trainer counts it when a batch meets it
            continue
        if "image" not in item:
            raise ValueError(f"{type(dataset).__name__} items carry no image (precomputed region features?): "
                             f"this method needs pixels to fit on (data.source: world or karpathy)")
        image_id = int(item.get("image_id", row))
        if image_id not in seen:
            seen.add(image_id)
            images.append(item["image"])
    if not images:
        raise ValueError("the dataset is empty: no image to fit on")
    return torch.stack(images)


__all__ = ["CaptionEntry", "CaptionRowDataset", "CaptionRows", "ImageCaptionDataset", "PairDataset", "RecordPairDataset", "RetrievalSet",
           "collate", "distinct_images", "read_caption_file"]
