"""Region inputs from precomputed detector features (BUTD / UNITER npz) and the user-data pre-training sources.

CMAL (cmal.md §3.1) was trained on frozen BUTD Faster R-CNN features as UNITER distributes them: per image
`features` (N x 2048), `norm_bb` (N x 6: normalised x1, y1, x2, y2, w, h), `soft_labels` (N x 1601, column
0 = background) and `conf` (N,), with an adaptive N. This module reads such features so CMAL can be
pre-trained on them (`data.source: regions`), and builds the other user-data source (`data.source:
karpathy`: captions + images without boxes, for which CMAL falls back to grid cells). Downstream
fine-tuning reads the same files (`task.region_features`, `RegionFeatureSource`: records' images become
their precomputed regions, no pixels; cmal.md §9 — UNITER / CMAL fine-tune on the BUTD features).

Two npz layouts are read (`open_region_features` picks by path):

  (a) a directory of `<image_id>.npz`, one per image (UNITER's per-image dumps), read lazily per image:
        features     (N, D) float (float16 is fine; returned as float32)
        norm_bb      (N, 4 | 6 | 7) normalised x1, y1, x2, y2 [, w, h [, w*h]]   (UNITER's name), or
        boxes        (N, 4 | 6 | 7) normalised, or PIXEL boxes when the npz also holds `image_w`, `image_h`
        soft_labels  (N, C+1) optional class distribution, column 0 = background
        conf         (N,) optional detection confidence (for the adaptive N)
  (b) ONE `.npz` holding many images, loaded into memory once (use (a) for corpora larger than RAM):
        image_ids (I,) str, features (I, Nmax, D), norm_bb | boxes (I, Nmax, k), num_boxes (I,),
        optional soft_labels (I, Nmax, C+1), conf (I, Nmax), image_w / image_h (I,) for pixel boxes.

Region labels are `class id + 1` (0 = background / unknown, `vlp.types.Batch`), the hard class of the
soft distribution over the NON-background columns: `argmax(p[:, 1:]) + 1`. This FIXES cmal.md §12 quirk 1
(the reference code's `argmax(p[:, 1:-1])` can never pick the last class, so BUTD class 1599 is lost);
`faithful_labels=True` (`data.region_labels_faithful: true`) reproduces the reference exactly. Without
`soft_labels` every region has label 0: no anchors (CMAL warns; see `vlp.methods.cmal`).

Adaptive N (UNITER `_compute_nbb`, cmal.md §3.1), an option (`data.adaptive_regions`): keep the first
`clip(#{conf > conf_th}, min_bb, max_bb)` regions (BUTD dumps are sorted by confidence).

Every bad input fails with the file (and image) it came from and the fix: a missing npz for an image
id, a missing array key, wrong shapes, boxes outside [0, 1], NaN / inf in any array (`DataError`, reason
"non-finite features", counting them), soft_labels that disagree with the class vocabulary, a feature dim
that differs from the configured `method.region_feat_dim`. Datasets read through `RegionFeatures.read`, which
turns every per-image problem into a `vlp.data.skips.DataError` (a ValueError naming the file), so that with
`data.skip_bad` the image's rows become counted `BadSample`s instead (`RegionCaptionDataset`).
"""

from __future__ import annotations

import string
import warnings
import zipfile
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from vlp.config import ConfigError, RunConfig
from vlp.data.datasets import CaptionEntry, CaptionRowDataset, CaptionRows, ImageCaptionDataset, collate, read_caption_file
from vlp.data.lexicon import morphology_variants
from vlp.data.skips import BadSample, DataError, data_error
from vlp.data.tokenizer import (
    SPECIAL_TOKENS,
    SUBWORD_PREFIX,
    TextTokenizer,
    _learn_wordpieces,
    _split_words,
)

BOX_KEYS = ("norm_bb", "boxes")
BOX_TOLERANCE = 1e-4  # normalised coordinates may overshoot [0, 1] by float rounding only


# ------------------------------------------------------------------------------------------ vocabulary
def read_class_vocab(path: str | Path) -> list[tuple[str, ...]]:
    """BUTD `objects_vocab.txt`: line k = class k (soft_labels column k + 1), comma-separated aliases
    (`refrigerator,fridge`). Returns per class its lower-cased aliases — CMAL's `class_words` (cmal.md
    §3.2: the lexicon splits each alias on spaces and adds the plural/singular forms).

    Trailing blank lines are ignored; a blank line inside would shift every later class, so it is an error.
    """
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(
            f"class vocabulary file not found: {file}; set data.class_vocab to the detector's objects_vocab.txt "
            f"(one class per line, aliases separated by commas)"
        )
    lines = file.read_text(encoding="utf-8").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    classes: list[tuple[str, ...]] = []
    for number, line in enumerate(lines, start=1):
        aliases = tuple(a.strip().lower() for a in line.split(",") if a.strip())
        if not aliases:
            raise ValueError(
                f"{file} line {number} is blank: line k names class k (soft_labels column k + 1), so a blank line "
                f"shifts every later class; remove it or put the class name there"
            )
        classes.append(aliases)
    if not classes:
        raise ValueError(f"{file} holds no class names; expected one class per line (BUTD objects_vocab.txt)")
    return classes


