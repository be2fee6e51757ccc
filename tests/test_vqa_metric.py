"""The official VQAv2 accuracy (`vlp.tasks.vqa_metric`) against hand-computed cases.

Accuracy with n human answers, m of which equal the (normalised) prediction: for each human answer i,
acc_i = min(1, #matches among the OTHER n-1 answers / 3); the score is the mean of the n acc_i.
"""

from __future__ import annotations

import pytest
import torch

from vlp.data.records import VQARecord
from vlp.tasks.vqa_metric import (
    answer_scores,
    build_answer_vocab,
    evaluate_vqa,
    normalize_answer,
    process_digit_article,
    process_punctuation,
    soft_targets,
    vqa_accuracy,
)


def test_three_of_ten_humans_give_point_nine() -> None:
    # 3 "yes" + 7 "no", prediction "yes": leaving out one of the 3 "yes" leaves 2 matches -> 2/3 (x3);
    # leaving out one of the 7 "no" leaves 3 matches -> min(1, 3/3) = 1 (x7); (3 * 2/3 + 7) / 10 = 0.9
    assert vqa_accuracy("yes", ["yes"] * 3 + ["no"] * 7) == pytest.approx(0.9, abs=1e-12)


@pytest.mark.parametrize(
    ("matches", "expected"),
    [
        (0, 0.0),
        (1, 0.3),  # (1 * 0 + 9 * 1/3) / 10
        (2, 0.6),  # (2 * 1/3 + 8 * 2/3) / 10 = 6/10
        (4, 1.0),  # (4 * min(1, 3/3) + 6 * 1) / 10
        (10, 1.0),
    ],
)
def test_leave_one_out_accuracy_by_number_of_matches(matches: int, expected: float) -> None:
    assert vqa_accuracy("cat", ["cat"] * matches + ["dog"] * (10 - matches)) == pytest.approx(expected, abs=1e-12)


def test_prediction_normalisation_number_words_articles_periods() -> None:
    assert vqa_accuracy("Two", ["2"] * 10) == 1.0
    assert vqa_accuracy("a dog", ["dog"] * 10) == 1.0
    assert vqa_accuracy("yes.", ["yes"] * 10) == 1.0
    assert vqa_accuracy(" Yes\n", ["yes"] * 10) == 1.0
    assert vqa_accuracy("the dog", ["cat"] * 10) == 0.0


def test_ground_truth_is_only_punctuation_processed_and_only_when_humans_disagree() -> None:
    # official quirk 1: identical human answers are compared raw, so the normalised "2" misses "two"
    assert vqa_accuracy("two", ["two"] * 10) == 0.0
    assert vqa_accuracy("yes", ["yes."] * 10) == 0.0
    # disagreeing answers get processPunctuation: "yes." -> "yes", 5 matches -> 1.0
    assert vqa_accuracy("yes", ["yes."] * 5 + ["no"] * 5) == 1.0
    # ... but not number words: the 2 "2" match, the 8 "two" do not -> 0.6 (as m = 2 above)
    assert vqa_accuracy("two", ["two"] * 8 + ["2"] * 2) == pytest.approx(0.6, abs=1e-12)


def test_process_punctuation_rules() -> None:
    assert process_punctuation("1,000") == "1000"  # digit-comma-digit: every listed mark is deleted
    assert process_punctuation("1,000 (approx)") == "1000 approx"
    assert process_punctuation("red,blue") == "red blue"  # no space around it: replaced by a space
    assert process_punctuation("red, blue") == "red blue"  # touches a space: deleted
    assert process_punctuation("left-hand") == "left hand"
    assert process_punctuation("a - b") == "a  b"
    assert process_punctuation("3.5") == "3.5"  # a period followed by a digit stays
    assert process_punctuation("u.s.") == "us"
    assert process_punctuation("it's 5:00") == "it's 5:00"  # apostrophes and colons are not in the list
    assert process_punctuation("." * 40) == "." * 8  # the official sub(..., re.UNICODE) = count 32


