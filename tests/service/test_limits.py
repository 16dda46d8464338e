"""No request holds the service: request heads bounded in size and time, stalled bodies timed
out, clients that leave have their work dropped, authentication that fails closed, and the
errors of issue 26, each against the real app (behind the real uvicorn server where the HTTP
layer is what is tested)."""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from runtime.settings import SettingsError
from service.settings import load_settings
from tests.support.apps import app_client, metric_value, serve_in_thread


def _raw(url: str, payload: bytes, wait_s: float = 15.0, pause_after: int | None = None,
         pause_s: float = 0.0) -> tuple[bytes, float]:
    """Send ``payload`` on a fresh connection (pausing after ``pause_after`` bytes), read until
    the server closes; the answer and how long it took."""
    host, port = url.removeprefix("http://").split(":")
    started = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=wait_s) as sock:
        try:
            if pause_after is None:
                sock.sendall(payload)
            else:
                sock.sendall(payload[:pause_after])
                time.sleep(pause_s)
                sock.sendall(payload[pause_after:])
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server refused before the rest was sent
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except (ConnectionResetError, TimeoutError):
            pass
    return answer, time.monotonic() - started


def _health_ms(url: str) -> float:
    started = time.perf_counter()
    assert httpx.get(f"{url}/health", timeout=5).status_code == 200
    return (time.perf_counter() - started) * 1000


def test_a_64_mb_header_is_refused_quickly(settings_factory: Any) -> None:
    with serve_in_thread(settings_factory()) as url:
        head = (b"GET /health HTTP/1.1\r\nHost: rankd\r\nX-Big: " + b"a" * (64 << 20)
                + b"\r\n\r\n")
        answer, seconds = _raw(url, head)
        health = _health_ms(url)
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
    assert seconds < 5
    assert health < 500


def test_a_head_sent_a_byte_at_a_time_is_cut_off(settings_factory: Any) -> None:
    with serve_in_thread(settings_factory(header_timeout_s=1.0)) as url:
        # Half a head, then nothing: the answer comes at the deadline.
        answer, seconds = _raw(url, b"GET /health HTTP/1.1\r\nHost: rankd\r\n")
        health = _health_ms(url)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b'"code": "request_timeout"' in answer
    assert b"RANKD_HEADER_TIMEOUT_S" in answer
    assert 0.9 < seconds < 4
    assert health < 500


def test_a_stalled_body_gets_408_and_others_are_served(settings_factory: Any) -> None:
    with serve_in_thread(settings_factory(body_timeout_s=1.0)) as url:
        head = (b"POST /rank HTTP/1.1\r\nHost: rankd\r\nContent-Type: application/json\r\n"
                b"Content-Length: 100\r\n\r\n")
        answer, seconds = _raw(url, head + b'{"query": "frac', pause_after=len(head) + 15,
                               pause_s=0.0)
        health = _health_ms(url)
        metrics = httpx.get(f"{url}/metrics").text
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b'"code":"request_timeout"' in answer
    assert b'"field":"body"' in answer
    assert b"RANKD_BODY_TIMEOUT_S" in answer
    assert seconds < 5
    assert health < 500
    assert metric_value(metrics, "rankd_requests_total", route="/rank", method="POST",
                        status="408") == 1


def test_a_client_that_leaves_mid_body_is_counted_as_499(settings_factory: Any) -> None:
    with serve_in_thread(settings_factory()) as url:
        head = (b"POST /rank HTTP/1.1\r\nHost: rankd\r\nContent-Type: application/json\r\n"
                b"Content-Length: 100\r\n\r\n")
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(head + b'{"query": "frac')
            time.sleep(0.3)
        time.sleep(0.5)
        metrics = httpx.get(f"{url}/metrics").text
    assert metric_value(metrics, "rankd_requests_total", route="/rank", method="POST",
                        status="499") == 1
    assert metric_value(metrics, "rankd_requests_total", route="/rank", method="POST",
                        status="400") == 0


