"""What the methods' inspection figures (`vlp show METHOD`) share: picking one sample of the embedded world."""

from __future__ import annotations

from pathlib import Path

import torch

from vlp.build import build_world, checkpoint_dir
from vlp.config import RunConfig, load_config
from vlp.data.datasets import PairDataset, collate
from vlp.data.tokenizer import TextTokenizer
from vlp.data.world import World, WorldSplit
from vlp.methods import method_class
from vlp.train.sampler import KEY_SEED_STRIDE
from vlp.types import Batch


def figure_config(config: str | Path | RunConfig, checkpoint: str | Path | None,
                  overrides: list[str] | None) -> tuple[RunConfig, Path | None]:
    """The run config a figure draws from, and the checkpoint directory when one is given: a checkpoint's
    own config.yaml (+ `overrides`) wins over `config` (a name, a YAML path or a built `RunConfig`)."""
    if checkpoint is not None:
        path = checkpoint_dir(checkpoint)
        return load_config(path / "config.yaml", overrides), path
    return (config if isinstance(config, RunConfig) else load_config(config, overrides)), None


def sample_key(row: int, seed: int = 0) -> int:
    """The sample key the trainer gives dataset row `row` in the first epoch of a run with
    `train.seed = seed` (`vlp.train.sampler`: seed * KEY_SEED_STRIDE + epoch * N + row, epoch 0). A method's
    masks and draws are a pure function of this key."""
    if row < 0 or seed < 0:
        raise ValueError(f"row and seed must be >= 0, got row={row}, seed={seed}")
    return int(seed) * KEY_SEED_STRIDE + int(row)


def sample_batch(data: WorldSplit, tokenizer: TextTokenizer, index: int, caption: int, seed: int, max_len: int,
                 captions_per_image: int, device: torch.device) -> tuple[Batch, int]:
    """Caption `caption` of `data[index]` as the one-row batch training sees (through `PairDataset` + `collate`,
    row = index * captions_per_image + caption) with the trainer's sample key, on `device`: (batch, row)."""
    dataset = PairDataset(data, tokenizer, max_len, captions_per_image=captions_per_image, max_words=max_len)
    row = index * captions_per_image + caption
    batch = collate([dataset[row]])
    batch.sample_keys = torch.tensor([sample_key(row, seed)], dtype=torch.long)
    return batch.to(device), row


def wrap_columns(widths: list[int], start: int, limit: int, gap: int = 3) -> list[list[int]]:
    """Columns of the given pixel `widths` laid out left to right from x = `start`, wrapped into bands so that
    no band runs past `limit`: the column indices of each band (a column wider than the room gets a band)."""
    bands: list[list[int]] = [[]]
    x = start
    for k, width in enumerate(widths):
        if bands[-1] and x + width > limit:
            bands.append([])
            x = start
        bands[-1].append(k)
        x += width + gap
    return bands


def world_sample(cfg: RunConfig, method: type, command: str, source: str | Path | RunConfig, split: str, index: int,
                 caption: int, captions_per_image: int) -> tuple[World, WorldSplit]:
    """(the world, the split holding sample `index` of `split`), after checking (ValueError naming the valid range or
    the fix) that `cfg` is a run of `method` on the world, that the split has images, and that `index` and
    `caption` (of the `captions_per_image` training uses) exist. `command` and `source` name what the user ran."""
    if method_class(cfg.method.name) is not method:
        raise ValueError(f"`{command}` needs a {method.__name__.upper()} run (method.name: {method.name}), but "
                         f"{source} has method.name: {cfg.method.name}")
    if cfg.data.source != "world":
        raise ValueError(f"`{command}` draws a sample of the embedded world (data.source: world), but the config "
                         f"has data.source: {cfg.data.source}")
    if split == "unpaired_text":
        raise ValueError("the unpaired_text split has no images (text only): pick an image split")
    world = build_world(cfg)
    data = world.split(split)
    if not 0 <= index < len(data):
        raise ValueError(f"--index {index} is out of range: the {split} split of this config has {len(data)} "
                         f"images (valid: 0..{len(data) - 1})")
    captions = min(len(data[index].captions), captions_per_image)
    if not 0 <= caption < captions:
        raise ValueError(f"--caption {caption} is out of range: training uses {captions} captions of "
                         f"{split}[{index}] (valid: 0..{captions - 1})")
    return world, data
