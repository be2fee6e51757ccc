"""`vlp pretrain` under torchrun (2 gloo processes) logs the same ALBEF losses as 1 process, and gradient
accumulation the same as one full batch.

Both launches see the same global batch of `train.batch_size` rows per step (the sampler splits it across
ranks); ALBEF gathers ITC embeddings and ITM negatives over ranks, and masks / negatives are keyed on
`batch.sample_keys`, so ITC and ITM do not depend on the number of ranks. MLM is the mean over the masked
tokens of the whole global batch (`vlp.models.losses.global_token_mean`: the count is all-reduced, and ALBEF's
`token_counts` gives the trainer the step's count before its micro-batches run). Before, it was a mean over
each rank's own masked tokens: when the ranks masked different numbers of tokens (6 + 5 and 7 + 8 at steps
2 / 3 here) `mlm` and `loss` differed by up to 1.3e-3 relative, and the weights drifted apart (measured: 2 %
in loss within 20 steps).

  * 1 process vs torchrun with 2, the shipped objective (ITC + ITM + MLM), 5 steps: `itc`, `itm`, `mlm`,
    `loss` and `grad_norm` agree to float tolerance (rel 1e-5) at every step.
  * 1 process, MLM alone, grad_accum 1 vs 2 (ITC and ITM are means over each micro-batch's own pairs and
    negatives, so they are left out): `mlm`, `loss` and `grad_norm` agree to rel 1e-5 at every step
    (measured: equal to 1e-7).
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

STEPS = 5
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
    one = _pretrain(tmp_path, "one", 1)
    two = _pretrain(tmp_path, "two", 2)
    _compare(two, one, ("itc", "itm", "mlm", "loss", "grad_norm"), 1e-5, range(1, STEPS + 1))
    # The MLM term is really computed and part of the loss, and training moves it.
    assert all(r["mlm"] > 1.0 for r in one + two) and one[-1]["mlm"] != one[0]["mlm"]
    assert one[0]["loss"] == pytest.approx(one[0]["itc"] + one[0]["itm"] + one[0]["mlm"], rel=1e-5)
    assert [r["lr"] for r in two] == [r["lr"] for r in one]


@pytest.mark.slow
def test_grad_accumulation_keeps_mlm_the_global_batch_mean(tmp_path):
    mlm_only = ("--set", "method.loss_weights.itc=0", "--set", "method.loss_weights.itm=0")
    full = _pretrain(tmp_path, "full", 1, *mlm_only)
    halves = _pretrain(tmp_path, "halves", 1, *mlm_only, "--set", "train.grad_accum=2")
    _compare(halves, full, ("mlm", "loss", "grad_norm"), 1e-5, range(1, STEPS + 1))
    assert all(r["mlm"] > 1.0 and r["itc"] == 0.0 for r in full + halves)