def soft_labels_to_classes(soft_labels: np.ndarray, faithful: bool = False) -> np.ndarray:
    """Hard region labels from a detector's class distribution (cmal.md §3.3, §7).

    soft_labels (N, C+1), column 0 = background -> (N,) int64 label = class id + 1 in [1, C]:
      fixed (default):  argmax over columns 1..C             (every class reachable)
      faithful:         argmax over columns 1..C-1 (+1)      (reference code `p[:, 1:-1]`, §12 quirk 1:
                                                             the last class C is never chosen)
    Background is excluded either way (as the code: a region is always labelled with an object class).
    """
    if soft_labels.ndim != 2 or soft_labels.shape[1] < 2:
        raise ValueError(f"soft_labels must be (N, C+1) with C >= 1, got shape {soft_labels.shape}")
    if faithful:
        if soft_labels.shape[1] < 3:
            raise ValueError("faithful labels (argmax of p[:, 1:-1]) need C >= 2 classes")
        return soft_labels[:, 1:-1].argmax(axis=1).astype(np.int64) + 1
    return soft_labels[:, 1:].argmax(axis=1).astype(np.int64) + 1


def adaptive_num_regions(conf: np.ndarray, conf_th: float = 0.2, min_bb: int = 10, max_bb: int = 100) -> int:
    """UNITER's adaptive N (`data/data.py::_compute_nbb`, cmal.md §3.1): clip(#{conf > conf_th}, min_bb,
    max_bb), never more than the regions present."""
    count = int((np.asarray(conf) > conf_th).sum())
    return min(max(count, min_bb), max_bb, int(np.asarray(conf).shape[0]))


# ------------------------------------------------------------------------------------------ records
@dataclass
class RegionRecord:
    """The regions of one image, validated and normalised.

    features:    (N, D) float32
    boxes:       (N, 7) float32 normalised [x1, y1, x2, y2, w, h, w*h] (cmal.md §3.1; stored w, h kept)
    labels:      (N,) int64 class id + 1 in [1, C], or None (no soft_labels: no anchors)
    soft_labels: (N, C+1) float32 or None;  conf: (N,) float32 or None
    """

    image_id: str
    features: np.ndarray
    boxes: np.ndarray
    labels: Optional[np.ndarray] = None
    soft_labels: Optional[np.ndarray] = None
    conf: Optional[np.ndarray] = None

    @property
    def num_regions(self) -> int:
        return int(self.features.shape[0])


