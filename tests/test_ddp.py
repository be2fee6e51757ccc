"""Two gloo processes (torchrun) train exactly like one process with the same global batch, an MLM-style
position-mean loss included (`global_token_mean`), and gradient accumulation like one full batch."""

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


# ------------------------------------------------------------------ position means (MLM) over the global batch
def _step1_reference(worker) -> tuple[float, float]:
    """Step 1 of `MaskedToy` by hand from its initial weights: (the mean NLL over the global batch's selected
    positions, the mean of the two accumulation micro-batches' own means)."""
    from vlp.train.sampler import StepSampler

    torch.manual_seed(0)
    method = worker.MaskedToy()
    data = worker.PairData()
    rows = StepSampler(len(data), BATCH, seed=0).global_rows(0)
    batch = worker.collate([data[int(i)] for i in rows.indices])
    batch.sample_keys = rows.keys
    labels = method.labels(batch)
    with torch.no_grad():
        logits = method.head(torch.tanh(method.enc(batch.images.flatten(1)))).view(BATCH, 12, 3)
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none", ignore_index=-100)
    selected = labels != -100
    halves = [float(nll[h].sum() / selected[h].sum()) for h in (slice(0, BATCH // 2), slice(BATCH // 2, BATCH))]
    assert float(selected[: BATCH // 2].sum()) != float(selected[BATCH // 2:].sum())  # the halves differ
    return float(nll.sum() / selected.sum()), sum(halves) / 2


def test_masked_mean_is_the_global_batch_mean_under_grad_accumulation(tmp_path):
    """MLM-style loss (a mean over a varying number of positions per row): with the method's `token_counts`,
    grad_accum 2 trains like one full batch (losses, gradient norms); without them each micro-batch is
    its own mean (the step-1 value is the mean of the two micro-batch means, computed by hand)."""
    worker = _load_worker()
    full = worker.train(tmp_path / "full", STEPS, BATCH, method="masked")
    global_mean, micro_means = _step1_reference(worker)
    assert full[0]["mlm"] == pytest.approx(global_mean, rel=1e-6)
    cut = worker.train(tmp_path / "accum2", STEPS, BATCH, method="masked", grad_accum=2)
    for a, b in zip(cut, full):
        for key in ("loss", "mlm", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), (a["step"], key)
    assert full[-1]["loss"] < 0.8 * full[0]["loss"]  # trained
    unannounced = worker.train(tmp_path / "unannounced", STEPS, BATCH, method="masked", grad_accum=2, announce=False)
    assert unannounced[0]["mlm"] == pytest.approx(micro_means, rel=1e-6)
    # ... so it trains differently (measured: up to 1.7e-2 relative over the 6 steps)
    assert max(abs(a["loss"] - b["loss"]) / b["loss"] for a, b in zip(unannounced, full)) > 1e-3


def test_token_counts_that_miss_the_averaged_positions_are_an_error(tmp_path):
    worker = _load_worker()

    class Miscounted(worker.MaskedToy):
        def token_counts(self, batch):
            return {"mlm": super().token_counts(batch)["mlm"] + 1}

    torch.manual_seed(0)
    trainer = worker.Trainer(worker.config(2, BATCH), Miscounted(), worker.PairData(), worker.collate, tmp_path)
    with pytest.raises(RuntimeError, match=r"Miscounted\.token_counts announced \{'mlm': \d+\} positions but its "
                                           r"losses averaged over \{'mlm': \d+\}"):
        trainer.fit()


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo")
def test_two_process_masked_mean_matches_single_process(tmp_path):
    """The MLM-style loss of 2 gloo ranks equals 1 process on the same global batch (the ranks hold different
    numbers of selected positions), and `global_token_mean` gives rank r sums / global count x world size."""
    _launch(tmp_path, "ddp", "--method", "masked")
    single = _load_worker().train(tmp_path / "single", STEPS, BATCH, method="masked")
    for result in _results(tmp_path, "ddp"):
        assert [r["step"] for r in result["records"]] == list(range(1, STEPS + 1))
        for two, one in zip(result["records"], single):
            for key in ("loss", "mlm", "grad_norm"):
                assert two[key] == pytest.approx(one[key], rel=1e-5), (two["step"], key)
    # rank 0: sums (3, 1) over 1 position, rank 1: (5, 1) over 3; 4 positions in all
    probes = [json.loads((tmp_path / "ddp" / f"token_mean_rank{r}.json").read_text()) for r in range(2)]
    assert probes[0] == pytest.approx([3 / 4 * 2, 1 / 4 * 2]) and probes[1] == pytest.approx([5 / 4 * 2, 1 / 4 * 2])
    assert (probes[0][0] + probes[1][0]) / 2 == pytest.approx((3 + 5) / 4)  # DDP's average: the global mean
