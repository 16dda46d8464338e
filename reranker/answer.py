"""Multiple-choice answering on the listwise engine: the options are the labelled items.

Only the prompt differs from reranking (``DEFAULT_ANSWER_TEMPLATE`` in reranker/config.py):
passages, then the question, then the options, then "Answer:". Scoring goes through
ListwiseScorer.score like everything else.
"""

from __future__ import annotations

from reranker.prompt import PromptRenderer


def fit_passages(renderer: PromptRenderer, passages: list[str], budget_tokens: int) -> list[str]:
    """Passages (given best first) cut to fit ``budget_tokens`` in total, returned best LAST.

    The best passage is filled first and may take the whole budget; each next one gets what is
    left, and a passage that would get nothing is dropped.
    """
    kept: list[str] = []
    remaining = budget_tokens
    for passage in passages:
        if remaining <= 0:
            break
        text = renderer.truncate(renderer.clean_item(passage), remaining)
        used = renderer.count_tokens(text)
        if used == 0:
            continue
        kept.append(text)
        remaining -= used
    return kept[::-1]


def format_context(passages: list[str]) -> str:
    if not passages:
        return "(none)"
    return "\n".join(f"[{i}] {p}" for i, p in enumerate(passages, 1))
