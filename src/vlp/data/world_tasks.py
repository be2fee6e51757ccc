"""Downstream-task labels of the embedded world: SNLI-VE, RefCOCO, VQAv2 and NLVR2 records.

Implements world.md "Labels for every downstream task (from the scene graph, never by hand)": every
label below is computed from a `vlp.data.world.Scene` (objects with class, colour, size, style and exact
box; the true relations) and emitted as the shared records of `vlp.data.records`, so the task code in
`vlp.tasks` consumes world data exactly like the real formats read by `vlp.data.formats`.

Determinism and cost
  Record `i` of task T on split S is a pure function of (world seed, image size, T, S, i): its random
  draws come from `numpy.random.default_rng([seed, TASK_CODE[T], SPLIT_CODES[S], i])` and its scenes
  from the world's `scene()` fast path (labels never render pixels). Record i uses scene i mod N
  (N = split length, so `count > N` puts several records on one image, as in the real datasets); a
  record whose plan that scene cannot support (a relation question about a one-object scene) moves on
  to scenes (i + k * 7919) mod N, at most `_MAX_SCAN` of them. A list of `count` records therefore
  costs O(count) scene builds (about 1 ms each, memoised across calls by `_cached_scene`; measured 0.5-2.2 ms
  of CPU per record, 2,000 records per task and split; VE 0.7-1.4 ms). Splits: train records come from the world's train
  split, val/test/compositional from theirs (`TASK_SPLITS`); the unpaired splits are refused.

Class balance is exact by construction: labels are assigned in blocks (3 for VE, 2 for NLVR2, 10
question slots for VQA) whose order is a seeded permutation per block, so every full block holds each
label equally often, and labels cannot be read off the record index.

Compositional hygiene: outside the compositional split no generated text names a held-out (colour,
class) combination (`vlp.data.world.HELD_OUT_COMBOS`), not even in a false statement, so "never occur
in train" (world.md "Splits") also holds for the task text.

VE (SNLI-VE)
  world.md ("Labels") asks for a neutral that is about something the image cannot decide, hypotheses
  that read alike across labels, and a hypothesis-only bag-of-words floor <= 40 %. A neutral built by
  adding an unrendered part to a true statement ("a wooden red circle", "... hidden behind the star")
  fails the last two: the added words mark neutral, and a text-only classifier reached 64 % (chance
  33 %). So every hypothesis, whatever its label, has one template family, and only the image decides:
    "the <superlative> <selector> is <predicate>"  /  "the <superlative> of the <selectors> is <predicate>"
  superlative: an unrendered property (`VE_SUPERLATIVES`: oldest, newest, cheapest, most expensive, most
  valuable; none suggested by a drawn one). selector (`VE_SELECTORS`): a class ("circle"), or a colour or
  size with a generic noun ("red shape", "large objects"); its candidates are the objects it matches,
  at least one (so "the oldest circle" exists), and the superlative picks one of them that the image
  cannot identify. predicate (`VE_KINDS`): a colour ("is red"), a size ("is big"), a class ("is a star";
  with colour or size selectors) or a relation to a landmark of the image ("is left of a blue star").
  Label (`ve_label`, from `Scene.objects` / `Scene.relations`): entailment when the predicate holds for
  every candidate (whichever the superlative picks), contradiction when it holds for none (a visible
  fact contradicts it), neutral when it holds for some but not all (only the unrendered property could
  decide). So a neutral and an entailment can be the same sentence on two images.
  Balance: the form (selector, kind, whether the landmark carries a colour) is drawn before the label;
  the scenes of the record's scan are tried until one has a claim of that form with the wanted label,
  and one such claim is drawn uniformly (a neutral needs two candidates that disagree, so about half
  of the neutrals move past scene i mod N: about 1.5 scene builds per record). Held-out combinations a
  hypothesis names (selector class + predicate colour, landmark) are avoided like everywhere else.
  Measured (world seed 0, 64 px): `vlp.tasks.text_floor` hypothesis-only floor 31.8 % at 4,000 train /
  500 test records (was 64.2 %); no word or bigram seen >= 40 times in 4,000 train hypotheses has
  more than half of its occurrences in one label.

REC (RefCOCO)
  Targets are preferred that share their class with another object of the image (class alone is
  ambiguous, so attributes or relations are needed). An expression is one of: the minimal attribute
  set that singles the target out ("the large red circle"), a relation to a landmark ("the circle left
  of the blue star"), or an extreme position among same-description objects ("the leftmost circle",
  centres at least `RELATION_MARGIN` of the image apart). Uniqueness is verified on the scene graph
  (`NounPhrase.matches`, `Scene.relations`). candidates = all object boxes (scene order),
  proposals = seeded "detections": each object detected with IoU >= 0.5 with probability 0.85,
  otherwise a poor box (IoU < 0.5), plus 0-2 spurious boxes, shuffled. group = "" (the world has no
  people/objects split); evaluation splits are val/test.

VQA (VQAv2)
  Ten question slots per block: 2 count ("how many red circles are there?"), 2 colour ("what color
  is the large circle?"), 2 class ("what shape is the red object?"), existence yes + no ("is there a
  blue star?"), relation yes + no ("is the red circle left of the blue star?"); colour and class
  questions refer to their object by a unique REC-style expression without the asked attribute.
  answer_type yes/no (40%, exactly balanced), number (20%), other (40%). Ten answers per question:
  the canonical answer at least 5 times, up to 3 lexicon variants ("two" for "2", "box" for "square",
  "gray" for "grey"), up to 2 plausible disagreements (a neighbouring count or colour, a confusable
  class, the other of yes/no). `vqa_answer_vocab()` lists every answer after VQA normalisation.

NLVR2
  A statement about a left and a right image. Templates: count comparison ("the left image has more
  circles than the right image"), both ("both images contain a red star"), exactly one, exact count in
  one image, total count over both, and a relation in one image. The template and whether its phrases
  carry a colour are drawn before the label; seeded right images (then further left images) are tried
  until the form has a claim with the wanted truth (NLVR2 pairs, too, are chosen so that statements
  about them are interesting), so the template mix is the same for True and False (only about 2% of
  True records, none of the False ones, fall back to another form after a whole scan). Truth is
  computed on both scene graphs (`nlvr2_truth`); True/False alternate in seeded blocks of 2.
  Statement-only naive Bayes (as for VE): 0.52 (train) / 0.55 (val).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image

from vlp.data.lexicon import (
    CLASSES,
    COLOUR_NAMES,
    COLOURS,
    GENERIC_NOUNS,
    NUMBER_WORDS,
    PLURALS,
    RELATION_PHRASES,
    RELATIONS,
    SIZE_NAMES,
    SIZES,
    STYLE_NAMES,
    STYLES,
    indefinite_article,
)
from vlp.data.records import NLVR2Record, RefRecord, TaskData, VE_LABELS, VERecord, VQARecord, VQA_NUM_ANSWERS
from vlp.data.world import (
    HELD_OUT_COMBOS,
    RELATION_MARGIN,
    SPLIT_CODES,
    CaptionSpec,
    NounPhrase,
    Scene,
    World,
    WorldObject,
    build_scene,
    caption_is_true,
)

TASKS: tuple[str, ...] = ("ve", "rec", "vqa", "nlvr2")
"""Task names accepted by `world_task_data` and `vlp world show --task`."""

TASK_SPLITS: tuple[str, ...] = ("train", "val", "test", "compositional")
"""World splits that task records may be drawn from (the unpaired view has no paired labels)."""

TASK_CODES: dict[str, int] = {"ve": 101, "rec": 102, "vqa": 103, "nlvr2": 104}
"""Second entry of every record's seed ([world seed, task code, split code, index])."""

