"""PatchTokenizer: k-means MIM targets of half-resolution patches (spec simla_vlmixer.md §1.2 (c), §1.6 quirk 1,
§4 test 11)."""

import time

import pytest
import torch
import torch.nn.functional as F

from vlp.data.transforms import image_to_tensor
from vlp.data.world import World
from vlp.models.visual_tokenizer import PatchTokenizer, code_histogram_stats

pytestmark = pytest.mark.usefixtures("one_thread")


def _patchwise_image(colours: torch.Tensor, patch: int = 8) -> torch.Tensor:
    """colours (B, 3, g, g) -> (B, 3, g*patch, g*patch): patch (i, j) painted with colours[:, :, i, j]."""
    return colours.repeat_interleave(patch, dim=2).repeat_interleave(patch, dim=3)


def _asymmetric_image(seed: int = 0, size: int = 64) -> torch.Tensor:
    """(1, 3, size, size) in [-1, 1]: a horizontal ramp, a vertical ramp, a bright square in the top-left only,
    plus noise, so neither a flip nor a shift maps it onto itself."""
    g = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(-1, 1, size)
    img = torch.stack([ramp.expand(size, size), ramp[:, None].expand(size, size), torch.zeros(size, size)])
    img[:, 4:20, 6:18] = torch.tensor([1.0, -0.5, 0.8])[:, None, None]
    img = img + 0.3 * torch.rand(3, size, size, generator=g) - 0.15
    return img.clamp(-1, 1).unsqueeze(0)


