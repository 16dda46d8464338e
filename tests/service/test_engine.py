"""The engine in process, and the guarantees its routes rest on: the event loop stays free during
a long rerank, every text field refuses lone surrogates, every request is counted."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from service.engine import Engine
from service.protocol import RankRequest
from tests.support.apps import app_client, metric_value


async def test_the_engine_ranks_in_process_like_the_route(settings_factory: Any) -> None:
    settings = settings_factory()
    engine = await Engine.start(settings)
    try:
        direct = await engine.rank(RankRequest(query="Calculate 1/2 + 1/3. Incorrect answer: 2/5",
                                               top_k=5))
    finally:
        await engine.close()
    async with app_client(settings) as (_, client):
        routed = (await client.post("/rank", json={
            "query": "Calculate 1/2 + 1/3. Incorrect answer: 2/5", "top_k": 5})).json()
    assert [r.id for r in direct.results] == [r["id"] for r in routed["results"]]
    assert direct.results[0].retrieval_score == pytest.approx(
        routed["results"][0]["retrieval_score"])


async def test_health_answers_within_100ms_during_a_1000_document_rerank(
        settings_factory: Any, tiny_lm: Path) -> None:
    # The timeout leaves room for a busy machine: this test is about the event loop. Documents
    # of 300 characters keep a 26-document window within the tiny model's 4,096-token context.
    settings = settings_factory(reranker_backend="transformers", reranker_model=str(tiny_lm),
                                reranker_timeout_s=300)
    documents = [(f"Document {i}: believes that {i} divided by {i + 1} is {i % 7} remainder "
                  f"{i % 3}, and adds the numerators and the denominators of fractions. " * 4)[:300]
                 for i in range(1000)]
    async with app_client(settings) as (app, client):
        # Where every prompt is rendered: an observer around the real renderer.
        scorer = app.state.engine.scorer
        renderer = scorer.renderer
        threads: set[str] = set()
        rendering = threading.Event()
        render = renderer.render

        def observed(*args: Any, **kwargs: Any) -> Any:
            threads.add(threading.current_thread().name)
            rendering.set()
            return render(*args, **kwargs)

        renderer.render = observed
        # The window measured is the rerank's own work, from the first prompt rendered to the
        # scores returned: parsing the 400 kB request body and writing the response are the web
        # framework's, on the loop in any ASGI server, and not what this test is about.
        score = scorer.score
        scored = asyncio.Event()

        async def observed_score(*args: Any, **kwargs: Any) -> Any:
            try:
                return await score(*args, **kwargs)
            finally:
                scored.set()

        scorer.score = observed_score
        rerank = asyncio.create_task(client.post("/v1/rerank", json={
            "query": "Calculate 1/2 + 1/3. Incorrect answer: 2/5", "documents": documents}))
        latencies: list[float] = []
        while not rerank.done():
            started = time.perf_counter()
            inside = rendering.is_set() and not scored.is_set()
            health = await client.get("/health")
            if inside and not scored.is_set():
                latencies.append(time.perf_counter() - started)
            assert health.status_code == 200
            await asyncio.sleep(0.02)
        response = await rerank
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["windows"] == 39  # 1,000 documents in windows of <= 26
    assert threads, "no prompt was rendered"
    assert all(name.startswith("rankd-tokenizer") for name in threads), threads
    print(f"\n/health during a 1,000-document /v1/rerank: {len(latencies)} probes, worst "
          f"{max(latencies) * 1000:.1f} ms, median {sorted(latencies)[len(latencies) // 2] * 1000:.1f} ms")
    assert len(latencies) >= 10, "the rerank finished before /health was measured"
    assert max(latencies) < 0.1, f"/health took {max(latencies) * 1000:.0f} ms at worst"


SURROGATE_BODIES = [
    ("/rank", '{"query": "ok \\ud800"}', "query"),
    ("/rank", '{"query": "ok", "collection": "\\udfff"}', "collection"),
    ("/rank/batch", '{"queries": [{"query": "fine"}, {"query": "\\ud83d"}]}', "queries[1].query"),
    ("/v1/rerank", '{"query": "\\ud800", "documents": ["a"]}', "query"),
    ("/v1/rerank", '{"query": "q", "documents": ["a", "b \\udc00"]}', "documents[1]"),
    ("/v1/rerank", '{"query": "q", "documents": [{"text": "\\ud800"}]}', "documents[0].text"),
    ("/v1/rerank", '{"query": "q", "documents": ["a"], "model": "\\ud800"}', "model"),
    ("/answer", '{"question": "\\ud800?", "options": ["a", "b"]}', "question"),
    ("/answer", '{"question": "q", "options": ["a", "\\ud800"]}', "options[1]"),
    ("/answer", '{"question": "q", "options": ["a", "b"], "context": ["\\ud800"]}', "context[0]"),
    ("/answer", '{"question": "q", "options": ["a", "b"], "collection": "\\ud800"}',
     "collection"),
    # A surrogate in a key is no field of the request: pydantic refuses the whole body.
    ("/rank", '{"query": "ok", "\\ud800": 1}', "body"),
]


@pytest.mark.parametrize(("path", "body", "field"), SURROGATE_BODIES)
async def test_a_lone_surrogate_in_any_text_field_is_a_422_naming_it(
        settings_factory: Any, tiny_lm: Path, path: str, body: str, field: str) -> None:
    settings = settings_factory(reranker_backend="transformers", reranker_model=str(tiny_lm))
    async with app_client(settings) as (_, client):
        response = await client.post(path, content=body.encode(),
                                     headers={"Content-Type": "application/json"})
        follow_up = await client.post("/rank", json={"query": "still serving?"})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["field"] == field
    assert ("unicode" if field == "body" else "surrogate") in error["message"]
    assert follow_up.status_code == 200


async def test_refused_requests_and_the_docs_are_counted_by_route(settings_factory: Any) -> None:
    settings = settings_factory(api_key="secret", max_body_bytes=2048)
    auth = {"Authorization": "Bearer secret"}
    async with app_client(settings) as (_, client):
        unauthorised = await client.post("/rank", json={"query": "q"})
        too_large = await client.post("/rank", content=b"x" * 4096,
                                      headers={**auth, "Content-Type": "application/json"})
        docs = await client.get("/docs", headers=auth)
        schema = await client.get("/openapi.json", headers=auth)
        nowhere = await client.get("/nowhere", headers=auth)
        text = (await client.get("/metrics")).text
    assert (unauthorised.status_code, too_large.status_code) == (401, 413)
    assert docs.status_code == schema.status_code == 200
    assert nowhere.status_code == 404
    assert nowhere.json()["error"]["code"] == "not_found"
    counted = {
        ("/rank", "POST", "401"), ("/rank", "POST", "413"), ("/docs", "GET", "200"),
        ("/openapi.json", "GET", "200"), ("unmatched", "GET", "404"),
    }
    for route, method, status in counted:
        assert metric_value(text, "rankd_requests_total", route=route, method=method,
                            status=status) == 1.0, (route, status)


async def test_docs_serve_their_assets_from_the_installed_package(settings_factory: Any) -> None:
    async with app_client(settings_factory()) as (_, client):
        page = (await client.get("/docs")).text
        scripts = [part.split('"')[0] for part in page.split('src="')[1:]]
        assets = [await client.get(src) for src in scripts]
    assert scripts
    assert all(src.startswith("/") for src in scripts), scripts
    assert "cdn" not in page
    assert all(a.status_code == 200 and len(a.content) > 100_000 for a in assets)


def test_openapi_error_responses_come_from_the_error_table(settings_factory: Any) -> None:
    from service.app import create_app
    from service.errors import ERROR_TABLE

    schema = create_app(settings_factory()).openapi()
    statuses = {entry.status for entry in ERROR_TABLE.values()}
    for path in ("/rank", "/v1/rerank", "/answer"):
        responses = schema["paths"][path]["post"]["responses"]
        documented = {int(s) for s in responses if s not in ("200",)}
        assert documented <= statuses
        assert {400, 401, 413, 422, 503} <= documented
    assert "404" in schema["paths"]["/rank"]["post"]["responses"]


def test_the_file_readers_of_the_clients_do_not_load_faiss_or_torch() -> None:
    code = ("import sys, clients.queries, clients.evaluate, clients.batch, retriever.eedi; "
            "print(json.dumps(sorted(m for m in ('faiss', 'torch') if m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", "import json; " + code], capture_output=True,
                         text=True, check=True)
    assert json.loads(out.stdout) == []
