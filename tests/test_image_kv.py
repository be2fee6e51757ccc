"""Fusion passes that share one key/value projection of each image (`ImageKV`, issue 15 "repeated work").

ALBEF's step fuses the same images in four passes and its re-ranking fuses each image with many texts; the
image tokens are projected to every cross-attention layer's keys/values once and indexed per pass row. The
results must be those of projecting every row: values and gradients, with and without length buckets.
"""

from __future__ import annotations

import pytest
import torch

from vlp.config import FusionConfig, ModelConfig, TextConfig, VisionConfig, load_config
from vlp.methods.albef import Albef
from vlp.models.model import VLModel
from vlp.tasks import retrieval
from vlp.tasks.retrieval import fused_itm_pairs

VOCAB = 50


def tiny_model(fusion_type: str = "cross", buckets: int = 1) -> VLModel:
    cfg = ModelConfig(
        embed_dim=16, length_buckets=buckets,
        vision=VisionConfig(image_size=32, patch_size=8, width=24, depth=1, heads=2),
        text=TextConfig(width=32, depth=1, heads=2, max_len=16),
        fusion=FusionConfig(type=fusion_type, depth=2, heads=2),
    )
    torch.manual_seed(0)
    return VLModel(cfg, vocab_size=VOCAB)


def text_inputs(rows: int, length: int = 9) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(5, VOCAB, (rows, length), generator=generator)
    lengths = torch.tensor([3, 9, 5, 2, 7, 9, 4, 6, 8, 3, 5, 9][:rows])
    mask = (torch.arange(length)[None] < lengths[:, None]).long()
    return ids, mask


@pytest.mark.parametrize("buckets", [1, 3])
def test_shared_projection_gives_the_values_and_gradients_of_projecting_every_row(buckets):
    model = tiny_model(buckets=buckets)
    images = torch.randn(4, 17, 24)
    image_mask = torch.ones(4, 17, dtype=torch.long)
    image_mask[2, 11:] = 0  # an image with padded tokens: every pass row reads its own image's mask
    rows = torch.tensor([0, 1, 2, 3, 2, 0, 3, 1, 1, 2, 0, 3])  # positives, negatives, MLM: images repeat
    ids, mask = text_inputs(rows.numel())

    def run(shared: bool):
        model.zero_grad()
        tokens = images.clone().requires_grad_(True)
        hidden = model.encode_text(ids, mask)
        if shared:
            fused = model.fuse(hidden, mask, model.image_kv(tokens, image_mask).take(rows))
        else:
            fused = model.fuse(hidden, mask, tokens[rows], image_mask[rows])
        (fused.text.square().sum() + model.itm_logits(fused.cls).sum()).backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        return fused.text.detach(), tokens.grad, grads

    text_a, tokens_a, grads_a = run(shared=False)
    text_b, tokens_b, grads_b = run(shared=True)
    torch.testing.assert_close(text_b, text_a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tokens_b, tokens_a, rtol=1e-4, atol=1e-5)
    assert grads_a.keys() == grads_b.keys() and any(name.startswith("fusion.") for name in grads_a)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-4, atol=1e-5, msg=name)


def test_take_indexes_rows_without_copying_the_projection():
    model = tiny_model()
    kv = model.image_kv(torch.randn(3, 17, 24))
    assert len(kv) == 3 and len(kv.kv) == 2 and kv.kv[0].shape == (3, 17, 64)  # (U, N, 2D) per fusion layer
    taken = kv.take(torch.tensor([2, 2, 0]))
    assert taken.rows.tolist() == [2, 2, 0] and taken.kv[0] is kv.kv[0]
    assert taken.take(torch.tensor([1])).rows.tolist() == [2]


def test_single_stream_fusion_refuses_a_shared_projection():
    model = tiny_model("single")
    assert not model.shares_image_kv and tiny_model().shares_image_kv
    with pytest.raises(ValueError, match="cross-attention fusion"):
        model.image_kv(torch.randn(2, 17, 24))
    with pytest.raises(ValueError, match="carries its own mask"):
        cross = tiny_model()
        kv = cross.image_kv(torch.randn(2, 17, 24))
        ids, mask = text_inputs(2)
        cross.fusion(cross.encode_text(ids, mask), mask, kv, torch.ones(2, 17))


