"""`vlp report data-efficiency`: do methods reach contrastive pre-training's quality with fewer pairs?

The claim under test: a method reaches the quality of contrastive pre-training with much less paired data.
The report pre-trains every method of a grid on nested budgets of world pairs and scores each checkpoint
on the same test examples, so a method's curve (metric vs pairs) can be read against the baseline's:

  * grid: methods (default: every registered method with a `demo_config`) x paired budgets (`data.budget`,
    a prefix of the world's train pairs; default 1000 4000 16000 64000) x seeds (`train.seed`; default
    0 1 2). Every pre-training uses its method's demo config with the SAME steps and batch (`--steps`,
    `--batch-size`) and the same world (`data.world_seed`, so the test examples are the same for every
    cell); only the budget and the seed change. `data.train_images` is raised where a budget needs more
    images than the config renders (it does not change which pairs a budget holds: budgets are prefixes).
  * tasks: "retrieval" is the pre-training run's own evaluation (R-mean of the method's headline protocol,
    as `vlp.demo.method_row` picks it, with the number of steps that trained ITM, `eval/itm_steps`: under
    ratio mixing only the steps that drew ITM); "ve", "rec", "vqa", "nlvr2" and "retrieval_ft" (retrieval
    fine-tuning) fine-tune the checkpoint with `vlp.demo`'s compact fine-tune (`DEMO_FINETUNE`, seeded by
    the cell's seed; `--finetune-steps`) and score its test split (`vlp.demo.finetune_cell`).
  * floors: per seed a from-scratch start (no pre-training: the fine-tunes' `task.init`, method "scratch",
    budget 0) fine-tuned on every fine-tuning task, and once the text-only floor (`text_floor_row`: what
    the task text alone explains, VE / VQA / NLVR2).
  * baseline (`--baseline`, default the contrastive method: the first in the grid ranked by ITC alone,
    else the first method): per task, "pairs to reach" is the smallest number of pairs at which a method's
    mean curve reaches the baseline's mean at the largest budget, linearly interpolated in log(pairs)
    between budgets (`pairs_needed`); "not reached" when it never does.

With the steps fixed, the smaller budgets are seen for many epochs and the largest for less than one:
the comparison is "same compute, more distinct pairs", the regime the claim is about.

Output (`--out`, default runs/report_data_efficiency): `results.jsonl` and `results.csv` (one row per
finished cell, `RESULT_COLUMNS`), `summary.md` (per task a table methods x budgets of mean ± std over
seeds, the floors, and the pairs needed), `<task>.png` (metric vs pairs, log x, error bars = std, dashed
floors), and the run directories: `pretrain/<method>/b<budget>_s<seed>`, `finetune/<start>/<task>`.

Resumable: a cell whose row is in results.jsonl (and, for a run, whose run directory holds eval.json) is
skipped; any other cell is run from scratch (its directory is deleted first; a re-run pre-training also
re-runs the fine-tunes of its checkpoint). Results made with other settings in the same `--out` are an
error before anything runs. One progress line per cell goes to stderr (cell i/N, elapsed, ETA = the cells
left by their estimates, scaled by the ratio of wall time to estimate of the cells run so far).

Default sizing (measured on 2 CPU cores, batch 64: demo configs pre-train at 0.17-0.45 s/step plus ~20 s
of retrieval evaluation; a compact fine-tune of one task, 80 steps of 16 scored on 250 test examples,
~13 s). The start-up estimate charges every method the slowest step (0.45 s), so it is an upper bound:
4 methods x 4 budgets x 3 seeds = 48 pre-trainings x (300 steps x 0.45 s + 20 s) = 7440 s, their
48 x 4 fine-tunes x 13 s = 2496 s, the scratch floors 3 x 4 x 13 s = 156 s and the text floors ~30 s:
~10100 s = 2.8 h by the bound (the 4 methods registered today; ~2.1 h at the measured speeds of the three
timed ones). It can be run in pieces: interrupt it, run the same command again. Larger settings are flags
(`--steps`, `--batch-size`, `--finetune-steps`, `--set`, `--finetune-set`). The estimate assumes an
otherwise idle machine: other processes on the same cores slow every cell down (the ETA shows it).
"""

from __future__ import annotations

