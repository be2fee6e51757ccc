"""BERT-style text encoder (Devlin et al. 2019; layout of HF `BertModel` without the pooler).

embeddings = Dropout(LN(word + position + token_type))  (LN eps 1e-12, as BERT)
hidden     = `depth` Blocks, post-LN by default (BERT; required to load MiniLM weights)

In ALBEF this is the "text encoder" half of BERT (the first 6 layers); the fusion half lives in
`vlp.models.fusion`. CMAL swaps word and region vectors *before* positions/LN are added, so the
embedding step is exposed on its own (`embed(word_embeds=...)`) as is the Transformer stack
(`forward_from_embeddings`).

With `cross_dim` (config `text.cross_attention: true`) every layer also has cross-attention to tokens of
that width, used only when a `context` is passed: SIMLA's ONE shared encoder (spec simla_vlmixer.md §1.1,
BLIP `med.py` with `add_cross_attention` in every layer), run in "text" mode (no context: the ITC text
encoder), "multimodal" mode (text queries attend to the image) and with image tokens as the queries
(`embed_features`, attending to the text).

With `length_buckets` k > 1 the Transformer stack runs on k sub-batches of similar caption length, each cut
to its longest caption (`vlp.models.buckets`; config `model.length_buckets`): same states at real positions
to float rounding, zeros past a row's bucket length.

The multimodal passes of one step (SIMLA's ITM and MLM) can share one projection of the images to every layer's
cross-attention keys and values (`image_kv` -> `ImageKV`, passed as the `context`).

A pass whose output is read at a few positions (`forward_from_embeddings(read=...)`: SIMLA's ITM reads the [CLS],
MLM / MIM the masked tokens / patches) runs its last layer at those positions only (`block_at`).
"""

from __future__ import annotations

from functools import partial
from typing import Optional

import torch
from torch import Tensor, nn

from vlp.config import TextConfig
from vlp.models.buckets import run_in_length_buckets
from vlp.models.layers import BERT_LN_EPS, VIT_LN_EPS, Block, ImageKV


