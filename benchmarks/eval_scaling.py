"""Retrieval evaluation time vs the number of test images, per protocol (issue 15, "Evaluation that scales").

    python benchmarks/eval_scaling.py --runs runs/demo/uniter runs/demo/albef --images 25 50 100 200 400 1000 \
        --all-pairs-max 100 --out /tmp/eval_scaling

For each pre-training run and each size I, the first I images of the world's test split (5 captions each)
are ranked by every protocol the run's method has: "itm_all" (ITM over all I x 5I pairs; only up to
`--all-pairs-max` images, it is quadratic), "itc_rerank" (a single-stream method's first stage + ITM
re-ranking of the top k), "itc_itm" (ALBEF: ITC + ITM re-ranking), "itc". Each cell is timed alone
(one process, the run's threads), and a power law t = a * I^b fitted per (run, protocol) extrapolates to
COCO's 5,000 test images. Writes `eval_scaling.csv` and prints a markdown table (R-mean and seconds per
cell, the fitted exponent and the 5k estimate).
"""

from __future__ import annotations

import argparse
import csv
import math
import time
from pathlib import Path

import torch

from vlp.build import build_world, load_checkpoint_method, retrieval_set
from vlp.tasks.retrieval import evaluate_method_retrieval, headline_r_mean
from vlp.train.cpu import configure_cpu

PROTOCOL_KEY = {"itm_all": "itm_all/r_mean", "itc_rerank": "itm/r_mean", "itc_itm": "itm/r_mean", "itc": "itc/r_mean"}


def protocols_of(method) -> list[str]:
    """Every protocol the method can rank by with its config (itm_all first: the reference)."""
    run = list(method.retrieval_protocols_for(itm_all=True))
    return ["itm_all"] + [p for p in run if p != "itm_all"] if "itm_all" in run else run


def fit_power_law(sizes: list[int], seconds: list[float]) -> tuple[float, float]:
    """Least squares of log t = log a + b log I -> (a, b); needs two sizes or more."""
    xs, ys = [math.log(s) for s in sizes], [math.log(max(t, 1e-9)) for t in seconds]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / max(sum((x - mx) ** 2 for x in xs), 1e-12)
    return math.exp(my - b * mx), b


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", required=True, help="pre-training run directories")
    parser.add_argument("--images", nargs="+", type=int, default=[25, 50, 100, 200, 400, 1000])
    parser.add_argument("--all-pairs-max", type=int, default=100, help="largest I ranked by itm_all (quadratic)")
    parser.add_argument("--k", type=int, default=16, help="eval.k_rerank")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--extrapolate", type=int, default=5000)
    parser.add_argument("--out", default="eval_scaling")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for run in args.runs:
        overrides = [f"eval.k_rerank={args.k}", f"eval.batch_size={args.batch_size}"]
        cfg, tokenizer, method = load_checkpoint_method(run, overrides)
        device = torch.device("cpu")
        print(f"[{run}] {configure_cpu(cfg.train, 0, device).describe()}", flush=True)
        method.eval()
        world = build_world(cfg)
        for images in sorted(args.images):
            cfg.eval.num_images = images
            rset = retrieval_set(cfg, world, tokenizer)
            for protocol in protocols_of(method):
                if protocol == "itm_all" and images > args.all_pairs_max:
                    continue
                start = time.perf_counter()
                metrics = evaluate_method_retrieval(method, rset, (protocol,), batch_size=args.batch_size,
                                                    k_rerank=args.k, device=device)
                seconds = time.perf_counter() - start
                r_mean = metrics.get(PROTOCOL_KEY[protocol], headline_r_mean(metrics))
                row = {"run": run, "method": cfg.method.name, "protocol": protocol, "images": images,
                       "texts": int(metrics["num_texts"]), "seconds": round(seconds, 3),
                       "r_mean": round(float(r_mean), 2), "itm_forwards": int(metrics.get("itm_forwards", 0)),
                       "chance_r1": round(float(metrics["chance_r1"]), 3)}
                if protocol == "itc_rerank":
                    row["first_stage_r_mean"] = round(float(metrics["itc/r_mean"]), 2)
                rows.append(row)
                print(row, flush=True)
    fields = sorted({k for r in rows for k in r}, key=lambda k: list(rows[0]).index(k) if k in rows[0] else 99)
    with open(out / "eval_scaling.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    print("\n| run | protocol | " + " | ".join(f"I={i}" for i in sorted(args.images)) + " | exponent b | "
          f"est. I={args.extrapolate} |")
    print("|---|---|" + "---|" * (len(args.images) + 2))
    for run in args.runs:
        for protocol in dict.fromkeys(r["protocol"] for r in rows if r["run"] == run):
            cells = {r["images"]: r for r in rows if r["run"] == run and r["protocol"] == protocol}
            shown = [f"{cells[i]['r_mean']:.1f} / {cells[i]['seconds']:.1f}s" if i in cells else "–"
                     for i in sorted(args.images)]
            if len(cells) >= 2:
                a, b = fit_power_law(list(cells), [c["seconds"] for c in cells.values()])
                estimate = f"{a * args.extrapolate ** b / 3600:.2f} h"
                exponent = f"{b:.2f}"
            else:
                exponent = estimate = "–"
            print(f"| {Path(run).name} | {protocol} | " + " | ".join(shown) + f" | {exponent} | {estimate} |")
    print(f"\ncells: R-mean / seconds (one process); wrote {out / 'eval_scaling.csv'}")


if __name__ == "__main__":
    main()
