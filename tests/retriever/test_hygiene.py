"""Catalogue hygiene at `rankd index build`: noise filters, exact and near-duplicate merging with
aliases, the report and the manifest, and answering a merged id through its survivor."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from clients.evaluate import evaluate_files
from rankd.cli import main
from retriever import Embedder, build_collection, load_collection
from retriever.catalog import CatalogEntry
from retriever.data import SAMPLE_ID_COLUMN, SAMPLE_TEXT_COLUMN, sample_catalog_path, sample_entries
from retriever.hygiene import (
    ALIASES_FILE,
    CleaningSpec,
    DedupMode,
    KeepRule,
    clean_catalog,
    near_groups,
    noise_rule,
    normal_form,
)
from service.settings import Settings
from tests.support.apps import app_client


def _sample() -> list[CatalogEntry]:
    return sample_entries()


@pytest.fixture(scope="module")
def dirty_catalog(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The sample catalogue plus an exact copy (other case and spacing), a near copy, and three
    noise entries."""
    entries = _sample()
    exact_of, near_of = entries[3], entries[10]
    extra = [
        ("900", "  " + exact_of.text.upper().replace(" ", "   ") + " "),
        ("901", near_of.text + " as well"),
        ("902", ""),
        ("903", "<p><br/></p>"),
        ("904", "12, 345.6"),
    ]
    path = tmp_path_factory.mktemp("dirty") / "catalog.csv"
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow([SAMPLE_ID_COLUMN, SAMPLE_TEXT_COLUMN])
        writer.writerows([(e.id, e.text) for e in entries] + extra)
    return {"path": path, "exact_of": exact_of, "near_of": near_of, "sample": len(entries)}


def _build(catalog: Path, index_dir: Path, *flags: str) -> list[str]:
    return ["index", "build", "--catalog", str(catalog), "--id-column", SAMPLE_ID_COLUMN,
            "--text-column", SAMPLE_TEXT_COLUMN, "--collection", "clean", "--index-dir",
            str(index_dir), "--quiet", *flags]


@pytest.fixture(scope="module")
def cleaned(dirty_catalog: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
            ) -> dict[str, Any]:
    index_dir = tmp_path_factory.mktemp("clean-index")
    report_path = index_dir.parent / "cleaning.json"
    assert main(_build(dirty_catalog["path"], index_dir, "--dedup", "near", "--filter-noise",
                       "--report", str(report_path))) == 0
    return {"index_dir": index_dir, "report": json.loads(report_path.read_text()),
            "collection": load_collection(index_dir / "clean")}


def test_near_copy_is_close_enough_to_merge(dirty_catalog: dict[str, Any],
                                            embedder: Embedder) -> None:
    near = dirty_catalog["near_of"].text
    a, b = embedder.encode([near, near + " as well"])
    assert float(a @ b) >= 0.95  # the test's own data is what it claims to be


def test_duplicates_merge_into_a_survivor_with_aliases(cleaned: dict[str, Any],
                                                       dirty_catalog: dict[str, Any]) -> None:
    collection = cleaned["collection"]
    exact_of, near_of = dirty_catalog["exact_of"], dirty_catalog["near_of"]
    ids = {e.id for e in collection.entries}
    assert len(collection) == dirty_catalog["sample"]
    assert {"900", "901", "902", "903", "904"}.isdisjoint(ids)
    aliases = json.loads((cleaned["index_dir"] / "clean" / ALIASES_FILE).read_text())
    assert aliases == {exact_of.id: ["900"], near_of.id: ["901"]}
    assert ALIASES_FILE in collection.manifest.files  # checksummed like the index


def test_the_report_and_the_manifest_count_every_rule(cleaned: dict[str, Any],
                                                      dirty_catalog: dict[str, Any]) -> None:
    report = cleaned["report"]
    assert report["dropped"] == {"digits_only": 1, "empty": 1, "markup_only": 1}
    assert report["dropped_ids"] == {"digits_only": ["904"], "empty": ["902"],
                                     "markup_only": ["903"]}
    assert report["merged_exact"] == 1
    assert report["merged_near"] == 1
    assert report["entries_in"] == dirty_catalog["sample"] + 5
    assert report["entries_out"] == dirty_catalog["sample"]
    assert report["entries_in"] - sum(report["dropped"].values()) - report["merged_exact"] \
        - report["merged_near"] == report["entries_out"]
    groups = {g["kept"]["id"]: g for g in report["largest_groups"]}
    assert groups[dirty_catalog["near_of"].id]["merged"][0]["id"] == "901"
    assert 0.95 <= groups[dirty_catalog["near_of"].id]["merged"][0]["similarity"] < 1
    assert groups[dirty_catalog["exact_of"].id]["merged"][0]["text"].strip().startswith(
        dirty_catalog["exact_of"].text.upper()[:5])
    manifest = cleaned["collection"].manifest.cleaning
    assert manifest["dedup"] == "near"
    assert manifest["near_threshold"] == 0.95
    assert manifest["dropped"] == report["dropped"]
    assert manifest["merged_near"] == 1
    assert manifest["entries_out"] == len(cleaned["collection"])


