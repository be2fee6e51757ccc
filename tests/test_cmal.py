"""CMAL: lexicon + anchors (vlp.models.anchors), masking / swap / losses / method (vlp.methods.cmal).

References are computed by hand in the tests (closed forms with `math`, explicit LayerNorm formulas,
counts with binomial bounds), following cmal.md §11.6.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from vlp.config import ConfigError, build_config, load_config
from vlp.data.datasets import PairDataset, collate
from vlp.data.lexicon import CLASSES, class_words
from vlp.data.tokenizer import TextTokenizer
from vlp.methods import build_method
from vlp.methods.cmal import (
    Cmal,
    RegionInputs,
    amc_loss,
    anchor_mask,
    swap_fill,
    wrc_loss,
)
from vlp.models.anchors import (
    LexiconTable,
    anchor_rate,
    boxes_to_7d,
    build_lexicon,
    detect_anchors,
    sample_partner,
    sample_uniform_index,
)
from vlp.models.losses import IGNORE_INDEX
from vlp.models.model import VLModel
from vlp.models.rng import keyed_uniform
from vlp.types import Batch

WORLD_CLASS_WORDS = [class_words(k) for k in range(len(CLASSES))]
CIRCLE, STAR, CAR = 0, 3, 15  # world class ids


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def table(tok) -> LexiconTable:
    return build_lexicon(WORLD_CLASS_WORDS, tok)


@pytest.fixture(scope="module")
def batch(world, tok):
    dataset = PairDataset(world.split("train"), tok, 40)
    return collate([dataset[i] for i in range(0, 96, 3)][:16])  # 16 rows, 2-4 captions per image


def model_cfg(text_depth: int = 0, fusion_depth: int = 2) -> dict:
    return {
        "size": "tiny",
        "init_std": 0.02,
        "vision": {"image_size": 32, "patch_size": 8, "width": 32, "depth": 1, "heads": 2},
        "text": {"width": 32, "depth": text_depth, "heads": 2, "max_len": 48},
        "fusion": {"type": "single", "depth": fusion_depth, "heads": 2},
    }


def make_cmal(tok, seed: int = 0, text_depth: int = 0, **method) -> Cmal:
    cfg = build_config({"model": model_cfg(text_depth), "method": {"name": "cmal", **method}})
    torch.manual_seed(seed)
    model = VLModel(cfg.model, vocab_size=tok.vocab_size, pad_id=tok.pad_id)
    return Cmal.from_config(cfg, model, tok, class_words=WORLD_CLASS_WORDS)


# ================================================================================ lexicon / anchors
def test_lexicon_world_plural_anchors(tok, table):
    """cmal.md §11.6.1 with the world's classes: 'two circles and a star' vs regions {circle, star, car}."""
    ids, attn = tok.encode(["two circles and a star"], 16)
    labels = torch.tensor([[CIRCLE + 1, STAR + 1, CAR + 1]])
    pairs = detect_anchors(ids, labels, table, attn)
    words = [tok.backend.id_to_token(i) for i in ids[0].tolist()]
    assert words == ["[CLS]", "two", "circles", "and", "a", "star", "[SEP]"]
    assert pairs.nonzero().tolist() == [[0, 2, 0], [0, 5, 1]]  # circles->circle region, star->star region
    assert not pairs[..., 2].any()  # car unmatched
    assert table.unmapped == ()
    assert {"circle", "circles", "disc", "discs", "ball", "balls"} <= set(table.words[CIRCLE])
    assert tok.word_id("circles") in table.token_ids(CIRCLE)


def _toy_tokenizer(words: list[str]) -> TextTokenizer:
    return TextTokenizer.from_vocab(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words])


def test_lexicon_morphology_rules():
    """§3.2 rules s, s+s, s+es, s-s, s-es on the ORIGINAL words only; multi-word names split; synonyms;
    only whole tokens survive; classes with no token are reported."""
    vocab = ["dog", "dogs", "frisbee", "bus", "buses", "bu", "glass", "glasses", "alarm", "clock", "clocks",
             "hound", "zebras"]
    tok = _toy_tokenizer(vocab)
    table = build_lexicon([["dog"], ["buses"], ["alarm clock"], ["glass"], ["zebu"]], tok, synonyms={0: ["hound"]})
    got = [set(w) for w in table.words]
    assert got == [{"dog", "dogs", "hound"}, {"bus", "buses"}, {"alarm", "clock", "clocks"},
                   {"glass", "glasses"}, set()]
    assert table.unmapped == (4,)
    assert table.class_token.shape == (5, tok.vocab_size) and table.class_token.dtype == torch.bool
    assert table.token_ids(1) == sorted([tok.word_id("bus"), tok.word_id("buses")])
    plain = build_lexicon([["dog"]], tok, morphology=False)
    assert set(plain.words[0]) == {"dog"}


