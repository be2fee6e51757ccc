"""VLMixer (`vlp.methods.vlmixer`): the hand-computable checks of simla_vlmixer.md §4 (VLMixer part) —
concept matching, cross-modal CutMix (identity at ratio 0, every match at ratio 1, label-consistent and
uniform patch draws, specials never replaced), MLM targets only on remaining text, the view contrast's
values and symmetry, and that the visual projection learns only through CMC — plus the image-only tags and a
short run whose losses go down. The method-contract tests run on VLMixer by registration; the unpaired
streams are tested in test_unpaired."""

from __future__ import annotations

import math

import pytest
import torch

from test_method_contract import batch_of, build, contract_config
from vlp.build import world_class_words
from vlp.config import build_config
from vlp.data.datasets import PairDataset, collate
from vlp.methods import build_method
from vlp.methods.vlmixer import (compact_patches, cross_modal_cutmix, grounded_concepts, hard_view_loss,
                                 view_contrastive_loss, wrong_concept_patches)
from vlp.models.anchors import build_lexicon
from vlp.models.losses import IGNORE_INDEX, mask_tokens_at_least_one
from vlp.models.model import VLModel
from vlp.train.loop import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def _token(tok, token_id: int) -> str:
    return {v: k for k, v in tok.get_vocab().items()}[token_id]


def _class_of(word: str) -> int:
    return next(k for k, words in enumerate(world_class_words()) if word in words)


def test_grounded_concepts_match_plurals_and_synonyms_and_never_specials(tok):
    """§4.1: "two stars and a ball" grounds "stars" (plural) as star and "ball" (a synonym) as circle;
    [CLS], [SEP] and padding are never grounded."""
    table = build_lexicon(world_class_words(), tok)
    ids, mask = tok.encode(["two stars and a ball"], 12)
    concepts = grounded_concepts(ids, mask, table)[0]
    words = [_token(tok, int(i)) for i in ids[0]]
    named = {words[t]: int(c) for t, c in enumerate(concepts) if c >= 0}
    assert named == {"stars": _class_of("star"), "ball": _class_of("ball")}
    assert concepts[0] == -1 and (concepts[~mask[0].bool()] == -1).all()


def _gallery(labels: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(labels), torch.ones(len(labels), dtype=torch.bool)


def test_cutmix_ratio_zero_is_the_identity_and_ratio_one_replaces_every_match():
    concepts = torch.tensor([[-1, 2, -1, 0, 5, -1]])  # [CLS] w(c2) w w(c0) w(c5: no patch) [SEP]
    labels, real = _gallery([3, 1, 3, 0])  # patches of concepts 2, 0, 2 (label = concept + 1) and a background
    u = torch.rand(1, 6, 2, generator=torch.Generator().manual_seed(0))
    replaced, patch = cross_modal_cutmix(concepts, labels, real, u, ratio=0.0)
    assert not replaced.any() and (patch == -1).all()
    replaced, patch = cross_modal_cutmix(concepts, labels, real, u, ratio=1.0)
    assert replaced[0].tolist() == [False, True, False, True, False, False]  # concept 5 has no patch: stays a word
    assert labels[patch[replaced]].tolist() == [3, 1]  # each patch names the word's concept
    padded = real.clone()
    padded[1] = False  # the only concept-0 patch is padding: never drawn
    replaced, _ = cross_modal_cutmix(concepts, labels, padded, u, ratio=1.0)
    assert replaced[0].tolist() == [False, True, False, False, False, False]


def test_cutmix_draws_patches_of_the_concept_uniformly():
    """§4.3: over many draws the patch's label is the word's and the 3 candidate patches are equally likely
    (chi-square, 2 degrees of freedom, p > 0.01 <=> statistic < 9.21)."""
    draws = 3000
    concepts = torch.full((draws, 1), 4)
    labels, real = _gallery([5, 2, 5, 7, 5, 1])  # concept 4 = label 5 at gallery slots 0, 2, 4
    u = torch.rand(draws, 1, 2, generator=torch.Generator().manual_seed(1))
    replaced, patch = cross_modal_cutmix(concepts, labels, real, u, ratio=1.0)
    assert replaced.all() and (labels[patch] == 5).all()
    counts = torch.bincount(patch.flatten(), minlength=6)[[0, 2, 4]].float()
    expected = draws / 3
    assert float(((counts - expected) ** 2 / expected).sum()) < 9.21


def test_cutmix_rate_follows_the_ratio_within_binomial_bounds():
    n = 4000
    concepts = torch.zeros(1, n, dtype=torch.long)
    labels, real = _gallery([1])
    replaced, _ = cross_modal_cutmix(concepts, labels, real, torch.rand(1, n, 2, generator=torch.Generator().manual_seed(2)),
                                     ratio=0.3)
    sd = math.sqrt(n * 0.3 * 0.7)
    assert abs(int(replaced.sum()) - 0.3 * n) < 4 * sd


def test_view_contrastive_loss_values_and_symmetry():
    """§4.5: q = k = I, tau = 1 -> log(1 + e^-1) = 0.3133; k's rows swapped at tau 0.01 -> ~100; symmetric."""
    eye = torch.eye(2)
    assert float(view_contrastive_loss(eye, eye, 1.0)) == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-4)
    assert float(view_contrastive_loss(eye, eye.flip(0), 0.01)) == pytest.approx(100.0, abs=0.01)
    q = torch.nn.functional.normalize(torch.randn(5, 8, generator=torch.Generator().manual_seed(3)), dim=1)
    k = torch.nn.functional.normalize(torch.randn(5, 8, generator=torch.Generator().manual_seed(4)), dim=1)
    assert float(view_contrastive_loss(q, k, 0.1)) == pytest.approx(float(view_contrastive_loss(k, q, 0.1)), abs=1e-6)