def _random_images(n: int, seed: int, size: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


@pytest.fixture(scope="module")
def world_images() -> torch.Tensor:
    samples = World(seed=3, image_size=64, sizes={"train": 300}).split("train")
    return torch.stack([image_to_tensor(samples[i].image) for i in range(len(samples))])


# ------------------------------------------------------------------------------------------------
# patch vectors
# ------------------------------------------------------------------------------------------------


def test_patch_vectors_order_is_the_vit_token_order():
    tok = PatchTokenizer(vocab_size=4, patch_size=8)
    assert (tok.cell, tok.dim, tok.grid(64), tok.num_patches(64)) == (4, 48, 8, 64)
    colours = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    vec = tok.patch_vectors(_patchwise_image(colours))
    assert vec.shape == (2, 64, 48)
    # row p = the colour of patch p (row-major), repeated over the 4x4 half-resolution cell, layout (c, y, x)
    expected = colours.flatten(2).transpose(1, 2)  # (B, 64, 3), patch p = (p // 8, p % 8)
    assert torch.allclose(vec.reshape(2, 64, 3, 16), expected[..., None].expand(2, 64, 3, 16))
    # same order as the ViT's patch embedding: conv(stride=patch).flatten(2)
    conv = torch.nn.Conv2d(3, 3, kernel_size=8, stride=8, bias=False)
    with torch.no_grad():
        conv.weight.zero_()
        for c in range(3):
            conv.weight[c, c] = 1 / 64
        tokens = conv(_patchwise_image(colours)).flatten(2).transpose(1, 2)
    assert torch.allclose(vec.reshape(2, 64, 3, 16).mean(-1), tokens, atol=1e-6)
    # a non-constant image: equals unfold of the 2x average-pooled image (cells of 4x4, channel-major)
    images = _random_images(2, seed=1)
    ref = F.unfold(F.avg_pool2d(images, 2), kernel_size=4, stride=4).transpose(1, 2)
    assert torch.equal(tok.patch_vectors(images), ref)


def test_patch_vectors_rejects_bad_shapes():
    tok = PatchTokenizer(vocab_size=4, patch_size=8)
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        tok.patch_vectors(torch.zeros(1, 3, 60, 64))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        tok.patch_vectors(torch.zeros(3, 64, 64))


# ------------------------------------------------------------------------------------------------
# fitting
# ------------------------------------------------------------------------------------------------


def test_fit_is_deterministic_given_the_seed():
    images = _random_images(20, seed=2)
    first, second, other = (PatchTokenizer(32, 8) for _ in range(3))
    stats = first.fit(images, iters=10, seed=7)
    second.fit(images, iters=10, seed=7)
    other.fit(images, iters=10, seed=8)
    assert torch.equal(first.codebook, second.codebook)
    assert torch.equal(first.encode(images), second.encode(images))
    assert not torch.equal(first.codebook, other.codebook)
    assert set(stats) == {"inertia", "used_codes", "perplexity", "iterations", "vectors"}
    assert stats["vectors"] == 20 * 64 and 1 <= stats["iterations"] <= 10 and stats["used_codes"] == 32


def test_subsampling_uses_the_seeded_generator():
    images = _random_images(20, seed=3)
    a, b = PatchTokenizer(16, 8), PatchTokenizer(16, 8)
    stats = a.fit(images, iters=5, seed=1, max_vectors=300)
    b.fit(images, iters=5, seed=1, max_vectors=300)
    assert stats["vectors"] == 300 and torch.equal(a.codebook, b.codebook)


def test_kmeans_recovers_five_colours_up_to_a_permutation():
    g = torch.Generator().manual_seed(4)
    palette = torch.rand(5, 3, generator=g) * 2 - 1
    which = torch.randint(0, 5, (12, 8, 8), generator=g)
    which[0, 0, :5] = torch.arange(5)  # every colour occurs
    images = _patchwise_image(palette[which].permute(0, 3, 1, 2))
    tok = PatchTokenizer(vocab_size=5, patch_size=8)
    stats = tok.fit(images, seed=0)
    assert stats["inertia"] < 1e-10 and stats["used_codes"] == 5
    codes = tok.encode(images)
    assert codes.shape == (12, 64) and codes.dtype == torch.long
    truth = which.reshape(12, 64)
    mapping = {int(t): set(codes[truth == t].tolist()) for t in range(5)}
    assert all(len(found) == 1 for found in mapping.values())  # each true colour -> one code
    assert len({next(iter(found)) for found in mapping.values()}) == 5  # all codes distinct
    # decode paints the centres back: here it reproduces the images exactly
    decoded = tok.decode(codes, image_size=64)
    assert decoded.shape == images.shape and torch.allclose(decoded, images, atol=1e-6)


def test_empty_codes_are_reseeded_with_the_farthest_vectors():
    x = torch.tensor([[0.0, 0.0], [0.1, 0.0], [5.0, 5.0], [0.0, 0.2]])
    centres = torch.tensor([[0.0, 0.0], [5.0, 5.0], [9.0, 9.0]])
    labels = torch.tensor([0, 0, 0, 1])  # code 2 is empty; vector 2 is farthest from its centre (0)
    new, reseeded = PatchTokenizer._update(None, x, labels, centres)
    assert reseeded
    assert torch.allclose(new[0], x[:3].mean(0)) and torch.equal(new[1], x[3]) and torch.equal(new[2], x[2])


def test_code_histogram_stats():
    uniform = code_histogram_stats(torch.arange(8).repeat(3), 8)
    assert uniform["used_codes"] == 8 and abs(uniform["perplexity"] - 8) < 1e-9
    single = code_histogram_stats(torch.full((5, 4), 3), 8)
    assert single == {"used_codes": 1.0, "perplexity": 1.0}


# ------------------------------------------------------------------------------------------------
# shared crop (spec §4 test 11, §1.6 quirk 1): code p is a function of patch p of the ViT's own image
# ------------------------------------------------------------------------------------------------


def test_codes_come_from_the_vit_view_patch_by_patch():
    image = _asymmetric_image(seed=5)
    tok = PatchTokenizer(vocab_size=24, patch_size=8)
    tok.fit(torch.cat([image, _random_images(10, seed=6)]), seed=0)
    codes = tok.encode(image)  # (1, 64)
    # the half-resolution view (the reference's 128 px dVAE view of a 256 px ViT view) of the SAME image,
    # tokenised cell by cell with the same codebook, gives the same codes
    half = F.avg_pool2d(image, 2)  # (1, 3, 32, 32)
    half_tok = PatchTokenizer(vocab_size=24, patch_size=4, downsample=1)
    half_tok.load_state_dict(tok.state_dict())
    assert torch.equal(half_tok.encode(half), codes)
    # ... and by brute force: nearest centre of each 4x4 cell of the half-resolution view
    cells = F.unfold(half, kernel_size=4, stride=4)[0].t()  # (64, 48)
    assert torch.equal(torch.cdist(cells, tok.codebook).argmin(1), codes[0])
    # code p depends only on the pixels of patch p: image p of this batch is noise except patch p
    noise = _random_images(64, seed=7)
    keep = torch.eye(64).reshape(64, 1, 8, 8).repeat_interleave(8, 2).repeat_interleave(8, 3).bool()
    mixed = torch.where(keep, image.expand(64, -1, -1, -1), noise)
    assert torch.equal(tok.encode(mixed).diagonal(), codes[0])
    # the check has teeth: an independently flipped view (the reference's separate crop, quirk 1) disagrees
    assert (tok.encode(image.flip(-1)) != codes).float().mean() > 0.25


def test_encode_is_batch_invariant_and_ignores_autocast(world_images):
    tok = PatchTokenizer(vocab_size=32, patch_size=8)
    tok.fit(world_images[:60], iters=5, seed=0)
    batch = world_images[60:68]
    codes = tok.encode(batch)
    assert torch.equal(torch.cat([tok.encode(batch[i:i + 1]) for i in range(8)]), codes)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(tok.encode(batch), codes)


# ------------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------------


def test_errors_have_clear_messages():
    tok = PatchTokenizer(vocab_size=16, patch_size=8)
    assert not tok.is_fitted
    with pytest.raises(RuntimeError, match="not fitted.*vlp tokenizer image.*pre-training"):
        tok.encode(torch.zeros(1, 3, 64, 64))
    with pytest.raises(RuntimeError, match="not fitted"):
        tok.decode(torch.zeros(1, 64, dtype=torch.long), 64)
    with pytest.raises(ValueError, match="not divisible by downsample"):
        PatchTokenizer(vocab_size=16, patch_size=8, downsample=3)
    with pytest.raises(ValueError, match="vocab_size must be a positive int"):
        PatchTokenizer(vocab_size=0, patch_size=8)
    # 3 images of one flat colour each: 3 distinct vectors < 16 codes
    flat = torch.tensor([-1.0, 0.0, 1.0]).reshape(3, 1, 1, 1).expand(3, 3, 64, 64)
    with pytest.raises(ValueError, match=r"only 3 distinct patch vectors.*from 3 images.*at least ~16 images"):
        tok.fit(flat)
    with pytest.raises(ValueError, match="fewer than vocab_size=16"):  # fewer vectors than codes at all
        tok.fit(torch.zeros(1, 3, 16, 16))
    assert not tok.is_fitted
    with pytest.raises(ValueError, match="max_vectors"):
        tok.fit(_random_images(2, seed=0), max_vectors=8)


# ------------------------------------------------------------------------------------------------
# persistence
# ------------------------------------------------------------------------------------------------


def test_state_dict_round_trip(tmp_path):
    from safetensors.torch import load_file, save_file

    images = _random_images(8, seed=9)
    tok = PatchTokenizer(vocab_size=16, patch_size=8)
    tok.fit(images, iters=5)
    state = tok.state_dict()
    assert set(state) == {"codebook", "fitted"} and state["codebook"].shape == (16, 48)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    fresh = PatchTokenizer(vocab_size=16, patch_size=8)
    fresh.load_state_dict(load_file(str(tmp_path / "model.safetensors")))
    assert fresh.is_fitted and "fitted=True" in repr(fresh)
    assert torch.equal(fresh.encode(images), tok.encode(images))


# ------------------------------------------------------------------------------------------------
# world images
# ------------------------------------------------------------------------------------------------


def test_fit_on_world_images_is_fast_and_uses_the_codebook(world_images):
    tok = PatchTokenizer(vocab_size=64, patch_size=8)
    start = time.perf_counter()
    stats = tok.fit(world_images, seed=0)
    elapsed = time.perf_counter() - start
    assert elapsed < 10.0, f"fit took {elapsed:.1f} s"
    assert stats["used_codes"] > 32 and stats["perplexity"] > 8
    codes = tok.encode(world_images[:4])
    assert codes.shape == (4, 64) and int(codes.min()) >= 0 and int(codes.max()) < 64
    assert tok.decode(codes, 64).shape == (4, 3, 64, 64)
