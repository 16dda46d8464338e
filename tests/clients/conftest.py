"""Fixtures of the client tests: the real app on a loopback port, a gate in front of it that
answers like an overloaded service, and a small file in the Eedi competition layout."""

from __future__ import annotations

import csv
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.types import ASGIApp, Receive, Scope, Send

from service.app import create_app
from service.settings import Settings
from tests.support.apps import metric_value, serve_asgi_in_thread

MAX_QUERY_CHARS = 300  # the servers here refuse longer queries with 422


@dataclass
class Gate:
    """ASGI middleware in front of the real app. The first ``refuse`` POSTs are answered with
    ``status`` and the service's own error body and Retry-After header; every POST is logged."""

    app: ASGIApp
    refuse: int = 0
    status: int = 503
    retry_after: str | None = "1"
    seen: list[tuple[float, str, dict[str, str]]] = field(default_factory=list)
    client_ports: set[int] = field(default_factory=set)  # one per TCP connection

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        self.seen.append((time.monotonic(), scope["path"], headers))
        if scope.get("client"):
            self.client_ports.add(scope["client"][1])
        if self.refuse <= 0:
            await self.app(scope, receive, send)
            return
        self.refuse -= 1
        code = "overloaded" if self.status == 429 else "not_ready"
        body = (b'{"error": {"code": "' + code.encode()
                + b'", "message": "refused by the test gate", "field": null}}')
        response_headers = [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]
        if self.retry_after is not None:
            response_headers.append((b"retry-after", self.retry_after.encode()))
        await send({"type": "http.response.start", "status": self.status,
                    "headers": response_headers})
        await send({"type": "http.response.body", "body": body})


@dataclass
class Server:
    url: str
    gate: Gate

    def metrics(self) -> str:
        return httpx.get(f"{self.url}/metrics", timeout=30).text

    def rank_requests(self, route: str = "/rank") -> float:
        """Answered (200) POSTs to ``route`` so far."""
        return metric_value(self.metrics(), "rankd_requests_total", route=route, method="POST",
                            status="200")


@pytest.fixture(scope="session")
def server(sample_index: Path) -> Iterator[Server]:
    """The real app on the sample index, on a loopback port, behind a gate that is open."""
    settings = Settings(index_dir=sample_index, embedder_device="cpu", reranker={"backend": "none"},
                        max_query_chars=MAX_QUERY_CHARS)
    gate = Gate(create_app(settings))
    with serve_asgi_in_thread(gate) as url:
        yield Server(url, gate)


@pytest.fixture
def gate(server: Server) -> Iterator[Gate]:
    """The server's gate, reset after the test."""
    server.gate.seen.clear()
    server.gate.client_ports.clear()
    yield server.gate
    server.gate.refuse = 0
    server.gate.seen.clear()
    server.gate.client_ports.clear()


EEDI_HEADER = ["QuestionId", "ConstructId", "ConstructName", "SubjectId", "SubjectName",
               "CorrectAnswer", "QuestionText", "AnswerAText", "AnswerBText", "AnswerCText",
               "AnswerDText", "MisconceptionAId", "MisconceptionBId", "MisconceptionCId",
               "MisconceptionDId"]
# Written for the sample catalogue (retriever/data/sample_misconceptions.csv), whose ids label
# the wrong answers. Labels are floats as in the competition files; blanks are unlabelled.
EEDI_ROWS = [
    ["10", "1", "Add fractions with different denominators", "7", "Adding Fractions", "B",
     "Calculate \\( \\frac{1}{2}+\\frac{1}{3} \\)", "\\( \\frac{2}{5} \\)",
     "\\( \\frac{5}{6} \\)", "\\( \\frac{1}{5} \\)", "\\( \\frac{2}{6} \\)", "1.0", "", "", "1.0"],
    ["11", "2", "Order decimals", "8", "Ordering Decimals", "A",
     "Which is larger?\n0.5 or 0.45", "0.5", "0.45", "They are equal", "0.405", "", "7.0", "",
     "7.0"],
    ["12", "3", "Square a negative number", "9", "Squares and Negative Numbers", "C",
     "Work out \\( (-3)^{2} \\)", "\\( -9 \\)", "\\( -6 \\)", "\\( 9 \\)", "\\( 6 \\)", "16.0",
     "", "", ""],
    ["13", "4", "Round to one decimal place", "10", "Rounding", "D",
     "Round 2.46 to one decimal place", "2.4", "2.46", "3", "2.5", "", "", "", ""],
]


@pytest.fixture
def eedi_file(tmp_path: Path) -> Path:
    path = tmp_path / "train.csv"
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(EEDI_HEADER)
        writer.writerows(EEDI_ROWS)
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    import json

    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip()]
