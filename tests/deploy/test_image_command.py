"""What the containers run, run on the host: the index step (docker/index-init.sh, the compose
`index` service) and then the API image's exact CMD with the image's environment, read from
docker/Dockerfile, answering /health and /rank; and the image's HEALTHCHECK command against it."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from retriever import Embedder, load_collection
from retriever.data import (
    SAMPLE_COLLECTION,
    SAMPLE_ID_COLUMN,
    SAMPLE_INSTRUCTION,
    SAMPLE_TEXT_COLUMN,
    sample_catalog_path,
)
from tests.deploy.files import (
    INDEX_INIT,
    REPO,
    dockerfile_stages,
    exec_form,
    healthcheck,
    stage_env,
)
from tests.support.apps import free_port

pytestmark = pytest.mark.slow

START_TIMEOUT_S = 180.0
# The image's variables that only make sense inside the image (its own paths).
CONTAINER_ONLY = {"PATH", "HF_HOME"}


def _host_env(**overrides: str) -> dict[str, str]:
    """A clean environment whose PATH finds this venv's `rankd` and `python` first, as the
    image's PATH finds /opt/rankd/bin."""
    env = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "HOME": os.environ.get("HOME", "/root"), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    for key in ("HF_HOME", "TMPDIR"):
        if key in os.environ:
            env[key] = os.environ[key]
    env.update(overrides)
    return env


def _index_init(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(INDEX_INIT)], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=600, check=False)


