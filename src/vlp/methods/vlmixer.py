"""VLMixer: unpaired vision-language pre-training through cross-modal CutMix.

Wang, Jiang, Lu, Zheng, Cheng, Yin, Luo, "VLMixer: Unpaired Vision-Language Pre-training via Cross-Modal
CutMix", ICML 2022. No code was released and only the abstract and two figure captions were readable; the
spec (`simla_vlmixer.md` §2) separates what the paper confirms [PAPER] from a reconstruction [INFERRED].
Every inferred choice below is a config option.

Data: two UNPAIRED streams per step (`vlp.data.unpaired`): B sentences of a text-only corpus and B images
(regions with concept labels) of an image-only corpus; row b's sentence and image are unrelated. No
image-text pair is ever used in pre-training.

What the paper confirms [PAPER]:
  * Cross-modal CutMix (CMC, `cross_modal_cutmix`): visually grounded words of a sentence are replaced by
    image patches of the same concept, turning the sentence into a multi-modal "mixed" view;
  * MLM on the mixed view (token-level alignment: the model must read the patches to denoise);
  * contrastive learning between a sentence and its mixed view (instance-level alignment, "a proxy task of
    text-image contrast in paired VLP": `view_contrastive_loss`).
Reconstructed [INFERRED], each a `method:` option:
  * the patch gallery is the current GLOBAL batch of the image stream (all ranks' regions, gathered), not an
    offline detector dump: a grounded word of concept c gets a region labelled c drawn uniformly among the
    gallery's (keyed per sample); a word whose concept has no region in the gallery stays a word;
  * grounded words = whole-word tokens of the concept lexicon (`vlp.models.anchors.build_lexicon`, CMAL's:
    plurals, synonyms, whole tokens), each replaced with probability `cmc_ratio` (0.5); one token becomes
    one visual token, at the word's position (type embedding 1 = visual, like UNITER's region slots);
  * a visual token's vector is the region's projected feature `LN_v(W_v v)` (the region embedding's
    first half, as CMAL's swap feature filling puts region vectors into text slots);
  * where the patch goes (`cmc_layout`): `inline` (default, the paper's Figure 1: the patch takes the word's
    text slot and position) or `regions` (ours, an option: the word's slot becomes [MASK], never a target,
    and the patch joins the sequence as a region slot with its box in its source image, the layout every
    downstream task reads: [text ; regions]). Why the option: inline CMC trains text -> patch reading only
    at text positions, while fine-tuning puts the image in region slots (the report's retrieval fine-tune
    from inline VLMixer barely beats scratch); with `cmc_hole_targets` (regions layout only, off by default)
    the replaced word becomes an MLM target, to be read off the region slots (masked word prediction from
    the image, U-VisualBERT's grounding signal; a departure from "replaced slots are not targets", which
    concerns the inline layout, where the target would sit under its own patch);
  * MLM masks 15 % of the REMAINING text tokens of the mixed view (80/10/10); replaced slots are never
    targets (their word is what the patch shows, the spec's "not targets" choice) and never masked;
  * the contrast: q = g(H(T)[CLS]), k = g(H(T~)[CLS]) with g the ITC text projection (L2-normalised),
    symmetric InfoNCE over the global batch with the learnt, clamped temperature (init 0.07), no momentum;
  * the image-only objective (`image_objective`, the U-VisualBERT / mu-VLA protocol of §2.2): the image
    stream as [CLS] tags [SEP] ; regions, where tag i is the concept word of region i; masked tag prediction
    (15 % of the tags, at least one) and masked region classification (15 % of the regions, at least one),
    in one pass;
  * loss = mlm + cmcl + tag + mrc, weights 1 (`loss_weights`);
  * ours, off by default (`loss_weights.cmcl_hard`): a hard negative for the contrast. Measured on the world,
    CMCL falls to ~0.005 within 175 steps: a sentence keeps all but ~1 of its ~13 words in its mixed view,
    so the rest of the sentence matches the views and the patch is never read. The term contrasts each
    sentence's mixed view with the SAME view whose patches are of another concept (`hard_negative_view`):
    -log(e^{q.k/tau} / (e^{q.k/tau} + e^{q.k~/tau})) over the rows with a patch, so only the patches decide.
Downstream: the same single-stream encoder over [text ; regions] as CMAL / UNITER (`RegionSingleStream`),
so every task fine-tunes from a VLMixer checkpoint unchanged. Pre-training trains no ITM (there are no pairs):
ranking by ITM before a paired fine-tune is at chance by construction; `vlp finetune retrieval` trains ITM
on pairs (`retrieval_finetune_overrides`).

Shapes: B rows (sentences; images of the image stream), T tokens, N regions per image, G = world x B,
d the encoder width, E the projection width, C concepts.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Literal, NamedTuple, Optional

import torch
from pydantic import Field
from torch import Tensor

from vlp.config import RunConfig, Section
from vlp.methods.base import PretrainMethod
from vlp.models.anchors import LexiconTable, build_lexicon, sample_uniform_index
from vlp.models.losses import (
    IGNORE_INDEX,
    all_gather_no_grad,
    all_gather_with_grad,
    contrastive_loss,
    mask_tokens_at_least_one,
    mlm_loss,
)
from vlp.models.model import VLModel
from vlp.models.regions import RegionInputs
from vlp.models.single_stream import RegionClassifier, RegionSingleStream, RegionStreamConfig
from vlp.types import Batch

SALT_CMC = 0x564D43  # "VMC": which grounded words are replaced, and by which patch
SALT_MLM = 0x564D4D  # "VMM": MLM draws on the mixed view
SALT_TAG = 0x564D54  # "VMT": tag masking
SALT_MRC = 0x564D52  # "VMR": region masking
SALT_ITM = 0x564D49  # "VMI": ITM negatives (paired fine-tuning)
SALT_HARD = 0x564D48  # "VMH": the wrong-concept patches of the hard-negative mixed view


class VLMixerWeights(Section):
    mlm: float = Field(1.0, ge=0)  # MLM on the mixed view
    cmcl: float = Field(1.0, ge=0)  # sentence <-> mixed-view contrast
    cmcl_hard: float = Field(0.0, ge=0)  # ours: own mixed view vs the same view with wrong-concept patches
    tag: float = Field(1.0, ge=0)  # image stream: masked tag prediction
    mrc: float = Field(1.0, ge=0)  # image stream: masked region classification
    itm: float = Field(0.0, ge=0)  # paired fine-tuning only (there are no pairs in pre-training)


class VLMixerConfig(RegionStreamConfig):
    """The `method:` section of VLMixer (`name: vlmixer`); every field below `name` is INFERRED (docstring)."""

    name: Literal["vlmixer"] = "vlmixer"
    cmc_ratio: float = Field(0.5, ge=0.0, le=1.0)  # P(a grounded word is replaced by a patch)
    region_mask_prob: float = Field(0.15, ge=0.0, le=1.0)  # MRC on the image stream
    tag_mask_prob: float = Field(0.15, ge=0.0, le=1.0)  # masked tag prediction on the image stream
    image_objective: Literal["tags_mrc", "mrc", "none"] = "tags_mrc"
    cmc_layout: Literal["inline", "regions"] = "inline"  # where a patch goes: the word's slot, or a region slot
    cmc_hole_targets: bool = False  # regions layout: the replaced word (its slot reads [MASK]) is an MLM target
    loss_weights: VLMixerWeights = Field(default_factory=VLMixerWeights)


def grounded_concepts(input_ids: Tensor, attention_mask: Tensor, table: LexiconTable | Tensor) -> Tensor:
    """(B, T) long: the concept (0-based class id) each token names, -1 for tokens naming none (specials
    and padding never do). A token naming several concepts takes the first. Vectorised lookup in the
    lexicon's (C, V) table (a `LexiconTable` or its `class_token`)."""
    class_token = (table.class_token if isinstance(table, LexiconTable) else table).to(input_ids.device)  # (C, V)
    names = class_token.any(dim=0)  # (V,)
    first = class_token.long().argmax(dim=0)  # (V,) first concept of each token
    concept_of_token = torch.where(names, first, torch.full_like(first, -1))
    concepts = concept_of_token[input_ids.clamp(0, class_token.shape[1] - 1)]
    return concepts.masked_fill(~attention_mask.bool(), -1)


