"""rankd batch against the real app on a loopback port: formats, order, resumption, failures,
retries and /rank/batch."""

from __future__ import annotations

import asyncio
import csv
import json
from pathlib import Path

import httpx
import pytest

from clients.api import RankOptions, RetryPolicy, parse_retry_after
from clients.batch import BatchConfig, run_batch
from clients.queries import Query, read_queries
from rankd.cli import main
from retriever.data import sample_queries_path
from retriever.eedi import eedi_queries
from tests.clients.conftest import MAX_QUERY_CHARS, Gate, Server, read_jsonl
from tests.support.apps import wait_for

SAMPLE_IDS = [q.id for q in read_queries(sample_queries_path(), "jsonl")]


def _batch(server: Server, *args: str) -> int:
    return main(["batch", "--url", server.url, "--quiet", "--no-rerank", *args])


def test_jsonl_input_gives_every_answer_in_input_order(server: Server, tmp_path: Path) -> None:
    output = tmp_path / "out.jsonl"
    code = _batch(server, "--input", str(sample_queries_path()), "--format", "jsonl",
                  "--output", str(output), "--top-k", "7", "--concurrency", "6")
    assert code == 0
    records = read_jsonl(output)
    assert [r["id"] for r in records] == SAMPLE_IDS  # input order, whatever order answers came
    texts = {q.id: q.text for q in read_queries(sample_queries_path(), "jsonl")}
    for record in records:
        assert record["query"] == texts[record["id"]]
        response = record["response"]
        assert response["collection"] == "misconceptions"
        assert [r["rank"] for r in response["results"]] == list(range(1, 8))
        assert response["reranked"] is False
    # The whole response is kept: the first query's answer is the service's own answer.
    direct = httpx.post(f"{server.url}/rank", json={"query": records[0]["query"], "top_k": 7,
                                                    "rerank": False}).json()
    assert [r["id"] for r in records[0]["response"]["results"]] == [
        r["id"] for r in direct["results"]]


def test_concurrency_bounds_the_connections(server: Server, gate: Gate, tmp_path: Path) -> None:
    output = tmp_path / "out.jsonl"
    assert _batch(server, "--input", str(sample_queries_path()), "--format", "jsonl",
                  "--output", str(output), "--top-k", "3", "--concurrency", "3") == 0
    assert len([p for _, p, _ in gate.seen if p == "/rank"]) == len(SAMPLE_IDS)
    assert len(gate.client_ports) == 3  # three kept-alive connections carried every request


def test_eedi_input_writes_the_competition_submission(server: Server, eedi_file: Path,
                                                      tmp_path: Path) -> None:
    output = tmp_path / "eedi.jsonl"
    code = _batch(server, "--input", str(eedi_file), "--format", "eedi", "--output",
                  str(output), "--top-k", "30")
    assert code == 0
    expected = eedi_queries(eedi_file)  # the one shared template
    records = read_jsonl(output)
    assert [(r["id"], r["query"]) for r in records] == [(q.id, q.text) for q in expected]
    submission = tmp_path / "eedi.submission.csv"
    with submission.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["QuestionId_Answer", "MisconceptionId"]
    assert [row[0] for row in rows[1:]] == [q.id for q in expected]
    for row, record in zip(rows[1:], records, strict=True):
        ids = row[1].split(" ")
        assert len(ids) == 25  # the competition's 25, though 30 were asked for
        assert ids == [r["id"] for r in record["response"]["results"]][:25]


def test_eedi_template_option_changes_the_query_text(server: Server, eedi_file: Path,
                                                     tmp_path: Path) -> None:
    output = tmp_path / "eedi.jsonl"
    submission = tmp_path / "sub.csv"
    code = _batch(server, "--input", str(eedi_file), "--format", "eedi", "--output",
                  str(output), "--submission", str(submission), "--template",
                  "{QuestionText} Wrong: {IncorrectAnswerText}")
    assert code == 0
    assert read_jsonl(output)[2]["query"] == "Which is larger?\n0.5 or 0.45 Wrong: 0.45"
    assert submission.is_file()


