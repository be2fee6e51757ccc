"""Building what a run needs from its config: the world, the tokenizer, the method, checkpoints.

The bottom of the run layer (`build` <- `taskdata` <- `evaluate` <- `pretrain`, `finetune` <- `demo` <-
`api` <- `cli`): everything here turns a `RunConfig` (and a checkpoint directory) into objects, asking the
method's registered class (`vlp.methods.method_class`) for what differs between methods.
"""

from __future__ import annotations

from pathlib import Path
import torch

from vlp.config import ConfigError, MethodConfig, RunConfig, load_config
from vlp.data import lexicon
from vlp.data.datasets import RetrievalSet
from vlp.data.regions import read_class_vocab
from vlp.data.tokenizer import TextTokenizer
from vlp.data.world import World
from vlp.methods import METHODS, PretrainMethod, build_method, method_class
from vlp.models.model import VLModel
from vlp.train.checkpoint import load_model_weights
from vlp.tasks.retrieval import attach_colour_probes

EVAL_SPLIT_SIZE = 1000  # images in each of val / test / compositional


def build_world(cfg: RunConfig) -> World:
    """The embedded world at the model's image size; budgets are prefixes of its train split."""
    return World(
        seed=cfg.data.world_seed,
        image_size=cfg.model.vision.image_size,
        sizes={
            "train": cfg.data.train_images,
            "val": EVAL_SPLIT_SIZE,
            "test": EVAL_SPLIT_SIZE,
            "compositional": EVAL_SPLIT_SIZE,
        },
    )


def world_class_words() -> list[set[str]]:
    """Words naming each object class of the world (index = class id): CMAL's anchor lexicon."""
    return [lexicon.class_words(k) for k in range(len(lexicon.CLASSES))]


def class_words_for(cfg: RunConfig) -> list:
    """The object-class vocabulary a run's method was built with: the world's lexicon, or the detector's
    `data.class_vocab` (objects_vocab.txt) for precomputed regions; none for box-less user images.
    Rebuilding a checkpoint's method needs the same list (CMAL's region head has one class per entry)."""
    if cfg.data.source == "world":
        return world_class_words()
    if cfg.data.class_vocab is not None:
        return read_class_vocab(cfg.data.class_vocab)
    return []


def build_tokenizer(cfg: RunConfig, world: World) -> TextTokenizer:
    if cfg.data.tokenizer == "bert":
        return TextTokenizer.bert_uncased()
    return TextTokenizer.train_on_world(world, vocab_size=cfg.data.vocab_size)


def retrieval_set(cfg: RunConfig, world: World, tokenizer: TextTokenizer) -> RetrievalSet:
    if cfg.eval.num_images > EVAL_SPLIT_SIZE:
        raise ValueError(f"eval.num_images={cfg.eval.num_images} exceeds the world's {cfg.eval.split} split ({EVAL_SPLIT_SIZE} images)")
    split = world.split(cfg.eval.split)
    rset = RetrievalSet.build(split, tokenizer, cfg.data.max_text_len, cfg.eval.num_images,
                              max_words=cfg.data.max_text_len)
    # the one-object colour probe beside the attribute-swap hard negatives (`colour_probe_acc`)
    return attach_colour_probes(rset, split, tokenizer, cfg.data.max_text_len, max_words=cfg.data.max_text_len)


def build_run_method(cfg: RunConfig, tokenizer: TextTokenizer) -> torch.nn.Module:
    """A freshly initialised `VLModel` wrapped in the run's method, built with the run's class vocabulary
    (`class_words_for`): the shape every checkpoint of `cfg` loads into."""
    model = VLModel(cfg.model, vocab_size=tokenizer.vocab_size, pad_id=tokenizer.pad_id)
    return build_method(cfg, model, tokenizer, class_words=class_words_for(cfg))


def checkpoint_dir(checkpoint: str | Path) -> Path:
    """The checkpoint directory of `checkpoint` (a checkpoint or the run directory holding one), checked
    to hold config, tokenizer and weights."""
    path = Path(checkpoint)
    if (path / "checkpoint").is_dir():
        path = path / "checkpoint"
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {path} (pass the run's checkpoint/ folder)")
    for name in ("config.yaml", "tokenizer.json", "model.safetensors"):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path / name} is missing: {path} is not a complete vlp checkpoint")
    return path


def load_checkpoint_model(
    checkpoint: str | Path, overrides: list[str] | None = None
) -> tuple[RunConfig, TextTokenizer, VLModel]:
    """Rebuild config (+ `overrides`, e.g. eval settings), tokenizer and the shared `VLModel` from a
    checkpoint directory or the run directory holding one (method-owned modules are not loaded: use
    `load_checkpoint_method` for those)."""
    path = checkpoint_dir(checkpoint)
    cfg = load_config(path / "config.yaml", overrides)
    tokenizer = TextTokenizer.load(path / "tokenizer.json")
    model = VLModel(cfg.model, vocab_size=tokenizer.vocab_size, pad_id=tokenizer.pad_id)
    load_model_weights(path, model, prefix="model.")
    return cfg, tokenizer, model


def load_checkpoint_method(
    checkpoint: str | Path, overrides: list[str] | None = None
) -> tuple[RunConfig, TextTokenizer, torch.nn.Module]:
    """Like `load_checkpoint_model` but the whole pre-training method (its `VLModel` as `.model` plus the
    modules the method owns, e.g. CMAL's region embedding, region layers, region head and WRC τ),
    strictly loaded: every saved tensor must fit the rebuilt method."""
    path = checkpoint_dir(checkpoint)
    cfg = load_config(path / "config.yaml", overrides)
    tokenizer = TextTokenizer.load(path / "tokenizer.json")
    method = build_run_method(cfg, tokenizer)
    load_model_weights(path, method)
    return cfg, tokenizer, method


def method_class_of(cfg: RunConfig) -> type[PretrainMethod]:
    """The registered class of the run's method (ConfigError for a config without a method section)."""
    if type(cfg.method) is MethodConfig:  # the base section: the config names no method
        raise ConfigError(f"the config has no method section: set method.name (one of {', '.join(sorted(METHODS))}; "
                          f"e.g. --method NAME, or start from a shipped config)")
    return method_class(cfg.method.name)
