"""`vlp demo` prints its phase, elapsed time and ETA as it goes (issue 15): `vlp.demo.DemoProgress`."""

from __future__ import annotations

import io
import re

from vlp.demo import DemoProgress


def test_phase_lines_count_phases_and_the_eta_follows_measured_durations(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr("vlp.demo.time.time", lambda: now[0])
    out = io.StringIO()
    progress = DemoProgress(pretrainings=2, finetunes=3, stream=out)
    # before anything finished: the guesses (2 x 100 s + 3 x 11 s = 233 s)
    assert progress.begin("pretrain", "pre-training albef") == "[demo 1/5 · 0m00s · ETA 3m53s] pre-training albef"
    now[0] += 80.0
    progress.end("pretrain")  # measured: 80 s per pre-training
    line = progress.begin("pretrain", "pre-training cmal")
    assert line == "[demo 2/5 · 1m20s · ETA 1m53s] pre-training cmal"  # 1 x 80 + 3 x 11
    now[0] += 80.0
    progress.end("pretrain")
    progress.begin("finetune", "fine-tuning albef on ve")
    now[0] += 10.0
    progress.end("finetune")  # measured: 10 s per fine-tune -> 2 left = 20 s
    assert progress.begin("finetune", "fine-tuning albef on rec").endswith("ETA 0m20s] fine-tuning albef on rec")
    lines = out.getvalue().splitlines()
    assert len(lines) == 4 and all(re.match(r"\[demo \d/5 · \d+m\d\ds · ETA \d+m\d\ds\] ", x) for x in lines)
