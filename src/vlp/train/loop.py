"""The training loop: any method, one to N processes, step-exact resume.

The trainer knows nothing method-specific. A method is an `nn.Module` whose `forward(batch)` returns a
dict with a differentiable `loss` and detached scalar parts; `on_step_end()` (if defined) runs after every
optimiser step (momentum / EMA / queue updates).

One optimiser step consumes the global batch `train.batch_size` = world_size x grad_accum micro-batches.
Rows come from `StepSampler` (a pure function of the step), so a run of N steps equals k steps + resume +
N - k steps bit for bit on CPU: the checkpoint stores model, optimiser, scheduler, GradScaler, every rank's
RNG states and the step, and the data position follows from the step.

Each micro-batch's loss is divided by grad_accum and DDP averages gradients over ranks, so a loss that is a
mean over rows is the mean over the global batch. A position-mean loss (MLM over masked tokens: each row
masks a different number) is too: it divides its sum by the positions of the whole step via
`vlp.models.losses.global_token_mean`. A method announces those counts with `token_counts(batch) ->
{name: count}` over this rank's whole step batch (ALBEF, SIMLA, UNITER: MLM / MIM); the trainer sums them over
ranks before the micro-batches run and checks afterwards that the losses of that name averaged over exactly
those positions. Without the announcement a position mean is over every rank's positions of one
micro-batch: exact for any number of ranks, and the mean of the micro-batch means under grad_accum.

A fresh run refuses a directory that already holds a run (`claim_out_dir`: resume it or overwrite it).

Outputs under `out_dir`:
  metrics.jsonl   one JSON record per `log_every` steps (window means, averaged over ranks) and per eval
  config.yaml     the resolved config
  runtime.json    this attempt's CPU settings (`vlp.train.cpu.RuntimeInfo`: threads, capability, precision
                  used); its `header` line is printed when the run starts
  tb/             TensorBoard scalars (when `train.tensorboard`)
  checkpoint/     see `vlp.train.checkpoint`
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
import random
import shutil
import sys
import time
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from vlp.config import RunConfig, dump_config
from vlp.data.datasets import distinct_images
from vlp.data.skips import SKIPPED_FILE, DataError, SkipLedger, SkippingCollate, empty_batch, unwrap_worker_error
from vlp.data.workers import data_worker_init
from vlp.models.model import VLModel
from vlp.progress import format_eta
from vlp.train import launch
from vlp.train.checkpoint import (
    CHECKPOINT,
    CHECKPOINT_PREV,
    CHECKPOINT_TMP,
    METRICS_FILE,
    MODEL_FILE,
    CheckpointError,
    NonFiniteError,
    capture_rng_state,
    checkpoint_step,
    last_checkpoint_note,
    load_checkpoint,
    nonfinite_advice,
    read_trainer_state,
    remove_stale_previous,
    resolve_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from vlp.train.cpu import RuntimeInfo, configure_cpu
from vlp.train.distributed import all_reduce_mean, is_distributed, rank, step_token_totals, world_size
from vlp.train.optim import build_optimizer, build_scheduler
from vlp.train.precision import autocast_dtype
from vlp.train.sampler import StepBatchSampler, StepSampler, epoch_seed
from vlp.train.timing import PhaseClock, step_laps
from vlp.types import Batch

logger = logging.getLogger("vlp.train")

EvalFn = Callable[[nn.Module, int], dict]


def compile_encoders(module: nn.Module, backend: str = "inductor") -> list[str]:
    """`train.compile: encoders`: compile the ViT, text and fusion stacks of every `VLModel` inside `module`
    in place (`nn.Module.compile`: parameter names and checkpoints are unchanged); returns the names of the
    compiled submodules. The methods' own Python (masking, negatives, keyed randomness) stays eager: whole-
    method compilation crashed on CPU inside the generated kernel for `mask_tokens` (issue 15)."""
    compiled = []
    for name, sub in module.named_modules():
        if isinstance(sub, VLModel):
            for part in ("vision", "text", "fusion"):
                encoder = getattr(sub, part, None)
                if encoder is not None and any(True for _ in encoder.parameters()):
                    encoder.compile(backend=backend)
                    compiled.append(f"{name}.{part}" if name else part)
    return compiled


def seed_everything(seed: int) -> None:
    """Seed python `random`, numpy's global RNG and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def _scalar(value: Any, device: torch.device) -> Tensor:
    """A method output entry as a detached float32 scalar on `device` (means over non-scalars)."""
    t = value.detach() if isinstance(value, Tensor) else torch.as_tensor(value)
    t = t.to(device=device, dtype=torch.float32)
    return t if t.dim() == 0 else t.mean()


def progress_line(name: str, step: int, total: int, loss: float, lr: float, samples_per_s: float,
                  eta_s: float) -> str:
    """One plain progress line (non-TTY runs), e.g.
    `[albef] step 40/350 loss 3.2140 lr 9.8e-04 112.3 samples/s ETA 2m41s`."""
    return (f"[{name}] step {step}/{total} loss {loss:.4f} lr {lr:.1e} {samples_per_s:.1f} samples/s "
            f"ETA {format_eta(eta_s)}")


