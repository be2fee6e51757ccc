"""`vlp demo` and the downstream table: pre-train registered methods on the same pairs, compare them.

`demo` pre-trains every method whose class sets `in_demo_by_default` (or those named in `methods`) with its
`demo_config`, prints their retrieval side by side, then fine-tunes each checkpoint and a from-scratch
model briefly on downstream tasks (`downstream_table`, shared with `benchmarks/downstream.py`).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from vlp.config import RunConfig, load_config
from vlp.finetune import finetune, finetune_config
from vlp.methods import METHODS, method_class
from vlp.pretrain import pretrain
from vlp.taskdata import task_data
from vlp.tasks.retrieval import HEADLINE_KEYS, headline_r_mean
from vlp.tasks.text_floor import TEXT_FLOOR_TASKS, text_only_floor
from vlp.viz import format_table

# ------------------------------------------------------------------------------ downstream table
# The headline metric of each task (its test split) -> its table column; retrieval: the R-mean of the
# method's best protocol (ITM over all pairs, else ITM re-ranked, else ITC: `headline_r_mean`).
DOWNSTREAM_METRICS = {"ve": ("VE_acc", "test/acc"), "rec": ("REC_acc", "test/gt_acc"), "vqa": ("VQA_acc", "test/acc"),
                      "nlvr2": ("NLVR2_acc", "test/acc"), "retrieval": ("ret_r_mean", None)}

# `vlp demo`'s compact downstream fine-tunes (README "Results"): one short epoch per task (80 steps of 16),
# scored on 250 test examples, ~13 s each on 2 CPU cores; the full-length table is benchmarks/downstream.py
# with the shipped finetune_<task> configs (400 steps of 32).
DEMO_FINETUNE = ["train.steps=80", "train.batch_size=16", "train.warmup_steps=8", "train.log_every=40",
                 "task.train_size=1280", "task.eval_size=250", "task.eval_splits=[test]"]

# The tasks a bare `vlp demo` fine-tunes: those the world decides by the image. World VQA is decided by the
# question (its question-only floor, 37.7, beats every start after the demo's 80 steps), so the demo leaves it
# to `--tasks ... vqa` and `vlp report`, which keeps the demo within 5 minutes on 2 cores (issue 15).
DEMO_TASKS = ("ve", "rec")



def downstream_table(starts: list[tuple[str, str | Path | None]], tasks: tuple[str, ...] | list[str],
                     out_dir: str | Path, overrides: list[str] | None = None,
                     on_row: Any = None) -> list[dict[str, Any]]:
    """Fine-tune every start on every task and return one row per start: the task's headline test metric
    (`DOWNSTREAM_METRICS`), REC also on proposals (`REC_det_acc`), and the wall seconds per task.

    starts: (name, checkpoint) pairs; checkpoint None = "from scratch" (`task.init` freshly initialised,
    so the difference to a checkpoint row is what pre-training buys). Every run uses the shipped
    `finetune_<task>` config plus `overrides` (the same for every row) and writes to out_dir/<name>/<task>.
    `on_row(rows)` is called after each task with the rows so far (progress printing).
    """
    unknown = [task for task in tasks if task not in DOWNSTREAM_METRICS]
    if unknown:  # before any fine-tuning starts
        raise ValueError(f"unknown task(s) {', '.join(unknown)} (known: {', '.join(DOWNSTREAM_METRICS)})")
    out_dir = Path(out_dir)
    rows: list[dict[str, Any]] = []
    for name, checkpoint in starts:
        row: dict[str, Any] = {"start": name}
        for task in tasks:
            cell = finetune_cell(task, checkpoint, out_dir / name / task, overrides)
            column = DOWNSTREAM_METRICS[task][0]
            row[column] = round(cell[column], 1) if cell[column] is not None else None
            if "REC_det_acc" in cell:
                row["REC_det_acc"] = round(cell["REC_det_acc"], 1)
            row[f"{task}_s"] = round(cell["seconds"])
            if on_row is not None:
                on_row([*rows, row])
        rows.append(row)
    return rows


def finetune_cell(task: str, checkpoint: str | Path | None, out_dir: str | Path,
                  overrides: list[str] | None = None) -> dict[str, Any]:
    """Fine-tune one start on one task into `out_dir` (the shipped `finetune_<task>` config + `overrides`;
    checkpoint None = from scratch) and read back its headline test metric, unrounded: returns
    {column: value (float, None when not measured), "REC_det_acc" (REC, when scored on proposals),
    "seconds" (wall time of the fine-tune and its evaluation), "run_dir"}. One cell of `downstream_table`,
    also used on its own by `vlp report data-efficiency` (one resumable cell per start and task)."""
    if task not in DOWNSTREAM_METRICS:
        raise ValueError(f"unknown task '{task}' (known: {', '.join(DOWNSTREAM_METRICS)})")
    begin = time.time()
    # overwrite: a cell re-run in its directory (a second `vlp demo`, a report cell) starts over
    run = finetune(task, checkpoint, overrides=[f"train.out_dir={out_dir}", "train.progress=false",
                                                *(overrides or [])], overwrite=True)
    metrics = json.loads((run / "eval.json").read_text())
    column, key = DOWNSTREAM_METRICS[task]
    value = headline_r_mean(metrics) if key is None else metrics[key]
    cell: dict[str, Any] = {column: float(value) if value is not None else None}
    if task == "rec" and "test/det_acc" in metrics:
        cell["REC_det_acc"] = float(metrics["test/det_acc"])
    cell["seconds"] = time.time() - begin
    cell["run_dir"] = run
    return cell




def text_floor_row(tasks: Sequence[str], overrides: list[str] | None = None) -> dict[str, Any]:
    """The "text-only" row of a downstream table: for each task that has a text-only floor (VE, VQA, NLVR2,
    `vlp.tasks.text_floor`), a bag-of-words classifier on the task text alone, fit on the same training
    records the fine-tunes see (the shipped `finetune_<task>` config + `overrides`: `task.train_size`,
    `task.eval_size`, the world of `task.init`) and scored on their test split with the same metric."""
    row: dict[str, Any] = {"start": "text-only"}
    for task in tasks:
        if task not in TEXT_FLOOR_TASKS:
            continue
        cfg = finetune_config(task, overrides=list(overrides or []))
        begin = time.time()
        floor = text_only_floor(task, task_data(cfg), split="test")
        row[DOWNSTREAM_METRICS[task][0]] = round(floor["text_only_acc"], 1)
        row[f"{task}_s"] = round(time.time() - begin)
    return row

class DemoProgress:
    """`vlp demo`'s phase lines on stderr: `[demo 3/11 · 2m10s · ETA 3m05s] fine-tuning albef on ve`.

    The ETA sums the phases still to run, each estimated by the mean duration of the finished phases of its
    kind (pre-training / fine-tuning; before any has finished: `PRETRAIN_GUESS_S` / `FINETUNE_GUESS_S`, the
    tiny demo's measured figures on 2 cores), so it sharpens as the demo goes."""

    PRETRAIN_GUESS_S = 100.0  # 2026-12-03: ALBEF 149 s, CMAL 48 s (fresh clone, 2 cores, 2 threads)
    FINETUNE_GUESS_S = 11.0

    def __init__(self, pretrainings: int, finetunes: int, stream: Any = None) -> None:
        self.remaining = {"pretrain": pretrainings, "finetune": finetunes}
        self.finished: dict[str, list[float]] = {"pretrain": [], "finetune": []}
        self.total = pretrainings + finetunes
        self.index = 0
        self.start = time.time()
        self.phase_start = self.start
        self.stream = stream

    def estimate(self, kind: str) -> float:
        done = self.finished[kind]
        return sum(done) / len(done) if done else (self.PRETRAIN_GUESS_S if kind == "pretrain" else self.FINETUNE_GUESS_S)

    def eta_seconds(self) -> float:
        return sum(self.remaining[kind] * self.estimate(kind) for kind in self.remaining)

    def begin(self, kind: str, what: str) -> str:
        self.index += 1
        self.phase_start = time.time()
        line = (f"[demo {self.index}/{self.total} · {_clock(time.time() - self.start)} · "
                f"ETA {_clock(self.eta_seconds())}] {what}")
        print(line, file=self.stream if self.stream is not None else sys.stderr, flush=True)
        return line

    def end(self, kind: str) -> None:
        self.finished[kind].append(time.time() - self.phase_start)
        self.remaining[kind] = max(0, self.remaining[kind] - 1)


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m{secs:02d}s"


# Each method by its headline protocol (ITM over all pairs when it has it: the like-for-like column), with
# the ITC ranking beside it for methods that have ITC.
DEMO_COLUMNS = ["method", "pairs", "steps", "run_s", "ranking", "itm_steps", "t2i_R@1", "i2t_R@1", "r_mean", "hardneg",
                "itc_t2i_R@1", "itc_r_mean", "chance_R@1"]


def demo_methods() -> tuple[str, ...]:
    """The registered methods a bare `vlp demo` runs (their class sets `in_demo_by_default`)."""
    return tuple(name for name, cls in METHODS.items() if cls.in_demo_by_default and cls.demo_config)


def demo(out_dir: str | Path = "runs/demo", overrides: list[str] | None = None,
         methods: Optional[Sequence[str]] = None, tasks: tuple[str, ...] = DEMO_TASKS) -> str:
    """Pre-train the registered methods (`methods`, default `demo_methods()`) on the same world pairs for the
    same steps with their `demo_config`, evaluate each on the same test images, then fine-tune each
    checkpoint and a from-scratch model briefly on `tasks` (`DEMO_FINETUNE`); return both tables (also
    written to `out_dir/results.md`).

    The default set is sized to finish within 10 minutes on 2 CPU cores (see README for measured figures).
    `overrides` apply to every run (pre-training and fine-tuning), after the demo's own settings.
    """
    out_dir = Path(out_dir)
    methods = tuple(methods) if methods else demo_methods()
    for method in methods:  # before anything runs
        if method_class(method).demo_config is None:
            raise ValueError(f"method '{method}' has no demo config (its class sets demo_config = None)")
    starts = [*[(m, out_dir / m) for m in methods], ("scratch", None)]
    progress = DemoProgress(pretrainings=len(methods), finetunes=len(starts) * len(tasks))
    rows = []
    for method in methods:
        run_overrides = [f"train.out_dir={out_dir / method}", *(overrides or [])]
        cfg = load_config(method_class(method).demo_config, run_overrides)
        progress.begin("pretrain", f"pre-training {method} ({cfg.train.steps} steps, {cfg.data.budget} pairs)")
        start = time.time()
        run_dir = pretrain(cfg, overwrite=True)  # the demo is re-run from scratch, not resumed
        seconds = time.time() - start
        progress.end("pretrain")
        metrics = json.loads((run_dir / "eval.json").read_text())
        rows.append(method_row(method, cfg, seconds, metrics))
    text = "Pre-training: retrieval on the test images\n\n" + format_table(rows, DEMO_COLUMNS)
    if tasks:
        cells = iter([(name, task) for name, _ in starts for task in tasks])

        def announce(done_rows: list[dict[str, Any]]) -> None:  # after each fine-tune: the next one begins
            progress.end("finetune")
            following = next(cells, None)
            if following is not None:
                progress.begin("finetune", f"fine-tuning {following[0]} on {following[1]}")

        first = next(cells)
        progress.begin("finetune", f"fine-tuning {first[0]} on {first[1]}")
        task_rows = downstream_table(starts, tasks, out_dir / "finetune", [*DEMO_FINETUNE, *(overrides or [])],
                                     on_row=announce)
        if any(task in TEXT_FLOOR_TASKS for task in tasks):  # what the task text alone explains
            task_rows.append(text_floor_row(tasks, [*DEMO_FINETUNE, *(overrides or [])]))
        steps = load_config(f"finetune_{tasks[0]}", [*DEMO_FINETUNE, *(overrides or [])]).train.steps
        text += (f"\n\nFine-tuning ({steps} steps per task; scratch = the baseline without pre-training; text-only = "
                 f"a bag-of-words classifier on the task text alone, the floor): test accuracy %\n\n"
                 + format_table(task_rows))
    text += ("\n\nThis is a glimpse at one budget and one seed; for the comparison the methods' claims are about "
             "(budgets x seeds x tasks, with floors), run `vlp report data-efficiency`.")
    (out_dir / "results.md").write_text(text + "\n")
    return text


def method_row(method: str, cfg: RunConfig, seconds: float, m: dict[str, float]) -> dict[str, Any]:
    """One table row: the method's headline protocol (`ranking`: itm_all, itm = ITC top-k re-ranked by ITM,
    or itc) and its ITC ranking when it has one; metrics a method does not produce are left out ("-")."""
    row: dict[str, Any] = {
        "method": method,
        "pairs": cfg.data.budget,
        "steps": cfg.train.steps,
        "run_s": round(seconds),  # pre-training + evaluation wall time
        "chance_R@1": round(100.0 / cfg.eval.num_images, 2),
    }

    def value(key: str) -> Optional[float]:
        found = m.get(f"eval/{key}", m.get(key))
        return None if found is None else round(float(found), 1)

    ranking = next((key.split("/")[0] for key in HEADLINE_KEYS if value(key) is not None), None)
    if ranking is not None:
        row["ranking"] = ranking
        columns = {"t2i_R@1": "img_r1", "i2t_R@1": "txt_r1", "r_mean": "r_mean", "hardneg": "hard_neg_acc"}
        row.update({c: value(f"{ranking}/{k}") for c, k in columns.items() if value(f"{ranking}/{k}") is not None})
    if value("itm_steps") is not None:  # how many steps trained the ITM head behind an ITM ranking
        row["itm_steps"] = int(value("itm_steps"))
    for column, key in {"itc_t2i_R@1": "itc/img_r1", "itc_r_mean": "itc/r_mean"}.items():
        if value(key) is not None:
            row[column] = value(key)
    return row


__all__ = ["DEMO_TASKS", "DOWNSTREAM_METRICS", "DemoProgress", "demo", "demo_methods", "downstream_table", "finetune_cell",
           "method_row", "text_floor_row"]