class TextEncoder(nn.Module):
    """Token ids (B, T) -> hidden states (B, T, D), D = cfg.width."""

    def __init__(self, cfg: TextConfig, vocab_size: int, pad_id: int = 0, cross_dim: Optional[int] = None,
                 length_buckets: int = 1) -> None:
        super().__init__()
        if length_buckets < 1:
            raise ValueError(f"length_buckets must be >= 1, got {length_buckets}: set model.length_buckets to 1 or more")
        self.cfg = cfg
        self.cross_dim = cross_dim
        self.length_buckets = length_buckets  # sub-batches of similar length for the stack (module docstring)
        self.vocab_size, self.pad_id = vocab_size, pad_id
        D = cfg.width
        self.word_embeddings = nn.Embedding(vocab_size, D, padding_idx=pad_id)
        self.position_embeddings = nn.Embedding(cfg.max_len, D)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab, D)
        self.embed_norm = nn.LayerNorm(D, eps=BERT_LN_EPS)
        self.embed_drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(
            Block(D, cfg.heads, cfg.mlp_ratio, cross_dim=cross_dim, norm=cfg.norm, dropout=cfg.dropout,
                  cross_optional=True)
            for _ in range(cfg.depth)
        )
        # A pre-LN stack leaves its residual stream un-normalised: close it with a LayerNorm (GPT-2).
        self.final_norm = nn.LayerNorm(D, eps=VIT_LN_EPS) if cfg.norm == "pre" else nn.Identity()

    def embed(
        self,
        input_ids: Optional[Tensor] = None,
        token_type_ids: Optional[Tensor] = None,
        word_embeds: Optional[Tensor] = None,
    ) -> Tensor:
        """BERT embeddings: input_ids (B,T) or word_embeds (B,T,D) [+ token_type_ids (B,T)] -> (B,T,D).

        `word_embeds` replaces the word-embedding lookup (e.g. CMAL's swapped word/region vectors);
        positions 0..T-1 and token types (default 0) are added, then LayerNorm and dropout.
        """
        if word_embeds is None:
            if input_ids is None:
                raise ValueError("pass input_ids or word_embeds")
            word_embeds = self.word_embeddings(input_ids)
        B, T, _ = word_embeds.shape
        if T > self.cfg.max_len:
            raise ValueError(
                f"text has {T} tokens but the model has {self.cfg.max_len} positions (model.text.max_len): "
                f"lower data.max_text_len or raise model.text.max_len"
            )
        positions = torch.arange(T, device=word_embeds.device)
        x = word_embeds + self.position_embeddings(positions)[None]
        if token_type_ids is None:
            x = x + self.token_type_embeddings.weight[0]
        else:
            x = x + self.token_type_embeddings(token_type_ids)
        return self.embed_drop(self.embed_norm(x))

    def embed_features(self, features: Tensor, positions: bool = False) -> Tensor:
        """Non-text tokens (B,N,D) entering the stack as queries (SIMLA's image-as-query pass, spec §1.2 (c)):
        LayerNorm + dropout of the embedding layer; with `positions`, the text position embeddings 0..N-1
        and token type 0 are added first, as BERT's embedding layer does to SIMLA's `inputs_embeds`
        (quirk §1.6.3; the ViT tokens already carry positions of their own)."""
        if positions:
            return self.embed(word_embeds=features)
        return self.embed_drop(self.embed_norm(features))

    def _check_context(self, context: Optional[Tensor]) -> None:
        if context is not None and self.cross_dim is None:
            raise ValueError("this text encoder has no cross-attention (model.text.cross_attention: false): "
                             "fuse with the fusion encoder instead")

    def image_kv(self, image_tokens: Tensor, image_mask: Optional[Tensor] = None,
                 rows: Optional[Tensor] = None) -> ImageKV:
        """image_tokens (U,N,cross_dim) projected to every layer's cross-attention keys/values once -> an
        `ImageKV` whose pass rows are `rows` (B,) indices into the U images (default: each image once), for
        `forward_from_embeddings(context=...)` passes that attend to the same images."""
        self._check_context(image_tokens)
        return ImageKV.project(self.blocks, image_tokens, image_mask, rows)

    def forward_from_embeddings(
        self, x: Tensor, attention_mask: Optional[Tensor] = None, context: Optional[Tensor | ImageKV] = None,
        context_mask: Optional[Tensor] = None, read: Optional[Tensor] = None,
    ) -> Tensor:
        """x (B,T,D) embeddings, attention_mask (B,T) 1 = real token -> hidden states (B,T,D); with
        `context` (B,S,cross_dim) and `context_mask` (B,S) every layer cross-attends to it. `context` may be an
        `ImageKV` of B pass rows (`image_kv`; it carries its own mask, `context_mask` must be None).

        `read` (B,K) long: only the states at these positions are wanted -> (B,K,D), row b's states at
        positions read[b] (the [CLS] for ITM, the masked tokens / patches for MLM / MIM). The last layer then
        runs its queries, cross-attention and MLP at those positions only (`block_at`; keys and values still
        come from every position), the same states to float rounding at a fraction of the last layer's cost.

        With `length_buckets` > 1 and a mask, the stack runs per length bucket: positions past a row's
        bucket length come back as 0 (every reader masks them); `read` positions must be real tokens."""
        if isinstance(context, ImageKV):  # bucket the pass rows' image indices, not projected tokens
            if context_mask is not None:
                raise ValueError("an ImageKV carries its own image mask: pass context_mask=None")
            out = run_in_length_buckets(partial(self._stack_kv, context), attention_mask, self.length_buckets,
                                        text=(x,), rows=(context.rows, read))
        else:
            self._check_context(context)
            out = run_in_length_buckets(self._stack, attention_mask, self.length_buckets, text=(x,),
                                        rows=(context, context_mask, read))
        # per bucket the (b,K,D) read states come back as the text-shaped output (K <= T), padded to T: cut back
        return out if read is None else out[:, : read.shape[1]]

    def _stack(self, attention_mask: Optional[Tensor], x: Tensor, context: Optional[Tensor],
               context_mask: Optional[Tensor], read: Optional[Tensor] = None,
               context_kvs: Optional[list[Tensor]] = None) -> Tensor:
        """The blocks and the final norm over x (b,L,D) with mask (b,L) [and context (b,S,·), mask (b,S), or
        per layer its projected keys/values `context_kvs` (b,S,2D)]; with `read` (b,K) the last block at those
        positions only -> (b,K,D)."""
        kvs: list[Optional[Tensor]] = list(context_kvs) if context_kvs is not None else [None] * len(self.blocks)
        full = len(self.blocks) if read is None else len(self.blocks) - 1
        for block, kv in zip(self.blocks[:full], kvs):
            x = block(x, mask=attention_mask, context=context, context_mask=context_mask, context_kv=kv)
        if read is not None:
            x = block_at(self.blocks[-1], x, read, attention_mask, context, context_mask, kvs[-1])
        return self.final_norm(x)

    def _stack_kv(self, image_kv: ImageKV, attention_mask: Optional[Tensor], x: Tensor, rows: Tensor,
                  read: Optional[Tensor] = None) -> Tensor:
        """`_stack` of one bucket whose pass rows attend to images `rows` (b,) of `image_kv`."""
        context_mask = None if image_kv.mask is None else image_kv.mask[rows]
        return self._stack(attention_mask, x, None, context_mask, read, [kv[rows] for kv in image_kv.kv])

    def cls_attention(
        self, x: Tensor, attention_mask: Optional[Tensor] = None, context: Optional[Tensor] = None,
        context_mask: Optional[Tensor] = None,
    ) -> Tensor:
        """The last layer's self-attention probabilities of the [CLS] query, (B,H,T), for embeddings x
        (B,T,D) (SIMLA's pseudo-keyword selection reads them, spec §1.2 (d)); runs every layer but the last.
        Per length bucket (`length_buckets`): positions past a row's bucket length get probability 0, as every
        padded position does."""
        self._check_context(context)
        probs = run_in_length_buckets(self._cls_attention_rows, attention_mask, self.length_buckets, text=(x,),
                                      rows=(context, context_mask))
        return probs.transpose(1, 2)

    def _cls_attention_rows(self, attention_mask: Optional[Tensor], x: Tensor, context: Optional[Tensor],
                            context_mask: Optional[Tensor]) -> Tensor:
        """`cls_attention` of one bucket, position-major: (b,L,H)."""
        for block in self.blocks[:-1]:
            x = block(x, mask=attention_mask, context=context, context_mask=context_mask)
        return self.blocks[-1].self_attention_probs(x, attention_mask, query=0).transpose(1, 2)

    def forward(
        self, input_ids: Tensor, attention_mask: Optional[Tensor] = None, token_type_ids: Optional[Tensor] = None,
        context: Optional[Tensor] = None, context_mask: Optional[Tensor] = None,
    ) -> Tensor:
        """input_ids (B,T), attention_mask (B,T) 1 = real token -> hidden states (B,T,D) (cross-attending to
        `context` (B,S,cross_dim) when given)."""
        return self.forward_from_embeddings(self.embed(input_ids, token_type_ids), attention_mask, context,
                                            context_mask)

    def flops(self, text_len: int, context_len: int = 0) -> int:
        """Forward matmul FLOPs for one sequence of text_len tokens (embedding lookups are free), cross-
        attending to context_len tokens (0: text mode)."""
        return sum(block.flops(text_len, context_len) for block in self.blocks)


