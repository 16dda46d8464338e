"""Logging for every ``rankd`` command, from RANKD_LOG_LEVEL, validated like every setting."""

from __future__ import annotations

import logging

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from runtime.settings import read_settings

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


def configure_logging(level: str | None = None) -> None:
    """Log at ``level``, or at RANKD_LOG_LEVEL; a bad value is SettingsError, one line."""
    if level is None:
        level = read_settings(LogSettings).log_level
    logging.basicConfig(level=level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
