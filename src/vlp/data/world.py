"""The embedded procedural world: seeded scenes, exact boxes, captions, hard negatives and splits.

Implements world.md ("Scenes", "Text", "Splits"). A sample is a pure function of
(world seed, split, index): every random draw comes from `numpy.random.default_rng([seed, split_code,
index, stream])`, so `split[i]` is O(1), needs no files, and is identical across processes and
machines. Streams: 0 = layout (objects, placement, background), 1 = captions, 2 = background noise
pixels, 3 = the colour probe; separating them keeps the scene graph fixed when the grammar or the pixels
change.

Scenes
  1-6 objects (val/test/compositional: 2-6) of `lexicon.CLASSES`, each with a colour, size, style and
  position. Objects never overlap: nominal boxes are placed by rejection sampling (40 tries each)
  with a gap of 3% of the image between them; the first two objects of val/test/compositional scenes
  fall back to a deterministic scan (then to smaller sizes) so they are always placed; any other object
  that finds no room is dropped. Sizes are relative to the image, so crowding is the same at every
  image size: about half of the 6-object draws lose an object, and train scenes hold 1/2/3/4/5/6
  objects about 18/15/18/20/20/9 % of the time (world.md allows fewer objects when space is tight).
  Each object is rasterised on its own mask; its box is the exact bounding box of that mask, with
  exclusive end (see `vlp.data.render`). Scenes depend on `image_size` (placement is in pixels).

Relations (computed from exact boxes; centre = ((x1 + x2) / 2, (y1 + y2) / 2); S = image size)
  a "left of" b  iff  dx = cx_b - cx_a > 0.10 * S  and |dx| >= |dy|   ("right of" mirrored);
  a "above"   b  iff  dy = cy_b - cy_a > 0.10 * S  and |dy| >  |dx|   ("below" mirrored);
  a "next to" b  iff  max(horizontal gap, vertical gap) between the boxes <= 0.12 * S.
  The directional relations are exclusive (at most one per ordered pair) and antisymmetric.

Captions
  Five distinct captions per image from a grammar (`CaptionSpec` -> words): full listings of all
  objects grouped by (colour, class) with counts ("two red circles and a blue star"), partial
  captions about some objects ("a large striped box and other shapes"), relation captions ("a red
  disc to the left of a blue star"), counts ("there are four shapes"). Synonyms for classes, colours
  and sizes; lowercase, no punctuation, at most MAX_CAPTION_WORDS (32) words, about 11 on average.
  Every caption is checked TRUE against the scene by
  `caption_is_true` before it is used (a false one raises). Counts are exact ("two red circles" means
  exactly two); relation noun phrases are existential.

Hard negatives
  `hard_pairs` are (true caption, the same caption with the colour words of two noun phrases of
  different colours swapped) where the swapped caption is FALSE for the image; only the two colour
  words differ, so swaps that would need a different article ("an orange" vs "a red") are skipped.
  val/test/compositional scenes always have one: their first two objects have different colours and
  classes, and no later object carries either swapped (colour, class) combination. About 73% of
  train scenes have one (none is possible when all objects share a colour).

Colour probe (`colour_probe`)
  An easier companion of the hard pairs: one object, one colour, no binding between objects.
  `Scene.colour_probe` is (true caption of one object, the same caption with only its colour word
  changed), e.g. ("there is a red circle", "there is a blue circle"): an opener as list captions have
  ("a picture of", "there is", or none), an indefinite article, the object's colour and class words. The new colour is one that no
  object of that class has (so the probe is FALSE, checked with `caption_is_true`), whose word keeps
  the article ("a red" -> "a blue", never "an orange"), and, outside the compositional split, names no
  held-out combination. Object, opener, synonyms and the new colour are drawn from stream 3. Every
  val/test/compositional scene has one (its first two objects differ in colour, so some object takes
  an "a" colour word); a train scene whose only colour is orange has none (None).

Compositional split (`HELD_OUT_COMBOS`)
  25 of the 198 (colour, class) combinations (about 1/8), chosen once from a fixed seed independent
  of the world seed (at most 2 per class, 3 per colour), never occur in train/val/test/unpaired scenes,
  nor in their hard negatives; every compositional scene contains at least one (its first object).
  Relation combinations are not held out. The set (colour class): black arrow, white arrow,
  green bolt, white car, blue circle, green circle, brown cloud, orange cloud, grey cross,
  yellow cross, pink diamond, orange flag, purple flag, green heart, brown hexagon, blue house,
  purple house, grey moon, yellow moon, black pentagon, purple pentagon, blue ring, black square,
  brown star, orange star.

Unpaired view (VLMixer)
  `unpaired_images` samples have images, objects and captions; the captions exist only to derive
  labels and must never be paired with their image. `unpaired_text` comes from disjoint scenes (its own
  seed range) and is text-only: its samples carry `image=None` and are never rendered.

Budgets are prefixes: `world.split("train").prefix(n)`.
"""

from __future__ import annotations

import operator
import time
from collections import OrderedDict
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import overload

import numpy as np

from vlp.data.lexicon import (
    CAPTION_PREFIXES,
    CLASSES,
    COLOUR_NAMES,
    COLOURS,
    GENERIC_NOUNS,
    NUMBER_WORDS,
    PLURALS,
    RELATION_PHRASES,
    SIZES,
    STYLES,
    indefinite_article,
)
from vlp.data.render import BackgroundSpec, object_mask, render_scene, sample_background

SPLIT_CODES: dict[str, int] = {
    "train": 0,
    "val": 1,
    "test": 2,
    "compositional": 3,
    "unpaired_images": 4,
    "unpaired_text": 5,
}
"""Each split draws from its own seed range `[seed, code, index, stream]`, so splits are disjoint."""

DEFAULT_SPLIT_SIZES: dict[str, int] = {
    "train": 20000,
    "val": 1000,
    "test": 1000,
    "compositional": 1000,
    "unpaired_images": 20000,
    "unpaired_text": 20000,
}

