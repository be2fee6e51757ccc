"""`vlp.progress`: progress of long loops (evaluation shows it too, issue 15): the plain line format with a fake
clock, when lines are due, stderr not stdout, silence when disabled, a bar on a terminal; retrieval evaluation
reports its loops and its results do not change."""

from __future__ import annotations

import io
import re
from types import SimpleNamespace

import torch

from vlp.progress import Progress, format_eta


class FakeClock:
    """A settable time source (seconds)."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _progress(total: int, clock: FakeClock, **kwargs) -> tuple[Progress, io.StringIO]:
    stream = io.StringIO()
    return Progress("retrieval: ITM all pairs", total, unit="pairs", stream=stream, clock=clock, **kwargs), stream


def test_format_eta_moved_and_still_importable_from_the_training_loop():
    from vlp.train.loop import format_eta as loop_format_eta

    assert loop_format_eta is format_eta
    assert [format_eta(s) for s in (0, 59.6, 185, 3725, -1, float("inf"))] == ["0s", "1m00s", "3m05s", "1h02m05s",
                                                                               "?", "?"]


def test_lines_every_ten_seconds_and_a_tenth_with_done_total_rate_and_eta():
    clock = FakeClock()
    progress, stream = _progress(1000, clock)
    clock.now = 5.0
    progress.update(50)  # 5 s: too early
    clock.now = 12.0
    progress.update(50)  # 12 s, 10 % since the start: due
    clock.now = 25.0
    progress.update(100)  # 13 s and 10 % since the last line: due
    clock.now = 40.0
    progress.update(10)  # 15 s but only 1 %: not due
    clock.now = 86.0
    progress.update(10)  # 61 s since the last line (> 6 x 10 s): due even at 1 %
    clock.now = 100.0
    progress.update(780)  # complete: the closing line
    progress.close()  # idempotent: nothing more
    assert stream.getvalue().splitlines() == [
        "[retrieval: ITM all pairs] 100/1000 10% 8.3 pairs/s ETA 1m48s",  # 100 / 12 s; 900 left / 8.33 per s
        "[retrieval: ITM all pairs] 200/1000 20% 8.0 pairs/s ETA 1m40s",
        "[retrieval: ITM all pairs] 220/1000 22% 2.6 pairs/s ETA 5m05s",  # 220 / 86 s; 780 / 2.558 = 305 s
        "[retrieval: ITM all pairs] 1000/1000 100% 10.0 pairs/s done in 1m40s",
    ]
    assert progress.lines == 4


def test_a_short_loop_prints_nothing_and_a_long_one_chunk_loop_only_its_end():
    clock = FakeClock()
    progress, stream = _progress(10, clock)
    for _ in range(10):
        clock.now += 0.5
        progress.update(1)
    assert stream.getvalue() == ""  # 5 s in all: below the 10 s interval
    clock = FakeClock()
    progress, stream = _progress(4, clock)
    clock.now = 30.0
    progress.update(4)  # one chunk of 30 s: no line on the way, the closing one
    assert stream.getvalue() == "[retrieval: ITM all pairs] 4/4 100% 0.1 pairs/s done in 30s\n"


def test_an_unfinished_loop_closes_without_a_done_line():
    clock = FakeClock()
    with _progress(100, clock)[0] as progress:
        clock.now = 50.0
        progress.update(40)
    assert progress.lines == 1  # the 40 % line; a loop left early (an error) claims no "done"


def test_lines_go_to_stderr_not_stdout(capsys):
    clock = FakeClock()
    progress = Progress("retrieval: encode images", 10, unit="images", clock=clock)
    clock.now = 11.0
    progress.update(5)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == "[retrieval: encode images] 5/10 50% 0.5 images/s ETA 11s\n"


def test_disabled_progress_prints_nothing_and_reads_no_clock(capsys):
    def no_clock() -> float:
        raise AssertionError("a disabled progress read the clock")

    progress = Progress("retrieval: encode images", 10, enabled=False, clock=no_clock)
    progress.update(10)
    progress.close()
    assert capsys.readouterr() == ("", "")
    assert progress.lines == 0


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_a_bar_instead_of_lines(monkeypatch):
    monkeypatch.setattr(Progress, "bar_delay_s", 0.0)
    terminal, clock = _Terminal(), FakeClock()
    progress = Progress("retrieval: encode texts", 10, unit="texts", stream=terminal, clock=clock)
    clock.now = 100.0
    for _ in range(10):
        progress.update(1)
    shown = terminal.getvalue()
    assert "retrieval: encode texts" in shown and "\r" in shown  # a redrawn bar
    assert progress.lines == 0 and "ETA" not in shown


# ====================================================================================== retrieval evaluation
def _tiny_model_and_set(n_images: int = 6, captions: int = 2):
    """A real 1-layer VLModel (16 px images) and a set of `n_images` random images x `captions` random texts."""
    from vlp.config import ModelConfig
    from vlp.models.model import VLModel

    cfg = ModelConfig(embed_dim=16, vision={"image_size": 16, "patch_size": 8, "width": 32, "depth": 1, "heads": 2},
                      text={"width": 32, "depth": 1, "heads": 2, "max_len": 16}, fusion={"depth": 1, "heads": 2})
    torch.manual_seed(0)
    model = VLModel(cfg, vocab_size=50, pad_id=0)
    n_texts = n_images * captions
    ids = torch.randint(3, 50, (n_texts, 6))
    ids[:, 0] = 1
    txt2img = torch.arange(n_images).repeat_interleave(captions)
    rset = SimpleNamespace(images=torch.randn(n_images, 3, 16, 16), input_ids=ids, attention_mask=torch.ones_like(ids),
                           txt2img=txt2img, img2txt=[(txt2img == i).nonzero().flatten().tolist() for i in range(n_images)])
    return model, rset


def _phases(err: str) -> dict[str, list[str]]:
    lines: dict[str, list[str]] = {}
    for line in err.splitlines():
        match = re.fullmatch(r"\[(retrieval: [^\]]+)\] (\d+/\d+ \d+% [\d.]+ \w+/s (ETA|done in) \S+)", line)
        assert match, f"not a progress line: {line!r}"
        lines.setdefault(match.group(1), []).append(match.group(2))
    return lines


def test_retrieval_eval_reports_its_loops_on_stderr_and_its_results_do_not_change(capfd, monkeypatch):
    from vlp.tasks.retrieval import evaluate_retrieval

    monkeypatch.setattr(Progress, "interval_s", 0.0)  # a line every tenth of a loop, however fast it runs
    model, rset = _tiny_model_and_set()
    quiet = evaluate_retrieval(model, rset, batch_size=4, k_rerank=2, progress=False)
    assert capfd.readouterr() == ("", "")
    shown = evaluate_retrieval(model, rset, batch_size=4, k_rerank=2)
    out, err = capfd.readouterr()
    assert out == "" and shown == quiet
    phases = _phases(err)
    assert list(phases) == ["retrieval: encode images", "retrieval: encode texts", "retrieval: ITM re-rank"]
    assert phases["retrieval: encode images"][0].startswith("4/6 66% ")  # after the first chunk of 4
    assert phases["retrieval: encode texts"][0].startswith("4/12 33% ") and "ETA" in phases["retrieval: encode texts"][0]
    pairs = int(shown["itm_forwards"])  # the de-duplicated re-ranked pairs
    assert all(p[-1].startswith(f"{n}/{n} 100% ") and " done in " in p[-1]
               for p, n in zip(phases.values(), (6, 12, pairs)))


def test_all_pairs_eval_reports_its_pair_loop(capfd, monkeypatch):
    from vlp.tasks.retrieval import evaluate_retrieval_itm_all

    monkeypatch.setattr(Progress, "interval_s", 0.0)
    _, rset = _tiny_model_and_set(n_images=3)

    def scorer(images, boxes, mask, ids, attn):  # ITM "logit": a fixed function of image and text
        return images.mean(dim=(1, 2, 3)) * ids.float().mean(dim=1)

    quiet = evaluate_retrieval_itm_all(scorer, rset, batch_size=5, progress=False)
    assert capfd.readouterr() == ("", "")
    assert evaluate_retrieval_itm_all(scorer, rset, batch_size=5) == quiet
    out, err = capfd.readouterr()
    phases = _phases(err)
    assert out == "" and list(phases) == ["retrieval: ITM all pairs"]  # raw image rows: no encoding to report
    assert phases["retrieval: ITM all pairs"][0].startswith("5/18 27% ")
    assert phases["retrieval: ITM all pairs"][-1].startswith("18/18 100% ")


def test_progress_of_an_empty_loop_is_silent(capsys):
    progress = Progress("retrieval: encode images", 0, clock=FakeClock())
    progress.update(3)
    progress.close()
    assert capsys.readouterr() == ("", "")
