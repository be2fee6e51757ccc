"""Readers of the real annotation formats (`vlp.data.formats`): each schema round-trips to the expected
records, each bad input gives an error naming the record and the file, and `skip_bad` counts instead.

Fixture files are written into tmp_path in the exact public schemas (2-4 records each) with a few tiny
PNG images; the easy-VQA test reads the real packaged data set.
"""

from __future__ import annotations

import json
import pickle
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlp.data.datasets import read_caption_file
from vlp.data.formats import (
    COCO_IMAGE_PATTERN,
    FolderImages,
    FormatData,
    SkipReport,
    karpathy_entries,
    nlvr2_image_names,
    read_easy_vqa,
    read_karpathy,
    read_nlvr2,
    read_refcoco,
    read_snli_ve,
    read_vqav2,
    refcoco_pickle_to_json_command,
)
from vlp.data.formats.common import Sink
from vlp.data.records import CaptionRecord, ImageSource, NLVR2Record, RefRecord, TaskData, VERecord, VQARecord


def _png(path: Path, value: int = 200, size: tuple[int, int] = (6, 4), mode: str = "RGB") -> Path:
    """A tiny solid image (width, height) = size."""
    path.parent.mkdir(parents=True, exist_ok=True)
    channels = () if mode == "L" else (3,)
    Image.fromarray(np.full((size[1], size[0], *channels), value, dtype=np.uint8), mode=mode).save(path)
    return path


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


# --------------------------------------------------------------------------------- FolderImages
def test_folder_images_loads_rgb_and_names_missing_and_corrupt_files(tmp_path: Path) -> None:
    _png(tmp_path / "sub" / "grey.png", value=77, mode="L")
    (tmp_path / "broken.jpg").write_bytes(b"not an image at all" * 3)
    images = FolderImages(tmp_path)
    assert isinstance(images, ImageSource)
    img = images.load("sub/grey.png")
    assert img.mode == "RGB" and img.size == (6, 4) and img.getpixel((0, 0)) == (77, 77, 77)
    with pytest.raises(FileNotFoundError, match=r"image not found: .*gone\.png \(needed by question 7 of q\.json\)"):
        images.load("gone.png", record="question 7 of q.json")
    with pytest.raises(ValueError, match=r"cannot decode image .*broken\.jpg"):
        images.load("broken.jpg")
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        FolderImages(tmp_path / "nowhere")


def test_skip_report_counts_and_keeps_first_reasons() -> None:
    report = SkipReport(keep=2)
    assert not report and str(report) == "no records skipped"
    for i in range(4):
        report.add(f"reason {i}")
    assert report.count == 4 and report.reasons == ["reason 0", "reason 1"]
    assert "skipped 4 bad record(s)" in str(report) and "and 2 more" in str(report)
    other = SkipReport()
    other.add("x")
    report.merge(other)
    assert report.count == 5 and report.reasons == ["reason 0", "reason 1"]


