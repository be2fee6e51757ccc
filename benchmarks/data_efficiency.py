"""Data-efficiency reading: the baseline and CMAL pre-trained on paired-data budgets of the world.

Each (method, budget) run uses the demo configs (`demo` = ALBEF-style baseline, `demo_cmal` = CMAL) with
the same steps, batch and test images; only `data.budget` (a prefix of the world's train pairs) changes.
Both are ranked by ITM over all pairs of the same test images (CMAL has no ITC), plus the attribute-swap
hard negatives; the baseline's ITC numbers are listed beside.

    python benchmarks/data_efficiency.py --budgets 4000 16000 --out runs/data_efficiency

Writes `<out>/results.md` (table) and `<out>/results.json` (rows). Deterministic: re-running gives the
same metrics (wall times vary with the machine's load).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from vlp import api
from vlp.config import load_config
from vlp.viz import format_table

COLUMNS = ["method", "pairs", "steps", "run_s", "t2i_R@1", "i2t_R@1", "r_mean", "hardneg",
           "itc_t2i_R@1", "itc_r_mean", "chance_R@1"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", type=int, nargs="+", default=[4000, 16000])
    parser.add_argument("--methods", nargs="+", default=["albef", "cmal"])
    parser.add_argument("--out", default="runs/data_efficiency")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="extra config overrides")
    args = parser.parse_args()
    out = Path(args.out)
    rows = []
    for budget in args.budgets:
        for method in args.methods:
            run_dir = out / f"{method}_{budget}"
            cfg = load_config(api.DEMO_CONFIGS[method], [f"data.budget={budget}", f"train.out_dir={run_dir}",
                                                          "train.progress=false", *args.overrides])
            start = time.time()
            api.pretrain(cfg)
            seconds = time.time() - start
            metrics = json.loads((run_dir / "eval.json").read_text())
            rows.append(api.method_row(method, cfg, seconds, metrics))
            print(format_table(rows, COLUMNS), flush=True)
    (out / "results.md").write_text(format_table(rows, COLUMNS) + "\n")
    (out / "results.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
