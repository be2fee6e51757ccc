"""The embedded world (world.md): determinism, exact boxes, true captions, hard negatives, splits.

Caption truth is checked with a parser written here from the lexicon tables and world.md's rules, not
with the world's own evaluator, so a grammar bug and an evaluator bug cannot cancel out.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import subprocess
import sys
from functools import lru_cache

import numpy as np
import pytest
from PIL import Image

from vlp.data import lexicon
from vlp.data.lexicon import (
    CAPTION_PREFIXES,
    CLASSES,
    COLOURS,
    SIZES,
    STYLES,
    class_id_of_word,
    class_words,
    colour_of_word,
    indefinite_article,
    lexicon_words,
)
from vlp.data.render import (
    grid_cell_width,
    object_mask,
    render_background,
    render_grid,
    render_scene,
    stripe_rgb,
)
from vlp.data.world import (
    HELD_OUT_COMBOS,
    MAX_CAPTION_WORDS,
    CaptionSpec,
    NounPhrase,
    World,
    WorldObject,
    are_next_to,
    caption_is_true,
    directional_relation,
    measure_samples_per_second,
    scene_relations,
)


@lru_cache(maxsize=None)
def world(image_size: int = 64, seed: int = 0) -> World:
    return World(seed=seed, image_size=image_size)


# ------------------------------------------------------------------------------------------------
# An independent caption parser (lexicon tables + the documented rules).
# ------------------------------------------------------------------------------------------------

SIZE_WORD = {w: s.name for s in SIZES for phrase in s.words for w in phrase if w != "sized"}
STYLE_WORD = {w: s.name for s in STYLES for w in s.words}
NUMBER = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6}
RELATION_SURFACES = [
    (("to", "the", "left", "of"), "left of"), (("to", "the", "right", "of"), "right of"),
    (("left", "of"), "left of"), (("right", "of"), "right of"), (("next", "to"), "next to"),
    (("above",), "above"), (("over",), "above"), (("below",), "below"), (("under",), "below"),
    (("beneath",), "below"), (("beside",), "next to"), (("near",), "next to"),
]


def parse_phrase(words: list[str]) -> dict:
    """'a single large striped red circle' -> count/attributes/class; asserts agreement."""
    if words[:2] == ["a", "single"]:
        count, rest = 1, words[2:]
    elif words[0] in ("a", "an"):
        assert words[0] == indefinite_article(words[1]), f"wrong article in {words}"
        count, rest = 1, words[1:]
    else:
        count, rest = NUMBER[words[0]], words[1:]
    phrase = {"count": count, "size": None, "style": None, "colour": None}
    for word in rest[:-1]:
        if word == "sized":
            assert phrase["size"] == "medium"
        elif word in SIZE_WORD:
            phrase["size"] = SIZE_WORD[word]
        elif word in STYLE_WORD:
            phrase["style"] = STYLE_WORD[word]
        else:
            phrase["colour"] = colour_of_word(word)
            assert phrase["colour"] is not None, f"unexpected word {word!r} in {words}"
    noun = rest[-1]
    plural = noun in ("shapes", "objects") or any(noun == lexicon.PLURALS[n] for n in lexicon.PLURALS)
    assert plural == (count > 1), f"number agreement broken in {words}"
    phrase["class_id"] = class_id_of_word(noun)
    assert phrase["class_id"] is not None or noun in ("shape", "shapes", "object", "objects")
    return phrase


def matches(phrase: dict, obj: WorldObject) -> bool:
    return all(
        phrase[key] is None or phrase[key] == getattr(obj, key) for key in ("class_id", "colour", "size", "style")
    )


def relation_by_rule(a: WorldObject, b: WorldObject, relation: str, size: int) -> bool:
    (ax1, ay1, ax2, ay2), (bx1, by1, bx2, by2) = a.box, b.box
    dx = (bx1 + bx2) / 2 - (ax1 + ax2) / 2
    dy = (by1 + by2) / 2 - (ay1 + ay2) / 2
    if relation == "next to":
        return max(max(ax1, bx1) - min(ax2, bx2), max(ay1, by1) - min(ay2, by2), 0) <= 0.12 * size
    horizontal = abs(dx) >= abs(dy) and abs(dx) > 0.1 * size
    vertical = abs(dy) > abs(dx) and abs(dy) > 0.1 * size
    return {
        "left of": horizontal and dx > 0, "right of": horizontal and dx < 0,
        "above": vertical and dy > 0, "below": vertical and dy < 0,
    }[relation]


def find_relation(words: list[str]) -> tuple[int, int, str] | None:
    for start in range(len(words)):
        for surface, relation in RELATION_SURFACES:
            if tuple(words[start: start + len(surface)]) == surface:
                return start, start + len(surface), relation
    return None


def caption_holds(caption: str, objects: list[WorldObject], size: int) -> bool:
    """Truth of a caption under world.md's grammar: list NPs have exact counts, relation NPs are
    existential over two different objects."""
    words = caption.split()
    if words[:2] in (["there", "is"], ["there", "are"]):
        words = words[2:]
    found = find_relation(words)
    if found is not None:
        start, end, relation = found
        left = words[:start][:-1] if words[start - 1] == "is" else words[:start]
        subject, target = parse_phrase(left), parse_phrase(words[end:])
        return any(
            relation_by_rule(a, b, relation, size)
            for i, a in enumerate(objects) if matches(subject, a)
            for j, b in enumerate(objects) if j != i and matches(target, b)
        )
    for prefix in sorted(CAPTION_PREFIXES, key=len, reverse=True):
        if prefix and tuple(words[: len(prefix)]) == prefix:
            words = words[len(prefix):]
            break
    others = False
    if words[-2] == "other":
        others = True
        words = words[:-3] if words[-3] in ("and", "among") else words[:-4]
        assert words[-1] not in ("and", "some"), caption
    chunks, current = [], []
    for word in words:
        if word in ("and", "with") and current:
            chunks.append(current)
            current = []
        else:
            current.append(word)
    chunks.append(current)
    phrases = [parse_phrase(chunk) for chunk in chunks]
    if any(sum(matches(p, obj) for obj in objects) != p["count"] for p in phrases):
        return False
    return not others or any(not any(matches(p, obj) for p in phrases) for obj in objects)


# ------------------------------------------------------------------------------------------------
# Lexicon
# ------------------------------------------------------------------------------------------------


def test_lexicon_tables():
    assert len(CLASSES) >= 16 and len(COLOURS) >= 8
    assert [s.name for s in SIZES] == ["small", "medium", "large"]
    assert class_words(5) == {"cross", "crosses", "plus", "pluses"}
    assert class_words(0) == {"circle", "circles", "disc", "discs", "ball", "balls"}
    assert class_id_of_word("boxes") == 1 and class_id_of_word("red") is None
    assert colour_of_word("gray") == "grey" and colour_of_word("violet") == "purple"
    assert indefinite_article("orange") == "an" and indefinite_article("red") == "a"
    seen: set[str] = set()
    for object_class in CLASSES:
        assert not (class_words(object_class.class_id) & seen), "a word names two classes"
        seen |= class_words(object_class.class_id)
    words = lexicon_words()
    assert words == sorted(set(words))
    assert seen <= set(words) and {"next", "to", "left", "of", "two", "an", "gray"} <= set(words)
    assert all(w.isalpha() and w.islower() for w in words)
    with pytest.raises(ValueError, match="class_id must be an int in"):
        class_words(len(CLASSES))


# ------------------------------------------------------------------------------------------------
# Determinism and splits
# ------------------------------------------------------------------------------------------------

_FINGERPRINT = (
    "import hashlib, json; from vlp.data.world import World; "
    "s = World(seed=3, image_size=64).split('{split}')[{index}]; "
    "print(hashlib.sha256(s.image.tobytes()).hexdigest()); print(json.dumps([s.captions, s.hard_pairs]))"
)


def test_samples_are_pure_functions_of_seed_split_index():
    sample = World(seed=3, image_size=64).split("test")[17]
    again = World(seed=3, image_size=64).split("test")[17]
    assert np.array_equal(sample.image, again.image) and sample.captions == again.captions
    assert sample.objects == again.objects and sample.hard_pairs == again.hard_pairs
    out = subprocess.run(
        [sys.executable, "-c", _FINGERPRINT.format(split="test", index=17)],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout.splitlines()
    assert out[0] == hashlib.sha256(sample.image.tobytes()).hexdigest()
    assert json.loads(out[1]) == json.loads(json.dumps([sample.captions, sample.hard_pairs]))
    # the world seed matters
    assert World(seed=4, image_size=64).split("test")[17].captions != sample.captions


def test_splits_draw_different_scenes():
    names = ["train", "val", "test", "compositional", "unpaired_images", "unpaired_text"]
    scenes = {name: [world().scene(name, i) for i in range(5)] for name in names}
    for a in names:
        for b in names:
            if a < b:
                for i in range(5):
                    assert scenes[a][i].objects != scenes[b][i].objects, (a, b, i)
    ids = {scene.scene_id for rows in scenes.values() for scene in rows}
    assert len(ids) == 30


def test_indexing_prefix_and_errors():
    train = world().split("train")
    assert len(train) == 20000 and len(world().split("compositional")) == 1000
    assert train[-1].index == 19999
    budget = train.prefix(4)
    assert len(budget) == 4
    assert np.array_equal(budget[3].image, train[3].image) and budget[3].captions == train[3].captions
    assert [s.index for s in budget] == [0, 1, 2, 3] and budget[-1].index == 3
    with pytest.raises(IndexError, match="index 4 out of range for the train split of length 4"):
        budget[4]
    with pytest.raises(IndexError, match="index -5 out of range"):
        budget[-5]
    with pytest.raises(ValueError, match=r"prefix length must be an int in \[0, 20000\]"):
        train.prefix(20001)
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        world().split("dev")
    with pytest.raises(ValueError, match="image_size must be an int in"):
        World(image_size=16)
    with pytest.raises(ValueError, match="unknown split 'tran' in sizes"):
        World(sizes={"tran": 10})
    small = World(seed=0, image_size=64, sizes={"val": 3})
    assert len(small.split("val")) == 3 and len(small.split("train")) == 20000
    assert small.split("val")[2].captions == world().split("val")[2].captions


def test_splits_pickle_for_dataloader_workers():
    import pickle

    restored = pickle.loads(pickle.dumps(world().split("val").prefix(10)))
    assert len(restored) == 10
    assert np.array_equal(restored[7].image, world().split("val")[7].image)
    sample = pickle.loads(pickle.dumps(world().split("val")[7]))
    assert sample.captions == world().split("val")[7].captions


def test_scene_fast_path_matches_rendered_sample():
    sample = world().split("val")[5]
    scene = world().scene("val", 5)
    assert scene.objects == tuple(sample.objects) and scene.captions == tuple(sample.captions)
    assert np.array_equal(render_scene(scene), sample.image)


def test_unpaired_view():
    text_only = world().split("unpaired_text")[0]
    assert text_only.image is None and len(text_only.captions) == 5
    assert world().split("unpaired_images")[0].image.shape == (64, 64, 3)


# ------------------------------------------------------------------------------------------------
# Pixels and boxes
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("image_size", [64, 96, 224])
def test_boxes_enclose_exactly_the_drawn_pixels(image_size):
    split = world(image_size).split("train")
    for index in range(12):
        sample = split[index]
        image, masks = render_scene(sample.scene, return_masks=True)
        assert image.dtype == np.uint8 and image.shape == (image_size, image_size, 3)
        assert np.array_equal(image, sample.image)
        background = render_background(sample.scene.background, image_size)
        changed = np.any(image != background, axis=2)
        union = np.zeros_like(changed)
        for obj, mask in zip(sample.objects, masks):
            rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
            assert obj.box == (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)
            assert obj.box_norm == tuple(v / image_size for v in obj.box)
            assert not (union & mask).any(), "objects overlap"
            union |= mask
        assert np.array_equal(union, changed), "object pixels must be exactly the non-background pixels"
        if len(sample.objects) == 1:  # the brief's check: bbox of non-background pixels = the box
            rows, cols = np.flatnonzero(changed.any(axis=1)), np.flatnonzero(changed.any(axis=0))
            assert sample.objects[0].box == (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)


def test_single_object_scene_box_from_background_difference():
    # find the first train scene with exactly one object (about one in six scenes)
    split = world().split("train")
    index = next(i for i in range(200) if len(split.scene(i).objects) == 1)
    sample = split[index]
    changed = np.any(sample.image != render_background(sample.scene.background, 64), axis=2)
    ys, xs = np.nonzero(changed)
    assert sample.objects[0].box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)


def test_object_mask_hand_computed():
    square = object_mask(1, 5, 4, "filled")
    assert square.shape == (6, 7)
    expected = np.zeros((6, 7), bool)
    expected[1:5, 1:6] = True
    assert np.array_equal(square, expected)
    outline = object_mask(1, 5, 4, "outline")  # 1-pixel band: interior 3x2 removed
    expected[2:4, 2:5] = False
    assert np.array_equal(outline, expected)
    with pytest.raises(ValueError, match="unknown style 'dotted'"):
        object_mask(1, 5, 4, "dotted")


def test_backgrounds_vary_and_stay_away_from_object_colours():
    inks = np.array([c.rgb for c in COLOURS] + [stripe_rgb(c.rgb) for c in COLOURS], dtype=float)
    kinds, noisy = set(), False
    for index in range(60):
        scene = world().scene("train", index)
        kinds.add(scene.background.kind)
        noisy |= scene.background.noise > 0
        if index < 15:
            pixels = render_background(scene.background, 64).reshape(-1, 1, 3).astype(float)
            distance = np.sqrt(((pixels - inks[None]) ** 2).sum(axis=2)).min()
            assert distance >= 60.0
    assert kinds == {"plain", "vertical_gradient", "horizontal_gradient"} and noisy


# ------------------------------------------------------------------------------------------------
# Text
# ------------------------------------------------------------------------------------------------


def test_relation_rules_hand_computed():
    def obj(box):
        return WorldObject(0, "circle", "red", "small", "filled", box, tuple(v / 100 for v in box))

    a = obj((10, 10, 20, 20))        # centre (15, 15)
    right = obj((40, 12, 50, 22))    # centre (45, 17): dx = 30
    low = obj((12, 40, 22, 50))      # centre (17, 45): dy = 30
    close = obj((25, 10, 35, 20))    # centre (30, 15): dx = 15, gap 5
    edge = obj((20, 10, 30, 20))     # centre (25, 15): dx = 10, not > 10
    assert directional_relation(a, right, 100) == "left of"
    assert directional_relation(right, a, 100) == "right of"
    assert directional_relation(a, low, 100) == "above" and directional_relation(low, a, 100) == "below"
    assert directional_relation(a, edge, 100) is None
    assert are_next_to(a, close, 100) and not are_next_to(a, right, 100)  # gaps 5 and 20 vs 12
    relations = {(r.subject, r.relation, r.target) for r in scene_relations([a, right, close], 100)}
    assert relations == {
        (0, "left of", 1), (1, "right of", 0), (0, "left of", 2), (2, "right of", 0),
        (0, "next to", 2), (2, "next to", 0), (2, "left of", 1), (1, "right of", 2),
        (2, "next to", 1), (1, "next to", 2),
    }


def test_caption_semantics_hand_computed():
    def obj(colour, box):
        return WorldObject(0, "circle", colour, "small", "filled", box, tuple(v / 100 for v in box))

    objects = [obj("red", (0, 0, 10, 10)), obj("red", (50, 0, 60, 10)), obj("blue", (0, 50, 10, 60))]
    two_red = CaptionSpec("list", (NounPhrase(0, "red", count=2),))
    assert caption_is_true(two_red, objects, 100)
    assert not caption_is_true(CaptionSpec("list", (NounPhrase(0, "red", count=1),)), objects, 100)
    assert caption_is_true(CaptionSpec("list", (NounPhrase(0, "red", count=2),), others=True), objects, 100)
    assert not caption_is_true(CaptionSpec("list", (NounPhrase(0, "red", count=2),), others=True), objects[:2], 100)
    above = CaptionSpec("relation", (NounPhrase(0, "red"), NounPhrase(0, "blue")), relation="above")
    assert caption_is_true(above, objects, 100)
    swapped = CaptionSpec("relation", (NounPhrase(0, "blue"), NounPhrase(0, "red")), relation="above")
    assert not caption_is_true(swapped, objects, 100)


@pytest.mark.parametrize("split_name", ["train", "val", "compositional"])
def test_captions_are_true_varied_and_in_the_lexicon(split_name):
    vocabulary = set(lexicon_words())
    split = world().split(split_name)
    relation_captions = 0
    for index in range(80):
        scene = split.scene(index)
        assert len(scene.captions) == 5 and len(set(scene.captions)) == 5
        for caption in scene.captions:
            words = caption.split()
            assert set(words) <= vocabulary, caption
            assert caption == caption.lower() and len(words) <= MAX_CAPTION_WORDS
            assert caption_holds(caption, list(scene.objects), 64), f"false caption {caption!r}"
            relation_captions += find_relation(words) is not None
    assert relation_captions >= 40  # relations are common, not an afterthought


@pytest.mark.parametrize("split_name", ["train", "test", "compositional"])
def test_hard_pairs_swap_two_colour_words_and_are_false(split_name):
    split = world().split(split_name)
    with_pairs = 0
    for index in range(80):
        scene = split.scene(index)
        with_pairs += bool(scene.hard_pairs)
        if split_name != "train":
            assert scene.hard_pairs, f"{split_name}[{index}] has no hard pair"
            assert len({obj.colour for obj in scene.objects}) >= 2
        for positive, negative in scene.hard_pairs:
            pos, neg = positive.split(), negative.split()
            diff = [k for k in range(len(pos)) if pos[k] != neg[k]]
            assert len(pos) == len(neg) and len(diff) == 2, (positive, negative)
            i, j = diff
            assert pos[i] == neg[j] and pos[j] == neg[i]
            assert None not in (colour_of_word(pos[i]), colour_of_word(pos[j]))
            assert colour_of_word(pos[i]) != colour_of_word(pos[j])
            assert caption_holds(positive, list(scene.objects), 64)
            assert not caption_holds(negative, list(scene.objects), 64), negative
            assert negative not in scene.captions
    assert with_pairs >= 50


def test_compositional_combos_are_held_out():
    assert len(HELD_OUT_COMBOS) == 25 and len(set(HELD_OUT_COMBOS)) == 25
    documented = (  # the set listed in vlp.data.world's docstring: changing it breaks comparability
        "black arrow, white arrow, green bolt, white car, blue circle, green circle, brown cloud, orange cloud, "
        "grey cross, yellow cross, pink diamond, orange flag, purple flag, green heart, brown hexagon, blue house, "
        "purple house, grey moon, yellow moon, black pentagon, purple pentagon, blue ring, black square, "
        "brown star, orange star"
    )
    assert HELD_OUT_COMBOS == tuple(tuple(item.split()) for item in documented.split(", "))
    assert World(seed=9).held_out_combos == HELD_OUT_COMBOS  # independent of the world seed
    held = set(HELD_OUT_COMBOS)

    def combos_in(scene):
        named = {(o.colour, o.class_name) for o in scene.objects}
        texts = list(scene.captions) + [text for pair in scene.hard_pairs for text in pair]
        for text in texts:
            words = text.split()
            for k in range(1, len(words)):
                colour, class_id = colour_of_word(words[k - 1]), class_id_of_word(words[k])
                if colour is not None and class_id is not None:
                    named.add((colour, CLASSES[class_id].name))
        return named

    for index in range(500):
        assert not combos_in(world().scene("train", index)) & held
    for name in ("val", "test", "unpaired_images", "unpaired_text"):
        for index in range(60):
            assert not combos_in(world().scene(name, index)) & held
    for index in range(100):
        scene = world().scene("compositional", index)
        assert {(o.colour, o.class_name) for o in scene.objects} & held


def test_object_counts_and_same_class_distractors():
    counts, same_class = [], 0
    for index in range(150):
        objects = world().scene("train", index).objects
        counts.append(len(objects))
        same_class += len({o.class_id for o in objects}) < len(objects)
    assert min(counts) == 1 and max(counts) == 6
    assert same_class >= 30  # REC needs same-class distractors
    assert min(len(world().scene("val", i).objects) for i in range(50)) >= 2


# ------------------------------------------------------------------------------------------------
# Browsing and throughput
# ------------------------------------------------------------------------------------------------


def test_render_grid_writes_png_of_expected_size(tmp_path):
    samples = [world().split("val")[i] for i in range(5)]
    path = render_grid(samples, tmp_path / "grid.png", cols=3, scale=2, extra_text=["vqa: 2"] * 5)
    with Image.open(path) as png:
        width, height = png.size
    assert width == 3 * grid_cell_width(64, 2) == 3 * (192 + 8)
    assert height > 2 * 64 * 2  # two rows of 128-px images plus text
    big = render_grid(samples[:2], tmp_path / "big.png", cols=4, scale=4, show_boxes=False)
    with Image.open(big) as png:
        assert png.size[0] == 2 * (256 + 8)
    with pytest.raises(ValueError, match="unpaired_text split is text-only"):
        render_grid([world().split("unpaired_text")[0]], tmp_path / "x.png")
    with pytest.raises(ValueError, match="one string per sample"):
        render_grid(samples, tmp_path / "y.png", extra_text=["a"])


def test_rendering_throughput_sanity():
    assert measure_samples_per_second(world(), "train", num_samples=30) > 20.0


def test_required_objects_are_shrunk_when_they_do_not_fit():
    from vlp.data.world import _PlannedObject, _place

    band = _PlannedObject(1, "red", "large", "filled", False, 58, 30)  # spans the width of a 64-px image
    shrunk = 0
    for seed in range(30):
        second = _PlannedObject(1, "blue", "large", "filled", False, 22, 22)  # often no room above/below
        placed = _place(np.random.default_rng(seed), [band, second], required=2, image_size=64)
        assert len(placed) == 2
        (first, ax, ay), (other, bx, by) = placed
        assert bx + other.width + 2 <= ax or ax + first.width + 2 <= bx or by + other.height + 2 <= ay or ay + 30 + 2 <= by
        if other.size != "large":
            shrunk += 1
            expected = {"medium": round(0.22 * 64), "small": round(0.15 * 64)}[other.size]
            assert (other.width, other.height) == (expected, expected)
    assert shrunk > 0
    tall = _PlannedObject(1, "red", "large", "filled", False, 58, 40)  # two can never share 64 px
    placed = _place(np.random.default_rng(0), [tall, tall], required=1, image_size=64)
    assert len(placed) == 1  # an optional object without room is dropped, never shrunk


def test_render_cache_returns_what_a_fresh_render_gives():
    """World's LRU cache of rendered samples: a hit equals a fresh render, images are read-only, lists are
    the caller's own, the cache is bounded and is not pickled."""
    cached = World(seed=3, image_size=64, sizes={"train": 100}, cache_mb=1)
    fresh = World(seed=3, image_size=64, sizes={"train": 100}, cache_mb=0)
    first, again = cached.split("train")[7], cached.split("train")[7]
    reference = fresh.split("train")[7]
    assert np.array_equal(again.image, reference.image) and again.captions == reference.captions
    assert not again.image.flags.writeable and fresh.split("train")[7].image.flags.writeable
    again.captions.append("mutated")
    assert cached.split("train")[7].captions == reference.captions and first is not again
    assert cached.cache_entries == 2**20 // (3 * 64 * 64 + 4096) == 64
    for i in range(100):
        cached.split("train")[i]
    assert len(cached._cache) == 64 and (("train", 99) in cached._cache) and (("train", 0) not in cached._cache)
    assert len(pickle.loads(pickle.dumps(cached))._cache) == 0
    with pytest.raises(ValueError, match="cache_mb"):
        World(cache_mb=-1)
