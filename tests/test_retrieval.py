"""Retrieval metrics (hand-computed cases) and the evaluation loop (fake model with known scores)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from vlp.tasks.retrieval import (
    attach_colour_probes,
    binomial_ci95,
    chance_recall,
    default_example_queries,
    evaluate_retrieval,
    evaluate_retrieval_itm_all,
    hard_negative_accuracy,
    pair_accuracy_metrics,
    recall_at_k,
    retrieval_examples,
    retrieval_ranks,
)

# 3 images x 2 captions: txt2img = [0, 0, 1, 1, 2, 2]
T2I_3x2 = torch.tensor([0, 0, 1, 1, 2, 2])
S_3x2 = torch.tensor(
    [
        [0.9, 0.1, 0.8, 0.7, 0.2, 0.3],  # GT {0,1}: best 0.9, nothing above       -> rank 0
        [0.5, 0.6, 0.1, 0.4, 0.7, 0.2],  # GT {2,3}: best 0.4, 0.5 0.6 0.7 above   -> rank 3
        [0.3, 0.2, 0.9, 0.1, 0.0, 0.8],  # GT {4,5}: best 0.8, 0.9 above           -> rank 1
    ]
)
# text->image ranks by column: t0 0, t1 2, t2 2, t3 1, t4 2, t5 0


def test_ranks_hand_case():
    rank_i2t, rank_t2i = retrieval_ranks(S_3x2, T2I_3x2)
    assert rank_i2t.tolist() == [0, 3, 1]
    assert rank_t2i.tolist() == [0, 2, 2, 1, 2, 0]


def test_recall_hand_case_3x2():
    m = recall_at_k(S_3x2, T2I_3x2, [[0, 1], [2, 3], [4, 5]], ks=(1, 2, 3))
    assert m["txt_r1"] == pytest.approx(100 / 3)
    assert m["txt_r2"] == pytest.approx(200 / 3)
    assert m["txt_r3"] == pytest.approx(200 / 3)
    assert m["img_r1"] == pytest.approx(100 * 2 / 6)
    assert m["img_r2"] == pytest.approx(100 * 3 / 6)
    assert m["img_r3"] == pytest.approx(100.0)
    assert m["txt_r_mean"] == pytest.approx((100 / 3 + 400 / 3) / 3)
    assert m["img_r_mean"] == pytest.approx((100 / 3 + 50 + 100) / 3)
    assert m["r_mean"] == pytest.approx((m["txt_r_mean"] + m["img_r_mean"]) / 2)
    default = recall_at_k(S_3x2, T2I_3x2)
    assert set(default) == {
        "txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "txt_r_mean", "img_r_mean", "r_mean"
    }
    assert default["txt_r5"] == 100.0  # image 1's best caption sits at rank 3 < 5
    assert default["txt_r10"] == 100.0 and default["img_r5"] == 100.0 and default["img_r1"] == pytest.approx(100 / 3)


def _five_caption_t2i(n_images: int) -> torch.Tensor:
    return torch.arange(n_images).repeat_interleave(5)


def test_perfect_and_reversed_five_captions():
    t2i = _five_caption_t2i(3)  # 15 texts
    pos = torch.zeros(3, 15)
    pos[t2i, torch.arange(15)] = 1.0
    perfect = recall_at_k(pos + 0.01 * torch.rand(3, 15), t2i)
    assert all(v == 100.0 for v in perfect.values())
    # Reversed: every GT scores below every negative. i2t: 10 negatives above -> rank 10 (not < 10);
    # t2i: the 2 other images above -> rank 2.
    rev = recall_at_k(-pos, t2i)
    assert rev["txt_r1"] == rev["txt_r5"] == rev["txt_r10"] == 0.0
    assert rev["img_r1"] == 0.0 and rev["img_r5"] == 100.0 and rev["img_r10"] == 100.0
    assert rev["r_mean"] == pytest.approx(200 / 6)


def test_five_caption_hand_case():
    # 3 images x 5 captions; image 0 ranks its captions 1st, image 1's best caption is 6th (5 negatives
    # of image 0 above it), image 2's best is 11th (rank 10: all 10 negatives above).
    t2i = _five_caption_t2i(3)
    s = torch.zeros(3, 15)
    s[0, 0:5] = 1.0
    s[1, 0:5] = 0.9
    s[1, 5:10] = 0.5
    s[2, 0:10] = 0.4
    s[2, 10:15] = torch.tensor([0.1, 0.2, 0.3, 0.35, 0.05])
    rank_i2t, rank_t2i = retrieval_ranks(s, t2i)
    assert rank_i2t.tolist() == [0, 5, 10]
    # t2i columns: texts 0-4 -> [1, .9, .4] rank 0; texts 5-9 -> [0, .5, .4] rank 0;
    # texts 10-14 -> [0, 0, x] rank 0 since x > 0.
    assert rank_t2i.tolist() == [0] * 15
    m = recall_at_k(s, t2i)
    assert m["txt_r1"] == pytest.approx(100 / 3)
    assert m["txt_r5"] == pytest.approx(100 / 3)
    assert m["txt_r10"] == pytest.approx(200 / 3)
    assert m["img_r1"] == 100.0


def test_ties_count_against_the_model():
    t2i = _five_caption_t2i(3)
    const = recall_at_k(torch.full((3, 15), 0.5), t2i)
    # i2t: all 10 negatives tie with the GT -> rank 10; t2i: 2 other images tie -> rank 2.
    assert const["txt_r1"] == const["txt_r5"] == const["txt_r10"] == 0.0
    assert const["img_r1"] == 0.0 and const["img_r5"] == 100.0
    assert const["r_mean"] < 100.0
    # One negative tying with the GT costs exactly one rank.
    s = S_3x2.clone()
    s[0, 2] = 0.9  # ties image 0's GT caption 0
    assert retrieval_ranks(s, T2I_3x2)[0].tolist() == [1, 3, 1]
    # Ties among an image's own GT captions do not hurt it.
    s = S_3x2.clone()
    s[0, 1] = 0.9
    assert retrieval_ranks(s, T2I_3x2)[0].tolist()[0] == 0


def test_nan_scores_are_misses():
    s = S_3x2.clone()
    s[0, 0] = s[0, 1] = float("nan")
    rank_i2t, rank_t2i = retrieval_ranks(s, T2I_3x2)
    assert rank_i2t[0] == 4  # both GTs NaN -> -inf -> every negative above
    assert rank_t2i[0] == 2 and rank_t2i[1] == 2


def test_matches_albef_argsort_reference_without_ties():
    g = torch.Generator().manual_seed(0)
    t2i = _five_caption_t2i(7)
    s_i2t = torch.randn(7, 35, generator=g)
    s_t2i = torch.randn(35, 7, generator=g)  # after re-ranking the two directions differ
    img2txt = [list(range(5 * i, 5 * i + 5)) for i in range(7)]
    # ALBEF itm_eval, verbatim in numpy.
    ranks = np.zeros(7)
    for i, row in enumerate(s_i2t.numpy()):
        inds = np.argsort(row)[::-1]
        ranks[i] = min(np.where(inds == t)[0][0] for t in img2txt[i])
    ranks_t = np.zeros(35)
    for t, row in enumerate(s_t2i.numpy()):
        inds = np.argsort(row)[::-1]
        ranks_t[t] = np.where(inds == int(t2i[t]))[0][0]
    rank_i2t, rank_t2i = retrieval_ranks(s_i2t, t2i, img2txt, sim_t2i=s_t2i)
    assert rank_i2t.tolist() == ranks.astype(int).tolist()
    assert rank_t2i.tolist() == ranks_t.astype(int).tolist()
    m = recall_at_k(s_i2t, t2i, img2txt, sim_t2i=s_t2i)
    for k in (1, 5, 10):
        assert m[f"txt_r{k}"] == pytest.approx(100 * np.mean(ranks < k))
        assert m[f"img_r{k}"] == pytest.approx(100 * np.mean(ranks_t < k))


def test_bad_ground_truth_is_rejected():
    with pytest.raises(ValueError, match="different image-caption pairs"):
        recall_at_k(S_3x2, T2I_3x2, [[0, 1], [2, 4], [3, 5]])
    with pytest.raises(ValueError, match="without any ground-truth caption"):
        recall_at_k(S_3x2, torch.tensor([0, 0, 0, 1, 1, 1]))
    with pytest.raises(ValueError, match="expected \\(6,\\)"):
        recall_at_k(S_3x2, torch.tensor([0, 1, 2]))


def test_chance_recall():
    assert chance_recall(1, 100) == pytest.approx(1.0)
    assert chance_recall(5, 3) == 100.0
    # 2 images x 2 captions: N = 4 texts, 2 positives. k=1: 2/4; k=2: 1 - C(2,2)/C(4,2) = 5/6.
    assert chance_recall(1, 2, captions_per_image=2) == pytest.approx(50.0)
    assert chance_recall(2, 2, captions_per_image=2) == pytest.approx(500 / 6)
    # Exhaustive check of the hypergeometric formula: mean over all orderings of 6 texts (3 GT).
    from itertools import permutations

    hits = [min(p.index(0), p.index(1), p.index(2)) < 2 for p in permutations(range(6))]
    assert chance_recall(2, 2, captions_per_image=3) == pytest.approx(100 * np.mean(hits))


def test_real_length():
    from vlp.tasks.retrieval import _real_length

    assert _real_length(torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 0, 0]])) == 3
    assert _real_length(torch.tensor([[1, 0, 1, 0]])) == 3
    assert _real_length(torch.zeros(2, 4, dtype=torch.long)) == 1


def test_hard_negative_accuracy():
    pos = torch.tensor([1.0, 2.0, 3.0, 4.0, 0.5])
    neg = torch.tensor([0.0, 2.0, 5.0, float("nan"), -1.0])
    # wins: 1>0 yes, tie no, 3>5 no, nan no, .5>-1 yes -> 2/5
    assert hard_negative_accuracy(pos, neg) == pytest.approx(40.0)
    assert math.isnan(hard_negative_accuracy(torch.empty(0), torch.empty(0)))


def test_binomial_ci95_wilson_contains_the_estimate_and_shrinks_with_n():
    low, high = binomial_ci95(50, 100)  # Wilson by hand: 0.5 -+ 1.96 * 0.05095 / 1.03842
    assert low == pytest.approx(40.383, abs=1e-3) and high == pytest.approx(59.617, abs=1e-3)
    for k, n in ((0, 10), (10, 10), (3, 7), (1, 1000), (999, 1000)):
        low, high = binomial_ci95(k, n)
        assert 0.0 <= low <= 100 * k / n <= high <= 100.0, (k, n)
        assert high > low  # never empty, even at 0 or n successes
    widths = [binomial_ci95(n // 2, n)[1] - binomial_ci95(n // 2, n)[0] for n in (10, 100, 1000, 10000)]
    assert all(a > b for a, b in zip(widths, widths[1:]))
    assert widths[2] / widths[3] == pytest.approx(math.sqrt(10), rel=0.01)  # 1 / sqrt(n)
    assert all(math.isnan(v) for v in binomial_ci95(0, 0))
    with pytest.raises(ValueError, match="successes <= n"):
        binomial_ci95(5, 4)


def test_pair_accuracy_metrics_keys_ties_and_interval():
    pos = torch.tensor([1.0, 2.0, 3.0, 4.0, 0.5])
    neg = torch.tensor([0.0, 2.0, 5.0, float("nan"), -1.0])
    m = pair_accuracy_metrics(pos, neg, "itc/colour_probe_acc")
    assert set(m) == {"itc/colour_probe_acc", "itc/colour_probe_acc_ci_low", "itc/colour_probe_acc_ci_high"}
    assert m["itc/colour_probe_acc"] == pytest.approx(40.0) == hard_negative_accuracy(pos, neg)  # ties, NaN lose
    assert (m["itc/colour_probe_acc_ci_low"], m["itc/colour_probe_acc_ci_high"]) == binomial_ci95(2, 5)


# ====================================================================== evaluation loop, fake model
@dataclass
class _ImageOut:
    tokens: torch.Tensor


@dataclass
class _FusionOut:
    cls: torch.Tensor


TEXT_OFFSET = 10


class FakeModel(nn.Module):
    """Same methods as VLModel; ITC and ITM scores come from tables.

    Image i is a constant image of value i; token 0 carries its ITC embedding, token 1 its id.
    Text t is input_ids [1, TEXT_OFFSET + t, 2]; hidden state 0 carries its ITC embedding, state 1 its id.
    The fused CLS carries (image id, text id); itm_logits looks the pair up in `itm`.
    """

    def __init__(self, img_emb: torch.Tensor, txt_emb: torch.Tensor, itm: torch.Tensor):
        super().__init__()
        self.register_buffer("img_table", img_emb.float())
        self.register_buffer("txt_table", txt_emb.float())
        self.register_buffer("itm_table", itm.float())
        self.dummy = nn.Parameter(torch.zeros(1))
        self.itm_calls: list[list[tuple[int, int]]] = []
        self.modes_seen: list[bool] = []

    def encode_image(self, images: torch.Tensor) -> _ImageOut:
        ids = images[:, 0, 0, 0].round().long()
        emb = self.img_table[ids]
        id_tok = torch.zeros_like(emb)
        id_tok[:, 0] = ids.float()
        self.modes_seen.append(self.training)
        return _ImageOut(torch.stack([emb, id_tok], dim=1))

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        tid = input_ids[:, 1] - TEXT_OFFSET
        hidden = torch.zeros(input_ids.shape[0], input_ids.shape[1], max(self.txt_table.shape[1], 2))
        hidden[:, 0, : self.txt_table.shape[1]] = self.txt_table[tid]
        hidden[:, 1, 0] = tid.float()
        return hidden

    def image_embed(self, image_tokens: torch.Tensor) -> torch.Tensor:
        return image_tokens[:, 0]

    def text_embed(self, text_hidden: torch.Tensor) -> torch.Tensor:
        return text_hidden[:, 0, : self.txt_table.shape[1]]

    def fuse(self, text_hidden, attention_mask, image_tokens, image_mask=None) -> _FusionOut:
        img = image_tokens[:, 1, 0]
        txt = text_hidden[:, 1, 0]
        self.itm_calls.append(list(zip(img.round().long().tolist(), txt.round().long().tolist())))
        return _FusionOut(torch.stack([img, txt], dim=1))

    def itm_logits(self, cls: torch.Tensor) -> torch.Tensor:
        img, txt = cls.round().long().unbind(1)
        pos = self.itm_table[img, txt]
        return torch.stack([-pos, pos], dim=1)

    def itm_score(self, image_tokens, input_ids, attention_mask) -> torch.Tensor:
        fused = self.fuse(self.encode_text(input_ids, attention_mask), attention_mask, image_tokens)
        return self.itm_logits(fused.cls)[:, 1]


def _text_ids(tids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.tensor([[1, TEXT_OFFSET + t, 2] for t in tids])
    return ids, torch.ones_like(ids)


def _fake_set(n_images: int, txt2img: torch.Tensor, hard=None) -> SimpleNamespace:
    ids, mask = _text_ids(list(range(len(txt2img))))
    images = torch.arange(n_images, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 3, 4, 4).contiguous()
    rset = SimpleNamespace(
        images=images, input_ids=ids, attention_mask=mask, txt2img=txt2img,
        img2txt=[(txt2img == i).nonzero().flatten().tolist() for i in range(n_images)],
        captions=[f"caption {t}" for t in range(len(txt2img))],
    )
    if hard is not None:
        h_img, pos_t, neg_t = hard
        rset.hard_image = torch.tensor(h_img)
        rset.hard_pos_ids, rset.hard_pos_mask = _text_ids(pos_t)
        rset.hard_neg_ids, rset.hard_neg_mask = _text_ids(neg_t)
    return rset


def _fake_3x2(flip: float = 0.95):
    """ITC sims = S_3x2 (image emb = identity, text emb = S.T); ITM = S with pair (image 1, text 3)
    raised from 0.4 to `flip`. Texts 6, 7, 8 are hard negatives of texts 0, 2, 4 (images 0, 1, 2)."""
    n_txt = 9
    txt_emb = torch.zeros(n_txt, 3)
    txt_emb[:6] = S_3x2.T
    txt_emb[6:] = torch.tensor([[0.5, 0, 0], [0, 0.05, 0], [0, 0, -0.1]])  # ITC: pos beats neg everywhere
    itm = torch.zeros(3, n_txt)
    itm[:, :6] = S_3x2
    itm[1, 3] = flip
    itm[:, 6:] = torch.tensor([[0.95, 0, 0], [0, 0.5, 0], [0, 0, -0.5]])  # ITM: neg beats pos for images 0, 1
    model = FakeModel(torch.eye(3), txt_emb, itm)
    rset = _fake_set(3, T2I_3x2, hard=([0, 1, 2], [0, 2, 4], [6, 7, 8]))
    return model, rset


def test_evaluate_itc_matches_hand_values_and_no_itm_when_k0():
    model, rset = _fake_3x2()
    m = evaluate_retrieval(model, rset, batch_size=2, k_rerank=0)
    assert m["itc/txt_r1"] == pytest.approx(100 / 3)
    assert m["itc/img_r1"] == pytest.approx(100 / 3)
    assert m["itc/txt_r5"] == 100.0
    assert not any(k.startswith("itm/") for k in m)
    assert model.itm_calls == []
    # ITC hard negatives: image 0: pos .9 vs neg .5; image 1: .1 vs .05; image 2: .0 vs -.1 (all win)
    assert m["itc/hard_neg_acc"] == pytest.approx(100.0)
    assert m["num_images"] == 3.0 and m["num_texts"] == 6.0
    assert m["chance_r1"] == pytest.approx(100 / 3)
    assert all(isinstance(v, float) for v in m.values())


def test_itm_rerank_flips_known_pair():
    model, rset = _fake_3x2()
    model.train()
    m = evaluate_retrieval(model, rset, batch_size=4, k_rerank=3)
    assert model.training and model.modes_seen and not any(model.modes_seen)  # eval mode inside, restored
    # t2i (k=3 = all images): text 3's column becomes [.7, .95, .1] -> rank 0; others unchanged.
    assert m["itm/img_r1"] == pytest.approx(50.0)
    assert m["itc/img_r1"] == pytest.approx(100 / 3)
    # i2t (k=3 of 6): image 1's top-3 by ITC is t4, t1, t0 -> its GT t3 is not re-ranked -> still a miss.
    assert m["itm/txt_r1"] == pytest.approx(100 / 3)
    # ITM hard negatives: image 0 .9 vs .95 (lose), image 1 .1 vs .5 (lose), image 2 0 vs -.5 (win)
    assert m["itm/hard_neg_acc"] == pytest.approx(100 / 3)
    assert m["itc/hard_neg_acc"] == pytest.approx(100.0)

    # k=4: t3 enters image 1's candidates and wins -> image->text R@1 goes from 1/3 to 2/3.
    model4, rset4 = _fake_3x2()
    m4 = evaluate_retrieval(model4, rset4, batch_size=4, k_rerank=4)
    assert m4["itm/txt_r1"] == pytest.approx(200 / 3)
    assert m4["itm/img_r1"] == pytest.approx(50.0)

    # BLIP/LAVIS score (ITM + ITC): text 3 gets [.7+.7, .95+.4] -> image 0 wins again -> back to 1/3.
    model_b, rset_b = _fake_3x2()
    mb = evaluate_retrieval(model_b, rset_b, batch_size=4, k_rerank=3, rerank_score="itm+itc")
    assert mb["itm/img_r1"] == pytest.approx(100 / 3)


def test_itm_forwards_are_chunked_and_deduplicated():
    model, rset = _fake_3x2()
    m = evaluate_retrieval(model, rset, batch_size=4, k_rerank=2)
    s = S_3x2
    expected = {(i, int(t)) for i in range(3) for t in s[i].topk(2).indices}
    expected |= {(int(i), t) for t in range(6) for i in s[:, t].topk(2).indices}
    rerank_calls = model.itm_calls[: math.ceil(len(expected) / 4)]
    scored = [p for call in rerank_calls for p in call]
    assert all(len(call) <= 4 for call in model.itm_calls)
    assert len(scored) == len(set(scored)) == len(expected) and set(scored) == expected
    assert len(expected) < 3 * 2 + 6 * 2  # both directions proposed some pairs
    assert m["itm_forwards"] == float(len(expected) + 2 * 3)  # + hard negatives (pos and neg)


def test_five_caption_fake_perfect_and_constant():
    t2i = _five_caption_t2i(4)
    pos = torch.zeros(4, 20)
    pos[t2i, torch.arange(20)] = 1.0
    model = FakeModel(torch.eye(4), pos.T.clone(), torch.zeros(4, 20))  # ITC perfect, ITM constant
    m = evaluate_retrieval(model, _fake_set(4, t2i), batch_size=8, k_rerank=4)
    assert m["itc/r_mean"] == 100.0
    # Constant ITM. image->text: the top-4 ITC candidates are all GT captions, the rest stay -inf -> rank 0.
    # text->image: all 4 images are candidates and tie -> rank 3 (a miss at R@1).
    assert m["itm/txt_r1"] == 100.0
    assert m["itm/img_r1"] == 0.0 and m["itm/img_r5"] == 100.0
    assert m["itm/r_mean"] < 100.0
    assert "itc/hard_neg_acc" not in m  # the set has no hard negatives


def test_retrieval_examples_fake():
    model, rset = _fake_3x2()
    assert default_example_queries(rset.img2txt, 3) == [0, 2, 4]
    queries, topk = retrieval_examples(model, rset, num_queries=3, k=2, batch_size=2, k_rerank=3)
    assert queries == [0, 2, 4]
    # ITM columns: t0 [.9, .5, .3]; t2 [.8, .1, .9]; t4 [.2, .7, .0]
    assert topk.tolist() == [[0, 1], [2, 0], [1, 0]]
    # ITC only, explicit queries: t3 column [.7, .4, .1]
    q, top = retrieval_examples(model, rset, k=3, k_rerank=0, queries=[3])
    assert q == [3] and top.tolist() == [[0, 1, 2]]
    # With ITM and the flipped pair, t3 finds image 1 first.
    q, top = retrieval_examples(model, rset, k=1, k_rerank=3, queries=[3])
    assert top.tolist() == [[1]]


# ================================================================================ real tiny VLModel
def _real_model():
    model_mod = pytest.importorskip("vlp.models.model")
    from vlp.config import ModelConfig

    cfg = ModelConfig(
        embed_dim=16,
        vision={"image_size": 16, "patch_size": 8, "width": 32, "depth": 1, "heads": 2},
        text={"width": 32, "depth": 1, "heads": 2, "max_len": 16},
        fusion={"depth": 1, "heads": 2},
    )
    torch.manual_seed(0)
    return model_mod.VLModel(cfg, vocab_size=50, pad_id=0)


def test_real_tiny_vlmodel_shapes_and_ranges():
    model = _real_model()
    g = torch.Generator().manual_seed(0)
    n_img, n_txt, t = 4, 20, 8
    ids = torch.randint(5, 50, (n_txt, t), generator=g)
    ids[:, 0] = 1
    mask = torch.ones_like(ids)
    mask[::2, 6:] = 0
    ids[mask == 0] = 0
    t2i = torch.arange(n_img).repeat_interleave(5)
    rset = SimpleNamespace(
        images=torch.randn(n_img, 3, 16, 16, generator=g), input_ids=ids, attention_mask=mask, txt2img=t2i,
        img2txt=[list(range(5 * i, 5 * i + 5)) for i in range(n_img)],
        hard_image=torch.tensor([0, 2]), hard_pos_ids=ids[[0, 10]], hard_pos_mask=mask[[0, 10]],
        hard_neg_ids=ids[[1, 11]], hard_neg_mask=mask[[1, 11]],
    )
    m = evaluate_retrieval(model, rset, batch_size=3, k_rerank=2)
    for key in ("itc/txt_r1", "itc/img_r10", "itm/r_mean", "itc/hard_neg_acc", "itm/hard_neg_acc"):
        assert 0.0 <= m[key] <= 100.0, key
    assert m["num_images"] == 4.0 and m["num_texts"] == 20.0
    # The cached-text ITM path equals VLModel.itm_score on the same pairs.
    from vlp.tasks.retrieval import compute_retrieval_scores

    scores = compute_retrieval_scores(model, rset, batch_size=3, k_rerank=4)  # k = I: every t2i cell scored
    model.eval()
    with torch.no_grad():
        tokens = model.encode_image(rset.images).tokens
        direct = model.itm_score(tokens.repeat_interleave(n_txt, 0), ids.repeat(n_img, 1), mask.repeat(n_img, 1))
    torch.testing.assert_close(scores.score_t2i.T, direct.view(n_img, n_txt), rtol=1e-5, atol=1e-5)
    # Trailing all-padding columns are trimmed away: identical scores with 4 extra pad columns.
    padded = SimpleNamespace(**vars(rset))
    padded.input_ids = torch.cat([ids, torch.zeros(n_txt, 4, dtype=ids.dtype)], 1)
    padded.attention_mask = torch.cat([mask, torch.zeros(n_txt, 4, dtype=mask.dtype)], 1)
    scores_padded = compute_retrieval_scores(model, padded, batch_size=3, k_rerank=4)
    torch.testing.assert_close(scores_padded.sim_itc, scores.sim_itc)
    torch.testing.assert_close(scores_padded.score_t2i, scores.score_t2i)
    hard_direct = model.itm_score(tokens[[0, 2]], ids[[1, 11]], mask[[1, 11]]).detach()
    torch.testing.assert_close(scores.hard_itm_neg, hard_direct, rtol=1e-5, atol=1e-5)
    m16 = evaluate_retrieval(model, rset, batch_size=8, k_rerank=2, amp_dtype=torch.bfloat16)
    assert set(m16) == set(m) and all(0.0 <= m16[k] <= 100.0 for k in m16 if "/" in k)
    queries, topk = retrieval_examples(model, rset, num_queries=2, k=3, batch_size=3, k_rerank=2)
    assert queries == [0, 15] and topk.shape == (2, 3)
    assert topk.min() >= 0 and topk.max() < n_img


# ====================================================================== colour probes (world + metric)
def test_world_colour_probes_differ_from_the_true_caption_only_in_the_colour_word():
    from vlp.data.lexicon import class_id_of_word, colour_of_word
    from vlp.data.world import World

    world = World(seed=2, image_size=64)
    for split in ("train", "val", "test", "compositional"):
        for index in range(40):
            scene = world.scene(split, index)
            if scene.colour_probe is None:
                assert split == "train"  # eval scenes always have one
                continue
            true, false = (text.split() for text in scene.colour_probe)
            assert len(true) == len(false)
            (k,) = [k for k, (a, b) in enumerate(zip(true, false)) if a != b]
            old, new = colour_of_word(true[k]), colour_of_word(false[k])
            assert old and new and old != new, scene.colour_probe
            assert true[k - 1] in ("a", "an") and k + 2 == len(true)  # "... a <colour> <noun>": one object
            class_id = class_id_of_word(true[-1])
            assert any(o.class_id == class_id and o.colour == old for o in scene.objects)  # true
            assert not any(o.class_id == class_id and o.colour == new for o in scene.objects)  # false


def _probe_model_and_set(itm_probe: torch.Tensor):
    """3 images x 2 captions (S_3x2, as `_fake_3x2`); texts 6, 7, 8 are colour probes' false captions of
    texts 0, 2, 4 (images 0, 1, 2). ITC: every true caption wins. ITM: `itm_probe` (3,) is the false
    caption's logit against its image (true ones score .9, .1, 0)."""
    txt_emb = torch.zeros(9, 3)
    txt_emb[:6] = S_3x2.T
    txt_emb[6:] = torch.tensor([[0.5, 0, 0], [0, 0.05, 0], [0, 0, -0.1]])
    itm = torch.zeros(3, 9)
    itm[:, :6] = S_3x2
    itm[[0, 1, 2], [6, 7, 8]] = itm_probe
    rset = _fake_set(3, T2I_3x2)
    rset.colour_probe_image = torch.tensor([0, 1, 2])
    rset.colour_probe_pos_ids, rset.colour_probe_pos_mask = _text_ids([0, 2, 4])
    rset.colour_probe_neg_ids, rset.colour_probe_neg_mask = _text_ids([6, 7, 8])
    return FakeModel(torch.eye(3), txt_emb, itm), rset


