"""docker-compose.yml, checked statically: Debian's docker-compose v1 validates it (no Docker
engine runs here), and its YAML is read for what a GPU deployment of rankd needs."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from service.settings_doc import env_names
from tests.deploy.files import (
    COMPOSE,
    ENV_EXAMPLE,
    REPO,
    compose,
    dockerfile_stages,
    env_example_names,
    healthcheck,
    interpolate,
    stage_env,
    substitution_defaults,
)

LONG_RUNNING = ["vllm", "api", "vllm-cpu", "api-cpu", "api-pipeline", "vllm-pipeline",
                "api-pipeline-gpu"]
# Set per service by docker-compose.yml (or the image), not passed through from .env.
FIXED_SETTINGS = {"RANKD_HOST", "RANKD_PORT", "RANKD_INDEX_DIR", "RANKD_RERANKER_BACKEND",
                  "RANKD_RERANKER_MODEL", "RANKD_RERANKER_VLLM_URL", "RANKD_PIPELINE_DIR"}


def _docker_compose(*args: str) -> subprocess.CompletedProcess[str]:
    executable = shutil.which("docker-compose")
    if executable is None:
        pytest.fail("docker-compose is not installed; scripts/test.sh installs Debian's "
                    "docker-compose v1 with apt-get (apt-get install docker-compose)")
    return subprocess.run([executable, "-f", str(COMPOSE), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120, check=False,
                          env={"PATH": "/usr/bin:/bin:/usr/local/bin"})


def _services() -> dict[str, dict[str, Any]]:
    services = compose()["services"]
    assert isinstance(services, dict)
    return services


def _flags(command: list[str]) -> dict[str, str]:
    """``--name=value`` and bare ``--name`` flags of a command list, defaults substituted."""
    flags = {}
    for item in command:
        item = interpolate(item)
        if item.startswith("--"):
            name, _, value = item.partition("=")
            flags[name] = value
    return flags


def test_compose_file_validates_with_docker_compose_v1() -> None:
    result = _docker_compose("config", "-q")
    assert result.returncode == 0, result.stderr


def test_compose_file_validates_with_the_example_env_file() -> None:
    result = _docker_compose("--env-file", str(ENV_EXAMPLE), "config")
    assert result.returncode == 0, result.stderr
    # The example's values reach the services: the model it names is the one vLLM serves.
    assert "Qwen/Qwen2.5-7B-Instruct-AWQ" in result.stdout


def test_compose_file_rejects_a_broken_file(tmp_path: Path) -> None:
    """The validator is real: the same file with a typo in a depends_on condition fails."""
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE.read_text().replace("service_healthy", "service_happy"))
    executable = shutil.which("docker-compose")
    if executable is None:
        pytest.fail("docker-compose is not installed (apt-get install docker-compose)")
    result = subprocess.run([executable, "-f", str(broken), "config", "-q"], cwd=REPO,
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode != 0
    assert "service_happy" in result.stderr


def test_vllm_runs_a_pinned_image_on_a_reserved_gpu() -> None:
    vllm = _services()["vllm"]
    image = vllm["image"]
    assert re.fullmatch(r"vllm/vllm-openai:v\d+\.\d+\.\d+", image), image
    devices = vllm["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", [])
               for d in devices)
    assert "profiles" not in vllm, "the GPU services run on a plain `docker compose up`"


def test_vllm_flags_are_those_the_reranker_needs() -> None:
    command = _services()["vllm"]["command"]
    flags = _flags(command)
    # 52 labels with RANKD_RERANKER_LABEL_ALPHABET=upper_lower.
    assert int(flags["--max-logprobs"]) >= 52
    assert "--enable-prefix-caching" in flags
    assert flags["--generation-config"] == "vllm"
    assert int(flags["--max-model-len"]) >= 4096
    assert 0 < float(flags["--gpu-memory-utilization"]) < 1
    assert "--quantization" not in flags, "quantization is detected from the model"
    model = interpolate(command[0])
    assert model == "Qwen/Qwen2.5-7B-Instruct-AWQ"
    assert substitution_defaults(command[0]) == {"RANKD_LLM_MODEL": model}


def test_hugging_face_cache_and_token() -> None:
    services = _services()
    for name in ("vllm", "vllm-cpu", "api", "api-cpu", "index"):
        service = services[name]
        assert "HF_TOKEN" in service["environment"], name
        assert service["environment"]["HF_TOKEN"] is None, f"{name}: HF_TOKEN only passed through"
        assert any("/.cache/huggingface" in volume for volume in service["volumes"]), name


def test_long_running_services_have_healthchecks() -> None:
    services = _services()
    for name in LONG_RUNNING:
        check = services[name].get("healthcheck")
        assert check, f"{name} has no healthcheck"
        assert check["test"][0] == "CMD"
        assert any("/health" in part for part in check["test"]), name


def test_api_healthcheck_is_the_images() -> None:
    _, image_check = healthcheck(dockerfile_stages()[-1])
    for name in ("api", "api-cpu"):
        assert _services()[name]["healthcheck"]["test"] == ["CMD", *image_check]


def test_api_waits_for_a_healthy_vllm_and_a_built_index() -> None:
    services = _services()
    api = services["api"]
    assert api["depends_on"]["vllm"]["condition"] == "service_healthy"
    assert api["depends_on"]["index"]["condition"] == "service_completed_successfully"
    assert services["api-cpu"]["depends_on"]["index"]["condition"] == \
        "service_completed_successfully"
    assert services["index"]["restart"] == "no"


def test_api_is_configured_for_the_vllm_service() -> None:
    services = _services()
    api = services["api"]
    env = api["environment"]
    assert env["RANKD_RERANKER_BACKEND"] == "vllm"
    assert env["RANKD_RERANKER_VLLM_URL"] == "http://vllm:8000"
    # The api renders prompts with the tokenizer of the very model vLLM serves.
    assert env["RANKD_RERANKER_MODEL"] == services["vllm"]["command"][0]
    assert api["build"]["dockerfile"] == "docker/Dockerfile"
    assert any(port.endswith(":8000") for port in api["ports"])
    image_env = stage_env(dockerfile_stages()[-1])
    assert image_env["RANKD_PORT"] == "8000"
    assert "index:/data/index:ro" in api["volumes"]
    assert image_env["RANKD_INDEX_DIR"] == "/data/index"
    assert "index:/data/index" in services["index"]["volumes"]
    assert "index" in compose()["volumes"]


def test_cpu_profile_runs_retrieval_only_or_cpu_vllm() -> None:
    services = _services()
    for name in ("api-cpu", "vllm-cpu"):
        assert services[name]["profiles"] == ["cpu"]
        assert "deploy" not in services[name], f"{name} must not reserve a GPU"
    api_cpu = services["api-cpu"]["environment"]
    assert interpolate(api_cpu["RANKD_RERANKER_BACKEND"]) == "none"
    assert interpolate(api_cpu["RANKD_RERANKER_BACKEND"],
                       {"RANKD_CPU_RERANKER_BACKEND": "vllm"}) == "vllm"
    assert api_cpu["RANKD_RERANKER_VLLM_URL"] == "http://vllm-cpu:8000"
    assert api_cpu["RANKD_RERANKER_MODEL"] == \
        services["vllm-cpu"]["command"][0].removeprefix("--model=")
    flags = _flags(services["vllm-cpu"]["command"])
    assert int(flags["--max-logprobs"]) >= 52
    assert "--enable-prefix-caching" in flags
    assert flags["--generation-config"] == "vllm"
    assert services["vllm-cpu"]["build"]["dockerfile"] == "docker/Dockerfile.vllm-cpu"


def test_every_rankd_setting_reaches_the_api() -> None:
    """A setting in service/settings.py is either passed through from the environment or set
    by the compose file; and .env.example lists it."""
    services = _services()
    listed = env_example_names()
    for env_name in env_names():
        for name in ("api", "api-cpu"):
            env = services[name]["environment"]
            assert env_name in env or env_name in FIXED_SETTINGS, \
                f"{env_name} is not passed to {name}: add `{env_name}:` to x-rankd-settings"
        assert env_name in listed or env_name in ENV_EXAMPLE.read_text(), \
            f"{env_name} is missing from .env.example"


def test_env_example_lists_every_compose_variable_with_its_default() -> None:
    defaults = substitution_defaults(COMPOSE.read_text())
    listed = env_example_names()
    for name, default in defaults.items():
        assert name in listed, f"{name} (used in docker-compose.yml) is missing from .env.example"
        value = listed[name]
        if value is not None and default is not None:
            assert value == default, f".env.example sets {name}={value}, the compose default is {default}"
    for secret in ("HF_TOKEN", "RANKD_API_KEY"):
        assert listed.get(secret, "unset") is None, f"{secret} must stay commented out"


def test_no_secret_values_in_the_compose_file() -> None:
    text = COMPOSE.read_text()
    assert not re.search(r"(HF_TOKEN|RANKD_API_KEY)[ \t]*[:=][ \t]*[^\s#]", text), \
        "secrets come only from the environment"
    assert ".env" in (REPO / ".gitignore").read_text().split()
