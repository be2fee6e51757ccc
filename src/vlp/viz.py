"""Figures and tables for runs: loss curves, retrieval examples, metric tables, the CMAL prompt figure.

Headless and side-effect free: figures are drawn on `matplotlib.figure.Figure` objects with the Agg
canvas (no `pyplot`, no global backend switch), retrieval grids are composed pixel-exact with Pillow.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

__all__ = [
    "CORRECT_RGB",
    "WRONG_RGB",
    "read_metrics_jsonl",
    "plot_loss_curve",
    "plot_retrieval_examples",
    "plot_metric_table",
    "format_table",
    "images_to_uint8",
    "wrap_to_width",
]

CORRECT_RGB = (30, 170, 60)
WRONG_RGB = (215, 40, 40)

# Numeric keys of a training record that are bookkeeping, not a loss.
_BOOKKEEPING = {
    "step", "epoch", "lr", "time", "elapsed", "wall", "samples", "tokens", "throughput",
    "grad_norm", "mem", "memory", "rank", "world_size", "batch_size", "micro_batch", "data_wait",
}
_BOOKKEEPING_SUFFIXES = ("_s", "_per_s", "_per_sec", "_gb", "_mb", "_ms", "_seconds")
# Eval keys shown in the eval panel (by last path component), when present.
_EVAL_HEADLINE = ("r_mean", "img_r1", "txt_r1", "hard_neg_acc")
_EVAL_NON_METRIC = ("num_images", "num_texts", "chance_r1", "itm_forwards")


# ====================================================================================== loss curve
def read_metrics_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Records of a `metrics.jsonl` (one JSON object per line); a torn last line (crash mid-write) is skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"metrics file not found: {path}")
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                continue
            raise ValueError(f"{path}:{i + 1}: not a JSON object: {line[:80]!r}") from None
        if isinstance(rec, dict):
            records.append(rec)
    return records


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_bookkeeping(key: str) -> bool:
    return key in _BOOKKEEPING or key.startswith("lr") or key.endswith(_BOOKKEEPING_SUFFIXES)


def _series(records: list[dict[str, Any]]) -> tuple[dict[str, list[tuple[float, float]]], dict[str, list[tuple[float, float]]]]:
    """(train series by key, eval series by key) of (step, value); `train/` prefixes are dropped."""
    train: dict[str, list[tuple[float, float]]] = {}
    evals: dict[str, list[tuple[float, float]]] = {}
    for i, rec in enumerate(records):
        step = rec.get("step", i)
        if not _is_number(step):
            continue
        for key, value in rec.items():
            if not _is_number(value):
                continue
            if key.startswith("eval/"):
                evals.setdefault(key[len("eval/"):], []).append((float(step), float(value)))
                continue
            name = key[len("train/"):] if key.startswith("train/") else key
            if _is_bookkeeping(name):
                continue
            train.setdefault(name, []).append((float(step), float(value)))
    return train, evals


def plot_loss_curve(
    metrics_jsonl_path: str | Path, png_path: str | Path, keys: Optional[Sequence[str]] = None
) -> list[str]:
    """Plot every logged loss against step, one panel per key, plus an `eval` panel of points.

    Training records are the JSON lines of `metrics.jsonl` (`{"step": 20, "loss": 3.1, "itc": ...}`;
    an optional `train/` prefix is dropped). Numeric keys that are bookkeeping (step, lr, timings,
    throughput, grad_norm, memory) get no panel. Keys starting with `eval/` (recorded by the trainer's
    eval hook) are drawn as points in one extra panel `eval` (headline metrics: r_mean, R@1 and
    hard-negative accuracy; all eval metrics if none of those is logged).

    Args:
        keys: the training keys to plot (default: all loss-like keys, `loss` first, then log order).

    Returns:
        The panel titles in drawing order (training keys, then `eval` if any eval metric was logged).
    """
    records = read_metrics_jsonl(metrics_jsonl_path)
    train, evals = _series(records)
    if keys is not None:
        missing = [k for k in keys if k not in train]
        if missing:
            raise ValueError(f"{metrics_jsonl_path}: no logged values for {missing} (logged: {sorted(train)})")
        train_keys = list(keys)
    else:
        train_keys = sorted(train, key=lambda k: (k != "loss", list(train).index(k)))
    eval_keys = [k for k in evals if k.split("/")[-1] in _EVAL_HEADLINE]
    if not eval_keys:
        eval_keys = [k for k in evals if k.split("/")[-1] not in _EVAL_NON_METRIC]
    panels = train_keys + (["eval"] if eval_keys else [])
    if not panels:
        raise ValueError(f"{metrics_jsonl_path}: no numeric loss or eval values to plot")

    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(4.2 * ncols, 3.0 * nrows), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).reshape(-1)
    for ax, key in zip(axes, train_keys):
        steps, values = zip(*train[key])
        ax.plot(steps, values, lw=1.4)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if eval_keys:
        ax = axes[len(train_keys)]
        for key in eval_keys:
            steps, values = zip(*evals[key])
            ax.plot(steps, values, "o", ms=4, label=key)
        ax.set_title("eval")
        ax.set_xlabel("step")
        ax.set_ylabel("%")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    fig.tight_layout()
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path)
    return panels


# =============================================================================== retrieval examples
def images_to_uint8(images: Tensor) -> np.ndarray:
    """(N, 3, H, W) uint8, or float normalised with mean 0.5 / std 0.5 (`vlp.data.transforms`) -> (N, H, W, 3) uint8."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images (N, 3, H, W), got shape {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        pixels = images
    else:
        pixels = ((images.detach().float().cpu() * 0.5 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).contiguous().cpu().numpy()


def wrap_to_width(text: str, font: Any, width: int) -> list[str]:
    """Greedy word wrap by rendered width (`font.getlength`); over-long words are hard-split."""
    lines: list[str] = []
    current = ""
    for word in text.split():
        while font.getlength(word) > width and len(word) > 1:  # hard-split a word wider than the column
            cut = max(1, int(len(word) * width / font.getlength(word)))
            while cut > 1 and font.getlength(word[:cut]) > width:
                cut -= 1
            if current:
                lines.append(current)
                current = ""
            lines.append(word[:cut])
            word = word[cut:]
        candidate = f"{current} {word}" if current else word
        if font.getlength(candidate) <= width:
            current = candidate
        else:
            lines.append(current)
            current = word
    if current:
        lines.append(current)
    return lines


def plot_retrieval_examples(
    rset_captions: Sequence[str],
    images: Tensor,
    queries: Sequence[int],
    topk: Tensor,
    txt2img: Tensor,
    png_path: str | Path,
    tile: int = 96,
    border: int = 4,
) -> dict[str, Any]:
    """Text→image retrieval examples: one row per query — its caption, then its top-K images.

    Each retrieved image gets a `border`-px frame, green (`CORRECT_RGB`) when it is the query's ground
    truth image (`txt2img[query]`), red (`WRONG_RGB`) otherwise.

    Args:
        rset_captions: all texts of the set (index = text index).
        images: (I, 3, H, W) uint8 or float normalised with mean 0.5 / std 0.5.
        queries: Q text indices; topk: (Q, K) long image indices, best first.
        txt2img: (Tn,) long.
        tile: displayed image side in px (nearest-neighbour resize).

    Returns:
        Layout metadata: `size` (W, H) of the PNG, `tiles` (Q lists of K outer frame boxes (x0, y0, x1, y1),
        exclusive end), `correct` (Q lists of K bools).
    """
    topk = torch.as_tensor(topk, dtype=torch.long).cpu()
    txt2img = torch.as_tensor(txt2img, dtype=torch.long).cpu()
    queries = [int(q) for q in queries]
    if topk.dim() != 2 or topk.shape[0] != len(queries):
        raise ValueError(f"topk must be (Q={len(queries)}, K), got shape {tuple(topk.shape)}")
    n_q, k = topk.shape
    font = ImageFont.load_default()
    margin, gap, caption_w, header_h, label_h = 8, 6, 300, 22, 14
    frame = tile + 2 * border
    row_h = frame + label_h + gap
    width = margin + caption_w + k * (frame + gap) + margin
    height = header_h + n_q * row_h + margin
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    draw.text((margin, 4), "text -> image retrieval (green frame = ground-truth image)", fill=(0, 0, 0), font=font)

    needed = torch.unique(topk) if topk.numel() else topk.reshape(-1)
    pixels = dict(zip(needed.tolist(), images_to_uint8(images[needed]))) if needed.numel() else {}
    max_lines = max((row_h - 4) // 12, 1)

    tiles: list[list[tuple[int, int, int, int]]] = []
    correct: list[list[bool]] = []
    for r, q in enumerate(queries):
        y = header_h + r * row_h
        gt = int(txt2img[q])
        text = f"[text {q} | image {gt}] {rset_captions[q]}"
        lines = wrap_to_width(text, font, caption_w - 10)[:max_lines]
        draw.multiline_text((margin, y + 2), "\n".join(lines), fill=(0, 0, 0), font=font, spacing=2)
        row_tiles, row_ok = [], []
        for j in range(k):
            img_id = int(topk[r, j])
            ok = img_id == gt
            x0 = margin + caption_w + j * (frame + gap)
            draw.rectangle([x0, y, x0 + frame - 1, y + frame - 1], fill=CORRECT_RGB if ok else WRONG_RGB)
            thumb = Image.fromarray(pixels[img_id]).resize((tile, tile), Image.NEAREST)
            canvas.paste(thumb, (x0 + border, y + border))
            draw.text((x0, y + frame + 1), f"#{j + 1} img {img_id}", fill=(60, 60, 60), font=font)
            row_tiles.append((x0, y, x0 + frame, y + frame))
            row_ok.append(ok)
        tiles.append(row_tiles)
        correct.append(row_ok)
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(png_path)
    return {"size": (width, height), "tiles": tiles, "correct": correct}


# =========================================================================================== tables
def _format_cell(value: Any, decimals: bool = True) -> str:
    """One table cell; `decimals=False` prints integral floats without decimals (a column of counts)."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        if not decimals and v.is_integer() and abs(v) < 1e12:
            return str(int(v))
        return f"{v:.2f}" if abs(v) >= 0.01 or v == 0 else f"{v:.3g}"
    return str(value)


def _column_has_fractions(rows: Sequence[dict[str, Any]], column: str) -> bool:
    return any(
        isinstance(v, (float, np.floating)) and math.isfinite(float(v)) and not float(v).is_integer()
        for v in (row.get(column) for row in rows)
    )


def _is_numeric_cell(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def format_table(rows: Sequence[dict[str, Any]], columns: Optional[Sequence[str]] = None) -> str:
    """A plain-text aligned table (also valid Markdown), for logs, the CLI and `results.md`.

    Columns default to the keys of the rows in first-seen order; a missing cell prints as "-". Numbers are
    right-aligned, text left-aligned; a column with any fractional float prints all its floats with 2
    decimals (3 significant digits below 0.01), otherwise integral values print without decimals.
    """
    if columns is None:
        columns = list(dict.fromkeys(key for row in rows for key in row))
    columns = list(columns)
    fractions = [_column_has_fractions(rows, c) for c in columns]
    cells = [[_format_cell(row.get(c), frac) for c, frac in zip(columns, fractions)] for row in rows]
    numeric = [
        any(_is_numeric_cell(row.get(c)) for row in rows) and all(row.get(c) is None or _is_numeric_cell(row.get(c)) for row in rows)
        for c in columns
    ]
    widths = [max([len(c)] + [len(r[j]) for r in cells]) for j, c in enumerate(columns)]

    def line(values: Sequence[str]) -> str:
        parts = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)]
        return "| " + " | ".join(parts) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if num else ("-" * (w + 2)) for w, num in zip(widths, numeric)) + "|"
    return "\n".join([line(columns), rule, *(line(r) for r in cells)])


def plot_metric_table(rows: Sequence[dict[str, Any]], png_path: str | Path, columns: Optional[Sequence[str]] = None) -> Path:
    """Render `format_table`'s rows as a PNG table (e.g. a method comparison for a README)."""
    if columns is None:
        columns = list(dict.fromkeys(key for row in rows for key in row))
    columns = list(columns)
    if not rows or not columns:
        raise ValueError("plot_metric_table needs at least one row and one column")
    fractions = [_column_has_fractions(rows, c) for c in columns]
    text = [[_format_cell(row.get(c), frac) for c, frac in zip(columns, fractions)] for row in rows]
    fig = Figure(figsize=(max(1.1 * len(columns), 3.0), 0.5 + 0.32 * (len(rows) + 1)), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.axis("off")
    table = ax.table(cellText=text, colLabels=columns, loc="center", cellLoc="center")
    table.auto_set_font_size(False)
    table.set_fontsize(8)
    for (r, _), cell in table.get_celld().items():
        if r == 0:
            cell.set_facecolor((0.88, 0.9, 0.95))
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, bbox_inches="tight", pad_inches=0.1)
    return png_path
