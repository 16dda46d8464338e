"""Readers for a Dockerfile: its stages, their instructions, ENV and exec-form commands.

Standard library only, so that the fresh-start check (rankd/devtools/fresh_start.py) can read
the image's install lines with a bare Python, before any venv exists."""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

SUBSTITUTION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}")


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]

    def last(self, keyword: str) -> str:
        found = self.all(keyword)
        if not found:
            raise ValueError(f"the stage has no {keyword}")
        return found[-1]


def _logical_lines(text: str) -> list[str]:
    lines: list[str] = []
    current = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if stripped.startswith("#"):  # a comment, also inside a continued instruction
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        if current.strip():
            lines.append(current.strip())
        current = ""
    return lines


def dockerfile_stages(path: Path) -> list[Stage]:
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
            base = SUBSTITUTION.sub(lambda m: args.get(m.group(1), m.group(2) or ""), words[0])
            stage = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base, stage))
            continue
        if not stages:
            raise ValueError(f"{path}: {keyword} before FROM")
        stages[-1].instructions.append((keyword, rest))
    return stages


def exec_form(arguments: str) -> list[str]:
    """A JSON exec-form argument list (CMD, ENTRYPOINT, HEALTHCHECK CMD)."""
    value = json.loads(arguments)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"not an exec-form list of strings: {arguments}")
    return value


def stage_env(stage: Stage) -> dict[str, str]:
    """The stage's ENV values, ``$VAR`` references left as they are."""
    env: dict[str, str] = {}
    for arguments in stage.all("ENV"):
        for word in shlex.split(arguments):
            key, _, value = word.partition("=")
            env[key] = value
    return env
