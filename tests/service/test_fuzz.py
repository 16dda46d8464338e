"""Schema fuzzing: schemathesis generates requests from rankd's own OpenAPI schema and sends them
to the real app (uvicorn on loopback, in this process). Every response must be a documented
status with a conforming body, and never a 500."""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.support.apps import serve_in_thread

# Per operation: a few hundred cases in all in the quick run, many more in the slow one;
# RANKD_FUZZ_EXAMPLES overrides the slow run's count (see docs/reliability.md).
QUICK_EXAMPLES = 50
SLOW_EXAMPLES = int(os.environ.get("RANKD_FUZZ_EXAMPLES", "200"))
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance]
STATUSES: Counter[int] = Counter()


@pytest.fixture(scope="module")
def fuzz_target(sample_index: Path, tiny_lm: Path) -> Iterator[tuple[Any, str]]:
    from service.settings import Settings

    app_settings = Settings(index_dir=sample_index, embedder_device="cpu",
                            reranker={"backend": "transformers", "model": str(tiny_lm)},
                            max_body_bytes=65536,
                            max_rerank_documents=60)
    with serve_in_thread(app_settings) as url:
        yield schemathesis.openapi.from_url(f"{url}/openapi.json"), url


# The routes in the schema; a test below checks that this list covers all of them.
OPERATIONS = [
    ("POST", "/rank"), ("POST", "/rank/batch"), ("GET", "/health"), ("GET", "/ready"),
    ("GET", "/collections"), ("GET", "/metrics"), ("POST", "/v1/rerank"), ("POST", "/v2/rerank"),
    ("POST", "/rerank"), ("POST", "/answer"),
]


def _fuzz(method: str, path: str, fuzz_target: tuple[Any, str], examples: int) -> None:
    fuzz_schema, url = fuzz_target
    operation = fuzz_schema[path][method]
    session = requests.Session()

    @given(case=operation.as_strategy())
    @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def check(case: Any) -> None:
        response = case.call_and_validate(base_url=url, session=session, checks=CHECKS,
                                          timeout=60)
        STATUSES[response.status_code] += 1

    check()


@pytest.mark.parametrize(("method", "path"), OPERATIONS)
def test_every_generated_request_gets_a_documented_answer(method: str, path: str,
                                                          fuzz_target: tuple[Any, str]) -> None:
    _fuzz(method, path, fuzz_target, QUICK_EXAMPLES)


@pytest.mark.slow
@pytest.mark.parametrize(("method", "path"), OPERATIONS)
def test_long_fuzz(method: str, path: str, fuzz_target: tuple[Any, str]) -> None:
    _fuzz(method, path, fuzz_target, SLOW_EXAMPLES)


def test_operations_cover_the_schema(fuzz_target: tuple[Any, str]) -> None:
    listed = {(op.ok().method.upper(), op.ok().path)
              for op in fuzz_target[0].get_all_operations()}
    assert listed == set(OPERATIONS)


# Text the schema cannot express: lone surrogates (valid JSON, invalid Unicode), control and
# format characters, private-use code points and noncharacters, mixed with plain letters.
ODD_TEXT = st.text(alphabet=st.one_of(
    st.characters(codec=None, categories=["Cs", "Cc", "Cf", "Co", "Cn", "Zl", "Zp"]),
    st.sampled_from(["a", " ", "\ufffe", "\uffff", "\U0010ffff", "\x00", "\u202e"])),
    min_size=1, max_size=12)
# Where each endpoint carries text; the odd text replaces "?".
TEXT_FIELDS = [
    ("/rank", {"query": "?"}, "query"), ("/rank", {"query": "q", "collection": "?"}, "collection"),
    ("/v1/rerank", {"query": "?", "documents": ["a"]}, "query"),
    ("/v1/rerank", {"query": "q", "documents": ["?"]}, "documents[0]"),
    ("/answer", {"question": "?", "options": ["a", "b"]}, "question"),
    ("/answer", {"question": "q", "options": ["a", "?"]}, "options[1]"),
    ("/answer", {"question": "q", "options": ["a", "b"], "context": ["?"]}, "context[0]"),
]
_SURROGATE = re.compile("[\ud800-\udfff]")