def test_lexicon_bad_ids_raise():
    with pytest.raises(ValueError, match="outside the vocabulary"):
        LexiconTable.from_ids([[1, 2], [60]], vocab_size=50)
    broken = SimpleNamespace(vocab_size=10, is_whole_word=lambda w: True, word_id=lambda w: 10**6)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        build_lexicon([["dog"]], broken)
    with pytest.raises(ValueError, match="class ids"):
        build_lexicon([["dog"]], _toy_tokenizer(["dog"]), synonyms={3: ["hound"]})


def test_detect_anchors_bad_inputs_raise():
    table = LexiconTable.from_ids([[5], [6, 7]], vocab_size=10)
    ids = torch.tensor([[2, 5, 6, 3]])
    with pytest.raises(ValueError, match=r"class id \+ 1 in \[0, 2\]"):
        detect_anchors(ids, torch.tensor([[1, 3]]), table)
    with pytest.raises(ValueError, match="class id"):
        detect_anchors(ids, torch.tensor([[-1, 1]]), table)
    with pytest.raises(ValueError, match="vocabulary of 10"):
        detect_anchors(torch.tensor([[2, 12]]), torch.tensor([[1]]), table)
    with pytest.raises(ValueError, match="integer"):
        detect_anchors(ids, torch.tensor([[1.0]]), table)


def test_detect_anchors_every_occurrence_and_masks():
    """Every occurrence anchors every region of its class; padding, label 0 and masked regions never do."""
    table = LexiconTable.from_ids([[5], [6, 7]], vocab_size=10)
    ids = torch.tensor([[2, 5, 8, 5, 7, 3, 0, 5]])  # the last 5 is padding
    attn = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0]])
    labels = torch.tensor([[1, 2, 1, 0, 1]])  # regions: class0, class1, class0, background, class0 (masked)
    rmask = torch.tensor([[True, True, True, True, False]])
    pairs = detect_anchors(ids, labels, table, attn, rmask)
    expected = torch.zeros(1, 8, 5, dtype=torch.bool)
    for t in (1, 3):
        expected[0, t, 0] = expected[0, t, 2] = True
    expected[0, 4, 1] = True
    assert torch.equal(pairs, expected)
    share, mean = anchor_rate(torch.cat([pairs, torch.zeros_like(pairs)]))
    assert share.item() == 0.5 and mean.item() == 1.5  # 3 anchor tokens in caption 0, none in caption 1


def test_sample_partner_is_uniform_and_valid():
    pairs = torch.zeros(1, 3, 5, dtype=torch.bool)
    pairs[0, 0, [1, 2, 4]] = True
    pairs[0, 2, 3] = True
    grid = (torch.arange(300, dtype=torch.float64) + 0.5) / 300  # 300 evenly spaced uniforms
    partners = sample_partner(pairs.expand(300, -1, -1), grid[:, None].expand(300, 3).float())
    assert torch.bincount(partners[:, 0], minlength=5).tolist() == [0, 100, 100, 0, 100]
    assert (partners[:, 1] == -1).all() and (partners[:, 2] == 3).all()
    # keyed draws: always a matching region
    keyed = sample_partner(pairs.expand(500, -1, -1), keyed_uniform(torch.arange(500), (3,), 7))
    assert pairs[0, 0, keyed[:, 0]].all()
    assert sample_uniform_index(torch.zeros(2, 0, dtype=torch.bool), torch.zeros(2)).tolist() == [-1, -1]


def test_boxes_to_7d():
    out = boxes_to_7d(torch.tensor([[[0.1, 0.2, 0.5, 0.6]]]))
    assert torch.allclose(out, torch.tensor([[[0.1, 0.2, 0.5, 0.6, 0.4, 0.4, 0.16]]]))


# ================================================================================ masking
SPECIAL = (0, 1, 2, 3, 4)  # PAD UNK CLS SEP MASK
MASK_ID, V = 4, 50


