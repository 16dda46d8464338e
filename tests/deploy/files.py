"""Readers for the deployment files: the Dockerfile's final stage, docker-compose.yml with its
${VAR:-default} substitutions, .env.example and .dockerignore."""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "docker" / "Dockerfile"
VLLM_CPU_DOCKERFILE = REPO / "docker" / "Dockerfile.vllm-cpu"
COMPOSE = REPO / "docker-compose.yml"
ENV_EXAMPLE = REPO / ".env.example"
DOCKERIGNORE = REPO / ".dockerignore"
INDEX_INIT = REPO / "docker" / "index-init.sh"

_SUBSTITUTION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}")


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]

    def last(self, keyword: str) -> str:
        found = self.all(keyword)
        assert found, f"the stage has no {keyword}"
        return found[-1]


def _logical_lines(text: str) -> list[str]:
    lines: list[str] = []
    current = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") and not current:
            continue
        if stripped.startswith("#"):  # a comment inside a continued instruction
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        if current.strip():
            lines.append(current.strip())
        current = ""
    return lines


def dockerfile_stages(path: Path = DOCKERFILE) -> list[Stage]:
    """The Dockerfile's stages in order, each with its (KEYWORD, arguments) instructions."""
    stages: list[Stage] = []
    args: dict[str, str] = {}
    for line in _logical_lines(path.read_text(encoding="utf-8")):
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        rest = rest.strip()
        if keyword == "ARG" and not stages:
            name, _, default = rest.partition("=")
            args[name] = default
            continue
        if keyword == "FROM":
            words = rest.split()
            base = _SUBSTITUTION.sub(lambda m: args.get(m.group(1), m.group(2) or ""), words[0])
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base, name))
            continue
        assert stages, f"{path}: {keyword} before FROM"
        stages[-1].instructions.append((keyword, rest))
    return stages


def exec_form(arguments: str) -> list[str]:
    """A JSON exec-form argument list (CMD, ENTRYPOINT, HEALTHCHECK CMD)."""
    value = json.loads(arguments)
    assert isinstance(value, list), arguments
    assert all(isinstance(v, str) for v in value), arguments
    return value


def stage_env(stage: Stage) -> dict[str, str]:
    """The stage's ENV values, ``$VAR`` references left as they are."""
    env: dict[str, str] = {}
    for arguments in stage.all("ENV"):
        for word in shlex.split(arguments):
            key, _, value = word.partition("=")
            env[key] = value
    return env


def healthcheck(stage: Stage) -> tuple[dict[str, str], list[str]]:
    """HEALTHCHECK options (--interval=...) and its exec-form command."""
    arguments = stage.last("HEALTHCHECK")
    options_text, _, command = arguments.partition("CMD ")
    options = dict(opt.lstrip("-").split("=", 1) for opt in options_text.split())
    return options, exec_form(command)


def interpolate(value: str, env: dict[str, str] | None = None) -> str:
    """Compose's ${VAR}, ${VAR-default} and ${VAR:-default}, from ``env`` (default: empty)."""
    env = env or {}
    return _SUBSTITUTION.sub(lambda m: env.get(m.group(1)) or (m.group(2) or ""), value)


def substitution_defaults(text: str) -> dict[str, str | None]:
    """Every variable substituted in ``text``, with its default (None when it has none)."""
    return {m.group(1): m.group(2) for m in _SUBSTITUTION.finditer(text)}


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
