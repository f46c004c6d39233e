"""Pure metric functions against hand-computed values."""
import pytest

from vtprune.eval.metrics import (
    binary_confusion, exact_match, gqa_normalize, mme_parse, mme_scores, normalize_exact,
    normalize_vqa_answer, parse_choice_letter, pope_metrics, pope_parse, retrieval_recall,
    topk_accuracy, vqa_accuracy, vqa_answer_scores,
)


@pytest.mark.parametrize("raw, norm", [
    ("Two", "2"),                       # number words -> digits
    ("ten", "10"),
    ("none", "0"),
    ("the dog.", "dog"),                # article dropped, final period stripped
    ("A Dog!", "dog"),                  # lowercase, "!" replaced, article dropped
    ("an apple", "apple"),
    ("dont", "don't"),                  # contraction restored
    ("don't", "don't"),                 # already contracted: unchanged
    ("Isnt", "isn't"),
    ("wouldntve", "wouldn't've"),
    ("3.5", "3.5"),                     # a decimal point is kept
    ("1,000", "1000"),                  # commas dropped
    ("black-and-white", "black and white"),   # "-" inside a word becomes a space
    ("black - white", "black white"),   # "-" touching a space is removed
    ("yes?", "yes"),
    ("  Red \n", "red"),
    ("dog's", "dog 's"),                # the official tokeniser splits 's
    ("well", "well"),                   # real words that look like contractions stay
])
def test_normalize_vqa_answer(raw, norm):
    assert normalize_vqa_answer(raw) == norm


def test_vqa_accuracy_leave_one_out():
    # 10 human answers; min(#match among the 9 others / 3, 1) averaged over the 10 leave-one-out sets
    three = ["cat"] * 3 + ["dog"] * 7
    # 3 subsets drop a "cat" -> 2/3 each; 7 keep all 3 -> 1: (3*2/3 + 7) / 10 = 0.9
    assert vqa_accuracy("cat", three) == pytest.approx(0.9)
    two = ["cat"] * 2 + ["dog"] * 8
    # 2 subsets -> 1/3, 8 subsets -> 2/3: (2/3 + 16/3) / 10 = 0.6
    assert vqa_accuracy("cat", two) == pytest.approx(0.6)
    one = ["cat"] + ["dog"] * 9
    assert vqa_accuracy("cat", one) == pytest.approx(0.3)   # 9 subsets * 1/3 / 10
    assert vqa_accuracy("cat", ["cat"] * 4 + ["dog"] * 6) == pytest.approx(1.0)
    assert vqa_accuracy("bird", three) == 0.0
    assert vqa_accuracy("dog", three) == pytest.approx(1.0)


def test_vqa_accuracy_normalises_both_sides():
    gts = ["2"] * 2 + ["two"] + ["3"] * 7          # "two" -> "2": 3 matches
    assert vqa_accuracy("Two", gts) == pytest.approx(0.9)
    assert vqa_accuracy("the 2.", gts) == pytest.approx(0.9)
    assert vqa_answer_scores(gts) == pytest.approx({"2": 0.9, "3": 1.0})
    # without normalisation only the literal "2"s match
    assert vqa_accuracy("2", gts, normalize=False) == pytest.approx(0.6)


def test_exact_match_and_gqa():
    assert normalize_exact(' "Red." ') == "red"
    assert exact_match("Red.", "red") == 1.0
    assert exact_match("two", ["2", "Two"]) == 1.0
    assert exact_match("2", "two") == 0.0
    assert gqa_normalize(" Yes. ") == "yes"
    assert gqa_normalize("Left.") == "left"
    assert gqa_normalize("on the left") == "on the left"


@pytest.mark.parametrize("text, parsed", [
    ("Yes", "yes"), ("No", "no"), ("no", "no"),
    ("No, there is not.", "no"),
    ("Yes. No.", "yes"),               # only the first sentence counts
    ("There is no dog.", "no"),
    ("It is not there", "no"),
    ("I think so", "yes"),             # anything without no/not is "yes"
    ("Nope", "yes"),                   # the official rule is word-based
    ("NO", "yes"),                     # ... and case-sensitive except "No"
])
def test_pope_parse(text, parsed):
    assert pope_parse(text) == parsed


