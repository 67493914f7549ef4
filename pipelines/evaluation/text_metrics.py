"""Report-generation metrics (docs/evaluation.md §3), all offline, on one shared Python tokenisation.

- `tokenize_report`: lower-case, keep word tokens (decimals, hyphenated words and contractions stay whole), drop
  punctuation. This stands in for the Java PTB tokenizer of coco-caption; numbers can differ slightly from it.
- BLEU-1..4: corpus-level BLEU of `torchmetrics.text.BLEUScore` (uniform weights, brevity penalty over the corpus,
  no smoothing, one reference per report) — the nltk `corpus_bleu` definition.
- ROUGE-L: `torchmetrics.text.ROUGEScore` LCS F1 (beta = 1, rouge-score semantics; coco-caption uses beta = 1.2),
  averaged over reports.
- METEOR: nltk `meteor_score` (alpha 0.9, beta 3, gamma 0.5, exact + Porter stem + WordNet synonym matching; not
  the Java METEOR 1.5), averaged over reports; needs a local WordNet and is reported as unavailable without one.
- CIDEr-D: the coco-caption definition (n = 1..4, tf-idf with document frequencies from the evaluated references,
  clipped, Gaussian length penalty sigma = 6, x10) re-implemented in Python.
"""

import math
import os
import re
from collections import Counter

from torchmetrics.text import BLEUScore, ROUGEScore

_TOKEN = re.compile(r"\w+(?:['.\-]\w+)*")
CIDER_SIGMA = 6.0
CIDER_MAX_N = 4


def tokenize_report(text: str) -> list[str]:
    """Lower-cased word tokens; punctuation removed. `"1.6 x 1.8cm right-sided, nodule."` ->
    `["1.6", "x", "1.8cm", "right-sided", "nodule"]`."""
    return _TOKEN.findall(str(text).lower())


def bleu_scores(predictions: list[str], references: list[str], max_n: int = 4) -> dict[str, float]:
    """Corpus BLEU-1..`max_n` (uniform weights over orders 1..n) on `tokenize_report` tokens."""
    hypotheses = [" ".join(tokenize_report(text)) for text in predictions]
    targets = [[" ".join(tokenize_report(text))] for text in references]
    return {f"bleu_{n}": float(BLEUScore(n_gram=n)(hypotheses, targets)) for n in range(1, max_n + 1)}


def rouge_l_score(predictions: list[str], references: list[str]) -> float:
    """Mean ROUGE-L F1 (LCS-based) over pairs, on `tokenize_report` tokens."""
    metric = ROUGEScore(rouge_keys=("rougeL",), normalizer=lambda text: text, tokenizer=tokenize_report)
    return float(metric(predictions, references)["rougeL_fmeasure"])


def load_wordnet(wordnet_dir: str | None = None):
    """A WordNet reader from `wordnet_dir` (a WordNet 3.x dict folder: `data.noun`, `index.noun`, `lexnames`, ...) or
    from nltk's data path (`NLTK_DATA`, `~/nltk_data`: `corpora/wordnet`). Returns `(reader, None)` or
    `(None, reason)` when no local WordNet exists; never downloads."""
    import nltk
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    if wordnet_dir is not None:
        missing = [
            name
            for name in ("lexnames", "data.noun", "index.noun")
            if not os.path.isfile(os.path.join(wordnet_dir, name))
        ]
        if missing:
            raise FileNotFoundError(f"{wordnet_dir} is not a WordNet dict folder: missing {', '.join(missing)}.")
        return WordNetCorpusReader(wordnet_dir, None), None
    try:
        nltk.corpus.wordnet.ensure_loaded()
    except LookupError:
        return None, "no local WordNet (pass --wordnet-dir or put corpora/wordnet under NLTK_DATA); not downloaded"
    return nltk.corpus.wordnet, None


