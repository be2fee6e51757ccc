"""vlp.train: step-exact resume, gradient accumulation, LR schedule, sampler order, checkpoints."""

from __future__ import annotations

import json
import math
import os
import random
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from vlp.config import DataConfig, RunConfig, TrainConfig, dump_config
from vlp.models.rng import keyed_uniform
from vlp.train import Trainer, checkpoint as ckpt_mod
from vlp.train.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_model_weights,
    read_trainer_state,
    resolve_checkpoint,
    save_checkpoint,
)
from vlp.train.optim import build_optimizer, build_scheduler, lr_factor, param_groups
from vlp.train.sampler import KEY_SEED_STRIDE, StepSampler, epoch_seed
from vlp.types import Batch


# ------------------------------------------------------------------------------------ toy problem
class ToyData(Dataset):
    """y = x W + noise, x: (3, 2, 2) 'images' (12 features), y: 4 targets."""

    def __init__(self, n: int = 40, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 3, 2, 2, generator=g)
        self.w = torch.randn(12, 4, generator=g)
        self.y = self.x.flatten(1) @ self.w + 0.05 * torch.randn(n, 4, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor, torch.Tensor]:
        return i, self.x[i], self.y[i]


def collate(items: list) -> Batch:
    idx = torch.tensor([i for i, _, _ in items], dtype=torch.long)
    return Batch(
        input_ids=idx[:, None],
        attention_mask=torch.ones(len(items), 1, dtype=torch.long),
        images=torch.stack([x for _, x, _ in items]),
        labels=torch.stack([y for _, _, y in items]),
        sample_keys=idx,
    )


class ToyMethod(nn.Module):
    """MLP regressor exercising what real methods do: torch-RNG dropout, keyed per-sample noise, an
    output layer tied to an embedding table, an EMA buffer and a counter updated in `on_step_end`."""

    def __init__(self, hidden: int = 16, dropout: float = 0.1, crash_at_call: int | None = None) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(12, hidden), nn.GELU(), nn.Dropout(dropout), nn.LayerNorm(hidden))
        self.embed = nn.Embedding(4, hidden)
        self.head = nn.Linear(hidden, 4)
        self.head.weight = self.embed.weight  # tied, like the MLM decoder and the word embeddings
        self.register_buffer("ema", torch.zeros(hidden, 12))
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))
        self.crash_at_call = crash_at_call
        self.calls = 0
        self.autocast_dtype: torch.dtype | None = None

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        self.calls += 1
        if self.crash_at_call is not None and self.calls == self.crash_at_call:
            raise RuntimeError("simulated crash")
        noise = keyed_uniform(batch.sample_keys, (12,), salt=3) - 0.5
        hidden = self.net(batch.images.flatten(1) + 0.1 * noise)
        pred = self.head(hidden)
        self.autocast_dtype = pred.dtype
        mse = F.mse_loss(pred.float(), batch.labels)
        reg = 1e-3 * pred.float().pow(2).mean()
        return {"loss": mse + reg, "mse": mse.detach(), "reg": reg.detach()}

    def on_step_end(self) -> None:
        with torch.no_grad():
            self.ema.mul_(0.9).add_(self.net[0].weight, alpha=0.1)
            self.updates += 1


