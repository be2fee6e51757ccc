"""SIMLA's inspection figure (`vlp show simla`): what XMM masks and reconstructs and what PSL picks, for one sample.

For one (image, caption) pair of a world split, with the sample key the trainer gives its row:
  * MIM: the BEiT block mask (`Simla.mim_mask`), the visual-token targets (`visual_tokenizer.encode`, drawn
    with `decode` so the k-means codes can be seen) and what the MIM head predicts at the masked patches
    (argmax of `heads.mim_head` on the image-as-query pass `Simla._image_queries`), with the sample's MIM
    accuracy;
  * MLM: the 80/10/10 text masking (`Simla.mask`) and, at each masked position, the top-1 word of
    `model.mlm_logits` on the multimodal pass (the masked caption attending to the unmasked image) and its
    probability against the truth's;
  * PSL: the momentum encoder's last-layer [CLS] self-attention over the caption (mean over heads, the
    signal `psl_targets` ranks), the keywords `Simla.keyword_targets` selects, and the concept head's top-5
    words (sigmoid) from the online image embedding.

Everything is computed on the training code path (the method's own functions, in eval mode: no dropout)
into plain data (`SimlaXmmView`) and drawn with PIL (`plot_simla_xmm`). The method class points here
(`Simla.figure`); `vlp show METHOD` imports this module and calls `show`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor

from vlp.build import build_run_method, build_tokenizer, class_words_for
from vlp.config import RunConfig
from vlp.data.datasets import PairDataset, distinct_images
from vlp.data.tokenizer import TextTokenizer
from vlp.data.transforms import tensor_to_image
from vlp.data.world import WorldSplit
from vlp.figures.common import figure_config, sample_batch, sample_key, world_sample, wrap_columns
from vlp.figures.cmal_prompt import _cmal_fonts, _hatch, _tint
from vlp.methods import build_method
from vlp.methods.simla import Simla, psl_targets
from vlp.models.losses import IGNORE_INDEX
from vlp.models.model import VLModel
from vlp.train.checkpoint import CheckpointError, load_model_weights
from vlp.viz import wrap_to_width

SIMLA_SHOW_IMAGE_PX = 256  # each image panel is shown upscaled (nearest) to this side
SIMLA_SHOW_CAPTIONS = 5  # captions per image in PairDataset (training row = index * 5 + caption)
SIMLA_TOKEN_KINDS = ("special", "mlm_mask", "mlm_random", "mlm_kept", "plain")
SIMLA_CONCEPTS = 5  # concept-head words shown


# ------------------------------------------------------------------------------ building the method
def _fit_visual_tokenizer(method: Simla, cfg: RunConfig, tokenizer: TextTokenizer, world: Any) -> int:
    """Fit the visual tokenizer as pre-training does before step 0 (`Trainer._prepare_method`): k-means on
    the first `method.tokenizer_images` distinct images of the training dataset (the train split cut to
    `data.budget`). Returns the number of images used."""
    dataset = PairDataset(world.split("train"), tokenizer, cfg.data.max_text_len, cfg.data.budget,
                          max_words=cfg.data.max_text_len)
    count = method.images_to_prepare() or method.cfg.tokenizer_images  # MIM off: still fit, for the figure
    images = distinct_images(dataset, count)
    method.prepare(images)
    return int(images.shape[0])


def build_simla_show(
    config: str | Path | RunConfig, checkpoint: str | Path | None, overrides: list[str] | None, split: str,
    index: int, caption: int,
) -> tuple[RunConfig, TextTokenizer, Simla, WorldSplit, str]:
    """(config, tokenizer, `Simla` method in eval mode, world split, where the visual tokenizer comes from)
    exactly as training builds them.

    From a config: the text tokenizer is re-trained on the world and the model initialised with
    `train.seed`, as `pretrain` does; the visual tokenizer is fitted on the training images as the trainer
    does before step 0 (unless `method.visual_tokenizer` names a fitted file), so
    `method.tokenizer_images=200` makes it fast. From a checkpoint: config + tokenizer + the FULL method
    state (model, heads, momentum copies, the fitted visual tokenizer); a checkpoint that holds no fitted
    visual tokenizer (a run with MIM off, or one saved without it) gets one fitted as above, and the
    returned source says so. `split` / `index` / `caption` are checked before anything heavy is built.
    ValueError for a non-SIMLA config or an out-of-range split / index / caption."""
    cfg, path = figure_config(config, checkpoint, overrides)
    world, data = world_sample(cfg, Simla, "vlp show simla", checkpoint if checkpoint is not None else config, split, index,
                               caption, SIMLA_SHOW_CAPTIONS)
    if path is not None:
        tokenizer = TextTokenizer.load(path / "tokenizer.json")
        # the checkpoint carries the fitted codebook: do not read the config's tokenizer file (it may not be here)
        named = cfg.method.visual_tokenizer
        method = build_run_method(cfg.model_copy(update={"method": cfg.method.model_copy(
            update={"visual_tokenizer": None})}), tokenizer)
        missing, unexpected = load_model_weights(path, method, strict=False)
        others = [k for k in missing if not k.startswith("visual_tokenizer.")]
        if others or unexpected:  # only the visual tokenizer may be absent: anything else is the wrong file
            parts = ([f"missing: {', '.join(others[:8])}"] if others else []) + \
                    ([f"not in SIMLA: {', '.join(unexpected[:8])}"] if unexpected else [])
            raise CheckpointError(f"checkpoint {path} does not hold a SIMLA method of its config "
                                  f"({'; '.join(parts)})")
        if method.visual_tokenizer.is_fitted:
            source = "loaded from the checkpoint"
        elif named and Path(named).is_file():
            method.visual_tokenizer.load(named)
            source = f"NOT in the checkpoint: loaded from {named} (the config's method.visual_tokenizer)"
        else:
            used = _fit_visual_tokenizer(method, cfg, tokenizer, world)
            source = (f"NOT in the checkpoint: fitted here on the first {used} distinct training images, as "
                      f"pre-training does before step 0 (the run's own codes may differ)")
    else:
        tokenizer = build_tokenizer(cfg, world)
        torch.manual_seed(cfg.train.seed)
        model = VLModel(cfg.model, vocab_size=tokenizer.vocab_size, pad_id=tokenizer.pad_id)
        method = build_method(cfg, model, tokenizer, class_words=class_words_for(cfg))
        if method.visual_tokenizer.is_fitted:
            source = f"loaded from {cfg.method.visual_tokenizer}"
        else:
            used = _fit_visual_tokenizer(method, cfg, tokenizer, world)
            source = f"fitted on the first {used} distinct training images, as pre-training does before step 0"
    return cfg, tokenizer, method.eval(), data, source


# ------------------------------------------------------------------------------ the view (plain data)
@dataclass(frozen=True)
class SimlaToken:
    """One text position of the caption.

    position: index t in the encoder's text sequence ([CLS] is 0).
    piece: the original word piece (decoded `input_ids[t]`); token_id its id.
    kind: one of `SIMLA_TOKEN_KINDS`: special ([CLS]/[SEP], never masked), mlm_mask / mlm_random / mlm_kept
        (BERT 80/10/10 on the MLM-selected positions: `Simla.mask`), plain (not predicted).
    shown: the piece the MLM pass sees at t ("[MASK]", a random piece, or the original).
    attention: the momentum encoder's last-layer [CLS] self-attention on t, mean over heads (PSL's signal).
    keyword: `psl_targets` picked this position as a keyword (its id is a PSL target).
    prediction / prediction_prob: MLM top-1 piece and its softmax probability (masked positions only).
    truth_prob: the probability the MLM head gives the original piece (masked positions only).
    """

    position: int
    token_id: int
    piece: str
    kind: str
    shown: str
    attention: float
    keyword: bool = False
    prediction: str = ""
    prediction_id: int = -1
    prediction_prob: float = 0.0
    truth_prob: float = 0.0

    @property
    def masked(self) -> bool:
        return self.kind in ("mlm_mask", "mlm_random", "mlm_kept")


@dataclass(frozen=True)
class SimlaXmmView:
    """Everything `plot_simla_xmm` draws, for one sample.

    image: (H, W, 3) uint8, what the ViT sees. targets_image: the visual-token targets drawn with
    `visual_tokenizer.decode(encode(image))`. reconstruction_image: the MIM head's argmax codes decoded at
    the masked patches, the targets elsewhere.
    grid: patches per side (P = grid ** 2, row-major, the ViT's order). patch_mask: (P,) MIM block mask
    (`Simla.mim_mask`). target_codes: (P,) codes. predicted_codes: (P,) the MIM head's argmax at masked
    patches, -1 elsewhere. mim_accuracy: share of masked patches predicted right.
    tokens: the caption's real positions. mlm_accuracy: share of MLM positions whose top-1 is the truth.
    keyword_ids / keywords: the PSL keyword ids (ascending) and their pieces (`Simla.keyword_targets`).
    keyword_positions: the caption positions `psl_targets` picked (ascending; their ids are keyword_ids).
    concepts: the concept head's top-5 (piece, token id, sigmoid probability), most probable first.
    """

    image: np.ndarray
    targets_image: np.ndarray
    reconstruction_image: np.ndarray
    grid: int
    patch_mask: tuple[bool, ...]
    target_codes: tuple[int, ...]
    predicted_codes: tuple[int, ...]
    mim_accuracy: float
    caption: str
    tokens: tuple[SimlaToken, ...]
    mlm_accuracy: float
    keyword_ids: tuple[int, ...]
    keywords: tuple[str, ...]
    keyword_positions: tuple[int, ...]
    concepts: tuple[tuple[str, int, float], ...]
    sample_key: int
    image_vocab: int
    title: str = ""
    notes: tuple[str, ...] = ()

    @property
    def masked_patches(self) -> tuple[int, ...]:
        return tuple(p for p, m in enumerate(self.patch_mask) if m)

    @property
    def mlm_positions(self) -> tuple[int, ...]:
        return tuple(t.position for t in self.tokens if t.masked)


def _keyword_positions(method: Simla, attention: Tensor, ids: Tensor, attn: Tensor) -> tuple[int, ...]:
    """The caption positions `psl_targets` picks as keywords (it returns only their ids): `psl_targets`
    itself run on position-coded input (id of position t = t, vocabulary T), with the specials it would
    exclude by id moved into the attention mask, so the counting and ranking are the library's own."""
    T = ids.shape[1]
    positions = torch.arange(T, device=ids.device)[None].expand_as(ids)
    keep = attn.bool()
    if not method.cfg.faithful_quirks:
        keep = keep & ~torch.isin(ids, method.special_ids.to(ids.device))
    cls_positions = (ids[0] == method.cls_id).nonzero().flatten().tolist()
    chosen = psl_targets(attention, positions, keep.long(), T, method.cfg.psl_keywords_per_head,
                         method.cfg.psl_keywords, faithful=method.cfg.faithful_quirks,
                         cls_id=cls_positions[0] if cls_positions else 0)
    if method.cfg.faithful_quirks:  # the faithful code zeroes the [CLS] id wherever it stands
        chosen[:, cls_positions] = 0.0
    return tuple(int(t) for t in chosen[0].nonzero().flatten().tolist())


@torch.no_grad()
def simla_xmm_view(
    method: Simla, tokenizer: TextTokenizer, data: WorldSplit, index: int, caption: int = 0, seed: int = 0,
    max_len: int = 40, title: str = "", notes: tuple[str, ...] = (),
) -> SimlaXmmView:
    """XMM (MIM + MLM) and PSL of caption `caption` of `data[index]`, as plain data, computed with the
    training code path.

    The sample goes through `PairDataset` + `collate` (row = index * 5 + caption, its training row) and gets
    the sample key `vlp.figures.common.sample_key(row, seed)` (the trainer's, epoch 0); then `Simla.mim_mask`, `Simla.mask`,
    `Simla._image_queries` + `heads.mim_head`, `model.encode_multimodal` + `model.mlm_logits`,
    `model_m.text.cls_attention` and `Simla.keyword_targets` as `Simla.forward` runs them (MIM's context:
    the text-mode states, or the embedding-layer output with `faithful_quirks`). The method should be in
    eval mode (no dropout) and its visual tokenizer fitted. ValueError for an index / caption outside the
    split."""
    if not (0 <= index < len(data) and 0 <= caption < SIMLA_SHOW_CAPTIONS):
        raise ValueError(f"sample {index} caption {caption} is outside the {len(data)}-image split "
                         f"(valid: index 0..{len(data) - 1}, caption 0..{SIMLA_SHOW_CAPTIONS - 1})")
    batch, row = sample_batch(data, tokenizer, index, caption, seed, max_len, SIMLA_SHOW_CAPTIONS,
                              next(method.parameters()).device)
    key = int(batch.sample_keys[0])
    model, images, ids, attn = method.model, batch.images, batch.input_ids, batch.attention_mask
    image_size = images.shape[-1]

    # the passes Simla.forward runs
    image_tokens = model.encode_image(images).tokens
    embeddings = model.text.embed(ids)
    text_hidden = model.text.forward_from_embeddings(embeddings, attn)

    # MIM
    patch_mask = method.mim_mask(batch)  # (1, P)
    targets = method.visual_tokenizer.encode(images)  # (1, P)
    context = embeddings if method.cfg.faithful_quirks else text_hidden
    states = method._image_queries(model, method.heads.mask_token, images, patch_mask, context, attn)
    predicted = method.heads.mim_head(states[patch_mask]).argmax(dim=-1)  # (M,)
    reconstruction = targets.clone()
    reconstruction[patch_mask] = predicted
    predicted_codes = torch.full_like(targets, -1)
    predicted_codes[patch_mask] = predicted
    masked_count = int(patch_mask.sum())
    mim_accuracy = float((predicted == targets[patch_mask]).float().sum()) / max(masked_count, 1)
    decoded = method.visual_tokenizer.decode(torch.cat([targets, reconstruction]), image_size)

    # MLM
    masked_ids, labels = method.mask(batch)
    hidden = model.encode_multimodal(masked_ids, attn, image_tokens).text
    probs = torch.softmax(model.mlm_logits(hidden).float(), dim=-1)[0]  # (T, V)
    top_prob, top_id = probs.max(dim=-1)

    # PSL
    attention_heads = method.model_m.text.cls_attention(method.model_m.text.embed(ids), attn, image_tokens)  # (1, H, T)
    attention = attention_heads.float().mean(dim=1)[0]  # (T,)
    keyword_ids = tuple(int(i) for i in method.keyword_targets(batch, image_tokens)[0].nonzero().flatten().tolist())
    keyword_positions = _keyword_positions(method, attention_heads, ids, attn)
    if sorted({ids[0, t].item() for t in keyword_positions}) != list(keyword_ids):
        raise RuntimeError(f"psl_targets picked positions {keyword_positions} whose ids are not the keyword ids "
                           f"{keyword_ids} of Simla.keyword_targets")
    concept = torch.sigmoid(method.heads.concept_head(model.image_embed(image_tokens)).float())[0]
    concept_probs, concept_ids = concept.topk(min(SIMLA_CONCEPTS, concept.numel()))

    piece = tokenizer.backend.id_to_token
    special = {int(i) for i in tokenizer.special_ids}
    ids_l, masked_l, labels_l = ids[0].tolist(), masked_ids[0].tolist(), labels[0].tolist()
    tokens, right, predicted_tokens = [], 0, 0
    for t in range(ids.shape[1]):
        if not attn[0, t]:
            continue
        token_id = ids_l[t]
        common = dict(position=t, token_id=token_id, piece=piece(token_id), attention=float(attention[t]),
                      keyword=t in keyword_positions)
        if labels_l[t] != IGNORE_INDEX:
            new = masked_l[t]
            kind = "mlm_mask" if new == tokenizer.mask_id else ("mlm_kept" if new == token_id else "mlm_random")
            guess = int(top_id[t])
            right += int(guess == labels_l[t])
            predicted_tokens += 1
            tokens.append(SimlaToken(kind=kind, shown=piece(new), prediction=piece(guess), prediction_id=guess,
                                     prediction_prob=float(top_prob[t]), truth_prob=float(probs[t, labels_l[t]]),
                                     **common))
        else:
            tokens.append(SimlaToken(kind="special" if token_id in special else "plain", shown=piece(token_id),
                                     **common))
    sample = data[index]
    return SimlaXmmView(
        image=tensor_to_image(images[0]), targets_image=tensor_to_image(decoded[0]),
        reconstruction_image=tensor_to_image(decoded[1]), grid=method.visual_tokenizer.grid(image_size),
        patch_mask=tuple(bool(m) for m in patch_mask[0].tolist()), target_codes=tuple(targets[0].tolist()),
        predicted_codes=tuple(predicted_codes[0].tolist()), mim_accuracy=mim_accuracy,
        caption=sample.captions[caption], tokens=tuple(tokens),
        mlm_accuracy=right / max(predicted_tokens, 1), keyword_ids=keyword_ids, keyword_positions=keyword_positions,
        keywords=tuple(piece(i) for i in keyword_ids),
        concepts=tuple((piece(int(i)), int(i), float(p)) for i, p in zip(concept_ids.tolist(), concept_probs.tolist())),
        sample_key=key, image_vocab=method.visual_tokenizer.vocab_size, title=title, notes=tuple(notes))


def show(
    out: str | Path, config: str | Path | RunConfig = "simla_tiny", checkpoint: str | Path | None = None,
    split: str = "train", index: int = 0, seed: int = 0, overrides: list[str] | None = None, caption: int = 0,
) -> Path:
    """Write a PNG of SIMLA's XMM and PSL for caption `caption` of sample `index` of `split`: the MIM block
    mask on the image, the visual-token targets, what MIM reconstructs at the masked patches, the MLM
    masking and predictions, and the PSL attention, keywords and concept-head words.

    The method is built from `config` (default `simla_tiny`; its visual tokenizer fitted as pre-training
    does, `method.tokenizer_images=N` to fit on fewer images) or from a checkpoint directory (its config,
    tokenizer and full method state); `seed` picks the sample key (`cmal_sample_key`), so different seeds
    show different masks. ValueError for a non-SIMLA config or an out-of-range index / caption. Returns the
    path written."""
    cfg, tokenizer, method, data, source = build_simla_show(config, checkpoint, overrides, split, index, caption)
    origin = f"checkpoint {checkpoint}" if checkpoint is not None else (
        "config" if isinstance(config, RunConfig) else str(config))
    title = f"SIMLA XMM + PSL · {origin} · {split}[{index}] caption {caption} · seed {seed}"
    row = index * SIMLA_SHOW_CAPTIONS + caption
    key = sample_key(row, seed)
    mcfg = method.cfg
    notes = [
        f"Sample key {key} = the key the trainer gives row {row} of the {split} split (caption {caption} of image "
        f"{index}) in epoch 0 of a run with train.seed = {seed}; both masks are a pure function of it."
        + (f" (Row {row} lies outside data.budget = {cfg.data.budget}: training never sees this pair.)"
           if split == "train" and row >= cfg.data.budget else ""),
        "Weights: " + (f"the checkpoint's (model, heads, momentum copies); visual tokenizer {source}."
                       if checkpoint is not None else
                       f"UNTRAINED (initialised from the config with train.seed = {cfg.train.seed}): predictions are "
                       f"chance; visual tokenizer {source}."),
        f"MIM: {mcfg.mim_mask_ratio * 100:.0f} % of the patches in BEiT blocks, replaced by the mask token; the masked "
        f"ViT output queries the shared encoder attending to the caption; targets are k-means codes "
        f"({mcfg.image_vocab_size} codes) of the same image at 1/{mcfg.tokenizer_downsample} resolution. "
        f"MLM: {mcfg.mlm_prob * 100:g} % of the words (80 % [MASK], 10 % random, 10 % kept) predicted by the "
        f"masked caption attending to the unmasked image.",
        f"PSL: [CLS] attention = the MOMENTUM encoder's last layer, multimodal mode, mean over heads; keywords = "
        f"per head the top {mcfg.psl_keywords_per_head} positions, then the top {mcfg.psl_keywords} by count"
        + (" (specials excluded)" if not mcfg.faithful_quirks else " (faithful quirks: only [CLS] excluded)")
        + "; the concept head reads the normalised image embedding. Eval mode: no dropout.",
    ]
    view = simla_xmm_view(method, tokenizer, data, index, caption, seed, cfg.data.max_text_len, title, tuple(notes))
    out = Path(out)
    plot_simla_xmm(view, out, image_px=SIMLA_SHOW_IMAGE_PX)
    return out


# ================================================================================ drawing
_BLACK, _GREY, _LIGHT = (0, 0, 0), (110, 110, 110), (225, 225, 225)
_RIGHT, _WRONG = (20, 160, 60), (220, 30, 30)
_ATTENTION_RGB = (240, 120, 0)  # full weight = this colour; 0 = white
_KEYWORD_RGB = (120, 0, 160)


def _mask_outline(draw: ImageDraw.ImageDraw, origin: tuple[int, int], cell: float, mask: np.ndarray) -> None:
    """Outline the union of the masked patches (grid, grid) bool: each patch edge with an unmasked (or
    outside) neighbour, drawn white 3 px under black 1 px so it shows on any colour."""
    grid = mask.shape[0]
    x0, y0 = origin
    edges = []
    for r in range(grid):
        for c in range(grid):
            if not mask[r, c]:
                continue
            left, top = x0 + round(c * cell), y0 + round(r * cell)
            right, bottom = x0 + round((c + 1) * cell) - 1, y0 + round((r + 1) * cell) - 1
            if r == 0 or not mask[r - 1, c]:
                edges.append((left, top, right, top))
            if r == grid - 1 or not mask[r + 1, c]:
                edges.append((left, bottom, right, bottom))
            if c == 0 or not mask[r, c - 1]:
                edges.append((left, top, left, bottom))
            if c == grid - 1 or not mask[r, c + 1]:
                edges.append((right, top, right, bottom))
    for width, colour in ((3, (255, 255, 255)), (1, _BLACK)):
        for x_a, y_a, x_b, y_b in edges:
            draw.line([(x_a, y_a), (x_b, y_b)], fill=colour, width=width)


def _upscaled(image: np.ndarray, side: int) -> Image.Image:
    h, w = image.shape[:2]
    scale = side / max(h, w)
    return Image.fromarray(np.ascontiguousarray(image)).resize((int(round(w * scale)), int(round(h * scale))),
                                                               Image.Resampling.NEAREST)


def _chip(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], text: str, font: Any,
          fill: Optional[tuple[int, int, int]], outline: tuple[int, int, int], text_rgb: tuple[int, int, int],
          width: int = 1) -> None:
    draw.rectangle(list(box), fill=fill, outline=outline, width=width)
    draw.text((box[0] + 4, box[1] + 2), text, fill=text_rgb, font=font)


