"""What the clients (`rankd batch`, `rankd loadtest`) read from the environment: the key they
send, the service's own RANKD_API_KEY, so that a client beside its service needs no flag."""

from __future__ import annotations

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from runtime.settings import comma_separated


class ClientSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RANKD_", extra="ignore", frozen=True)

    api_key: SecretStr | None = Field(None, description="Comma-separated API keys; when set, every route but /health, /ready and /metrics needs `Authorization: Bearer <key>`. The clients send the first.")

    def key(self) -> str | None:
        """The first key, as the clients send it."""
        keys = comma_separated(self.api_key.get_secret_value() if self.api_key else "")
        return keys[0] if keys else None
