"""Using a trained run: `vlp.load(run)` in Python, `vlp embed` for folders of images and files of texts.

    import vlp
    from PIL import Image

    model = vlp.load("runs/albef")                     # a `vlp pretrain` or `vlp finetune` run directory
    image = Image.open("scene.png")
    model.rank_texts(image, ["a red circle", "a blue star"])   # [(1, 0.41), (0, 0.12)]: (index, score), best first
    model.score(image, "a blue star")                  # one float
    model.embed_text(["a red circle"])                 # (1, E), unit norm (methods with ITC)

`load` rebuilds the run's method from its checkpoint with the functions training and evaluation use
(`vlp.build.checkpoint_dir`, `load_checkpoint_method`; a fine-tuned task run: `vlp.finetune.build_task` +
`vlp.train.checkpoint.load_model_weights`), puts it in eval mode on `device` (cpu by default) and runs in
fp32 without gradients. What it returns (`InferenceModel`) carries the run's own `preprocess` (PIL image
or uint8 (H, W, 3) array -> (3, S, S) float tensor: bicubic resize to the config's `model.vision.image_size`,
pixels mapped to [-1, 1], exactly as training and evaluation read images, `vlp.data.transforms`) and
`tokenizer` (its `tokenizer.json`; texts are cut to `data.max_text_len` like retrieval evaluation's).

Scoring follows the retrieval protocol the method's class declares (`retrieval_protocols`):
  * a method with ITC (ALBEF, SIMLA, CLIP: protocols "itc" / "itc_itm") scores a pair by the cosine of its
    L2-normalised ITC embeddings (`embed_image`, `embed_text`), as retrieval's first stage;
  * a method without ITC (CMAL, UNITER, VLMixer: "itm_all") has no joint embedding space: it scores a pair
    by its ITM head's matched-class logit over the joint sequence (`itm_pair_inputs` once per image,
    `itm_pair_scores` per pair), as its retrieval does; `embed_image` / `embed_text` raise ValueError,
    unless it was trained with a first retrieval stage (`method.first_stage`, `vlp.models.first_stage`):
    then they return the first stage's embeddings and `by="itc"` scores by their cosine.
  `by="itm"` scores a method with both by its ITM head (ALBEF's re-ranking score, here over every candidate)
  and `by="itc"` asks for ITC explicitly; asking for a head the method lacks is a ValueError.

Region methods (single stream over [text ; regions]) need region boxes; a user image has none, so it is read
as a `method.grid_regions` x `method.grid_regions` grid of cells (label 0), RoI-pooled like any box — what
their evaluation on user files (`vlp eval retrieval --data files`) and `encode_pair` do without boxes
(cmal.md §11.1). A model pre-trained on the world's object boxes therefore sees other regions here than in
training, and scores less sharply than on boxed images. A run pre-trained on precomputed detector features
(`method.region_feat_dim` > 0) reads no pixels at all: its image calls raise ValueError.

A fine-tuned task run (`vlp finetune ve|vqa|nlvr2|rec`) also loads its head: `task`, `labels` (the head's
class names from the run's `task.json`, e.g. the VQA answers) and `predict(image, text)` for the
single-image classification tasks (VE, VQA); `vlp predict` (`vlp.predict`) scores whole annotation files.
The scoring calls use its fine-tuned backbone. `export_embeddings` is `vlp embed`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from torch import Tensor

from vlp.build import build_run_method, checkpoint_dir, load_checkpoint_method
from vlp.config import RunConfig, load_config
from vlp.data.records import TaskData
from vlp.data.tokenizer import TextTokenizer
from vlp.data.transforms import image_to_tensor, load_image
from vlp.evaluate import has_itc
from vlp.finetune import build_task, read_task_info
from vlp.methods import PretrainMethod
from vlp.taskdata import task_data
from vlp.tasks.common import TaskModule, task_collate
from vlp.tasks.retrieval import fused_itm_pairs, score_pair_rows
from vlp.tasks.registry import TASKS
from vlp.train.checkpoint import MODEL_FILE, load_model_weights
from vlp.train.launch import select_device

ImageInput = Union[Image.Image, np.ndarray, str, Path]

# Class probabilities (B', K) of a fine-tuned task module on a batch, per task: the softmax of the VE /
# NLVR2 logits (NLVR2: one row per example), the sigmoid of each VQA answer's logit (the head is trained
# with binary cross-entropy per answer), the softmax over REC's candidate regions (padding gets 0). Their
# argmax is the module's `predict`.
TASK_PROBABILITIES: dict[str, Callable[[TaskModule, Any], Tensor]] = {
    "ve": lambda module, batch: module.logits(batch).float().softmax(dim=-1),
    "nlvr2": lambda module, batch: module.logits(batch).float().softmax(dim=-1),
    "vqa": lambda module, batch: module.logits(batch).float().sigmoid(),
    "rec": lambda module, batch: module.scores(batch).float().softmax(dim=-1),
}
SINGLE_IMAGE_CLASSIFIERS = ("ve", "vqa")  # tasks `InferenceModel.predict(image, text)` answers


def _holds_task_module(ckpt: Path) -> bool:
    """Whether a checkpoint's weights are a task module (`backbone.*` + a head): how a fine-tune written
    before `task.json` existed is recognised. Reads only the safetensors header."""
    with safe_open(str(ckpt / MODEL_FILE), framework="pt") as handle:
        return any(key.startswith("backbone.") for key in handle.keys())


def load_run(run: str | Path, overrides: Optional[list[str]] = None
             ) -> tuple[RunConfig, TextTokenizer, PretrainMethod, Optional[TaskModule], Optional[list[str]]]:
    """(config (+ `overrides`), tokenizer, method, task module or None, head class names or None) of a run.

    A pre-training or retrieval fine-tuning run is its method (`load_checkpoint_method`, strict). A task
    fine-tuning run is rebuilt as `vlp eval TASK` does (`build_task` around the run's method, all weights
    strict), with the class names of its `task.json`; a run written before `task.json` existed gets them
    from its training data, as `vlp eval TASK` does (VQA: the answer vocabulary)."""
    ckpt = checkpoint_dir(run)
    info = read_task_info(ckpt)
    if not (info["task"] in TASKS if info is not None else _holds_task_module(ckpt)):
        cfg, tokenizer, method = load_checkpoint_method(ckpt, overrides)
        return cfg, tokenizer, method, None, None
    cfg = load_config(ckpt / "config.yaml", overrides)
    tokenizer = TextTokenizer.load(ckpt / "tokenizer.json")
    method = build_run_method(cfg, tokenizer)
    spec = TASKS[cfg.task.name]
    if info is not None and info.get("labels") is not None:
        data = TaskData(cfg.task.name)
        spec.restore_labels(data, info["labels"])
    elif info is not None:  # a task without classes (REC)
        data = TaskData(cfg.task.name)
    else:
        data = task_data(cfg)
    module = build_task(cfg, method, data)
    load_model_weights(ckpt, module)
    return cfg, tokenizer, method, module, spec.labels(cfg, data)


def _device(device: str | torch.device) -> torch.device:
    """"auto" / "cpu" / "cuda" through the trainer's resolver, anything else (e.g. "cuda:1") as torch reads it."""
    if isinstance(device, str) and device in ("auto", "cpu", "cuda"):
        return select_device(device)
    return torch.device(device)


