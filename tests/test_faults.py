"""Faults (issue 14): a fine-tune stopped or killed mid-checkpoint resumes to the uninterrupted run's losses and
eval.json, bit for bit; when one rank of a 2-process run is killed, the other exits promptly with an error.

The fine-tunes are `vlp finetune ve` at toy sizes, 4 steps with checkpoints at 2 and 4 (about 10 s each). Kills
are injected as exceptions (KeyboardInterrupt, like Ctrl-C / SIGINT) at the step or file operation named, as
tests/test_integrity.py does for pre-training; the rank kill is a real SIGKILL of a torchrun worker.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.distributed as dist

from vlp.cli.main import main
from vlp.train import checkpoint as ckpt_mod
from vlp.train.checkpoint import read_trainer_state
from vlp.train.loop import Trainer

FINETUNE = [
    "--set", "train.steps=4", "--set", "train.ckpt_every=2", "--set", "train.batch_size=4", "--set", "train.log_every=1",
    "--set", "train.warmup_steps=1", "--set", "train.progress=false", "--set", "train.tensorboard=false",
    "--set", "task.train_size=8", "--set", "task.eval_size=6", "--set", "data.train_images=40",
    "--set", "model.vision.depth=1", "--set", "model.text.depth=1", "--set", "model.fusion.depth=1",
]
TIMING = {"samples_per_s", "data_wait", "max_mem_gb"}  # wall-clock fields of a metrics record


def _finetune(out: Path, *extra: str) -> int:
    return main(["finetune", "ve", "--out", str(out), *FINETUNE, *extra])


def _records(run: Path) -> list[dict]:
    """metrics.jsonl without its wall-clock fields: the step records then the final evaluation."""
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in lines if line.strip()]


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """The uninterrupted fine-tune every interrupted one must reproduce."""
    out = tmp_path_factory.mktemp("straight") / "ve"
    assert _finetune(out) == 0
    records = _records(out)
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4] and "eval/test/acc" in records[-1]
    return out


def _assert_same_run(run: Path, straight: Path) -> None:
    assert _records(run) == _records(straight)  # every loss, lr, grad norm and the final evaluation
    assert json.loads((run / "eval.json").read_text()) == json.loads((straight / "eval.json").read_text())
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint"]
    assert read_trainer_state(run)["step"] == 4


@pytest.mark.slow
def test_finetune_stopped_after_2_steps_and_resumed_equals_the_straight_run(straight, tmp_path, monkeypatch):
    run = tmp_path / "ve"
    step = Trainer.train_step

    def stop_after_step_2(self, *args, **kwargs):
        if self.step == 2:  # the step-2 checkpoint is written: killed in step 3
            raise KeyboardInterrupt("stopped")
        return step(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "train_step", stop_after_step_2)
    with pytest.raises(KeyboardInterrupt):
        _finetune(run)
    monkeypatch.undo()
    assert read_trainer_state(run)["step"] == 2 and not (run / "eval.json").exists()
    assert _finetune(run, "--resume", str(run)) == 0
    _assert_same_run(run, straight)
    # resuming the finished run again changes nothing (its eval.json is written again from metrics.jsonl)
    assert _finetune(run, "--resume", str(run)) == 0
    _assert_same_run(run, straight)


@pytest.mark.slow
@pytest.mark.parametrize("where", ["write", "swap"])
def test_finetune_killed_during_a_checkpoint_write_resumes_exactly(where, straight, tmp_path, monkeypatch):
    """write: killed while the step-4 checkpoint is written (checkpoint.tmp/ half full): resumes from step 2.
    swap: killed after the step-4 checkpoint was swapped in, before checkpoint.prev/ (step 2) was removed and
    before the final evaluation: resumes at step 4 and runs only the missing evaluation."""
    run = tmp_path / "ve"
    calls: list[int] = []
    if where == "write":
        real = ckpt_mod._write_trainer_state

        def killed(*args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                raise KeyboardInterrupt("killed while writing trainer.pt")
            return real(*args, **kwargs)

        monkeypatch.setattr(ckpt_mod, "_write_trainer_state", killed)
    else:
        def killed(path):
            raise KeyboardInterrupt(f"killed before {path.name} was removed")

        monkeypatch.setattr(ckpt_mod, "_remove_checkpoint", killed)
    with pytest.raises(KeyboardInterrupt):
        _finetune(run)
    monkeypatch.undo()
    if where == "write":
        assert (run / "checkpoint.tmp" / "model.safetensors").is_file() and read_trainer_state(run)["step"] == 2
    else:
        assert read_trainer_state(run / "checkpoint")["step"] == 4
        assert read_trainer_state(run / "checkpoint.prev")["step"] == 2
        assert not any("eval/" in line for line in (run / "metrics.jsonl").read_text().splitlines())
    assert not (run / "eval.json").exists()
    assert _finetune(run, "--resume", str(run)) == 0
    _assert_same_run(run, straight)


# ------------------------------------------------------------------------------------ a rank killed
WORKER = Path(__file__).with_name("ddp_worker.py")
SRC = Path(__file__).resolve().parents[1] / "src"


def _env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), env.get("PYTHONPATH")) if p)
    return env


def _alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie, exited but not yet reaped by its parent, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def _kill_rank_1_when_training(out: Path, procs: list[subprocess.Popen]) -> tuple[float, int]:
    """Wait until 2 steps are logged, SIGKILL rank 1; returns (seconds until rank 0 is gone, its pid)."""
    metrics, start = out / "metrics.jsonl", time.monotonic()
    while not (metrics.is_file() and metrics.read_text().count('"loss"') >= 2):
        assert all(p.poll() is None for p in procs), [p.communicate()[1][-2000:] for p in procs]
        assert time.monotonic() - start < 120, "the run did not start"
        time.sleep(0.05)
    pids = [int((out / f"pid_rank{r}").read_text()) for r in range(2)]
    os.kill(pids[1], signal.SIGKILL)
    killed = time.monotonic()
    while _alive(pids[0]) and time.monotonic() - killed < 60:
        time.sleep(0.01)
    return time.monotonic() - killed, pids[0]


# 400 steps of 0.1 s: the run is still training when rank 1 is killed (after 2 steps)
SLOW_RUN = ["400", "16", "--step-delay", "0.1"]


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo")
def test_torchrun_rank_killed_the_other_exits_promptly(tmp_path):
    """torchrun notices the dead worker and stops the other (measured: 0.16-0.24 s), then exits non-zero."""
    out = tmp_path / "run"
    out.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(WORKER), str(out), *SLOW_RUN], env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        seconds, _ = _kill_rank_1_when_training(out, [proc])
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert seconds < 5.0, f"rank 0 still ran {seconds:.1f} s after rank 1 was killed"
    assert proc.returncode != 0 and "ChildFailedError" in err, err[-2000:]


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo")
def test_rank_killed_without_an_agent_the_other_fails_its_next_collective(tmp_path):
    """Without torchrun's agent to stop it, the surviving rank's next gloo collective fails (the connection is
    reset or closed) and the process exits non-zero at once, instead of waiting out the 30-minute collective
    timeout (measured: 2.2-3.1 s, Python's traceback and teardown included)."""
    out = tmp_path / "run"
    out.mkdir()
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(out), *SLOW_RUN],
                              env={**_env(), "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2",
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    try:
        seconds, _ = _kill_rank_1_when_training(out, procs)
        _, err = procs[0].communicate(timeout=60)
    finally:
        for proc in procs:
            proc.kill()
            proc.communicate()
    assert seconds < 10.0, f"rank 0 still ran {seconds:.1f} s after rank 1 was killed"
    # gloo: "Connection reset by peer" or "Connection closed by peer", depending on where rank 0 was
    assert procs[0].returncode not in (0, None) and re.search(r"RuntimeError: .*Connection \w+ by peer", err), \
        err[-2000:]
    assert procs[1].returncode == -signal.SIGKILL