import csv
import json
import math
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Optional, Sequence, TextIO

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from vlp.config import RunConfig, load_config
from vlp.data.world import NUM_CAPTIONS
from vlp.demo import DEMO_FINETUNE, DOWNSTREAM_METRICS, finetune_cell, method_row, text_floor_row
from vlp.finetune import finetune_config
from vlp.methods import METHODS, method_class
from vlp.pretrain import pretrain
from vlp.tasks.retrieval import headline_r_mean
from vlp.tasks.text_floor import TEXT_FLOOR_TASKS
from vlp.viz import format_table, read_metrics_jsonl

# ------------------------------------------------------------------------------------------ grid
# "retrieval": the pre-training's own evaluation; the others fine-tune (retrieval_ft: `vlp finetune retrieval`).
REPORT_TASKS = ("retrieval", "ve", "rec", "vqa", "nlvr2", "retrieval_ft")
DEFAULT_TASKS = ("retrieval", "ve", "rec", "vqa", "nlvr2")
DEFAULT_BUDGETS = (1000, 4000, 16000, 64000)
DEFAULT_SEEDS = (0, 1, 2)
DEFAULT_STEPS = 300
DEFAULT_BATCH_SIZE = 64
DEFAULT_OUT = "runs/report_data_efficiency"
WORLD_SEED = 0  # every cell pre-trains and is scored on the same world (override: --set data.world_seed=N)
SCRATCH = "scratch"
TEXT_ONLY = "text-only"

# One row per finished cell (results.jsonl / results.csv).
RESULT_COLUMNS = ("method", "budget", "seed", "task", "metric", "value", "wall_s", "itm_steps", "pretrain_steps",
                  "finetune_steps", "overrides", "run_dir")

# ------------------------------------------------------------------------------------------ cost model
# Measured on 2 CPU cores (README "Results"): the slowest demo config pre-trains at 0.45 s/step at batch 64
# (the others 0.17-0.27): the start-up estimate charges every method that, so it is an upper bound.
PRETRAIN_S_PER_STEP = 0.45
PRETRAIN_BATCH = 64
PRETRAIN_EVAL_S = 20.0  # retrieval evaluation of 100 test images at the end of a pre-training
FINETUNE_S = 13.0  # one compact fine-tune (80 steps of 16, 250 test examples), incl. its evaluation
FINETUNE_STEPS = 80
FINETUNE_BATCH = 16
RETRIEVAL_FT_EVAL_S = 20.0  # a retrieval fine-tune is scored like a pre-training
TEXT_FLOOR_S = 10.0  # one text-only floor at the compact fine-tunes' sizes (~9 s)


# ------------------------------------------------------------------------------------------ pure parts
class Stat(NamedTuple):
    """Mean and sample standard deviation (None for one value) of a cell's metric over seeds."""

    mean: float
    std: Optional[float]
    n: int


def aggregate(rows: Sequence[dict[str, Any]]) -> dict[tuple[str, str, int], Stat]:
    """Mean ± sample std over seeds of every (task, method, budget) of result rows (rows whose value is
    None are left out)."""
    groups: dict[tuple[str, str, int], list[float]] = {}
    for row in rows:
        if row.get("value") is None:
            continue
        groups.setdefault((row["task"], row["method"], int(row["budget"])), []).append(float(row["value"]))
    out = {}
    for key, values in groups.items():
        mean = sum(values) / len(values)
        std = (math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else None)
        out[key] = Stat(mean, std, len(values))
    return out


def pairs_needed(budgets: Sequence[int], means: Sequence[Optional[float]], target: Optional[float]) -> Optional[float]:
    """The smallest number of pairs at which a mean curve reaches `target`: the curve is `means` at `budgets`
    (missing points, None, are left out), linear in log(pairs) between budgets. The first budget when it
    already reaches it there; None when the curve never reaches it (or `target` is None)."""
    if target is None:
        return None
    points = sorted((int(b), float(m)) for b, m in zip(budgets, means) if m is not None)
    for i, (budget, mean) in enumerate(points):
        if mean >= target:
            if i == 0:
                return float(budget)
            before, low = points[i - 1]
            share = (target - low) / (mean - low)  # low < target <= mean here
            return math.exp(math.log(before) + share * (math.log(budget) - math.log(before)))
    return None


def spec_class(spec: str) -> type:
    """The method class of a `--methods` entry: NAME, or a variant NAME:key=value,... (e.g. an ablation,
    `vlmixer:method.cmc_ratio=0`): the method NAME with those `--set` overrides on its pre-training."""
    return method_class(spec.partition(":")[0])


