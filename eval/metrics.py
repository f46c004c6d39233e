"""Pure metric functions of the benchmarks (no I/O, no model): importable on their own.

- VQA (VQAv2 / TextVQA): :func:`normalize_vqa_answer` re-implements the answer processing of the
  official VQA evaluation (as the EvalAI server and TextVQA's m4c evaluator apply it to BOTH the
  prediction and every human answer): lowercase, drop ``,`` and ``?``, split ``'s``, strip
  punctuation (removed when it touches a space or sits in a ``1,000``-style number, else replaced by a
  space), drop periods not followed by a digit, number words ``zero..ten``/``none`` -> digits, drop
  articles ``a an the``, restore apostrophes of common contractions (``dont`` -> ``don't``).
  :func:`vqa_accuracy` is ``min(#matching humans / 3, 1)`` averaged over the 10 leave-one-out subsets
  of 9 answers (so 3 matches -> 0.9, 2 -> 0.6, 4+ -> 1.0).
- POPE: :func:`pope_parse` (the official rule: first sentence, commas removed, "no" if any
  space-separated word is ``No``/``no``/``not`` else "yes") and :func:`pope_metrics`.
- MME: :func:`mme_parse` (the official eval_tool rule) and :func:`mme_scores` (acc, acc+, score).
- Multiple choice: :func:`parse_choice_letter`.
- Exact match: :func:`normalize_exact`, :func:`exact_match`, :func:`gqa_normalize`.
- Ranking: :func:`topk_accuracy`, :func:`retrieval_recall` (ties broken by index, like a stable sort).
"""
from __future__ import annotations

import itertools
import re
import string
from collections import defaultdict
from typing import Hashable, Iterable, Sequence

# ----------------------------------------------------------------------------------------------------
# VQA answer normalisation

_VQA_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
              ",", "?", "!")
_NUMBER_COMMA = re.compile(r"(\d)(,)(\d)")
_PERIOD_NOT_DECIMAL = re.compile(r"\.(?!\d)")
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                 "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = frozenset({"a", "an", "the"})

# Contracted forms whose apostrophe-less spellings the official evaluation maps back. Real words
# that collide with a contraction (well, were, shell, its, ill, wed, hell, id, lets, ...) are absent,
# as in the official list. Keys are derived: every spelling with one or more apostrophes removed.
_CONTRACTED = (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't "
    "haven't he'd he'd've he's how'd how'll how's isn't it'd it'd've it'll ma'am mightn't "
    "mightn't've might've mustn't must've needn't not've o'clock oughtn't 'ow's'at shan't she'd've "
    "should've shouldn't shouldn't've somebody'd've somebody'll somebody's someone'd someone'd've "
    "someone'll someone's something'd something'd've something'll that's there'd there'd've there're "
    "there's they'd they'd've they'll they're they've 'twas wasn't we'd've we've weren't what'll "
    "what're what's what've when's where'd where's where've who'd who'd've who'll who's who've "
    "why'll why're why's won't would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd "
    "you'd've you'll you're you've"
).split()


def _contraction_table() -> dict[str, str]:
    table: dict[str, str] = {}
    for form in _CONTRACTED:
        pos = [i for i, ch in enumerate(form) if ch == "'"]
        for r in range(1, len(pos) + 1):
            for drop in itertools.combinations(pos, r):
                key = "".join(ch for i, ch in enumerate(form) if i not in drop)
                table.setdefault(key, form)
    return table


VQA_CONTRACTIONS = _contraction_table()


def _vqa_punctuation(text: str) -> str:
    out = text
    number_comma = _NUMBER_COMMA.search(text) is not None
    for p in _VQA_PUNCT:
        if (p + " " in text) or (" " + p in text) or number_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_NOT_DECIMAL.sub("", out)


def _vqa_digits_articles(text: str) -> str:
    words = []
    for w in text.lower().split():
        w = _NUMBER_WORDS.get(w, w)
        if w not in _ARTICLES:
            words.append(VQA_CONTRACTIONS.get(w, w))
    return " ".join(words)


def normalize_vqa_answer(text: str) -> str:
    """The official VQA answer normalisation (see the module docstring).

    >>> normalize_vqa_answer("Two"), normalize_vqa_answer("the dog."), normalize_vqa_answer("dont")
    ('2', 'dog', "don't")
    """
    t = str(text).lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    t = t.replace("\n", " ").replace("\t", " ").strip()
    t = _vqa_punctuation(t)
    return _vqa_digits_articles(t)


def vqa_answer_scores(gt_answers: Sequence[str], normalize: bool = True) -> dict[str, float]:
    """Accuracy each distinct answer would get against the human answers (leave-one-out average)."""
    gts = [normalize_vqa_answer(a) if normalize else a for a in gt_answers]
    if not gts:
        raise ValueError("no reference answers")
    n = len(gts)
    counts: dict[str, int] = defaultdict(int)
    for a in gts:
        counts[a] += 1
    scores = {}
    for ans, c in counts.items():
        # leaving out one of the c matching answers leaves c-1 matches; leaving out another one, c
        total = c * min(1.0, (c - 1) / 3) + (n - c) * min(1.0, c / 3)
        scores[ans] = total / n
    return scores


