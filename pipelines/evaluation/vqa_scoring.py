"""VQA answer normalisation and scoring with both published conventions (see docs/evaluation.md §2).

Two families of numbers are produced and every key names its convention:

- strict: `closed_acc` (first whole-word yes/no of the prediction, or the whole normalised prediction for other
  closed answers, must equal the normalised ground truth), `open_exact` (normalised string equality), `overall_acc`
  (closed questions scored by `closed_acc`, open questions by `open_exact`, averaged over all questions).
- LLaVA-Med v1.0.0 (`llava/eval/run_eval.py`): `closed_acc_llavamed` (substring rule), `open_recall` (the "open"
  column of LLaVA-Med tables), `open_precision`, `open_f1`, `open_exact_llavamed` (LLaVA-Med's "exact match score",
  a precision-like ratio).
"""

import re
from collections import Counter, defaultdict
from collections.abc import Iterable

_PUNCTUATION = [
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
]
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
_MAX_PERIODS_REMOVED = 32  # LLaVA-Med passes re.UNICODE (== 32) as the `count` argument of re.sub
_NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_ARTICLES = {"a", "an", "the"}
# The contraction table of the VQA v2 evaluation (vqaEval.py), used unchanged by LLaVA-Med.
VQA_CONTRACTIONS = {
    "aint": "ain't",
    "arent": "aren't",
    "cant": "can't",
    "couldve": "could've",
    "couldnt": "couldn't",
    "couldn'tve": "couldn't've",
    "couldnt've": "couldn't've",
    "didnt": "didn't",
    "doesnt": "doesn't",
    "dont": "don't",
    "hadnt": "hadn't",
    "hadnt've": "hadn't've",
    "hadn'tve": "hadn't've",
    "hasnt": "hasn't",
    "havent": "haven't",
    "hed": "he'd",
    "hed've": "he'd've",
    "he'dve": "he'd've",
    "hes": "he's",
    "howd": "how'd",
    "howll": "how'll",
    "hows": "how's",
    "Id've": "I'd've",
    "I'dve": "I'd've",
    "Im": "I'm",
    "Ive": "I've",
    "isnt": "isn't",
    "itd": "it'd",
    "itd've": "it'd've",
    "it'dve": "it'd've",
    "itll": "it'll",
    "let's": "let's",
    "maam": "ma'am",
    "mightnt": "mightn't",
    "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've",
    "mightve": "might've",
    "mustnt": "mustn't",
    "mustve": "must've",
    "neednt": "needn't",
    "notve": "not've",
    "oclock": "o'clock",
    "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at",
    "shant": "shan't",
    "shed've": "she'd've",
    "she'dve": "she'd've",
    "she's": "she's",
    "shouldve": "should've",
    "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll",
    "somebodys": "somebody's",
    "someoned": "someone'd",
    "someoned've": "someone'd've",
    "someone'dve": "someone'd've",
    "someonell": "someone'll",
    "someones": "someone's",
    "somethingd": "something'd",
    "somethingd've": "something'd've",
    "something'dve": "something'd've",
    "somethingll": "something'll",
    "thats": "that's",
    "thered": "there'd",
    "thered've": "there'd've",
    "there'dve": "there'd've",
    "therere": "there're",
    "theres": "there's",
    "theyd": "they'd",
    "theyd've": "they'd've",
    "they'dve": "they'd've",
    "theyll": "they'll",
    "theyre": "they're",
    "theyve": "they've",
    "twas": "'twas",
    "wasnt": "wasn't",
    "wed've": "we'd've",
    "we'dve": "we'd've",
    "weve": "we've",
    "werent": "weren't",
    "whatll": "what'll",
    "whatre": "what're",
    "whats": "what's",
    "whatve": "what've",
    "whens": "when's",
    "whered": "where'd",
    "wheres": "where's",
    "whereve": "where've",
    "whod": "who'd",
    "whod've": "who'd've",
    "who'dve": "who'd've",
    "wholl": "who'll",
    "whos": "who's",
    "whove": "who've",
    "whyll": "why'll",
    "whyre": "why're",
    "whys": "why's",
    "wont": "won't",
    "wouldve": "would've",
    "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've",
    "yall": "y'all",
    "yall'll": "y'all'll",
    "y'allll": "y'all'll",
    "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've",
    "youd": "you'd",
    "youd've": "you'd've",
    "you'dve": "you'd've",
    "youll": "you'll",
    "youre": "you're",
    "youve": "you've",
}


def normalize_answer(text: str) -> str:
    """LLaVA-Med v1.0.0 `normalize_word` applied to the lower-cased string (docs/evaluation.md §2.2).

    Examples: `"None."` -> `"0"`, `"The left lung"` -> `"left lung"`, `"x-ray"` -> `"x ray"`, `"yes."` -> `"yes"`.
    """
    original = str(text).lower()
    strip_all = _DIGIT_COMMA_DIGIT.search(original) is not None
    edited = original
    for char in _PUNCTUATION:
        if strip_all or f"{char} " in original or f" {char}" in original:
            edited = edited.replace(char, "")
        else:
            edited = edited.replace(char, " ")
    edited = _PERIOD_NOT_BEFORE_DIGIT.sub("", edited, count=_MAX_PERIODS_REMOVED)
    words = [_NUMBER_WORDS.get(word, word) for word in edited.lower().split()]
    words = [VQA_CONTRACTIONS.get(word, word) for word in words if word not in _ARTICLES]
    return " ".join(words).replace(",", "")


