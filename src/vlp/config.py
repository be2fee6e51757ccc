"""Typed, validated run configuration (architecture spec, "Config").

A run config is YAML with four sections — `model`, `method`, `data`, `train`, `eval` — loaded into
pydantic models that forbid unknown keys. `model` may be the name of a size file shipped in
`vlp/configs/models/` (`tiny`, `base`) or an inline mapping; `--set a.b=c` overrides any leaf.

Errors a user can act on:
  * unknown / mistyped key  -> ConfigError naming the dotted key and the closest valid one;
  * missing file            -> ConfigError naming the path;
  * wrong value type        -> ConfigError naming the key and what was expected.
"""

from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError

CONFIG_DIR = Path(__file__).parent / "configs"
MODEL_SIZE_DIR = CONFIG_DIR / "models"


class ConfigError(ValueError):
    """A configuration problem, phrased so the user knows what to change."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ----------------------------------------------------------------------------------------- model
class VisionConfig(Section):
    image_size: int = Field(64, ge=1)
    patch_size: int = Field(8, ge=1)
    width: int = Field(128, ge=1)
    depth: int = Field(4, ge=1)
    heads: int = Field(4, ge=1)
    mlp_ratio: float = Field(4.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)


class TextConfig(Section):
    vocab_size: Optional[int] = Field(None, ge=1)  # None: taken from the tokenizer at build time
    width: int = Field(128, ge=1)
    depth: int = Field(2, ge=0)
    heads: int = Field(4, ge=1)
    mlp_ratio: float = Field(4.0, gt=0)
    max_len: int = Field(64, ge=1)
    type_vocab: int = Field(2, ge=1)
    norm: Literal["post", "pre"] = "post"  # post-LN = BERT (required for MiniLM init)
    init: Literal["none", "minilm"] = "none"
    dropout: float = Field(0.0, ge=0, lt=1)
    # true = SIMLA's shared encoder: every layer also cross-attends to the image when given one (fusion.depth 0)
    cross_attention: bool = False


class FusionConfig(Section):
    type: Literal["cross", "single"] = "cross"  # ALBEF cross-attention | single-stream (UNITER/CMAL)
    depth: int = Field(2, ge=0)
    heads: int = Field(4, ge=1)
    mlp_ratio: float = Field(4.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)


class ModelConfig(Section):
    name: str = "custom"
    embed_dim: int = Field(64, ge=1)  # ITC projection dimension
    temperature: float = Field(0.07, gt=0)  # initial ITC temperature (learnable, clamped to [0.001, 0.5])
    init_std: float = Field(0.02, ge=0)  # truncated-normal std of Linear/Conv/Embedding weights (BERT/ViT: 0.02)
    vision: VisionConfig = Field(default_factory=VisionConfig)
    text: TextConfig = Field(default_factory=TextConfig)
    fusion: FusionConfig = Field(default_factory=FusionConfig)
    # Text, fusion and single-stream passes run on k sub-batches of similar caption length, each cut to its
    # longest caption (vlp.models.buckets): less padding, same result to float rounding. 1 = the whole batch.
    length_buckets: int = Field(1, ge=1)


# ---------------------------------------------------------------------------------------- method
class MethodConfig(Section):
    """Base of every pre-training method's `method` section: a tagged union on `name`.

    Each method declares its own subclass next to its code (`vlp/methods/<name>.py`, e.g.
    `XConfig(MethodConfig)` with `name: Literal["x"] = "x"` and its fields) and the method
    registry (`vlp.methods`) registers it here with `register_method_config`; `build_config` validates the
    section against the class its `name` selects, so a key of another method is an error naming the method
    it belongs to. `name: none` (this base class, no fields) is a run without a pre-training method
    (e.g. a trainer test); it is never registered.
    """

    name: str = "none"


# name -> the section class of a registered method (filled by `vlp.methods` at import)
METHOD_CONFIGS: dict[str, type[MethodConfig]] = {}

# The one flat `method` section of v0.1 (before sections per method): every run directory / checkpoint
# config.yaml written by v0.1 holds ALL of these keys, whatever the method. Such a dump (and only such a
# dump: a hand-written config never holds all of them) is read by dropping the keys the named method's
# section does not have (v0.1 ignored them too), so checkpoints of v0.1 still load (`_legacy_method`).
LEGACY_FLAT_METHOD_KEYS = frozenset({
    "name", "mlm_prob", "itm_hard_negatives", "momentum_distill", "momentum", "queue_size", "distill_alpha",
    "loss_weights", "region_mask_prob", "unimodal_layers", "umse_norm", "task_mixing", "task_ratio",
    "task_weights", "itm_neg_prob", "wrc_temperature", "wrc_faithful", "max_regions", "whole_image_region",
    "region_feat_dim", "grid_regions",
})

# Keys added to method sections after v0.1 whose default changed what a v0.1 run did: a v0.1 dump gets the
# value v0.1 used (its regions were RoI-pooled from the ViT grid, its WRC was a mean over anchor pairs).
LEGACY_FLAT_METHOD_DEFAULTS = {"region_source": "vit", "wrc_scale": "anchor_pairs"}
# v0.1 defaults of keys whose default has changed since (a v0.1 dump holds them at these values).
V0_1_METHOD_DEFAULTS = {"umse_norm": "sphere"}


def register_method_config(section: type[MethodConfig]) -> type[MethodConfig]:
    """Register a method's config section under the default of its `name` field (idempotent)."""
    name = section.model_fields["name"].default
    if not isinstance(name, str) or name == "none":
        raise ValueError(f"{section.__name__}.name needs a literal default naming the method, got {name!r}")
    known = METHOD_CONFIGS.get(name)
    if known is not None and known is not section:
        raise ValueError(f"method name {name!r} is already registered by {known.__name__}")
    METHOD_CONFIGS[name] = section
    return section


