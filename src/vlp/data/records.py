"""Downstream-task annotation records: the one schema every source produces and every task consumes.

The embedded world (`vlp.data.world_tasks`) and the real-format readers (`vlp.data.formats`) both turn
their annotations into these records; the task datasets in `vlp.tasks` read only records plus an
`ImageSource` that resolves `image_id` to pixels. So a task never knows where its data came from, and a
new format is one reader that emits records.

Conventions (shared with `vlp.types.Batch`):
  * `image_id` is a string key understood by the `ImageSource` paired with the records (a file name
    relative to an image folder, a COCO id, or a world key "split/index").
  * Boxes are normalised (x1, y1, x2, y2) in [0, 1] with x1 < x2 and y1 < y2.
  * Every record validates itself on construction and raises `ValueError` naming the record; readers
    catch it and re-raise with the file name (or count a skip when the user asked for `--skip-bad`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from PIL import Image

Box = tuple[float, float, float, float]

VE_LABELS = ("entailment", "neutral", "contradiction")  # SNLI-VE gold_label strings, index = class id
VQA_NUM_ANSWERS = 10  # VQAv2: ten human answers per question


def check_box(box: Box, what: str) -> Box:
    """Validate a normalised xyxy box; returns it as a tuple of floats. `what` names the record in errors."""
    if len(box) != 4:
        raise ValueError(f"{what}: a box needs 4 numbers (x1, y1, x2, y2), got {len(box)}")
    x1, y1, x2, y2 = (float(v) for v in box)
    eps = 1e-6
    if not (-eps <= x1 < x2 <= 1 + eps and -eps <= y1 < y2 <= 1 + eps):
        raise ValueError(
            f"{what}: box {tuple(round(v, 4) for v in (x1, y1, x2, y2))} is outside the image or empty "
            "(expected normalised x1 < x2, y1 < y2 within [0, 1])"
        )
    return (x1, y1, x2, y2)


@dataclass(frozen=True)
class CaptionRecord:
    """Retrieval / pre-training: one image and its captions (COCO: 5)."""

    image_id: str
    captions: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.captions or any(not c.strip() for c in self.captions):
            raise ValueError(f"image {self.image_id!r}: captions must be non-empty strings")


@dataclass(frozen=True)
class VERecord:
    """Visual entailment (SNLI-VE): premise image, hypothesis, label index into `VE_LABELS`."""

    pair_id: str
    image_id: str
    hypothesis: str
    label: int

    def __post_init__(self) -> None:
        if not 0 <= self.label < len(VE_LABELS):
            raise ValueError(f"VE pair {self.pair_id!r}: label {self.label} is not one of 0..{len(VE_LABELS) - 1} {VE_LABELS}")
        if not self.hypothesis.strip():
            raise ValueError(f"VE pair {self.pair_id!r}: empty hypothesis")


@dataclass(frozen=True)
class RefRecord:
    """Referring expression (RefCOCO): an expression naming one object of the image.

    candidates: ground-truth boxes of the image (all objects); `target_index` points at the referred one.
    proposals:  "detected" setting boxes (noisy detector output); may be empty when a source has none.
    group:      evaluation subset ("testA" people / "testB" objects in RefCOCO; "" when not split).
    """

    ref_id: str
    image_id: str
    expression: str
    target_box: Box
    candidates: tuple[Box, ...]
    target_index: int
    proposals: tuple[Box, ...] = ()
    group: str = ""

    def __post_init__(self) -> None:
        what = f"referring expression {self.ref_id!r} (image {self.image_id!r})"
        object.__setattr__(self, "target_box", check_box(self.target_box, what))
        object.__setattr__(self, "candidates", tuple(check_box(b, what) for b in self.candidates))
        object.__setattr__(self, "proposals", tuple(check_box(b, what) for b in self.proposals))
        if not 0 <= self.target_index < len(self.candidates):
            raise ValueError(f"{what}: target_index {self.target_index} outside its {len(self.candidates)} candidates")
        if not self.expression.strip():
            raise ValueError(f"{what}: empty expression")


@dataclass(frozen=True)
class VQARecord:
    """VQA (VQAv2): a question about an image with its human answers (10 in VQAv2; raw strings, the
    metric normalises them)."""

    question_id: str
    image_id: str
    question: str
    answers: tuple[str, ...]
    answer_type: str = ""  # "yes/no" | "number" | "other" (VQAv2), free text elsewhere
    question_type: str = ""

    def __post_init__(self) -> None:
        if not self.answers:
            raise ValueError(f"question {self.question_id!r} (image {self.image_id!r}) has no answers")
        if not self.question.strip():
            raise ValueError(f"question {self.question_id!r}: empty question text")


@dataclass(frozen=True)
class NLVR2Record:
    """NLVR2: a statement about a pair of images, true or false."""

    identifier: str
    left_image_id: str
    right_image_id: str
    statement: str
    label: bool

    def __post_init__(self) -> None:
        if not self.statement.strip():
            raise ValueError(f"NLVR2 example {self.identifier!r}: empty statement")


@runtime_checkable
class ImageSource(Protocol):
    """Resolves an `image_id` to an RGB PIL image (FileNotFoundError naming the path when missing)."""

    def load(self, image_id: str) -> Image.Image: ...


@dataclass
class TaskData:
    """One task's records per split plus the source of their images (and an answer vocabulary for VQA)."""

    task: str
    splits: dict[str, list] = field(default_factory=dict)
    images: ImageSource | None = None
    answer_vocab: list[str] | None = None


__all__ = [
    "Box",
    "CaptionRecord",
    "ImageSource",
    "NLVR2Record",
    "RefRecord",
    "TaskData",
    "VERecord",
    "VE_LABELS",
    "VQARecord",
    "VQA_NUM_ANSWERS",
    "check_box",
]
