"""`rankd train-pipeline` on tiny data, and `rankd serve` of its directory with one setting:
the manifest ties the embedder, its index and the reranker together; a moved directory still
serves; a mismatched embedder and index refuse the start in one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from rankd.cli import main
from retriever.data import SAMPLE_INSTRUCTION, sample_catalog_path, sample_entries
from retriever.index import IndexIntegrityError
from service.pipeline import PIPELINE_FILE
from service.settings import Settings
from tests.retriever.test_training import write_eedi_csv
from tests.support.apps import app_client, serve_in_thread


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory, tiny_lm: Path) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("pipeline")
    data = write_eedi_csv(root / "train.csv", sample_entries())
    output = root / "trained"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RANKD_RERANKER_MODEL", str(tiny_lm))
        env.setenv("RANKD_RERANKER_DTYPE", "float32")
        code = main(["train-pipeline", "--train", str(data), "--format", "eedi", "--catalog",
                     str(sample_catalog_path()), "--output", str(output), "--quiet",
                     "--collection", "misconceptions", "--instruction", SAMPLE_INSTRUCTION,
                     "--validation-fraction", "0.25",
                     "--retriever-args", "--epochs 1 --batch-size 8 --device cpu",
                     "--reranker-args", "--examples 16 --curve-points 0 --device cpu "
                                        "--candidates 5"])
    assert code == 0
    return {"output": output, "manifest": json.loads((output / PIPELINE_FILE).read_text())}


def test_the_manifest_ties_the_stages_together(pipeline: dict[str, Any]) -> None:
    output, manifest = pipeline["output"], pipeline["manifest"]
    assert manifest["status"] == "complete"
    assert manifest["command"].startswith("rankd train-pipeline --train")
    index = manifest["stages"]["index"]
    assert index["collections"] == ["misconceptions"]
    # The index was built with the fine-tuned embedder, read apart from the manifest.
    built = json.loads((output / "index" / "misconceptions" / "manifest.json").read_text())
    assert built["embedder"] == str((output / "retriever").resolve()) == index["embedder"]
    assert built["embedder_sha256"] == index["embedder_sha256"]
    # The reranker trained on that retriever's candidates, on the same split.
    reranker = json.loads((output / "reranker" / "training_report.json").read_text())
    retriever = json.loads((output / "retriever" / "training_report.json").read_text())
    assert reranker["retriever"]["model"] == str(output / "retriever")
    assert reranker["test_groups"] == retriever["test_groups"]
    assert reranker["validation_groups"] == retriever["validation_groups"]
    assert manifest["stages"]["reranker"]["settings"]["candidates"] == 5
    figures = manifest["figures"]
    assert figures["retriever"]["fine_tuned"] == retriever["fine_tuned"]
    assert figures["reranker"]["gain"] == reranker["fine_tuned"]["gain"]
    assert figures["reranker"]["measured_on"] == "test"
    assert set(manifest["seconds"]) == {"retriever", "index", "reranker"}


async def _serve(settings: Settings) -> tuple[dict[str, Any], dict[str, Any]]:
    async with app_client(settings) as (_, client):
        body = (await client.post("/rank", json={"query": "adds the denominators",
                                                 "top_k": 5})).json()
        ready = (await client.get("/ready")).json()
    return body, ready


async def test_one_setting_serves_the_pipeline_and_a_moved_copy(
        pipeline: dict[str, Any], tmp_path: Path) -> None:
    moved = tmp_path / "elsewhere"
    shutil.copytree(pipeline["output"], moved)
    for directory in (pipeline["output"], moved):
        settings = Settings(pipeline_dir=directory, embedder_device="cpu")
        assert settings.index_dir == (directory / "index").resolve()
        assert settings.embedder_model == str((directory / "retriever").resolve())
        assert settings.reranker.model == str((directory / "reranker").resolve())
        body, ready = await _serve(settings)
        assert body["reranked"] is True
        assert sum(r["rerank_score"] is not None for r in body["results"]) == 5  # trained N
        assert ready["status"] == "ready", ready
        assert "served as trained" in ready["components"]["reranker"]["detail"]


def test_the_reported_gain_holds_through_the_service(pipeline: dict[str, Any], tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The pipeline's test questions through `rankd batch` against the real server of its
    directory, reranked and not: every ranking is the one its report computed, so the gain is
    the report's (bench/served_gain.py, as run on Eedi)."""
    from bench.served_gain import main as served_gain

    reranker = pipeline["output"] / "reranker"
    # The dtype the report was evaluated in (the fixture's), also where the CPU has bf16.
    monkeypatch.setenv("RANKD_RERANKER_DTYPE", "float32")
    settings = Settings(pipeline_dir=pipeline["output"], embedder_device="cpu")
    answers = {}
    with serve_in_thread(settings) as url:
        for mode in ("--rerank", "--no-rerank"):
            answers[mode] = tmp_path / f"{mode.strip('-')}.jsonl"
            assert main(["batch", "--url", url, "--quiet", mode, "--top-k", "25",
                         "--input", str(reranker / "test.csv"), "--format", "eedi",
                         "--output", str(answers[mode])]) == 0
    capsys.readouterr()
    assert served_gain([str(reranker), "--served", str(answers["--rerank"]),
                        "--retrieval", str(answers["--no-rerank"])]) == 0
    figures = json.loads(capsys.readouterr().out)
    report = json.loads((reranker / "training_report.json").read_text())
    assert figures["queries"] == report["split"]["evaluated_queries"] > 0
    assert figures["same_top25"] == figures["queries"]
    assert figures["served_map@25"] == figures["reported_map@25"]
    assert figures["served_gain"]["gain"] == pytest.approx(report["fine_tuned"]["gain"]["gain"],
                                                           abs=1e-4)