def test_pope_metrics_worked_confusion_matrix():
    labels = ["yes"] * 4 + ["no"] * 6
    preds = ["Yes", "yes, there is", "No", "Yes.",                       # yes yes no yes
             "No.", "There is no dog.", "not sure", "Yes", "no", "I think so"]  # no no no yes no yes
    # TP: 0,1,3 = 3   FN: 2 = 1   FP: 7,9 = 2   TN: 4,5,6,8 = 4
    m = pope_metrics(preds, labels)
    assert (m["tp"], m["fn"], m["fp"], m["tn"]) == (3, 1, 2, 4)
    assert m["accuracy"] == pytest.approx(0.7)
    assert m["precision"] == pytest.approx(3 / 5)
    assert m["recall"] == pytest.approx(3 / 4)
    assert m["f1"] == pytest.approx(2 * 0.6 * 0.75 / (0.6 + 0.75))  # = 2/3
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["yes_ratio"] == pytest.approx(0.5)
    # degenerate: never "yes" -> precision/recall/F1 0 (not a ZeroDivisionError)
    z = pope_metrics(["no"] * 3, ["yes", "no", "no"])
    assert (z["precision"], z["recall"], z["f1"], z["accuracy"]) == (0.0, 0.0, 0.0, pytest.approx(2 / 3))
    assert binary_confusion([True, False], [True, True]) == {"tp": 1, "fp": 0, "tn": 0, "fn": 1}


def test_mme_parse_and_scores():
    assert mme_parse("Yes") == "yes"
    assert mme_parse("No, there isn't.") == "no"
    assert mme_parse("yes.") == "yes"
    assert mme_parse("I think so") == "other"
    assert mme_parse("Not sure") == "no"       # the official rule looks at the first 4 characters
    items = [
        ("a", "Yes", "Yes"), ("a", "No", "No"),        # image a: both right
        ("b", "Yes", "Yes"), ("b", "No", "Yes"),       # image b: one wrong
        ("c", "Yes", "no"), ("c", "No", "maybe"),      # image c: both wrong, one unparsable
    ]
    s = mme_scores(items)
    assert s["acc"] == pytest.approx(3 / 6)
    assert s["acc_plus"] == pytest.approx(1 / 3)
    assert s["score"] == pytest.approx(50 + 100 / 3)
    assert (s["n_questions"], s["n_images"], s["other"]) == (6, 3, 1)


@pytest.mark.parametrize("text, idx", [
    ("B", 1), ("(C)", 2), ("B.", 1), ("B. cat", 1), ("C) bird", 2), ("D: fish", 3), (" A ", 0),
    ("The answer is D.", 3), ("Answer: A", 0), ("the answer is (B)", 1), ("I pick option C", 2),
    ("cat", 1), ("Cat.", 1),           # the option's text
    ("a dog", None),                   # an article is not option A
    ("the answer is a dog", None),
    ("E", None),                       # beyond the 4 options
    ("", None), ("no idea", None),
])
def test_parse_choice_letter(text, idx):
    assert parse_choice_letter(text, choices=["dog", "cat", "bird", "fish"]) == idx


def test_parse_choice_letter_respects_n():
    assert parse_choice_letter("C", n_choices=2) is None
    assert parse_choice_letter("B", n_choices=2) == 1


def test_topk_accuracy():
    scores = [[0.1, 0.7, 0.2],   # label 1 -> rank 0
              [0.5, 0.3, 0.2],   # label 2 -> rank 2
              [0.2, 0.5, 0.3]]   # label 2 -> rank 1
    out = topk_accuracy(scores, [1, 2, 2], ks=(1, 2, 3))
    assert out == pytest.approx({"top1": 1 / 3, "top2": 2 / 3, "top3": 1.0})
    # ties are broken by index (a stable sort), not in the label's favour
    assert topk_accuracy([[1.0, 1.0, 1.0]], [2], ks=(1, 3)) == {"top1": 0.0, "top3": 1.0}
    assert topk_accuracy([[1.0, 1.0, 1.0]], [0], ks=(1,)) == {"top1": 1.0}


def test_retrieval_recall_hand_computed():
    # 2 images, 4 captions: captions 0,1 -> image 0; captions 2,3 -> image 1
    sim = [[0.9, 0.1, 0.8, 0.2],
           [0.7, 0.6, 0.5, 0.4]]
    out = retrieval_recall(sim, [0, 0, 1, 1], ks=(1, 2, 3))
    # i2t: image 0's best caption (0) ranks 0; image 1's best own caption (2, 0.5) ranks 2
    assert (out["i2t_r1"], out["i2t_r2"], out["i2t_r3"]) == (0.5, 0.5, 1.0)
    # t2i: caption 0 -> image 0 rank 0; 1 -> rank 1; 2 -> image 1 rank 1; 3 -> rank 0
    assert (out["t2i_r1"], out["t2i_r2"], out["t2i_r3"]) == (0.5, 1.0, 1.0)
    assert out["rsum"] == pytest.approx(4.5)
    assert out["mean_recall"] == pytest.approx(0.75)
    with pytest.raises(ValueError):
        retrieval_recall(sim, [0, 0, 1])
