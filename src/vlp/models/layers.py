"""Transformer building blocks shared by every encoder in `vlp.models`.

One `Block` class serves the ViT (pre-LN), the BERT-style text encoder (post-LN), the ALBEF
cross-attention fusion (post-LN + cross-attention) and the single-stream UNITER/CMAL encoder
(post-LN over the joint sequence). Style follows nanoGPT / torchmultimodal: small modules, plain
`forward`s, no hidden state.

Shapes: B = batch, T = query tokens, S = key/value tokens, D = width, H = heads, hd = D // H.
Masks are key-padding masks, (B, S) with True / 1 = a real token that may be attended to.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Norm = Literal["pre", "post"]

# LayerNorm epsilons of the reference implementations: timm / ALBEF ViT use 1e-6, BERT uses 1e-12.
VIT_LN_EPS = 1e-6
BERT_LN_EPS = 1e-12


@dataclass
class ImageKV:
    """Image tokens projected to every cross-attention layer's keys and values once, for several fusion passes.

    An ALBEF step fuses the same images 4 times (ITM positives, ITM text negatives, the ITM image negatives
    drawn from the same batch, MLM), and every pass projected its image tokens to each layer's K/V again
    (~9 % of the tiny step); SIMLA's shared encoder does the same in its multimodal mode (ITM, MLM).
    `FusionEncoder.image_kv` / `TextEncoder.image_kv` project U distinct images once; each pass row then reads
    the projection of image `rows[b]` (an index, whose backward sums the rows' gradients: the same gradients
    as projecting each row, to float rounding).

    kv: one (U, N, 2D) tensor per cross-attention layer (keys then values, `Attention.project_kv`);
    mask: (U, N) image-token mask or None (all valid); rows: (B,) long, the image of each pass row.
    """

    kv: list[Tensor]
    mask: Optional[Tensor]
    rows: Tensor

    @classmethod
    def project(cls, blocks: "Iterable[Block]", image_tokens: Tensor, image_mask: Optional[Tensor] = None,
                rows: Optional[Tensor] = None) -> "ImageKV":
        """image_tokens (U,N,kv_dim) projected by every block's cross-attention once; pass rows `rows` (B,)
        index the U images (default: each image once, in order). A width that is not the blocks' kv_dim is an
        error naming both."""
        blocks = list(blocks)
        kv_dim = blocks[0].cross.kv_dim if blocks else image_tokens.shape[-1]
        if image_tokens.shape[-1] != kv_dim:
            raise ValueError(f"image tokens have width {image_tokens.shape[-1]}, cross-attention expects {kv_dim}")
        if rows is None:
            rows = torch.arange(image_tokens.shape[0], device=image_tokens.device)
        return cls([block.cross.project_kv(image_tokens) for block in blocks], image_mask, rows)

    def take(self, rows: Tensor) -> "ImageKV":
        """The pass rows `rows` (b,) of this one: ImageKV(kv, mask, self.rows[rows]) (no copy of the K/V)."""
        return ImageKV(self.kv, self.mask, self.rows[rows])

    def __len__(self) -> int:
        return int(self.rows.shape[0])


class Attention(nn.Module):
    """Multi-head scaled dot-product attention (Vaswani et al.; BERT's `BertSelfAttention` + `BertSelfOutput.dense`).

    Self-attention when `context` is None; cross-attention otherwise, in which case keys and values
    are projected from `context` whose width `kv_dim` may differ from the query width `dim` (ALBEF's
    text-to-image cross-attention: queries 768-d text, keys/values ViT tokens).

    Parameters: `q` (dim -> dim), `kv` (kv_dim -> 2*dim, keys then values), `proj` (dim -> dim).
    """

    def __init__(self, dim: int, heads: int, kv_dim: Optional[int] = None, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % heads != 0:
            raise ValueError(f"attention width {dim} is not divisible by {heads} heads")
        self.dim, self.heads, self.kv_dim = dim, heads, kv_dim or dim
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(self.kv_dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attn_dropout = dropout  # on the attention probabilities (BERT's attention_probs_dropout)
        self.proj_drop = nn.Dropout(dropout)  # on the output projection (BERT's hidden_dropout)

    def forward(self, x: Tensor, context: Optional[Tensor] = None, key_mask: Optional[Tensor] = None,
                context_kv: Optional[Tensor] = None) -> Tensor:
        """x (B,T,D); context (B,S,kv_dim) or None (= x); key_mask (B,S) bool/0-1, True = attend -> (B,T,D).

        `context_kv` (B,S,2D): the context already projected by `project_kv` (keys then values), used instead
        of projecting `context` here: fusion passes that cross-attend to the same image tokens share one
        projection (`vlp.models.fusion.ImageKV`).

        A row whose key_mask is all False has no key to attend to and yields NaN (as in
        `F.scaled_dot_product_attention`); callers always keep at least one valid key.
        """
        B, T, D = x.shape
        kv = self.project_kv(x if context is None else context) if context_kv is None else context_kv
        S = kv.shape[1]
        hd = D // self.heads
        q = self.q(x).view(B, T, self.heads, hd).transpose(1, 2)  # (B,H,T,hd)
        k, v = kv.view(B, S, 2, self.heads, hd).permute(2, 0, 3, 1, 4)  # 2 x (B,H,S,hd)
        mask = None if key_mask is None else key_mask.bool()[:, None, None, :]
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.attn_dropout if self.training else 0.0
        )
        y = y.transpose(1, 2).reshape(B, T, D)
        return self.proj_drop(self.proj(y))

    def project_kv(self, context: Tensor) -> Tensor:
        """context (B,S,kv_dim) -> its keys and values (B,S,2D), keys first."""
        return self.kv(context)

    def query_probs(self, x: Tensor, key_mask: Optional[Tensor] = None, query: int = 0) -> Tensor:
        """Self-attention probabilities of one query position: x (B,T,D), key_mask (B,T) -> (B,H,T).

        The row `softmax(q_query K^T / sqrt(hd))` the forward computes inside SDPA (no dropout), for
        methods that read attention (SIMLA's pseudo-keywords read the [CLS] row of the last layer)."""
        B, T, D = x.shape
        hd = D // self.heads
        q = self.q(x[:, query : query + 1]).view(B, 1, self.heads, hd).transpose(1, 2)  # (B,H,1,hd)
        k = self.kv(x).view(B, T, 2, self.heads, hd)[:, :, 0].transpose(1, 2)  # (B,H,T,hd)
        scores = (q @ k.transpose(-1, -2)).squeeze(2).float() / hd**0.5  # (B,H,T)
        if key_mask is not None:
            scores = scores.masked_fill(~key_mask.bool()[:, None, :], float("-inf"))
        return torch.softmax(scores, dim=-1)

    def flops(self, n_q: int, n_kv: int) -> int:
        """Forward matmul FLOPs (2 per multiply-add) for n_q queries attending to n_kv keys."""
        proj = 2 * n_q * (2 * self.dim * self.dim) + 2 * n_kv * (2 * self.kv_dim * self.dim)
        scores = 2 * 2 * n_q * n_kv * self.dim  # Q K^T and P V
        return proj + scores


class MLP(nn.Module):
    """Position-wise feed-forward: Linear -> exact (erf) GELU -> Linear -> dropout (BERT intermediate/output, ViT Mlp)."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="none")  # BERT's "gelu" is the exact erf form
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        """x (..., D) -> (..., D)."""
        return self.drop(self.fc2(self.act(self.fc1(x))))

    def flops(self, n: int) -> int:
        return 2 * n * 2 * self.fc1.in_features * self.fc1.out_features


class Block(nn.Module):
    """Transformer layer: self-attention, optional cross-attention, MLP — each a residual sub-layer.

    norm='pre'  (ViT, GPT-2):  x = x + f(LN(x))
    norm='post' (BERT, ALBEF): x = LN(x + f(x))   — the layout of pretrained BERT/MiniLM weights.

    With `cross_dim` set the layer is an ALBEF fusion layer (BertLayer with `crossattention`):
    self-attention over the text, then cross-attention from text queries to `context` tokens of
    width `cross_dim`, then the MLP. With `cross_optional` too, a call without `context` skips the
    cross-attention sub-layer (SIMLA's shared encoder: BLIP `med.py` "text" mode, spec simla §1.1).

    `eps` defaults to the reference value for the layout: 1e-6 pre-LN (timm ViT), 1e-12 post-LN (BERT).
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        mlp_ratio: float = 4.0,
        cross_dim: Optional[int] = None,
        norm: Norm = "pre",
        dropout: float = 0.0,
        eps: Optional[float] = None,
        cross_optional: bool = False,
    ) -> None:
        super().__init__()
        if norm not in ("pre", "post"):
            raise ValueError(f"norm must be 'pre' or 'post', got {norm!r}")
        eps = eps if eps is not None else (VIT_LN_EPS if norm == "pre" else BERT_LN_EPS)
        self.norm_type = norm
        self.cross_optional = cross_optional
        self.attn = Attention(dim, heads, dropout=dropout)
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.cross: Optional[Attention] = None
        self.norm_cross: Optional[nn.LayerNorm] = None
        if cross_dim is not None:
            self.cross = Attention(dim, heads, kv_dim=cross_dim, dropout=dropout)
            self.norm_cross = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, int(dim * mlp_ratio), dropout)
        self.norm2 = nn.LayerNorm(dim, eps=eps)

    def forward(
        self,
        x: Tensor,
        mask: Optional[Tensor] = None,
        context: Optional[Tensor] = None,
        context_mask: Optional[Tensor] = None,
        context_kv: Optional[Tensor] = None,
    ) -> Tensor:
        """x (B,T,D); mask (B,T) key padding; context (B,S,cross_dim); context_mask (B,S) -> (B,T,D).

        `context_kv` (B,S,2D): the context already projected by `self.cross.project_kv`, instead of `context`."""
        has_context = context is not None or context_kv is not None
        if self.cross is not None and not has_context and not self.cross_optional:
            raise ValueError("this Block has cross-attention: pass `context` (B, S, cross_dim)")
        cross = self.cross is not None and has_context
        if self.norm_type == "pre":
            x = x + self.attn(self.norm1(x), key_mask=mask)
            if cross:
                x = x + self.cross(self.norm_cross(x), context, context_mask, context_kv)
            return x + self.mlp(self.norm2(x))
        x = self.norm1(x + self.attn(x, key_mask=mask))
        if cross:
            x = self.norm_cross(x + self.cross(x, context, context_mask, context_kv))
        return self.norm2(x + self.mlp(x))

    def self_attention_probs(self, x: Tensor, mask: Optional[Tensor] = None, query: int = 0) -> Tensor:
        """The self-attention probabilities (B,H,T) of position `query` for this layer's input x (B,T,D)."""
        return self.attn.query_probs(self.norm1(x) if self.norm_type == "pre" else x, mask, query)

    def flops(self, n: int, n_context: int = 0) -> int:
        """Forward matmul FLOPs for a sequence of n tokens (and n_context cross-attended tokens)."""
        total = self.attn.flops(n, n) + self.mlp.flops(n)
        if self.cross is not None and n_context:
            total += self.cross.flops(n, n_context)
        return total
