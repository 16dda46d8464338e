"""Overload: past the configured queue depth rankd answers 429 with Retry-After, not a queue
without bound, and keeps serving."""

from __future__ import annotations

import asyncio
from typing import Any

from tests.support.apps import app_client, metric_value


async def test_full_queue_answers_429_with_retry_after(settings_factory: Any) -> None:
    settings = settings_factory(embedder_max_queue_depth=4, embedder_batch_size=2,
                                embedder_batch_wait_ms=20)
    async with app_client(settings) as (_, client):
        responses = await asyncio.gather(*(
            client.post("/rank", json={"query": f"fractions question {i}", "top_k": 3})
            for i in range(60)))
        after = await client.post("/rank", json={"query": "still serving"})
        metrics = (await client.get("/metrics")).text
    statuses = [r.status_code for r in responses]
    assert set(statuses) == {200, 429}
    refused = [r for r in responses if r.status_code == 429]
    for response in refused:
        assert response.headers["retry-after"] == "1"
        error = response.json()["error"]
        assert error["code"] == "overloaded"
        assert "limit of 4" in error["message"]
    assert after.status_code == 200
    assert metric_value(metrics, "rankd_overload_rejections_total", stage="search") == len(refused)
    assert metric_value(metrics, "rankd_requests_total", route="/rank", method="POST",
                        status="429") == len(refused)
