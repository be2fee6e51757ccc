"""Pixels of the embedded world: object masks, backgrounds, scene rendering and the browsing grid.

world.md ("Scenes") asks for exact boxes that enclose exactly the drawn pixels, backgrounds that vary
(plain tints, gradients, noise) so that colour is not trivially global, and a PNG grid for people to
see what the model sees ("Browsing"). This module draws; `vlp.data.world` decides what to draw.

Exactness by construction: each object is rasterised once, on its own small Pillow 'L' canvas
(`object_mask`); its box is the bounding box of that mask's nonzero pixels, and rendering pastes the
same mask at an integer offset, so the box and the painted pixels cannot disagree. Backgrounds keep
every pixel at least `BACKGROUND_MIN_DISTANCE` (RGB Euclidean) away from every object colour and
stripe shade, so "pixels that differ from the background" are exactly the object pixels.

Pure numpy + Pillow (no torch), so it runs in DataLoader workers.
"""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from vlp.data.lexicon import CLASSES, COLOURS
from vlp.data.records import VE_LABELS



class SceneLike(Protocol):
    """What rendering reads of a `vlp.data.world.Scene` (world.py imports this module, so not the class)."""

    image_size: int
    background: Any
    objects: Sequence[Any]
    masks: Sequence[Any]

# ---------------------------------------------------------------------------------------------
# Object shapes, in unit coordinates of the nominal box (u right, v down, both in [0, 1]).
# A primitive is (kind, coordinates, ink): kind "poly" (list of (u, v)), "ellipse" or "rect"
# ((u0, v0, u1, v1)); ink 255 draws, ink 0 cuts a hole. Holes marked as details are drawn only when
# the object is large enough for them to read as holes rather than noise.
# ---------------------------------------------------------------------------------------------