def test_a_client_that_leaves_stops_its_rerank(settings_factory: Any, tiny_lm: Path) -> None:
    """vLLM aborts a request whose client goes away; so does rankd, between micro-batches."""
    settings = settings_factory(reranker_backend="transformers", reranker_model=str(tiny_lm),
                                reranker_batch_size=2, reranker_batch_tokens=256)
    documents = [f"Document {i}: adds the numerators and the denominators." for i in range(520)]
    body = httpx.Request("POST", "http://rankd/v1/rerank", json={
        "query": "Calculate 1/2 + 1/3. Incorrect answer: 2/5", "documents": documents,
        "orders": 4}).read()
    head = (f"POST /v1/rerank HTTP/1.1\r\nHost: rankd\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    with serve_in_thread(settings) as url:
        # The whole request once, for the number of batches it takes.
        assert httpx.post(f"{url}/v1/rerank", content=body, timeout=120,
                          headers={"content-type": "application/json"}).status_code == 200
        full = metric_value(httpx.get(f"{url}/metrics").text, "rankd_batch_size_count",
                            stage="rerank")
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(head + body)
            # Some batches run, then the client is gone: leave once a few have run, however
            # fast this machine runs them.
            deadline = time.monotonic() + 30
            while (metric_value(httpx.get(f"{url}/metrics").text, "rankd_batch_size_count",
                                stage="rerank") - full < 4 and time.monotonic() < deadline):
                time.sleep(0.02)
        deadline = time.monotonic() + 30
        while True:
            metrics = httpx.get(f"{url}/metrics").text
            if metric_value(metrics, "rankd_requests_total", route="/v1/rerank",
                            method="POST", status="499") or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        batches = metric_value(metrics, "rankd_batch_size_count", stage="rerank") - full
        time.sleep(1.0)
        after = metric_value(httpx.get(f"{url}/metrics").text, "rankd_batch_size_count",
                             stage="rerank") - full
    assert metric_value(metrics, "rankd_requests_total", route="/v1/rerank", method="POST",
                        status="499") == 1
    assert 0 < batches < full / 2, (batches, full)
    assert after - batches <= 1  # at most the batch in flight finished after the disconnect


@pytest.mark.parametrize("key", [" , ", " ", ","])
def test_a_key_setting_without_a_key_refuses_to_start(monkeypatch: pytest.MonkeyPatch,
                                                      key: str) -> None:
    monkeypatch.setenv("RANKD_API_KEY", key)
    with pytest.raises(SettingsError, match="RANKD_API_KEY is set but holds no key"):
        load_settings()


async def test_ready_shows_no_server_path(settings_factory: Any, tiny_lm: Path) -> None:
    settings = settings_factory(reranker_backend="transformers", reranker_model=str(tiny_lm),
                                api_key="k")
    async with app_client(settings) as (_, client):
        ready = await client.get("/ready")
    assert ready.status_code == 200  # public: load balancers probe it without the key
    assert str(tiny_lm.parent) not in ready.text
    assert str(Path.home()) not in ready.text


async def test_wrong_media_types_get_415(settings_factory: Any) -> None:
    async with app_client(settings_factory()) as (_, client):
        text = await client.post("/rank", content=b'{"query": "fractions"}',
                                 headers={"content-type": "text/plain"})
        form = await client.post("/rank", data={"query": "fractions"})
        gzip = await client.post("/rank", content=b'{"query": "fractions"}',
                                 headers={"content-type": "application/json",
                                          "content-encoding": "gzip"})
        plain = await client.post("/rank", content=b'{"query": "fractions"}')
        charset = await client.post("/rank", content=b'{"query": "fractions"}',
                                    headers={"content-type": "application/json; charset=utf-8"})
    for refused in (text, form, gzip):
        assert refused.status_code == 415, refused.text
        assert refused.json()["error"]["code"] == "unsupported_media_type"
    assert "application/json" in text.json()["error"]["message"]
    assert "uncompressed" in gzip.json()["error"]["message"]
    assert plain.status_code == charset.status_code == 200


async def test_batch_errors_name_the_item(settings_factory: Any) -> None:
    async with app_client(settings_factory()) as (_, client):
        response = await client.post("/rank/batch", json={"queries": [
            {"query": "fractions"}, {"query": "fractions", "collection": "nope"}]})
    assert response.status_code == 404
    assert response.json()["error"]["field"] == "queries[1].collection"


async def test_a_trailing_slash_is_not_redirected_by_host(settings_factory: Any) -> None:
    async with app_client(settings_factory()) as (_, client):
        response = await client.get("/health/", headers={"host": "evil.example"})
    assert response.status_code == 404
    assert "location" not in response.headers
    assert response.json()["error"]["code"] == "not_found"


@pytest.mark.parametrize("query", ["\x00\x00", "\u200b\u200c\u200d", "\ufeff \x00"])
async def test_an_invisible_query_is_blank(settings_factory: Any, query: str) -> None:
    async with app_client(settings_factory()) as (_, client):
        response = await client.post("/rank", json={"query": query})
    assert response.status_code == 422
    assert response.json()["error"]["field"] == "query"


async def test_an_impossible_batch_is_422_at_once(settings_factory: Any, tiny_lm: Path) -> None:
    settings = settings_factory(reranker_backend="transformers", reranker_model=str(tiny_lm))
    async with app_client(settings) as (_, client):
        started = time.perf_counter()
        response = await client.post("/rank/batch", json={"queries": [
            {"query": f"fractions {i}", "candidates": 26, "orders": 26} for i in range(64)]})
        seconds = time.perf_counter() - started
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "limit_exceeded"
    assert error["field"] == "queries"
    assert "1664" in error["message"]
    assert "1024" in error["message"]
    assert "RANKD_RERANKER_MAX_QUEUE_DEPTH" in error["message"]
    assert "retry-after" not in response.headers
    assert seconds < 1.0  # refused before any prompt is rendered


async def test_items_over_their_token_limit_are_cut_or_refused_as_configured(
        settings_factory: Any, tiny_lm: Path) -> None:
    long = "adds the numerators and adds the denominators " * 40
    body = {"query": "1/2 + 1/3 = 2/5", "documents": ["short one", long, "short two"]}
    results = {}
    for policy in ("truncate", "refuse"):
        settings = settings_factory(reranker_backend="transformers", reranker_model=str(tiny_lm),
                                    reranker_max_item_tokens=32, reranker_long_items=policy)
        async with app_client(settings) as (_, client):
            results[policy] = await client.post("/v1/rerank", json=body)
    assert results["truncate"].status_code == 200
    assert {r["index"] for r in results["truncate"].json()["results"]} == {0, 1, 2}
    refused = results["refuse"]
    assert refused.status_code == 422
    error = refused.json()["error"]
    assert error["field"] == "documents[1]"
    assert "over the limit of 32 tokens" in error["message"]
    assert "RANKD_RERANKER_MAX_ITEM_TOKENS" in error["message"]


async def test_a_prompt_over_the_model_context_is_refused_naming_the_field(
        settings_factory: Any, tiny_lm: Path) -> None:
    settings = settings_factory(reranker_backend="transformers", reranker_model=str(tiny_lm),
                                reranker_max_prompt_tokens=256)
    async with app_client(settings) as (_, client):
        # /v1/rerank cuts long documents as Cohere does; a query no cut can fit is refused.
        rerank = await client.post("/v1/rerank", json={
            "query": "fractions " * 300, "documents": ["adds the numerators " * 20] * 3})
        rank = await client.post("/rank", json={"query": "fractions " * 300})
        answer = await client.post("/answer", json={
            "question": "q", "options": ["adds the numerators " * 40, "b"]})
    for response, field in ((rerank, "query"), (rank, "query"), (answer, "options")):
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error["field"] == field
        assert "over the limit of 256 tokens (RANKD_RERANKER_MAX_PROMPT_TOKENS)" in error["message"]


async def test_answer_counts_its_markers_and_returns_the_passages_it_used(
        settings_factory: Any, tiny_lm: Path) -> None:
    """Issue 26's request: 1,100 one-letter passages once made a 7,184-token prompt."""
    settings = settings_factory(reranker_backend="transformers", reranker_model=str(tiny_lm),
                                answer_context_tokens=256)
    async with app_client(settings) as (app, client):
        scorer = app.state.engine.scorer
        read = scorer.backend.label_logprobs
        prompts: list[list[int]] = []

        async def recorded(reads: Any) -> Any:  # the prompts the model is given, as given
            prompts.extend(r.prompt_token_ids for r in reads)
            return await read(reads)

        scorer.backend.label_logprobs = recorded
        started = time.perf_counter()
        response = await client.post("/answer", json={
            "question": "What is 7 to the power 0?", "options": ["0", "1"],
            "context": ["p"] * 1100, "orders": 1, "collection": "misconceptions"})
        seconds = time.perf_counter() - started
        renderer = scorer.renderer
    assert response.status_code == 200, response.text
    body = response.json()
    used = body["passages"]
    assert 0 < len(used) < 1100
    assert [p["id"] for p in used] == [f"context:{i}" for i in range(len(used))]
    (prompt,) = prompts  # one order
    text = renderer.tokenizer.decode(prompt)
    context = text.split("Context:\n", 1)[1].split("\n\nQuestion:", 1)[0]
    assert renderer.count_tokens(context) <= 256
    # Every returned passage, and nothing else, numbered best last as the template says.
    assert context.splitlines() == [f"[{i}] {p['text']}"
                                    for i, p in enumerate(used[::-1], 1)]
    assert body["warnings"] == ["collection is ignored: the request gives its own context"]
    assert seconds < 20


async def test_identical_options_are_answered_with_a_warning(settings_factory: Any,
                                                             tiny_lm: Path) -> None:
    settings = settings_factory(reranker_backend="transformers", reranker_model=str(tiny_lm))
    async with app_client(settings) as (_, client):
        response = await client.post("/answer", json={
            "question": "q", "options": ["One", "two", " one "], "passages": 0})
    assert response.status_code == 200
    assert response.json()["warnings"] == [
        "options[0] and options[2] are the same text: the model sees them at different places "
        "and may give them different probabilities"]


@pytest.mark.parametrize("scoring", ["listwise", "pointwise"])
async def test_long_documents_are_cut_to_a_fair_share_as_cohere_cuts_them(
        scoring: str, settings_factory: Any, tiny_lm: Path) -> None:
    settings = settings_factory(reranker_backend="transformers", reranker_model=str(tiny_lm),
                                reranker_max_prompt_tokens=256, reranker_scoring=scoring)
    short = "adds the numerators"
    documents = [short, "adds the numerators and the denominators " * 40, short + " twice",
                 "multiplies both sides " * 60]
    async with app_client(settings) as (app, client):
        scorer = app.state.engine.scorer
        read = scorer.backend.label_logprobs
        prompts: list[list[int]] = []

        async def recorded(reads: Any) -> Any:  # the prompts the model is given
            prompts.extend(r.prompt_token_ids for r in reads)
            return await read(reads)

        scorer.backend.label_logprobs = recorded
        cut = await client.post("/v1/rerank", json={"query": "q", "documents": documents})
        capped = await client.post("/v1/rerank", json={"query": "q", "documents": [short] * 2
                                                       + documents[1:2],
                                                       "max_tokens_per_doc": 8})
        metrics = (await client.get("/metrics")).text
    assert cut.status_code == 200, cut.text
    body = cut.json()
    assert {r["index"] for r in body["results"]} == {0, 1, 2, 3}
    assert body["usage"]["truncated_documents"] == 2
    truncated = {d["index"]: d for d in body["meta"]["truncated_documents"]}
    assert set(truncated) == {1, 3}  # the short ones keep every token
    assert all(d["kept_tokens"] < d["tokens"] for d in truncated.values())
    assert body["meta"]["warnings"][0].startswith("2 document(s) were cut to fit")
    assert all(len(p) + 1 <= 256 for p in prompts)
    if scoring == "listwise":
        # One prompt holds all four: the long two share what the short two leave, alike.
        assert abs(truncated[1]["kept_tokens"] - truncated[3]["kept_tokens"]) <= 2
        assert max(len(p) for p in prompts) + 1 >= 256 - 8  # the room is used, not wasted
    capped_body = capped.json()
    assert capped_body["meta"]["truncated_documents"] == [
        {"index": 2, "tokens": truncated[1]["tokens"], "kept_tokens": 8}]
    assert 'rankd_truncated_documents_total 3.0' in metrics


async def test_an_operator_who_wants_refusals_keeps_them(settings_factory: Any,
                                                         tiny_lm: Path) -> None:
    settings = settings_factory(reranker_backend="transformers", reranker_model=str(tiny_lm),
                                reranker_max_prompt_tokens=256, reranker_long_items="refuse")
    async with app_client(settings) as (_, client):
        response = await client.post("/v1/rerank", json={
            "query": "q", "documents": ["adds the numerators " * 20] * 3})
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["field"] == "documents"
    assert "over the limit of 256 tokens" in error["message"]
