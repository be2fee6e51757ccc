"""Figures and tables for runs: loss curves, retrieval examples, metric tables, the CMAL prompt figure.

Headless and side-effect free: figures are drawn on `matplotlib.figure.Figure` objects with the Agg
canvas (no `pyplot`, no global backend switch), retrieval grids are composed pixel-exact with Pillow.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
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
    "CmalPromptRegion",
    "CmalPromptToken",
    "CmalPromptView",
    "plot_cmal_prompt",
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


def _wrap_to_width(text: str, font: Any, width: int) -> list[str]:
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
        lines = _wrap_to_width(text, font, caption_w - 10)[:max_lines]
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


# ================================================================================ CMAL prompt figure
# What CMAL's associative prompt (anchor masking + swap feature filling, cmal.md §5) puts where, for
# one sample. The figure is drawn from plain data (`CmalPromptView`), which `vlp.api.cmal_prompt_view`
# fills from the tensors of the training code path (`Cmal.regions`, `anchors`, `mask`, `swap_fill`).

CMAL_TOKEN_KINDS = ("special", "anchor", "mlm_mask", "mlm_random", "mlm_kept", "plain")
CMAL_REGION_STATUSES = ("anchor", "masked", "plain")
# One colour per anchor region (in region order); saturated, distinct from each other and from grey.
CMAL_ANCHOR_PALETTE = (
    (230, 25, 75), (0, 130, 200), (60, 170, 60), (245, 130, 48), (145, 30, 180),
    (0, 170, 170), (240, 50, 230), (128, 100, 0), (0, 0, 128), (170, 110, 40),
)
CMAL_PLAIN_RGB = (150, 150, 150)
CMAL_MASKED_RGB = (40, 40, 40)


@dataclass(frozen=True)
class CmalPromptToken:
    """One text slot of the caption, before and after CMAL's prompt.

    position: slot index t in the encoder's text sequence ([CLS] is 0).
    piece: the original word piece (decoded `input_ids[t]`).
    kind: one of `CMAL_TOKEN_KINDS`: special ([CLS]/[SEP]), anchor (names an object class of a region;
        100 % masked, its slot holds the partner region's visual vector), mlm_mask / mlm_random /
        mlm_kept (BERT 80/10/10 on the MLM-selected non-anchor tokens), plain (untouched).
    after: what the slot holds after the prompt, as text ("⟨R2 red circle⟩", "[MASK]", a random piece).
    partner: π(t), the region slot whose visual vector fills this slot; -1 if not an anchor.
    matches: every region the token names (the anchor pairs A); π(t) is drawn uniformly among them.
    """

    position: int
    piece: str
    kind: str
    after: str
    partner: int = -1
    matches: tuple[int, ...] = ()


@dataclass(frozen=True)
class CmalPromptRegion:
    """One region slot, before and after CMAL's prompt.

    index: region slot index i (after `max_regions` / the optional whole-image region).
    box: normalised (x1, y1, x2, y2) of the region's box (the box embedding stays with the slot).
    name: human name of the region's object, e.g. "red circle" ("whole image" for label 0).
    status: one of `CMAL_REGION_STATUSES`: anchor (partner of some text anchor: swapped), masked
        (25 % region masking or the one-target fallback: its vector is 0), plain (untouched).
    after: the slot's content after the swap: "word 'circle'", "0 (masked)" or "visual".
    filled_from: the token position whose word vector fills the slot (the LAST token pointing to it,
        quirk 3), -1 if the slot is not swapped.
    pointing: every token position t with π(t) = index (ascending; `filled_from` is the last).
    """

    index: int
    box: tuple[float, float, float, float]
    name: str
    status: str
    after: str
    filled_from: int = -1
    pointing: tuple[int, ...] = ()


@dataclass(frozen=True)
class CmalPromptView:
    """Everything `plot_cmal_prompt` draws: the sample's image (H, W, 3) uint8, its caption, the text
    slots (real tokens only), the region slots (real regions only), a title and footer lines."""

    image: np.ndarray
    caption: str
    tokens: tuple[CmalPromptToken, ...]
    regions: tuple[CmalPromptRegion, ...]
    title: str
    notes: tuple[str, ...] = ()

    def anchor_colours(self) -> dict[int, tuple[int, int, int]]:
        """Region index -> RGB of every anchor region, palette colours in region order (cycled)."""
        anchors = [r.index for r in self.regions if r.status == "anchor"]
        return {index: CMAL_ANCHOR_PALETTE[k % len(CMAL_ANCHOR_PALETTE)] for k, index in enumerate(anchors)}


def _cmal_fonts() -> tuple[Any, Any, Any]:
    """(body, small, bold) fonts: matplotlib's bundled DejaVu Sans (has ⟨ ⟩ → glyphs, same everywhere),
    Pillow's default font when the file is missing."""
    import matplotlib

    folder = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    try:
        return (ImageFont.truetype(str(folder / "DejaVuSans.ttf"), 13),
                ImageFont.truetype(str(folder / "DejaVuSans.ttf"), 11),
                ImageFont.truetype(str(folder / "DejaVuSans-Bold.ttf"), 14))
    except OSError:
        return ImageFont.load_default(13), ImageFont.load_default(11), ImageFont.load_default(14)


def _tint(rgb: tuple[int, int, int], amount: float = 0.75) -> tuple[int, int, int]:
    """`rgb` mixed with white (amount 1 = white): a light fill behind dark text."""
    return tuple(int(round(c + (255 - c) * amount)) for c in rgb)  # type: ignore[return-value]


def _dashed_rectangle(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], dash: int = 4) -> None:
    """Outline `box` (x0, y0, x1, y1 inclusive) with alternating black / white dashes (visible on any
    background)."""
    x0, y0, x1, y1 = box
    for x in range(x0, x1 + 1):
        colour = (0, 0, 0) if (x - x0) // dash % 2 == 0 else (255, 255, 255)
        draw.point([(x, y0), (x, y1)], fill=colour)
    for y in range(y0, y1 + 1):
        colour = (0, 0, 0) if (y - y0) // dash % 2 == 0 else (255, 255, 255)
        draw.point([(x0, y), (x1, y)], fill=colour)


