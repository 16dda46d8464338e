"""Renders docs/configuration.md from the Settings model itself:
``python -m service.settings_doc > docs/configuration.md``."""

from __future__ import annotations

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from reranker.quantize import QuantizeSettings
from service.settings import Settings

# Besides the service's settings: what a command reads of its own.
TOOLS: tuple[type[BaseModel], ...] = (QuantizeSettings,)


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
    """The RANKD_ names the service's settings bind (`rankd serve`, the images)."""
    return [name for name, _ in _fields(Settings, "RANKD_")]


def all_env_names() -> list[str]:
    """Every RANKD_ name some settings model binds, the commands' own included."""
    models: tuple[type[BaseModel], ...] = (Settings, *TOOLS)
    return [name for model in models for name, _ in _fields(model, "RANKD_")]


def settings_table(model: type[BaseModel]) -> str:
    rows = [f"| `{name}` | `{_shown(info)}` | {info.description or ''} |"
            for name, info in _fields(model, "RANKD_")]
    return "\n".join(["| Variable | Default | Meaning |", "|---|---|---|", *rows])


def configuration_page() -> str:
    return f"""# Configuration

Every setting is an environment variable with the `RANKD_` prefix, read and validated once when
a command starts, through one model per stage: the retrieval stage's (`retriever/config.py`,
`RANKD_<FIELD>`, its embedder's knobs `RANKD_EMBEDDER_*`), the reranker's
(`reranker/config.py`, `RANKD_RERANKER_<FIELD>`, the fusion with the orders) and the service's
own (`service/settings.py`, which holds the other two). `rankd index build`, `rankd
train-retriever`, `rankd train-reranker` and `rankd quantize` read the same models as `rankd
serve`, so a value means the same to each, and a bad value stops any of them with one line
naming the variable. `.env.example` lists them all for `docker compose`. Torch's threads for the
embedder follow `OMP_NUM_THREADS`, as torch does; the reranker's worker has its own,
`RANKD_RERANKER_THREADS`.

This page is generated: `python -m service.settings_doc > docs/configuration.md`.

{settings_table(Settings)}

`rankd quantize` also reads:

{settings_table(QuantizeSettings)}
"""


if __name__ == "__main__":
    print(configuration_page(), end="")
