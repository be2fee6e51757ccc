"""UNITER-style single-stream baseline: MLM + masked region classification + ITM on CMAL's architecture.

Chen et al., "UNITER: UNiversal Image-TExt Representation Learning", ECCV 2020 (code ChenRocks/UNITER,
the code base CMAL forks). This is the same-architecture baseline CMAL is measured against (issue 11):
the SAME unified encoder, region features, region embedding, region classifier and ITM as CMAL
(`vlp.models.single_stream`), trained with UNITER's objectives instead of CMAL's associative ones, so a
difference between the two is what CMAL's anchors, swaps, AMC and WRC buy, not the single-stream design.

Objectives, one per optimizer step under `task_mixing: ratio` (as UNITER samples one task per batch):
  * MLM (UNITER §3.2, conditional masking): 15 % of the text's non-special tokens BERT-masked (80/10/10),
    the regions intact; cross-entropy of the tied word head at the masked tokens.
  * MRC (UNITER's masked region classification): `region_mask_prob` (15 %, UNITER) of the labelled regions
    masked, the text intact; (C+1)-way cross-entropy of the region classifier at the masked regions
    against the region's class. UNITER uses the detector's soft labels (MRC-kl) or their argmax (MRC);
    we have hard labels (the world's classes, or argmax of precomputed soft_labels), so this is MRC.
  * ITM: a row's regions replaced by another image's with p = `itm_neg_prob`; 2-way CE on the fused [CLS].
At least one target per sample where possible (UNITER: "if nothing is selected, token 0 is masked"; one
random labelled region is masked). Not reproduced: MRFR (feature regression: our region features are
pixels or a ViT's, regressing them adds little) and WRA's optimal transport (UNITER's ablation shows it
small; CMAL turns it off, cmal.md quirk 6).

Choices shared with CMAL, so the two differ only in their objectives: masked regions are zero vectors
after the region projection (cmal.md quirk 5), word vectors are the plain word embeddings (CMAL's
default `umse_norm: none`), ITM negatives come from the local batch, per-sample randomness is keyed by
`batch.sample_keys`, and the task draw is keyed by (train seed, step) through a checkpointed counter.
The default ratio MLM:MRC:ITM = 3:2:1 gives ITM the share it has in CMAL's 1:3:2.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Literal, Optional

import torch
from pydantic import Field
from torch import Tensor

from vlp.config import RunConfig, Section
from vlp.methods.base import PretrainMethod
from vlp.models.anchors import sample_uniform_index
from vlp.models.losses import IGNORE_INDEX, mask_tokens_at_least_one, mlm_loss
from vlp.models.model import VLModel
from vlp.models.regions import RegionInputs
from vlp.models.single_stream import RegionClassifier, RegionSingleStream, RegionStreamConfig
from vlp.types import Batch

SALT_TEXT = 0x55_4E_54  # "UNT": MLM draws per token
SALT_REGION = 0x55_4E_52  # "UNR": region masking per region
SALT_FALLBACK = 0x55_4E_46  # "UNF": the forced region of a sample without a region target
SALT_ITM = 0x55_4E_49  # "UNI": ITM negatives
SALT_TASK = 0x55_4E_4B  # "UNK": task of a step

TASKS = ("mlm", "mrc", "itm")


class UniterMix(Section):
    """Per-task numbers: sampling ratios (`task_ratio`) or loss weights (`task_weights`) of MLM, MRC, ITM."""

    mlm: float = Field(3.0, ge=0)
    mrc: float = Field(2.0, ge=0)
    itm: float = Field(1.0, ge=0)


class UniterConfig(RegionStreamConfig):
    """The `method:` section of the UNITER baseline (`name: uniter`; module docstring)."""

    name: Literal["uniter"] = "uniter"
    region_mask_prob: float = Field(0.15, ge=0, le=1)  # UNITER masks 15 % of the regions in MRC
    task_mixing: Literal["ratio", "sum"] = "ratio"  # ratio: one task per step (UNITER); sum: weighted sum
    task_ratio: UniterMix = Field(default_factory=UniterMix)
    task_weights: UniterMix = Field(default_factory=UniterMix)


def region_mask(region_labels: Tensor, real: Tensor, uniforms: Tensor, fallback: Tensor, prob: float) -> Tensor:
    """(B, N) bool regions to mask for MRC: every real labelled region with p = `prob` (uniforms (B, N)),
    and one labelled region (`fallback` (B,) uniforms) in a sample that has one but drew none."""
    candidates = (region_labels > 0) & real
    masked = candidates & (uniforms < prob)
    pick = sample_uniform_index(candidates, fallback)  # -1 when nothing is labelled
    need = ~masked.any(dim=1)
    forced = need[:, None] & (torch.arange(region_labels.shape[1], device=region_labels.device)[None] == pick[:, None])
    return masked | forced


class Uniter(RegionSingleStream, PretrainMethod):
    """UNITER-style baseline around a single-stream `VLModel` (module docstring).

    Own modules / state: `region_embed` (Dv -> d), `region_head` (d -> C+1), the buffer `task_step`.
    The word head is `model.mlm_head`, the ITM head `model.itm_head`. Capabilities as CMAL's: regions are
    part of every input; ranked by ITM over all pairs; retrieval fine-tuning keeps ITM alone.
    """

    name = "uniter"
    config_class = UniterConfig
    inputs = frozenset({"images", "region_boxes", "region_labels", "region_feats", "image_ids"})
    retrieval_protocols = ("itm_all", "itc_rerank")  # itc_rerank with method.first_stage only
    retrieval_finetune_overrides = ("method.task_mixing=sum", "method.task_weights.itm=1",
                                    "method.task_weights.mlm=0", "method.task_weights.mrc=0")
    demo_config = "demo_uniter"
    # a per-sample mean (MLM / MRC / ITM are means over each rank's own targets and local negatives)
    rank_independent_parts = ("labelled_region_rate",)
    OWNER = "UNITER"
    ITM_SALT = SALT_ITM
    TASKS = TASKS
    TASK_SALT = SALT_TASK
    no_label_consequence = "MRC has no targets (its loss is 0); MLM and ITM are unaffected"
    TASK_PARAMETERS = {"mlm": ("model.mlm_head.",), "mrc": ("region_head.",), "itm": ("model.itm_head.",)}

    def __init__(self, model: VLModel, cfg: UniterConfig, num_classes: int, *, mask_id: int,
                 special_ids: Iterable[int], vocab_size: int, seed: int = 0) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"UNITER's region classifier needs at least one object class, got {num_classes}")
        self.model, self.cfg = model, cfg
        self.mask_id, self.vocab_size, self.seed = int(mask_id), int(vocab_size), int(seed)
        self.register_buffer("special_ids", torch.tensor(sorted(int(i) for i in special_ids), dtype=torch.long),
                             persistent=False)
        self.init_region_stream(model, cfg)  # region_feat_dim, region_embed, _warned
        self.region_head = RegionClassifier(model.cfg.text.width, num_classes + 1, model.cfg.init_std)
        self.register_buffer("task_step", torch.zeros((), dtype=torch.long))
        self.check_task_mix()
        self.init_first_stage()  # last: method.first_stage's head (a deviation, vlp.models.first_stage)

    @classmethod
    def from_config(cls, cfg: RunConfig, model: VLModel, tokenizer: Any,
                    class_words: Optional[Sequence[Iterable[str]]] = None) -> "Uniter":
        """Build from a run config, a tokenizer (`mask_id`, `special_ids`, `vocab_size`) and the object class
        words (only their number C is used: the region classifier has C+1 outputs)."""
        if class_words is None:
            class_words = getattr(tokenizer, "class_words", None)
        if class_words is None:
            raise ValueError("UNITER needs the object classes of the data for masked region classification: pass "
                             "class_words (the detector's label vocabulary; the world's classes for data.source: world)")
        return cls(model, cfg.method, len(class_words), mask_id=tokenizer.mask_id,
                   special_ids=tokenizer.special_ids, vocab_size=tokenizer.vocab_size, seed=cfg.train.seed)

    # ------------------------------------------------------------------------------ tasks
    def mlm_mask(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """The MLM input: (masked_ids (B, T), labels (B, T), -100 = not predicted); keyed per sample."""
        ids, attn = batch.input_ids, batch.attention_mask
        eligible = attn.bool() & ~torch.isin(ids, self.special_ids)
        return mask_tokens_at_least_one(  # a sample without a target masks its first real token
            ids, eligible, self.special_ids, self.mask_id, self.vocab_size, self.cfg.mlm_prob,
            self._uniforms(batch, (ids.shape[1], 3), SALT_TEXT))

    @torch.no_grad()
    def token_counts(self, batch: Batch) -> dict[str, Tensor]:
        """{"mlm": masked tokens of `batch`}, the rank's whole step batch, when this step runs MLM (the trainer
        sums it over ranks: MLM is then the mean over the global batch's masked tokens however the step is cut
        into micro-batches, `vlp.models.losses.global_token_mean`). Empty without sample keys."""
        if batch.sample_keys is None or "mlm" not in self.tasks_to_run():
            return {}
        return {"mlm": (self.mlm_mask(batch)[1] != IGNORE_INDEX).sum()}

    def mlm(self, batch: Batch, regions: RegionInputs) -> tuple[Tensor, Tensor]:
        """MLM conditioned on the intact regions -> (loss, accuracy at the masked tokens)."""
        attn = batch.attention_mask
        masked_ids, labels = self.mlm_mask(batch)
        txt_h, _ = self.encode_joint_pair(self.word_vectors(masked_ids, attn), self.region_vectors(regions),
                                          regions.boxes, attn, regions.mask)
        selected = labels != IGNORE_INDEX
        logits = self.model.mlm_logits(txt_h[selected])
        targets = labels[selected]
        accuracy = (logits.argmax(-1) == targets).float().sum() / max(int(targets.numel()), 1)
        return mlm_loss(logits, targets, name="mlm"), accuracy.detach()  # global-batch mean

    def mrc(self, batch: Batch, regions: RegionInputs) -> tuple[Tensor, Tensor]:
        """Masked region classification conditioned on the intact text -> (loss, accuracy)."""
        N = regions.labels.shape[1]
        hidden = region_mask(regions.labels, regions.mask, self._uniforms(batch, (N,), SALT_REGION),
                             self._uniforms(batch, (1,), SALT_FALLBACK)[:, 0], self.cfg.region_mask_prob)
        attn = batch.attention_mask
        _, reg_h = self.encode_joint_pair(self.word_vectors(batch.input_ids, attn),
                                          self.region_vectors(regions, hide=hidden), regions.boxes, attn, regions.mask)
        logits = self.region_head(reg_h[hidden])
        targets = regions.labels[hidden]
        accuracy = (logits.argmax(-1) == targets).float().sum() / max(int(targets.numel()), 1)
        return mlm_loss(logits, targets), accuracy.detach()

    # ------------------------------------------------------------------------------ forward
    def forward(self, batch: Batch) -> dict[str, Tensor]:
        """One UNITER step: `loss` and detached parts `mlm`, `mlm_acc`, `mrc`, `mrc_acc`, `itm`, `itm_acc` of
        the tasks that ran (one under 'ratio' mixing in training; all with a weight otherwise), and always
        `labelled_region_rate` (per-sample share of real regions with a class: 0 = MRC has no targets)."""
        regions = self.regions(batch)
        run = self.tasks_to_run()
        parts: dict[str, Tensor] = {}
        loss = regions.feats.sum() * 0.0
        for task, weight in run.items():
            parts[task], parts[f"{task}_acc"] = getattr(self, task)(batch, regions)
            loss = loss + weight * parts[task]
        first_stage = self.first_stage_terms(batch, regions)  # {} unless method.first_stage
        if first_stage:
            parts.update(first_stage)
            loss = loss + first_stage["first_stage"]
        real = regions.mask.float()
        labelled = ((regions.labels > 0).float() * real).sum(dim=1) / real.sum(dim=1).clamp_min(1.0)
        return {"loss": loss, **{k: v.detach() for k, v in parts.items()},
                "labelled_region_rate": labelled.mean().detach()}

    @torch.no_grad()
    def on_step_end(self) -> None:
        """After each optimizer step: clamp the shared model's ITC temperature, advance the task counter."""
        self.model.clamp_temperature_()
        self.task_step.add_(1)


__all__ = ["Uniter", "UniterConfig", "UniterMix", "region_mask"]
