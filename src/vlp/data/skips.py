"""Bad samples met while data is decoded: a one-line error naming the file, or a counted skip (`--skip-bad`).

Annotation files are checked when they are read (`vlp.data.formats`: a malformed record is an error or a
counted skip). What can only be found when a sample is decoded (a truncated JPEG, a region-feature npz of the
wrong shape or holding NaN) is found inside a dataset's `__getitem__` / `__iter__`, often in a DataLoader
worker process. This module is the one protocol every such reader follows (map-style datasets in
`vlp.data.datasets` / `vlp.data.regions`, streaming readers alike):

  BadSample(reason, where, detail)   frozen; `reason` a short category ("undecodable image", "missing image",
                                     "missing features", "malformed features", "non-finite features"),
                                     `where` the file (or record id), `detail` the one-line message naming it
                                     and the fix.
  DataError(sample)                  a ValueError whose message is `sample.detail`; readers raise it for a bad
                                     sample. With skipping off it propagates: the CLI prints `error: <detail>`.
                                     `data_error(reason, where, exc, detail=None)` builds one from a caught error.
  skip_or_raise(error, skip)         with skipping on, the BadSample a reader returns (or yields) INSTEAD of an
                                     item; otherwise re-raises the error.
  SkippingCollate(collate_fn)        wraps a collate function: drops the BadSamples of a batch and carries them
                                     on `Batch.skipped` (a batch of only bad samples is `empty_batch(bad)`, 0
                                     rows), so the markers travel back from the worker with the batch. The
                                     Trainer wraps every collate function with it.
  SkipLedger(max_fraction)           counts samples seen and skipped by reason; `check()` refuses (DataError)
                                     when more than `max_fraction` were bad; `write(run_dir)` writes
                                     `skipped_records.json` (SKIPPED_FILE); `state_dict` / `load_state_dict` for
                                     resume. The Trainer keeps one (data.max_bad_fraction) for any dataset with
                                     a true `skip_bad` attribute.
  unwrap_worker_error(err)           the exception a DataLoader worker raised, as if it had been raised in the
                                     main process (torch re-raises it with the worker's traceback pasted into
                                     the message; the one-line message is recovered, the traceback kept as a note).

When the limit is judged (`SkipLedger.over_limit`): at the end of a run, the observed share is compared with
`max_fraction`; before that, a run is refused early only once at least ceil(1 / max_fraction) samples were
seen AND the 95 % Wilson lower bound of the bad share is above the limit, so a bad sample or two in the
first batches (a noisy estimate) does not abort, while a mostly broken data set stops within a few steps.
`max_fraction` 0 refuses at the first bad sample; 1 never refuses.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from vlp.types import Batch

SKIPPED_FILE = "skipped_records.json"  # written by `SkipLedger.write` into the run directory
FRACTION_SETTING = "data.max_bad_fraction"  # the config key named in the refusal


@dataclass(frozen=True)
class BadSample:
    """A sample that could not be used: `reason` (short category), `where` (file or record id), `detail` (the
    one-line message naming it and the fix). Returned by a reader instead of an item when skipping is on."""

    reason: str
    where: str
    detail: str


def error_text(error: BaseException) -> str:
    """The one-line message of an exception (a KeyError's message without the quotes `str()` adds)."""
    if isinstance(error, KeyError) and len(error.args) == 1 and isinstance(error.args[0], str):
        return error.args[0]
    return str(error)


class DataError(ValueError):
    """A bad sample as an exception: `str()` is its one-line detail, `.sample` the `BadSample`."""

    def __init__(self, sample: BadSample | str) -> None:
        if isinstance(sample, str):  # e.g. rebuilt from a message (`unwrap_worker_error`)
            sample = BadSample("bad data", "", sample)
        super().__init__(sample.detail)
        self.sample = sample

    def __reduce__(self) -> tuple:  # pickles with its BadSample (default: the message only)
        return (type(self), (self.sample,))


def data_error(reason: str, where: str | Path, error: BaseException, detail: Optional[str] = None) -> DataError:
    """`DataError(BadSample(reason, str(where), detail or error_text(error)))`, to `raise ... from error`."""
    return DataError(BadSample(reason, str(where), detail if detail is not None else error_text(error)))


def skip_or_raise(error: DataError, skip: bool) -> BadSample:
    """`error.sample` when skipping is on (the reader returns it instead of an item), else re-raise `error`."""
    if not skip:
        raise error
    return error.sample


def empty_batch(skipped: Sequence[BadSample] = ()) -> Batch:
    """A Batch of 0 rows (input_ids / attention_mask (0, 0)) carrying `skipped`: a batch whose every item was bad."""
    return Batch(input_ids=torch.zeros((0, 0), dtype=torch.long), attention_mask=torch.zeros((0, 0), dtype=torch.long),
                 image_ids=torch.zeros((0,), dtype=torch.long), sample_keys=torch.zeros((0,), dtype=torch.long),
                 skipped=tuple(skipped))


class SkippingCollate:
    """`collate_fn` over the good items of a batch, with its BadSamples on `Batch.skipped` (module docstring).

    A class, not a closure, so DataLoader workers started with `spawn` can pickle it. Batches without bad items
    are exactly `collate_fn(items)`; a batch of only bad items is `empty_batch(bad)`.
    """

    def __init__(self, collate_fn: Callable[[list], Batch]) -> None:
        self.collate_fn = collate_fn

    def __call__(self, items: Sequence[Any]) -> Batch:
        bad = tuple(item for item in items if isinstance(item, BadSample))
        if not bad:
            return self.collate_fn(list(items))
        good = [item for item in items if not isinstance(item, BadSample)]
        if not good:
            return empty_batch(bad)
        batch = self.collate_fn(good)
        batch.skipped = bad
        return batch


# ------------------------------------------------------------------------------------------ ledger
def wilson_lower(successes: int, n: int, z: float = 1.959963984540054) -> float:
    """95 % Wilson score lower bound of a rate `successes / n` (0 for n = 0)."""
    if n <= 0:
        return 0.0
    p = successes / n
    denominator = 1.0 + z * z / n
    centre = p + z * z / (2 * n)
    half = z * math.sqrt(p * (1.0 - p) / n + z * z / (4 * n * n))
    return max(0.0, (centre - half) / denominator)


class SkipLedger:
    """Samples seen and skipped while training (or evaluating), by reason, with the first `keep` examples.

    `add(seen, bad)` after each batch; `over_limit()` / `check()` apply `max_fraction` (module docstring);
    `report()` is what `write(run_dir)` puts in `skipped_records.json`: {"seen", "skipped", "fraction",
    "max_fraction", "by_reason": {reason: count}, "examples": [{"reason", "where", "detail"}, ...]}.
    `state_dict()` / `load_state_dict()` carry the counts through a checkpoint (resume stays exact).
    """

    def __init__(self, max_fraction: float = 0.01, keep: int = 5) -> None:
        if not 0.0 <= max_fraction <= 1.0:
            raise ValueError(f"max_fraction must lie in [0, 1], got {max_fraction}")
        self.max_fraction = float(max_fraction)
        self.keep = int(keep)
        self.seen = 0
        self.skipped = 0
        self.by_reason: dict[str, int] = {}
        self.examples: list[BadSample] = []

    def add(self, seen: int, bad: Sequence[BadSample] = (), skipped: Optional[int] = None) -> None:
        """Count `seen` samples read (good and bad) and the `bad` ones among them. `skipped` (default
        len(bad)) is the number added to the total when it differs from the examples at hand (a distributed
        run adds every rank's count, its reasons stay per rank until `merge`)."""
        self.seen += int(seen)
        self.skipped += len(bad) if skipped is None else int(skipped)
        self.merge_reasons(bad)

    def merge_reasons(self, bad: Sequence[BadSample], counts: Optional[dict[str, int]] = None) -> None:
        """Add the reasons (and the first examples) of `bad`, or `counts` by reason, without touching the totals."""
        for sample in bad:
            if counts is None:
                self.by_reason[sample.reason] = self.by_reason.get(sample.reason, 0) + 1
            if len(self.examples) < self.keep:
                self.examples.append(sample)
        for reason, count in (counts or {}).items():
            self.by_reason[reason] = self.by_reason.get(reason, 0) + int(count)

    @property
    def fraction(self) -> float:
        """skipped / seen (0 before anything was seen)."""
        return self.skipped / self.seen if self.seen else 0.0

    def over_limit(self, final: bool = False) -> bool:
        """Whether more than `max_fraction` of the samples were bad: at the end (`final`) by the observed share;
        before, once ceil(1 / max_fraction) samples were seen and the 95 % lower bound exceeds the limit."""
        if self.skipped == 0 or self.fraction <= self.max_fraction:
            return False
        if final or self.max_fraction == 0.0:
            return True
        return self.seen >= math.ceil(1.0 / self.max_fraction) and wilson_lower(self.skipped, self.seen) > self.max_fraction

    def refusal(self) -> str:
        """The one-line error: how many of how many were bad, by reason, the limit, the first files, the fix."""
        reasons = ", ".join(f"{reason}: {count}" for reason, count in sorted(self.by_reason.items(), key=lambda kv: -kv[1]))
        files = "; ".join(s.where or s.detail for s in self.examples[:3])
        return (f"{self.skipped} of {self.seen} samples ({100 * self.fraction:.1f} %) were bad ({reasons}), more than "
                f"{FRACTION_SETTING} = {self.max_fraction:g} allows; first: {files}; repair or remove them, or raise "
                f"{FRACTION_SETTING} (e.g. --set {FRACTION_SETTING}={min(1.0, max(2 * self.fraction, 0.01)):.2g})")

    def check(self, final: bool = False) -> None:
        """DataError(`refusal()`) when `over_limit(final)`."""
        if self.over_limit(final):
            raise DataError(BadSample("too many bad samples", "", self.refusal()))

    def summary(self) -> str:
        """One line for the log, e.g. `skipped 2 of 40 samples (5.0 %; undecodable image: 2), limit 10 %`."""
        reasons = ", ".join(f"{reason}: {count}" for reason, count in sorted(self.by_reason.items()))
        return (f"skipped {self.skipped} of {self.seen} samples ({100 * self.fraction:.1f} %"
                f"{'; ' + reasons if reasons else ''}), limit {100 * self.max_fraction:g} % ({FRACTION_SETTING})")

    def report(self) -> dict[str, Any]:
        """The content of `skipped_records.json` (class docstring)."""
        return {"seen": self.seen, "skipped": self.skipped, "fraction": self.fraction, "max_fraction": self.max_fraction,
                "by_reason": dict(sorted(self.by_reason.items())), "examples": [asdict(s) for s in self.examples]}

    def write(self, run_dir: str | Path) -> Path:
        """Write `report()` to `<run_dir>/skipped_records.json` (atomically); returns the path."""
        path = Path(run_dir) / SKIPPED_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.report(), indent=2) + "\n")
        tmp.replace(path)
        return path

    def state_dict(self) -> dict[str, Any]:
        """Plain data (ints, floats, strings) for a checkpoint: `report()`."""
        return self.report()

    def load_state_dict(self, state: dict[str, Any], reasons: bool = True) -> None:
        """Restore the counts of `state_dict()`; `reasons=False` restores the totals only (the other ranks of a
        distributed run, whose reasons rank 0 saved merged)."""
        self.seen, self.skipped = int(state.get("seen", 0)), int(state.get("skipped", 0))
        self.by_reason, self.examples = {}, []
        if reasons:
            self.by_reason = {str(k): int(v) for k, v in dict(state.get("by_reason", {})).items()}
            self.examples = [BadSample(**e) for e in state.get("examples", [])][: self.keep]

    def __repr__(self) -> str:
        return f"SkipLedger(seen={self.seen}, skipped={self.skipped}, by_reason={self.by_reason})"