class RegionFeatures(ABC):
    """Base of the two npz layouts: the options and the per-image validation (`_record`).

    Args:
        path: the npz file or directory (named in every error).
        feat_dim: expected feature dim D (`method.region_feat_dim`), or None (any).
        num_classes: C of the class vocabulary (soft_labels must have C+1 columns), or None (any).
        faithful_labels: reproduce the reference `argmax(p[:, 1:-1])` (cmal.md §12 quirk 1).
        adaptive, conf_th, min_bb, max_bb: UNITER's adaptive N (needs `conf`).
    """

    def __init__(
        self,
        path: str | Path,
        feat_dim: Optional[int] = None,
        num_classes: Optional[int] = None,
        faithful_labels: bool = False,
        adaptive: bool = False,
        conf_th: float = 0.2,
        min_bb: int = 10,
        max_bb: int = 100,
    ) -> None:
        if adaptive and not 1 <= min_bb <= max_bb:
            raise ValueError(f"adaptive regions need 1 <= min_bb <= max_bb, got min_bb={min_bb}, max_bb={max_bb}")
        self.path = Path(path)
        self.feat_dim = feat_dim
        self.num_classes = num_classes
        self.faithful_labels = faithful_labels
        self.adaptive, self.conf_th, self.min_bb, self.max_bb = adaptive, conf_th, min_bb, max_bb

    @abstractmethod
    def __getitem__(self, image_id: str) -> RegionRecord:
        """The validated regions of one image (errors name the file and the fix)."""

    @abstractmethod
    def missing(self, image_ids: Sequence[str]) -> list[str]:
        """The ids among `image_ids` this source has no features for (cheap: no feature is read)."""

    @abstractmethod
    def location(self, image_id: str) -> str:
        """Where the features of `image_id` are (or would be) stored, for messages."""

    def read(self, image_id: str) -> RegionRecord:
        """`self[image_id]` for datasets: any problem with this image's features is a `DataError` naming the file
        (reason "missing features", "malformed features" or "non-finite features"), which `skip_bad` datasets
        turn into a `BadSample`."""
        try:
            return self[image_id]
        except DataError:
            raise
        except (FileNotFoundError, KeyError, ValueError) as error:
            reason = "missing features" if self.missing([image_id]) else "malformed features"
            raise data_error(reason, self.location(image_id), error) from error

    @staticmethod
    def _check_finite(array: np.ndarray, key: str, image_id: str, where: str) -> None:
        """DataError (reason "non-finite features") naming the file, the array and the count when `array` holds
        NaN or inf."""
        if not np.issubdtype(array.dtype, np.floating):
            return
        bad = int(np.count_nonzero(~np.isfinite(array)))
        if bad:
            of = "" if f"image {image_id!r}" in where else f" of image {image_id!r}"
            raise DataError(BadSample("non-finite features", where, (
                f"{where}: array '{key}'{of} holds {bad} non-finite value(s) (NaN or inf) among its {array.size}; "
                f"re-extract this image's features or remove the image (data.skip_bad / --skip-bad skips such images)")))

    def _record(self, image_id: str, get: Callable[[str], Optional[np.ndarray]], where: str) -> RegionRecord:
        """Validate one image's arrays (`get(key)` -> array or None) and normalise them (`RegionRecord`)."""
        features = get("features")
        if features is None:
            raise KeyError(f"{where}: missing array 'features' (N, D); the npz must hold the region features")
        features = np.asarray(features)
        if features.ndim != 2 or not np.issubdtype(features.dtype, np.number):
            raise ValueError(f"{where}: 'features' must be a numeric (N, D) array, got {features.dtype} {features.shape}")
        n, dim = features.shape
        self._check_finite(features, "features", image_id, where)
        if self.feat_dim is not None and dim != self.feat_dim:
            raise ValueError(
                f"{where}: features have dim {dim} but the model is configured for {self.feat_dim} "
                f"(method.region_feat_dim; 0 = the ViT width); set method.region_feat_dim: {dim}"
            )
        key = next((k for k in BOX_KEYS if get(k) is not None), None)
        if key is None:
            raise KeyError(f"{where}: missing array 'norm_bb' (UNITER, N x 4|6|7 normalised) or 'boxes' (N x 4); "
                           f"every region needs its box")
        boxes = np.asarray(get(key), dtype=np.float64)
        if boxes.ndim != 2 or boxes.shape[0] != n or boxes.shape[1] not in (4, 6, 7):
            raise ValueError(f"{where}: '{key}' must have shape ({n}, 4 | 6 | 7) to match features ({n}, {dim}), "
                             f"got {boxes.shape}")
        self._check_finite(boxes, key, image_id, where)
        width, height = get("image_w"), get("image_h")
        if key == "boxes" and width is not None and height is not None:  # pixel boxes
            if boxes.shape[1] != 4:
                raise ValueError(f"{where}: pixel 'boxes' (with image_w / image_h) must be (N, 4) x1, y1, x2, y2, "
                                 f"got {boxes.shape}")
            w, h = float(np.asarray(width).reshape(-1)[0]), float(np.asarray(height).reshape(-1)[0])
            if not (w > 0 and h > 0):
                raise ValueError(f"{where}: image_w / image_h must be positive, got {w} x {h}")
            boxes = boxes / np.array([w, h, w, h])
        xyxy = boxes[:, :4]
        if n and (xyxy.min() < -BOX_TOLERANCE or xyxy.max() > 1 + BOX_TOLERANCE):
            raise ValueError(
                f"{where}: boxes outside [0, 1] (min {xyxy.min():.4g}, max {xyxy.max():.4g}): '{key}' must be "
                f"normalised x1, y1, x2, y2; for pixel boxes store them as 'boxes' together with 'image_w' and 'image_h'"
            )
        if n and ((xyxy[:, 2] < xyxy[:, 0]) | (xyxy[:, 3] < xyxy[:, 1])).any():
            bad = int(np.flatnonzero((xyxy[:, 2] < xyxy[:, 0]) | (xyxy[:, 3] < xyxy[:, 1]))[0])
            raise ValueError(f"{where}: box {bad} has x2 < x1 or y2 < y1 ({xyxy[bad].round(4).tolist()}); boxes must "
                             f"be x1, y1, x2, y2 (not x, y, w, h)")
        xyxy = xyxy.clip(0.0, 1.0)
        if boxes.shape[1] == 4:
            wh = xyxy[:, 2:4] - xyxy[:, 0:2]
            boxes7 = np.concatenate([xyxy, wh, wh[:, :1] * wh[:, 1:]], axis=1)
        elif boxes.shape[1] == 6:  # UNITER norm_bb: append w*h as UNITER does
            boxes7 = np.concatenate([xyxy, boxes[:, 4:6], boxes[:, 4:5] * boxes[:, 5:6]], axis=1)
        else:
            boxes7 = np.concatenate([xyxy, boxes[:, 4:7]], axis=1)

        soft = get("soft_labels")
        labels = None
        if soft is not None:
            soft = np.asarray(soft, dtype=np.float32)
            if soft.ndim != 2 or soft.shape[0] != n or soft.shape[1] < 2:
                raise ValueError(f"{where}: 'soft_labels' must have shape ({n}, C+1) to match features, got {soft.shape}")
            self._check_finite(soft, "soft_labels", image_id, where)
            if self.num_classes is not None and soft.shape[1] != self.num_classes + 1:
                raise ValueError(
                    f"{where}: soft_labels have {soft.shape[1]} columns but the class vocabulary has "
                    f"{self.num_classes} classes (+1 background = {self.num_classes + 1}); use the objects_vocab.txt "
                    f"of the detector that produced these features (data.class_vocab)"
                )
            labels = soft_labels_to_classes(soft, self.faithful_labels)
        conf = get("conf")
        if conf is not None:
            conf = np.asarray(conf, dtype=np.float32)
            if conf.shape != (n,):
                raise ValueError(f"{where}: 'conf' must have shape ({n},) to match features, got {conf.shape}")
            self._check_finite(conf, "conf", image_id, where)
        keep = n
        if self.adaptive:
            if conf is None:
                raise KeyError(f"{where}: adaptive regions (data.adaptive_regions: true) need the array 'conf' (N,); "
                               f"add it or set data.adaptive_regions: false")
            keep = adaptive_num_regions(conf, self.conf_th, self.min_bb, self.max_bb)
        return RegionRecord(
            image_id=image_id,
            features=np.ascontiguousarray(features[:keep], dtype=np.float32),
            boxes=np.ascontiguousarray(boxes7[:keep], dtype=np.float32),
            labels=None if labels is None else labels[:keep],
            soft_labels=None if soft is None else soft[:keep],
            conf=None if conf is None else conf[:keep],
        )


