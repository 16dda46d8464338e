"""Listwise prompt rendering: a template, labelled items, the chat template, token ids."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from reranker.config import DEFAULT_RANK_TEMPLATE, LABEL_FIELDS, template_fields
from reranker.errors import RerankerConfigError

_WHITESPACE = re.compile(r"\s+")


@dataclass(frozen=True)
class RenderedPrompt:
    text: str  # exactly what the model reads, after the chat template
    token_ids: list[int]


class PromptRenderer:
    """Turns a template plus labelled items into the model's input.

    User text never reaches the template engine: the template is filled once with
    ``str.format``, so braces in user text stay literal, and the tokenizer's special tokens are
    removed from user text first so that no query or candidate can open a new chat turn.
    """

    def __init__(self, tokenizer: Any, use_chat_template: bool = True) -> None:
        self.tokenizer = tokenizer
        self.use_chat_template = use_chat_template
        if use_chat_template and not getattr(tokenizer, "chat_template", None):
            raise RerankerConfigError(
                "the reranker tokenizer has no chat template; use an instruct model or set "
                "RANKD_RERANKER_CHAT_TEMPLATE=false to send the prompt as plain text"
            )
        specials = {str(t) for t in getattr(tokenizer, "all_special_tokens", []) if t}
        added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        specials |= {str(tok.content) for tok in added.values() if getattr(tok, "special", False)}
        # Longest first so that a token containing another is removed whole.
        self._special_pattern = (
            re.compile("|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)))
            if specials
            else None
        )

    def clean(self, text: str) -> str:
        """User text with the tokenizer's special tokens removed."""
        if self._special_pattern is None:
            return text
        previous = None
        while previous != text:  # removal can join halves into a new special token
            previous, text = text, self._special_pattern.sub("", text)
        return text

    def clean_item(self, text: str) -> str:
        """An item on one line, so each labelled item is exactly one line of the prompt."""
        return _WHITESPACE.sub(" ", self.clean(text)).strip()

    # Fields that keep their line breaks: the operator's instruction, and the context block
    # whose passages were each flattened to one "[n] ..." line already. Every other field is user
    # text and is flattened, so no query line can pose as a labelled item.
    MULTILINE_FIELDS = frozenset({"instruction", "context"})

    def _clean_fields(self, fields: dict[str, str]) -> dict[str, str]:
        return {name: self.clean(value) if name in self.MULTILINE_FIELDS else self.clean_item(value)
                for name, value in fields.items()}

    def render(self, template: str, fields: dict[str, str], items: list[str],
               labels: list[str]) -> RenderedPrompt:
        """A listwise prompt: the items labelled one per line."""
        lines = "\n".join(f"{label}. {self.clean_item(item)}" for label, item in
                          zip(labels, items, strict=True))
        return self._finish(template.format(items=lines, first_label=labels[0],
                                            last_label=labels[-1], **self._clean_fields(fields)))

    def render_item(self, template: str, fields: dict[str, str], item: str) -> RenderedPrompt:
        """A pointwise prompt: one item, unlabelled; the model answers yes or no."""
        return self._finish(template.format(item=self.clean_item(item),
                                            **self._clean_fields(fields)))

    def _finish(self, content: str) -> RenderedPrompt:
        if self.use_chat_template:
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
            )
        else:
            text = content
        token_ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return RenderedPrompt(text=str(text), token_ids=token_ids)

    def item_answer_context(self, template: str) -> str:
        """A rendered pointwise prompt, ending where the model writes yes or no."""
        fields = {name: "Text." for name in template_fields(template) if name != "item"}
        return self.render_item(template, fields, "An item.").text

    def answer_context(self, template: str = DEFAULT_RANK_TEMPLATE) -> str:
        """A rendered prompt that ends exactly where the model writes its label.

        With a chat template every prompt ends in the same assistant-turn header, so this is the
        context in which labels are tokenized; as plain text it is the given template's ending.
        """
        fields = {name: "Text." for name in template_fields(template) if name not in LABEL_FIELDS}
        return self.render(template, fields, ["First item.", "Second item."], ["A", "B"]).text

    def token_ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def count_tokens(self, text: str) -> int:
        return len(self.token_ids(text))

    def truncate(self, text: str, max_tokens: int, ids: list[int] | None = None) -> str:
        """``text`` cut to at most ``max_tokens`` tokens of this tokenizer; ``ids``, its token
        ids where the caller has them already (a long text is costly to tokenize twice)."""
        if ids is None:
            ids = self.token_ids(text)
        if len(ids) <= max_tokens:
            return text
        cut = max(max_tokens, 0)
        while True:
            # Decoding a prefix and encoding it again can merge differently; shrink until it fits.
            truncated = str(self.tokenizer.decode(ids[:cut], skip_special_tokens=True))
            if cut == 0 or self.count_tokens(truncated) <= max_tokens:
                return truncated
            cut -= 1


def load_tokenizer(model: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model)
    except (OSError, ValueError) as exc:
        raise RerankerConfigError(
            f"cannot load the reranker tokenizer from {model!r}: {exc}. Set RANKD_RERANKER_MODEL "
            "to a local model directory or a hub id that this machine can download"
        ) from exc
