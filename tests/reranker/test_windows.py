"""Windows for more items than labels."""

from __future__ import annotations

import pytest

from reranker.windows import balanced_windows, merge_window_scores


def test_windows_are_balanced_and_cover_every_item() -> None:
    for count in (1, 25, 26, 27, 52, 53, 1000):
        windows = balanced_windows(count, 26)
        assert [i for w in windows for i in w] == list(range(count))
        sizes = [len(w) for w in windows]
        assert max(sizes) <= 26
        assert max(sizes) - min(sizes) <= 1
    assert balanced_windows(0, 26) == []
    # One window: scores are the probabilities themselves.
    assert merge_window_scores([range(3)], [[0.5, 0.3, 0.2]]) == pytest.approx([0.5, 0.3, 0.2])
    # Two windows of 2 and 1: the lone item's probability 1 is no better than chance.
    assert merge_window_scores([range(2), range(2, 3)], [[0.9, 0.1], [1.0]]) == pytest.approx([0.9, 0.1, 0.5])
