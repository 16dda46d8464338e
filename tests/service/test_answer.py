"""POST /answer with the tiny causal LM on the transformers backend, checked by hand."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from reranker.answer import fit_passages, format_context
from reranker.config import DEFAULT_ANSWER_TEMPLATE
from reranker.prompt import PromptRenderer
from tests.support.apps import app_client


def _by_hand(model_dir: Path, question: str, options: list[str], context: str) -> list[float]:
    """Option probabilities computed without rankd: render both orders from the template, one
    forward pass each, log-softmax over the label logits, map back, average."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    labels = [chr(ord("A") + i) for i in range(len(options))]
    label_ids = [tokenizer.convert_tokens_to_ids(label) for label in labels]
    totals = [0.0] * len(options)
    for order in (list(range(len(options))), list(range(len(options)))[::-1]):
        lines = "\n".join(f"{labels[pos]}. {options[i]}" for pos, i in enumerate(order))
        content = DEFAULT_ANSWER_TEMPLATE.format(
            context=context, question=question,
            items=lines, first_label=labels[0], last_label=labels[-1])
        text = tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                             tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.inference_mode():
            logits = model(input_ids=ids).logits[0, -1]
        probs = torch.softmax(logits[label_ids], dim=-1).tolist()
        for pos, i in enumerate(order):
            totals[i] += probs[pos] / 2
    return totals


@pytest.fixture
def answer_settings(settings_factory: Any, tiny_lm: Path) -> Any:
    return settings_factory(reranker_backend="transformers", reranker_model=str(tiny_lm))


async def test_probabilities_match_an_independent_computation(answer_settings: Any,
                                                              tiny_lm: Path) -> None:
    question = "What is 7 to the power 0?"
    options = ["0", "1", "7", "49"]
    context = ["Any number to the power zero is one.", "Seven squared is forty-nine."]
    async with app_client(answer_settings) as (_, client):
        response = await client.post("/answer", json={"question": question, "options": options,
                                                      "context": context})
    assert response.status_code == 200
    body = response.json()
    # Best passage (given first) stands last, nearest the question.
    expected = _by_hand(tiny_lm, question, options, f"[1] {context[1]}\n[2] {context[0]}")
    got = {o["index"]: o["probability"] for o in body["options"]}
    for index, probability in enumerate(expected):
        assert got[index] == pytest.approx(probability, abs=1e-5)
    assert sum(got.values()) == pytest.approx(1.0, abs=1e-9)
    probabilities = [o["probability"] for o in body["options"]]
    assert probabilities == sorted(probabilities, reverse=True)
    assert body["ranking"] == [o["label"] for o in body["options"]]
    assert {o["label"]: o["text"] for o in body["options"]} == dict(zip("ABCD", options, strict=True))
    assert [p["id"] for p in body["passages"]] == ["context:0", "context:1"]
    assert body["timings_ms"]["answer"] > 0


async def test_reversed_options_map_back_to_the_same_texts(answer_settings: Any) -> None:
    question = "Which is a prime number?"
    options = ["1", "4", "7", "9", "15"]
    async with app_client(answer_settings) as (_, client):
        forward = (await client.post("/answer", json={"question": question, "options": options,
                                                      "passages": 0})).json()
        backward = (await client.post("/answer", json={"question": question,
                                                       "options": options[::-1],
                                                       "passages": 0})).json()
    by_text_forward = {o["text"]: o["probability"] for o in forward["options"]}
    by_text_backward = {o["text"]: o["probability"] for o in backward["options"]}
    # Averaging both orders makes the score independent of the order the caller used.
    for text in options:
        assert by_text_forward[text] == pytest.approx(by_text_backward[text], abs=1e-6)
    assert {o["label"]: o["index"] for o in backward["options"]} == {
        label: i for i, label in enumerate("ABCDE")}


async def test_retrieves_passages_from_the_collection(answer_settings: Any) -> None:
    async with app_client(answer_settings) as (_, client):
        body = (await client.post("/answer", json={
            "question": "A student says 7 to the power 0 is 0. Why?", "options": ["0", "1"],
            "passages": 2})).json()
    assert len(body["passages"]) == 2
    assert body["passages"][0]["id"] == "21"
    assert body["passages"][0]["score"] >= body["passages"][1]["score"]


def test_passage_truncation_respects_the_budget(tiny_lm: Path) -> None:
    renderer = PromptRenderer(AutoTokenizer.from_pretrained(tiny_lm))
    passages = ["Believes the mean is the middle number of a list. " * 20,
                "Counts leading zeros as significant figures. " * 20,
                "Confuses factors and multiples."]
    for budget in (0, 5, 40, 150, 10_000):
        kept = fit_passages(renderer, passages, budget)
        # Counted as the prompt shows them: markers and line breaks included.
        assert renderer.count_tokens(format_context([t for _, t in kept][::-1])) <= budget \
            or not kept
        if kept:
            # The best passage is filled first.
            assert kept[0][0] == 0
            assert passages[0].startswith(kept[0][1][:20])
    assert fit_passages(renderer, passages, 0) == []
    assert [i for i, _ in fit_passages(renderer, passages, 10_000)] == [0, 1, 2]
    # Many tiny passages: each marker costs tokens too, so far fewer than a thousand fit.
    tiny = fit_passages(renderer, ["p"] * 1100, 1024)
    assert 0 < len(tiny) < 1100
    assert renderer.count_tokens(format_context([t for _, t in tiny][::-1])) <= 1024


BAD = [
    ({"question": "q", "options": ["only one"]}, "options", "at least 2"),
    ({"question": "q", "options": [f"o{i}" for i in range(27)]}, "options", "26 labels"),
    ({"question": "  ", "options": ["a", "b"]}, "question", "empty"),
    ({"question": "q", "options": ["a", 3]}, "options[1]", "string"),
    ({"question": "q", "options": ["a", " "]}, "options[1]", "empty"),
    ({"question": "q", "options": ["a", "b"], "passages": 99}, "passages", "RANKD_MAX_ANSWER_PASSAGES"),
    ({"question": "q", "options": "ab"}, "options", "list"),
    ({"options": ["a", "b"]}, "question", "required"),
]


@pytest.mark.parametrize(("body", "field", "text"), BAD)
async def test_bad_input_gets_a_clear_4xx(answer_settings: Any, body: dict[str, Any], field: str,
                                          text: str) -> None:
    async with app_client(answer_settings) as (_, client):
        response = await client.post("/answer", json=body)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["field"] == field
    assert text in error["message"]


async def test_without_a_reranker_answer_is_503(settings_factory: Any) -> None:
    async with app_client(settings_factory()) as (_, client):
        response = await client.post("/answer", json={"question": "q", "options": ["a", "b"]})
    assert response.status_code == 503
    assert "RANKD_RERANKER_BACKEND=none" in response.json()["error"]["message"]
