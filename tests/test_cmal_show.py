"""`vlp show cmal`: the described prompt agrees with CMAL's anchor / partner / masking functions called
directly, the figure is drawn where the description says, and the CLI works and fails cleanly.

The reference in `direct_prompt` is computed from the public pieces (`detect_anchors`, `sample_partner`,
`anchor_mask`, `keyed_uniform` with CMAL's salts, the trainer's key formula), not through `Cmal.mask`,
and the "last pointing token wins" region fill is a plain Python loop, so a wrong key, salt, region
offset or swap direction in `vlp.figures.cmal_prompt.cmal_prompt_view` shows up as a mismatch.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from vlp import api
from vlp.figures import cmal_prompt
from vlp.cli.main import main
from vlp.data.datasets import PairDataset, collate
from vlp.methods.cmal import SALT_FALLBACK, SALT_PARTNER, SALT_REGION, SALT_TEXT, anchor_mask
from vlp.models.anchors import build_lexicon, detect_anchors, sample_partner
from vlp.models.losses import IGNORE_INDEX
from vlp.models.rng import keyed_uniform
from vlp.train.checkpoint import save_checkpoint
from vlp.figures.cmal_prompt import CmalPromptRegion, CmalPromptToken, CmalPromptView, plot_cmal_prompt

# cmal_tiny on a 60-image train split: same scenes as the full config (samples are a pure function of
# (seed, split, index)), but the tokenizer trains on 60 scenes instead of 2000 (fast).
SMALL = ["data.train_images=60", "data.budget=300"]
KEY_STRIDE = 1 << 40  # the trainer's per-seed key stride (vlp.train.sampler), restated on purpose
# (index, caption, seed): train[3] caption 3 has two "heart" tokens; with seed 1 both pick region 2,
# so the last-wins fill is exercised; the others mix anchors, MLM masks and masked regions.
CASES = [(0, 0, 0), (0, 0, 2), (3, 3, 1), (2, 2, 2), (5, 1, 0)]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def built():
    cfg, tokenizer, method, data = cmal_prompt.build_cmal_show("cmal_tiny", None, SMALL, "train", 0, 0)
    return SimpleNamespace(cfg=cfg, tok=tokenizer, method=method, data=data)


def direct_prompt(built, index: int, caption: int, seed: int) -> SimpleNamespace:
    """Anchors, partners and masking of one sample from the library's functions, keyed as in training."""
    tok, mcfg = built.tok, built.cfg.method
    dataset = PairDataset(built.data, tok, built.cfg.data.max_text_len, max_words=built.cfg.data.max_text_len)
    row = index * 5 + caption
    batch = collate([dataset[row]])
    keys = torch.tensor([seed * KEY_STRIDE + row])
    ids, attn = batch.input_ids, batch.attention_mask
    labels, region_mask = batch.region_labels[:, : mcfg.max_regions], batch.region_mask[:, : mcfg.max_regions]
    T, N = ids.shape[1], labels.shape[1]
    lexicon = build_lexicon(api.world_class_words(), tok)
    pairs = detect_anchors(ids, labels, lexicon, attn, region_mask)
    partner = sample_partner(pairs, keyed_uniform(keys, (T,), SALT_PARTNER))
    masking = anchor_mask(
        ids, attn, partner, labels, region_mask, special_ids=tok.special_ids, mask_id=tok.mask_id,
        vocab_size=tok.vocab_size, text_uniforms=keyed_uniform(keys, (T, 3), SALT_TEXT),
        region_uniforms=keyed_uniform(keys, (N,), SALT_REGION),
        fallback_uniforms=keyed_uniform(keys, (1,), SALT_FALLBACK)[:, 0],
        mlm_prob=mcfg.mlm_prob, region_mask_prob=mcfg.region_mask_prob,
    )
    pointing = {i: [t for t in range(T) if int(partner[0, t]) == i] for i in range(N)}
    return SimpleNamespace(ids=ids[0].tolist(), pairs=pairs[0], partner=partner[0].tolist(), masking=masking,
                           pointing=pointing, T=T, N=N)


