"""Worker for tests/test_ddp.py and tests/test_faults.py: train a tiny toy method with `vlp.train.Trainer`.

Run under torchrun (`python -m torch.distributed.run --standalone --nproc_per_node=2 tests/ddp_worker.py
OUT_DIR STEPS BATCH [--crash-dir DIR --crash-at-call K] [--resume] [--method masked] [--step-delay S]`) or
imported by the test for the single-process reference run. Each rank writes its pid to OUT_DIR/pid_rank<r>
at the start, then its returned records and its final torch RNG state to OUT_DIR/records_rank<r>.json. With
--crash-dir, a second run (same config) then trains in DIR and every rank raises in its K-th forward call
(caught), leaving DIR's last checkpoint for a --resume launch. `--method masked` trains `MaskedToy` (an
MLM-like position-mean loss) and writes `global_token_mean` of fixed per-rank sums to OUT_DIR/token_mean_rank<r>.json;
`--step-delay` sleeps that long in every forward (a slow run to kill).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from vlp.config import RunConfig, TrainConfig
from vlp.models.losses import IGNORE_INDEX, mlm_loss
from vlp.models.rng import keyed_uniform
from vlp.train import Trainer
from vlp.train.distributed import all_gather_with_grad, global_token_mean, rank
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


class MaskedToy(nn.Module):
    """An MLM-like objective: each of a row's 12 feature "tokens" is classified into 3 bins of its value by a
    linear head over the row's features, and only the positions selected by a keyed draw (p = 0.3: 0 to 12 per
    row) count, so ranks and micro-batches hold different numbers of them. `mlm` is `mlm_loss(name="mlm")`;
    `token_counts` gives the trainer the step's count (exact under accumulation too)."""

    CLASSES = 3

    def __init__(self, delay_s: float = 0.0) -> None:
        super().__init__()
        self.enc = nn.Linear(12, 16)
        self.head = nn.Linear(16, 12 * self.CLASSES)
        self.delay_s = delay_s

    def labels(self, batch: Batch) -> torch.Tensor:
        """(B, 12) long: the value bin (< -0.5, < 0.5, else) of each selected feature, -100 elsewhere."""
        x = batch.images.flatten(1)
        bins = (x > -0.5).long() + (x > 0.5).long()
        selected = keyed_uniform(batch.sample_keys, (12,), salt=11) < 0.3
        return torch.where(selected, bins, torch.full_like(bins, IGNORE_INDEX))

    def token_counts(self, batch: Batch) -> dict[str, torch.Tensor]:
        return {"mlm": (self.labels(batch) != IGNORE_INDEX).sum()}

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        if self.delay_s:
            time.sleep(self.delay_s)
        logits = self.head(torch.tanh(self.enc(batch.images.flatten(1)))).view(len(batch), 12, self.CLASSES)
        loss = mlm_loss(logits, self.labels(batch), name="mlm")
        return {"loss": loss, "mlm": loss.detach()}


class UnannouncedMaskedToy(MaskedToy):
    """`MaskedToy` without `token_counts`: its MLM is a mean over each micro-batch's positions (of all ranks)."""

    token_counts = None


def config(steps: int, batch: int, grad_accum: int = 1) -> RunConfig:
    return RunConfig(
        train=TrainConfig(
            steps=steps, batch_size=batch, grad_accum=grad_accum, lr=5e-2, warmup_steps=2, log_every=1,
            ckpt_every=3, tensorboard=False, progress=False, device="cpu", grad_clip=1.0,
        )
    )


def train(out_dir: str | Path, steps: int, batch: int, crash_at_call: int | None = None,
          resume: bool = False, method: str = "contrastive", grad_accum: int = 1, announce: bool = True,
          delay_s: float = 0.0) -> list[dict]:
    torch.manual_seed(0)
    if method == "masked":
        model: nn.Module = MaskedToy(delay_s) if announce else UnannouncedMaskedToy(delay_s)
    else:
        model = ContrastiveToy(crash_at_call)
    trainer = Trainer(config(steps, batch, grad_accum), model, PairData(), collate, out_dir)
    return trainer.fit(resume=out_dir if resume else None)


def token_mean_probe() -> list[float]:
    """`global_token_mean` of rank-dependent sums and counts: rank r holds sums (3 + 2r, 1) over 1 + 2r
    positions (2 ranks: 4 positions in all)."""
    r = rank()
    return global_token_mean(torch.tensor([3.0 + 2 * r, 1.0]), torch.tensor(1 + 2 * r)).tolist()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("steps", type=int)
    parser.add_argument("batch", type=int)
    parser.add_argument("--crash-dir", type=Path, default=None)
    parser.add_argument("--crash-at-call", type=int, default=None)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--method", default="contrastive", choices=["contrastive", "masked"])
    parser.add_argument("--step-delay", type=float, default=0.0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with distributed_session(device="cpu"):
        (args.out_dir / f"pid_rank{rank()}").write_text(str(os.getpid()))
        if args.method == "masked":
            (args.out_dir / f"token_mean_rank{rank()}.json").write_text(json.dumps(token_mean_probe()))
        records = train(args.out_dir, args.steps, args.batch, resume=args.resume, method=args.method,
                        delay_s=args.step_delay)
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
