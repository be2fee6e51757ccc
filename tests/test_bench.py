"""`vlp bench`: the measurements it reports are computed, positive and consistent."""

import pytest
import torch

from vlp.bench import bench_train_step, bench_world, compare_train_steps, matmul_peak_flops

SMALL = ["model.vision.depth=1", "model.text.depth=1", "model.fusion.depth=1", "train.device=cpu"]


def test_bench_train_step_reports_throughput_and_mfu():
    result = bench_train_step("albef_tiny", SMALL, batch_size=4, steps=1, warmup=0)
    assert result["samples_per_s"] == pytest.approx(4 / result["step_s"])
    # a training step does at least forward + backward of the encoders: > 2x forward flops per pair
    assert result["GFLOP_per_step"] > 0
    assert 0 < result["mfu"] < 1.5 and result["matmul_peak_TFLOPs"] > 0
    # the row's own peak (reset before the row where Linux allows it), else the process's
    assert result.get("peak_rss_GiB", result.get("peak_rss_process_GiB", 0)) > 0.05
    assert result["threads"] >= 1 and result["precision"].startswith("fp32")
    # the step breakdown: every phase took time, and the step's own phases make up the step
    phases = [result[f"{p}_s"] for p in ("forward", "backward", "optimizer")]
    assert all(t > 0 for t in phases) and result["data_s"] > 0
    assert sum(phases) == pytest.approx(result["step_s"], rel=0.1)


def test_matmul_peak_is_positive():
    assert matmul_peak_flops(torch.device("cpu"), torch.float32, n=128, repeats=2) > 1e6


def test_cpu_matmul_peaks_report_capability_and_both_dtypes():
    from vlp.bench import cpu_matmul_peaks

    result = cpu_matmul_peaks(n=64, seconds=0.01)
    assert result["cpu_capability"] and result["bf16_matmul"].split()[0] in ("fast", "slow")
    assert result["fp32_matmul_GFLOPs"] > 0 and result["bf16_matmul_GFLOPs"] > 0


def test_bench_world():
    result = bench_world(image_size=32, count=5)
    assert result["samples_per_s_per_core"] > 1


def test_compare_baseline_and_cmal_in_one_run():
    rows = compare_train_steps(["albef_tiny", "cmal_tiny"], SMALL, batch_size=4, steps=3, warmup=0)
    assert [r["method"] for r in rows] == ["albef", "cmal"]
    assert rows[0]["step_vs_first"] == 1.0
    assert rows[1]["step_vs_first"] == pytest.approx(rows[1]["step_s"] / rows[0]["step_s"])
    assert all(r["GFLOP_per_step"] > 0 and r["params_M"] > 0 for r in rows)


def test_bench_times_the_trainers_own_step(monkeypatch):
    from vlp.train.loop import Trainer

    calls = []
    original = Trainer.train_step

    def counting(self, batch, rows_per_item=1):
        calls.append(len(batch))
        return original(self, batch, rows_per_item)

    monkeypatch.setattr(Trainer, "train_step", counting)
    result = bench_train_step("albef_tiny", SMALL, batch_size=4, steps=2, warmup=1)
    assert calls == [4] * (1 + 1 + 2 + 1)  # first step (loss_step0), warmup, timed steps, the FLOP-counted step
    assert result["samples_per_s"] == pytest.approx(4 / result["step_s"])


def test_flops_are_counted_past_step_zero():
    """SIMLA's alpha ramps from 0, and at alpha 0 its momentum soft-target passes are skipped: counted on step
    0, the ramped config looked cheaper than the same step with alpha on from the start."""
    simla = ["model.vision.depth=1", "model.text.depth=1", "train.device=cpu", "method.tokenizer_images=4",
             "method.image_vocab_size=8", "method.queue_size=0"]
    ramped = bench_train_step("simla_tiny", simla + ["method.alpha_ramp_steps=50"], batch_size=4, steps=1, warmup=0)
    at_once = bench_train_step("simla_tiny", simla + ["method.alpha_ramp_steps=0"], batch_size=4, steps=1, warmup=0)
    off = bench_train_step("simla_tiny", simla + ["method.alpha=0"], batch_size=4, steps=1, warmup=0)
    assert ramped["GFLOP_per_step"] == pytest.approx(at_once["GFLOP_per_step"], rel=1e-6)
    assert off["GFLOP_per_step"] < 0.95 * at_once["GFLOP_per_step"]  # the soft-target passes are counted


# ------------------------------------------------------------------------------------ step breakdown
def test_phase_clock_bills_laps_to_phases_with_a_fake_clock():
    from vlp.train.timing import PhaseClock

    ticks = iter([10.0, 10.5, 12.0, 12.25, 20.0, 21.0, 21.5])
    clock = PhaseClock("cpu", clock=lambda: next(ticks))
    clock.start()  # 10.0
    clock.lap("forward")  # +0.5
    clock.lap("backward")  # +1.5
    clock.lap("optimizer")  # +0.25
    clock.start()  # 20.0: the time between steps is billed to nothing
    clock.lap("forward")  # +1.0
    clock.lap("backward")  # +0.5
    assert clock.seconds == {"forward": 1.5, "backward": 2.0, "optimizer": 0.25}