@pytest.mark.parametrize("index,caption,seed", CASES)
def test_view_agrees_with_direct_anchor_computation(built, index, caption, seed):
    view = cmal_prompt.cmal_prompt_view(built.method, built.tok, built.data, index, caption, seed,
                                built.cfg.data.max_text_len)
    ref = direct_prompt(built, index, caption, seed)
    piece = built.tok.backend.id_to_token
    assert view.caption == built.data[index].captions[caption]
    assert [t.position for t in view.tokens] == list(range(ref.T))  # one sample: no padding
    assert [t.piece for t in view.tokens] == [piece(i) for i in ref.ids]

    # text side: anchors = tokens with a partner; partners and candidate regions as computed directly
    anchors = {t for t in range(ref.T) if ref.partner[t] >= 0}
    assert anchors, "every case has at least one anchor token"
    assert {t.position for t in view.tokens if t.kind == "anchor"} == anchors
    for token in view.tokens:
        t = token.position
        assert token.partner == ref.partner[t]
        assert token.matches == tuple(ref.pairs[t].nonzero().flatten().tolist())
        if token.kind == "anchor":
            assert token.partner in token.matches
            assert token.after.startswith(f"⟨R{token.partner} ") and token.after.endswith("⟩")
            assert view.regions[token.partner].name.split()[-1] in token.after
        label, new = int(ref.masking.txt_labels[0, t]), int(ref.masking.masked_ids[0, t])
        if token.kind in ("mlm_mask", "mlm_random", "mlm_kept"):
            assert label == ref.ids[t] and token.after == piece(new)
            assert (token.kind == "mlm_mask") == (new == built.tok.mask_id)
            assert (token.kind == "mlm_kept") == (new == ref.ids[t])
        elif token.kind in ("plain", "special"):
            assert label == IGNORE_INDEX and token.after == token.piece

    # region side: swapped = partners, masked as anchor_mask says, fill = LAST pointing token
    assert [r.index for r in view.regions] == list(range(ref.N))
    swapped = ref.masking.region_swapped[0].tolist()
    masked = ref.masking.region_masked[0].tolist()
    for region in view.regions:
        i = region.index
        obj = built.data[index].objects[i]
        assert region.name == f"{obj.colour} {obj.class_name}"
        assert region.box == pytest.approx(obj.box_norm)
        assert region.pointing == tuple(ref.pointing[i])
        if swapped[i]:
            last = max(ref.pointing[i])
            assert region.status == "anchor" and region.filled_from == last
            assert region.after == f"word '{piece(ref.ids[last])}'"
        elif masked[i]:
            assert region.status == "masked" and region.after == "0 (masked)" and region.filled_from == -1
        else:
            assert region.status == "plain" and region.after == "visual" and region.filled_from == -1


def test_last_pointing_token_wins_case_is_covered(built):
    view = cmal_prompt.cmal_prompt_view(built.method, built.tok, built.data, 3, 3, 1, built.cfg.data.max_text_len)
    shared = [r for r in view.regions if len(r.pointing) > 1]
    assert shared, "train[3] caption 3 seed 1 should have two anchor tokens sharing one partner region"
    for region in shared:
        assert region.filled_from == region.pointing[-1] != region.pointing[0]


def test_seed_picks_the_key_and_changes_the_masks(built):
    def signature(seed: int) -> tuple:
        view = cmal_prompt.cmal_prompt_view(built.method, built.tok, built.data, 0, 1, seed, built.cfg.data.max_text_len)
        return (tuple((t.kind, t.partner, t.after) for t in view.tokens), tuple(r.status for r in view.regions))

    signatures = [signature(seed) for seed in range(4)]
    assert signatures[0] == signature(0)  # deterministic
    assert len(set(signatures)) > 1
    assert cmal_prompt.cmal_sample_key(7, seed=3) == 3 * KEY_STRIDE + 7


def _pixel(png: Image.Image, xy: tuple[int, int]) -> tuple[int, int, int]:
    return tuple(png.getpixel(xy))[:3]


