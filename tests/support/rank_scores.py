"""Rerank scores from the real app, run by any python that has rankd's dependencies, from this
checkout: ``python -m tests.support.rank_scores SETTINGS_JSON QUERIES_JSON`` prints, as JSON, one
``{candidate id: reranked score}`` per query. The tests use it to score a checkpoint in an
environment other than theirs (the llm-compressor venv reads compressed-tensors checkpoints)."""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

from service.settings import Settings
from tests.support.apps import app_client


async def rank_scores(settings: Settings, queries: list[str], candidates: int = 8
                      ) -> list[dict[str, float]]:
    """Each candidate's mean label probability over the orders, per query (fusion off)."""
    results = []
    async with app_client(settings) as (_, client):
        for query in queries:
            response = await client.post("/rank", json={
                "query": query, "top_k": candidates, "candidates": candidates, "debug": True,
                "fusion": "none"})
            body: dict[str, Any] = response.json()
            if response.status_code != 200 or not body["reranked"]:
                raise RuntimeError(f"/rank answered {response.status_code}: {body}")
            for order in body["debug"]["orders"]:
                if abs(sum(order["probabilities"]) - 1) > 1e-4:
                    raise RuntimeError(f"label probabilities do not sum to 1: {order}")
            results.append({r["id"]: r["rerank_score"] for r in body["results"]})
    return results


if __name__ == "__main__":
    overrides, query_list = json.loads(sys.argv[1]), json.loads(sys.argv[2])
    print(json.dumps(asyncio.run(rank_scores(Settings(**overrides), query_list))))