def _synthetic(B: int, T: int = 16, N: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(8, T + 1, (B,), generator=g)
    attn = (torch.arange(T)[None] < lengths[:, None]).long()
    ids = torch.randint(5, V, (B, T), generator=g)
    ids[:, 0] = 2
    ids[torch.arange(B), lengths - 1] = 3
    ids = ids * attn
    n_regions = torch.randint(3, N + 1, (B,), generator=g)
    rmask = torch.arange(N)[None] < n_regions[:, None]
    labels = torch.randint(1, 10, (B, N), generator=g) * rmask
    partner = torch.full((B, T), -1)
    partner[:, 1], partner[:, 3] = 0, 2  # two anchors per caption, regions 0 and 2 (always real)
    return ids, attn, partner, labels, rmask


def _uniforms(B: int, T: int, N: int):
    keys = torch.arange(B)
    return (keyed_uniform(keys, (T, 3), 1), keyed_uniform(keys, (N,), 2), keyed_uniform(keys, (1,), 3)[:, 0])


def test_anchor_mask_labels_and_rates():
    """Anchors 100 % [MASK] with their id as label; others 15 % (80 % [MASK]); partners swapped; 25 % of
    the other labelled regions masked — rates within 5 sigma of the binomial."""
    B, T, N = 3000, 16, 6
    ids, attn, partner, labels, rmask = _synthetic(B, T, N)
    tu, ru, fu = _uniforms(B, T, N)
    out = anchor_mask(ids, attn, partner, labels, rmask, special_ids=SPECIAL, mask_id=MASK_ID, vocab_size=V,
                      text_uniforms=tu, region_uniforms=ru, fallback_uniforms=fu)
    anchor = partner >= 0
    assert (out.masked_ids[anchor] == MASK_ID).all() and torch.equal(out.txt_labels[anchor], ids[anchor])
    special = torch.isin(ids, torch.tensor(SPECIAL)) | ~attn.bool()
    assert (out.txt_labels[special] == IGNORE_INDEX).all() and torch.equal(out.masked_ids[special], ids[special])
    eligible = ~special & ~anchor
    selected = (out.txt_labels != IGNORE_INDEX) & eligible
    n = int(eligible.sum())
    rate = selected.sum().item() / n
    assert abs(rate - 0.15) < 5 * math.sqrt(0.15 * 0.85 / n), rate
    m = int(selected.sum())
    mask_share = (out.masked_ids[selected] == MASK_ID).float().mean().item()
    assert abs(mask_share - 0.8) < 5 * math.sqrt(0.8 * 0.2 / m), mask_share
    assert torch.equal(out.txt_labels[selected], ids[selected])
    assert not torch.isin(out.masked_ids[selected & (out.masked_ids != ids)], torch.tensor([0, 1, 2, 3])).any()
    untouched = eligible & ~selected
    assert torch.equal(out.masked_ids[untouched], ids[untouched])

    swapped = torch.zeros(B, N, dtype=torch.bool)
    swapped[:, [0, 2]] = True
    assert torch.equal(out.region_swapped, swapped)
    assert not (out.region_masked & out.region_swapped).any()
    assert not (out.region_masked & ~rmask).any()
    candidates = rmask & (labels > 0) & ~swapped
    k = int(candidates.sum())
    region_rate = out.region_masked.sum().item() / k
    assert abs(region_rate - 0.25) < 5 * math.sqrt(0.25 * 0.75 / k), region_rate
    targeted = out.region_swapped | out.region_masked
    assert torch.equal(out.region_targets[targeted], labels[targeted])
    assert (out.region_targets[~targeted] == IGNORE_INDEX).all()


def test_anchor_mask_forces_one_target_each_side():
    """UNITER/CMAL: no text target -> first real token masked; no region target -> one labelled region."""
    ids = torch.tensor([[2, 7, 8, 3, 0]])
    attn = torch.tensor([[1, 1, 1, 1, 0]])
    labels = torch.tensor([[3, 0, 5, 6, 0]])
    rmask = torch.tensor([[True, True, True, True, False]])
    out = anchor_mask(ids, attn, torch.full((1, 5), -1), labels, rmask, special_ids=SPECIAL, mask_id=MASK_ID,
                      vocab_size=V, text_uniforms=torch.full((1, 5, 3), 0.99), region_uniforms=torch.full((1, 5), 0.99),
                      fallback_uniforms=torch.tensor([0.5]))
    assert out.txt_labels.tolist() == [[-100, 7, -100, -100, -100]]
    assert out.masked_ids.tolist() == [[2, MASK_ID, 8, 3, 0]]
    # labelled real candidates are regions 0, 2, 3; u = 0.5 picks the 2nd of 3 -> region 2
    assert out.region_masked.tolist() == [[False, False, True, False, False]]
    assert out.region_targets.tolist() == [[-100, -100, 5, -100, -100]]
    off = anchor_mask(ids, attn, torch.full((1, 5), -1), labels, rmask, special_ids=SPECIAL, mask_id=MASK_ID,
                      vocab_size=V, text_uniforms=torch.full((1, 5, 3), 0.99),
                      region_uniforms=torch.full((1, 5), 0.99), ensure_targets=False)
    assert (off.txt_labels == IGNORE_INDEX).all() and not off.region_masked.any()


# ================================================================================ swap
def test_swap_fill_is_exact():
    g = torch.Generator().manual_seed(0)
    B, T, N, d = 2, 6, 4, 8
    word = torch.randn(B, T, d, generator=g)
    source = torch.randn(B, T, d, generator=g)
    region = torch.randn(B, N, d, generator=g)
    partner = torch.tensor([[-1, 2, -1, 0, 2, -1], [1, -1, -1, -1, -1, -1]])
    masked = torch.tensor([[False, True, False, True], [False, True, False, False]])  # (1, 1) also swapped
    hw, hr = swap_fill(word, region, partner, masked)
    for b, t in [(0, 1), (0, 3), (0, 4), (1, 0)]:
        assert torch.equal(hw[b, t], region[b, partner[b, t]])
    for b, t in [(0, 0), (0, 2), (0, 5), (1, 1), (1, 5)]:
        assert torch.equal(hw[b, t], word[b, t])
    assert torch.equal(hr[0, 2], word[0, 4])  # tokens 1 and 4 point to region 2: the LAST one wins
    assert torch.equal(hr[0, 0], word[0, 3])
    assert torch.equal(hr[1, 1], word[1, 0])  # swapped wins over masked
    assert (hr[0, 1] == 0).all() and (hr[0, 3] == 0).all()  # masked -> 0
    assert torch.equal(hr[1, 0], region[1, 0]) and torch.equal(hr[1, 2], region[1, 2])
    hw2, hr2 = swap_fill(word, region, partner, masked, word_source=source)
    assert torch.equal(hw2, hw) and torch.equal(hr2[0, 2], source[0, 4])


@pytest.mark.parametrize("umse_norm", ["sphere", "none"])
def test_slots_keep_their_own_position_and_box(tok, batch, monkeypatch, umse_norm):
    """End to end (k = 0): the encoder input at a text anchor is LN(n(e^v_π(t)) + P[t] + S0) and at its
    region LN(n(E[w_t]) + LN_p(W_p b_i) + S1), by hand; n = x sqrt(d)/||x|| ('sphere') or identity ('none',
    the code's scale mismatch, quirk 4)."""
    method = make_cmal(tok, umse_norm=umse_norm).eval()
    joints = []
    encode = method.model.fusion.encode_joint

    def spy(x, mask=None):
        joints.append(x)
        return encode(x, mask)

    monkeypatch.setattr(method.model.fusion, "encode_joint", spy)
    with torch.no_grad():
        regions = method.regions(batch)
        pairs = method.anchors(batch, regions)
        method.amc(batch, regions, pairs)
        partner, masking = method.mask(batch, regions, pairs)
        joint = joints[0]
        T = batch.input_ids.shape[1]
        text, re = method.model.text, method.region_embed

        def ln(x, norm):
            mu = x.mean(-1, keepdim=True)
            var = ((x - mu) ** 2).mean(-1, keepdim=True)
            return (x - mu) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias

        def sphere(x):
            return x / x.norm(dim=-1, keepdim=True) * math.sqrt(x.shape[-1]) if umse_norm == "sphere" else x

        e_v = sphere(ln(regions.feats @ re.feat_proj.weight.T + re.feat_proj.bias, re.feat_norm))
        box = ln(regions.boxes @ re.box_proj.weight.T + re.box_proj.bias, re.box_norm)
        s0, s1 = text.token_type_embeddings.weight[0], text.token_type_embeddings.weight[1]
        checked = 0
        for b, t in partner.ge(0).nonzero().tolist():
            i = int(partner[b, t])
            want = ln(e_v[b, i] + text.position_embeddings.weight[t] + s0, text.embed_norm)
            assert torch.allclose(joint[b, t], want, atol=1e-5)
            last = int((partner[b] == i).nonzero().max())
            word = sphere(text.word_embeddings.weight[batch.input_ids[b, last]])
            assert torch.allclose(joint[b, T + i], ln(word + box[b, i] + s1, re.out_norm), atol=1e-5)
            checked += 1
        for b, i in masking.region_masked.nonzero().tolist():  # zero content, own box
            assert torch.allclose(joint[b, T + i], ln(box[b, i] + s1, re.out_norm), atol=1e-5)
        assert checked > 10


def test_unimodal_layers_do_not_leak_anchor_words(tok, monkeypatch):
    """k = 1: text slots are encoded from the masked text, so changing an anchor's word (circle -> circles,
    same class) leaves every text slot unchanged; the word reaches only the region side."""
    method = make_cmal(tok, text_depth=1, unimodal_layers=1).eval()
    joints = []
    encode = method.model.fusion.encode_joint

    def spy(x, mask=None):
        joints.append(x)
        return encode(x, mask)

    monkeypatch.setattr(method.model.fusion, "encode_joint", spy)
    images = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for caption in ["a red circle above a blue star", "a red circles above a blue star"]:
        ids, attn = tok.encode([caption], 16)
        batch = two_region_batch(ids, attn, images)
        with torch.no_grad():
            regions = method.regions(batch)
            method.amc(batch, regions, method.anchors(batch, regions))
    T = ids.shape[1]
    assert torch.equal(joints[0][:, :T], joints[1][:, :T])  # every text slot identical
    assert not torch.equal(joints[0][0, T], joints[1][0, T])  # region 0 (the circle) received the changed word


def two_region_batch(ids, attn, images) -> Batch:
    """One caption with a circle region and a star region."""
    return Batch(input_ids=ids, attention_mask=attn, images=images,
                 region_boxes=torch.tensor([[[0.1, 0.1, 0.4, 0.4], [0.5, 0.5, 0.9, 0.9]]]),
                 region_labels=torch.tensor([[CIRCLE + 1, STAR + 1]]), region_mask=torch.ones(1, 2, dtype=torch.bool),
                 sample_keys=torch.tensor([7]))


# ================================================================================ losses
def _wrc_case():
    """u = (1,0), (0,1); z = (1,0), (0.6,0.8) (scaled: cosine must not care); anchors (0,0), (1,1)."""
    txt = torch.tensor([[[3.0, 0.0], [0.0, 0.5]]])
    reg = torch.tensor([[[2.0, 0.0], [0.3, 0.4]]])
    pairs = torch.tensor([[[True, False], [False, True]]])
    return txt, reg, pairs


def _closed_form(tau: float) -> float:
    s = [1.0 / tau, 0.6 / tau, 0.0, 0.8 / tau]  # s00, s01, s10, s11
    top = max(s)
    log_z = top + math.log(sum(math.exp(x - top) for x in s))
    return -0.5 * ((s[0] - log_z) + (s[3] - log_z))


def test_wrc_closed_form_2x2():
    txt, reg, pairs = _wrc_case()
    ones_t, ones_r = torch.ones(1, 2), torch.ones(1, 2, dtype=torch.bool)
    loss = wrc_loss(txt, reg, pairs, ones_t, ones_r, torch.tensor(math.log(0.1)))
    assert loss.item() == pytest.approx(_closed_form(0.1), rel=1e-5)  # = log(e^10 + e^6 + 1 + e^8) - 9
    assert _closed_form(0.1) == pytest.approx(math.log(math.exp(10) + math.exp(6) + 1 + math.exp(8)) - 9)


def test_wrc_padding_excluded_and_faithful_mode():
    txt, reg, pairs = _wrc_case()
    txt_p = torch.cat([txt, torch.tensor([[[5.0, -1.0]]])], dim=1)  # padded token with some vector
    reg_p = torch.cat([reg, torch.tensor([[[-2.0, 7.0]]])], dim=1)
    pairs_p = F.pad(pairs, (0, 1, 0, 1))
    pairs_p[0, 2, 2] = True  # an "anchor" on padding must be ignored too
    tmask, rmask = torch.tensor([[1, 1, 0]]), torch.tensor([[True, True, False]])
    log_tau = torch.tensor(math.log(0.1))
    assert wrc_loss(txt_p, reg_p, pairs_p, tmask, rmask, log_tau).item() == pytest.approx(_closed_form(0.1), rel=1e-5)
    # code-faithful (quirk 2): the 5 padded pairs enter the softmax with similarity 0; / (T*N) = 9
    log_z = math.log(math.exp(10) + math.exp(6) + 1 + math.exp(8) + 5)
    want = -((10 - log_z) + (8 - log_z)) / 9
    got = wrc_loss(txt_p, reg_p, pairs_p, tmask, rmask, log_tau, faithful=True)
    assert got.item() == pytest.approx(want, rel=1e-5)


def test_wrc_no_anchor_samples_excluded_and_zero():
    txt, reg, pairs = _wrc_case()
    txt2, reg2 = txt.repeat(2, 1, 1), reg.repeat(2, 1, 1)
    pairs2 = torch.cat([pairs, torch.zeros_like(pairs)])
    log_tau = torch.tensor(math.log(0.1))
    loss = wrc_loss(txt2, reg2, pairs2, torch.ones(2, 2), torch.ones(2, 2, dtype=torch.bool), log_tau)
    assert loss.item() == pytest.approx(_closed_form(0.1), rel=1e-5)
    leaf = txt2.clone().requires_grad_(True)
    none = wrc_loss(leaf, reg2, torch.zeros_like(pairs2), torch.ones(2, 2), torch.ones(2, 2, dtype=torch.bool), log_tau)
    assert none.item() == 0.0
    none.backward()
    assert leaf.grad is not None and (leaf.grad == 0).all()


def test_wrc_temperature_clamp(tok):
    txt, reg, pairs = _wrc_case()
    args = (txt, reg, pairs, torch.ones(1, 2), torch.ones(1, 2, dtype=torch.bool))
    assert wrc_loss(*args, torch.tensor(math.log(100.0))).item() == pytest.approx(_closed_form(0.5), rel=1e-5)
    assert wrc_loss(*args, torch.tensor(math.log(1e-6))).item() == pytest.approx(_closed_form(0.001), rel=1e-5)
    method = make_cmal(tok)
    assert method.log_tau.item() == pytest.approx(math.log(0.07))
    with torch.no_grad():
        method.log_tau.fill_(math.log(5.0))
    method.on_step_end()
    assert method.log_tau.exp().item() == pytest.approx(0.5)
    with torch.no_grad():
        method.log_tau.fill_(math.log(1e-5))
    method.on_step_end()
    assert method.log_tau.exp().item() == pytest.approx(0.001)


def test_amc_loss_hand_computed():
    txt = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]]])
    reg = torch.tensor([[[2.0, -1.0], [0.5, 0.5]]])
    w_word = torch.tensor([[1.0, 0.0, -1.0, 2.0], [0.0, 1.0, 1.5, 0.0]])  # d=2 -> V=4
    w_reg = torch.tensor([[1.0, -1.0, 0.0], [0.0, 1.0, 2.0]])  # d=2 -> 3 classes
    labels = torch.tensor([[-100, 2, 3]])
    targets = torch.tensor([[1, -100]])
    out = amc_loss(txt, reg, labels, targets, lambda h: h @ w_word, lambda h: h @ w_reg)

    def nll(logits, k):
        return -(logits[k] - math.log(sum(math.exp(x) for x in logits)))

    # token 1: logits (0, 2, 3, 0), target 2; token 2: logits (1, 1, 0.5, 2), target 3 -> both argmax right;
    # region 0: logits (2, -3, -2), target 1 -> argmax 0, wrong; region 1 and token 0 carry no target
    want_word = (nll([0, 2, 3, 0], 2) + nll([1, 1, 0.5, 2], 3)) / 2
    assert out.loss_word.item() == pytest.approx(want_word, rel=1e-6)
    assert out.loss_region.item() == pytest.approx(nll([2, -3, -2], 1), rel=1e-6)
    assert out.acc_word.item() == 1.0 and out.acc_region.item() == 0.0
    empty = amc_loss(txt, reg, torch.full_like(labels, -100), torch.full_like(targets, -100),
                     lambda h: h @ w_word, lambda h: h @ w_reg)
    assert empty.loss_word.item() == 0.0 and empty.loss_region.item() == 0.0 and empty.acc_word.item() == 0.0