def meteor_score(predictions: list[str], references: list[str], wordnet) -> float:
    """Mean nltk METEOR over pairs on `tokenize_report` tokens, with the given WordNet reader."""
    from nltk.translate.meteor_score import meteor_score as nltk_meteor

    scores = [
        nltk_meteor([tokenize_report(reference)], tokenize_report(prediction), wordnet=wordnet)
        for prediction, reference in zip(predictions, references)
    ]
    return sum(scores) / len(scores)


def _ngram_counts(tokens: list[str]) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for n in range(1, CIDER_MAX_N + 1) for i in range(len(tokens) - n + 1))


def _tfidf(counts: Counter, document_frequency: Counter, log_documents: float):
    """Per-order tf-idf vectors, their norms, and the bigram count used as "length" by coco-caption."""
    vectors = [{} for _ in range(CIDER_MAX_N)]
    for ngram, term_frequency in counts.items():
        idf = log_documents - math.log(max(1.0, document_frequency[ngram]))
        vectors[len(ngram) - 1][ngram] = term_frequency * idf
    norms = [math.sqrt(sum(value * value for value in vector.values())) for vector in vectors]
    length = sum(count for ngram, count in counts.items() if len(ngram) == 2)
    return vectors, norms, length


def cider_d_scores(predictions: list[str], references: list[list[str]]) -> list[float]:
    """CIDEr-D per prediction (coco-caption definition) against its list of references.

    Document frequency of an n-gram = number of items whose references contain it; idf = log(N) - log(max(1, df)).
    Per order n: sum over hypothesis n-grams of min(h, r) * r / (|h| |r|), times exp(-(len_h - len_r)^2 / (2 sigma^2))
    (len = number of bigrams, as coco-caption counts it); the four orders are averaged, then averaged over references
    and multiplied by 10. With a single item, idf is 0 everywhere and every score is 0.
    """
    hypothesis_counts = [_ngram_counts(tokenize_report(text)) for text in predictions]
    reference_counts = [[_ngram_counts(tokenize_report(text)) for text in refs] for refs in references]
    document_frequency = Counter()
    for refs in reference_counts:
        document_frequency.update(set(ngram for counts in refs for ngram in counts))
    log_documents = math.log(float(len(reference_counts))) if reference_counts else 0.0
    scores = []
    for hypothesis, refs in zip(hypothesis_counts, reference_counts):
        vec_h, norm_h, len_h = _tfidf(hypothesis, document_frequency, log_documents)
        total = 0.0
        for ref in refs:
            vec_r, norm_r, len_r = _tfidf(ref, document_frequency, log_documents)
            penalty = math.exp(-((len_h - len_r) ** 2) / (2 * CIDER_SIGMA**2))
            for order in range(CIDER_MAX_N):
                value = sum(
                    min(weight, vec_r[order].get(ngram, 0.0)) * vec_r[order].get(ngram, 0.0)
                    for ngram, weight in vec_h[order].items()
                )
                if norm_h[order] and norm_r[order]:
                    value /= norm_h[order] * norm_r[order]
                total += value * penalty / CIDER_MAX_N
        scores.append(10.0 * total / len(refs))
    return scores


def score_reports(predictions: list[str], references: list[str], wordnet_dir: str | None = None) -> dict:
    """All report metrics for paired lists of generated and reference reports.

    Returns `{"bleu_1".."bleu_4", "rouge_l", "cider_d", "meteor"` (None when unavailable), `"meteor_unavailable"`
    (the reason, or None), `"n"}`.
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references.")
    if not predictions:
        raise ValueError("No report pairs to score.")
    result = bleu_scores(predictions, references)
    result["rouge_l"] = rouge_l_score(predictions, references)
    cider = cider_d_scores(predictions, [[reference] for reference in references])
    result["cider_d"] = sum(cider) / len(cider)
    wordnet, reason = load_wordnet(wordnet_dir)
    result["meteor"] = meteor_score(predictions, references, wordnet) if wordnet is not None else None
    result["meteor_unavailable"] = reason
    result["n"] = len(predictions)
    return result


__all__ = [
    "tokenize_report",
    "bleu_scores",
    "rouge_l_score",
    "load_wordnet",
    "meteor_score",
    "cider_d_scores",
    "score_reports",
]