SCENE_CACHE_SIZE = 4096
"""Scene graphs kept in memory across calls (about 1 ms each to rebuild; a few MB in all)."""
_SCAN_STRIDE = 7919  # prime: fallback scenes (i + k * stride) mod N visit every scene of a split
_MAX_SCAN = 16
_LABEL_STREAM = 1  # block permutations use [seed, task code, split code, block, _LABEL_STREAM]

_CLASS_ID: dict[str, int] = {c.name: c.class_id for c in CLASSES}
_HELD_OUT: frozenset[tuple[str, int]] = frozenset((colour, _CLASS_ID[name]) for colour, name in HELD_OUT_COMBOS)
_SIZE_WORDS: dict[str, tuple[tuple[str, ...], ...]] = {s.name: s.words for s in SIZES}
_STYLE_WORDS: dict[str, tuple[str, ...]] = {s.name: s.words for s in STYLES}
_COLOUR_WORDS: dict[str, tuple[str, ...]] = {c.name: c.words for c in COLOURS}


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------


def image_id(split: str, index: int) -> str:
    """The `ImageSource` key of world image `index` of `split`: "split/index"."""
    return f"{split}/{index}"


def parse_image_id(key: str) -> tuple[str, int]:
    """("split", index) of a "split/index" key; ValueError naming the key when it is malformed."""
    parts = key.split("/") if isinstance(key, str) else []
    if len(parts) != 2 or parts[0] not in SPLIT_CODES or not parts[1].isdigit():
        raise ValueError(
            f"malformed world image id {key!r}: expected 'split/index' with split in {tuple(SPLIT_CODES)} "
            "and a non-negative integer index, e.g. 'val/12'"
        )
    return parts[0], int(parts[1])


class WorldImages:
    """An `ImageSource` rendering world images on demand from "split/index" ids (no files).

    `split` restricts the ids it accepts (a name, several names, or None for every image split);
    records of a `world_task_data` call are all resolvable by its `images`. Errors: ValueError for a
    malformed id or a split outside the allowed ones, FileNotFoundError for an index outside the split
    (a missing image, as for `FolderImages`), both naming the id. Picklable (DataLoader workers).
    """

    def __init__(self, world: World, split: str | Sequence[str] | None = None) -> None:
        names = TASK_SPLITS + ("unpaired_images",) if split is None else ((split,) if isinstance(split, str) else tuple(split))
        for name in names:
            if name not in SPLIT_CODES or name == "unpaired_text":
                raise ValueError(f"WorldImages: split {name!r} has no images; expected splits from {TASK_SPLITS + ('unpaired_images',)}")
        self.world = world
        self.splits: tuple[str, ...] = names

    def load(self, image_id: str, record: str | None = None) -> Image.Image:
        """Render image `image_id` ("split/index") as an RGB PIL image of `world.image_size` pixels."""
        split, index = parse_image_id(image_id)
        which = f" (needed by {record})" if record else ""
        if split not in self.splits:
            raise ValueError(f"world image id {image_id!r}{which}: split {split!r} is not served here (serving {self.splits})")
        length = self.world.sizes[split]
        if index >= length:
            raise FileNotFoundError(
                f"world image {image_id!r}{which} does not exist: the {split} split has {length} images (0..{length - 1})"
            )
        return Image.fromarray(self.world.split(split)[index].image).convert("RGB")

    def regions(self, image_id: str) -> tuple[np.ndarray, np.ndarray]:
        """The image's object boxes (N, 4) normalised xyxy float32 and class ids + 1 (N,) int64, from the scene
        graph (no rendering): the regions single-stream methods (CMAL) take as input downstream."""
        split, index = parse_image_id(image_id)
        if split not in self.splits or index >= self.world.sizes[split]:
            self.load(image_id)  # raises the same errors as loading the image would
        objects = self.world.split(split).scene(index).objects
        boxes = np.asarray([o.box_norm for o in objects], dtype=np.float32).reshape(-1, 4)
        return boxes, np.asarray([int(o.class_id) + 1 for o in objects], dtype=np.int64)

    def __repr__(self) -> str:
        return f"WorldImages(seed={self.world.seed}, image_size={self.world.image_size}, splits={self.splits})"


# ---------------------------------------------------------------------------------------------
# Shared helpers: seeds, scenes, noun phrases
# ---------------------------------------------------------------------------------------------


def _check_split(split: str) -> None:
    if split not in TASK_SPLITS:
        raise ValueError(f"task records come from the splits {TASK_SPLITS}; got {split!r}")