def test_colour_probe_accuracy_oracle_ties_and_half_under_every_protocol():
    # oracle: every true caption scores above its recoloured twin -> 100 % (ITC and ITM)
    model, rset = _probe_model_and_set(torch.tensor([0.5, 0.0, -0.5]))
    m = evaluate_retrieval(model, rset, batch_size=2, k_rerank=3)
    assert m["itc/colour_probe_acc"] == m["itm/colour_probe_acc"] == 100.0
    assert m["itm/colour_probe_acc_ci_low"] == pytest.approx(binomial_ci95(3, 3)[0]) and m["itm/colour_probe_acc_ci_high"] == 100.0
    assert "itc/hard_neg_acc" not in m  # no hard pairs in this set
    # constant scorer: every pair ties -> every probe lost (ties count against the model, as hard_neg_acc)
    model, rset = _probe_model_and_set(torch.tensor([0.9, 0.1, 0.0]))
    assert evaluate_retrieval(model, rset, batch_size=2, k_rerank=3)["itm/colour_probe_acc"] == 0.0
    # one probe of two won -> 50 %, with an interval around it
    model, rset = _probe_model_and_set(torch.tensor([0.5, 0.5, 0.0]))
    rset.colour_probe_image = rset.colour_probe_image[:2]
    for name in ("pos_ids", "pos_mask", "neg_ids", "neg_mask"):
        setattr(rset, f"colour_probe_{name}", getattr(rset, f"colour_probe_{name}")[:2])
    m = evaluate_retrieval(model, rset, batch_size=2, k_rerank=3)
    assert m["itm/colour_probe_acc"] == 50.0
    assert m["itm/colour_probe_acc_ci_low"] < 50.0 < m["itm/colour_probe_acc_ci_high"]
    assert m["itm_forwards"] > 4  # the 2 probes' 4 ITM forwards come on top of re-ranking
    # ITC only: no ITM probe keys
    m0 = evaluate_retrieval(model, rset, batch_size=2, k_rerank=0)
    assert m0["itc/colour_probe_acc"] == 100.0 and "itm/colour_probe_acc" not in m0

    # itm_all (UNITER / CMAL): the pair scorer decides; oracle, constant and half
    def scorer(truth: torch.Tensor):
        def score(images, boxes, mask, ids, attn):
            return truth[ids[:, 1] - TEXT_OFFSET]
        return score

    _, rset = _probe_model_and_set(torch.zeros(3))
    oracle = torch.tensor([1.0] * 6 + [0.0] * 3)  # true captions 1, recoloured 0
    assert evaluate_retrieval_itm_all(scorer(oracle), rset)["itm_all/colour_probe_acc"] == 100.0
    assert evaluate_retrieval_itm_all(scorer(torch.ones(9)), rset)["itm_all/colour_probe_acc"] == 0.0
    half = torch.tensor([1.0] * 6 + [0.0, 2.0, 0.0])  # probe 1 lost
    m = evaluate_retrieval_itm_all(scorer(half), rset)
    assert m["itm_all/colour_probe_acc"] == pytest.approx(200 / 3)
    assert m["itm_all/colour_probe_acc_ci_low"] < 200 / 3 < m["itm_all/colour_probe_acc_ci_high"]
    assert m["itm_forwards"] == 3 * 6 + 2 * 3


