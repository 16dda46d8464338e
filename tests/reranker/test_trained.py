"""A trained model's rankd_reranker.json: what serving takes from it, what an explicit setting
overrides with a warning, and what it refuses."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from rankd.cli import main
from reranker.config import RerankerConfig, Scoring
from reranker.errors import RerankerConfigError
from reranker.fusion import Fusion
from reranker.trained import SERVING_FILE, served_settings, with_trained_settings


def _trained_dir(tmp_path: Path, **fusion: object) -> Path:
    model = tmp_path / "model"
    model.mkdir()
    trained = RerankerConfig(scoring=Scoring.POINTWISE)
    settings = served_settings(trained, "Find the misconception.", 10,
                               {"fusion": "rrf", "fusion_weight": 0.7, **fusion})
    (model / SERVING_FILE).write_text(json.dumps(settings))
    return model


def test_unset_settings_are_taken_from_the_model(tmp_path: Path) -> None:
    model = _trained_dir(tmp_path)
    config, trained = with_trained_settings(RerankerConfig(model=str(model)))
    assert config.scoring is Scoring.POINTWISE
    assert (config.fusion, config.fusion_weight) == (Fusion.RRF, 0.7)
    assert config.instruction == "Find the misconception."
    assert trained.candidates == 10
    assert trained.describe() == (f"served as trained ({SERVING_FILE}: pointwise scoring, "
                                  "10 candidates, fusion rrf w 0.7 (chosen on validation))")


def test_an_explicit_fusion_wins_with_a_warning(tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    model = _trained_dir(tmp_path)
    with caplog.at_level(logging.WARNING):
        config, trained = with_trained_settings(
            RerankerConfig(model=str(model), fusion_weight=0.4))
    assert (config.fusion, config.fusion_weight) == (Fusion.RRF, 0.4)
    assert trained.overridden == {"fusion_weight": (0.4, 0.7)}
    assert "RANKD_RERANKER_FUSION_WEIGHT=0.4 overrides the trained fusion_weight=0.7" \
        in caplog.text


def test_an_explicit_default_candidates_wins_with_a_warning(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    model = _trained_dir(tmp_path)
    with caplog.at_level(logging.WARNING):
        _, trained = with_trained_settings(RerankerConfig(model=str(model)), candidates=25)
    assert trained.candidates is None  # the operator's 25 stays
    assert trained.overridden == {"candidates": (25, 10)}
    assert "RANKD_DEFAULT_CANDIDATES=25 overrides the trained candidates=10" in caplog.text
    assert "RANKD_DEFAULT_CANDIDATES=25 over the trained 10" in trained.describe()
    _, same = with_trained_settings(RerankerConfig(model=str(model)), candidates=10)
    assert not same.overridden


@pytest.mark.parametrize("setting", [{"scoring": "listwise"},
                                     {"pointwise_template": "{query} / {item}? yes or no"},
                                     {"chat_template": False}])
def test_a_setting_that_changes_the_prompts_is_refused(tmp_path: Path,
                                                       setting: dict[str, object]) -> None:
    model = _trained_dir(tmp_path)
    (name, _), = setting.items()
    with pytest.raises(RerankerConfigError,
                       match=rf"RANKD_RERANKER_{name.upper()}=.* changes the prompts .*"
                             rf"{SERVING_FILE} says {name}="):
        with_trained_settings(RerankerConfig(model=str(model), **setting))  # type: ignore[arg-type]


def test_an_explicit_setting_equal_to_the_trained_one_is_no_override(tmp_path: Path) -> None:
    model = _trained_dir(tmp_path)
    config, trained = with_trained_settings(RerankerConfig(model=str(model), scoring="pointwise"))
    assert config.scoring is Scoring.POINTWISE
    assert not trained.overridden


def test_a_model_without_the_file_is_served_as_configured(tmp_path: Path) -> None:
    config = RerankerConfig(model=str(tmp_path), scoring=Scoring.LISTWISE, fusion_weight=0.3)
    served, trained = with_trained_settings(config)
    assert served.model_dump() == config.model_dump()
    assert (served.scoring, served.fusion_weight) == (Scoring.LISTWISE, 0.3)
    assert (trained.taken, trained.overridden, trained.candidates) == ({}, {}, None)
    assert trained.describe() == ""


def test_a_settings_file_serves_a_model_whose_directory_is_elsewhere(tmp_path: Path) -> None:
    """vLLM may serve the model from a directory this machine cannot see: the file is named."""
    settings = _trained_dir(tmp_path) / SERVING_FILE
    config, trained = with_trained_settings(RerankerConfig(
        model="HuggingFaceTB/SmolLM2-135M-Instruct", settings_file=settings))
    assert config.scoring is Scoring.POINTWISE
    assert (config.fusion, config.fusion_weight) == (Fusion.RRF, 0.7)
    assert trained.candidates == 10
    assert trained.describe().startswith("served as trained")
    with pytest.raises(RerankerConfigError, match=r"RANKD_RERANKER_SETTINGS_FILE=.* is not a file"):
        with_trained_settings(RerankerConfig(model="m", settings_file=tmp_path / "missing.json"))


def test_a_bad_file_is_named(tmp_path: Path) -> None:
    model = _trained_dir(tmp_path, fusion="average")
    with pytest.raises(RerankerConfigError, match=f"{SERVING_FILE} holds a bad fusion"):
        with_trained_settings(RerankerConfig(model=str(model)))
    written = json.loads((model / SERVING_FILE).read_text())
    (model / SERVING_FILE).write_text(json.dumps({**written, "fusion": "rrf", "candidates": 0}))
    with pytest.raises(RerankerConfigError, match="holds a bad candidates: 0"):
        with_trained_settings(RerankerConfig(model=str(model)))
    (model / SERVING_FILE).write_text(json.dumps({**written, "fusion": "rrf", "candidates": 30}))
    with pytest.raises(RerankerConfigError, match="holds candidates 30, over the 26 labels"):
        with_trained_settings(RerankerConfig(model=str(model)))


def test_serve_refuses_a_prompt_override_in_one_line(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    model = _trained_dir(tmp_path)
    monkeypatch.setenv("RANKD_RERANKER_MODEL", str(model))
    monkeypatch.setenv("RANKD_RERANKER_SCORING", "listwise")
    assert main(["serve", "--index-dir", str(tmp_path / "index"), "--port", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert err.startswith("rankd serve: RANKD_RERANKER_SCORING='listwise' changes the prompts")
    assert "says scoring='pointwise'" in err
