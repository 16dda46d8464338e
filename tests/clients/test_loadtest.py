"""rankd loadtest against the real app on a loopback port: a short sweep with its JSON and PNG,
an open-loop level, errors by status, the bounds and Ctrl-C."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clients.loadtest import percentile
from rankd.cli import main
from tests.clients.conftest import MAX_QUERY_CHARS, Server


def test_a_short_sweep_writes_its_table_json_and_plot(
        server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report_path, plot_path = tmp_path / "load.json", tmp_path / "load.png"
    code = main(["loadtest", "--url", server.url, "--no-rerank", "--concurrency", "1,4",
                 "--requests", "12", "--warmup", "2", "--json", str(report_path),
                 "--plot", str(plot_path)])
    assert code == 0
    table = capsys.readouterr().out
    assert "c=1" in table
    assert "c=4" in table
    assert "p99 ms" in table
    report = json.loads(report_path.read_text())
    assert report["url"] == server.url
    assert report["interrupted"] is False
    assert report["queries"] == 36  # the sample catalogue's query set
    assert [level["label"] for level in report["levels"]] == ["c=1", "c=4"]
    for level in report["levels"]:
        assert level["mode"] == "closed"
        assert level["requests"] == 12
        assert level["ok"] == 12
        assert level["errors"] == {}
        assert level["throughput"] == pytest.approx(12 / level["seconds"])
        latency = level["latency_ms"]
        assert 0 < latency["p50"] <= latency["p90"] <= latency["p99"] <= latency["max"]
        server_ms = level["server_ms"]
        assert 0 < server_ms["retrieve"] <= server_ms["total"]
        assert server_ms["rerank"] is None
        assert server_ms["total"] < latency["max"]  # the client also sees the HTTP round trip
    # One request at a time gives the encoder batches of exactly one; four can share a batch.
    assert report["levels"][0]["batch_mean"]["search"] == 1.0
    assert 1.0 <= report["levels"][1]["batch_mean"]["search"] <= 4.0
    png = plot_path.read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    assert len(png) > 10_000


def test_open_loop_sends_at_the_given_rate(server: Server, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    report_path = tmp_path / "open.json"
    assert main(["loadtest", "--url", server.url, "--no-rerank", "--rate", "20", "--duration",
                 "1", "--warmup", "0", "--json", str(report_path)]) == 0
    assert "rate=20/s" in capsys.readouterr().out
    (level,) = json.loads(report_path.read_text())["levels"]
    assert level["mode"] == "open"
    assert level["rate"] == 20
    assert level["concurrency"] is None
    assert level["requests"] == 20
    assert level["ok"] == 20
    assert level["seconds"] >= 19 / 20  # the last request leaves 0.95 s after the first


def test_errors_are_counted_by_status(server: Server, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    queries = tmp_path / "q.jsonl"
    queries.write_text(json.dumps({"id": "ok", "query": "What is 7 to the power 0?"}) + "\n"
                       + json.dumps({"id": "long", "query": "x" * (MAX_QUERY_CHARS + 1)}) + "\n",
                       encoding="utf-8")
    report_path = tmp_path / "errors.json"
    assert main(["loadtest", "--url", server.url, "--no-rerank", "--input", str(queries),
                 "--format", "jsonl", "--concurrency", "1", "--requests", "10", "--warmup",
                 "0", "--json", str(report_path)]) == 0
    (level,) = json.loads(report_path.read_text())["levels"]
    assert level["ok"] == 5
    assert level["errors"] == {"422": 5}
    assert "422:5" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--url", "http://10.1.2.3:8000"], "not a loopback address"),
        (["--duration", "601"], "--duration must be in (0, 600]"),
        (["--requests", "100001"], "--requests must be 1..100000"),
        (["--concurrency", "0,4"], "--concurrency values must be 1..1024"),
        (["--rate", "-1"], "--rate values must be in"),
        (["--input", "q.jsonl"], "--input needs --format"),
    ],
)
def test_out_of_bounds_options_are_refused(args: list[str], message: str,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["loadtest", *args]) == 2
    assert message in capsys.readouterr().err


def test_ctrl_c_prints_what_was_measured(server: Server, tmp_path: Path) -> None:
    report_path = tmp_path / "partial.json"
    before = server.rank_requests()
    process = subprocess.Popen(
        [sys.executable, "-m", "rankd.cli", "loadtest", "--url", server.url, "--no-rerank",
         "--concurrency", "2,8", "--duration", "120", "--warmup", "0", "--json",
         str(report_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while server.rank_requests() < before + 5:  # the first level is under way
            assert process.poll() is None
            assert time.monotonic() < deadline
            time.sleep(0.2)
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, err
    assert "c=2 (partial)" in out
    assert "c=8" not in out
    assert "interrupted" in out
    report = json.loads(report_path.read_text())
    assert report["interrupted"] is True
    (level,) = report["levels"]
    assert level["interrupted"] is True
    assert level["ok"] >= 4


def test_percentile_interpolates_between_ranks() -> None:
    values = [10.0, 20.0, 30.0, 40.0]
    assert percentile(values, 50) == 25.0
    assert percentile(values, 0) == 10.0
    assert percentile(values, 100) == 40.0
    assert percentile(values, 90) == pytest.approx(37.0)
