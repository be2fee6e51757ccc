"""Data-efficiency reading: now `vlp report data-efficiency` (`vlp.report`); this script forwards to it.

    python benchmarks/data_efficiency.py --budgets 4000 16000 --methods albef cmal clip --out runs/data_efficiency

takes the flags of `vlp report data-efficiency` (`--methods`, `--budgets`, `--seeds`, `--tasks`, `--steps`,
`--batch-size`, `--finetune-steps`, `--baseline`, `--set`, `--finetune-set`; `--help` lists them) and
runs it, by default into runs/data_efficiency: registered methods pre-trained with their demo configs on
nested budgets of world pairs x seeds (same steps, batch and test images), each checkpoint fine-tuned on
the downstream tasks, with the scratch and text-only floors. Writes `<out>/results.jsonl`,
`results.csv`, `summary.md` (mean ± std over seeds, the pairs each method needs to reach the contrastive
baseline's score at the largest budget) and one PNG per task; re-running the same command resumes.
"""

from __future__ import annotations

import sys

from vlp.cli.main import main as vlp_main


def main(argv: list[str] | None = None) -> int:
    """`vlp report data-efficiency` with `argv` (default: this script's arguments), out runs/data_efficiency
    unless `--out` is given."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not any(a == "--out" or a.startswith("--out=") for a in args):
        args = ["--out", "runs/data_efficiency", *args]
    return vlp_main(["report", "data-efficiency", *args])


if __name__ == "__main__":
    sys.exit(main())
