from __future__ import annotations

import json
from pathlib import Path

import pytest

from rankd.cli import main
from retriever import load_collection
from retriever.data import sample_catalog_path
from retriever.sample import ensure_sample_collection


def test_index_build_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["index", "build", "--catalog", str(sample_catalog_path()),
                 "--id-column", "MisconceptionId", "--text-column", "MisconceptionName",
                 "--collection", "sample", "--index-dir", str(tmp_path),
                 "--instruction", "Pick the misconception.", "--quiet"])
    assert code == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["count"] == 66
    assert report["bytes"] > 0
    collection = load_collection(tmp_path / "sample")
    assert collection.manifest.instruction == "Pick the misconception."


def test_index_build_reports_bad_columns(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["index", "build", "--catalog", str(sample_catalog_path()),
                 "--id-column", "Id", "--text-column", "MisconceptionName",
                 "--collection", "sample", "--index-dir", str(tmp_path), "--quiet"])
    assert code == 2
    assert "'Id'" in capsys.readouterr().err
    assert not (tmp_path / "sample").exists()


def test_sample_index_is_built_once(tmp_path: Path) -> None:
    ensure_sample_collection(tmp_path, "all-MiniLM-L6-v2")
    manifest = (tmp_path / "misconceptions" / "manifest.json").read_text()
    ensure_sample_collection(tmp_path, "all-MiniLM-L6-v2")
    assert (tmp_path / "misconceptions" / "manifest.json").read_text() == manifest


def test_serve_refuses_bad_settings(monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("RANKD_MAX_TOP_K", "-3")
    assert main(["serve"]) == 2
    assert "RANKD_MAX_TOP_K" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["index", "build", "--catalog", "x", "--id-column", "a",
                                      "--text-column", "b", "--collection", "c"],
                                     ["eval", "--submission", "s", "--labels", "l",
                                      "--format", "eedi"]])
def test_a_bad_log_level_is_one_line_for_every_command(
        command: list[str], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("RANKD_LOG_LEVEL", "verbose")
    assert main(command) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    assert err.splitlines() == [
        "rankd: invalid configuration:",
        "  RANKD_LOG_LEVEL: Value error, must be one of critical, error, warning, info, debug "
        "(got 'verbose')"]
