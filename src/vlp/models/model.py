"""`VLModel`: the encoders, fusion and heads every pre-training method and downstream task shares.

ALBEF layout (Li et al. 2021): ViT image encoder, BERT text encoder, fusion encoder (cross-attention,
or UNITER-style single stream), ITC projections with a learnable temperature, ITM and MLM heads.
Methods own their losses and any momentum copies; this module only computes.

`model.length_buckets` k > 1 runs the text encoder and the fusion on k sub-batches of similar caption length
(`vlp.models.buckets`): same results to float rounding, zeros at text positions past a row's bucket length.
"""

from __future__ import annotations

import math
import re
from functools import partial
from typing import Any, Mapping, Optional

import torch
from torch import Tensor, nn

from vlp.config import MODEL_SIZE_DIR, ModelConfig, model_size
from vlp.models.buckets import run_in_length_buckets
from vlp.models.fusion import FusionEncoder, FusionOutput, ImageKV
from vlp.models.heads import ITCProjection, ITMHead, MLMHead
from vlp.models.losses import all_gather_with_grad, world_size
from vlp.models.minilm import load_minilm_into
from vlp.models.text import TextEncoder
from vlp.models.vit import ImageOutput, VisionTransformer

INIT_STD = 0.02  # BERT / ViT initializer_range