def test_png_draws_each_region_in_its_style(built, tmp_path):
    view = cmal_prompt.cmal_prompt_view(built.method, built.tok, built.data, 0, 0, 0, built.cfg.data.max_text_len,
                                title="test")
    assert {r.status for r in view.regions} == {"anchor", "masked", "plain"}  # train[0] seed 0 has all three
    layout = plot_cmal_prompt(view, tmp_path / "prompt.png", image_px=256)
    png = Image.open(tmp_path / "prompt.png")
    png.load()
    assert png.format == "PNG" and png.size == layout["size"]
    assert 700 <= png.size[0] <= 2000 and 400 <= png.size[1] <= 2000
    x0, y0, x1, y1 = layout["image_box"]
    assert (x1 - x0, y1 - y0) == (256, 256) and layout["scale"] == 4.0
    anchors = [r for r in view.regions if r.status == "anchor"]
    assert set(layout["colours"]) == {r.index for r in anchors} and len(set(layout["colours"].values())) == len(anchors)
    for region in view.regions:
        bx0, by0, bx1, by1 = layout["region_boxes"][region.index]
        assert bx0 == x0 + round(region.box[0] * 256) and by1 == y0 + round(region.box[3] * 256) - 1
        bottom_mid = ((bx0 + bx1) // 2, by1)
        left_mid = (bx0, (by0 + by1) // 2)
        if region.status == "anchor":
            assert _pixel(png, bottom_mid) == layout["colours"][region.index]
        elif region.status == "masked":
            edge = {_pixel(png, (x, by1)) for x in range(bx0, bx1 + 1)}
            assert {(0, 0, 0), (255, 255, 255)} <= edge  # dashed black / white
        else:
            assert _pixel(png, left_mid) == (150, 150, 150)


def test_plot_rejects_an_anchor_token_without_anchor_region(tmp_path):
    image = np.zeros((8, 8, 3), dtype=np.uint8)
    region = CmalPromptRegion(0, (0.0, 0.0, 0.5, 0.5), "red circle", "plain", "visual")
    token = CmalPromptToken(1, "circle", "anchor", "⟨R0 red circle⟩", partner=0, matches=(0,))
    with pytest.raises(ValueError, match="not anchor regions"):
        plot_cmal_prompt(CmalPromptView(image, "a circle", (token,), (region,), "t"), tmp_path / "x.png")


def test_cli_writes_png(tmp_path, capsys):
    out = tmp_path / "cmal.png"
    code = main(["show", "cmal", "--index", "3", "--caption", "3", "--seed", "1", "--out", str(out),
                 *[arg for o in SMALL for arg in ("--set", o)]])
    assert code == 0
    assert f"wrote {out}" in capsys.readouterr().out
    png = Image.open(out)
    png.verify()
    assert png.size[0] >= 256 + 300 and png.size[1] >= 256 + 100


def test_cli_from_checkpoint_directory(built, tmp_path, capsys):
    built.tok.save(tmp_path / "tokenizer.json")
    save_checkpoint(tmp_path / "run", built.method, step=0, config=built.cfg, tokenizer_json=tmp_path / "tokenizer.json")
    out = tmp_path / "from_ckpt.png"
    assert main(["show", "cmal", "--checkpoint", str(tmp_path / "run"), "--out", str(out)]) == 0
    assert out.is_file() and Image.open(out).size[1] >= 256


def test_cli_bad_index_is_a_clear_error(tmp_path, capsys):
    out = tmp_path / "never.png"
    code = main(["show", "cmal", "--index", "60", "--out", str(out), *[a for o in SMALL for a in ("--set", o)]])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ")
    assert "--index 60 is out of range" in err and "60 images" in err and "0..59" in err
    assert not out.exists()


def test_cli_refuses_a_non_cmal_config(tmp_path, capsys):
    assert main(["show", "cmal", "--config", "albef_tiny", "--out", str(tmp_path / "x.png")]) == 2
    assert "method.name: cmal" in capsys.readouterr().err


def test_show_names_the_methods_that_have_a_figure(tmp_path, capsys):
    """`vlp show METHOD` asks the method class for its figure: a method without one is an error that
    names those that have one, an unknown method names the registered ones."""
    assert main(["show", "albef", "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "method 'albef' has no inspection figure" in err and "cmal" in err
    assert main(["show", "nosuch", "--out", str(tmp_path / "x.png")]) == 2
    assert "unknown method 'nosuch'" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