def _method(tok, *overrides: str):
    cfg = build_config(contract_config("vlmixer").model_dump(mode="json"), list(overrides))
    torch.manual_seed(0)
    return build_method(cfg, VLModel(cfg.model, tok.vocab_size, tok.pad_id), tok, world_class_words())


def test_mlm_targets_only_remaining_text_and_replaced_slots_carry_patches(world, tok, monkeypatch):
    """§4.4: with every token masked (p = 1) the MLM labels are -100 at every replaced slot (and at
    specials); the replaced slots hold the patch vectors, not [MASK]."""
    method = _method(tok, "method.cmc_ratio=1.0", "method.mlm_prob=1.0").train()
    batch = batch_of(world, tok, rows=8)
    seen = {}
    original = method.encode_text_slots

    def spy(slots, attn, visual=None):
        seen.setdefault("calls", []).append((slots, visual))
        return original(slots, attn, visual)

    monkeypatch.setattr(method, "encode_text_slots", spy)
    masker = mask_tokens_at_least_one
    captured = {}

    def capture(ids, eligible, *args, **kwargs):
        out = masker(ids, eligible, *args, **kwargs)
        captured.setdefault("eligible", []).append(eligible)
        captured.setdefault("labels", []).append(out[1])
        return out

    monkeypatch.setattr("vlp.methods.vlmixer.mask_tokens_at_least_one", capture)
    out = method(batch)
    regions = method.regions(batch)
    replaced = method.mixed_view(batch, regions).replaced
    assert replaced.any(), "the batch's captions should name objects in its images"
    labels = captured["labels"][0]  # the mixed-view MLM call comes first
    assert (labels[replaced] == IGNORE_INDEX).all()
    assert (labels[~replaced & batch.attention_mask.bool()] != IGNORE_INDEX).sum() > 0
    mlm_slots, visual = seen["calls"][-1]
    assert torch.equal(visual, replaced)
    mixed = method.mixed_view(batch, regions).slots
    assert torch.allclose(mlm_slots[replaced], mixed[replaced])
    assert float(out["cmc_tokens"]) == pytest.approx(float(replaced.sum(1).float().mean()))


def test_visual_projection_learns_through_cmc_only(world, tok):
    """§4.6: without the image-only objective, ratio 0 leaves the region projection W_f without gradient;
    ratio > 0 gives it one (the patches enter the mixed view)."""
    batch = batch_of(world, tok, rows=8)
    for ratio, expect in ((0.0, False), (1.0, True)):
        method = _method(tok, f"method.cmc_ratio={ratio}", "method.image_objective=none").train()
        method(batch)["loss"].backward()
        grad = method.region_embed.feat_proj.weight.grad
        assert (grad is not None and grad.abs().sum() > 0) == expect, ratio


def test_image_stream_tags_are_the_concept_words_of_the_regions(world, tok):
    """The image-only pass reads [CLS] tags [SEP]: tag i is the word of region i's concept (sorted first whole
    word of the class's synonyms), padding where a region has no concept."""
    method = _method(tok)
    batch = batch_of(world, tok, rows=4)
    regions = method.regions(batch)
    words = world_class_words()
    for label in regions.labels[regions.mask.bool()].unique().tolist():
        if label == 0:
            continue
        expected = sorted(w for w in words[label - 1] if tok.is_whole_word(w))[0]
        assert _token(tok, int(method.tag_tokens[label])) == expected
    assert int(method.tag_tokens[0]) == tok.pad_id


