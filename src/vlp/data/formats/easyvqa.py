"""The packaged easy-VQA data set (`pip install easy-vqa==1.0`, MIT) -> `VQARecord`s.

easy-VQA ships 4,000 train + 1,000 test 64x64 PNG images (one circle / rectangle / triangle in one
of 8 colours) with 38,575 + 9,673 questions ("what is the blue shape?", "does the image contain a
rectangle?") and a 13-answer vocabulary, read through the package's own API:
`get_{train,test}_questions()` -> (texts, answers, image ids), `get_{train,test}_image_paths()` ->
{image id: path}, `get_answers()`.

Each question has ONE answer. VQARecord follows VQAv2 (ten human answers), so the single answer is
repeated `VQA_NUM_ANSWERS` = 10 times: the official accuracy then scores a correct prediction 1.0 and
a wrong one 0.0 (every leave-one-out subset holds nine matching answers), i.e. plain accuracy, and the
soft targets are one-hot. answer_type is "yes/no" for yes/no answers and "other" otherwise (easy-VQA
has no answer types; this split mirrors VQAv2's reporting). image_id is the image path relative to the
package's data folder ("train/images/12.png"), resolved by the returned `FolderImages`.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType

from vlp.data.formats.common import FolderImages, FormatData, Sink
from vlp.data.records import VQA_NUM_ANSWERS, VQARecord

EASY_VQA_SPLITS = ("train", "test")


def _easy_vqa() -> ModuleType:
    """Import easy_vqa with an install hint when it is missing."""
    try:
        import easy_vqa
    except ImportError as exc:  # pragma: no cover - easy-vqa is a pinned dependency
        raise ImportError("the easy-VQA data set needs the easy-vqa package: pip install easy-vqa==1.0") from exc
    return easy_vqa


def easy_vqa_root() -> Path:
    """The folder holding easy-VQA's `train/` and `test/` image folders and `answers.txt`."""
    return Path(_easy_vqa().__file__).parent / "data"


def read_easy_vqa(splits: tuple[str, ...] = EASY_VQA_SPLITS, skip_bad: bool = False) -> FormatData:
    """Load easy-VQA -> `FormatData(task="vqa", splits={"train": [...], "test": [...]},
    images=FolderImages(<package data>), answer_vocab=get_answers())`.

    question_id = "<split>-<index in the split's question list>". A question whose image is not in the
    package, or whose answer is not in `get_answers()`, is an error naming the question (or a counted
    skip with `skip_bad=True`); neither happens with the released package.
    """
    module = _easy_vqa()
    root = easy_vqa_root()
    sink = Sink(skip_bad)
    vocab = list(module.get_answers())
    known = set(vocab)
    loaders = {
        "train": (module.get_train_questions, module.get_train_image_paths),
        "test": (module.get_test_questions, module.get_test_image_paths),
    }
    result: dict[str, list[VQARecord]] = {}
    for split in splits:
        if split not in loaders:
            raise ValueError(f"easy-VQA has splits {EASY_VQA_SPLITS}, not {split!r}")
        get_questions, get_paths = loaders[split]
        texts, answers, image_ids = get_questions()
        paths = get_paths()
        source = f"easy-vqa {split} questions ({root / split / 'questions.json'})"
        records: list[VQARecord] = []
        for index, (text, answer, image) in enumerate(zip(texts, answers, image_ids)):
            where = f"question {split}-{index} of {source}"
            if image not in paths:
                sink.bad(f"{where}: image {image} is not among the package's {split} images", FileNotFoundError)
                continue
            if answer not in known:
                sink.bad(f"{where}: answer {answer!r} is not in the answer list {vocab}")
                continue
            records.append(
                VQARecord(
                    question_id=f"{split}-{index}",
                    image_id=Path(os.path.relpath(paths[image], root)).as_posix(),
                    question=text,
                    answers=(answer,) * VQA_NUM_ANSWERS,
                    answer_type="yes/no" if answer in ("yes", "no") else "other",
                )
            )
        result[split] = records
    return FormatData(
        task="vqa",
        splits=result,
        images=FolderImages(root),
        answer_vocab=vocab,
        skipped=sink.report,
        sources=(str(root),),
    )


__all__ = ["EASY_VQA_SPLITS", "easy_vqa_root", "read_easy_vqa"]
