"""The training loop: any method, one to N processes, step-exact resume.

The trainer knows nothing method-specific. A method is an `nn.Module` whose `forward(batch)` returns a
dict with a differentiable `loss` and detached scalar parts; `on_step_end()` (if defined) runs after every
optimiser step (momentum / EMA / queue updates).

One optimiser step consumes the global batch `train.batch_size` = world_size x grad_accum micro-batches.
Rows come from `StepSampler` (a pure function of the step), so a run of N steps equals k steps + resume +
N - k steps bit for bit on CPU: the checkpoint stores model, optimiser, scheduler, GradScaler, every rank's
RNG states and the step, and the data position follows from the step.

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
import sys
import time
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from vlp.config import RunConfig, dump_config
from vlp.data.datasets import distinct_images
from vlp.train import launch
from vlp.train.checkpoint import (
    METRICS_FILE,
    CheckpointError,
    NonFiniteError,
    capture_rng_state,
    last_checkpoint_note,
    load_checkpoint,
    nonfinite_advice,
    resolve_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from vlp.train.cpu import RuntimeInfo, configure_cpu
from vlp.train.distributed import all_reduce_mean, is_distributed, rank, world_size
from vlp.train.optim import build_optimizer, build_scheduler
from vlp.train.precision import autocast_dtype
from vlp.train.sampler import StepBatchSampler, StepSampler, epoch_seed
from vlp.types import Batch

logger = logging.getLogger("vlp.train")

EvalFn = Callable[[nn.Module, int], dict]


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


def format_eta(seconds: float) -> str:
    """A duration as `42s`, `3m05s` or `1h02m05s` (rounded to the second; negative or unknown = `?`)."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    total = int(round(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


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


