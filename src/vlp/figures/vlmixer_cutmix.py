"""VLMixer's inspection figure (`vlp show vlmixer`): a sentence, its grounded words, and the mixed view with the
image patches drawn in place of the words (cross-modal CutMix, CMC), for one training step.

VLMixer pre-trains on two unrelated streams (`vlp.data.unpaired`): a step reads B sentences of the text-only
stream and B images of the image-only stream, and CMC replaces each grounded word of a sentence, with
probability `method.cmc_ratio`, by a region of the same concept drawn from the step's images (the patch
gallery). Which patch a word gets therefore depends on the whole step, not on the sentence alone, so this
figure rebuilds the step the trainer feeds the sentence in: the sentence `--index` / `--caption` is dataset row
r = index * 5 + caption of `UnpairedDataset` (text scene `index` of `unpaired_text`, caption `caption`); the
trainer's epoch-0 order for `train.seed = --seed` (`StepSampler`) puts r at some step, and that step's rows,
collated and keyed as the trainer does, are the batch. Then `VLMixer.regions` and `VLMixer.mixed_view` (the
training code path, eval mode) give the replaced slots, and `cross_modal_cutmix` itself, with the method's own
uniforms (salt `SALT_CMC`) and the step's gallery, says which gallery region (image, box) each one got.

Everything is gathered into plain data (`VLMixerCutmixView`) and drawn with PIL (`plot_vlmixer_cutmix`). The
method class points here (`VLMixer.figure`); `vlp show METHOD` imports this module and calls `show`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from PIL import Image, ImageDraw

from vlp.build import build_run_method, build_tokenizer, class_words_for
from vlp.config import RunConfig
from vlp.data import lexicon
from vlp.data.datasets import collate
from vlp.data.tokenizer import TextTokenizer
from vlp.data.transforms import tensor_to_image
from vlp.data.unpaired import UnpairedDataset, world_pretrain_dataset
from vlp.figures.cmal_prompt import CMAL_ANCHOR_PALETTE, CMAL_PLAIN_RGB, _cmal_fonts, _label, _tint
from vlp.figures.common import figure_config, sample_key, world_sample, wrap_columns
from vlp.figures.simla_xmm import _chip, _upscaled
from vlp.methods import build_method
from vlp.methods.vlmixer import SALT_CMC, VLMixer, cross_modal_cutmix
from vlp.models.losses import IGNORE_INDEX
from vlp.models.model import VLModel
from vlp.train.checkpoint import load_model_weights
from vlp.train.sampler import StepSampler
from vlp.types import Batch
from vlp.viz import wrap_to_width

VLMIXER_SHOW_CAPTIONS = 5  # sentences per text scene in UnpairedDataset (sentence = scene * 5 + caption)
VLMIXER_SHOW_IMAGE_PX = 192  # each gallery image is shown upscaled (nearest) to this side
VLMIXER_PATCH_PX = 44  # a patch in the mixed-view row: its crop upscaled (nearest) to fit this square
VLMIXER_SPLITS = ("train", "unpaired_images")  # both name VLMixer's pre-training data: the unpaired streams
# special: [CLS] / [SEP]; plain: names no concept; replaced: a patch took its slot; kept: grounded, a patch of its
# concept was in the gallery but the ratio draw kept the word; no_patch: grounded, no region of its concept in
# the gallery (CMC cannot replace it).
VLMIXER_TOKEN_KINDS = ("special", "plain", "replaced", "kept", "no_patch")


# ------------------------------------------------------------------------------ building the method
def build_vlmixer_show(
    config: str | Path | RunConfig, checkpoint: str | Path | None, overrides: list[str] | None, split: str,
    index: int, caption: int,
) -> tuple[RunConfig, TextTokenizer, VLMixer, UnpairedDataset]:
    """(config, tokenizer, `VLMixer` method in eval mode, the pre-training dataset `UnpairedDataset`) exactly
    as `pretrain` builds them.

    From a config: the tokenizer is re-trained on the world and the model initialised with `train.seed`. From a
    checkpoint: config + tokenizer + the FULL method state (model, region embedding and head), strictly loaded
    (which patch replaces which word does not depend on the weights; MLM's predictions on the mixed view do).
    `split` must name the unpaired pre-training data (`VLMIXER_SPLITS`); `index` (a text scene of
    `unpaired_text`) and `caption` (0..4) are checked before the tokenizer is built. ValueError for a
    non-VLMixer config, another split or an out-of-range index / caption."""
    if split not in VLMIXER_SPLITS:
        raise ValueError(f"`vlp show vlmixer` draws a pre-training step, and VLMixer pre-trains on the world's "
                         f"unpaired streams (sentences of unpaired_text, images of unpaired_images), not on the "
                         f"{split} split: use --split train (the default) or unpaired_images; --index / --caption "
                         f"pick the sentence (text scene, caption)")
    cfg, path = figure_config(config, checkpoint, overrides)
    # the method / data.source checks (the image split's sample 0 exists in every world)
    world, _ = world_sample(cfg, VLMixer, "vlp show vlmixer", checkpoint if checkpoint is not None else config,
                            "unpaired_images", 0, 0, 1)
    scenes = len(world.split("unpaired_text"))
    if not 0 <= index < scenes:
        raise ValueError(f"--index {index} is out of range: the unpaired_text stream of this config has {scenes} "
                         f"text scenes (valid: 0..{scenes - 1})")
    if not 0 <= caption < VLMIXER_SHOW_CAPTIONS:
        raise ValueError(f"--caption {caption} is out of range: the unpaired text stream reads "
                         f"{VLMIXER_SHOW_CAPTIONS} sentences per text scene (valid: 0..{VLMIXER_SHOW_CAPTIONS - 1})")
    if path is not None:
        tokenizer = TextTokenizer.load(path / "tokenizer.json")
        method = build_run_method(cfg, tokenizer)
        load_model_weights(path, method)  # strict: every tensor of the method
    else:
        tokenizer = build_tokenizer(cfg, world)
        torch.manual_seed(cfg.train.seed)
        model = VLModel(cfg.model, vocab_size=tokenizer.vocab_size, pad_id=tokenizer.pad_id)
        method = build_method(cfg, model, tokenizer, class_words=class_words_for(cfg))
    dataset = world_pretrain_dataset(cfg, world, tokenizer, VLMixer)
    if not isinstance(dataset, UnpairedDataset):  # pragma: no cover - VLMixer declares the unpaired inputs
        raise RuntimeError(f"VLMixer's world pre-training dataset should be UnpairedDataset, got {type(dataset)}")
    return cfg, tokenizer, method.eval(), dataset


# ------------------------------------------------------------------------------ the step
@dataclass(frozen=True)
class StepOfRow:
    """Where the trainer feeds dataset row `row` in epoch 0 (one process): global step `step`, micro-batch
    `micro` of the step's `grad_accum`, position `position` within that micro-batch; `rows` (B/grad_accum,) the
    micro-batch's dataset rows in order (the CMC gallery is their images)."""

    row: int
    step: int
    micro: int
    position: int
    rows: tuple[int, ...]


def step_batch(dataset: UnpairedDataset, row: int, seed: int, batch_size: int, grad_accum: int = 1,
               device: torch.device | str = "cpu") -> tuple[Batch, StepOfRow]:
    """The micro-batch in which the trainer (one process, `train.seed = seed`, global batch `batch_size`,
    `grad_accum` micro-batches) feeds dataset row `row` in epoch 0, as training sees it: the step's rows from
    `StepSampler`, collated together (so padded to the step's longest sentence and most regions), their sample
    keys set, then the row's micro-batch sliced off (`Trainer.train_step`). Returns (batch on `device`, where).

    With `grad_accum` 1 the gallery is the whole global step, which is also what a multi-process run gathers
    (the step's rows do not depend on the number of ranks). ValueError for a row outside the dataset."""
    if not 0 <= row < len(dataset):
        raise ValueError(f"row {row} is outside the {len(dataset)}-row unpaired dataset")
    sampler = StepSampler(len(dataset), batch_size, grad_accum=grad_accum, seed=seed)
    position = int((sampler.epoch_permutation(0) == row).nonzero()[0, 0])
    step, offset = divmod(position, batch_size)
    rows = sampler.global_rows(step)  # the last step of an epoch may reach into epoch 1: keys say so
    batch = collate([dataset[int(r)] for r in rows.indices])
    batch.sample_keys = rows.keys
    micro_rows = batch_size // grad_accum
    micro, within = divmod(offset, micro_rows)
    if grad_accum > 1:
        batch = batch.slice(micro * micro_rows, (micro + 1) * micro_rows)
    if int(batch.sample_keys[within]) != sample_key(row, seed):  # the trainer's key formula (epoch 0)
        raise RuntimeError(f"row {row} got key {int(batch.sample_keys[within])}, not {sample_key(row, seed)}")
    picked = tuple(int(r) for r in rows.indices[micro * micro_rows:(micro + 1) * micro_rows].tolist())
    return batch.to(device), StepOfRow(row, step, micro, within, picked)


# ------------------------------------------------------------------------------ the view (plain data)
@dataclass(frozen=True)
class VLMixerToken:
    """One text position of the sentence.

    position: index t in the text sequence ([CLS] is 0). piece / token_id: the word piece and its id.
    kind: one of `VLMIXER_TOKEN_KINDS`. concept / concept_name: the concept the token names
        (`grounded_concepts`; class id, -1 and "" for none). patch: index into `VLMixerCutmixView.patches`
        of the patch in this slot (-1 unless replaced).
    MLM on the mixed view (only when the view has `mlm`): mlm_target (t is an MLM target), shown (what the MLM
    pass sees at t: [MASK], a random piece or the word; "" for a replaced slot, which holds a patch), prediction
    / prediction_id / prediction_prob (top-1 of `model.mlm_logits`) and truth_prob, at targets only.
    """

    position: int
    token_id: int
    piece: str
    kind: str
    concept: int = -1
    concept_name: str = ""
    patch: int = -1
    mlm_target: bool = False
    shown: str = ""
    prediction: str = ""
    prediction_id: int = -1
    prediction_prob: float = 0.0
    truth_prob: float = 0.0


@dataclass(frozen=True)
class VLMixerPatch:
    """A gallery region that replaced a word (one per replaced slot, in sentence order).

    position / word: the text slot it took and the word it replaced. concept / concept_name: the word's
    concept (= the region's label - 1). gallery_index: k in the step's flattened gallery (micro-batch images x
    N regions); image_slot = k // N the image-stream row of the micro-batch it comes from, region = k % N its
    region slot (with `whole_image_region` slot 0 is the whole image, never a patch), image_index its index in
    `unpaired_images`. region_name: the object's colour and class. box: (x1, y1, x2, y2) normalised, in its
    source image. candidates: gallery regions of the concept (the uniform draw's support). crop: (h, w, 3) uint8
    the box's pixels in the source image (as training sees the image, `tensor_to_image` of the batch).
    """

    position: int
    word: str
    concept: int
    concept_name: str
    gallery_index: int
    image_slot: int
    region: int
    image_index: int
    region_name: str
    box: tuple[float, float, float, float]
    candidates: int
    crop: np.ndarray


@dataclass(frozen=True)
class VLMixerGalleryImage:
    """A gallery image that gave at least one patch: image_slot (its row in the micro-batch), image_index (in
    `unpaired_images`), image (H, W, 3) uint8 as training sees it, and every real labelled region as (region
    slot, normalised box, "colour class")."""

    image_slot: int
    image_index: int
    image: np.ndarray
    regions: tuple[tuple[int, tuple[float, float, float, float], str], ...]


@dataclass(frozen=True)
class VLMixerCutmixView:
    """Everything `plot_vlmixer_cutmix` draws, for one sentence of one training step.

    sentence: the text. tokens: its real positions. patches: the replacing regions in sentence order.
    gallery: the images that gave a patch (image-slot order). gallery_images / gallery_regions: how many images
    and real labelled regions the step's gallery holds. layout: `method.cmc_layout` (inline: the patch takes
    the word's slot; regions: the slot reads [MASK] and the patch joins as a region slot after the text).
    cmc_ratio: `method.cmc_ratio`. where / sample_key: the step and the row's key. mlm: whether the MLM fields
    of the tokens are filled (weights loaded from a checkpoint). hint: drawn under the "no word is replaced"
    line (e.g. a nearby sample that has a patch).
    """

    sentence: str
    tokens: tuple[VLMixerToken, ...]
    patches: tuple[VLMixerPatch, ...]
    gallery: tuple[VLMixerGalleryImage, ...]
    gallery_images: int
    gallery_regions: int
    layout: str
    cmc_ratio: float
    where: StepOfRow
    sample_key: int
    mlm: bool = False
    title: str = ""
    hint: str = ""
    notes: tuple[str, ...] = ()

    @property
    def replaced_positions(self) -> tuple[int, ...]:
        return tuple(t.position for t in self.tokens if t.kind == "replaced")

    @property
    def grounded_positions(self) -> tuple[int, ...]:
        return tuple(t.position for t in self.tokens if t.concept >= 0)

    def colours(self) -> dict[int, tuple[int, int, int]]:
        """Patch index -> RGB, palette colours in sentence order (cycled)."""
        return {k: CMAL_ANCHOR_PALETTE[k % len(CMAL_ANCHOR_PALETTE)] for k in range(len(self.patches))}


def _class_name(concept: int) -> str:
    return lexicon.CLASSES[concept].name


@torch.no_grad()
def vlmixer_cutmix_view(
    method: VLMixer, tokenizer: TextTokenizer, dataset: UnpairedDataset, index: int, caption: int = 0,
    seed: int = 0, batch_size: int = 64, grad_accum: int = 1, mlm: bool = False, title: str = "",
    notes: tuple[str, ...] = (),
) -> VLMixerCutmixView:
    """CMC of sentence `caption` of text scene `index` (dataset row index * 5 + caption) in the training step
    that feeds it (`step_batch` with `seed`, `batch_size`, `grad_accum`), as plain data, computed with the
    training code path.

    `method.regions` and `method.mixed_view` give the replaced (B, T) and grounded (B, T) slots and the
    gallery region each replaced slot holds (`patch_index`); `cross_modal_cutmix` on the same draws
    (`method._uniforms(batch, (T, 2), SALT_CMC)`) at ratio 1 tells "kept by the ratio draw" from "no patch
    of the concept". With `mlm`,
    MLM on the mixed view as `VLMixer.forward` runs it (`mask_tokens_at_least_one` with salt `SALT_MLM`,
    `encode_mixed`, `model.mlm_logits`): the top-1 piece at each target. The method should be in eval mode.
    ValueError for an index / caption outside the text stream."""
    scenes = len(dataset.text_split)
    if not (0 <= index < scenes and 0 <= caption < dataset.captions_per_text_scene):
        raise ValueError(f"text scene {index} caption {caption} is outside the {scenes}-scene text stream "
                         f"({dataset.captions_per_text_scene} sentences per scene)")
    row = index * dataset.captions_per_text_scene + caption  # row r reads sentence r % S: the first row of it
    device = next(method.parameters()).device
    batch, where = step_batch(dataset, row, seed, batch_size, grad_accum, device)
    b = where.position
    ids, attn = batch.input_ids, batch.attention_mask
    T = ids.shape[1]
    regions = method.regions(batch)
    mixed = method.mixed_view(batch, regions)

    # which patch: the gallery index mixed_view drew (one process: the gathered gallery is the micro-batch's
    # regions, flattened (B*N,)); "kept by the ratio draw" vs "no patch of its concept": CMC again at ratio 1
    N = regions.labels.shape[1]
    gallery_labels, gallery_mask = regions.labels.flatten(), regions.mask.flatten().bool()  # (B*N,)
    concepts, replaced, patch = mixed.concepts, mixed.replaced, mixed.patch_index  # (B, T) each
    uniforms = method._uniforms(batch, (T, 2), SALT_CMC)  # (B, T, 2), as mixed_view drew them
    has_patch, _ = cross_modal_cutmix(concepts, gallery_labels, gallery_mask, uniforms, 1.0)

    if mlm:
        masked_ids, labels = method.mlm_targets(batch, mixed)
        hidden = method.encode_mixed(mixed, masked_ids, attn)
        probs = torch.softmax(method.model.mlm_logits(hidden[b]).float(), dim=-1)  # (T, V)
        top_prob, top_id = probs.max(dim=-1)
        masked_l, labels_l = masked_ids[b].tolist(), labels[b].tolist()

    piece = tokenizer.backend.id_to_token
    special = {int(i) for i in tokenizer.special_ids}
    offset = 1 if method.cfg.whole_image_region else 0
    image_ids = batch.image_ids.tolist()
    pictures: dict[int, np.ndarray] = {}

    def picture(slot: int) -> np.ndarray:
        if slot not in pictures:
            pictures[slot] = tensor_to_image(batch.images[slot].float().cpu())
        return pictures[slot]

    def region_name(slot: int, i: int) -> str:
        label = int(regions.labels[slot, i])
        obj = dataset.images_split[image_ids[slot]].objects[i - offset]
        if obj.class_id != label - 1:
            raise RuntimeError(f"gallery region ({slot}, {i}) has label {label} but its object is a {obj.class_name}")
        return f"{obj.colour} {obj.class_name}"

    tokens: list[VLMixerToken] = []
    patches: list[VLMixerPatch] = []
    ids_l = ids[b].tolist()
    for t in range(T):
        if not attn[b, t]:
            continue
        token_id, concept = ids_l[t], int(concepts[b, t])
        if token_id in special:
            kind = "special"
        elif concept < 0:
            kind = "plain"
        elif replaced[b, t]:
            kind = "replaced"
        else:
            kind = "kept" if has_patch[b, t] else "no_patch"
        fields: dict[str, Any] = dict(position=t, token_id=token_id, piece=piece(token_id), kind=kind,
                                      concept=concept, concept_name=_class_name(concept) if concept >= 0 else "")
        if kind == "replaced":
            k = int(patch[b, t])
            slot, i = divmod(k, N)
            x1, y1, x2, y2 = (float(v) for v in regions.boxes[slot, i, :4].tolist())
            image = picture(slot)
            h, w = image.shape[:2]
            c0, r0 = min(int(math.floor(x1 * w)), w - 1), min(int(math.floor(y1 * h)), h - 1)
            c1, r1 = max(int(math.ceil(x2 * w)), c0 + 1), max(int(math.ceil(y2 * h)), r0 + 1)
            candidates = int(((gallery_labels == concept + 1) & gallery_mask).sum())
            fields["patch"] = len(patches)
            patches.append(VLMixerPatch(
                position=t, word=piece(token_id), concept=concept, concept_name=_class_name(concept),
                gallery_index=k, image_slot=slot, region=i, image_index=int(image_ids[slot]),
                region_name=region_name(slot, i), box=(x1, y1, x2, y2), candidates=candidates,
                crop=np.ascontiguousarray(image[r0:r1, c0:c1])))
        if mlm and labels_l[t] != IGNORE_INDEX:
            guess = int(top_id[t])
            fields.update(mlm_target=True, shown=piece(masked_l[t]), prediction=piece(guess), prediction_id=guess,
                          prediction_prob=float(top_prob[t]), truth_prob=float(probs[t, labels_l[t]]))
        elif mlm:
            fields["shown"] = "" if kind == "replaced" else piece(masked_l[t])
        tokens.append(VLMixerToken(**fields))

    gallery = []
    for slot in sorted({p.image_slot for p in patches}):
        real = [i for i in range(N) if regions.mask[slot, i] and int(regions.labels[slot, i]) > 0]
        gallery.append(VLMixerGalleryImage(
            image_slot=slot, image_index=int(image_ids[slot]), image=picture(slot),
            regions=tuple((i, tuple(float(v) for v in regions.boxes[slot, i, :4].tolist()), region_name(slot, i))
                          for i in real)))
    return VLMixerCutmixView(
        sentence=dataset.sentence(row), tokens=tuple(tokens), patches=tuple(patches), gallery=tuple(gallery),
        gallery_images=int(batch.images.shape[0]), gallery_regions=int((gallery_mask & (gallery_labels > 0)).sum()),
        layout=method.cfg.cmc_layout, cmc_ratio=float(method.cfg.cmc_ratio), where=where,
        sample_key=int(batch.sample_keys[b]), mlm=mlm, title=title, notes=tuple(notes))


def no_patch_reason(view: VLMixerCutmixView) -> str:
    """Why no word of the view's sentence is replaced ("" when one is)."""
    if view.patches:
        return ""
    if view.cmc_ratio == 0:
        return "method.cmc_ratio = 0: CMC replaces nothing (the sentence is its own mixed view)"
    kinds = {t.kind for t in view.tokens}
    if not view.grounded_positions:
        return "no word of this sentence names a concept of the lexicon: there is nothing to replace"
    if "kept" not in kinds:
        return "the step's gallery holds no region of this sentence's concepts: no word can be replaced"
    return (f"at this sample the ratio draws kept every grounded word (each is kept with probability "
            f"1 - {view.cmc_ratio:g}); try another --seed or --caption")


def show(
    out: str | Path, config: str | Path | RunConfig = "vlmixer_tiny", checkpoint: str | Path | None = None,
    split: str = "train", index: int = 0, seed: int = 0, overrides: list[str] | None = None, caption: int = 0,
) -> Path:
    """Write a PNG of VLMixer's cross-modal CutMix for sentence `caption` of text scene `index` of the unpaired
    text stream: the sentence with its grounded words and their concepts, the mixed view with each replacing
    patch drawn in its word's place, and the gallery images of the step with the used boxes outlined and labelled
    with the words they replaced; from a checkpoint also MLM's top-1 on the mixed view.

    The method is built from `config` (default `vlmixer_tiny`) or from a checkpoint directory (its config,
    tokenizer and full method state); `seed` is the run's `train.seed`: it picks the step the sentence lands in
    (so the gallery) and the sample key (so the draws). ValueError for a non-VLMixer config, a split other than
    the unpaired streams, or an out-of-range index / caption. Returns the path written."""
    cfg, tokenizer, method, dataset = build_vlmixer_show(config, checkpoint, overrides, split, index, caption)
    origin = f"checkpoint {checkpoint}" if checkpoint is not None else (
        "config" if isinstance(config, RunConfig) else str(config))
    title = (f"VLMixer cross-modal CutMix · {origin} · unpaired_text[{index}] caption {caption} · seed {seed}")
    view = vlmixer_cutmix_view(method, tokenizer, dataset, index, caption, seed, cfg.train.batch_size,
                               cfg.train.grad_accum, mlm=checkpoint is not None, title=title)
    where, mcfg = view.where, method.cfg
    notes = [
        f"Sentence {where.row} of the text stream = dataset row {where.row} (UnpairedDataset: row r reads sentence "
        f"r % {len(dataset.text_split) * dataset.captions_per_text_scene} and image r % {dataset.num_images}, "
        f"unrelated). With train.seed = {seed} the trainer's epoch-0 order feeds it at step {where.step}"
        + (f", micro-batch {where.micro} of {cfg.train.grad_accum}" if cfg.train.grad_accum > 1 else "")
        + f", row {where.position} of {len(where.rows)}; sample key {view.sample_key}. The patch gallery is that "
        f"{'micro-batch' if cfg.train.grad_accum > 1 else 'step'}'s image stream: {view.gallery_images} images, "
        f"{view.gallery_regions} labelled regions"
        + (" (one process; with several, each micro-batch gathers the ranks' images)." if cfg.train.grad_accum > 1
           else " (the global batch: the same with any number of ranks)."),
        f"CMC (VLMixer.mixed_view / cross_modal_cutmix): each grounded word (the concept lexicon: plurals, "
        f"synonyms) is replaced with probability cmc_ratio = {mcfg.cmc_ratio:g} by a region of its concept drawn "
        f"uniformly among the gallery's; draws keyed by the sample key (salt SALT_CMC). Layout "
        f"'{mcfg.cmc_layout}': "
        + ("the patch's vector LN_v(W_v v) takes the word's slot and position (type embedding 1)."
           if mcfg.cmc_layout == "inline" else
           "the word's slot reads [MASK] (never a target) and the patch joins after the text as a region slot "
           "with its box in its source image."),
        "The model reads a patch as RoIAlign of its box's pixels (method.region_pixels bins); drawn here as the "
        "box's crop. "
        + ("Weights: the checkpoint's; MLM (15 % of the remaining words, 80/10/10) predicts on the mixed view."
           if checkpoint is not None else
           f"Weights: UNTRAINED (from the config, train.seed = {cfg.train.seed}); the patch choice does not depend "
           f"on them. Pass --checkpoint for MLM's predictions on the mixed view."),
    ]
    hint = ""
    if not view.patches and mcfg.cmc_ratio > 0:
        hint = _suggest(method, tokenizer, dataset, index, caption, seed, cfg.train.batch_size, cfg.train.grad_accum)
    view = replace(view, notes=tuple(notes), hint=hint)
    out = Path(out)
    plot_vlmixer_cutmix(view, out, image_px=VLMIXER_SHOW_IMAGE_PX)
    return out


def _suggest(method: VLMixer, tokenizer: TextTokenizer, dataset: UnpairedDataset, index: int, caption: int,
             seed: int, batch_size: int, grad_accum: int) -> str:
    """A note naming a nearby sample where CMC does replace a word: another caption of the same text scene
    (same seed), else the same sentence under seeds seed + 1 .. seed + 4."""
    tries = [(index, c, seed) for c in range(dataset.captions_per_text_scene) if c != caption]
    tries += [(index, caption, s) for s in range(seed + 1, seed + 5)]
    for i, c, s in tries:
        found = vlmixer_cutmix_view(method, tokenizer, dataset, i, c, s, batch_size, grad_accum)
        if found.patches:
            return (f"--index {i} --caption {c} --seed {s} replaces {len(found.patches)} word(s) "
                    f"('{found.sentence}').")
    return "Nor do the other captions of this scene or the next 4 seeds."


# ================================================================================ drawing
_BLACK, _GREY, _LIGHT, _WHITE = (0, 0, 0), (110, 110, 110), (225, 225, 225), (255, 255, 255)
_RIGHT, _WRONG, _NOTE = (20, 160, 60), (220, 30, 30), (200, 0, 0)
_KEPT_RGB = (90, 90, 90)
_TAG_H = 15  # the "P<k>" tag above a patch in the mixed-view row


def _fit(crop: np.ndarray, side: int) -> Image.Image:
    """`crop` (h, w, 3) upscaled (nearest) so that its longer side is `side` px."""
    h, w = crop.shape[:2]
    scale = side / max(h, w, 1)
    return Image.fromarray(np.ascontiguousarray(crop)).resize(
        (max(1, int(round(w * scale))), max(1, int(round(h * scale)))), Image.Resampling.NEAREST)


def plot_vlmixer_cutmix(view: VLMixerCutmixView, png_path: str | Path, image_px: int = VLMIXER_SHOW_IMAGE_PX,
                        width: int = 1100, patch_px: int = VLMIXER_PATCH_PX) -> dict[str, Any]:
    """Draw a `VLMixerCutmixView` to a PNG.

    Top: the sentence. Then one column per text slot, in rows: the slot index; the SENTENCE (grounded words
    tinted in their patch's colour when replaced, outlined dark when kept by the ratio draw, dotted grey when
    the gallery has no region of their concept); the CONCEPT each grounded word names; the MIXED VIEW (inline
    layout: each replaced word's slot shows its patch, the box's crop upscaled to `patch_px` in a frame of its
    colour, labelled P<k>; regions layout: the slot reads [MASK] in that colour and the patches follow the text
    as region slots); with `view.mlm`, what the MLM pass sees and its top-1 (green right, red wrong). A view
    without a patch says why, in red. Then the gallery images that gave a patch (upscaled to `image_px`): every
    labelled region thin grey, each used box outlined in its patch's colour and labelled "P<k> <- 'word'";
    one line per patch; the notes.

    Returns layout metadata for tests: `size` (W, H); `colours` (patch index -> RGB); `mixed_cells` (patch
    index -> (x0, y0, x1, y1) exclusive of the crop pasted in the mixed-view row); `gallery_boxes` (patch index
    -> the drawn box (x0, y0, x1, y1) inclusive on its gallery image); `image_boxes` (image slot -> (x0, y0, x1,
    y1) exclusive of the upscaled gallery image); `word_cells` (position -> the sentence chip (x0, y0, x1, y1)
    inclusive).
    """
    unknown = sorted({t.kind for t in view.tokens} - set(VLMIXER_TOKEN_KINDS))
    if unknown:
        raise ValueError(f"unknown token kinds {unknown}; expected {VLMIXER_TOKEN_KINDS}")
    replaced = [t for t in view.tokens if t.kind == "replaced"]
    if [t.patch for t in replaced] != list(range(len(view.patches))) or \
            [p.position for p in view.patches] != [t.position for t in replaced]:
        raise ValueError("every replaced token must point to its patch, in sentence order (tokens[].patch)")
    slots = {g.image_slot for g in view.gallery}
    if any(p.image_slot not in slots for p in view.patches):
        raise ValueError("a patch comes from an image that is not in view.gallery")
    body, small, bold = _cmal_fonts()
    colours = view.colours()
    margin, gap, line_h, chip_h = 12, 16, 17, 19
    content_w = width - 2 * margin
    cell_h = max(patch_px + 6 + _TAG_H, chip_h)  # a patch: its tag, then the crop in its frame
    inline = view.layout == "inline"

    # ---- columns: one per text slot (+ one per patch as a region slot in the regions layout)
    row_names = ["slot", "sentence", "concept", "mixed view"] + (["MLM in", "top-1", "p(top-1)"] if view.mlm else [])
    label_w = int(max(small.getlength(s) for s in row_names)) + 10
    columns: list[tuple[str, int]] = [("token", k) for k in range(len(view.tokens))]
    if not inline:
        columns += [("region", k) for k in range(len(view.patches))]
    widths = []
    for kind, k in columns:
        if kind == "token":
            token = view.tokens[k]
            texts = [(bold if token.concept >= 0 else body).getlength(token.piece), small.getlength(token.concept_name),
                     body.getlength(token.shown), body.getlength(token.prediction), small.getlength("no patch")]
            if token.kind == "replaced" and inline:
                texts.append(patch_px + 6)
        else:
            texts = [patch_px + 6, small.getlength(f"R{k} = P{k}")]
        widths.append(int(math.ceil(max(texts))) + 10)
    bands = wrap_columns(widths, label_w, content_w)
    row_h = {"slot": 14, "sentence": chip_h + 3, "concept": 14 + 2, "mixed view": cell_h + 3,
             "MLM in": chip_h + 3, "top-1": chip_h + 3, "p(top-1)": 14}
    band_h = sum(row_h[name] for name in row_names) + 12

    # ---- gallery layout: images left to right, wrapped
    sizes = []
    for picture in view.gallery:
        h, w = picture.image.shape[:2]
        scale = image_px / max(h, w)
        sizes.append((int(round(w * scale)), int(round(h * scale))))
    image_bands = wrap_columns([s[0] for s in sizes], 0, content_w, gap=gap)
    image_band_h = max([s[1] for s in sizes] + [0]) + 32 + gap

    sentence_lines = wrap_to_width(f"sentence: {view.sentence}", body, content_w)
    reason = no_patch_reason(view)
    reason_lines = [(line, bold, _NOTE) for line in wrap_to_width(f"No word is replaced: {reason}", bold, content_w)]
    if reason and view.hint:
        reason_lines += [(line, body, _BLACK) for line in wrap_to_width(view.hint, body, content_w)]
    elif not reason:
        reason_lines = []
    patch_lines = [
        (k, f"P{k}  t{p.position} '{p.word}' ({p.concept_name})  <-  region {p.region} '{p.region_name}' of image "
            f"slot {p.image_slot} (unpaired_images[{p.image_index}]), drawn among {p.candidates} "
            f"{p.concept_name} region(s) of the gallery")
        for k, p in enumerate(view.patches)]
    notes = [line for note in view.notes for line in wrap_to_width(note, small, content_w)]

    top = margin + 24
    y_bands = top + line_h * len(sentence_lines) + 30
    y_reason = y_bands + band_h * len(bands)
    y_gallery = y_reason + line_h * len(reason_lines) + (10 if reason_lines else 0) + 24
    y_patches = y_gallery + (image_band_h * len(image_bands) if view.gallery else 0)
    y_notes = y_patches + line_h * len(patch_lines) + 8
    height = y_notes + line_h * len(notes) + margin
    canvas = Image.new("RGB", (width, height), _WHITE)
    draw = ImageDraw.Draw(canvas)
    draw.text((margin, margin), view.title, fill=_BLACK, font=bold)
    for k, line in enumerate(sentence_lines):
        draw.text((margin, top + k * line_h), line, fill=_BLACK, font=body)

    # ---- header + legend
    header = "the sentence and its mixed view (cross-modal CutMix)"
    draw.text((margin, y_bands - 20), header, fill=_BLACK, font=bold)
    x = margin + int(bold.getlength(header)) + 16
    legend = [("replaced (patch)", colours.get(0, CMAL_ANCHOR_PALETTE[0]), "fill"),
              ("grounded, kept by the ratio draw", _KEPT_RGB, "kept"),
              ("grounded, no patch of its concept", CMAL_PLAIN_RGB, "dots")]
    for text, rgb, style in legend:
        chip_w = int(math.ceil(small.getlength(text))) + 8
        box = (x, y_bands - 20, x + chip_w - 1, y_bands - 6)
        if style == "fill":
            _chip(draw, box, text, small, _tint(rgb), rgb, _BLACK)
        elif style == "kept":
            _chip(draw, box, text, small, None, rgb, _BLACK, width=2)
        else:
            _chip(draw, box, text, small, None, _WHITE, _GREY)
            _dotted(draw, box, CMAL_PLAIN_RGB)
        x += chip_w + 6

    # ---- the token grid
    mixed_cells: dict[int, tuple[int, int, int, int]] = {}
    word_cells: dict[int, tuple[int, int, int, int]] = {}
    for b, band in enumerate(bands):
        ys, y = {}, y_bands + b * band_h
        for name in row_names:
            ys[name] = y
            y += row_h[name]
        for name in row_names:
            offset = (cell_h - 12) // 2 if name == "mixed view" else (3 if row_h[name] > 16 else 0)
            draw.text((margin, ys[name] + offset), name, fill=_GREY, font=small)
        x = margin + label_w
        for c in band:
            kind, k = columns[c]
            col_w = widths[c]
            if kind == "region":  # regions layout: patch k as a region slot after the text
                draw.text((x + 2, ys["slot"]), f"R{k} = P{k}", fill=colours[k], font=small)
                mixed_cells[k] = _patch_cell(canvas, draw, view.patches[k].crop, (x, ys["mixed view"]), col_w,
                                             cell_h, patch_px, colours[k], f"P{k}", small)
                x += col_w + 3
                continue
            token = view.tokens[k]
            draw.text((x + 2, ys["slot"]), str(token.position), fill=_GREY, font=small)
            word_box = (x, ys["sentence"], x + col_w - 1, ys["sentence"] + chip_h - 1)
            word_cells[token.position] = word_box
            _word_chip(draw, word_box, token, body, bold, colours)
            if token.concept >= 0:
                rgb = colours[token.patch] if token.kind == "replaced" else _GREY
                draw.text((x + 2, ys["concept"]), token.concept_name, fill=rgb, font=small)
            y_mixed = ys["mixed view"] + (cell_h - chip_h) // 2
            mixed_box = (x, y_mixed, x + col_w - 1, y_mixed + chip_h - 1)
            if token.kind == "replaced" and inline:
                mixed_cells[token.patch] = _patch_cell(canvas, draw, view.patches[token.patch].crop,
                                                       (x, ys["mixed view"]), col_w, cell_h, patch_px,
                                                       colours[token.patch], f"P{token.patch}", small)
            elif token.kind == "replaced":  # regions layout: the slot reads [MASK], not a target
                _chip(draw, mixed_box, "[MASK]", body, _tint(colours[token.patch]), colours[token.patch], _BLACK,
                      width=2)
            else:
                _word_chip(draw, mixed_box, token, body, bold, colours)
            if view.mlm:
                if token.shown:
                    _chip(draw, (x, ys["MLM in"], x + col_w - 1, ys["MLM in"] + chip_h - 1), token.shown, body,
                          *_shown_style(token))
                if token.mlm_target:
                    rgb = _RIGHT if token.prediction_id == token.token_id else _WRONG
                    _chip(draw, (x, ys["top-1"], x + col_w - 1, ys["top-1"] + chip_h - 1), token.prediction, body,
                          _tint(rgb, 0.8), rgb, _BLACK, width=2)
                    draw.text((x + 2, ys["p(top-1)"]), f"{token.prediction_prob:.2f}", fill=rgb, font=small)
            x += col_w + 3
    for k, (line, font, rgb) in enumerate(reason_lines):
        draw.text((margin, y_reason + k * line_h), line, fill=rgb, font=font)

    # ---- gallery images with the used boxes
    gallery_boxes: dict[int, tuple[int, int, int, int]] = {}
    image_boxes: dict[int, tuple[int, int, int, int]] = {}
    if view.gallery:
        draw.text((margin, y_gallery - 20),
                  f"the step's image stream (the patch gallery: {view.gallery_images} images, {view.gallery_regions} "
                  f"labelled regions): the images the patches came from", fill=_BLACK, font=bold)
    for r, image_band in enumerate(image_bands):
        x = margin
        y0 = y_gallery + r * image_band_h
        for g in image_band:
            picture, (w_px, h_px) = view.gallery[g], sizes[g]
            draw.text((x, y0), f"image slot {picture.image_slot} of the step", fill=_GREY, font=small)
            draw.text((x, y0 + 13), f"unpaired_images[{picture.image_index}]", fill=_GREY, font=small)
            iy = y0 + 28
            canvas.paste(_upscaled(picture.image, image_px), (x, iy))
            image_boxes[picture.image_slot] = (x, iy, x + w_px, iy + h_px)
            h, w = picture.image.shape[:2]
            scale = w_px / w

            def drawn(box: tuple[float, float, float, float]) -> tuple[int, int, int, int]:
                return (x + int(round(box[0] * w * scale)), iy + int(round(box[1] * h * scale)),
                        x + int(round(box[2] * w * scale)) - 1, iy + int(round(box[3] * h * scale)) - 1)

            used = {p.region: k for k, p in enumerate(view.patches) if p.image_slot == picture.image_slot}
            for i, box, _ in picture.regions:
                if i not in used:
                    draw.rectangle(drawn(box), outline=CMAL_PLAIN_RGB, width=1)
            for i, box, _ in picture.regions:
                if i in used:
                    k, rect = used[i], drawn(box)
                    draw.rectangle([rect[0] - 1, rect[1] - 1, rect[2] + 1, rect[3] + 1], outline=_WHITE, width=1)
                    draw.rectangle(rect, outline=colours[k], width=2)
                    gallery_boxes[k] = rect
            for i, k in sorted(used.items(), key=lambda item: item[1]):  # labels last: on top of every box
                rect, text = gallery_boxes[k], f"P{k} ← '{view.patches[k].word}'"
                left = max(x, min(rect[0], x + w_px - int(math.ceil(small.getlength(text))) - 4))  # inside the image
                _label(draw, (left, max(iy, rect[1] - 14)), text, small, colours[k])
            x += w_px + gap

    for line_no, (k, line) in enumerate(patch_lines):
        y = y_patches + line_no * line_h
        draw.rectangle([margin, y + 3, margin + 11, y + 14], fill=colours[k])
        draw.text((margin + 18, y), line, fill=_BLACK, font=body)
    for k, line in enumerate(notes):
        draw.text((margin, y_notes + k * line_h), line, fill=_GREY, font=small)

    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(png_path, format="PNG")
    return {"size": (width, height), "colours": colours, "mixed_cells": mixed_cells, "gallery_boxes": gallery_boxes,
            "image_boxes": image_boxes, "word_cells": word_cells}


def _dotted(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], rgb: tuple[int, int, int], step: int = 3) -> None:
    """A dotted outline of `box` (x0, y0, x1, y1 inclusive): one pixel in `step`."""
    x0, y0, x1, y1 = box
    draw.point([(x, y) for x in range(x0, x1 + 1, step) for y in (y0, y1)], fill=rgb)
    draw.point([(x, y) for y in range(y0, y1 + 1, step) for x in (x0, x1)], fill=rgb)


