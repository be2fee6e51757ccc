"""CMAL ablations against the same-architecture UNITER baseline and ALBEF: what do CMAL's objectives buy?

Each variant pre-trains with its method's demo config (same world pairs, steps and batch), is ranked by its
headline retrieval protocol (with the number of ITM steps beside it), then is fine-tuned on downstream tasks
with the demo's short fine-tunes (`vlp.demo.DEMO_FINETUNE`), next to a from-scratch start:

    cmal            CMAL as shipped (AMC + WRC + ITM, 1:3:2)
    cmal_no_swap    AMC without the associative prompt (anchors [MASK]ed, partner regions masked)
    cmal_no_wrc     task_ratio.wrc = 0
    cmal_no_amc     task_ratio.amc = 0 (WRC + ITM)
    uniter          the same single stream with MLM + masked region classification + ITM
    albef           the two-tower baseline (ViT + cross-attention fusion)

    python benchmarks/cmal_ablations.py --out runs/cmal_ablations [--tasks rec ve vqa] [--set train.steps=350]

Writes `<out>/results.md` (both tables) and `<out>/results.json`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from vlp import api
from vlp.config import load_config
from vlp.demo import DEMO_FINETUNE
from vlp.viz import format_table

VARIANTS = {
    "cmal": ("cmal", []),
    "cmal_no_swap": ("cmal", ["method.swap=false"]),
    "cmal_no_wrc": ("cmal", ["method.task_ratio.wrc=0"]),
    "cmal_no_amc": ("cmal", ["method.task_ratio.amc=0"]),
    "uniter": ("uniter", []),
    "albef": ("albef", []),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/cmal_ablations")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--tasks", nargs="+", default=["rec", "ve", "vqa"])
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="pre-training overrides")
    args = parser.parse_args()
    out = Path(args.out)
    rows = []
    for variant in args.variants:
        method, extra = VARIANTS[variant]
        run_dir = out / variant
        cfg = load_config(api.method_class(method).demo_config,
                          [f"train.out_dir={run_dir}", "train.progress=false", *extra, *args.overrides])
        start = time.time()
        api.pretrain(cfg)
        row = api.method_row(method, cfg, time.time() - start, json.loads((run_dir / "eval.json").read_text()))
        rows.append({**row, "method": variant})
        print(format_table(rows, api.DEMO_COLUMNS), flush=True)
    starts = [*[(v, out / v) for v in args.variants], ("scratch", None)]
    task_rows = api.downstream_table(starts, args.tasks, out / "finetune", list(DEMO_FINETUNE))
    text = ("Pre-training: retrieval on the test images\n\n" + format_table(rows, api.DEMO_COLUMNS)
            + "\n\nFine-tuning (demo fine-tunes): test accuracy %\n\n" + format_table(task_rows))
    print(text)
    (out / "results.md").write_text(text + "\n")
    (out / "results.json").write_text(json.dumps({"pretrain": rows, "finetune": task_rows}, indent=2))


if __name__ == "__main__":
    main()
