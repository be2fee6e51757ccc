"""The official VQAv2 accuracy, its answer normalisation, soft training targets and the answer vocabulary.

Normalisation and accuracy follow the official evaluation script `vqaEval.py` (Aishwarya Agrawal,
VQA challenge) as shipped in ALBEF's `vqaTools/vqaEval.py` and LAVIS's
`lavis/common/vqa_tools/vqa_eval.py`, reproduced rule for rule, quirks included:

* `process_punctuation`: each of ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !`` is deleted when it
  touches a space in the ORIGINAL text, or when the text holds a digit-comma-digit ("1,000"), and
  replaced by a space otherwise; then every period NOT followed by a digit is deleted (the script's
  regex `(?!<=\\d)(\\.)(?!\\d)` is a look-ahead typo, so "3.5" keeps its period and "yes." / "u.s."
  lose theirs), at most 32 of them (the script passes `re.UNICODE` = 32 as `count`). Apostrophes,
  colons and other symbols are kept.
* `process_digit_article`: lower-case, split on whitespace, number words "none"/"zero".."ten" -> "0".."10",
  drop the articles a / an / the, fix apostrophe-less contractions ("dont" -> "don't"), re-join.
* `vqa_accuracy`: the prediction is stripped of newlines/tabs/outer spaces and fully normalised; the
  ground-truth answers are only punctuation-processed, and only when they are not all identical (VQAv2
  answers are already normalised in the annotation files). For each of the n human answers, acc_i =
  min(1, #(other n-1 answers equal to the prediction) / 3); the score is the mean over the n
  leave-one-out subsets ("10 choose 9"). With 10 answers and m matches: m=0 -> 0, 1 -> 0.3, 2 -> 0.6,
  3 -> 0.9, >=4 -> 1.0.
* `evaluate_vqa`: overall and per answer/question type means, x100 (the script then rounds to 2 places).

Training targets (`answer_scores`, `soft_targets`): each normalised answer of a question scores the
exact leave-one-out accuracy a prediction of it would get, i.e. 0.3 / 0.6 / 0.9 / 1.0 for 1 / 2 / 3 /
>=4 of 10 humans. This is the score table of the bottom-up-attention VQA code (`compute_softscore.py`),
whose targets the BCE classification heads of the BUTD / LXMERT / UNITER line train on; we use it rather than
min(1, count/3) because it is exactly the metric's credit, so BCE optimises the score being reported
(min(1, count/3) gives 0.33 / 0.67 / 1.0 and over-credits answers only 3 humans gave), and it is
defined for any number of human answers (easy-VQA's repeated single answer gives one-hot targets).
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Iterable, Mapping, Sequence

import torch
from torch import Tensor

from vlp.data.records import VQARecord

# ------------------------------------------------------------------ tables of the official script
CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}  # fmt: skip
NUMBER_WORDS: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
ARTICLES = ("a", "an", "the")
PUNCTUATION = (";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: the official look-ahead "typo", kept
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
_PERIOD_COUNT = int(re.UNICODE)  # the official `periodStrip.sub("", text, re.UNICODE)` passes 32 as count


def process_punctuation(text: str) -> str:
    """The official `processPunctuation` (see the module docstring for the rules)."""
    out = text
    comma_in_digits = _COMMA_STRIP.search(text) is not None
    for p in PUNCTUATION:
        if (p + " " in text or " " + p in text) or comma_in_digits:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_COUNT)


def process_digit_article(text: str) -> str:
    """The official `processDigitArticle`: lower, number words -> digits, drop articles, fix contractions."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(text: str) -> str:
    """Full normalisation the official script applies to a prediction: newline/tab -> space, strip,
    punctuation, then digits/articles/contractions. Also the key of the answer vocabulary."""
    cleaned = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(cleaned))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Official VQA accuracy of one prediction against the human answers (VQAv2: 10), in [0, 1].

    The prediction is fully normalised; the human answers are punctuation-processed only when they
    are not all identical (official script). Score = mean over the n leave-one-out subsets of
    min(1, #matching answers among the other n-1 / 3).
    """
    if not answers:
        raise ValueError("vqa_accuracy needs at least one human answer")
    predicted = normalize_answer(prediction)
    truth = list(answers)
    if len(set(truth)) > 1:
        truth = [process_punctuation(a) for a in truth]
    matches = sum(a == predicted for a in truth)
    total = 0.0
    for a in truth:
        others = matches - (a == predicted)
        total += min(1.0, others / 3.0)
    return total / len(truth)


def evaluate_vqa(predictions: Mapping[str, str], records: Sequence[VQARecord]) -> dict:
    """Official-style evaluation of predicted answers {question_id: answer} over `records`.

    Returns {"overall": %, "per_answer_type": {type: %}, "per_question_type": {type: %},
    "per_question": {question_id: accuracy in [0, 1]}, "count": n}; percentages are x100 and unrounded
    (the official script rounds them to 2 decimals). Every record needs a prediction (KeyError naming
    the first missing question ids otherwise, as the script cannot score a partial result file either).
    """
    if not records:
        raise ValueError("evaluate_vqa needs at least one VQA record")
    missing = [r.question_id for r in records if r.question_id not in predictions]
    if missing:
        raise KeyError(f"no prediction for {len(missing)} question(s), e.g. {missing[:5]}")
    per_question: dict[str, float] = {}
    by_answer: dict[str, list[float]] = {}
    by_question: dict[str, list[float]] = {}
    for record in records:
        acc = vqa_accuracy(predictions[record.question_id], record.answers)
        per_question[record.question_id] = acc
        by_answer.setdefault(record.answer_type, []).append(acc)
        by_question.setdefault(record.question_type, []).append(acc)

    def pct(values: list[float]) -> float:
        return 100.0 * sum(values) / len(values)

    return {
        "overall": pct(list(per_question.values())),
        "per_answer_type": {k: pct(v) for k, v in by_answer.items()},
        "per_question_type": {k: pct(v) for k, v in by_question.items()},
        "per_question": per_question,
        "count": len(per_question),
    }


def answer_scores(answers: Sequence[str]) -> dict[str, float]:
    """Soft target of each distinct normalised human answer: the exact leave-one-out VQA accuracy a
    prediction of it scores (10 answers: 1 -> 0.3, 2 -> 0.6, 3 -> 0.9, >=4 -> 1.0; see the module doc)."""
    if not answers:
        raise ValueError("answer_scores needs at least one human answer")
    counts = Counter(normalize_answer(a) for a in answers)
    n = len(answers)
    return {a: (c * min(1.0, (c - 1) / 3.0) + (n - c) * min(1.0, c / 3.0)) / n for a, c in counts.items()}


def soft_targets(answer_lists: Sequence[Sequence[str]], vocab: Sequence[str] | Mapping[str, int]) -> Tensor:
    """(N, V) float32 BCE targets for N questions over a vocabulary (`build_answer_vocab` output or an
    {answer: index} map). Answers outside the vocabulary get no column (their credit is lost, as in
    every classification-head VQA model); a question with none in it has an all-zero row."""
    index = vocab if isinstance(vocab, Mapping) else {a: i for i, a in enumerate(vocab)}
    targets = torch.zeros((len(answer_lists), len(index)), dtype=torch.float32)
    for row, answers in enumerate(answer_lists):
        for answer, score in answer_scores(answers).items():
            column = index.get(answer)
            if column is not None:
                targets[row, column] = score
    return targets


def build_answer_vocab(answer_lists: Iterable[Sequence[str]], top_k: int, min_count: int = 1) -> list[str]:
    """The `top_k` most frequent normalised answers (each human answer counts once), at least
    `min_count` times; ties are broken alphabetically so the vocabulary is deterministic.

    VQAv2 heads use ~3,129 answers (those given >= 9 times as the majority answer in BUTD's count);
    counting every human answer instead needs no majority vote and ranks the same frequent answers.
    """
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    counts: Counter[str] = Counter()
    for answers in answer_lists:
        counts.update(normalize_answer(a) for a in answers)
    counts.pop("", None)  # an answer that normalises to nothing ("the", "?") is not a class
    ranked = sorted((a for a, c in counts.items() if c >= min_count), key=lambda a: (-counts[a], a))
    return ranked[:top_k]


__all__ = [
    "ARTICLES",
    "CONTRACTIONS",
    "NUMBER_WORDS",
    "PUNCTUATION",
    "answer_scores",
    "build_answer_vocab",
    "evaluate_vqa",
    "normalize_answer",
    "process_digit_article",
    "process_punctuation",
    "soft_targets",
    "vqa_accuracy",
]
