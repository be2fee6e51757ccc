"""Momentum (EMA) copies of a model and ring-buffer queues of past features (torch only).

Shared by the momentum-distillation methods (ALBEF now; SIMLA reuses them):

* `momentum_copy(model)`: a frozen deep copy (ALBEF `model_pairs` / MoCo's key encoder).
* `ema_update_(online, target, m)`: p_m <- m * p_m + (1 - m) * p over the parameters, buffers copied
  (ALBEF `_momentum_update`, MoCo eq. 2), once per optimizer step.
* `FeatureQueue`: K past rows of one or more (K, E) feature banks (ALBEF / SIMLA `image_queue`,
  `text_queue`; MoCo's queue) with the image id of every row, a ring pointer and a fill count.

Where we deviate from ALBEF's `_dequeue_and_enqueue` (each on purpose, kept from `vlp.methods.albef`):
  * The queue starts empty (ALBEF fills it with random unit vectors) and `filled()` returns only the rows
    written so far; rows keep their image ids (-1 = never a positive; ALBEF keeps ids only in the
    retrieval fine-tune's `idx_queue`).
  * Any number of rows may be enqueued (ALBEF asserts K % batch == 0); more than K keeps the last K.
  * `stage()` collects the rows of every forward (micro-batch) of a step and `flush()` enqueues them
    together after the optimizer step, so gradient accumulation sees the same queue as one large batch
    (ALBEF enqueues inside each forward).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any, Optional, TypeVar

import torch
from torch import Tensor, nn

from vlp.models.losses import all_gather_no_grad

ModuleT = TypeVar("ModuleT", bound=nn.Module)


def momentum_copy(model: ModuleT) -> ModuleT:
    """A deep copy of `model` with `requires_grad=False` everywhere: the momentum (EMA) model, updated only
    by `ema_update_` (ALBEF copies the weights into separately built modules; a deep copy is the same)."""
    target = copy.deepcopy(model)
    target.requires_grad_(False)
    return target


@torch.no_grad()
def ema_update_(online: nn.Module, target: nn.Module, momentum: float) -> None:
    """In place: every parameter p_m of `target` <- m * p_m + (1 - m) * p (p its counterpart in `online`),
    and every buffer of `target` <- the online buffer (ALBEF `_momentum_update`; MoCo eq. 2).

    The update is `torch._foreach_lerp_(p_m, p, 1 - m)` (p_m + (1 - m) * (p - p_m)): one fused kernel per
    dtype/device group instead of one per tensor. Parameters and buffers are paired by position, so
    `target` must have `online`'s structure (e.g. a `momentum_copy` of it).

    Args:
        online: the trained module.
        target: its momentum copy (updated in place).
        momentum: m in [0, 1] (ALBEF / SIMLA: 0.995; 1 keeps the target fixed, 0 copies the online weights).

    Raises:
        ValueError: `momentum` outside [0, 1], or `online` and `target` hold different numbers of
            parameters or buffers.
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"EMA momentum must be in [0, 1], got {momentum}")
    params, params_m = list(online.parameters()), list(target.parameters())
    buffers, buffers_m = list(online.buffers()), list(target.buffers())
    if len(params) != len(params_m) or len(buffers) != len(buffers_m):
        raise ValueError(
            f"ema_update_: the online module has {len(params)} parameters and {len(buffers)} buffers, its momentum "
            f"copy {len(params_m)} and {len(buffers_m)}: the target must be a copy of the online module"
        )
    if params_m:
        torch._foreach_lerp_(params_m, params, 1.0 - momentum)
    for buf_m, buf in zip(buffers_m, buffers):
        buf_m.copy_(buf)


