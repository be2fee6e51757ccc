"""Downstream table: pre-trained checkpoints vs from scratch, fine-tuned on every task of the world.

    python benchmarks/downstream.py --checkpoint albef=runs/demo/albef --checkpoint cmal=runs/demo/cmal \
        --tasks ve rec vqa nlvr2 retrieval --out runs/downstream

"scratch" rows fine-tune the `task.init` method (the demo's ALBEF-style baseline) with fresh weights,
so the difference to a checkpoint row is what pre-training buys. Every run uses the shipped
`finetune_<task>` config plus `--set` overrides (the same for all rows). Writes `<out>/results.md`
(one row per start, one column per task metric, test split) and `<out>/results.json`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from vlp.finetune import finetune
from vlp.viz import format_table

# the headline test metric of each task
METRIC = {"ve": "test/acc", "rec": "test/gt_acc", "vqa": "test/acc", "nlvr2": "test/acc",
          "retrieval": "itm_all/r_mean"}
COLUMN = {"ve": "VE_acc", "rec": "REC_acc", "vqa": "VQA_acc", "nlvr2": "NLVR2_acc", "retrieval": "ret_r_mean_itm"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", action="append", default=[], metavar="NAME=DIR")
    parser.add_argument("--tasks", nargs="+", default=["ve", "rec", "vqa", "nlvr2", "retrieval"])
    parser.add_argument("--out", default="runs/downstream")
    parser.add_argument("--no-scratch", action="store_true")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    starts = [tuple(c.split("=", 1)) for c in args.checkpoint]
    if not args.no_scratch:
        starts.append(("scratch", None))
    out = Path(args.out)
    rows = []
    for name, checkpoint in starts:
        row = {"start": name}
        for task in args.tasks:
            begin = time.time()
            run = finetune(task, checkpoint, overrides=[f"train.out_dir={out / name / task}", "train.progress=false",
                                                        *args.overrides])
            metrics = json.loads((run / "eval.json").read_text())
            row[COLUMN[task]] = round(float(metrics[METRIC[task]]), 1)
            if task == "rec" and "test/det_acc" in metrics:
                row["REC_det_acc"] = round(float(metrics["test/det_acc"]), 1)
            row[f"{task}_s"] = round(time.time() - begin)
            print(format_table([*rows, row]), flush=True)
        rows.append(row)
    (out / "results.md").write_text(format_table(rows) + "\n")
    (out / "results.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
