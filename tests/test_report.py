"""`vlp report data-efficiency`: the pure parts (pairs needed, mean ± std, the baseline), argument errors before
anything runs, and a tiny grid end to end: the files it writes, resuming (finished cells skipped, a cell
without eval.json re-run with the fine-tunes of its checkpoint), and settings changes refused."""

from __future__ import annotations

import csv
import io
import json
import math
import re

import pytest

import vlp.report as report
from vlp.cli.main import main
from vlp.report import RESULT_COLUMNS, aggregate, default_baseline, pairs_needed

# A tiny grid: 2 methods (one with ITM, the contrastive baseline) x 2 budgets x 1 seed, retrieval + VE.
TINY_PRETRAIN = [
    "--set", "train.warmup_steps=1", "--set", "data.train_images=60", "--set", "data.num_workers=0",
    "--set", "eval.num_images=12", "--set", "eval.k_rerank=3", "--set", "model.vision.depth=1",
    "--set", "model.text.depth=1", "--set", "model.fusion.depth=1",
]
TINY_FINETUNE = [
    "--finetune-set", "task.train_size=8", "--finetune-set", "task.eval_size=6",
    "--finetune-set", "train.batch_size=4", "--finetune-set", "train.warmup_steps=1",
    "--finetune-set", "train.tensorboard=false",
    # the scratch start (task.init) as small as the pre-trained ones (which keep their own fusion depth)
    "--finetune-set", "model.vision.depth=1", "--finetune-set", "model.text.depth=1",
]
GRID = ["--methods", "albef", "clip", "--budgets", "100", "200", "--seeds", "0", "--tasks", "retrieval", "ve",
        "--steps", "4", "--batch-size", "8", "--finetune-steps", "2"]
# 1 text floor + 1 scratch fine-tune + 2 methods x 2 budgets x (pre-training + VE fine-tune)
CELLS = 10


def report_args(out) -> list[str]:
    return ["report", "data-efficiency", "--out", str(out), *GRID, *TINY_PRETRAIN, *TINY_FINETUNE]


# ------------------------------------------------------------------------------------------ pure parts
def test_pairs_needed_interpolates_in_log_pairs():
    budgets = [1000, 4000, 16000]
    # between 4000 (60) and 16000 (70): half way in log(pairs) -> the geometric mean, 8000
    assert pairs_needed(budgets, [50.0, 60.0, 70.0], 65.0) == pytest.approx(8000.0)
    assert pairs_needed(budgets, [50.0, 60.0, 70.0], 45.0) == 1000.0  # already there at the first budget
    assert pairs_needed(budgets, [50.0, 60.0, 70.0], 60.0) == pytest.approx(4000.0)  # exactly at a budget
    assert pairs_needed(budgets, [50.0, 60.0, 70.0], 75.0) is None  # never: "not reached"
    assert pairs_needed(budgets, [50.0, None, 70.0], 60.0) == pytest.approx(4000.0)  # a missing point is skipped
    assert pairs_needed(budgets, [50.0, 60.0, 70.0], None) is None
    # the baseline against its own largest-budget mean: that budget, or less on a curve that peaks before it
    assert pairs_needed(budgets, [50.0, 60.0, 70.0], 70.0) == pytest.approx(16000.0)
    peaked = pairs_needed(budgets, [50.0, 72.0, 70.0], 70.0)
    assert peaked == pytest.approx(1000.0 * 4.0 ** (20.0 / 22.0)) and peaked < 4000.0


def test_aggregate_mean_and_sample_std():
    rows = [{"task": "ve", "method": "albef", "budget": 100, "value": v} for v in (1.0, 2.0, 3.0)]
    rows += [{"task": "ve", "method": "clip", "budget": 100, "value": 5.0},
             {"task": "ve", "method": "clip", "budget": 200, "value": None}]
    stats = aggregate(rows)
    assert stats[("ve", "albef", 100)].mean == pytest.approx(2.0)
    assert stats[("ve", "albef", 100)].std == pytest.approx(1.0) and stats[("ve", "albef", 100)].n == 3
    assert stats[("ve", "clip", 100)] == (5.0, None, 1)  # one seed: no std
    assert ("ve", "clip", 200) not in stats  # an unmeasured value is left out


