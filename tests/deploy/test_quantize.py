"""`rankd quantize`: calibration prompts from a collection, the refusal without llm-compressor,
and, on CPU, a real W4A16 AWQ quantization of the tiny LM that the CPU vLLM then serves to the
real rankd app (flags from the compose file's vllm-cpu service).

llm-compressor pins transformers 5.15-5.17, so the quantization runs in its own venv
(scripts/setup_quant.sh; ``RANKD_QUANT_PYTHON``), from this checkout.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from reranker.cli import build_calibration_tasks
from reranker.labels import LabelAlphabet
from reranker.prompt import PromptRenderer, load_tokenizer
from reranker.quantize import calibration_prompts
from retriever import Embedder, load_collection
from retriever.data import SAMPLE_COLLECTION, SAMPLE_INSTRUCTION, sample_queries_path
from service.cli import main
from service.settings import Settings
from tests.deploy.files import (
    VLLM_CPU_DOCKERFILE,
    compose,
    dockerfile_stages,
    exec_form,
    interpolate,
)
from tests.support.apps import app_client, free_port
from tests.support.tiny_lm import build_tiny_lm
from tests.support.venvs import side_venv_python
from tests.support.vllm_server import VllmServer, vllm_python

REPO = Path(__file__).resolve().parents[2]
QUANT_TIMEOUT_S = 1200


def quant_python() -> str:
    """The llm-compressor venv's python: $RANKD_QUANT_PYTHON, else scripts/setup_quant.sh's."""
    try:
        return side_venv_python("RANKD_QUANT_PYTHON", "setup_quant.sh")
    except RuntimeError as exc:
        pytest.fail(str(exc))


# ------------------------------------------------------------------ calibration prompts


def test_calibration_comes_from_the_collections_own_entries(
        sample_index: Path, embedder: Embedder, tiny_lm: Path) -> None:
    tasks, source = build_calibration_tasks(sample_index, None, None, samples=10, candidates=5,
                                            seed=3)
    assert SAMPLE_COLLECTION in source
    collection = load_collection(sample_index / SAMPLE_COLLECTION)
    texts = {entry.text for entry in collection.entries}
    queries = [task.fields["query"] for task in tasks]
    assert len(tasks) == 10
    assert len(set(queries)) == 10
    assert set(queries) <= texts
    for task in tasks:
        query = task.fields["query"]
        assert task.fields["instruction"] == SAMPLE_INSTRUCTION
        # Its nearest entries, as /rank retrieves them, without the entry itself.
        nearest = [hit.text for hit in collection.search(embedder.encode([query]), 6)[0]]
        assert task.items == [text for text in nearest if text != query][:5]

    again, _ = build_calibration_tasks(sample_index, None, None, 10, 5, seed=3)
    other, _ = build_calibration_tasks(sample_index, None, None, 10, 5, seed=4)
    assert again == tasks
    assert [t.fields["query"] for t in other] != queries

    # Rendered as the reranker renders them: chat template, labelled lines, both orders.
    renderer = PromptRenderer(load_tokenizer(str(tiny_lm)))
    prompts = calibration_prompts(renderer, tasks, LabelAlphabet.UPPER.labels())
    assert len(prompts) == 10
    assert all(p.startswith("<|im_start|>user\n") for p in prompts)
    assert f"A. {tasks[0].items[0]}\n" in prompts[0]
    assert f"A. {tasks[1].items[-1]}\n" in prompts[1]
    assert f"E. {tasks[0].items[4]}\n" in prompts[0]
    assert "F. " not in prompts[0]


def test_calibration_from_a_queries_file(sample_index: Path) -> None:
    file_queries = [json.loads(line)["query"]
                    for line in sample_queries_path().read_text().splitlines() if line.strip()]
    count = len(file_queries) + 4  # more samples than queries: they are reused
    tasks, source = build_calibration_tasks(sample_index, SAMPLE_COLLECTION,
                                            sample_queries_path(), samples=count, candidates=3)
    assert str(sample_queries_path()) in source
    queries = [task.fields["query"] for task in tasks]
    assert len(queries) == count
    assert set(queries) == set(file_queries)
    assert all(len(task.items) == 3 for task in tasks)


def test_quantize_refuses_clearly_without_llmcompressor(
        tmp_path: Path, sample_index: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if importlib.util.find_spec("llmcompressor") is not None:
        pytest.skip("llmcompressor is installed in this venv")
    code = main(["quantize", "--model", str(tmp_path / "model"), "--output",
                 str(tmp_path / "out"), "--index-dir", str(sample_index)])
    assert code == 2
    err = capsys.readouterr().err
    assert "llmcompressor is not installed" in err
    assert "scripts/setup_quant.sh" in err
    assert "rankd[quant]" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_quantize_says_when_a_gpu_is_needed(tmp_path: Path, sample_index: Path) -> None:
    python = quant_python()
    probe = subprocess.run([python, "-c", "import torch; print(torch.cuda.is_available())"],
                           capture_output=True, text=True, timeout=300, check=True)
    if probe.stdout.strip() == "True":
        pytest.skip("a GPU is visible: --device cuda would quantize")
    result = subprocess.run(
        [python, "-m", "service.cli", "quantize", "--model", str(tmp_path / "model"),
         "--output", str(tmp_path / "out"), "--index-dir", str(sample_index)],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 2
    assert "no CUDA GPU is visible" in result.stderr
    assert "--device cpu" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ the real thing, on CPU


class ComposeVllmCpu(VllmServer):
    """The CPU vLLM started as the compose file's `vllm-cpu` service starts it: the image's
    entrypoint and the service's flags, with the model, host and port of this test."""

    def command(self) -> list[str]:
        entrypoint = exec_form(dockerfile_stages(VLLM_CPU_DOCKERFILE)[-1].last("ENTRYPOINT"))
        assert entrypoint[:2] == ["python", "-m"]
        overrides = {"--model": str(self.model), "--host": "127.0.0.1", "--port": str(self.port)}
        args = []
        for item in compose()["services"]["vllm-cpu"]["command"]:
            name, _, _ = item.partition("=")
            args.append(f"{name}={overrides[name]}" if name in overrides else interpolate(item))
        return [self.python, *entrypoint[1:], *args]


