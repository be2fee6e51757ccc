"""`vlp bench`: the measurements it reports are computed, positive and consistent."""

import pytest

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


def test_matmul_peak_is_positive():
    import torch

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
    assert calls == [4] * (2 + 1 + 1)  # FLOP-counted first step, warmup, timed steps
    assert result["samples_per_s"] == pytest.approx(4 / result["step_s"])
