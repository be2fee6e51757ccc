"""Worker for tests/test_ddp.py: train a tiny contrastive toy method with `vlp.train.Trainer`.

Run under torchrun (`python -m torch.distributed.run --standalone --nproc_per_node=2 tests/ddp_worker.py
OUT_DIR STEPS BATCH [--crash-dir DIR --crash-at-call K] [--resume]`) or imported by the test for the
single-process reference run. Each rank writes its returned records and its final torch RNG state to
OUT_DIR/records_rank<r>.json. With --crash-dir, a second run (same config) then trains in DIR and every
rank raises in its K-th forward call (caught), leaving DIR's last checkpoint for a --resume launch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from vlp.config import RunConfig, TrainConfig
from vlp.models.rng import keyed_uniform
from vlp.train import Trainer
from vlp.train.distributed import all_gather_with_grad, rank
from vlp.train.launch import distributed_session
from vlp.types import Batch


class PairData(Dataset):
    """Synthetic paired 'images' (12 features) and 'texts' (4 features) that share a latent."""

    def __init__(self, n: int = 48, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        z = torch.randn(n, 4, generator=g)
        self.x = (z @ torch.randn(4, 12, generator=g) + 0.1 * torch.randn(n, 12, generator=g)).reshape(n, 3, 2, 2)
        self.y = z + 0.1 * torch.randn(n, 4, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor, torch.Tensor]:
        return i, self.x[i], self.y[i]


def collate(items: list) -> Batch:
    idx = torch.tensor([i for i, _, _ in items], dtype=torch.long)
    return Batch(
        input_ids=idx[:, None],
        attention_mask=torch.ones(len(items), 1, dtype=torch.long),
        images=torch.stack([x for _, x, _ in items]),
        labels=torch.stack([y for _, _, y in items]),
        image_ids=idx,
    )


class ContrastiveToy(nn.Module):
    """Two linear towers + a symmetric InfoNCE over the *global* batch (features gathered with grad), so
    the loss of a row depends on rows held by other ranks. `unused` never gets a gradient (DDP must
    tolerate it). Per-sample input noise is keyed by `sample_keys`, so it does not depend on the rank."""

    def __init__(self, crash_at_call: int | None = None) -> None:
        super().__init__()
        self.crash_at_call = crash_at_call
        self.calls = 0
        self.img = nn.Linear(12, 8)
        self.txt = nn.Linear(4, 8)
        self.logit_scale = nn.Parameter(torch.tensor(2.0))
        self.unused = nn.Linear(3, 3)

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        self.calls += 1
        if self.calls == self.crash_at_call:
            raise RuntimeError("simulated crash")
        noise = keyed_uniform(batch.sample_keys, (12,), salt=7) - 0.5
        a = F.normalize(self.img(batch.images.flatten(1) + 0.1 * noise), dim=-1)
        b = F.normalize(self.txt(batch.labels), dim=-1)
        a_all, b_all = all_gather_with_grad(a), all_gather_with_grad(b)
        targets = torch.arange(len(a), device=a.device) + rank() * len(a)
        scale = self.logit_scale.exp()
        i2t = F.cross_entropy(scale * a @ b_all.T, targets)
        t2i = F.cross_entropy(scale * b @ a_all.T, targets)
        return {"loss": (i2t + t2i) / 2, "i2t": i2t.detach(), "t2i": t2i.detach()}


def config(steps: int, batch: int) -> RunConfig:
    return RunConfig(
        train=TrainConfig(
            steps=steps, batch_size=batch, lr=5e-2, warmup_steps=2, log_every=1, ckpt_every=3,
            tensorboard=False, progress=False, device="cpu", grad_clip=1.0,
        )
    )


def train(out_dir: str | Path, steps: int, batch: int, crash_at_call: int | None = None,
          resume: bool = False) -> list[dict]:
    torch.manual_seed(0)
    method = ContrastiveToy(crash_at_call)
    trainer = Trainer(config(steps, batch), method, PairData(), collate, out_dir)
    return trainer.fit(resume=out_dir if resume else None)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("steps", type=int)
    parser.add_argument("batch", type=int)
    parser.add_argument("--crash-dir", type=Path, default=None)
    parser.add_argument("--crash-at-call", type=int, default=None)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with distributed_session(device="cpu"):
        records = train(args.out_dir, args.steps, args.batch, resume=args.resume)
        result = {"records": records, "rng": torch.get_rng_state().tolist()}
        (args.out_dir / f"records_rank{rank()}.json").write_text(json.dumps(result))
        if args.crash_dir is not None:
            try:
                train(args.crash_dir, args.steps, args.batch, crash_at_call=args.crash_at_call)
            except RuntimeError as err:
                if "simulated crash" not in str(err):
                    raise
            else:
                raise AssertionError("the crash run did not crash")


if __name__ == "__main__":
    main()
    # torch 2.13 does not free the gloo group once DDP was built; its threads occasionally abort
    # interpreter teardown ("terminate called without an active exception"). All output is written.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