def load(run: str | Path, device: str | torch.device = "cpu", overrides: Optional[list[str]] = None) -> "InferenceModel":
    """A trained run, ready for inference (module docstring).

    Args:
        run: a `vlp pretrain` or `vlp finetune` run directory, or its `checkpoint/`.
        device: "cpu" (default), "cuda", "auto" (CUDA when available) or a torch device.
        overrides: `--set`-style config overrides applied to the run's config (e.g. ["eval.batch_size=16"]).

    Example:
        >>> import vlp
        >>> model = vlp.load("runs/albef")
        >>> model.rank_texts(Image.open("scene.png"), ["a red circle", "a blue star"])
        [(1, 0.41), (0, 0.12)]
    """
    cfg, tokenizer, method, module, labels = load_run(run, overrides)
    return InferenceModel(cfg, tokenizer, method, module=module, labels=labels, device=_device(device))


class InferenceModel:
    """A trained method in eval mode with its run's preprocessing and tokenizer (built by `load`).

    Attributes: `cfg` (the run's config), `method` (the `PretrainMethod`), `tokenizer`, `preprocess`,
    `device`, `batch_size` (images / texts / pairs per forward), `scoring` ("itc" or "itm": what `score`
    and `rank_*` use by default), `task` / `labels` / `module` (a fine-tuned task run's task, head class
    names and task module; None otherwise). Image arguments are PIL images, uint8 (H, W, 3) arrays or
    image file paths; a single image or text is accepted where a list is expected.
    """

    def __init__(self, cfg: RunConfig, tokenizer: TextTokenizer, method: PretrainMethod,
                 module: Optional[TaskModule] = None, labels: Optional[list[str]] = None,
                 device: torch.device | str = "cpu", batch_size: int = 64) -> None:
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.module = None if module is None else module.to(self.device).eval()
        self.method = method.to(self.device).eval()
        self.task = None if module is None else cfg.task.name
        self.labels = labels
        self.batch_size = batch_size
        self.image_size = int(cfg.model.vision.image_size)
        protocols = tuple(type(method).retrieval_protocols)
        # a single-stream method trained with a first retrieval stage (`method.first_stage`,
        # vlp.models.first_stage) has embeddings too: its first stage's; it still scores by ITM by default
        self.first_stage = getattr(method, "first_stage", None) is not None
        self.has_itc = has_itc(method) or self.first_stage
        self.has_itm = "itm_all" in protocols or "itc_itm" in protocols
        self.scoring = "itc" if has_itc(method) else "itm"
        feature_dim = type(method).region_feature_dim(cfg)
        self.reads_pixels = not feature_dim  # None (pixels only) or 0 (regions pooled from the pixels)

    def __repr__(self) -> str:
        task = f", task={self.task!r}" if self.task else ""
        return (f"InferenceModel(method={self.cfg.method.name!r}{task}, scoring={self.scoring!r}, "
                f"image_size={self.image_size}, device={str(self.device)!r})")

    # ------------------------------------------------------------------------------ inputs
    def preprocess(self, image: Image.Image | np.ndarray) -> Tensor:
        """PIL image or uint8 (H, W, 3) array -> (3, S, S) float32: the run's resize and normalisation."""
        return image_to_tensor(image, self.image_size)

    def _pixels(self, images: ImageInput | Sequence[ImageInput]) -> Tensor:
        """(N, 3, S, S) on the device; a path is read with `load_image` (errors name the file)."""
        if not self.reads_pixels:
            raise ValueError(
                f"this {self.cfg.method.name} run reads precomputed detector region features "
                f"(method.region_feat_dim={self.cfg.method.region_feat_dim}), not pixels: it cannot encode an "
                f"image; score its regions with `vlp eval` / `vlp finetune` and task.region_features instead")
        items = [images] if isinstance(images, (Image.Image, np.ndarray, str, Path)) else list(images)
        if not items:
            raise ValueError("no images given: pass a PIL image or a list of them")
        tensors = [load_image(x, self.image_size) if isinstance(x, (str, Path)) else self.preprocess(x) for x in items]
        return torch.stack(tensors).to(self.device)

    def tokenize(self, texts: str | Sequence[str]) -> tuple[Tensor, Tensor]:
        """(input_ids, attention_mask) (N, T) on the device: the run's tokenizer, `data.max_text_len` tokens."""
        items = [texts] if isinstance(texts, str) else list(texts)
        if not items:
            raise ValueError("no texts given: pass a str or a list of them")
        max_len = self.cfg.data.max_text_len
        ids, mask = self.tokenizer.encode(items, max_len, max_words=max_len)
        return ids.to(self.device), mask.to(self.device)

    # ------------------------------------------------------------------------------ embeddings (ITC)
    def require_itc(self, what: str) -> None:
        """ValueError, naming the method and what to use instead, unless the method has ITC embeddings."""
        if not self.has_itc:
            protocols = ", ".join(type(self.method).retrieval_protocols) or "none"
            raise ValueError(
                f"{what}: method {self.cfg.method.name!r} has no joint embedding space (no ITC; it matches an "
                f"image and a text with its ITM head over the joint sequence, retrieval protocol {protocols}): "
                f"use score / rank_texts / rank_images instead")

    @torch.no_grad()
    def embed_pixels(self, pixels: Tensor) -> Tensor:
        """ITC embeddings (N, E) float32 on the CPU of preprocessed images (N, 3, S, S), L2-normalised."""
        self.require_itc("embed_image")
        if self.first_stage:  # regions of a user image: grid cells, as `itm_pair_inputs` reads it
            return torch.cat([self.method.first_stage_image_embeds(
                *self.method.itm_pair_inputs(pixels[s : s + self.batch_size].to(self.device), None, None)).float()
                for s in range(0, pixels.shape[0], self.batch_size)]).cpu()
        model = self.method.itc_model
        out = [model.image_embed(model.encode_image(pixels[s : s + self.batch_size].to(self.device)).tokens).float()
               for s in range(0, pixels.shape[0], self.batch_size)]
        return torch.cat(out).cpu()

    def embed_image(self, images: ImageInput | Sequence[ImageInput]) -> Tensor:
        """L2-normalised ITC embeddings (N, E) float32 (CPU) of N images (ValueError without ITC)."""
        self.require_itc("embed_image")
        return self.embed_pixels(self._pixels(images))

    @torch.no_grad()
    def embed_text(self, texts: str | Sequence[str]) -> Tensor:
        """L2-normalised ITC embeddings (N, E) float32 (CPU) of N texts (ValueError without ITC)."""
        self.require_itc("embed_text")
        ids, mask = self.tokenize(texts)
        if self.first_stage:
            return torch.cat([self.method.first_stage_text_embeds(ids[s : s + self.batch_size],
                                                                  mask[s : s + self.batch_size]).float()
                              for s in range(0, ids.shape[0], self.batch_size)]).cpu()
        model = self.method.itc_model
        out = [model.text_embed(model.encode_text(ids[s : s + self.batch_size], mask[s : s + self.batch_size])).float()
               for s in range(0, ids.shape[0], self.batch_size)]
        return torch.cat(out).cpu()

    # ------------------------------------------------------------------------------ scoring
    def _scoring(self, by: Optional[str]) -> str:
        by = self.scoring if by is None else by
        if by not in ("itc", "itm"):
            raise ValueError(f"by must be 'itc' or 'itm' (or None: the method's own, {self.scoring!r}), got {by!r}")
        if by == "itc":
            self.require_itc("scoring by ITC")
        elif not self.has_itm:
            raise ValueError(f"method {self.cfg.method.name!r} has no ITM head: score by ITC (by='itc' or None)")
        return by

    @torch.no_grad()
    def _itm_matrix(self, pixels: Tensor, ids: Tensor, mask: Tensor) -> Tensor:
        """ITM matched-class logits (I, T) of every (image, text) pair, through retrieval's own pair scoring
        (chunks of `batch_size` pairs in order of text length): the method's `itm_pair_inputs` once per image
        (grid-cell regions for region methods) scored by `itm_pair_scores` (`score_pair_rows`, "itm_all"), or
        the ITC towers' outputs fused by `itc_model.fuse` + `itm_logits` (`fused_itm_pairs`, "itc_itm" only)."""
        method, bs = self.method, self.batch_size
        n_images, n_texts = pixels.shape[0], ids.shape[0]
        img_idx = torch.arange(n_images).repeat_interleave(n_texts)
        txt_idx = torch.arange(n_texts).repeat(n_images)
        if "itm_all" in type(method).retrieval_protocols:
            parts = [method.itm_pair_inputs(pixels[s : s + bs], None, None) for s in range(0, pixels.shape[0], bs)]
            rows = [None if parts[0][j] is None else torch.cat([p[j] for p in parts]) for j in range(len(parts[0]))]
            scores = score_pair_rows(method.itm_pair_scores, rows, img_idx, ids, mask, txt_idx, bs, self.device, None)
        else:
            model = method.itc_model
            tokens = torch.cat([model.encode_image(pixels[s : s + bs]).tokens for s in range(0, pixels.shape[0], bs)])
            hidden = torch.cat([model.encode_text(ids[s : s + bs], mask[s : s + bs]) for s in range(0, ids.shape[0], bs)])
            scores = fused_itm_pairs(model, tokens, hidden, mask, img_idx.to(self.device), txt_idx.to(self.device),
                                     bs, self.device, None)
        return scores.float().view(n_images, n_texts).cpu()

    def score_matrix(self, images: ImageInput | Sequence[ImageInput], texts: str | Sequence[str],
                     by: Optional[str] = None) -> Tensor:
        """Scores (I, T) float32 of every (image, text) pair, higher = a better match: ITC cosine in
        [-1, 1] or the ITM matched-class logit (`by`, default the method's own `scoring`)."""
        by = self._scoring(by)
        if by == "itc":
            return self.embed_image(images) @ self.embed_text(texts).T
        ids, mask = self.tokenize(texts)
        return self._itm_matrix(self._pixels(images), ids, mask)

    def score(self, image: ImageInput, text: str, by: Optional[str] = None) -> float:
        """The score of one (image, text) pair (`score_matrix`)."""
        if not isinstance(text, str):
            raise TypeError(f"score takes one text (a str), got {type(text).__name__}; rank_texts scores a list")
        return float(self.score_matrix([image], [text], by)[0, 0])

    def rank_texts(self, image: ImageInput, texts: Sequence[str], by: Optional[str] = None) -> list[tuple[int, float]]:
        """[(index into texts, score)] of every text against one image, best first (ties: lower index first)."""
        return _ranked(self.score_matrix([image], texts, by)[0])

    def rank_images(self, text: str, images: Sequence[ImageInput], by: Optional[str] = None) -> list[tuple[int, float]]:
        """[(index into images, score)] of every image against one text, best first (ties: lower index first)."""
        if not isinstance(text, str):
            raise TypeError(f"rank_images takes one text (a str), got {type(text).__name__}")
        return _ranked(self.score_matrix(images, [text], by)[:, 0])

    # ------------------------------------------------------------------------------ fine-tuned heads
    @torch.no_grad()
    def predict(self, image: ImageInput, text: str) -> tuple[str, float]:
        """(label, probability) of a fine-tuned VE / VQA run for one image and one text (hypothesis or
        question): the head's arg-max class name (`labels`) and its probability (`TASK_PROBABILITIES`)."""
        if self.module is None:
            raise ValueError("predict needs a fine-tuned task run (`vlp finetune ve|vqa`); this run is a "
                             "pre-training run: use score / rank_texts / rank_images")
        if self.task not in SINGLE_IMAGE_CLASSIFIERS:
            raise ValueError(f"predict(image, text) answers {' / '.join(SINGLE_IMAGE_CLASSIFIERS)} runs; a {self.task} "
                             f"run predicts from annotation files: vlp predict {self.task} --run DIR ...")
        ids, _ = self.tokenize([text])
        item = {"image": self._pixels([image])[0].cpu(), "input_ids": ids[0].cpu(), "image_id": 0, "row": 0,
                "pad_id": self.tokenizer.pad_id}
        probs = TASK_PROBABILITIES[self.task](self.module, task_collate([item]).to(self.device))[0]
        best = int(probs.argmax())
        return self.labels[best], float(probs[best])