# --------------------------------------------------------------------------------- Karpathy
def _karpathy_original(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "coco"
    for name in ("train2014/COCO_train2014_000000000009.jpg", "val2014/COCO_val2014_000000000042.jpg",
                 "val2014/COCO_val2014_000000000073.jpg"):
        _png(root / name)
    data = {
        "dataset": "coco",
        "images": [
            {"filepath": "train2014", "filename": "COCO_train2014_000000000009.jpg", "split": "train", "cocoid": 9,
             "sentences": [{"raw": "A plate of food.", "tokens": ["a", "plate", "of", "food"]}, {"raw": "Some food."}]},
            {"filepath": "val2014", "filename": "COCO_val2014_000000000042.jpg", "split": "restval", "cocoid": 42,
             "sentences": [{"raw": "A dog on a couch."}]},
            {"filepath": "val2014", "filename": "COCO_val2014_000000000073.jpg", "split": "test", "cocoid": 73,
             "sentences": [{"raw": "A red bus."}, {"raw": "A bus on a street."}]},
        ],
    }
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return path, root


def test_karpathy_original_splits_and_restval(tmp_path: Path) -> None:
    path, root = _karpathy_original(tmp_path)
    data = read_karpathy(path, image_root=root)
    assert isinstance(data, TaskData) and data.task == "retrieval" and isinstance(data.images, FolderImages)
    assert data.splits == {
        "train": [
            CaptionRecord("train2014/COCO_train2014_000000000009.jpg", ("A plate of food.", "Some food.")),
            CaptionRecord("val2014/COCO_val2014_000000000042.jpg", ("A dog on a couch.",)),
        ],
        "test": [CaptionRecord("val2014/COCO_val2014_000000000073.jpg", ("A red bus.", "A bus on a street."))],
    }
    assert data.images.load(data.splits["test"][0].image_id).size == (6, 4)
    kept = read_karpathy(path, split="train", restval="restval")
    assert [r.image_id for r in kept.records()] == ["train2014/COCO_train2014_000000000009.jpg"]
    assert list(read_karpathy(path, restval="restval").splits) == ["train", "restval", "test"]


def test_karpathy_missing_image_names_record_and_file_or_is_skipped(tmp_path: Path) -> None:
    path, root = _karpathy_original(tmp_path)
    (root / "val2014" / "COCO_val2014_000000000073.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"dataset_coco\.json record 2: image not found: .*COCO_val2014_000000000073\.jpg"):
        read_karpathy(path, image_root=root)
    data = read_karpathy(path, image_root=root, skip_bad=True)
    assert data.skipped.count == 1 and "COCO_val2014_000000000073.jpg" in data.skipped.reasons[0]
    assert "test" not in data.splits and len(data.splits["train"]) == 2


def test_karpathy_albef_train_list_merges_rows_and_skips_bad_rows(tmp_path: Path) -> None:
    root = tmp_path / "img"
    _png(root / "val2014" / "a.png")
    _png(root / "val2014" / "b.png")
    rows = [
        {"image": "val2014/a.png", "caption": "a white square", "image_id": "coco_1"},
        {"image": "val2014/b.png", "caption": "a grey square", "image_id": "coco_2"},
        {"image": "val2014/a.png", "caption": "another caption of a", "image_id": "coco_1"},
        {"image": "val2014/b.png", "caption": "   ", "image_id": "coco_2"},
    ]
    path = tmp_path / "coco_karpathy_train.json"
    path.write_text(json.dumps(rows), encoding="utf-8")
    with pytest.raises(ValueError, match=r"coco_karpathy_train\.json record 3 \(val2014/b\.png\) has an empty caption"):
        read_karpathy(path, image_root=root)
    data = read_karpathy(path, image_root=root, skip_bad=True)
    assert data.splits == {
        "train": [
            CaptionRecord("val2014/a.png", ("a white square", "another caption of a")),
            CaptionRecord("val2014/b.png", ("a grey square",)),
        ]
    }
    assert data.skipped.count == 1 and "record 3" in data.skipped.reasons[0]
    # the same parser as RetrievalSet.from_karpathy_json / the pre-training datasets
    assert [e.image for e in read_caption_file(path, on_bad=lambda m: None)] == ["val2014/a.png", "val2014/b.png"]
    assert [e.split for e in karpathy_entries(path, split="val", sink=Sink(skip_bad=True))] == ["val", "val"]


# --------------------------------------------------------------------------------- SNLI-VE
def _snli_ve(tmp_path: Path) -> tuple[Path, Path, list[dict]]:
    root = tmp_path / "flickr30k_images"
    _png(root / "3416050480.jpg")
    _png(root / "2248487950.jpg")
    rows = [
        {"gold_label": "entailment", "sentence1": "A man plays.", "sentence2": "A person is playing.",
         "Flickr30K_ID": "3416050480", "pairID": "3416050480.jpg#4r1e", "captionID": "3416050480.jpg#4"},
        {"gold_label": "contradiction", "sentence2": "Nobody is outside.", "Flickr30K_ID": "2248487950",
         "pairID": "2248487950.jpg#2r1c"},
        {"gold_label": "neutral", "sentence2": "The man is tall.", "Flickr30K_ID": "3416050480",
         "pairID": "3416050480.jpg#4r1n"},
    ]
    return _jsonl(tmp_path / "snli_ve_dev.jsonl", rows), root, rows


def test_snli_ve_reads_records(tmp_path: Path) -> None:
    path, root, _ = _snli_ve(tmp_path)
    data = read_snli_ve(path, image_root=root)
    assert data.task == "ve" and list(data.splits) == ["dev"]
    assert data.splits["dev"] == [
        VERecord("3416050480.jpg#4r1e", "3416050480.jpg", "A person is playing.", 0),
        VERecord("2248487950.jpg#2r1c", "2248487950.jpg", "Nobody is outside.", 2),
        VERecord("3416050480.jpg#4r1n", "3416050480.jpg", "The man is tall.", 1),
    ]
    assert data.images.load("2248487950.jpg").mode == "RGB"


def test_snli_ve_unknown_label_and_missing_image(tmp_path: Path) -> None:
    path, root, rows = _snli_ve(tmp_path)
    rows[1]["gold_label"] = "-"
    _jsonl(path, rows[:2] + ["{not json"] + rows[2:])
    with pytest.raises(ValueError, match=r"snli_ve_dev\.jsonl line 2 \(pair '2248487950\.jpg#2r1c'\): unknown gold_label '-'"):
        read_snli_ve(path)
    data = read_snli_ve(path, split="val", skip_bad=True)
    assert [r.pair_id for r in data.splits["val"]] == ["3416050480.jpg#4r1e", "3416050480.jpg#4r1n"]
    assert data.skipped.count == 2 and "line 3: not valid JSON" in data.skipped.reasons[1]
    (root / "3416050480.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"line 1 \(pair '3416050480\.jpg#4r1e'\): image not found: .*3416050480\.jpg"):
        read_snli_ve(path, image_root=root)
    with pytest.raises(FileNotFoundError, match="SNLI-VE annotation file not found"):
        read_snli_ve(tmp_path / "nope.jsonl")


# --------------------------------------------------------------------------------- RefCOCO
def _refcoco(tmp_path: Path) -> tuple[Path, Path, Path, list[dict]]:
    root = tmp_path / "train2014"
    _png(root / "COCO_train2014_000000000001.jpg", size=(100, 50))
    _png(root / "COCO_train2014_000000000002.jpg", size=(200, 100))
    instances = {
        "images": [
            {"id": 1, "file_name": "COCO_train2014_000000000001.jpg", "width": 100, "height": 50},
            {"id": 2, "file_name": "COCO_train2014_000000000002.jpg", "width": 200, "height": 100},
        ],
        "annotations": [
            {"id": 10, "image_id": 1, "bbox": [10, 5, 20, 10], "category_id": 1, "iscrowd": 0, "area": 200},
            {"id": 11, "image_id": 1, "bbox": [50, 25, 50, 25], "category_id": 3, "iscrowd": 0, "area": 1250},
            {"id": 20, "image_id": 2, "bbox": [150, 50, 50.5, 50], "category_id": 1, "iscrowd": 0, "area": 2525},
        ],
        "categories": [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}],
    }
    refs = [
        {"ref_id": 5, "ann_id": 11, "image_id": 1, "split": "testB", "category_id": 3,
         "file_name": "COCO_train2014_000000000001_11.jpg", "sent_ids": [7, 8],
         "sentences": [{"sent_id": 7, "sent": "car on the right", "raw": "Car on the right.", "tokens": ["car"]},
                       {"sent_id": 8, "sent": "bottom right car", "raw": "bottom right car"}]},
        {"ref_id": 6, "ann_id": 10, "image_id": 1, "split": "train", "category_id": 1,
         "sentences": [{"sent_id": 9, "sent": "left person", "raw": "left person"}]},
        {"ref_id": 7, "ann_id": 20, "image_id": 2, "split": "testA", "category_id": 1,
         "sentences": [{"sent_id": 10, "sent": "man", "raw": "man"}]},
    ]
    inst = tmp_path / "instances.json"
    inst.write_text(json.dumps(instances), encoding="utf-8")
    refs_path = tmp_path / "refs(unc).json"
    refs_path.write_text(json.dumps(refs), encoding="utf-8")
    return refs_path, inst, root, refs


def test_refcoco_boxes_candidates_splits_and_groups(tmp_path: Path) -> None:
    refs_path, inst, root, _ = _refcoco(tmp_path)
    data = read_refcoco(refs_path, inst, image_root=root)
    assert data.task == "rec" and set(data.splits) == {"testB", "train", "testA"}
    image1 = "COCO_train2014_000000000001.jpg"
    # pixel xywh / (W=100, H=50) -> xyxy: [10,5,20,10] -> (.1,.1,.3,.3); [50,25,50,25] -> (.5,.5,1,1)
    cands = ((0.1, 0.1, 0.3, 0.3), (0.5, 0.5, 1.0, 1.0))
    assert data.splits["testB"] == [
        RefRecord("5-7", image1, "car on the right", cands[1], cands, 1, group="testB"),
        RefRecord("5-8", image1, "bottom right car", cands[1], cands, 1, group="testB"),
    ]
    assert data.splits["train"] == [RefRecord("6-9", image1, "left person", cands[0], cands, 0, group="")]
    (man,) = data.splits["testA"]
    # [150, 50, 50.5, 50] on 200x100 overshoots by half a pixel: clipped to x2 = 200
    assert man.target_box == (0.75, 0.5, 1.0, 1.0) and man.candidates == (man.target_box,) and man.group == "testA"


def test_refcoco_box_outside_image_and_unknown_annotation(tmp_path: Path) -> None:
    refs_path, inst, root, refs = _refcoco(tmp_path)
    instances = json.loads(inst.read_text())
    instances["annotations"][2]["bbox"] = [150, 50, 60, 50]  # x2 = 210 on a 200-px-wide image
    inst.write_text(json.dumps(instances))
    with pytest.raises(ValueError, match=r"ref 7 \(image COCO_train2014_000000000002\.jpg\) of .*refs\(unc\)\.json.*instances\.json: "
                                         r"annotation 20: bbox \[150, 50, 60, 50\].* outside the 200x100 image"):
        read_refcoco(refs_path, inst)
    refs[1]["ann_id"] = 99
    refs_path.write_text(json.dumps(refs))
    data = read_refcoco(refs_path, inst, skip_bad=True)
    assert data.skipped.count == 2 and list(data.splits) == ["testB"] and len(data.splits["testB"]) == 2
    assert "ref 6" in data.skipped.reasons[0] and "annotation 99 is not an annotation of image 1" in data.skipped.reasons[0]


def test_refcoco_pickle_refused_with_one_liner_that_converts_it(tmp_path: Path) -> None:
    refs_path, inst, root, refs = _refcoco(tmp_path)
    pickled = tmp_path / "refs(unc).p"
    pickled.write_bytes(pickle.dumps(refs, protocol=2))
    with pytest.raises(ValueError, match=r"(?s)is a Python pickle.*json\.dump\(pickle\.load") as info:
        read_refcoco(pickled, inst)
    command = refcoco_pickle_to_json_command(pickled)
    assert command in str(info.value) and command.startswith("python -c ")
    refs_path.unlink()
    subprocess.run([sys.executable, *shlex.split(command)[1:]], check=True, cwd=tmp_path, timeout=60)
    converted = read_refcoco(tmp_path / "refs(unc).json", inst)
    assert converted.splits == read_refcoco(pickled, inst, allow_pickle=True).splits
    assert sum(len(v) for v in converted.splits.values()) == 4


def test_refcoco_missing_image_file(tmp_path: Path) -> None:
    refs_path, inst, root, _ = _refcoco(tmp_path)
    (root / "COCO_train2014_000000000002.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"ref 7 .*image not found: .*COCO_train2014_000000000002\.jpg"):
        read_refcoco(refs_path, inst, image_root=root)


# --------------------------------------------------------------------------------- VQAv2
def _vqav2(tmp_path: Path) -> tuple[Path, Path, Path]:
    root = tmp_path / "val2014"
    _png(root / "COCO_val2014_000000000042.jpg")
    _png(root / "COCO_val2014_000000393225.jpg")
    questions = {
        "info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "data_subtype": "val2014", "license": {},
        "questions": [
            {"image_id": 42, "question": "How many dogs are there?", "question_id": 420},
            {"image_id": 393225, "question": "Is the bowl empty?", "question_id": 393225000},
        ],
    }
    answers_420 = ["2"] * 7 + ["two"] * 2 + ["3"]
    annotations = {
        "info": {}, "data_subtype": "val2014", "license": {},
        "annotations": [
            {"question_id": 393225000, "image_id": 393225, "question_type": "is the", "answer_type": "yes/no",
             "multiple_choice_answer": "no",
             "answers": [{"answer": "no", "answer_confidence": "yes", "answer_id": i + 1} for i in range(10)]},
            {"question_id": 420, "image_id": 42, "question_type": "how many", "answer_type": "number",
             "multiple_choice_answer": "2",
             "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(answers_420)]},
        ],
    }
    qpath = tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json"
    apath = tmp_path / "v2_mscoco_val2014_annotations.json"
    qpath.write_text(json.dumps(questions), encoding="utf-8")
    apath.write_text(json.dumps(annotations), encoding="utf-8")
    return qpath, apath, root


def test_vqav2_joins_questions_and_annotations(tmp_path: Path) -> None:
    qpath, apath, root = _vqav2(tmp_path)
    data = read_vqav2(qpath, apath, image_root=root)
    assert data.task == "vqa" and list(data.splits) == ["val2014"] and data.skipped.count == 0
    assert data.splits["val2014"] == [
        VQARecord("420", "COCO_val2014_000000000042.jpg", "How many dogs are there?",
                  ("2",) * 7 + ("two",) * 2 + ("3",), "number", "how many"),
        VQARecord("393225000", "COCO_val2014_000000393225.jpg", "Is the bowl empty?", ("no",) * 10, "yes/no", "is the"),
    ]
    assert COCO_IMAGE_PATTERN.format(image_id=42, subtype="val2014") == "COCO_val2014_000000000042.jpg"
    custom = read_vqav2(qpath, apath, image_pattern="{subtype}/{image_id}.png", split="val")
    assert [r.image_id for r in custom.splits["val"]] == ["val2014/42.png", "val2014/393225.png"]
    with pytest.raises(ValueError, match=r"image_pattern '\{img\}\.jpg' cannot be filled"):
        read_vqav2(qpath, apath, image_pattern="{img}.jpg")


def test_vqav2_question_without_annotation_names_id_and_files(tmp_path: Path) -> None:
    qpath, apath, root = _vqav2(tmp_path)
    annotations = json.loads(apath.read_text())
    annotations["annotations"] = annotations["annotations"][1:]  # drop question 393225000's answers
    apath.write_text(json.dumps(annotations))
    with pytest.raises(ValueError, match=r"question 393225000 of .*questions\.json \+ .*annotations\.json: no annotation "
                                         r"for question id 393225000"):
        read_vqav2(qpath, apath)
    data = read_vqav2(qpath, apath, skip_bad=True)
    assert [r.question_id for r in data.records()] == ["420"] and data.skipped.count == 1
    (root / "COCO_val2014_000000000042.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"question 420 of .*: image not found: .*COCO_val2014_000000000042\.jpg"):
        read_vqav2(qpath, apath, image_root=root, skip_bad=False)


# --------------------------------------------------------------------------------- NLVR2
def test_nlvr2_image_names_follow_the_official_repo() -> None:
    assert nlvr2_image_names("dev-850-0-0", "dev") == ("dev-850-0-img0.png", "dev-850-0-img1.png")
    assert nlvr2_image_names("train-10171-0-1", "train", 43) == ("43/train-10171-0-img0.png", "43/train-10171-0-img1.png")
    assert nlvr2_image_names("850-2-1", "test1") == ("test1-850-2-img0.png", "test1-850-2-img1.png")
    with pytest.raises(ValueError, match="is not 'split-set_id-pair_id-sentence_id'"):
        nlvr2_image_names("broken", "dev")


def test_nlvr2_reads_records_and_rejects_unknown_labels(tmp_path: Path) -> None:
    root = tmp_path / "dev"
    for name in ("dev-850-0-img0.png", "dev-850-0-img1.png", "dev-851-3-img0.png", "dev-851-3-img1.png"):
        _png(root / name)
    rows = [
        {"identifier": "dev-850-0-0", "sentence": "One image has two dogs.", "label": "True", "writer": "w1"},
        {"identifier": "dev-850-0-1", "sentence": "There are no dogs.", "label": "False"},
        {"identifier": "dev-851-3-0", "sentence": "A bird flies.", "label": "maybe"},
    ]
    path = _jsonl(tmp_path / "dev.json", rows)
    with pytest.raises(ValueError, match=r"dev\.json line 3 \(identifier 'dev-851-3-0'\): unknown label 'maybe'"):
        read_nlvr2(path, image_root=root)
    data = read_nlvr2(path, image_root=root, skip_bad=True)
    assert data.task == "nlvr2" and data.skipped.count == 1
    assert data.splits == {
        "dev": [
            NLVR2Record("dev-850-0-0", "dev-850-0-img0.png", "dev-850-0-img1.png", "One image has two dogs.", True),
            NLVR2Record("dev-850-0-1", "dev-850-0-img0.png", "dev-850-0-img1.png", "There are no dogs.", False),
        ]
    }
    (root / "dev-850-0-img1.png").unlink()
    rows[2]["label"] = "False"
    _jsonl(path, rows)
    with pytest.raises(FileNotFoundError, match=r"line 1 \(identifier 'dev-850-0-0'\): image not found: .*dev-850-0-img1\.png"):
        read_nlvr2(path, image_root=root)
    assert [r.identifier for r in read_nlvr2(path, image_root=root, skip_bad=True).records()] == ["dev-851-3-0"]


# --------------------------------------------------------------------------------- easy-VQA
def test_easy_vqa_loads_the_packaged_data_set() -> None:
    pytest.importorskip("easy_vqa")
    data = read_easy_vqa()
    assert isinstance(data, FormatData) and data.task == "vqa" and data.skipped.count == 0
    assert {k: len(v) for k, v in data.splits.items()} == {"train": 38575, "test": 9673}
    assert len(data.answer_vocab) == 13 and {"yes", "no", "circle", "teal"} <= set(data.answer_vocab)
    first = data.splits["train"][0]
    assert first == VQARecord("train-0", "train/images/0.png", "what is the blue shape?", ("rectangle",) * 10, "other")
    assert data.splits["train"][2].answer_type == "yes/no"
    img = data.images.load(first.image_id)
    assert img.size == (64, 64) and img.mode == "RGB"
    assert all(r.answers[0] in data.answer_vocab for r in data.splits["test"][:500])
    with pytest.raises(ValueError, match="easy-VQA has splits"):
        read_easy_vqa(splits=("val",))