def _record_rng(world: World, task: str, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([world.seed, TASK_CODES[task], SPLIT_CODES[split], index])


def _block_label(world: World, task: str, split: str, index: int, classes: int) -> int:
    """Label of record `index`: position in a seeded permutation of its block of `classes` records
    (exact balance per block, not readable from the index)."""
    block, position = divmod(index, classes)
    order = np.random.default_rng([world.seed, TASK_CODES[task], SPLIT_CODES[split], block, _LABEL_STREAM]).permutation(classes)
    return int(order[position])


@functools.lru_cache(maxsize=SCENE_CACHE_SIZE)
def _cached_scene(seed: int, image_size: int, split: str, index: int) -> Scene:
    """Memo of the pure `build_scene`: the four tasks, fallback scans and NLVR2 partners revisit scenes."""
    return build_scene(seed, split, index, image_size)


def _scene_getter(world: World, split: str) -> Callable[[int], Scene]:
    """`scene(index)` of one split (the `WorldSplit.scene` fast path, memoised by `_cached_scene`)."""
    length = len(world.split(split))
    if length == 0:
        raise ValueError(f"the {split} split of this world is empty; enlarge it with World(sizes={{'{split}': n}})")

    def scene(index: int) -> Scene:
        if not 0 <= index < length:
            raise IndexError(f"scene {index} outside the {split} split of length {length} (a bug)")
        return _cached_scene(world.seed, world.image_size, split, index)

    return scene


def _scan(index: int, length: int) -> list[int]:
    """Scene indices record `index` may use, in order: index mod N, then (index + k * 7919) mod N."""
    seen: list[int] = []
    for k in range(_MAX_SCAN):
        s = (index + k * _SCAN_STRIDE) % length
        if s not in seen:
            seen.append(s)
    return seen


def _pick(rng: np.random.Generator, options: Sequence):
    return options[int(rng.integers(len(options)))]


def _allowed(phrase: NounPhrase, split: str) -> bool:
    """False when `phrase` names a held-out (colour, class) combination outside the compositional split."""
    return split == "compositional" or phrase.class_id is None or phrase.colour is None or (phrase.colour, phrase.class_id) not in _HELD_OUT


def _spec_allowed(spec: CaptionSpec, split: str) -> bool:
    return all(_allowed(p, split) for p in spec.phrases)


def _noun(class_id: int | None, rng: np.random.Generator, plural: bool) -> str:
    noun = _pick(rng, CLASSES[class_id].nouns if class_id is not None else GENERIC_NOUNS)
    return PLURALS[noun] if plural else noun


def _phrase_words(
    phrase: NounPhrase,
    rng: np.random.Generator,
    determiner: str,
    plural: bool | None = None,
    lead: str | None = None,
) -> list[str]:
    """Words of a noun phrase: determiner, [lead] size style colour noun.

    determiner "a" (a/an), "the", "number" (the phrase's count as a word), or "" (none: "how many red
    circles"). `lead` is an extreme word ("leftmost").
    Plural when the count is above one, unless `plural` says otherwise. Synonyms are drawn from the
    lexicon like the caption grammar does.
    """
    words: list[str] = []
    if lead:
        words.append(lead)
    if phrase.size is not None:
        words += list(_pick(rng, _SIZE_WORDS[phrase.size]))
    if phrase.style is not None:
        words.append(_pick(rng, _STYLE_WORDS[phrase.style]))
    if phrase.colour is not None:
        words.append(_pick(rng, _COLOUR_WORDS[phrase.colour]))
    is_plural = plural if plural is not None else (phrase.count is not None and phrase.count > 1)
    words.append(_noun(phrase.class_id, rng, is_plural))
    if determiner == "a":
        return [indefinite_article(words[0])] + words
    if determiner == "the":
        return ["the"] + words
    if determiner == "number":
        return [NUMBER_WORDS[int(phrase.count)]] + words  # type: ignore[arg-type]
    return words


def _describe(obj: WorldObject, rng: np.random.Generator, colour_p: float, size_p: float, style_p: float) -> NounPhrase:
    """A true existential phrase for `obj`: its class, plus each attribute with the given chance."""
    return NounPhrase(
        obj.class_id,
        obj.colour if rng.random() < colour_p else None,
        obj.size if rng.random() < size_p else None,
        obj.style if rng.random() < style_p else None,
    )


def _count(phrase: NounPhrase, objects: Sequence[WorldObject]) -> int:
    return sum(phrase.matches(o) for o in objects)


def _relation_words(relation: str, rng: np.random.Generator) -> list[str]:
    return list(_pick(rng, RELATION_PHRASES[relation]))


def _phrase_variants(phrase: NounPhrase) -> list[tuple[str, NounPhrase]]:
    """(perturbation type, phrase) for every single-attribute change of `phrase` (VQA "no" existence
    questions)."""
    variants = [("colour", replace(phrase, colour=c)) for c in COLOUR_NAMES if c != phrase.colour]
    if phrase.class_id is not None:
        variants += [("class", replace(phrase, class_id=c.class_id)) for c in CLASSES if c.class_id != phrase.class_id]
    if phrase.size is not None:
        variants += [("size", replace(phrase, size=s)) for s in SIZE_NAMES if s != phrase.size]
    if phrase.style is not None:
        variants += [("style", replace(phrase, style=s)) for s in STYLE_NAMES if s != phrase.style]
    return variants


# ---------------------------------------------------------------------------------------------
# Referring expressions (REC; also the object references of VQA questions)
# ---------------------------------------------------------------------------------------------

EXTREME_WORDS: dict[str, tuple[str, ...]] = {
    "left": ("leftmost",),
    "right": ("rightmost",),
    "top": ("topmost", "highest"),
    "bottom": ("bottommost", "lowest"),
}
"""Words of extreme-position references ("the leftmost circle")."""


@dataclass(frozen=True)
class RefSpec:
    """The meaning of a referring expression: objects matching `phrase`, restricted by a relation to
    some object matching `landmark`, or to the one at an `extreme` ("left"/"right"/"top"/"bottom")."""

    phrase: NounPhrase
    relation: str | None = None
    landmark: NounPhrase | None = None
    extreme: str | None = None


def referents(ref: RefSpec, scene: Scene) -> list[int]:
    """Indices of the scene objects `ref` can denote (exactly one = a valid referring expression).

    extreme: among the matching objects, those whose centre coordinate is within RELATION_MARGIN of the
    image size of the extreme one (so "leftmost" is unique only when the runner-up is clearly apart).
    """
    objects = scene.objects
    matching = [k for k, obj in enumerate(objects) if ref.phrase.matches(obj)]
    if ref.relation is not None:
        landmark = ref.landmark if ref.landmark is not None else NounPhrase(None)
        holding = {(r.subject, r.target) for r in scene.relations if r.relation == ref.relation}
        return [
            k for k in matching if any((k, j) in holding and landmark.matches(objects[j]) for j in range(len(objects)))
        ]
    if ref.extreme is not None and matching:
        axis = 0 if ref.extreme in ("left", "right") else 1
        sign = 1.0 if ref.extreme in ("left", "top") else -1.0
        keys = [sign * objects[k].centre[axis] for k in matching]
        best = min(keys)
        margin = RELATION_MARGIN * scene.image_size
        return [k for k, key in zip(matching, keys) if key - best < margin]
    return matching


def _attribute_phrases(obj: WorldObject, attributes: Sequence[str], with_class: bool) -> list[NounPhrase]:
    """Phrases for `obj` using every subset of `attributes`, smallest subsets first."""
    phrases = []
    for size in range(len(attributes) + 1):
        for subset in itertools.combinations(attributes, size):
            phrases.append(
                NounPhrase(obj.class_id if with_class else None, **{name: getattr(obj, name) for name in subset})
            )
    return phrases


def unique_references(
    scene: Scene,
    target: int,
    attributes: Sequence[str] = ("colour", "size", "style"),
    with_class: bool = True,
    kinds: Sequence[str] = ("attribute", "relation", "extreme"),
    landmark_colour: bool = True,
) -> dict[str, list[RefSpec]]:
    """Every referring expression (by kind) that denotes exactly `target` in `scene`.

    attribute: minimal attribute sets (no smaller unique set contains them); relation: for each true
    relation of the target, the smallest target phrase that makes "<phrase> <relation> <landmark>"
    unique (landmark = class, plus colour when `landmark_colour`); extreme: the smallest phrase with at
    least two matches of which the target is clearly the extreme one. `with_class=False` uses a generic
    noun ("the red shape": VQA class questions must not name the class).
    """
    obj = scene.objects[target]
    phrases = _attribute_phrases(obj, [a for a in ("colour", "size", "style") if a in attributes], with_class)
    found: dict[str, list[RefSpec]] = {}
    if "attribute" in kinds:
        minimal: list[NounPhrase] = []
        for phrase in phrases:
            mentioned = {a for a in ("colour", "size", "style") if getattr(phrase, a) is not None}
            if any({a for a in ("colour", "size", "style") if getattr(m, a) is not None} <= mentioned for m in minimal):
                continue
            if referents(RefSpec(phrase), scene) == [target]:
                minimal.append(phrase)
        if minimal:
            found["attribute"] = [RefSpec(p) for p in minimal]
    if "relation" in kinds:
        relational = []
        for relation in scene.relations:
            if relation.subject != target:
                continue
            other = scene.objects[relation.target]
            landmark = NounPhrase(other.class_id, other.colour if landmark_colour else None)
            for phrase in phrases:
                ref = RefSpec(phrase, relation.relation, landmark)
                if referents(ref, scene) == [target]:
                    relational.append(ref)
                    break
        if relational:
            found["relation"] = relational
    if "extreme" in kinds:
        extreme = []
        for side in EXTREME_WORDS:
            for phrase in phrases:
                ref = RefSpec(phrase, extreme=side)
                if _count(phrase, scene.objects) >= 2 and referents(ref, scene) == [target]:
                    extreme.append(ref)
                    break
        if extreme:
            found["extreme"] = extreme
    return found


_REF_KIND_WEIGHTS = {"attribute": 0.5, "relation": 0.3, "extreme": 0.2}


def _choose_reference(options: dict[str, list[RefSpec]], rng: np.random.Generator) -> RefSpec:
    kinds = [k for k in _REF_KIND_WEIGHTS if k in options]
    weights = np.array([_REF_KIND_WEIGHTS[k] for k in kinds])
    kind = kinds[int(rng.choice(len(kinds), p=weights / weights.sum()))]
    return _pick(rng, options[kind])


def _add_redundant_attribute(ref: RefSpec, obj: WorldObject, attributes: Sequence[str], rng: np.random.Generator) -> RefSpec:
    """RefCOCO expressions often say more than needed: add one unmentioned true attribute (a superset of
    the target's description still denotes only the target)."""
    unused = [a for a in attributes if getattr(ref.phrase, a) is None]
    if not unused:
        return ref
    name = _pick(rng, unused)
    return replace(ref, phrase=replace(ref.phrase, **{name: getattr(obj, name)}))


def _reference_words(ref: RefSpec, scene: Scene, rng: np.random.Generator) -> list[str]:
    """"the [extreme] <phrase> [<relation> the/a <landmark>]" (landmark "the" only when it is unique)."""
    lead = _pick(rng, EXTREME_WORDS[ref.extreme]) if ref.extreme else None
    words = _phrase_words(ref.phrase, rng, "the", lead=lead, plural=False)
    if ref.relation is not None and ref.landmark is not None:
        words += _relation_words(ref.relation, rng)
        unique = _count(ref.landmark, scene.objects) == 1
        words += _phrase_words(ref.landmark, rng, "the" if unique else "a", plural=False)
    return words


# ---------------------------------------------------------------------------------------------
# REC
# ---------------------------------------------------------------------------------------------

PROPOSAL_HIT_RATE = 0.85
"""Chance that an object gets a good proposal (IoU >= 0.5); otherwise it gets a poor one (IoU < 0.5)."""
MAX_SPURIOUS_PROPOSALS = 2


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two (x1, y1, x2, y2) boxes (continuous coordinates, exclusive end)."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _clip_box(x1: float, y1: float, x2: float, y2: float, min_side: float) -> tuple[float, float, float, float]:
    x1, x2 = min(max(x1, 0.0), 1.0 - min_side), min(max(x2, 0.0), 1.0)
    y1, y2 = min(max(y1, 0.0), 1.0 - min_side), min(max(y2, 0.0), 1.0)
    return (x1, y1, max(x2, x1 + min_side), max(y2, y1 + min_side))


def _proposals(objects: Sequence[WorldObject], image_size: int, rng: np.random.Generator) -> tuple[tuple[float, float, float, float], ...]:
    """Seeded "detector output": a jittered box per object (good with PROPOSAL_HIT_RATE: IoU >= 0.5,
    else IoU < 0.5), 0..MAX_SPURIOUS_PROPOSALS random boxes, shuffled. Normalised, clipped to the image."""
    min_side = 2.0 / image_size
    boxes = []
    for obj in objects:
        x1, y1, x2, y2 = obj.box_norm
        w, h = x2 - x1, y2 - y1
        good = rng.random() < PROPOSAL_HIT_RATE
        box = obj.box_norm
        for _ in range(20):
            if good:
                cx, cy = (x1 + x2) / 2 + rng.normal(0, 0.08) * w, (y1 + y2) / 2 + rng.normal(0, 0.08) * h
                bw, bh = w * np.exp(rng.normal(0, 0.12)), h * np.exp(rng.normal(0, 0.12))
            else:
                angle = rng.uniform(0, 2 * np.pi)
                shift = rng.uniform(0.45, 1.0)
                cx, cy = (x1 + x2) / 2 + np.cos(angle) * shift * w, (y1 + y2) / 2 + np.sin(angle) * shift * h
                scale = np.exp(rng.uniform(-0.9, 0.9))
                bw, bh = w * scale, h * scale
            box = _clip_box(cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2, min_side)
            if (box_iou(box, obj.box_norm) >= 0.5) == good:
                break
        else:  # practically unreachable; fall back to a box of the wanted kind by construction
            box = obj.box_norm if good else _clip_box(x2, y2, x2 + w, y2 + h, min_side)
        boxes.append(box)
    for _ in range(int(rng.integers(MAX_SPURIOUS_PROPOSALS + 1))):
        side_w, side_h = rng.uniform(0.1, 0.35, size=2)
        x, y = rng.uniform(0, 1 - side_w), rng.uniform(0, 1 - side_h)
        boxes.append(_clip_box(x, y, x + side_w, y + side_h, min_side))
    order = rng.permutation(len(boxes))
    return tuple(tuple(float(v) for v in boxes[int(k)]) for k in order)  # type: ignore[misc]


def _has_same_class_distractor(scene: Scene, target: int) -> bool:
    own = scene.objects[target].class_id
    return sum(o.class_id == own for o in scene.objects) > 1


def rec_record(world: World, split: str, index: int, _scenes: Callable[[int], Scene] | None = None) -> RefRecord:
    """Referring-expression record `index` of `split` (module docstring, REC)."""
    _check_split(split)
    scenes = _scenes or _scene_getter(world, split)
    rng = _record_rng(world, "rec", split, index)
    landmark_colour = bool(rng.random() < 0.6)
    scanned = _scan(index, world.sizes[split])
    chosen: tuple[int, int, dict[str, list[RefSpec]]] | None = None
    for same_class in (True, False):  # first pass: targets with a same-class distractor; then any target
        for s in scanned:
            scene = scenes(s)
            for target in (int(k) for k in rng.permutation(len(scene.objects))):
                if _has_same_class_distractor(scene, target) != same_class:
                    continue
                options = unique_references(scene, target, landmark_colour=landmark_colour)
                if options:
                    chosen = (s, target, options)
                    break
            if chosen is not None:
                break
        if chosen is not None:
            break
    if chosen is None:
        raise RuntimeError(f"no describable object in {_MAX_SCAN} scenes of {split} for REC record {index} (a bug)")
    s, target, options = chosen
    scene = scenes(s)
    ref = _choose_reference(options, rng)
    if ref.relation is None and ref.extreme is None and rng.random() < 0.2:
        ref = _add_redundant_attribute(ref, scene.objects[target], ("colour", "size", "style"), rng)
    if referents(ref, scene) != [target]:
        raise RuntimeError(f"REC record {index} of {split}: expression does not single out its target (a bug)")
    return RefRecord(
        ref_id=f"{split}-{index}",
        image_id=image_id(split, s),
        expression=" ".join(_reference_words(ref, scene, rng)),
        target_box=scene.objects[target].box_norm,
        candidates=tuple(o.box_norm for o in scene.objects),
        target_index=target,
        proposals=_proposals(scene.objects, scene.image_size, rng),
        group="",
    )


# ---------------------------------------------------------------------------------------------
# VE
# ---------------------------------------------------------------------------------------------

VE_SUPERLATIVES: tuple[tuple[str, ...], ...] = (
    ("oldest",), ("newest",), ("cheapest",), ("most", "expensive"), ("most", "valuable"),
)
"""Superlatives of properties the renderer never draws (age, price, value). None is suggested by a drawn
property (unlike "heaviest" ~ size or "warmest" ~ colour), so "the oldest circle" is one of the image's
circles that the image cannot identify."""

VE_SELECTORS: tuple[str, ...] = ("class", "colour", "size")
"""The attribute that picks a hypothesis's candidates ("the oldest circle", "the oldest red shape",
"the oldest large shape")."""

VE_KINDS: tuple[str, ...] = ("colour", "size", "class", "relation")
"""What a hypothesis says about its referent ("is red", "is large", "is a circle", "is left of a star")."""

VE_FORMS: tuple[tuple[str, str], ...] = tuple((s, k) for s in VE_SELECTORS for k in VE_KINDS if s != k)
"""(selector, kind) pairs, drawn uniformly before the label: 9 forms, a third of them relations."""

_VE_LANDMARK_COLOUR_RATE = 0.5  # share of relation landmarks that carry a colour ("a blue star")
_VE_ATTRIBUTE_VALUES: dict[str, tuple] = {
    "class": tuple(c.class_id for c in CLASSES), "colour": tuple(COLOUR_NAMES), "size": tuple(SIZE_NAMES),
}


@dataclass(frozen=True)
class VEClaim:
    """The meaning of a VE hypothesis "the <superlative> <selector> is <predicate>".

    The candidates are the objects matching `selector` (a `NounPhrase` naming one attribute: a class, or
    a colour / size with the generic noun); the superlative picks one of them the image cannot identify.
    kind (`VE_KINDS`) "colour" / "size" / "class": a candidate satisfies the predicate when it matches
    `predicate` (a `NounPhrase` naming that one attribute); "relation": when it stands in `relation` to
    another object matching `landmark`.
    """

    kind: str
    selector: NounPhrase
    predicate: NounPhrase | None = None
    relation: str | None = None
    landmark: NounPhrase | None = None


def _attribute_phrase(attribute: str, value: object) -> NounPhrase:
    """The phrase naming one attribute value: a class ("circle") or a colour / size ("red shape")."""
    if attribute == "class":
        return NounPhrase(int(value))  # type: ignore[call-overload]
    return NounPhrase(None, **{attribute: value})


def _attribute_value(attribute: str, obj: WorldObject) -> object:
    return obj.class_id if attribute == "class" else getattr(obj, attribute)


def ve_candidate_truths(claim: VEClaim, scene: Scene) -> list[bool]:
    """Whether each candidate of `claim` (objects matching its selector, scene order) satisfies its
    predicate; empty when no object matches the selector."""
    objects = scene.objects
    candidates = [k for k, obj in enumerate(objects) if claim.selector.matches(obj)]
    if claim.kind == "relation":
        assert claim.landmark is not None
        holding = {(r.subject, r.target) for r in scene.relations if r.relation == claim.relation}
        return [any((k, j) in holding and claim.landmark.matches(objects[j]) for j in range(len(objects))) for k in candidates]
    assert claim.predicate is not None
    return [claim.predicate.matches(objects[k]) for k in candidates]


def ve_label(claim: VEClaim, scene: Scene) -> int | None:
    """The `VE_LABELS` index of `claim` on `scene`: entailment when the predicate holds for every candidate
    (whichever one the superlative picks), contradiction when it holds for none, neutral when for some
    but not all (only the unrendered property could tell); None when no object matches the selector."""
    truths = ve_candidate_truths(claim, scene)
    if not truths:
        return None
    if all(truths):
        return VE_LABELS.index("entailment")
    return VE_LABELS.index("neutral") if any(truths) else VE_LABELS.index("contradiction")


def _ve_claims(form: tuple[str, str], landmark_colour: bool, scene: Scene, split: str) -> list[VEClaim]:
    """Every claim of `form` about `scene` whose selector matches at least one object (true, false and
    undecidable ones), naming no held-out combination outside the compositional split."""
    selector_attribute, kind = form
    objects = scene.objects
    selectors = [_attribute_phrase(selector_attribute, v) for v in sorted({_attribute_value(selector_attribute, o) for o in objects}, key=str)]
    claims: list[VEClaim] = []
    if kind == "relation":
        landmarks = sorted({NounPhrase(o.class_id, o.colour if landmark_colour else None) for o in objects},
                           key=lambda p: (p.class_id, p.colour or ""))
        for selector in selectors:
            claims += [VEClaim("relation", selector, relation=r, landmark=m)
                       for m in landmarks if _allowed(m, split) for r in RELATIONS]
        return claims
    for selector in selectors:
        for value in _VE_ATTRIBUTE_VALUES[kind]:
            predicate = _attribute_phrase(kind, value)
            named = NounPhrase(selector.class_id if selector.class_id is not None else predicate.class_id,
                               selector.colour or predicate.colour)  # "the oldest circle is blue" names a blue circle
            if _allowed(named, split):
                claims.append(VEClaim(kind, selector, predicate))
    return claims


def _ve_words(claim: VEClaim, rng: np.random.Generator) -> list[str]:
    """"the <superlative> <selector> is <predicate>" or "the <superlative> of the <selectors> is
    <predicate>"; synonyms drawn from the lexicon like the caption grammar does."""
    words = ["the", *_pick(rng, VE_SUPERLATIVES)]
    if rng.random() < 0.5:
        words += _phrase_words(claim.selector, rng, "", plural=False)
    else:
        words += ["of", "the"] + _phrase_words(claim.selector, rng, "", plural=True)
    words.append("is")
    if claim.kind == "relation":
        assert claim.landmark is not None and claim.relation is not None
        return words + _relation_words(claim.relation, rng) + _phrase_words(claim.landmark, rng, "a", plural=False)
    predicate = claim.predicate
    assert predicate is not None
    if claim.kind == "class":
        return words + _phrase_words(predicate, rng, "a", plural=False)
    if claim.kind == "colour":
        return words + [_pick(rng, _COLOUR_WORDS[predicate.colour])]  # type: ignore[index]
    return words + list(_pick(rng, _SIZE_WORDS[predicate.size]))  # type: ignore[index]


def ve_record(world: World, split: str, index: int, _scenes: Callable[[int], Scene] | None = None) -> VERecord:
    """Visual-entailment record `index` of `split` (module docstring, VE).

    The form (selector, predicate kind, landmark colour) is drawn before the label; then the scenes of
    `_scan(index)` are tried in order until one has a claim of that form with the wanted label, and one
    of those claims is drawn uniformly. Only when the whole scan fails does the form change (other forms
    in a seeded order, the first 4 scenes of the scan each; 1 record in 4,500 measured, seed 0).
    """
    _check_split(split)
    scenes = _scenes or _scene_getter(world, split)
    rng = _record_rng(world, "ve", split, index)
    label = _block_label(world, "ve", split, index, len(VE_LABELS))
    form = VE_FORMS[int(rng.integers(len(VE_FORMS)))]
    landmark_colour = bool(rng.random() < _VE_LANDMARK_COLOUR_RATE)
    fallbacks = [VE_FORMS[int(k)] for k in rng.permutation(len(VE_FORMS)) if VE_FORMS[int(k)] != form]
    scanned = _scan(index, world.sizes[split])
    for attempt, current in enumerate([form] + fallbacks):
        for s in scanned if attempt == 0 else scanned[:4]:
            scene = scenes(s)
            matching = [c for c in _ve_claims(current, landmark_colour, scene, split) if ve_label(c, scene) == label]
            if matching:
                return VERecord(
                    pair_id=f"{split}-{index}",
                    image_id=image_id(split, s),
                    hypothesis=" ".join(_ve_words(_pick(rng, matching), rng)),
                    label=label,
                )
    raise RuntimeError(f"no {VE_LABELS[label]} VE hypothesis found for record {index} of {split} (a bug)")


# ---------------------------------------------------------------------------------------------
# VQA
# ---------------------------------------------------------------------------------------------

VQA_SLOTS: tuple[str, ...] = (
    "count", "count", "colour", "colour", "class", "class", "exist_yes", "exist_no", "relation_yes", "relation_no",
)
"""The question plan of every block of 10 VQA records (order permuted per block)."""

_COLOUR_CONFUSIONS: dict[str, tuple[str, ...]] = {
    "red": ("orange", "pink"), "orange": ("red", "yellow", "brown"), "yellow": ("orange",),
    "green": ("blue",), "blue": ("purple",), "purple": ("blue", "pink"), "pink": ("purple", "red"),
    "brown": ("orange", "black"), "black": ("grey",), "white": ("grey",), "grey": ("white", "black"),
}
_CLASS_CONFUSIONS: dict[str, tuple[str, ...]] = {
    "circle": ("ring",), "square": ("diamond",), "triangle": ("arrow",), "star": ("cross",),
    "heart": ("circle",), "cross": ("star",), "ring": ("circle",), "diamond": ("square",),
    "pentagon": ("hexagon",), "hexagon": ("pentagon",), "arrow": ("triangle",), "moon": ("circle",),
    "cloud": ("circle",), "house": ("square",), "tree": ("triangle",), "car": ("square",),
    "flag": ("square",), "bolt": ("arrow",),
}
_ANSWER_NOISE = {"yes/no": (0.05, 0.0), "number": (0.08, 0.2), "other": (0.08, 0.3)}  # (disagree, variant)
_MAX_DISAGREE, _MAX_VARIANTS = 2, 3
_NUMBER_VARIANTS: dict[int, tuple[str, ...]] = {0: ("zero", "none"), **{n: (w,) for n, w in NUMBER_WORDS.items()}}
_MAX_ANSWER_NUMBER = max(NUMBER_WORDS) + 1


def vqa_answer_vocab() -> list[str]:
    """Every answer the world's VQA records can hold after VQAv2 answer normalisation (number words ->
    digits, "none" -> "0"): yes/no, 0..7, colour names and synonyms, class names and synonyms."""
    vocab = ["yes", "no"] + [str(n) for n in range(_MAX_ANSWER_NUMBER + 1)]
    vocab += [w for colour in COLOURS for w in colour.words]
    vocab += [w for c in CLASSES for w in c.nouns]
    return vocab


@dataclass(frozen=True)
class _Question:
    words: list[str]
    answer: str
    answer_type: str
    question_type: str
    variants: tuple[str, ...]
    confusions: tuple[str, ...]


def _count_question(scene: Scene, rng: np.random.Generator, split: str) -> _Question | None:
    objects = scene.objects
    obj = _pick(rng, objects)
    mode = rng.random()
    template = (  # generic phrases ("how many shapes") spread the answers beyond "1"
        NounPhrase(obj.class_id) if mode < 0.35 else NounPhrase(obj.class_id, obj.colour) if mode < 0.6
        else NounPhrase(None, obj.colour) if mode < 0.75 else NounPhrase(None)
    )
    if rng.random() < 0.1 and template.colour is not None:  # "how many blue stars" with none in the image
        absent = [c for c in COLOUR_NAMES if _count(replace(template, colour=c), objects) == 0 and _allowed(replace(template, colour=c), split)]
        if absent:
            template = replace(template, colour=_pick(rng, absent))
    n = _count(template, objects)
    tail = _pick(rng, (("are", "there"), ("are", "in", "the", "image"), ("can", "you", "see")))
    words = ["how", "many"] + _phrase_words(template, rng, "", plural=True) + list(tail)
    confusions = tuple(str(m) for m in (n - 1, n + 1) if 0 <= m <= _MAX_ANSWER_NUMBER)
    return _Question(words, str(n), "number", "how many", _NUMBER_VARIANTS.get(n, ()), confusions)


def _attribute_question(scene: Scene, rng: np.random.Generator, asked: str) -> _Question | None:
    """"what color is <ref without colour>" or "what shape is <ref with a generic noun>"."""
    for target in (int(k) for k in rng.permutation(len(scene.objects))):
        obj = scene.objects[target]
        if asked == "colour":
            options = unique_references(scene, target, attributes=("size", "style"))
        else:
            options = unique_references(scene, target, attributes=("colour", "size", "style"), with_class=False)
        if not options:
            continue
        ref = _choose_reference(options, rng)
        if asked == "colour":
            words = ["what", "color", "is"] + _reference_words(ref, scene, rng)
            return _Question(words, obj.colour, "other", "what color is the", COLOURS[COLOUR_NAMES.index(obj.colour)].synonyms,
                             _COLOUR_CONFUSIONS[obj.colour])
        words = ["what", "shape", "is"] + _reference_words(ref, scene, rng)
        return _Question(words, obj.class_name, "other", "what shape is the", CLASSES[obj.class_id].synonyms,
                         _CLASS_CONFUSIONS[obj.class_name])
    return None


def _exist_question(scene: Scene, rng: np.random.Generator, split: str, answer: bool) -> _Question | None:
    obj = _pick(rng, scene.objects)
    phrase = _describe(obj, rng, 0.6, 0.15, 0.0)
    if not answer:
        false = [v for _, v in _phrase_variants(phrase) if _allowed(v, split) and _count(v, scene.objects) == 0]
        if not false:
            return None
        by_type = {"colour": [v for v in false if v.colour != phrase.colour], "class": [v for v in false if v.class_id != phrase.class_id]}
        types = [t for t in ("colour", "class") if by_type[t]] or ["any"]
        pool = by_type.get(_pick(rng, types), false)
        phrase = _pick(rng, pool or false)
    if rng.random() < 0.7:
        words, qtype = ["is", "there"] + _phrase_words(phrase, rng, "a"), "is there a"
    else:
        words, qtype = ["are", "there", "any"] + _phrase_words(phrase, rng, "", plural=True), "are there any"
    return _Question(words, "yes" if answer else "no", "yes/no", qtype, (), ("no" if answer else "yes",))


def _relation_question(scene: Scene, rng: np.random.Generator, answer: bool) -> _Question | None:
    objects = scene.objects
    if len(objects) < 2:
        return None
    refs: dict[int, dict[str, list[RefSpec]]] = {}

    def reference(k: int) -> dict[str, list[RefSpec]]:
        if k not in refs:
            refs[k] = unique_references(scene, k, kinds=("attribute", "extreme"))
        return refs[k]

    holding = {(r.subject, r.relation, r.target) for r in scene.relations}
    pairs = [(a, b) for a in range(len(objects)) for b in range(len(objects)) if a != b]
    for relation in (RELATIONS[int(k)] for k in rng.permutation(len(RELATIONS))):
        for p in rng.permutation(len(pairs)):
            a, b = pairs[int(p)]
            if ((a, relation, b) in holding) != answer or not reference(a) or not reference(b):
                continue
            words = ["is"] + _reference_words(_choose_reference(reference(a), rng), scene, rng)
            words += _relation_words(relation, rng) + _reference_words(_choose_reference(reference(b), rng), scene, rng)
            return _Question(words, "yes" if answer else "no", "yes/no", "is the", (), ("no" if answer else "yes",))
    return None


def _ten_answers(question: _Question, rng: np.random.Generator) -> tuple[str, ...]:
    """VQAv2-style human answers: >= 5 canonical, <= 3 lexicon variants, <= 2 disagreements, shuffled."""
    p_disagree, p_variant = _ANSWER_NOISE[question.answer_type]
    disagree = min(int(rng.binomial(VQA_NUM_ANSWERS, p_disagree)), _MAX_DISAGREE) if question.confusions else 0
    variants = min(int(rng.binomial(VQA_NUM_ANSWERS - disagree, p_variant)), _MAX_VARIANTS) if question.variants else 0
    answers = [_pick(rng, question.confusions) for _ in range(disagree)]
    answers += [_pick(rng, question.variants) for _ in range(variants)]
    answers += [question.answer] * (VQA_NUM_ANSWERS - len(answers))
    return tuple(answers[int(k)] for k in rng.permutation(len(answers)))


def vqa_record(world: World, split: str, index: int, _scenes: Callable[[int], Scene] | None = None) -> VQARecord:
    """VQA record `index` of `split` (module docstring, VQA)."""
    _check_split(split)
    scenes = _scenes or _scene_getter(world, split)
    rng = _record_rng(world, "vqa", split, index)
    slot = VQA_SLOTS[_block_label(world, "vqa", split, index, len(VQA_SLOTS))]
    for s in _scan(index, world.sizes[split]):
        scene = scenes(s)
        if slot == "count":
            question = _count_question(scene, rng, split)
        elif slot in ("colour", "class"):
            question = _attribute_question(scene, rng, slot)
        elif slot.startswith("exist"):
            question = _exist_question(scene, rng, split, slot == "exist_yes")
        else:
            question = _relation_question(scene, rng, slot == "relation_yes")
        if question is not None:
            return VQARecord(
                question_id=f"{split}-{index}",
                image_id=image_id(split, s),
                question=" ".join(question.words) + "?",
                answers=_ten_answers(question, rng),
                answer_type=question.answer_type,
                question_type=question.question_type,
            )
    raise RuntimeError(f"no scene among {_MAX_SCAN} of {split} supports a {slot} question for VQA record {index}")


# ---------------------------------------------------------------------------------------------
# NLVR2
# ---------------------------------------------------------------------------------------------

NLVR2_TEMPLATES: tuple[str, ...] = ("compare", "both", "one", "side_count", "total", "relation")
_NLVR2_TEMPLATE_WEIGHTS = np.array([0.2, 0.2, 0.15, 0.15, 0.1, 0.2])
_NLVR2_COLOUR_RATE = 0.4  # share of statements whose phrases carry a colour ("a red star")
_NLVR2_PARTNER_TRIES = 6  # right images tried per left image
_NLVR2_LEFT_TRIES = 3  # left images tried (scene i mod N first) before the form changes
_SIDES = ("left", "right")


@dataclass(frozen=True)
class NLVR2Claim:
    """The meaning of an NLVR2 statement. template: compare (count[side] > or < count[other]), both,
    one (exactly one image), side_count (count[side] == number), total (sum == number), relation
    (spec true in image `side`)."""

    template: str
    phrase: NounPhrase | None = None
    side: str = "left"
    more: bool = True
    number: int = 0
    spec: CaptionSpec | None = None


def nlvr2_truth(claim: NLVR2Claim, left: Scene, right: Scene) -> bool:
    """Truth of an NLVR2 claim on two scene graphs."""
    scenes = {"left": left, "right": right}
    if claim.template == "relation":
        scene = scenes[claim.side]
        return caption_is_true(claim.spec, scene.objects, scene.image_size, scene.relations)  # type: ignore[arg-type]
    assert claim.phrase is not None
    counts = {side: _count(claim.phrase, scenes[side].objects) for side in _SIDES}
    other = "right" if claim.side == "left" else "left"
    if claim.template == "compare":
        return counts[claim.side] > counts[other] if claim.more else counts[claim.side] < counts[other]
    if claim.template == "both":
        return counts["left"] > 0 and counts["right"] > 0
    if claim.template == "one":
        return (counts["left"] > 0) != (counts["right"] > 0)
    if claim.template == "side_count":
        return counts[claim.side] == claim.number
    if claim.template == "total":
        return counts["left"] + counts["right"] == claim.number
    raise ValueError(f"unknown NLVR2 template {claim.template!r}; expected one of {NLVR2_TEMPLATES}")


def _nlvr2_phrases(left: Scene, right: Scene, rng: np.random.Generator, split: str, with_colour: bool) -> list[NounPhrase]:
    """Candidate phrases: (colour,) class of every object of either image, plus two absent classes."""
    objects = left.objects + right.objects
    phrases = {NounPhrase(o.class_id, o.colour if with_colour else None) for o in objects}
    present = {o.class_id for o in objects}
    absent = [c.class_id for c in CLASSES if c.class_id not in present]
    for k in rng.permutation(len(absent))[:2]:
        phrases.add(NounPhrase(absent[int(k)], _pick(rng, COLOUR_NAMES) if with_colour else None))
    return sorted((p for p in phrases if _allowed(p, split)), key=lambda p: (p.class_id, p.colour or ""))


@dataclass(frozen=True)
class _NLVR2Form:
    """What is decided before the label can matter: the template and the shape of its noun phrase."""

    template: str
    with_colour: bool
    generic: bool


def _nlvr2_candidates(form: _NLVR2Form, left: Scene, right: Scene, rng: np.random.Generator, split: str) -> list[NLVR2Claim]:
    """Every claim of `form` worth stating about this pair (true and false ones)."""
    if form.template == "relation":
        claims = []
        for scene in (left, right):
            for relation in scene.relations:
                phrases = tuple(
                    NounPhrase(scene.objects[k].class_id, scene.objects[k].colour if form.with_colour else None)
                    for k in (relation.subject, relation.target)
                )
                spec = CaptionSpec("relation", phrases, relation=relation.relation)
                claims += [NLVR2Claim("relation", side=side, spec=spec) for side in _SIDES]
        return claims
    phrases = [NounPhrase(None)] if form.generic else _nlvr2_phrases(left, right, rng, split, form.with_colour)
    claims = []
    for phrase in phrases:
        counts = {side: _count(phrase, s.objects) for side, s in zip(_SIDES, (left, right))}
        if form.template == "compare":
            claims += [NLVR2Claim("compare", phrase, side, more) for side in _SIDES for more in (True, False)]
        elif form.template in ("both", "one"):
            claims.append(NLVR2Claim(form.template, phrase))
        elif form.template == "side_count":
            claims += [
                NLVR2Claim("side_count", phrase, side, number=n)
                for side in _SIDES for n in (counts[side] - 1, counts[side], counts[side] + 1) if 1 <= n <= max(NUMBER_WORDS)
            ]
        else:
            total = counts["left"] + counts["right"]
            claims += [NLVR2Claim("total", phrase, number=n) for n in (total - 1, total, total + 1) if 1 <= n <= max(NUMBER_WORDS)]
    return claims


def _nlvr2_words(claim: NLVR2Claim, rng: np.random.Generator) -> list[str]:
    """Surface form of an NLVR2 claim (two phrasings per template)."""
    other = "right" if claim.side == "left" else "left"
    if claim.template == "relation":
        spec = claim.spec
        assert spec is not None
        body = _phrase_words(spec.phrases[0], rng, "a") + ["is"] + _relation_words(spec.relation, rng) + _phrase_words(spec.phrases[1], rng, "a")  # type: ignore[arg-type]
        return ["in", "the", claim.side, "image"] + body
    phrase = claim.phrase
    assert phrase is not None
    if claim.template == "compare":
        noun = _phrase_words(phrase, rng, "", plural=True)
        verb = _pick(rng, (("has",), ("contains",)))
        return ["the", claim.side, "image", *verb, "more" if claim.more else "fewer", *noun, "than", "the", other, "image"]
    if claim.template == "both":
        if rng.random() < 0.5:
            return ["both", "images", "contain"] + _phrase_words(phrase, rng, "a")
        return ["there", "is"] + _phrase_words(phrase, rng, "a") + ["in", "each", "image"]
    if claim.template == "one":
        if rng.random() < 0.5:
            return ["exactly", "one", "image", "contains"] + _phrase_words(phrase, rng, "a")
        return ["only", "one", "of", "the", "images", "contains"] + _phrase_words(phrase, rng, "a")
    counted = _phrase_words(replace(phrase, count=claim.number), rng, "number")
    if claim.template == "side_count":
        if rng.random() < 0.5:
            return ["the", claim.side, "image", "contains", "exactly"] + counted
        return ["there", "are" if claim.number > 1 else "is", "exactly"] + counted + ["in", "the", claim.side, "image"]
    if rng.random() < 0.5:
        return ["the", "two", "images", "contain"] + counted + ["in", "total"]
    return ["together", "the", "images", "show", "exactly"] + counted


def _nlvr2_partner(left_index: int, length: int, rng: np.random.Generator) -> int:
    """A seeded right-image index different from the left one."""
    if length < 2:
        raise ValueError("NLVR2 needs a split with at least two images")
    candidate = int(rng.integers(length - 1))
    return candidate + 1 if candidate >= left_index else candidate


def nlvr2_record(world: World, split: str, index: int, _scenes: Callable[[int], Scene] | None = None) -> NLVR2Record:
    """NLVR2 record `index` of `split` (module docstring, NLVR2).

    The form (template, coloured or plain phrase) is drawn first, independently of the label; then
    right images (and, failing those, further left images) are tried until the form has a claim of the
    wanted truth, as NLVR2 pairs are chosen so that a statement about them is interesting. Only when a
    whole scan fails does the form change (about 2% of True records, measured on 1,000 per split).
    """
    _check_split(split)
    scenes = _scenes or _scene_getter(world, split)
    rng = _record_rng(world, "nlvr2", split, index)
    label = bool(_block_label(world, "nlvr2", split, index, 2))
    length = world.sizes[split]
    template = NLVR2_TEMPLATES[int(rng.choice(len(NLVR2_TEMPLATES), p=_NLVR2_TEMPLATE_WEIGHTS))]
    form = _NLVR2Form(template, bool(rng.random() < _NLVR2_COLOUR_RATE), template in ("compare", "total") and bool(rng.random() < 0.15))
    fallbacks = [replace(form, with_colour=not form.with_colour)] + [
        _NLVR2Form(t, False, False) for t in NLVR2_TEMPLATES if t != template
    ]
    for attempt, current in enumerate([form] + fallbacks):
        for s in _scan(index, length)[: _NLVR2_LEFT_TRIES if attempt == 0 else 1]:
            left = scenes(s)
            for _ in range(_NLVR2_PARTNER_TRIES):
                r = _nlvr2_partner(s, length, rng)
                right = scenes(r)
                matching = [c for c in _nlvr2_candidates(current, left, right, rng, split) if nlvr2_truth(c, left, right) == label]
                if matching:
                    return NLVR2Record(
                        identifier=f"{split}-{index}",
                        left_image_id=image_id(split, s),
                        right_image_id=image_id(split, r),
                        statement=" ".join(_nlvr2_words(_pick(rng, matching), rng)),
                        label=label,
                    )
    raise RuntimeError(f"no {label} NLVR2 statement found for record {index} of {split} (a bug)")


# ---------------------------------------------------------------------------------------------
# Task data
# ---------------------------------------------------------------------------------------------

_RECORD_BUILDERS: dict[str, Callable[..., object]] = {"ve": ve_record, "rec": rec_record, "vqa": vqa_record, "nlvr2": nlvr2_record}


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"unknown world task {task!r}; expected one of {TASKS}")


