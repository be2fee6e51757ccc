"""CLI smoke tests: every command runs end to end on tiny settings; user mistakes exit 2 with a clear line."""

import json
import subprocess
import sys

import pytest
from PIL import Image

from vlp.cli.main import main

TINY = [
    "--set", "train.steps=4", "--set", "train.batch_size=8", "--set", "train.log_every=2",
    "--set", "train.warmup_steps=1", "--set", "train.progress=false", "--set", "train.tensorboard=false",
    "--set", "data.train_images=60", "--set", "data.budget=200", "--set", "data.num_workers=0",
    "--set", "eval.num_images=12", "--set", "eval.k_rerank=3", "--set", "model.vision.depth=1",
    "--set", "model.text.depth=1", "--set", "model.fusion.depth=1",
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    assert main(["pretrain", "--config", "albef_tiny", "--out", str(out), *TINY]) == 0
    return out


def test_pretrain_writes_run_directory(run_dir):
    for name in ["config.yaml", "tokenizer.json", "metrics.jsonl", "eval.json", "loss_curve.png",
                 "retrieval_examples.png", "checkpoint/model.safetensors", "checkpoint/trainer.pt",
                 "checkpoint/config.yaml", "checkpoint/tokenizer.json"]:
        assert (run_dir / name).is_file(), name
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [2, 4]
    final = json.loads((run_dir / "eval.json").read_text())
    assert 0.0 <= final["eval/itc/img_r1"] <= 100.0 and final["eval/num_images"] == 12
    assert Image.open(run_dir / "loss_curve.png").size[0] > 200


def test_eval_retrieval_cli(run_dir, tmp_path, capsys):
    assert main(["eval", "retrieval", "--checkpoint", str(run_dir / "checkpoint"), "--out", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert "itm/img_r1" in table and "itc/hard_neg_acc" in table
    metrics = json.loads((tmp_path / "eval.json").read_text())
    trained = json.loads((run_dir / "eval.json").read_text())
    # the same weights on the same test images give the same numbers as the end-of-training eval
    assert metrics["itc/img_r1"] == pytest.approx(trained["eval/itc/img_r1"])
    assert (tmp_path / "retrieval_examples.png").is_file()


def test_resume_cli_continues(run_dir, tmp_path):
    out = tmp_path / "resumed"
    assert main(["pretrain", "--config", "albef_tiny", "--out", str(out), *TINY,
                 "--set", "train.steps=6", "--resume", str(run_dir)]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    original = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # the run's history comes along; training went on at step 5 (steps 1-4 were not trained again)
    assert [r["step"] for r in records if "loss" in r] == [2, 4, 6]
    assert [r["loss"] for r in records if "loss" in r][:2] == [r["loss"] for r in original if "loss" in r]


def test_world_show(tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert main(["world", "show", "--count", "4", "--out", str(out)]) == 0
    assert Image.open(out).size[0] > 128


def test_bad_config_key_exits_2(tmp_path, capsys):
    assert main(["pretrain", "--config", "albef_tiny", "--set", "train.stpes=3"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'train.stpes'" in err and "did you mean 'train.steps'" in err


def test_missing_config_and_checkpoint_exit_2(tmp_path, capsys):
    assert main(["pretrain", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert str(tmp_path / "nope.yaml") in capsys.readouterr().err
    assert main(["eval", "retrieval", "--checkpoint", str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err


def test_checkpoint_of_other_size_is_refused(run_dir, tmp_path, capsys):
    # rewrite the checkpoint's config to another width: loading must name the mismatch, not crash
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(run_dir / "checkpoint", ckpt)
    text = (ckpt / "config.yaml").read_text().replace("width: 128", "width: 96", 1)
    (ckpt / "config.yaml").write_text(text)
    assert main(["eval", "retrieval", "--checkpoint", str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert "width" in err and "128" in err and "96" in err


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "vlp.cli.main", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "pretrain" in out.stdout and "demo" in out.stdout


def test_downstream_table_refuses_unknown_tasks_before_training(tmp_path):
    from vlp.api import downstream_table

    with pytest.raises(ValueError, match="unknown task.*captioning"):
        downstream_table([("scratch", None)], ["ve", "captioning"], tmp_path)
    assert not (tmp_path / "scratch").exists()  # nothing was fine-tuned


@pytest.mark.slow
def test_demo_prints_table(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), *TINY, "--set", "task.train_size=32",
                 "--set", "task.eval_size=12"]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if "t2i_R@1" in line)
    assert "chance_R@1" in header and "hardneg" in header
    names = [c.strip() for c in header.strip("|").split("|")]
    for method in ("albef", "cmal"):  # side by side, same budget, same test images
        row = next(line for line in out.splitlines() if line.startswith(f"| {method}"))
        cells = dict(zip(names, [c.strip() for c in row.strip("|").split("|")]))
        assert cells["steps"] == "4" and cells["pairs"] == "200"
        assert float(cells["chance_R@1"]) == pytest.approx(100 / 12, abs=0.01)
        assert 0 <= float(cells["t2i_R@1"]) <= 100 and 0 <= float(cells["hardneg"]) <= 100
        # both rank in two stages: ITC (CMAL: its first stage, demo_cmal's method.first_stage), then ITM
        assert cells["ranking"] == "itm" and 0 <= float(cells["itc_t2i_R@1"]) <= 100
    results = (tmp_path / "results.md").read_text()
    assert header in results.splitlines()
    # the compact downstream table: both checkpoints and the from-scratch model, one accuracy per task
    lines = out.splitlines()
    at = next(i for i, line in enumerate(lines) if "VE_acc" in line)
    names = [c.strip() for c in lines[at].strip("|").split("|")]
    assert {"start", "VE_acc", "REC_acc", "REC_det_acc"} <= set(names) and lines[at] in results.splitlines()
    assert "VQA_acc" not in names  # world VQA is decided by the question: left to --tasks / vlp report
    for start in ("albef", "cmal", "scratch"):
        row = next(line for line in lines[at:] if line.startswith(f"| {start} "))
        cells = dict(zip(names, [c.strip() for c in row.strip("|").split("|")]))
        assert all(0 <= float(cells[c]) <= 100 for c in ("VE_acc", "REC_acc")), cells
        assert json.loads((tmp_path / "finetune" / start / "ve" / "eval.json").read_text())["steps"] == 4
    assert json.loads((tmp_path / "finetune" / "cmal" / "rec" / "eval.json").read_text())["checkpoint"] == \
        str(tmp_path / "cmal")
    floor = next(line for line in lines[at:] if line.startswith("| text-only "))  # the text-only floor row
    cells = dict(zip(names, [c.strip() for c in floor.strip("|").split("|")]))
    assert cells["REC_acc"] == "-" and 0 <= float(cells["VE_acc"]) <= 100