class LinearToy(nn.Module):
    """A plain linear regressor with a mean loss (gradient accumulation must be exact for it)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(12, 4)

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        loss = F.mse_loss(self.lin(batch.images.flatten(1)), batch.labels)
        return {"loss": loss}


def make_cfg(**train) -> RunConfig:
    workers = train.pop("num_workers", 0)
    base = dict(steps=20, batch_size=8, lr=1e-2, warmup_steps=3, log_every=1, ckpt_every=10, grad_clip=1.0,
                tensorboard=False, progress=False, device="cpu", seed=3)
    base.update(train)
    return RunConfig(train=TrainConfig(**base), data=DataConfig(num_workers=workers))


def toy(seed: int = 0, **kwargs) -> ToyMethod:
    torch.manual_seed(seed)
    return ToyMethod(**kwargs)


def train_records(records: list[dict]) -> list[dict]:
    return [r for r in records if "loss" in r]


# ----------------------------------------------------------------------------------- resume (key)
def test_resume_is_step_exact(tmp_path):
    """20 steps straight == 10 steps, crash, resume in a fresh Trainer + 10 steps: identical losses and
    bitwise-identical final state (weights, tied head, EMA buffer, counter)."""
    cfg = make_cfg(grad_accum=2)
    straight = Trainer(cfg, toy(0), ToyData(), collate, tmp_path / "a")
    rec_a = train_records(straight.fit())
    assert [r["step"] for r in rec_a] == list(range(1, 21))

    # 2 forward calls per step (grad_accum=2): call 25 is in step 13, after steps 11-12 were logged.
    crashed = Trainer(cfg, toy(0, crash_at_call=25), ToyData(), collate, tmp_path / "b")
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashed.fit()
    assert read_trainer_state(tmp_path / "b")["step"] == 10

    fresh = toy(123)  # different init: everything must come from the checkpoint
    resumed = Trainer(cfg, fresh, ToyData(), collate, tmp_path / "b")
    rec_c = train_records(resumed.fit(resume=tmp_path / "b"))
    assert [r["step"] for r in rec_c] == list(range(11, 21))
    for a, c in zip(rec_a[10:], rec_c):
        assert a["loss"] == c["loss"] and a["mse"] == c["mse"] and a["reg"] == c["reg"]
        assert a["lr"] == c["lr"] and a["grad_norm"] == c["grad_norm"]
    sa, sc = straight.method.state_dict(), fresh.state_dict()
    assert sa.keys() == sc.keys()
    for key in sa:
        assert torch.equal(sa[key], sc[key]), key
    assert fresh.head.weight is fresh.embed.weight and int(fresh.updates) == 20
    # metrics.jsonl of the crashed+resumed run: steps 11, 12 of the crashed attempt were dropped.
    lines = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in lines if "loss" in r]
    assert steps == list(range(1, 21))
    assert [r["loss"] for r in lines if "loss" in r][10:] == [r["loss"] for r in rec_a[10:]]


def test_resume_from_finished_run_is_a_no_op(tmp_path):
    cfg = make_cfg(steps=4, ckpt_every=0)
    Trainer(cfg, toy(0), ToyData(), collate, tmp_path).fit()
    method = toy(5)
    assert Trainer(cfg, method, ToyData(), collate, tmp_path).fit(resume=tmp_path) == []
    assert int(method.updates) == 4  # the checkpoint was loaded


def test_resume_runs_a_missing_final_evaluation_once(tmp_path):
    """A kill during the final evaluation leaves the final checkpoint without its eval record (issue 14: 4 of
    25 measured kills): `--resume` runs that evaluation (on the loaded weights) and a second resume is a no-op."""
    cfg = make_cfg(steps=4, ckpt_every=0)
    calls: list[int] = []

    def crash_eval(method, step):
        raise RuntimeError("killed during the final evaluation")

    def eval_fn(method, step):
        calls.append(step)
        return {"score": float(int(method.updates))}

    with pytest.raises(RuntimeError, match="killed during the final evaluation"):
        Trainer(cfg, toy(0), ToyData(), collate, tmp_path, eval_fn=crash_eval).fit()
    assert read_trainer_state(tmp_path)["step"] == 4  # the final checkpoint was written before the eval
    method = toy(5)
    records = Trainer(cfg, method, ToyData(), collate, tmp_path, eval_fn=eval_fn).fit(resume=tmp_path)
    assert calls == [4] and records == [{"step": 4, "eval/score": 4.0}]
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1] == {"step": 4, "eval/score": 4.0} and sum("eval/score" in r for r in lines) == 1
    assert Trainer(cfg, toy(5), ToyData(), collate, tmp_path, eval_fn=eval_fn).fit(resume=tmp_path) == []
    assert calls == [4]  # evaluated once


def test_method_sees_sampler_rows_and_keys(tmp_path):
    """Micro-batches carry the sampler's rows in order, with keys that differ across epochs."""
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    class Recorder(LinearToy):
        def forward(self, batch):
            seen.append((batch.input_ids[:, 0].clone(), batch.sample_keys.clone()))
            return super().forward(batch)

    cfg = make_cfg(steps=7, grad_accum=2, ckpt_every=0)  # 7 x 8 rows > 40: steps 5-6 are in epoch 1
    Trainer(cfg, Recorder(), ToyData(), collate, tmp_path).fit()
    sampler = StepSampler(40, 8, seed=3)
    for step in range(7):
        want = sampler.global_rows(step)
        for half in range(2):
            rows, keys = seen[2 * step + half]
            assert torch.equal(rows, want.indices[4 * half:4 * half + 4])
            assert torch.equal(keys, want.keys[4 * half:4 * half + 4])
    assert int(seen[-1][1][0]) == 3 * KEY_SEED_STRIDE + 40 + int(seen[-1][0][0])


