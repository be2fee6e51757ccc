"""`vlp finetune TASK` / `vlp eval TASK` end to end at toy sizes: every downstream task trains from scratch
and from a pre-trained CMAL checkpoint, writes its metrics, and re-scores identically."""

from __future__ import annotations

import json

import pytest

from vlp.cli.main import main
from vlp.finetune import finetune_config

TINY_RUN = [
    "--set", "train.steps=2", "--set", "train.batch_size=4", "--set", "train.log_every=1",
    "--set", "train.warmup_steps=1", "--set", "train.progress=false", "--set", "train.tensorboard=false",
    "--set", "task.train_size=8", "--set", "task.eval_size=6", "--set", "data.train_images=40",
]
TINY = [*TINY_RUN, "--set", "model.vision.depth=1", "--set", "model.text.depth=1", "--set", "model.fusion.depth=1"]
KEYS = {"ve": "test/acc", "rec": "test/gt_acc", "vqa": "test/acc", "nlvr2": "test/acc"}


@pytest.mark.parametrize("task", ["ve", "rec", "vqa", "nlvr2"])
def test_finetune_each_task_from_scratch(task, tmp_path, capsys):
    out = tmp_path / task
    assert main(["finetune", task, "--out", str(out), *TINY]) == 0
    metrics = json.loads((out / "eval.json").read_text())
    assert 0.0 <= metrics[KEYS[task]] <= 100.0 and metrics["val/" + KEYS[task].split("/")[1]] >= 0.0
    assert metrics["checkpoint"] is None and metrics["train_examples"] == 8
    if task == "rec":  # the world's records carry noisy proposals: the detected setting is scored too
        assert 0.0 <= metrics["test/det_acc"] <= 100.0
    # re-scoring the saved run gives the same numbers
    assert main(["eval", task, "--run", str(out)]) == 0
    table = capsys.readouterr().out
    assert KEYS[task] in table
    value = next(line for line in table.splitlines() if f"| {KEYS[task]} " in line).split("|")[2]
    assert float(value) == pytest.approx(metrics[KEYS[task]], abs=0.01)


def test_finetune_from_a_cmal_checkpoint(tmp_path):
    """The checkpoint's model, method and tokenizer are used (single-stream CMAL: regions as input)."""
    pre = tmp_path / "pre"
    assert main(["pretrain", "--config", "cmal_tiny", "--out", str(pre), "--set", "train.steps=2",
                 "--set", "train.batch_size=4", "--set", "data.train_images=40", "--set", "data.budget=100",
                 "--set", "eval.num_images=4", "--set", "train.progress=false", "--set", "model.vision.depth=1",
                 "--set", "model.fusion.depth=1"]) in (0,)
    cfg = finetune_config("rec", pre)
    assert cfg.method.name == "cmal" and cfg.model.fusion.type == "single" and cfg.task.name == "rec"
    out = tmp_path / "rec"
    assert main(["finetune", "rec", "--checkpoint", str(pre), "--out", str(out), *TINY_RUN]) == 0
    metrics = json.loads((out / "eval.json").read_text())
    assert metrics["checkpoint"] == str(pre) and 0.0 <= metrics["test/gt_acc"] <= 100.0


def test_finetune_errors(tmp_path, capsys):
    assert main(["finetune", "ve", "--checkpoint", str(tmp_path / "missing"), *TINY]) == 2
    assert "checkpoint directory not found" in capsys.readouterr().err
    assert main(["finetune", "ve", "--data", "easy-vqa", "--out", str(tmp_path / "ve"), *TINY]) == 2
    assert "easy-vqa" in capsys.readouterr().err
    assert not (tmp_path / "ve").exists()  # a failed start leaves no run directory


def test_finetune_retrieval_continues_the_method(tmp_path, capsys):
    """Retrieval fine-tuning trains the method itself with its retrieval objectives only (ALBEF: no MLM,
    hard negatives) and is scored by `vlp eval retrieval` on the saved run."""
    out = tmp_path / "retrieval"
    assert main(["finetune", "retrieval", "--out", str(out), *TINY, "--set", "task.train_size=40",
                 "--set", "eval.num_images=6", "--set", "eval.k_rerank=2"]) == 0
    metrics = json.loads((out / "eval.json").read_text())
    assert 0.0 <= metrics["itc/img_r1"] <= 100.0 and 0.0 <= metrics["itm_all/r_mean"] <= 100.0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in records if "loss" in r]
    assert trained and all(r["itc"] > 0 and r["itm"] > 0 and r["mlm"] == 0.0 for r in trained)  # no MLM
    cfg = finetune_config("retrieval", overrides=["task.init=cmal_tiny"])
    assert cfg.method.task_weights.amc == 0 and cfg.method.task_mixing == "sum"
    assert main(["eval", "retrieval", "--checkpoint", str(out)]) == 0
    table = capsys.readouterr().out
    value = next(line for line in table.splitlines() if "| itc/img_r1 " in line).split("|")[2]
    assert float(value) == pytest.approx(metrics["itc/img_r1"], abs=0.01)


def test_finetune_ve_on_snli_ve_files_with_skip_bad(tmp_path, capsys):
    """User SNLI-VE files: a bad record stops the run with an error naming line and file; with --skip-bad
    it is counted (eval.json `skipped_records`) and the rest trains."""
    from PIL import Image

    root = tmp_path / "flickr"
    root.mkdir()
    rows = []
    for i, (label, text) in enumerate([("entailment", "a red picture"), ("contradiction", "a blue picture"),
                                       ("neutral", "a heavy picture"), ("entailment", "a red thing")]):
        Image.new("RGB", (40, 40), (200, 20, 20)).save(root / f"{100 + i}.jpg")
        rows.append({"gold_label": label, "sentence2": text, "Flickr30K_ID": str(100 + i),
                     "pairID": f"{100 + i}.jpg#0r1", "captionID": f"{100 + i}.jpg#0"})
    bad = dict(rows[0], gold_label="maybe", pairID="bad#1")
    for split in ("train", "test"):
        (tmp_path / f"snli_ve_{split}.jsonl").write_text("\n".join(json.dumps(r) for r in [*rows, bad]) + "\n")
    files = ["--data", "files", "--set", f"task.image_root={root}", "--set", "task.eval_splits=[test]",
             "--set", f"task.annotations.train={tmp_path / 'snli_ve_train.jsonl'}",
             "--set", f"task.annotations.test={tmp_path / 'snli_ve_test.jsonl'}"]
    assert main(["finetune", "ve", "--out", str(tmp_path / "a"), *TINY, *files]) == 2
    err = capsys.readouterr().err
    assert "snli_ve_train.jsonl line 5" in err and "maybe" in err
    assert main(["finetune", "ve", "--out", str(tmp_path / "b"), *TINY, *files, "--skip-bad"]) == 0
    metrics = json.loads((tmp_path / "b" / "eval.json").read_text())
    assert metrics["skipped_records"] == 2 and metrics["train_examples"] == 4  # one bad line per file
    assert 0.0 <= metrics["test/acc"] <= 100.0
