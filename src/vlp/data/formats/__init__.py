"""Readers for the annotation formats users bring, each producing `vlp.data.records` records.

| reader            | files                                                     | records        |
| ----------------- | --------------------------------------------------------- | -------------- |
| `read_karpathy`   | `dataset_coco.json` (Karpathy) or `coco_karpathy_*.json` (ALBEF/BLIP) | CaptionRecord |
| `read_snli_ve`    | `snli_ve_{train,dev,test}.jsonl`                          | VERecord       |
| `read_refcoco`    | REFER `refs(unc).json` (converted from the pickle) + `instances.json` | RefRecord |
| `read_vqav2`      | `v2_OpenEnded_mscoco_*_questions.json` + `v2_mscoco_*_annotations.json` | VQARecord |
| `read_nlvr2`      | NLVR2 `train.json` / `dev.json` / `test1.json` (JSON lines) | NLVR2Record  |
| `read_easy_vqa`   | the `easy-vqa` package (no files)                         | VQARecord      |

Every reader returns a `FormatData` (a `TaskData`: records per split, `FolderImages` when an image
root is given, the answer vocabulary for easy-VQA) and shares one error contract: a bad record raises
an error naming the record and the file, or, with `skip_bad=True`, is counted in `FormatData.skipped`
(a `SkipReport` keeping the first few reasons).
"""

from vlp.data.formats.common import FolderImages, FormatData, SkipReport
from vlp.data.formats.easyvqa import EASY_VQA_SPLITS, easy_vqa_root, read_easy_vqa
from vlp.data.formats.karpathy import KarpathyEntry, karpathy_entries, read_karpathy
from vlp.data.formats.nlvr2 import nlvr2_image_names, read_nlvr2
from vlp.data.formats.refcoco import read_refcoco, refcoco_pickle_to_json_command
from vlp.data.formats.snli_ve import read_snli_ve
from vlp.data.formats.vqav2 import COCO_IMAGE_PATTERN, read_vqav2

__all__ = [
    "COCO_IMAGE_PATTERN",
    "EASY_VQA_SPLITS",
    "FolderImages",
    "FormatData",
    "KarpathyEntry",
    "SkipReport",
    "easy_vqa_root",
    "karpathy_entries",
    "nlvr2_image_names",
    "read_easy_vqa",
    "read_karpathy",
    "read_nlvr2",
    "read_refcoco",
    "read_snli_ve",
    "read_vqav2",
    "refcoco_pickle_to_json_command",
]
