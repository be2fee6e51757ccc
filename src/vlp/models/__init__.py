"""Encoders, fusion, heads and region pooling shared by every method and task (torch only).

`VLModel` is the entry point; the building blocks are exported for methods that assemble their own
encoders (e.g. CMAL's single-stream encoder over region inputs).
"""

from vlp.models.fusion import FusionEncoder, FusionOutput
from vlp.models.heads import ITCProjection, ITMHead, MLMHead
from vlp.models.layers import MLP, Attention, Block
from vlp.models.minilm import load_minilm_into, minilm_dir
from vlp.models.model import VLModel
from vlp.models.roi import region_features, roi_align
from vlp.models.text import TextEncoder
from vlp.models.vit import ImageOutput, VisionTransformer

__all__ = [
    "Attention",
    "Block",
    "FusionEncoder",
    "FusionOutput",
    "ITCProjection",
    "ITMHead",
    "ImageOutput",
    "MLMHead",
    "MLP",
    "TextEncoder",
    "VLModel",
    "VisionTransformer",
    "load_minilm_into",
    "minilm_dir",
    "region_features",
    "roi_align",
]
