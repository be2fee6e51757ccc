"""CMAL's inspection figure (`vlp show cmal`): what the associative prompt puts where, for one sample.

The view is computed on the training code path (`Cmal.regions`, `anchors`, `mask` and the real
`swap_fill`, cmal.md §5) and drawn from plain data (`CmalPromptView`). The method class points here
(`Cmal.figure`); `vlp show METHOD` imports this module and calls `show`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from vlp.build import build_tokenizer, class_words_for, load_checkpoint_model
from vlp.config import RunConfig, load_config
from vlp.data import lexicon
from vlp.data.tokenizer import TextTokenizer
from vlp.data.world import WorldSplit
from vlp.figures.common import sample_batch, sample_key, world_sample, wrap_columns
from vlp.methods import build_method
from vlp.methods.cmal import Cmal, swap_fill
from vlp.models.losses import IGNORE_INDEX
from vlp.models.model import VLModel
from vlp.viz import wrap_to_width

# ------------------------------------------------------------------------------ CMAL prompt figure
CMAL_SHOW_IMAGE_PX = 256  # the image is shown upscaled (nearest) to this side


CMAL_SHOW_CAPTIONS = 5  # captions per image in PairDataset (training row = index * 5 + caption)


def build_cmal_show(
    config: str | Path | RunConfig, checkpoint: str | Path | None, overrides: list[str] | None, split: str,
    index: int, caption: int,
) -> tuple[RunConfig, TextTokenizer, Cmal, WorldSplit]:
    """(config, tokenizer, `Cmal` method, world split) exactly as training builds them: from a config
    (the tokenizer is re-trained on the world, as `pretrain` does) or from a checkpoint (config +
    tokenizer + model weights; the method's own heads stay untrained: anchors, masking and the swap do
    not depend on weights). `split` / `index` / `caption` are checked before the tokenizer is built."""
    if checkpoint is not None:
        cfg, tokenizer, model = load_checkpoint_model(checkpoint, overrides)
    else:
        cfg = config if isinstance(config, RunConfig) else load_config(config, overrides)
        tokenizer, model = None, None
    world, data = world_sample(cfg, Cmal, "vlp show cmal", checkpoint if checkpoint is not None else config, split, index,
                               caption, CMAL_SHOW_CAPTIONS)
    if tokenizer is None:
        tokenizer = build_tokenizer(cfg, world)
        torch.manual_seed(cfg.train.seed)
        model = VLModel(cfg.model, vocab_size=tokenizer.vocab_size, pad_id=tokenizer.pad_id)
    method = build_method(cfg, model, tokenizer, class_words=class_words_for(cfg))
    return cfg, tokenizer, method.eval(), data


cmal_sample_key = sample_key  # the name this figure's callers know


@torch.no_grad()
def cmal_prompt_view(
    method: Cmal, tokenizer: TextTokenizer, data: WorldSplit, index: int, caption: int = 0, seed: int = 0,
    max_len: int = 40, title: str = "",
) -> CmalPromptView:
    """What CMAL's associative prompt puts where for caption `caption` of `data[index]`, as plain data
    (`vlp.viz.CmalPromptView`), computed with the training code path.

    The sample goes through `PairDataset` + `collate` (row = index * 5 + caption, the row it has in
    training), gets the sample key `cmal_sample_key(row, seed)`, then `method.regions`, `method.anchors`
    and `method.mask` give the partners π and the masking, and `swap_fill` itself is run on index-coded
    vectors (text slot t holds t + 1, region slot i holds -(i + 1)) so the region content after the swap,
    "last pointing token wins" included, is read from what `swap_fill` returns, not re-derived here.
    ValueError for an index / caption outside the split; RuntimeError if the tensors disagree (a bug).
    """
    if not (0 <= index < len(data) and 0 <= caption < CMAL_SHOW_CAPTIONS):
        raise ValueError(f"sample {index} caption {caption} is outside the {len(data)}-image split "
                         f"({CMAL_SHOW_CAPTIONS} captions per image)")
    device = next(method.parameters()).device
    batch, row = sample_batch(data, tokenizer, index, caption, seed, max_len, CMAL_SHOW_CAPTIONS, device)
    key = int(batch.sample_keys[0])
    regions = method.regions(batch)
    pairs = method.anchors(batch, regions)
    partner, masking = method.mask(batch, regions, pairs)
    T, N = batch.input_ids.shape[1], regions.labels.shape[1]
    word_code = torch.arange(1, T + 1, dtype=torch.float64, device=device)[None, :, None]
    region_code = -torch.arange(1, N + 1, dtype=torch.float64, device=device)[None, :, None]
    hybrid_word, hybrid_region = swap_fill(word_code, region_code, partner, masking.region_masked)
    hybrid_word, hybrid_region = hybrid_word[0, :, 0].long().tolist(), hybrid_region[0, :, 0].long().tolist()

    sample = data[index]
    offset = 1 if method.cfg.whole_image_region else 0
    ids, masked_ids = batch.input_ids[0].tolist(), masking.masked_ids[0].tolist()
    labels_txt, special = masking.txt_labels[0].tolist(), {int(i) for i in tokenizer.special_ids}
    pi, matches = partner[0].tolist(), pairs[0]
    piece = tokenizer.backend.id_to_token

    def region_name(i: int) -> str:
        label = int(regions.labels[0, i])
        if label == 0:
            return "whole image" if offset and i == 0 else "background"
        obj = sample.objects[i - offset]
        class_name = lexicon.CLASSES[label - 1].name
        if obj.class_id != label - 1:
            raise RuntimeError(f"region {i} has label {class_name} but object {i - offset} is a {obj.class_name}")
        return f"{obj.colour} {class_name}"

    names = [region_name(i) for i in range(N)]
    tokens = []
    for t in range(T):
        if not batch.attention_mask[0, t]:
            continue
        content = hybrid_word[t]
        if content < 0:  # the slot holds a region's visual vector
            kind, after = "anchor", f"⟨R{-content - 1} {names[-content - 1]}⟩"
        elif ids[t] in special:
            kind, after = "special", piece(ids[t])
        elif labels_txt[t] != IGNORE_INDEX:
            new = masked_ids[t]
            kind = "mlm_mask" if new == tokenizer.mask_id else ("mlm_kept" if new == ids[t] else "mlm_random")
            after = piece(new)
        else:
            kind, after = "plain", piece(ids[t])
        tokens.append(CmalPromptToken(
            position=t, piece=piece(ids[t]), kind=kind, after=after, partner=int(pi[t]),
            matches=tuple(int(i) for i in matches[t].nonzero().flatten().tolist())))
    region_views = []
    for i in range(N):
        if not regions.mask[0, i]:
            continue
        content = hybrid_region[i]
        if content > 0:
            status, after = "anchor", f"word '{piece(ids[content - 1])}'"
        elif content == 0:
            status, after = "masked", "0 (masked)"
        else:
            status, after = "plain", "visual"
        if status == "anchor" and not bool(masking.region_swapped[0, i]):
            raise RuntimeError(f"swap_fill filled region {i} with a word but anchor_mask did not mark it swapped")
        if status == "masked" and not bool(masking.region_masked[0, i]):
            raise RuntimeError(f"swap_fill zeroed region {i} but anchor_mask did not mark it masked")
        x1, y1, x2, y2 = (float(v) for v in regions.boxes[0, i, :4].tolist())
        region_views.append(CmalPromptRegion(
            index=i, box=(x1, y1, x2, y2), name=names[i], status=status, after=after,
            filled_from=content - 1 if content > 0 else -1,
            pointing=tuple(t for t in range(T) if pi[t] == i)))
    cfg = method.cfg
    anchors = sum(1 for t in tokens if t.kind == "anchor")
    notes = (
        f"Sample key {key} = the key the trainer gives row {row} ({len(data)}-image split, caption {caption}) in "
        f"epoch 0 of a run with train.seed = {seed}; partners and masks are a pure function of it.",
        f"{anchors} anchor token(s): each names an object class of some region; its slot holds the visual vector "
        f"e^v of its partner region π(t) (uniform among the regions it names) and its label is the original word. "
        f"Other tokens: {cfg.mlm_prob * 100:g} % MLM (80 % [MASK], 10 % random, 10 % kept). Regions: partners get the word "
        f"vector of the LAST token pointing to them (quirk 3); {cfg.region_mask_prob * 100:g} % of the other labelled "
        f"regions are masked (vector 0).",
        "Positions and boxes are NOT swapped: a text slot keeps its own position + type-0 embedding and a region "
        "slot its own box + type-1 embedding; only the content vectors move (cmal.md §5).",
    )
    return CmalPromptView(image=sample.image, caption=sample.captions[caption], tokens=tuple(tokens),
                          regions=tuple(region_views), title=title, notes=notes)


def show(
    out: str | Path, config: str | Path | RunConfig = "cmal_tiny", checkpoint: str | Path | None = None,
    split: str = "train", index: int = 0, seed: int = 0, overrides: list[str] | None = None, caption: int = 0,
) -> Path:
    """Write a PNG of what CMAL's associative prompt puts where for caption `caption` of sample `index`
    of `split` (anchors, partner regions, masked tokens and regions, region slots after the swap).

    The method is built from `config` (default `cmal_tiny`) or from a checkpoint directory (its config +
    tokenizer); `seed` picks the sample key (`cmal_sample_key`), so different seeds show different masks.
    ValueError for a non-CMAL config or an out-of-range index / caption. Returns the path written.
    """
    cfg, tokenizer, method, data = build_cmal_show(config, checkpoint, overrides, split, index, caption)
    source = f"checkpoint {checkpoint}" if checkpoint is not None else (
        "config" if isinstance(config, RunConfig) else str(config))
    title = f"CMAL associative prompt · {source} · {split}[{index}] caption {caption} · seed {seed}"
    view = cmal_prompt_view(method, tokenizer, data, index, caption, seed, cfg.data.max_text_len, title)
    out = Path(out)
    plot_cmal_prompt(view, out, image_px=CMAL_SHOW_IMAGE_PX)
    return out



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
    bands = wrap_columns(columns, label_w, content_w)
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

    notes = [line for note in view.notes for line in wrap_to_width(note, small, content_w)]
    caption_lines = wrap_to_width(f"caption: {view.caption}", body, content_w)
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
        wrapped = wrap_to_width(detail, small, table_w - 20)
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
