"""Two gloo processes (torchrun) train exactly like one process with the same global batch."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

WORKER = Path(__file__).with_name("ddp_worker.py")
STEPS, BATCH = 6, 16


def _load_worker():
    spec = importlib.util.spec_from_file_location("ddp_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _launch(tmp_path: Path, out: str, *extra: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    (tmp_path / out).mkdir(exist_ok=True)
    # --standalone: a local rendezvous on a free port chosen by the OS (no fixed port to collide on).
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(WORKER), str(tmp_path / out), str(STEPS), str(BATCH), *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _results(tmp_path: Path, out: str) -> list[dict]:
    return [json.loads((tmp_path / out / f"records_rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo")
def test_two_process_training_matches_single_process_and_resumes_exactly(tmp_path):
    # Launch 1: a straight run in ddp/, then a run in resume/ that crashes in step 5 (checkpoint at 3).
    _launch(tmp_path, "ddp", "--crash-dir", str(tmp_path / "resume"), "--crash-at-call", "5")
    ranks = _results(tmp_path, "ddp")
    single = _load_worker().train(tmp_path / "single", STEPS, BATCH)
    assert [r["step"] for r in single] == list(range(1, STEPS + 1))
    for result in ranks:
        records = result["records"]
        assert [r["step"] for r in records] == list(range(1, STEPS + 1))
        for two, one in zip(records, single):
            for key in ("loss", "i2t", "t2i", "grad_norm"):
                assert two[key] == pytest.approx(one[key], rel=1e-5), (two["step"], key)
            assert two["lr"] == one["lr"] and two["epoch"] == one["epoch"]
    # Training moved the loss (the comparison is not between two untrained runs).
    assert single[-1]["loss"] < 0.7 * single[0]["loss"]
    # Only rank 0 wrote the log: one line per step.
    lines = (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, STEPS + 1))
    # The final checkpoint holds each rank's own RNG state (seeded seed + rank, so they differ).
    state = torch.load(tmp_path / "ddp" / "checkpoint" / "trainer.pt", weights_only=True)
    assert len(state["rng"]) == 2
    for r in range(2):
        assert state["rng"][r]["torch"].tolist() == ranks[r]["rng"]
    assert ranks[0]["rng"] != ranks[1]["rng"]

    # Launch 2: fresh processes resume the crashed run from its step-3 checkpoint; exact continuation.
    assert torch.load(tmp_path / "resume" / "checkpoint" / "trainer.pt", weights_only=True)["step"] == 3
    _launch(tmp_path, "resume", "--resume")
    resumed = _results(tmp_path, "resume")
    for r in range(2):
        assert [x["step"] for x in resumed[r]["records"]] == [4, 5, 6]
        for a, b in zip(ranks[r]["records"][3:], resumed[r]["records"]):
            assert (a["loss"], a["i2t"], a["t2i"]) == (b["loss"], b["i2t"], b["t2i"])
        assert resumed[r]["rng"] == ranks[r]["rng"]
    straight = load_file(str(tmp_path / "ddp" / "checkpoint" / "model.safetensors"))
    again = load_file(str(tmp_path / "resume" / "checkpoint" / "model.safetensors"))
    assert straight.keys() == again.keys()
    assert all(torch.equal(straight[k], again[k]) for k in straight)
