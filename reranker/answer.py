"""Multiple-choice answering on the listwise engine: the options are the labelled items.

Only the prompt differs from reranking (``DEFAULT_ANSWER_TEMPLATE`` in reranker/config.py):
passages, then the question, then the options, then "Answer:". Scoring goes through
ListwiseScorer.score like everything else.
"""

from __future__ import annotations

from reranker.prompt import PromptRenderer


def fit_passages(renderer: PromptRenderer, passages: list[str],
                 budget_tokens: int) -> list[tuple[int, str]]:
    """The passages (given best first) that fit ``budget_tokens`` once formatted as the prompt
    shows them (``format_context``: markers and line breaks counted), as (index, text as cut),
    best first.

    The best passage is filled first and may take the whole budget; each next one gets what is
    left, and a passage that would get nothing ends the context.
    """
    kept: list[tuple[int, str]] = []
    for index, passage in enumerate(passages):
        # What this passage adds besides its text: its marker and the line break before it.
        overhead = renderer.count_tokens(f"\n[{len(kept) + 1}] ")
        remaining = budget_tokens - used_tokens(renderer, kept) - overhead
        if remaining <= 0:
            break
        text = renderer.truncate(renderer.clean_item(passage), remaining)
        if not text.strip():
            continue
        kept.append((index, text))
        # Tokens can merge across a boundary; the formatted whole is what must fit.
        while kept and used_tokens(renderer, kept) > budget_tokens:
            index, text = kept.pop()
            shorter = renderer.truncate(text, max(renderer.count_tokens(text) - 1, 0))
            if shorter.strip():
                kept.append((index, shorter))
    return kept


def used_tokens(renderer: PromptRenderer, kept: list[tuple[int, str]]) -> int:
    return renderer.count_tokens(format_context([text for _, text in kept][::-1])) if kept else 0


def format_context(passages: list[str]) -> str:
    """The context block: passages given best LAST, so the best stands nearest the question."""
    if not passages:
        return "(none)"
    return "\n".join(f"[{i}] {p}" for i, p in enumerate(passages, 1))
