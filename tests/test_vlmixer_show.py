"""`vlp show vlmixer`: the described CutMix view agrees with VLMixer's own `mixed_view` on the step the trainer
feeds the sentence in, the figure draws the patches where the layout says, and the CLI works from a config and
from a checkpoint and fails cleanly.

The reference is computed here from public pieces: the trainer's epoch-0 order (`torch.randperm` seeded with
`epoch_seed(seed, 0)`), the sample-key formula restated as seed * 2**40 + row, `UnpairedDataset` + `collate`,
then `VLMixer.regions` / `mixed_view`. Which region a replaced slot holds is checked through the VECTOR in the
slot (`mixed_view(...).patches`) against `region_vectors` of the claimed (image, region), not through
`cross_modal_cutmix`, so a wrong step, key, gallery index or box in `vlp.figures.vlmixer_cutmix` shows up.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from vlp import api
from vlp.cli.main import main
from vlp.data.datasets import collate
from vlp.data.transforms import tensor_to_image
from vlp.data.unpaired import UnpairedDataset
from vlp.figures import vlmixer_cutmix
from vlp.figures.vlmixer_cutmix import _fit, plot_vlmixer_cutmix, vlmixer_cutmix_view
from vlp.seeds import epoch_seed
from vlp.train.checkpoint import save_checkpoint

# vlmixer_tiny with a 60-image train split: the tokenizer learns on 60 scenes (fast); the unpaired streams
# (20000 images, 20000 x 5 sentences) and the method are the full config's.
SMALL = ["data.train_images=60"]
SET_SMALL = [arg for o in SMALL for arg in ("--set", o)]
KEY_STRIDE = 1 << 40  # the trainer's per-seed key stride (vlp.train.sampler), restated on purpose
# (index, caption, seed, batch, grad_accum): scene 0 caption 4 seed 0 replaces 4 words from 4 images; caption
# 0 seed 0 replaces none (both grounded words kept by the ratio draw); a batch of 4 images leaves concepts
# without a patch ("no_patch"); batch 8 in 2 micro-batches draws from the row's 4-image micro-batch only.
CASES = [(0, 4, 0, 64, 1), (1, 2, 0, 64, 1), (2, 3, 1, 64, 1), (0, 0, 0, 64, 1), (0, 4, 0, 4, 1), (2, 1, 1, 8, 2)]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def built():
    cfg, tokenizer, method, dataset = vlmixer_cutmix.build_vlmixer_show("vlmixer_tiny", None, SMALL, "train", 0, 0)
    return SimpleNamespace(cfg=cfg, tok=tokenizer, method=method, dataset=dataset)


@torch.no_grad()
def direct(built, index: int, caption: int, seed: int, batch_size: int, grad_accum: int) -> SimpleNamespace:
    """The trainer's micro-batch holding sentence (index, caption) and VLMixer's mixed view of it."""
    max_len = built.cfg.data.max_text_len
    world_images, world_text = built.dataset.images_split, built.dataset.text_split
    dataset = UnpairedDataset(world_images, world_text, built.tok, max_len, max_words=max_len)
    row = index * 5 + caption
    perm = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(epoch_seed(seed, 0)))
    position = int((perm == row).nonzero()[0, 0])
    step, offset = divmod(position, batch_size)
    rows = perm[step * batch_size:(step + 1) * batch_size]
    assert len(rows) == batch_size  # not the epoch's last (straddling) step
    batch = collate([dataset[int(r)] for r in rows])
    batch.sample_keys = seed * KEY_STRIDE + rows
    micro = batch_size // grad_accum
    part, b = divmod(offset, micro)
    batch = batch.slice(part * micro, (part + 1) * micro)
    regions = built.method.regions(batch)
    mixed = built.method.mixed_view(batch, regions)
    return SimpleNamespace(batch=batch, b=b, regions=regions, mixed=mixed, row=row, step=step,
                           vectors=built.method.region_vectors(regions))


@pytest.mark.parametrize("index,caption,seed,batch_size,grad_accum", CASES)
def test_view_agrees_with_the_methods_mixed_view(built, index, caption, seed, batch_size, grad_accum):
    view = vlmixer_cutmix_view(built.method, built.tok, built.dataset, index, caption, seed, batch_size, grad_accum)
    ref = direct(built, index, caption, seed, batch_size, grad_accum)
    b, batch, mixed, regions = ref.b, ref.batch, ref.mixed, ref.regions
    piece = built.tok.backend.id_to_token
    T = int(batch.attention_mask[b].sum())
    assert view.sentence == built.dataset.sentence(ref.row)
    assert (view.where.row, view.where.step, view.where.position) == (ref.row, ref.step, b)
    assert view.sample_key == seed * KEY_STRIDE + ref.row == int(batch.sample_keys[b])
    assert view.gallery_images == len(batch) == batch_size // grad_accum
    assert [t.position for t in view.tokens] == list(range(T))
    assert [t.piece for t in view.tokens] == [piece(int(i)) for i in batch.input_ids[b, :T]]
    # the replaced / grounded words are exactly the method's
    assert view.replaced_positions == tuple(mixed.replaced[b].nonzero().flatten().tolist())
    assert view.grounded_positions == tuple(mixed.grounded[b].nonzero().flatten().tolist())
    assert not view.mlm and all(not t.mlm_target and t.shown == "" for t in view.tokens)

    labels, real = regions.labels, regions.mask.bool()
    N = labels.shape[1]
    assert len(view.patches) == len(view.replaced_positions)
    for k, patch in enumerate(view.patches):
        t, token = patch.position, view.tokens[patch.position]
        assert token.kind == "replaced" and token.patch == k and patch.word == token.piece
        # the patch names the word's concept, and the vector in the slot is that gallery region's
        assert patch.concept == token.concept and int(labels[patch.image_slot, patch.region]) == patch.concept + 1
        assert patch.gallery_index == patch.image_slot * N + patch.region
        assert torch.allclose(mixed.patches[b, t], ref.vectors[patch.image_slot, patch.region])
        assert patch.box == pytest.approx(mixed.patch_boxes[b, t, :4].tolist())
        assert patch.image_index == int(batch.image_ids[patch.image_slot])
        obj = built.dataset.images_split[patch.image_index].objects[patch.region]
        assert patch.region_name == f"{obj.colour} {obj.class_name}" and patch.box == pytest.approx(obj.box_norm)
        assert patch.candidates == int(((labels == patch.concept + 1) & real).sum()) >= 1
        image = tensor_to_image(batch.images[patch.image_slot])
        h, w = image.shape[:2]
        x1, y1 = int(np.floor(patch.box[0] * w)), int(np.floor(patch.box[1] * h))
        assert np.array_equal(patch.crop[0, 0], image[y1, x1]) and 0 < patch.crop.shape[0] <= h
    assert sorted(g.image_slot for g in view.gallery) == sorted({p.image_slot for p in view.patches})
    for token in view.tokens:  # kept: a patch of its concept existed; no_patch: none in the gallery
        present = int(((labels == token.concept + 1) & real).sum())
        if token.kind == "kept":
            assert token.concept >= 0 and present > 0
        elif token.kind == "no_patch":
            assert token.concept >= 0 and present == 0
        elif token.kind in ("plain", "special"):
            assert token.concept == -1


def test_cases_cover_every_token_kind(built):
    kinds = set()
    for index, caption, seed, batch_size, grad_accum in CASES:
        view = vlmixer_cutmix_view(built.method, built.tok, built.dataset, index, caption, seed, batch_size,
                                   grad_accum)
        kinds |= {t.kind for t in view.tokens}
    assert kinds == set(vlmixer_cutmix.VLMIXER_TOKEN_KINDS)


def test_seed_picks_the_step_and_the_draws(built):
    def signature(seed: int) -> tuple:
        view = vlmixer_cutmix_view(built.method, built.tok, built.dataset, 0, 4, seed)
        return view.where.step, tuple((p.position, p.image_index, p.region) for p in view.patches)

    signatures = [signature(seed) for seed in range(3)]
    assert signatures[0] == signature(0)  # deterministic
    assert len({s[0] for s in signatures}) == 3 and len({s[1] for s in signatures}) > 1


def test_png_draws_each_patch_in_its_words_place_and_box(built, tmp_path):
    view = vlmixer_cutmix_view(built.method, built.tok, built.dataset, 0, 4, 0, title="test")
    assert len(view.patches) == 4
    layout = plot_vlmixer_cutmix(view, tmp_path / "cutmix.png")
    png = Image.open(tmp_path / "cutmix.png")
    png.load()
    assert png.format == "PNG" and png.size == layout["size"] and png.size[0] == 1100 and 500 <= png.size[1] <= 1500
    pixels = np.asarray(png.convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50  # images and text, not a blank canvas
    colours = layout["colours"]
    assert set(colours) == set(range(4)) == set(layout["mixed_cells"]) == set(layout["gallery_boxes"])
    assert len(set(colours.values())) == 4
    for k, patch in enumerate(view.patches):
        x0, y0, x1, y1 = layout["mixed_cells"][k]  # the crop itself, upscaled, in the mixed-view row
        assert np.array_equal(pixels[y0:y1, x0:x1], np.asarray(_fit(patch.crop, vlmixer_cutmix.VLMIXER_PATCH_PX)))
        wx0, _, wx1, wy1 = layout["word_cells"][patch.position]  # ... in the column of the word it replaced
        assert wx0 <= x0 and x1 <= wx1 + 1 and y0 > wy1
        bx0, by0, bx1, by1 = layout["gallery_boxes"][k]  # its box outlined in its colour on its source image
        ix0, iy0, ix1, iy1 = layout["image_boxes"][patch.image_slot]
        assert (ix1 - ix0, iy1 - iy0) == (vlmixer_cutmix.VLMIXER_SHOW_IMAGE_PX,) * 2
        assert bx0 == ix0 + round(patch.box[0] * (ix1 - ix0)) and by1 == iy0 + round(patch.box[3] * (iy1 - iy0)) - 1
        assert tuple(pixels[by1, (bx0 + bx1) // 2]) == colours[k]


def test_ratio_zero_draws_no_patch(built, tmp_path):
    cfg, tok, method, dataset = vlmixer_cutmix.build_vlmixer_show(
        built.cfg.model_copy(update={"method": built.cfg.method.model_copy(update={"cmc_ratio": 0.0})}),
        None, None, "train", 0, 4)
    view = vlmixer_cutmix_view(method, tok, dataset, 0, 4, 0)
    assert view.cmc_ratio == 0 and view.patches == () and view.gallery == ()
    assert {t.kind for t in view.tokens if t.concept >= 0} == {"kept"}  # every grounded word had a patch at 0.5
    assert "cmc_ratio = 0" in vlmixer_cutmix.no_patch_reason(view)
    layout = plot_vlmixer_cutmix(view, tmp_path / "zero.png")
    assert layout["mixed_cells"] == {} and layout["gallery_boxes"] == {} and layout["image_boxes"] == {}
    assert Image.open(tmp_path / "zero.png").size == layout["size"]


def test_cli_writes_the_api_figure(built, tmp_path, capsys):
    out = tmp_path / "vlmixer.png"
    assert main(["show", "vlmixer", "--caption", "4", "--out", str(out), *SET_SMALL]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    png = Image.open(out)
    png.verify()
    again = api.show_method("vlmixer", tmp_path / "api.png", caption=4, overrides=SMALL)
    assert again.read_bytes() == out.read_bytes()  # same sentence, step and keys: the same figure


def test_cli_from_checkpoint_adds_mlm_on_the_mixed_view(built, tmp_path, capsys):
    built.tok.save(tmp_path / "tokenizer.json")
    save_checkpoint(tmp_path / "run", built.method, step=0, config=built.cfg, tokenizer_json=tmp_path / "tokenizer.json")
    _, _, method, dataset = vlmixer_cutmix.build_vlmixer_show(None, tmp_path / "run", None, "train", 0, 4)
    expected = built.method.state_dict()
    for key, value in method.state_dict().items():  # the full method: model, region embedding and head
        assert torch.equal(value, expected[key]), key
    view = vlmixer_cutmix_view(method, built.tok, dataset, 0, 4, 0, mlm=True)
    targets = [t for t in view.tokens if t.mlm_target]
    assert targets and all(t.kind not in ("replaced", "special") for t in targets)
    with torch.no_grad():  # top-1 of the MLM head on the mixed view the method encodes
        ref = direct(built, 0, 4, 0, 64, 1)
        masked = ref.batch.input_ids.clone()
        for t in targets:
            masked[ref.b, t.position] = built.tok.backend.token_to_id(t.shown)
        hidden = method.encode_mixed(ref.mixed, masked, ref.batch.attention_mask)
        top = method.model.mlm_logits(hidden[ref.b]).argmax(dim=-1)
    assert [t.prediction_id for t in targets] == [int(top[t.position]) for t in targets]
    assert all(0 < t.prediction_prob <= 1 and 0 <= t.truth_prob <= t.prediction_prob for t in targets)
    out = tmp_path / "from_ckpt.png"
    assert main(["show", "vlmixer", "--checkpoint", str(tmp_path / "run"), "--caption", "4", "--out", str(out)]) == 0
    assert out.is_file() and Image.open(out).size[0] == 1100


@pytest.mark.parametrize("args,message", [
    (["--split", "val"], "VLMixer pre-trains on the world's unpaired streams"),
    (["--index", "20000"], "--index 20000 is out of range"),
    (["--caption", "5"], "--caption 5 is out of range"),
    (["--config", "cmal_tiny"], "method.name: vlmixer"),
])
def test_cli_errors_are_clear(tmp_path, capsys, args, message):
    out = tmp_path / "never.png"
    assert main(["show", "vlmixer", *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    assert not out.exists()


def test_regions_layout_puts_the_patches_after_the_text(built, tmp_path):
    """`cmc_layout: regions`: the replaced slots read [MASK] and the patches follow the text as region slots
    (the same patches as inline: the layout changes where they go, not which)."""
    cfg = built.cfg.model_copy(update={"method": built.cfg.method.model_copy(update={"cmc_layout": "regions"})})
    _, tok, method, dataset = vlmixer_cutmix.build_vlmixer_show(cfg, None, None, "train", 0, 4)
    view = vlmixer_cutmix_view(method, tok, dataset, 0, 4, 0)
    inline = vlmixer_cutmix_view(built.method, built.tok, built.dataset, 0, 4, 0)
    assert view.layout == "regions" and [(p.position, p.gallery_index) for p in view.patches] == \
        [(p.position, p.gallery_index) for p in inline.patches]
    layout = plot_vlmixer_cutmix(view, tmp_path / "regions.png")
    last = max(layout["word_cells"].values(), key=lambda box: (box[1], box[0]))  # [SEP]'s chip
    for k in range(len(view.patches)):
        x0, y0, _, _ = layout["mixed_cells"][k]
        assert (y0 > last[3] and x0 > last[2]) or y0 > last[3] + 40  # after the text, not in a word's column