# ================================================================================ method
def test_forward_real_tiny_batch_sum_mode(tok, batch):
    method = make_cmal(tok, task_mixing="sum")
    out = method(batch)
    expected = {"loss", "itm", "itm_acc", "amc", "amc_word", "amc_region", "acc_word", "acc_region", "wrc", "tau",
                "anchor_rate", "anchors_per_caption"}
    assert set(out) == expected
    assert all(torch.isfinite(v) and v.dim() == 0 for v in out.values())
    assert not any(out[k].requires_grad for k in expected - {"loss"})
    assert out["anchor_rate"].item() > 0.5 and out["anchors_per_caption"].item() >= 1.0
    weighted = (out["itm"] + 3 * (out["amc_word"] + out["amc_region"]) + 2 * out["wrc"]) / 6
    assert out["loss"].item() == pytest.approx(weighted.item(), rel=1e-5)
    assert out["itm"].item() == pytest.approx(math.log(2), abs=0.2)
    assert out["amc_word"].item() == pytest.approx(math.log(tok.vocab_size), abs=1.0)
    assert out["amc_region"].item() == pytest.approx(math.log(len(CLASSES) + 1), abs=0.7)
    out["loss"].backward()
    for name, p in method.named_parameters():
        if name.startswith(("region_embed", "region_head", "model.fusion.blocks", "model.itm_head", "model.mlm_head",
                            "model.text.word_embeddings", "log_tau")):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        if name.startswith("model.vision."):  # region_source: pixels (default): the ViT is not used
            assert p.grad is None, name
            assert name in method.unused_parameters()
    vit = make_cmal(tok, task_mixing="sum", region_source="vit")
    vit(batch)["loss"].backward()
    assert vit.model.vision.patch_embed.weight.grad.abs().sum() > 0  # regions pooled from the ViT grid


