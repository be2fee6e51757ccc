"""Figures and tables: PNGs are written and valid, panels match the logged keys, borders are coloured right."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vlp.viz import (
    CORRECT_RGB,
    WRONG_RGB,
    format_table,
    images_to_uint8,
    plot_loss_curve,
    plot_metric_table,
    plot_retrieval_examples,
    read_metrics_jsonl,
)


def _write_jsonl(path, records, torn_tail: str = "") -> None:
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n" + torn_tail)


def _assert_png(path, min_w: int, min_h: int) -> Image.Image:
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    img = Image.open(path)
    img.load()
    assert img.format == "PNG"
    assert img.width >= min_w and img.height >= min_h
    return img.convert("RGB")


def test_loss_curve_one_panel_per_loss_key(tmp_path):
    records = [
        {"step": s, "loss": 3.0 - 0.1 * s, "itc": 1.0, "itm": 0.7, "mlm": 1.3, "lr": 1e-4, "samples_per_s": 50.0,
         "grad_norm": 1.0}
        for s in range(0, 50, 10)
    ]
    records.append({"step": 40, "eval/itc/r_mean": 12.0, "eval/itm/img_r1": 5.0, "eval/num_images": 50.0})
    metrics = tmp_path / "metrics.jsonl"
    _write_jsonl(metrics, records, torn_tail='{"step": 50, "lo')  # crash mid-write: last line skipped
    png = tmp_path / "out" / "loss_curve.png"
    panels = plot_loss_curve(metrics, png)
    assert panels == ["loss", "itc", "itm", "mlm", "eval"]
    img = _assert_png(png, 800, 500)  # 3 x 2 grid of 420 x 300 px panels
    assert img.size == (1260, 600)

    # Without eval records and with a train/ prefix: one panel per key, loss first.
    _write_jsonl(metrics, [{"step": 1, "train/itc": 1.0, "train/loss": 2.0}, {"step": 2, "train/itc": 0.9, "train/loss": 1.8}])
    assert plot_loss_curve(metrics, png) == ["loss", "itc"]
    assert _assert_png(png, 700, 250).size == (840, 300)
    assert plot_loss_curve(metrics, png, keys=["itc"]) == ["itc"]
    with pytest.raises(ValueError, match="no logged values"):
        plot_loss_curve(metrics, png, keys=["mlm"])


def test_loss_curve_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        plot_loss_curve(tmp_path / "missing.jsonl", tmp_path / "x.png")
    metrics = tmp_path / "metrics.jsonl"
    _write_jsonl(metrics, [{"step": 1, "lr": 0.1}])
    with pytest.raises(ValueError, match="nothing|no numeric"):
        plot_loss_curve(metrics, tmp_path / "x.png")
    metrics.write_text('{"step": 1, "loss": 1}\nnot json\n{"step": 2, "loss": 1}\n')
    with pytest.raises(ValueError, match=":2: not a JSON object"):
        read_metrics_jsonl(metrics)


def test_wrap_to_width():
    from PIL import ImageFont

    from vlp.viz import wrap_to_width

    font = ImageFont.load_default()
    text = "a red circle left of a blue star and a supercalifragilisticexpialidociousword"
    lines = wrap_to_width(text, font, 60)
    assert len(lines) > 2 and all(font.getlength(line) <= 60 for line in lines)
    assert "".join(lines).replace(" ", "") == text.replace(" ", "")


def test_images_to_uint8():
    x = torch.tensor([-1.0, 0.0, 1.0, 3.0]).view(1, 1, 1, 4).expand(1, 3, 1, 4)
    assert images_to_uint8(x)[0, 0, :, 0].tolist() == [0, 128, 255, 255]
    u = torch.full((1, 3, 2, 2), 7, dtype=torch.uint8)
    assert images_to_uint8(u).shape == (1, 2, 2, 3) and images_to_uint8(u).max() == 7


def test_retrieval_examples_borders(tmp_path):
    # 3 images: black, white, mid-grey (normalised mean .5 std .5).
    images = torch.tensor([-1.0, 1.0, 0.0]).view(3, 1, 1, 1).expand(3, 3, 8, 8).contiguous()
    captions = [f"a caption number {t} with a few words in it" for t in range(6)]
    txt2img = torch.tensor([0, 0, 1, 1, 2, 2])
    queries = [0, 2]
    topk = torch.tensor([[0, 1, 2], [0, 1, 2]])  # query 0 hits at rank 1, query 2 (image 1) at rank 2
    png = tmp_path / "examples.png"
    meta = plot_retrieval_examples(captions, images, queries, topk, txt2img, png, tile=32, border=3)
    assert meta["correct"] == [[True, False, False], [False, True, False]]
    img = np.asarray(_assert_png(png, 300, 100))
    assert (img.shape[1], img.shape[0]) == meta["size"]
    for row, oks in zip(meta["tiles"], meta["correct"]):
        for (x0, y0, x1, y1), ok in zip(row, oks):
            assert x1 - x0 == 32 + 2 * 3 and y1 - y0 == 32 + 2 * 3
            colour = CORRECT_RGB if ok else WRONG_RGB
            assert tuple(img[y0 + 1, x0 + 1]) == colour  # frame, top-left
            assert tuple(img[y1 - 2, x1 - 2]) == colour  # frame, bottom-right
    # Inside the frame: the image itself (query 0, rank 2 = image 1 = white; rank 1 = image 0 = black).
    x0, y0, _, _ = meta["tiles"][0][1]
    assert tuple(img[y0 + 10, x0 + 10]) == (255, 255, 255)
    x0, y0, _, _ = meta["tiles"][0][0]
    assert tuple(img[y0 + 10, x0 + 10]) == (0, 0, 0)
    # The caption column has dark text pixels.
    assert (img[meta["tiles"][0][0][1]: meta["tiles"][0][0][3], :200] < 100).all(axis=-1).any()
    with pytest.raises(ValueError, match="topk must be"):
        plot_retrieval_examples(captions, images, [0], topk, txt2img, png)


def test_format_table():
    rows = [
        {"method": "albef", "pairs": 4000, "t2i_R@1": 12.345, "note": None},
        {"method": "cmal-long", "pairs": 16000, "t2i_R@1": 100.0},
    ]
    table = format_table(rows, ["method", "pairs", "t2i_R@1", "note"])
    assert table.splitlines() == [
        "| method    | pairs | t2i_R@1 | note |",
        "|-----------|------:|--------:|------|",
        "| albef     |  4000 |   12.35 | -    |",
        "| cmal-long | 16000 |  100.00 | -    |",
    ]
    # Columns default to the keys in first-seen order; small values keep significant digits.
    assert format_table([{"metric": "lr", "value": 0.0003}]).splitlines()[2] == "| lr     | 0.0003 |"
    assert "nan" in format_table([{"x": float("nan")}])
    # A column of integral floats (e.g. num_images) prints without decimals.
    assert format_table([{"n": 200.0}, {"n": 5.0}]).splitlines()[2:] == ["| 200 |", "|   5 |"]


def test_plot_metric_table(tmp_path):
    png = plot_metric_table([{"method": "albef", "r_mean": 10.5}, {"method": "simla", "r_mean": 12.25}], tmp_path / "t.png")
    _assert_png(png, 200, 80)
    with pytest.raises(ValueError):
        plot_metric_table([], tmp_path / "t.png")