# ------------------------------------------------------------------------------------------ workers
_WORKER_HEADER = re.compile(r"^Caught (\w+) in DataLoader worker process \d+\.\nOriginal Traceback")


def worker_error_message(error: BaseException) -> Optional[str]:
    """The original message of an exception torch re-raised from a DataLoader worker (`Caught ValueError in
    DataLoader worker process 0. Original Traceback ...`), None for any other exception."""
    text = error_text(error)
    match = _WORKER_HEADER.match(text)
    if match is None:
        return None
    name = match.group(1)
    lines = text.rstrip("\n").split("\n")
    prefixes = {name, f"{type(error).__module__}.{type(error).__qualname__}", type(error).__qualname__}
    for index in range(len(lines) - 1, 0, -1):  # the last exception of the chain is printed last
        head, colon, _ = lines[index].partition(":")
        if colon and head in prefixes:
            return "\n".join(lines[index:])[len(head) + 2:]
        if lines[index] in prefixes:  # raised without a message
            return ""
    return None


def unwrap_worker_error(error: BaseException) -> BaseException:
    """`error` as its DataLoader worker raised it: the same type with the original message (the worker's
    traceback added as a note), so a bad file gives the same one-line error with 0 or N workers. Only the
    types the CLI reports in one line (ValueError, FileNotFoundError) are unwrapped; any other exception (a bug:
    its worker traceback matters) and exceptions not from a worker are returned unchanged."""
    if not isinstance(error, (ValueError, FileNotFoundError)):
        return error
    message = worker_error_message(error)
    if message is None:
        return error
    try:
        original = type(error)(message)
    except Exception:  # noqa: BLE001 - an exception type that takes other arguments: keep torch's
        return error
    original.add_note(error_text(error))
    return original


__all__ = [
    "BadSample",
    "DataError",
    "SKIPPED_FILE",
    "SkipLedger",
    "SkippingCollate",
    "data_error",
    "empty_batch",
    "skip_or_raise",
    "unwrap_worker_error",
]