def test_default_baseline_is_the_contrastive_method():
    assert default_baseline(["albef", "cmal", "clip"]) == "clip"  # ranked by ITC alone
    assert default_baseline(["cmal", "albef"]) == "cmal"  # none: the first method


def test_unpaired_methods_and_variants_plan_once_per_seed_at_zero_pairs(tmp_path):
    """A method that reads no pairs (VLMixer) is pre-trained once per seed at budget 0, whatever the budgets; a
    variant NAME:key=value is its own row with those overrides on its pre-training; paired methods keep the grid."""
    cells = report.plan_cells(tmp_path, ["albef", "vlmixer", "vlmixer:method.cmc_ratio=0"], [100, 200], [0, 1],
                              ["retrieval", "ve"], steps=4, batch_size=8, finetune_steps=2, overrides=[],
                              finetune_overrides=[])
    pre = [(c.method, c.budget, c.seed) for c in cells if c.kind == "pretrain"]
    assert sorted(p for p in pre if p[0] == "albef") == sorted(("albef", b, s) for b in (100, 200) for s in (0, 1))
    assert sorted(p for p in pre if p[0].startswith("vlmixer")) == sorted(
        (m, 0, s) for m in ("vlmixer", "vlmixer:method.cmc_ratio=0") for s in (0, 1))
    variant = next(c for c in cells if c.kind == "pretrain" and c.method.endswith("=0"))
    assert "method.cmc_ratio=0" in variant.overrides and not any(o.startswith("data.budget") for o in variant.overrides)
    assert ":" not in variant.run_dir.name and ":" not in str(variant.run_dir.relative_to(tmp_path))
    rows = [{"task": "ve", "method": m, "budget": b, "seed": 0, "value": v} for m, b, v in
            [("albef", 100, 40.0), ("albef", 200, 50.0), ("vlmixer", 0, 52.0), ("vlmixer:method.cmc_ratio=0", 0, 45.0)]]
    table = report.summary_tables(rows, ["albef", "vlmixer", "vlmixer:method.cmc_ratio=0"], [100, 200], ["ve"],
                                  "albef")["ve"]
    lines = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in table.splitlines()[2:]}
    assert lines["vlmixer"][0] == "52.0" and lines["vlmixer"][-1] == "0"  # reaches albef@200 with 0 pairs
    assert lines["vlmixer:method.cmc_ratio=0"][-1] == "not reached"


def test_world_cells_keep_their_keys_overrides_and_directories(tmp_path):
    """The world arm's cells as report directories written before the corpus arm hold them: a 4-part key, the
    same overrides in the same order and the same run directories, so such a directory resumes unchanged."""
    cells = report.plan_cells(tmp_path, ["clip"], [100], [0], ["retrieval", "ve"], steps=4, batch_size=8,
                              finetune_steps=2, overrides=["eval.num_images=12"], finetune_overrides=["task.train_size=8"])
    demo_ft = ["train.steps=80", "train.batch_size=16", "train.warmup_steps=8", "train.log_every=40",
               "task.train_size=1280", "task.eval_size=250", "task.eval_splits=[test]", "data.world_seed=0",
               "train.steps=2"]
    assert [(c.kind, c.key, c.overrides, c.run_dir) for c in cells] == [
        ("floor", ("text-only", 0, None, "ve"), [*demo_ft, "task.train_size=8"], None),
        ("finetune", ("scratch", 0, 0, "ve"), [*demo_ft, "train.seed=0", "task.train_size=8"],
         tmp_path / "finetune" / "scratch_s0" / "ve"),
        ("pretrain", ("clip", 100, 0, "retrieval"),
         ["data.budget=100", "train.seed=0", "data.world_seed=0", "train.steps=4", "train.batch_size=8",
          "train.progress=false", "train.tensorboard=false", "eval.num_images=12"],
         tmp_path / "pretrain" / "clip" / "b100_s0"),
        ("finetune", ("clip", 100, 0, "ve"), [*demo_ft, "train.seed=0", "task.train_size=8"],
         tmp_path / "finetune" / "clip_b100_s0" / "ve"),
    ]
    assert all(c.corpus == "world" and not c.score_overrides for c in cells)