def test_phase_clock_lap_before_start_is_an_error():
    from vlp.train.timing import PhaseClock

    with pytest.raises(RuntimeError, match="before start"):
        PhaseClock().lap("forward")


class _Regressor(torch.nn.Module):
    """A linear least-squares 'method': loss(batch) on images (B, 4) -> labels (B,)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 1)

    def forward(self, batch):
        return {"loss": ((self.linear(batch.images).squeeze(1) - batch.labels) ** 2).mean()}


def _toy_trainer(tmp_path, grad_accum: int = 1):
    from vlp.config import DataConfig, RunConfig, TrainConfig
    from vlp.train.loop import Trainer
    from vlp.types import Batch

    cfg = RunConfig(train=TrainConfig(steps=4, batch_size=4, grad_accum=grad_accum, lr=1e-2, warmup_steps=0,
                                      grad_clip=1.0, tensorboard=False, progress=False, device="cpu"),
                    data=DataConfig(num_workers=0))
    batch = Batch(input_ids=torch.zeros(4, 1, dtype=torch.long), attention_mask=torch.ones(4, 1, dtype=torch.long),
                  images=torch.randn(4, 4), labels=torch.randn(4), sample_keys=torch.arange(4))
    trainer = Trainer(cfg, _Regressor(), list(range(4)), lambda items: batch, out_dir=tmp_path)
    return trainer, batch


def test_train_step_without_a_clock_never_synchronises(tmp_path, monkeypatch):
    from vlp.train.timing import PhaseClock

    syncs, reads = [], []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: syncs.append(device))
    now = PhaseClock._now
    monkeypatch.setattr(PhaseClock, "_now", lambda self: reads.append(1) or now(self))
    trainer, batch = _toy_trainer(tmp_path, grad_accum=2)
    assert trainer.phase_clock is None
    trainer.train_step(batch)
    assert syncs == [] and reads == []  # no clock: no device sync and no clock read at all
    # a clock on a CUDA device syncs at the start and at every boundary: 2 micro-batches x (forward, backward)
    # + optimizer (the toy runs on the CPU; only the clock's device says CUDA)
    trainer.phase_clock = PhaseClock(torch.device("cuda", 0))
    trainer.train_step(batch)
    assert len(syncs) == 1 + 2 * 2 + 1
    assert set(trainer.phase_clock.seconds) == {"forward", "backward", "optimizer"}


def test_write_train_rows_writes_every_column_and_a_png(tmp_path):
    import csv

    from PIL import Image

    from vlp.bench import write_train_rows

    rows = [{"config": "albef_tiny", "samples_per_s": 100.0, "step_s": 0.64, "data_s": 0.01, "forward_s": 0.2,
             "backward_s": 0.4, "optimizer_s": 0.04},
            {"config": "cmal_tiny", "samples_per_s": 400.0, "step_s": 0.16, "data_s": 0.02, "forward_s": 0.05,
             "backward_s": 0.1, "optimizer_s": 0.01, "peak_gpu_mem_GiB": 1.5}]
    csv_path, png_path = write_train_rows(rows, tmp_path / "out")
    assert (csv_path.name, png_path.name) == ("bench_train.csv", "bench_train.png")
    with open(csv_path, newline="") as handle:
        read = list(csv.DictReader(handle))
    assert [r["config"] for r in read] == ["albef_tiny", "cmal_tiny"]
    assert list(read[0]) == [*rows[0], "peak_gpu_mem_GiB"]  # the union of the rows' columns, in order
    assert read[0]["peak_gpu_mem_GiB"] == "" and float(read[1]["forward_s"]) == 0.05
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png_path) as image:
        image.verify()
    with pytest.raises(KeyError, match="data_s"):
        write_train_rows([{"config": "old", "samples_per_s": 1.0, "step_s": 1.0}], tmp_path / "bad")


def test_cli_bench_train_out_writes_csv_and_png(tmp_path, capsys):
    import csv

    from PIL import Image

    from vlp.cli.main import main

    args = ["bench", "train", "--config", "albef_tiny", "--config", "cmal_tiny", "--batch-size", "4", "--steps", "1",
            "--out", str(tmp_path), *[a for o in SMALL for a in ("--set", o)]]
    assert main(args) == 0
    header = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| config"))
    with open(tmp_path / "bench_train.csv", newline="") as handle:
        read = list(csv.DictReader(handle))
    assert [r["config"] for r in read] == ["albef_tiny", "cmal_tiny"]
    assert list(read[0]) == [c.strip() for c in header.strip("|").split("|")]  # the printed table's columns
    assert all(float(r[f"{p}_s"]) > 0 for r in read for p in ("data", "forward", "backward", "optimizer"))
    with Image.open(tmp_path / "bench_train.png") as image:
        assert image.format == "PNG" and image.size[0] > 100