def method_config_class(name: str) -> type[MethodConfig]:
    """The section class of method `name` (ConfigError naming the known methods otherwise)."""
    if name == "none":
        return MethodConfig
    if name not in METHOD_CONFIGS:
        known = sorted(METHOD_CONFIGS)
        close = difflib.get_close_matches(str(name), known, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        where = "" if known else " (no method is registered: import vlp.methods, which registers the shipped ones)"
        raise ConfigError(f"unknown method.name '{name}' (known: {', '.join(known) or 'none'}){hint}{where}")
    return METHOD_CONFIGS[name]


def _legacy_method(section: dict) -> dict:
    """A v0.1 flat `method` dump (it holds every key of `LEGACY_FLAT_METHOD_KEYS`) reduced to the keys its
    method's section has, plus any other key whose value is not that key's default: v0.1 wrote the other
    methods' keys at their defaults, so a changed one (e.g. a `--set` on such a config) is kept and is then
    the usual error naming the method it belongs to, never silently dropped. Anything else is unchanged."""
    if not LEGACY_FLAT_METHOD_KEYS <= set(section):
        return section
    fields = method_config_class(str(section["name"])).model_fields
    section = {**{k: v for k, v in LEGACY_FLAT_METHOD_DEFAULTS.items() if k in fields}, **section}
    defaults: dict[str, Any] = {}
    for other in METHOD_CONFIGS.values():
        for key, value in other().model_dump(mode="json").items():
            defaults.setdefault(key, value)
    defaults.update(V0_1_METHOD_DEFAULTS)
    return {k: v for k, v in section.items() if k in fields or k not in defaults or v != defaults[k]}


# ------------------------------------------------------------------------------------------ data
class DataConfig(Section):
    # world = the embedded world; regions = captions + precomputed detector features (BUTD/UNITER npz,
    # no images); karpathy = captions JSON + image folder, no boxes (CMAL uses grid cells). See
    # vlp.data.regions.open_pretrain_source. unpaired_files = unpaired VLP on user data (an image corpus as
    # detector output in data.features + data.class_vocab, and data.sentences), vlp.data.unpaired; on the
    # world, a method declaring "unpaired_text" in its inputs reads the unpaired_images / unpaired_text splits.
    # webdataset = (image, caption) pairs streamed from tar shards (data.urls; `vlp data shard` writes them),
    # vlp.data.shards.
    source: Literal["world", "regions", "karpathy", "unpaired_files", "webdataset"] = "world"
    world_seed: int = Field(0, ge=0)  # images are rendered at model.vision.image_size
    budget: Optional[int] = Field(4000, ge=1)  # paired-data budget: first N (image, caption) rows of train; None = all
    train_images: int = Field(20000, ge=1)  # size of the train split (images); budgets are prefixes of it
    max_text_len: int = Field(40, ge=1)  # world captions reach ~35 words (one token each)
    vocab_size: int = Field(1000, ge=1)  # WordPiece vocab trained on the world's text
    tokenizer: Literal["world", "bert", "captions"] = "world"  # bert = packaged uncased vocab (MiniLM);
    # captions = WordPiece of vocab_size learnt on data.captions, class-vocabulary words forced whole tokens
    # User data (source regions | karpathy); paths relative to the working directory.
    captions: Optional[str] = None  # captions JSON: ALBEF/Karpathy list, {image_id, caption} list, or COCO
    image_root: Optional[str] = None  # karpathy: folder the captions' "image" paths are relative to
    features: Optional[str] = None  # regions: one .npz of many images, or a folder of <image_id>.npz
    class_vocab: Optional[str] = None  # regions: BUTD objects_vocab.txt (line k = class k, "alias,alias")
    sentences: Optional[str] = None  # unpaired_files: UTF-8 text corpus, one sentence per line (blank lines skipped)
    # webdataset: local shard path(s) as a brace pattern "dir/shard-{000000..000012}.tar", or a list of patterns
    urls: Optional[str | list[str]] = None
    shuffle_buffer: int = Field(1000, ge=0)  # webdataset: shuffle buffer within a shard (0 = shard order)
    tokenizer_captions: int = Field(10000, ge=1)  # webdataset + tokenizer captions: learnt on the first N captions
    region_labels_faithful: bool = False  # true = reference argmax(p[:, 1:-1]) (cmal.md §12 quirk 1)
    adaptive_regions: bool = False  # UNITER adaptive N = clip(#{conf > conf_th}, min_bb, max_bb)
    region_conf_th: float = Field(0.2, ge=0, le=1)
    region_min_bb: int = Field(10, ge=0)
    region_max_bb: int = Field(100, ge=1)
    num_workers: int = Field(0, ge=0)
    # Samples that cannot be decoded (truncated image, npz of the wrong shape or holding NaN): an error naming the
    # file, or with skip_bad (`vlp pretrain --skip-bad`; fine-tuning: task.skip_bad) dropped and counted in
    # skipped_records.json of the run; training refuses when more than max_bad_fraction of the samples it read
    # were bad (vlp.data.skips.SkipLedger; fine-tuning applies it to its training data too).
    skip_bad: bool = False
    max_bad_fraction: float = Field(0.01, ge=0, le=1)


# ----------------------------------------------------------------------------------------- train
class TrainConfig(Section):
    steps: int = Field(200, ge=1)
    batch_size: int = Field(64, ge=1)  # global batch (split across ranks and accumulation micro-batches)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(3e-4, gt=0)
    weight_decay: float = Field(0.02, ge=0)
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (0.9, 0.98)
    warmup_steps: int = Field(20, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    grad_clip: float = Field(1.0, ge=0)  # 0 = off
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # torch.compile (vlp.train.loop.compile_encoders): off (eager, the default: on a 2-core CPU one `vlp bench
    # train` run measured the compiled encoders 1.36x slower than eager and the compiled method 0.98x, README),
    # encoders (the ViT, text and fusion stacks, compiled in place: the CUDA choice), or method (the whole
    # forward of a step)
    compile: Literal["off", "encoders", "method"] = "off"
    compile_backend: str = "inductor"  # torch.compile's backend ("eager" / "aot_eager" to debug a graph break)
    # torch intra-op threads per process; 0 = auto: the cores available (affinity mask) / processes on
    # this host (torchrun) - data.num_workers, at least 1 (vlp.train.cpu; `vlp --threads N` sets it)
    threads: int = Field(0, ge=0)
    seed: int = Field(0, ge=0)
    log_every: int = Field(10, ge=1)
    eval_every: int = Field(0, ge=0)  # 0 = only at the end
    ckpt_every: int = Field(100, ge=0)  # 0 = only at the end
    out_dir: str = "runs/pretrain"
    tensorboard: bool = True
    progress: bool = True


class EvalConfig(Section):
    split: Literal["val", "test", "compositional"] = "test"
    num_images: int = Field(200, ge=0)  # 0: runs that evaluate no retrieval (files tasks) may say so
    k_rerank: int = Field(16, ge=0)  # ITC top-k re-ranked by ITM; 0 = ITC only
    batch_size: int = Field(128, ge=1)
    # Also rank fusion models (ALBEF) by their ITM score over ALL pairs (UNITER protocol, I x 5I fusion
    # forwards): the protocol single-stream methods (CMAL) are scored with, so the two compare like with like.
    itm_all: bool = False


class TaskConfig(Section):
    """Downstream fine-tuning (`vlp finetune TASK`, vlp.finetune): which task, which data, which start."""

    name: Literal["retrieval", "ve", "rec", "vqa", "nlvr2"] = "ve"
    # Pre-trained run / checkpoint directory to start from; None = the same method freshly initialised
    # ("from scratch": what pre-training buys is the difference).
    checkpoint: Optional[str] = None
    init: str = "demo"  # config (name or YAML) giving model + method when checkpoint is None
    data: str = "world"  # world | easy-vqa (vqa) | files (annotations + image_root below) | webdataset (retrieval: data.urls)
    train_size: int = Field(4000, ge=0)  # world: examples generated for training; files / easy-vqa: first N (0 = all)
    eval_size: int = Field(500, ge=0)  # per evaluation split, as train_size
    eval_splits: list[str] = Field(default_factory=lambda: ["val", "test"])
    # files: split -> annotation file (SNLI-VE / NLVR2 JSONL), or split -> [questions, annotations] (VQAv2),
    # or {refs: ..., instances: ...} (RefCOCO, all splits in one file); see README "Bring your own data"
    annotations: dict[str, str | list[str]] = Field(default_factory=dict)
    image_root: Optional[str] = None  # files: folder the records' images are relative to
    # Precomputed region features instead of pixels (cmal.md §3.1, §9; README "Downstream tasks"): one .npz
    # of many images or a folder of <image_id>.npz, the schema and data.* options (class_vocab,
    # region_labels_faithful, adaptive_regions, region_*) of pre-training's data.source: regions; D must be
    # method.region_feat_dim. Items then carry region_feats / region_boxes / region_labels and no image;
    # task.image_root is not read and every record's image must have features (else an error, or a
    # counted skip with skip_bad). Needs a region-input method (CMAL). A record's image "dir/x.jpg" is
    # looked up as dir/x.jpg, dir/x, x.jpg, then x (vlp.data.regions.RegionFeatureSource).
    region_features: Optional[str] = None
    # REC training candidates: gt | proposals (eval reports both when present); None = gt, or with
    # region_features the feature file's detector regions (the only candidates then; metric feat_acc).
    rec_boxes: Optional[Literal["gt", "proposals"]] = None
    answer_vocab_size: int = Field(0, ge=0)  # VQA: keep the K most frequent training answers (0 = all)
    skip_bad: bool = False  # count and skip malformed records instead of failing on the first
    dropout: float = Field(0.1, ge=0, lt=1)  # head dropout


class RunConfig(Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    method: SerializeAsAny[MethodConfig] = Field(default_factory=MethodConfig)  # the section of method.name
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    task: TaskConfig = Field(default_factory=TaskConfig)


# ------------------------------------------------------------------------------------- loading
def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path} (check the path; shipped configs live in {CONFIG_DIR})")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(data).__name__}")
    return data


def model_size(name: str) -> dict:
    """The model-size mapping shipped as `vlp/configs/models/<name>.yaml`."""
    path = MODEL_SIZE_DIR / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in MODEL_SIZE_DIR.glob("*.yaml"))
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"unknown model size '{name}' (known: {', '.join(known)}){hint}")
    data = _read_yaml(path)
    data.setdefault("name", name)
    return data


