"""A cheap first retrieval stage for single-stream methods: a small bi-encoder on detached slot vectors.

Single-stream methods (UNITER, CMAL) have no ITC: ranking a test set by ITM needs one encoder pass per
(image, text) pair, I x 5I passes (UNITER's protocol, `itm_all`). At ~1.7 ms a pair on 2 CPU cores that
is 2.4 h for 1,000 images and 34 h for COCO's 5k (issue 15, "Evaluation that scales"). ALBEF and BLIP
rank by ITC first and re-rank only the top k by ITM; this module gives single-stream methods such a
first stage.

`FirstStageHead` is a bi-encoder of its own (one Transformer layer per side, masked mean pooling, a linear
projection to an L2-normalised embedding, a learnt temperature) over the slot vectors the unified
encoder's input already computes: word vectors (B, T, d) and region vectors (B, N, d) plus the 7-d boxes.
It is trained with ITC (`vlp.models.losses.contrastive_loss`, positives by image id, gathered across
ranks) beside the method's own objectives.

Deviation from the papers (documented, opt-in with `method.first_stage: true`): neither UNITER nor CMAL has
it. It is kept from changing what the method learns:
  * its inputs are detached, so no gradient reaches the method's parameters;
  * it has no dropout and is built after every other module, so it consumes no random numbers the method
    would otherwise have used, and the method's initial weights are unchanged;
  * the trainer clips its gradients separately (`PretrainMethod.separately_clipped`), so the method's
    clipped update is the one it would have had without the head.
With these, a run with the head trains the method's parameters exactly as a run without it (tested).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vlp.models.layers import Block
from vlp.models.losses import contrastive_loss


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean over the real positions: x (B, L, d), mask (B, L) bool/long (1 = real) -> (B, d); rows with no
    real position give 0."""
    weights = mask.to(x.dtype)[:, :, None]
    return (x * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


class FirstStageSide(nn.Module):
    """One side of the bi-encoder: LayerNorm(vectors + position term), one post-LN Transformer layer, masked
    mean pooling, Linear d -> E, L2 normalisation. (B, L, d) + (B, L, d) position term + mask -> (B, E)."""

    def __init__(self, width: int, embed_dim: int, heads: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.block = Block(width, heads, mlp_ratio=2.0, norm="post")
        self.proj = nn.Linear(width, embed_dim)

    def forward(self, vectors: Tensor, position: Tensor, mask: Tensor) -> Tensor:
        x = self.block(self.norm(vectors + position), mask=mask.bool())
        return nn.functional.normalize(self.proj(masked_mean(x, mask)), dim=-1)


class FirstStageHead(nn.Module):
    """The first-stage bi-encoder (module docstring). d = the unified encoder's width, E = `embed_dim`.

    text_embed(word_vecs (B,T,d), attention_mask (B,T)) -> (B,E): positions 0..T-1 from its own table;
    image_embed(region_vecs (B,N,d), boxes (B,N,7), region_mask (B,N)) -> (B,E): boxes through its own
    Linear 7 -> d. Both detach their inputs. `loss` is ITC over them (`contrastive_loss`).
    """

    TEMP_MIN, TEMP_MAX = 0.001, 0.5

    def __init__(self, width: int, embed_dim: int, heads: int, max_len: int, init_std: float = 0.02,
                 temperature: float = 0.07) -> None:
        super().__init__()
        self.text = FirstStageSide(width, embed_dim, heads)
        self.image = FirstStageSide(width, embed_dim, heads)
        self.positions = nn.Embedding(max_len, width)
        self.box_proj = nn.Linear(7, width)
        self.temp = nn.Parameter(torch.tensor(float(temperature)))
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(module.weight, std=init_std, a=-2 * init_std, b=2 * init_std)
                if isinstance(module, nn.Linear) and module.bias is not None:
                    nn.init.zeros_(module.bias)

    def text_embed(self, word_vecs: Tensor, attention_mask: Tensor) -> Tensor:
        T = word_vecs.shape[1]
        if T > self.positions.num_embeddings:
            raise ValueError(f"text has {T} tokens but the first-stage head has {self.positions.num_embeddings} "
                             f"positions (model.text.max_len)")
        position = self.positions(torch.arange(T, device=word_vecs.device))[None]
        return self.text(word_vecs.detach(), position, attention_mask)

    def image_embed(self, region_vecs: Tensor, boxes: Tensor, region_mask: Tensor) -> Tensor:
        return self.image(region_vecs.detach(), self.box_proj(boxes.detach().to(region_vecs.dtype)), region_mask)

    def loss(self, image_emb: Tensor, text_emb: Tensor, image_ids: Tensor | None) -> tuple[Tensor, Tensor]:
        """ITC of (B, E) image / text embeddings (positives: same image id; columns gathered across ranks)
        -> (loss, text->image top-1 accuracy within the local batch, detached)."""
        temperature = self.temp.clamp(self.TEMP_MIN, self.TEMP_MAX)
        loss = contrastive_loss(image_emb, text_emb, temperature, image_ids=image_ids)
        with torch.no_grad():
            ids = image_ids if image_ids is not None else torch.arange(len(text_emb), device=text_emb.device)
            best = (text_emb @ image_emb.T).argmax(dim=1)
            accuracy = (ids[best] == ids).float().mean()
        return loss, accuracy


__all__ = ["FirstStageHead", "FirstStageSide", "masked_mean"]
