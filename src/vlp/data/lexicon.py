"""The lexicon of the embedded world, as plain data (world.md, "Scenes" and "Text").

Everything the procedural world can draw or say is declared here: object classes (canonical name,
synonyms, explicit plural forms, drawing aspect), colours (RGB and synonyms), sizes, styles, and the
closed-class words of the caption grammar (articles, number words, relation phrases, prefixes).
world.md ("Text") asks for the class lexicon to be exposed as data because CMAL's anchor detection
uses it exactly like a detector's label vocabulary, and the tokenizer uses `lexicon_words()` to keep
every word the grammar can emit as one whole token.

Conventions: class ids are 0..C-1 (region labels elsewhere use class_id + 1, 0 = background); every
word is a single lowercase ASCII word without hyphens, so multi-word phrases ("next to",
"medium sized") are sequences of such words. Word sets of different classes are disjoint, and no class
word is a colour, size, style or grammar word, so a word names at most one class.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ObjectClass:
    """One drawable object class.

    `aspect` is the (width, height) of the object's nominal box relative to the long side that its
    size draws (world.md "Scenes": shapes and icon-like objects); `flippable` classes (arrow, car, ...)
    are mirrored left-right at random; `outline_ok` is False where an outlined drawing would look like
    another class (an outlined circle is a ring).
    """

    class_id: int
    name: str
    synonyms: tuple[str, ...]
    aspect: tuple[float, float]
    flippable: bool = False
    outline_ok: bool = True

    @property
    def nouns(self) -> tuple[str, ...]:
        """The canonical name followed by its synonyms (all singular)."""
        return (self.name,) + self.synonyms


@dataclass(frozen=True)
class Colour:
    """A colour an object can be painted in: canonical name, RGB, and optional synonyms."""

    name: str
    rgb: tuple[int, int, int]
    synonyms: tuple[str, ...] = ()

    @property
    def words(self) -> tuple[str, ...]:
        """The canonical name followed by its synonyms."""
        return (self.name,) + self.synonyms


@dataclass(frozen=True)
class Size:
    """A size category: caption words and the range of the nominal box's long side, as a fraction of
    the image size. Ranges do not overlap, so size words stay true at every image size."""

    name: str
    words: tuple[tuple[str, ...], ...]
    scale: tuple[float, float]


@dataclass(frozen=True)
class Style:
    """How an object is painted: `filled` (solid colour), `outline` (only a band along the border),
    `striped` (filled, with diagonal stripes of a darker or lighter shade). `words` are the adjectives
    captions may use; `weight` is the sampling weight."""

    name: str
    words: tuple[str, ...]
    weight: float


CLASSES: tuple[ObjectClass, ...] = (
    ObjectClass(0, "circle", ("disc", "ball"), (1.0, 1.0), outline_ok=False),
    ObjectClass(1, "square", ("box", "block"), (1.0, 1.0)),
    ObjectClass(2, "triangle", (), (1.0, 0.9)),
    ObjectClass(3, "star", (), (1.0, 1.0)),
    ObjectClass(4, "heart", (), (1.0, 0.92)),
    ObjectClass(5, "cross", ("plus",), (1.0, 1.0)),
    ObjectClass(6, "ring", ("donut", "hoop"), (1.0, 1.0), outline_ok=False),
    ObjectClass(7, "diamond", ("rhombus",), (0.75, 1.0)),
    ObjectClass(8, "pentagon", (), (1.0, 0.96)),
    ObjectClass(9, "hexagon", (), (1.0, 0.88)),
    ObjectClass(10, "arrow", (), (1.0, 0.6), flippable=True),
    ObjectClass(11, "moon", ("crescent",), (0.8, 1.0), flippable=True),
    ObjectClass(12, "cloud", (), (1.0, 0.62)),
    ObjectClass(13, "house", ("hut",), (1.0, 1.0), flippable=True),
    ObjectClass(14, "tree", ("pine",), (0.75, 1.0)),
    ObjectClass(15, "car", ("automobile",), (1.0, 0.62), flippable=True),
    ObjectClass(16, "flag", ("banner",), (0.85, 1.0), flippable=True),
    ObjectClass(17, "bolt", ("zigzag",), (0.62, 1.0), flippable=True),
)
"""All object classes, indexed by class id."""

PLURALS: dict[str, str] = {
    "circle": "circles", "disc": "discs", "ball": "balls",
    "square": "squares", "box": "boxes", "block": "blocks",
    "triangle": "triangles",
    "star": "stars",
    "heart": "hearts",
    "cross": "crosses", "plus": "pluses",
    "ring": "rings", "donut": "donuts", "hoop": "hoops",
    "diamond": "diamonds", "rhombus": "rhombuses",
    "pentagon": "pentagons",
    "hexagon": "hexagons",
    "arrow": "arrows",
    "moon": "moons", "crescent": "crescents",
    "cloud": "clouds",
    "house": "houses", "hut": "huts",
    "tree": "trees", "pine": "pines",
    "car": "cars", "automobile": "automobiles",
    "flag": "flags", "banner": "banners",
    "bolt": "bolts", "zigzag": "zigzags",
    # generic nouns for counts ("three shapes") and "other shapes"
    "shape": "shapes", "object": "objects",
}
"""Explicit plural of every noun the grammar uses (not computed: "cross" -> "crosses")."""

GENERIC_NOUNS: tuple[str, ...] = ("shape", "object")
"""Nouns that match an object of any class ("three shapes", "two red objects")."""

COLOURS: tuple[Colour, ...] = (
    Colour("red", (220, 30, 30)),
    Colour("orange", (245, 140, 20)),
    Colour("yellow", (240, 220, 30)),
    Colour("green", (40, 170, 60)),
    Colour("blue", (40, 80, 220)),
    Colour("purple", (140, 50, 190), ("violet",)),
    Colour("pink", (250, 130, 190)),
    Colour("brown", (130, 80, 35)),
    Colour("black", (20, 20, 20)),
    Colour("white", (250, 250, 250)),
    Colour("grey", (135, 135, 135), ("gray",)),
)
"""All object colours. Backgrounds are kept far from every one of them (see `vlp.data.render`)."""

SIZES: tuple[Size, ...] = (
    Size("small", (("small",), ("little",)), (0.15, 0.18)),
    Size("medium", (("medium",), ("medium", "sized")), (0.22, 0.26)),
    Size("large", (("large",), ("big",)), (0.30, 0.35)),
)
"""Size categories (long side of the nominal box as a fraction of the image size)."""

STYLES: tuple[Style, ...] = (
    Style("filled", ("solid", "filled"), 0.6),
    Style("outline", ("outlined", "hollow"), 0.2),
    Style("striped", ("striped",), 0.2),
)
"""Painting styles with their caption adjectives and sampling weights."""

NUMBER_WORDS: dict[int, str] = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}
"""Count words; scenes never hold more than six objects."""

RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below", "next to")
"""Canonical spatial relations (rules in `vlp.data.world.directional_relation` / `are_next_to`)."""

RELATION_PHRASES: dict[str, tuple[tuple[str, ...], ...]] = {
    "left of": (("left", "of"), ("to", "the", "left", "of")),
    "right of": (("right", "of"), ("to", "the", "right", "of")),
    "above": (("above",), ("over",)),
    "below": (("below",), ("under",), ("beneath",)),
    "next to": (("next", "to"), ("beside",), ("near",)),
}
"""Surface phrases of each relation."""

CAPTION_PREFIXES: tuple[tuple[str, ...], ...] = (
    (),
    ("a", "picture", "of"),
    ("an", "image", "of"),
    ("a", "photo", "of"),
    ("a", "drawing", "of"),
    ("a", "scene", "with"),
    ("this", "image", "shows"),
)
"""Optional sentence openers of list captions (the existential "there is/are" is handled apart)."""

GRAMMAR_WORDS: tuple[str, ...] = (
    "a", "an", "single", "and", "with", "is", "are", "there", "some", "other", "among",
)
"""Closed-class words of the caption grammar not listed in the tables above."""

VOWELS = frozenset("aeiou")


def indefinite_article(next_word: str) -> str:
    """'an' before a word starting with a vowel letter, else 'a' (exact for every lexicon word)."""
    return "an" if next_word[:1] in VOWELS else "a"


def class_words(class_id: int) -> set[str]:
    """Every word that names class `class_id`: canonical name, synonyms, and their plurals.

    CMAL's anchor detection (cmal.md §11.2) matches caption tokens against these sets.
    """
    if not isinstance(class_id, int) or isinstance(class_id, bool) or not 0 <= class_id < len(CLASSES):
        raise ValueError(
            f"class_id must be an int in [0, {len(CLASSES) - 1}] (0-based; region labels use class_id + 1), "
            f"got {class_id!r}"
        )
    nouns = CLASSES[class_id].nouns
    return set(nouns) | {PLURALS[noun] for noun in nouns}


def class_id_of_word(word: str) -> int | None:
    """The class id a word names (singular, plural or synonym), or None if it names no class."""
    return _WORD_TO_CLASS.get(word)


def colour_of_word(word: str) -> str | None:
    """The canonical colour a word names ("gray" -> "grey"), or None if it is not a colour word."""
    return _WORD_TO_COLOUR.get(word)


def lexicon_words() -> list[str]:
    """Every word the caption grammar can emit, sorted (class nouns and plurals, generic nouns,
    colours, sizes, styles, numbers, relations, prefixes, grammar words). The tokenizer keeps these
    whole so that anchors and attribute words never split into pieces (cmal.md §11.2)."""
    return list(_LEXICON_WORDS)


def _collect_words() -> tuple[str, ...]:
    words: set[str] = set()
    for object_class in CLASSES:
        words |= class_words(object_class.class_id)
    words |= set(GENERIC_NOUNS) | {PLURALS[noun] for noun in GENERIC_NOUNS}
    for colour in COLOURS:
        words |= set(colour.words)
    for size in SIZES:
        for phrase in size.words:
            words |= set(phrase)
    for style in STYLES:
        words |= set(style.words)
    words |= set(NUMBER_WORDS.values())
    for phrases in RELATION_PHRASES.values():
        for phrase in phrases:
            words |= set(phrase)
    for prefix in CAPTION_PREFIXES:
        words |= set(prefix)
    words |= set(GRAMMAR_WORDS)
    return tuple(sorted(words))


def _check_lexicon() -> None:
    """Import-time consistency check: a broken table must fail loudly, not produce odd captions."""
    for position, object_class in enumerate(CLASSES):
        if object_class.class_id != position:
            raise AssertionError(f"CLASSES[{position}] has class_id {object_class.class_id}")
        for noun in object_class.nouns:
            if noun not in PLURALS:
                raise AssertionError(f"noun {noun!r} of class {object_class.name!r} has no entry in PLURALS")
    owner: dict[str, str] = {}
    for object_class in CLASSES:
        for word in class_words(object_class.class_id):
            if word in owner:
                raise AssertionError(f"word {word!r} names both {owner[word]!r} and {object_class.name!r}")
            owner[word] = object_class.name
    other_words = {w for c in COLOURS for w in c.words} | {w for s in STYLES for w in s.words}
    other_words |= {w for s in SIZES for p in s.words for w in p} | set(GRAMMAR_WORDS)
    clash = sorted(set(owner) & other_words)
    if clash:
        raise AssertionError(f"class words also used as attribute/grammar words: {clash}")
    for word in _LEXICON_WORDS:
        if not (word.isascii() and word.isalpha() and word.islower()):
            raise AssertionError(f"lexicon word {word!r} is not a single lowercase ASCII word")


_LEXICON_WORDS = _collect_words()
_WORD_TO_CLASS: dict[str, int] = {
    word: object_class.class_id for object_class in CLASSES for word in class_words(object_class.class_id)
}
_WORD_TO_COLOUR: dict[str, str] = {word: colour.name for colour in COLOURS for word in colour.words}
_check_lexicon()

CLASS_NAMES: tuple[str, ...] = tuple(object_class.name for object_class in CLASSES)
COLOUR_NAMES: tuple[str, ...] = tuple(colour.name for colour in COLOURS)
SIZE_NAMES: tuple[str, ...] = tuple(size.name for size in SIZES)
STYLE_NAMES: tuple[str, ...] = tuple(style.name for style in STYLES)
COLOUR_RGB: dict[str, tuple[int, int, int]] = {colour.name: colour.rgb for colour in COLOURS}

def morphology_variants(word: str) -> set[str]:
    """cmal.md §3.2 rules [CODE `kevin/test/get_inter_set.py`]: s, s+"s", s+"es", s minus a trailing "s",
    s minus a trailing "es" (lower-cased; empty strings dropped)."""
    s = word.lower()
    out = {s, s + "s", s + "es"}
    if s.endswith("s") and len(s) > 1:
        out.add(s[:-1])
    if s.endswith("es") and len(s) > 2:
        out.add(s[:-2])
    return out
