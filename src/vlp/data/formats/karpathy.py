"""Karpathy-split caption files (COCO / Flickr30K) -> `CaptionRecord`s per split.

Two schemas are in use and both are read:

* Karpathy's original `dataset_coco.json` / `dataset_flickr30k.json`: ``{"images": [{"filepath":
  "val2014", "filename": "COCO_val2014_000000391895.jpg", "split": "train"|"restval"|"val"|"test",
  "sentences": [{"raw": "A man ...", ...}, ...], ...}, ...], "dataset": "coco"}`` (Flickr30K has no
  `filepath`). image_id = "filepath/filename"; captions = the `raw` sentences; each image in its split.
* The ALBEF/BLIP per-split lists (`coco_karpathy_{train,val,test}.json`, `flickr30k_*.json`):
  ``[{"image": "val2014/COCO_val2014_....jpg", "caption": str | [str, ...]}, ...]`` (and the other
  caption files `vlp.data.datasets.read_caption_file` takes: plain `{"image_id", "caption"}` lists,
  COCO `captions_*.json`). These are parsed by `read_caption_file`, the one parser that
  `RetrievalSet.from_karpathy_json` and the pre-training datasets use too, so a file reads the same
  everywhere; rows of one image are merged (the train lists have one row per caption). The whole file
  is one split, named by `split=` or by the file name (`coco_karpathy_test.json` -> "test").
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vlp.data.datasets import read_caption_file
from vlp.data.formats.common import FormatData, Sink, folder, image_check, load_json, require_file, split_from_name
from vlp.data.records import CaptionRecord

_KARPATHY_EXPECTED = "Karpathy's {'images': [{'filename', 'split', 'sentences': [{'raw'}]}]} or an ALBEF/BLIP caption list"


@dataclass(frozen=True)
class KarpathyEntry:
    """One parsed image: its split, its record, and the index of its (first) row in the file."""

    split: str
    record: CaptionRecord
    index: int


def _is_karpathy_original(data: object) -> bool:
    """Karpathy's `dataset_*.json`: an object whose 'images' entries carry 'sentences'."""
    return (
        isinstance(data, dict)
        and isinstance(data.get("images"), list)
        and "annotations" not in data
        and any(isinstance(i, dict) and "sentences" in i for i in data["images"])
    )


def _karpathy_images(file: Path, images: list, restval: str, sink: Sink) -> list[KarpathyEntry]:
    """Karpathy's original schema: one object per image with its own split."""
    entries: list[KarpathyEntry] = []
    for index, image in enumerate(images):
        where = f"{file} image {index}"
        if not isinstance(image, dict) or not all(k in image for k in ("filename", "split", "sentences")):
            sink.bad(f"{where} must be an object with 'filename', 'split' and 'sentences' keys, got {image!r:.200}")
            continue
        image_id = f"{image['filepath']}/{image['filename']}" if image.get("filepath") else str(image["filename"])
        where = f"{where} ({image_id})"
        sentences = image["sentences"]
        if not isinstance(sentences, list) or not all(isinstance(s, dict) and isinstance(s.get("raw"), str) for s in sentences):
            sink.bad(f"{where}: 'sentences' must be a list of {{'raw': str}} objects")
            continue
        captions = tuple(s["raw"] for s in sentences)
        if not captions or not all(c.strip() for c in captions):
            sink.bad(f"{where} has no captions or an empty one; fix it or remove the image")
            continue
        split = str(image["split"])
        entries.append(KarpathyEntry(restval if split == "restval" else split, CaptionRecord(image_id, captions), index))
    return entries


def karpathy_entries(
    path: str | Path,
    split: str | None = None,
    restval: str = "train",
    sink: Sink | None = None,
    require_image: bool = True,
) -> list[KarpathyEntry]:
    """Parse a caption file into entries (split, record, row index) without touching images.

    split:   for a list file, the split it is (default: from the file name); for Karpathy's original
             file, keep only that split (None = all).
    restval: the split Karpathy's "restval" images join (default "train", as in the ALBEF/BLIP 113k
             COCO train list); pass "restval" to keep them apart.
    require_image: list records must name an "image" path (else their `image_id` is the record's key).
    """
    sink = sink or Sink(skip_bad=False)
    file = require_file(path, "caption annotation file")
    with file.open("rb") as handle:
        head = handle.read(256).lstrip()
    if head[:1] == b"{":  # parse once here; only COCO captions objects are parsed a second time below
        data = load_json(file, "caption annotation file", _KARPATHY_EXPECTED)
        if _is_karpathy_original(data):
            return [e for e in _karpathy_images(file, data["images"], restval, sink) if split is None or e.split == split]
    on_bad = sink.bad if sink.skip_bad else None
    name = split or split_from_name(file)
    return [
        KarpathyEntry(name, CaptionRecord(e.image if e.image is not None else e.image_id, e.captions), e.record)
        for e in read_caption_file(file, require_image=require_image, on_bad=on_bad)
    ]


def read_karpathy(
    path: str | Path,
    image_root: str | Path | None = None,
    split: str | None = None,
    restval: str = "train",
    skip_bad: bool = False,
) -> FormatData:
    """Read a Karpathy-split caption file -> `FormatData(task="retrieval", splits={split: [CaptionRecord]})`.

    With `image_root`, every record's image must exist (else an error naming the record, the file and
    the path, or a counted skip) and the result carries `images=FolderImages(image_root)`. Without it,
    records of plain `{"image_id", "caption"}` lists are accepted (image_id = that key).
    """
    sink = Sink(skip_bad)
    images = folder(image_root)
    entries = karpathy_entries(path, split=split, restval=restval, sink=sink, require_image=images is not None)
    splits: dict[str, list[CaptionRecord]] = {}
    for entry in entries:
        if image_check(images, entry.record.image_id, f"{Path(path)} record {entry.index}", sink):
            splits.setdefault(entry.split, []).append(entry.record)
    return FormatData(task="retrieval", splits=splits, images=images, skipped=sink.report, sources=(str(path),))


__all__ = ["KarpathyEntry", "karpathy_entries", "read_karpathy"]