def test_ratio_mode_draws_one_task_per_step_1_3_2(tok, batch):
    method = make_cmal(tok)
    tasks = [method.task_for_step(s) for s in range(3000)]
    for task, p in (("itm", 1 / 6), ("amc", 3 / 6), ("wrc", 2 / 6)):
        share = tasks.count(task) / 3000
        assert abs(share - p) < 5 * math.sqrt(p * (1 - p) / 3000), (task, share)
    again = make_cmal(tok, seed=5)  # other weights, same train seed -> same schedule
    assert tasks == [again.task_for_step(s) for s in range(3000)]
    other = build_config({"model": model_cfg(), "method": {"name": "cmal"}, "train": {"seed": 1}})
    reseeded = Cmal.from_config(other, VLModel(other.model, tok.vocab_size, tok.pad_id), tok, WORLD_CLASS_WORDS)
    assert tasks[:200] != [reseeded.task_for_step(s) for s in range(200)]
    only_itm = make_cmal(tok, task_ratio={"itm": 1, "amc": 0, "wrc": 0})
    assert {only_itm.task_for_step(s) for s in range(100)} == {"itm"}

    method.train()
    for task in ("itm", "amc", "wrc"):
        method.task_step.fill_(tasks.index(task))
        out = method(batch)
        keys = set(out) - {"loss", "anchor_rate", "anchors_per_caption"}
        assert keys == {"itm": {"itm", "itm_acc"}, "wrc": {"wrc", "tau"},
                        "amc": {"amc", "amc_word", "amc_region", "acc_word", "acc_region"}}[task]
        assert out["loss"].item() == pytest.approx(out[task].item(), rel=1e-6)
    step = int(method.task_step)
    method.on_step_end()
    assert int(method.task_step) == step + 1 and "task_step" in method.state_dict()