def closed_hit(prediction: str, answer: str) -> bool:
    """Strict closed rule on normalised strings: yes/no answers compare the first whole-word yes/no token of the
    prediction (none -> miss); other closed answers need the whole normalised prediction to equal the answer."""
    if answer in ("yes", "no"):
        first = next((word for word in prediction.split() if word in ("yes", "no")), None)
        return first == answer
    return prediction == answer


def closed_hit_llavamed(prediction: str, answer: str) -> bool:
    """LLaVA-Med v1.0.0 substring rule on normalised strings: ("yes" in pred or "no" in pred) and answer in pred."""
    return ("yes" in prediction or "no" in prediction) and answer in prediction


def token_precision_recall_f1(prediction: str, answer: str) -> tuple[float, float, float]:
    """LLaVA-Med `calculate_f1score` on normalised strings (whitespace tokens as multisets).

    tp = sum of prediction counts of shared words, fp = prediction counts of words not in the answer, fn = answer
    counts of words not in the prediction; all three scores are 0 when either side is empty or tp == 0.
    """
    predicted, expected = Counter(prediction.split()), Counter(answer.split())
    true_positive = sum(count for word, count in predicted.items() if word in expected)
    false_positive = sum(count for word, count in predicted.items() if word not in expected)
    false_negative = sum(count for word, count in expected.items() if word not in predicted)
    if not predicted or not expected or true_positive == 0:
        return 0.0, 0.0, 0.0
    precision = true_positive / (true_positive + false_positive)
    recall = true_positive / (true_positive + false_negative)
    return precision, recall, 2 * precision * recall / (precision + recall)


def exact_match_llavamed(prediction: str, answer: str) -> float:
    """LLaVA-Med `calculate_exactmatch`: distinct answer words found in the prediction / prediction token count."""
    predicted = prediction.split()
    if not predicted:
        return 0.0
    return sum(1 for word in set(answer.split()) if word in predicted) / len(predicted)


def score_vqa_item(prediction: str, answer: str, answer_type: str) -> dict[str, float]:
    """Per-question scores (floats in [0, 1]) on normalised strings; keys depend on `answer_type` (CLOSED / OPEN)."""
    pred, gold = normalize_answer(prediction), normalize_answer(answer)
    if answer_type == "CLOSED":
        return {
            "closed_acc": float(closed_hit(pred, gold)),
            "closed_acc_llavamed": float(closed_hit_llavamed(pred, gold)),
        }
    precision, recall, f1 = token_precision_recall_f1(pred, gold)
    return {
        "open_exact": float(pred == gold),
        "open_recall": recall,
        "open_precision": precision,
        "open_f1": f1,
        "open_exact_llavamed": exact_match_llavamed(pred, gold),
    }


def _aggregate(rows: list[dict]) -> dict:
    sums, counts = defaultdict(float), Counter()
    for row in rows:
        for key, value in row["scores"].items():
            sums[key] += value
            counts[key] += 1
    result = {key: sums[key] / counts[key] for key in sorted(sums)}
    closed = [row for row in rows if row["answer_type"] == "CLOSED"]
    opened = [row for row in rows if row["answer_type"] == "OPEN"]
    if rows:
        hits = sum(row["scores"]["closed_acc"] for row in closed) + sum(row["scores"]["open_exact"] for row in opened)
        result["overall_acc"] = hits / len(rows)
    result.update({"n": len(rows), "n_closed": len(closed), "n_open": len(opened)})
    return result


def aggregate_vqa_scores(items: Iterable[dict], group_keys: tuple[str, ...] = ("question_type", "organ")) -> dict:
    """Means of per-question scores overall and per value of each `group_keys` field.

    Args:
        items: dicts with `prediction`, `answer`, `answer_type` (CLOSED / OPEN) and optionally the group fields.
    Returns:
        `{"overall": {...}, "by_question_type": {value: {...}}, "by_organ": {...}}`; each block holds the score means,
        `overall_acc` and the counts `n`, `n_closed`, `n_open`.
    """
    rows = [
        dict(item, scores=score_vqa_item(item["prediction"], item["answer"], item["answer_type"])) for item in items
    ]
    result = {"overall": _aggregate(rows)}
    for key in group_keys:
        groups = defaultdict(list)
        for row in rows:
            if row.get(key) not in (None, ""):
                groups[str(row[key])].append(row)
        result[f"by_{key}"] = {value: _aggregate(group) for value, group in sorted(groups.items())}
    return result


__all__ = [
    "VQA_CONTRACTIONS",
    "normalize_answer",
    "closed_hit",
    "closed_hit_llavamed",
    "token_precision_recall_f1",
    "exact_match_llavamed",
    "score_vqa_item",
    "aggregate_vqa_scores",
]
