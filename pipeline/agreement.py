"""Quality without labels: how closely a reduced configuration's outputs agree with the unreduced model's on the
same rows, with a 95 % confidence interval.

    vqa      exact match of normalised answers (lower case, punctuation and articles removed)
    caption  token-level F1 of the normalised words (bag of words, as in SQuAD's F1)

Both get a Wilson score interval at their mean (see mean_with_interval).

A metric is a function (output, reference) -> score in [0, 1]; METRICS maps a task to its metric, so another one
(e.g. an embedding similarity) plugs in without touching the planner. The same metrics score outputs against a
ground-truth column (--reference-column) when the data has one.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from typing import Callable, Sequence

import numpy as np

ARTICLES = {"a", "an", "the"}
Z_95 = 1.959964  # two-sided 95 % normal quantile


def normalise(text: str | None) -> list[str]:
    """Words of `text` in lower case, without punctuation or articles."""
    words = re.sub(r"[^\w\s]", " ", (text or "").lower()).split()
    return [w for w in words if w not in ARTICLES]


def exact_match(output: str | None, reference: str | None) -> float:
    return float(normalise(output) == normalise(reference))


def token_f1(output: str | None, reference: str | None) -> float:
    """Harmonic mean of word precision and recall (multiset overlap); 1.0 when both are empty."""
    out, ref = normalise(output), normalise(reference)
    if not out and not ref:
        return 1.0
    overlap = sum((Counter(out) & Counter(ref)).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(out), overlap / len(ref)
    return 2 * precision * recall / (precision + recall)


METRICS: dict[str, Callable[[str | None, str | None], float]] = {"vqa": exact_match, "caption": token_f1}


def wilson_interval(successes: float, n: int) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion (sound at 0 and 1, unlike the normal approximation)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + Z_95 ** 2 / (2 * n)) / (1 + Z_95 ** 2 / n)
    half = Z_95 * math.sqrt(p * (1 - p) / n + Z_95 ** 2 / (4 * n * n)) / (1 + Z_95 ** 2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def mean_with_interval(scores: Sequence[float]) -> tuple[float | None, tuple[float, float]]:
    """Mean score and its 95 % interval: the Wilson interval at the mean. It is the usual interval for 0/1 scores
    (exact match) and conservative for graded ones (F1), since a score in [0, 1] with mean m varies at most as a 0/1
    one does, m (1 - m); a bootstrap would call 6 perfect captions certain. No scores: no mean, the interval [0, 1]."""
    if not scores:
        return None, (0.0, 1.0)
    mean = float(np.mean(scores))
    return mean, wilson_interval(mean * len(scores), len(scores))