def _load_npz(file: Path) -> dict[str, np.ndarray]:
    """All arrays of an npz (no pickles); ValueError naming the file when it is not a readable npz."""
    try:
        with np.load(file, allow_pickle=False) as npz:
            return {key: npz[key] for key in npz.files}
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise ValueError(f"cannot read {file} as .npz ({exc}); re-export it with numpy.savez") from exc
    except ValueError as exc:
        raise ValueError(f"cannot read {file}: {exc}; store strings as unicode arrays (np.array(ids, dtype=str)), "
                         f"not Python objects") from exc


class NpzDirectory(RegionFeatures):
    """Layout (a): a directory of `<image_id>.npz`, one per image, each read when its image is asked for."""

    def __init__(self, path: str | Path, **options: Any) -> None:
        super().__init__(path, **options)
        if not self.path.is_dir():
            raise FileNotFoundError(f"region feature directory not found: {self.path} (data.features)")

    def file(self, image_id: str) -> Path:
        return self.path / f"{image_id}.npz"

    def location(self, image_id: str) -> str:
        return str(self.file(image_id))

    def missing(self, image_ids: Sequence[str]) -> list[str]:
        return [i for i in image_ids if not self.file(i).is_file()]

    def __getitem__(self, image_id: str) -> RegionRecord:
        file = self.file(image_id)
        if not file.is_file():
            raise FileNotFoundError(
                f"no region features for image {image_id!r}: {file} does not exist; features are looked up as "
                f"<data.features>/<image_id>.npz (image_id = the caption record's 'image_id', else its image file stem)"
            )
        arrays = _load_npz(file)
        return self._record(image_id, arrays.get, str(file))


