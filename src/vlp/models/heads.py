"""Pre-training heads: ITC projection (ALBEF `vision_proj`/`text_proj`), ITM classifier, MLM prediction head (BERT)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from vlp.models.layers import BERT_LN_EPS


class ITCProjection(nn.Module):
    """Linear in_dim -> embed_dim, then L2 normalisation (ALBEF's `F.normalize(proj(cls), dim=-1)`)."""

    def __init__(self, in_dim: int, embed_dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_dim, embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        """x (B, in_dim) -> unit vectors (B, embed_dim)."""
        return F.normalize(self.linear(x), dim=-1)


class ITMHead(nn.Module):
    """Image-text matching classifier on the fused [CLS]: Linear D -> 2 (class 1 = matched)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, 2)

    def forward(self, cls: Tensor) -> Tensor:
        """cls (B, D) -> logits (B, 2)."""
        return self.linear(cls)


class MLMHead(nn.Module):
    """BERT's `BertLMPredictionHead`: dense -> GELU -> LayerNorm -> decoder tied to the word embeddings (+ own bias).

    The decoder weight *is* `word_embeddings.weight` (`decoder_weight` returns that very Parameter).
    The embedding module is held outside the module tree (a plain tuple), so the tied matrix appears
    once in `state_dict()` — under the text encoder — and `safetensors.save_file` accepts it.
    `copy.deepcopy` of the whole model keeps the tie (the memo maps it to the copied embedding).
    """

    def __init__(self, dim: int, word_embeddings: nn.Embedding) -> None:
        super().__init__()
        self.dense = nn.Linear(dim, dim)
        self.act = nn.GELU(approximate="none")
        self.norm = nn.LayerNorm(dim, eps=BERT_LN_EPS)
        self._tied = (word_embeddings,)  # not registered: no second copy of the (V, D) matrix
        self.bias = nn.Parameter(word_embeddings.weight.new_zeros(word_embeddings.num_embeddings))

    @property
    def decoder_weight(self) -> nn.Parameter:
        """(V, D) the word-embedding matrix, shared."""
        return self._tied[0].weight

    def forward(self, hidden: Tensor) -> Tensor:
        """hidden (..., D) -> vocabulary logits (..., V)."""
        return F.linear(self.norm(self.act(self.dense(hidden))), self.decoder_weight, self.bias)