def test_rows_written_before_the_corpus_column_are_world_rows(tmp_path):
    """results.jsonl rows without "corpus" (written before it existed) keep their world keys and get the column."""
    row = {"method": "clip", "budget": 100, "seed": 0, "task": "ve", "metric": "VE_acc", "value": 50.0}
    (tmp_path / "results.jsonl").write_text(json.dumps(row) + "\n")
    assert report._read_rows(tmp_path / "results.jsonl") == {("clip", 100, 0, "ve"): {**row, "corpus": "world"}}


@pytest.mark.parametrize("args, message", [
    (["--methods", "albef", "nope"], "unknown method.*nope.*--methods"),
    (["--tasks", "ve", "captioning"], "unknown task.*captioning.*--tasks"),
    (["--methods", "albef", "--baseline", "clip"], "--baseline clip is not among"),
    (["--budgets", "0"], "--budgets must be positive"),
    (["--set", "train.stpes=3"], "stpes"),
    (["--finetune-set", "task.trian_size=3"], "trian_size"),
])
def test_errors_before_anything_runs(tmp_path, capsys, args, message):
    out = tmp_path / "report"
    assert main(["report", "data-efficiency", "--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and re.search(message, err), err
    assert not out.exists()  # nothing ran, nothing was written


# ------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "de"
    capture = pytest.MonkeyPatch()
    log = io.StringIO()
    capture.setattr(report.sys, "stderr", log)
    try:
        assert main(report_args(out)) == 0
    finally:
        capture.undo()
    return out, log.getvalue().splitlines()


@pytest.mark.slow
def test_report_writes_results_summary_and_figures(tiny_report):
    out, lines = tiny_report
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == CELLS and all(list(r) == list(RESULT_COLUMNS) for r in rows)
    with open(out / "results.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == CELLS and list(table[0]) == list(RESULT_COLUMNS)

    retrieval = {(r["method"], r["budget"]): r for r in rows if r["task"] == "retrieval"}
    assert set(retrieval) == {("albef", 100), ("albef", 200), ("clip", 100), ("clip", 200)}
    assert retrieval[("albef", 100)]["metric"] == "itm/r_mean" and retrieval[("albef", 100)]["itm_steps"] == 4
    assert retrieval[("clip", 100)]["metric"] == "itc/r_mean" and retrieval[("clip", 100)]["itm_steps"] is None
    assert all(0 <= r["value"] <= 100 and r["pretrain_steps"] == 4 for r in retrieval.values())
    assert "data.budget=200" in retrieval[("clip", 200)]["overrides"]
    ve = [r for r in rows if r["task"] == "ve"]
    assert {(r["method"], r["budget"]) for r in ve} == {("albef", 100), ("albef", 200), ("clip", 100), ("clip", 200),
                                                        ("scratch", 0), ("text-only", 0)}
    assert all(r["metric"] == "VE_acc" and 0 <= r["value"] <= 100 for r in ve)
    assert json.loads((out / "finetune" / "clip_b200_s0" / "ve" / "eval.json").read_text())["steps"] == 2
    # the same world and test images for every cell: only the budget and the seed differ
    for method in ("albef", "clip"):
        a, b = (set(retrieval[(method, budget)]["overrides"]) for budget in (100, 200))
        assert a ^ b == {"data.budget=100", "data.budget=200"}

    summary = (out / "summary.md").read_text()
    assert "## retrieval" in summary and "## ve" in summary
    header = next(line for line in summary.splitlines() if "pairs to reach clip@200" in line and "| 0 " in line)
    assert [c.strip() for c in header.strip("|").split("|")][:4] == ["method", "0", "100", "200"]
    clip_row = next(line for line in summary.splitlines() if line.startswith("| clip ") and "VE" not in line)
    assert "not reached" not in clip_row  # the baseline reaches its own score
    assert any(line.startswith("| scratch ") for line in summary.splitlines())
    assert any(line.startswith("| text-only ") for line in summary.splitlines())

    for task in ("retrieval", "ve"):
        png = (out / f"{task}.png").read_bytes()
        assert len(png) > 1000 and png[:8] == b"\x89PNG\r\n\x1a\n"

    progress = [line for line in lines if line.startswith("[report ")]
    assert len(progress) == CELLS and all("ETA" in line and "elapsed" in line for line in progress)
    assert progress[-1].startswith(f"[report {CELLS}/{CELLS}]")
    assert "estimated at most" in lines[0]


def _count_runs(monkeypatch) -> dict[str, list]:
    calls: dict[str, list] = {"pretrain": [], "finetune": [], "floor": []}
    real_pretrain, real_finetune, real_floor = report.pretrain, report.finetune_cell, report.text_floor_row

    def pretrain(cfg):
        calls["pretrain"].append(cfg.train.out_dir)
        return real_pretrain(cfg)

    def finetune_cell(task, checkpoint, out_dir, overrides=None):
        calls["finetune"].append(str(out_dir))
        return real_finetune(task, checkpoint, out_dir, overrides)

    def text_floor_row(tasks, overrides=None):
        calls["floor"].append(tuple(tasks))
        return real_floor(tasks, overrides)

    monkeypatch.setattr(report, "pretrain", pretrain)
    monkeypatch.setattr(report, "finetune_cell", finetune_cell)
    monkeypatch.setattr(report, "text_floor_row", text_floor_row)
    return calls


@pytest.mark.slow
def test_rerun_skips_finished_cells_and_reruns_an_interrupted_one(tiny_report, monkeypatch, capsys):
    out, _ = tiny_report
    before = (out / "results.jsonl").read_text()
    calls = _count_runs(monkeypatch)
    assert main(report_args(out)) == 0
    assert calls == {"pretrain": [], "finetune": [], "floor": []}  # everything finished: nothing runs
    err = capsys.readouterr().err
    assert err.count("finished before, skipped") == CELLS
    assert (out / "results.jsonl").read_text() == before

    # an interrupted pre-training (run directory without eval.json) runs again, from scratch, and so does
    # the fine-tune of its checkpoint; everything else is kept
    run_dir = out / "pretrain" / "clip" / "b200_s0"
    (run_dir / "eval.json").unlink()
    (run_dir / "leftover.txt").write_text("from the interrupted attempt")
    assert main(report_args(out)) == 0
    assert calls["pretrain"] == [str(run_dir)] and calls["floor"] == []
    assert calls["finetune"] == [str(out / "finetune" / "clip_b200_s0" / "ve")]
    assert (run_dir / "eval.json").is_file() and not (run_dir / "leftover.txt").exists()
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == CELLS
    again = {(r["method"], r["budget"], r["task"]): r["value"] for r in rows}
    first = {(r["method"], r["budget"], r["task"]): r["value"] for r in map(json.loads, before.splitlines())}
    assert math.isclose(again[("clip", 200, "retrieval")], first[("clip", 200, "retrieval")], abs_tol=1e-6)  # deterministic


@pytest.mark.slow
def test_other_settings_in_the_same_out_are_refused(tiny_report, capsys):
    out, _ = tiny_report
    args = report_args(out)
    args[args.index("--steps") + 1] = "5"
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "train.steps=5" in err and "--out" in err