def spec_overrides(spec: str) -> list[str]:
    """The pre-training overrides of a `--methods` entry (after the ':'), [] for a bare NAME."""
    return [o for o in spec.partition(":")[2].split(",") if o]


def spec_dir(spec: str) -> str:
    """A file-system name for a `--methods` entry (':' '=' ',' '/' -> '_')."""
    return re.sub(r"[:=,/]", "_", spec)


def default_baseline(methods: Sequence[str]) -> str:
    """The contrastive method of `methods`: the first whose class ranks by ITC alone (a dual encoder, the
    CLIP-style baseline), else the first method."""
    return next((m for m in methods if spec_class(m).retrieval_protocols == ("itc",)), methods[0])


def default_methods() -> tuple[str, ...]:
    """Every registered method that has a demo config."""
    return tuple(name for name, cls in METHODS.items() if cls.demo_config)


# ------------------------------------------------------------------------------------------ cells
@dataclass
class Cell:
    """One unit of work with one result row: a pre-training (its own retrieval evaluation), a fine-tune of
    a start on a task, or a text-only floor."""

    kind: str  # "pretrain" | "finetune" | "floor"
    method: str  # a registered method, SCRATCH or TEXT_ONLY
    budget: int
    seed: Optional[int]
    task: str  # a REPORT_TASKS name
    overrides: list[str]  # the config overrides of the run (train.out_dir aside)
    run_dir: Optional[Path]  # None for a floor (no run directory)
    estimate_s: float
    config: Optional[str] = None  # pretrain: the method's demo config
    checkpoint: Optional[Path] = None  # finetune: the pre-training run directory (None: from scratch)
    pretrain_steps: int = 0
    finetune_steps: Optional[int] = None
    dependents: list["Cell"] = field(default_factory=list)  # pretrain: the fine-tunes of its checkpoint

    @property
    def key(self) -> tuple[str, int, Optional[int], str]:
        return (self.method, self.budget, self.seed, self.task)

    @property
    def label(self) -> str:
        if self.kind == "floor":
            return f"text-only floor {self.task}"
        start = f"{self.method} {self.budget} pairs" if self.budget else self.method
        what = "pre-train + retrieval" if self.kind == "pretrain" else f"fine-tune {self.task}"
        return f"{start} seed {self.seed}: {what}"


def _finetune_task(task: str) -> str:
    """The `vlp finetune` task of a report task (retrieval_ft -> retrieval)."""
    return "retrieval" if task == "retrieval_ft" else task


