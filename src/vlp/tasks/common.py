"""What every downstream task shares: record datasets, collation, the classifier head, the prediction loop.

A task (`vlp.tasks.ve`, `rec`, `vqa`, `nlvr2`) is three things around a pre-trained method:
  * a `RecordDataset` subclass turning its annotation records (`vlp.data.records`) + an `ImageSource`
    into items for `task_collate` (image, tokenised text, optional regions, the task's target fields);
  * a `TaskModule` (nn.Module) holding the method as `backbone` plus a head: `forward(batch)` returns
    `{"loss", ...}` (so the pre-training `Trainer` fine-tunes it unchanged: AMP, accumulation, DDP,
    exact resume) and `predict(batch)` returns per-row predictions;
  * a metric over predictions and records.

The backbone is any pre-training method exposing `encode_pair(images, input_ids, attention_mask,
region_boxes=None, region_mask=None) -> vlp.types.PairOutput` and `pair_dims -> (D, Dr)`
(`Albef`, `Cmal`). "From scratch" is the same method freshly initialised, so the comparison with a
pre-trained checkpoint isolates what pre-training buys.

Precomputed region features (`task.region_features`, cmal.md §3.1, §9: UNITER / CMAL fine-tune on the
BUTD features they pre-train on): the task's image source is then a `vlp.data.regions.RegionFeatureSource`
and every image of an item (both sides of an NLVR2 pair) becomes "region_feats" (N, D), "region_boxes"
(N, 7) and "region_labels" (N,) | None, with no "image". `task_collate` pads them (`Batch.region_feats`
(B, N, D), `region_mask`), and `TaskModule.encode` hands them to `encode_pair(..., region_feats=)`,
which only region-input methods accept (CMAL; ALBEF raises: it encodes pixels).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from vlp.data.datasets import collate
from vlp.data.records import ImageSource
from vlp.data.transforms import image_to_tensor
from vlp.tasks.retrieval import eval_mode
from vlp.types import Batch, PairOutput

# Item keys `task_collate` turns into Batch fields (each all-or-nothing over a batch).
TASK_FIELDS = {"label": "labels", "answers": "answers", "target_box": "target_boxes", "pair_index": "pair_index"}


class RecordDataset(Dataset):
    """Map-style dataset over task records: row i -> `item(records[i])` plus the bookkeeping `collate` needs.

    Subclasses implement `item(record) -> dict` using `image_item` and `text_ids`; `__getitem__` adds
    `pad_id`, `row` (-> `Batch.sample_keys`) and, unless the item set it, `image_id` = the row (rows are
    not ITC positives of each other in fine-tuning).

    Args:
        records: task records (`vlp.data.records`).
        images: resolves `image_id` -> PIL image; when it also has `regions(image_id) -> (boxes (N,4)
            normalised xyxy, labels (N,) class id + 1 or None)`, items carry them (single-stream
            methods such as CMAL take regions as input; the world provides its object boxes). Or a
            source of precomputed regions (`region_features(image_id) -> RegionRecord`, e.g.
            `vlp.data.regions.RegionFeatureSource`): items carry those instead of pixels, and every
            record's image is checked to have features at construction (FileNotFoundError naming a few
            missing ids and where they were looked for).
        tokenizer: `TextTokenizer`; max_len: token cap; image_size: resize side (None = keep).
    """

    def __init__(self, records: Sequence[Any], images: ImageSource, tokenizer: Any, max_len: int = 40,
                 image_size: Optional[int] = None) -> None:
        if len(records) == 0:
            raise ValueError(f"{type(self).__name__}: no records (check the annotation file / split)")
        self.records = list(records)
        self.images = images
        self.tokenizer = tokenizer
        self.max_len = max_len
        self.image_size = image_size
        if self.feature_source is not None and hasattr(images, "missing"):
            needed = [i for record in self.records for i in self.record_image_ids(record)]
            missing = images.missing(needed)
            if missing:
                total = len(dict.fromkeys(needed))
                what = f"these {len(self.records)} {type(self).__name__} records"
                message = (images.missing_message(missing, total, what) if hasattr(images, "missing_message")
                           else f"no region features for {len(missing)} images of {what}, e.g. {missing[:3]}")
                raise FileNotFoundError(message)

    @property
    def feature_source(self) -> Any:
        """The image source when it yields precomputed regions (has `region_features`), else None."""
        return self.images if callable(getattr(self.images, "region_features", None)) else None

    @classmethod
    def record_image_ids(cls, record: Any) -> tuple[str, ...]:
        """The image ids an item of `record` reads (one; NLVR2: left and right)."""
        return (record.image_id,)

    def __len__(self) -> int:
        return len(self.records)

    def item(self, record: Any) -> dict[str, Any]:
        raise NotImplementedError(f"{type(self).__name__} must implement item(record)")

    def __getitem__(self, row: int) -> dict[str, Any]:
        item = self.item(self.records[row])
        item.setdefault("image_id", row)
        item["row"] = row
        item["pad_id"] = self.tokenizer.pad_id
        return item

    def text_ids(self, text: str) -> Tensor:
        """(T,) `[CLS] ... [SEP]` ids of `text` (normalised as captions are, cut to max_len)."""
        ids, _ = self.tokenizer.encode([text], self.max_len, max_words=self.max_len)
        return ids[0]

    def image_item(self, image_id: str, with_regions: bool = True) -> dict[str, Any]:
        """{"image": (3,H,W)} plus, with `with_regions`, "region_boxes" (N,4) / "region_labels" (N,) when the
        source knows them (a task with regions of its own, REC, asks for none).

        With a source of precomputed regions (`feature_source`) the image IS its regions, whatever
        `with_regions` says: {"region_feats" (N, D) float32, "region_boxes" (N, 7) float32 normalised
        [x1, y1, x2, y2, w, h, w*h], "region_labels" (N,) long | None}, no "image".
        """
        source = self.feature_source
        if source is not None:
            record = source.region_features(image_id)
            return {"region_feats": torch.from_numpy(record.features), "region_boxes": torch.from_numpy(record.boxes),
                    "region_labels": None if record.labels is None else torch.from_numpy(record.labels)}
        item: dict[str, Any] = {"image": image_to_tensor(self.images.load(image_id), self.image_size)}
        regions = getattr(self.images, "regions", None) if with_regions else None
        if regions is not None:
            boxes, labels = regions(image_id)
            item["region_boxes"] = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
            item["region_labels"] = None if labels is None else torch.as_tensor(labels, dtype=torch.long)
        return item


def task_collate(items: Sequence[dict[str, Any]]) -> Batch:
    """`vlp.data.datasets.collate` plus the task targets: "label" -> labels (B,), "answers" -> answers
    (B, A) float, "target_box" -> target_boxes (B, 4), "pair_index" -> pair_index (B,). An item whose
    "pair" key holds a list of sub-items (NLVR2: left and right image) contributes one row per sub-item,
    in order, so rows 2k and 2k+1 of a batch are the two images of one example."""
    rows: list[dict[str, Any]] = []
    for item in items:
        rows.extend(item["pair"] if "pair" in item else [item])
    batch = collate([{k: v for k, v in row.items() if k not in TASK_FIELDS} for row in rows])
    for key, name in TASK_FIELDS.items():
        present = sum(key in row for row in rows)
        if present == 0:
            continue
        if present != len(rows):
            raise ValueError(f"task_collate: {present} of {len(rows)} rows have '{key}'; a batch comes from one task")
        values = [row[key] for row in rows]
        if isinstance(values[0], Tensor):
            setattr(batch, name, torch.stack(values))
        else:
            dtype = torch.float32 if isinstance(values[0], float) else torch.long
            setattr(batch, name, torch.tensor(values, dtype=dtype))
    return batch


class ClassifierHead(nn.Module):
    """MLP on a pooled pair vector: D -> hidden, GELU, LayerNorm, -> K (UNITER / CMAL's VE, VQA and NLVR2
    heads, cmal.md §9: 768 -> 1536 -> 3 for SNLI-VE; hidden = 2·D)."""

    def __init__(self, in_dim: int, num_classes: int, hidden: Optional[int] = None, dropout: float = 0.1) -> None:
        super().__init__()
        hidden = hidden or 2 * in_dim
        self.net = nn.Sequential(nn.Dropout(dropout), nn.Linear(in_dim, hidden), nn.GELU(),
                                 nn.LayerNorm(hidden, eps=1e-12), nn.Linear(hidden, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class TaskModule(nn.Module):
    """A pre-trained method (`backbone`) + a task head. Subclasses implement `forward(batch) -> dict` with a
    differentiable "loss" and `predict(batch) -> Tensor` (one prediction per example)."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        if not hasattr(backbone, "encode_pair"):
            raise TypeError(f"{type(backbone).__name__} has no encode_pair(); downstream tasks need a method "
                            "that exposes one (Albef, Cmal)")
        self.backbone = backbone

    def encode(self, batch: Batch, with_regions: bool = False) -> PairOutput:
        """`backbone.encode_pair` on the batch; regions (boxes + mask) are passed when `with_regions` or when
        the backbone needs them as input (single-stream: `backbone.needs_regions`).

        A batch of precomputed regions (`batch.region_feats` (B, N, D), no images) always passes them with
        their boxes (B, N, 7) and mask (B, N): `encode_pair(None, ids, mask, boxes, region_mask,
        region_feats=feats)`; a backbone that encodes pixels raises there.
        """
        if batch.region_feats is not None:
            if batch.region_boxes is None:
                raise ValueError("a batch with region_feats needs region_boxes (every precomputed region has a box)")
            return self.backbone.encode_pair(batch.images, batch.input_ids, batch.attention_mask, batch.region_boxes,
                                             batch.region_mask, region_feats=batch.region_feats)
        if batch.images is None:
            raise ValueError("downstream tasks need images in the batch (or precomputed region_feats: "
                             "task.region_features)")
        pass_regions = with_regions or getattr(self.backbone, "needs_regions", False)
        boxes = batch.region_boxes if pass_regions else None
        mask = batch.region_mask if pass_regions else None
        return self.backbone.encode_pair(batch.images, batch.input_ids, batch.attention_mask, boxes, mask)

    def predict(self, batch: Batch) -> Tensor:
        raise NotImplementedError


def predictions(module: TaskModule, dataset: Dataset, batch_size: int = 64, device: torch.device | str = "cpu",
                collate_fn: Callable[[Sequence[dict[str, Any]]], Batch] = task_collate,
                amp_dtype: Optional[torch.dtype] = None) -> Tensor:
    """`module.predict` over a whole dataset in order (eval mode, no grad) -> concatenated predictions (cpu)."""
    device = torch.device(device)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_fn)
    outs = []
    with eval_mode(module), torch.no_grad():
        for batch in loader:
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                outs.append(module.predict(batch.to(device)).cpu())
    return torch.cat(outs)


def accuracy(pred: Tensor, target: Tensor) -> float:
    """100 · mean(pred == target)."""
    if pred.shape != target.shape:
        raise ValueError(f"accuracy: prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    return 100.0 * float((pred == target).float().mean()) if pred.numel() else float("nan")


__all__ = ["ClassifierHead", "RecordDataset", "TaskModule", "accuracy", "predictions", "task_collate"]