EVAL_SPLITS = ("val", "test", "compositional")
"""Splits whose scenes always hold >= 2 objects of different colours and >= 1 hard pair."""

NUM_CAPTIONS = 5
MAX_CAPTION_WORDS = 32
"""Longer candidates are discarded (a six-group listing without attributes is at most 32 words)."""
MAX_OBJECTS = 6
MIN_IMAGE_SIZE = 32
MAX_IMAGE_SIZE = 1024
PLACEMENT_TRIES = 40
PLACEMENT_GAP = 0.03
RELATION_MARGIN = 0.10
NEXT_TO_MAX_GAP = 0.12
SAME_CLASS_PROBABILITY = 0.3
"""Chance that a further object repeats the class of an earlier one (same-class distractors for
REC, counts like "two circles")."""
SAME_COLOUR_PROBABILITY = 0.4
"""Given a repeated class, chance that it also repeats that object's colour ("two red circles")."""

_LAYOUT_STREAM, _CAPTION_STREAM, _PIXEL_STREAM, _PROBE_STREAM = 0, 1, 2, 3
_SCENE_ID_STRIDE = 1_000_000_000

# ---------------------------------------------------------------------------------------------
# Held-out (colour, class) combinations for the compositional split
# ---------------------------------------------------------------------------------------------

HELD_OUT_SEED = 20240611
HELD_OUT_COUNT = round(len(COLOURS) * len(CLASSES) / 8)
_MAX_HELD_OUT_PER_CLASS = 2
_MAX_HELD_OUT_PER_COLOUR = 3


def _choose_held_out_combos() -> tuple[tuple[str, str], ...]:
    """Deterministic choice of ~1/8 of (colour, class name) combos from `HELD_OUT_SEED`, with at most
    2 per class and 3 per colour so every class and colour stays common in training."""
    rng = np.random.default_rng(HELD_OUT_SEED)
    combos = [(colour.name, object_class.name) for colour in COLOURS for object_class in CLASSES]
    chosen: list[tuple[str, str]] = []
    per_class: dict[str, int] = {}
    per_colour: dict[str, int] = {}
    for index in rng.permutation(len(combos)):
        colour, class_name = combos[int(index)]
        if per_class.get(class_name, 0) >= _MAX_HELD_OUT_PER_CLASS or per_colour.get(colour, 0) >= _MAX_HELD_OUT_PER_COLOUR:
            continue
        chosen.append((colour, class_name))
        per_class[class_name] = per_class.get(class_name, 0) + 1
        per_colour[colour] = per_colour.get(colour, 0) + 1
        if len(chosen) == HELD_OUT_COUNT:
            break
    return tuple(sorted(chosen, key=lambda combo: (combo[1], combo[0])))


HELD_OUT_COMBOS: tuple[tuple[str, str], ...] = _choose_held_out_combos()
"""(colour, class name) pairs that appear only in the compositional split."""

_HELD_OUT_IDS: frozenset[tuple[str, int]] = frozenset(
    (colour, next(c.class_id for c in CLASSES if c.name == class_name)) for colour, class_name in HELD_OUT_COMBOS
)

# ---------------------------------------------------------------------------------------------
# Scene graph types
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorldObject:
    """One object of a scene. `box` = (x1, y1, x2, y2) pixels enclosing exactly its drawn pixels,
    exclusive end (x2 = last column + 1); `box_norm` = box / image_size."""

    class_id: int
    class_name: str
    colour: str
    size: str
    style: str
    box: tuple[int, int, int, int]
    box_norm: tuple[float, float, float, float]

    @property
    def centre(self) -> tuple[float, float]:
        """Box centre in pixels, the point relations are measured from."""
        x1, y1, x2, y2 = self.box
        return ((x1 + x2) / 2.0, (y1 + y2) / 2.0)


@dataclass(frozen=True)
class PlacedMask:
    """An object's local mask and where its canvas sits in the image (top-left pixel)."""

    x: int
    y: int
    mask: np.ndarray = field(repr=False, compare=False)


@dataclass(frozen=True)
class Relation:
    """`objects[subject] <relation> objects[target]`, relation in `lexicon.RELATIONS`."""

    subject: int
    relation: str
    target: int


@dataclass(frozen=True)
class Scene:
    """A scene graph without pixels: everything needed for labels and for rendering."""

    split: str
    index: int
    scene_id: int
    image_size: int
    objects: tuple[WorldObject, ...]
    relations: tuple[Relation, ...]
    background: BackgroundSpec
    captions: tuple[str, ...]
    hard_pairs: tuple[tuple[str, str], ...]
    masks: tuple[PlacedMask, ...] = field(repr=False)
    colour_probe: tuple[str, str] | None = None
    """(true caption of one object, the same caption with another colour word): module docstring."""


@dataclass(eq=False)
class WorldSample:
    """One sample: `image` uint8 (H, W, 3) (None for the text-only `unpaired_text` split), the scene's
    objects, NUM_CAPTIONS true captions, hard pairs (true caption, colour-swapped false caption) and the
    colour probe (one object's true caption, the same with another colour word; None when impossible).
    `scene_id` is unique across the splits of one world: split_code * 1e9 + index. `relations` lists
    every true relation between objects (by index), for downstream labels. Compared by identity
    (holds an array)."""

    index: int
    split: str
    scene_id: int
    image: np.ndarray | None
    objects: list[WorldObject]
    captions: list[str]
    hard_pairs: list[tuple[str, str]]
    relations: list[Relation]
    image_size: int
    scene: Scene = field(repr=False)
    colour_probe: tuple[str, str] | None = None


# ---------------------------------------------------------------------------------------------
# Relations
# ---------------------------------------------------------------------------------------------