def cross_modal_cutmix(concepts: Tensor, gallery_labels: Tensor, gallery_mask: Tensor, uniforms: Tensor,
                       ratio: float) -> tuple[Tensor, Tensor]:
    """Cross-modal CutMix (VLMixer's CMC, spec §2.3): which text slots become visual tokens, and which patch.

    Args:
        concepts: (B, T) the concept of each token (`grounded_concepts`), -1 = not grounded.
        gallery_labels: (K,) the concept of each gallery patch as region labels (class id + 1, 0 = none).
        gallery_mask: (K,) bool, real patches.
        uniforms: (B, T, 2) in [0, 1): [..., 0] decides the replacement (< ratio), [..., 1] picks the patch.
        ratio: the CMC ratio r.

    Returns:
        replaced (B, T) bool, and patch (B, T) long: the gallery index of each replaced slot's patch (-1 where
        not replaced). A grounded word is replaced with probability `ratio` when the gallery holds a patch
        of its concept, by one drawn uniformly among them; with ratio 0 nothing is replaced.
    """
    B, T = concepts.shape
    grounded = concepts >= 0
    allowed = ((concepts.reshape(-1, 1) + 1) == gallery_labels[None, :]) & gallery_mask[None, :]  # (B*T, K)
    allowed &= grounded.reshape(-1, 1)
    patch = sample_uniform_index(allowed, uniforms[..., 1].reshape(-1)).reshape(B, T)  # -1: no patch
    replaced = grounded & (patch >= 0) & (uniforms[..., 0] < ratio)
    return replaced, torch.where(replaced, patch, torch.full_like(patch, -1))