class NpzBundle(RegionFeatures):
    """Layout (b): one npz holding every image (`image_ids`, `features (I, Nmax, D)`, boxes, `num_boxes`, ...).

    Read into memory once, at construction, with the shapes of all arrays checked there.
    """

    def __init__(self, path: str | Path, **options: Any) -> None:
        super().__init__(path, **options)
        if not self.path.is_file():
            raise FileNotFoundError(f"region feature file not found: {self.path} (data.features)")
        arrays = _load_npz(self.path)
        for key in ("image_ids", "features", "num_boxes"):
            if key not in arrays:
                raise KeyError(f"{self.path}: missing array '{key}'; a multi-image npz needs image_ids (I,), "
                               f"features (I, Nmax, D), norm_bb or boxes (I, Nmax, k) and num_boxes (I,)")
        ids = arrays["image_ids"]
        if ids.ndim != 1:
            raise ValueError(f"{self.path}: 'image_ids' must have shape (I,), got {ids.shape}")
        ids_str = [x.decode() if isinstance(x, bytes) else str(x) for x in ids.tolist()]
        count = len(ids_str)
        features = arrays["features"]
        if features.ndim != 3 or features.shape[0] != count:
            raise ValueError(f"{self.path}: 'features' must have shape ({count}, Nmax, D) for {count} image_ids, "
                             f"got {features.shape}")
        nmax = features.shape[1]
        num_boxes = np.asarray(arrays["num_boxes"])
        if num_boxes.shape != (count,) or not np.issubdtype(num_boxes.dtype, np.integer):
            raise ValueError(f"{self.path}: 'num_boxes' must be an integer array of shape ({count},), got "
                             f"{num_boxes.dtype} {num_boxes.shape}")
        if count and (num_boxes.min() < 0 or num_boxes.max() > nmax):
            raise ValueError(f"{self.path}: 'num_boxes' must lie in [0, Nmax={nmax}], got [{num_boxes.min()}, "
                             f"{num_boxes.max()}]")
        if not any(k in arrays for k in BOX_KEYS):
            raise KeyError(f"{self.path}: missing array 'norm_bb' (or 'boxes') of shape ({count}, {nmax}, 4|6|7)")
        for key in ("norm_bb", "boxes", "soft_labels"):
            if key in arrays and (arrays[key].ndim != 3 or arrays[key].shape[:2] != (count, nmax)):
                raise ValueError(f"{self.path}: '{key}' must have shape ({count}, {nmax}, k) like features, got "
                                 f"{arrays[key].shape}")
        for key, shape in (("conf", (count, nmax)), ("image_w", (count,)), ("image_h", (count,))):
            if key in arrays and arrays[key].shape != shape:
                raise ValueError(f"{self.path}: '{key}' must have shape {shape}, got {arrays[key].shape}")
        rows: dict[str, int] = {}
        for row, image_id in enumerate(ids_str):
            if image_id in rows:
                raise ValueError(f"{self.path}: image id {image_id!r} appears twice in 'image_ids' (rows {rows[image_id]} "
                                 f"and {row}); ids must be unique")
            rows[image_id] = row
        self.arrays, self.rows, self.num_boxes = arrays, rows, num_boxes

    @property
    def image_ids(self) -> list[str]:
        return list(self.rows)

    def location(self, image_id: str) -> str:
        return f"{self.path} image {image_id!r}"

    def missing(self, image_ids: Sequence[str]) -> list[str]:
        return [i for i in image_ids if i not in self.rows]

    def __getitem__(self, image_id: str) -> RegionRecord:
        if image_id not in self.rows:
            raise KeyError(f"no region features for image {image_id!r} in {self.path} (its 'image_ids' do not list it); "
                           f"extract features for it or remove the image from the captions file")
        row = self.rows[image_id]
        n = int(self.num_boxes[row])
        per_region = {"features", "norm_bb", "boxes", "soft_labels", "conf"}

        def get(key: str) -> Optional[np.ndarray]:
            if key not in self.arrays:
                return None
            return self.arrays[key][row, :n] if key in per_region else self.arrays[key][row]

        return self._record(image_id, get, f"{self.path} image {image_id!r} (row {row})")


def open_region_features(path: str | Path, **options: Any) -> RegionFeatures:
    """Layout (a) for a directory, (b) for a file (see the module docstring); `options` as `RegionFeatures`."""
    target = Path(path)
    if target.is_dir():
        return NpzDirectory(target, **options)
    if target.is_file():
        return NpzBundle(target, **options)
    raise FileNotFoundError(f"region features not found: {target}; data.features must be a .npz file (many images) "
                            f"or a directory of <image_id>.npz files")


