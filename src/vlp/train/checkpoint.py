"""Step-exact, crash-safe checkpoints.

A checkpoint is the directory `<out_dir>/checkpoint/`:

  model.safetensors   the method's full state dict (model, momentum copies, queues, ...). Tensors that
                      are exact aliases of each other (tied weights such as the MLM decoder and the word
                      embeddings) are stored once; the dropped names are listed in the file metadata.
  trainer.pt          optimiser, LR scheduler, GradScaler, per-rank RNG states (torch / CUDA / numpy /
                      python), step, epoch and data-order fingerprint. Only tensors, numbers, strings,
                      lists and dicts are stored, so `torch.load(..., weights_only=True)` reads it.
  config.yaml         the resolved run config (`vlp.config.dump_config`).
  tokenizer.json      a copy of the run's tokenizer (when the trainer was given one).
  metrics.jsonl       a copy of the run's metrics log up to this step.
  manifest.json       written last: the step and every other file's size and SHA-256.

Writes are atomic: everything goes to `checkpoint.tmp/` (each file fsync-ed), then `checkpoint/` is
renamed to `checkpoint.prev/`, `checkpoint.tmp/` to `checkpoint/`, and `checkpoint.prev/` is removed. A
crash at any point leaves either `checkpoint/` or `checkpoint.prev/` complete; `resolve_checkpoint`
falls back to `checkpoint.prev/` and never treats `checkpoint.tmp/` as a checkpoint.

Integrity: loading (`load_checkpoint`, `load_model_weights`) checks model.safetensors and trainer.pt
against the manifest (size, then SHA-256), so a truncated, zeroed or bit-flipped file is a
`CheckpointError` naming it; a checkpoint without a manifest (older vlp) loads with a one-time warning.
When the newest checkpoint is damaged and a complete `checkpoint.prev/` is still there (a crash before
it was removed), `load_checkpoint` resumes from that one and warns. Parameters and optimiser state are
checked for NaN / inf before every write: a non-finite state is never written (`NonFiniteError`).

In a distributed run every rank calls `save_checkpoint` (the RNG states of all ranks are gathered);
only rank 0 writes, and all ranks leave together.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn

from vlp.config import RunConfig, dump_config
from vlp.train.launch import barrier

CHECKPOINT = "checkpoint"
CHECKPOINT_TMP = "checkpoint.tmp"
CHECKPOINT_PREV = "checkpoint.prev"
MODEL_FILE = "model.safetensors"
TRAINER_FILE = "trainer.pt"
CONFIG_FILE = "config.yaml"
TOKENIZER_FILE = "tokenizer.json"
METRICS_FILE = "metrics.jsonl"
MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 1
MANIFEST_FORMAT = 1
_ALIAS_PREFIX = "alias:"
_HASH_CHUNK = 1 << 20


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, damaged or does not fit the model it is loaded into."""


class NonFiniteError(RuntimeError, FloatingPointError):
    """Training produced NaN / inf (loss, parameters or optimiser state); the message names the last finite
    checkpoint and what to change."""


# ------------------------------------------------------------------------------------- helpers
def _dist_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _fsync_path(path: Path) -> None:
    """Flush a file (or directory entry table) to stable storage."""
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if path.is_dir() else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