def _parse_scalar(text: str) -> Any:
    """`--set` values are YAML scalars: 3 -> int, 3e-4 -> float, true -> bool, [1,2] -> list."""
    value = yaml.safe_load(text)
    if isinstance(value, str):  # PyYAML reads "3e-4" (no dot) as a string
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def _valid_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        dotted = f"{prefix}{name}"
        keys.append(dotted)
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys.extend(_valid_keys(annotation, dotted + "."))
    return keys


def _foreign_owner(dotted: str, name: str) -> Optional[str]:
    """The registered method (other than `name`) whose section has the `method.`-relative key `dotted`."""
    for other, section in sorted(METHOD_CONFIGS.items()):
        if other != name and dotted in _valid_keys(section):
            return other
    return None


def _friendly(err: ValidationError, source: str, section: type[BaseModel] = None, prefix: str = "",
              method: str = "") -> ConfigError:
    """`err` of validating `section` (default: the whole RunConfig) as one ConfigError line per problem:
    unknown keys with the closest valid one, keys of another method naming it, wrong values with the input."""
    valid = _valid_keys(section or RunConfig, prefix)
    lines = []
    for item in err.errors():
        dotted = prefix + ".".join(str(p) for p in item["loc"])
        if item["type"] == "extra_forbidden":
            owner = _foreign_owner(dotted[len(prefix):], method) if prefix == "method." else None
            if owner is not None:
                lines.append(f"config key '{dotted}' belongs to method '{owner}', not to method.name '{method}': "
                             f"remove it, or set method.name: {owner}")
                continue
            close = difflib.get_close_matches(dotted, valid, n=1, cutoff=0.5)
            if not close:  # compare the leaf name within the same section
                parent = dotted.rsplit(".", 1)[0] + "." if "." in dotted else ""
                leaf = dotted.rsplit(".", 1)[-1]
                siblings = [k for k in valid if k.startswith(parent) and "." not in k[len(parent):]]
                leaves = difflib.get_close_matches(leaf, [k[len(parent):] for k in siblings], n=1, cutoff=0.4)
                close = [parent + leaves[0]] if leaves else []
            hint = f"; did you mean '{close[0]}'?" if close else ""
            lines.append(f"unknown config key '{dotted}'{hint}")
        else:
            lines.append(f"config key '{dotted}': {item['msg']} (got {item.get('input')!r})")
    return ConfigError(f"{source}: " + "; ".join(lines))


