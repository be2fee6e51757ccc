"""The method contract: what every pre-training method is, and what it declares about itself.

A method is one file in `vlp/methods/` (its masking, its losses, its step), one config section class (a
`vlp.config.MethodConfig` subclass, the `method:` part of a YAML config) and one line in the registry
(`vlp.methods.METHODS`). Everything else in vlp — the trainer, evaluation, fine-tuning, the data sources,
the CLI, the demo and `vlp bench` — asks the method class or instance through the attributes below and
never names a method. The method-contract test (`tests/test_method_contract.py`) runs over every
registry entry, so a new method gets those checks by registering.

Shapes: B batch, T tokens, N regions, D fused width, Dr region width, E ITC embedding width.

Training (`vlp.train.loop.Trainer`):
  * `forward(batch: Batch) -> dict[str, Tensor]`: `loss` (0-d, differentiable) plus detached 0-d parts
    (named losses, accuracies) that are logged as they are.
  * `on_step_end()`: after every optimizer step (EMA updates, queue writes, clamps, counters).
  * `unused_parameters() -> set[str]`: names (as in `named_parameters()`) of trainable parameters a
    training step may leave without a gradient; DDP's `find_unused_parameters` is on iff it is not empty.
  * `itm_steps(steps) -> int | None`: how many of the first `steps` optimizer steps train ITM (None: no
    ITM); pre-training writes it beside the retrieval metrics (`eval/itm_steps`).
  * `images_to_prepare() -> int` and `prepare(images (n, 3, H, W)) -> dict[str, float]`: data-dependent
    state fitted before the first step (SIMLA's visual tokenizer). The trainer calls `prepare` with the
    first `images_to_prepare()` distinct training images (`vlp.data.datasets.distinct_images`, the same on
    every rank) when a run starts at step 0 and the count is > 0; the state lives in the method's
    `state_dict`, so a resume or a checkpoint load brings it back (and the count is then 0).
    `prepared_state` names the submodule holding it, with `save(path, **metadata)`: `vlp tokenizer image`
    fits it ahead of a run and writes it to a file the method's config can name.

Downstream (`vlp.tasks`):
  * `encode_pair(images, input_ids, attention_mask, region_boxes=None, region_mask=None,
    region_feats=None) -> PairOutput` (cls (B, D), regions (B, N, Dr) when boxes or features are given)
    and `pair_dims -> (D, Dr)`.

Retrieval (`vlp.tasks.retrieval.evaluate_method_retrieval`), by the protocols in `retrieval_protocols`:
  * "itc":     `itc_model`: an object with the `VLModel` unimodal interface (`encode_image`,
               `encode_text`, `image_embed`, `text_embed`), ranked by ITC similarity;
  * "itc_itm": the same, ITC top-k re-ranked by the ITM head (`itc_model` must also have `fuse` and
               `itm_logits`: ALBEF's protocol);
  * "itm_all": `itm_pair_inputs(images (B,3,H,W), region_boxes (B,N,4)|None, region_mask (B,N)|None)
               -> tuple of (B, ...)` computed once per image, and `itm_pair_scores(*rows, input_ids,
               attention_mask) -> (P,)` the matched-class ITM logit of P pairs (UNITER's protocol: every
               image against every text).
  * "itc_rerank": a method without ITC but with a first retrieval stage (`vlp.models.first_stage`):
               `first_stage_image_embeds(*itm_pair_inputs rows) -> (B, E)` and `first_stage_text_embeds(
               input_ids, attention_mask) -> (B, E)`, L2-normalised; their cosine ranks, and the top
               `eval.k_rerank` of each query are re-ranked by `itm_pair_scores` (linear in the set size).
  `retrieval_protocols_for(itm_all)` picks the ones an evaluation runs (a method may override it, e.g.
  when a protocol depends on its config). The first protocol is the method's headline; "itm_all" is also
  run for a method that lists it later when `eval.itm_all` is set (like-for-like with single-stream methods).

Declared capabilities (class attributes):
  * `name`, `config_class`: the registry key and the `method:` section class.
  * `inputs`: the `Batch` fields the method reads besides the text ("images", "region_boxes",
    "region_labels", "region_feats", "image_ids", later "unpaired_text" / "unpaired_images").
    "region_boxes" in `inputs` means regions are part of every downstream input (single stream).
  * `retrieval_finetune_overrides`: `--set` overrides that turn the pre-training objective into the
    retrieval fine-tuning objective (`vlp finetune retrieval`).
  * `region_feature_dim(cfg) -> int | None` (classmethod): the width of precomputed detector features the
    method takes (`data.source: regions`, `task.region_features`), None when it encodes pixels only.
  * `figure`: the module (import path) of the method's inspection figure, or None; `vlp show METHOD`
    imports it and calls its `show(out, config=..., checkpoint=..., **options)`.
  * `demo_config`: the shipped config `vlp demo --methods NAME` pre-trains (None: not in the demo);
    `in_demo_by_default`: whether a bare `vlp demo` runs it (the demo must stay within 10 CPU minutes).
  * `itm_all_from_text_states`: "itm_all" may run through `itc_model`'s cached unimodal text states
    (`encode_text` once per text, then `fuse` + `itm_logits` per pair: ALBEF, whose text encoder does not
    see the image) instead of `itm_pair_scores` re-encoding the text of every pair; same scores.
  * `rank_independent_parts`: the logged parts of `forward` that do not depend on how the global batch
    is split over ranks (gathered features, keyed randomness); the contract test checks that they agree
    between 2 gloo processes and 1. Parts left out are honest about their dependence (e.g. a mean over
    each rank's own masked tokens).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, ClassVar, Optional

from torch import Tensor, nn

from vlp.config import MethodConfig, RunConfig
from vlp.types import Batch, PairOutput

RETRIEVAL_PROTOCOLS = ("itc", "itc_itm", "itm_all", "itc_rerank")
BATCH_INPUTS = frozenset({"images", "region_boxes", "region_labels", "region_feats", "image_ids",
                          "unpaired_text", "unpaired_images"})


class PretrainMethod(nn.Module):
    """Base class of the pre-training methods (the contract is the module docstring).

    Subclasses set the class attributes, implement `from_config`, `forward`, `encode_pair`, `pair_dims`
    and the scoring functions of their retrieval protocols, and hold the shared `VLModel` as `.model`.
    """

    name: ClassVar[str]
    config_class: ClassVar[type[MethodConfig]]
    inputs: ClassVar[frozenset[str]] = frozenset({"images"})
    retrieval_protocols: ClassVar[tuple[str, ...]] = ()
    retrieval_finetune_overrides: ClassVar[tuple[str, ...]] = ()
    figure: ClassVar[Optional[str]] = None
    demo_config: ClassVar[Optional[str]] = None
    in_demo_by_default: ClassVar[bool] = False
    rank_independent_parts: ClassVar[tuple[str, ...]] = ()
    prepared_state: ClassVar[Optional[str]] = None
    itm_all_from_text_states: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        unknown = [p for p in cls.retrieval_protocols if p not in RETRIEVAL_PROTOCOLS]
        if unknown:
            raise TypeError(f"{cls.__name__}.retrieval_protocols has unknown protocol(s) {unknown} "
                            f"(known: {', '.join(RETRIEVAL_PROTOCOLS)})")
        extra = set(cls.inputs) - BATCH_INPUTS
        if extra:
            raise TypeError(f"{cls.__name__}.inputs has unknown batch field(s) {sorted(extra)} "
                            f"(known: {', '.join(sorted(BATCH_INPUTS))})")

    # ------------------------------------------------------------------------------ building
    @classmethod
    def from_config(cls, cfg: RunConfig, model: nn.Module, tokenizer: Any,
                    class_words: Optional[Sequence[Iterable[str]]] = None) -> "PretrainMethod":
        """Build around `model` from a run config (`cfg.method` is `config_class`), a tokenizer exposing
        `pad_id`, `mask_id`, `cls_id`, `special_ids`, `vocab_size`, and the object-class words of the data
        (index = class id; methods may not import `vlp.data`, so the caller passes them)."""
        raise NotImplementedError

    @classmethod
    def region_feature_dim(cls, cfg: RunConfig) -> Optional[int]:
        """Width D of the precomputed region features the method takes, None if it encodes pixels only."""
        return None

    # ------------------------------------------------------------------------------ training
    def forward(self, batch: Batch) -> dict[str, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def on_step_end(self) -> None:
        """After every optimizer step; the default clamps the shared ITC temperature."""
        clamp = getattr(self.model, "clamp_temperature_", None)
        if callable(clamp):
            clamp()

    def unused_parameters(self) -> set[str]:
        """Trainable parameters a training step may leave without gradient (default: none)."""
        return set()

    def separately_clipped(self) -> tuple[str, ...]:
        """Parameter-name prefixes of heads trained on detached inputs (e.g. `vlp.models.first_stage`): the
        trainer clips their gradients as a group of their own, so they cannot change the method's clipped
        update (default: none)."""
        return ()

    def itm_steps(self, steps: int) -> Optional[int]:
        """How many of the first `steps` optimizer steps train the ITM head (None: the method has no ITM).
        Reported next to every retrieval number (`eval/itm_steps`): ITM needs ~100-150 steps to leave its
        prior, so a ranking by ITM after few ITM steps says little (issue 11)."""
        return None

    @classmethod
    def reads_pairs(cls) -> bool:
        """Whether pre-training reads image-text pairs: False for a method trained on unpaired streams (its
        `inputs` hold "unpaired_text"), whose pre-training therefore has no paired budget (0 pairs)."""
        return "unpaired_text" not in cls.inputs

    def images_to_prepare(self) -> int:
        """Distinct training images `prepare` needs before the first step (0: nothing to prepare)."""
        return 0

    def prepare(self, images: Tensor) -> dict[str, float]:
        """Fit data-dependent state on images (n, 3, H, W) before step 0; returns statistics to log."""
        return {}

    # ------------------------------------------------------------------------------ downstream
    @property
    def pair_dims(self) -> tuple[int, int]:  # pragma: no cover - abstract
        raise NotImplementedError

    def encode_pair(self, images: Optional[Tensor], input_ids: Tensor, attention_mask: Tensor,
                    region_boxes: Optional[Tensor] = None, region_mask: Optional[Tensor] = None,
                    region_feats: Optional[Tensor] = None) -> PairOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def require_pixels(self, images: Optional[Tensor], region_feats: Optional[Tensor]) -> Tensor:
        """`encode_pair`'s input check of a method that encodes pixels with its ViT: precomputed region
        features are refused (ValueError naming the fix) and images are required; returns the images."""
        owner = type(self).__name__.upper()
        if region_feats is not None:
            raise ValueError(f"{owner} encodes pixels (its ViT image tokens): it cannot take precomputed region "
                             f"features (task.region_features); use a region-input method such as CMAL "
                             f"(method.name: cmal, or a CMAL checkpoint) or drop task.region_features and give "
                             f"task.image_root")
        if images is None:
            raise ValueError(f"{owner}.encode_pair needs images (B, 3, H, W)")
        return images

    @property
    def needs_regions(self) -> bool:
        """Regions (boxes, or grid cells when there are none) are part of every downstream input."""
        return "region_boxes" in self.inputs

    # ------------------------------------------------------------------------------ retrieval
    @property
    def itc_model(self) -> nn.Module:
        """What the "itc" / "itc_itm" protocols encode with (default: the shared `VLModel`)."""
        return self.model

    def itm_pair_inputs(self, images: Tensor, region_boxes: Optional[Tensor],
                        region_mask: Optional[Tensor] = None) -> tuple[Tensor, ...]:  # pragma: no cover
        raise NotImplementedError(f"{type(self).__name__} does not rank by ITM over all pairs")

    def itm_pair_scores(self, *rows: Tensor) -> Tensor:  # pragma: no cover
        raise NotImplementedError(f"{type(self).__name__} does not rank by ITM over all pairs")

    def retrieval_protocols_for(self, itm_all: bool) -> tuple[str, ...]:
        """The protocols an evaluation runs: the headline one, plus "itm_all" when `eval.itm_all` asks and
        the method supports it."""
        if not self.retrieval_protocols:
            return ()
        run = [self.retrieval_protocols[0]]
        if itm_all and "itm_all" in self.retrieval_protocols and "itm_all" not in run:
            run.append("itm_all")
        return tuple(run)


__all__ = ["BATCH_INPUTS", "PretrainMethod", "RETRIEVAL_PROTOCOLS"]
