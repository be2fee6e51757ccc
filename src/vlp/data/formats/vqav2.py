"""VQAv2 (Goyal et al. 2017) questions + annotations JSON -> `VQARecord`s.

The official pair of files, e.g. `v2_OpenEnded_mscoco_val2014_questions.json` =
``{"data_subtype": "val2014", "questions": [{"question_id", "image_id", "question"}, ...], ...}`` and
`v2_mscoco_val2014_annotations.json` = ``{"annotations": [{"question_id", "image_id", "answers":
[{"answer", "answer_confidence", "answer_id"} x 10], "answer_type", "question_type",
"multiple_choice_answer"}, ...], ...}``, joined on `question_id`. The ten raw human answers are kept
as they are (the metric, `vlp.tasks.vqa_metric`, normalises them as the official script does).

Images are named COCO-style, `COCO_<data_subtype>_<12-digit image id>.jpg`, or by a user pattern
(`image_pattern="{subtype}/COCO_{subtype}_{image_id:012d}.jpg"`; fields `image_id` (int) and
`subtype`). Annotations whose question is absent are ignored (a question file may be a subset).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vlp.data.formats.common import FormatData, Sink, folder, image_check, load_json, require_keys
from vlp.data.records import VQARecord

COCO_IMAGE_PATTERN = "COCO_{subtype}_{image_id:012d}.jpg"


def _image_name(pattern: str, image_id: Any, subtype: str | None, where: str) -> str:
    """Format the image file name; a pattern error becomes a ValueError naming the pattern."""
    try:
        return pattern.format(image_id=image_id, subtype=subtype)
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(
            f"{where}: image_pattern {pattern!r} cannot be filled ({type(exc).__name__}: {exc}); "
            "use the fields {image_id} (an int, e.g. {image_id:012d}) and {subtype}"
        ) from exc


def read_vqav2(
    questions_path: str | Path,
    annotations_path: str | Path,
    image_root: str | Path | None = None,
    image_pattern: str = COCO_IMAGE_PATTERN,
    subtype: str | None = None,
    split: str | None = None,
    skip_bad: bool = False,
) -> FormatData:
    """Read a VQAv2 questions + annotations pair -> `FormatData(task="vqa", splits={split: [VQARecord]})`.

    subtype: the COCO image subset in file names ("train2014", "val2014"); default the files'
             `data_subtype`. split: the records' key (default the subtype).
    A question without annotation, a question/annotation image-id mismatch, an annotation without
    answers, a malformed entry or (with `image_root`) a missing image is an error naming the question
    id and the files, or a counted skip with `skip_bad=True`.
    """
    questions_data = load_json(questions_path, "VQAv2 questions file", "{'questions': [{'question_id', 'image_id', 'question'}]}")
    annotations_data = load_json(
        annotations_path, "VQAv2 annotations file", "{'annotations': [{'question_id', 'answers': [{'answer'}], ...}]}"
    )
    qfile, afile = Path(questions_path), Path(annotations_path)
    files = f"{qfile} + {afile}"
    if not isinstance(questions_data, dict) or not isinstance(questions_data.get("questions"), list):
        raise ValueError(f"{qfile} must be a VQAv2 questions file: an object with a 'questions' list")
    if not isinstance(annotations_data, dict) or not isinstance(annotations_data.get("annotations"), list):
        raise ValueError(f"{afile} must be a VQAv2 annotations file: an object with an 'annotations' list")
    subtype = subtype or questions_data.get("data_subtype") or annotations_data.get("data_subtype")
    if subtype is None and "{subtype" in image_pattern:
        raise ValueError(
            f"{qfile} has no 'data_subtype' and none was given: pass subtype='val2014' (or the COCO subset of "
            f"the images) or an image_pattern without {{subtype}}"
        )

    sink = Sink(skip_bad)
    images = folder(image_root)
    by_question: dict[Any, dict] = {}
    for index, ann in enumerate(annotations_data["annotations"]):
        if not isinstance(ann, dict) or "question_id" not in ann:
            sink.bad(f"{afile} annotation {index}: expected an object with a 'question_id', got {ann!r:.200}")
            continue
        by_question[ann["question_id"]] = ann

    records: list[VQARecord] = []
    seen: set[Any] = set()
    for index, question in enumerate(questions_data["questions"]):
        qid = question.get("question_id", f"#{index}") if isinstance(question, dict) else f"#{index}"
        where = f"question {qid} of {files}"
        if not require_keys(question, ("question_id", "image_id", "question"), where, sink):
            continue
        if qid in seen:
            sink.bad(f"{where}: question id appears twice in {qfile}")
            continue
        seen.add(qid)
        ann = by_question.get(qid)
        if ann is None:
            sink.bad(f"{where}: no annotation for question id {qid} in {afile}")
            continue
        if "image_id" in ann and ann["image_id"] != question["image_id"]:
            sink.bad(f"{where}: image_id {question['image_id']} in the questions but {ann['image_id']} in the annotations")
            continue
        answers = ann.get("answers")
        if not isinstance(answers, list) or not answers or not all(isinstance(a, dict) and isinstance(a.get("answer"), str) for a in answers):
            sink.bad(f"{where}: 'answers' must be a non-empty list of {{'answer': str}} objects")
            continue
        try:
            image_number = int(question["image_id"])
        except (TypeError, ValueError):
            sink.bad(f"{where}: image_id {question['image_id']!r} is not an integer")
            continue
        image_id = _image_name(image_pattern, image_number, subtype, where)
        try:
            record = VQARecord(
                question_id=str(qid),
                image_id=image_id,
                question=str(question["question"]),
                answers=tuple(a["answer"] for a in answers),
                answer_type=str(ann.get("answer_type", "")),
                question_type=str(ann.get("question_type", "")),
            )
        except ValueError as exc:
            sink.bad(f"{where}: {exc}")
            continue
        if image_check(images, image_id, where, sink):
            records.append(record)
    return FormatData(
        task="vqa",
        splits={split or subtype or qfile.stem: records},
        images=images,
        skipped=sink.report,
        sources=(str(qfile), str(afile)),
    )


__all__ = ["COCO_IMAGE_PATTERN", "read_vqav2"]