def directional_relation(subject: WorldObject, target: WorldObject, image_size: int) -> str | None:
    """'left of' / 'right of' / 'above' / 'below' for subject w.r.t. target, or None (rule in the
    module docstring: dominant axis of the centre offset, larger than 10% of the image)."""
    subject_x, subject_y = subject.centre
    target_x, target_y = target.centre
    dx, dy = target_x - subject_x, target_y - subject_y
    margin = RELATION_MARGIN * image_size
    if abs(dx) >= abs(dy) and abs(dx) > margin:
        return "left of" if dx > 0 else "right of"
    if abs(dy) > abs(dx) and abs(dy) > margin:
        return "above" if dy > 0 else "below"
    return None


def are_next_to(first: WorldObject, second: WorldObject, image_size: int) -> bool:
    """True when the larger of the horizontal and vertical gaps between the boxes is at most 12% of
    the image size (symmetric)."""
    ax1, ay1, ax2, ay2 = first.box
    bx1, by1, bx2, by2 = second.box
    gap_x = max(0, max(ax1, bx1) - min(ax2, bx2))
    gap_y = max(0, max(ay1, by1) - min(ay2, by2))
    return max(gap_x, gap_y) <= NEXT_TO_MAX_GAP * image_size


def relation_holds(subject: WorldObject, relation: str, target: WorldObject, image_size: int) -> bool:
    """Whether `subject <relation> target` is true (relation in `lexicon.RELATIONS`)."""
    if relation == "next to":
        return are_next_to(subject, target, image_size)
    if relation not in RELATION_PHRASES:
        raise ValueError(f"unknown relation {relation!r}; expected one of {tuple(RELATION_PHRASES)}")
    return directional_relation(subject, target, image_size) == relation


def scene_relations(objects: Sequence[WorldObject], image_size: int) -> list[Relation]:
    """All true relations between ordered pairs of distinct objects (directional and 'next to')."""
    relations = []
    for i, subject in enumerate(objects):
        for j, target in enumerate(objects):
            if i == j:
                continue
            direction = directional_relation(subject, target, image_size)
            if direction is not None:
                relations.append(Relation(i, direction, j))
            if are_next_to(subject, target, image_size):
                relations.append(Relation(i, "next to", j))
    return relations


# ---------------------------------------------------------------------------------------------
# Caption grammar: specs, truth, realisation
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NounPhrase:
    """A description of a set of objects. `class_id` None = generic noun ("shape"); attributes None
    = not mentioned. `count` k = exactly k objects match; None = at least one (existential "a")."""

    class_id: int | None
    colour: str | None = None
    size: str | None = None
    style: str | None = None
    count: int | None = None

    def matches(self, obj: WorldObject) -> bool:
        """Whether `obj` has every attribute this phrase mentions."""
        return (
            (self.class_id is None or obj.class_id == self.class_id)
            and (self.colour is None or obj.colour == self.colour)
            and (self.size is None or obj.size == self.size)
            and (self.style is None or obj.style == self.style)
        )


@dataclass(frozen=True)
class CaptionSpec:
    """The meaning of a caption. kind "list": every phrase holds (exact counts), and if `others`
    some object matches no phrase. kind "relation": some object matching phrases[0] stands in
    `relation` to a different object matching phrases[1]."""

    kind: str
    phrases: tuple[NounPhrase, ...]
    relation: str | None = None
    others: bool = False


def caption_is_true(
    spec: CaptionSpec,
    objects: Sequence[WorldObject],
    image_size: int,
    relations: Collection[Relation] | None = None,
) -> bool:
    """Evaluate a caption's meaning against a scene (the world's single source of caption truth).

    `relations` may pass the scene's precomputed `scene_relations` (a speed-up; same result).
    """
    if spec.kind == "list":
        for phrase in spec.phrases:
            matched = sum(phrase.matches(obj) for obj in objects)
            if (phrase.count is None and matched < 1) or (phrase.count is not None and matched != phrase.count):
                return False
        if spec.others and all(any(p.matches(obj) for p in spec.phrases) for obj in objects):
            return False
        return True
    if spec.kind == "relation":
        subject_phrase, target_phrase = spec.phrases
        if relations is not None:
            return any(
                r.relation == spec.relation
                and subject_phrase.matches(objects[r.subject])
                and target_phrase.matches(objects[r.target])
                for r in relations
            )
        return any(
            relation_holds(subject, spec.relation, target, image_size)  # type: ignore[arg-type]
            for i, subject in enumerate(objects)
            if subject_phrase.matches(subject)
            for j, target in enumerate(objects)
            if j != i and target_phrase.matches(target)
        )
    raise ValueError(f"unknown caption kind {spec.kind!r}; expected 'list' or 'relation'")


@dataclass
class _Realised:
    """A caption's words plus, for each noun phrase, the index of its colour word (or -1)."""

    spec: CaptionSpec
    words: list[str]
    colour_positions: list[int]

    @property
    def text(self) -> str:
        return " ".join(self.words)


def _choice(rng: np.random.Generator, options: Sequence):
    return options[int(rng.integers(len(options)))]


def _realise_phrase(phrase: NounPhrase, rng: np.random.Generator, words: list[str], determiner: str) -> int:
    """Append the words of `phrase` to `words`; return the index of its colour word (-1 if none).

    determiner: "indefinite" -> a/an; "count" -> number word (1 may read "a", "one" or "a single");
    "one" -> number words only (used where swaps must not touch articles).
    """
    adjectives: list[str] = []
    if phrase.size is not None:
        adjectives += list(_choice(rng, SIZES[_SIZE_INDEX[phrase.size]].words))
    if phrase.style is not None:
        adjectives.append(_choice(rng, STYLES[_STYLE_INDEX[phrase.style]].words))
    colour_offset = -1
    if phrase.colour is not None:
        colour_offset = len(adjectives)
        adjectives.append(_choice(rng, COLOURS[_COLOUR_INDEX[phrase.colour]].words))
    nouns = CLASSES[phrase.class_id].nouns if phrase.class_id is not None else GENERIC_NOUNS
    noun = _choice(rng, nouns)
    plural = phrase.count is not None and phrase.count > 1
    tail = adjectives + [PLURALS[noun] if plural else noun]
    if determiner == "indefinite" or (determiner == "count" and phrase.count == 1 and rng.random() < 0.5):
        head = [indefinite_article(tail[0])]
    elif determiner == "count" and phrase.count == 1 and rng.random() < 0.3:
        head = ["a", "single"]
    else:
        head = [NUMBER_WORDS[phrase.count if phrase.count is not None else 1]]
    start = len(words) + len(head)
    words += head + tail
    return start + colour_offset if colour_offset >= 0 else -1


