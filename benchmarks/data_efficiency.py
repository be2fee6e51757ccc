"""Data-efficiency reading: registered methods pre-trained on paired-data budgets of the world.

Each (method, budget) run uses the method's demo config (its class's `demo_config`) with the same steps,
batch and test images; only `data.budget` (a prefix of the world's train pairs) changes. Each is ranked by
its headline protocol (`ranking`: ITM over all pairs where the method has ITM, else ITC), plus the
attribute-swap hard negatives; ITC numbers are listed beside for methods with ITC.

    python benchmarks/data_efficiency.py --budgets 4000 16000 --methods albef cmal clip --out runs/data_efficiency

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



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", type=int, nargs="+", default=[4000, 16000])
    parser.add_argument("--methods", nargs="+", default=None, help="registered methods (default: the demo's)")
    parser.add_argument("--out", default="runs/data_efficiency")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="extra config overrides")
    args = parser.parse_args()
    out = Path(args.out)
    rows = []
    methods = args.methods or api.demo_methods()
    for budget in args.budgets:
        for method in methods:
            run_dir = out / f"{method}_{budget}"
            cfg = load_config(api.method_class(method).demo_config, [f"data.budget={budget}", f"train.out_dir={run_dir}",
                                                          "train.progress=false", *args.overrides])
            start = time.time()
            api.pretrain(cfg)
            seconds = time.time() - start
            metrics = json.loads((run_dir / "eval.json").read_text())
            rows.append(api.method_row(method, cfg, seconds, metrics))
            print(format_table(rows, api.DEMO_COLUMNS), flush=True)
    (out / "results.md").write_text(format_table(rows, api.DEMO_COLUMNS) + "\n")
    (out / "results.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
