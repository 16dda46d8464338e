"""Renders docs/configuration.md from the Settings model itself:
``python -m service.settings_doc > docs/configuration.md``."""

from __future__ import annotations

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from service.settings import Settings


def _shown(info: FieldInfo) -> object:
    default = info.default
    shown = getattr(default, "value", default)
    if isinstance(shown, str) and "\n" in shown:
        return "(see reranker/config.py)"
    if isinstance(shown, str) and len(shown) > 40:
        return shown[:37] + "..."
    return shown


def _fields(model: type[BaseModel], prefix: str) -> list[tuple[str, FieldInfo]]:
    """Each setting's environment variable and field, nested models expanded."""
    found = []
    for name, info in model.model_fields.items():
        nested = info.annotation
        if isinstance(nested, type) and issubclass(nested, BaseModel):
            found += _fields(nested, f"{prefix}{name.upper()}_")
        else:
            found.append((f"{prefix}{name.upper()}", info))
    return found


def env_names() -> list[str]:
    return [name for name, _ in _fields(Settings, "RANKD_")]


def settings_table() -> str:
    rows = [f"| `{name}` | `{_shown(info)}` | {info.description or ''} |"
            for name, info in _fields(Settings, "RANKD_")]
    return "\n".join(["| Variable | Default | Meaning |", "|---|---|---|", *rows])


def configuration_page() -> str:
    return f"""# Configuration

Every setting is an environment variable with the `RANKD_` prefix, read and validated once at
start-up (`service/settings.py`); a bad value stops `rankd serve` with a one-line message naming
the variable. The reranker's settings are one nested model (`reranker/config.py`), read from
`RANKD_RERANKER_<FIELD>`. `.env.example` lists them all for `docker compose`. Torch's threads for
the embedder follow `OMP_NUM_THREADS`, as torch does; the reranker's worker has its own,
`RANKD_RERANKER_THREADS`.

This page is generated: `python -m service.settings_doc > docs/configuration.md`.

{settings_table()}
"""


if __name__ == "__main__":
    print(configuration_page(), end="")