def _realise_list(spec: CaptionSpec, rng: np.random.Generator, numbers_only: bool = False) -> _Realised:
    words: list[str] = []
    first_plural = (spec.phrases[0].count or 1) > 1
    opener = int(rng.integers(len(CAPTION_PREFIXES) + 1))
    if opener == len(CAPTION_PREFIXES) and not numbers_only:
        words += ["there", "are" if first_plural else "is"]
    elif opener < len(CAPTION_PREFIXES):
        words += list(CAPTION_PREFIXES[opener])
    positions = []
    for k, phrase in enumerate(spec.phrases):
        if k == 1:
            words.append(_choice(rng, ("and", "with")))
        elif k > 1:
            words.append("and")
        positions.append(_realise_phrase(phrase, rng, words, "one" if numbers_only else "count"))
    if spec.others:
        words += list(_choice(rng, (("and", "other"), ("and", "some", "other"), ("among", "other"))))
        words.append(PLURALS[_choice(rng, GENERIC_NOUNS)])
    return _Realised(spec, words, positions)


def _realise_relation(spec: CaptionSpec, rng: np.random.Generator) -> _Realised:
    words: list[str] = []
    form = int(rng.integers(3))
    if form == 2:
        words += ["there", "is"]
    positions = [_realise_phrase(spec.phrases[0], rng, words, "indefinite")]
    if form == 1:
        words.append("is")
    words += list(_choice(rng, RELATION_PHRASES[spec.relation]))  # type: ignore[index]
    positions.append(_realise_phrase(spec.phrases[1], rng, words, "indefinite"))
    return _Realised(spec, words, positions)


_SIZE_INDEX = {size.name: k for k, size in enumerate(SIZES)}
_STYLE_INDEX = {style.name: k for k, style in enumerate(STYLES)}
_COLOUR_INDEX = {colour.name: k for k, colour in enumerate(COLOURS)}


def _exact_phrase(objects: Sequence[WorldObject], template: NounPhrase) -> NounPhrase:
    """`template` with its count set to the number of objects it matches (so it is true)."""
    return replace(template, count=sum(template.matches(obj) for obj in objects))


def _group_phrases(
    objects: Sequence[WorldObject], rng: np.random.Generator, attribute_rate: float
) -> list[NounPhrase]:
    """One exact-count phrase per (colour, class) group; size/style added when shared by the group."""
    groups: dict[tuple[str, int], list[WorldObject]] = {}
    for obj in objects:
        groups.setdefault((obj.colour, obj.class_id), []).append(obj)
    phrases = []
    for (colour, class_id), members in groups.items():
        size = members[0].size if all(m.size == members[0].size for m in members) and rng.random() < attribute_rate else None
        style = (
            members[0].style
            if all(m.style == members[0].style for m in members) and rng.random() < attribute_rate / 2
            else None
        )
        phrases.append(_exact_phrase(objects, NounPhrase(class_id, colour, size, style)))
    order = rng.permutation(len(phrases))
    return [phrases[int(k)] for k in order]


def _full_caption(objects: Sequence[WorldObject], rng: np.random.Generator) -> CaptionSpec:
    few_groups = len({(obj.colour, obj.class_id) for obj in objects}) <= 3
    # Attributes only for short listings, which keeps every caption within MAX_CAPTION_WORDS.
    return CaptionSpec("list", tuple(_group_phrases(objects, rng, attribute_rate=0.25 if few_groups else 0.0)))


def _partial_caption(objects: Sequence[WorldObject], rng: np.random.Generator) -> CaptionSpec:
    phrases = _group_phrases(objects, rng, attribute_rate=0.4)
    keep = phrases[: int(rng.integers(1, min(2, len(phrases)) + 1))]
    if rng.random() < 0.25:  # drop the colour of one phrase: "two circles"
        victim = int(rng.integers(len(keep)))
        keep[victim] = _exact_phrase(objects, replace(keep[victim], colour=None))
    mentioned = sum(any(p.matches(obj) for p in keep) for obj in objects)
    others = mentioned < len(objects) and rng.random() < 0.5
    return CaptionSpec("list", tuple(keep), others=others)


def _count_caption(objects: Sequence[WorldObject], rng: np.random.Generator) -> CaptionSpec:
    if rng.random() < 0.5:
        return CaptionSpec("list", (NounPhrase(None, count=len(objects)),))
    colour = _choice(rng, [obj.colour for obj in objects])
    return CaptionSpec("list", (_exact_phrase(objects, NounPhrase(None, colour)),))


def _relation_caption(
    objects: Sequence[WorldObject], relations: Sequence[Relation], rng: np.random.Generator
) -> CaptionSpec | None:
    if not relations:
        return None
    chosen = _choice(rng, relations)
    phrases = []
    for k in (chosen.subject, chosen.target):
        obj = objects[k]
        phrases.append(
            NounPhrase(
                obj.class_id,
                obj.colour if rng.random() < 0.85 else None,
                obj.size if rng.random() < 0.2 else None,
                obj.style if rng.random() < 0.1 else None,
            )
        )
    return CaptionSpec("relation", tuple(phrases), relation=chosen.relation)


_CAPTION_KINDS = ("partial", "relation", "full", "count")
_CAPTION_KIND_WEIGHTS = np.array([0.4, 0.35, 0.15, 0.1])


