"""Reading a settings model from the environment, with every bad value reported as one line
that names the variable to set (``rankd: invalid configuration: RANKD_X: ...``), never a
traceback. Each stage's model (retriever/config.py, reranker/config.py, service/settings.py)
is read through ``read_settings``."""

from __future__ import annotations

from typing import TypeVar

from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


class SettingsError(SystemExit):
    """Start-up refused because of bad configuration; the message says what to set."""


def comma_separated(raw: str) -> list[str]:
    """The non-blank items of a comma-separated setting (API keys, CORS origins), stripped."""
    return [item.strip() for item in raw.split(",") if item.strip()]


def describe(exc: ValidationError, prefix: str = "RANKD_") -> str:
    """The lines of a validation error, one per bad variable."""
    lines = ["rankd: invalid configuration:"]
    for error in exc.errors():
        field = "_".join(str(p) for p in error["loc"])
        env = f"{prefix}{field.upper()}" if field else "the RANKD_ settings"
        given = error.get("input")
        got = "" if isinstance(given, dict) else f" (got {given!r})"
        lines.append(f"  {env}: {error['msg']}{got}")
    return "\n".join(lines)


def read_settings(model: type[M], **overrides: object) -> M:
    """``model`` read from the environment (and ``overrides``), or SettingsError."""
    try:
        return model(**overrides)
    except ValidationError as exc:
        raise SettingsError(describe(exc)) from None
