"""RefCOCO / RefCOCO+ / RefCOCOg (REFER API layout) -> `RefRecord`s, one per referring sentence.

Inputs, as in the REFER repository (`refer.py`) that every REC paper uses:
* `refs(unc).p` / `refs(umd).p` / `refs(google).p`: a list of refs ``{"ref_id", "ann_id", "image_id",
  "split": "train"|"val"|"test"|"testA"|"testB", "sentences": [{"sent_id", "sent", "raw", "tokens"}],
  "category_id", "file_name"}``. It is distributed as a Python pickle; unpickling a file can run
  arbitrary code, so vlp refuses pickles unless `allow_pickle=True` and tells how to convert one to
  JSON once (`refcoco_pickle_to_json_command`).
* `instances.json`: COCO-style ``{"images": [{"id", "file_name", "width", "height"}], "annotations":
  [{"id", "image_id", "bbox": [x, y, w, h] (pixels), "category_id", ...}]}``.

Each ref becomes one RefRecord per sentence: ref_id "<ref_id>-<sent_id>", image_id = the image's
`file_name` (relative to the COCO train2014 folder), expression = the REFER-normalised `sent` (`raw`
when absent), candidates = every annotated box of the image in the instances file's order (the
"ground-truth boxes" setting of MAttNet/UNITER), target_index = the position of the ref's `ann_id`
among them. Boxes go from pixel xywh to normalised xyxy with the image's width/height; a box that
overshoots the border by at most one pixel (COCO bboxes are rounded from polygons) is clipped, one
that is further out or empty is an error. Splits are the refs' `split` values; `group` is "testA" /
"testB" for those splits (RefCOCO/RefCOCO+ people / objects subsets) and "" otherwise.
"""

from __future__ import annotations

import json
import pickle
import shlex
from pathlib import Path
from typing import Any

from vlp.data.formats.common import FormatData, Sink, folder, image_check, load_json, require_file
from vlp.data.records import Box, RefRecord

_PICKLE_SUFFIXES = (".p", ".pkl", ".pickle")
_GROUPS = ("testA", "testB")
_PIXEL_SLACK = 1.0  # pixels a COCO box may overshoot the image border before it counts as outside


def refcoco_pickle_to_json_command(path: str | Path) -> str:
    """The one-line shell command converting a REFER pickle to the JSON this reader takes."""
    src = Path(path)
    dst = src.with_suffix(".json")
    # double-quoted Python literals (json.dumps) so the shell quoting stays one plain '...' pair
    code = f'import json, pickle; json.dump(pickle.load(open({json.dumps(str(src))}, "rb")), open({json.dumps(str(dst))}, "w"))'
    return f"python -c {shlex.quote(code)}"


def _is_pickle(file: Path) -> bool:
    """A pickle by its first byte (protocol >= 2 starts with 0x80) or, for a .p/.pkl file, by not being JSON."""
    with file.open("rb") as handle:
        head = handle.read(64)
    if head[:1] == b"\x80":
        return True
    return file.suffix.lower() in _PICKLE_SUFFIXES and head.lstrip()[:1] not in (b"[", b"{")


def _load_refs(path: str | Path, allow_pickle: bool) -> list:
    """The refs list from JSON, or from a pickle only when explicitly allowed."""
    file = require_file(path, "RefCOCO refs file")
    if _is_pickle(file):
        if not allow_pickle:
            raise ValueError(
                f"{file} is a Python pickle; vlp does not unpickle user files by default because unpickling can run "
                f"arbitrary code. Convert it to JSON once, if you trust it:\n    {refcoco_pickle_to_json_command(file)}\n"
                f"then pass {file.with_suffix('.json')} (or pass allow_pickle=True to load the pickle as it is)."
            )
        with file.open("rb") as handle:
            refs = pickle.load(handle)  # noqa: S301 - the user opted in with allow_pickle=True
    else:
        refs = load_json(file, "RefCOCO refs file", "a list of refs {'ref_id', 'ann_id', 'image_id', 'split', 'sentences'}")
    if not isinstance(refs, list):
        raise ValueError(f"{file} must hold a list of refs {{'ref_id', 'ann_id', 'image_id', 'split', 'sentences'}}")
    return refs


def _normalised_box(bbox: Any, width: float, height: float) -> Box:
    """Pixel [x, y, w, h] -> normalised (x1, y1, x2, y2); ValueError when outside the image or empty."""
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        raise ValueError(f"bbox must be [x, y, w, h], got {bbox!r}")
    x, y, w, h = (float(v) for v in bbox)
    if w <= 0 or h <= 0:
        raise ValueError(f"bbox {bbox} is empty (w and h must be > 0)")
    x1, y1, x2, y2 = x, y, x + w, y + h
    if x1 < -_PIXEL_SLACK or y1 < -_PIXEL_SLACK or x2 > width + _PIXEL_SLACK or y2 > height + _PIXEL_SLACK:
        raise ValueError(f"bbox {bbox} (x, y, w, h in pixels) is outside the {width:g}x{height:g} image")
    x1, y1 = max(x1, 0.0), max(y1, 0.0)
    x2, y2 = min(x2, width), min(y2, height)
    return (x1 / width, y1 / height, x2 / width, y2 / height)


