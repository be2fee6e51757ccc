"""Length buckets (`vlp.models.buckets`, `model.length_buckets`): sub-batches of similar caption length give the
whole batch's result in the original row order, zeros past each bucket's length, and the same losses and
gradients (to float rounding) for ALBEF and CMAL; k = 1 is the unbucketed path itself."""

from __future__ import annotations

import pytest
import torch

from test_method_contract import batch_of, build, contract_config
from vlp.build import world_class_words
from vlp.config import ConfigError, build_config
from vlp.methods import build_method
from vlp.models.buckets import bucket_rows, run_in_length_buckets
from vlp.models.model import VLModel
from vlp.models.text import TextEncoder

pytestmark = pytest.mark.usefixtures("one_thread")


def _mask(lengths: list[int], T: int) -> torch.Tensor:
    return (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).long()


def set_buckets(module: torch.nn.Module, k: int) -> None:
    """k on every text encoder of `module` (a method's online and momentum models)."""
    for sub in module.modules():
        if isinstance(sub, TextEncoder):
            sub.length_buckets = k


# ------------------------------------------------------------------------------------------ the helper
def test_groups_sort_by_length_split_evenly_and_merge_equal_lengths():
    mask = _mask([3, 1, 4, 2], T=5)
    groups = bucket_rows(mask, 2)
    assert [(rows.tolist(), length) for rows, length in groups] == [([1, 3], 2), ([0, 2], 4)]
    # 3 buckets of 4 rows: sizes 2, 1, 1 -> lengths 2, 3, 4
    assert [(rows.tolist(), length) for rows, length in bucket_rows(mask, 3)] == [([1, 3], 2), ([0], 3), ([2], 4)]
    # more buckets than rows: one row each; rows of equal length share a bucket
    equal = bucket_rows(_mask([2, 2, 5, 2], T=6), 10)
    assert [(rows.tolist(), length) for rows, length in equal] == [([0, 1, 3], 2), ([2], 5)]
    # a mask with a hole is cut after its LAST real position, not after its count of real ones
    holes = torch.tensor([[1, 0, 1, 0, 0], [1, 1, 0, 0, 0]])
    assert [(rows.tolist(), length) for rows, length in bucket_rows(holes, 2)] == [([1], 2), ([0], 3)]


def test_outputs_come_back_in_row_order_padded_with_zeros():
    mask = _mask([3, 1, 4, 2], T=5)
    x = torch.arange(1.0, 21.0).view(4, 5)  # text-shaped (B, T)
    per_row = torch.tensor([10.0, 20.0, 30.0, 40.0])
    calls = []

    def fn(m, text, row):
        calls.append((m.shape, text.shape, row.tolist()))
        return text + 100 * row[:, None], row * 2

    text_out, row_out = run_in_length_buckets(fn, mask, 2, text=(x,), rows=(per_row,))
    # group [1, 3] cut to 2 tokens, group [0, 2] to 4 (sorted by length)
    assert calls == [((2, 2), (2, 2), [20.0, 40.0]), ((2, 4), (2, 4), [10.0, 30.0])]
    expected = torch.tensor([
        [1 + 1000, 2 + 1000, 3 + 1000, 4 + 1000, 0],      # row 0: group length 4, position 4 zero
        [6 + 2000, 7 + 2000, 0, 0, 0],                    # row 1: group length 2
        [11 + 3000, 12 + 3000, 13 + 3000, 14 + 3000, 0],  # row 2
        [16 + 4000, 17 + 4000, 0, 0, 0],                  # row 3
    ])
    assert torch.equal(text_out, expected)
    assert torch.equal(row_out, per_row * 2)


def test_one_bucket_or_no_mask_calls_the_function_once_on_the_whole_batch():
    mask, x = _mask([3, 1], T=4), torch.randn(2, 4, 3)
    seen = []

    def fn(m, text, row):
        seen.append((m, text, row))
        return text

    assert run_in_length_buckets(fn, mask, 1, text=(x,), rows=(None,)) is x
    assert seen[-1][0] is mask and seen[-1][1] is x and seen[-1][2] is None
    assert run_in_length_buckets(fn, None, 3, text=(x,), rows=(None,)) is x
    # every bucket as long as the batch: nothing to cut, one call on the original tensors
    assert run_in_length_buckets(fn, _mask([4, 4], T=4), 2, text=(x,), rows=(None,)) is x


def test_bad_bucket_counts_are_refused():
    with pytest.raises(ValueError, match="length buckets must be >= 1"):
        run_in_length_buckets(lambda m, t: t, _mask([1], 2), 0, text=(torch.zeros(1, 2),))
    with pytest.raises(ConfigError, match="model.length_buckets"):
        build_config({"model": {"size": "tiny", "length_buckets": 0}})
    assert build_config({"model": "tiny"}, ["model.length_buckets=3"]).model.length_buckets == 3


# ------------------------------------------------------------------------------------------ the model
def _tiny_model(tok, k: int, fusion: str = "cross") -> VLModel:
    cfg = build_config({"model": {"size": "tiny", "length_buckets": k, "embed_dim": 16,
                                  "vision": {"image_size": 32, "width": 32, "depth": 1, "heads": 2},
                                  "text": {"width": 32, "depth": 2, "heads": 2},
                                  "fusion": {"type": fusion, "depth": 1, "heads": 2}}})
    torch.manual_seed(0)
    return VLModel(cfg.model, vocab_size=tok.vocab_size, pad_id=tok.pad_id).eval()