def vqa_accuracy(prediction: str, gt_answers: Sequence[str], normalize: bool = True) -> float:
    """``mean over leave-one-out subsets of min(#humans in the subset that said pred / 3, 1)``."""
    pred = normalize_vqa_answer(prediction) if normalize else prediction
    return vqa_answer_scores(gt_answers, normalize).get(pred, 0.0)


# ----------------------------------------------------------------------------------------------------
# Exact match


_EDGE_PUNCT = string.punctuation + " \t\n\r"


def normalize_exact(text: str) -> str:
    """Lowercase, collapse whitespace, strip punctuation/quotes at both ends (``" Red."`` -> ``red``)."""
    return " ".join(str(text).lower().split()).strip(_EDGE_PUNCT)


def exact_match(prediction: str, answers: str | Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised reference answer, else 0.0."""
    refs = [answers] if isinstance(answers, str) else answers
    p = normalize_exact(prediction)
    return float(any(p == normalize_exact(a) for a in refs))


def gqa_normalize(text: str) -> str:
    """LLaVA's GQA conversion: strip whitespace, strip trailing periods, lowercase."""
    return str(text).strip().rstrip(".").strip().lower()


# ----------------------------------------------------------------------------------------------------
# POPE


def pope_parse(text: str) -> str:
    """The official POPE answer rule: keep the first sentence, drop commas, split on spaces;
    ``"no"`` if any word is ``No``/``no``/``not``, else ``"yes"``.

    >>> pope_parse("No, there is not."), pope_parse("Yes"), pope_parse("I see a dog.")
    ('no', 'yes', 'yes')
    """
    t = str(text)
    if "." in t:
        t = t.split(".")[0]
    words = t.replace(",", "").split(" ")
    return "no" if ("No" in words or "no" in words or "not" in words) else "yes"


def binary_confusion(preds: Sequence[bool], labels: Sequence[bool]) -> dict[str, int]:
    """Counts ``tp fp tn fn`` of boolean predictions against boolean labels (positive = True)."""
    if len(preds) != len(labels):
        raise ValueError("preds and labels differ in length")
    c = {"tp": 0, "fp": 0, "tn": 0, "fn": 0}
    for p, l in zip(preds, labels):
        c[("t" if p == l else "f") + ("p" if p else "n")] += 1
    return c


def pope_metrics(predictions: Sequence[str], labels: Sequence[str], parse: bool = True) -> dict:
    """POPE accuracy/precision/recall/F1/yes-ratio ("yes" is the positive class).

    ``predictions`` are raw texts (parsed with :func:`pope_parse` when ``parse``), ``labels`` are
    ``"yes"``/``"no"``. Undefined ratios (0/0) are reported as 0.0.
    """
    preds = [(pope_parse(p) if parse else str(p).strip().lower()) == "yes" for p in predictions]
    labs = [str(l).strip().lower() != "no" for l in labels]
    c = binary_confusion(preds, labs)
    tp, fp, tn, fn = c["tp"], c["fp"], c["tn"], c["fn"]
    n = tp + fp + tn + fn
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": (tp + tn) / n if n else 0.0, "precision": precision, "recall": recall,
            "f1": f1, "yes_ratio": (tp + fp) / n if n else 0.0, **c}


# ----------------------------------------------------------------------------------------------------
# MME


def mme_parse(text: str) -> str:
    """The official MME rule: lowercase; ``yes``/``no`` if exact, else look for ``yes`` then ``no``
    in the first 4 characters; otherwise ``"other"`` (always wrong)."""
    t = str(text).strip().lower()
    if t in ("yes", "no"):
        return t
    head = t[:4]
    if "yes" in head:
        return "yes"
    if "no" in head:
        return "no"
    return "other"


def mme_scores(items: Iterable[tuple[Hashable, str, str]], parse: bool = True) -> dict:
    """MME metrics of one subtask from ``(image_key, gt_answer, prediction)`` triples.

    ``acc`` = correct questions / questions; ``acc_plus`` = images whose questions are ALL correct /
    images; ``score = 100 * acc + 100 * acc_plus`` (max 200 per subtask); ``other`` counts unparsable
    answers.
    """
    per_image: dict[Hashable, list[bool]] = defaultdict(list)
    other = 0
    for key, gt, pred in items:
        g = str(gt).strip().lower()
        p = mme_parse(pred) if parse else str(pred).strip().lower()
        other += p not in ("yes", "no")
        per_image[key].append(p == g)
    n_q = sum(len(v) for v in per_image.values())
    if n_q == 0:
        return {"acc": 0.0, "acc_plus": 0.0, "score": 0.0, "n_questions": 0, "n_images": 0, "other": 0}
    acc = sum(sum(v) for v in per_image.values()) / n_q
    acc_plus = sum(all(v) for v in per_image.values()) / len(per_image)
    return {"acc": acc, "acc_plus": acc_plus, "score": 100 * acc + 100 * acc_plus,
            "n_questions": n_q, "n_images": len(per_image), "other": other}


# ----------------------------------------------------------------------------------------------------
# Multiple choice