def _clock(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def method_budgets(method: str, budgets: Sequence[int]) -> list[int]:
    """The paired budgets a method is pre-trained at: the grid's, or only 0 for a method that reads no pairs
    (`PretrainMethod.reads_pairs`, e.g. VLMixer on the world's unpaired streams): its one pre-training per
    seed is compared with every budget of the others."""
    return list(budgets) if spec_class(method).reads_pairs() else [0]


def plan_cells(out_dir: Path, methods: Sequence[str], budgets: Sequence[int], seeds: Sequence[int],
               tasks: Sequence[str], steps: int, batch_size: int, finetune_steps: Optional[int],
               overrides: Sequence[str], finetune_overrides: Sequence[str]) -> list[Cell]:
    """Every cell of the grid in run order (text floors; then per seed: the scratch fine-tunes, then per
    budget and method the pre-training followed by its fine-tunes), with its resolved overrides; every
    config is loaded here, so a bad `--set` key fails before anything runs."""
    ft_tasks = [t for t in tasks if t != "retrieval"]
    pre_base = [f"data.world_seed={WORLD_SEED}", f"train.steps={steps}", f"train.batch_size={batch_size}",
                "train.progress=false", "train.tensorboard=false"]
    configs: dict[tuple[str, int, int], tuple[RunConfig, list[str]]] = {}
    world_seeds = set()
    for method in methods:
        for budget in method_budgets(method, budgets):
            for seed in seeds:
                pairs = [f"data.budget={budget}"] if budget else []  # 0: an unpaired method reads no pairs
                cell_overrides = [*pairs, f"train.seed={seed}", *pre_base, *overrides, *spec_overrides(method)]
                cfg = load_config(spec_class(method).demo_config, cell_overrides)
                if budget > cfg.data.train_images * NUM_CAPTIONS:  # budgets are prefixes: render enough images
                    cell_overrides.append(f"data.train_images={math.ceil(budget / NUM_CAPTIONS)}")
                    cfg = load_config(spec_class(method).demo_config, cell_overrides)
                if (budget and cfg.data.budget != budget) or cfg.train.seed != seed:
                    raise ValueError(f"--set data.budget / train.seed conflict with the grid ({method}: budget "
                                     f"{cfg.data.budget}, seed {cfg.train.seed}); set them with --budgets / --seeds")
                if cfg.data.source != "world":
                    raise ValueError(f"the report pre-trains on the embedded world; drop --set data.source="
                                     f"{cfg.data.source}")
                configs[(method, budget, seed)] = (cfg, cell_overrides)
                world_seeds.add(cfg.data.world_seed)
    if len(world_seeds) > 1:
        raise ValueError(f"the methods' configs resolve to different worlds (data.world_seed {sorted(world_seeds)}); "
                         f"set one with --set data.world_seed=N so every cell is scored on the same test examples")
    world_seed = world_seeds.pop() if world_seeds else WORLD_SEED

    def ft_overrides(seed: Optional[int]) -> list[str]:
        own = [*DEMO_FINETUNE, f"data.world_seed={world_seed}"]
        if finetune_steps is not None:
            own.append(f"train.steps={finetune_steps}")
        if seed is not None:
            own.append(f"train.seed={seed}")
        return [*own, *finetune_overrides]

    ft_cost: dict[str, tuple[float, int]] = {}
    for task in ft_tasks:  # the scratch config of each task: validates --finetune-set, sizes the estimate
        cfg = finetune_config(_finetune_task(task), overrides=ft_overrides(0))
        cost = FINETUNE_S * (cfg.train.steps * cfg.train.batch_size) / (FINETUNE_STEPS * FINETUNE_BATCH)
        ft_cost[task] = (cost + (RETRIEVAL_FT_EVAL_S if task == "retrieval_ft" else 0.0), cfg.train.steps)

    cells: list[Cell] = []
    for task in ft_tasks:
        if task in TEXT_FLOOR_TASKS:
            cells.append(Cell("floor", TEXT_ONLY, 0, None, task, ft_overrides(None), None, TEXT_FLOOR_S))
    for seed in seeds:
        for task in ft_tasks:
            cells.append(Cell("finetune", SCRATCH, 0, seed, task, ft_overrides(seed),
                              out_dir / "finetune" / f"{SCRATCH}_s{seed}" / task, ft_cost[task][0],
                              finetune_steps=ft_cost[task][1]))
        for budget in sorted({0, *budgets}):
            for method in methods:
                if budget not in method_budgets(method, budgets):
                    continue
                cfg, cell_overrides = configs[(method, budget, seed)]
                run_dir = out_dir / "pretrain" / spec_dir(method) / f"b{budget}_s{seed}"
                estimate = (cfg.train.steps * PRETRAIN_S_PER_STEP * cfg.train.batch_size / PRETRAIN_BATCH
                            + PRETRAIN_EVAL_S)
                pre = Cell("pretrain", method, budget, seed, "retrieval", cell_overrides, run_dir, estimate,
                           config=spec_class(method).demo_config, pretrain_steps=cfg.train.steps)
                cells.append(pre)
                for task in ft_tasks:
                    ft = Cell("finetune", method, budget, seed, task, ft_overrides(seed),
                              out_dir / "finetune" / f"{spec_dir(method)}_b{budget}_s{seed}" / task, ft_cost[task][0],
                              checkpoint=run_dir, pretrain_steps=cfg.train.steps, finetune_steps=ft_cost[task][1])
                    pre.dependents.append(ft)
                    cells.append(ft)
    return cells


# ------------------------------------------------------------------------------------------ running
def _itm_steps(metrics: dict[str, Any]) -> Optional[int]:
    """The steps that trained ITM, as the run's evaluation records them (`eval/itm_steps`, from the method's
    `itm_steps`); None for a method without ITM."""
    found = metrics.get("eval/itm_steps", metrics.get("itm_steps"))
    return None if found is None else int(found)


def run_cell(cell: Cell) -> dict[str, Any]:
    """Run one cell (its run directory must not hold a previous attempt) and return its result row."""
    begin = time.time()
    row: dict[str, Any] = {"method": cell.method, "budget": cell.budget, "seed": cell.seed, "task": cell.task,
                           "itm_steps": None, "pretrain_steps": cell.pretrain_steps,
                           "finetune_steps": cell.finetune_steps, "overrides": list(cell.overrides),
                           "run_dir": None if cell.run_dir is None else str(cell.run_dir)}
    if cell.kind == "pretrain":
        assert cell.run_dir is not None and cell.config is not None
        cfg = load_config(cell.config, [f"train.out_dir={cell.run_dir}", *cell.overrides])
        pretrain(cfg)
        metrics = json.loads((cell.run_dir / "eval.json").read_text())
        ranking = method_row(cell.method, cfg, time.time() - begin, metrics).get("ranking")
        value = headline_r_mean(metrics, "eval/")
        row.update(metric=f"{ranking}/r_mean" if ranking else "r_mean",
                   value=headline_r_mean(metrics) if value is None else value,
                   itm_steps=_itm_steps(metrics))
    elif cell.kind == "finetune":
        assert cell.run_dir is not None
        result = finetune_cell(_finetune_task(cell.task), cell.checkpoint, cell.run_dir, cell.overrides)
        column = DOWNSTREAM_METRICS[_finetune_task(cell.task)][0]
        row.update(metric=column, value=result[column])
    else:
        column = DOWNSTREAM_METRICS[cell.task][0]
        row.update(metric=column, value=text_floor_row([cell.task], cell.overrides).get(column))
    row["wall_s"] = round(time.time() - begin, 1)
    return {column: row.get(column) for column in RESULT_COLUMNS}


def _read_rows(path: Path) -> dict[tuple, dict[str, Any]]:
    """The rows of results.jsonl by cell key (the last row of a key wins; a torn last line is skipped)."""
    if not path.is_file():
        return {}
    return {(r["method"], int(r["budget"]), r["seed"], r["task"]): r for r in read_metrics_jsonl(path)}


def _write_rows(out_dir: Path, rows: dict[tuple, dict[str, Any]]) -> None:
    """results.jsonl and results.csv, rewritten whole (through a temporary file: a crash leaves the old one)."""
    for name, text in (("results.jsonl", "".join(json.dumps(r) + "\n" for r in rows.values())),
                       ("results.csv", _csv_text(list(rows.values())))):
        tmp = out_dir / f"{name}.tmp"
        tmp.write_text(text)
        tmp.replace(out_dir / name)


def _csv_text(rows: list[dict[str, Any]]) -> str:
    import io

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(RESULT_COLUMNS), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (json.dumps(v) if isinstance(v, list) else ("" if v is None else v))
                         for k, v in row.items() if k in RESULT_COLUMNS})
    return buffer.getvalue()