def test_attach_colour_probes_tokenises_the_worlds_probes(world, tok):
    from vlp.data.datasets import RetrievalSet

    split = world.split("val")
    rset = attach_colour_probes(RetrievalSet.build(split, tok, 32, num_images=4), split, tok, 32)
    assert rset.colour_probe_image.tolist() == [0, 1, 2, 3]  # every val scene has a probe
    texts = [split.scene(i).colour_probe for i in range(4)]
    pos_ids, pos_mask = tok.encode([t for t, _ in texts], 32)
    neg_ids, neg_mask = tok.encode([f for _, f in texts], 32)
    assert torch.equal(rset.colour_probe_pos_ids, pos_ids) and torch.equal(rset.colour_probe_neg_mask, neg_mask)
    assert torch.equal(rset.colour_probe_neg_ids, neg_ids)
    differs = (rset.colour_probe_pos_ids != rset.colour_probe_neg_ids).sum(dim=1)
    assert (differs >= 1).all()  # the colour word's token(s)
    # samples without probes (e.g. caption records of a user file) leave the set unchanged
    bare = RetrievalSet.build(split, tok, 32, num_images=2)
    assert attach_colour_probes(bare, [SimpleNamespace()] * 2, tok, 32) is bare and bare.__dict__.get("colour_probe_image") is None
