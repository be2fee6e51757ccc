"""Shared pieces of the real-format readers: the image folder, the skip report, the result type and
the file/record error plumbing.

Every reader follows one error contract (issue "bring your own data"):
  * a problem with a whole file (missing, not JSON, wrong top-level shape) always raises, naming the
    file and what was expected;
  * a problem with one record (unknown label, box outside the image, missing image, question without
    annotations, ...) raises naming the record id AND the file, unless the caller passed
    `skip_bad=True`: then the record is dropped and counted in `FormatData.skipped`, which keeps the
    first few reasons so the user can still find and fix them;
  * an image that exists but cannot be decoded is found only when it is read: `FolderImages.load` raises
    `vlp.data.skips.DataError` naming the file; consumers that can drop an image skip and count it when the
    caller asks (`RetrievalSet.build(on_bad=...)`, `RecordPairDataset(skip_bad=True)`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from PIL import Image, UnidentifiedImageError

from vlp.data.records import TaskData
from vlp.data.skips import BadSample, DataError

#: Split names recognised at the end of an annotation file name (`coco_karpathy_test.json` -> "test").
KNOWN_SPLITS = ("train", "restval", "val", "dev", "test", "testA", "testB", "test1", "test2", "minival")


class SkipReport:
    """Counts the bad records a reader skipped (`skip_bad=True`) and keeps the first `keep` reasons.

    A skipped record is never silent: `count` says how many, `reasons` holds the first few messages
    (each naming the record and the file, like the error that would have been raised), and `str()`
    gives a one-paragraph summary to log.
    """

    def __init__(self, keep: int = 5) -> None:
        if keep < 0:
            raise ValueError(f"SkipReport keep must be >= 0, got {keep}")
        self.keep = keep
        self.count = 0
        self.reasons: list[str] = []

    def add(self, reason: str) -> None:
        """Count one skipped record; remember its reason if fewer than `keep` are kept."""
        self.count += 1
        if len(self.reasons) < self.keep:
            self.reasons.append(reason)

    def merge(self, other: "SkipReport") -> None:
        """Fold another report into this one (e.g. several files of one data set)."""
        self.count += other.count
        for reason in other.reasons:
            if len(self.reasons) >= self.keep:
                break
            self.reasons.append(reason)

    def __bool__(self) -> bool:
        return self.count > 0

    def __str__(self) -> str:
        if not self.count:
            return "no records skipped"
        more = self.count - len(self.reasons)
        lines = [f"skipped {self.count} bad record(s):"] + [f"  - {r}" for r in self.reasons]
        if more > 0:
            lines.append(f"  ... and {more} more")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"SkipReport(count={self.count}, reasons={self.reasons!r})"


@dataclass
class FormatData(TaskData):
    """`TaskData` as produced by a real-format reader: the records per split, the image source (when an
    image root was given) and the answer vocabulary (easy-vqa), plus what was skipped and from which files.

    It *is* a `TaskData`, so every task consumes it unchanged.
    """

    skipped: SkipReport = field(default_factory=SkipReport)
    sources: tuple[str, ...] = ()

    def records(self, split: str | None = None) -> list:
        """The records of one split, or of all splits in file order when `split` is None."""
        if split is None:
            return [r for rows in self.splits.values() for r in rows]
        if split not in self.splits:
            raise KeyError(f"no split {split!r} in {', '.join(self.sources) or 'this data'}; have {sorted(self.splits)}")
        return self.splits[split]


class FolderImages:
    """An `ImageSource` over a folder: `image_id` is a path relative to `root` (absolute paths are used
    as they are). `load` returns an RGB PIL image.

    Errors name the file: a missing image raises FileNotFoundError with the full path (and the record
    when the caller passes `record=`), an undecodable one raises `DataError` (a ValueError; reason
    "undecodable image") naming the file, because one bad file in a 100k-image annotation list must be
    findable without a debugger.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.root}; pass the directory that holds the images")

    def path(self, image_id: str) -> Path:
        """The file an image id refers to."""
        return self.root / image_id

    def exists(self, image_id: str) -> bool:
        return self.path(image_id).is_file()

    def load(self, image_id: str, record: str | None = None) -> Image.Image:
        """Decode `image_id` to RGB. `record` (e.g. "question 42 of vqa_val.json") is named in errors."""
        file = self.path(image_id)
        which = f" (needed by {record})" if record else ""
        if not file.is_file():
            raise FileNotFoundError(
                f"image not found: {file}{which}; check the image root ({self.root}) or remove the record"
            )
        try:
            with Image.open(file) as img:
                img.load()
                return img.convert("RGB")
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
            raise DataError(BadSample(
                "undecodable image", str(file),
                f"cannot decode image {file}{which}: {exc}: re-export it or remove it from the annotation file",
            )) from exc

    def __repr__(self) -> str:
        return f"FolderImages({str(self.root)!r})"