class FeatureQueue(nn.Module):
    """Ring buffer of the last K rows of one or more feature banks, with the image id of every row.

    Args:
        capacity: K, the number of rows kept (>= 1).
        dims: bank name -> feature width E, e.g. `{"image": 256, "text": 256}`; every bank holds (K, E)
            rows, row i of every bank and `ids[i]` belong to the same sample.

    Buffers (state_dict keys, relative to this module): one (K, E) float bank per name, `ids` (K,) long
    (-1 = empty or never a positive), `ptr` 0-d long (the next slot written), `count` 0-d long (rows
    filled so far, <= K). Rows staged by `stage()` and not yet flushed are not part of the state (they
    exist only between a forward and its optimizer step).
    """

    def __init__(self, capacity: int, dims: Mapping[str, int]) -> None:
        super().__init__()
        if capacity < 1:
            raise ValueError(f"a feature queue needs capacity >= 1, got {capacity}")
        if not dims:
            raise ValueError("a feature queue needs at least one bank (dims is empty)")
        self.capacity = int(capacity)
        self.names: tuple[str, ...] = tuple(dims)
        for name, dim in dims.items():
            if not name.isidentifier() or name in ("ids", "ptr", "count") or hasattr(self, name):
                raise ValueError(f"feature bank name {name!r} is not a free identifier of FeatureQueue")
            self.register_buffer(name, torch.zeros(self.capacity, int(dim)))
        self.register_buffer("ids", torch.full((self.capacity,), -1, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))
        self._pending: list[tuple[dict[str, Tensor], Tensor]] = []

    def bank(self, name: str) -> Tensor:
        """The whole (K, E) bank `name` (empty rows included; see `filled`)."""
        return self.get_buffer(name)

    def filled(self) -> tuple[dict[str, Tensor], Tensor]:
        """The filled rows: ({name: (n, E) view of bank name}, ids (n,)), n = `count` (ring order, not age)."""
        n = int(self.count)
        return {name: self.bank(name)[:n] for name in self.names}, self.ids[:n]

    def _check(self, feats: Mapping[str, Tensor], ids: Tensor) -> None:
        if set(feats) != set(self.names):
            raise ValueError(f"feature queue banks are {list(self.names)}, got {sorted(feats)}")
        rows = {int(t.shape[0]) for t in feats.values()} | {int(ids.shape[0])}
        if len(rows) != 1:
            raise ValueError(f"every bank and the ids must have the same number of rows, got {sorted(rows)}")

    @torch.no_grad()
    def enqueue(self, feats: Mapping[str, Tensor], ids: Tensor) -> None:
        """Write n rows ({name: (n, E)}, ids (n,)) at `ptr`, wrapping around (the last K rows if n > K)."""
        self._check(feats, ids)
        capacity = self.capacity
        if ids.shape[0] > capacity:
            feats = {name: t[-capacity:] for name, t in feats.items()}
            ids = ids[-capacity:]
        count = ids.shape[0]
        slots = (self.ptr + torch.arange(count, device=self.ptr.device)) % capacity
        for name in self.names:
            bank = self.bank(name)
            bank[slots] = feats[name].to(bank.dtype)
        self.ids[slots] = ids.to(self.ids.dtype)
        self.ptr.copy_((self.ptr + count) % capacity)
        self.count.copy_((self.count + count).clamp(max=capacity))

    @torch.no_grad()
    def stage(self, feats: Mapping[str, Tensor], ids: Tensor) -> None:
        """Keep n rows for the next `flush()` (call once per forward / accumulation micro-batch).

        Forwards without a flush in between (e.g. several micro-batches, or forwards without an optimizer
        step) accumulate; staged groups that the newer ones would push out of the queue anyway are dropped
        (at most K + one group's rows are held)."""
        self._check(feats, ids)
        self._pending.append((dict(feats), ids))
        while sum(int(group[1].shape[0]) for group in self._pending[1:]) >= self.capacity:
            self._pending.pop(0)  # only the newest K rows can survive the flush

    @torch.no_grad()
    def flush(self) -> None:
        """Enqueue every staged row, in staging order (call after the optimizer step)."""
        if not self._pending:
            return
        feats = {name: torch.cat([group[0][name] for group in self._pending]) for name in self.names}
        ids = torch.cat([group[1] for group in self._pending])
        self._pending.clear()
        self.enqueue(feats, ids)

    @torch.no_grad()
    def reset(self) -> None:
        """Empty the queue: zero banks, ids -1, pointer and count 0, staged rows dropped."""
        self._pending.clear()
        for name in self.names:
            self.bank(name).zero_()
        self.ids.fill_(-1)
        self.ptr.zero_()
        self.count.zero_()

    def extra_repr(self) -> str:
        return f"capacity={self.capacity}, banks={list(self.names)}"


@torch.no_grad()
def itc_distillation(
    image_emb_m: Tensor,
    text_emb_m: Tensor,
    temperature: Tensor | float,
    alpha: float,
    queue: Optional[FeatureQueue] = None,
    queue_ids: Optional[Tensor] = None,
    stage: bool = False,
) -> dict[str, Any]:
    """The momentum-distillation keyword arguments of `vlp.models.losses.contrastive_loss` (ALBEF eq. 6,
    SIMLA §1.2 (a)): soft targets softmax(momentum similarity / temperature) over the columns ITC uses
    (the global batch, then the queue), and the queue's columns.

    Args:
        image_emb_m, text_emb_m: (B, E) this rank's momentum embeddings (gathered here over ranks).
        temperature: the ITC temperature (detached).
        alpha: the weight of the soft targets.
        queue: the `FeatureQueue` of past momentum features (banks "image" and "text"), or None.
        queue_ids: (G,) image ids of the global batch to store with its rows (-1 = never a positive).
        stage: stage this batch's momentum rows for the queue (training forwards; enqueued by `flush()`
            after the optimizer step).

    Returns:
        {soft_i2t, soft_t2i: (B, G + n) float, alpha} and, with a queue, {image_queue, text_queue: (n, E),
        queue_ids: (n,)} (n = the queue's filled rows before this batch).
    """
    image_cols = all_gather_no_grad(image_emb_m)  # (G, E)
    text_cols = all_gather_no_grad(text_emb_m)
    kwargs: dict[str, Any] = {}
    if queue is not None:
        if stage:
            if queue_ids is None:
                queue_ids = torch.full((image_cols.shape[0],), -1, dtype=torch.long, device=image_cols.device)
            queue.stage({"image": image_cols, "text": text_cols}, queue_ids)
        banks, ids = queue.filled()
        kwargs.update(image_queue=banks["image"], text_queue=banks["text"], queue_ids=ids)
        image_cols = torch.cat([image_cols, banks["image"]], dim=0)
        text_cols = torch.cat([text_cols, banks["text"]], dim=0)
    t = temperature.detach() if isinstance(temperature, Tensor) else temperature
    kwargs.update(soft_i2t=torch.softmax((image_emb_m @ text_cols.t()).float() / t, dim=1),
                  soft_t2i=torch.softmax((text_emb_m @ image_cols.t()).float() / t, dim=1), alpha=alpha)
    return kwargs


__all__ = ["FeatureQueue", "ema_update_", "itc_distillation", "momentum_copy"]
