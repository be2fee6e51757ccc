"""CMAL retrieval: ITM score over ALL (image, text) pairs (UNITER convention), `evaluate_retrieval_itm_all`."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from vlp.cli.main import main
from vlp.config import build_config
from vlp.data.datasets import RetrievalSet
from vlp.data.lexicon import CLASSES, class_words
from vlp.methods.cmal import Cmal
from vlp.models.model import VLModel
from vlp.tasks.retrieval import evaluate_retrieval_itm_all

WORLD_CLASS_WORDS = [class_words(k) for k in range(len(CLASSES))]


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------ fake scorer
def _fake_set(score: torch.Tensor, hard: bool = False) -> SimpleNamespace:
    """3 images, 2 captions each (image-major); text t is encoded as input_ids[t] = [t, t] so the fake
    scorer can look up score[image, t]; the "image" tensor is its index."""
    n_images, n_texts = score.shape
    rset = SimpleNamespace(
        images=torch.arange(n_images, dtype=torch.float32).view(n_images, 1, 1, 1),
        input_ids=torch.arange(n_texts).view(-1, 1).repeat(1, 2),
        attention_mask=torch.ones(n_texts, 2, dtype=torch.long),
        txt2img=torch.arange(n_images).repeat_interleave(n_texts // n_images),
        img2txt=[[2 * i, 2 * i + 1] for i in range(n_images)],
    )
    if hard:  # pair 0: image 0, pos = text 0 (score 5) vs neg = text 2 (1): right;
        # pair 1: image 1, pos = text 1 (0) vs neg = text 4 (3): wrong
        rset.hard_image = torch.tensor([0, 1])
        rset.hard_pos_ids = torch.tensor([[0, 0], [1, 1]])
        rset.hard_neg_ids = torch.tensor([[2, 2], [4, 4]])
        rset.hard_pos_mask = rset.hard_neg_mask = torch.ones(2, 2, dtype=torch.long)
    return rset


SCORE = torch.tensor([
    [5.0, 0.0, 1.0, 0.0, 0.0, 0.0],   # image 0: GT texts 0, 1 -> best GT (5) ranks first
    [0.0, 0.0, 1.0, 2.0, 3.0, 0.0],   # image 1: GT texts 2, 3 -> best GT 2 is beaten by text 4 (rank 1)
    [9.0, 0.0, 0.0, 0.0, 0.0, 0.0],   # image 2: GT texts 4, 5 -> best GT 0 beaten by text 0, ties with 1,2,3
])


def _fake_scorer(calls: list[int]):
    def scorer(images, boxes, mask, ids, attn):
        assert boxes is None and mask is None and ids.shape == attn.shape
        calls.append(ids.shape[0])
        return SCORE[images.view(-1).long(), ids[:, 0]]
    return scorer


def test_itm_all_exact_recalls_with_fake_scorer():
    calls: list[int] = []
    m = evaluate_retrieval_itm_all(_fake_scorer(calls), _fake_set(SCORE, hard=True), batch_size=4)
    # image->text ranks: 0, 1, 4 (text 0 > GT, texts 1,2,3 tie at 0 with GT: ties count against)
    assert m["itm_all/txt_r1"] == pytest.approx(100 / 3)
    assert m["itm_all/txt_r5"] == pytest.approx(100.0)
    # text->image: t0 img0 (5 vs 0, 9) -> rank 1; t1 img0 (0 vs 0,0) -> 2; t2 img1 (1 vs 1,0) -> 1;
    # t3 img1 (2 vs 0,0) -> 0; t4 img2 (0 vs 0,3) -> 2; t5 img2 (0 vs 0,0) -> 2
    assert m["itm_all/img_r1"] == pytest.approx(100 / 6)
    assert m["itm_all/img_r5"] == pytest.approx(100.0)
    assert m["itm_all/img_r_mean"] == pytest.approx((100 / 6 + 100 + 100) / 3)
    assert m["itm_all/hard_neg_acc"] == pytest.approx(50.0)
    assert m["itm_forwards"] == 3 * 6 + 2 * 2 and m["num_images"] == 3 and m["num_texts"] == 6
    assert max(calls) <= 4 and sum(calls) == 3 * 6 + 2 * 2  # batched, every pair scored once


def test_itm_all_without_hard_pairs_and_encode_cache():
    encoded: list[int] = []

    def encode(images, boxes, mask):
        encoded.append(images.shape[0])
        return (images.view(-1).long() * 10,)  # a per-image "feature": index * 10

    def scorer(feat, ids, attn):
        return SCORE[feat // 10, ids[:, 0]]

    m = evaluate_retrieval_itm_all(scorer, _fake_set(SCORE), batch_size=2, encode=encode)
    assert encoded == [2, 1]  # each image encoded once
    assert "itm_all/hard_neg_acc" not in m and m["itm_forwards"] == 18
    assert m["itm_all/txt_r1"] == pytest.approx(100 / 3)


# ------------------------------------------------------------------------------ real tiny CMAL
@pytest.fixture(scope="module")
def cmal(tok) -> Cmal:
    cfg = build_config({
        "model": {"size": "tiny", "init_std": 0.02,
                  "vision": {"image_size": 32, "patch_size": 8, "width": 32, "depth": 1, "heads": 2},
                  "text": {"width": 32, "depth": 0, "heads": 2, "max_len": 48},
                  "fusion": {"type": "single", "depth": 2, "heads": 2}},
        "method": {"name": "cmal"},
    })
    torch.manual_seed(0)
    model = VLModel(cfg.model, vocab_size=tok.vocab_size, pad_id=tok.pad_id)
    return Cmal.from_config(cfg, model, tok, class_words=WORLD_CLASS_WORDS).eval()


def test_retrieval_set_carries_regions(world, tok):
    split = world.split("test")
    rs = RetrievalSet.build(split, tok, max_len=40, num_images=4)
    n = max(len(split[i].objects) for i in range(4))
    assert rs.region_boxes.shape == (4, n, 4) and rs.region_labels.shape == rs.region_mask.shape == (4, n)
    for i in range(4):
        k = len(split[i].objects)
        assert rs.region_mask[i].sum() == k and not rs.region_mask[i, k:].any()
        assert rs.region_labels[i, :k].tolist() == [o.class_id + 1 for o in split[i].objects]
    bare = [SimpleNamespace(image=split[0].image, captions=split[0].captions)]
    assert RetrievalSet.build(bare, tok, max_len=40).region_boxes is None


@torch.no_grad()
def test_cmal_itm_scores_batch_invariant(world, tok, cmal):
    rs = RetrievalSet.build(world.split("test"), tok, max_len=40, num_images=3)
    img = torch.tensor([0, 1, 2, 0, 2])
    txt = torch.tensor([0, 7, 3, 14, 10])
    scores = cmal.itm_scores(rs.images[img], rs.region_boxes[img], rs.region_mask[img],
                             rs.input_ids[txt], rs.attention_mask[txt])
    assert scores.shape == (5,) and torch.isfinite(scores).all()
    for p in range(5):
        i, t = img[p:p + 1], txt[p:p + 1]
        length = int(rs.attention_mask[t].sum())  # alone, without the batch's padding
        alone = cmal.itm_scores(rs.images[i], rs.region_boxes[i], rs.region_mask[i],
                                rs.input_ids[t][:, :length], rs.attention_mask[t][:, :length])
        assert alone.item() == pytest.approx(scores[p].item(), abs=1e-5)
    # the cached path of the evaluation gives the same scores
    cached = cmal.itm_scores_from_regions(*(x[img] for x in cmal.encode_regions(
        rs.images, rs.region_boxes, rs.region_mask)), rs.input_ids[txt], rs.attention_mask[txt])
    torch.testing.assert_close(cached, scores, atol=1e-5, rtol=0)

    m = evaluate_retrieval_itm_all(cmal.itm_scores_from_regions, rs, batch_size=7, encode=cmal.encode_regions)
    direct = evaluate_retrieval_itm_all(cmal.itm_scores, rs, batch_size=4)
    assert m == pytest.approx(direct)
    assert m["itm_forwards"] >= 3 * 15 and 0.0 <= m["itm_all/img_r1"] <= 100.0


# ------------------------------------------------------------------------------ CLI
TINY = [
    "--set", "train.steps=2", "--set", "train.batch_size=8", "--set", "train.log_every=1",
    "--set", "train.warmup_steps=1", "--set", "train.progress=false", "--set", "train.tensorboard=false",
    "--set", "data.train_images=60", "--set", "data.budget=200", "--set", "data.num_workers=0",
    "--set", "eval.num_images=6", "--set", "model.vision.depth=1", "--set", "model.fusion.depth=1",
]


def test_pretrain_cmal_writes_itm_all_eval(tmp_path):
    out = tmp_path / "run"
    assert main(["pretrain", "--config", "cmal_tiny", "--out", str(out), *TINY]) == 0
    final = json.loads((out / "eval.json").read_text())
    assert 0.0 <= final["eval/itm_all/img_r1"] <= 100.0
    assert final["eval/num_images"] == 6 and final["eval/itm_forwards"] >= 6 * 30
    assert "eval/itc/img_r1" not in final
    # `vlp eval retrieval` on the CMAL checkpoint loads the whole method (region embedding, region layers,
    # heads), not just the VLModel: same weights, same test images -> the same numbers as at the end of training
    assert main(["eval", "retrieval", "--checkpoint", str(out), "--out", str(tmp_path / "eval")]) == 0
    again = json.loads((tmp_path / "eval" / "eval.json").read_text())
    for key in ("itm_all/img_r1", "itm_all/txt_r5", "itm_all/r_mean", "itm_all/hard_neg_acc"):
        assert again[key] == pytest.approx(final[f"eval/{key}"]), key


def test_albef_itm_all_matches_direct_all_pairs(world, tok):
    """`eval.itm_all` ranks a fusion model by `itm_score` of every pair: equal to scoring the full I x Tn
    matrix by hand and taking recalls of it."""
    from vlp.evaluate import evaluate_method
    from vlp.methods import build_method
    from vlp.tasks.retrieval import recall_at_k

    cfg = build_config({"model": "tiny", "method": {"name": "albef"}},
                       ["model.vision.depth=1", "model.text.depth=1", "model.fusion.depth=1",
                        f"model.vision.image_size={world.image_size}", "eval.itm_all=true", "eval.batch_size=7",
                        "eval.k_rerank=2"])
    torch.manual_seed(0)
    model = VLModel(cfg.model, vocab_size=tok.vocab_size, pad_id=tok.pad_id).eval()
    rset = RetrievalSet.build(world.split("test"), tok, 40, 5, max_words=40)
    metrics = evaluate_method(build_method(cfg, model, tok), rset, cfg, torch.device("cpu"))
    with torch.no_grad():
        tokens = model.encode_image(rset.images).tokens
        n_i, n_t = tokens.shape[0], rset.input_ids.shape[0]
        score = torch.stack([model.itm_score(tokens[i].expand(n_t, -1, -1), rset.input_ids, rset.attention_mask)
                             for i in range(n_i)])
    direct = recall_at_k(score, rset.txt2img, rset.img2txt)
    for key in ("img_r1", "txt_r1", "img_r5", "r_mean"):
        assert metrics[f"itm_all/{key}"] == pytest.approx(direct[key]), key
    assert metrics["itm_forwards"] >= n_i * n_t and "itc/img_r1" in metrics


def test_albef_itm_all_from_cached_text_states_equals_pair_scoring(world, tok):
    """ALBEF's "itm_all" through cached text states (`itm_all_from_text_states`) gives the metrics of scoring
    every pair with `itm_pair_scores` (which re-encodes the text per pair), hard negatives included."""
    from vlp.methods import build_method
    from vlp.tasks.retrieval import evaluate_method_retrieval

    cfg = build_config({"model": "tiny", "method": {"name": "albef"}},
                       ["model.vision.depth=1", "model.text.depth=1", "model.fusion.depth=1",
                        f"model.vision.image_size={world.image_size}"])
    torch.manual_seed(0)
    method = build_method(cfg, VLModel(cfg.model, vocab_size=tok.vocab_size, pad_id=tok.pad_id), tok).eval()
    rset = RetrievalSet.build(world.split("test"), tok, 40, 5, max_words=40)
    cached = evaluate_method_retrieval(method, rset, ("itm_all",), batch_size=9)
    with torch.no_grad():
        direct = evaluate_retrieval_itm_all(method.itm_pair_scores, rset, batch_size=9, encode=method.itm_pair_inputs)
    keys = [k for k in direct if k.startswith("itm_all/")]
    assert "itm_all/hard_neg_acc" in keys
    for key in keys:
        assert cached[key] == pytest.approx(direct[key], abs=1e-6), key
    assert cached["itm_forwards"] == direct["itm_forwards"]