async def test_an_interrupted_run_resumes_without_asking_again(server: Server,
                                                               tmp_path: Path) -> None:
    # Enough queries, one at a time, that the run is surely cut off part way.
    sample = read_queries(sample_queries_path(), "jsonl")
    queries = [Query(f"{q.id}-{i}", q.text) for i in range(6) for q in sample]
    path = tmp_path / "q.jsonl"
    path.write_text("".join(json.dumps({"id": q.id, "query": q.text}) + "\n" for q in queries),
                    encoding="utf-8")
    output = tmp_path / "out.jsonl"
    config = BatchConfig(url=server.url, output=output, rank=RankOptions(top_k=5, rerank=False),
                         concurrency=1, progress=False)
    run = asyncio.create_task(run_batch(queries, config))

    async def six_written() -> bool:
        return output.exists() and len(output.read_text().splitlines()) >= 6

    await wait_for(six_written, 120)
    run.cancel()  # what Ctrl-C does to asyncio.run
    with pytest.raises(asyncio.CancelledError):
        await run
    before = {r["id"]: r for r in read_jsonl(output)}
    assert 6 <= len(before) < len(queries)
    # Requests cut off by the cancellation may still finish on the server: let them land.
    answered_before = -1.0
    async with asyncio.timeout(60):
        while (now := await asyncio.to_thread(server.rank_requests)) != answered_before:
            answered_before = now
            await asyncio.sleep(0.5)

    code = await asyncio.to_thread(_batch, server, "--input", str(path), "--format", "jsonl",
                                   "--output", str(output), "--top-k", "5", "--concurrency", "4")
    assert code == 0
    asked = await asyncio.to_thread(server.rank_requests) - answered_before
    assert asked == len(queries) - len(before)  # nothing already answered was asked again
    records = read_jsonl(output)
    assert [r["id"] for r in records] == [q.id for q in queries]
    for record in records:
        if record["id"] in before:  # kept byte for byte, timings included
            assert record == before[record["id"]]


def test_a_torn_last_line_is_dropped_and_asked_again(server: Server, tmp_path: Path) -> None:
    output = tmp_path / "out.jsonl"
    assert _batch(server, "--input", str(sample_queries_path()), "--format", "jsonl",
                  "--output", str(output), "--top-k", "3") == 0
    lines = output.read_text(encoding="utf-8").splitlines(keepends=True)
    output.write_text("".join(lines[:4]) + lines[4][:40], encoding="utf-8")  # killed mid-write
    answered_before = server.rank_requests()
    assert _batch(server, "--input", str(sample_queries_path()), "--format", "jsonl",
                  "--output", str(output), "--top-k", "3") == 0
    assert server.rank_requests() - answered_before == len(SAMPLE_IDS) - 4
    assert [r["id"] for r in read_jsonl(output)] == SAMPLE_IDS


def test_a_failing_query_is_recorded_and_the_exit_status_says_so(
        server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "q.csv"
    too_long = "seven to the power zero " * 20  # over MAX_QUERY_CHARS
    assert len(too_long) > MAX_QUERY_CHARS
    path.write_text(f"qid,text\na,What is 7 to the power 0?\nb,{too_long}\nc,Order 0.5 and 0.45\n",
                    encoding="utf-8")
    output = tmp_path / "out.jsonl"
    args = ["--input", str(path), "--format", "csv", "--id-field", "qid", "--query-field",
            "text", "--output", str(output)]
    assert _batch(server, *args) == 1
    records = {r["id"]: r for r in read_jsonl(output)}
    assert list(records) == ["a", "b", "c"]
    assert "response" in records["a"]
    assert "response" in records["c"]
    error = records["b"]["error"]
    assert error["status"] == 422
    assert error["code"] == "limit_exceeded"
    assert error["field"] == "query"
    assert str(MAX_QUERY_CHARS) in error["message"]
    assert error["attempts"] == 1  # a 422 is not retried
    assert "failed b: 422" in capsys.readouterr().err

    answered_before = server.rank_requests()
    assert _batch(server, *args) == 1  # the failed query is tried again, and fails again
    assert server.rank_requests() == answered_before  # a and c were not asked again
    assert "error" in {r["id"]: r for r in read_jsonl(output)}["b"]


@pytest.mark.parametrize("status", [503, 429])
def test_retries_honour_retry_after_until_the_service_answers(
        server: Server, gate: Gate, tmp_path: Path, status: int) -> None:
    gate.refuse, gate.status, gate.retry_after = 2, status, "1"
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"id": "only", "query": "Is 0.45 bigger than 0.5?"}) + "\n",
                    encoding="utf-8")
    output = tmp_path / "out.jsonl"
    code = _batch(server, "--input", str(path), "--format", "jsonl", "--output", str(output),
                  "--api-key", "s3cret", "--backoff", "0.01")
    assert code == 0
    assert "response" in read_jsonl(output)[0]
    times = [t for t, path_, _ in gate.seen if path_ == "/rank"]
    assert len(times) == 3
    # Retry-After: 1 was honoured, not the 10 ms backoff.
    assert times[1] - times[0] >= 0.95
    assert times[2] - times[1] >= 0.95
    assert all(h.get("authorization") == "Bearer s3cret" for _, _, h in gate.seen)


