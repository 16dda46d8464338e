"""Logging for every ``rankd`` command, from RANKD_LOG_LEVEL, validated like every setting."""

from __future__ import annotations

import logging

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

LEVELS = ("critical", "error", "warning", "info", "debug")


class LogSettings(BaseSettings):
    """RANKD_LOG_LEVEL; the service's settings (service/settings.py) extend this model."""

    model_config = SettingsConfigDict(env_prefix="RANKD_", extra="ignore", frozen=True)

    log_level: str = Field("info", description="Python log level: critical, error, warning, info or debug.")

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        if value.lower() not in LEVELS:
            raise ValueError(f"must be one of {', '.join(LEVELS)}")
        return value.lower()


class LogSettingsError(SystemExit):
    """RANKD_LOG_LEVEL is not a level; the message says what to set."""


def configure_logging(level: str | None = None) -> None:
    """Log at ``level``, or at RANKD_LOG_LEVEL; a bad value is one line, not a traceback."""
    if level is None:
        try:
            level = LogSettings().log_level
        except ValidationError as exc:
            raise LogSettingsError(
                f"rankd: invalid configuration: RANKD_LOG_LEVEL: {exc.errors()[0]['msg']}") from None
    logging.basicConfig(level=level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