# ------------------------------------------------------------------------------------------ downstream
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class RegionFeatureSource:
    """The image source of a downstream task whose images are precomputed regions (`task.region_features`).

    It stands where an `ImageSource` of pixels stands (`vlp.data.records.TaskData.images`): the task
    datasets (`vlp.tasks.common.RecordDataset.image_item`) ask it for `region_features(image_id)` and
    put `region_feats` (N, D), `region_boxes` (N, 7) and `region_labels` (N,) | None into their items
    instead of an image (UNITER / CMAL fine-tune on the same BUTD features they pre-train on, cmal.md
    §3.1, §9). `load` raises: there are no pixels.

    Task records name images by file (`123.jpg`, `val2014/COCO_val2014_000000391895.jpg`,
    `dev-850-0-img0.png`); a record's image is matched to its features by the first key the features
    hold among (`candidates`): the id as is, the id without an image-file extension, its file name, its
    file name without the extension. So `<features>/391895.npz` (or image id "391895" in one npz) serves
    SNLI-VE's "391895.jpg", and `COCO_val2014_000000391895.npz` serves VQAv2's
    "val2014/COCO_val2014_000000391895.jpg" — the "image file stem" rule of pre-training
    (`vlp.data.datasets.read_caption_file`). Resolved keys are cached (one stat per image and layout (a)).

    Args:
        features: the opened npz layout (`open_region_features`), with the pre-training options.
        setting: the config key the path came from, named in errors (default `task.region_features`).
    """

    def __init__(self, features: RegionFeatures, setting: str = "task.region_features") -> None:
        self.features = features
        self.setting = setting
        self._keys: dict[str, Optional[str]] = {}

    @property
    def path(self) -> Path:
        return self.features.path

    @staticmethod
    def candidates(image_id: str) -> list[str]:
        """Feature keys tried for a record's image id, in order (class docstring)."""
        path = PurePosixPath(str(image_id))
        plain = str(path.with_suffix("")) if path.suffix.lower() in IMAGE_SUFFIXES else str(image_id)
        name = path.name
        name_plain = path.stem if path.suffix.lower() in IMAGE_SUFFIXES else name
        out: list[str] = []
        for key in (str(image_id), plain, name, name_plain):
            if key and key not in out:
                out.append(key)
        return out

    def key(self, image_id: str) -> Optional[str]:
        """The feature key of `image_id`, or None when the features hold none of its `candidates`."""
        if image_id not in self._keys:
            self._keys[image_id] = next((c for c in self.candidates(image_id) if not self.features.missing([c])), None)
        return self._keys[image_id]

    def missing(self, image_ids: Sequence[str]) -> list[str]:
        """The distinct ids among `image_ids` (in first-seen order) that have no features."""
        seen: dict[str, None] = dict.fromkeys(image_ids)
        return [i for i in seen if self.key(i) is None]

    def location(self, image_id: str) -> str:
        """Where the features of `image_id` were looked for (for messages)."""
        return " or ".join(self.features.location(c) for c in self.candidates(image_id))

    def missing_message(self, missing: Sequence[str], total: int, what: str) -> str:
        """'no region features for k of the n images of <what> (e.g. ...)' plus the fix."""
        shown = "; ".join(f"{i!r} (looked up as {self.location(i)})" for i in missing[:3])
        return (f"{self.setting}: no region features for {len(missing)} of the {total} images of {what} "
                f"(e.g. {shown}); extract features for them into {self.path}, remove those records, or pass --skip-bad "
                f"(task.skip_bad: true) to skip them")

    def region_features(self, image_id: str) -> RegionRecord:
        """The validated regions of a record's image (FileNotFoundError naming the id and the path when absent)."""
        key = self.key(image_id)
        if key is None:
            raise FileNotFoundError(f"{self.setting}: no region features for image {image_id!r} (looked up as "
                                    f"{self.location(image_id)}); extract features for it or remove its records")
        return self.features[key]

    def load(self, image_id: str, record: str | None = None) -> Any:
        """Always an error: with precomputed region features there are no pixels to load."""
        raise ValueError(f"image {image_id!r} has no pixels here: {self.setting} is set ({self.path}), so images are "
                         f"their precomputed region features (`region_features(image_id)`); drop {self.setting} to "
                         f"read pixels from task.image_root")

    def __repr__(self) -> str:
        return f"RegionFeatureSource({str(self.path)!r})"