def task_records(world: World, task: str, split: str, count: int, start: int = 0) -> list:
    """Records `start .. start + count - 1` of `task` on `split` (each a pure function of its index, so
    shards and prefixes agree with the full list)."""
    _check_task(task)
    _check_split(split)
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 0:
        raise ValueError(f"count must be a non-negative int, got {count!r}")
    if isinstance(start, bool) or not isinstance(start, (int, np.integer)) or start < 0:
        raise ValueError(f"start must be a non-negative int, got {start!r}")
    scenes = _scene_getter(world, split)
    build = _RECORD_BUILDERS[task]
    return [build(world, split, i, scenes) for i in range(int(start), int(start) + int(count))]


def world_task_data(world: World, task: str, split: str | Sequence[str] = "train", count: int | Mapping[str, int] = 1000) -> TaskData:
    """`TaskData` of a world task: `count` records per requested split (an int, or a {split: count}
    mapping), `WorldImages` serving exactly those splits, and for VQA the answer vocabulary."""
    _check_task(task)
    names = [split] if isinstance(split, str) else list(split)
    if not names:
        raise ValueError("world_task_data needs at least one split")
    if isinstance(count, Mapping) and set(names) - set(count):
        raise ValueError(f"count has no entry for split(s) {sorted(set(names) - set(count))}")
    counts = {name: (count[name] if isinstance(count, Mapping) else count) for name in names}
    splits = {name: task_records(world, task, name, counts[name]) for name in names}
    return TaskData(
        task=task,
        splits=splits,
        images=WorldImages(world, names),
        answer_vocab=vqa_answer_vocab() if task == "vqa" else None,
    )