# ---------------------------------------------------------------------------------- RNG states
def capture_rng_state() -> dict[str, Any]:
    """This process's RNG states (torch CPU, every CUDA device, numpy legacy global, python `random`)
    as tensors / numbers only, so they survive `torch.load(weights_only=True)`."""
    np_name, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state()
    if np_name != "MT19937":
        raise CheckpointError(f"unsupported numpy RNG state '{np_name}'")
    py_version, py_internal, py_gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_cached),
        },
        "python": {
            "version": int(py_version),
            "internal": torch.tensor(py_internal, dtype=torch.int64),
            "gauss_next": py_gauss_next,
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of `capture_rng_state`."""
    torch.set_rng_state(state["torch"].cpu().to(torch.uint8))
    npy = state["numpy"]
    np.random.set_state(
        ("MT19937", npy["keys"].numpy().astype(np.uint32), int(npy["pos"]), int(npy["has_gauss"]),
         float(npy["cached_gaussian"]))
    )
    py = state["python"]
    random.setstate((int(py["version"]), tuple(int(v) for v in py["internal"].tolist()), py["gauss_next"]))
    cuda_states = state.get("cuda")
    if cuda_states and torch.cuda.is_available():
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.to(torch.uint8) for s in cuda_states])
        else:
            torch.cuda.set_rng_state(cuda_states[torch.cuda.current_device() % len(cuda_states)].to(torch.uint8))


def _gather_rng_states() -> list[dict[str, Any]]:
    """RNG states of all ranks, in rank order (collective in a distributed run)."""
    local = capture_rng_state()
    if not (dist.is_available() and dist.is_initialized()):
        return [local]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    return gathered


# ------------------------------------------------------------------------------ tensor aliasing
def _alias_key(t: torch.Tensor) -> tuple | None:
    if t.numel() == 0 or t.device.type == "meta":
        return None
    return (t.device, t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride()))


def _alias_groups(state: dict[str, torch.Tensor]) -> list[list[str]]:
    """Groups (size > 1, names sorted) of state-dict entries that are the very same tensor view."""
    groups: dict[tuple, list[str]] = defaultdict(list)
    for name, tensor in state.items():
        key = _alias_key(tensor)
        if key is not None:
            groups[key].append(name)
    return [sorted(names) for names in groups.values() if len(names) > 1]


def _storable_state(module: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The module's state dict with exact aliases stored once (metadata maps dropped -> kept name) and
    every remaining tensor contiguous and not sharing memory with another (safetensors' requirement)."""
    state = {k: v.detach() for k, v in module.state_dict().items()}
    metadata: dict[str, str] = {}
    for names in _alias_groups(state):
        kept = names[0]
        for dropped in names[1:]:
            metadata[_ALIAS_PREFIX + dropped] = kept
            del state[dropped]
    seen_storage: set[tuple] = set()
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if tensor.numel() > 0:
            storage = (tensor.device, tensor.untyped_storage().data_ptr())
            if storage in seen_storage:  # a partial view of another entry: store its own copy
                tensor = tensor.clone()
            else:
                seen_storage.add(storage)
        out[name] = tensor.contiguous()
    return out, metadata


def save_model_weights(module: nn.Module, path: str | Path, metadata: Optional[dict[str, str]] = None) -> None:
    """Write `module.state_dict()` to a safetensors file (tied tensors once, see `_storable_state`)."""
    state, alias_meta = _storable_state(module)
    meta = {"format": "pt", **alias_meta, **(metadata or {})}
    save_file(state, str(path), metadata=meta)


# ------------------------------------------------------------------------------------- resolving
def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint directory meant by `path`.

    Accepts a checkpoint directory (holding `model.safetensors`) or a run directory (holding
    `checkpoint/`, or only `checkpoint.prev/` after a crash mid-swap). `checkpoint.tmp/` is never
    accepted: it is an interrupted write.
    """
    p = Path(path).expanduser()
    if p.name == CHECKPOINT_TMP:
        raise CheckpointError(
            f"{p} is an interrupted checkpoint write, not a checkpoint; resume from {p.parent} instead"
        )
    if p.is_dir() and (p / MODEL_FILE).is_file():
        return p
    if p.is_dir():
        for name in (CHECKPOINT, CHECKPOINT_PREV):
            candidate = p / name
            if candidate.is_dir() and (candidate / MODEL_FILE).is_file():
                return candidate
        raise CheckpointError(
            f"no checkpoint in {p}: expected {p / MODEL_FILE} or a {CHECKPOINT}/ subdirectory "
            f"(found: {', '.join(sorted(q.name for q in p.iterdir())) or 'nothing'})"
        )
    if p.name == CHECKPOINT:  # crashed between the two renames: the previous one is complete
        prev = p.with_name(CHECKPOINT_PREV)
        if prev.is_dir() and (prev / MODEL_FILE).is_file():
            return prev
    raise CheckpointError(f"checkpoint not found: {p} does not exist")


# ------------------------------------------------------------------------------------- integrity
_UNVERIFIED_WARNED: set[str] = set()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _write_manifest(tmp: Path, step: int) -> None:
    """manifest.json of the files in `tmp` (size + SHA-256 each); written last, inside the atomic swap."""
    files = {}
    for path in sorted(tmp.iterdir()):
        if path.is_file() and path.name != MANIFEST_FILE:
            files[path.name] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    manifest = {"format": MANIFEST_FORMAT, "step": int(step), "files": files}
    _write_bytes(tmp / MANIFEST_FILE, (json.dumps(manifest, indent=2) + "\n").encode())


def read_manifest(ckpt: str | Path) -> Optional[dict[str, Any]]:
    """The manifest of checkpoint directory `ckpt`, None when it has none (written by an older vlp)."""
    file = Path(ckpt) / MANIFEST_FILE
    if not file.is_file():
        return None
    try:
        manifest = json.loads(file.read_bytes().decode("utf-8"))
        files = manifest["files"]
        if not isinstance(files, dict) or not all(
            isinstance(e, dict) and isinstance(e.get("size"), int) and isinstance(e.get("sha256"), str)
            for e in files.values()
        ):
            raise ValueError("unexpected layout")
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{file}: unreadable manifest ({err}): the checkpoint is damaged") from None
    return manifest


def verify_checkpoint(ckpt: str | Path, files: tuple[str, ...] = (MODEL_FILE, TRAINER_FILE)) -> bool:
    """Check `files` of checkpoint directory `ckpt` against its manifest (size, then SHA-256): a
    CheckpointError names the first file that is missing, truncated or changed. Files the checkpoint does
    not have and the manifest does not list are skipped (a weights-only checkpoint has no trainer.pt).
    Returns False, after a one-time warning, when the checkpoint has no manifest (older vlp)."""
    ckpt = Path(ckpt)
    manifest = read_manifest(ckpt)
    if manifest is None:
        if str(ckpt) not in _UNVERIFIED_WARNED:
            _UNVERIFIED_WARNED.add(str(ckpt))
            warnings.warn(f"{ckpt} has no {MANIFEST_FILE} (written by an older vlp): its files cannot be "
                          "checked for damage", stacklevel=3)
        return False
    for name in files:
        path, entry = ckpt / name, manifest["files"].get(name)
        if entry is None:
            if path.exists():
                raise CheckpointError(f"{path}: not listed in {MANIFEST_FILE} (added after the checkpoint was "
                                      "written?)")
            continue
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (listed in {MANIFEST_FILE}): the checkpoint is incomplete")
        size = path.stat().st_size
        if size != entry["size"]:
            raise CheckpointError(f"{path}: {size} bytes, but {entry['size']} were written (truncated or "
                                  "damaged?)")
        if _sha256(path) != entry["sha256"]:
            raise CheckpointError(f"{path}: SHA-256 mismatch (the file changed after it was written: damaged?)")
    return True


def _is_intact(ckpt: Path) -> bool:
    """Whether `ckpt` passes `verify_checkpoint` (one without a manifest counts as intact)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            verify_checkpoint(ckpt)
        return True
    except CheckpointError:
        return False


def checkpoint_step(ckpt: Path) -> Optional[int]:
    """The step of checkpoint `ckpt` from its manifest (trainer.pt for an older one); None if unreadable."""
    try:
        manifest = read_manifest(ckpt)
        if manifest is not None and isinstance(manifest.get("step"), int):
            return int(manifest["step"])
        return int(_trainer_state(ckpt)["step"])
    except Exception:  # noqa: BLE001 - only used to phrase a message
        return None


def _intact_fallback(ckpt: Path, damage: CheckpointError) -> Path:
    """The complete `checkpoint.prev/` next to the damaged `ckpt` (warns which one is used); otherwise a
    CheckpointError saying no intact checkpoint is left."""
    prev = ckpt.with_name(CHECKPOINT_PREV) if ckpt.name == CHECKPOINT else None
    if prev is None or not (prev / MODEL_FILE).is_file():
        raise CheckpointError(f"{damage}; no older intact checkpoint to fall back to (a run directory keeps only "
                              "its newest one): restart the run, or resume from a copy of an earlier checkpoint") from None
    try:
        verify_checkpoint(prev)
    except CheckpointError as err:
        raise CheckpointError(f"{damage}; the previous checkpoint is damaged too ({err}): no intact checkpoint "
                              "to resume from") from None
    step = checkpoint_step(prev)
    message = (f"checkpoint {ckpt} is damaged ({damage}); using the previous intact checkpoint {prev}"
               f"{f' (step {step})' if step is not None else ''} instead")
    warnings.warn(message, stacklevel=3)
    return prev


def last_checkpoint_note(out_dir: str | Path) -> str:
    """Which checkpoint a run can go back to, for error messages: 'the last checkpoint <dir> (step N) is
    intact: resume from it' or that none was written."""
    out_dir = Path(out_dir)
    for name in (CHECKPOINT, CHECKPOINT_PREV):
        ckpt = out_dir / name
        if (ckpt / MODEL_FILE).is_file():
            step = checkpoint_step(ckpt)
            return (f"the last finite checkpoint is {ckpt}{f' (step {step})' if step is not None else ''}: "
                    "resume from it (--resume) after the change")
    return f"no checkpoint was written to {out_dir} yet: restart the run after the change"


def _bf16_supported(device_type: str) -> bool:
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    from vlp.train import cpu

    return cpu.cpu_bf16_support()[0]


def nonfinite_advice(train: Any = None, device_type: str = "cpu", fp16: bool = False) -> str:
    """What to change after NaN / inf: a lower train.lr, a longer warm-up, gradient clipping (current values
    from `train`, a TrainConfig, when given) and, only for an fp16 run on a device with bf16, bf16."""
    def now(key: str) -> str:
        return f" (now {getattr(train, key)})" if train is not None else ""

    clip = getattr(train, "grad_clip", 0.0) if train is not None else 0.0
    tips = [f"a lower train.lr{now('lr')}", f"a larger train.warmup_steps{now('warmup_steps')}",
            f"a smaller train.grad_clip{now('grad_clip')}" if clip > 0 else
            f"train.grad_clip=1.0{' (now 0 = off)' if train is not None else ''}"]
    if fp16 and _bf16_supported(device_type):
        tips.append("train.precision=bf16 (fp16 overflows more easily)")
    return "try " + ", ".join(tips[:-1]) + " or " + tips[-1]


def _first_non_finite(method: nn.Module, optimizer: Optional[torch.optim.Optimizer]) -> Optional[str]:
    """The first parameter or optimiser-state tensor holding NaN / inf, as a phrase; None when all are finite."""
    for name, param in method.named_parameters():
        if param.is_floating_point() and not bool(torch.isfinite(param.detach()).all()):
            return f"parameter '{name}'"
    if optimizer is not None:
        names = {id(p): n for n, p in method.named_parameters()}
        for param, state in optimizer.state.items():
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
                    return f"optimiser state '{key}' of parameter '{names.get(id(param), '?')}'"
    return None


def check_finite_state(out_dir: str | Path, method: nn.Module, step: int,
                       optimizer: Optional[torch.optim.Optimizer] = None,
                       scaler: Optional[torch.amp.GradScaler] = None,
                       config: Optional[RunConfig] = None) -> None:
    """NonFiniteError (nothing is written) when a parameter or optimiser-state tensor holds NaN / inf."""
    bad = _first_non_finite(method, optimizer)
    if bad is None:
        return
    device = next((p.device.type for p in method.parameters()), "cpu")
    fp16 = scaler is not None and scaler.is_enabled()
    raise NonFiniteError(
        f"non-finite values (NaN/inf) in {bad} at step {step}: checkpoint not written; "
        f"{last_checkpoint_note(out_dir)}; "
        f"{nonfinite_advice(config.train if config is not None else None, device, fp16)}"
    )


# ---------------------------------------------------------------------------------------- saving
def _write_model(tmp: Path, method: nn.Module, step: int) -> None:
    path = tmp / MODEL_FILE
    save_model_weights(method, path, metadata={"vlp.step": str(step)})
    _fsync_path(path)


def _write_trainer_state(tmp: Path, state: dict[str, Any]) -> None:
    path = tmp / TRAINER_FILE
    with open(path, "wb") as handle:
        torch.save(state, handle)
        handle.flush()
        os.fsync(handle.fileno())


def _write_side_files(tmp: Path, config: Optional[RunConfig], tokenizer_json: Optional[str | Path],
                      metrics_path: Optional[str | Path], side_files: Sequence[str | Path] = ()) -> None:
    if config is not None:
        _write_bytes(tmp / CONFIG_FILE, dump_config(config).encode())
    if tokenizer_json is not None:
        src = Path(tokenizer_json)
        if not src.is_file():
            raise CheckpointError(f"tokenizer file to store in the checkpoint not found: {src}")
        _write_bytes(tmp / TOKENIZER_FILE, src.read_bytes())
    for file in map(Path, side_files):  # what inference needs besides the weights (e.g. a fine-tune's task.json)
        if not file.is_file():
            raise CheckpointError(f"file to store in the checkpoint not found: {file}")
        _write_bytes(tmp / file.name, file.read_bytes())
    if metrics_path is not None and Path(metrics_path).is_file():
        _write_bytes(tmp / METRICS_FILE, Path(metrics_path).read_bytes())


def _remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint directory, its weights first: one half-removed by a crash is never taken for one."""
    (path / MODEL_FILE).unlink(missing_ok=True)
    shutil.rmtree(path)


def remove_stale_previous(ckpt: str | Path) -> bool:
    """Remove the `checkpoint.prev/` beside `ckpt`, the newest checkpoint of its run directory, which a resume
    has just loaded intact: a kill between the swap and the removal left it, and with no later save (a run
    resumed at its last step) nothing else would. Returns whether there was one."""
    ckpt = Path(ckpt)
    prev = ckpt.with_name(CHECKPOINT_PREV)
    if ckpt.name != CHECKPOINT or not prev.is_dir():
        return False
    _remove_checkpoint(prev)
    return True


def _swap_into_place(out_dir: Path) -> Path:
    """checkpoint -> checkpoint.prev, checkpoint.tmp -> checkpoint, remove checkpoint.prev."""
    final, tmp, prev = out_dir / CHECKPOINT, out_dir / CHECKPOINT_TMP, out_dir / CHECKPOINT_PREV
    if final.exists():
        if prev.exists() and not _is_intact(final):  # keep the intact one of the two until the new one is in
            _remove_checkpoint(final)
        else:
            if prev.exists():  # a stale one from an earlier crash; `final` is complete, so it can go
                _remove_checkpoint(prev)
            os.replace(final, prev)
    os.replace(tmp, final)
    _fsync_path(out_dir)
    if prev.exists():
        _remove_checkpoint(prev)
    return final


def save_checkpoint(
    out_dir: str | Path,
    method: nn.Module,
    *,
    step: int,
    optimizer: Optional[torch.optim.Optimizer] = None,
    scheduler: Optional[torch.optim.lr_scheduler.LRScheduler] = None,
    scaler: Optional[torch.amp.GradScaler] = None,
    config: Optional[RunConfig] = None,
    tokenizer_json: Optional[str | Path] = None,
    metrics_path: Optional[str | Path] = None,
    extra: Optional[dict[str, Any]] = None,
    side_files: Sequence[str | Path] = (),
) -> Path:
    """Atomically write `<out_dir>/checkpoint/` (see the module docstring); returns its path.

    Collective in a distributed run: call on every rank. `extra` (numbers / strings / tensors only)
    is stored in trainer.pt, e.g. the epoch and the data-order fingerprint. A NaN / inf in the parameters or
    the optimiser state is a `NonFiniteError` and nothing is written.
    """
    out_dir = Path(out_dir)
    # identical on every rank (replicated parameters), so all ranks leave here together
    check_finite_state(out_dir, method, step, optimizer, scaler, config)
    rng_states = _gather_rng_states()
    barrier()
    final = out_dir / CHECKPOINT
    error: Optional[BaseException] = None
    if _dist_rank() == 0:
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            tmp = out_dir / CHECKPOINT_TMP
            if tmp.exists():  # left over by an interrupted save
                shutil.rmtree(tmp)
            tmp.mkdir()
            _write_model(tmp, method, step)
            trainer_state: dict[str, Any] = {
                "format": FORMAT_VERSION,
                "step": int(step),
                "optimizer": optimizer.state_dict() if optimizer is not None else None,
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
                "rng": rng_states,
                "extra": dict(extra or {}),
            }
            _write_trainer_state(tmp, trainer_state)
            _write_side_files(tmp, config, tokenizer_json, metrics_path, side_files)
            _write_manifest(tmp, step)
            _fsync_path(tmp)
            _swap_into_place(out_dir)
        except BaseException as err:  # re-raised below, after telling the other ranks
            error = err
    if dist.is_available() and dist.is_initialized():
        status = [None if error is None else f"{type(error).__name__}: {error}"]
        dist.broadcast_object_list(status, src=0)
        if status[0] is not None and error is None:
            raise CheckpointError(f"rank 0 failed to write the checkpoint in {out_dir}: {status[0]}")
    if error is not None:
        raise error
    return final


# --------------------------------------------------------------------------------------- loading
def _check_compatible(module: nn.Module, saved: dict[str, torch.Tensor], source: Path) -> None:
    """Raise a CheckpointError naming the first tensor whose shape differs between `saved` and
    `module`. Submodules that define `check_compatible(state_dict)` are asked first, with their own
    (prefix-stripped) part of the state dict."""
    for prefix, sub in module.named_modules():
        hook = getattr(sub, "check_compatible", None)
        if callable(hook):
            lead = f"{prefix}." if prefix else ""
            hook({k[len(lead):]: v for k, v in saved.items() if k.startswith(lead)})
    current = module.state_dict()
    for name, tensor in saved.items():
        target = current.get(name)
        if target is not None and tuple(target.shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"checkpoint {source} does not fit {type(module).__name__}: tensor '{name}' has shape "
                f"{tuple(tensor.shape)} in the checkpoint but {tuple(target.shape)} in the model "
                "(was it trained with another model size or config?)"
            )


def _load_weights_file(file: Path, module: nn.Module, strict: bool, prefix: str = "") -> tuple[list[str], list[str]]:
    if not file.is_file():
        raise CheckpointError(f"model weights not found: {file}")
    try:
        saved = load_file(str(file), device="cpu")
    except Exception as err:  # noqa: BLE001 - safetensors' own error types: a damaged or foreign file
        raise CheckpointError(f"{file}: not a readable safetensors file ({type(err).__name__}: {err}): "
                              "damaged?") from None
    if prefix:
        saved = {k[len(prefix):]: v for k, v in saved.items() if k.startswith(prefix)}
        if not saved:
            raise CheckpointError(f"{file} has no entries under '{prefix}': it does not hold a method's model")
    _check_compatible(module, saved, file)
    missing, unexpected = module.load_state_dict(saved, strict=False)
    # An entry the file stored once under another name (tied weights) was loaded through that name.
    current = module.state_dict()
    loaded = {_alias_key(current[k]) for k in saved if k in current} - {None}
    missing = [k for k in missing if _alias_key(current[k]) not in loaded]
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"missing from the checkpoint: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            parts.append(f"not in the model: {', '.join(unexpected[:8])}{' ...' if len(unexpected) > 8 else ''}")
        raise CheckpointError(
            f"checkpoint {file} does not match {type(module).__name__} ({'; '.join(parts)}); "
            "was it written by another method or model?"
        )
    return list(missing), list(unexpected)


def load_model_weights(
    path: str | Path, module: nn.Module, strict: bool = True, prefix: str = ""
) -> tuple[list[str], list[str]]:
    """Load weights into `module` from a checkpoint directory, a run directory or a `.safetensors` file.

    `prefix` selects a submodule of the saved state: a checkpoint holds the whole method
    (`model.*`, momentum copies, queues), so `prefix="model."` loads just the `VLModel` for eval or
    fine-tuning. Shapes must match (error names the first differing tensor); with `strict`, every model entry must be
    in the file and vice versa. Returns `(missing, unexpected)` key lists (empty when strict).
    """
    p = Path(path).expanduser()
    if p.suffix == ".safetensors":
        file = p
        if (p.parent / MANIFEST_FILE).is_file():  # a checkpoint's weights file named directly
            verify_checkpoint(p.parent, (p.name,))
    else:
        ckpt = resolve_checkpoint(p)
        verify_checkpoint(ckpt, (MODEL_FILE,))  # warns once for a checkpoint without a manifest
        file = ckpt / MODEL_FILE
    return _load_weights_file(file, module, strict, prefix)


def read_trainer_state(path: str | Path) -> dict[str, Any]:
    """trainer.pt of a checkpoint (resolved like `resolve_checkpoint`, checked against its manifest), loaded
    with weights_only=True."""
    ckpt = resolve_checkpoint(path)
    verify_checkpoint(ckpt, (TRAINER_FILE,))
    return _trainer_state(ckpt)


def _trainer_state(ckpt: Path) -> dict[str, Any]:
    file = ckpt / TRAINER_FILE
    if not file.is_file():
        raise CheckpointError(f"trainer state not found: {file} (weights-only checkpoint? it cannot be resumed)")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - pickle / zip errors of a damaged or foreign file
        raise CheckpointError(f"{file}: not a readable trainer state ({type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''}): damaged?") from None
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"{file} is not a vlp trainer state (no 'step' entry)")
    if int(state.get("format", 0)) > FORMAT_VERSION:
        raise CheckpointError(f"{file} has format {state['format']}, newer than this vlp ({FORMAT_VERSION})")
    return state


def load_checkpoint(
    path: str | Path,
    method: nn.Module,
    optimizer: Optional[torch.optim.Optimizer] = None,
    scheduler: Optional[torch.optim.lr_scheduler.LRScheduler] = None,
    scaler: Optional[torch.amp.GradScaler] = None,
) -> dict[str, Any]:
    """Restore a checkpoint into `method` (strict) and, when given, the optimiser / scheduler / scaler.

    Returns the trainer state: `step`, `rng` (list of per-rank RNG states, see `restore_rng_state`),
    `extra` and `path` (the directory actually used, e.g. `checkpoint.prev` after a crash, or when the
    newest checkpoint fails its manifest check and the previous one is still complete).
    RNG states are not applied here; the trainer restores its own rank's.
    """
    ckpt = resolve_checkpoint(path)
    try:
        verify_checkpoint(ckpt)
    except CheckpointError as damage:
        ckpt = _intact_fallback(ckpt, damage)
    _load_weights_file(ckpt / MODEL_FILE, method, strict=True)
    state = _trainer_state(ckpt)
    if optimizer is not None:
        if state.get("optimizer") is None:
            raise CheckpointError(f"{ckpt / TRAINER_FILE} holds no optimiser state")
        try:
            optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError) as err:
            raise CheckpointError(
                f"optimiser state in {ckpt / TRAINER_FILE} does not fit this model's parameters: {err}"
            ) from err
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and scaler.is_enabled() and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    state["path"] = str(ckpt)
    return state
