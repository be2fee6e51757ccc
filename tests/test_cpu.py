"""vlp.train.cpu: torch threads from the cores available, the bf16-on-CPU fallback, and their wiring
(config, trainer header + runtime.json, `--threads`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vlp.config import ConfigError, DataConfig, RunConfig, TrainConfig, build_config
from vlp.train import cpu
from vlp.train.loop import Trainer
from vlp.train.precision import autocast_dtype
from vlp.types import Batch


@pytest.fixture(autouse=True)
def _restore_threads(monkeypatch):
    """Every test leaves torch's thread count and the CPU environment variables as it found them."""
    for name in (cpu.THREADS_ENV, cpu.FORCE_BF16_ENV, "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _support(monkeypatch, fast: bool) -> None:
    reason = "capability AVX512, avx512_bf16" if fast else "capability AVX2, no avx512_bf16/amx_bf16"
    monkeypatch.setattr(cpu, "cpu_bf16_support", lambda *a, **k: (fast, reason))


# ------------------------------------------------------------------------------------------- threads
def test_choose_threads_arithmetic():
    assert cpu.choose_threads(3, data_workers=5, cores=2) == 3  # an explicit count wins
    assert cpu.choose_threads(0, data_workers=1, cores=8) == 7  # auto: cores - workers
    assert cpu.choose_threads(0, data_workers=0, cores=8) == 8
    assert cpu.choose_threads(0, data_workers=4, cores=2) == 1  # never below one
    assert cpu.choose_threads(0, data_workers=1, processes_per_host=2, cores=8) == 3  # 8 / 2 - 1
    assert cpu.choose_threads(0, data_workers=0, processes_per_host=4, cores=2) == 1
    with pytest.raises(ValueError, match="train.threads"):
        cpu.choose_threads(-1, 0)


def test_available_cores_follows_the_affinity_mask():
    assert 1 <= cpu.available_cores() <= (__import__("os").cpu_count() or 1)


def test_configure_cpu_auto_env_and_torchrun_share(monkeypatch):
    monkeypatch.setattr(cpu, "available_cores", lambda: 8)
    info = cpu.configure_cpu(TrainConfig(threads=0), data_workers=1)
    assert info.threads == torch.get_num_threads() == 7 and info.threads_source == "auto"
    assert "8 cores available, torch threads 7 (auto: 8 cores - 1 data worker)" in info.describe()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    info = cpu.configure_cpu(TrainConfig(threads=0), data_workers=1)
    assert info.threads == 3 and "8 cores / 2 processes - 1 data worker" in info.describe()
    monkeypatch.setenv(cpu.THREADS_ENV, "2")  # the default of train.threads: 0
    assert cpu.configure_cpu(TrainConfig(threads=0), data_workers=1).threads == 2
    info = cpu.configure_cpu(TrainConfig(threads=1), data_workers=1)  # the config wins over the env
    assert info.threads == torch.get_num_threads() == 1 and "(train.threads=1)" in info.describe()


def test_negative_threads_is_a_config_error():
    with pytest.raises(ConfigError, match=r"train\.threads.*greater than or equal to 0"):
        build_config({}, ["train.threads=-2"])
    assert build_config({}, ["train.threads=3"]).train.threads == 3
    assert TrainConfig().threads == 0


# ---------------------------------------------------------------------------------------------- bf16
def test_cpu_bf16_support_reads_flags_and_capability(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16\n")
    assert cpu.cpu_bf16_support(info, capability="AVX512") == (True, "capability AVX512, avx512_bf16")
    plain = tmp_path / "cpuinfo_plain"  # (flags are read once per path: one file per case)
    plain.write_text("flags : fpu avx2 fma\n")
    assert cpu.cpu_bf16_support(plain, capability="AVX2") == (False, "capability AVX2, no avx512_bf16/amx_bf16")
    amx = tmp_path / "cpuinfo_amx"
    amx.write_text("flags : avx512f amx_tile amx_bf16\n")
    assert cpu.cpu_bf16_support(amx, capability="AVX512")[0] is True
    fast, reason = cpu.cpu_bf16_support(tmp_path / "missing", capability="AVX512")  # unreadable: unknown
    assert fast is False and "unknown" in reason
    assert cpu.cpu_bf16_support(tmp_path / "missing", capability="AMX")[0] is True


def test_bf16_on_a_cpu_without_support_falls_back_to_fp32(monkeypatch):
    _support(monkeypatch, fast=False)
    precision, note = cpu.resolve_precision("bf16", "cpu")
    assert precision == "fp32"
    assert "AVX2" in note and "7.7x" in note and "VLP_FORCE_CPU_BF16=1" in note
    assert cpu.resolve_precision("fp16", "cpu")[0] == "fp32"
    assert cpu.resolve_precision("fp32", "cpu") == ("fp32", None)
    assert cpu.resolve_precision("bf16", "cuda") == ("bf16", None)  # GPUs are not this module's business
    with pytest.warns(UserWarning, match="VLP_FORCE_CPU_BF16"):
        assert autocast_dtype("bf16", torch.device("cpu"), warn=True) is None
    monkeypatch.setenv(cpu.FORCE_BF16_ENV, "1")  # the user insists
    assert cpu.resolve_precision("bf16", "cpu") == ("bf16", None)
    assert autocast_dtype("bf16", torch.device("cpu")) is torch.bfloat16


def test_bf16_with_support_is_kept(monkeypatch):
    _support(monkeypatch, fast=True)
    assert cpu.resolve_precision("bf16", "cpu") == ("bf16", None)
    assert autocast_dtype("bf16", torch.device("cpu")) is torch.bfloat16


# --------------------------------------------------------------------------------------- the trainer
class _Data(torch.utils.data.Dataset):
    def __init__(self, n: int = 16) -> None:
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(n, 3, 2, 2, generator=g), torch.randn(n, 4, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return i, self.x[i], self.y[i]


def _collate(items) -> Batch:
    idx = torch.tensor([i for i, _, _ in items])
    return Batch(input_ids=idx[:, None], attention_mask=torch.ones(len(items), 1, dtype=torch.long),
                 images=torch.stack([x for _, x, _ in items]), labels=torch.stack([y for _, _, y in items]),
                 sample_keys=idx)


class _Linear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(12, 4)
        self.dtype_seen = None

    def forward(self, batch: Batch):
        pred = self.lin(batch.images.flatten(1))
        self.dtype_seen = pred.dtype
        return {"loss": F.mse_loss(pred.float(), batch.labels)}


def _cfg(**train) -> RunConfig:
    base = dict(steps=2, batch_size=4, log_every=1, ckpt_every=0, tensorboard=False, progress=True, device="cpu")
    return RunConfig(train=TrainConfig(**{**base, **train}), data=DataConfig(num_workers=0))


def test_trainer_applies_threads_and_writes_the_header(tmp_path, capsys):
    torch.set_num_threads(2)
    trainer = Trainer(_cfg(threads=1), _Linear(), _Data(), _collate, tmp_path / "run")
    assert torch.get_num_threads() == 1 and trainer.runtime.threads == 1
    trainer.fit()
    err = capsys.readouterr().err
    header = next(line for line in err.splitlines() if "torch threads" in line)
    assert header == f"[run] {trainer.runtime.describe()}"
    assert "torch threads 1 (train.threads=1)" in header and "capability" in header
    runtime = json.loads((tmp_path / "run" / "runtime.json").read_text())
    assert runtime["threads"] == 1 and runtime["cpu_capability"] == cpu.cpu_capability()
    assert runtime["header"] == trainer.runtime.describe()


def test_trainer_auto_threads(tmp_path, monkeypatch):
    monkeypatch.setattr(cpu, "available_cores", lambda: 3)
    trainer = Trainer(_cfg(progress=False), _Linear(), _Data(), _collate, tmp_path)
    assert trainer.runtime.threads == torch.get_num_threads() == 3 and trainer.runtime.threads_source == "auto"


def test_trainer_falls_back_to_fp32_on_a_slow_cpu(tmp_path, monkeypatch):
    _support(monkeypatch, fast=False)
    method = _Linear()
    with pytest.warns(UserWarning, match="fp32 instead"):
        trainer = Trainer(_cfg(precision="bf16", progress=False), method, _Data(), _collate, tmp_path)
    assert trainer.amp_dtype is None and trainer.runtime.effective_precision == "fp32"
    assert "precision bf16 -> fp32" in trainer.runtime.describe()
    trainer.fit()
    assert method.dtype_seen == torch.float32


# --------------------------------------------------------------------------------------------- CLI
def test_threads_flag_maps_to_train_threads(monkeypatch):
    from vlp import api
    from vlp.cli.main import build_parser, main

    assert build_parser().parse_args(["--threads", "2", "pretrain", "--config", "x"]).threads == 2
    assert build_parser().parse_args(["pretrain", "--config", "x", "--threads", "3"]).threads == 3
    assert not hasattr(build_parser().parse_args(["pretrain", "--config", "x"]), "threads")
    seen = {}

    def fake_pretrain(config, overrides, resume=None, overwrite=False):
        seen["overrides"] = overrides
        return Path("run")

    monkeypatch.setattr(api, "pretrain", fake_pretrain)
    assert main(["pretrain", "--config", "albef_tiny", "--threads", "1"]) == 0
    assert seen["overrides"][-1] == "train.threads=1"
    assert main(["--threads", "2", "pretrain", "--config", "albef_tiny"]) == 0
    assert seen["overrides"][-1] == "train.threads=2"