class _Image:
    """An image of the instances file with its annotation ids and normalised boxes (or box errors)."""

    def __init__(self, info: dict) -> None:
        self.info = info
        self.ann_ids: list[Any] = []
        self.boxes: list[Box | None] = []
        self.errors: dict[Any, str] = {}


def _index_instances(path: str | Path) -> dict[Any, _Image]:
    """image id -> _Image with every annotation's box converted once (errors kept per annotation)."""
    data = load_json(path, "RefCOCO instances file", "{'images': [{'id', 'file_name', 'width', 'height'}], 'annotations': [...]}")
    file = Path(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or not isinstance(data.get("annotations"), list):
        raise ValueError(f"{file} must be a COCO instances file: an object with 'images' and 'annotations' lists")
    images: dict[Any, _Image] = {}
    for index, info in enumerate(data["images"]):
        if not isinstance(info, dict) or "id" not in info or "file_name" not in info:
            raise ValueError(f"{file} image {index}: expected an object with 'id', 'file_name', 'width', 'height'")
        images[info["id"]] = _Image(info)
    for index, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or "id" not in ann or "image_id" not in ann:
            raise ValueError(f"{file} annotation {index}: expected an object with 'id', 'image_id' and 'bbox'")
        image = images.get(ann["image_id"])
        if image is None:
            continue  # an annotation of an image absent from 'images' cannot be referred to
        image.ann_ids.append(ann["id"])
        try:
            width, height = float(image.info["width"]), float(image.info["height"])
            if width <= 0 or height <= 0:
                raise ValueError(f"image size {width:g}x{height:g} is not positive")
            image.boxes.append(_normalised_box(ann.get("bbox"), width, height))
        except (KeyError, TypeError, ValueError) as exc:
            image.boxes.append(None)
            image.errors[ann["id"]] = f"annotation {ann['id']}: {exc}"
    return images


def read_refcoco(
    refs_path: str | Path,
    instances_path: str | Path,
    image_root: str | Path | None = None,
    allow_pickle: bool = False,
    skip_bad: bool = False,
) -> FormatData:
    """Read REFER refs + COCO instances -> `FormatData(task="rec", splits={ref split: [RefRecord]})`.

    A ref whose image or annotation is not in the instances file, whose image has a box outside the
    image (the target or any candidate), without sentences, or (with `image_root`) whose image file is
    missing is an error naming the ref id, the image and both files; with `skip_bad=True` the ref (all
    its sentences) is skipped and counted once.
    """
    refs = _load_refs(refs_path, allow_pickle)
    images_by_id = _index_instances(instances_path)
    rfile, ifile = Path(refs_path), Path(instances_path)
    files = f"{rfile} + {ifile}"
    sink = Sink(skip_bad)
    images = folder(image_root)
    splits: dict[str, list[RefRecord]] = {}
    for index, ref in enumerate(refs):
        ref_id = ref.get("ref_id", f"#{index}") if isinstance(ref, dict) else f"#{index}"
        where = f"ref {ref_id} of {files}"
        if not isinstance(ref, dict) or not all(k in ref for k in ("ref_id", "ann_id", "image_id", "split", "sentences")):
            sink.bad(f"{where}: expected an object with 'ref_id', 'ann_id', 'image_id', 'split' and 'sentences'")
            continue
        image = images_by_id.get(ref["image_id"])
        if image is None:
            sink.bad(f"{where}: image {ref['image_id']} is not in {ifile}")
            continue
        where = f"ref {ref_id} (image {image.info['file_name']}) of {files}"
        if ref["ann_id"] not in image.ann_ids:
            sink.bad(f"{where}: annotation {ref['ann_id']} is not an annotation of image {ref['image_id']} in {ifile}")
            continue
        if image.errors:
            sink.bad(f"{where}: {'; '.join(image.errors.values())}")
            continue
        sentences = ref["sentences"]
        if not isinstance(sentences, list) or not sentences:
            sink.bad(f"{where}: no sentences")
            continue
        image_id = str(image.info["file_name"])
        if not image_check(images, image_id, where, sink):
            continue
        candidates = tuple(b for b in image.boxes if b is not None)
        target = image.ann_ids.index(ref["ann_id"])
        split = str(ref["split"])
        group = split if split in _GROUPS else ""
        try:
            built = []
            for position, sentence in enumerate(sentences):
                if not isinstance(sentence, dict):
                    raise ValueError(f"sentence {position} is not an object")
                text = sentence.get("sent") or sentence.get("raw") or ""
                sent_id = sentence.get("sent_id", position)
                built.append(
                    RefRecord(
                        ref_id=f"{ref_id}-{sent_id}",
                        image_id=image_id,
                        expression=str(text),
                        target_box=candidates[target],
                        candidates=candidates,
                        target_index=target,
                        group=group,
                    )
                )
        except ValueError as exc:
            sink.bad(f"{where}: {exc}")
            continue
        splits.setdefault(split, []).extend(built)
    return FormatData(task="rec", splits=splits, images=images, skipped=sink.report, sources=(str(rfile), str(ifile)))


__all__ = ["read_refcoco", "refcoco_pickle_to_json_command"]
