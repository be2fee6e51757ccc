"""The first retrieval stage of single-stream methods (vlp.models.first_stage, method.first_stage) and the
"itc_rerank" protocol: first-stage top-k re-ranked by ITM, linear in the set size."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import vlp

from test_method_contract import contract_config
from vlp.build import world_class_words
from vlp.config import build_config
from vlp.data.datasets import PairDataset, RetrievalSet, collate
from vlp.finetune import build_backbone
from vlp.methods import build_method
from vlp.models.first_stage import FirstStageHead, masked_mean
from vlp.models.model import VLModel
from vlp.tasks.retrieval import evaluate_method_retrieval, evaluate_retrieval_itm_all, recall_at_k
from vlp.train.loop import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def first_stage_config(name: str, first_stage: bool, **train):
    base = contract_config(name, **train).model_dump(mode="json")
    base["method"]["first_stage"] = first_stage
    base["method"]["first_stage_dim"] = 16
    return build_config(base, source=f"test:{name}")


def build(name: str, tok, first_stage: bool = True, seed: int = 0, **train):
    cfg = first_stage_config(name, first_stage, **train)
    torch.manual_seed(seed)
    model = VLModel(cfg.model, vocab_size=tok.vocab_size, pad_id=tok.pad_id)
    return cfg, build_method(cfg, model, tok, class_words=world_class_words())


def test_masked_mean_by_hand():
    x = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]], [[5.0, 6.0], [0.0, 0.0], [0.0, 0.0]]])
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    assert masked_mean(x, mask).tolist() == [[2.0, 3.0], [0.0, 0.0]]


def test_head_embeds_are_unit_norm_and_ignore_padding():
    torch.manual_seed(0)
    head = FirstStageHead(width=16, embed_dim=8, heads=2, max_len=12).eval()
    words, mask = torch.randn(3, 6, 16), torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 2 + [0] * 4])
    emb = head.text_embed(words, mask)
    assert emb.shape == (3, 8) and torch.allclose(emb.norm(dim=1), torch.ones(3), atol=1e-5)
    noisy = words.clone()
    noisy[mask == 0] = 1e3  # padding content must not matter
    assert torch.allclose(head.text_embed(noisy, mask), emb, atol=1e-5)
    regions, boxes = torch.randn(2, 5, 16), torch.rand(2, 5, 7)
    rmask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    assert head.image_embed(regions, boxes, rmask).shape == (2, 8)
    with pytest.raises(ValueError, match="positions"):
        head.text_embed(torch.randn(1, 13, 16), torch.ones(1, 13))


@pytest.mark.parametrize("name", ["cmal", "uniter"])
def test_protocols_follow_the_config(name, tok):
    assert build(name, tok, first_stage=False)[1].retrieval_protocols_for(itm_all=False) == ("itm_all",)
    assert build(name, tok, first_stage=False)[1].retrieval_protocols_for(itm_all=True) == ("itm_all",)
    _, method = build(name, tok)
    assert method.retrieval_protocols_for(itm_all=False) == ("itc_rerank",)
    assert method.retrieval_protocols_for(itm_all=True) == ("itm_all", "itc_rerank")
    assert method.separately_clipped() == ("first_stage.",)


def test_vlmixer_trains_a_first_stage_only_on_pairs(world, tok):
    """Unpaired pre-training cannot train a first stage (refused); paired retrieval fine-tuning (ITM weight > 0)
    trains it on its batches."""
    with pytest.raises(ValueError, match="unpaired"):
        build("vlmixer", tok)
    base = first_stage_config("vlmixer", True).model_dump(mode="json")
    base["method"]["loss_weights"] = {"itm": 1.0, "mlm": 0.0, "cmcl": 0.0, "tag": 0.0, "mrc": 0.0}
    cfg = build_config(base, source="test:vlmixer")
    torch.manual_seed(0)
    method = build_method(cfg, VLModel(cfg.model, vocab_size=tok.vocab_size, pad_id=tok.pad_id), tok,
                          class_words=world_class_words()).train()
    data = PairDataset(world.split("train"), tok, 40, max_words=40)
    batch = collate([data[i * 5] for i in range(8)])
    batch.sample_keys = torch.arange(8)
    out = method(batch)
    assert {"itm", "first_stage"} <= set(out)
    assert out["loss"].item() == pytest.approx((out["itm"] + out["first_stage"]).item(), rel=1e-5)
    assert method.retrieval_protocols_for(itm_all=False) == ("itc_rerank",)


def test_a_fine_tune_may_add_a_first_stage_to_a_checkpoint_without_one(world, tok, tmp_path):
    """`build_backbone`: the head's keys may be missing from the checkpoint (it starts fresh); any other
    missing key is still an error."""
    data = PairDataset(world.split("train"), tok, 40, max_words=40)
    tok.save(tmp_path / "tokenizer.json")
    cfg, method = build("uniter", tok, first_stage=False, steps=1)
    Trainer(cfg, method, data, collate, tmp_path / "pre", tokenizer_json=str(tmp_path / "tokenizer.json")).fit()
    ft = build_config(first_stage_config("uniter", True).model_dump(mode="json"),
                      [f"task.checkpoint={tmp_path / 'pre'}"])
    backbone, _ = build_backbone(ft)
    assert backbone.first_stage is not None


@pytest.mark.parametrize("name", ["cmal", "uniter"])
def test_forward_adds_a_first_stage_loss_whose_gradient_stays_in_the_head(name, world, tok):
    _, method = build(name, tok)
    data = PairDataset(world.split("train"), tok, 40, max_words=40)
    batch = collate([data[i * 5] for i in range(8)])
    batch.sample_keys = torch.arange(8)
    method.train()
    out = method(batch)
    assert {"first_stage", "first_stage_acc"} <= set(out)
    assert torch.isfinite(out["first_stage"]) and out["first_stage"].item() > 0
    method.zero_grad()
    head_only = method.first_stage_terms(batch, method.regions(batch))["first_stage"]
    head_only.backward()
    grads = {n: p.grad for n, p in method.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads and all(n.startswith("first_stage.") for n in grads)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["cmal", "uniter"])
def test_the_head_leaves_the_method_updates_unchanged(name, world, tok, tmp_path):
    """Same seed, with and without the head, clipping active: every method parameter ends bit-identical."""
    data = PairDataset(world.split("train"), tok, 40, max_words=40)
    weights = {}
    for on in (False, True):
        cfg, method = build(name, tok, first_stage=on, steps=4, grad_clip=0.05)
        Trainer(cfg, method, data, collate, tmp_path / str(on)).fit()
        weights[on] = load_file(str(tmp_path / str(on) / "checkpoint" / "model.safetensors"))
    head = {k for k in weights[True] if k.startswith("first_stage.")}
    assert head and not any(k.startswith("first_stage.") for k in weights[False])
    assert set(weights[True]) - head == set(weights[False])
    for key, value in weights[False].items():
        assert torch.equal(weights[True][key], value), key
    initial = build(name, tok, first_stage=False)[1].state_dict()
    assert any(not torch.equal(initial[k].float(), v.float()) for k, v in weights[False].items()
               if k.startswith("region_embed."))  # the method did train (so the equality above means something)


@pytest.mark.parametrize("name", ["cmal", "uniter"])
def test_rerank_with_k_covering_everything_equals_itm_all(name, world, tok):
    """k >= every count: each query's whole row is re-ranked by ITM, so the ranks are those of itm_all."""
    _, method = build(name, tok)
    rset = RetrievalSet.build(world.split("test"), tok, 40, 6, max_words=40)
    method.eval()
    full = evaluate_method_retrieval(method, rset, ("itm_all", "itc_rerank"), batch_size=7, k_rerank=1000)
    for key in ("txt_r1", "txt_r5", "img_r1", "img_r5", "r_mean", "hard_neg_acc"):
        assert full[f"itm/{key}"] == pytest.approx(full[f"itm_all/{key}"], abs=1e-9), key
    assert "itc/r_mean" in full and full["num_images"] == 6