def test_itm_negatives_come_from_other_images(tok, batch):
    method = make_cmal(tok)
    keys = torch.arange(400)
    rows_batch = Batch(input_ids=torch.zeros(400, 2, dtype=torch.long),
                                 attention_mask=torch.ones(400, 2, dtype=torch.long), image_ids=keys // 2,
                                 sample_keys=keys)
    rows, negative = method.itm_rows(rows_batch)
    ids = rows_batch.image_ids
    assert (ids[rows[negative]] != ids[negative]).all()
    assert torch.equal(rows[~negative], torch.arange(400)[~negative])
    share = negative.float().mean().item()
    assert abs(share - 0.5) < 5 * math.sqrt(0.25 / 400)
    same = Batch(input_ids=rows_batch.input_ids, attention_mask=rows_batch.attention_mask,
                                image_ids=torch.zeros(400, dtype=torch.long), sample_keys=keys)
    assert not method.itm_rows(same)[1].any()  # one image only: nothing to pair against


def test_masking_rows_depend_only_on_their_keys(tok, batch):
    method = make_cmal(tok)
    with torch.no_grad():
        regions = method.regions(batch)
    pairs = method.anchors(batch, regions)
    partner, full = method.mask(batch, regions, pairs)
    half = RegionInputs(regions.feats[4:8], regions.boxes[4:8], regions.labels[4:8], regions.mask[4:8])
    partner_h, part = method.mask(batch.slice(4, 8), half, pairs[4:8])
    assert torch.equal(partner_h, partner[4:8])
    assert torch.equal(part.masked_ids, full.masked_ids[4:8])
    assert torch.equal(part.region_masked, full.region_masked[4:8])
    assert (partner >= 0).any(dim=1).float().mean() > 0.5


