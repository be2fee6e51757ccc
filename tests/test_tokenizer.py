"""TextTokenizer, pre_caption and the deterministic WordPiece learner."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from vlp.data.lexicon import lexicon_words
from vlp.data.tokenizer import TextTokenizer, _learn_wordpieces, pre_caption
from vlp.data.world import World

NUM_SCENES = 60
VOCAB = 600


def _small_world() -> World:
    return World(seed=0, image_size=32, sizes={"train": 200, "val": 8, "test": 8})


@pytest.fixture(scope="module")
def world() -> World:
    return _small_world()


@pytest.fixture(scope="module")
def tok(world: World) -> TextTokenizer:
    return TextTokenizer.train_on_world(world, vocab_size=VOCAB, num_scenes=NUM_SCENES)


# ---------------------------------------------------------------- pre_caption (ALBEF)
@pytest.mark.parametrize(
    "raw, expected",
    [
        ("A Red  Circle.", "a red circle"),
        ("a man's dog-house, (big)/small!", "a mans dog house big small"),
        ('"quoted" *stars* #tag: x; y~ z?', "quoted stars tag x y z"),
        ("  leading and trailing   ", "leading and trailing"),
        ("<person> riding a bike", "person riding a bike"),
        ("left-of", "left of"),
    ],
)
def test_pre_caption_matches_albef(raw: str, expected: str) -> None:
    assert pre_caption(raw) == expected


def test_pre_caption_truncates_words() -> None:
    text = " ".join(f"w{i}" for i in range(40))
    assert pre_caption(text).split(" ") == [f"w{i}" for i in range(30)]
    assert pre_caption(text, max_words=3) == "w0 w1 w2"


def test_pre_caption_rejects_non_str() -> None:
    with pytest.raises(TypeError, match="pre_caption expects a str"):
        pre_caption(None)  # type: ignore[arg-type]


# ---------------------------------------------------------------- learner
def test_learn_wordpieces_merges_most_frequent_pair_first() -> None:
    # pairs: (a,##b) x4, (##b,##c) x1 -> "ab" first; then (ab,##c) x1 -> "abc".
    assert _learn_wordpieces(Counter({"ab": 3, "abc": 1}), max_new_tokens=10) == ["ab", "abc"]
    assert _learn_wordpieces(Counter({"ab": 3, "abc": 1}), max_new_tokens=1) == ["ab"]


def test_learn_wordpieces_breaks_ties_lexicographically() -> None:
    assert _learn_wordpieces(Counter({"cd": 1, "ab": 1}), max_new_tokens=10) == ["ab", "cd"]


# ---------------------------------------------------------------- world vocabulary
def test_every_lexicon_word_is_one_token(tok: TextTokenizer) -> None:
    words = lexicon_words()
    assert len(words) > 50
    split = [w for w in words if not tok.is_whole_word(w)]
    assert split == []
    ids = [tok.word_id(w) for w in words]
    assert len(set(ids)) == len(words)
    assert all(i not in tok.special_ids for i in ids)
    assert tok.word_id("Circle") == tok.token_to_id("circle")


def test_vocab_layout_and_special_ids(tok: TextTokenizer) -> None:
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 1, 2, 3, 4)
    assert tok.special_ids == frozenset({0, 1, 2, 3, 4})
    assert len(lexicon_words()) < tok.vocab_size <= VOCAB
    assert sorted(tok.get_vocab().values()) == list(range(tok.vocab_size))


def test_out_of_lexicon_text_falls_back_to_pieces_not_unk(tok: TextTokenizer) -> None:
    assert not tok.is_whole_word("zebraquokka")
    pieces = tok.word_pieces("zebraquokka")
    assert len(pieces) > 1 and tok.unk_id not in pieces
    assert tok.decode(tok.encode(["zebraquokka"], 32)[0][0]) == "zebraquokka"
    assert not tok.is_whole_word("[MASK]")  # a special token is not a word
    with pytest.raises(ValueError, match="not a single token"):
        tok.word_id("zebraquokka")
    with pytest.raises(KeyError, match="zebraquokka"):
        tok.token_to_id("zebraquokka")


def test_training_is_deterministic_in_process(world: World, tok: TextTokenizer) -> None:
    again = TextTokenizer.train_on_world(world, vocab_size=VOCAB, num_scenes=NUM_SCENES)
    assert again.to_json_str() == tok.to_json_str()


@pytest.mark.slow
def test_training_is_deterministic_across_processes(tok: TextTokenizer) -> None:
    # HF's WordPieceTrainer differs between processes (hash seeds); ours must not.
    code = (
        "import hashlib, sys; sys.path.insert(0, sys.argv[1]);"
        "from test_tokenizer import _small_world, NUM_SCENES, VOCAB;"
        "from vlp.data.tokenizer import TextTokenizer;"
        "t = TextTokenizer.train_on_world(_small_world(), vocab_size=VOCAB, num_scenes=NUM_SCENES);"
        "print(hashlib.sha256(t.to_json_str().encode()).hexdigest())"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run(
        [sys.executable, "-c", code, str(Path(__file__).parent)],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == hashlib.sha256(tok.to_json_str().encode()).hexdigest()


def test_vocab_size_too_small_is_a_clear_error(world: World) -> None:
    with pytest.raises(ValueError, match=r"vocab_size=50 is too small.*use vocab_size >= \d+"):
        TextTokenizer.train_on_world(world, vocab_size=50, num_scenes=5)


# ---------------------------------------------------------------- encode / decode
def test_encode_pads_to_longest_in_batch(tok: TextTokenizer) -> None:
    ids, mask = tok.encode(["a red circle", "a small blue square left of a green star"], max_len=32)
    assert ids.dtype == torch.long and mask.dtype == torch.long
    assert ids.shape == mask.shape == (2, 11)  # [CLS] + 9 words + [SEP]
    assert ids[0].tolist() == [
        tok.cls_id, tok.word_id("a"), tok.word_id("red"), tok.word_id("circle"), tok.sep_id,
    ] + [tok.pad_id] * 6
    assert mask[0].tolist() == [1] * 5 + [0] * 6
    assert mask[1].tolist() == [1] * 11
    assert ids[1, -1].item() == tok.sep_id


def test_encode_truncation_keeps_final_sep(tok: TextTokenizer) -> None:
    text = "a small blue square left of a green star"
    full, _ = tok.encode([text], max_len=64)
    cut, mask = tok.encode([text], max_len=6)
    assert cut.shape == (1, 6)
    assert cut[0, :5].tolist() == full[0, :5].tolist()
    assert cut[0, 5].item() == tok.sep_id
    assert mask.sum().item() == 6


def test_encode_applies_pre_caption(tok: TextTokenizer) -> None:
    a, _ = tok.encode(["A RED-circle, (left)!"], max_len=16)
    b, _ = tok.encode(["a red circle left"], max_len=16)
    assert torch.equal(a, b)


def test_encode_rejects_bad_input(tok: TextTokenizer) -> None:
    with pytest.raises(TypeError, match="single str"):
        tok.encode("a red circle", max_len=8)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_len must be >= 2"):
        tok.encode(["a"], max_len=1)
    with pytest.raises(ValueError, match="empty list"):
        tok.encode([], max_len=8)
    with pytest.raises(TypeError, match="text 1 is int"):
        tok.encode(["a", 3], max_len=8)  # type: ignore[list-item]


def test_decode_round_trip(tok: TextTokenizer) -> None:
    ids, _ = tok.encode(["two red circles next to a hollow star", "a car"], max_len=32)
    assert tok.decode(ids[0]) == "two red circles next to a hollow star"
    assert tok.decode(ids[1].tolist()) == "a car"  # padding dropped
    assert tok.decode(ids[1], skip_special_tokens=False).startswith("[CLS] a car [SEP]")


# ---------------------------------------------------------------- persistence
def test_save_load_round_trip(tok: TextTokenizer, tmp_path: Path) -> None:
    path = tok.save(tmp_path)
    assert path == tmp_path / "tokenizer.json"
    loaded = TextTokenizer.load(tmp_path)
    assert loaded.to_json_str() == tok.to_json_str()
    texts = ["a red circle", "three hollow stars above a car"]
    for x, y in zip(loaded.encode(texts, 16), tok.encode(texts, 16)):
        assert torch.equal(x, y)
    again = TextTokenizer.from_json_str(tok.to_json_str())
    assert again.vocab_size == tok.vocab_size and again.special_ids == tok.special_ids


def test_load_missing_or_corrupt_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "tokenizer.json"
    with pytest.raises(FileNotFoundError, match="nope"):
        TextTokenizer.load(missing)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.json"):
        TextTokenizer.load(bad)


def test_from_vocab_requires_special_tokens_first() -> None:
    with pytest.raises(ValueError, match="must start with"):
        TextTokenizer.from_vocab(["a", "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    with pytest.raises(ValueError, match="duplicate"):
        TextTokenizer.from_vocab(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "a"])


# ---------------------------------------------------------------- BERT uncased
@pytest.mark.needs_minilm
def test_bert_uncased_ids() -> None:
    bert = TextTokenizer.bert_uncased()
    assert (bert.pad_id, bert.unk_id, bert.cls_id, bert.sep_id, bert.mask_id) == (0, 100, 101, 102, 103)
    assert bert.vocab_size == 30522
    ids, mask = bert.encode(["a red circle", "A Red Circle!"], max_len=128)
    assert ids.shape == (2, 5)  # no fixed 128 padding from the packaged tokenizer.json
    assert ids[0, 0].item() == 101 and ids[0, -1].item() == 102
    assert ids[0].tolist() == ids[1].tolist() == [101, bert.word_id("a"), bert.word_id("red"), bert.word_id("circle"), 102]
    assert mask.tolist() == [[1] * 5, [1] * 5]
    assert bert.is_whole_word("circle") and not bert.is_whole_word("hexagons")