def test_a_contradicting_setting_refuses_in_one_line(pipeline: dict[str, Any]) -> None:
    with pytest.raises(ValidationError) as refused:
        Settings(pipeline_dir=pipeline["output"], embedder_model="sentence-transformers/"
                                                                 "all-MiniLM-L6-v2")
    (error,) = refused.value.errors()
    assert "RANKD_EMBEDDER_MODEL=sentence-transformers/all-MiniLM-L6-v2 contradicts " \
           "RANKD_PIPELINE_DIR" in error["msg"]
    assert "\n" not in error["msg"]
    with pytest.raises(ValidationError, match=r"holds no rankd_pipeline\.json"):
        Settings(pipeline_dir=pipeline["output"] / "index")


async def test_its_index_refuses_another_embedder(pipeline: dict[str, Any]) -> None:
    settings = Settings(index_dir=pipeline["output"] / "index", embedder_device="cpu")
    with pytest.raises(IndexIntegrityError) as refused:
        await _serve(settings)
    message = str(refused.value)
    assert "was built with embedder" in message
    assert "all-MiniLM-L6-v2" in message
    assert "\n" not in message


@pytest.mark.parametrize("service", ["api-pipeline", "api-pipeline-gpu"])
def test_the_compose_pipeline_services_settings_are_accepted(
        pipeline: dict[str, Any], tmp_path: Path, service: str) -> None:
    """Each pipeline service's settings, its /pipeline mount pointed at a real pipeline (with
    the reranker's 4-bit copy the GPU road serves, as `rankd quantize` marks it)."""
    from tests.deploy.files import compose

    mounted = tmp_path / "pipeline"
    shutil.copytree(pipeline["output"], mounted)
    quantized = mounted / "reranker-w4a16"
    shutil.copytree(mounted / "reranker", quantized)
    carried = json.loads((quantized / "rankd_reranker.json").read_text())
    (quantized / "rankd_reranker.json").write_text(json.dumps(
        {**carried, "quantized": {"source_model": "/pipeline/reranker", "bits": 4}}))
    environment = compose()["services"][service]["environment"]
    fixed = {key.removeprefix("RANKD_").lower(): str(value).replace("/pipeline", str(mounted))
             for key, value in environment.items()
             if key.startswith("RANKD_") and value is not None and "${" not in str(value)}
    reranker = {key.removeprefix("reranker_"): fixed.pop(key) for key in list(fixed)
                if key.startswith("reranker_")}
    settings = Settings(**fixed, reranker=reranker)
    assert settings.index_dir == (mounted / "index").resolve()
    assert settings.embedder_model == str((mounted / "retriever").resolve())
    expected = quantized if service == "api-pipeline-gpu" else mounted / "reranker"
    assert Path(str(settings.reranker.model)).resolve() == expected.resolve()
    # A copy that is not a quantized one of this pipeline's reranker is refused.
    (quantized / "rankd_reranker.json").write_text(json.dumps(carried))
    if service == "api-pipeline-gpu":
        with pytest.raises(ValidationError, match=r"RANKD_RERANKER_MODEL=.* contradicts"):
            Settings(**fixed, reranker=reranker)
