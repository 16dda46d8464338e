"""``rankd batch``: rank a file of queries through the service, resumably, in stable order.

Each answer is appended to the output JSONL the moment it arrives (``{"id", "query",
"response"}``, or ``{"id", "query", "error"}`` for a query that failed for good), so an
interrupted run loses nothing. A rerun with the same output skips the ids already answered and
retries the failed ones. When every query has been tried, the file is rewritten in input order,
and for the Eedi format a competition submission CSV is written next to it.
"""

from __future__ import annotations

import asyncio
import csv
import json
import logging
import os
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx
from tqdm import tqdm

from clients.api import (
    Lanes,
    RankOptions,
    RequestError,
    RequestFailedError,
    RetryPolicy,
    UsageError,
    post_with_retries,
)
from clients.queries import InputError, Query

log = logging.getLogger(__name__)

SUBMISSION_HEADER = ("QuestionId_Answer", "MisconceptionId")
SUBMISSION_K = 25  # the competition scored up to 25 ids per row
MCQ_HEADER = ("id", "prediction")
MCQ_K = 3  # the LLM Science Exam scored the top 3 labels (MAP@3)
MAX_CONCURRENCY = 1024


@dataclass(frozen=True)
class BatchConfig:
    url: str
    output: Path
    rank: RankOptions = field(default_factory=RankOptions)
    concurrency: int = 8
    api_key: str | None = None
    timeout_s: float = 120.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    batch_size: int = 0  # > 0: send this many queries per POST /rank/batch instead of /rank
    progress: bool = True

    def __post_init__(self) -> None:
        if not 1 <= self.concurrency <= MAX_CONCURRENCY:
            raise UsageError(f"--concurrency must be between 1 and {MAX_CONCURRENCY}, "
                             f"got {self.concurrency}")
        if self.batch_size < 0:
            raise UsageError(f"--rank-batch must be 0 (use /rank) or more, got {self.batch_size}")


@dataclass
class BatchSummary:
    total: int
    skipped: int  # answered by an earlier run
    succeeded: int  # answered by this run
    failed: dict[str, dict[str, Any]]  # id -> error, for queries still without an answer
    seconds: float
    output: Path
    extra_ids: int = 0  # records in the output whose id is not in the input (kept at the end)

    @property
    def ok(self) -> bool:
        return not self.failed


# ---------------------------------------------------------------- the output file