class Sink:
    """Routes a bad record either to an exception (default) or to a `SkipReport` (`skip_bad=True`)."""

    def __init__(self, skip_bad: bool, report: SkipReport | None = None) -> None:
        self.skip_bad = skip_bad
        self.report = report if report is not None else SkipReport()

    def bad(self, message: str, error: type[Exception] = ValueError) -> None:
        """Raise `error(message)`, or count it when skipping. Callers `continue` after it returns."""
        if self.skip_bad:
            self.report.add(message)
            return
        raise error(message)


def require_file(path: str | Path, what: str) -> Path:
    """`Path(path)`, or FileNotFoundError naming it (`what` = "SNLI-VE annotation file", ...)."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{what} not found: {file}")
    return file


def load_json(path: str | Path, what: str, expected: str) -> Any:
    """Parse a JSON file; errors name the file and the schema `expected` (a short description)."""
    file = require_file(path, what)
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{file} is not valid JSON ({exc}); expected {expected}") from exc


def iter_jsonl(file: Path, sink: Sink) -> Iterator[tuple[int, dict]]:
    """(1-based line number, object) for each non-blank line; a line that is not a JSON object is a bad
    record (raised or skipped). A file that holds one JSON document instead of lines is a file error."""
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{file} is not UTF-8 text ({exc}); expected JSON lines") from exc
    stripped = text.lstrip()
    if stripped.startswith("["):
        raise ValueError(f"{file} holds a JSON list; this reader expects JSON lines (one object per line)")
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            sink.bad(f"{file} line {number}: not valid JSON ({exc})")
            continue
        if not isinstance(obj, dict):
            sink.bad(f"{file} line {number}: expected a JSON object, got {type(obj).__name__}")
            continue
        yield number, obj


def split_from_name(file: Path) -> str:
    """The split a file name ends with (`snli_ve_dev.jsonl` -> "dev", `dev.json` -> "dev"), else the stem."""
    stem = file.name.split(".")[0]
    last = stem.rsplit("_", 1)[-1]
    return last if last in KNOWN_SPLITS else stem


def image_check(images: FolderImages | None, image_id: str, where: str, sink: Sink) -> bool:
    """True when no folder was given or the image exists; otherwise a bad record naming it (False)."""
    if images is None or images.exists(image_id):
        return True
    sink.bad(
        f"{where}: image not found: {images.path(image_id)}; check the image root ({images.root}) or remove the record",
        FileNotFoundError,
    )
    return False


def folder(image_root: str | Path | None) -> FolderImages | None:
    """`FolderImages(image_root)` or None."""
    return None if image_root is None else FolderImages(image_root)


def require_keys(obj: Any, keys: tuple[str, ...], where: str, sink: Sink) -> bool:
    """True when `obj` is a dict holding every key; else a bad record naming the missing ones (False)."""
    if not isinstance(obj, dict):
        sink.bad(f"{where}: expected an object with keys {', '.join(keys)}, got {type(obj).__name__}")
        return False
    missing = [k for k in keys if k not in obj]
    if missing:
        sink.bad(f"{where}: missing key(s) {', '.join(repr(k) for k in missing)} (has {', '.join(sorted(map(str, obj)))})")
        return False
    return True


__all__ = [
    "FolderImages",
    "FormatData",
    "KNOWN_SPLITS",
    "Sink",
    "SkipReport",
    "folder",
    "image_check",
    "iter_jsonl",
    "load_json",
    "require_file",
    "require_keys",
    "split_from_name",
]