def test_compact_patches_moves_replaced_slots_to_region_slots_in_order():
    """The `regions` layout's region slots: row 0 has patches at positions 1 and 3 (in that order), row 1 none
    (one padding slot), R = 2."""
    replaced = torch.tensor([[False, True, False, True, False], [False] * 5])
    patches = torch.arange(2 * 5 * 2, dtype=torch.float).reshape(2, 5, 2)
    boxes = -torch.arange(2 * 5 * 7, dtype=torch.float).reshape(2, 5, 7)
    vecs, bxs, mask = compact_patches(replaced, patches, boxes)
    assert mask.tolist() == [[True, True], [False, False]]
    assert torch.equal(vecs[0], patches[0, [1, 3]]) and torch.equal(bxs[0], boxes[0, [1, 3]])
    assert (vecs[1] == 0).all() and (bxs[1] == 0).all()
    _, _, mask = compact_patches(torch.zeros(3, 4, dtype=torch.bool), torch.ones(3, 4, 2), torch.ones(3, 4, 7))
    assert mask.shape == (3, 1) and not mask.any()  # ratio 0: one empty slot, no patch


def test_regions_layout_puts_patches_in_region_slots_and_holes_are_not_targets(world, tok, monkeypatch):
    """`cmc_layout: regions`: the MLM pass reads [MASK] at every replaced word (label -100) and one region
    slot per replaced word holding that word's patch vector, with the patch's box; the region projection gets
    a gradient through CMC alone (no image-only objective)."""
    method = _method(tok, "method.cmc_ratio=1.0", "method.mlm_prob=1.0", "method.cmc_layout=regions",
                     "method.image_objective=none").train()
    batch = batch_of(world, tok, rows=8)
    calls = []
    original = method.encode_joint_pair

    def spy(word_vecs, region_vecs, boxes, attn, region_mask):
        calls.append((word_vecs, region_vecs, boxes, region_mask))
        return original(word_vecs, region_vecs, boxes, attn, region_mask)

    monkeypatch.setattr(method, "encode_joint_pair", spy)
    masker = mask_tokens_at_least_one
    captured = {}

    def capture(ids, eligible, *args, **kwargs):
        out = masker(ids, eligible, *args, **kwargs)
        captured.setdefault("labels", []).append(out[1])
        return out

    monkeypatch.setattr("vlp.methods.vlmixer.mask_tokens_at_least_one", capture)
    out = method(batch)
    out["loss"].backward()
    view = method.mixed_view(batch, method.regions(batch))
    replaced = view.replaced
    assert replaced.any()
    assert (captured["labels"][0][replaced] == IGNORE_INDEX).all()
    assert len(calls) == 2  # CMCL's mixed view, then MLM's
    word_vecs, region_vecs, boxes, region_mask = calls[-1]
    mask_vec = method.word_vectors(torch.full_like(batch.input_ids, tok.mask_id), batch.attention_mask)
    assert torch.allclose(word_vecs[replaced], mask_vec[replaced])
    assert torch.equal(region_mask.sum(1), replaced.sum(1))
    row = int(replaced.sum(1).argmax())
    n = int(replaced[row].sum())
    assert torch.allclose(region_vecs[row, :n], view.patches[row][replaced[row]])
    assert torch.equal(boxes[row, :n], view.patch_boxes[row][replaced[row]])
    grad = method.region_embed.feat_proj.weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_hole_targets_make_replaced_words_mlm_targets_in_the_regions_layout(world, tok, monkeypatch):
    """`cmc_hole_targets`: the MLM labels at replaced slots are the replaced words (elsewhere as without it);
    the option is refused with the inline layout."""
    with pytest.raises(ValueError, match="cmc_layout=regions"):
        _method(tok, "method.cmc_hole_targets=true")
    batch = batch_of(world, tok, rows=8)
    seen = {}
    for holes in (False, True):
        method = _method(tok, "method.cmc_ratio=1.0", "method.cmc_layout=regions",
                         f"method.cmc_hole_targets={str(holes).lower()}").train()
        calls = []
        original = method.model.mlm_logits
        monkeypatch.setattr(method.model, "mlm_logits", lambda h, calls=calls, original=original:
                            calls.append(h.shape[0]) or original(h))
        method(batch)
        seen[holes] = (calls[0], method.mixed_view(batch, method.regions(batch)).replaced)
    (plain, replaced), (with_holes, _) = seen[False], seen[True]
    assert replaced.any()
    assert with_holes == plain + int(replaced.sum())  # the same remaining-text targets plus every hole