def _hatch(canvas: Image.Image, box: tuple[int, int, int, int], spacing: int = 6) -> None:
    """Diagonal black hatching inside `box` (x0, y0, x1, y1 inclusive), half transparent."""
    x0, y0, x1, y1 = box
    width, height = x1 - x0 + 1, y1 - y0 + 1
    if width < 2 or height < 2:
        return
    layer = Image.new("RGBA", (width, height), (0, 0, 0, 0))
    layer_draw = ImageDraw.Draw(layer)
    for offset in range(-height, width, spacing):
        layer_draw.line([(offset, height), (offset + height, 0)], fill=(0, 0, 0, 110), width=1)
    canvas.paste(layer, (x0, y0), layer)


def _label(draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str, font: Any, fill: tuple[int, int, int],
           text_rgb: tuple[int, int, int] = (255, 255, 255)) -> None:
    """A text label on a filled rectangle, top-left at `xy`."""
    x, y = xy
    width = int(math.ceil(font.getlength(text)))
    draw.rectangle([x, y, x + width + 3, y + 13], fill=fill)
    draw.text((x + 2, y), text, fill=text_rgb, font=font)


def _token_styles(token: CmalPromptToken, colours: dict[int, tuple[int, int, int]]) -> tuple[
        tuple[Optional[tuple[int, int, int]], tuple[int, int, int], tuple[int, int, int]],
        tuple[Optional[tuple[int, int, int]], tuple[int, int, int], tuple[int, int, int]]]:
    """((fill, outline, text) before, (fill, outline, text) after) of a token chip; fill None = none."""
    black, grey, light = (0, 0, 0), (140, 140, 140), (225, 225, 225)
    if token.kind == "anchor":
        rgb = colours[token.partner]
        return (_tint(rgb), rgb, black), (rgb, rgb, (255, 255, 255))
    if token.kind == "special":
        return (None, light, grey), (None, light, grey)
    if token.kind == "mlm_mask":
        return (None, light, black), ((60, 60, 60), (60, 60, 60), (255, 255, 255))
    if token.kind == "mlm_random":
        return (None, light, black), ((255, 236, 170), (200, 140, 0), black)
    if token.kind == "mlm_kept":
        return (None, light, black), ((215, 235, 255), (90, 130, 200), black)
    return (None, light, black), (None, light, black)