# ------------------------------------------------------------------------------------------ dataset
class RegionCaptionDataset(CaptionRowDataset):
    """(caption, precomputed regions) pairs for pre-training without images (`data.source: regions`).

    Rows are image-major over the caption file's images (`CaptionRows`, budget = prefix, as `PairDataset`).
    At construction every image within the budget is checked to have features (a stat per file for the
    directory layout — nothing is loaded) and the first image is read, so schema errors (dim, vocabulary)
    surface before training. Items (collated by `vlp.data.datasets.collate`, which pads N):
      caption str, input_ids (T,) long, pad_id, image_id (entry index), row,
      region_feats (N, D) float32, region_boxes (N, 7) float32, region_labels (N,) long | None.
    An image whose features cannot be used (`RegionFeatures.read`: missing, malformed, NaN / inf) is a
    `DataError` naming the file; with `skip_bad` its rows are `BadSample`s instead (missing features are then
    no error at construction, and `has_labels` comes from the first image that reads).

    `has_labels`: whether the (first image's) features carry soft_labels; without them there are no anchors.
    """

    def __init__(
        self,
        captions: str | Path,
        features: RegionFeatures,
        tokenizer: TextTokenizer,
        max_len: int,
        budget: Optional[int] = None,
        max_words: int = 30,
        entries: Optional[Sequence[CaptionEntry]] = None,
        skip_bad: bool = False,
    ) -> None:
        self.file = Path(captions)
        self.entries = list(entries) if entries is not None else read_caption_file(self.file)
        super().__init__(self.entries, tokenizer, max_len, budget, max_words, skip_bad)
        self.features = features
        needed = [e.image_id for e in self.entries[: self.rows.num_images]]
        if skip_bad:
            self.has_labels = self._first_readable(needed).labels is not None
            return
        missing = features.missing(needed)
        if missing:
            shown = ", ".join(features.location(i) for i in missing[:3])
            raise FileNotFoundError(
                f"region features missing for {len(missing)} of the {len(needed)} images of {self.file} "
                f"(e.g. {shown}); extract features for them, or remove those images from the captions file"
            )
        self.has_labels = features[needed[0]].labels is not None

    def _first_readable(self, image_ids: Sequence[str]) -> RegionRecord:
        """The features of the first image among `image_ids` that reads (skip_bad); the first error if none does."""
        first: Optional[DataError] = None
        for image_id in image_ids:
            try:
                return self.features.read(image_id)
            except DataError as error:
                first = first or error
        if first is None:
            raise ValueError(f"{self.file} names no image within the budget")
        raise DataError(BadSample(first.sample.reason, first.sample.where,
                                  f"no image of {self.file} has usable region features; the first: {first}"))

    def image_part(self, image_index: int, entry: CaptionEntry) -> dict[str, Any]:
        record = self.features.read(entry.image_id)
        return {
            "region_feats": torch.from_numpy(record.features),
            "region_boxes": torch.from_numpy(record.boxes),
            "region_labels": None if record.labels is None else torch.from_numpy(record.labels),
        }


# ------------------------------------------------------------------------------------------ tokenizer


def train_caption_tokenizer(
    captions: Sequence[str], vocab_size: int, class_words: Sequence[Sequence[str]] = ()
) -> TextTokenizer:
    """A WordPiece vocabulary (at most `vocab_size` ids) learnt on user captions (`data.tokenizer: captions`).

    Same construction as `TextTokenizer.train_on_world` (special tokens, character alphabet with `##` forms,
    forced words, then deterministic merges `_learn_wordpieces`), so the vocabulary is a pure function of
    the captions. Forced whole tokens (cmal.md §11.2: a class word split into pieces can never be an
    anchor): every word of every class alias as `encode` splits it, plus those of its §3.2 plural/singular
    forms that occur in the captions. ValueError when the forced part alone exceeds `vocab_size`.
    """
    if not captions:
        raise ValueError("cannot train a tokenizer on an empty caption list")
    counts = _split_words(captions, max_words=10_000)
    class_tokens = _split_words([alias for aliases in class_words for alias in aliases], max_words=10_000)
    forced_words = set()
    for word in class_tokens:
        forced_words |= {v for v in morphology_variants(word) if v == word or v in counts}
    chars = set(string.ascii_lowercase + string.digits)
    for word in list(counts) + sorted(forced_words):
        chars.update(word)
    punct = set(string.punctuation)
    alphabet = sorted(chars | punct)
    continuation = [SUBWORD_PREFIX + c for c in sorted(chars - punct)]
    forced: list[str] = list(SPECIAL_TOKENS)
    seen = set(forced)
    for token in alphabet + continuation + sorted(forced_words):
        if token not in seen:
            forced.append(token)
            seen.add(token)
    if len(forced) > vocab_size:
        raise ValueError(
            f"data.vocab_size={vocab_size} is too small: the special tokens, the character alphabet and "
            f"{len(forced_words)} class-vocabulary words alone need {len(forced)} ids; use data.vocab_size >= "
            f"{len(forced)} (or data.tokenizer: bert)"
        )
    learnt = [t for t in _learn_wordpieces(counts, max_new_tokens=vocab_size) if t not in seen]
    tokenizer = TextTokenizer.from_vocab(forced + learnt[: vocab_size - len(forced)])
    tokenizer._source = "<caption vocabulary>"
    return tokenizer


# ------------------------------------------------------------------------------------------ sources
@dataclass
class PretrainSource:
    """What `vlp.api.pretrain` needs from a user-data source: tokenizer, dataset, its collate function and
    the class words of CMAL's lexicon (index = class id; empty when the source has no classes)."""

    tokenizer: TextTokenizer
    dataset: Dataset
    collate_fn: Callable[[list], Any]
    class_words: list[tuple[str, ...]]


