"""Image -> tensor conversion shared by every dataset (no torchvision dependency).

Normalisation: the default is mean 0.5 / std 0.5 per channel (pixels mapped to [-1, 1]). The ViTs in
vlp are trained from scratch on the embedded world, whose synthetic colours do not follow ImageNet/CLIP
statistics, so a symmetric range is the neutral choice (as in BEiT/ViT-from-scratch recipes). Real photos
fed to a model pre-trained with CLIP/ALBEF statistics should pass `mean=CLIP_MEAN, std=CLIP_STD`
(ALBEF and BLIP use exactly these constants).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

HALF_MEAN: tuple[float, float, float] = (0.5, 0.5, 0.5)
HALF_STD: tuple[float, float, float] = (0.5, 0.5, 0.5)
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)


def _as_uint8_hwc(image: np.ndarray | Image.Image, size: int | None) -> np.ndarray:
    """Validate and (optionally) resize to size x size with Pillow bicubic; returns uint8 (H, W, 3)."""
    if size is not None and (not isinstance(size, int) or size < 1):
        raise ValueError(f"image size must be a positive int or None, got {size!r}")
    if isinstance(image, Image.Image):
        pil = image.convert("RGB") if image.mode != "RGB" else image
    elif isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(
                f"expected a uint8 array of shape (H, W, 3), got dtype {image.dtype} shape {image.shape}"
            )
        if size is None or image.shape[:2] == (size, size):
            return image
        pil = Image.fromarray(image)
    else:
        raise TypeError(f"expected a numpy uint8 (H, W, 3) array or a PIL image, got {type(image).__name__}")
    if size is not None and pil.size != (size, size):
        pil = pil.resize((size, size), resample=Image.Resampling.BICUBIC)
    return np.array(pil, dtype=np.uint8)  # a writable copy (np.asarray of a PIL image is read-only)


def image_to_tensor(
    image: np.ndarray | Image.Image,
    size: int | None = None,
    mean: Sequence[float] = HALF_MEAN,
    std: Sequence[float] = HALF_STD,
) -> Tensor:
    """uint8 (H, W, 3) array or PIL image -> float32 tensor (3, size, size) (or (3, H, W) if size is None).

    Pixels are scaled to [0, 1] then normalised per channel: (x - mean) / std. Resizing (only when the
    image is not already size x size) uses Pillow bicubic, as ALBEF's `transforms.Resize(..., BICUBIC)`.
    """
    if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
        raise ValueError(f"mean and std need 3 channels with std > 0, got mean={mean} std={std}")
    array = _as_uint8_hwc(image, size)
    tensor = torch.tensor(np.ascontiguousarray(array)).permute(2, 0, 1).to(torch.float32).div_(255.0)  # a copy: cached images are read-only
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return tensor.sub_(mean_t).div_(std_t)


def tensor_to_image(tensor: Tensor, mean: Sequence[float] = HALF_MEAN, std: Sequence[float] = HALF_STD) -> np.ndarray:
    """Inverse of `image_to_tensor` (for visualisation): (3, H, W) float -> uint8 (H, W, 3)."""
    if tensor.dim() != 3 or tensor.shape[0] != 3:
        raise ValueError(f"expected a (3, H, W) tensor, got shape {tuple(tensor.shape)}")
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    pixels = (tensor.detach().float().cpu() * std_t + mean_t).clamp(0.0, 1.0).mul(255.0).round()
    return pixels.to(torch.uint8).permute(1, 2, 0).contiguous().numpy()


def load_image(
    path: str | Path,
    size: int | None = None,
    mean: Sequence[float] = HALF_MEAN,
    std: Sequence[float] = HALF_STD,
) -> Tensor:
    """Read an image file (any Pillow format, converted to RGB) -> normalised tensor (3, size, size).

    Errors name the file: FileNotFoundError for a missing path, ValueError for an undecodable one
    (truncated download, wrong extension, ...), because one bad file in a 100k-image annotation list
    must be findable without a debugger.
    """
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"image file not found: {file}; fix the path or remove it from the annotation file")
    try:
        with Image.open(file) as img:
            img.load()
            rgb = img.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ValueError(
            f"cannot decode image {file}: {exc}: re-export it or remove it from the annotation file"
        ) from exc
    return image_to_tensor(rgb, size, mean=mean, std=std)


__all__ = ["image_to_tensor", "tensor_to_image", "load_image", "HALF_MEAN", "HALF_STD", "CLIP_MEAN", "CLIP_STD"]
