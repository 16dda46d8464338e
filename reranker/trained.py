"""The settings a trained reranker is served with, written beside its weights.

`rankd train-reranker` writes ``rankd_reranker.json`` into the model directory: the prompt
settings it trained on (scoring mode, chat template, templates, labels, instruction) and the
fusion it chose on validation (method and weight, with the figures behind the choice). Whoever
serves the directory (``rankd serve``, the Ray Serve app) reads it through
``with_trained_settings``:

- a setting the file holds and the operator did not set is taken from the file;
- one the operator set explicitly (``RANKD_RERANKER_<FIELD>``) wins, with a warning, where it
  only changes how scores are fused or how many candidates a request reranks by default
  (``candidates``, the N it was trained and its fusion chosen at: RANKD_DEFAULT_CANDIDATES);
- one that changes the prompts themselves refuses the start, naming both values: the model was
  never trained to read those prompts, and its scores would be read silently wrong.

A preset (``RANKD_RERANKER_PRESET``) fills what neither set.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from reranker.config import RerankerConfig, Scoring
from reranker.errors import RerankerConfigError
from reranker.presets import preset_values, with_preset

log = logging.getLogger(__name__)

SERVING_FILE = "rankd_reranker.json"

# Settings that shape the prompt the model reads: an override refuses the start.
PROMPT_FIELDS = ("scoring", "chat_template", "rank_template", "pointwise_template",
                 "label_alphabet", "instruction")
# Settings that only fuse the scores with retrieval: an override wins with a warning.
FUSION_FIELDS = ("fusion", "fusion_weight")
# The N of training and of the fusion choice: the service's RANKD_DEFAULT_CANDIDATES, which a
# request's `candidates` still overrides. An explicit setting wins with a warning.
CANDIDATES_FIELD = "candidates"


def served_settings(config: RerankerConfig, instruction: str, candidates: int,
                    fusion: dict[str, Any] | None = None) -> dict[str, Any]:
    """What ``SERVING_FILE`` holds for a model trained with ``config`` and ``instruction`` on
    ``candidates`` per query; ``fusion`` is the choice made on validation ({"fusion",
    "fusion_weight", "chosen_on"})."""
    settings: dict[str, Any] = {"scoring": config.scoring.value, CANDIDATES_FIELD: candidates,
                                "chat_template": config.chat_template,
                                "instruction": instruction,
                                "label_alphabet": config.label_alphabet.value}
    if config.scoring is Scoring.POINTWISE:
        settings["pointwise_template"] = config.pointwise_template
    else:
        settings["rank_template"] = config.rank_template
    if fusion:
        settings.update(fusion)
    return settings


def carried_settings(config: RerankerConfig, values: dict[str, Any] | None) -> dict[str, Any]:
    """What a copy of a model (``rankd quantize``'s output) carries in its ``SERVING_FILE``:
    the source's file as it is (its N, its fusion and the figures behind them), with the prompt
    settings ``config`` resolved for it (``with_trained_settings``: the file's, else the
    operator's, the preset's or the defaults), which its prompts were rendered with."""
    carried = dict(values or {})
    carried.update({"scoring": config.scoring.value, "chat_template": config.chat_template,
                    "instruction": config.instruction,
                    "label_alphabet": config.label_alphabet.value})
    if config.scoring is Scoring.POINTWISE:
        carried["pointwise_template"] = config.pointwise_template
    else:
        carried["rank_template"] = config.rank_template
    return carried


def write_served_settings(directory: Path, settings: dict[str, Any]) -> None:
    (directory / SERVING_FILE).write_text(json.dumps(settings, indent=2) + "\n",
                                          encoding="utf-8")


@dataclass(frozen=True)
class TrainedSettings:
    """What a model directory's ``SERVING_FILE`` changed in the configuration, for the start-up
    log and /ready."""

    taken: dict[str, Any] = field(default_factory=dict)  # from the file
    overridden: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # (set, trained)

    @property
    def candidates(self) -> int | None:
        """The trained N when it sets the service's default (no explicit setting)."""
        value = self.taken.get(CANDIDATES_FIELD)
        return int(value) if value is not None else None

    def describe(self) -> str:
        if not self.taken and not self.overridden:
            return ""
        parts = []
        scoring = self.taken.get("scoring")
        if scoring:
            parts.append(f"{scoring} scoring")
        if self.candidates is not None:
            parts.append(f"{self.candidates} candidates")
        if "fusion" in self.taken:
            weight = self.taken.get("fusion_weight")
            parts.append(f"fusion {self.taken['fusion']}"
                         + (f" w {weight:g}" if weight is not None else "")
                         + " (chosen on validation)")
        for name, (value, trained) in self.overridden.items():
            parts.append(f"{_variable(name)}={_shown(value)} over the trained {_shown(trained)}")
        return f"served as trained ({SERVING_FILE}: {', '.join(parts) or 'prompt settings'})"


def read_served_settings(model: str | None, settings_file: Path | None = None,
                         ) -> dict[str, Any] | None:
    """The contents of ``settings_file`` (RANKD_RERANKER_SETTINGS_FILE), else of ``model``'s
    ``SERVING_FILE`` when ``model`` is a directory holding one."""
    if settings_file is not None:
        path = Path(settings_file).expanduser()
        if not path.is_file():
            raise RerankerConfigError(f"RANKD_RERANKER_SETTINGS_FILE={settings_file} is not a "
                                      f"file; point it at the model's {SERVING_FILE}")
    else:
        if not model:
            return None
        path = Path(model).expanduser() / SERVING_FILE
        if not path.is_file():
            return None
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RerankerConfigError(f"the reranker model's {SERVING_FILE} cannot be read ({exc}); "
                                  "write it again with `rankd train-reranker` or remove it"
                                  ) from None
    if not isinstance(values, dict):
        raise RerankerConfigError(f"the reranker model's {SERVING_FILE} is not a JSON object")
    return values


def with_trained_settings(config: RerankerConfig, candidates: int | None = None,
                          ) -> tuple[RerankerConfig, TrainedSettings]:
    """``config`` with its model directory's trained settings applied (see the module's rule),
    then its preset (``reranker.presets``) where neither the operator nor the file set a
    field. ``candidates`` is RANKD_DEFAULT_CANDIDATES where the operator set it explicitly;
    the trained N is ``TrainedSettings.candidates`` where it did not."""
    values = read_served_settings(config.model, config.settings_file) if config.enabled else None
    if values is None:
        return with_preset(config), TrainedSettings()
    known = {k: v for k, v in values.items() if k in (*PROMPT_FIELDS, *FUSION_FIELDS)}
    try:
        trained = RerankerConfig.model_validate({**config.model_dump(), **known})
    except ValidationError as exc:
        error = exc.errors()[0]
        raise RerankerConfigError(
            f"the reranker model's {SERVING_FILE} holds a bad {error['loc'][0]}: "
            f"{error['msg']}") from None
    taken: dict[str, Any] = {}
    overridden: dict[str, tuple[Any, Any]] = {}
    for name in known:
        mine, theirs = getattr(config, name), getattr(trained, name)
        if name not in config.model_fields_set:
            taken[name] = theirs
        elif mine != theirs:
            if name in PROMPT_FIELDS:
                raise RerankerConfigError(
                    f"RANKD_RERANKER_{name.upper()}={_shown(mine)} changes the prompts the model "
                    f"was trained on ({SERVING_FILE} says {name}={_shown(theirs)}); unset it to "
                    "serve the model as trained, or train a model with that setting")
            overridden[name] = (mine, theirs)
            log.warning("%s=%s overrides the trained %s=%s (%s)", _variable(name),
                        _shown(mine), name, _shown(theirs), SERVING_FILE)
    trained_n = values.get(CANDIDATES_FIELD)
    if trained_n is not None:
        if not isinstance(trained_n, int) or isinstance(trained_n, bool) or trained_n < 1:
            raise RerankerConfigError(f"the reranker model's {SERVING_FILE} holds a bad "
                                      f"{CANDIDATES_FIELD}: {trained_n!r}, not a positive integer")
        if trained_n > trained.max_items:
            # RANKD_DEFAULT_CANDIDATES' own check (service/settings.py) never sees this value.
            raise RerankerConfigError(
                f"the reranker model's {SERVING_FILE} holds {CANDIDATES_FIELD} {trained_n}, over "
                f"the {trained.max_items} labels of its label_alphabet "
                f"{trained.label_alphabet.value}")
        if candidates is None:
            taken[CANDIDATES_FIELD] = trained_n
        elif candidates != trained_n:
            overridden[CANDIDATES_FIELD] = (candidates, trained_n)
            log.warning("%s=%s overrides the trained %s=%s (%s): the fusion was chosen at %s",
                        _variable(CANDIDATES_FIELD), candidates, CANDIDATES_FIELD, trained_n,
                        SERVING_FILE, trained_n)
    prompt_and_fusion = {k: v for k, v in taken.items() if k != CANDIDATES_FIELD}
    merged = config.model_copy(update={**preset_values(config, keep=set(taken)),
                                       **prompt_and_fusion})
    return merged, TrainedSettings(taken, overridden)


def _variable(name: str) -> str:
    return ("RANKD_DEFAULT_CANDIDATES" if name == CANDIDATES_FIELD
            else f"RANKD_RERANKER_{name.upper()}")


def _shown(value: Any) -> str:
    text = value.value if hasattr(value, "value") else value
    shown = repr(text)
    return shown if len(shown) <= 60 else shown[:57] + "...'"