def open_pretrain_source(cfg: RunConfig, region_feat_dim: Optional[int] = None) -> PretrainSource:
    """Build the pre-training data of `data.source: regions | karpathy` (the world is built by `vlp.api`).

    regions:  `data.captions` + `data.features` (+ `data.class_vocab` when the features carry soft_labels):
              `RegionCaptionDataset`, no images; CMAL reads `batch.region_feats` (method.region_feat_dim = D).
    karpathy: `data.captions` + `data.image_root`: `ImageCaptionDataset`, images without boxes; CMAL uses
              a `method.grid_regions`^2 grid of cells (no anchors, warned), ALBEF trains as usual.
    Tokenizer: `data.tokenizer: bert` (packaged BERT uncased) or `captions` (`train_caption_tokenizer` on the
    budgeted captions, class words forced whole). ConfigError naming the key for a missing setting.
    `data.skip_bad` (`vlp pretrain --skip-bad`): malformed caption records are left out (one warning with their
    count and the first few), and images that cannot be read become counted `BadSample`s (`vlp.data.skips`).
    `region_feat_dim`: the width of precomputed features the run's method takes (its class's
    `region_feature_dim(cfg)`: 0 = the ViT width), None when it encodes pixels only (then regions are refused).
    """
    d = cfg.data
    if d.source not in ("regions", "karpathy"):
        raise ConfigError(f"open_pretrain_source reads user data (data.source: regions | karpathy), got {d.source!r}")
    if d.captions is None:
        raise ConfigError(f"data.source: {d.source} needs data.captions (a captions JSON file)")
    if d.tokenizer == "world":
        raise ConfigError(
            f"data.tokenizer: world is the embedded world's vocabulary and does not cover user captions; with "
            f"data.source: {d.source} set data.tokenizer: bert (packaged BERT uncased) or captions (WordPiece learnt "
            f"on data.captions, class words kept whole)"
        )
    if d.source == "regions":
        if region_feat_dim is None:
            raise ConfigError(f"data.source: regions feeds precomputed region features without images: method "
                              f"{cfg.method.name!r} encodes pixels and cannot use them (use a method that takes region "
                              f"features, or data.source: karpathy)")
        if d.features is None:
            raise ConfigError("data.source: regions needs data.features (a .npz of many images or a directory of "
                              "<image_id>.npz)")
    elif d.image_root is None:
        raise ConfigError("data.source: karpathy needs data.image_root (the folder the captions' image paths are "
                          "relative to)")
    class_words = read_class_vocab(d.class_vocab) if d.class_vocab is not None else []
    malformed: list[str] = []
    entries = read_caption_file(d.captions, require_image=d.source == "karpathy",
                                on_bad=malformed.append if d.skip_bad else None)
    if malformed:
        warnings.warn(f"data.skip_bad: left out {len(malformed)} malformed record(s) of {d.captions}, e.g. "
                      + "; ".join(malformed[:3]), stacklevel=2)
    rows = CaptionRows([len(e.captions) for e in entries], d.budget)
    if d.tokenizer == "bert":
        tokenizer = TextTokenizer.bert_uncased()
    else:  # learnt on the budgeted rows only: text outside the paired-data budget is not seen
        texts = [caption for entry in entries for caption in entry.captions][: len(rows)]
        tokenizer = train_caption_tokenizer(texts, d.vocab_size, class_words)
    if d.source == "karpathy":
        dataset: Dataset = ImageCaptionDataset(d.captions, d.image_root, tokenizer, d.max_text_len,
                                               cfg.model.vision.image_size, d.budget, max_words=d.max_text_len,
                                               entries=entries, skip_bad=d.skip_bad)
        return PretrainSource(tokenizer, dataset, collate, class_words)
    reader = open_region_features(
        d.features,
        feat_dim=region_feat_dim or cfg.model.vision.width,
        num_classes=len(class_words) if class_words else None,
        faithful_labels=d.region_labels_faithful,
        adaptive=d.adaptive_regions, conf_th=d.region_conf_th, min_bb=d.region_min_bb, max_bb=d.region_max_bb,
    )
    dataset = RegionCaptionDataset(d.captions, reader, tokenizer, d.max_text_len, d.budget,
                                   max_words=d.max_text_len, entries=entries, skip_bad=d.skip_bad)
    if dataset.has_labels and not class_words:
        raise ConfigError(
            f"the region features ({d.features}) carry soft_labels, but data.class_vocab is not set: set it to the "
            f"detector's objects_vocab.txt so caption words can be matched to region classes (CMAL anchors)"
        )
    return PretrainSource(tokenizer, dataset, collate, class_words)


__all__ = [
    "NpzBundle",
    "NpzDirectory",
    "PretrainSource",
    "RegionCaptionDataset",
    "RegionFeatureSource",
    "RegionFeatures",
    "RegionRecord",
    "adaptive_num_regions",
    "open_pretrain_source",
    "open_region_features",
    "read_class_vocab",
    "soft_labels_to_classes",
    "train_caption_tokenizer",
]
