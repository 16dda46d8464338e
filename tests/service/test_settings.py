from __future__ import annotations

import pytest

from service.settings import Settings, SettingsError, load_settings


def test_reads_the_rankd_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANKD_PORT", "9123")
    monkeypatch.setenv("RANKD_MAX_TOP_K", "7")
    settings = load_settings()
    assert settings.port == 9123
    assert settings.max_top_k == 7


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("RANKD_PORT", "99999", "RANKD_PORT"),
        ("RANKD_MAX_TOP_K", "zero", "RANKD_MAX_TOP_K"),
        ("RANKD_LOG_LEVEL", "chatty", "RANKD_LOG_LEVEL"),
        ("RANKD_RERANKER_LABEL_ALPHABET", "greek", "RANKD_RERANKER_LABEL_ALPHABET"),
        ("RANKD_RERANKER_RANK_TEMPLATE", "{query} {nope} {items}", "RANKD_RERANKER_RANK_TEMPLATE"),
        ("RANKD_DEFAULT_CANDIDATES", "500", "RANKD_DEFAULT_CANDIDATES"),
        ("RANKD_RERANKER_ORDERS", "0", "RANKD_RERANKER_ORDERS"),
        ("RANKD_RERANKER_ORDERS", "53", "RANKD_RERANKER_ORDERS"),
        ("RANKD_RERANK_FUSION", "borda", "RANKD_RERANK_FUSION"),
        ("RANKD_RERANK_FUSION_WEIGHT", "1.5", "RANKD_RERANK_FUSION_WEIGHT"),
    ],
)
def test_invalid_values_fail_fast_naming_the_variable(monkeypatch: pytest.MonkeyPatch,
                                                      variable: str, value: str,
                                                      message: str) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError) as info:
        load_settings()
    assert message in str(info.value)


def test_settings_are_immutable() -> None:
    settings = Settings()
    with pytest.raises(Exception, match="frozen"):
        settings.port = 1  # type: ignore[misc]


def test_the_configuration_page_is_current() -> None:
    from pathlib import Path

    from service.settings_doc import configuration_page

    page = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
    assert page.read_text(encoding="utf-8") == configuration_page(), \
        "regenerate with `python -m service.settings_doc > docs/configuration.md`"