def world_task_words() -> list[str]:
    """Every word task text can contain beyond `lexicon.lexicon_words()` (question words, VE superlatives
    of unrendered properties, NLVR2 templates, extreme positions, answer variants), sorted: a tokenizer trained on
    world captions should keep these whole too."""
    words = {"how", "many", "in", "the", "image", "can", "you", "see", "what", "color", "shape", "is", "are",
             "there", "any", "shows", "picture", "contains", "exactly", "and"}
    words |= {w for superlative in VE_SUPERLATIVES for w in superlative} | {"of"}
    words |= {w for options in EXTREME_WORDS.values() for w in options}
    words |= {"left", "right", "has", "more", "fewer", "than", "both", "images", "contain", "each", "one", "only",
              "total", "two", "together", "show"}
    words |= {"yes", "no", "zero", "none"} | {str(n) for n in range(_MAX_ANSWER_NUMBER + 1)}
    return sorted(words)


__all__ = [
    "EXTREME_WORDS",
    "NLVR2Claim",
    "NLVR2_TEMPLATES",
    "PROPOSAL_HIT_RATE",
    "RefSpec",
    "TASKS",
    "TASK_CODES",
    "TASK_SPLITS",
    "VEClaim",
    "VE_FORMS",
    "VE_KINDS",
    "VE_SELECTORS",
    "VE_SUPERLATIVES",
    "VQA_SLOTS",
    "WorldImages",
    "box_iou",
    "image_id",
    "nlvr2_record",
    "nlvr2_truth",
    "parse_image_id",
    "rec_record",
    "referents",
    "task_records",
    "unique_references",
    "ve_candidate_truths",
    "ve_label",
    "ve_record",
    "vqa_answer_vocab",
    "vqa_record",
    "world_task_data",
    "world_task_words",
]
