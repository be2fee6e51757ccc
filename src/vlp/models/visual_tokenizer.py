"""Discrete image targets for masked image modelling: k-means codes of half-resolution patches (torch only).

SIMLA's MIM (spec `simla_vlmixer.md` §1.2 (c)) predicts, at every masked ViT patch, a discrete code of that
patch. The reference takes the codes from the DALL-E dVAE (8192 codes, `argmax` of the encoder logits) run
on a 128 px view of a 256 px image: dVAE stride 8 at half resolution gives one code per 16 px ViT patch.
The dVAE weights cannot be downloaded here, so vlp ships its own tokenizer instead:

  * a patch's vector is its pixels, average-pooled by `downsample` (2: the reference's half-resolution
    view) and flattened: d = 3 * (patch_size // downsample) ** 2 values (48 for 8 px patches, 192 for 16 px);
  * the codebook is k-means (k-means++ init, Lloyd iterations) of those vectors, fitted by vlp on the
    pre-training images themselves (`vlp tokenizer image`, or by pre-training before step 0). The fit is
    deterministic given its seed and its images;
  * a patch's code is its nearest centre (squared Euclidean distance).

Quirk 1 of §1.6 is fixed by construction: the reference cuts the dVAE view from an *independent* random
crop, so the target at masked patch (i, j) usually describes another part of the image. Here the codes are
computed from the SAME (B, 3, H, W) tensor the ViT sees, downsampled by 2, so code p describes ViT patch p
(spec §4 test 11: the ViT view and the half-resolution view agree).

Honest deviation: a dVAE code has a receptive field beyond its 8x8 cell (its conv encoder sees the
neighbours), and its 8192 codes are learned to reconstruct images. A k-means code depends ONLY on the pixels
of its own patch (change anything outside patch p and code p does not move), and its vocabulary is the
`vocab_size` of the fit (512 by default in vlp's configs), so the MIM task is "predict the quantised colour
layout of a hidden patch" rather than "predict a dVAE token".

Patch order is the ViT's: row-major over the (H / patch_size, W / patch_size) grid, i.e. the order of
`conv(stride=patch_size)(x).flatten(2)`. Within a vector the layout is (channel, row, col), as a conv
weight / `F.unfold` of the pooled image.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

# distance matrices are computed in row chunks of at most this many entries (x 4 bytes: 16 MiB; small blocks stay in cache)
_CHUNK_ENTRIES = 1 << 22


def code_histogram_stats(codes: Tensor, vocab_size: int) -> dict[str, float]:
    """Usage of a code histogram: codes (any shape, long in [0, vocab_size)) ->
    {"used_codes": codes with >= 1 occurrence, "perplexity": exp(entropy of the code frequencies)}.

    Perplexity is vocab_size for a uniform histogram and 1 when one code takes everything; it is the
    usual health figure of a discrete image tokenizer (a collapsed codebook makes MIM trivial)."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    flat = codes.reshape(-1).long()
    if flat.numel() == 0:
        return {"used_codes": 0.0, "perplexity": 0.0}
    counts = torch.bincount(flat, minlength=vocab_size).double()
    p = counts / counts.sum()
    nz = p[p > 0]
    entropy = float(-(nz * nz.log()).sum())
    return {"used_codes": float((counts > 0).sum()), "perplexity": math.exp(entropy)}