async def test_a_merged_id_is_answered_through_its_survivor(
        cleaned: dict[str, Any], dirty_catalog: dict[str, Any], tmp_path: Path) -> None:
    near_of = dirty_catalog["near_of"]
    settings = Settings(index_dir=cleaned["index_dir"], embedder_device="cpu",
                        reranker={"backend": "none"})
    async with app_client(settings) as (_, client):
        response = await client.post("/rank", json={"query": near_of.text + " as well",
                                                     "top_k": 3})
    assert response.status_code == 200, response.text
    top = response.json()["results"][0]
    assert top["id"] == near_of.id
    assert top["aliases"] == ["901"]
    assert "rankd:aliases" not in top["metadata"]
    # rankd eval: a query labelled with the merged id scores through the survivor.
    labels = tmp_path / "labels.jsonl"
    labels.write_text(json.dumps({"id": "q", "relevant": ["901"]}) + "\n")
    run = tmp_path / "run.jsonl"
    run.write_text(json.dumps({"id": "q", "response": response.json()}) + "\n")
    assert evaluate_files(run, labels, "jsonl").map == 1.0
    ranked = tmp_path / "ranked.jsonl"
    ranked.write_text(json.dumps({"id": "q", "ranked": [near_of.id]}) + "\n")
    assert evaluate_files(ranked, labels, "jsonl").map == 0.0
    aliases = cleaned["index_dir"] / "clean" / ALIASES_FILE
    assert evaluate_files(ranked, labels, "jsonl", aliases=aliases).map == 1.0


def test_rankd_eval_takes_the_aliases_file(cleaned: dict[str, Any], tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    aliases = json.loads((cleaned["index_dir"] / "clean" / ALIASES_FILE).read_text())
    exact_of = next(kept for kept, merged in aliases.items() if "900" in merged)
    labels = tmp_path / "labels.jsonl"
    labels.write_text(json.dumps({"id": "q", "relevant": ["900"]}) + "\n")
    ranked = tmp_path / "ranked.jsonl"
    ranked.write_text(json.dumps({"id": "q", "ranked": [exact_of]}) + "\n")
    assert main(["eval", "--submission", str(ranked), "--labels", str(labels), "--format",
                 "jsonl", "--aliases", str(cleaned["index_dir"] / "clean" / ALIASES_FILE),
                 "--json", str(tmp_path / "report.json")]) == 0
    assert json.loads((tmp_path / "report.json").read_text())["map"] == 1.0


def test_dedup_off_is_byte_identical_to_a_plain_build(tmp_path: Path,
                                                      embedder: Embedder) -> None:
    plain = build_collection(_sample(), embedder, tmp_path / "plain", "clean",
                             show_progress=False)
    assert main(_build(sample_catalog_path(), tmp_path / "off", "--dedup", "off")) == 0
    off = tmp_path / "off" / "clean"
    names = sorted(p.name for p in plain.iterdir() if p.name != "manifest.json")
    assert names == sorted(p.name for p in off.iterdir() if p.name != "manifest.json")
    for name in names:
        assert (plain / name).read_bytes() == (off / name).read_bytes(), name
    first = json.loads((plain / "manifest.json").read_text())
    second = json.loads((off / "manifest.json").read_text())
    first.pop("created_at")
    second.pop("created_at")
    assert first == second


def test_noise_rules_and_the_normal_form() -> None:
    spec = CleaningSpec(filter_noise=True, min_chars=3, max_chars=20)
    assert noise_rule("   ", spec) == "empty"
    assert noise_rule("<div>&nbsp;</div>", spec) == "markup_only"
    assert noise_rule("<b>bold</b> words", spec) is None
    assert noise_rule("3.14 - 2", spec) == "digits_only"
    assert noise_rule("ab", spec) == "too_short"
    assert noise_rule("x" * 21, spec) == "too_long"
    assert noise_rule("x" * 21, CleaningSpec()) is None
    assert normal_form("  Ｆｕｌｌ\u00a0WIDTH\tText ") == normal_form("full width text")


def test_near_groups_never_chain_dissimilar_entries() -> None:
    # a~b and b~c at 0.96, but a and c only at 0.85: c must not join a's group.
    angle_ab = np.arccos(0.96)
    a = np.array([1.0, 0.0])
    b = np.array([np.cos(angle_ab), np.sin(angle_ab)])
    c = np.array([np.cos(2 * angle_ab), np.sin(2 * angle_ab)])
    vectors = np.ascontiguousarray(np.stack([a, b, c]), dtype=np.float32)
    assert float(vectors[0] @ vectors[2]) < 0.95
    groups, _ = near_groups(vectors, 0.95, [0, 1, 2])
    assert groups == {0: [1]}


def test_keep_longest_keeps_the_longest_text(embedder: Embedder) -> None:
    entries = [CatalogEntry("1", "Adds fractions wrongly"),
               CatalogEntry("2", "adds   FRACTIONS wrongly"),
               CatalogEntry("3", "Something else entirely")]
    first = clean_catalog(entries, CleaningSpec(dedup=DedupMode.EXACT))
    assert first.aliases == {"1": ["2"]}
    longest = clean_catalog(entries, CleaningSpec(dedup=DedupMode.EXACT, keep=KeepRule.LONGEST))
    assert longest.aliases == {"2": ["1"]}
    assert [e.id for e in longest.entries] == ["2", "3"]
    near = clean_catalog(entries, CleaningSpec(dedup=DedupMode.NEAR), embedder.encode)
    assert near.vectors is not None
    assert near.vectors.shape == (2, embedder.dimension)
    np.testing.assert_allclose(near.vectors, embedder.encode([e.text for e in near.entries]),
                               atol=1e-5)


def test_bad_cleaning_options_are_one_line_errors(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert main(_build(sample_catalog_path(), tmp_path, "--dedup", "near", "--near-threshold",
                       "1.5")) == 2
    err = capsys.readouterr().err.strip()
    assert err == "rankd index build: --near-threshold must be in (0, 1], got 1.5"
