"""Downstream table: pre-trained checkpoints vs from scratch, fine-tuned on every task of the world.

    python benchmarks/downstream.py --checkpoint albef=runs/demo/albef --checkpoint cmal=runs/demo/cmal \
        --tasks ve rec vqa nlvr2 retrieval --out runs/downstream

"scratch" rows fine-tune the `task.init` method (the demo's ALBEF-style baseline) with fresh weights,
so the difference to a checkpoint row is what pre-training buys. The "text-only" row is each task's text-only
floor (hypothesis-only VE, question-only VQA, statement-only NLVR2: `vlp.tasks.text_floor`) on the same
training and test records (`--no-text-floor` leaves it out): a number at that level is explained by the text. Every run uses the shipped
`finetune_<task>` config plus `--set` overrides (the same for all rows), through
`vlp.api.downstream_table` (which `vlp demo` uses with shorter fine-tunes). Writes `<out>/results.md`
(one row per start, one column per task's headline test metric) and `<out>/results.json`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vlp.api import DOWNSTREAM_METRICS, downstream_table, text_floor_row
from vlp.viz import format_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", action="append", default=[], metavar="NAME=DIR")
    parser.add_argument("--tasks", nargs="+", default=list(DOWNSTREAM_METRICS), choices=list(DOWNSTREAM_METRICS))
    parser.add_argument("--out", default="runs/downstream")
    parser.add_argument("--no-scratch", action="store_true")
    parser.add_argument("--no-text-floor", action="store_true", help="leave out the text-only row")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    starts: list[tuple[str, str | None]] = [tuple(c.split("=", 1)) for c in args.checkpoint]  # type: ignore[misc]
    if not args.no_scratch:
        starts.append(("scratch", None))
    out = Path(args.out)
    rows = downstream_table(starts, args.tasks, out, args.overrides,
                            on_row=lambda so_far: print(format_table(so_far), flush=True))
    if not args.no_text_floor:
        rows.append(text_floor_row(args.tasks, args.overrides))
        print(format_table(rows), flush=True)
    (out / "results.md").write_text(format_table(rows) + "\n")
    (out / "results.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
