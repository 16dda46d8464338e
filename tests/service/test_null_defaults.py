"""An optional field sent as JSON null takes its default, on every route, as an omitted one does.

Wrappers over the Cohere SDK pass an option the user left unset through as ``None``, which the
SDK sends as ``null``; a stricter type once answered them 422. The fields are read from the
request models themselves, so a new optional field is covered without editing this file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from service.protocol import AnswerRequest, RankRequest, RerankRequest
from tests.support.apps import app_client, serve_in_thread

DOCUMENTS = [
    "Believes the product of two negative numbers is negative",
    "Confuses the radius and the diameter of a circle",
    "Thinks subtracting a negative number makes the answer smaller",
]
QUERY = "Work out -4 x -3. Incorrect answer: -12"

# The smallest valid body of each route, and the model that reads it.
ROUTES: dict[str, tuple[type[BaseModel], dict[str, Any]]] = {
    "/rank": (RankRequest, {"query": QUERY, "top_k": 3}),
    "/v1/rerank": (RerankRequest, {"query": QUERY, "documents": DOCUMENTS}),
    "/answer": (AnswerRequest, {"question": "What is 7 to the power 0?",
                                "options": ["0", "1", "7"], "passages": 1}),
}


def _optional_fields(model: type[BaseModel]) -> list[str]:
    return [name for name, field in model.model_fields.items() if not field.is_required()]


def _cases() -> list[tuple[str, str]]:
    return [(route, name) for route, (model, _) in ROUTES.items()
            for name in _optional_fields(model)]


def _stable(route: str, body: dict[str, Any]) -> Any:
    """The part of an answer that must not depend on null against omitted (not ids or times)."""
    if route == "/rank":
        return [(r["id"], r["score"]) for r in body["results"]]
    if route == "/v1/rerank":
        return [(r["index"], r["relevance_score"]) for r in body["results"]]
    return [(o["label"], o["probability"]) for o in body["options"]]


@pytest.fixture
def lm_settings(settings_factory: Any, tiny_lm: Path) -> Any:
    return settings_factory(reranker_backend="transformers", reranker_model=str(tiny_lm))


def test_every_route_has_optional_fields_to_check() -> None:
    # Guards the parametrisation below against silently checking nothing.
    assert len(_cases()) >= 15
    assert ("/v1/rerank", "max_tokens_per_doc") in _cases()
    assert ("/rank", "top_k") in _cases()


async def test_null_is_the_default_on_every_optional_field(lm_settings: Any) -> None:
    async with app_client(lm_settings) as (_, client):
        for route, (model, body) in ROUTES.items():
            omitted = await client.post(route, json=body)
            assert omitted.status_code == 200, (route, omitted.text)
            for name in _optional_fields(model):
                if name in body:
                    continue
                sent = await client.post(route, json={**body, name: None})
                assert sent.status_code == 200, (route, name, sent.text)
                assert _stable(route, sent.json()) == _stable(route, omitted.json()), (route, name)
            # A field the minimal body sets explicitly: null means its default, not that value.
            for name in set(body) & set(_optional_fields(model)):
                sent = await client.post(route, json={**body, name: None})
                default = await client.post(route, json={k: v for k, v in body.items() if k != name})
                assert sent.status_code == default.status_code == 200, (route, name, sent.text)
                assert _stable(route, sent.json()) == _stable(route, default.json()), (route, name)
        batch = await client.post("/rank/batch", json={"queries": [
            {"query": QUERY, "top_k": None, "candidates": None, "fusion": None},
            {"query": QUERY}]})
    assert batch.status_code == 200, batch.text
    first, second = batch.json()
    assert _stable("/rank", first) == _stable("/rank", second)
    assert len(first["results"]) == RankRequest.model_fields["top_k"].default


@pytest.mark.parametrize(("route", "body", "field"), [
    ("/rank", {"query": None}, "query"),
    ("/v1/rerank", {"query": QUERY, "documents": None}, "documents"),
    ("/v1/rerank", {"query": QUERY, "documents": ["a", None]}, "documents[1]"),
    ("/answer", {"question": "q", "options": None}, "options"),
    ("/rank/batch", {"queries": None}, "queries"),
])
async def test_a_required_field_sent_as_null_is_still_refused(
        settings_factory: Any, route: str, body: dict[str, Any], field: str) -> None:
    async with app_client(settings_factory()) as (_, client):
        response = await client.post(route, json=body)
    assert response.status_code == 422
    assert response.json()["error"]["field"].startswith(field)


async def test_an_unknown_field_sent_as_null_is_still_a_typo(settings_factory: Any) -> None:
    async with app_client(settings_factory()) as (_, client):
        response = await client.post("/rank", json={"query": QUERY, "topk": None})
    assert response.status_code == 422
    assert response.json()["error"]["field"] == "topk"


def test_the_cohere_sdk_with_every_option_passed_as_none(settings_factory: Any,
                                                         tiny_lm: Path) -> None:
    """What a wrapper does with the options its user left unset: the SDK sends them as null."""
    import cohere

    settings = settings_factory(reranker_backend="transformers", reranker_model=str(tiny_lm))
    with serve_in_thread(settings) as url:
        v2 = cohere.ClientV2(api_key="none", base_url=url, timeout=60)
        nulls = v2.rerank(model="rankd", query=QUERY, documents=DOCUMENTS, top_n=None,
                          max_tokens_per_doc=None)
        plain = v2.rerank(model="rankd", query=QUERY, documents=DOCUMENTS)
        v1 = cohere.Client(api_key="none", base_url=url, timeout=60)
        legacy = v1.rerank(model="rankd", query=QUERY, documents=DOCUMENTS, top_n=None,
                           return_documents=None, max_chunks_per_doc=None)
    assert [(r.index, r.relevance_score) for r in nulls.results] == \
        [(r.index, r.relevance_score) for r in plain.results]
    assert len(nulls.results) == len(DOCUMENTS)
    assert [r.index for r in legacy.results] == [r.index for r in plain.results]
    assert legacy.results[0].document is None  # return_documents' default, false
