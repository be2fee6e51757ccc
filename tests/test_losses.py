"""Keyed RNG and the pure losses, each against hand-computed small cases."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from vlp.models.losses import (
    contrastive_loss,
    contrastive_targets,
    itm_loss,
    mask_tokens,
    mlm_loss,
    sample_hard_negatives,
)
from vlp.models.rng import _GOLDEN_GAMMA, _mix64, _signed, keyed_uniform

# ------------------------------------------------------------------------------------- keyed RNG


def test_mix64_matches_splitmix64_reference_vector():
    # First five outputs of Vigna's splitmix64.c seeded with 1234567 (a widely quoted test vector).
    # Exercises int64 wrap-around and the masked logical right shifts on negative values.
    seed = 1234567
    states = torch.tensor([_signed(seed + n * _GOLDEN_GAMMA) for n in range(1, 6)], dtype=torch.int64)
    got = [v & ((1 << 64) - 1) for v in _mix64(states).tolist()]
    assert got == [6457827717110365317, 3203168211198807973, 9817491932198370423,
                   4593380528125082431, 16408922859458223821]


def test_keyed_uniform_is_uniform():
    u = keyed_uniform(torch.arange(1000), (100,), salt=1).flatten().double()  # 1e5 draws
    n = u.numel()
    assert u.min() >= 0.0 and u.max() < 1.0
    assert abs(u.mean().item() - 0.5) < 5 * math.sqrt(1 / 12 / n)
    ecdf = torch.arange(1, n + 1, dtype=torch.float64) / n
    ks = (ecdf - u.sort().values).abs().max().item()
    assert ks < 1.63 / math.sqrt(n)  # Kolmogorov-Smirnov critical value at the 1 % level
    # consecutive elements of a stream are uncorrelated
    corr = torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1].item()
    assert abs(corr) < 5 / math.sqrt(n)


def test_keyed_uniform_rows_depend_only_on_their_key():
    keys = torch.tensor([5, 17, -3, 2**40, 0, 7, 123456, 99])
    batch = keyed_uniform(keys, (4, 3), salt=11)
    assert batch.shape == (8, 4, 3)
    for i, key in enumerate(keys.tolist()):
        alone = keyed_uniform(torch.tensor([key]), (4, 3), salt=11)
        assert torch.equal(alone[0], batch[i])
    shuffled = keyed_uniform(keys.flip(0), (4, 3), salt=11)
    assert torch.equal(shuffled.flip(0), batch)
    # position (t, c) does not depend on the padded length T
    longer = keyed_uniform(keys, (9, 3), salt=11)
    assert torch.equal(longer[:, :4], batch)


def test_keyed_uniform_salts_and_keys_differ():
    keys = torch.arange(64)
    a = keyed_uniform(keys, (16,), salt=1)
    b = keyed_uniform(keys, (16,), salt=2)
    assert (a != b).float().mean() > 0.99
    assert len(set(a[:, 0].tolist())) == 64  # different keys, different streams
    assert torch.equal(a, keyed_uniform(keys, (16,), salt=1))  # deterministic


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_keyed_uniform_same_on_cuda():
    keys = torch.tensor([3, -9, 2**50, 12])
    assert torch.equal(keyed_uniform(keys, (5, 3), 4), keyed_uniform(keys.cuda(), (5, 3), 4).cpu())


# ------------------------------------------------------------------------------------------- ITC


def _ref_soft_ce(rows: list[list[float]], targets: list[list[float]]) -> float:
    """Plain-Python mean over rows of -sum_j t_j log softmax(row)_j."""
    total = 0.0
    for row, tgt in zip(rows, targets):
        log_z = math.log(sum(math.exp(v) for v in row))
        total += -sum(t * (v - log_z) for v, t in zip(row, tgt))
    return total / len(rows)


def _transpose(m):
    return [list(col) for col in zip(*m)]


def test_contrastive_loss_2x2_closed_form():
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    # sims image_i . text_j = [[0.6, 0], [0.8, 1]]; temperature 0.1 -> logits [[6, 0], [8, 10]]
    i2t = (math.log(1 + math.exp(-6)) + math.log(1 + math.exp(-2))) / 2
    t2i = (math.log(1 + math.exp(2)) + math.log(1 + math.exp(-10))) / 2  # columns [6, 8] and [0, 10]
    expected = 0.5 * (i2t + t2i)
    got = contrastive_loss(image, text, torch.tensor(0.1))
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_contrastive_loss_multi_positive_3x3():
    image = torch.eye(3)
    text = torch.tensor([[0.2, 0.5, -0.1], [0.9, 0.3, 0.0], [0.1, -0.4, 0.7]])
    ids = torch.tensor([4, 4, 9])  # rows 0 and 1 are captions of the same image
    tau = 0.5
    sims = (image @ text.t()).tolist()  # sims[i][j] = text[j][i]
    logits = [[v / tau for v in row] for row in sims]
    targets = [[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]]
    expected = 0.5 * (_ref_soft_ce(logits, targets) + _ref_soft_ce(_transpose(logits), targets))
    got = contrastive_loss(image, text, tau, image_ids=ids)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    assert torch.equal(contrastive_targets(ids, ids), torch.tensor(targets))
    # without ids the second caption of image 4 is a negative: a different (larger) loss
    diag = [[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]]
    expected_diag = 0.5 * (_ref_soft_ce(logits, diag) + _ref_soft_ce(_transpose(logits), diag))
    assert contrastive_loss(image, text, tau).item() == pytest.approx(expected_diag, rel=1e-6)
    assert expected_diag != pytest.approx(expected, rel=1e-3)


def test_contrastive_loss_soft_target_mixing():
    image = torch.eye(2)
    text = torch.tensor([[0.3, 0.7], [0.5, -0.2]])
    soft_i2t = torch.tensor([[0.7, 0.3], [0.2, 0.8]])
    soft_t2i = torch.tensor([[0.6, 0.4], [0.1, 0.9]])
    alpha, tau = 0.4, 0.2
    logits = [[v / tau for v in row] for row in (image @ text.t()).tolist()]
    mix = lambda soft: [[alpha * s + (1 - alpha) * (1.0 if i == j else 0.0) for j, s in enumerate(row)]
                        for i, row in enumerate(soft.tolist())]
    expected = 0.5 * (_ref_soft_ce(logits, mix(soft_i2t)) + _ref_soft_ce(_transpose(logits), mix(soft_t2i)))
    got = contrastive_loss(image, text, tau, soft_i2t=soft_i2t, soft_t2i=soft_t2i, alpha=alpha)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # alpha = 0 ignores the soft targets
    plain = contrastive_loss(image, text, tau)
    assert contrastive_loss(image, text, tau, soft_i2t=soft_i2t, soft_t2i=soft_t2i, alpha=0.0).item() == \
        pytest.approx(plain.item(), rel=1e-6)


def test_contrastive_loss_with_queue_and_queue_ids():
    image = torch.eye(2)
    text = torch.tensor([[0.3, 0.7], [0.5, -0.2]])
    image_queue = torch.tensor([[0.6, 0.8]])
    text_queue = torch.tensor([[-0.8, 0.6]])
    ids, queue_ids = torch.tensor([1, 2]), torch.tensor([2])  # the queued pair shows image 2 again
    tau = 0.5
    i2t = [[v / tau for v in row] for row in (image @ torch.cat([text, text_queue]).t()).tolist()]
    t2i = [[v / tau for v in row] for row in (text @ torch.cat([image, image_queue]).t()).tolist()]
    targets = [[1.0, 0.0, 0.0], [0.0, 0.5, 0.5]]
    expected = 0.5 * (_ref_soft_ce(i2t, targets) + _ref_soft_ce(t2i, targets))
    got = contrastive_loss(image, text, tau, ids, image_queue=image_queue, text_queue=text_queue,
                           queue_ids=queue_ids)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # without ids the queue entry is a plain negative
    diag = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
    expected = 0.5 * (_ref_soft_ce(i2t, diag) + _ref_soft_ce(t2i, diag))
    got = contrastive_loss(image, text, tau, image_queue=image_queue, text_queue=text_queue)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_contrastive_loss_rejects_mismatched_soft_targets():
    with pytest.raises(ValueError, match="soft targets must have shape"):
        contrastive_loss(torch.eye(2), torch.eye(2), 0.1, soft_i2t=torch.ones(2, 3), soft_t2i=torch.ones(2, 3),
                         alpha=0.4)


# ------------------------------------------------------------------------------------------- ITM


def test_itm_loss_hand_case():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    labels = torch.tensor([1, 1, 0])
    expected = (math.log(1 + math.exp(2)) + math.log(1 + math.exp(-1)) + math.log(2)) / 3
    assert itm_loss(logits, labels).item() == pytest.approx(expected, rel=1e-6)


def test_sample_hard_negatives_hand_case():
    ids = torch.tensor([0, 0, 1, 2])  # rows 0, 1 are two captions of image 0
    big = 50.0  # huge similarity on positives must not matter: they are excluded
    # text rows (sim_t2i): row 0 has negative weights exp(0):exp(log 3) = 1:3 on columns 2, 3
    sim_t2i = torch.tensor([
        [big, big, 0.0, math.log(3.0)],
        [big, big, math.log(3.0), 0.0],
        [0.0, 0.0, big, 0.0],          # negatives 0, 1, 3 with equal weight
        [0.0, math.log(2.0), 0.0, big],  # weights 1:2:1 on 0, 1, 2
    ])
    sim_i2t = sim_t2i.flip(1)  # any other matrix; checked below with its own expectations
    u_img = torch.tensor([0.2, 0.2, 0.5, 0.6])
    u_txt = torch.tensor([0.99, 0.0, 0.1, 0.3])
    neg_img, neg_txt = sample_hard_negatives(sim_i2t, sim_t2i, ids, ids, u_img, u_txt)
    # row 0: cdf over cols (2, 3) = (0.25, 1): u=0.2 -> col 2. row 1: cdf (0.75, 1): u=0.2 -> col 2.
    # row 2: cdf (1/3, 2/3, -, 1): u=0.5 -> col 1. row 3: cdf (0.25, 0.75, 1): u=0.6 -> col 1.
    assert neg_img.tolist() == [2, 2, 1, 1]
    # sim_i2t = the same rows reversed. row 0 = [log3, 0, big, big]: negatives 2, 3 at 1:1, u=0.99 -> col 3.
    # row 1 = [0, log3, big, big]: 1:1 on (2, 3), u=0 -> col 2. row 2 = [0, big, 0, 0] (positive col 2):
    # e^50 dominates col 1, u=0.1 -> col 1. row 3 = [big, 0, log2, 0] (positive col 3): u=0.3 -> col 0.
    assert neg_txt.tolist() == [3, 2, 1, 0]


def test_sample_hard_negatives_never_picks_positive_and_follows_weights():
    torch.manual_seed(0)
    ids = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3])
    rows = ids.repeat(500)  # 4000 rows over the same 8 global columns
    sim = torch.randn(rows.numel(), 8) * 3
    u1, u2 = torch.rand(rows.numel()), torch.rand(rows.numel())
    neg_img, neg_txt = sample_hard_negatives(sim, sim, rows, ids, u1, u2)
    assert (ids[neg_img] != rows).all() and (ids[neg_txt] != rows).all()
    # empirical frequencies follow the renormalised softmax (constant sims -> exact expectation)
    flat = torch.tensor([0.0, 1.0, 2.0, 0.0, 0.0, 1.0, 0.0, 0.0]).expand(4000, 8)
    neg, _ = sample_hard_negatives(flat, flat, torch.full((4000,), 0), ids, u1, u2)
    w = torch.exp(flat[0]).masked_fill(ids == 0, 0.0)
    w = w / w.sum()
    freq = torch.bincount(neg, minlength=8).double() / 4000
    assert (freq - w).abs().max() < 4 * math.sqrt(0.25 / 4000)


def test_sample_hard_negatives_degenerate_rows_and_edge_uniforms():
    ids = torch.tensor([0, 1, 2, 0])
    inf = float("inf")
    sim = torch.tensor([
        [0.0, -inf, -inf, 0.0],   # all negatives -inf -> uniform over cols 1, 2
        [float("nan"), 0.0, 1.0, 2.0],  # nan -> uniform over cols 0, 2, 3
        [0.0, 0.0, 0.0, 0.0],
        [0.0, 1.0, 2.0, 0.0],
    ])
    u = torch.tensor([0.6, 0.5, 0.0, 1.0 - 2.0**-24])
    neg, _ = sample_hard_negatives(sim, sim, ids, ids, u, u)
    # row 0: uniform cdf (.., 1, 2) thr 1.2 -> col 2. row 1: cdf (1, -, 2, 3) thr 1.5 -> col 2.
    # row 2: u=0 -> first negative, col 0. row 3: u ~ 1 -> last negative (col 2), never the positive col 3.
    assert neg.tolist() == [2, 2, 0, 2]


def test_sample_hard_negatives_single_image_raises():
    ids = torch.tensor([7, 7, 7])
    sim = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="at least 2 distinct images"):
        sample_hard_negatives(sim, sim, ids, ids, torch.zeros(3), torch.zeros(3))


# ------------------------------------------------------------------------------------------- MLM
PAD, CLS, SEP, MASK, UNK = 0, 1, 2, 3, 4
SPECIALS = [PAD, CLS, SEP, MASK, UNK]


def test_mask_tokens_hand_case():
    ids = torch.tensor([[CLS, 10, 11, 12, 13, 14, SEP, PAD]])
    attn = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 0]])
    u = torch.zeros(1, 8, 3)
    u[0, :, 0] = torch.tensor([0.0, 0.1, 0.5, 0.05, 0.14, 0.149, 0.0, 0.0])  # CLS, SEP, PAD would pass
    u[0, :, 1] = torch.tensor([0.0, 0.5, 0.0, 0.85, 0.95, 0.79, 0.0, 0.0])
    u[0, :, 2] = torch.tensor([0.0, 0.0, 0.0, 0.999, 0.0, 0.0, 0.0, 0.0])
    masked, labels = mask_tokens(ids, attn, frozenset(SPECIALS), MASK, vocab_size=50, mlm_prob=0.15, uniforms=u)
    # pos1 -> [MASK]; pos2 not selected; pos3 -> random: candidates 5..49, floor(0.999*45)=44 -> id 49;
    # pos4 kept (u1 >= 0.9) but labelled; pos5 -> [MASK]; specials untouched
    assert masked.tolist() == [[CLS, MASK, 11, 49, 13, MASK, SEP, PAD]]
    assert labels.tolist() == [[-100, 10, -100, 12, 13, 14, -100, -100]]


def test_mask_tokens_rates_and_specials():
    g = torch.Generator().manual_seed(0)
    batch, length, vocab = 200, 100, 50  # 20k positions
    ids = torch.randint(5, vocab, (batch, length), generator=g)
    lengths = torch.randint(20, length + 1, (batch,), generator=g)
    attn = (torch.arange(length)[None, :] < lengths[:, None]).long()
    ids[:, 0] = CLS
    ids[torch.arange(batch), lengths - 1] = SEP
    ids[:, 10] = UNK  # a special inside the text
    ids = torch.where(attn.bool(), ids, torch.full_like(ids, PAD))
    masked, labels = mask_tokens(ids, attn, SPECIALS, MASK, vocab, 0.15, generator=g)

    special = torch.isin(ids, torch.tensor(SPECIALS))
    eligible = attn.bool() & ~special
    selected = labels != -100
    assert torch.equal(masked[~selected], ids[~selected])  # nothing else changes
    assert not (selected & ~eligible).any()  # never a special or a pad
    assert torch.equal(labels[selected], ids[selected])
    n = int(eligible.sum())
    rate = selected.sum().item() / n
    assert abs(rate - 0.15) < 4 * math.sqrt(0.15 * 0.85 / n)

    m = int(selected.sum())
    to_mask = (masked == MASK) & selected
    unchanged = (masked == ids) & selected
    random = selected & ~to_mask & ~unchanged
    p_same = 0.1 / 45  # a random draw equal to the original token counts as unchanged
    for count, p in ((to_mask, 0.8), (random, 0.1 - p_same), (unchanged, 0.1 + p_same)):
        assert abs(count.sum().item() / m - p) < 4 * math.sqrt(p * (1 - p) / m)
    assert not torch.isin(masked[random], torch.tensor(SPECIALS)).any()


def test_mask_tokens_keyed_uniforms_are_row_local():
    ids = torch.randint(5, 50, (6, 12), generator=torch.Generator().manual_seed(1))
    attn = torch.ones_like(ids)
    keys = torch.arange(100, 106)
    full, full_labels = mask_tokens(ids, attn, SPECIALS, MASK, 50, 0.5, uniforms=keyed_uniform(keys, (12, 3), 7))
    half, half_labels = mask_tokens(ids[3:], attn[3:], SPECIALS, MASK, 50, 0.5,
                                    uniforms=keyed_uniform(keys[3:], (12, 3), 7))
    assert torch.equal(full[3:], half) and torch.equal(full_labels[3:], half_labels)
    assert (full_labels != -100).any()


def test_mlm_loss_hand_case_and_distillation():
    logits = torch.tensor([[[0.0, 0.0, math.log(2.0)], [5.0, 1.0, 0.0]]], requires_grad=True)
    labels = torch.tensor([[2, -100]])
    # position 0: p = (1/4, 1/4, 1/2) -> CE = log 2; position 1 ignored
    assert mlm_loss(logits, labels).item() == pytest.approx(math.log(2.0), rel=1e-6)
    soft = torch.tensor([[[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]]])
    # soft CE at position 0 = -(0.5 log 1/4 + 0.5 log 1/4) = log 4
    got = mlm_loss(logits, labels, soft_targets=soft, alpha=0.25)
    assert got.item() == pytest.approx(0.75 * math.log(2.0) + 0.25 * math.log(4.0), rel=1e-6)
    got.backward()
    assert logits.grad[0, 1].abs().sum() == 0  # the ignored position gets no gradient


def test_mlm_loss_without_labels_is_zero_with_grad():
    logits = torch.randn(2, 3, 7, requires_grad=True)
    loss = mlm_loss(logits, torch.full((2, 3), -100))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


# ----------------------------------------------------------------------------------- distributed
_WORKER = textwrap.dedent(
    """
    import os
    import sys
    import torch
    import torch.distributed as dist
    import torch.multiprocessing as mp

    def worker(rank, world, path):
        torch.set_num_threads(1)
        # a FileStore rendezvous: no port to pick, no TCP store server to outlive its clients
        dist.init_process_group("gloo", init_method=f"file://{path}/store", rank=rank, world_size=world)
        from vlp.models.losses import contrastive_loss
        from vlp.train.distributed import all_gather_no_grad, all_reduce_mean, rank as get_rank, world_size
        data = torch.load(path + "/data.pt")
        n = data["image"].shape[0] // world
        rows = slice(rank * n, (rank + 1) * n)
        image = data["image"][rows].clone().requires_grad_(True)
        text = data["text"][rows].clone().requires_grad_(True)
        results = {"rank": get_rank(), "world": world_size()}
        for name, ids in (("diag", None), ("ids", data["ids"][rows])):
            loss = contrastive_loss(image, text, data["tau"], ids)
            image.grad = text.grad = None
            loss.backward()
            results[name] = (loss.detach(), image.grad.clone(), text.grad.clone())
        results["gathered_ids"] = all_gather_no_grad(data["ids"][rows])
        results["mean_rank"] = all_reduce_mean(torch.tensor(float(rank)))
        torch.save(results, f"{path}/rank{rank}.pt")
        dist.barrier()  # every rank is done with its collectives before any tears gloo down
        dist.destroy_process_group()
        # Skip interpreter teardown: with gloo, torch 2.13 sometimes aborts in a C++ static destructor
        # ("terminate called without an active exception") after everything above has finished.
        os._exit(0)

    if __name__ == "__main__":
        mp.spawn(worker, args=(2, sys.argv[1]), nprocs=2, join=True)
    """
)


@pytest.mark.slow
def test_contrastive_loss_two_ranks_matches_one_process(tmp_path: Path):
    g = torch.Generator().manual_seed(3)
    image = torch.nn.functional.normalize(torch.randn(8, 6, generator=g), dim=1)
    text = torch.nn.functional.normalize(torch.randn(8, 6, generator=g), dim=1)
    ids = torch.tensor([0, 1, 2, 5, 5, 6, 1, 7])  # image 1 repeats across the two ranks, 5 within rank 1
    tau = torch.tensor(0.1)
    torch.save({"image": image, "text": text, "ids": ids, "tau": tau}, tmp_path / "data.pt")
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert [r["rank"] for r in ranks] == [0, 1] and ranks[0]["world"] == 2
    assert torch.equal(ranks[0]["gathered_ids"], ids)
    assert ranks[1]["mean_rank"].item() == 0.5

    for name, row_ids in (("diag", None), ("ids", ids)):
        img = image.clone().requires_grad_(True)
        txt = text.clone().requires_grad_(True)
        full = contrastive_loss(img, txt, tau, row_ids)
        full.backward()
        mean = (ranks[0][name][0] + ranks[1][name][0]) / 2
        assert mean.item() == pytest.approx(full.item(), abs=1e-5)
        # DDP averages parameter gradients over ranks: local grad / world = d(full loss) / d(local rows)
        grad_img = torch.cat([ranks[0][name][1], ranks[1][name][1]]) / 2
        grad_txt = torch.cat([ranks[0][name][2], ranks[1][name][2]]) / 2
        torch.testing.assert_close(grad_img, img.grad, atol=1e-5, rtol=0)
        torch.testing.assert_close(grad_txt, txt.grad, atol=1e-5, rtol=0)