def _text_batch(tok, lengths: list[int], T: int) -> tuple[torch.Tensor, torch.Tensor]:
    mask = _mask(lengths, T)
    ids = torch.randint(5, tok.vocab_size, (len(lengths), T), generator=torch.Generator().manual_seed(0))
    return ids.masked_fill(mask == 0, tok.pad_id), mask


def test_one_bucket_is_the_unbucketed_path_bit_for_bit(tok):
    model = _tiny_model(tok, 1)
    ids, mask = _text_batch(tok, [3, 12, 7, 20, 5], T=20)
    x = model.text.embed(ids)
    for block in model.text.blocks:
        x = block(x, mask=mask)
    assert torch.equal(model.encode_text(ids, mask), model.text.final_norm(x))
    image = torch.randn(5, 17, 32)
    fused = model.fusion(x, mask, image)
    assert torch.equal(model.fuse(x, mask, image).text, fused.text)


@pytest.mark.parametrize("fusion", ["cross", "single"])
def test_buckets_match_the_whole_batch_at_real_positions_and_are_zero_past_them(tok, fusion):
    ids, mask = _text_batch(tok, [3, 12, 7, 20, 5, 9], T=24)
    image = torch.randn(6, 17, 32)
    whole, bucketed = _tiny_model(tok, 1, fusion), _tiny_model(tok, 2, fusion)
    real = mask.bool()
    h1, h2 = whole.encode_text(ids, mask), bucketed.encode_text(ids, mask)
    torch.testing.assert_close(h2[real], h1[real], rtol=1e-5, atol=1e-5)
    # rows sorted by length [3, 5, 7 | 9, 12, 20]: the short bucket is cut at 7 tokens, the long one at 20
    assert h2[[0, 2, 4], 7:].abs().max() == 0 and h2[[1, 3, 5], 20:].abs().max() == 0
    f1, f2 = whole.fuse(h1, mask, image), bucketed.fuse(h2, mask, image)
    torch.testing.assert_close(f2.text[real], f1.text[real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(f2.cls, f1.cls, rtol=1e-5, atol=1e-5)
    if fusion == "single":  # the image stream comes back in row order too
        torch.testing.assert_close(f2.image, f1.image, rtol=1e-5, atol=1e-5)
    # a row's result does not depend on which rows share its bucket: permuting the batch permutes the output
    perm = torch.tensor([5, 0, 3, 1, 4, 2])
    torch.testing.assert_close(bucketed.encode_text(ids[perm], mask[perm])[real[perm]], h2[perm][real[perm]],
                               rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------- the methods
def _losses_and_grads(method, batch, k: int) -> tuple[dict, dict]:
    set_buckets(method, k)
    method.zero_grad(set_to_none=True)
    out = method(batch)
    out["loss"].backward()
    grads = {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}
    return {n: v.detach().clone() for n, v in out.items()}, grads


@pytest.mark.parametrize("name", ["albef", "cmal"])
def test_method_losses_and_gradients_do_not_depend_on_the_buckets(name, world, tok):
    _, method = build(name, tok, world=world)
    # CMAL in eval mode runs all of its tasks (ITM, AMC, WRC) in one forward; no dropout either way
    method.train(name == "albef")
    batch = batch_of(world, tok, 8)
    lengths = batch.attention_mask.sum(1)
    assert int(lengths.max()) >= 2 * int(lengths.min())  # captions of mixed length: buckets cut something
    ref_out, ref_grads = _losses_and_grads(method, batch, 1)
    for k in (2, 20):  # 20 buckets for 8 rows: one bucket per distinct length
        out, grads = _losses_and_grads(method, batch, k)
        assert set(out) == set(ref_out) and set(grads) == set(ref_grads)
        for part, value in ref_out.items():
            torch.testing.assert_close(out[part], value, rtol=1e-5, atol=1e-6, msg=f"{name} {part} k={k}")
        for param, grad in ref_grads.items():
            scale = float(grad.abs().max()) or 1.0
            torch.testing.assert_close(grads[param] / scale, grad / scale, rtol=0, atol=1e-5,
                                       msg=f"{name} grad {param} k={k}")


def test_simla_faithful_quirks_refuse_buckets(tok):
    """Quirk 6 normalises MLM distillation over the sequence axis, padded positions included, so buckets (which
    zero the states there) would change it: the combination is refused, naming the fix."""
    raw = contract_config("simla").model_dump(mode="json")
    raw["method"]["faithful_quirks"] = True
    raw["model"]["text"]["max_len"] = 64
    cfg = build_config(raw, ["model.length_buckets=2"])
    model = VLModel(cfg.model, vocab_size=tok.vocab_size, pad_id=tok.pad_id)
    with pytest.raises(ValueError, match="model.length_buckets=1 or turn the flag off"):
        build_method(cfg, model, tok, class_words=world_class_words())
    cfg = build_config(raw, ["model.length_buckets=1"])
    build_method(cfg, VLModel(cfg.model, vocab_size=tok.vocab_size, pad_id=tok.pad_id), tok,
                 class_words=world_class_words())