def _shown_style(token: VLMixerToken) -> tuple[Optional[tuple[int, int, int]], tuple[int, int, int],
                                               tuple[int, int, int]]:
    """(fill, outline, text) of the chip of what the MLM pass sees at a position: [MASK] dark, a random piece
    yellow, a kept target blue (BERT's 80/10/10), not a target plain."""
    if not token.mlm_target:
        return None, _LIGHT, _GREY if token.kind == "special" else _BLACK
    if token.shown == "[MASK]":
        return (60, 60, 60), (60, 60, 60), _WHITE
    if token.shown != token.piece:
        return (255, 236, 170), (200, 140, 0), _BLACK
    return (215, 235, 255), (90, 130, 200), _BLACK


def _word_chip(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], token: VLMixerToken, body: Any, bold: Any,
               colours: dict[int, tuple[int, int, int]]) -> None:
    """A word chip in its kind's style (see `plot_vlmixer_cutmix`)."""
    if token.kind == "replaced":
        rgb = colours[token.patch]
        _chip(draw, box, token.piece, bold, _tint(rgb), rgb, _BLACK, width=2)
    elif token.kind == "kept":
        _chip(draw, box, token.piece, bold, None, _KEPT_RGB, _BLACK, width=2)
    elif token.kind == "no_patch":
        _chip(draw, box, token.piece, body, None, _WHITE, _GREY)
        _dotted(draw, box, CMAL_PLAIN_RGB)
    elif token.kind == "special":
        _chip(draw, box, token.piece, body, None, _LIGHT, _GREY)
    else:
        _chip(draw, box, token.piece, body, None, _LIGHT, _BLACK)


