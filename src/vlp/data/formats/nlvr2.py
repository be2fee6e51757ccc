"""NLVR2 (Suhr et al. 2019) JSON lines -> `NLVR2Record`s.

The official files (`train.json`, `dev.json`, `test1.json`, one JSON object per line despite the
suffix) give `identifier` ("split-set_id-pair_id-sentence_id", e.g. "dev-850-0-0"), `sentence` and
`label` ("True" / "False"). The image pair is named as in the official repository and the LXMERT /
UNITER preprocessing: the identifier without its trailing "-sentence_id" plus "-img0.png" / "-img1.png"
("dev-850-0-img0.png"). An identifier without the split prefix ("850-0-0") gets "<split>-" in front.
Training lines also carry `directory` (0-99), the sub-folder of `images/train/` holding the pair; when
present the image id is "<directory>/<name>", so the image root is the split's image folder.
"""

from __future__ import annotations

from pathlib import Path

from vlp.data.formats.common import FormatData, Sink, folder, image_check, iter_jsonl, require_file, require_keys, split_from_name
from vlp.data.records import NLVR2Record

_LABELS = {"true": True, "false": False}


def nlvr2_image_names(identifier: str, split: str, directory: object = None) -> tuple[str, str]:
    """(left, right) image ids of an NLVR2 example, derived from its identifier as the official repo does."""
    parts = identifier.split("-")
    if len(parts) < 3 or not all(parts[1:]):
        raise ValueError(f"identifier {identifier!r} is not 'split-set_id-pair_id-sentence_id'")
    stem = identifier.rsplit("-", 1)[0]
    if len(parts) == 3:  # no split prefix: "set-pair-sentence"
        stem = f"{split}-{stem}"
    prefix = f"{directory}/" if directory not in (None, "") else ""
    return f"{prefix}{stem}-img0.png", f"{prefix}{stem}-img1.png"


def read_nlvr2(
    path: str | Path,
    image_root: str | Path | None = None,
    split: str | None = None,
    skip_bad: bool = False,
) -> FormatData:
    """Read an NLVR2 JSON-lines file -> `FormatData(task="nlvr2", splits={split: [NLVR2Record]})`.

    split: the records' key and the prefix of identifiers that lack one (default: the file name,
    `dev.json` -> "dev"). A label other than "True"/"False" (JSON booleans are accepted too), a bad
    identifier, a missing field or (with `image_root`) a missing image is an error naming the line,
    the identifier and the file, or a counted skip with `skip_bad=True`.
    """
    file = require_file(path, "NLVR2 annotation file")
    split = split or split_from_name(file)
    sink = Sink(skip_bad)
    images = folder(image_root)
    records: list[NLVR2Record] = []
    for number, obj in iter_jsonl(file, sink):
        identifier = str(obj.get("identifier", f"line {number}"))
        where = f"{file} line {number} (identifier {identifier!r})"
        if not require_keys(obj, ("identifier", "sentence", "label"), where, sink):
            continue
        raw = obj["label"]
        label = raw if isinstance(raw, bool) else _LABELS.get(str(raw).strip().lower())
        if label is None:
            sink.bad(f"{where}: unknown label {raw!r}; expected 'True' or 'False'")
            continue
        try:
            left, right = nlvr2_image_names(identifier, split, obj.get("directory"))
            record = NLVR2Record(identifier, left, right, str(obj["sentence"]), label)
        except ValueError as exc:
            sink.bad(f"{where}: {exc}")
            continue
        if image_check(images, left, where, sink) and image_check(images, right, where, sink):
            records.append(record)
    return FormatData(task="nlvr2", splits={split: records}, images=images, skipped=sink.report, sources=(str(file),))


__all__ = ["nlvr2_image_names", "read_nlvr2"]
