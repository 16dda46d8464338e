"""Graceful shutdown: SIGTERM while requests are in flight finishes them all, then exits."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.support.apps import free_port


@pytest.mark.slow
async def test_sigterm_during_load_loses_nothing(sample_index: Path, tiny_lm: Path,
                                                 tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "RANKD_INDEX_DIR": str(sample_index), "RANKD_PORT": str(port),
           "RANKD_RERANKER_BACKEND": "transformers", "RANKD_RERANKER_MODEL": str(tiny_lm),
           "RANKD_EMBEDDER_DEVICE": "cpu", "RANKD_RERANKER_BATCH_SIZE": "4", "HF_HUB_OFFLINE": "1"}
    log = (tmp_path / "serve.log").open("w")
    rankd = Path(sys.executable).with_name("rankd")
    server = await asyncio.create_subprocess_exec(str(rankd), "serve", env=env, stdout=log,
                                                  stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(timeout=120,
                                     limits=httpx.Limits(max_connections=64)) as client:
            deadline = time.monotonic() + 120
            while True:
                try:
                    if (await client.get(f"{url}/health")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert server.returncode is None, (tmp_path / "serve.log").read_text()
                assert time.monotonic() < deadline, "rankd did not start"
                await asyncio.sleep(0.2)
            requests = [asyncio.create_task(client.post(f"{url}/rank", json={
                "query": f"negative numbers question {i}", "candidates": 25}))
                for i in range(32)]
            await asyncio.sleep(0.5)  # all 32 are in flight: reranking takes seconds here
            assert not all(r.done() for r in requests)
            server.send_signal(signal.SIGTERM)
            responses = await asyncio.gather(*requests)
        code = await asyncio.wait_for(server.wait(), 60)
    finally:
        if server.returncode is None:
            server.kill()
        log.close()
    assert [r.status_code for r in responses] == [200] * 32
    assert all(r.json()["reranked"] for r in responses)
    # uvicorn drains, runs the lifespan shutdown, then re-raises the signal it caught.
    assert code in (0, -signal.SIGTERM)
    output = (tmp_path / "serve.log").read_text()
    assert "Shutting down" in output
    assert "Application shutdown complete" in output