def _ranked(scores: Tensor) -> list[tuple[int, float]]:
    """(index, score) pairs of a 1-D score vector, highest first; a stable sort keeps ties in index order."""
    order = torch.sort(scores, descending=True, stable=True).indices
    return [(int(i), float(scores[i])) for i in order]


# ---------------------------------------------------------------------------------- vlp embed
def image_files(folder: str | Path) -> tuple[list[Path], int]:
    """The image files of a folder (not its sub-folders), sorted by name: those whose extension Pillow
    reads; returns (files, number of other files ignored). FileNotFoundError / ValueError name the folder."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}; pass --images a directory of image files")
    readable = {ext.lower() for ext in Image.registered_extensions()}
    entries = sorted(p for p in root.iterdir() if p.is_file())
    files = [p for p in entries if p.suffix.lower() in readable]
    if not files:
        raise ValueError(f"{root} holds no image files (extensions Pillow reads, e.g. .png, .jpg)")
    return files, len(entries) - len(files)


def text_lines(file: str | Path) -> list[tuple[int, str]]:
    """(1-based line number, text) of the non-blank lines of a UTF-8 text file (one text per line)."""
    path = Path(file)
    if not path.is_file():
        raise FileNotFoundError(f"text file not found: {path}; pass --texts a file with one text per line")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text ({err}); save it as UTF-8, one text per line") from None
    rows = [(n, line.strip()) for n, line in enumerate(lines, 1) if line.strip()]
    if not rows:
        raise ValueError(f"{path} holds no text: give one text per line")
    return rows


def _read_image(file: Path, size: int) -> Tensor:
    """`load_image` of one file of the --images folder; an undecodable one is a ValueError naming it."""
    try:
        return load_image(file, size)
    except ValueError as err:
        cause = err.__cause__ if err.__cause__ is not None else err
        raise ValueError(f"cannot decode image {file} ({cause}): re-export it or move it out of the --images "
                         f"folder") from err


def export_embeddings(run: str | Path, out: str | Path, images: str | Path | None = None,
                      texts: str | Path | None = None, device: str | torch.device = "cpu",
                      batch_size: int = 64) -> dict[str, Any]:
    """`vlp embed`: L2-normalised ITC embeddings of the image files of a folder and / or the lines of a text
    file, written to `out/`: `image_embeddings.npy` (N, E) float32 + `image_ids.json` (file names, row
    order) and `text_embeddings.npy` (M, E) float32 + `text_ids.json` ([{"line": 1-based number, "text"}],
    blank lines skipped). Everything is read and embedded before anything is written: a method without ITC
    or an unreadable image (ValueError naming the file) leaves no output. Returns what was written."""
    if images is None and texts is None:
        raise ValueError("nothing to embed: give --images FOLDER and/or --texts FILE")
    model = load(run, device)
    model.batch_size = batch_size
    model.require_itc("vlp embed")
    results: dict[str, Any] = {}
    if images is not None:
        files, ignored = image_files(images)
        chunks = [model.embed_pixels(torch.stack([_read_image(f, model.image_size) for f in files[s : s + batch_size]]))
                  for s in range(0, len(files), batch_size)]
        results["image"] = (torch.cat(chunks).numpy(), [f.name for f in files])
        results["ignored_files"] = ignored
    if texts is not None:
        rows = text_lines(texts)
        results["text"] = (model.embed_text([t for _, t in rows]).numpy(), [{"line": n, "text": t} for n, t in rows])
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"out": str(folder), "method": model.cfg.method.name}
    for kind in ("image", "text"):
        if kind in results:
            embeddings, ids = results[kind]
            np.save(folder / f"{kind}_embeddings.npy", embeddings.astype(np.float32))
            (folder / f"{kind}_ids.json").write_text(json.dumps(ids, indent=1))
            summary[f"{kind}s"] = int(embeddings.shape[0])
            summary["dim"] = int(embeddings.shape[1])
    if "ignored_files" in results:
        summary["ignored_files"] = results["ignored_files"]
    return summary


__all__ = ["InferenceModel", "SINGLE_IMAGE_CLASSIFIERS", "TASK_PROBABILITIES", "export_embeddings", "image_files",
           "load", "load_run", "text_lines"]