def plot_cmal_prompt(view: CmalPromptView, png_path: str | Path, image_px: int = 256,
                     width: int = 1100) -> dict[str, Any]:
    """Draw what CMAL's associative prompt puts where, for one sample, to a PNG.

    Left: the image upscaled to `image_px` (nearest) with every region's box: anchor regions in their
    own colour (label "R<i> <class>"), masked regions dashed black/white and hatched ("masked"), other
    regions thin grey. Right: one line per region (status, the tokens pointing to it, content after the
    swap). Below: the caption's word pieces BEFORE (anchor tokens tinted in their partner region's
    colour) and AFTER the prompt (anchor slots show the region whose visual vector they hold, MLM tokens
    [MASK] / their random replacement / kept), then the region slots after the swap, then `view.notes`.

    Returns layout metadata for tests: `size` (W, H), `image_box` (x0, y0, x1, y1 exclusive) of the
    upscaled image, `scale` (px per image px, float), `colours` (anchor region index -> RGB),
    `region_boxes` (region index -> drawn (x0, y0, x1, y1) inclusive).
    """
    unknown_kinds = sorted({t.kind for t in view.tokens} - set(CMAL_TOKEN_KINDS))
    unknown_status = sorted({r.status for r in view.regions} - set(CMAL_REGION_STATUSES))
    if unknown_kinds or unknown_status:
        raise ValueError(f"unknown token kinds {unknown_kinds} / region statuses {unknown_status}; expected "
                         f"{CMAL_TOKEN_KINDS} / {CMAL_REGION_STATUSES}")
    if view.image.ndim != 3 or view.image.shape[2] != 3:
        raise ValueError(f"view.image must be (H, W, 3) uint8, got shape {view.image.shape}")
    colours = view.anchor_colours()
    missing = sorted({t.partner for t in view.tokens if t.kind == "anchor"} - set(colours))
    if missing:
        raise ValueError(f"anchor tokens point to regions {missing}, which are not anchor regions of the view")
    body, small, bold = _cmal_fonts()
    margin, gap, line_h, chip_h = 12, 10, 17, 19
    black, grey = (0, 0, 0), (110, 110, 110)
    content_w = width - 2 * margin

    # ---- token grid layout: one column per slot, wrapped into bands (position / before / after)
    label_w = int(max(small.getlength(s) for s in ("slot", "before", "after", "π(t)"))) + 8
    partner_notes = [_partner_note(token) for token in view.tokens]
    columns = []
    for token, note in zip(view.tokens, partner_notes):
        col_w = int(math.ceil(max(body.getlength(token.piece), body.getlength(token.after),
                                  small.getlength(str(token.position)), small.getlength(note)))) + 10
        columns.append(col_w)
    bands: list[list[int]] = [[]]
    x = label_w
    for k, col_w in enumerate(columns):
        if bands[-1] and x + col_w > content_w:
            bands.append([])
            x = label_w
        bands[-1].append(k)
        x += col_w + 3
    band_h = 14 + 2 * (chip_h + 3) + 14 + 8

    region_chips = [f"R{r.index} {r.name}: {r.after}" for r in view.regions]
    chip_rows: list[list[int]] = [[]]
    x = 0
    for k, text in enumerate(region_chips):
        chip_w = int(math.ceil(body.getlength(text))) + 12
        if chip_rows[-1] and x + chip_w > content_w:
            chip_rows.append([])
            x = 0
        chip_rows[-1].append(k)
        x += chip_w + 6

    notes = [line for note in view.notes for line in _wrap_to_width(note, small, content_w)]
    caption_lines = _wrap_to_width(f"caption: {view.caption}", body, content_w)
    table_x = margin + image_px + 2 * gap
    table_w = width - table_x - margin
    region_lines: list[list[tuple[str, Any, tuple[int, int, int]]]] = []
    for region in view.regions:
        pointing = ", ".join(f"t{p} '{view.tokens[_slot(view, p)].piece}'" for p in region.pointing)
        head = f"R{region.index} {region.name}"
        if region.status == "anchor":
            detail = f"anchor ← {pointing}; after swap: {region.after}"
            if len(region.pointing) > 1:
                detail += " (last pointing token wins)"
        elif region.status == "masked":
            detail = f"masked (region masking): after: {region.after}"
        else:
            detail = f"untouched: {region.after}"
        wrapped = _wrap_to_width(detail, small, table_w - 20)
        region_lines.append([(head, body, black)] + [(w, small, grey) for w in wrapped])
    table_h = 36 + sum(line_h * len(lines) + 4 for lines in region_lines)

    top = margin + 24
    panel_h = max(image_px, table_h)
    y_caption = top + panel_h + gap
    y_tokens = y_caption + line_h * len(caption_lines) + 24
    y_regions = y_tokens + band_h * len(bands) + 18
    y_notes = y_regions + (chip_h + 6) * len(chip_rows) + 10
    height = y_notes + line_h * len(notes) + margin
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    draw.text((margin, margin), view.title, fill=black, font=bold)

    # ---- image with boxes
    h, w = view.image.shape[:2]
    scale = image_px / max(h, w)
    shown = Image.fromarray(np.ascontiguousarray(view.image)).resize(
        (int(round(w * scale)), int(round(h * scale))), Image.Resampling.NEAREST)
    canvas.paste(shown, (margin, top))
    drawn: dict[int, tuple[int, int, int, int]] = {}
    order = sorted(view.regions, key=lambda r: ("plain", "masked", "anchor").index(r.status))  # anchors on top
    for region in order:
        x1, y1, x2, y2 = region.box
        box = (margin + int(round(x1 * w * scale)), top + int(round(y1 * h * scale)),
               margin + int(round(x2 * w * scale)) - 1, top + int(round(y2 * h * scale)) - 1)
        drawn[region.index] = box
        if region.status == "anchor":
            rgb = colours[region.index]
            draw.rectangle([box[0] - 1, box[1] - 1, box[2] + 1, box[3] + 1], outline=(255, 255, 255), width=1)
            draw.rectangle(box, outline=rgb, width=2)
            _label(draw, (box[0], max(top, box[1] - 14)), f"R{region.index} {region.name.split()[-1]}", small, rgb)
        elif region.status == "masked":
            _hatch(canvas, box)
            _dashed_rectangle(draw, box)
            _label(draw, (box[0], max(top, box[1] - 14)), f"R{region.index} masked", small, CMAL_MASKED_RGB)
        else:
            draw.rectangle(box, outline=CMAL_PLAIN_RGB, width=1)
            _label(draw, (box[0], max(top, box[1] - 14)), f"R{region.index}", small, CMAL_PLAIN_RGB)

    # ---- region table (right of the image)
    y = top
    draw.text((table_x, y), "regions (box, status, content after the swap)", fill=black, font=bold)
    y += 18
    draw.text((table_x, y), "box: coloured = anchor region (partner π(t) of a text anchor) · dashed + hatched = "
              "masked · thin grey = untouched", fill=grey, font=small)
    y += 18
    for region, lines in zip(view.regions, region_lines):
        swatch = colours.get(region.index, CMAL_MASKED_RGB if region.status == "masked" else CMAL_PLAIN_RGB)
        draw.rectangle([table_x, y + 3, table_x + 11, y + 14], fill=swatch)
        for k, (text, font, rgb) in enumerate(lines):
            draw.text((table_x + 18, y + k * line_h), text, fill=rgb, font=font)
        y += line_h * len(lines) + 4

    # ---- caption and the token grid
    for k, line in enumerate(caption_lines):
        draw.text((margin, y_caption + k * line_h), line, fill=black, font=body)
    header = "text slots: word pieces BEFORE and AFTER the associative prompt"
    draw.text((margin, y_tokens - 18), header, fill=black, font=bold)
    x = margin + int(bold.getlength(header)) + 16
    for text, kind in (("anchor", "anchor"), ("[MASK]", "mlm_mask"), ("random id", "mlm_random"),
                       ("kept (MLM target)", "mlm_kept"), ("special", "special")):
        sample_token = CmalPromptToken(0, text, kind, text, partner=min(colours) if colours else -1)
        if kind == "anchor" and not colours:
            continue
        fill, outline, text_rgb = _token_styles(sample_token, colours)[1]
        chip_w = int(math.ceil(small.getlength(text))) + 8
        draw.rectangle([x, y_tokens - 18, x + chip_w - 1, y_tokens - 4], fill=fill, outline=outline)
        draw.text((x + 4, y_tokens - 17), text, fill=text_rgb, font=small)
        x += chip_w + 5
    for b, band in enumerate(bands):
        y0 = y_tokens + b * band_h
        rows_y = (y0, y0 + 14, y0 + 14 + chip_h + 3, y0 + 14 + 2 * (chip_h + 3))
        for text, ry in zip(("slot", "before", "after", "π(t)"), rows_y):
            draw.text((margin, ry + (3 if text in ("before", "after") else 0)), text, fill=grey, font=small)
        x = margin + label_w
        for k in band:
            token, col_w = view.tokens[k], columns[k]
            draw.text((x + 2, rows_y[0]), str(token.position), fill=grey, font=small)
            if partner_notes[k]:
                draw.text((x + 2, rows_y[3]), partner_notes[k], fill=colours[token.partner], font=small)
            for text, ry, (fill, outline, text_rgb) in zip(
                    (token.piece, token.after), rows_y[1:], _token_styles(token, colours)):
                draw.rectangle([x, ry, x + col_w - 1, ry + chip_h - 1], fill=fill, outline=outline)
                draw.text((x + 5, ry + 2), text, fill=text_rgb, font=body)
            x += col_w + 3

    # ---- region slots after the swap
    draw.text((margin, y_regions - 16), "region slots AFTER the swap", fill=black, font=bold)
    for r, row in enumerate(chip_rows):
        x, ry = margin, y_regions + r * (chip_h + 6)
        for k in row:
            region, text = view.regions[k], region_chips[k]
            chip_w = int(math.ceil(body.getlength(text))) + 12
            if region.status == "anchor":
                fill, outline, text_rgb = colours[region.index], colours[region.index], (255, 255, 255)
            elif region.status == "masked":
                fill, outline, text_rgb = (60, 60, 60), (60, 60, 60), (255, 255, 255)
            else:
                fill, outline, text_rgb = None, CMAL_PLAIN_RGB, black
            draw.rectangle([x, ry, x + chip_w - 1, ry + chip_h - 1], fill=fill, outline=outline)
            draw.text((x + 6, ry + 2), text, fill=text_rgb, font=body)
            x += chip_w + 6

    for k, line in enumerate(notes):
        draw.text((margin, y_notes + k * line_h), line, fill=grey, font=small)
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(png_path, format="PNG")
    return {"size": (width, height), "image_box": (margin, top, margin + shown.width, top + shown.height),
            "scale": scale, "colours": colours, "region_boxes": drawn}


def _partner_note(token: CmalPromptToken) -> str:
    """'R2 of R0,R2' for an anchor token (its partner among the regions it names), '' otherwise."""
    if token.kind != "anchor":
        return ""
    return f"R{token.partner} of " + ",".join(f"R{i}" for i in token.matches)


def _slot(view: CmalPromptView, position: int) -> int:
    """Index in `view.tokens` of the text slot at `position` (ValueError naming it if absent)."""
    for k, token in enumerate(view.tokens):
        if token.position == position:
            return k
    raise ValueError(f"the view has no text slot at position {position}")