def test_regions_truncation_and_whole_image_region(tok, batch):
    method = make_cmal(tok, whole_image_region=True, max_regions=2)
    with torch.no_grad():
        regions = method.regions(batch)
    B = len(batch)
    assert regions.feats.shape == (B, 3, 3 * 8 * 8) and regions.boxes.shape == (B, 3, 7)  # pixels, 8 x 8 bins
    assert torch.equal(regions.boxes[:, 0], torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0]).expand(B, 7))
    assert (regions.labels[:, 0] == 0).all() and regions.mask[:, 0].all()
    assert torch.equal(regions.labels[:, 1:], batch.region_labels[:, :2] * batch.region_mask[:, :2])
    pairs = method.anchors(batch, regions)
    _, masking = method.mask(batch, regions, pairs)
    assert not pairs[..., 0].any() and not masking.region_masked[:, 0].any()  # label 0: never a target
    out = method.train()(batch)
    assert torch.isfinite(out["loss"])


@pytest.mark.slow
def test_amc_learns_above_chance(tok, world):
    """~100 AMC steps on a tiny procedural batch: loss falls, word and region accuracies far above chance
    (1/V ~ 0.0025, 1/(C+1) ~ 0.053) on masks never seen in training."""
    dataset = PairDataset(world.split("train"), tok, 40)
    train = collate([dataset[i] for i in range(0, 200, 3)][:32])
    method = make_cmal(tok, task_mixing="sum", task_weights={"itm": 0, "amc": 1, "wrc": 0}).train()
    opt = torch.optim.AdamW(method.parameters(), lr=3e-3)
    first = None
    for step in range(100):
        train.sample_keys = torch.arange(32) + 1000 * step
        out = method(train)
        first = out["amc"].item() if first is None else first
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        method.on_step_end()
    method.eval()
    train.sample_keys = torch.arange(32) + 10**7  # fresh masks
    with torch.no_grad():
        regions = method.regions(train)
        held = method.amc(train, regions, method.anchors(train, regions))
    assert held["amc_word"].item() + held["amc_region"].item() < 0.5 * first
    assert held["acc_word"].item() > 0.3
    assert held["acc_region"].item() > 0.5


