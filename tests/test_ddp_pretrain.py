"""`vlp pretrain` under torchrun (2 gloo processes) logs the same ALBEF losses as 1 process.

Both launches see the same global batch of `train.batch_size` rows per step (the sampler splits it across
ranks); ALBEF gathers ITC embeddings and ITM negatives over ranks, and masks / negatives are keyed on
`batch.sample_keys`, so ITC and ITM do not depend on the number of ranks. MLM does, a little: like ALBEF it
is a mean over each rank's own masked tokens, and metrics.jsonl averages those per-rank means. When the
ranks mask different numbers of tokens, both the logged MLM value and its gradient differ from the
1-process run (and from then on the weights drift apart slightly).

Two pairs of runs (1 process, then torchrun with 2), 3 steps each:
  * `method.loss_weights.mlm=0`: nothing rank-dependent is left, so `itc`, `itm`, `loss` and `grad_norm`
    agree to float tolerance (rel 1e-5) at every step: the forward losses, the gradients through the
    gathers and DDP's all-reduce all reproduce the 1-process run.
  * the shipped weights (MLM on): step 1 starts from identical weights, so `itc` / `itm` agree to rel
    1e-5 there. `mlm` and `loss` agree to rel 1e-2 at every step (measured: <= 1.3e-3; at step 1 the
    ranks happen to mask 6 + 6 tokens and it is exact, at steps 2 / 3 they mask 6 + 5 and 7 + 8). After
    step 1 the MLM-gradient difference moves the weights, so `itc` / `itm` only agree to rel 1e-3 there
    (measured: <= 2e-4).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch.distributed as dist

STEPS = 3
TINY = [
    "--set", f"train.steps={STEPS}", "--set", "train.batch_size=8", "--set", "train.log_every=1",
    "--set", "train.warmup_steps=1", "--set", "train.progress=false", "--set", "train.tensorboard=false",
    "--set", "train.device=cpu", "--set", "data.train_images=60", "--set", "data.budget=200",
    "--set", "data.num_workers=0", "--set", "eval.num_images=12", "--set", "eval.k_rerank=3",
    "--set", "model.vision.depth=1", "--set", "model.text.depth=1", "--set", "model.fusion.depth=1",
]
SRC = Path(__file__).resolve().parents[1] / "src"
# torch 2.13 + gloo now and then (~1 launch in 25-50 here) aborts a worker during interpreter teardown,
# after `vlp pretrain` has returned: once DDP has been built, destroy_process_group() no longer frees the
# gloo process group, its worker threads outlive Python, and one that still has to drop a finished work
# (which needs the GIL) during finalisation hits std::terminate ("terminate called without an active
# exception"). tests/test_losses.py sidesteps it with os._exit; torchrun reports the launch as failed
# (SIGABRT, or SIGSEGV with PYTHONFAULTHANDLER set).
EXIT_ABORT = "terminate called without an active exception"


def _env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), env.get("PYTHONPATH")) if p)
    return env


def _records(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return [json.loads(line) for line in lines if line.strip()]


def _complete(records: list[dict]) -> bool:
    """Every step logged, then the final eval record (emitted before the ranks' last barrier in fit)."""
    steps = [r["step"] for r in records if "loss" in r]
    return steps == list(range(1, STEPS + 1)) and any("eval/itc/r_mean" in r for r in records)


def _pretrain(tmp_path: Path, name: str, nproc: int, *extra: str) -> list[dict]:
    out = tmp_path / name
    launcher = [] if nproc == 1 else ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = [sys.executable, *launcher, "-m", "vlp.cli.main", "pretrain", "--config", "albef_tiny",
           "--out", str(out), *TINY, *extra]
    proc = subprocess.run(cmd, env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=180)
    log = proc.stdout[-3000:] + proc.stderr[-3000:]
    records = _records(out)
    if proc.returncode != 0:
        # Tolerate only the known gloo teardown abort (no Python traceback through vlp), and only once
        # training and the final eval had finished on every rank. (torchrun then SIGTERMs rank 0, which may
        # still be writing its plots, so those are not required here.)
        known = nproc > 1 and EXIT_ABORT in proc.stderr and f'File "{SRC / "vlp"}' not in proc.stderr
        assert known and _complete(records), f"exit status {proc.returncode}:\n{log}"
        warnings.warn(f"{name}: a rank aborted in gloo teardown after the run had finished", stacklevel=2)
    else:
        for file in ("eval.json", "loss_curve.png", "retrieval_examples.png"):
            assert (out / file).is_file(), file
    assert _complete(records), log
    return [r for r in records if "loss" in r]


def _compare(two: list[dict], one: list[dict], keys: tuple[str, ...], rel: float, steps: range) -> None:
    for a, b in zip(two, one):
        if a["step"] in steps:
            for key in keys:
                assert a[key] == pytest.approx(b[key], rel=rel), (a["step"], key, a[key], b[key])


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo")
def test_torchrun_pretrain_matches_single_process(tmp_path):
    all_steps, later = range(1, STEPS + 1), range(2, STEPS + 1)

    # ITC + ITM only: fully rank-independent, exact at every step (losses and gradient norms).
    no_mlm = ("--set", "method.loss_weights.mlm=0")
    one = _pretrain(tmp_path, "one_itc_itm", 1, *no_mlm)
    two = _pretrain(tmp_path, "two_itc_itm", 2, *no_mlm)
    _compare(two, one, ("itc", "itm", "loss", "grad_norm"), 1e-5, all_steps)
    assert all(r["mlm"] == 0.0 for r in one + two)

    # The shipped objective (MLM on): see the module docstring for the tolerances.
    one = _pretrain(tmp_path, "one", 1)
    two = _pretrain(tmp_path, "two", 2)
    _compare(two, one, ("itc", "itm"), 1e-5, range(1, 2))
    _compare(two, one, ("mlm", "loss"), 1e-2, all_steps)
    _compare(two, one, ("itc", "itm"), 1e-3, later)
    # The MLM term is really computed and part of the loss.
    assert all(r["mlm"] > 1.0 for r in one + two)
    assert one[0]["loss"] == pytest.approx(one[0]["itc"] + one[0]["itm"] + one[0]["mlm"], rel=1e-5)
    assert [r["lr"] for r in two] == [r["lr"] for r in one]
