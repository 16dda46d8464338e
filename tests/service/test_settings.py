from __future__ import annotations

import re
from pathlib import Path

import pytest

from runtime.settings import SettingsError
from service.settings import Settings, load_settings


def test_reads_the_rankd_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANKD_PORT", "9123")
    monkeypatch.setenv("RANKD_MAX_TOP_K", "7")
    settings = load_settings()
    assert settings.port == 9123
    assert settings.max_top_k == 7


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("RANKD_PORT", "99999", "RANKD_PORT"),
        ("RANKD_MAX_TOP_K", "zero", "RANKD_MAX_TOP_K"),
        ("RANKD_LOG_LEVEL", "chatty", "RANKD_LOG_LEVEL"),
        ("RANKD_RERANKER_LABEL_ALPHABET", "greek", "RANKD_RERANKER_LABEL_ALPHABET"),
        ("RANKD_RERANKER_RANK_TEMPLATE", "{query} {nope} {items}", "RANKD_RERANKER_RANK_TEMPLATE"),
        ("RANKD_DEFAULT_CANDIDATES", "500", "RANKD_DEFAULT_CANDIDATES"),
        ("RANKD_RERANKER_ORDERS", "0", "RANKD_RERANKER_ORDERS"),
        ("RANKD_RERANKER_ORDERS", "53", "RANKD_RERANKER_ORDERS"),
        ("RANKD_RERANKER_FUSION", "borda", "RANKD_RERANKER_FUSION"),
        ("RANKD_RERANKER_FUSION_WEIGHT", "1.5", "RANKD_RERANKER_FUSION_WEIGHT"),
    ],
)
def test_invalid_values_fail_fast_naming_the_variable(monkeypatch: pytest.MonkeyPatch,
                                                      variable: str, value: str,
                                                      message: str) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError) as info:
        load_settings()
    assert message in str(info.value)


def test_settings_are_immutable() -> None:
    settings = Settings()
    with pytest.raises(Exception, match="frozen"):
        settings.port = 1  # type: ignore[misc]


def test_the_configuration_page_is_current() -> None:
    from pathlib import Path

    from service.settings_doc import configuration_page

    page = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
    assert page.read_text(encoding="utf-8") == configuration_page(), \
        "regenerate with `python -m service.settings_doc > docs/configuration.md`"


REPO = Path(__file__).resolve().parents[2]


# RANKD_ names that no settings model binds, each with the one file that reads it: the compose
# file and the images' scripts (deployment), the setup scripts and the test harness.
READ_ELSEWHERE = {
    **dict.fromkeys(["RANKD_IMAGE_TAG", "RANKD_LLM_MODEL", "RANKD_MODELS_DIR",
                     "RANKD_PUBLISH_PORT", "RANKD_VLLM_GPUS", "RANKD_VLLM_GPU_MEMORY_UTILIZATION",
                     "RANKD_VLLM_MAX_LOGPROBS", "RANKD_VLLM_MAX_MODEL_LEN",
                     "RANKD_VLLM_TENSOR_PARALLEL_SIZE", "RANKD_CPU_KVCACHE_GB",
                     "RANKD_CPU_LLM_MODEL", "RANKD_CPU_RERANKER_BACKEND",
                     "RANKD_CPU_VLLM_MAX_MODEL_LEN", "RANKD_PIPELINE_HOST_DIR"],
                    "docker-compose.yml"),
    **dict.fromkeys(["RANKD_CATALOG_DIR"], "docker-compose.yml"),
    **dict.fromkeys(["RANKD_CATALOG_FILE", "RANKD_CATALOG_ID_COLUMN", "RANKD_CATALOG_TEXT_COLUMN",
                     "RANKD_CATALOG_COLLECTION", "RANKD_CATALOG_INSTRUCTION",
                     "RANKD_CATALOG_INDEX_TYPE", "RANKD_CATALOG_DEDUP",
                     "RANKD_CATALOG_BACKEND"], "docker/index-init.sh"),
    **dict.fromkeys(["RANKD_CPU_VLLM_DTYPE", "RANKD_CPUINFO"], "docker/vllm-cpu-entrypoint.sh"),
    "RANKD_TORCH_SPEC": "scripts/bootstrap.sh",
    "RANKD_VLLM_VENV": "scripts/setup_vllm_cpu.sh",
    "RANKD_QUANT_VENV": "scripts/setup_quant.sh",
    "RANKD_LLAMA_CPP_VENV": "scripts/setup_llama_cpp.sh",
    "RANKD_QUANT_PYTHON": "scripts/test.sh",
    "RANKD_INFINITY_VENV": "scripts/setup_infinity.sh",
    "RANKD_INFINITY_PYTHON": "bench/retrieval.py",
    "RANKD_FUZZ_EXAMPLES": "tests/service/test_fuzz.py",
    "RANKD_SOAK_REQUESTS": "tests/service/test_soak.py",
}
# Where RANKD_ names are written for people: a documented name that binds nothing is a claim
# the code contradicts.
DOCUMENTED = ["README.md", "docs/*.md", ".env.example", "docker-compose.yml",
              "deploy/kubernetes/*.yaml", "docker/*.sh", "docker/Dockerfile*"]
_NAME = re.compile(r"\bRANKD_[A-Z0-9]+(?:_[A-Z0-9]+)*\b")


def test_every_documented_name_binds_and_every_bound_name_is_documented() -> None:
    from service.settings_doc import all_env_names

    bound = set(all_env_names())
    written: dict[str, set[str]] = {}
    for pattern in DOCUMENTED:
        for path in sorted(REPO.glob(pattern)):
            for name in _NAME.findall(path.read_text(encoding="utf-8")):
                written.setdefault(name, set()).add(str(path.relative_to(REPO)))
    stray = {name: sorted(where) for name, where in written.items()
             if name not in bound and name not in READ_ELSEWHERE
             and not name.endswith("_X")}  # RANKD_X: a placeholder in examples
    assert not stray, f"documented but bound by no setting: {stray}"
    for name, home in READ_ELSEWHERE.items():
        assert name in (REPO / home).read_text(encoding="utf-8"), f"{name} is not read by {home}"
    env_example = (REPO / ".env.example").read_text(encoding="utf-8")
    configuration = (REPO / "docs" / "configuration.md").read_text(encoding="utf-8")
    # The compose file or the image sets these itself; RANKD_VLLM_PYTHON is `rankd
    # quantize`'s, not the service's.
    not_in_env_example = {"RANKD_INDEX_DIR", "RANKD_HOST", "RANKD_PORT", "RANKD_RERANKER_BACKEND",
                          "RANKD_RERANKER_MODEL", "RANKD_RERANKER_VLLM_URL", "RANKD_VLLM_PYTHON"}
    deployment = ((REPO / "docker-compose.yml").read_text(encoding="utf-8")
                  + (REPO / "docker" / "Dockerfile").read_text(encoding="utf-8"))
    for name in bound:
        assert f"`{name}`" in configuration, f"{name} is missing from docs/configuration.md"
        if name in not_in_env_example:
            assert name == "RANKD_VLLM_PYTHON" or name in deployment, name
        else:
            assert f"{name}=" in env_example, f"{name} is missing from .env.example"