def _shown_style(token: SimlaToken) -> tuple[Optional[tuple[int, int, int]], tuple[int, int, int], tuple[int, int, int]]:
    """(fill, outline, text) of the chip of what the MLM pass sees at a position."""
    if token.kind == "mlm_mask":
        return (60, 60, 60), (60, 60, 60), (255, 255, 255)
    if token.kind == "mlm_random":
        return (255, 236, 170), (200, 140, 0), _BLACK
    if token.kind == "mlm_kept":
        return (215, 235, 255), (90, 130, 200), _BLACK
    if token.kind == "special":
        return None, _LIGHT, _GREY
    return None, _LIGHT, _BLACK


def plot_simla_xmm(view: SimlaXmmView, png_path: str | Path, image_px: int = SIMLA_SHOW_IMAGE_PX,
                   width: int = 1180) -> dict[str, Any]:
    """Draw a `SimlaXmmView` to a PNG.

    Top row, three panels of `image_px` (nearest upscaling): the image with the MIM-masked patches darkened
    and hatched; the visual-token targets (decoded codes) with the mask outlined; the MIM reconstruction
    (predicted codes at masked patches, each outlined green when right / red when wrong, targets elsewhere).
    Right of them: the sample's MIM / MLM accuracy and the concept head's top words (bars = sigmoid).
    Below: the caption; the MLM grid (position, original piece, what the MLM pass sees, top-1 prediction and
    its probability vs the truth's); the PSL row (each piece tinted by its [CLS] attention, the value below,
    keywords framed purple); the keywords; the notes.

    Returns layout metadata for tests: `size` (W, H) and `panels` (name -> (x0, y0, x1, y1) exclusive) of
    "image", "targets", "reconstruction".
    """
    unknown = sorted({t.kind for t in view.tokens} - set(SIMLA_TOKEN_KINDS))
    if unknown:
        raise ValueError(f"unknown token kinds {unknown}; expected {SIMLA_TOKEN_KINDS}")
    P = view.grid * view.grid
    if not (len(view.patch_mask) == len(view.target_codes) == len(view.predicted_codes) == P):
        raise ValueError(f"patch_mask / target_codes / predicted_codes must have grid ** 2 = {P} entries")
    for name in ("image", "targets_image", "reconstruction_image"):
        array = getattr(view, name)
        if array.ndim != 3 or array.shape[2] != 3:
            raise ValueError(f"view.{name} must be (H, W, 3) uint8, got shape {array.shape}")
    body, small, bold = _cmal_fonts()
    margin, gap, line_h, chip_h = 12, 16, 17, 19
    content_w = width - 2 * margin
    mask = np.array(view.patch_mask, dtype=bool).reshape(view.grid, view.grid)

    # ---- layout: MLM grid bands (one column per position), PSL chip rows, wrapped text
    label_w = int(max(small.getlength(s) for s in ("slot", "word", "MLM in", "top-1", "p(top-1)", "p(truth)"))) + 10
    columns = []
    for token in view.tokens:
        texts = [token.piece, token.shown, token.prediction]
        smalls = [str(token.position), f"{token.prediction_prob:.2f}", f"{token.truth_prob:.2f}"]
        columns.append(int(math.ceil(max(max(body.getlength(s) for s in texts),
                                         max(small.getlength(s) for s in smalls)))) + 10)

    def bands_of(widths: list[int], start: int) -> list[list[int]]:
        return wrap_columns(widths, start, content_w)

    mlm_bands = bands_of(columns, label_w)
    mlm_band_h = 14 + 3 * (chip_h + 3) + 2 * 14 + 10
    psl_widths = [int(math.ceil(max((bold if t.keyword else body).getlength(t.piece), small.getlength("0.000")))) + 14
                  for t in view.tokens]
    psl_bands = bands_of(psl_widths, 0)
    psl_band_h = chip_h + 3 + 14 + 8
    caption_lines = wrap_to_width(f"caption: {view.caption}", body, content_w)
    keyword_lines = wrap_to_width(
        "keywords (PSL hard targets): " + (", ".join(view.keywords) if view.keywords else "none"), body, content_w)
    notes = [line for note in view.notes for line in wrap_to_width(note, small, content_w)]

    top = margin + 24 + 22  # title, then the panel titles
    side_x = margin + 3 * image_px + 3 * gap
    side_w = width - margin - side_x
    y_caption = top + image_px + 8 + 3 * 14 + gap
    y_mlm = y_caption + line_h * len(caption_lines) + 28
    y_psl = y_mlm + mlm_band_h * len(mlm_bands) + 28
    y_keywords = y_psl + psl_band_h * len(psl_bands) + 4
    y_notes = y_keywords + line_h * len(keyword_lines) + 10
    height = y_notes + line_h * len(notes) + margin
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    draw.text((margin, margin), view.title, fill=_BLACK, font=bold)

    # ---- the three image panels
    masked = len(view.masked_patches)
    right = sum(1 for p in view.masked_patches if view.predicted_codes[p] == view.target_codes[p])
    heads = (("image", "image (the ViT's input)",
              f"{masked}/{P} patches MIM-masked (BEiT blocks): darkened + hatched"),
             ("targets", "visual-token targets",
              f"decode(encode(image)): each patch painted with its code's k-means centre ({view.image_vocab} "
              f"codes); MIM mask outlined"),
             ("reconstruction", f"MIM reconstruction · {right}/{masked} right",
              "the MIM head's argmax code, decoded, at masked patches (green = right, red = wrong); targets "
              "elsewhere"))
    arrays = (view.image, view.targets_image, view.reconstruction_image)
    panels: dict[str, tuple[int, int, int, int]] = {}
    for k, ((name, head, sub), array) in enumerate(zip(heads, arrays)):
        x0 = margin + k * (image_px + gap)
        draw.text((x0, top - 22), head, fill=_BLACK, font=bold)
        sub_lines = wrap_to_width(sub, small, image_px)
        shown = _upscaled(array, image_px)
        canvas.paste(shown, (x0, top))
        panels[name] = (x0, top, x0 + shown.width, top + shown.height)
        # the sub-caption under the panel (it may wrap to two lines)
        for j, line in enumerate(sub_lines[:3]):
            draw.text((x0, top + shown.height + 4 + j * 14), line, fill=_GREY, font=small)
    cell = image_px / view.grid

    def patch_box(x0: int, p: int, inset: int = 0) -> tuple[int, int, int, int]:
        r, c = divmod(p, view.grid)
        return (x0 + round(c * cell) + inset, top + round(r * cell) + inset,
                x0 + round((c + 1) * cell) - 1 - inset, top + round((r + 1) * cell) - 1 - inset)

    x_image, x_targets, x_recon = (panels[n][0] for n in ("image", "targets", "reconstruction"))
    for p in view.masked_patches:  # panel 1: darken + hatch
        box = patch_box(x_image, p)
        region = canvas.crop((box[0], box[1], box[2] + 1, box[3] + 1))
        canvas.paste(Image.blend(region, Image.new("RGB", region.size, (0, 0, 0)), 0.55), box[:2])
        _hatch(canvas, box, spacing=5)
    draw = ImageDraw.Draw(canvas)
    _mask_outline(draw, (x_image, top), cell, mask)
    _mask_outline(draw, (x_targets, top), cell, mask)
    for p in view.masked_patches:  # panel 3: right / wrong per masked patch
        colour = _RIGHT if view.predicted_codes[p] == view.target_codes[p] else _WRONG
        draw.rectangle(list(patch_box(x_recon, p, inset=1)), outline=colour, width=2)

    # ---- side column: accuracies and concept words
    y = top - 22
    draw.text((side_x, y), "this sample", fill=_BLACK, font=bold)
    y += 20
    mlm_count = len(view.mlm_positions)
    mlm_right = sum(1 for t in view.tokens if t.masked and t.prediction_id == t.token_id)
    for line in (f"MIM accuracy: {right}/{masked} = {view.mim_accuracy * 100:.1f} %",
                 f"MLM accuracy: {mlm_right}/{mlm_count} = {view.mlm_accuracy * 100:.1f} %",
                 f"PSL keywords: {len(view.keyword_ids)}"):
        draw.text((side_x, y), line, fill=_BLACK, font=body)
        y += line_h
    y += 14
    draw.text((side_x, y), f"concept head: top {len(view.concepts)} words", fill=_BLACK, font=bold)
    y += 17
    draw.text((side_x, y), "sigmoid(concept_head(image embedding)); ✓ = a keyword", fill=_GREY, font=small)
    y += 20
    word_w = max([int(body.getlength(w)) for w, _, _ in view.concepts] + [40]) + 22
    bar_w = max(40, side_w - word_w - 50)
    for word, token_id, prob in view.concepts:
        mark = " ✓" if token_id in view.keyword_ids else ""
        draw.text((side_x, y), word + mark, fill=_KEYWORD_RGB if mark else _BLACK, font=body)
        bx = side_x + word_w
        draw.rectangle([bx, y + 3, bx + bar_w, y + 14], outline=_LIGHT)
        draw.rectangle([bx, y + 3, bx + max(1, round(prob * bar_w)), y + 14], fill=_ATTENTION_RGB)
        draw.text((bx + bar_w + 6, y + 1), f"{prob:.2f}", fill=_GREY, font=small)
        y += line_h + 3

    # ---- caption
    for k, line in enumerate(caption_lines):
        draw.text((margin, y_caption + k * line_h), line, fill=_BLACK, font=body)

    # ---- MLM grid
    header = "XMM · MLM: masked words and the MLM head's top-1 (text attends to the unmasked image)"
    draw.text((margin, y_mlm - 20), header, fill=_BLACK, font=bold)
    x = margin + int(bold.getlength(header)) + 16
    for text, kind in (("[MASK] 80 %", "mlm_mask"), ("random 10 %", "mlm_random"), ("kept 10 %", "mlm_kept")):
        fill, outline, text_rgb = _shown_style(SimlaToken(0, 0, text, kind, text, 0.0))
        chip_w = int(math.ceil(small.getlength(text))) + 8
        _chip(draw, (x, y_mlm - 20, x + chip_w - 1, y_mlm - 6), text, small, fill, outline, text_rgb)
        x += chip_w + 5
    for b, band in enumerate(mlm_bands):
        y0 = y_mlm + b * mlm_band_h
        ys = {"slot": y0, "word": y0 + 14, "MLM in": y0 + 14 + chip_h + 3, "top-1": y0 + 14 + 2 * (chip_h + 3)}
        ys["p(top-1)"] = ys["top-1"] + chip_h + 3
        ys["p(truth)"] = ys["p(top-1)"] + 14
        for text, ry in ys.items():
            draw.text((margin, ry + (3 if text in ("word", "MLM in", "top-1") else 0)), text, fill=_GREY, font=small)
        x = margin + label_w
        for k in band:
            token, col_w = view.tokens[k], columns[k]
            draw.text((x + 2, ys["slot"]), str(token.position), fill=_GREY, font=small)
            word_style = ((None, _LIGHT, _GREY) if token.kind == "special" else
                          ((245, 245, 245), (90, 90, 90), _BLACK) if token.masked else (None, _LIGHT, _BLACK))
            _chip(draw, (x, ys["word"], x + col_w - 1, ys["word"] + chip_h - 1), token.piece, body, *word_style)
            _chip(draw, (x, ys["MLM in"], x + col_w - 1, ys["MLM in"] + chip_h - 1), token.shown, body,
                  *_shown_style(token))
            if token.masked:
                ok = token.prediction_id == token.token_id
                colour = _RIGHT if ok else _WRONG
                _chip(draw, (x, ys["top-1"], x + col_w - 1, ys["top-1"] + chip_h - 1), token.prediction, body,
                      _tint(colour, 0.8), colour, _BLACK, width=2)
                draw.text((x + 2, ys["p(top-1)"]), f"{token.prediction_prob:.2f}", fill=colour, font=small)
                draw.text((x + 2, ys["p(truth)"]), f"{token.truth_prob:.2f}", fill=_GREY, font=small)
            x += col_w + 3

    # ---- PSL row
    header = "PSL: the momentum encoder's [CLS] attention over the caption (last layer, mean over heads)"
    draw.text((margin, y_psl - 20), header, fill=_BLACK, font=bold)
    x = margin + int(bold.getlength(header)) + 16
    chip_w = int(math.ceil(small.getlength("keyword"))) + 8
    _chip(draw, (x, y_psl - 20, x + chip_w - 1, y_psl - 6), "keyword", small, None, _KEYWORD_RGB, _KEYWORD_RGB,
          width=2)
    peak = max([t.attention for t in view.tokens] + [1e-12])
    draw.text((x + chip_w + 8, y_psl - 19), f"tint ∝ weight / max ({peak:.3f}); weight below each word", fill=_GREY,
              font=small)
    for b, band in enumerate(psl_bands):
        y0 = y_psl + b * psl_band_h
        x = margin
        for k in band:
            token, w = view.tokens[k], psl_widths[k]
            fill = _tint(_ATTENTION_RGB, 1.0 - token.attention / peak)
            outline, line_w = (_KEYWORD_RGB, 3) if token.keyword else (_LIGHT, 1)
            _chip(draw, (x, y0, x + w - 1, y0 + chip_h - 1), token.piece, bold if token.keyword else body,
                  fill, outline, _GREY if token.kind == "special" else _BLACK, width=line_w)
            draw.text((x + 2, y0 + chip_h + 2), f"{token.attention:.3f}", fill=_GREY, font=small)
            x += w + 3
    for k, line in enumerate(keyword_lines):
        draw.text((margin, y_keywords + k * line_h), line, fill=_KEYWORD_RGB, font=body)
    for k, line in enumerate(notes):
        draw.text((margin, y_notes + k * line_h), line, fill=_GREY, font=small)

    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(png_path, format="PNG")
    return {"size": (width, height), "panels": panels}


__all__ = ["SIMLA_SHOW_CAPTIONS", "SIMLA_SHOW_IMAGE_PX", "SIMLA_TOKEN_KINDS", "SimlaToken", "SimlaXmmView",
           "build_simla_show", "plot_simla_xmm", "show", "simla_xmm_view"]