def _realise(spec: CaptionSpec, rng: np.random.Generator) -> _Realised:
    return _realise_relation(spec, rng) if spec.kind == "relation" else _realise_list(spec, rng)


def _swap_colours(realised: _Realised, first: int, second: int) -> _Realised | None:
    """Swap the colour words of phrases `first` and `second`; None if an article would change."""
    i, j = realised.colour_positions[first], realised.colour_positions[second]
    words = list(realised.words)
    words[i], words[j] = words[j], words[i]
    for position in (i, j):
        if position > 0 and words[position - 1] in ("a", "an") and words[position - 1] != indefinite_article(words[position]):
            return None
    phrases = list(realised.spec.phrases)
    phrases[first], phrases[second] = (
        replace(phrases[first], colour=phrases[second].colour),
        replace(phrases[second], colour=phrases[first].colour),
    )
    return _Realised(replace(realised.spec, phrases=tuple(phrases)), words, realised.colour_positions)


def _hard_negative(
    realised: _Realised,
    objects: Sequence[WorldObject],
    relations: Sequence[Relation],
    image_size: int,
    allow_held_out: bool,
) -> str | None:
    """The first colour swap of `realised` that makes it false (and, outside the compositional
    split, names no held-out combination), or None."""
    phrases = realised.spec.phrases
    for first in range(len(phrases)):
        for second in range(first + 1, len(phrases)):
            colour_a, colour_b = phrases[first].colour, phrases[second].colour
            if colour_a is None or colour_b is None or colour_a == colour_b:
                continue
            swapped = _swap_colours(realised, first, second)
            if swapped is None:
                continue
            if not allow_held_out and any(
                (p.colour, p.class_id) in _HELD_OUT_IDS for p in swapped.spec.phrases if p.class_id is not None
            ):
                continue
            if not caption_is_true(swapped.spec, objects, image_size, relations):
                return swapped.text
    return None


def describe_scene(
    objects: Sequence[WorldObject],
    relations: Sequence[Relation],
    image_size: int,
    rng: np.random.Generator,
    allow_held_out: bool = False,
) -> tuple[list[str], list[tuple[str, str]]]:
    """NUM_CAPTIONS distinct true captions and the hard pairs of a scene (module docstring, Captions).

    The first candidate is a full listing; further candidates are drawn by kind (partial 0.40,
    relation 0.35 when any relation holds, full 0.15, count 0.10) until NUM_CAPTIONS distinct texts
    exist (bounded; duplicates are allowed only if the bound is hit). The final order is shuffled.
    """
    if not objects:
        raise ValueError("a scene needs at least one object to be described")
    chosen: list[_Realised] = []
    seen: set[str] = set()
    weights = _CAPTION_KIND_WEIGHTS.copy()
    if not relations:
        weights[1] = 0.0
    weights /= weights.sum()
    attempts = 0
    while len(chosen) < NUM_CAPTIONS:
        attempts += 1
        kind = "full" if attempts == 1 else _CAPTION_KINDS[int(rng.choice(len(_CAPTION_KINDS), p=weights))]
        if kind == "full":
            spec = _full_caption(objects, rng)
        elif kind == "partial":
            spec = _partial_caption(objects, rng)
        elif kind == "count":
            spec = _count_caption(objects, rng)
        else:
            spec = _relation_caption(objects, relations, rng)  # type: ignore[assignment]
        realised = _realise(spec, rng)
        if not caption_is_true(realised.spec, objects, image_size, relations):
            raise RuntimeError(f"caption grammar produced a false caption {realised.text!r} (a bug)")
        if (realised.text in seen or len(realised.words) > MAX_CAPTION_WORDS) and attempts < 200:
            continue
        seen.add(realised.text)
        chosen.append(realised)
    order = rng.permutation(len(chosen))
    chosen = [chosen[int(k)] for k in order]

    hard_pairs: list[tuple[str, str]] = []
    for realised in chosen:
        negative = _hard_negative(realised, objects, relations, image_size, allow_held_out)
        if negative is not None:
            hard_pairs.append((realised.text, negative))
    if not hard_pairs:
        binding = _binding_pair(objects, relations, image_size, rng, allow_held_out)
        if binding is not None:
            hard_pairs.append(binding)
    return [r.text for r in chosen], hard_pairs


def colour_probe(
    objects: Sequence[WorldObject],
    image_size: int,
    rng: np.random.Generator,
    allow_held_out: bool = False,
) -> tuple[str, str] | None:
    """The one-object colour probe of a scene (module docstring, Colour probe): (true caption, the same
    caption with only the colour word changed to a colour no object of that class has), or None when no
    object admits one. Objects are tried in a seeded order; the new colour is drawn uniformly, then one
    of its words with the same article."""
    for k in rng.permutation(len(objects)):
        obj = objects[int(k)]
        phrase = NounPhrase(obj.class_id, obj.colour)
        words: list[str] = []
        opener = int(rng.integers(len(CAPTION_PREFIXES) + 1))
        words += ["there", "is"] if opener == len(CAPTION_PREFIXES) else list(CAPTION_PREFIXES[opener])
        position = _realise_phrase(phrase, rng, words, "indefinite")
        article = words[position - 1]
        choices: list[list[str]] = []
        for colour in COLOURS:
            spec = CaptionSpec("list", (replace(phrase, colour=colour.name),))
            if colour.name == obj.colour or caption_is_true(spec, objects, image_size):
                continue
            if not allow_held_out and (colour.name, obj.class_id) in _HELD_OUT_IDS:
                continue
            same_article = [w for w in colour.words if indefinite_article(w) == article]
            if same_article:
                choices.append(same_article)
        if choices:
            negative = list(words)
            negative[position] = _choice(rng, _choice(rng, choices))
            return " ".join(words), " ".join(negative)
    return None