def _finished(cell: Cell, rows: dict[tuple, dict[str, Any]]) -> bool:
    row = rows.get(cell.key)
    if row is None or row.get("overrides") != cell.overrides:
        return False
    return cell.run_dir is None or (cell.run_dir / "eval.json").is_file()


def _check_settings(cells: Sequence[Cell], rows: dict[tuple, dict[str, Any]], out_dir: Path) -> None:
    """Results of the grid's cells made with other overrides: an error, before anything runs."""
    other = [(c, rows[c.key]) for c in cells if c.key in rows and rows[c.key].get("overrides") != c.overrides]
    if other:
        cell, row = other[0]
        changed = sorted(set(row.get("overrides") or []) ^ set(cell.overrides))
        raise ValueError(f"{out_dir} holds results of {len(other)} cell(s) made with other settings (e.g. {cell.label}: "
                         f"{' '.join(changed)}); pass another --out, or delete {out_dir} to start over")


# ------------------------------------------------------------------------------------------ summary
def _fmt_stat(stat: Optional[Stat]) -> Optional[str]:
    if stat is None:
        return None
    return f"{stat.mean:.1f}" if stat.std is None else f"{stat.mean:.1f} ± {stat.std:.1f}"


def _fmt_pairs(pairs: Optional[float]) -> str:
    return "not reached" if pairs is None else f"{int(round(pairs)):,}"