def _read_metrics(source: Path) -> list[tuple[str, dict]]:
    """(line, record) of each record in the metrics log `source` (none when it does not exist). A torn last
    line (a kill while it was written) is dropped with a warning; an unreadable line before it is a
    CheckpointError naming the file and the line number."""
    if not source.is_file():
        return []
    lines = source.read_bytes().decode("utf-8", errors="replace").splitlines()
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    out: list[tuple[str, dict]] = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError(f"a JSON {type(record).__name__}, not a record")
            if not isinstance(record.get("step", 0), (int, float)):
                raise ValueError(f"step is {record['step']!r}, not a number")
        except ValueError as err:
            if i == last:
                warnings.warn(f"{source}: dropped its unreadable last line {i + 1} (torn by a kill while it was "
                              f"written?): {line[:80]!r}", stacklevel=3)
                continue
            raise CheckpointError(f"{source} line {i + 1} is not a metrics record ({err}): fix or delete that "
                                  "line, then resume again") from None
        out.append((line, record))
    return out


def read_metrics(source: str | Path) -> list[dict]:
    """The records of the metrics log `source` (train and eval, in order; none when it does not exist). A torn
    last line is dropped with a warning, an unreadable earlier line is a CheckpointError."""
    return [record for _, record in _read_metrics(Path(source))]


class RunExistsError(CheckpointError):
    """A fresh run was started in a directory that already holds one (neither resume nor overwrite asked)."""


# What a run writes into its directory; a fresh run started with `overwrite` removes these first, so that no
# checkpoint, metrics, TensorBoard event or evaluation of the old run mixes into the new one. config.yaml and
# tokenizer.json are rewritten by every start.
RUN_OUTPUTS = (CHECKPOINT, CHECKPOINT_PREV, CHECKPOINT_TMP, METRICS_FILE, METRICS_FILE + ".tmp", "tb", "eval.json",
               "prepare.json", "runtime.json", "loss_curve.png", "retrieval_examples.png", SKIPPED_FILE)


def existing_run(out_dir: str | Path) -> Optional[tuple[int, bool]]:
    """(step, resumable) of the run `out_dir` already holds, None when it holds none.

    A run is a checkpoint (`checkpoint/`, or `checkpoint.prev/` after a crash mid-swap; step = its step, and
    resumable) or, without one, a metrics.jsonl with at least one record (step = its last record's; not
    resumable: killed before its first checkpoint). An empty metrics.jsonl (a start that failed before step 1)
    is no run."""
    out_dir = Path(out_dir)
    for name in (CHECKPOINT, CHECKPOINT_PREV):
        ckpt = out_dir / name
        if (ckpt / MODEL_FILE).is_file():
            step = checkpoint_step(ckpt)
            return (step if step is not None else -1), True
    metrics = out_dir / METRICS_FILE
    if not metrics.is_file():
        return None
    steps = [-1]
    lines = [line for line in metrics.read_bytes().decode("utf-8", errors="replace").splitlines() if line.strip()]
    for line in lines:
        try:  # tolerant: a torn or damaged line still means that a run was here
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), (int, float)):
            steps.append(int(record["step"]))
    return (max(steps), False) if lines else None


def claim_out_dir(out_dir: str | Path, overwrite: bool = False) -> None:
    """Before a fresh (not resumed) run writes into `out_dir`: a `RunExistsError` when the directory already
    holds a run (`existing_run`), unless `overwrite`, which removes that run's outputs (`RUN_OUTPUTS`) instead.

    Collective in a distributed run (call it on every rank): rank 0 looks and removes, every rank raises."""
    error: Optional[BaseException] = None
    if rank() == 0:
        try:
            found = existing_run(out_dir)
            if found is not None and not overwrite:
                step, resumable = found
                shown = f"step {step}" if step >= 0 else "step unknown"
                if resumable:
                    raise RunExistsError(f"{out_dir} already holds a run ({shown}); pass --resume {out_dir} to "
                                         "continue it or --overwrite to start over")
                raise RunExistsError(f"{out_dir} already holds a run ({shown}, killed before its first checkpoint: "
                                     "nothing to resume); pass --overwrite to start over")
            if found is not None:
                logger.warning("%s held a run (step %d): removing its outputs (overwrite)", out_dir, found[0])
                for name in RUN_OUTPUTS:
                    path = Path(out_dir) / name
                    if path.is_dir():
                        shutil.rmtree(path)
                    elif path.exists():
                        path.unlink()
        except BaseException as err:  # re-raised below, after telling the other ranks
            error = err
    if is_distributed():
        status = [None if error is None else str(error)]
        torch.distributed.broadcast_object_list(status, src=0)
        if status[0] is not None and error is None:
            raise RunExistsError(status[0])
    if error is not None:
        raise error