def _binding_pair(
    objects: Sequence[WorldObject],
    relations: Sequence[Relation],
    image_size: int,
    rng: np.random.Generator,
    allow_held_out: bool,
) -> tuple[str, str] | None:
    """Fallback hard pair from a counted two-phrase caption ("one red circle and two blue stars"),
    tried over object pairs in order; number words keep articles out of the swap."""
    for i, first in enumerate(objects):
        for second in objects[i + 1:]:
            if first.colour == second.colour or first.class_id == second.class_id:
                continue
            spec = CaptionSpec(
                "list",
                (
                    _exact_phrase(objects, NounPhrase(first.class_id, first.colour)),
                    _exact_phrase(objects, NounPhrase(second.class_id, second.colour)),
                ),
            )
            realised = _realise_list(spec, rng, numbers_only=True)
            negative = _hard_negative(realised, objects, relations, image_size, allow_held_out)
            if negative is not None:
                return realised.text, negative
    return None


# ---------------------------------------------------------------------------------------------
# Scene sampling
# ---------------------------------------------------------------------------------------------


@dataclass
class _PlannedObject:
    class_id: int
    colour: str
    size: str
    style: str
    flipped: bool
    width: int
    height: int


def _allowed_colours(class_id: int, allow_held_out: bool, forbidden: set[tuple[str, int]]) -> list[str]:
    return [
        colour
        for colour in COLOUR_NAMES
        if (allow_held_out or (colour, class_id) not in _HELD_OUT_IDS) and (colour, class_id) not in forbidden
    ]


def _plan_object(
    rng: np.random.Generator,
    image_size: int,
    class_id: int,
    colour: str,
) -> _PlannedObject:
    size_index = int(rng.integers(len(SIZES)))
    size = SIZES[size_index]
    object_class = CLASSES[class_id]
    styles = [s for s in STYLES if object_class.outline_ok or s.name != "outline"]
    style_weights = np.array([s.weight for s in styles])
    style = styles[int(rng.choice(len(styles), p=style_weights / style_weights.sum()))].name
    long_side = float(rng.uniform(*size.scale)) * image_size
    aspect_w, aspect_h = object_class.aspect
    width = max(3, round(long_side * aspect_w))
    height = max(3, round(long_side * aspect_h))
    flipped = bool(object_class.flippable and rng.random() < 0.5)
    return _PlannedObject(class_id, colour, size.name, style, flipped, width, height)


def _plan_objects(rng: np.random.Generator, split: str, image_size: int) -> tuple[list[_PlannedObject], int]:
    """Draw the objects of a scene; returns them and how many leading ones must be placed."""
    is_eval = split in EVAL_SPLITS
    allow_held_out = split == "compositional"
    count = int(rng.integers(2 if is_eval else 1, MAX_OBJECTS + 1))
    planned: list[_PlannedObject] = []
    forbidden: set[tuple[str, int]] = set()
    if is_eval:
        if split == "compositional":
            colour, class_name = HELD_OUT_COMBOS[int(rng.integers(len(HELD_OUT_COMBOS)))]
            first_class = next(c.class_id for c in CLASSES if c.name == class_name)
            first_colour = colour
        while True:
            if split != "compositional":
                first_class = int(rng.integers(len(CLASSES)))
                first_colour = _choice(rng, _allowed_colours(first_class, False, set()))
            second_class = int(rng.integers(len(CLASSES)))
            if second_class == first_class:
                continue
            options = [c for c in _allowed_colours(second_class, False, set()) if c != first_colour]
            second_colour = _choice(rng, options)
            swapped = {(second_colour, first_class), (first_colour, second_class)}
            if split == "compositional" or not (swapped & _HELD_OUT_IDS):
                break
        forbidden = swapped
        planned.append(_plan_object(rng, image_size, first_class, first_colour))
        planned.append(_plan_object(rng, image_size, second_class, second_colour))
    while len(planned) < count:
        if planned and rng.random() < SAME_CLASS_PROBABILITY:
            model = _choice(rng, planned)
            class_id = model.class_id
            options = _allowed_colours(class_id, allow_held_out, forbidden)
            colour = model.colour if model.colour in options and rng.random() < SAME_COLOUR_PROBABILITY else None
        else:
            class_id = int(rng.integers(len(CLASSES)))
            options = _allowed_colours(class_id, allow_held_out, forbidden)
            colour = None
        if colour is None:
            colour = _choice(rng, options)
        planned.append(_plan_object(rng, image_size, class_id, colour))
    return planned, (2 if is_eval else 1)


def _boxes_clear(box: tuple[int, int, int, int], placed: list[tuple[int, int, int, int]], gap: int) -> bool:
    x0, y0, x1, y1 = box
    for px0, py0, px1, py1 in placed:
        if not (x1 + gap <= px0 or px1 + gap <= x0 or y1 + gap <= py0 or py1 + gap <= y0):
            return False
    return True


def _find_room(
    rng: np.random.Generator, width: int, height: int, taken: list[tuple[int, int, int, int]], image_size: int, gap: int
) -> tuple[int, int] | None:
    """Up to PLACEMENT_TRIES random top-left corners; the first clear one, or None."""
    # The nominal box keeps a one-pixel margin so its canvas (one pixel wider) stays inside the image.
    max_x, max_y = image_size - 1 - width, image_size - 1 - height
    for _ in range(PLACEMENT_TRIES):
        x0, y0 = int(rng.integers(1, max_x + 1)), int(rng.integers(1, max_y + 1))
        if _boxes_clear((x0, y0, x0 + width, y0 + height), taken, gap):
            return x0, y0
    return None


def _scan_for_room(
    width: int, height: int, taken: list[tuple[int, int, int, int]], image_size: int, gap: int
) -> tuple[int, int] | None:
    """Deterministic raster scan for a clear top-left corner (fallback for required objects)."""
    for y0 in range(1, image_size - height):
        for x0 in range(1, image_size - width):
            if _boxes_clear((x0, y0, x0 + width, y0 + height), taken, gap):
                return x0, y0
    return None