class RecordFile:
    """The output JSONL: appended to as answers arrive, rewritten in input order at the end."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fh: IO[str] | None = None

    def load(self) -> dict[str, dict[str, Any]]:
        """Records already written, the latest per id. A torn last line (a run killed in the
        middle of a write) is cut off so that appending starts on a clean line."""
        records: dict[str, dict[str, Any]] = {}
        if not self.path.exists():
            return records
        data = self.path.read_bytes()
        good_end = 0
        position = 0
        line_no = 0
        while position < len(data):
            end = data.find(b"\n", position)
            line = data[position:] if end < 0 else data[position:end]
            line_no += 1
            try:
                record = json.loads(line) if line.strip() else None
            except json.JSONDecodeError:
                if end < 0:  # the torn tail of an interrupted write
                    log.warning("%s: dropping an incomplete last line from an interrupted run",
                                self.path)
                    break
                raise InputError(
                    f"{self.path}:{line_no}: not valid JSON; this file is not a rankd batch "
                    "output (use another --output, or repair the line)") from None
            if record is not None:
                if not isinstance(record, dict) or "id" not in record:
                    raise InputError(f"{self.path}:{line_no}: a record without an 'id'; this file "
                                     "is not a rankd batch output")
                records[str(record["id"])] = record
            if end < 0:
                good_end = len(data)
                break
            position = good_end = end + 1
        if good_end < len(data) or (data and not data.endswith(b"\n")):
            with self.path.open("r+b") as fh:
                fh.truncate(good_end)
                if good_end and data[good_end - 1:good_end] != b"\n":
                    fh.seek(good_end)
                    fh.write(b"\n")
        return records

    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = self.path.open("a", encoding="utf-8")

    def append(self, record: dict[str, Any]) -> None:
        assert self._fh is not None
        self._fh.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def rewrite(self, records: Iterable[dict[str, Any]]) -> None:
        """Replace the file atomically with ``records``, in the order given."""
        staging = self.path.with_name(f".{self.path.name}.tmp")
        with staging.open("w", encoding="utf-8") as fh:
            for record in records:
                fh.write(json.dumps(record, ensure_ascii=False) + "\n")
        os.replace(staging, self.path)


def result_ids(record: dict[str, Any]) -> list[str]:
    """The ranked ids of a successful record, best first (option labels for /answer)."""
    response = record["response"]
    if "ranking" in response:
        return [str(label) for label in response["ranking"]]
    return [str(r["id"]) for r in response["results"]]


def write_submission(path: Path, records: Iterable[dict[str, Any]], k: int = SUBMISSION_K,
                     header: tuple[str, str] = SUBMISSION_HEADER) -> int:
    """A submission CSV: ``QuestionId_Answer,MisconceptionId`` with up to ``k`` ids separated by
    spaces for Eedi, ``id,prediction`` with the top 3 labels for mcq. Failed queries have no row.
    Returns the number of rows."""
    rows = 0
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        for record in records:
            if "response" in record:
                writer.writerow((record["id"], " ".join(result_ids(record)[:k])))
                rows += 1
    return rows


def default_submission_path(output: Path) -> Path:
    stem = output.name[: -len(".jsonl")] if output.name.endswith(".jsonl") else output.stem
    return output.with_name(f"{stem}.submission.csv")


# ---------------------------------------------------------------- the run


def _is_rank_response(response: Any) -> bool:
    return isinstance(response, dict) and isinstance(response.get("results"), list)


def _is_answer_response(response: Any) -> bool:
    return isinstance(response, dict) and isinstance(response.get("ranking"), list)


class _Run:
    def __init__(self, config: BatchConfig, lanes: Lanes, records: RecordFile,
                 bar: tqdm[Any]) -> None:
        self.config = config
        self.lanes = lanes
        self.records = records
        self.bar = bar
        self.answered: dict[str, dict[str, Any]] = {}
        self.failures = 0

    def _write(self, query: Query, *, response: Any = None,
               error: RequestError | None = None) -> None:
        record: dict[str, Any] = {"id": query.id, "query": query.text}
        if error is None:
            record["response"] = response
        else:
            record["error"] = error.as_dict()
            self.failures += 1
            self.bar.set_postfix(failed=self.failures, refresh=False)
        self.records.append(record)
        self.answered[query.id] = record
        self.bar.update(1)

    async def one(self, query: Query) -> None:
        if query.options:  # a multiple-choice question goes to /answer
            path, body = "/answer", self.config.rank.answer_body(query.text, query.options)
            valid, expected = _is_answer_response, "a ranking list"
        else:
            path, body = "/rank", self.config.rank.body(query.text)
            valid, expected = _is_rank_response, "a results list"
        try:
            response = await post_with_retries(self.lanes, path, body, self.config.retry)
        except RequestFailedError as exc:
            self._write(query, error=exc.error)
            return
        if not valid(response):
            self._write(query, error=RequestError(200, "bad_response",
                                                  f"{path} answered without {expected}"))
            return
        self._write(query, response=response)

    async def many(self, queries: Sequence[Query]) -> None:
        body = {"queries": [self.config.rank.body(q.text) for q in queries]}
        try:
            responses = await post_with_retries(self.lanes, "/rank/batch", body,
                                                self.config.retry)
        except RequestFailedError as exc:
            if exc.error.retryable:  # out of retries: the service is down or overloaded
                for query in queries:
                    self._write(query, error=exc.error)
                return
            # One bad query refuses the whole request (a 4xx naming queries[i]); ask one by
            # one so that only the bad ones fail.
            for query in queries:
                await self.one(query)
            return
        if (not isinstance(responses, list) or len(responses) != len(queries)
                or not all(_is_rank_response(r) for r in responses)):
            error = RequestError(200, "bad_response",
                                 f"/rank/batch answered {len(responses)} items for "
                                 f"{len(queries)} queries, or items without results"
                                 if isinstance(responses, list)
                                 else "/rank/batch did not answer a list")
            for query in queries:
                self._write(query, error=error)
            return
        for query, response in zip(queries, responses, strict=True):
            self._write(query, response=response)

    async def worker(self, units: asyncio.Queue[list[Query]]) -> None:
        while True:
            try:
                unit = units.get_nowait()
            except asyncio.QueueEmpty:
                return
            if self.config.batch_size and not unit[0].options:
                await self.many(unit)
            else:
                await self.one(unit[0])


async def run_batch(queries: Sequence[Query], config: BatchConfig,
                    transport: httpx.AsyncBaseTransport | None = None) -> BatchSummary:
    """Rank every query not yet answered in ``config.output``; rewrite it in input order."""
    started = time.perf_counter()
    records = RecordFile(config.output)
    previous = records.load()
    done = {qid for qid, record in previous.items() if "response" in record}
    todo = [q for q in queries if q.id not in done]
    skipped = len(queries) - len(todo)
    if skipped:
        log.info("%s: %d of %d queries already answered; ranking the other %d",
                 config.output, skipped, len(queries), len(todo))
    size = config.batch_size or 1
    units: asyncio.Queue[list[Query]] = asyncio.Queue()
    for i in range(0, len(todo), size):
        units.put_nowait(list(todo[i:i + size]))

    bar = tqdm(total=len(queries), initial=skipped, unit="q", desc="rankd batch",
               file=sys.stderr, disable=not (config.progress and todo), dynamic_ncols=True,
               smoothing=0.05)
    records.open()
    try:
        async with Lanes(config.url, config.concurrency, api_key=config.api_key,
                         timeout=config.timeout_s, transport=transport) as lanes:
            run = _Run(config, lanes, records, bar)
            workers = min(config.concurrency, units.qsize())
            await asyncio.gather(*(run.worker(units) for _ in range(workers)))
    finally:
        records.close()
        bar.close()

    # Every query was tried: rewrite in input order, records of other ids kept at the end.
    merged = {**previous, **run.answered}
    input_ids = {q.id for q in queries}
    extra = [record for qid, record in merged.items() if qid not in input_ids]
    if extra:
        log.warning("%s holds %d records whose ids are not in this input; kept at the end",
                    config.output, len(extra))
    records.rewrite([merged[q.id] for q in queries] + extra)
    failed = {q.id: merged[q.id]["error"] for q in queries if "response" not in merged[q.id]}
    return BatchSummary(total=len(queries), skipped=skipped,
                        succeeded=len(queries) - skipped - len(failed), failed=failed,
                        seconds=time.perf_counter() - started, output=config.output,
                        extra_ids=len(extra))


def ordered_records(path: Path, queries: Sequence[Query]) -> list[dict[str, Any]]:
    """The records of ``queries``, in their order, from a finished output file."""
    records = RecordFile(path).load()
    return [records[q.id] for q in queries if q.id in records]