class Trainer:
    """Train `method` on `dataset` following `cfg.train` (see the module docstring).

    Args:
        cfg: the resolved run config (`cfg.train` drives the loop, `cfg.data.num_workers` the loader).
        method: the method module (moved to the training device; wrapped in DDP when distributed).
        dataset: map-style dataset; `collate_fn(list of items) -> Batch`.
        out_dir: run directory (defaults to `cfg.train.out_dir`).
        eval_fn: `eval_fn(method, step) -> {name: number}`, called on rank 0 every `eval_every` steps and
            at the end with the unwrapped method in eval mode; its RNG use does not perturb training.
            It must not use collectives (the other ranks wait at a barrier).
        tokenizer_json: path of the tokenizer file copied into every checkpoint.

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
        self.collate_fn = collate_fn
        self.eval_fn = eval_fn
        self.tokenizer_json = str(tokenizer_json) if tokenizer_json is not None else None
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
        self.model: nn.Module = self.method
        # A method declares the trainable parameters a step may leave without a gradient
        # (`unused_parameters() -> set of names`); DDP only searches for unused ones when that set is
        # non-empty. Modules without the declaration (e.g. fine-tuning task modules) keep the search.
        declared = getattr(self.method, "unused_parameters", None)
        self.find_unused_parameters = True if declared is None else bool(declared())
        if is_distributed():
            # Buffers (queues, momentum copies) are kept identical by the methods themselves (gathered
            # updates): synced once at wrap, not every forward.
            self.model = DistributedDataParallel(
                self.method,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=self.find_unused_parameters,
                forward_sync_buffers=False,
            )
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
        return DataLoader(
            self.dataset,
            batch_sampler=StepBatchSampler(self.sampler, start_step, self.cfg.train.steps),
            collate_fn=self.collate_fn,
            num_workers=workers,
            persistent_workers=workers > 0,
            generator=generator,
        )

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
        if checkpoint_dir is None:
            if (self.out_dir / "checkpoint").exists():
                logger.warning("%s already holds a checkpoint; this fresh run will overwrite it "
                               "(pass resume= to continue it instead)", self.out_dir)
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
        current = {**self.sampler.state(), "world_size": self.world_size, "grad_accum": self.cfg.train.grad_accum}
        changed = {k: (saved_data[k], v) for k, v in current.items() if k in saved_data and saved_data[k] != v}
        if changed:
            warnings.warn(
                "resuming with a different data layout than the checkpoint "
                + ", ".join(f"{k}: {a} -> {b}" for k, (a, b) in changed.items())
                + "; the run continues but is not step-exact",
                stacklevel=3,
            )
        rng_states = state.get("rng") or []
        if len(rng_states) == self.world_size:
            restore_rng_state(rng_states[self.rank])
        else:
            seed_everything(self.cfg.train.seed + self.rank + 1_000_003 * step)
        logger.info("resumed from %s at step %d", state["path"], step)
        return step, Path(state["path"])

    # ------------------------------------------------------------------------------- steps
    def train_step(self, batch: Batch, rows_per_item: int = 1) -> tuple[dict[str, Tensor], float]:
        """Forward/backward over the grad_accum micro-batches, then one optimiser step (with grad
        clipping, GradScaler, scheduler step and the method's `on_step_end`); `fit` and `vlp bench` run it.

        Micro-batches are cut by dataset items, not rows: an item of `rows_per_item` rows (an NLVR2
        example is its left and right image) never straddles two micro-batches.
        Returns the micro-batch-averaged detached outputs (+ `grad_norm` when clipping) and the LR used.
        """
        tc = self.cfg.train
        accum = tc.grad_accum
        micro = self.sampler.micro_batch * rows_per_item
        batch = batch.to(self.device, non_blocking=True)
        sums: dict[str, Tensor] = {}
        for i in range(accum):
            part = batch if accum == 1 else batch.slice(i * micro, (i + 1) * micro)
            last = i == accum - 1
            ddp = isinstance(self.model, DistributedDataParallel)
            sync = self.model.no_sync() if ddp and not last else nullcontext()  # all-reduce on the last only
            with sync:
                with self._autocast():
                    out = self.model(part)
                if not isinstance(out, dict) or "loss" not in out:
                    raise TypeError(
                        f"{type(self.method).__name__}.forward must return a dict with a 'loss' entry, "
                        f"got {type(out).__name__}{' with keys ' + str(list(out)) if isinstance(out, dict) else ''}"
                    )
                loss = out["loss"]
                self.scaler.scale(loss / accum if accum > 1 else loss).backward()
            for key, value in out.items():
                v = _scalar(value, self.device)
                sums[key] = sums[key] + v if key in sums else v
        lr = float(self.optimizer.param_groups[0]["lr"])
        results = {k: (v / accum if accum > 1 else v) for k, v in sums.items()}
        if tc.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            grads = [p for p in self._params if p.grad is not None]
            results["grad_norm"] = torch.nn.utils.clip_grad_norm_(grads, tc.grad_clip).detach().float()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        on_step_end = getattr(self.method, "on_step_end", None)
        if callable(on_step_end):
            on_step_end()
        return results, lr

    @staticmethod
    def _rows_per_item(rows: int, items: int) -> int:
        """Rows each dataset item contributed to a collated batch (1 for pre-training; 2 for NLVR2 pairs)."""
        if rows % items:
            raise ValueError(f"a batch of {items} items collated to {rows} rows: the collate function must give "
                             "every item the same number of rows")
        return rows // items

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
        data = {**self.sampler.state(), "world_size": self.world_size, "grad_accum": tc.grad_accum}
        save_checkpoint(
            self.out_dir,
            self.method,
            step=self.step,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            scaler=self.scaler,
            config=self.cfg,
            tokenizer_json=self.tokenizer_json,
            metrics_path=self._metrics_path() if self.rank == 0 else None,
            extra={"epoch": self.sampler.epoch_at(self.step), "samples": self.step * tc.batch_size, "data": data},
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

    def fit(self, resume: str | Path | None = None) -> list[dict]:
        """Train to `cfg.train.steps`, optionally continuing the checkpoint at `resume` (a checkpoint
        or run directory). Returns the records logged by this call (train and eval)."""
        tc = self.cfg.train
        seed_everything(tc.seed + self.rank)
        start, checkpoint_dir = 0, None
        if resume is not None:
            resume = resolve_checkpoint(resume)
            start, checkpoint_dir = self._resume(resume)
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
                batch = next(batches)
                data_wait += time.perf_counter() - wait_start
                keys = self.sampler.rank_rows(step).keys
                rows_per_item = self._rows_per_item(len(batch), len(keys))
                batch.sample_keys = keys.repeat_interleave(rows_per_item) if rows_per_item > 1 else keys
                out, lr = self.train_step(batch, rows_per_item)
                self.step = step + 1
                window.append(out)
                bar.update(1)
                last = self.step == tc.steps
                if self.step % log_every == 0 or last:
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
        finally:
            torch.use_deterministic_algorithms(deterministic_before[0], warn_only=deterministic_before[1])
            bar.close()
            del batches
            if self._writer is not None:
                self._writer.close()
                self._writer = None
        return self.records