def block_at(block: Block, x: Tensor, read: Tensor, mask: Optional[Tensor] = None, context: Optional[Tensor] = None,
             context_mask: Optional[Tensor] = None, context_kv: Optional[Tensor] = None) -> Tensor:
    """`block(x, mask, context, context_mask)` at the positions `read` only: x (B,T,D), read (B,K) long -> (B,K,D).

    The queries are the rows' states at `read`; self-attention keys and values still come from every position
    of x (under `mask`), then the block's cross-attention and MLP run on the K positions: `Block.forward`'s
    sub-layers in its order, each of them per position, so the result equals the full block's at those
    positions up to float rounding. For a last layer whose output is read at a few positions (SIMLA reads the
    [CLS] for ITM, the masked tokens / patches for MLM / MIM). `context_kv` (B,S,2D): the context's projected keys
    and values (`ImageKV`), instead of `context`."""
    q = x.gather(1, read.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # (B,K,D)
    cross = block.cross is not None and block.norm_cross is not None and (context is not None or
                                                                           context_kv is not None)
    if block.norm_type == "pre":
        q = q + block.attn(block.norm1(q), block.norm1(x), mask)
        if cross:
            q = q + block.cross(block.norm_cross(q), context, context_mask, context_kv)
        return q + block.mlp(block.norm2(q))
    q = block.norm1(q + block.attn(q, x, mask))
    if cross:
        q = block.norm_cross(q + block.cross(q, context, context_mask, context_kv))
    return block.norm2(q + block.mlp(q))