class VLModel(nn.Module):
    """Vision-language model; see `docs/contracts.md` ("Models") for the method contract.

    Submodules: `vision` (ViT), `text` (BERT-style encoder), `fusion`, `vision_proj` / `text_proj`
    (ITC), `itm_head`, `mlm_head` (decoder tied to `text.word_embeddings`), and the scalar `temp`.

    With `model.text.cross_attention` the text encoder is a shared text/fusion encoder (SIMLA) and
    `fusion` is empty (depth 0): fuse with `encode_multimodal` (from token ids), not `fuse`.
    """

    TEMP_MIN, TEMP_MAX = 0.001, 0.5  # ALBEF's clamp

    def __init__(self, cfg: ModelConfig, vocab_size: int, pad_id: int = 0) -> None:
        super().__init__()
        if cfg.text.vocab_size is not None and cfg.text.vocab_size != vocab_size:
            raise ValueError(
                f"model.text.vocab_size is {cfg.text.vocab_size} but the tokenizer has {vocab_size} tokens: "
                f"use the tokenizer the config was written for, or drop model.text.vocab_size"
            )
        self.cfg = cfg
        self.vocab_size, self.pad_id = vocab_size, pad_id
        if cfg.text.cross_attention and cfg.fusion.depth != 0:
            raise ValueError(
                f"model.text.cross_attention: true makes the text encoder the fusion encoder too (SIMLA's shared "
                f"encoder), so model.fusion.depth must be 0, got {cfg.fusion.depth}: set model.fusion.depth=0"
            )
        self.vision = VisionTransformer(cfg.vision)
        self.text = TextEncoder(cfg.text, vocab_size, pad_id,
                                cross_dim=cfg.vision.width if cfg.text.cross_attention else None,
                                length_buckets=cfg.length_buckets)
        self.fusion = FusionEncoder(cfg.fusion, cfg.text.width, cfg.vision.width)
        self.vision_proj = ITCProjection(cfg.vision.width, cfg.embed_dim)
        self.text_proj = ITCProjection(cfg.text.width, cfg.embed_dim)
        self.itm_head = ITMHead(cfg.text.width)
        self.mlm_head = MLMHead(cfg.text.width, self.text.word_embeddings)
        self.temp = nn.Parameter(torch.tensor(float(cfg.temperature)))
        self.apply(partial(_init_weights, std=cfg.init_std))
        _trunc_normal_(self.vision.cls_token, cfg.init_std)
        _trunc_normal_(self.vision.pos_embed, cfg.init_std)
        if cfg.text.init == "minilm":
            load_minilm_into(self.text)

    # ------------------------------------------------------------------------------ encoders
    def encode_image(self, images: Tensor) -> ImageOutput:
        """images (B,3,H,W) -> ImageOutput(tokens (B,1+P,Dv) CLS first, grid (B,Dv,h,w))."""
        return self.vision(images)

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """input_ids, attention_mask (B,T) -> unimodal text hidden states (B,T,D) (per length bucket,
        `length_buckets`)."""
        return self.text(input_ids, attention_mask)

    @property
    def length_buckets(self) -> int:
        """k of `model.length_buckets`: the text encoder, the fusion and the single-stream joint pass run on
        k sub-batches of similar caption length (`vlp.models.buckets`); 1 = the whole batch. Held by the text
        encoder (which runs without this class in SIMLA's modes); setting it here sets it there."""
        return self.text.length_buckets

    @length_buckets.setter
    def length_buckets(self, value: int) -> None:
        if value < 1:
            raise ValueError(f"length_buckets must be >= 1, got {value}: set model.length_buckets to 1 or more")
        self.text.length_buckets = int(value)

    def image_embed(self, image_tokens: Tensor) -> Tensor:
        """image_tokens (B,1+P,Dv) -> L2-normalised ITC embedding of the CLS token (B,E)."""
        return self.vision_proj(image_tokens[:, 0])

    def text_embed(self, text_hidden: Tensor) -> Tensor:
        """text_hidden (B,T,D) -> L2-normalised ITC embedding of the [CLS] token (B,E)."""
        return self.text_proj(text_hidden[:, 0])

    def temperature(self) -> Tensor:
        """The ITC temperature, a scalar clamped to [0.001, 0.5] (ALBEF).

        ALBEF clamps the parameter in place every forward; an in-place write here would break a second
        call in the same graph, so the clamp is functional (no gradient while outside the range).
        `clamp_temperature_()` restores ALBEF's in-place behaviour after an optimizer step.
        """
        return self.temp.clamp(self.TEMP_MIN, self.TEMP_MAX)

    @torch.no_grad()
    def clamp_temperature_(self) -> None:
        """Clamp the temperature parameter itself into [0.001, 0.5] (call after `optimizer.step()`)."""
        self.temp.clamp_(self.TEMP_MIN, self.TEMP_MAX)

    @property
    def shared_encoder(self) -> bool:
        """Whether the text encoder is also the fusion encoder (`model.text.cross_attention`, SIMLA)."""
        return self.text.cross_dim is not None

    def fuse(
        self, text_hidden: Tensor, attention_mask: Tensor, image_tokens: Tensor | ImageKV,
        image_mask: Optional[Tensor] = None,
    ) -> FusionOutput:
        """text_hidden (B,T,D), attention_mask (B,T), image_tokens (B,N,Dv), image_mask (B,N) or None = all valid.

        `image_tokens` may be an `ImageKV` of B pass rows (`image_kv`: cross-attention fusion, images projected
        to keys/values once for several passes). Runs per length bucket (`length_buckets`): fused text states
        past a row's bucket length are 0."""
        if self.shared_encoder:
            raise ValueError("this model fuses in its shared text encoder (model.text.cross_attention: true): "
                             "use encode_multimodal(input_ids, attention_mask, image_tokens)")
        if self.length_buckets == 1:
            return self.fusion(text_hidden, attention_mask, image_tokens, image_mask)
        if isinstance(image_tokens, ImageKV):  # bucket the pass rows' image indices, not tokens
            fuse_rows = partial(self._fuse_kv_rows, image_tokens)
            rows: tuple[Optional[Tensor], ...] = (image_tokens.rows,)
        else:
            fuse_rows, rows = self._fuse_rows, (image_tokens, image_mask)
        text, image = run_in_length_buckets(fuse_rows, attention_mask, self.length_buckets, text=(text_hidden,),
                                            rows=rows)
        return FusionOutput(text=text, image=image, cls=text[:, 0])

    @property
    def shares_image_kv(self) -> bool:
        """Whether `fuse` takes an `ImageKV` (`image_kv`): a cross-attention fusion encoder of its own."""
        return not self.shared_encoder and self.fusion.cfg.type == "cross" and self.fusion.cfg.depth > 0

    def image_kv(self, image_tokens: Tensor, image_mask: Optional[Tensor] = None,
                 rows: Optional[Tensor] = None) -> ImageKV:
        """image_tokens (U,N,Dv) projected to the cross-attention layers' keys/values once (the fusion
        encoder's, or the shared text encoder's: SIMLA), for passes whose row b cross-attends to image `rows[b]`
        (default: each image once): `fuse`, or the shared encoder's `forward_from_embeddings(context=...)`."""
        if self.shared_encoder:
            return self.text.image_kv(image_tokens, image_mask, rows)
        return self.fusion.image_kv(image_tokens, image_mask, rows)

    def itm_image_kv(self, image_tokens: Tensor, neg_image: Tensor) -> ImageKV:
        """The images of ITM's 3B pass rows [positives; their drawn negative images; the text negatives' own
        images] over one K/V projection. image_tokens (B,N,Dv) this rank's images, neg_image (B,) indices
        into the global batch's images. On one process the negatives are this batch's images (B projections);
        with DDP the drawn negatives are gathered with gradient and projected after this rank's images (2B).
        `take(arange(B))` of the result are this rank's images (MLM's pass)."""
        size = image_tokens.shape[0]
        local = torch.arange(size, device=image_tokens.device)
        if world_size() > 1:
            images = self.image_kv(torch.cat([image_tokens, all_gather_with_grad(image_tokens)[neg_image]]))
            neg_rows = local + size
        else:
            images, neg_rows = self.image_kv(image_tokens), neg_image
        return images.take(torch.cat([local, neg_rows, local]))

    def _fuse_rows(self, attention_mask: Tensor, text_hidden: Tensor, image_tokens: Tensor,
                   image_mask: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
        """`fuse` of one bucket -> (fused text (b,L,D), fused image (b,N,D) or None)."""
        out = self.fusion(text_hidden, attention_mask, image_tokens, image_mask)
        return out.text, out.image

    def _fuse_kv_rows(self, image_kv: ImageKV, attention_mask: Tensor, text_hidden: Tensor,
                      rows: Tensor) -> tuple[Tensor, None]:
        """`fuse` of one bucket whose pass rows read images `rows` (b,) of `image_kv` -> (fused text (b,L,D), None)."""
        out = self.fusion(text_hidden, attention_mask, ImageKV(image_kv.kv, image_kv.mask, rows))
        return out.text, None

    def encode_multimodal(
        self, input_ids: Tensor, attention_mask: Tensor, image_tokens: Tensor, image_mask: Optional[Tensor] = None,
        embeddings: Optional[Tensor] = None,
    ) -> FusionOutput:
        """Shared encoder, multimodal mode (SIMLA, spec §1.1): the text (input_ids (B,T), or its embedding-layer
        output `embeddings` (B,T,D)) runs through every layer cross-attending to image_tokens (B,N,Dv)
        -> FusionOutput(text (B,T,D), image None, cls (B,D)); per length bucket (`length_buckets`)."""
        if not self.shared_encoder:
            raise ValueError("encode_multimodal needs a shared text encoder (model.text.cross_attention: true)")
        x = self.text.embed(input_ids) if embeddings is None else embeddings
        out = self.text.forward_from_embeddings(x, attention_mask, image_tokens, image_mask)
        return FusionOutput(text=out, image=None, cls=out[:, 0])

    # --------------------------------------------------------------------------------- heads
    def itm_logits(self, cls: Tensor) -> Tensor:
        """cls (B,D) fused [CLS] -> (B,2) logits, class 1 = matched."""
        return self.itm_head(cls)

    def mlm_logits(self, hidden: Tensor) -> Tensor:
        """hidden (B,T,D) (or (M,D) gathered masked positions) -> (B,T,V) vocabulary logits."""
        return self.mlm_head(hidden)

    def itm_score(self, image_tokens: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Matched-class ITM logit (B,) of each (image_tokens[i], text i) pair — for retrieval re-ranking."""
        if self.shared_encoder:
            return self.itm_logits(self.encode_multimodal(input_ids, attention_mask, image_tokens).cls)[:, 1]
        text = self.encode_text(input_ids, attention_mask)
        return self.itm_logits(self.fuse(text, attention_mask, image_tokens).cls)[:, 1]

    # ------------------------------------------------------------------------------ accounting
    def num_parameters(self, trainable_only: bool = False) -> int:
        """Number of distinct parameters (the tied MLM decoder counts once)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def flops_per_pair(self, text_len: int, mlm_tokens: int = 0) -> int:
        """Approximate forward matmul FLOPs (2 per multiply-add) for one image-text pair.

        Counts one pass of the ViT (patchify + blocks), the text encoder over `text_len` tokens, the
        fusion over `text_len` text and 1+P image tokens, the two ITC projections, the ITM head and the
        MLM head over `mlm_tokens` positions; attention score/value products included, element-wise ops
        not. A method that runs an encoder several times (ALBEF: fusion for positives and 2 hard
        negatives, text again for MLM) multiplies accordingly; training costs ~3x the forward.
        """
        n_img = self.vision.num_tokens
        D, Dv, E, V = self.cfg.text.width, self.cfg.vision.width, self.cfg.embed_dim, self.vocab_size
        heads = 2 * (Dv * E + D * E) + 2 * D * 2 + mlm_tokens * 2 * (D * D + D * V)
        fusion = self.text.flops(text_len, n_img) if self.shared_encoder else self.fusion.flops(text_len, n_img)
        return self.vision.flops() + self.text.flops(text_len) + fusion + heads

    # ---------------------------------------------------------------------------- checkpoints
    def check_compatible(self, state_dict: Mapping[str, Tensor], strict: bool = False) -> None:
        """Raise ValueError explaining why `state_dict` (a VLModel's, or a method's with a `model.` prefix)
        cannot be loaded into this model.

        Architecture differences are put in words (with the shipped model size that matches the
        checkpoint); a vocabulary difference points at the checkpoint's tokenizer; other shape
        differences are listed. Keys the checkpoint lacks (or has extra) only count when `strict`:
        whether a partial load is fine is the loader's decision. An empty state dict always passes.
        """
        state, own = _strip_model_prefix(state_dict), self.state_dict()
        ours, theirs = _summary_from_state(own), _summary_from_state(state)
        diffs = [
            f"checkpoint has {name} {theirs[name]}, this model {value}"
            for name, value in ours.items()
            if name in theirs and theirs[name] != value
        ]
        missing = sorted(set(own) - set(state)) if strict else []
        unexpected = sorted(set(state) - set(own)) if strict else []
        shapes = [
            f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
            for k in sorted(set(own) & set(state))
            if tuple(state[k].shape) != tuple(own[k].shape)
        ]
        if not (diffs or missing or unexpected or shapes):
            return
        parts = []
        arch = [d for d in diffs if not d.startswith("checkpoint has text vocab")]
        if arch:
            hint = "pass the config the checkpoint was trained with (its config.yaml)"
            sizes = _matching_sizes(theirs)
            if sizes:
                hint += " / use " + " or ".join(f"--model {s}" for s in sizes)
            parts.append("; ".join(arch) + f": {hint}")
        if len(arch) < len(diffs):
            vocab = next(d for d in diffs if d.startswith("checkpoint has text vocab"))
            parts.append(f"{vocab}: build the model with the tokenizer saved with the checkpoint (tokenizer.json)")
        for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
            if items and not arch:  # with an architecture difference the key lists are noise
                parts.append(f"{label} ({len(items)}): " + ", ".join(items[:6]) + (" ..." if len(items) > 6 else ""))
        raise ValueError("checkpoint does not fit this model: " + ". ".join(parts))


@torch.no_grad()
def _trunc_normal_(weight: Tensor, std: float = INIT_STD) -> None:
    """Normal(0, std) truncated at +-2 std by redrawing the out-of-range entries: the distribution of
    `nn.init.trunc_normal_(std=std, a=-2*std, b=2*std)`, whose inverse-CDF sampling takes ~20 s on
    the 210M parameters of `base` on a 2-core CPU."""
    if weight.is_meta:  # shape-only models (e.g. inspecting a checkpoint's architecture)
        return
    flat = weight.view(-1)
    flat.normal_(0.0, std)
    idx = (flat.abs() > 2 * std).nonzero().squeeze(1)
    while idx.numel():
        redraw = torch.randn(idx.numel(), dtype=flat.dtype, device=flat.device) * std
        flat[idx] = redraw
        idx = idx[redraw.abs() > 2 * std]


def _init_weights(module: nn.Module, std: float = INIT_STD) -> None:
    """BERT / ViT init: truncated normal (std 0.02 by default, cut at 2 std) for Linear, Conv and
    Embedding weights, zero biases (and the padding row), LayerNorm weight 1 and bias 0."""
    if isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding)):
        _trunc_normal_(module.weight, std)
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def _strip_model_prefix(state: Mapping[str, Tensor]) -> Mapping[str, Tensor]:
    if "vision.pos_embed" not in state and "model.vision.pos_embed" in state:
        return {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    return state


def _depth(state: Mapping[str, Any], prefix: str) -> int:
    pattern = re.compile(rf"^{re.escape(prefix)}\.blocks\.(\d+)\.")
    return len({m.group(1) for k in state if (m := pattern.match(k))})


def _summary_from_state(state: Mapping[str, Tensor]) -> dict[str, Any]:
    """The architecture a VLModel state dict implies, in user-facing terms (only what it contains)."""
    out: dict[str, Any] = {}

    def dim(key: str, axis: int) -> Optional[int]:
        return int(state[key].shape[axis]) if key in state else None

    out["vision width"], out["vision patch size"] = dim("vision.patch_embed.weight", 0), dim("vision.patch_embed.weight", -1)
    if "vision.pos_embed" in state and out["vision patch size"]:
        out["vision image size"] = math.isqrt(dim("vision.pos_embed", 1) - 1) * out["vision patch size"]
    out["vision MLP width"] = dim("vision.blocks.0.mlp.fc1.weight", 0)
    out["text vocab"], out["text width"] = dim("text.word_embeddings.weight", 0), dim("text.word_embeddings.weight", 1)
    out["text max_len"] = dim("text.position_embeddings.weight", 0)
    out["text MLP width"] = dim("text.blocks.0.mlp.fc1.weight", 0)
    out["ITC embed_dim"] = dim("vision_proj.linear.weight", 0)
    for tower in ("vision", "text", "fusion"):
        out[f"{tower} depth"] = _depth(state, tower) or None
    if out["fusion depth"]:
        out["fusion type"] = "single" if "fusion.image_proj.weight" in state else "cross"
    if "text.blocks.0.attn.q.weight" in state:
        out["text cross-attention"] = "text.blocks.0.cross.q.weight" in state
    return {k: v for k, v in out.items() if v is not None}


def _summary_from_config(cfg: ModelConfig) -> dict[str, Any]:
    """Same keys as `_summary_from_state` (less the vocabulary, which the tokenizer decides)."""
    v, t, f = cfg.vision, cfg.text, cfg.fusion
    return {
        "vision width": v.width,
        "vision patch size": v.patch_size,
        "vision image size": v.image_size,
        "vision depth": v.depth,
        "vision MLP width": int(v.width * v.mlp_ratio),
        "text width": t.width,
        "text max_len": t.max_len,
        "text depth": t.depth,
        "text MLP width": int(t.width * t.mlp_ratio),
        "text cross-attention": t.cross_attention,
        **({"fusion type": f.type, "fusion depth": f.depth} if f.depth else {}),
        "ITC embed_dim": cfg.embed_dim,
    }


def _matching_sizes(summary: dict[str, Any]) -> list[str]:
    """Names of the shipped model sizes (vlp/configs/models/*.yaml) whose architecture matches `summary`."""
    names = []
    for path in sorted(MODEL_SIZE_DIR.glob("*.yaml")):
        try:
            sized = _summary_from_config(ModelConfig.model_validate(model_size(path.stem)))
        except Exception:  # a malformed size file must not mask the real error
            continue
        if all(summary.get(k) == v for k, v in sized.items()):
            names.append(path.stem)
    return names
