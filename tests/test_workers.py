"""DataLoader workers bound their heap growth (`vlp.data.workers`, issue 15 streaming RSS)."""

from __future__ import annotations

import platform

import pytest
import torch

from vlp.config import load_config
from vlp.data.workers import M_MMAP_THRESHOLD, WORKER_MMAP_THRESHOLD, data_worker_init, set_mmap_threshold
from vlp.methods import method_class  # importing vlp.methods registers the shipped methods
from vlp.train.loop import Trainer
from vlp.types import Batch


class FakeLibc:
    def __init__(self, result: int) -> None:
        self.calls: list[tuple[int, int]] = []
        self.result = result

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append((param, value))
        return self.result


def test_mallopt_gets_the_mmap_threshold_parameter_and_value():
    libc = FakeLibc(result=1)
    assert set_mmap_threshold(libc=libc) is True
    assert libc.calls == [(M_MMAP_THRESHOLD, WORKER_MMAP_THRESHOLD)] == [(-3, 65536)]
    assert set_mmap_threshold(4096, libc=FakeLibc(result=0)) is False  # glibc refused the value


def test_without_mallopt_nothing_is_applied():
    assert set_mmap_threshold(libc=object()) is False


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_glibc_accepts_the_worker_threshold():
    assert set_mmap_threshold() is True


def test_the_trainer_loaders_start_workers_with_the_init(tmp_path):
    cfg = load_config("albef_tiny", ["train.steps=2", "train.batch_size=2", "data.num_workers=0"])
    assert method_class(cfg.method.name).name == "albef"
    trainer = Trainer(cfg, torch.nn.Linear(2, 2), list(range(8)), lambda items: Batch(), out_dir=tmp_path)
    assert trainer._loader(0).worker_init_fn is data_worker_init


def test_batches_are_pinned_for_a_cuda_run_only(tmp_path, monkeypatch):
    """A CUDA run's loader pins batches (`Batch.pin_memory`, so `train_step`'s non-blocking copy is asynchronous);
    a CPU run's does not (pinning needs an accelerator)."""
    cfg = load_config("albef_tiny", ["train.steps=2", "train.batch_size=2", "data.num_workers=0"])
    trainer = Trainer(cfg, torch.nn.Linear(2, 2), list(range(8)), lambda items: Batch(), out_dir=tmp_path)
    assert trainer._loader(0).pin_memory is False
    monkeypatch.setattr(trainer, "device", torch.device("cuda", 0))
    assert trainer._loader(0).pin_memory is True


def test_batch_pin_memory_pins_every_tensor_field(monkeypatch):
    pinned: list[tuple[int, ...]] = []

    def fake_pin(tensor: torch.Tensor) -> torch.Tensor:  # the CUDA-free stand-in: record, return a copy
        pinned.append(tuple(tensor.shape))
        return tensor.clone()

    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    batch = Batch(input_ids=torch.ones(2, 5, dtype=torch.long), attention_mask=torch.ones(2, 5),
                  images=torch.zeros(2, 3, 8, 8), skipped=("bad",))
    out = batch.pin_memory()
    assert sorted(pinned) == [(2, 3, 8, 8), (2, 5), (2, 5)]
    assert out.skipped == ("bad",) and out.labels is None and torch.equal(out.images, batch.images)