async def _scores(settings: Settings, queries: list[str]) -> list[dict[str, float]]:
    """The reranked score of each candidate, per query, from the real app."""
    results = []
    async with app_client(settings) as (_, client):
        for query in queries:
            response = await client.post("/rank", json={"query": query, "top_k": 8,
                                                        "candidates": 8, "debug": True})
            assert response.status_code == 200, response.text
            body: dict[str, Any] = response.json()
            assert body["reranked"] is True, body["warnings"]
            orders = body["debug"]["orders"]
            assert len(orders) == 2
            for order in orders:
                assert abs(sum(order["probabilities"]) - 1) < 1e-4
            results.append({r["id"]: r["score"] for r in body["results"]})
    return results


def _distance(a: list[dict[str, float]], b: list[dict[str, float]]) -> float:
    diffs = [abs(x[key] - y[key]) for x, y in zip(a, b, strict=True) for key in x]
    return sum(diffs) / len(diffs)


@pytest.mark.slow
@pytest.mark.vllm
def test_quantized_tiny_model_ranks_on_cpu_vllm(
        tmp_path: Path, tiny_lm: Path, sample_index: Path,
        settings_factory: Any) -> None:
    output = tmp_path / "tiny-w4a16"
    result = subprocess.run(
        [quant_python(), "-m", "service.cli", "quantize", "--model", str(tiny_lm),
         "--output", str(output), "--index-dir", str(sample_index), "--device", "cpu",
         "--samples", "8", "--candidates", "8", "--max-seq-len", "512"],
        cwd=REPO, capture_output=True, text=True, timeout=QUANT_TIMEOUT_S, check=False,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["device"] == "cpu"
    assert report["calibration_samples"] == 8
    assert report["bits"] == 4
    assert report["group_size"] == 128
    assert "entries of collection" in report["calibration_source"]
    assert json.loads((output / "rankd-quantize.json").read_text()) == report

    # The checkpoint: every decoder Linear packed to int4 in groups of 128, lm_head left as is.
    quant = json.loads((output / "config.json").read_text())["quantization_config"]
    assert quant["quant_method"] == "compressed-tensors"
    assert quant["format"] == "pack-quantized"
    assert quant["ignore"] == ["lm_head"]
    (weights,) = [group["weights"] for group in quant["config_groups"].values()]
    assert (weights["num_bits"], weights["group_size"], weights["strategy"],
            weights["symmetric"]) == (4, 128, "group", False)
    from safetensors import safe_open

    with safe_open(str(output / "model.safetensors"), "pt") as packed, \
            safe_open(str(tiny_lm / "model.safetensors"), "pt") as original:
        projections = [k.removesuffix(".weight") for k in original.keys()  # noqa: SIM118
                       if k.endswith("_proj.weight")]
        assert projections
        packed_bytes = original_bytes = 0
        for name in projections:
            assert f"{name}.weight" not in packed.keys()  # noqa: SIM118
            tensor = packed.get_tensor(f"{name}.weight_packed")
            assert str(tensor.dtype) == "torch.int32"
            scale = packed.get_tensor(f"{name}.weight_scale")
            full = original.get_tensor(f"{name}.weight")
            assert scale.shape == (full.shape[0], full.shape[1] // 128)
            packed_bytes += tensor.numel() * 4
            original_bytes += full.numel() * full.element_size()
        assert packed_bytes * 8 == original_bytes  # 4 of 32 bits
        assert "lm_head.weight" in packed.keys()  # noqa: SIM118

    # vLLM's CPU build serves it with its 4-bit kernel, with the compose file's flags.
    server = ComposeVllmCpu(vllm_python(), output, free_port(), tmp_path / "vllm.log")
    server.start()
    try:
        assert "CPUWNA16LinearKernel" in (tmp_path / "vllm.log").read_text()
        queries = [json.loads(line)["query"]
                   for line in sample_queries_path().read_text().splitlines()[:6]]
        quantized = asyncio.run(_scores(settings_factory(
            reranker_backend="vllm", reranker_model=str(output), vllm_url=server.url), queries))
    finally:
        server.stop()

    # Close to the full-precision model it came from: nearer than a uniform guess, and nearer
    # than another random model of the same shape.
    full = asyncio.run(_scores(settings_factory(reranker_backend="transformers",
                                                reranker_model=str(tiny_lm)), queries))
    other_dir = build_tiny_lm(tmp_path / "other-seed", seed=1)
    other = asyncio.run(_scores(settings_factory(reranker_backend="transformers",
                                                 reranker_model=str(other_dir)), queries))
    uniform = [{key: 1 / len(row) for key in row} for row in full]
    assert set(quantized[0]) == set(full[0])
    print(f"quantize {report['seconds']}s on CPU; mean |score difference| from the full model: "
          f"quantized {_distance(quantized, full):.4f}, uniform {_distance(uniform, full):.4f}, "
          f"other model {_distance(other, full):.4f}")
    assert _distance(quantized, full) < 0.8 * _distance(uniform, full)
    assert _distance(quantized, full) < 0.8 * _distance(other, full)
