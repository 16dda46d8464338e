"""rankd on Ray Serve, for real: a local Ray on loopback, deploy/ray/serve.yaml deployed with
`serve run` (2 reranker replicas), concurrent /rank requests through Serve's HTTP proxy, and
the answers compared with the single-process app's. Ray is stopped at the end."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import ray
import yaml
from ray import serve

from rankd.devtools.ports import free_port
from tests.support.apps import app_client

CONFIG = Path(__file__).resolve().parents[2] / "deploy" / "ray" / "serve.yaml"
QUERIES = ["What is 7 to the power 0? I said 0", "the median of unordered data",
           "Calculate 1/2 + 1/3. Incorrect answer: 2/5", "Work out -4 x -3. I said -12",
           "area of a triangle, forgot to halve", "Round 3.456 to one decimal place. I said 3.4",
           "Simplify 6/8. I said 3/8", "Solve 2x + 3 = 7. I said x = 5"]


def test_the_config_file_is_a_valid_serve_config_of_build_app() -> None:
    from ray.serve.schema import ServeDeploySchema

    from service import ray_app

    config = ServeDeploySchema.model_validate(yaml.safe_load(CONFIG.read_text()))
    (app,) = config.applications
    assert app.import_path == "service.ray_app:build_app"
    names = {d.name for d in app.deployments}
    assert names == {ray_app.RankdIngress.name, ray_app.Retrieval.name, ray_app.Reranker.name}
    for deployment in app.deployments:
        scaling = deployment.autoscaling_config
        assert isinstance(scaling, dict)
        assert scaling["min_replicas"] <= scaling["max_replicas"]
        assert scaling["target_ongoing_requests"] > 0


def _test_config(tmp_path: Path, port: int, settings: dict[str, Any]) -> Path:
    config = yaml.safe_load(CONFIG.read_text())
    config["http_options"] = {"host": "127.0.0.1", "port": port}
    config["proxy_location"] = "HeadOnly"
    (app,) = config["applications"]
    app["args"]["settings"] = settings
    for deployment in app["deployments"]:
        deployment["ray_actor_options"]["num_cpus"] = 0  # 2 cores hold all replicas
        deployment.pop("autoscaling_config")
        deployment["num_replicas"] = 2 if deployment["name"] == "Reranker" else 1
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


async def _rank_all(client: httpx.AsyncClient) -> list[dict[str, Any]]:
    responses = await asyncio.gather(*[
        client.post("/rank", json={"query": q, "top_k": 8, "candidates": 8, "debug": True})
        for q in QUERIES])
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    return [r.json() for r in responses]


@pytest.mark.slow
async def test_ray_serve_answers_as_the_single_process_app(tmp_path: Path, sample_index: Path,
                                                           tiny_lm: Path,
                                                           settings_factory: Any) -> None:
    # float32 on both sides, as settings_factory pins it: with dtype auto a bf16 CPU would
    # compute the replicas' scores in bf16, whose sums depend on how requests are batched.
    settings = {"index_dir": str(sample_index), "embedder_device": "cpu",
                "reranker": {"backend": "transformers", "model": str(tiny_lm),
                             "dtype": "float32"}}
    async with app_client(settings_factory(reranker_backend="transformers",
                                           reranker_model=str(tiny_lm))) as (_, client):
        expected = await _rank_all(client)

    port = free_port()
    config = _test_config(tmp_path, port, settings)
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"  # nothing leaves this machine
    ray.init(address="local", namespace="serve", num_cpus=2, include_dashboard=False,
             _node_ip_address="127.0.0.1", log_to_driver=False)
    try:
        command = [str(Path(sys.executable).parent / "serve"), "run", "--non-blocking",
                   "--address", ray.get_runtime_context().gcs_address, str(config)]
        deployed = await asyncio.to_thread(subprocess.run, command, timeout=300,
                                           capture_output=True, text=True)
        assert deployed.returncode == 0, deployed.stderr[-3000:]
        base = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient(base_url=base, timeout=120) as client:
            deadline = time.monotonic() + 300
            while True:
                try:
                    ready = await client.get("/ready")
                    if ready.status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "the Serve application never became ready"
                await asyncio.sleep(1)
            assert ready.json()["components"]["reranker"]["detail"].startswith(
                "backend ray-serve (transformers)")
            replicas = serve.status().applications["rankd"].deployments["Reranker"]
            assert replicas.replica_states == {"RUNNING": 2}
            got = await _rank_all(client)
            # A bad request gets the same 4xx through Serve's proxy as from the app.
            bad = await client.post("/rank", json={"query": "x", "top_k": 10_000})
        assert bad.status_code == 422
        assert bad.json()["error"]["field"] == "top_k"
    finally:
        serve.shutdown()
        ray.shutdown()
    for want, have in zip(expected, got, strict=True):
        assert have["reranked"]
        assert want["reranked"]
        assert [r["id"] for r in have["results"]] == [r["id"] for r in want["results"]]
        for a, b in zip(have["results"], want["results"], strict=True):
            assert a["score"] == pytest.approx(b["score"], abs=1e-5)
            assert a["rerank_score"] == pytest.approx(b["rerank_score"], abs=1e-5)
        assert [o["prompt"] for o in have["debug"]["orders"]] == \
            [o["prompt"] for o in want["debug"]["orders"]]
