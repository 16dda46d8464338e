"""Renders the configuration table of the README from the Settings model itself."""

from __future__ import annotations

from service.settings import Settings


def settings_table() -> str:
    rows = ["| Variable | Default | Meaning |", "|---|---|---|"]
    for name, info in Settings.model_fields.items():
        default = info.default
        shown = getattr(default, "value", default)
        if isinstance(shown, str) and "\n" in shown:
            shown = "(see service/settings.py)"
        elif isinstance(shown, str) and len(shown) > 40:
            shown = shown[:37] + "..."
        rows.append(f"| `RANKD_{name.upper()}` | `{shown}` | {info.description or ''} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(settings_table())
