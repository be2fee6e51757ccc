"""vlp.models.momentum: EMA update, momentum copy, feature queue; ALBEF on top of them (queue state, old keys)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from vlp.config import build_config
from vlp.methods import build_method
from vlp.methods.albef import LEGACY_QUEUE_KEYS
from vlp.models.model import VLModel
from vlp.models.momentum import FeatureQueue, ema_update_, momentum_copy
from vlp.types import Batch


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(2, 2)
        self.norm = nn.BatchNorm1d(2)  # has buffers (running stats, num_batches_tracked)


# ================================================================================ EMA
def test_ema_closed_form_after_n_steps():
    """simla_vlmixer.md §4 test 3: p = 1, p_m = 0, m = 0.995 -> p_m = 1 - 0.995^n after n updates."""
    online, target = nn.Linear(3, 3), nn.Linear(3, 3)
    with torch.no_grad():
        for p in online.parameters():
            p.fill_(1.0)
        for p in target.parameters():
            p.fill_(0.0)
    ema_update_(online, target, 0.995)
    assert torch.allclose(target.weight, torch.full((3, 3), 0.005))
    for _ in range(9):
        ema_update_(online, target, 0.995)
    expected = 1.0 - 0.995 ** 10
    assert torch.allclose(target.weight, torch.full((3, 3), expected), atol=1e-6)
    assert torch.allclose(target.bias, torch.full((3,), expected), atol=1e-6)


def test_ema_formula_buffers_and_edge_momenta():
    torch.manual_seed(0)
    online = Tiny()
    target = momentum_copy(online)
    assert all(not p.requires_grad for p in target.parameters())
    assert all(p.requires_grad for p in online.parameters())  # the online module is untouched
    with torch.no_grad():
        online.linear.weight.add_(1.0)
        online.norm.running_mean.fill_(3.0)
        online.norm.num_batches_tracked.fill_(7)
    before = target.linear.weight.clone()
    ema_update_(online, target, 0.9)
    torch.testing.assert_close(target.linear.weight, 0.9 * before + 0.1 * online.linear.weight)
    assert torch.equal(target.norm.running_mean, torch.full((2,), 3.0))  # buffers are copied, not averaged
    assert int(target.norm.num_batches_tracked) == 7
    frozen = target.linear.weight.clone()
    ema_update_(online, target, 1.0)  # m = 1 keeps the target
    assert torch.equal(target.linear.weight, frozen)
    ema_update_(online, target, 0.0)  # m = 0 copies
    assert torch.equal(target.linear.weight, online.linear.weight)


def test_ema_rejects_bad_momentum_and_mismatched_modules():
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        ema_update_(nn.Linear(2, 2), nn.Linear(2, 2), 1.5)
    with pytest.raises(ValueError, match="must be a copy of the online module"):
        ema_update_(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), 0.9)


# ================================================================================ queue
def _rows(start: int, n: int, dim: int = 2) -> dict[str, torch.Tensor]:
    values = torch.arange(start, start + n, dtype=torch.float32)[:, None].expand(n, dim)
    return {"image": values.clone(), "text": -values}


def test_queue_starts_empty_and_wraps_around():
    """simla_vlmixer.md §4 test 2 (K = 4, batch 2, three enqueues): ptr == 2 and rows 0-1 hold batch 3."""
    queue = FeatureQueue(4, {"image": 2, "text": 2})
    banks, ids = queue.filled()
    assert banks["image"].shape == (0, 2) and ids.shape == (0,) and (queue.ids == -1).all()
    for step in range(3):
        queue.enqueue(_rows(10 * step, 2), torch.tensor([step, step]))
        assert int(queue.count) == min(2 * (step + 1), 4)
    assert int(queue.ptr) == 2 and int(queue.count) == 4
    assert queue.bank("image")[:, 0].tolist() == [20, 21, 10, 11]
    assert queue.text[:, 0].tolist() == [-20, -21, -10, -11]
    assert queue.ids.tolist() == [2, 2, 1, 1]
    banks, ids = queue.filled()
    assert banks["image"].data_ptr() == queue.image.data_ptr()  # views, no copies
    # more rows than K: the last K are kept, written from the pointer on
    queue.enqueue(_rows(100, 6), torch.arange(6))
    assert queue.ids.tolist() == [4, 5, 2, 3] and int(queue.ptr) == 2
    assert queue.image[:, 0].tolist() == [104, 105, 102, 103]


def test_partially_filled_queue_exposes_only_filled_rows():
    queue = FeatureQueue(8, {"feat": 3})
    queue.enqueue({"feat": torch.ones(3, 3)}, torch.tensor([5, -1, 6]))
    banks, ids = queue.filled()
    assert banks["feat"].shape == (3, 3) and ids.tolist() == [5, -1, 6]


def test_staged_micro_batches_enqueue_like_one_batch():
    """Gradient accumulation: staging two micro-batches then flushing == enqueueing their concatenation."""
    staged, whole = FeatureQueue(6, {"image": 2, "text": 2}), FeatureQueue(6, {"image": 2, "text": 2})
    staged.stage(_rows(0, 2), torch.tensor([0, 1]))
    staged.stage(_rows(2, 2), torch.tensor([2, 3]))
    assert int(staged.count) == 0  # nothing is written before the flush
    staged.flush()
    whole.enqueue(_rows(0, 4), torch.arange(4))
    for name in ("image", "text", "ids", "ptr", "count"):
        assert torch.equal(staged.get_buffer(name), whole.get_buffer(name)), name
    staged.flush()  # nothing staged: no change
    assert int(staged.count) == 4


def test_stage_drops_groups_that_could_not_survive_and_reset_empties():
    queue = FeatureQueue(4, {"image": 2, "text": 2})
    for start in range(0, 12, 2):  # six groups of 2 rows staged without a flush
        queue.stage(_rows(start, 2), torch.tensor([start, start + 1]))
    assert len(queue._pending) <= 3  # K + one group's rows at most
    queue.flush()
    assert queue.ids.tolist() == [8, 9, 10, 11]  # the newest K rows, as one big enqueue would keep
    queue.stage(_rows(50, 2), torch.tensor([50, 51]))
    queue.reset()
    assert int(queue.count) == 0 and int(queue.ptr) == 0 and (queue.ids == -1).all()
    assert not queue.image.any() and not queue._pending


def test_queue_state_dict_and_validation():
    queue = FeatureQueue(3, {"image": 4, "text": 5})
    assert set(queue.state_dict()) == {"image", "text", "ids", "ptr", "count"}
    assert queue.text.shape == (3, 5)
    with pytest.raises(ValueError, match="capacity >= 1"):
        FeatureQueue(0, {"image": 2})
    with pytest.raises(ValueError, match="not a free identifier"):
        FeatureQueue(2, {"ids": 2})
    with pytest.raises(ValueError, match="not a free identifier"):
        FeatureQueue(2, {"training": 2})
    with pytest.raises(ValueError, match="banks are"):
        queue.enqueue({"image": torch.zeros(1, 4)}, torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="same number of rows"):
        queue.enqueue({"image": torch.zeros(2, 4), "text": torch.zeros(1, 5)}, torch.zeros(2, dtype=torch.long))


# ================================================================================ ALBEF on top
TOKENIZER = SimpleNamespace(pad_id=0, cls_id=1, sep_id=2, mask_id=3, unk_id=4,
                            special_ids=frozenset({0, 1, 2, 3, 4}), vocab_size=50)
TINY = {"size": "tiny", "embed_dim": 16,
        "vision": {"image_size": 32, "patch_size": 8, "width": 32, "depth": 1, "heads": 2},
        "text": {"width": 32, "depth": 1, "heads": 2, "max_len": 16}, "fusion": {"depth": 1, "heads": 2}}


def _albef(**method):
    cfg = build_config({"model": TINY, "method": {"name": "albef", **method}})
    torch.manual_seed(0)
    return build_method(cfg, VLModel(cfg.model, 50, 0), TOKENIZER)


def _batch(seed: int) -> Batch:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 50, (4, 8), generator=g)
    ids[:, 0], ids[:, -1] = 1, 2
    return Batch(input_ids=ids, attention_mask=torch.ones(4, 8, dtype=torch.long),
                 images=torch.randn(4, 3, 32, 32, generator=g), image_ids=torch.arange(4) + 10 * seed,
                 sample_keys=torch.arange(4) + 100 * seed)


def test_albef_queue_lives_in_a_feature_queue_and_old_keys_load():
    method = _albef(momentum_distill=True, queue_size=6)
    assert isinstance(method.queue, FeatureQueue) and method.has_queue
    method(_batch(1))
    method.on_step_end()
    assert method.queue.ids.tolist() == [10, 11, 12, 13, -1, -1]
    state = method.state_dict()
    assert {"queue.image", "queue.text", "queue.ids", "queue.ptr", "queue.count"} <= set(state)
    assert not set(LEGACY_QUEUE_KEYS) & set(state)

    # a checkpoint with the pre-FeatureQueue names loads strictly, into the same buffers
    inverse = {new: old for old, new in LEGACY_QUEUE_KEYS.items()}
    legacy = {inverse.get(k, k): v.clone() for k, v in state.items()}
    assert "image_queue" in legacy and "queue.image" not in legacy
    fresh = _albef(momentum_distill=True, queue_size=6)
    fresh.load_state_dict(legacy, strict=True)
    for name in ("image", "text", "ids", "ptr", "count"):
        assert torch.equal(fresh.queue.get_buffer(name), method.queue.get_buffer(name)), name
    assert "image_queue" in legacy  # the caller's dict is not modified
    # and the two give the same losses on the next batch
    method.eval(), fresh.eval()
    a, b = method(_batch(2)), fresh(_batch(2))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_albef_without_queue_has_no_queue_state():
    method = _albef(momentum_distill=True, queue_size=0)
    assert method.queue is None and not method.has_queue
    assert not any(k.startswith("queue") for k in method.state_dict())
    with pytest.raises(AttributeError):
        method.image_queue
    plain = _albef()
    assert plain.model_m is None and plain.queue is None
    plain.on_step_end()  # no momentum model: only the temperature clamp
    plain.reset_momentum()