def summary_tables(rows: Sequence[dict[str, Any]], methods: Sequence[str], budgets: Sequence[int],
                   tasks: Sequence[str], baseline: str) -> dict[str, str]:
    """Per task, the markdown table: one row per method (mean ± std over seeds at each budget, the pairs it
    needs to reach the baseline's mean at the largest budget), then the floors (scratch, text-only: column 0)."""
    stats = aggregate(rows)
    top = max(budgets)
    pairs_column = f"pairs to reach {baseline}@{top}"
    tables = {}
    for task in tasks:
        target = stats.get((task, baseline, top))
        table = []
        for method in methods:
            row: dict[str, Any] = {"method": method, "0": _fmt_stat(stats.get((task, method, 0)))}
            for budget in budgets:
                row[str(budget)] = _fmt_stat(stats.get((task, method, budget)))
            means = [stats[(task, method, b)].mean if (task, method, b) in stats else None for b in budgets]
            unpaired = stats.get((task, method, 0))
            if unpaired is not None and target is not None:  # 0 pairs: it reaches the target or it does not
                row[pairs_column] = "0" if unpaired.mean >= target.mean else "not reached"
            else:
                row[pairs_column] = (_fmt_pairs(pairs_needed(budgets, means, target.mean)) if target is not None
                                     and any(m is not None for m in means) else None)
            if task == "retrieval":
                found = [r for r in rows if r["task"] == task and r["method"] == method]
                metrics = sorted({str(r["metric"]) for r in found})
                row["metric"] = ", ".join(metrics) or None
                itm = [r["itm_steps"] for r in found if r.get("itm_steps") is not None]
                row["ITM steps"] = f"{sum(itm) / len(itm):.0f}" if itm else None
            table.append(row)
        for floor in (SCRATCH, TEXT_ONLY):
            stat = stats.get((task, floor, 0))
            if stat is not None:
                table.append({"method": floor, "0": _fmt_stat(stat)})
        columns = ["method", "0", *map(str, budgets), pairs_column]
        if task == "retrieval":
            columns += ["metric", "ITM steps"]
        if not any(r.get("0") for r in table):
            columns.remove("0")
        tables[task] = format_table(table, columns)
    return tables


def _task_heading(task: str, finetune_steps: Optional[int]) -> str:
    if task == "retrieval":
        return ("retrieval: R-mean (%) of each method's headline protocol (`metric`), the pre-training's own "
                "evaluation on the test images; `ITM steps`: the steps the ITM loss ran (mean over cells)")
    name = "retrieval fine-tuning: R-mean (%)" if task == "retrieval_ft" else f"{task}: test {DOWNSTREAM_METRICS[task][0]} (%)"
    return f"{name}, after {finetune_steps} fine-tuning steps from each start"


def write_summary(out_dir: Path, rows: Sequence[dict[str, Any]], methods: Sequence[str], budgets: Sequence[int],
                  seeds: Sequence[int], tasks: Sequence[str], baseline: str, settings: dict[str, Any]) -> str:
    """Write summary.md (one table per task) and return its text."""
    tables = summary_tables(rows, methods, budgets, tasks, baseline)
    ft_steps = next((r["finetune_steps"] for r in rows if r.get("finetune_steps")), settings.get("finetune_steps"))
    lines = ["# Data efficiency", "",
             f"Methods {', '.join(methods)}; paired budgets {', '.join(map(str, budgets))} (prefixes of the world's "
             f"train pairs); seeds {', '.join(map(str, seeds))}; {settings['steps']} pre-training steps of "
             f"{settings['batch_size']} for every cell; the same test examples for every cell. Cells: mean ± std over "
             f"seeds. Floors (column 0): scratch = the fine-tune without pre-training, text-only = a bag-of-words "
             f"classifier on the task text alone. `pairs to reach`: the smallest number of pairs at which a method's "
             f"mean curve reaches the baseline ({baseline}) at {max(budgets)} pairs, linear in log(pairs) between "
             f"budgets.", ""]
    for task in tasks:
        lines += [f"## {task}", "", _task_heading(task, ft_steps), "", tables[task], ""]
    done = len(rows)
    lines.append(f"{done} cell(s) finished; wall time of the cells {sum(float(r.get('wall_s') or 0) for r in rows):.0f} s.")
    text = "\n".join(lines) + "\n"
    (out_dir / "summary.md").write_text(text)
    return text


