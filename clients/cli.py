"""Registers the client subcommands (batch, eval, loadtest) on the ``rankd`` parser.

Each handler imports its module only when it runs, so ``rankd --help`` stays fast.
Exit statuses: 0 success, 1 some queries failed, 2 bad usage or input, 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from clients.config import ClientSettings

if TYPE_CHECKING:
    from clients.api import RankOptions
    from clients.queries import Query

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

N = TypeVar("N", int, float)


def _quiet_http_log() -> None:
    # httpx logs every request at INFO; a client run sends thousands.
    logging.getLogger("httpx").setLevel(logging.WARNING)


def _err(command: str, message: str) -> None:
    print(f"rankd {command}: {message}", file=sys.stderr)


def _number_list(kind: Callable[[str], N], what: str) -> Callable[[str], tuple[N, ...]]:
    """An argparse type: values of ``kind`` separated by commas, at least one."""

    def parse(text: str) -> tuple[N, ...]:
        try:
            values = tuple(kind(v) for v in text.split(",") if v.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {what} separated by commas, got {text!r}") from None
        if not values:
            raise argparse.ArgumentTypeError("expected at least one value")
        return values

    return parse


_int_list = _number_list(int, "integers")
_float_list = _number_list(float, "numbers")


# ---------------------------------------------------------------- shared options


def _add_query_file(parser: argparse.ArgumentParser, required: bool) -> None:
    group = parser.add_argument_group("queries")
    group.add_argument("--input", required=required, type=Path, help="query file")
    group.add_argument("--format", choices=["eedi", "jsonl", "csv", "mcq"], required=required,
                       help="eedi: the competition layout (train.csv); jsonl/csv: id and query "
                            "fields; mcq: id,prompt,A,B,C,D,E[,answer], answered by POST /answer")
    group.add_argument("--id-field", default="id", help="jsonl/csv: the id field (default: id)")
    group.add_argument("--query-field", default="query",
                       help="jsonl/csv: the query text field (default: query)")
    group.add_argument("--template", help="eedi: the query template, e.g. "
                       "'{QuestionText} Incorrect answer: {IncorrectAnswerText}' (default: "
                       "retriever.eedi.DEFAULT_QUERY_TEMPLATE)")
    group.add_argument("--template-file", type=Path, help="eedi: read the template from a file")
    group.add_argument("--all-answers", action="store_true",
                       help="eedi: a query for every incorrect answer, not only the ones with a "
                            "misconception id (files without labels get this anyway)")


def _add_rank(parser: argparse.ArgumentParser, timeout: float) -> None:
    group = parser.add_argument_group("service")
    group.add_argument("--url", help="service base URL (default http://127.0.0.1:8000)")
    group.add_argument("--api-key",
                       help="sent as 'Authorization: Bearer KEY' (default: the first key of "
                            "$RANKD_API_KEY)")
    group.add_argument("--top-k", type=int, default=25, help="results per query (default 25)")
    group.add_argument("--candidates", type=int,
                       help="candidates reranked (default: the service's)")
    group.add_argument("--rerank", action=argparse.BooleanOptionalAction, default=True,
                       help="rerank with the LLM (default: on)")
    group.add_argument("--collection", help="collection (default: the only one loaded)")
    group.add_argument("--timeout", type=float, default=timeout,
                       help=f"seconds per request (default {timeout:g})")


def _read_query_file(args: argparse.Namespace) -> list[Query]:
    from clients.queries import QueryFileOptions, read_queries

    template = args.template
    if args.template_file is not None:
        template = args.template_file.read_text(encoding="utf-8").rstrip("\n")
    options = QueryFileOptions(id_field=args.id_field, query_field=args.query_field,
                               template=template, all_answers=args.all_answers)
    return read_queries(args.input, args.format, options)


def _rank_options(args: argparse.Namespace) -> RankOptions:
    from clients.api import RankOptions

    return RankOptions(top_k=args.top_k, candidates=args.candidates, rerank=args.rerank,
                       collection=args.collection)


# ---------------------------------------------------------------- batch


def _batch(args: argparse.Namespace) -> int:
    from clients.api import DEFAULT_URL, RetryPolicy, UsageError, normalise_url
    from clients.batch import (
        MCQ_HEADER,
        MCQ_K,
        SUBMISSION_HEADER,
        SUBMISSION_K,
        BatchConfig,
        default_submission_path,
        ordered_records,
        run_batch,
        write_submission,
    )
    from clients.queries import InputError

    _quiet_http_log()
    try:
        queries = _read_query_file(args)
        config = BatchConfig(
            url=normalise_url(args.url or DEFAULT_URL), output=args.output,
            rank=_rank_options(args),
            concurrency=args.concurrency, api_key=args.api_key or ClientSettings().key(), timeout_s=args.timeout,
            retry=RetryPolicy(retries=args.retries, backoff_s=args.backoff,
                              max_wait_s=args.max_wait),
            batch_size=args.rank_batch, progress=not args.quiet)
        summary = asyncio.run(run_batch(queries, config))
    except (InputError, UsageError, OSError) as exc:
        _err("batch", str(exc))
        return EXIT_USAGE
    except KeyboardInterrupt:
        _err("batch", f"interrupted; every answer received so far is in {args.output}. "
                      "Rerun the same command to resume.")
        return EXIT_INTERRUPTED
    answered = summary.total - len(summary.failed)
    rate = summary.succeeded / summary.seconds if summary.seconds > 0 else 0.0
    print(f"rankd batch: {answered} of {summary.total} queries answered ({summary.skipped} by "
          f"an earlier run), {len(summary.failed)} failed, {summary.seconds:.1f} s "
          f"({rate:.1f} q/s) -> {summary.output}", file=sys.stderr)
    if args.format in ("eedi", "mcq"):
        path = args.submission or default_submission_path(args.output)
        k, header = (MCQ_K, MCQ_HEADER) if args.format == "mcq" else (SUBMISSION_K,
                                                                       SUBMISSION_HEADER)
        rows = write_submission(path, ordered_records(args.output, queries), k, header)
        print(f"rankd batch: submission {path}: {rows} rows", file=sys.stderr)
    if summary.failed:
        for qid, error in list(summary.failed.items())[:10]:
            _err("batch", f"failed {qid}: {error.get('status') or error.get('code')} "
                          f"{error.get('message')} (after {error.get('attempts')} attempts)")
        more = len(summary.failed) - 10
        _err("batch", (f"... and {more} more; " if more > 0 else "")
             + f"each failure is recorded under 'error' in {summary.output}; rerun the same "
             "command to retry the failed queries")
        return EXIT_FAILED
    return 0


def _add_batch(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "batch", help="rank a file of queries through the service (resumable)",
        description="Rank every query of a file through POST /rank (or /rank/batch) with "
                    "bounded concurrency. Answers are appended to --output as they arrive; "
                    "rerunning with the same --output skips what was answered and retries what "
                    "failed. At the end the output is in input order; for --format eedi a "
                    "submission CSV is written too.")
    _add_query_file(parser, required=True)
    parser.add_argument("--output", required=True, type=Path,
                        help="JSONL: one {id, query, response|error} per query")
    parser.add_argument("--submission", type=Path,
                        help="eedi: the submission CSV (default: OUTPUT with .submission.csv)")
    _add_rank(parser, timeout=120.0)
    parser.add_argument("--concurrency", type=int, default=8,
                        help="requests in flight at once (default 8)")
    parser.add_argument("--rank-batch", type=int, default=0, metavar="N",
                        help="send N queries per POST /rank/batch instead of one per /rank")
    parser.add_argument("--retries", type=int, default=5,
                        help="retries of a connection error, 429 or 503 (default 5)")
    parser.add_argument("--backoff", type=float, default=0.5,
                        help="first backoff in seconds, doubled per retry (default 0.5); "
                             "a Retry-After header overrides it")
    parser.add_argument("--max-wait", type=float, default=30.0,
                        help="longest wait between attempts, Retry-After included (default 30)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(handler=_batch)


# ---------------------------------------------------------------- eval


def _eval(args: argparse.Namespace) -> int:
    from clients.evaluate import evaluate_files, format_report, write_report
    from clients.queries import InputError

    try:
        report = evaluate_files(args.submission, args.labels, args.format, map_k=args.map_k,
                                ks=args.ks, aliases=args.aliases)
        if args.json is not None:
            write_report(report, args.json)
    except (InputError, OSError) as exc:
        _err("eval", str(exc))
        return EXIT_USAGE
    print(format_report(report))
    return 0


def _add_eval(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "eval", help="score a submission: MAP@25, recall@k (and nDCG@10 for jsonl)",
        description="eedi: --submission is the competition CSV (or the batch client's JSONL, "
                    "which can be deeper than 25) and --labels the Eedi train.csv layout (or a "
                    "QuestionId_Answer,MisconceptionId file). jsonl: --labels holds {id, "
                    "relevant: [ids]} lines and --submission {id, ranked: [ids]} lines or the "
                    "batch client's output.")
    parser.add_argument("--submission", required=True, type=Path)
    parser.add_argument("--labels", required=True, type=Path)
    parser.add_argument("--format", required=True, choices=["eedi", "jsonl", "mcq"],
                        help="mcq: --labels is the id,prompt,A..E,answer CSV; reports MAP@3 and "
                             "accuracy")
    parser.add_argument("--map-k", type=int, default=25, help="k of MAP@k (default 25)")
    parser.add_argument("--ks", type=_int_list, default=(1, 5, 10, 25, 50, 100),
                        help="recall cut-offs (default 1,5,10,25,50,100)")
    parser.add_argument("--aliases", type=Path,
                        help="a collection's aliases.json (rankd index build --dedup): a hit on "
                             "a kept entry counts for the ids merged into it. A JSONL "
                             "submission's results carry their aliases already")
    parser.add_argument("--json", type=Path, help="also write the report as JSON")
    parser.set_defaults(handler=_eval)


# ---------------------------------------------------------------- loadtest


def _loadtest(args: argparse.Namespace) -> int:
    from clients.api import DEFAULT_URL, UsageError, is_loopback, normalise_url
    from clients.loadtest import (
        LoadConfig,
        LoadReport,
        format_table,
        run_loadtest,
        write_json,
        write_plot,
    )
    from clients.queries import InputError, sample_queries

    _quiet_http_log()
    report = LoadReport(url="", started_at="", queries=0, options={})
    try:
        url = normalise_url(args.url or DEFAULT_URL)
        if not is_loopback(url) and not args.allow_remote:
            raise UsageError(f"{url} is not a loopback address; a load test drives only "
                             "127.0.0.1/localhost unless --allow-remote says otherwise")
        if args.input is not None:
            if args.format is None:
                raise UsageError("--input needs --format eedi|jsonl|csv")
            queries = _read_query_file(args)
        else:
            queries = sample_queries()
        config = LoadConfig(url=url, rank=_rank_options(args), concurrency=args.concurrency or (),
                            rates=args.rate or (), duration_s=args.duration,
                            requests=args.requests, warmup=args.warmup, api_key=args.api_key or ClientSettings().key(),
                            timeout_s=args.timeout, max_in_flight=args.max_in_flight)
    except (InputError, UsageError, OSError) as exc:
        _err("loadtest", str(exc))
        return EXIT_USAGE

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_sigint() -> None:
            print("\nrankd loadtest: stopping; Ctrl-C again to quit at once", file=sys.stderr)
            stop.set()
            loop.remove_signal_handler(signal.SIGINT)

        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGINT, on_sigint)
        await run_loadtest(queries, config, stop=stop, report=report)

    interrupted = False
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        interrupted = True
        report.interrupted = True
    interrupted = interrupted or report.interrupted
    print(format_table(report))
    try:
        if args.json is not None:
            write_json(report, args.json)
            print(f"report: {args.json}", file=sys.stderr)
        if args.plot is not None and report.levels:
            write_plot(report, args.plot)
            print(f"plot: {args.plot}", file=sys.stderr)
    except (UsageError, OSError) as exc:
        _err("loadtest", str(exc))
        return EXIT_USAGE
    return EXIT_INTERRUPTED if interrupted else 0


def _add_loadtest(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "loadtest", help="drive a running service: closed-loop sweep or open-loop rate",
        description="Closed loop: --concurrency 1,4,16,64 (the default), each level for "
                    "--duration seconds or --requests requests. Open loop: --rate R[,R...] "
                    "requests/s. Queries come from --input or the sample catalogue's query set. "
                    "Ctrl-C stops and prints what was measured.")
    _add_query_file(parser, required=False)
    _add_rank(parser, timeout=30.0)
    parser.add_argument("--allow-remote", action="store_true",
                        help="allow a --url that is not loopback")
    parser.add_argument("--concurrency", type=_int_list,
                        help="closed-loop levels (default 1,4,16,64 unless --rate is given)")
    parser.add_argument("--rate", type=_float_list, help="open-loop arrival rates, requests/s")
    parser.add_argument("--duration", type=float,
                        help="seconds per level (default 10; at most 600)")
    parser.add_argument("--requests", type=int, help="requests per level (at most 100000)")
    parser.add_argument("--warmup", type=int, default=8,
                        help="unmeasured requests before the first level (default 8)")
    parser.add_argument("--max-in-flight", type=int, default=256,
                        help="open loop: outstanding requests before new ones are dropped and "
                             "counted as client_overflow (default 256)")
    parser.add_argument("--json", type=Path, help="write the report as JSON")
    parser.add_argument("--plot", type=Path, help="write a PNG of latency and throughput")
    parser.set_defaults(handler=_loadtest)


def register(sub: argparse._SubParsersAction) -> None:
    _add_batch(sub)
    _add_eval(sub)
    _add_loadtest(sub)