def test_retries_run_out_and_the_failure_is_recorded(server: Server, gate: Gate,
                                                     tmp_path: Path) -> None:
    gate.refuse, gate.status, gate.retry_after = 10, 503, "0"
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"id": "x", "query": "1/2 + 1/3 = 2/5"}) + "\n", encoding="utf-8")
    output = tmp_path / "out.jsonl"
    code = _batch(server, "--input", str(path), "--format", "jsonl", "--output", str(output),
                  "--retries", "2")
    assert code == 1
    error = read_jsonl(output)[0]["error"]
    assert error == {"status": 503, "code": "not_ready", "message": "refused by the test gate",
                     "field": None, "attempts": 3}


class _DropFirst(httpx.AsyncBaseTransport):
    """Connection refused for the first ``n`` requests, as a restarting server does."""

    def __init__(self, n: int) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.left = n
        self.calls = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.calls += 1
        if self.left > 0:
            self.left -= 1
            raise httpx.ConnectError("[Errno 111] Connection refused", request=request)
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_connection_errors_are_retried(server: Server, tmp_path: Path) -> None:
    queries = read_queries(sample_queries_path(), "jsonl")[:3]
    transport = _DropFirst(2)
    config = BatchConfig(url=server.url, output=tmp_path / "o.jsonl",
                         rank=RankOptions(top_k=3, rerank=False), concurrency=1,
                         retry=RetryPolicy(retries=3, backoff_s=0.01), progress=False)
    summary = await run_batch(queries, config, transport=transport)
    assert summary.ok
    assert summary.succeeded == 3
    assert transport.calls == 5


def test_rank_batch_mode_gives_the_same_answers(server: Server, tmp_path: Path) -> None:
    single, batched = tmp_path / "single.jsonl", tmp_path / "batched.jsonl"
    args = ["--input", str(sample_queries_path()), "--format", "jsonl", "--top-k", "5"]
    assert _batch(server, *args, "--output", str(single)) == 0
    batches_before = server.rank_requests("/rank/batch")
    assert _batch(server, *args, "--output", str(batched), "--rank-batch", "8") == 0
    assert server.rank_requests("/rank/batch") - batches_before == 5  # ceil(36 / 8)

    def ids(path: Path) -> list[tuple[str, list[str]]]:
        return [(r["id"], [x["id"] for x in r["response"]["results"]]) for r in read_jsonl(path)]

    assert ids(batched) == ids(single)


def test_rank_batch_mode_isolates_a_bad_query(server: Server, tmp_path: Path) -> None:
    path = tmp_path / "q.jsonl"
    lines = [{"id": f"q{i}", "query": f"What is {i} squared?"} for i in range(5)]
    lines[2]["query"] = "x" * (MAX_QUERY_CHARS + 1)
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    output = tmp_path / "out.jsonl"
    assert _batch(server, "--input", str(path), "--format", "jsonl", "--output", str(output),
                  "--rank-batch", "5") == 1
    records = read_jsonl(output)
    assert [("error" in r) for r in records] == [False, False, True, False, False]
    assert records[2]["error"]["field"] == "query"


def test_bad_options_are_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["batch", "--input", str(sample_queries_path()), "--format", "jsonl", "--output",
            str(tmp_path / "o.jsonl")]
    assert main([*args, "--concurrency", "0"]) == 2
    assert "--concurrency must be between 1 and 1024" in capsys.readouterr().err
    assert main([*args, "--url", "ftp://x"]) == 2
    assert "not an http(s) URL" in capsys.readouterr().err
    assert main([*args, "--retries", "1000"]) == 2
    assert "--retries must be 0..100" in capsys.readouterr().err


def test_retry_after_accepts_seconds_and_http_dates() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:10 GMT", now=1445412480.0) == 10.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None