def test_wrong_concept_patches_never_draw_the_words_concept():
    """Each replaced slot gets a real, labelled patch of another concept; unreplaced slots and a gallery with
    only the word's concept give -1."""
    concepts = torch.tensor([[-1, 2, 0, 2]])
    replaced = torch.tensor([[False, True, True, False]])
    labels, real = _gallery([3, 1, 0, 3, 5])  # concepts 2, 0, background, 2, 4
    draws = torch.rand(500, 1, 4, generator=torch.Generator().manual_seed(3))
    for u in draws:
        wrong = wrong_concept_patches(concepts, replaced, labels, real, u)
        assert wrong[0, 0] == -1 and wrong[0, 3] == -1
        assert int(wrong[0, 1]) in (1, 4) and int(wrong[0, 2]) in (0, 3, 4)  # never its own label, never label 0
    only_own = wrong_concept_patches(torch.tensor([[2]]), torch.tensor([[True]]), *_gallery([3, 3]), torch.zeros(1, 1))
    assert only_own.item() == -1


def test_hard_view_loss_values():
    """-log(e^{q.k/t} / (e^{q.k/t} + e^{q.k~/t})) averaged over usable rows, by hand; accuracy counts q.k > q.k~."""
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    k = torch.tensor([[0.6, 0.8], [0.0, 1.0], [1.0, 0.0]])
    hard = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    usable = torch.tensor([True, True, False])
    loss, acc = hard_view_loss(q, k, hard, usable, 0.5)
    row0 = -math.log(math.exp(0.6 / 0.5) / (math.exp(0.6 / 0.5) + math.exp(1.0 / 0.5)))
    row1 = -math.log(math.exp(1.0 / 0.5) / (math.exp(1.0 / 0.5) + math.exp(0.0)))
    assert float(loss) == pytest.approx((row0 + row1) / 2, rel=1e-6)
    assert float(acc) == pytest.approx(0.5)
    none_usable = hard_view_loss(q, k, hard, torch.zeros(3, dtype=torch.bool), 0.5)[0]
    assert float(none_usable) == 0.0


@pytest.mark.parametrize("layout", ["inline", "regions"])
def test_hard_negative_view_swaps_only_the_patches_for_other_concepts(world, tok, layout):
    """The hard view keeps every word and every replaced slot, and each of its patches is the region vector of
    a gallery region of another concept; the term trains (a gradient reaches the region projection)."""
    method = _method(tok, "method.cmc_ratio=1.0", f"method.cmc_layout={layout}", "method.loss_weights.cmcl_hard=1",
                     "method.image_objective=none", "method.loss_weights.mlm=0", "method.loss_weights.cmcl=0").train()
    batch = batch_of(world, tok, rows=8)
    regions = method.regions(batch)
    view = method.mixed_view(batch, regions)
    hard, usable = method.hard_negative_view(batch, view)
    assert usable.any() and torch.equal(hard.replaced, view.replaced & usable[:, None])
    assert torch.equal(hard.words, view.words)
    gallery = method.region_vectors(regions).flatten(0, 1)
    labels = regions.labels.flatten()
    for b, t in hard.replaced.nonzero().tolist():
        match = (gallery - hard.patches[b, t]).abs().amax(-1) < 1e-6
        assert match.any() and (labels[match] != view.concepts[b, t] + 1).all()
    for v in (view, hard):  # patch_index: the gallery region whose vector and box each replaced slot holds
        assert torch.equal(v.patch_index >= 0, v.replaced)
        k = v.patch_index[v.replaced]
        assert torch.allclose(v.patches[v.replaced], gallery[k], atol=1e-6)
        assert torch.equal(v.patch_boxes[v.replaced], regions.boxes.flatten(0, 1)[k])
        assert torch.equal(v.slots, torch.where(v.replaced[..., None], v.patches, v.words))
    assert (labels[view.patch_index[view.replaced]] == view.concepts[view.replaced] + 1).all()
    out = method(batch)
    assert "cmcl_hard" in out and "cmcl" not in out and 0.0 <= float(out["cmcl_hard_acc"]) <= 1.0
    out["loss"].backward()
    grad = method.region_embed.feat_proj.weight.grad
    assert grad is not None and grad.abs().sum() > 0


@pytest.mark.slow
def test_losses_go_down_on_unpaired_batches(world, tok, tmp_path):
    """40 steps on the contract-size model: MLM on the mixed view, the view contrast and the image-only
    objectives fall (means of the first and last 5 steps)."""
    cfg, method = build("vlmixer", tok, steps=40, lr=2e-3, warmup_steps=5)
    data = PairDataset(world.split("train"), tok, 40, max_words=40)
    tok.save(tmp_path / "tok.json")
    records = Trainer(cfg, method, data, collate, tmp_path, tokenizer_json=tmp_path / "tok.json").fit()
    train = [r for r in records if "cmcl" in r]
    for part in ("mlm", "cmcl", "tag", "mrc"):
        first = sum(r[part] for r in train[:5]) / 5
        last = sum(r[part] for r in train[-5:]) / 5
        assert last < first, (part, first, last)
