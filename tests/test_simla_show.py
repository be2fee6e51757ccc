"""`vlp show simla`: the described XMM / PSL view agrees with SIMLA's own functions called directly for the
trainer's sample key, the figure is drawn, and the CLI / API work from a config and from a checkpoint and
fail cleanly.

The reference is computed here from the public pieces (`PairDataset`, `collate`, the trainer's key formula
restated as seed * 2**40 + row, `Simla.mim_mask`, `Simla.mask`, `psl_targets` on the momentum encoder's
[CLS] attention, the MIM / MLM / concept heads), not through `vlp.figures.simla_xmm.simla_xmm_view`, so a
wrong row, key, mask, attention pass or head in the figure module shows up as a mismatch.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from vlp import api
from vlp.cli.main import main
from vlp.config import dump_config
from vlp.data.datasets import PairDataset, collate
from vlp.figures import simla_xmm
from vlp.methods.simla import psl_targets
from vlp.models.losses import IGNORE_INDEX
from vlp.train.checkpoint import CheckpointError, save_model_weights

# simla_tiny on a 60-image train split, a 32-code visual tokenizer fitted on those 60 images: same scenes
# as the full config, but the text tokenizer and the k-means fit take about a second.
SMALL = ["data.train_images=60", "data.budget=300", "method.tokenizer_images=60", "method.image_vocab_size=32"]
SET_SMALL = [arg for o in SMALL for arg in ("--set", o)]
KEY_STRIDE = 1 << 40  # the trainer's per-seed key stride (vlp.train.sampler), restated on purpose
# (index, caption, seed): train[0] caption 1 seed 2 has [MASK], random and kept MLM positions and a
# repeated word ("and") of which one occurrence is a keyword; the others vary the masks.
CASES = [(0, 0, 0), (0, 1, 2), (3, 3, 1), (5, 2, 1)]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def built():
    cfg, tokenizer, method, data, source = simla_xmm.build_simla_show("simla_tiny", None, SMALL, "train", 0, 0)
    return SimpleNamespace(cfg=cfg, tok=tokenizer, method=method, data=data, source=source)


@torch.no_grad()
def direct(built, index: int, caption: int, seed: int) -> SimpleNamespace:
    """Masks, MIM / MLM predictions, [CLS] attention and keywords of one sample, keyed as in training."""
    method, tok, max_len = built.method, built.tok, built.cfg.data.max_text_len
    dataset = PairDataset(built.data, tok, max_len, max_words=max_len)
    row = index * 5 + caption
    batch = collate([dataset[row]])
    batch.sample_keys = torch.tensor([seed * KEY_STRIDE + row])
    ids, attn, images = batch.input_ids, batch.attention_mask, batch.images
    model = method.model
    image_tokens = model.encode_image(images).tokens
    patch_mask = method.mim_mask(batch)
    targets = method.visual_tokenizer.encode(images)
    text_hidden = model.text.forward_from_embeddings(model.text.embed(ids), attn)
    states = method._image_queries(model, method.heads.mask_token, images, patch_mask, text_hidden, attn)
    mim_pred = method.heads.mim_head(states[patch_mask]).argmax(-1)
    masked_ids, labels = method.mask(batch)
    mlm_probs = torch.softmax(model.mlm_logits(model.encode_multimodal(masked_ids, attn, image_tokens).text), -1)
    attention = method.model_m.text.cls_attention(method.model_m.text.embed(ids), attn, image_tokens)
    keywords = psl_targets(attention, ids, attn, tok.vocab_size, built.cfg.method.psl_keywords_per_head,
                           built.cfg.method.psl_keywords, exclude_ids=torch.tensor(sorted(tok.special_ids)))
    concepts = torch.sigmoid(method.heads.concept_head(model.image_embed(image_tokens)))[0]
    return SimpleNamespace(ids=ids[0].tolist(), patch_mask=patch_mask[0], targets=targets[0], mim_pred=mim_pred,
                           masked_ids=masked_ids[0].tolist(), labels=labels[0].tolist(), mlm_probs=mlm_probs[0],
                           attention=attention[0].mean(0), keyword_ids=keywords[0].nonzero().flatten().tolist(),
                           concepts=concepts)


def view_of(built, index: int, caption: int, seed: int, title: str = "") -> simla_xmm.SimlaXmmView:
    return simla_xmm.simla_xmm_view(built.method, built.tok, built.data, index, caption, seed,
                                    built.cfg.data.max_text_len, title)


@pytest.mark.parametrize("index,caption,seed", CASES)
def test_view_agrees_with_direct_computation(built, index, caption, seed):
    view, ref = view_of(built, index, caption, seed), direct(built, index, caption, seed)
    piece = built.tok.backend.id_to_token
    assert view.caption == built.data[index].captions[caption]
    assert view.sample_key == seed * KEY_STRIDE + index * 5 + caption

    # MIM: the block mask of the trainer's key, the codes, the head's argmax at masked patches
    assert view.grid == 8 and len(view.patch_mask) == 64
    assert view.patch_mask == tuple(ref.patch_mask.tolist())
    assert view.masked_patches == tuple(ref.patch_mask.nonzero().flatten().tolist())
    assert 0 < len(view.masked_patches) <= round(75 / 256 * 64)  # BEiT blocks: at most the target count
    assert view.target_codes == tuple(ref.targets.tolist())
    predicted = torch.full_like(ref.targets, -1)
    predicted[ref.patch_mask] = ref.mim_pred
    assert view.predicted_codes == tuple(predicted.tolist())
    assert view.mim_accuracy == pytest.approx(float((ref.mim_pred == ref.targets[ref.patch_mask]).float().mean()))
    codes = ref.targets.clone()
    codes[ref.patch_mask] = ref.mim_pred
    decoded = built.method.visual_tokenizer.decode(torch.stack([ref.targets, codes]), 64)
    expected = ((decoded * 0.5 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(view.targets_image, expected[0])
    np.testing.assert_array_equal(view.reconstruction_image, expected[1])
    np.testing.assert_array_equal(view.image, built.data[index].image)

    # MLM: positions and 80/10/10 kinds of Simla.mask, the head's top-1 at each
    assert [t.position for t in view.tokens] == list(range(len(ref.ids)))  # one sample: no padding
    assert [t.piece for t in view.tokens] == [piece(i) for i in ref.ids]
    assert view.mlm_positions == tuple(t for t, label in enumerate(ref.labels) if label != IGNORE_INDEX)
    right = 0
    for token in view.tokens:
        t, new = token.position, ref.masked_ids[token.position]
        assert token.shown == piece(new)
        if token.masked:
            assert ref.labels[t] == ref.ids[t]
            assert (token.kind == "mlm_mask") == (new == built.tok.mask_id)
            assert (token.kind == "mlm_kept") == (new == ref.ids[t])
            assert token.prediction_id == int(ref.mlm_probs[t].argmax()) and token.prediction == piece(token.prediction_id)
            assert token.prediction_prob == pytest.approx(float(ref.mlm_probs[t].max()), rel=1e-5)
            assert token.truth_prob == pytest.approx(float(ref.mlm_probs[t, ref.ids[t]]), rel=1e-5)
            right += token.prediction_id == ref.ids[t]
        else:
            assert token.kind == ("special" if ref.ids[t] in built.tok.special_ids else "plain")
            assert new == ref.ids[t]
    assert view.mlm_accuracy == pytest.approx(right / max(len(view.mlm_positions), 1))

    # PSL: the momentum [CLS] attention (mean over heads) sums to 1 over the caption; keywords = psl_targets
    attention = [t.attention for t in view.tokens]
    assert sum(attention) == pytest.approx(1.0, abs=1e-4)
    assert attention == pytest.approx(ref.attention.tolist(), abs=1e-6)
    assert list(view.keyword_ids) == ref.keyword_ids and 1 <= len(view.keyword_ids) <= 5
    assert view.keywords == tuple(piece(i) for i in ref.keyword_ids)
    assert {ref.ids[t] for t in view.keyword_positions} == set(ref.keyword_ids)
    # top-n POSITIONS: a repeated word may take two of them (train[3] caption 3 seed 1: 'a' twice)
    assert len(view.keyword_ids) <= len(view.keyword_positions) <= built.cfg.method.psl_keywords
    assert not any(ref.ids[t] in built.tok.special_ids for t in view.keyword_positions)
    assert [t.position for t in view.tokens if t.keyword] == list(view.keyword_positions)
    top = ref.concepts.topk(5)
    assert [c[1] for c in view.concepts] == top.indices.tolist()
    assert [c[2] for c in view.concepts] == pytest.approx(top.values.tolist(), rel=1e-5)


def test_view_covers_every_mlm_kind_and_one_keyword_occurrence(built):
    """train[0] caption 1 seed 2: [MASK], random and kept positions; 'and' appears four times and is
    one keyword position, so only that occurrence is framed."""
    view = view_of(built, 0, 1, 2)
    assert {t.kind for t in view.tokens if t.masked} == {"mlm_mask", "mlm_random", "mlm_kept"}
    ands = [t for t in view.tokens if t.piece == "and"]
    assert len(ands) > 1 and sum(t.keyword for t in ands) == 1


def test_seed_picks_the_key_and_changes_the_masks(built):
    def signature(seed: int) -> tuple:
        view = view_of(built, 0, 0, seed)
        return view.patch_mask, view.mlm_positions

    signatures = [signature(seed) for seed in range(3)]
    assert signatures[0] == signature(0)  # deterministic
    assert len({s[0] for s in signatures}) == 3  # the block mask moves with the key
    assert "fitted on the first 60 distinct training images" in built.source


def _check_png(path, size=None) -> Image.Image:
    png = Image.open(path)
    png.load()
    assert png.format == "PNG"
    if size is not None:
        assert png.size == size
    assert png.size[0] == 1180 and 650 <= png.size[1] <= 1400
    pixels = np.asarray(png.convert("RGB"), dtype=np.float64)
    assert pixels.std() > 30  # not blank
    return png


def test_png_panels_show_the_mask(built, tmp_path):
    view = view_of(built, 0, 1, 2, title="test")
    layout = simla_xmm.plot_simla_xmm(view, tmp_path / "simla.png")
    png = _check_png(tmp_path / "simla.png", layout["size"])
    rgb = np.asarray(png.convert("RGB"), dtype=np.int64)
    for name in ("image", "targets", "reconstruction"):
        x0, y0, x1, y1 = layout["panels"][name]
        assert (x1 - x0, y1 - y0) == (256, 256)
    x0, y0 = layout["panels"]["image"][:2]
    tx0, ty0 = layout["panels"]["targets"][:2]
    for p in range(64):  # the centre of each 32 px patch: darkened where masked, the plain image elsewhere
        r, c = divmod(p, 8)
        shown = rgb[y0 + 32 * r + 14: y0 + 32 * r + 18, x0 + 32 * c + 14: x0 + 32 * c + 18]
        source = view.image[8 * r + 3: 8 * r + 5, 8 * c + 3: 8 * c + 5].astype(np.int64)
        if view.patch_mask[p]:
            assert shown.mean() < source.mean() * 0.6 + 1
        else:
            assert abs(shown.mean() - source.mean()) < 1e-6
            target = rgb[ty0 + 32 * r + 14: ty0 + 32 * r + 18, tx0 + 32 * c + 14: tx0 + 32 * c + 18]
            cell = view.targets_image[8 * r + 3: 8 * r + 5, 8 * c + 3: 8 * c + 5].astype(np.int64)
            assert abs(target.mean() - cell.mean()) < 1e-6


def test_plot_rejects_an_inconsistent_view(built, tmp_path):
    view = view_of(built, 0, 0, 0)
    bad = simla_xmm.SimlaXmmView(**{**view.__dict__, "patch_mask": view.patch_mask[:-1]})
    with pytest.raises(ValueError, match="grid \\*\\* 2 = 64"):
        simla_xmm.plot_simla_xmm(bad, tmp_path / "x.png")


def test_api_and_cli_write_the_png(tmp_path, capsys):
    out = api.show_method("simla", tmp_path / "api.png", overrides=SMALL, index=3, caption=3, seed=1)
    assert out == tmp_path / "api.png"
    _check_png(out)
    cli_out = tmp_path / "cli.png"
    assert main(["show", "simla", "--index", "3", "--caption", "3", "--seed", "1", "--out", str(cli_out),
                 *SET_SMALL]) == 0
    assert f"wrote {cli_out}" in capsys.readouterr().out
    assert cli_out.read_bytes() == out.read_bytes()  # same sample, key and fit: the same figure


def _save_checkpoint(built, directory, drop_tokenizer: bool = False, drop: str = "visual_tokenizer."):
    ckpt = directory / "checkpoint"
    ckpt.mkdir(parents=True)
    (ckpt / "config.yaml").write_text(dump_config(built.cfg))
    built.tok.save(ckpt / "tokenizer.json")
    save_model_weights(built.method, ckpt / "model.safetensors")
    if drop_tokenizer:  # a checkpoint without the visual tokenizer's buffers
        with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
            meta = f.metadata()
            kept = {k: f.get_tensor(k) for k in f.keys() if not k.startswith(drop)}
        assert len(kept) < len(list(built.method.state_dict()))
        save_file(kept, str(ckpt / "model.safetensors"), metadata=meta)
    return directory


@pytest.mark.parametrize("drop_tokenizer", [False, True])
def test_checkpoint_loads_the_full_method(built, tmp_path, drop_tokenizer):
    run = _save_checkpoint(built, tmp_path / "run", drop_tokenizer)
    _, _, method, _, source = simla_xmm.build_simla_show(None, run, None, "train", 0, 1)
    expected = built.method.state_dict()
    for key, value in method.state_dict().items():  # model, heads, momentum copies and visual tokenizer
        assert torch.equal(value, expected[key]), key
    if drop_tokenizer:
        assert source.startswith("NOT in the checkpoint: fitted here on the first 60")
    else:
        assert source == "loaded from the checkpoint"
    view = simla_xmm.simla_xmm_view(method, built.tok, built.data, 0, 1, 2, built.cfg.data.max_text_len)
    reference = view_of(built, 0, 1, 2)
    for field in ("patch_mask", "target_codes", "predicted_codes", "tokens", "keyword_ids", "concepts"):
        assert getattr(view, field) == getattr(reference, field), field


def test_checkpoint_missing_other_weights_is_an_error(built, tmp_path):
    run = _save_checkpoint(built, tmp_path / "run", drop_tokenizer=True, drop="heads.mim_head.")
    with pytest.raises(CheckpointError, match="missing: heads.mim_head"):
        simla_xmm.build_simla_show(None, run, None, "train", 0, 0)


def test_cli_from_checkpoint_without_visual_tokenizer(built, tmp_path, capsys):
    run = _save_checkpoint(built, tmp_path / "run", drop_tokenizer=True)
    out = tmp_path / "from_ckpt.png"
    assert main(["show", "simla", "--checkpoint", str(run), "--out", str(out)]) == 0
    _check_png(out)


def test_bad_index_and_caption_are_clear_errors(tmp_path, capsys):
    out = tmp_path / "never.png"
    assert main(["show", "simla", "--index", "60", "--out", str(out), *SET_SMALL]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--index 60 is out of range" in err and "0..59" in err
    with pytest.raises(ValueError, match=r"--caption 5 is out of range.*valid: 0\.\.4"):
        api.show_method("simla", out, overrides=SMALL, caption=5)
    with pytest.raises(ValueError, match=r"--index -1 is out of range.*valid: 0\.\.999"):
        api.show_method("simla", out, overrides=SMALL, split="val", index=-1)
    assert not out.exists()


def test_refuses_a_non_simla_config(tmp_path, capsys):
    assert main(["show", "simla", "--config", "albef_tiny", "--out", str(tmp_path / "x.png")]) == 2
    assert "method.name: simla" in capsys.readouterr().err
    with pytest.raises(ValueError, match="needs a SIMLA run"):
        simla_xmm.show(tmp_path / "x.png", config="cmal_tiny")
    assert not (tmp_path / "x.png").exists()