# ================================================================================ construction / config
def test_construction_errors(tok, batch):
    cross = build_config({"model": {**model_cfg(), "fusion": {"type": "cross", "depth": 1, "heads": 2}},
                          "method": {"name": "cmal"}})
    with pytest.raises(ValueError, match="fusion.type: single"):
        Cmal.from_config(cross, VLModel(cross.model, tok.vocab_size), tok, WORLD_CLASS_WORDS)
    cfg = build_config({"model": model_cfg(), "method": {"name": "cmal", "unimodal_layers": 1}})
    with pytest.raises(ValueError, match="unimodal_layers"):
        Cmal.from_config(cfg, VLModel(cfg.model, tok.vocab_size), tok, WORLD_CLASS_WORDS)
    cfg = build_config({"model": model_cfg(), "method": {"name": "cmal"}})
    model = VLModel(cfg.model, tok.vocab_size)
    with pytest.raises(ValueError, match="class words"):
        build_method(cfg, model, tok)
    with pytest.raises(ValueError, match="lexicon covers"):
        Cmal(model, cfg.method, LexiconTable.from_ids([[5]], vocab_size=10), mask_id=4, special_ids=SPECIAL,
             vocab_size=tok.vocab_size)
    with pytest.warns(UserWarning, match="1 of 2 classes have no whole-word token"):
        Cmal(model, cfg.method, LexiconTable.from_ids([[5], []], vocab_size=tok.vocab_size), mask_id=4,
             special_ids=SPECIAL, vocab_size=tok.vocab_size)
    with pytest.raises(ValueError, match="task_ratio"):
        make_cmal(tok, task_ratio={"itm": 0, "amc": 0, "wrc": 0})
    method = make_cmal(tok)
    with pytest.raises(ValueError, match="needs images"):
        method(Batch(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                               region_boxes=batch.region_boxes, region_labels=batch.region_labels))
    with pytest.raises(ConfigError):
        build_config({"method": {"name": "cmal", "task_mixing": "mean"}})


def test_build_method_with_class_words_on_tokenizer(tok, batch):
    carrier = TextTokenizer.from_json_str(tok.to_json_str())
    carrier.class_words = WORLD_CLASS_WORDS
    cfg = build_config({"model": model_cfg(), "method": {"name": "cmal"}})
    method = build_method(cfg, VLModel(cfg.model, carrier.vocab_size, carrier.pad_id), carrier)
    assert isinstance(method, Cmal) and method.lexicon.num_classes == len(CLASSES)
    assert method.region_head.out.out_features == len(CLASSES) + 1


def test_shipped_cmal_configs():
    tiny, base = load_config("cmal_tiny"), load_config("cmal_base")
    assert tiny.method.name == base.method.name == "cmal"
    assert tiny.model.fusion.type == base.model.fusion.type == "single"
    sizes = (base.model.text.width, base.model.fusion.depth, base.model.fusion.heads, base.model.text.depth)
    assert sizes == (768, 12, 12, 0)
    assert base.model.text.width * base.model.fusion.mlp_ratio == 3072
    assert (tiny.method.task_ratio.itm, tiny.method.task_ratio.amc, tiny.method.task_ratio.wrc) == (1, 3, 2)
