"""SIMLA (`vlp.methods.simla`): the hand-computable checks of simla_vlmixer.md §4 that are SIMLA's own
(PSL keywords and loss, queue bookkeeping, XMM targets at masked positions, the shared encoder's modes),
the reference-quirk flags, and a short run whose losses go down. ITC / EMA / masking / soft-CE / block-mask
arithmetic is tested where those shared pieces live (test_losses, test_momentum, test_masking,
test_soft_cross_entropy); the method-contract tests run on SIMLA by registration."""

from __future__ import annotations

import math

import pytest
import torch

from test_method_contract import batch_of, build, contract_config
from vlp.build import build_tokenizer, build_world, world_class_words
from vlp.cli.main import main
from vlp.config import build_config, load_config
from vlp.data.datasets import PairDataset, collate, distinct_images
from vlp.methods import build_method
from vlp.methods.simla import SharedEncoderRetrieval, Simla, psl_loss, psl_targets, read_positions
from vlp.models.losses import IGNORE_INDEX, mlm_loss
from vlp.models.model import VLModel
from vlp.models.text import TextEncoder
from vlp.train.loop import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def _attention(rows: list[list[list[float]]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def test_psl_targets_count_heads_top_k_and_take_top_n():
    """§4.9: head 0 picks {1,2,3,4}, head 1 {2,3,4,5}: counts [0,1,2,2,2,1], keywords = positions 1..5."""
    head0 = [0.0, 0.25, 0.26, 0.24, 0.25, 0.0]
    head1 = [0.0, 0.0, 0.25, 0.25, 0.26, 0.24]
    attention = _attention([[head0, head1]])  # (1, 2, 6)
    ids = torch.tensor([[1, 11, 12, 13, 14, 15]])
    mask = torch.ones(1, 6, dtype=torch.long)
    targets = psl_targets(attention, ids, mask, vocab_size=20, keywords_per_head=4, keywords=5)
    assert targets.nonzero()[:, 1].tolist() == [11, 12, 13, 14, 15]
    # n = 3: the three positions counted twice (2, 3, 4) beat the once-counted ones
    top3 = psl_targets(attention, ids, mask, vocab_size=20, keywords_per_head=4, keywords=3)
    assert top3.nonzero()[:, 1].tolist() == [12, 13, 14]


def test_psl_targets_never_mark_specials_or_padding_unless_faithful():
    """§4.9 second half: `[CLS] a dog [SEP] [PAD] [PAD]` never marks [SEP]/[PAD] (ours); the reference code
    (faithful) takes the top 5 whatever the counts and zeroes only [CLS], so [SEP] and [PAD] become targets."""
    CLS, SEP, PAD, A, DOG = 2, 3, 0, 7, 9
    ids = torch.tensor([[CLS, A, DOG, SEP, PAD, PAD]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    attention = torch.full((1, 2, 6), 1 / 6)
    attention[0, :, 3] = 0.5  # [SEP] draws the most attention, as it often does
    specials = torch.tensor([PAD, CLS, SEP])
    ours = psl_targets(attention, ids, mask, 20, exclude_ids=specials, cls_id=CLS)
    assert ours.nonzero()[:, 1].tolist() == [A, DOG]
    faithful = psl_targets(attention, ids, mask, 20, exclude_ids=specials, faithful=True, cls_id=CLS)
    assert faithful[0, SEP] == 1 and faithful[0, PAD] == 1 and faithful[0, CLS] == 0
    # captions shorter than keywords_per_head: the reference's per-head topk(4) crashes, ours clamps
    short = psl_targets(torch.full((1, 2, 2), 0.5), torch.tensor([[CLS, DOG]]), torch.ones(1, 2), 20,
                        exclude_ids=specials)
    assert short.nonzero()[:, 1].tolist() == [DOG]


@pytest.mark.parametrize("alpha", [0.0, 0.4, 1.0])
def test_psl_loss_is_log_two_at_zero_logits_and_half_targets(alpha):
    """§4.10: BCE(z = 0, y = 0.5) = log 2 whatever alpha."""
    z, y = torch.zeros(3, 7), torch.full((3, 7), 0.5)
    assert float(psl_loss(z, y, y, alpha)) == pytest.approx(math.log(2), abs=1e-6)


def test_queue_length_must_be_a_multiple_of_the_global_batch(tok):
    cfg = contract_config("simla")
    bad = build_config(cfg.model_dump(mode="json"), ["method.queue_size=20", "train.batch_size=8"])
    model = VLModel(bad.model, vocab_size=tok.vocab_size, pad_id=tok.pad_id)
    with pytest.raises(ValueError, match=r"queue_size=20 must be a multiple of the global batch train.batch_size=8"):
        build_method(bad, model, tok, class_words=world_class_words())


def test_needs_the_shared_encoder_and_equal_widths(tok):
    cfg = contract_config("simla").model_dump(mode="json")
    split = build_config(cfg, ["model.text.cross_attention=false", "model.fusion.depth=1"])
    with pytest.raises(ValueError, match="model.text.cross_attention=true"):
        build_method(split, VLModel(split.model, tok.vocab_size, tok.pad_id), tok, world_class_words())
    with pytest.raises(ValueError, match="model.fusion.depth must be 0"):
        VLModel(build_config(cfg, ["model.fusion.depth=1"]).model, tok.vocab_size)
    wide = build_config(cfg, ["model.vision.width=48"])
    with pytest.raises(ValueError, match="vision.width must equal model.text.width"):
        build_method(wide, VLModel(wide.model, tok.vocab_size, tok.pad_id), tok, world_class_words())


def test_text_mode_ignores_the_image_and_multimodal_mode_reads_it(world, tok):
    """§4.12: the shared encoder's text mode does not depend on the image; multimodal mode does."""
    _, method = build("simla", tok, world=world)
    method.eval()
    batch = batch_of(world, tok, rows=4)
    model = method.model
    image = model.encode_image(batch.images).tokens
    other = model.encode_image(batch.images.flip(0)).tokens
    text = model.encode_text(batch.input_ids, batch.attention_mask)
    assert torch.equal(text, model.text(batch.input_ids, batch.attention_mask))  # no context: no cross-attention
    fused = model.encode_multimodal(batch.input_ids, batch.attention_mask, image).cls
    fused_other = model.encode_multimodal(batch.input_ids, batch.attention_mask, other).cls
    assert (fused - fused_other).abs().max() > 1e-4
    assert (fused - text[:, 0]).abs().max() > 1e-4


def test_retrieval_view_equals_the_model_passes(world, tok):
    """The retrieval interface (text states = [text mode ; embeddings]) gives the model's own ITC embedding
    and multimodal [CLS] (the ITM re-ranking must score what training scored)."""
    _, method = build("simla", tok, world=world)
    method.eval()
    batch = batch_of(world, tok, rows=4)
    view, model = method.itc_model, method.model
    assert isinstance(view, SharedEncoderRetrieval)
    states = view.encode_text(batch.input_ids, batch.attention_mask)
    assert states.shape[-1] == 2 * model.cfg.text.width
    text_emb = model.text_embed(model.encode_text(batch.input_ids, batch.attention_mask))
    assert torch.allclose(view.text_embed(states), text_emb, atol=1e-6)
    image = model.encode_image(batch.images).tokens
    fused = view.fuse(states, batch.attention_mask, image).cls
    assert torch.allclose(fused, model.encode_multimodal(batch.input_ids, batch.attention_mask, image).cls, atol=1e-5)


def test_mim_loss_reads_only_the_masked_patches(world, tok, monkeypatch):
    """§4.8: the MIM targets at unmasked patches do not change the loss; a masked patch's target does."""
    _, method = build("simla", tok, world=world)
    method.train()
    batch = batch_of(world, tok, rows=4)
    batch.sample_keys = torch.arange(4)
    patch_mask = method.mim_mask(batch)
    assert patch_mask.any() and (~patch_mask).any()
    codes = method.visual_tokenizer.encode(batch.images)
    context = method.model.encode_text(batch.input_ids, batch.attention_mask)

    def mim_with(targets):
        monkeypatch.setattr(method.visual_tokenizer, "encode", lambda images: targets)
        torch.manual_seed(0)
        return float(method._mim(batch, context, context, alpha=0.0)[0].detach())

    base = mim_with(codes)
    unmasked_changed = torch.where(patch_mask, codes, (codes + 1) % method.cfg.image_vocab_size)
    assert mim_with(unmasked_changed) == pytest.approx(base, abs=1e-6)
    masked_changed = torch.where(patch_mask, (codes + 1) % method.cfg.image_vocab_size, codes)
    assert abs(mim_with(masked_changed) - base) > 1e-4


def test_mim_mask_rate_and_keyed_rows(world, tok):
    """MIM masks ~29 % of the patches in blocks (75 of 256 at the reference's 16 x 16 grid), and each row's
    mask depends only on its sample key."""
    _, method = build("simla", tok, world=world)
    batch = batch_of(world, tok, rows=8)
    batch.sample_keys = torch.arange(8)
    mask = method.mim_mask(batch)
    patches = mask.shape[1]
    assert mask.sum(1).max() <= round(method.cfg.mim_mask_ratio * patches)
    assert mask.sum(1).min() >= 1
    half = batch.slice(4, 8)
    assert torch.equal(method.mim_mask(half), mask[4:])


def test_faithful_quirks_change_what_the_reference_changes(world, tok):
    """Quirk 6 (MLM distillation over the sequence axis) and quirk 3 (text positions on image tokens) move the
    numbers only where they should: with alpha = 0 the MLM term is the same either way."""
    _, ours = build("simla", tok, world=world)
    _, faithful = build("simla", tok, world=world)
    faithful.cfg = faithful.cfg.model_copy(update={"faithful_quirks": True})
    faithful.load_state_dict(ours.state_dict())
    faithful.model.length_buckets = faithful.model_m.length_buckets = 1  # quirk 6 reads the padded positions
    ours.train(), faithful.train()
    batch = batch_of(world, tok, rows=4)
    batch.sample_keys = torch.arange(4)
    image = ours.model.encode_image(batch.images).tokens
    image_m = ours.model_m.encode_image(batch.images).tokens
    same = [float(m._mlm(batch, m.model.image_kv(image), image, image_m, alpha=0.0)[0].detach()) for m in (ours, faithful)]
    assert same[0] == pytest.approx(same[1], rel=1e-5)
    mixed = [float(m._mlm(batch, m.model.image_kv(image), image, image_m, alpha=0.4)[0].detach())
             for m in (ours, faithful)]
    assert abs(mixed[0] - mixed[1]) > 1e-3
    tokens = torch.randn(2, 17, ours.model.cfg.text.width)
    text = ours.model.text
    assert not torch.allclose(text.embed_features(tokens, positions=True), text.embed_features(tokens))


def test_faithful_positions_need_enough_text_positions(tok):
    cfg = build_config(contract_config("simla").model_dump(mode="json"),
                       ["method.faithful_quirks=true", "model.text.max_len=8"])
    with pytest.raises(ValueError, match="max_len"):
        build_method(cfg, VLModel(cfg.model, tok.vocab_size, tok.pad_id), tok, world_class_words())


def test_alpha_ramps_over_the_first_steps_and_the_step_is_state(world, tok):
    _, method = build("simla", tok, world=world)
    method.cfg = method.cfg.model_copy(update={"alpha_ramp_steps": 4, "alpha": 0.4})
    assert method.current_alpha() == 0.0
    for _ in range(2):
        method.on_step_end()
    assert method.current_alpha() == pytest.approx(0.2)
    assert int(method.state_dict()["step"]) == 2
    for _ in range(5):
        method.on_step_end()
    assert method.current_alpha() == pytest.approx(0.4)


def test_loss_ramps_scale_an_objectives_weight_from_zero(world, tok):
    """`loss_ramp_steps`: ITM's weight is 0 at step 0, half at half the ramp, full after it; the step's loss is
    the sum of the ramped weights times the parts (an objective at weight 0 still reports its loss)."""
    _, method = build("simla", tok, world=world)
    ramps = method.cfg.loss_ramp_steps.model_copy(update={"itm": 4})
    weights = method.cfg.loss_weights.model_copy(update={"itm": 2.0})
    method.cfg = method.cfg.model_copy(update={"loss_ramp_steps": ramps, "loss_weights": weights})
    assert method.current_weights() == {"itc": 1.0, "itm": 0.0, "mlm": 1.0, "mim": 1.0, "psl": 1.0}
    out = method(batch_of(world, tok, 4))
    assert float(out["itm"]) > 0.1  # computed and reported, weighted 0
    expected = sum(float(out[k]) for k in ("itc", "mlm", "mim", "psl"))
    assert float(out["loss"].detach()) == pytest.approx(expected, rel=1e-5)
    for _ in range(2):
        method.on_step_end()
    assert method.current_weights()["itm"] == pytest.approx(1.0)
    for _ in range(3):
        method.on_step_end()
    assert method.current_weights()["itm"] == 2.0
    assert method.itm_steps(10) == 9  # step 0 trained ITM at weight 0


def test_retrieval_finetune_objective_reaches_what_it_declares(world, tok):
    """With the retrieval fine-tuning overrides (ITC + ITM), MLM/MIM/PSL parts are 0, and backward reaches
    every trainable parameter but the declared unused ones (the MLM, MIM and concept heads, the mask token)."""
    cfg = build_config(contract_config("simla").model_dump(mode="json"), list(Simla.retrieval_finetune_overrides))
    torch.manual_seed(0)
    method = build_method(cfg, VLModel(cfg.model, tok.vocab_size, tok.pad_id), tok, world_class_words())
    assert method.images_to_prepare() == 0  # no MIM: no visual tokenizer to fit
    method.train()
    batch = batch_of(world, tok)
    out = method(batch)
    assert float(out["mlm"]) == float(out["mim"]) == float(out["psl"]) == 0.0
    out["loss"].backward()
    declared = method.unused_parameters()
    assert {"heads.mask_token", "heads.mim_head.weight", "heads.concept_head.weight"} <= declared
    missing = [n for n, p in method.named_parameters() if p.requires_grad and p.grad is None and n not in declared]
    assert not missing


@pytest.mark.slow
def test_prepare_fits_the_visual_tokenizer_before_step_zero_and_losses_go_down(world, tok, tmp_path):
    """The Trainer fits the tokenizer on the first distinct training images (prepare.json), then 40 steps
    lower ITC, MLM and MIM (means of the first and last 5 logged steps; no queue, whose filling raises ITC's
    log-number of columns)."""
    cfg = build_config(contract_config("simla", steps=40, lr=2e-3, warmup_steps=5).model_dump(mode="json"),
                       ["method.queue_size=0"])
    torch.manual_seed(0)
    method = build_method(cfg, VLModel(cfg.model, tok.vocab_size, tok.pad_id), tok, world_class_words())
    assert method.images_to_prepare() == cfg.method.tokenizer_images and not method.visual_tokenizer.is_fitted
    data = PairDataset(world.split("train"), tok, 40, max_words=40)
    tok.save(tmp_path / "tok.json")
    records = Trainer(cfg, method, data, collate, tmp_path, tokenizer_json=tmp_path / "tok.json").fit()
    assert method.visual_tokenizer.is_fitted and (tmp_path / "prepare.json").is_file()
    train = [r for r in records if "itc" in r]
    for part in ("itc", "mlm", "mim"):
        first = sum(r[part] for r in train[:5]) / 5
        last = sum(r[part] for r in train[-5:]) / 5
        assert last < first, (part, first, last)
    assert all(r["psl_keywords"] > 0 for r in train)


def test_vlp_tokenizer_image_writes_a_file_simla_loads(tmp_path, capsys):
    """`vlp tokenizer image` fits on the config's pre-training images and writes a file; a SIMLA config naming
    it starts fitted (nothing to prepare) with the same codebook; a file of another shape is a clear error,
    and a method with nothing to fit is refused."""
    small = ["data.train_images=60", "data.budget=300", "method.image_vocab_size=32"]
    path = tmp_path / "vt.safetensors"
    argv = ["tokenizer", "image", "--config", "simla_tiny", "--out", str(path), "--images", "40"]
    assert main(argv + [arg for o in small for arg in ("--set", o)]) == 0
    assert path.is_file() and "method.visual_tokenizer=" in capsys.readouterr().out
    cfg = load_config("simla_tiny", small + [f"method.visual_tokenizer={path}"])
    world = build_world(cfg)
    tok = build_tokenizer(cfg, world)
    method = build_method(cfg, VLModel(cfg.model, tok.vocab_size, tok.pad_id), tok, world_class_words())
    assert method.visual_tokenizer.is_fitted and method.images_to_prepare() == 0
    fresh = build_method(load_config("simla_tiny", small), VLModel(cfg.model, tok.vocab_size, tok.pad_id), tok,
                         world_class_words())
    fresh.prepare(distinct_images(PairDataset(world.split("train"), tok, 40, max_words=40), 40))
    assert torch.equal(fresh.visual_tokenizer.codebook, method.visual_tokenizer.codebook)  # = what training fits
    wrong = load_config("simla_tiny", small[:2] + ["method.image_vocab_size=16", f"method.visual_tokenizer={path}"])
    with pytest.raises(ValueError, match="image_vocab_size"):
        build_method(wrong, VLModel(wrong.model, tok.vocab_size, tok.pad_id), tok, world_class_words())
    assert main(["tokenizer", "image", "--config", "albef_tiny", "--out", str(tmp_path / "x.safetensors")]) != 0


# ------------------------------------------------------------------------- step time: the same numbers, less work
def test_read_positions_list_each_rows_selected_positions_in_order():
    selected = torch.tensor([[False, True, False, True], [True, False, False, False], [False] * 4])
    read, valid = read_positions(selected)
    assert read.tolist() == [[1, 3], [0, 0], [0, 0]]
    assert valid.tolist() == [[True, True], [True, False], [False, False]]
    states = torch.arange(12.0).view(3, 4, 1)
    picked = states.gather(1, read.unsqueeze(-1))[valid]
    assert torch.equal(picked, states[selected])  # same rows, same order
    read, valid = read_positions(torch.zeros(2, 3, dtype=torch.bool))
    assert read.shape == (2, 1) and not valid.any()  # nothing selected: one dummy read per row


def _shared_encoder(tok, k: int, norm: str = "post") -> VLModel:
    cfg = build_config({"model": {"size": "tiny", "length_buckets": k, "embed_dim": 16,
                                  "vision": {"image_size": 32, "width": 32, "depth": 1, "heads": 2},
                                  "text": {"width": 32, "depth": 2, "heads": 2, "cross_attention": True, "norm": norm},
                                  "fusion": {"depth": 0}}})
    torch.manual_seed(0)
    return VLModel(cfg.model, vocab_size=tok.vocab_size, pad_id=tok.pad_id).eval()


@pytest.mark.parametrize("norm", ["post", "pre"])
def test_reading_a_few_positions_gives_the_full_stacks_states_and_gradients_there(tok, norm):
    """`forward_from_embeddings(read=...)` runs the last layer at the read positions only: the states there (and
    the gradient through them) are the full stack's, in every mode, with and without length buckets; the
    [CLS] attention of the PSL pass is the same per bucket, 0 at padding."""
    lengths = torch.tensor([3, 12, 7, 20, 5, 9])
    T = 24
    mask = (torch.arange(T) < lengths[:, None]).long()
    ids = torch.randint(5, tok.vocab_size, (6, T), generator=torch.Generator().manual_seed(0))
    ids = ids.masked_fill(mask == 0, tok.pad_id)
    image = torch.randn(6, 17, 32, generator=torch.Generator().manual_seed(1))
    selected = torch.zeros(6, T, dtype=torch.bool)
    selected[0, [0, 2]] = selected[1, [1, 5, 11]] = selected[3, [0, 19]] = selected[4, :5] = True  # rows 2, 5: none
    read, valid = read_positions(selected)
    whole = _shared_encoder(tok, 1, norm)
    x = whole.text.embed(ids)
    for k in (1, 2):
        model = _shared_encoder(tok, k, norm)
        for context in (None, image):  # text mode, multimodal mode
            leaf_full, leaf_read = x.detach().requires_grad_(), x.detach().requires_grad_()
            full = whole.text.forward_from_embeddings(leaf_full, mask, context)[selected]
            part = model.text.forward_from_embeddings(leaf_read, mask, context, read=read)
            assert part.shape == (6, read.shape[1], 32)
            torch.testing.assert_close(part[valid], full, rtol=1e-5, atol=1e-5)
            weights = torch.randn(full.shape, generator=torch.Generator().manual_seed(2))
            (full * weights).sum().backward()
            (part[valid] * weights).sum().backward()
            torch.testing.assert_close(leaf_read.grad, leaf_full.grad, rtol=1e-4, atol=1e-5)
        attention = model.text.cls_attention(x, mask, image)
        torch.testing.assert_close(attention, whole.text.cls_attention(x, mask, image), rtol=1e-5, atol=1e-6)
        assert attention.shape == (6, 2, T) and attention.masked_select(mask[:, None, :] == 0).abs().max() == 0
    # image-as-query mode (no query mask): the masked patches of 17 image tokens attending to the caption
    queries = whole.text.embed_features(image)
    patch_mask = torch.rand(6, 16, generator=torch.Generator().manual_seed(3)) < 0.3
    patch_read, patch_valid = read_positions(patch_mask)
    full = whole.text.forward_from_embeddings(queries, None, x, mask)[:, 1:][patch_mask]
    part = whole.text.forward_from_embeddings(queries, None, x, mask, read=patch_read + 1)[patch_valid]
    torch.testing.assert_close(part, full, rtol=1e-5, atol=1e-5)


def _simla_two_layers(world, tok) -> Simla:
    """SIMLA at the contract size with a 2-layer shared encoder (the read path's last layer is not the first)
    and alpha at its full value (every momentum pass runs)."""
    cfg = build_config(contract_config("simla").model_dump(mode="json"), ["model.text.depth=2"])
    torch.manual_seed(0)
    method = build_method(cfg, VLModel(cfg.model, tok.vocab_size, tok.pad_id), tok, world_class_words())
    method.prepare(distinct_images(PairDataset(world.split("train"), tok, 40, max_words=40),
                                   method.images_to_prepare()))
    method.step.fill_(cfg.method.alpha_ramp_steps)
    assert method.current_alpha() == cfg.method.alpha > 0
    return method.train()


def test_mlm_and_mim_reading_the_masked_positions_equal_the_full_passes(world, tok):
    """MLM and MIM (and their momentum soft targets) computed from the full passes' states at the masked
    positions give the losses `_mlm` / `_mim` compute with the last layer at those positions only."""
    method = _simla_two_layers(world, tok)
    model, model_m, alpha = method.model, method.model_m, method.current_alpha()
    batch = batch_of(world, tok, rows=6)
    ids, attn, images = batch.input_ids, batch.attention_mask, batch.images
    image, image_m = model.encode_image(images).tokens, model_m.encode_image(images).tokens
    masked_ids, labels = method.mask(batch)
    selected = labels != IGNORE_INDEX
    assert selected.any() and selected.sum(1).min() < selected.sum(1).max()  # rows of different counts
    logits = model.mlm_logits(model.encode_multimodal(masked_ids, attn, image).text[selected])
    soft = torch.softmax(model_m.mlm_logits(model_m.encode_multimodal(masked_ids, attn, image_m).text[selected]), -1)
    expected = mlm_loss(logits, labels[selected], soft_targets=soft, alpha=alpha)
    torch.testing.assert_close(method._mlm(batch, model.image_kv(image), image, image_m, alpha)[0], expected,
                               rtol=1e-5, atol=1e-6)

    context, context_m = model.encode_text(ids, attn), model_m.encode_text(ids, attn)
    patch_mask = method.mim_mask(batch)
    states = method._image_queries(model, method.heads.mask_token, images, patch_mask, context, attn)
    states_m = method._image_queries(model_m, method.heads_m.mask_token, images, patch_mask, context_m, attn)
    expected = mlm_loss(method.heads.mim_head(states[patch_mask]), method.visual_tokenizer.encode(images)[patch_mask],
                        soft_targets=torch.softmax(method.heads_m.mim_head(states_m[patch_mask]), -1), alpha=alpha)
    torch.testing.assert_close(method._mim(batch, context, context_m, alpha)[0], expected, rtol=1e-5, atol=1e-6)


def test_simla_losses_and_gradients_do_not_depend_on_the_buckets(world, tok):
    """simla_tiny / demo_simla run with model.length_buckets: 3: every loss part and gradient of a step (ITM,
    MLM and PSL passes bucketed, momentum passes included) is the unbucketed one to float rounding."""
    method = _simla_two_layers(world, tok)
    batch = batch_of(world, tok, rows=8)
    lengths = batch.attention_mask.sum(1)
    assert int(lengths.max()) >= 2 * int(lengths.min())  # captions of mixed length: buckets cut something

    def step(k: int) -> tuple[dict, dict]:
        for sub in method.modules():
            if isinstance(sub, TextEncoder):
                sub.length_buckets = k
        method.zero_grad(set_to_none=True)
        out = method(batch)
        out["loss"].backward()
        grads = {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}
        return {n: v.detach().clone() for n, v in out.items()}, grads

    ref_out, ref_grads = step(1)
    for k in (2, 20):
        out, grads = step(k)
        assert set(out) == set(ref_out) and set(grads) == set(ref_grads)
        for part, value in ref_out.items():
            torch.testing.assert_close(out[part], value, rtol=1e-5, atol=1e-6, msg=f"{part} k={k}")
        for name, grad in ref_grads.items():
            scale = float(grad.abs().max()) or 1.0
            torch.testing.assert_close(grads[name] / scale, grad / scale, rtol=0, atol=1e-5, msg=f"grad {name} k={k}")