_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_LEAD = re.compile(r"^\s*[\(\[]?([A-Z])(?:[\)\]\.:,]|\s*$)")
_ANSWER_IS = re.compile(r"(?i:answer(?: is|:))\s*:?\s*[\(\[]?([A-Z])(?![A-Za-z])")
_OPTION_WORD = re.compile(r"\b(?i:option|choice)\s*[\(\[]?([A-Z])(?![A-Za-z])")


def parse_choice_letter(text: str, n_choices: int | None = None,
                        choices: Sequence[str] | None = None) -> int | None:
    """Index of the option a free-text answer picks, or ``None``.

    Tried in order: a bare letter (``"B"``, ``"(B)"``, ``"B."``, ``"B) cat"``, ``"B: cat"``);
    ``"The answer is B"`` / ``"Answer: B"``; ``"option B"``; the prediction equal to one option's text
    (case/punctuation-insensitive). Letters beyond ``n_choices`` (default ``len(choices)`` or 26) are
    rejected. ``"A dog"`` is not read as option A.
    """
    n = n_choices if n_choices is not None else (len(choices) if choices is not None else 26)
    t = str(text).strip()
    for pat in (_LEAD, _ANSWER_IS, _OPTION_WORD):
        m = pat.search(t)
        if m:
            i = _LETTERS.index(m.group(1))
            if i < n:
                return i
    if choices:
        p = normalize_exact(t)
        hits = [i for i, c in enumerate(choices[:n]) if normalize_exact(c) == p]
        if len(hits) == 1:
            return hits[0]
    return None


# ----------------------------------------------------------------------------------------------------
# Ranking metrics


def _as_2d(x):
    import numpy as np

    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"expected a 2-D score matrix, got shape {a.shape}")
    return a


def _stable_ranks(scores, target_index):
    """0-based rank of ``target_index`` in each row of ``scores`` sorted descending, ties by index."""
    import numpy as np

    target_index = np.asarray(target_index, dtype=np.int64)
    cols = np.arange(scores.shape[1])[None, :]
    out = np.zeros(scores.shape[0], dtype=np.int64)
    for start in range(0, scores.shape[0], 1024):  # chunks bound the boolean temporaries
        s = scores[start:start + 1024]
        t = target_index[start:start + 1024]
        tgt = s[np.arange(s.shape[0]), t][:, None]
        better = (s > tgt) | ((s == tgt) & (cols < t[:, None]))
        out[start:start + 1024] = better.sum(axis=1)
    return out


def topk_accuracy(scores, labels: Sequence[int], ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """``top{k}`` accuracy of per-sample class scores ``[N, C]`` against integer labels ``[N]``."""
    import numpy as np

    s = _as_2d(scores)
    lab = np.asarray(labels, dtype=np.int64)
    if lab.shape != (s.shape[0],):
        raise ValueError("labels must have one entry per row of scores")
    ranks = _stable_ranks(s, lab)
    return {f"top{k}": float((ranks < k).mean()) if len(ranks) else 0.0 for k in ks}


def retrieval_recall(similarity, text_to_image: Sequence[int],
                     ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Image<->text recall@k from ``similarity[n_images, n_texts]``.

    ``text_to_image[j]`` is the image of caption ``j``. Image->text: an image is a hit at k if any of
    its captions ranks in its top k; text->image: a caption is a hit if its image ranks in the top k.
    Returns ``i2t_r{k}``, ``t2i_r{k}``, ``rsum`` (sum of all recalls) and ``mean_recall``.
    """
    import numpy as np

    sim = _as_2d(similarity)
    t2i = np.asarray(text_to_image, dtype=np.int64)
    n_img, n_txt = sim.shape
    if t2i.shape != (n_txt,):
        raise ValueError("text_to_image must have one entry per column of similarity")
    if n_txt and (t2i.min() < 0 or t2i.max() >= n_img):
        raise ValueError("text_to_image refers to an image outside the similarity matrix")
    out: dict[str, float] = {}
    # image -> text: the image's best own caption (highest score, ties -> lowest index) ranks best
    target = np.full(n_img, -1, dtype=np.int64)
    order = np.argsort(t2i, kind="stable")
    bounds = np.searchsorted(t2i[order], np.arange(n_img + 1))
    for i in range(n_img):
        own = order[bounds[i]:bounds[i + 1]]
        if own.size:
            target[i] = own[int(np.argmax(sim[i, own]))]
    has_caption = target >= 0
    ranks_i2t = _stable_ranks(sim[has_caption], target[has_caption])
    ranks_t2i = _stable_ranks(sim.T, t2i) if n_txt else np.zeros(0, dtype=np.int64)
    for k in ks:
        out[f"i2t_r{k}"] = float((ranks_i2t < k).mean()) if ranks_i2t.size else 0.0
    for k in ks:
        out[f"t2i_r{k}"] = float((ranks_t2i < k).mean()) if n_txt else 0.0
    out["rsum"] = float(sum(out[f"i2t_r{k}"] + out[f"t2i_r{k}"] for k in ks))
    out["mean_recall"] = out["rsum"] / (2 * len(ks)) if ks else 0.0
    return out