def _normalised(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Scale a polygon so its bounding box is exactly [0, 1] x [0, 1]."""
    us = [p[0] for p in points]
    vs = [p[1] for p in points]
    return [((u - min(us)) / (max(us) - min(us)), (v - min(vs)) / (max(vs) - min(vs))) for u, v in points]


def _regular_polygon(sides: int, start_degrees: float) -> list[tuple[float, float]]:
    angles = [math.radians(start_degrees + 360.0 * k / sides) for k in range(sides)]
    return _normalised([(math.cos(a), math.sin(a)) for a in angles])


def _star(points: int = 5, inner_ratio: float = 0.42) -> list[tuple[float, float]]:
    vertices = []
    for k in range(2 * points):
        radius = 1.0 if k % 2 == 0 else inner_ratio
        angle = math.radians(-90.0 + 180.0 * k / points)
        vertices.append((radius * math.cos(angle), radius * math.sin(angle)))
    return _normalised(vertices)


def _heart(steps: int = 48) -> list[tuple[float, float]]:
    vertices = []
    for k in range(steps):
        t = 2.0 * math.pi * k / steps
        x = 16.0 * math.sin(t) ** 3
        y = -(13.0 * math.cos(t) - 5.0 * math.cos(2 * t) - 2.0 * math.cos(3 * t) - math.cos(4 * t))
        vertices.append((x, y))
    return _normalised(vertices)


_DETAIL_MIN_PIXELS = 14
"""Holes that are details (house door, car windows) are cut only when the object's short side is at
least this many pixels; below it they would read as noise."""

_SHAPES: dict[str, list[tuple[str, object, int, bool]]] = {
    # (kind, coordinates, ink, is_detail)
    "circle": [("ellipse", (0.0, 0.0, 1.0, 1.0), 255, False)],
    "square": [("rect", (0.0, 0.0, 1.0, 1.0), 255, False)],
    "triangle": [("poly", [(0.5, 0.0), (1.0, 1.0), (0.0, 1.0)], 255, False)],
    "star": [("poly", _star(), 255, False)],
    "heart": [("poly", _heart(), 255, False)],
    "cross": [("poly", [(0.33, 0.0), (0.67, 0.0), (0.67, 0.33), (1.0, 0.33), (1.0, 0.67), (0.67, 0.67),
                        (0.67, 1.0), (0.33, 1.0), (0.33, 0.67), (0.0, 0.67), (0.0, 0.33), (0.33, 0.33)],
               255, False)],
    "ring": [("ellipse", (0.0, 0.0, 1.0, 1.0), 255, False), ("ellipse", (0.25, 0.25, 0.75, 0.75), 0, False)],
    "diamond": [("poly", [(0.5, 0.0), (1.0, 0.5), (0.5, 1.0), (0.0, 0.5)], 255, False)],
    "pentagon": [("poly", _regular_polygon(5, -90.0), 255, False)],
    "hexagon": [("poly", _regular_polygon(6, 0.0), 255, False)],
    "arrow": [("poly", [(0.0, 0.34), (0.58, 0.34), (0.58, 0.0), (1.0, 0.5), (0.58, 1.0), (0.58, 0.66),
                        (0.0, 0.66)], 255, False)],
    "moon": [("ellipse", (0.0, 0.0, 1.0, 1.0), 255, False), ("ellipse", (0.38, -0.1, 1.4, 0.9), 0, False)],
    "cloud": [("ellipse", (0.0, 0.4, 0.42, 1.0), 255, False), ("ellipse", (0.58, 0.38, 1.0, 1.0), 255, False),
              ("ellipse", (0.16, 0.0, 0.64, 0.8), 255, False), ("ellipse", (0.42, 0.14, 0.86, 0.86), 255, False),
              ("rect", (0.2, 0.62, 0.8, 1.0), 255, False)],
    "house": [("poly", [(0.0, 0.5), (0.5, 0.0), (1.0, 0.5)], 255, False),
              ("rect", (0.7, 0.06, 0.82, 0.4), 255, False),
              ("rect", (0.14, 0.46, 0.86, 1.0), 255, False),
              ("rect", (0.42, 0.7, 0.58, 1.0), 0, True)],
    "tree": [("poly", [(0.5, 0.0), (0.88, 0.45), (0.12, 0.45)], 255, False),
             ("poly", [(0.5, 0.18), (1.0, 0.78), (0.0, 0.78)], 255, False),
             ("rect", (0.38, 0.76, 0.62, 1.0), 255, False)],
    "car": [("rect", (0.0, 0.38, 1.0, 0.78), 255, False),
            ("poly", [(0.16, 0.4), (0.3, 0.0), (0.68, 0.0), (0.84, 0.4)], 255, False),
            ("ellipse", (0.08, 0.56, 0.38, 1.0), 255, False), ("ellipse", (0.62, 0.56, 0.92, 1.0), 255, False),
            ("poly", [(0.34, 0.12), (0.64, 0.12), (0.72, 0.36), (0.26, 0.36)], 0, True)],
    "flag": [("rect", (0.0, 0.0, 0.13, 1.0), 255, False), ("rect", (0.13, 0.04, 1.0, 0.56), 255, False)],
    "bolt": [("poly", [(0.55, 0.0), (0.05, 0.58), (0.45, 0.58), (0.25, 1.0), (0.95, 0.38), (0.55, 0.38),
                       (0.8, 0.0)], 255, False)],
}

OUTLINE_FRACTION = 0.09
"""Outline band thickness as a fraction of the object's short side (at least one pixel)."""

STRIPE_PERIODS = 5.0
"""Striped objects carry about this many diagonal stripe periods across their long side."""


def object_mask(class_id: int, width: int, height: int, style: str, flipped: bool = False) -> np.ndarray:
    """Rasterise one object on its own canvas and return the boolean mask of its drawn pixels.

    The canvas is (height + 2, width + 2): the nominal box plus a one-pixel empty border, so that
    erosion for outlines never touches the canvas edge. The caller places the canvas at an integer
    offset; the object's exact box is the bounding box of this mask (world.md "Scenes": exact boxes).
    """
    if not 0 <= class_id < len(CLASSES):
        raise ValueError(f"class_id must be in [0, {len(CLASSES) - 1}], got {class_id}")
    if width < 3 or height < 3:
        raise ValueError(f"object must be at least 3x3 pixels to be drawn, got {width}x{height}")
    canvas = Image.new("L", (width + 2, height + 2), 0)
    draw = ImageDraw.Draw(canvas)
    span_x, span_y = width - 1, height - 1

    def to_x(u: float) -> float:
        return 1.0 + (1.0 - u if flipped else u) * span_x

    def to_y(v: float) -> float:
        return 1.0 + v * span_y

    def to_rect(coords: tuple[float, float, float, float]) -> list[float]:
        u0, v0, u1, v1 = coords
        x_a, x_b = sorted((to_x(u0), to_x(u1)))
        return [round(x_a), round(to_y(v0)), round(x_b), round(to_y(v1))]

    show_details = min(width, height) >= _DETAIL_MIN_PIXELS
    for kind, coords, ink, is_detail in _SHAPES[CLASSES[class_id].name]:
        if is_detail and not show_details:
            continue
        if kind == "poly":
            draw.polygon([(to_x(u), to_y(v)) for u, v in coords], fill=ink)  # type: ignore[union-attr]
        elif kind == "ellipse":
            draw.ellipse(to_rect(coords), fill=ink)  # type: ignore[arg-type]
        else:
            draw.rectangle(to_rect(coords), fill=ink)  # type: ignore[arg-type]
    if style == "outline":
        thickness = max(1, round(OUTLINE_FRACTION * min(width, height)))
        eroded = canvas
        for _ in range(thickness):  # t passes of a 3x3 minimum = one (2t+1)x(2t+1) minimum, cheaper
            eroded = eroded.filter(ImageFilter.MinFilter(3))
        filled = np.asarray(canvas) > 0
        return filled & ~(np.asarray(eroded) > 0)
    if style not in ("filled", "striped"):
        raise ValueError(f"unknown style {style!r}; expected one of filled, outline, striped")
    return np.asarray(canvas) > 0


def stripe_rgb(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    """The second shade of a striped object: darker for light colours, lighter for dark ones."""
    r, g, b = rgb
    luminance = 0.299 * r + 0.587 * g + 0.114 * b
    if luminance > 100.0:
        return (round(r * 0.55), round(g * 0.55), round(b * 0.55))
    return (round(r + (255 - r) * 0.35), round(g + (255 - g) * 0.35), round(b + (255 - b) * 0.35))


# ---------------------------------------------------------------------------------------------
# Backgrounds
# ---------------------------------------------------------------------------------------------

BACKGROUND_MIN_DISTANCE = 60.0
"""Every background pixel is at least this far (RGB Euclidean) from every object colour and stripe
shade, so objects never blend in and object pixels are exactly the pixels that differ from it."""

BACKGROUND_KINDS = ("plain", "vertical_gradient", "horizontal_gradient")

_INK_COLOURS = np.array(
    [c.rgb for c in COLOURS] + [stripe_rgb(c.rgb) for c in COLOURS], dtype=np.float64
)


@dataclass(frozen=True)
class BackgroundSpec:
    """A background: `kind` (plain / vertical_gradient / horizontal_gradient) between `colour_a`
    (top or left) and `colour_b` (bottom or right; equal to `colour_a` when plain), plus uniform
    per-pixel noise of amplitude `noise` (0 = none) drawn from `noise_key`."""

    kind: str
    colour_a: tuple[int, int, int]
    colour_b: tuple[int, int, int]
    noise: int
    noise_key: tuple[int, ...]


def _segment_min_distance(colour_a: np.ndarray, colour_b: np.ndarray) -> np.ndarray:
    """For (N, 3) segment endpoints, the smallest distance from any of 17 evenly spaced points on
    each segment to any ink colour, minus half the sampling step (a lower bound on the true minimum
    along the whole segment, since distance to a point is 1-Lipschitz). Plain colours (a == b) are
    checked at one point."""
    if np.array_equal(colour_a, colour_b):
        squared = ((colour_a[:, None, :] - _INK_COLOURS[None, :, :]) ** 2).sum(axis=2)
        return np.sqrt(squared.min(axis=1))
    steps = np.linspace(0.0, 1.0, 17)[None, :, None]
    segment = colour_a[:, None, :] * (1.0 - steps) + colour_b[:, None, :] * steps  # (N, 17, 3)
    squared = ((segment[:, :, None, :] - _INK_COLOURS[None, None, :, :]) ** 2).sum(axis=3)
    half_step = np.sqrt(((colour_b - colour_a) ** 2).sum(axis=1)) / 32.0
    return np.sqrt(squared.min(axis=(1, 2))) - half_step


def _required_distance(noise: int) -> float:
    """Clearance a background colour needs before noise (at most `noise` per channel, i.e.
    noise * sqrt(3) in RGB) and rounding to integers (at most sqrt(3) / 2, taken as 1) are added."""
    return BACKGROUND_MIN_DISTANCE + noise * math.sqrt(3.0) + 1.0


def background_is_safe(colour_a: Sequence[int], colour_b: Sequence[int], noise: int) -> bool:
    """True when every colour on the segment a..b, moved by up to `noise` per channel and rounded to
    integers, stays at least `BACKGROUND_MIN_DISTANCE` from every object colour and stripe shade."""
    bound = _segment_min_distance(np.asarray([colour_a], dtype=np.float64), np.asarray([colour_b], dtype=np.float64))
    return bool(bound[0] >= _required_distance(noise))


SAFE_FALLBACK_BACKGROUND = (60, 200, 170)
"""A mint green used if sampling a safe background fails (checked safe at import, noise included)."""
if not background_is_safe(SAFE_FALLBACK_BACKGROUND, SAFE_FALLBACK_BACKGROUND, 12):
    raise AssertionError("SAFE_FALLBACK_BACKGROUND is too close to an object colour")

BACKGROUND_CANDIDATES = 64
"""Background colour pairs drawn at once; the first safe one is used."""


def sample_background(rng: np.random.Generator, noise_key: tuple[int, ...]) -> BackgroundSpec:
    """Draw a background (world.md "Scenes": plain tints, gradients, light noise) from `rng`.

    Rejection sampling with a bounded number of candidates keeps it deterministic and cheap: 64
    candidate colours (and gradient partners, up to 70 per channel away) are drawn at once and the
    first whose whole segment, widened by the noise amplitude, is safe (`background_is_safe`) is
    used; if none is (rare), the fixed teal fallback is.
    """
    kind = BACKGROUND_KINDS[int(rng.integers(len(BACKGROUND_KINDS)))]
    noise = int(rng.integers(5, 13)) if rng.random() < 0.35 else 0
    colour_a = rng.integers(20, 236, size=(BACKGROUND_CANDIDATES, 3)).astype(np.float64)
    if kind == "plain":
        colour_b = colour_a
    else:
        colour_b = np.clip(colour_a + rng.integers(-70, 71, size=(BACKGROUND_CANDIDATES, 3)), 0, 255)
    required = _required_distance(noise)
    for start in range(0, BACKGROUND_CANDIDATES, 8):  # checked in chunks: most scenes stop at the first
        chunk = slice(start, start + 8)
        safe = np.flatnonzero(_segment_min_distance(colour_a[chunk], colour_b[chunk]) >= required)
        if safe.size:
            first = start + int(safe[0])
            a = tuple(int(c) for c in colour_a[first])
            b = tuple(int(c) for c in colour_b[first])
            return BackgroundSpec(kind, a, b, noise, noise_key)  # type: ignore[arg-type]
    return BackgroundSpec("plain", SAFE_FALLBACK_BACKGROUND, SAFE_FALLBACK_BACKGROUND, noise, noise_key)


def render_background(spec: BackgroundSpec, image_size: int) -> np.ndarray:
    """The background alone as a uint8 (image_size, image_size, 3) array (pure function of `spec`)."""
    a = np.asarray(spec.colour_a, dtype=np.float32)
    b = np.asarray(spec.colour_b, dtype=np.float32)
    if spec.kind == "plain":
        line = np.rint(a)[None, :].repeat(image_size, axis=0)
    elif spec.kind in ("vertical_gradient", "horizontal_gradient"):
        ramp = np.linspace(0.0, 1.0, image_size, dtype=np.float32)[:, None]
        line = np.rint(a[None, :] * (1.0 - ramp) + b[None, :] * ramp)  # (S, 3), one colour per row/column
    else:
        raise ValueError(f"unknown background kind {spec.kind!r}; expected one of {BACKGROUND_KINDS}")
    line = line.astype(np.uint8)
    if spec.kind == "horizontal_gradient":
        image = np.broadcast_to(line[None, :, :], (image_size, image_size, 3))
    else:
        image = np.broadcast_to(line[:, None, :], (image_size, image_size, 3))
    if not spec.noise:
        return image.copy()
    noise_rng = np.random.default_rng(list(spec.noise_key))
    noise = noise_rng.integers(-spec.noise, spec.noise + 1, size=(image_size, image_size, 1), dtype=np.int16)
    return np.clip(image.astype(np.int16) + noise, 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Scenes
# ---------------------------------------------------------------------------------------------


def render_scene(scene: SceneLike, return_masks: bool = False) -> np.ndarray | tuple[np.ndarray, list[np.ndarray]]:
    """Render a scene graph to a uint8 (H, W, 3) image.

    With `return_masks=True` also return one full-size boolean (H, W) mask per object (the exact
    pixels painted for it), so callers and tests can check that each box encloses exactly its mask.
    """
    size = scene.image_size
    image = render_background(scene.background, size)
    full_masks: list[np.ndarray] = []
    for obj, placed in zip(scene.objects, scene.masks):
        local = placed.mask
        height, width = local.shape
        region = image[placed.y: placed.y + height, placed.x: placed.x + width]
        rgb = np.asarray(COLOURS_BY_NAME[obj.colour], dtype=np.uint8)
        if obj.style == "striped":
            period = max(2, round(max(width, height) / STRIPE_PERIODS))
            rows, cols = np.indices(local.shape)
            dark = ((rows + cols) // max(1, period // 2)) % 2 == 1
            region[local & ~dark] = rgb
            region[local & dark] = np.asarray(stripe_rgb(COLOURS_BY_NAME[obj.colour]), dtype=np.uint8)
        else:
            region[local] = rgb
        if return_masks:
            full = np.zeros((size, size), dtype=bool)
            full[placed.y: placed.y + height, placed.x: placed.x + width] = local
            full_masks.append(full)
    if return_masks:
        return image, full_masks
    return image


COLOURS_BY_NAME: dict[str, tuple[int, int, int]] = {c.name: c.rgb for c in COLOURS}

# ---------------------------------------------------------------------------------------------
# Browsing grid (world.md "Browsing")
# ---------------------------------------------------------------------------------------------

GRID_PAD = 4
GRID_MIN_CELL_WIDTH = 192
GRID_CAPTIONS_SHOWN = 3


def grid_cell_width(image_size: int, scale: int) -> int:
    """Width of one grid cell: the upscaled image (or `GRID_MIN_CELL_WIDTH` if wider, to fit text)
    plus `GRID_PAD` on both sides. The PNG is `cols * grid_cell_width(...)` wide."""
    return max(image_size * scale, GRID_MIN_CELL_WIDTH) + 2 * GRID_PAD


def _grid_font() -> tuple[ImageFont.ImageFont, int, float]:
    """Pillow's default font, its line height and mean character width (for wrapping captions)."""
    font = ImageFont.load_default()
    bottom = font.getbbox("Ag")[3]
    return font, int(bottom) + 2, max(1.0, font.getlength("abcdefghijklmnopqrstuvwxyz") / 26.0)


Lines = list[tuple[str, tuple[int, int, int]]]


def _write_grid(
    cell_lines: Sequence[Lines],
    cols: int,
    cell_width: int,
    picture_height: int,
    font: ImageFont.ImageFont,
    line_height: int,
    draw_pictures: Callable[[int, Image.Image, ImageDraw.ImageDraw, int, int], None],
    path: str | Path,
) -> Path:
    """Lay `len(cell_lines)` cells out row-major in `min(cols, n)` columns and write the PNG.

    Each cell is `cell_width` wide; `draw_pictures(k, sheet, draw, x, y)` draws cell k's pictures (and
    boxes) with their top-left at (x, y) inside a `picture_height` band, then cell k's coloured text
    lines follow below it. Height = rows x the tallest cell. Returns the path written.
    """
    cell_height = GRID_PAD + picture_height + GRID_PAD + line_height * max(len(lines) for lines in cell_lines) + GRID_PAD
    columns = min(cols, len(cell_lines))
    rows = math.ceil(len(cell_lines) / columns)
    sheet = Image.new("RGB", (columns * cell_width, rows * cell_height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for k, lines in enumerate(cell_lines):
        origin_x = (k % columns) * cell_width + GRID_PAD
        origin_y = (k // columns) * cell_height + GRID_PAD
        draw_pictures(k, sheet, draw, origin_x, origin_y)
        text_y = origin_y + picture_height + GRID_PAD
        for line, colour in lines:
            draw.text((origin_x, text_y), line, fill=colour, font=font)
            text_y += line_height
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path, format="PNG")
    return path


def render_grid(
    samples: Sequence[Any],  # vlp.data.world.WorldSample
    path: str | Path,
    cols: int = 4,
    scale: int = 2,
    show_boxes: bool = True,
    extra_text: list[str] | None = None,
) -> Path:
    """Write one PNG showing `samples` in a grid so a person can see what the model sees.

    Each cell holds the image upscaled by `scale` (nearest neighbour), optionally each object's box
    and class name, then up to three captions and the first hard negative (prefixed "NEG:"), wrapped
    to the cell width, then `extra_text[k]` for sample k (e.g. task labels). Width is
    `min(cols, len(samples)) * grid_cell_width(image_size, scale)`; height is rows times the tallest
    cell. Returns the path written.
    """
    if not samples:
        raise ValueError("render_grid needs at least one sample")
    if cols < 1 or scale < 1:
        raise ValueError(f"cols and scale must be >= 1, got cols={cols}, scale={scale}")
    if extra_text is not None and len(extra_text) != len(samples):
        raise ValueError(f"extra_text must have one string per sample: {len(extra_text)} for {len(samples)} samples")
    for sample in samples:
        if sample.image is None:
            raise ValueError(
                f"sample {sample.split}[{sample.index}] has no image (the unpaired_text split is text-only); "
                "render samples from an image split"
            )
    sizes = {sample.image.shape[0] for sample in samples}
    if len(sizes) != 1:
        raise ValueError(f"all samples must share one image size to share a grid, got sizes {sorted(sizes)}")
    image_size = sizes.pop()
    font, line_height, char_width = _grid_font()
    cell_width = grid_cell_width(image_size, scale)
    wrap_chars = max(8, int((cell_width - 2 * GRID_PAD) / char_width))

    black, red, blue = (0, 0, 0), (180, 0, 0), (0, 0, 160)

    def cell_lines(k: int) -> list[tuple[str, tuple[int, int, int]]]:
        sample = samples[k]
        lines: list[tuple[str, tuple[int, int, int]]] = []
        for caption in sample.captions[:GRID_CAPTIONS_SHOWN]:
            wrapped = textwrap.wrap(caption, wrap_chars, initial_indent="- ", subsequent_indent="  ")
            lines += [(line, black) for line in wrapped]
        if sample.hard_pairs:
            wrapped = textwrap.wrap("NEG: " + sample.hard_pairs[0][1], wrap_chars, subsequent_indent="  ")
            lines += [(line, red) for line in wrapped]
        if extra_text is not None and extra_text[k]:
            for paragraph in extra_text[k].split("\n"):
                lines += [(line, blue) for line in textwrap.wrap(paragraph, wrap_chars) or [""]]
        return lines

    shown_size = image_size * scale

    def draw_pictures(k: int, sheet: Image.Image, draw: ImageDraw.ImageDraw, origin_x: int, origin_y: int) -> None:
        sample = samples[k]
        picture = Image.fromarray(sample.image).resize((shown_size, shown_size), Image.Resampling.NEAREST)
        sheet.paste(picture, (origin_x, origin_y))
        if show_boxes:
            for obj in sample.objects:
                x1, y1, x2, y2 = obj.box
                rectangle = [origin_x + x1 * scale, origin_y + y1 * scale,
                             origin_x + x2 * scale - 1, origin_y + y2 * scale - 1]
                draw.rectangle(rectangle, outline=(255, 0, 255), width=1)
                draw.text((rectangle[0] + 1, rectangle[1] + 1), obj.class_name, fill=(255, 0, 255), font=font)

    return _write_grid([cell_lines(k) for k in range(len(samples))], cols, cell_width, shown_size, font,
                       line_height, draw_pictures, path)


# ---------------------------------------------------------------------------------------------
# Task browsing grid (world.md "Browsing": samples with their task labels)
# ---------------------------------------------------------------------------------------------

TASK_TARGET_RGB = (0, 200, 0)
TASK_DISTRACTOR_RGB = (230, 0, 0)
TASK_PROPOSAL_RGB = (0, 150, 255)
_VE_LABEL_RGB = {"entailment": (0, 130, 0), "neutral": (90, 90, 90), "contradiction": (190, 0, 0)}


def _dashed_rectangle(draw: ImageDraw.ImageDraw, box: Sequence[float], fill: tuple[int, int, int], dash: int = 3) -> None:
    """A one-pixel rectangle outline drawn as dashes of `dash` pixels (Pillow has no dashed lines)."""
    x1, y1, x2, y2 = (int(round(v)) for v in box)
    for start, end, fixed, horizontal in ((x1, x2, y1, True), (x1, x2, y2, True), (y1, y2, x1, False), (y1, y2, x2, False)):
        for a in range(start, end + 1, 2 * dash):
            b = min(a + dash - 1, end)
            draw.line([(a, fixed), (b, fixed)] if horizontal else [(fixed, a), (fixed, b)], fill=fill, width=1)


def render_task_grid(task: str, records: Sequence, images, path: str | Path, cols: int = 4, scale: int = 3) -> Path:
    """Write a PNG grid of downstream-task records of the world with their labels (world.md "Browsing").

    `records` are `vlp.data.records` records of one task ("ve", "rec", "vqa", "nlvr2"); `images` an
    `ImageSource` resolving their image ids. Each cell shows the image (NLVR2: left and right side by
    side) upscaled by `scale`, then the text and label: VE hypothesis + label (green entailment, grey
    neutral, red contradiction); REC expression, the target box in green, the other candidate boxes in
    red and the proposals dashed in blue; VQA question, majority answer and the ten answers counted;
    NLVR2 statement + True/False. Returns the path written.
    """
    if task not in ("ve", "rec", "vqa", "nlvr2"):
        raise ValueError(f"unknown task {task!r}; expected one of ('ve', 'rec', 'vqa', 'nlvr2')")
    if not records:
        raise ValueError("render_task_grid needs at least one record")
    if cols < 1 or scale < 1:
        raise ValueError(f"cols and scale must be >= 1, got cols={cols}, scale={scale}")
    font, line_height, char_width = _grid_font()
    black = (0, 0, 0)

    def pictures(record) -> list[Image.Image]:
        ids = [record.left_image_id, record.right_image_id] if task == "nlvr2" else [record.image_id]
        return [images.load(i) for i in ids]

    loaded = [pictures(r) for r in records]
    image_size = loaded[0][0].size[0]
    shown = image_size * scale
    picture_width = len(loaded[0]) * shown + (len(loaded[0]) - 1) * GRID_PAD
    cell_width = max(picture_width, GRID_MIN_CELL_WIDTH) + 2 * GRID_PAD
    wrap_chars = max(8, int((cell_width - 2 * GRID_PAD) / char_width))

    def cell_lines(record) -> list[tuple[str, tuple[int, int, int]]]:
        if task == "ve":
            text, label = record.hypothesis, VE_LABELS[record.label]
            tail = [(f"label: {label}", _VE_LABEL_RGB[label])]
        elif task == "rec":
            text = record.expression
            tail = [(f"{len(record.candidates)} objects, {len(record.proposals)} proposals", (90, 90, 90))]
        elif task == "vqa":
            counts: dict[str, int] = {}
            for answer in record.answers:
                counts[answer] = counts.get(answer, 0) + 1
            ranked = sorted(counts.items(), key=lambda item: -item[1])
            text = "Q: " + record.question
            tail = [(f"A: {ranked[0][0]} ({record.answer_type})", (0, 0, 160))]
            tail += [(line, (90, 90, 90)) for line in textwrap.wrap(", ".join(f"{a} x{n}" for a, n in ranked), wrap_chars)]
        else:
            text = record.statement
            tail = [(f"label: {record.label}", (0, 130, 0) if record.label else (190, 0, 0))]
        return [(line, black) for line in textwrap.wrap(text, wrap_chars)] + tail

    def draw_pictures(k: int, sheet: Image.Image, draw: ImageDraw.ImageDraw, origin_x: int, origin_y: int) -> None:
        record = records[k]
        for j, picture in enumerate(loaded[k]):
            sheet.paste(picture.resize((shown, shown), Image.Resampling.NEAREST), (origin_x + j * (shown + GRID_PAD), origin_y))
        if task == "rec":
            def to_pixels(box: Sequence[float]) -> list[float]:
                return [origin_x + box[0] * shown, origin_y + box[1] * shown, origin_x + box[2] * shown - 1, origin_y + box[3] * shown - 1]

            for proposal in record.proposals:
                _dashed_rectangle(draw, to_pixels(proposal), TASK_PROPOSAL_RGB)
            for index, box in enumerate(record.candidates):
                if index != record.target_index:
                    draw.rectangle(to_pixels(box), outline=TASK_DISTRACTOR_RGB, width=1)
            draw.rectangle(to_pixels(record.target_box), outline=TASK_TARGET_RGB, width=2)

    return _write_grid([cell_lines(r) for r in records], cols, cell_width, shown, font, line_height, draw_pictures, path)