def _method_section(raw: Any, source: str) -> MethodConfig:
    """The `method` mapping validated against the section class its `name` selects (a v0.1 flat dump is
    reduced first, `_legacy_method`)."""
    if isinstance(raw, MethodConfig):
        return raw
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: config key 'method' must be a mapping with a name, got {raw!r}")
    if raw and "name" not in raw:
        raise ConfigError(f"{source}: the method section needs a name (method.name: one of "
                          f"{', '.join(sorted(METHOD_CONFIGS)) or 'the registered methods'}); its other keys depend on it")
    name = str(raw.get("name", "none"))
    try:
        section = method_config_class(name)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None
    raw = _legacy_method(raw)
    try:
        return section.model_validate(raw)
    except ValidationError as err:
        raise _friendly(err, source, section, "method.", name) from None


def build_config(raw: dict, overrides: list[str] | None = None, source: str = "config") -> RunConfig:
    """Validate a raw mapping (+ `key=value` overrides) into a `RunConfig`; the `method` section is
    validated against the class its `name` selects (`MethodConfig`)."""
    raw = copy.deepcopy(dict(raw))  # `--set` writes into nested sections: never into the caller's mapping
    if isinstance(raw.get("model", "tiny"), str) and any(str(o).strip().startswith("model.") for o in overrides or []):
        # a named size is expanded BEFORE `--set model.x=...` lands on it (else the override would replace
        # the name by a mapping holding only the override, and the model would silently be built from defaults)
        raw["model"] = model_size(str(raw.get("model", "tiny")))
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got '{item}' (example: --set train.steps=100)")
        key, text = item.split("=", 1)
        _set_dotted(raw, key.strip(), _parse_scalar(text))
    model = raw.get("model", "tiny")
    if isinstance(model, str):
        raw["model"] = model_size(model)
    elif isinstance(model, dict) and "size" in model:  # a size plus per-key overrides
        base = model_size(str(model["size"]))
        rest = {k: v for k, v in model.items() if k != "size"}
        raw["model"] = _deep_merge(base, rest)
    raw["method"] = _method_section(raw.get("method"), source)
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        raise _friendly(err, source) from None


def _deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML run config. A bare name (`albef_tiny`) resolves to a shipped config."""
    if path is None:
        raw: dict = {}
        source = "defaults"
    else:
        p = Path(path)
        if not p.is_file() and not p.suffix and (CONFIG_DIR / f"{p}.yaml").is_file():  # a folder named like it: shipped
            p = CONFIG_DIR / f"{p}.yaml"
        raw = _read_yaml(p)
        source = str(p)
    return build_config(raw, overrides, source)


def dump_config(cfg: RunConfig) -> str:
    """The resolved config as YAML (written into every run directory and checkpoint)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
