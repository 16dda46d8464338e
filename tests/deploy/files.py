"""Readers for the deployment files: the Dockerfile's final stage, docker-compose.yml with its
${VAR:-default} substitutions, .env.example and .dockerignore."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from rankd.devtools.dockerfile import SUBSTITUTION, Stage, exec_form, stage_env
from rankd.devtools.dockerfile import dockerfile_stages as read_stages

# Read by the deployment tests; exec_form and stage_env come from rankd.devtools.dockerfile.
__all__ = ["COMPOSE", "DOCKERFILE", "DOCKERIGNORE", "ENV_EXAMPLE", "INDEX_INIT", "REPO",
           "VLLM_CPU_DOCKERFILE", "VLLM_CPU_ENTRYPOINT", "compose", "dockerfile_stages",
           "env_example_names", "exec_form", "healthcheck", "interpolate", "stage_env",
           "substitution_defaults"]

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "docker" / "Dockerfile"
VLLM_CPU_DOCKERFILE = REPO / "docker" / "Dockerfile.vllm-cpu"
COMPOSE = REPO / "docker-compose.yml"
ENV_EXAMPLE = REPO / ".env.example"
DOCKERIGNORE = REPO / ".dockerignore"
INDEX_INIT = REPO / "docker" / "index-init.sh"
VLLM_CPU_ENTRYPOINT = REPO / "docker" / "vllm-cpu-entrypoint.sh"


def dockerfile_stages(path: Path = DOCKERFILE) -> list[Stage]:
    """The Dockerfile's stages in order, each with its (KEYWORD, arguments) instructions."""
    return read_stages(path)


def healthcheck(stage: Stage) -> tuple[dict[str, str], list[str]]:
    """HEALTHCHECK options (--interval=...) and its exec-form command."""
    arguments = stage.last("HEALTHCHECK")
    options_text, _, command = arguments.partition("CMD ")
    options = dict(opt.lstrip("-").split("=", 1) for opt in options_text.split())
    return options, exec_form(command)


def interpolate(value: str, env: dict[str, str] | None = None) -> str:
    """Compose's ${VAR}, ${VAR-default} and ${VAR:-default}, from ``env`` (default: empty)."""
    env = env or {}
    return SUBSTITUTION.sub(lambda m: env.get(m.group(1)) or (m.group(2) or ""), value)


def substitution_defaults(text: str) -> dict[str, str | None]:
    """Every variable substituted in ``text``, with its default (None when it has none)."""
    return {m.group(1): m.group(2) for m in SUBSTITUTION.finditer(text)}


def compose() -> dict[str, Any]:
    """docker-compose.yml as YAML (anchors and merge keys resolved, substitutions not)."""
    data = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def env_example_names() -> dict[str, str | None]:
    """Names in .env.example: assigned (value) or listed in a commented-out line (None)."""
    names: dict[str, str | None] = {}
    for line in ENV_EXAMPLE.read_text(encoding="utf-8").splitlines():
        match = re.match(r"^(#\s*)?([A-Z][A-Z0-9_]*)=(.*)$", line.strip())
        if match:
            names[match.group(2)] = None if match.group(1) else match.group(3)
    return names