def _place(
    rng: np.random.Generator, planned: list[_PlannedObject], required: int, image_size: int
) -> list[tuple[_PlannedObject, int, int]]:
    """Non-overlapping placement of nominal boxes (module docstring, Scenes).

    Every object gets PLACEMENT_TRIES random positions; an optional object that finds no room is
    dropped. A required object (the first `required`) then gets a raster scan, and if that fails too
    (two large objects need not fit at 64 px) it is shrunk to the smallest box of each smaller size
    in turn, so required objects are always placed.
    """
    gap = max(1, round(PLACEMENT_GAP * image_size))
    taken: list[tuple[int, int, int, int]] = []
    placed: list[tuple[_PlannedObject, int, int]] = []
    for k, obj in enumerate(planned):
        position = _find_room(rng, obj.width, obj.height, taken, image_size, gap)
        if position is None and k < required:
            position = _scan_for_room(obj.width, obj.height, taken, image_size, gap)
            smaller = [size for size in SIZES[: _SIZE_INDEX[obj.size]]][::-1]
            for size in smaller:
                if position is not None:
                    break
                long_side = size.scale[0] * image_size
                aspect_w, aspect_h = CLASSES[obj.class_id].aspect
                obj = replace(
                    obj, size=size.name, width=max(3, round(long_side * aspect_w)), height=max(3, round(long_side * aspect_h))
                )
                position = _scan_for_room(obj.width, obj.height, taken, image_size, gap)
            if position is None:
                raise RuntimeError(f"could not place required object {k} at image size {image_size} (a bug)")
        if position is None:
            continue
        taken.append((position[0], position[1], position[0] + obj.width, position[1] + obj.height))
        placed.append((obj, position[0], position[1]))
    return placed


def build_scene(seed: int, split: str, index: int, image_size: int) -> Scene:
    """The scene graph of sample `index` of `split` (pure function of its arguments; no pixels)."""
    code = SPLIT_CODES[split]
    layout_rng = np.random.default_rng([seed, code, index, _LAYOUT_STREAM])
    planned, required = _plan_objects(layout_rng, split, image_size)
    placed = _place(layout_rng, planned, required, image_size)
    background = sample_background(layout_rng, (seed, code, index, _PIXEL_STREAM))
    objects: list[WorldObject] = []
    masks: list[PlacedMask] = []
    for obj, x0, y0 in placed:
        local = object_mask(obj.class_id, obj.width, obj.height, obj.style, obj.flipped)
        rows, cols = np.flatnonzero(local.any(axis=1)), np.flatnonzero(local.any(axis=0))
        if rows.size == 0:
            raise RuntimeError(f"object {CLASSES[obj.class_id].name} of {obj.width}x{obj.height} px drew no pixels (a bug)")
        left, top, right, bottom = int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1
        canvas_x, canvas_y = x0 - 1, y0 - 1  # canvas = nominal box plus a one-pixel border
        box = (canvas_x + left, canvas_y + top, canvas_x + right, canvas_y + bottom)
        objects.append(
            WorldObject(
                class_id=obj.class_id,
                class_name=CLASSES[obj.class_id].name,
                colour=obj.colour,
                size=obj.size,
                style=obj.style,
                box=box,
                box_norm=tuple(v / image_size for v in box),  # type: ignore[arg-type]
            )
        )
        masks.append(PlacedMask(canvas_x, canvas_y, local))
    relations = scene_relations(objects, image_size)
    caption_rng = np.random.default_rng([seed, code, index, _CAPTION_STREAM])
    captions, hard_pairs = describe_scene(
        objects, relations, image_size, caption_rng, allow_held_out=(split == "compositional")
    )
    if split in EVAL_SPLITS and not hard_pairs:
        raise RuntimeError(f"{split}[{index}] has no hard pair although eval scenes guarantee one (a bug)")
    probe_rng = np.random.default_rng([seed, code, index, _PROBE_STREAM])
    probe = colour_probe(objects, image_size, probe_rng, allow_held_out=(split == "compositional"))
    if split in EVAL_SPLITS and probe is None:
        raise RuntimeError(f"{split}[{index}] has no colour probe although eval scenes guarantee one (a bug)")
    return Scene(
        split=split,
        index=index,
        scene_id=code * _SCENE_ID_STRIDE + index,
        image_size=image_size,
        objects=tuple(objects),
        relations=tuple(relations),
        background=background,
        captions=tuple(captions),
        hard_pairs=tuple(hard_pairs),
        masks=tuple(masks),
        colour_probe=probe,
    )


# ---------------------------------------------------------------------------------------------
# World and splits
# ---------------------------------------------------------------------------------------------