class PatchTokenizer(nn.Module):
    """Discrete targets for masked image modelling: k-means codes of image patches (one per ViT patch).

    Replaces SIMLA's DALL-E dVAE (8192 codes of a 128 px view, spec §1.2 (c)) with k-means of
    half-resolution patch pixels, fitted on the pre-training images and deterministic given the seed.
    Codes come from the same image tensor the ViT sees (§1.6 quirk 1 fixed) and depend only on the
    pixels of their own patch (a dVAE code sees beyond its cell; this is a deliberate deviation).

    Buffers (persistent, so they are saved in `model.safetensors` with the method that owns them):
      codebook (K, d) float32, K = vocab_size, d = 3 * (patch_size // downsample) ** 2; zeros until fitted.
      fitted   0-d bool, True once `fit` ran (or a fitted state dict was loaded).
    """

    codebook: Tensor
    fitted: Tensor

    def __init__(self, vocab_size: int, patch_size: int, downsample: int = 2) -> None:
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("patch_size", patch_size), ("downsample", downsample)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"PatchTokenizer: {name} must be a positive int, got {value!r}")
        if patch_size % downsample != 0:
            raise ValueError(
                f"PatchTokenizer: patch_size {patch_size} is not divisible by downsample {downsample}; "
                f"each ViT patch must map to a whole number of half-resolution pixels"
            )
        self.vocab_size = vocab_size
        self.patch_size = patch_size
        self.downsample = downsample
        self.cell = patch_size // downsample
        self.dim = 3 * self.cell**2
        self.register_buffer("codebook", torch.zeros(vocab_size, self.dim, dtype=torch.float32))
        self.register_buffer("fitted", torch.tensor(False))

    def save(self, path: str | Path, **metadata: object) -> Path:
        """Write the fitted tokenizer to a safetensors file (codebook, fitted) whose metadata holds its shape
        (vocab_size, patch_size, downsample) and `metadata` (e.g. the fit statistics and images used)."""
        self._require_fitted()
        shape = {"vocab_size": self.vocab_size, "patch_size": self.patch_size, "downsample": self.downsample}
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file({"codebook": self.codebook.contiguous(), "fitted": self.fitted.clone()}, str(tmp),
                  metadata={"vlp_visual_tokenizer": json.dumps({**shape, **metadata})})
        tmp.replace(path)  # never a torn file under the final name
        return path

    def load(self, path: str | Path) -> dict[str, object]:
        """Load a file written by `save` into this tokenizer; its shape must be this tokenizer's (ValueError
        naming the file and the config keys to change otherwise). Returns the file's metadata."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"visual tokenizer file not found: {path} (write one with `vlp tokenizer image`)")
        try:
            with safe_open(str(path), framework="pt") as handle:
                meta = json.loads((handle.metadata() or {}).get("vlp_visual_tokenizer", "null"))
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        except Exception as err:  # a truncated / foreign file
            raise ValueError(f"{path}: not a visual tokenizer file written by `vlp tokenizer image` ({err})") from None
        if not isinstance(meta, dict) or set(tensors) != {"codebook", "fitted"}:
            raise ValueError(f"{path}: not a visual tokenizer file written by `vlp tokenizer image`")
        mine = {"vocab_size": self.vocab_size, "patch_size": self.patch_size, "downsample": self.downsample}
        diffs = [f"{k} {meta.get(k)} (this config: {v})" for k, v in mine.items() if meta.get(k) != v]
        if diffs:
            raise ValueError(f"{path} was fitted with " + ", ".join(diffs) + ": refit it with this config "
                             "(`vlp tokenizer image`) or set method.image_vocab_size / model.vision.patch_size / "
                             "method.tokenizer_downsample to the file's values")
        self.load_state_dict(tensors)
        return meta

    def extra_repr(self) -> str:
        return (f"vocab_size={self.vocab_size}, patch_size={self.patch_size}, downsample={self.downsample}, "
                f"dim={self.dim}, fitted={bool(self.fitted)}")

    @property
    def is_fitted(self) -> bool:
        return bool(self.fitted)

    def grid(self, image_size: int) -> int:
        """Patches per side for a square image_size x image_size input (image_size // patch_size)."""
        if image_size % self.patch_size != 0:
            raise ValueError(f"image size {image_size} is not divisible by patch_size {self.patch_size}")
        return image_size // self.patch_size

    def num_patches(self, image_size: int) -> int:
        """P = grid(image_size) ** 2, the number of codes per image (= the ViT's patch tokens)."""
        return self.grid(image_size) ** 2

    # ------------------------------------------------------------------------------------------
    # patch vectors
    # ------------------------------------------------------------------------------------------

    def patch_vectors(self, images: Tensor) -> Tensor:
        """images (B, 3, H, W) normalised floats -> (B, P, d) float32 patch vectors.

        Average-pool by `downsample` (the half-resolution view of the reference's dVAE), then cut the pooled
        image into cells of (patch_size / downsample)^2 pixels, one per ViT patch. P = (H/p) * (W/p) in
        row-major order (the ViT's token order); each vector is laid out (channel, row, col)."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"PatchTokenizer: expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
        B, _, H, W = images.shape
        if H % self.patch_size != 0 or W % self.patch_size != 0:
            raise ValueError(f"PatchTokenizer: image size {H}x{W} is not divisible by patch_size {self.patch_size}")
        x = images.float()
        if self.downsample > 1:
            x = F.avg_pool2d(x, kernel_size=self.downsample, stride=self.downsample)
        gh, gw, c = H // self.patch_size, W // self.patch_size, self.cell
        x = x.reshape(B, 3, gh, c, gw, c).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(B, gh * gw, self.dim)

    # ------------------------------------------------------------------------------------------
    # nearest centre
    # ------------------------------------------------------------------------------------------

    @staticmethod
    def _assign(vectors: Tensor, centres: Tensor) -> Tensor:
        """vectors (N, d), centres (K, d) -> (N,) long index of the nearest centre (squared L2).

        argmin_k ||x - c_k||^2 = argmin_k (||c_k||^2 - 2 x.c_k): one matmul per row chunk, so memory stays
        at about _CHUNK_ENTRIES floats whatever N and K are. Ties go to the lowest index."""
        K = centres.shape[0]
        c_sq = centres.pow(2).sum(1)
        chunk = max(1, _CHUNK_ENTRIES // max(K, 1))
        out = torch.empty(vectors.shape[0], dtype=torch.long, device=vectors.device)
        for start in range(0, vectors.shape[0], chunk):
            block = vectors[start:start + chunk]
            scores = torch.addmm(c_sq.unsqueeze(0), block, centres.t(), beta=1.0, alpha=-2.0)
            out[start:start + chunk] = scores.argmin(1)
        return out

    # ------------------------------------------------------------------------------------------
    # fitting
    # ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def fit(self, images: Tensor, iters: int = 25, seed: int = 0, max_vectors: int = 200_000) -> dict[str, float]:
        """Fit the codebook by k-means on the patch vectors of images (B, 3, H, W); returns fit statistics.

        * At most `max_vectors` patch vectors are used (a uniform subsample drawn with the seeded generator).
        * k-means++ initialisation (Arthur & Vassilvitskii 2007): the first centre uniform, each next one
          drawn with probability proportional to the squared distance to the nearest chosen centre.
        * Up to `iters` Lloyd iterations (assign all vectors, then move each centre to its members' mean);
          it stops early once no assignment changes. A code left with no member is re-seeded with the
          vectors farthest from their own centre.
        * Everything random comes from `torch.Generator().manual_seed(seed)`: the same images and seed give
          the same codebook. Centre sums are float64 and accumulated in a fixed order (CPU `index_add_`;
          elsewhere a stable sort + cumulative sums, no atomics), so reruns on one device agree bit for bit.

        Returns {"inertia": mean squared distance of a vector to its centre, "used_codes": codes with
        >= 1 member, "perplexity": exp(entropy) of the code histogram, "iterations": Lloyd steps run,
        "vectors": vectors used}. Raises ValueError when the images hold fewer distinct patch vectors
        than vocab_size (say how many images would be needed)."""
        if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
            raise ValueError(f"PatchTokenizer.fit: iters must be an int >= 0, got {iters!r}")
        K = self.vocab_size
        if max_vectors < K:
            raise ValueError(f"PatchTokenizer.fit: max_vectors {max_vectors} is below vocab_size {K}")
        with torch.autocast(images.device.type, enabled=False):
            vectors = self.patch_vectors(images)
            num_images, per_image = vectors.shape[0], vectors.shape[1]
            x = vectors.reshape(-1, self.dim).contiguous()
            gen = torch.Generator().manual_seed(int(seed))
            if x.shape[0] > max_vectors:
                keep = torch.randperm(x.shape[0], generator=gen)[:max_vectors]
                x = x[keep.to(x.device)]
            N = x.shape[0]
            if N < K:
                raise ValueError(
                    f"PatchTokenizer.fit: only {N} patch vectors ({num_images} images, {per_image} patches each), "
                    f"fewer than vocab_size={K} codes: fit on at least ~{math.ceil(K / per_image)} (varied) images, "
                    f"or use a smaller image vocabulary."
                )
            centres = self._kmeans_pp(x, gen, num_images, per_image)
            labels = self._assign(x, centres)
            iterations = 0
            for _ in range(iters):
                centres, reseeded = self._update(x, labels, centres)
                iterations += 1
                new_labels = self._assign(x, centres)
                changed = bool((new_labels != labels).any())
                labels = new_labels
                if not changed and not reseeded:
                    break
            inertia = float((x - centres[labels]).pow(2).sum(1).double().mean())
            stats = code_histogram_stats(labels, K)
        self.codebook.copy_(centres.to(self.codebook.device, self.codebook.dtype))
        self.fitted.fill_(True)
        return {"inertia": inertia, "used_codes": stats["used_codes"], "perplexity": stats["perplexity"],
                "iterations": float(iterations), "vectors": float(N)}

    def _too_few_message(self, distinct: int, n_vectors: int, num_images: int, per_image: int) -> str:
        K = self.vocab_size
        per_img = distinct / max(num_images, 1)
        need = math.ceil(K / per_img) if per_img > 0 else float("inf")
        return (
            f"PatchTokenizer.fit: only {distinct} distinct patch vectors among {n_vectors} "
            f"(from {num_images} images, {per_image} patches each"
            f"{'; a subsample of max_vectors' if n_vectors < num_images * per_image else ''}), "
            f"fewer than vocab_size={K} codes. "
            f"Fit on more (and more varied) images: at {per_img:.2f} distinct patches per image that is at "
            f"least ~{need} images; or use a smaller image vocabulary."
        )

    @staticmethod
    def _sq_dist_to(x: Tensor, point: Tensor) -> Tensor:
        """(N, d), (d,) -> (N,) squared distances summed term by term (not the matmul identity), so a vector
        equal to `point` gets exactly 0."""
        dist = torch.cdist(x, point.unsqueeze(0), compute_mode="donot_use_mm_for_euclid_dist").squeeze(1)
        return dist.mul_(dist)

    def _kmeans_pp(self, x: Tensor, gen: torch.Generator, num_images: int, per_image: int) -> Tensor:
        """k-means++ seeding: (N, d) -> (K, d) distinct centres. Distances to each new centre are exact
        ((x - c)^2 summed), so a vector equal to a chosen centre has weight exactly 0 and is never chosen
        again; when all weights are 0 before K centres exist, there are fewer distinct vectors than K."""
        N, K = x.shape[0], self.vocab_size
        idx = torch.empty(K, dtype=torch.long)
        first = int(torch.randint(N, (1,), generator=gen))
        idx[0] = first
        min_d = self._sq_dist_to(x, x[first])
        for k in range(1, K):
            cum = torch.cumsum(min_d.double(), 0)
            total = cum[-1]
            if float(total) <= 0.0:
                raise ValueError(self._too_few_message(k, N, num_images, per_image))
            u = torch.rand((), generator=gen, dtype=torch.float64).to(x.device) * total
            pick = int(torch.searchsorted(cum, u.reshape(1), right=True).clamp_(max=N - 1))
            if float(min_d[pick]) <= 0.0:  # rounding at the very end of the range: take the last positive weight
                pick = int((min_d > 0).nonzero()[-1])
            idx[k] = pick
            torch.minimum(min_d, self._sq_dist_to(x, x[pick]), out=min_d)
        return x[idx.to(x.device)].clone()

    def _update(self, x: Tensor, labels: Tensor, centres: Tensor) -> tuple[Tensor, bool]:
        """One Lloyd M-step: each centre -> the mean of its members; empty codes re-seeded with the vectors
        farthest from their current centre. Returns (new centres (K, d), whether any code was re-seeded)."""
        K = centres.shape[0]
        counts = torch.bincount(labels, minlength=K)
        if x.device.type == "cpu":  # index_add_ runs through the index in order on the CPU: deterministic
            sums = torch.zeros(K, x.shape[1], dtype=torch.float64).index_add_(0, labels, x.double())
        else:  # CUDA's index_add_ uses atomics (order varies): sorted segment sums instead
            order = torch.sort(labels, stable=True).indices
            cum = torch.cumsum(x[order].double(), 0)
            cum = torch.cat([cum.new_zeros(1, x.shape[1]), cum], 0)
            ends = torch.cumsum(counts, 0)
            sums = cum[ends] - cum[ends - counts]
        new = (sums / counts.clamp(min=1).unsqueeze(1).double()).to(centres.dtype)
        empty = counts == 0
        n_empty = int(empty.sum())
        new = torch.where(empty.unsqueeze(1), centres, new)
        if n_empty:
            dist = (x - centres[labels]).pow(2).sum(1)
            far = torch.topk(dist, min(n_empty, x.shape[0])).indices
            slots = empty.nonzero().squeeze(1)[: far.numel()]
            new[slots] = x[far]
        return new, n_empty > 0

    # ------------------------------------------------------------------------------------------
    # encode / decode
    # ------------------------------------------------------------------------------------------

    def _require_fitted(self) -> None:
        if not bool(self.fitted):
            raise RuntimeError(
                "PatchTokenizer is not fitted: its codebook is still the zero placeholder. Fit it with "
                "`vlp tokenizer image` or let pre-training fit it on its images before step 0 (or load a "
                "checkpoint whose state dict holds a fitted tokenizer)."
            )

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """images (B, 3, H, W) -> (B, P) long codes in [0, vocab_size), P = (H/p)(W/p) row-major: the MIM
        target of each ViT patch. Runs in float32 even under autocast (a bf16 argmin would flip codes)."""
        self._require_fitted()
        with torch.autocast(images.device.type, enabled=False):
            vectors = self.patch_vectors(images)
            B, P, d = vectors.shape
            codes = self._assign(vectors.reshape(B * P, d), self.codebook.to(vectors.device, torch.float32))
        return codes.reshape(B, P)

    @torch.no_grad()
    def decode(self, codes: Tensor, image_size: int) -> Tensor:
        """codes (B, P) -> (B, 3, image_size, image_size) float: each patch painted with its centre's
        half-resolution pixels, upsampled by `downsample` (nearest). For figures (what the MIM targets look
        like, `vlp show simla`); values are in the normalised space of the fitted images."""
        self._require_fitted()
        if codes.dim() != 2:
            raise ValueError(f"PatchTokenizer.decode: expected codes (B, P), got {tuple(codes.shape)}")
        g = self.grid(image_size)
        B, P = codes.shape
        if P != g * g:
            raise ValueError(f"PatchTokenizer.decode: {P} codes per image, but image_size {image_size} "
                             f"with patch_size {self.patch_size} has {g * g} patches")
        c = self.cell
        cells = self.codebook[codes.to(self.codebook.device).long()]  # (B, P, d)
        x = cells.reshape(B, g, g, 3, c, c).permute(0, 3, 1, 4, 2, 5).reshape(B, 3, g * c, g * c)
        if self.downsample > 1:
            x = x.repeat_interleave(self.downsample, dim=2).repeat_interleave(self.downsample, dim=3)
        return x