@pytest.mark.parametrize(("path", "template", "field"), TEXT_FIELDS)
def test_odd_code_points_in_any_text_field_never_get_a_500(
        fuzz_target: tuple[Any, str], path: str, template: dict[str, Any], field: str) -> None:
    url = fuzz_target[1]
    session = requests.Session()

    @given(text=ODD_TEXT)
    @settings(max_examples=QUICK_EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def check(text: str) -> None:
        body = json.dumps(template).replace('"?"', json.dumps(text))  # ASCII: surrogates escaped
        response = session.post(url + path, data=body.encode(),
                                headers={"Content-Type": "application/json"}, timeout=60)
        STATUSES[response.status_code] += 1
        assert response.status_code < 500, response.text
        if _SURROGATE.search(text):
            assert response.status_code == 422
            assert response.json()["error"]["field"] == field

    check()


def test_fuzzing_exercised_errors_and_successes() -> None:
    # Runs after the fuzz cases in this module: both kinds of answers were produced.
    total = sum(STATUSES.values())
    print(f"fuzz cases: {total}, statuses: {dict(sorted(STATUSES.items()))}")
    assert total >= 200
    assert STATUSES[200] > 0
    assert sum(n for status, n in STATUSES.items() if 400 <= status < 500) > 0
    assert all(status != 500 for status in STATUSES)


# Multi-byte scripts: CJK and emoji are several tokens a character, combining marks attach to
# what precedes them, right-to-left text and full-width forms tokenize oddly.
SCRIPTS = st.sampled_from(["漢字", "かな", "한국어", "😀", "👩‍👩‍👧", "e\u0301", "مرحبا", "Ｆｕｌｌ",
                           "x", " ", "1/2"])


def _script_text(size: int) -> st.SearchStrategy[str]:
    return st.lists(SCRIPTS, min_size=1, max_size=size).map("".join)


# Requests near every limit of the fuzz target (body 65,536 bytes, 60 documents, 26 labels,
# queries of 4,000 characters, the tiny model's 4,096-token context, the /answer budget).
HOSTILE = st.one_of(
    st.builds(lambda q: ("/rank", {"query": q}),
              st.integers(3990, 4010).map(lambda n: "漢" * n)),
    st.builds(lambda q, n: ("/rank", {"query": q, "candidates": n, "orders": n}),
              _script_text(40), st.integers(20, 27)),
    st.builds(lambda docs: ("/v1/rerank", {"query": "q", "documents": docs}),
              st.integers(55, 62).flatmap(lambda n: st.lists(_script_text(30), min_size=n,
                                                             max_size=n))),
    st.builds(lambda size: ("/v1/rerank", {"query": "q", "documents": ["😀" * size] * 26}),
              st.integers(50, 700)),
    st.builds(lambda n, q: ("/answer", {"question": q, "options": ["a", "b"],
                                        "context": ["p"] * n}),
              st.integers(1, 1200), _script_text(20)),
    st.builds(lambda n: ("/answer", {"question": "q", "options": [f"o{i}" for i in range(n)]}),
              st.integers(24, 28)),
    st.builds(lambda size: ("/answer", {"question": "q", "options": ["漢" * size, "b"]}),
              st.integers(100, 20000)),
)


def test_hostile_sizes_and_scripts_get_a_named_4xx_never_a_500(
        fuzz_target: tuple[Any, str]) -> None:
    url = fuzz_target[1]
    session = requests.Session()

    @given(case=HOSTILE)
    @settings(max_examples=QUICK_EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def check(case: tuple[str, dict[str, Any]]) -> None:
        path, body = case
        response = session.post(url + path, json=body, timeout=120)
        STATUSES[response.status_code] += 1
        assert response.status_code in (200, 413, 422), response.text[:500]
        if response.status_code != 200:
            error = response.json()["error"]
            assert error["field"], error
            assert re.search(r"limit|exceeds|at most|at least|labels", error["message"]), error
        if "context" in body and response.status_code == 200:
            assert len(response.json()["passages"]) <= len(body["context"])

    check()