def _patch_cell(canvas: Image.Image, draw: ImageDraw.ImageDraw, crop: np.ndarray, xy: tuple[int, int], col_w: int,
                cell_h: int, patch_px: int, rgb: tuple[int, int, int], tag: str,
                font: Any) -> tuple[int, int, int, int]:
    """`tag` on `rgb` at the top-left of a (col_w, cell_h) cell at `xy`, and below it `crop` upscaled to
    `patch_px`, centred and framed in `rgb`; returns the pasted crop's box (x0, y0, x1, y1) exclusive."""
    shown = _fit(crop, patch_px)
    x0 = xy[0] + (col_w - shown.width) // 2
    y0 = xy[1] + _TAG_H + (cell_h - _TAG_H - shown.height) // 2
    tw = int(math.ceil(font.getlength(tag)))
    draw.rectangle([x0 - 3, xy[1], x0 - 3 + tw + 3, xy[1] + 12], fill=rgb)
    draw.text((x0 - 1, xy[1] - 1), tag, fill=_WHITE, font=font)
    draw.rectangle([x0 - 3, y0 - 3, x0 + shown.width + 2, y0 + shown.height + 2], outline=rgb, width=3)
    canvas.paste(shown, (x0, y0))
    return (x0, y0, x0 + shown.width, y0 + shown.height)


__all__ = ["VLMIXER_SHOW_CAPTIONS", "VLMIXER_SHOW_IMAGE_PX", "VLMIXER_SPLITS", "VLMIXER_TOKEN_KINDS", "StepOfRow",
           "VLMixerCutmixView", "VLMixerGalleryImage", "VLMixerPatch", "VLMixerToken", "build_vlmixer_show",
           "no_patch_reason", "plot_vlmixer_cutmix", "show", "step_batch", "vlmixer_cutmix_view"]