@contextlib.contextmanager
def _run_image_command(index_dir: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """The runtime stage's CMD, with its ENV, bound to loopback on a free port."""
    runtime = dockerfile_stages()[-1]
    command = exec_form(runtime.last("CMD"))
    image_env = {k: v for k, v in stage_env(runtime).items() if k not in CONTAINER_ONLY}
    assert image_env["RANKD_HOST"] == "0.0.0.0"  # inside the container; loopback here
    port = free_port()
    env = _host_env(**{**image_env, "RANKD_HOST": "127.0.0.1", "RANKD_PORT": str(port),
                       "RANKD_INDEX_DIR": str(index_dir)})
    log = index_dir.parent / "serve.log"
    with log.open("wb") as out:
        process = subprocess.Popen(command, env=env, cwd=index_dir.parent, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"{command} exited with {process.returncode}:\n{log.read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                pytest.fail(f"{command} did not answer /health in {START_TIMEOUT_S:.0f}s:\n"
                            f"{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url, env
        # Graceful stop, as `docker stop` does it. uvicorn finishes its shutdown, then re-raises
        # the signal, so the exit status is the signal's.
        os.killpg(process.pid, signal.SIGTERM)
        assert process.wait(timeout=40) in (0, -signal.SIGTERM), log.read_text()[-3000:]
        assert "Application shutdown complete" in log.read_text()
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


def test_index_step_then_the_image_command(tmp_path: Path, embedder: Embedder) -> None:
    index_dir = tmp_path / "index"
    # The compose `index` service with no catalogue configured: the embedded sample.
    first = _index_init(_host_env(RANKD_INDEX_DIR=str(index_dir)))
    assert first.returncode == 0, first.stdout + first.stderr
    assert "sample collection ready" in first.stdout
    collection = load_collection(index_dir / SAMPLE_COLLECTION, embedder.name, embedder.dimension)
    assert collection.manifest.instruction == SAMPLE_INSTRUCTION

    query = "Work out 2/3 divided by 4/5. Incorrect answer: 12/10"
    expected = [hit.id for hit in collection.search(embedder.encode([query]), 3)[0]]
    with _run_image_command(index_dir) as (url, env):
        health = httpx.get(f"{url}/health", timeout=10)
        assert health.status_code == 200
        assert health.json() == {"status": "ok"}
        response = httpx.post(f"{url}/rank", json={"query": query, "top_k": 3, "rerank": False},
                              timeout=60)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["collection"] == SAMPLE_COLLECTION
        # The served ranking is the library's own search over the index the step built.
        assert [r["id"] for r in body["results"]] == expected
        # The image's default reranker: the embedded SmolLM2, in process.
        nearest = [hit.id for hit in collection.search(embedder.encode([query]), 5)[0]]
        reranked = httpx.post(f"{url}/rank", json={"query": query, "top_k": 5, "candidates": 5},
                              timeout=120).json()
        assert reranked["reranked"] is True, reranked["warnings"]
        assert sorted(r["id"] for r in reranked["results"]) == sorted(nearest)
        ready = httpx.get(f"{url}/ready", timeout=10).json()
        assert ready["components"][f"collection:{SAMPLE_COLLECTION}"]["status"] == "ok"
        assert ready["components"]["reranker"]["status"] == "ok"
        assert "smollm2-135m-instruct" in ready["components"]["reranker"]["detail"]

        # The image's HEALTHCHECK command passes against it, and fails on a dead port.
        _, check = healthcheck(dockerfile_stages()[-1])
        passed = subprocess.run(check, env=env, capture_output=True, text=True, timeout=30,
                                check=False)
        assert passed.returncode == 0, passed.stderr
        dead = subprocess.run(check, env={**env, "RANKD_PORT": str(free_port())},
                              capture_output=True, text=True, timeout=30, check=False)
        assert dead.returncode != 0


def test_index_step_builds_a_mounted_catalogue_once(tmp_path: Path) -> None:
    catalog_dir = tmp_path / "catalog"
    catalog_dir.mkdir()
    catalog = catalog_dir / "maths.csv"
    shutil.copy(sample_catalog_path(), catalog)
    index_dir = tmp_path / "index"
    env = _host_env(RANKD_INDEX_DIR=str(index_dir), RANKD_CATALOG_FILE=str(catalog),
                    RANKD_CATALOG_ID_COLUMN=SAMPLE_ID_COLUMN,
                    RANKD_CATALOG_TEXT_COLUMN=SAMPLE_TEXT_COLUMN,
                    RANKD_CATALOG_INSTRUCTION="Pick the misconception.")

    missing_column = _index_init({k: v for k, v in env.items() if k != "RANKD_CATALOG_TEXT_COLUMN"})
    assert missing_column.returncode != 0
    assert "RANKD_CATALOG_TEXT_COLUMN" in missing_column.stderr
    missing_file = _index_init({**env, "RANKD_CATALOG_FILE": str(catalog_dir / "nope.csv")})
    assert missing_file.returncode == 2
    assert "nope.csv" in missing_file.stderr
    assert not index_dir.exists()

    built = _index_init(env)
    assert built.returncode == 0, built.stdout + built.stderr
    report = json.loads(built.stdout.strip().splitlines()[-1])
    assert report["collection"] == "maths"  # named after the file
    manifest = (index_dir / "maths" / "manifest.json").read_text()
    assert json.loads(manifest)["instruction"] == "Pick the misconception."
    assert json.loads(manifest)["count"] == report["count"] > 0

    again = _index_init(env)
    assert again.returncode == 0, again.stderr
    assert "nothing to do" in again.stdout
    assert (index_dir / "maths" / "manifest.json").read_text() == manifest


def test_index_step_builds_into_milvus(tmp_path: Path) -> None:
    catalog = tmp_path / "maths.csv"
    shutil.copy(sample_catalog_path(), catalog)
    index_dir = tmp_path / "index"
    env = _host_env(RANKD_INDEX_DIR=str(index_dir), RANKD_CATALOG_FILE=str(catalog),
                    RANKD_CATALOG_ID_COLUMN=SAMPLE_ID_COLUMN,
                    RANKD_CATALOG_TEXT_COLUMN=SAMPLE_TEXT_COLUMN,
                    RANKD_CATALOG_BACKEND="milvus",
                    RANKD_MILVUS_URI=str(tmp_path / "milvus.db"))
    built = _index_init(env)
    assert built.returncode == 0, built.stdout + built.stderr
    report = json.loads(built.stdout.strip().splitlines()[-1])
    assert report["backend"] == "milvus"
    assert report["location"]["uri"] == str((tmp_path / "milvus.db").resolve())
    collection = load_collection(index_dir / "maths")
    try:
        assert len(collection) == report["count"] > 0
    finally:
        collection.close()