class Trainer:
    """Train `method` on `dataset` following `cfg.train` (see the module docstring).

    Args:
        cfg: the resolved run config (`cfg.train` drives the loop, `cfg.data.num_workers` the loader).
        method: the method module (moved to the training device; wrapped in DDP when distributed).
        dataset: map-style dataset; `collate_fn(list of items) -> Batch`. Or a stream with `step_stream(start_step,
            end_step, per_rank, rank, world_size, num_workers) -> IterableDataset` and `stream_state(num_workers)`
            (`vlp.data.shards.ShardDataset`): its items carry their own sample keys, and a resume continues it
            at the step's sample as the sampler does for map-style data.
        out_dir: run directory (defaults to `cfg.train.out_dir`).
        eval_fn: `eval_fn(method, step) -> {name: number}`, called on rank 0 every `eval_every` steps and
            at the end with the unwrapped method in eval mode; its RNG use does not perturb training.
            It must not use collectives (the other ranks wait at a barrier).
        tokenizer_json: path of the tokenizer file copied into every checkpoint.
        side_files: other files copied into every checkpoint (a fine-tune's task.json), under their names.

    After construction `optimizer`, `scheduler`, `scaler`, `sampler`, `device` and `model` (the DDP
    wrapper or the method itself) are available; `fit()` runs the loop.
    """

    def __init__(
        self,
        cfg: RunConfig,
        method: nn.Module,
        dataset: Dataset,
        collate_fn: Callable[[list], Batch],
        out_dir: str | Path | None = None,
        eval_fn: Optional[EvalFn] = None,
        tokenizer_json: str | Path | None = None,
        side_files: Sequence[str | Path] = (),
    ) -> None:
        tc = cfg.train
        if tc.steps <= 0:
            raise ValueError(f"train.steps must be positive, got {tc.steps}")
        if launch.init_distributed(tc.device):
            atexit.register(launch.shutdown)
        self.cfg = cfg
        self.rank = rank()
        self.world_size = world_size()
        self.device = launch.select_device(tc.device)
        self.out_dir = Path(out_dir if out_dir is not None else tc.out_dir)
        self.dataset = dataset
        self._streaming = callable(getattr(dataset, "step_stream", None))
        # Items a dataset could not decode (`BadSample`s, data.skip_bad / task.skip_bad) are dropped from their
        # batch onto `Batch.skipped` and counted in `skips` (skipped_records.json; refused beyond
        # data.max_bad_fraction). Without bad items the wrapper is the collate function itself.
        self.collate_fn = SkippingCollate(collate_fn)
        self.skipping = bool(getattr(dataset, "skip_bad", False))
        self.skips = SkipLedger(cfg.data.max_bad_fraction)
        self.eval_fn = eval_fn
        self.tokenizer_json = str(tokenizer_json) if tokenizer_json is not None else None
        self.side_files = tuple(side_files)
        if self.tokenizer_json is not None and not Path(self.tokenizer_json).is_file():
            raise FileNotFoundError(f"tokenizer file not found: {self.tokenizer_json}")
        self.sampler = StepSampler(len(dataset), tc.batch_size, self.world_size, self.rank, tc.grad_accum, tc.seed)
        self.method = method.to(self.device)
        # torch threads (train.threads, auto from the cores and data workers) and the precision the run
        # uses (bf16 falls back to fp32 on a CPU without bf16 hardware; autocast_dtype warns)
        self.runtime: RuntimeInfo = configure_cpu(tc, int(cfg.data.num_workers), self.device)
        self.amp_dtype = autocast_dtype(tc.precision, self.device, warn=True)
        self.optimizer = build_optimizer(self.method, tc)
        self.scheduler = build_scheduler(self.optimizer, tc)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self._params = [p for g in self.optimizer.param_groups for p in g["params"]]
        # Heads trained on detached inputs (`PretrainMethod.separately_clipped`, e.g. a first retrieval stage)
        # are clipped on their own, so that they cannot change the clipped update of the method's parameters.
        side = tuple(method.separately_clipped()) if hasattr(method, "separately_clipped") else ()
        side_ids = {id(p) for name, p in method.named_parameters() if side and name.startswith(side)}
        self._clip_groups = [group for group in ([p for p in self._params if id(p) not in side_ids],
                                                 [p for p in self._params if id(p) in side_ids]) if group]
        self.model: nn.Module = self.method
        # A method declares the trainable parameters a step may leave without a gradient
        # (`unused_parameters() -> set of names`); DDP only searches for unused ones when that set is
        # non-empty. Modules without the declaration (e.g. fine-tuning task modules) keep the search.
        declared = getattr(self.method, "unused_parameters", None)
        self.find_unused_parameters = True if declared is None else bool(declared())
        if tc.compile == "encoders":
            compile_encoders(self.method, tc.compile_backend)
        if is_distributed():
            # Buffers (queues, momentum copies) are kept identical by the methods themselves (gathered
            # updates): synced once at wrap, not every forward.
            self.model = DistributedDataParallel(
                self.method,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=self.find_unused_parameters,
                forward_sync_buffers=False,
            )
        if tc.compile == "method":  # after the DDP wrap (torch's advice: DDP's hooks then see compiled graphs)
            self.model = torch.compile(self.model, backend=tc.compile_backend)
        self.step = 0
        self._first_step = 0
        self.records: list[dict] = []
        self._writer = None

    # ------------------------------------------------------------------------------- setup
    def _autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _loader(self, start_step: int) -> DataLoader:
        """One collated batch per step for steps [start_step, steps): the rows of a step are fixed by
        the sampler, whatever the number of workers."""
        workers = int(self.cfg.data.num_workers)
        # A private generator: creating the loader must not draw from the global torch RNG (that would
        # make a resumed run diverge from a straight one).
        generator = torch.Generator().manual_seed(epoch_seed(self.cfg.train.seed + 7919 * self.rank, start_step))
        pin = self.device.type == "cuda"  # page-locked batches (`Batch.pin_memory`): train_step's copy is asynchronous
        if self._streaming:  # per_rank items per step from the stream's (rank, worker) share, resumed at start_step
            stream = self.dataset.step_stream(start_step, self.cfg.train.steps, self.sampler.per_rank, self.rank,
                                              self.world_size, workers)
            return DataLoader(stream, batch_size=self.sampler.per_rank, collate_fn=self.collate_fn,
                              num_workers=workers, generator=generator, worker_init_fn=data_worker_init,
                              pin_memory=pin)
        return DataLoader(
            self.dataset,
            batch_sampler=StepBatchSampler(self.sampler, start_step, self.cfg.train.steps),
            collate_fn=self.collate_fn,
            num_workers=workers,
            persistent_workers=workers > 0,
            generator=generator,
            worker_init_fn=data_worker_init,
            pin_memory=pin,
        )

    def _data_state(self) -> dict:
        """What fixes the data order (stored in checkpoints; a resume that changes it warns)."""
        state = {**self.sampler.state(), "world_size": self.world_size, "grad_accum": self.cfg.train.grad_accum}
        if self._streaming:  # a stream's order also follows its readers (data workers) and shards
            state.update(self.dataset.stream_state(int(self.cfg.data.num_workers)))
        return state

    def _metrics_path(self) -> Path:
        return self.out_dir / METRICS_FILE

    def _prepare_out_dir(self, start_step: int, checkpoint_dir: Optional[Path]) -> None:
        """Rank 0: write config.yaml; start metrics.jsonl (fresh run) or keep its records up to the resumed
        step (taken from the checkpoint's copy when the run directory has none)."""
        if self.rank != 0:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "config.yaml").write_text(dump_config(self.cfg))
        (self.out_dir / "runtime.json").write_text(json.dumps(self.runtime.as_dict(), indent=2) + "\n")
        metrics = self._metrics_path()
        if checkpoint_dir is None:  # a fresh run: `claim_out_dir` has refused or cleared an earlier one
            metrics.write_text("")
            return
        source = metrics if metrics.is_file() else checkpoint_dir / METRICS_FILE
        kept = [line for line, record in _read_metrics(source) if record.get("step", 0) <= start_step]
        tmp = metrics.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, metrics)

    def _tensorboard(self):
        if self._writer is None and self.cfg.train.tensorboard and self.rank == 0:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: events a crashed attempt logged after the resumed step are dropped.
            self._writer = SummaryWriter(log_dir=str(self.out_dir / "tb"), purge_step=self._first_step + 1)
        return self._writer

    def _resume(self, resume: str | Path) -> tuple[int, Path]:
        state = load_checkpoint(resume, self.method, self.optimizer, self.scheduler, self.scaler)
        step = int(state["step"])
        extra = state.get("extra", {})
        saved_data = extra.get("data", {})
        current = self._data_state()
        changed = {k: (saved_data[k], v) for k, v in current.items() if k in saved_data and saved_data[k] != v}
        if changed:
            warnings.warn(
                "resuming with a different data layout than the checkpoint "
                + ", ".join(f"{k}: {a} -> {b}" for k, (a, b) in changed.items())
                + "; the run continues but is not step-exact",
                stacklevel=3,
            )
        used = Path(state["path"])
        if self.rank == 0 and used.parent.resolve() == self.out_dir.resolve():
            remove_stale_previous(used)  # the run's newest checkpoint loaded intact: an older one is stale
        rng_states = state.get("rng") or []
        if len(rng_states) == self.world_size:
            restore_rng_state(rng_states[self.rank])
        else:
            seed_everything(self.cfg.train.seed + self.rank + 1_000_003 * step)
        logger.info("resumed from %s at step %d", state["path"], step)
        return step, Path(state["path"])

    # ------------------------------------------------------------------------------- steps
    # `vlp bench train` sets a clock to split a step's time into forward / backward / optimizer; None in
    # training (no device syncs, no timing).
    phase_clock: Optional[PhaseClock] = None

    def train_step(self, batch: Batch, rows_per_item: int = 1) -> tuple[dict[str, Tensor], float]:
        """Forward/backward over the grad_accum micro-batches, then one optimiser step (with grad
        clipping, GradScaler, scheduler step and the method's `on_step_end`); `fit` and `vlp bench` run it.

        Micro-batches are cut by dataset items, not rows: an item of `rows_per_item` rows (an NLVR2
        example is its left and right image) never straddles two micro-batches.
        Returns the micro-batch-averaged detached outputs (+ `grad_norm` when clipping) and the LR used.

        With `phase_clock` set, the step's time is billed to "forward" (moving the batch, counting its tokens,
        autocast + the method's forward up to the loss), "backward" (the scaled backward) and "optimizer"
        (unscale and clipping, the scaler's step and update, zero_grad, the LR schedule, `on_step_end`),
        summed over micro-batches.
        """
        tc = self.cfg.train
        accum = tc.grad_accum
        if len(batch) == 0:  # every item of the step was bad (--skip-bad)
            return self._empty_step()
        lap = step_laps(self.phase_clock)  # lap(phase) bills the time since the last lap; a no-op without a clock
        items = len(batch) // rows_per_item  # per_rank, or fewer when bad items were dropped (balanced micro-batches)
        batch = batch.to(self.device, non_blocking=True)
        local_counts, global_counts = self._token_counts(batch)
        sums: dict[str, Tensor] = {}
        with step_token_totals(global_counts, self.world_size * accum) as totals:
            for i in range(accum):
                part = batch if accum == 1 else batch.slice(rows_per_item * (i * items // accum),
                                                            rows_per_item * ((i + 1) * items // accum))
                last = i == accum - 1
                ddp = isinstance(getattr(self.model, "_orig_mod", self.model), DistributedDataParallel)  # compiled: its wrapped module
                sync = self.model.no_sync() if ddp and not last else nullcontext()  # all-reduce on the last only
                with sync:
                    with self._autocast():
                        out = self.model(part)
                    if not isinstance(out, dict) or "loss" not in out:
                        raise TypeError(
                            f"{type(self.method).__name__}.forward must return a dict with a 'loss' entry, got "
                            f"{type(out).__name__}{' with keys ' + str(list(out)) if isinstance(out, dict) else ''}"
                        )
                    loss = out["loss"]
                    lap("forward")
                    self.scaler.scale(loss / accum if accum > 1 else loss).backward()
                    lap("backward")
                for key, value in out.items():
                    v = _scalar(value, self.device)
                    sums[key] = sums[key] + v if key in sums else v
        self._check_token_counts(local_counts, totals.seen)
        lr = float(self.optimizer.param_groups[0]["lr"])
        results = {k: (v / accum if accum > 1 else v) for k, v in sums.items()}
        if tc.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            norms = [torch.nn.utils.clip_grad_norm_([p for p in group if p.grad is not None], tc.grad_clip)
                     for group in self._clip_groups]
            results["grad_norm"] = norms[0].detach().float()  # the method's own parameters
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        on_step_end = getattr(self.method, "on_step_end", None)
        if callable(on_step_end):
            on_step_end()
        lap("optimizer")
        return results, lr

    def _token_counts(self, batch: Batch) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """(this rank's, all ranks') number of positions each named position-mean loss of the method averages
        over in this step: the method's `token_counts(batch) -> {name: count}` over this rank's whole step
        batch, summed over ranks (one all-reduce). Empty for a method without `token_counts`. The names must
        be the same on every rank (they follow the config and the step, not the data)."""
        count_positions = getattr(self.method, "token_counts", None)
        if not callable(count_positions):
            return {}, {}
        with torch.no_grad():
            local = {name: torch.as_tensor(count, device=self.device).long().reshape(())
                     for name, count in sorted(count_positions(batch).items())}
        if not local:
            return {}, {}
        summed = torch.stack(list(local.values()))
        if is_distributed():
            torch.distributed.all_reduce(summed, op=torch.distributed.ReduceOp.SUM)
        return local, dict(zip(local, summed))

    def _check_token_counts(self, local: dict[str, Tensor], seen: dict[str, Tensor]) -> None:
        """A RuntimeError when the positions the method's losses averaged over this step (`seen`, by name) are
        not those its `token_counts` announced: the losses would be divided by a wrong count."""
        names = [name for name in seen if name in local]
        if not names:
            return
        announced, averaged = torch.stack([local[n] for n in names]), torch.stack([seen[n].long() for n in names])
        if not bool((announced == averaged).all()):
            raise RuntimeError(
                f"{type(self.method).__name__}.token_counts announced {dict(zip(names, announced.tolist()))} "
                f"positions but its losses averaged over {dict(zip(names, averaged.tolist()))}: it must count the "
                "positions the losses of that name average over in the whole step batch")

    @staticmethod
    def _rows_per_item(rows: int, items: int) -> int:
        """Rows each dataset item contributed to a collated batch (1 for pre-training; 2 for NLVR2 pairs)."""
        if rows % items:
            raise ValueError(f"a batch of {items} items collated to {rows} rows: the collate function must give "
                             "every item the same number of rows")
        return rows // items

    # ------------------------------------------------------------------------------- bad samples
    def _next_batch(self, batches: Any) -> Batch:
        """The next collated batch. An error raised in a DataLoader worker reaches the caller as the worker raised
        it (`unwrap_worker_error`): a bad file gives the same one-line error with 0 or N data workers."""
        try:
            return next(batches)
        except (ValueError, FileNotFoundError) as err:
            original = unwrap_worker_error(err)
            if original is err:
                raise
            raise original from None

    def _usable(self, batch: Batch, step: int) -> tuple[Batch, Tensor]:
        """Count the step's bad items (`batch.skipped`) in `self.skips`; returns the batch to train on and the
        sample keys (items,) of its items.

        A map-style batch's kept items are found by their dataset rows (`collate` puts each row's dataset index in
        `sample_keys`; decoding is deterministic, so every occurrence of a bad row in a step is bad). A step in
        which a rank kept fewer items than micro-batches (`train.grad_accum`) becomes empty on every rank (with
        skipping on, the ranks agree by one all-reduce per step); `train_step` then changes no weight and the
        step still counts (`_empty_step`)."""
        keys = batch.sample_keys if self._streaming else self.sampler.rank_rows(step).keys
        if batch.skipped and not self._streaming:
            keys = keys[torch.isin(self.sampler.rank_rows(step).indices, batch.sample_keys.cpu())]
        too_few, skipped = len(keys) < self.cfg.train.grad_accum, len(batch.skipped)
        if self.skipping and is_distributed():
            flags = torch.tensor([float(too_few), float(skipped)],
                                 device=self.device if self.device.type == "cuda" else "cpu")
            torch.distributed.all_reduce(flags)
            too_few, skipped = bool(flags[0] > 0), int(flags[1])
        self.skips.add(self.cfg.train.batch_size, batch.skipped, skipped)  # all ranks' samples and bad ones
        if too_few and len(batch):
            batch, keys = empty_batch(batch.skipped), keys[:0]
        return batch, keys

    def _empty_step(self) -> tuple[dict[str, Tensor], float]:
        """The step of a batch without a usable item (all bad): no forward, no weight or method-state change, but
        the LR schedule advances, so the step counts like any other and a resumed run stays exact."""
        lr = float(self.optimizer.param_groups[0]["lr"])
        self.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():  # no optimizer.step() before it is intended here
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
            self.scheduler.step()
        return {}, lr

    def _merged_skips(self) -> SkipLedger:
        """`self.skips` with every rank's reasons and examples (collective in a distributed run; the totals are
        already global)."""
        if not is_distributed():
            return self.skips
        parts: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(parts, (self.skips.by_reason, self.skips.examples))
        merged = SkipLedger(self.skips.max_fraction, self.skips.keep)
        merged.seen, merged.skipped = self.skips.seen, self.skips.skipped
        for by_reason, examples in parts:
            merged.merge_reasons(examples, by_reason)
        return merged

    def _write_skips(self) -> SkipLedger:
        """Rank 0 writes skipped_records.json (collective); returns the merged ledger."""
        merged = self._merged_skips()
        if self.rank == 0:
            merged.write(self.out_dir)
        return merged

    def _judge_skips(self, final: bool) -> None:
        """A `DataError` (one line: how many were bad, the limit, the first files, the fix), after writing
        skipped_records.json, once more than data.max_bad_fraction of the samples were bad (`SkipLedger.over_limit`;
        the same decision on every rank)."""
        if self.skipping and self.skips.over_limit(final):
            raise DataError(self._write_skips().refusal())

    def _restore_skips(self, checkpoint_dir: Path, start: int) -> None:
        """The ledger of the checkpoint resumed from (rank 0 takes the reasons, the others the totals only); a
        checkpoint without one (written with skipping off) had seen start x batch samples, none bad."""
        state = read_trainer_state(checkpoint_dir).get("extra", {}).get("skips")
        if state:
            self.skips.load_state_dict(state, reasons=self.rank == 0)
        else:
            self.skips.seen = start * self.cfg.train.batch_size

    def _emit(self, record: dict) -> None:
        """Keep a record, append it to metrics.jsonl and TensorBoard (rank 0)."""
        self.records.append(record)
        if self.rank != 0:
            return
        with open(self._metrics_path(), "a") as handle:
            handle.write(json.dumps(record) + "\n")
        writer = self._tensorboard()
        if writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    writer.add_scalar(key if key.startswith("eval/") else f"train/{key}", value, record["step"])
            writer.flush()

    def _log(self, window: list[dict[str, Tensor]], lr: float, elapsed: float, data_wait: float) -> dict:
        """Window means of the step outputs, averaged over ranks, as a metrics record."""
        keys: list[str] = []
        for out in window:
            keys.extend(k for k in out if k not in keys)
        means = torch.stack([torch.stack([out[k] for out in window if k in out]).mean() for k in keys])
        values = all_reduce_mean(means).tolist()
        batch = self.cfg.train.batch_size
        record: dict[str, Any] = {"step": self.step}
        record.update(zip(keys, values))
        record.update(
            lr=lr,
            samples_per_s=len(window) * batch / max(elapsed, 1e-9),
            epoch=self.sampler.epoch_at(self.step),
            samples=self.step * batch,
            data_wait=data_wait / max(elapsed, 1e-9),
        )
        if self.device.type == "cuda":
            record["max_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        if self.skipping:
            record["skipped"] = self.skips.skipped  # bad samples so far (skipped_records.json)
        if not math.isfinite(record["loss"]):
            raise NonFiniteError(
                f"non-finite loss ({record['loss']}) at step {self.step}: {last_checkpoint_note(self.out_dir)}; "
                f"{nonfinite_advice(self.cfg.train, self.device.type, self.amp_dtype == torch.float16)}"
            )
        self._emit(record)
        return record

    def _evaluate(self) -> None:
        if self.eval_fn is None:
            return
        if self.rank == 0:
            rng = capture_rng_state()
            was_training = self.method.training
            self.method.eval()
            try:
                metrics = self.eval_fn(self.method, self.step) or {}
            finally:
                self.method.train(was_training)
                restore_rng_state(rng)
            record: dict[str, Any] = {"step": self.step}
            for key, value in metrics.items():
                if isinstance(value, Tensor):
                    value = value.item() if value.numel() == 1 else value.tolist()
                record[key if key.startswith("eval/") else f"eval/{key}"] = value
            self._emit(record)
            logger.info("eval step %d: %s", self.step, json.dumps(record))
        launch.barrier()

    def _checkpoint(self) -> None:
        tc = self.cfg.train
        data = self._data_state()
        skips = {"skips": self._write_skips().state_dict()} if self.skipping else {}
        save_checkpoint(
            self.out_dir,
            self.method,
            step=self.step,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            scaler=self.scaler,
            config=self.cfg,
            tokenizer_json=self.tokenizer_json,
            side_files=self.side_files,
            metrics_path=self._metrics_path() if self.rank == 0 else None,
            extra={"epoch": self.sampler.epoch_at(self.step), "samples": self.step * tc.batch_size, "data": data,
                   **skips},
        )

    # --------------------------------------------------------------------------------- fit
    def _evaluated_at(self, step: int) -> bool:
        """Whether the run's metrics log holds an evaluation record of `step` (rank 0 reads it; every rank
        gets the answer, so all of them take part in the evaluation's barrier or none does)."""
        found = self.rank == 0 and any(
            record.get("step") == step and any(str(k).startswith("eval/") for k in record)
            for _, record in _read_metrics(self._metrics_path()))
        if is_distributed():
            flag = torch.tensor([1.0 if found else 0.0], device=self.device if self.device.type == "cuda" else "cpu")
            torch.distributed.broadcast(flag, src=0)
            found = bool(flag.item())
        return found

    def _prepare_method(self) -> None:
        """Let the method fit its data-dependent state before step 0 (`PretrainMethod.images_to_prepare` /
        `prepare`, e.g. SIMLA's visual tokenizer) on the first distinct training images (the same on every
        rank); its statistics go to the log and to `prepare.json` in the run directory."""
        count = getattr(self.method, "images_to_prepare", lambda: 0)()
        if count <= 0:
            return
        started = time.perf_counter()
        images = distinct_images(self.dataset, count)
        stats = {**self.method.prepare(images.to(self.device)), "images": float(images.shape[0]),
                 "seconds": round(time.perf_counter() - started, 2)}
        logger.info("prepared %s on %d images in %.1f s: %s", type(self.method).__name__, images.shape[0],
                    stats["seconds"], stats)
        if self.rank == 0:
            (self.out_dir / "prepare.json").write_text(json.dumps(stats, indent=2))

    def fit(self, resume: str | Path | None = None, overwrite: bool = False) -> list[dict]:
        """Train to `cfg.train.steps`, optionally continuing the checkpoint at `resume` (a checkpoint
        or run directory). Returns the records logged by this call (train and eval).

        A fresh run (no `resume`) refuses a run directory that already holds a run (`RunExistsError`, see
        `claim_out_dir`) unless `overwrite`, which removes the old run's outputs first."""
        tc = self.cfg.train
        if resume is not None and overwrite:
            raise ValueError("resume and overwrite exclude each other: resume continues the run, overwrite "
                             "starts it over")
        if resume is None:
            claim_out_dir(self.out_dir, overwrite)
        seed_everything(tc.seed + self.rank)
        start, checkpoint_dir = 0, None
        if resume is not None:
            resume = resolve_checkpoint(resume)
            start, checkpoint_dir = self._resume(resume)
            if self.skipping:
                self._restore_skips(checkpoint_dir, start)
        self.step = self._first_step = start
        self.records = []
        self._prepare_out_dir(start, checkpoint_dir)
        launch.barrier()
        if start >= tc.steps:
            if self.eval_fn is not None and not self._evaluated_at(start):
                # killed (or failed) during the final evaluation: the checkpoint is final, its eval is missing
                logger.warning("the checkpoint is at the last step (%d) but its final evaluation is missing "
                               "(interrupted?): running it now", start)
                if tc.progress and self.rank == 0:
                    print(f"[{self.out_dir.name}] step {start}/{tc.steps} is done; running its missing final "
                          f"evaluation", file=sys.stderr, flush=True)
                self._evaluate()
                if self._writer is not None:
                    self._writer.close()
                return self.records
            logger.info("nothing to do: the checkpoint is at step %d of %d", start, tc.steps)
            return []
        logger.info("%s", self.runtime.describe())
        if tc.progress and self.rank == 0:  # the run's header line
            print(f"[{self.out_dir.name}] {self.runtime.describe()}", file=sys.stderr, flush=True)
        if start == 0:
            self._prepare_method()
        self.method.train()
        # CPU: some backward kernels (index_put/index_add with repeated indices, e.g. gathering hard
        # negatives) accumulate in a thread-dependent order; their deterministic variants make a run
        # reproducible bit for bit. CUDA runs keep the fast kernels (exactness there is not promised).
        deterministic_before = (torch.are_deterministic_algorithms_enabled(),
                                torch.is_deterministic_algorithms_warn_only_enabled())
        if self.device.type == "cpu" and not deterministic_before[0]:
            torch.use_deterministic_algorithms(True, warn_only=True)
        log_every = max(1, tc.log_every)
        eval_every = tc.eval_every if tc.eval_every > 0 else None
        ckpt_every = tc.ckpt_every if tc.ckpt_every > 0 else None
        show = tc.progress and self.rank == 0
        tty = sys.stderr is not None and sys.stderr.isatty()
        bar = tqdm(total=tc.steps, initial=start, desc="train", unit="step", dynamic_ncols=True,
                   disable=None if show and tty else True)
        print_lines = show and not tty  # no terminal (log file, CI, nohup): plain lines instead of a bar
        loader = self._loader(start)
        batches = iter(loader)
        window: list[dict[str, Tensor]] = []
        window_start = fit_start = time.perf_counter()
        data_wait = 0.0
        try:
            for step in range(start, tc.steps):
                wait_start = time.perf_counter()
                batch = self._next_batch(batches)
                data_wait += time.perf_counter() - wait_start
                batch, keys = self._usable(batch, step)
                self._judge_skips(final=step + 1 == tc.steps)
                rows_per_item = self._rows_per_item(len(batch), len(keys)) if len(keys) else 1
                batch.sample_keys = keys.repeat_interleave(rows_per_item) if rows_per_item > 1 else keys
                out, lr = self.train_step(batch, rows_per_item)
                self.step = step + 1
                if out:  # an all-bad step trains nothing and logs nothing
                    window.append(out)
                bar.update(1)
                last = self.step == tc.steps
                if (self.step % log_every == 0 or last) and window:
                    record = self._log(window, lr, time.perf_counter() - window_start, data_wait)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", samples_s=f"{record['samples_per_s']:.1f}")
                    if print_lines:
                        per_step = (time.perf_counter() - fit_start) / (self.step - start)
                        print(progress_line(self.out_dir.name, self.step, tc.steps, record["loss"], lr,
                                            record["samples_per_s"], (tc.steps - self.step) * per_step),
                              file=sys.stderr, flush=True)
                    window, data_wait = [], 0.0
                    window_start = time.perf_counter()
                pause_start = time.perf_counter()
                if (ckpt_every and self.step % ckpt_every == 0) or last:
                    self._checkpoint()
                if (eval_every and self.step % eval_every == 0) or last:
                    self._evaluate()
                window_start += time.perf_counter() - pause_start  # checkpoint / eval time is not training
            if self.skipping:  # the one-line summary (skipped_records.json holds the details)
                merged = self._write_skips()
                if self.rank == 0:
                    (logger.warning if merged.skipped else logger.info)(
                        "[%s] %s; details in %s", self.out_dir.name, merged.summary(), self.out_dir / SKIPPED_FILE)
        finally:
            torch.use_deterministic_algorithms(deterministic_before[0], warn_only=deterministic_before[1])
            bar.close()
            del batches
            if self._writer is not None:
                self._writer.close()
                self._writer = None
        return self.records