def view_contrastive_loss(text_view: Tensor, mixed_view: Tensor, temperature: Tensor | float) -> Tensor:
    """CMCL: symmetric InfoNCE between each sentence's view q (B, E) and its mixed view k (B, E) (both
    L2-normalised), positives on the diagonal, columns over the global batch (spec §2.3, `contrastive_loss`)."""
    return contrastive_loss(text_view, mixed_view, temperature, gather=True)


def hard_view_loss(text_view: Tensor, mixed_view: Tensor, hard_view: Tensor, usable: Tensor,
                   temperature: Tensor | float) -> tuple[Tensor, Tensor]:
    """The hard-negative term (ours, module docstring): for rows b with `usable[b]`, cross-entropy of picking
    the own mixed view k_b over the wrong-concept view k~_b given the sentence q_b (all (B, E), L2-normalised):
    mean of -log softmax([q.k, q.k~] / tau)[0]; and its accuracy (share of rows with q.k > q.k~). 0 (on the
    graph) when no row is usable. A per-row term: no gather, rank-independent."""
    pos = (text_view * mixed_view).sum(-1) / temperature
    neg = (text_view * hard_view).sum(-1) / temperature
    per_row = torch.nn.functional.softplus(neg - pos)  # -log(e^pos / (e^pos + e^neg))
    weight = usable.to(per_row.dtype)
    count = weight.sum().clamp_min(1.0)
    return (per_row * weight).sum() / count, ((pos > neg).to(per_row.dtype) * weight).sum().detach() / count


class MixedView(NamedTuple):
    """A batch's sentences after CMC: words (B, T, d) the plain word vectors, replaced (B, T) bool the slots
    holding a patch, patches (B, T, d) and patch_boxes (B, T, 7) each slot's patch vector and its box in its
    source image (meaningful where replaced), patch_index (B, T) long the patch's index in the gallery (-1
    where not replaced), concepts (B, T) each token's concept (-1 none), gallery the step's global gallery
    as CMC drew from it (the hard-negative view draws from it too): vectors (K, d), labels (K,), real (K,)
    bool, boxes (K, 7). Derived: `grounded` (B, T) bool the tokens naming a concept, `slots` (B, T, d) the
    mixed view's slot vectors in the inline layout (the patch in a replaced slot, else the word)."""

    words: Tensor
    replaced: Tensor
    patches: Tensor
    patch_boxes: Tensor
    patch_index: Tensor
    concepts: Tensor
    gallery: tuple[Tensor, Tensor, Tensor, Tensor]

    @property
    def grounded(self) -> Tensor:
        return self.concepts >= 0

    @property
    def slots(self) -> Tensor:
        return torch.where(self.replaced[..., None], self.patches, self.words)