class GatherToy(nn.Module):
    """Gathers rows with repeated indices (like hard-negative sampling): its backward is an index_put
    accumulate, whose multi-threaded CPU kernel may sum in a thread-dependent order."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(12, 8192)
        self.deterministic_seen: list[bool] = []

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        self.deterministic_seen.append(torch.are_deterministic_algorithms_enabled())
        h = self.lin(batch.images.flatten(1))
        picks = (keyed_uniform(batch.sample_keys, (64,), salt=5) * len(h)).long().flatten() % len(h)
        return {"loss": (h[picks] * torch.linspace(-1, 1, h.shape[1])).sin().mean()}


def test_multithreaded_cpu_training_is_reproducible(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        runs = []
        for name in ("a", "b"):
            torch.manual_seed(0)
            method = GatherToy()
            cfg = make_cfg(steps=3, ckpt_every=0, grad_clip=0.0)
            losses = [r["loss"] for r in Trainer(cfg, method, ToyData(), collate, tmp_path / name).fit()]
            runs.append((losses, method.lin.weight.detach().clone()))
            assert method.deterministic_seen == [True] * 3  # deterministic kernels while training on CPU
    finally:
        torch.set_num_threads(threads)
    assert runs[0][0] == runs[1][0]
    assert torch.equal(runs[0][1], runs[1][1])
    assert not torch.are_deterministic_algorithms_enabled()  # the global flag is restored after fit


def test_batches_do_not_depend_on_num_workers(tmp_path):
    losses = []
    for workers in (0, 2):
        cfg = make_cfg(steps=3, ckpt_every=0, num_workers=workers)
        losses.append([r["loss"] for r in Trainer(cfg, toy(0), ToyData(), collate, tmp_path / str(workers)).fit()])
    assert losses[0] == losses[1]


# ------------------------------------------------------------------------------- learning & accum
def test_loss_decreases(tmp_path):
    cfg = make_cfg(steps=60, lr=3e-2, warmup_steps=5, log_every=10, ckpt_every=0)
    records = Trainer(cfg, toy(0, dropout=0.0), ToyData(), collate, tmp_path).fit()
    assert [r["step"] for r in records] == [10, 20, 30, 40, 50, 60]
    assert records[-1]["loss"] < 0.25 * records[0]["loss"]


def _captured_grads(trainer: Trainer) -> list[list[torch.Tensor]]:
    grads: list[list[torch.Tensor]] = []
    trainer.optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: grads.append([p.grad.clone() for g in opt.param_groups for p in g["params"]])
    )
    return grads


def test_grad_accumulation_matches_full_batch(tmp_path):
    results = {}
    for accum in (1, 2, 4):
        torch.manual_seed(0)
        method = LinearToy()
        init = {k: v.clone() for k, v in method.state_dict().items()}
        cfg = make_cfg(steps=3, grad_accum=accum, grad_clip=0.0, ckpt_every=0)
        trainer = Trainer(cfg, method, ToyData(), collate, tmp_path / str(accum))
        grads = _captured_grads(trainer)
        losses = [r["loss"] for r in trainer.fit()]
        results[accum] = (grads, losses, method.lin.weight.detach().clone())
    # Reference gradient of step 1: the mean loss over the step's 8 global rows.
    ref = LinearToy()
    ref.load_state_dict(init)
    data = ToyData()
    rows = StepSampler(len(data), 8, seed=3).global_rows(0).indices
    F.mse_loss(ref.lin(data.x[rows].flatten(1)), data.y[rows]).backward()
    ref_grads = [ref.lin.weight.grad, ref.lin.bias.grad]
    g1, l1, w1 = results[1]
    for grad, want in zip(sorted(g1[0], key=lambda t: t.ndim, reverse=True), ref_grads):
        assert torch.allclose(grad, want, atol=1e-6)
    for accum in (2, 4):
        g, losses, w = results[accum]
        for step in range(3):
            for a, b in zip(g1[step], g[step]):
                assert torch.allclose(a, b, atol=1e-6), (accum, step)
        assert losses == pytest.approx(l1, rel=1e-6)
        assert torch.allclose(w, w1, atol=1e-6)


def test_grad_clipping_is_applied(tmp_path):
    cfg = make_cfg(steps=2, grad_clip=1e-3, ckpt_every=0)
    trainer = Trainer(cfg, toy(0), ToyData(), collate, tmp_path)
    grads = _captured_grads(trainer)
    records = trainer.fit()
    assert all(r["grad_norm"] > 1e-2 for r in records)  # the raw norm is logged ...
    for step_grads in grads:  # ... and the optimiser sees the clipped gradients
        total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in step_grads]))
        assert float(total) <= 1e-3 * (1 + 1e-4)


def test_bf16_autocast_on_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("VLP_FORCE_CPU_BF16", "1")  # bf16 even on a CPU without bf16 hardware (vlp.train.cpu)
    cfg = make_cfg(steps=3, precision="bf16", ckpt_every=0)
    method = toy(0)
    records = Trainer(cfg, method, ToyData(), collate, tmp_path).fit()
    assert method.autocast_dtype == torch.bfloat16
    assert all(math.isfinite(r["loss"]) for r in records)
    assert method.net[0].weight.dtype == torch.float32  # master weights stay fp32


def test_fp16_on_cpu_falls_back_to_bf16(tmp_path, monkeypatch):
    monkeypatch.setenv("VLP_FORCE_CPU_BF16", "1")  # else fp32 on a CPU without bf16 hardware (tests/test_cpu.py)
    with pytest.warns(UserWarning, match="fp16 needs CUDA"):
        trainer = Trainer(make_cfg(precision="fp16"), toy(0), ToyData(), collate, tmp_path)
    assert trainer.amp_dtype == torch.bfloat16 and not trainer.scaler.is_enabled()


def test_non_finite_loss_raises(tmp_path):
    class Exploding(LinearToy):
        def forward(self, batch):
            return {"loss": super().forward(batch)["loss"] * float("nan")}

    with pytest.raises(FloatingPointError, match="step 1"):
        Trainer(make_cfg(steps=2), Exploding(), ToyData(), collate, tmp_path).fit()


def test_batch_divisibility_error():
    with pytest.raises(ValueError, match=r"batch_size=10.*divisible by world_size \* grad_accum = 1 \* 4"):
        Trainer(make_cfg(batch_size=10, grad_accum=4), toy(0), ToyData(), collate, "unused")


# ------------------------------------------------------------------------------------ optimiser
def test_lr_schedule_values():
    # warm-up 4, cosine to 0.1 x lr at step 14 (hand-computed).
    expected = {0: 0.25, 1: 0.5, 3: 1.0, 4: 1.0, 9: 0.55, 14: 0.1, 30: 0.1}
    for step, value in expected.items():
        assert lr_factor(step, 4, 14, 0.1) == pytest.approx(value), step
    assert lr_factor(6, 4, 14, 0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.2)))
    cfg = TrainConfig(lr=2.0, warmup_steps=4, steps=14, min_lr_ratio=0.1)
    opt = build_optimizer(nn.Linear(3, 3), cfg)
    sched = build_scheduler(opt, cfg)
    seen = []
    for _ in range(15):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen[0] == pytest.approx(0.5) and seen[3] == pytest.approx(2.0)
    assert seen[9] == pytest.approx(1.1) and seen[14] == pytest.approx(0.2)
    assert opt.defaults["betas"] == (0.9, 0.98)


def test_logged_lr_follows_schedule(tmp_path):
    cfg = make_cfg(steps=8, warmup_steps=2, lr=0.1, min_lr_ratio=0.0, ckpt_every=0)
    records = Trainer(cfg, toy(0), ToyData(), collate, tmp_path).fit()
    assert [r["lr"] for r in records] == pytest.approx([0.1 * lr_factor(s, 2, 8, 0.0) for s in range(8)])


def test_param_groups_exclude_norms_embeddings_tokens_and_temperature():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)
            self.norm = nn.LayerNorm(4)
            self.word_embeddings = nn.Embedding(10, 4)
            self.cls_token = nn.Parameter(torch.zeros(1, 1, 4))
            self.pos_embed = nn.Parameter(torch.zeros(1, 5, 4))
            self.temp = nn.Parameter(torch.tensor(0.07))
            self.frozen = nn.Linear(4, 4).requires_grad_(False)

    m = M()
    groups = {g["name"]: g for g in param_groups(m, 0.05)}
    names = {id(p): n for n, p in m.named_parameters()}
    assert {names[id(p)] for p in groups["decay"]["params"]} == {"proj.weight"}
    assert {names[id(p)] for p in groups["no_decay"]["params"]} == {
        "proj.bias", "norm.weight", "norm.bias", "word_embeddings.weight", "cls_token", "pos_embed", "temp"}
    assert groups["decay"]["weight_decay"] == 0.05 and groups["no_decay"]["weight_decay"] == 0.0


# -------------------------------------------------------------------------------------- sampler
def test_sampler_follows_concatenated_epoch_permutations():
    n, b = 10, 4
    sampler = StepSampler(n, b, seed=5)
    stream = torch.cat([torch.randperm(n, generator=torch.Generator().manual_seed(epoch_seed(5, e)))
                        for e in range(4)])
    for step in range(9):  # steps 2, 4, 7 straddle epoch boundaries
        rows = sampler.global_rows(step)
        assert torch.equal(rows.indices, stream[step * b:(step + 1) * b])
        epochs = torch.arange(step * b, (step + 1) * b) // n
        assert torch.equal(rows.keys, 5 * KEY_SEED_STRIDE + epochs * n + rows.indices)
    keys = torch.cat([sampler.global_rows(s).keys for s in range(10)])
    assert len(set(keys.tolist())) == len(keys)  # unique per (epoch, row)
    assert not torch.equal(StepSampler(n, b, seed=6).global_rows(0).indices, sampler.global_rows(0).indices)
    for e in range(3):  # each epoch is a permutation
        assert sorted(stream[e * n:(e + 1) * n].tolist()) == list(range(n))


def test_sampler_rank_slices_and_constant_time_resume():
    full = StepSampler(12, 8, seed=1)
    parts = [StepSampler(12, 8, world_size=2, rank=r, grad_accum=2, seed=1) for r in range(2)]
    for step in (0, 1, 5):
        joined = torch.cat([p.rank_rows(step).indices for p in parts])
        assert torch.equal(joined, full.global_rows(step).indices)
    assert parts[0].micro_batch == 2
    far = StepSampler(1000, 8, seed=2)
    rows = far.rank_rows(10**9)  # epoch 8e6: computed without generating earlier epochs
    assert list(far._perms) == [8_000_000]
    assert torch.equal(rows.indices, far.epoch_permutation(8_000_000)[:8])


# ----------------------------------------------------------------------------------- checkpoints
def test_run_outputs_and_checkpoint_contents(tmp_path):
    tok = tmp_path / "tok.json"
    tok.write_text('{"model": "toy"}')
    cfg = make_cfg(steps=6, log_every=2, ckpt_every=3, eval_every=0, tensorboard=True)
    out = tmp_path / "run"
    records = Trainer(cfg, toy(0), ToyData(), collate, out, tokenizer_json=tok).fit()
    assert [r["step"] for r in records] == [2, 4, 6]
    for key in ("step", "loss", "mse", "reg", "lr", "samples_per_s", "epoch"):
        assert key in records[0]
    assert records[0]["epoch"] == pytest.approx(2 * 8 / 40)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert lines == records
    assert (out / "config.yaml").read_text() == dump_config(cfg)
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(out / "tb"))
    ck = out / "checkpoint"
    assert sorted(os.listdir(out)) == ["checkpoint", "config.yaml", "metrics.jsonl", "runtime.json", "tb"]
    assert sorted(os.listdir(ck)) == [
        "config.yaml", "manifest.json", "metrics.jsonl", "model.safetensors", "tokenizer.json", "trainer.pt"]
    assert (ck / "tokenizer.json").read_text() == tok.read_text()
    assert (ck / "config.yaml").read_text() == dump_config(cfg)
    # trainer.pt is plain data: weights_only loading works.
    state = torch.load(ck / "trainer.pt", weights_only=True)
    assert state["step"] == 6 and len(state["rng"]) == 1 and "optimizer" in state and "scheduler" in state
    assert state["extra"]["data"] == {"seed": 3, "dataset_len": 40, "batch_size": 8, "world_size": 1, "grad_accum": 1}


def test_eval_fn_is_called_logged_and_does_not_perturb_training(tmp_path):
    calls = []

    def eval_fn(method, step):
        assert not method.training
        calls.append(step)
        torch.rand(100), np.random.rand(5), random.random()  # consume every RNG
        return {"score": float(step) / 10, "eval/extra": torch.tensor(1.5)}

    cfg = make_cfg(steps=7, eval_every=3, ckpt_every=0)
    with_eval = Trainer(cfg, toy(0), ToyData(), collate, tmp_path / "e", eval_fn=eval_fn).fit()
    plain = Trainer(cfg, toy(0), ToyData(), collate, tmp_path / "p").fit()
    assert calls == [3, 6, 7]
    evals = [r for r in with_eval if "eval/score" in r]
    assert evals == [{"step": s, "eval/score": s / 10, "eval/extra": 1.5} for s in (3, 6, 7)]
    assert [r["loss"] for r in train_records(with_eval)] == [r["loss"] for r in plain]
    logged = (tmp_path / "e" / "metrics.jsonl").read_text()
    assert logged.count("eval/score") == 3


def _save(out, method, step):
    save_checkpoint(out, method, step=step, optimizer=None, config=make_cfg())


def test_checkpoint_crash_while_writing_keeps_previous(tmp_path, monkeypatch):
    method = toy(0)
    _save(tmp_path, method, 5)
    saved = {k: v.clone() for k, v in method.state_dict().items()}
    with torch.no_grad():
        method.net[0].weight.add_(1.0)

    def crash(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(ckpt_mod, "_write_trainer_state", crash)
    with pytest.raises(OSError, match="simulated"):
        _save(tmp_path, method, 7)
    monkeypatch.undo()
    assert (tmp_path / "checkpoint.tmp" / "model.safetensors").is_file()  # partial write left behind
    assert resolve_checkpoint(tmp_path) == tmp_path / "checkpoint"
    with pytest.raises(CheckpointError, match="interrupted"):
        resolve_checkpoint(tmp_path / "checkpoint.tmp")
    fresh = toy(9)
    assert load_checkpoint(tmp_path, fresh)["step"] == 5
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, saved[key]), key
    _save(tmp_path, method, 7)  # the next save cleans up
    assert sorted(os.listdir(tmp_path)) == ["checkpoint"]
    assert read_trainer_state(tmp_path)["step"] == 7


def test_checkpoint_crash_between_renames_uses_prev(tmp_path, monkeypatch):
    method = toy(0)
    _save(tmp_path, method, 5)
    real_replace = os.replace
    calls = []

    def replace_then_crash(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # checkpoint -> checkpoint.prev done; crash before tmp -> checkpoint
            raise KeyboardInterrupt("simulated kill")
        real_replace(src, dst)

    monkeypatch.setattr(ckpt_mod.os, "replace", replace_then_crash)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, method, 7)
    monkeypatch.undo()
    assert not (tmp_path / "checkpoint").exists() and (tmp_path / "checkpoint.prev").is_dir()
    assert resolve_checkpoint(tmp_path) == tmp_path / "checkpoint.prev"
    assert resolve_checkpoint(tmp_path / "checkpoint") == tmp_path / "checkpoint.prev"
    assert load_checkpoint(tmp_path, toy(1))["step"] == 5
    _save(tmp_path, method, 8)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint"] and read_trainer_state(tmp_path)["step"] == 8


def test_tied_weights_stored_once_and_retied(tmp_path):
    method = toy(0)
    _save(tmp_path, method, 1)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "checkpoint" / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert ("head.weight" in keys) != ("embed.weight" in keys)
    fresh = toy(4)
    load_model_weights(tmp_path, fresh)
    assert fresh.head.weight is fresh.embed.weight
    assert torch.equal(fresh.head.weight, method.head.weight)


def test_shape_mismatch_error_names_tensor_and_shapes(tmp_path):
    small = toy(0, hidden=16)
    _save(tmp_path, small, 1)
    big = toy(0, hidden=32)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path, big)
    msg = str(info.value)
    match = re.search(r"tensor '([^']+)' has shape \(([\d, ]*)\) in the checkpoint but \(([\d, ]*)\) in the model", msg)
    assert match, msg
    name = match.group(1)
    parse = lambda s: tuple(int(v) for v in s.split(",") if v.strip())  # noqa: E731
    assert parse(match.group(2)) == tuple(small.state_dict()[name].shape)
    assert parse(match.group(3)) == tuple(big.state_dict()[name].shape)
    assert str(tmp_path / "checkpoint" / "model.safetensors") in msg


def test_check_compatible_hook_is_consulted(tmp_path):
    class Guarded(ToyMethod):
        def check_compatible(self, state_dict):
            if state_dict["embed.weight"].shape[1] != self.embed.weight.shape[1]:
                raise ValueError("checkpoint text width differs from the model's")

    _save(tmp_path, toy(0, hidden=16), 1)
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="text width differs"):
        load_model_weights(tmp_path, Guarded(hidden=8))


def test_missing_checkpoint_errors_name_the_path(tmp_path):
    with pytest.raises(CheckpointError, match=re.escape(str(tmp_path / "nope"))):
        load_checkpoint(tmp_path / "nope", toy(0))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no checkpoint in"):
        load_model_weights(tmp_path / "empty", toy(0))
    _save(tmp_path / "run", toy(0), 2)
    os.remove(tmp_path / "run" / "checkpoint" / "trainer.pt")
    with pytest.raises(CheckpointError, match=re.escape(str(tmp_path / "run" / "checkpoint" / "trainer.pt"))):
        load_checkpoint(tmp_path / "run", toy(0))
    with pytest.raises(CheckpointError, match="not in the model"):
        load_model_weights(tmp_path / "run", LinearToy())


# ------------------------------------------------------------------------- progress lines, DDP flags
def test_format_eta_and_progress_line():
    from vlp.train.loop import format_eta, progress_line

    assert [format_eta(s) for s in (0, 42.4, 185, 3725, -1, float("nan"))] == ["0s", "42s", "3m05s", "1h02m05s",
                                                                                "?", "?"]
    line = progress_line("albef", 40, 350, 3.21404, 9.8e-4, 112.34, 161)
    assert line == "[albef] step 40/350 loss 3.2140 lr 9.8e-04 112.3 samples/s ETA 2m41s"


def test_progress_lines_on_non_tty_stderr(tmp_path, capfd):
    cfg = make_cfg(steps=7, log_every=3, ckpt_every=0, progress=True)
    Trainer(cfg, toy(0), ToyData(), collate, tmp_path / "albef").fit()
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[0].startswith("[albef] cpu: ") and "torch threads" in lines[0], err  # the run's header
    lines = lines[1:]
    pattern = (r"\[albef\] step (\d+)/7 loss \d+\.\d{4} lr \d\.\de[-+]\d\d \d+\.\d samples/s "
               r"ETA (\d+s|\d+m\d\ds|\d+h\d\dm\d\ds)")
    assert len(lines) == 3, err  # steps 3, 6 and the last (7)
    matches = [re.fullmatch(pattern, line) for line in lines]
    assert all(matches), lines
    assert [int(m.group(1)) for m in matches] == [3, 6, 7]
    assert matches[-1].group(2) == "0s"


def test_no_progress_lines_when_progress_false(tmp_path, capfd):
    cfg = make_cfg(steps=4, log_every=1, ckpt_every=0, progress=False)
    Trainer(cfg, toy(0), ToyData(), collate, tmp_path / "run").fit()
    assert "step" not in capfd.readouterr().err


def test_find_unused_parameters_follows_the_method_declaration(tmp_path):
    class NoneUnused(LinearToy):
        def unused_parameters(self) -> set[str]:
            return set()

    class SomeUnused(LinearToy):
        def __init__(self) -> None:
            super().__init__()
            self.spare = nn.Linear(2, 2)

        def unused_parameters(self) -> set[str]:
            return {"spare.weight", "spare.bias"}

    cfg = make_cfg(steps=2)
    flags = [Trainer(cfg, m, ToyData(), collate, tmp_path).find_unused_parameters
             for m in (NoneUnused(), SomeUnused(), LinearToy())]
    assert flags == [False, True, True]
