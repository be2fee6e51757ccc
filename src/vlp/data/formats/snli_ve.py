"""SNLI-VE (Xie et al. 2019) JSON lines -> `VERecord`s.

The official files `snli_ve_{train,dev,test}.jsonl` hold one SNLI-style object per line; the fields
used are `Flickr30K_ID` (the premise image: "<id>.jpg" in the Flickr30K image folder), `sentence2`
(the hypothesis), `gold_label` ("entailment" | "neutral" | "contradiction", mapped to its index in
`VE_LABELS`) and `pairID` (the pair id; "line N" when absent). `sentence1`, the Flickr30K caption the
hypothesis was written against, is not used: in SNLI-VE the image replaces it as the premise.
"""

from __future__ import annotations

from pathlib import Path

from vlp.data.formats.common import FormatData, Sink, folder, image_check, iter_jsonl, require_file, require_keys, split_from_name
from vlp.data.records import VE_LABELS, VERecord

_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def read_snli_ve(
    path: str | Path,
    image_root: str | Path | None = None,
    split: str | None = None,
    skip_bad: bool = False,
) -> FormatData:
    """Read an SNLI-VE `.jsonl` file -> `FormatData(task="ve", splits={split: [VERecord]})`.

    split: the key of the records (default: from the file name, `snli_ve_dev.jsonl` -> "dev").
    An unknown `gold_label` (SNLI's "-" for no consensus included: SNLI-VE removed those pairs), a
    missing field, an empty hypothesis or (with `image_root`) a missing image is an error naming the
    line, the pair id and the file, or a counted skip with `skip_bad=True`.
    """
    file = require_file(path, "SNLI-VE annotation file")
    sink = Sink(skip_bad)
    images = folder(image_root)
    records: list[VERecord] = []
    for number, obj in iter_jsonl(file, sink):
        pair_id = str(obj.get("pairID") or f"line {number}")
        where = f"{file} line {number} (pair {pair_id!r})"
        if not require_keys(obj, ("Flickr30K_ID", "sentence2", "gold_label"), where, sink):
            continue
        label = obj["gold_label"]
        if label not in VE_LABELS:
            sink.bad(f"{where}: unknown gold_label {label!r}; expected one of {', '.join(VE_LABELS)}")
            continue
        image = str(obj["Flickr30K_ID"]).strip()
        if not image:
            sink.bad(f"{where}: empty Flickr30K_ID")
            continue
        image_id = image if image.lower().endswith(_IMAGE_SUFFIXES) else f"{image}.jpg"
        if not isinstance(obj["sentence2"], str):
            sink.bad(f"{where}: sentence2 must be a string, got {type(obj['sentence2']).__name__}")
            continue
        try:
            record = VERecord(pair_id=pair_id, image_id=image_id, hypothesis=obj["sentence2"], label=VE_LABELS.index(label))
        except ValueError as exc:
            sink.bad(f"{file} line {number}: {exc}")
            continue
        if image_check(images, image_id, where, sink):
            records.append(record)
    return FormatData(
        task="ve", splits={split or split_from_name(file): records}, images=images, skipped=sink.report, sources=(str(file),)
    )


__all__ = ["read_snli_ve"]