def test_rerank_pair_scores_equal_per_pair_projection_across_image_blocks(monkeypatch):
    """`fused_itm_pairs` groups pairs by blocks of images (3 here: several blocks, one of them without pairs)
    and must score every pair as the per-pair path does, in the input order."""
    model = tiny_model(buckets=1).eval()
    images = torch.randn(10, 17, 24)
    ids, mask = text_inputs(12)
    with torch.no_grad():
        hidden = model.encode_text(ids, mask)
    generator = torch.Generator().manual_seed(3)
    img_idx = torch.randint(0, 10, (40,), generator=generator)
    img_idx[img_idx.ge(3) & img_idx.lt(6)] = 9  # no pair reads images 3..5: an empty block
    txt_idx = torch.randint(0, 12, (40,), generator=generator)
    monkeypatch.setattr(retrieval, "IMAGE_KV_BLOCK", 3)
    with torch.no_grad():
        shared = fused_itm_pairs(model, images, hidden, mask, img_idx, txt_idx, 7, torch.device("cpu"), None)
        expected = model.itm_logits(model.fuse(hidden[txt_idx], mask[txt_idx], images[img_idx]).cls)[:, 1]
    torch.testing.assert_close(shared, expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # a model without the capability takes the per-pair path: the same scores
        monkeypatch.setattr(VLModel, "shares_image_kv", property(lambda self: False))
        plain = fused_itm_pairs(model, images, hidden, mask, img_idx, txt_idx, 7, torch.device("cpu"), None)
    torch.testing.assert_close(plain, expected, rtol=1e-5, atol=1e-5)


def test_albef_refuses_a_single_stream_fusion():
    cfg = load_config("albef_tiny", ["model.fusion.type=single"])
    model = VLModel(cfg.model, vocab_size=VOCAB)
    with pytest.raises(ValueError, match="model.fusion.type must be 'cross'"):
        Albef(model, cfg.method, mask_id=3, special_ids=[0, 1, 2, 3], vocab_size=VOCAB)


def shared_encoder_model(buckets: int) -> VLModel:
    """SIMLA's layout: the text encoder cross-attends in every layer, no fusion encoder."""
    cfg = ModelConfig(
        embed_dim=16, length_buckets=buckets,
        vision=VisionConfig(image_size=32, patch_size=8, width=24, depth=1, heads=2),
        text=TextConfig(width=32, depth=2, heads=2, max_len=16, cross_attention=True),
        fusion=FusionConfig(depth=0),
    )
    torch.manual_seed(0)
    return VLModel(cfg, vocab_size=VOCAB)


@pytest.mark.parametrize("buckets", [1, 3])
@pytest.mark.parametrize("read_cls", [False, True])
def test_shared_encoder_passes_over_one_projection_equal_projecting_every_row(buckets, read_cls):
    """SIMLA's ITM and MLM passes read one `ImageKV` of the shared text encoder: the states (all of them, or
    the [CLS] alone through the last layer's read path) and every gradient equal those of passing each row's
    image tokens."""
    model = shared_encoder_model(buckets)
    assert not model.shares_image_kv  # retrieval re-ranking keeps its per-pair path for this layout
    images = torch.randn(4, 17, 24)
    rows = torch.tensor([0, 1, 2, 3, 2, 0, 3, 1, 1, 2, 0, 3])
    ids, mask = text_inputs(rows.numel())
    read = torch.zeros(rows.numel(), 1, dtype=torch.long) if read_cls else None

    def run(shared: bool):
        model.zero_grad()
        tokens = images.clone().requires_grad_(True)
        x = model.text.embed(ids)
        context = model.image_kv(tokens).take(rows) if shared else tokens[rows]
        out = model.text.forward_from_embeddings(x, mask, context, read=read)
        (out.square().sum() + model.itm_logits(out[:, 0]).sum()).backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        return out.detach(), tokens.grad, grads

    out_a, tokens_a, grads_a = run(shared=False)
    out_b, tokens_b, grads_b = run(shared=True)
    torch.testing.assert_close(out_b, out_a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tokens_b, tokens_a, rtol=1e-4, atol=1e-5)
    assert grads_a.keys() == grads_b.keys() and any(".cross." in name for name in grads_a)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-4, atol=1e-5, msg=name)
    with pytest.raises(ValueError, match="carries its own image mask"):
        model.text.forward_from_embeddings(model.text.embed(ids), mask, model.image_kv(images).take(rows),
                                           torch.ones(rows.numel(), 17))