class WorldSplit(Sequence[WorldSample]):
    """A split of a `World` as a random-access sequence (`split[i]` renders sample i on demand).

    `prefix(n)` is the view of the first n samples: paired-data budgets are prefixes (world.md
    "Splits"), so a 1 k budget is contained in the 4 k one.
    """

    def __init__(self, world: "World", name: str, length: int) -> None:
        self.world = world
        self.name = name
        self._length = length

    def __len__(self) -> int:
        return self._length

    def _resolve(self, index: int) -> int:
        try:
            position = operator.index(index)
        except TypeError:
            raise TypeError(f"{self.name} split indices must be integers, got {type(index).__name__}") from None
        if isinstance(index, bool):
            raise TypeError(f"{self.name} split indices must be integers, got bool")
        if not -self._length <= position < self._length:
            raise IndexError(
                f"index {position} out of range for the {self.name} split of length {self._length} "
                f"(valid: {-self._length}..{self._length - 1}; enlarge it with World(sizes={{'{self.name}': n}}))"
            )
        return position % self._length

    @overload
    def __getitem__(self, index: int) -> WorldSample: ...

    @overload
    def __getitem__(self, index: slice) -> list[WorldSample]: ...

    def __getitem__(self, index):
        """Sample `index` (negative counts from the end); a slice returns a list of samples."""
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self._length))]
        position = self._resolve(index)
        cached = self.world.cached_sample(self.name, position)
        if cached is not None:
            return cached
        scene = build_scene(self.world.seed, self.name, position, self.world.image_size)
        image = None if self.name == "unpaired_text" else render_scene(scene)
        return self.world.keep_sample(WorldSample(
            index=position,
            split=self.name,
            scene_id=scene.scene_id,
            image=image,  # type: ignore[arg-type]
            objects=list(scene.objects),
            captions=list(scene.captions),
            hard_pairs=list(scene.hard_pairs),
            relations=list(scene.relations),
            image_size=scene.image_size,
            scene=scene,
            colour_probe=scene.colour_probe,
        ))

    def __iter__(self) -> Iterator[WorldSample]:
        for position in range(self._length):
            yield self[position]

    def scene(self, index: int) -> Scene:
        """The scene graph of sample `index` without rendering pixels (fast path for text use)."""
        return build_scene(self.world.seed, self.name, self._resolve(index), self.world.image_size)

    def prefix(self, n: int) -> "WorldSplit":
        """The view of the first `n` samples (a paired-data budget)."""
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 0 <= n <= self._length:
            raise ValueError(
                f"prefix length must be an int in [0, {self._length}] for the {self.name} split, got {n!r}; "
                f"enlarge the split with World(sizes={{'{self.name}': n}})"
            )
        return WorldSplit(self.world, self.name, int(n))

    def __repr__(self) -> str:
        return f"WorldSplit({self.name!r}, len={self._length}, seed={self.world.seed}, image_size={self.world.image_size})"


class World:
    """The procedural image-text world (world.md). `World(seed, image_size, sizes)`; `sizes`
    overrides split lengths (defaults in `DEFAULT_SPLIT_SIZES`).

    Rendered samples are kept in a per-process LRU cache of up to `cache_mb` MiB of pixels (0 = off): a
    small paired budget reads each image once per caption and epoch (the demo's 16 k pairs of 3,200 images:
    ~7 renders each over 350 steps), so a cached sample costs a dictionary lookup instead of a render
    (issue 15, "Repeated work"). A sample is a pure function of (seed, split, index), so a hit equals a fresh
    render; its image is read-only and its lists are copied per call. The cache is not pickled (a spawned
    DataLoader worker starts with an empty one)."""

    def __init__(self, seed: int = 0, image_size: int = 64, sizes: dict[str, int] | None = None,
                 cache_mb: int = 256) -> None:
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or not (
            MIN_IMAGE_SIZE <= image_size <= MAX_IMAGE_SIZE
        ):
            raise ValueError(f"image_size must be an int in [{MIN_IMAGE_SIZE}, {MAX_IMAGE_SIZE}] pixels, got {image_size!r}")
        merged = dict(DEFAULT_SPLIT_SIZES)
        for name, length in (sizes or {}).items():
            if name not in SPLIT_CODES:
                raise ValueError(f"unknown split {name!r} in sizes; expected keys from {tuple(SPLIT_CODES)}")
            if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or length < 0:
                raise ValueError(f"size of split {name!r} must be a non-negative int, got {length!r}")
            merged[name] = int(length)
        if isinstance(cache_mb, bool) or not isinstance(cache_mb, (int, np.integer)) or cache_mb < 0:
            raise ValueError(f"cache_mb must be a non-negative int (MiB of rendered pixels; 0 = no cache), got {cache_mb!r}")
        self.seed = int(seed)
        self.image_size = int(image_size)
        self.sizes = merged
        # entries: the pixels of one sample plus ~4 KiB for its scene, captions and lists
        self.cache_entries = int(cache_mb) * 2**20 // (3 * self.image_size ** 2 + 4096)
        self._cache: OrderedDict[tuple[str, int], WorldSample] = OrderedDict()

    def cached_sample(self, split: str, index: int) -> WorldSample | None:
        """A copy of the cached sample (split, index), or None (`World` docstring)."""
        sample = self._cache.get((split, index))
        if sample is None:
            return None
        self._cache.move_to_end((split, index))
        return replace(sample, objects=list(sample.objects), captions=list(sample.captions),
                       hard_pairs=list(sample.hard_pairs), relations=list(sample.relations))

    def keep_sample(self, sample: WorldSample) -> WorldSample:
        """Cache a freshly rendered sample (its image made read-only), evicting the least recently used."""
        if self.cache_entries <= 0:
            return sample
        if sample.image is not None:
            sample.image.setflags(write=False)
        self._cache[(sample.split, sample.index)] = sample
        if len(self._cache) > self.cache_entries:
            self._cache.popitem(last=False)
        return self.cached_sample(sample.split, sample.index)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_cache"] = OrderedDict()
        return state

    @property
    def held_out_combos(self) -> tuple[tuple[str, str], ...]:
        """(colour, class name) combinations seen only in the compositional split."""
        return HELD_OUT_COMBOS

    def split(self, name: str) -> WorldSplit:
        """The named split: train | val | test | compositional | unpaired_images | unpaired_text."""
        if name not in SPLIT_CODES:
            raise ValueError(f"unknown split {name!r}; expected one of {tuple(SPLIT_CODES)}")
        return WorldSplit(self, name, self.sizes[name])

    def scene(self, split: str, index: int) -> Scene:
        """The scene graph of `split[index]` without rendering (fast path for text-only use)."""
        return self.split(split).scene(index)

    def __repr__(self) -> str:
        return f"World(seed={self.seed}, image_size={self.image_size}, sizes={self.sizes})"


def measure_samples_per_second(world: World, split: str = "train", num_samples: int = 200) -> float:
    """Rendered samples per CPU-second of this process (one core), for world.md's requirement that
    rendering never be the training bottleneck. CPU time, not wall time, so the figure does not
    depend on how busy a shared machine is."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    samples = world.split(split)
    start = time.process_time()
    for index in range(num_samples):
        samples[index % len(samples)]
    return num_samples / max(time.process_time() - start, 1e-9)