def test_process_digit_article_and_full_normalisation() -> None:
    assert process_digit_article("The Three Dogs") == "3 dogs"
    assert process_digit_article("none") == "0"
    assert process_digit_article("dont know") == "don't know"
    assert process_digit_article("an apple a day") == "apple day"
    assert normalize_answer("  Two!\t") == "2"
    assert normalize_answer("Isnt it?") == "isn't it"
    assert normalize_answer("the") == ""


def test_answer_scores_equal_the_metric_credit() -> None:
    answers = ["red"] * 4 + ["blue"] * 3 + ["green"] * 2 + ["pink"]
    assert answer_scores(answers) == pytest.approx({"red": 1.0, "blue": 0.9, "green": 0.6, "pink": 0.3})
    for answer, score in answer_scores(answers).items():
        assert vqa_accuracy(answer, answers) == pytest.approx(score)
    # answers are normalised before counting: "Two" / "2" / "two" are one answer with 4 votes
    assert answer_scores(["Two", "2", "two", "2."] + ["yes"] * 6) == pytest.approx({"2": 1.0, "yes": 1.0})
    # 3 answers, cat x2: (2 * min(1, 1/3) + 1 * min(1, 2/3)) / 3 = 4/9; dog x1: (0 + 2 * 1/3) / 3 = 2/9
    assert answer_scores(["cat", "cat", "dog"]) == pytest.approx({"cat": 4 / 9, "dog": 2 / 9})
    with pytest.raises(ValueError):
        answer_scores([])


def test_soft_targets_over_a_vocabulary() -> None:
    vocab = ["yes", "no", "2"]
    targets = soft_targets([["yes"] * 10, ["no"] * 2 + ["two"] * 7 + ["maybe"], ["blue"] * 10], vocab)
    expected = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.6, 1.0], [0.0, 0.0, 0.0]])
    assert targets.dtype == torch.float32 and torch.allclose(targets, expected)
    assert torch.equal(soft_targets([["no"] * 10], {"no": 1, "yes": 0}), torch.tensor([[0.0, 1.0]]))


def test_build_answer_vocab_top_k_by_normalised_frequency() -> None:
    answer_lists = [["yes"] * 10, ["Two"] * 4 + ["2"] * 2 + ["no"] * 4, ["no"] * 3 + ["the"] * 7, ["red", "blue"]]
    # counts: yes 10, 2 6, no 7, red 1, blue 1 ("the" normalises to "" and is dropped)
    assert build_answer_vocab(answer_lists, top_k=10) == ["yes", "no", "2", "blue", "red"]
    assert build_answer_vocab(answer_lists, top_k=2) == ["yes", "no"]
    assert build_answer_vocab(answer_lists, top_k=10, min_count=2) == ["yes", "no", "2"]
    with pytest.raises(ValueError, match="top_k"):
        build_answer_vocab(answer_lists, top_k=0)


def test_evaluate_vqa_overall_and_per_type() -> None:
    records = [
        VQARecord("1", "a.jpg", "is it red?", ("yes",) * 10, "yes/no", "is it"),
        VQARecord("2", "a.jpg", "how many?", ("2",) * 3 + ("3",) * 7, "number", "how many"),
        VQARecord("3", "b.jpg", "what colour?", ("blue",) * 10, "other", "what color"),
    ]
    result = evaluate_vqa({"1": "Yes", "2": "two", "3": "red"}, records)
    # per question: 1.0, 0.9 (3 of 10), 0.0 -> overall (1 + 0.9 + 0) / 3 * 100
    assert result["per_question"] == pytest.approx({"1": 1.0, "2": 0.9, "3": 0.0})
    assert result["overall"] == pytest.approx(190 / 3)
    assert result["per_answer_type"] == pytest.approx({"yes/no": 100.0, "number": 90.0, "other": 0.0})
    assert result["per_question_type"]["how many"] == pytest.approx(90.0) and result["count"] == 3
    with pytest.raises(KeyError, match=r"no prediction for 1 question\(s\), e\.g\. \['3'\]"):
        evaluate_vqa({"1": "yes", "2": "2"}, records)