def test_rerank_cost_is_linear(world, tok):
    _, method = build("cmal", tok)
    rset = RetrievalSet.build(world.split("test"), tok, 40, 8, max_words=40)
    n_img, n_txt, k = 8, int(rset.input_ids.shape[0]), 3
    hard = int(rset.hard_image.numel()) if getattr(rset, "hard_image", None) is not None else 0
    method.eval()
    m = evaluate_method_retrieval(method, rset, ("itc_rerank",), batch_size=16, k_rerank=k)
    assert k * max(n_img, n_txt) <= m["itm_forwards"] - 2 * hard <= (n_img + n_txt) * k
    with pytest.raises(ValueError, match="k_rerank"):
        evaluate_method_retrieval(method, rset, ("itc_rerank",), k_rerank=0)


def test_length_sorted_pair_scoring_returns_scores_in_input_order(world, tok):
    _, method = build("uniter", tok, first_stage=False)
    rset = RetrievalSet.build(world.split("test"), tok, 40, 3, max_words=40)
    method.eval()
    seen = []

    def scorer(region_vecs, boxes, mask, ids, attn):
        seen.append(int(attn.sum(dim=1).max()))
        return method.itm_scores_from_regions(region_vecs, boxes, mask, ids, attn)

    m = evaluate_retrieval_itm_all(scorer, rset, batch_size=4, encode=method.encode_regions)
    with torch.no_grad():
        regions = method.encode_regions(rset.images, rset.region_boxes, rset.region_mask)
        n_img, n_txt = 3, int(rset.input_ids.shape[0])
        img = torch.arange(n_img).repeat_interleave(n_txt)
        txt = torch.arange(n_txt).repeat(n_img)
        direct = method.itm_scores_from_regions(*(r[img] for r in regions), rset.input_ids[txt],
                                                rset.attention_mask[txt]).view(n_img, n_txt)
    reference = recall_at_k(direct, rset.txt2img, rset.img2txt)
    for key in ("txt_r1", "img_r1", "r_mean"):
        assert m[f"itm_all/{key}"] == pytest.approx(reference[key]), key
    assert seen == sorted(seen)  # chunks in order of text length


def test_a_loaded_run_embeds_with_its_first_stage(world, tok, tmp_path):
    """`vlp.load` on a single-stream run with a first stage: embeddings are the first stage's, unit norm, and
    by="itc" scores are their cosines; the default scoring stays ITM."""
    data = PairDataset(world.split("train"), tok, 40, max_words=40)
    cfg, method = build("uniter", tok, steps=1)
    tok.save(tmp_path / "tokenizer.json")
    Trainer(cfg, method, data, collate, tmp_path / "run", tokenizer_json=str(tmp_path / "tokenizer.json")).fit()
    model = vlp.load(tmp_path / "run")
    images = [Image.fromarray(np.asarray(world.split("test")[i].image)) for i in range(2)]
    texts = ["a red circle", "a blue square"]
    img, txt = model.embed_image(images), model.embed_text(texts)
    assert img.shape == (2, 16) and torch.allclose(img.norm(dim=1), torch.ones(2), atol=1e-5)
    assert torch.allclose(model.score_matrix(images, texts, by="itc"), img @ txt.T, atol=1e-5)
    assert model.scoring == "itm"
