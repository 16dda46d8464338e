"""Reranking more items than there are labels: balanced windows, scored together, then merged.

Items are split, in input order, into the fewest windows of at most ``capacity`` items, with
sizes differing by at most one. Every window is scored with the listwise scorer (both orders) in
one batched call. Within a window the label probabilities sum to 1, so a probability means more in
a small window than in a large one; items are merged by their lift over chance, ``p * n_w``, and
reported as ``p * n_w / n_max`` (n_w: the item's window size, n_max: the largest window), which is
in [0, 1], equals ``p`` when everything fits one window, and keeps the output sorted by score.
Ties keep input order.
"""

from __future__ import annotations

import math


def balanced_windows(count: int, capacity: int) -> list[range]:
    if count <= 0:
        return []
    windows = math.ceil(count / capacity)
    base, extra = divmod(count, windows)
    bounds = []
    start = 0
    for w in range(windows):
        size = base + (1 if w < extra else 0)
        bounds.append(range(start, start + size))
        start += size
    return bounds


def merge_window_scores(windows: list[range], probabilities: list[list[float]]) -> list[float]:
    """Per-item scores in input order from each window's probabilities."""
    largest = max(len(w) for w in windows)
    scores = [0.0] * sum(len(w) for w in windows)
    for window, probs in zip(windows, probabilities, strict=True):
        for item, p in zip(window, probs, strict=True):
            scores[item] = p * len(window) / largest
    return scores