def wrong_concept_patches(concepts: Tensor, replaced: Tensor, gallery_labels: Tensor, gallery_mask: Tensor,
                          uniforms: Tensor) -> Tensor:
    """(B, T) long: for each replaced slot, a gallery patch of ANOTHER concept (uniform among the real,
    labelled patches whose label differs from the word's), -1 elsewhere or when the gallery has none.
    concepts (B, T) as `grounded_concepts`; gallery_labels (K,) class id + 1; gallery_mask (K,); uniforms (B, T)."""
    B, T = concepts.shape
    allowed = (gallery_labels[None, :] > 0) & gallery_mask[None, :] \
        & ((concepts.reshape(-1, 1) + 1) != gallery_labels[None, :]) & replaced.reshape(-1, 1)
    return sample_uniform_index(allowed, uniforms.reshape(-1)).reshape(B, T)


def compact_patches(replaced: Tensor, patches: Tensor, patch_boxes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The replaced slots' patches as region slots (the `regions` CMC layout), in sentence order.

    Args: replaced (B, T) bool; patches (B, T, d); patch_boxes (B, T, k).
    Returns: region vectors (B, R, d), boxes (B, R, k), mask (B, R) bool, R = max(1, most patches in a row);
    row b's first replaced.sum() slots are its patches, left to right, the rest padding.
    """
    counts = replaced.sum(dim=1)  # (B,)
    R = max(1, int(counts.max()))
    order = torch.argsort((~replaced).to(torch.int8), dim=1, stable=True)[:, :R]  # replaced positions first
    mask = torch.arange(R, device=replaced.device)[None, :] < counts[:, None]
    vecs = patches.gather(1, order[..., None].expand(-1, -1, patches.shape[-1]))
    boxes = patch_boxes.gather(1, order[..., None].expand(-1, -1, patch_boxes.shape[-1]))
    return vecs.masked_fill(~mask[..., None], 0.0), boxes.masked_fill(~mask[..., None], 0.0), mask


class VLMixer(RegionSingleStream, PretrainMethod):
    """VLMixer around a single-stream `VLModel` (module docstring: CMC, objectives, inferred choices).

    Own modules / state: `region_embed` (region features -> d), `region_head` (d -> C+1, MRC), the lexicon
    (buffer `concept_table` (C, V) bool) and `tag_tokens` (C+1,) long (the word of each concept, for tags).
    Capabilities: unpaired streams in (`unpaired_text`, `unpaired_images`); regions in every downstream
    input; ranked by ITM over all pairs (untrained before a paired fine-tune); retrieval fine-tuning trains ITM.
    """

    name = "vlmixer"
    config_class = VLMixerConfig
    inputs = frozenset({"unpaired_text", "unpaired_images", "images", "region_boxes", "region_labels",
                        "region_feats"})
    retrieval_protocols = ("itm_all",)
    retrieval_finetune_overrides = ("method.loss_weights.itm=1", "method.loss_weights.mlm=0",
                                    "method.loss_weights.cmcl=0", "method.loss_weights.tag=0",
                                    "method.loss_weights.mrc=0")
    demo_config = "demo_vlmixer"
    figure = "vlp.figures.vlmixer_cutmix"
    # CMC draws from the gathered global gallery with keyed uniforms and CMCL spans the global batch
    rank_independent_parts = ("cmcl", "cmc_tokens", "grounded")  # per-row means; cmc_rate is a per-rank ratio
    OWNER = "VLMixer"
    ITM_SALT = SALT_ITM
    no_label_consequence = ("no word is grounded in a patch (CMC replaces nothing) and the image-only objectives "
                            "have no targets")

    def __init__(self, model: VLModel, cfg: VLMixerConfig, table: LexiconTable, tag_tokens: Tensor, *,
                 mask_id: int, cls_id: int, sep_id: int, special_ids: Iterable[int], vocab_size: int,
                 seed: int = 0) -> None:
        super().__init__()
        self.model, self.cfg = model, cfg
        self.mask_id, self.vocab_size, self.seed = int(mask_id), int(vocab_size), int(seed)
        self.cls_id, self.sep_id = int(cls_id), int(sep_id)
        self.register_buffer("special_ids", torch.tensor(sorted(int(i) for i in special_ids), dtype=torch.long),
                             persistent=False)
        self.init_region_stream(model, cfg)
        self.region_head = RegionClassifier(model.cfg.text.width, table.num_classes + 1, model.cfg.init_std)
        self.register_buffer("concept_table", table.class_token.clone(), persistent=False)
        self.register_buffer("tag_tokens", tag_tokens.long(), persistent=False)
        self.register_buffer("task_step", torch.zeros((), dtype=torch.long))
        if cfg.cmc_hole_targets and cfg.cmc_layout != "regions":
            raise ValueError("method.cmc_hole_targets needs method.cmc_layout=regions: in the inline layout the "
                             "replaced word's slot holds its own patch, so its word is not a target (spec §2.3)")
        if cfg.first_stage and cfg.loss_weights.itm == 0:
            raise ValueError("method.first_stage: VLMixer pre-trains on unpaired data, which has no (image, text) "
                             "pairs to train a first retrieval stage on; add it in paired retrieval fine-tuning "
                             "(vlp finetune retrieval --set method.first_stage=true), where ITM trains on pairs")
        self.init_first_stage()  # last: trained on the paired batches of retrieval fine-tuning only

    @classmethod
    def from_config(cls, cfg: RunConfig, model: VLModel, tokenizer: Any,
                    class_words: Optional[Sequence[Iterable[str]]] = None) -> "VLMixer":
        """Build from a run config, a tokenizer and the concept words (index = class id): the lexicon grounds
        words (CMAL's `build_lexicon`), and each concept's tag is its first word that is a whole token."""
        if class_words is None:
            class_words = getattr(tokenizer, "class_words", None)
        if not class_words:
            raise ValueError("VLMixer grounds words in image patches by concept: pass class_words (the detector's "
                             "label vocabulary; the world's classes for data.source: world)")
        table = build_lexicon(class_words, tokenizer)
        tags = [tokenizer.pad_id]  # label 0 (no concept): no tag
        for words in class_words:
            # a set (the world's synonyms) has no order across processes: sort it; a list keeps its first name
            words = [words] if isinstance(words, str) else sorted(words) if isinstance(words, (set, frozenset)) \
                else list(words)
            whole = [w for phrase in words for w in str(phrase).split() if tokenizer.is_whole_word(w)]
            tags.append(int(tokenizer.word_id(whole[0])) if whole else tokenizer.pad_id)
        return cls(model, cfg.method, table, torch.tensor(tags), mask_id=tokenizer.mask_id, cls_id=tokenizer.cls_id,
                   sep_id=tokenizer.sep_id, special_ids=tokenizer.special_ids, vocab_size=tokenizer.vocab_size, seed=cfg.train.seed)

    # ------------------------------------------------------------------------------ bookkeeping
    def unused_parameters(self) -> set[str]:
        """The region stream's never-trained parameters, less the text projection and temperature (CMCL's g
        and tau), plus the heads of zero-weight objectives."""
        w = self.cfg.loss_weights
        prefixes = [p for p in self.region_unused_prefixes() if p not in ("model.text_proj.", "model.temp")]
        if w.cmcl == 0 and w.cmcl_hard == 0:
            prefixes += ["model.text_proj.", "model.temp"]
        if w.itm == 0:
            prefixes.append("model.itm_head.")
        if w.mlm == 0 and (w.tag == 0 or self.cfg.image_objective != "tags_mrc"):
            prefixes.append("model.mlm_head.")
        if w.mrc == 0 or self.cfg.image_objective == "none":
            prefixes.append("region_head.")
        if w.mlm == 0 and w.cmcl == 0 and w.cmcl_hard == 0 and w.itm == 0:
            prefixes.append("model.text.token_type_embeddings.")
        return {name for name, p in self.named_parameters()
                if p.requires_grad and any(name.startswith(x) for x in prefixes)}

    def itm_steps(self, steps: int) -> int:
        """ITM trains only in paired fine-tuning (its weight > 0); pre-training has no pairs."""
        return int(steps) if self.cfg.loss_weights.itm > 0 else 0

    @torch.no_grad()
    def on_step_end(self) -> None:
        self.model.clamp_temperature_()
        self.task_step.add_(1)

    # ------------------------------------------------------------------------------ encoder over text slots
    def encode_text_slots(self, slot_vecs: Tensor, attn: Tensor, visual: Optional[Tensor] = None) -> Tensor:
        """A text-only sequence (B, T, d) of slot vectors through the unified encoder (no region slots):
        LN(e + P[t] + S[type]) with type 1 at visual tokens, then the single-stream stack -> (B, T, d)."""
        types = None if visual is None else visual.long()
        x = self.model.text.embed(word_embeds=slot_vecs, token_type_ids=types)
        return self.model.fusion.encode_joint(x, attn.bool())

    # ------------------------------------------------------------------------------ objectives
    def mixed_view(self, batch: Batch, regions: RegionInputs) -> MixedView:
        """CMC on this batch's sentences with the global gallery of this step's image stream."""
        ids, attn = batch.input_ids, batch.attention_mask
        region_vecs = self.region_vectors(regions)  # (B, N, d)
        gallery = all_gather_with_grad(region_vecs).flatten(0, 1)  # (G*N, d)
        labels = all_gather_no_grad(regions.labels).flatten()
        real = all_gather_no_grad(regions.mask).flatten().bool()
        boxes = all_gather_no_grad(regions.boxes).flatten(0, 1)  # (G*N, 7)
        concepts = grounded_concepts(ids, attn, self.concept_table)
        replaced, patch = cross_modal_cutmix(concepts, labels, real, self._uniforms(batch, (ids.shape[1], 2), SALT_CMC),
                                             self.cfg.cmc_ratio)
        words = self.word_vectors(ids, attn)
        patches = gallery[patch.clamp(min=0)].to(words.dtype)  # (B, T, d)
        return MixedView(words, replaced, patches, boxes[patch.clamp(min=0)], patch, concepts,
                         (gallery, labels, real, boxes))

    def hard_negative_view(self, batch: Batch, view: MixedView) -> tuple[MixedView, Tensor]:
        """The mixed view with each patch swapped for a patch of another concept (`wrong_concept_patches`, from
        the gallery CMC drew from) -> (that view, (B,) bool rows where every replaced slot got a wrong patch
        and there is at least one: the rows the hard term scores)."""
        gallery, labels, real, boxes = view.gallery
        T = view.replaced.shape[1]
        wrong = wrong_concept_patches(view.concepts, view.replaced, labels, real,
                                      self._uniforms(batch, (T,), SALT_HARD))
        usable = view.replaced.any(dim=1) & ((wrong >= 0) | ~view.replaced).all(dim=1)
        replaced = view.replaced & usable[:, None]
        patches = gallery[wrong.clamp(min=0)].to(view.words.dtype)
        return view._replace(replaced=replaced, patches=patches, patch_boxes=boxes[wrong.clamp(min=0)],
                             patch_index=torch.where(replaced, wrong, torch.full_like(wrong, -1))), usable

    def mlm_targets(self, batch: Batch, view: MixedView) -> tuple[Tensor, Tensor]:
        """MLM on the mixed view -> (masked ids (B, T), labels (B, T), -100 = not a target): 15 % of the
        remaining text tokens (80/10/10, at least one per row); replaced slots are never masked and, unless
        `cmc_hole_targets`, never targets."""
        ids, attn = batch.input_ids, batch.attention_mask
        eligible = attn.bool() & ~view.replaced & ~torch.isin(ids, self.special_ids)
        masked_ids, labels = mask_tokens_at_least_one(
            ids, eligible, self.special_ids, self.mask_id, self.vocab_size, self.cfg.mlm_prob,
            self._uniforms(batch, (ids.shape[1], 3), SALT_MLM))
        if self.cfg.cmc_hole_targets:  # the holes' words, predicted from the region slots
            labels = torch.where(view.replaced, ids, labels)
        return masked_ids, labels

    def encode_mixed(self, view: MixedView, ids: Tensor, attn: Tensor) -> Tensor:
        """The mixed view (`ids` (B, T): the sentence, possibly MLM-masked) through the encoder -> text states
        (B, T, d). `inline`: the patches sit in their words' slots (type 1 there); `regions`: those slots read
        [MASK] and the patches follow the text as region slots with their boxes (`compact_patches`)."""
        if self.cfg.cmc_layout == "inline":
            slots = torch.where(view.replaced[..., None], view.patches, self.word_vectors(ids, attn))
            return self.encode_text_slots(slots, attn, view.replaced)
        holes = ids.masked_fill(view.replaced, self.mask_id)
        vecs, boxes, mask = compact_patches(view.replaced, view.patches, view.patch_boxes)
        return self.encode_joint_pair(self.word_vectors(holes, attn), vecs, boxes, attn, mask)[0]

    def image_only(self, batch: Batch, regions: RegionInputs) -> dict[str, Tensor]:
        """The image stream alone as [CLS] tags [SEP] ; regions: masked tag prediction and masked region
        classification in one pass -> {tag, tag_acc, mrc, mrc_acc} (spec §2.2's protocol)."""
        labels, real = regions.labels, regions.mask.bool()
        B, N = labels.shape
        device = labels.device
        parts: dict[str, Tensor] = {}
        tags = self.tag_tokens[labels]  # (B, N) word of each region's concept
        has_tag = real & (labels > 0) & (tags != self.model.pad_id) & (self.cfg.image_objective == "tags_mrc")
        ends = torch.ones(B, 1, dtype=torch.long, device=device)
        ids = torch.cat([ends * self.cls_id, torch.where(has_tag, tags, torch.full_like(tags, self.model.pad_id)),
                         ends * self.sep_id], dim=1)  # [CLS] tags [SEP]
        attn = torch.cat([ends.bool(), has_tag, ends.bool()], dim=1)
        tag_eligible = torch.cat([torch.zeros(B, 1, dtype=torch.bool, device=device), has_tag,
                                  torch.zeros(B, 1, dtype=torch.bool, device=device)], dim=1)
        masked_ids, tag_labels = mask_tokens_at_least_one(
            ids, tag_eligible, self.special_ids, self.mask_id, self.vocab_size, self.cfg.tag_mask_prob,
            self._uniforms(batch, (ids.shape[1], 3), SALT_TAG))
        region_eligible = real & (labels > 0)
        region_draws = self._uniforms(batch, (N, 3), SALT_MRC)
        _, region_targets = mask_tokens_at_least_one(
            labels, region_eligible, [], 0, 2, self.cfg.region_mask_prob, region_draws)
        hidden = region_targets != IGNORE_INDEX  # (B, N) regions to classify: their features are zeroed
        txt_h, reg_h = self.encode_joint_pair(self.word_vectors(masked_ids, attn.long()),
                                              self.region_vectors(regions, hide=hidden), regions.boxes,
                                              attn.long(), regions.mask)
        # mlm_loss is a collective under DDP (the global count of positions): called on every rank even
        # when this rank's batch has no position to predict (it is then exactly 0, attached to the graph)
        if self.cfg.image_objective == "tags_mrc" and self.cfg.loss_weights.tag != 0:
            selected = tag_labels != IGNORE_INDEX
            logits = self.model.mlm_logits(txt_h[selected])
            targets = tag_labels[selected]
            parts["tag"] = mlm_loss(logits, targets)
            parts["tag_acc"] = ((logits.argmax(-1) == targets).float().sum() / max(int(targets.numel()), 1)).detach()
        if self.cfg.loss_weights.mrc != 0:
            logits = self.region_head(reg_h[hidden])
            targets = labels[hidden]
            parts["mrc"] = mlm_loss(logits, targets)
            parts["mrc_acc"] = ((logits.argmax(-1) == targets).float().sum() / max(int(targets.numel()), 1)).detach()
        return parts

    # ------------------------------------------------------------------------------ forward
    def forward(self, batch: Batch) -> dict[str, Tensor]:
        """One VLMixer step on an unpaired batch (B sentences, B unrelated images): `loss` and detached parts
        `mlm`, `mlm_acc`, `cmcl`, (with its weight) `cmcl_hard`, `cmcl_hard_acc`, `tag`, `tag_acc`, `mrc`, `mrc_acc`, `cmc_rate` (share of grounded tokens
        replaced), `grounded` / `cmc_tokens` (grounded / replaced tokens per sentence); with an ITM weight (paired fine-tuning) `itm`,
        `itm_acc`."""
        w = self.cfg.loss_weights
        ids, attn = batch.input_ids, batch.attention_mask
        regions = self.regions(batch)
        zero = regions.feats.sum() * 0.0
        parts: dict[str, Tensor] = {}
        if w.mlm != 0 or w.cmcl != 0 or w.cmcl_hard != 0:
            view = self.mixed_view(batch, regions)
            replaced, grounded = view.replaced, view.grounded
            parts["cmc_rate"] = (replaced.sum() / grounded.sum().clamp_min(1)).float().detach()
            parts["grounded"] = grounded.sum(dim=1).float().mean().detach()
            parts["cmc_tokens"] = replaced.sum(dim=1).float().mean().detach()
            if w.cmcl != 0 or w.cmcl_hard != 0:
                if self.cfg.cmc_layout == "inline":  # both views in one pass
                    both = self.encode_text_slots(torch.cat([view.words, view.slots]), torch.cat([attn, attn]),
                                                  torch.cat([torch.zeros_like(replaced), replaced]))
                    views = self.model.text_embed(both)  # (2B, E): g(H[CLS])
                    text_view, mixed_view = views[: len(batch)], views[len(batch):]
                else:
                    text_view = self.model.text_embed(self.encode_text_slots(view.words, attn))
                    mixed_view = self.model.text_embed(self.encode_mixed(view, ids, attn))
                if w.cmcl != 0:
                    parts["cmcl"] = view_contrastive_loss(text_view, mixed_view, self.model.temperature())
                if w.cmcl_hard != 0:
                    hard, usable = self.hard_negative_view(batch, view)
                    hard_view = self.model.text_embed(self.encode_mixed(hard, ids, attn))
                    parts["cmcl_hard"], parts["cmcl_hard_acc"] = hard_view_loss(
                        text_view, mixed_view, hard_view, usable, self.model.temperature())
            if w.mlm != 0:
                masked_ids, labels = self.mlm_targets(batch, view)
                hidden = self.encode_mixed(view, masked_ids, attn)
                selected = labels != IGNORE_INDEX
                logits = self.model.mlm_logits(hidden[selected])
                targets = labels[selected]
                parts["mlm"] = mlm_loss(logits, targets)
                parts["mlm_acc"] = ((logits.argmax(-1) == targets).float().sum()
                                    / max(int(targets.numel()), 1)).detach()
        if self.cfg.image_objective != "none" and (w.tag != 0 or w.mrc != 0):
            parts.update(self.image_only(batch, regions))
        if w.itm != 0:  # paired batches (retrieval fine-tuning): ITM, and the first stage when configured
            parts["itm"], parts["itm_acc"] = self.itm(batch, regions)
            parts.update(self.first_stage_terms(batch, regions))
        loss = zero
        for key in ("mlm", "cmcl", "cmcl_hard", "tag", "mrc", "itm"):
            if key in parts:
                loss = loss + getattr(w, key) * parts[key]
        if "first_stage" in parts:  # weight 1: its gradient stays in the head (vlp.models.first_stage)
            loss = loss + parts["first_stage"]
        return {"loss": loss, **{k: v.detach() for k, v in parts.items()}}


__all__ = ["MixedView", "VLMixer", "VLMixerConfig", "VLMixerWeights", "compact_patches", "cross_modal_cutmix",
           "grounded_concepts", "hard_view_loss", "view_contrastive_loss", "wrong_concept_patches"]