def plot_task(out: Path, task: str, rows: Sequence[dict[str, Any]], methods: Sequence[str],
              budgets: Sequence[int]) -> Optional[Path]:
    """`<task>.png`: metric vs pairs (log x), one line per method with mean ± std error bars, dashed lines at
    the scratch and text-only floors. None (nothing written) when the task has no results yet."""
    stats = aggregate([r for r in rows if r["task"] == task])
    if not stats:
        return None
    fig = Figure(figsize=(6.4, 4.2), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    metric = next((str(r["metric"]) for r in rows if r["task"] == task), task)
    for method in methods:
        points = [(b, stats[(task, method, b)]) for b in budgets if (task, method, b) in stats]
        if points:
            ax.errorbar([b for b, _ in points], [s.mean for _, s in points], yerr=[s.std or 0.0 for _, s in points],
                        marker="o", capsize=3, label=method)
    for method in methods:  # a method without pairs (0 pairs): a dotted level across the budgets
        stat = stats.get((task, method, 0))
        if stat is not None:
            ax.axhline(stat.mean, linestyle=":", color="tab:purple", linewidth=1.6,
                       label=f"{method} (0 pairs) {stat.mean:.1f}")
    for floor, colour in ((SCRATCH, "0.35"), (TEXT_ONLY, "tab:red")):
        stat = stats.get((task, floor, 0))
        if stat is not None:
            ax.axhline(stat.mean, linestyle="--", color=colour, linewidth=1.2, label=f"{floor} {stat.mean:.1f}")
    ax.set_xscale("log")
    ax.minorticks_off()  # the budgets are the ticks
    ax.set_xticks(list(budgets))
    ax.set_xticklabels([f"{b:,}" for b in budgets])
    ax.set_xlabel("paired examples (pre-training budget)")
    ax.set_ylabel("R-mean (%)" if task.startswith("retrieval") else f"{metric} (%)")
    ax.set_title(f"{task}: mean ± std over seeds")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    path = out / f"{task}.png"
    fig.savefig(path, bbox_inches="tight")
    return path


# ------------------------------------------------------------------------------------------ entry point
def report_data_efficiency(
    out_dir: str | Path = DEFAULT_OUT,
    methods: Optional[Sequence[str]] = None,
    budgets: Optional[Sequence[int]] = None,
    seeds: Optional[Sequence[int]] = None,
    tasks: Optional[Sequence[str]] = None,
    steps: Optional[int] = None,
    batch_size: Optional[int] = None,
    finetune_steps: Optional[int] = None,
    baseline: Optional[str] = None,
    overrides: Optional[Sequence[str]] = None,
    finetune_overrides: Optional[Sequence[str]] = None,
    log: Optional[TextIO] = None,
) -> str:
    """Run (or resume) the data-efficiency grid (module docstring) into `out_dir` and return summary.md.

    None takes the default: methods with a demo config, budgets 1000 4000 16000 64000, seeds 0 1 2, tasks
    retrieval ve rec vqa nlvr2, 300 pre-training steps of 64, the demo's compact fine-tunes (80 steps),
    the contrastive baseline. `overrides` apply to every pre-training (after the report's settings),
    `finetune_overrides` to every fine-tune and text floor. Progress lines go to `log` (default stderr).
    Bad arguments raise ValueError (or ConfigError for a bad override) before anything runs.
    """
    log = sys.stderr if log is None else log
    out = Path(out_dir)
    methods = tuple(dict.fromkeys(methods)) if methods else default_methods()
    budgets = tuple(sorted(set(int(b) for b in budgets))) if budgets else DEFAULT_BUDGETS
    seeds = tuple(dict.fromkeys(int(s) for s in seeds)) if seeds else DEFAULT_SEEDS
    tasks = tuple(dict.fromkeys(tasks)) if tasks else DEFAULT_TASKS
    steps = DEFAULT_STEPS if steps is None else int(steps)
    batch_size = DEFAULT_BATCH_SIZE if batch_size is None else int(batch_size)
    unknown = [m for m in methods if m.partition(":")[0] not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)} for --methods (registered: {', '.join(METHODS)})")
    no_demo = [m for m in methods if not spec_class(m).demo_config or not spec_class(m).retrieval_protocols]
    if no_demo:
        raise ValueError(f"method(s) {', '.join(no_demo)} have no demo config or no retrieval protocol, so the report "
                         f"cannot pre-train and score them; pick --methods from {', '.join(default_methods())}")
    if SCRATCH in methods or TEXT_ONLY in methods:
        raise ValueError(f"'{SCRATCH}' and '{TEXT_ONLY}' name the floors, not methods")
    bad_tasks = [t for t in tasks if t not in REPORT_TASKS]
    if bad_tasks:
        raise ValueError(f"unknown task(s) {', '.join(bad_tasks)} for --tasks (known: {', '.join(REPORT_TASKS)})")
    if not budgets or min(budgets) < 1:
        raise ValueError(f"--budgets must be positive numbers of pairs, got {list(budgets)}")
    if min(seeds) < 0:
        raise ValueError(f"--seeds must be non-negative, got {list(seeds)}")
    if steps < 1 or batch_size < 1 or (finetune_steps is not None and finetune_steps < 1):
        raise ValueError("--steps, --batch-size and --finetune-steps must be at least 1")
    baseline = baseline or default_baseline(methods)
    if baseline not in methods:
        raise ValueError(f"--baseline {baseline} is not among the methods of the grid ({', '.join(methods)}); "
                         f"add it to --methods or pick one of them")
    cells = plan_cells(out, methods, budgets, seeds, tasks, steps, batch_size, finetune_steps,
                       list(overrides or []), list(finetune_overrides or []))
    rows = _read_rows(out / "results.jsonl")
    _check_settings(cells, rows, out)

    todo = {id(c) for c in cells if not _finished(c, rows)}
    for cell in cells:  # a pre-training that runs again makes new checkpoints: its fine-tunes run again too
        if id(cell) in todo:
            todo.update(id(d) for d in cell.dependents)
    total_estimate = sum(c.estimate_s for c in cells)
    left_estimate = sum(c.estimate_s for c in cells if id(c) in todo)
    print(f"report: {len(cells)} cells ({sum(c.kind == 'pretrain' for c in cells)} pre-trainings, "
          f"{sum(c.kind == 'finetune' for c in cells)} fine-tunes, {sum(c.kind == 'floor' for c in cells)} text "
          f"floors), estimated at most {total_estimate:.0f} s ({total_estimate / 3600:.1f} h) on 2 CPU cores; "
          f"{len(cells) - len(todo)} finished, {len(todo)} to run (~{left_estimate:.0f} s); out: {out}",
          file=log, flush=True)
    out.mkdir(parents=True, exist_ok=True)
    stale = [c.key for c in cells if id(c) in todo and c.key in rows]
    for key in stale:  # rows of cells that run again go first: results.jsonl holds finished cells only
        del rows[key]
    if stale:
        _write_rows(out, rows)
    settings = {"steps": steps, "batch_size": batch_size, "finetune_steps": finetune_steps}
    grid_keys = {c.key for c in cells}
    start = time.time()
    ran: list[tuple[float, float]] = []  # (wall seconds, estimate) of the cells run so far
    for i, cell in enumerate(cells, 1):
        if id(cell) not in todo:
            print(f"[report {i}/{len(cells)}] {cell.label}: finished before, skipped", file=log, flush=True)
            continue
        for path in [cell.run_dir, *(d.run_dir for d in cell.dependents)]:
            if path is not None and path.exists():
                shutil.rmtree(path)
        row = run_cell(cell)
        rows[cell.key] = row
        _write_rows(out, rows)
        ran.append((float(row["wall_s"]), cell.estimate_s))
        todo.discard(id(cell))
        write_summary(out, [r for k, r in rows.items() if k in grid_keys], methods, budgets, seeds, tasks, baseline,
                      settings)
        # the cells left, by their estimates scaled by how fast this machine ran the estimates so far (a plain
        # mean per cell would price the long pre-trainings at the first, short fine-tunes' time)
        speed = sum(w for w, _ in ran) / max(sum(e for _, e in ran), 1e-9)
        eta = speed * sum(c.estimate_s for c in cells if id(c) in todo)
        value = "-" if row["value"] is None else f"{row['value']:.1f}"
        print(f"[report {i}/{len(cells)}] {cell.label}: {row['metric']} {value} in {row['wall_s']:.0f} s | "
              f"elapsed {_clock(time.time() - start)} | ETA {_clock(eta)}", file=log, flush=True)
    final = [r for k, r in rows.items() if k in grid_keys]
    _write_rows(out, rows)
    text = write_summary(out, final, methods, budgets, seeds, tasks, baseline, settings)
    for task in tasks:
        plot_task(out, task, final, methods, budgets)
    return text


__all__ = ["DEFAULT_BUDGETS", "DEFAULT_SEEDS", "DEFAULT_STEPS", "DEFAULT_TASKS", "REPORT_TASKS", "RESULT_COLUMNS",
           "Stat", "aggregate", "default_baseline", "default_methods", "pairs_needed", "plan_cells",
           "report_data_efficiency", "run_cell", "summary_tables", "write_summary", "plot_task"]
