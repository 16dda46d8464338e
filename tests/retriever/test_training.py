"""`rankd train-retriever`: pairs, the question split, hard-negative mining, the batch sampler,
and a short real training run whose model is indexed and served through the real app."""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from rankd.cli import main
from retriever import Embedder, build_collection, load_collection
from retriever.catalog import CatalogEntry
from retriever.data import (
    SAMPLE_COLLECTION,
    SAMPLE_ID_COLUMN,
    SAMPLE_TEXT_COLUMN,
    sample_catalog_path,
    sample_entries,
    sample_queries_path,
)
from retriever.eedi import eedi_queries
from retriever.pairs import (
    TrainingError,
    TrainingPair,
    check_positives,
    fold_of,
    read_pairs,
    split_pairs,
    validation_set,
    with_train_fraction,
    without_fold,
)
from retriever.training import NegativeSampling, mine_hard_negatives, parse_window
from service.settings import Settings
from tests.support.apps import app_client

EEDI_COLUMNS = ["QuestionId", "ConstructId", "ConstructName", "SubjectId", "SubjectName",
                "CorrectAnswer", "QuestionText", "AnswerAText", "AnswerBText", "AnswerCText",
                "AnswerDText", "MisconceptionAId", "MisconceptionBId", "MisconceptionCId",
                "MisconceptionDId"]


def _entries() -> list[CatalogEntry]:
    return sample_entries()


def write_eedi_csv(path: Path, entries: list[CatalogEntry]) -> Path:
    """An Eedi-layout train.csv built from the sample catalogue.

    Two questions per (topic, up to three misconceptions); answer A is correct and each wrong
    answer carries half the words of its misconception's name (the even words in the first
    question, the odd ones in the second), so a query resembles its positive without repeating
    it and every misconception labels two questions. The last question's answer D has no label.
    """
    by_topic: dict[str, list[CatalogEntry]] = defaultdict(list)
    for entry in entries:
        by_topic[str(entry.metadata["Topic"])].append(entry)
    rows = []
    for variant in (0, 1):
        for topic, group in sorted(by_topic.items()):
            for start in range(0, len(group), 3):
                chunk = group[start:start + 3]
                number = len(rows) + 1
                row = {"QuestionId": str(number), "ConstructId": "1",
                       "ConstructName": f"Questions on {topic.lower()}", "SubjectId": "1",
                       "SubjectName": topic, "CorrectAnswer": "A",
                       "QuestionText": f"Question {number} about {topic.lower()}",
                       "AnswerAText": "the correct working", "MisconceptionAId": ""}
                for answer, entry in zip("BCD", chunk + [None] * (3 - len(chunk)), strict=True):
                    text = " ".join(entry.text.split()[variant::2]) if entry else "a guess"
                    row[f"Answer{answer}Text"] = text
                    row[f"Misconception{answer}Id"] = f"{entry.id}.0" if entry else ""
                rows.append(row)
    rows[-1]["MisconceptionDId"] = ""
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=EEDI_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def eedi_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_eedi_csv(tmp_path_factory.mktemp("eedi") / "train.csv", _entries())


# ---------------------------------------------------------------- pairs


def test_eedi_pairs_come_from_the_shared_query_template(eedi_csv: Path) -> None:
    pairs = read_pairs(eedi_csv, "eedi")
    labelled = [q for q in eedi_queries(eedi_csv) if q.misconception_id is not None]
    assert [p.query for p in pairs] == [q.text for q in labelled]
    assert [(p.query_id, p.group, p.positive_id) for p in pairs] == [
        (q.id, q.question_id, q.misconception_id) for q in labelled]
    with eedi_csv.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    wrong_answers_with_a_label = sum(1 for row in rows for a in "BCD" if row[f"Misconception{a}Id"])
    assert len(pairs) == wrong_answers_with_a_label
    check_positives(pairs, _entries())


def test_jsonl_pairs_group_by_the_given_group_or_the_query(tmp_path: Path) -> None:
    samples = [json.loads(line) for line in sample_queries_path().read_text().splitlines()]
    lines = [{"query": s["query"], "positive_id": s["relevant"][0]} for s in samples]
    lines[1]["group"] = "g1"
    lines[2]["group"] = "g1"
    lines[3]["positive_id"] = 7  # numbers are ids too
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n", encoding="utf-8")
    pairs = read_pairs(path, "jsonl")
    assert [p.query for p in pairs] == [s["query"] for s in samples]
    assert pairs[3].positive_id == "7"
    assert pairs[1].group == pairs[2].group == "g1"
    assert pairs[0].group == samples[0]["query"]
    check_positives(pairs, _entries())


@pytest.mark.parametrize(("line", "message"), [
    ("{not json", "pairs.jsonl:2: not valid JSON"),
    ('{"query": "x"}', "pairs.jsonl:2: field 'positive_id'"),
    ('{"query": "", "positive_id": "1"}', "pairs.jsonl:2: field 'query'"),
    ('["x", "1"]', "pairs.jsonl:2: expected a JSON object"),
])
def test_jsonl_errors_name_the_line_and_field(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"query": "q", "positive_id": "1"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(TrainingError, match=message):
        read_pairs(path, "jsonl")


def test_positives_missing_from_the_catalogue_are_rejected() -> None:
    pairs = [TrainingPair("a", "a", "query a", "1"), TrainingPair("b", "b", "query b", "9999")]
    with pytest.raises(TrainingError, match=r"1 positive id\(s\) are not in the catalogue \(9999\)"):
        check_positives(pairs, _entries())


def test_an_eedi_file_without_its_columns_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "train.csv"
    path.write_text("QuestionId,CorrectAnswer,MisconceptionBId\n1,A,5\n", encoding="utf-8")
    with pytest.raises(TrainingError, match=r"not an Eedi train\.csv"):
        read_pairs(path, "eedi")


# ---------------------------------------------------------------- split


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("fraction", [0.2, 0.5])
def test_the_split_never_puts_one_question_on_both_sides(eedi_csv: Path, seed: int,
                                                         fraction: float) -> None:
    pairs = read_pairs(eedi_csv, "eedi")
    split = split_pairs(pairs, fraction, seed=seed)
    train_groups = {p.group for p in split.train}
    validation_groups = {p.group for p in split.validation}
    assert train_groups
    assert validation_groups
    assert not train_groups & validation_groups
    assert sorted(split.train + split.validation, key=pairs.index) == pairs
    assert len(validation_groups) == round(fraction * len({p.group for p in pairs}))
    assert split_pairs(pairs, fraction, seed=seed) == split


@pytest.mark.parametrize("seed", [0, 3])
def test_the_test_split_is_apart_from_training_and_validation(eedi_csv: Path, seed: int) -> None:
    pairs = read_pairs(eedi_csv, "eedi")
    plain = split_pairs(pairs, 0.25, seed=seed)
    split = split_pairs(pairs, 0.25, seed=seed, test_fraction=0.2)
    groups = {name: {p.group for p in part} for name, part in
              (("train", split.train), ("validation", split.validation), ("test", split.test))}
    assert all(groups.values())
    assert not groups["train"] & groups["test"]
    assert not groups["validation"] & groups["test"]
    # Adding a test split never changes which questions validate: it comes out of training.
    assert split.validation == plain.validation
    assert sorted(split.train + split.test, key=pairs.index) == plain.train
    assert len(groups["test"]) == round(0.2 * len({p.group for p in pairs}))
    with pytest.raises(TrainingError, match="test fraction"):
        split_pairs(pairs, 0.5, seed=seed, test_fraction=0.5)


def test_a_train_fraction_keeps_whole_questions(eedi_csv: Path) -> None:
    split = split_pairs(read_pairs(eedi_csv, "eedi"), 0.25, seed=1, test_fraction=0.2)
    half = with_train_fraction(split, 0.5, seed=1)
    kept = {p.group for p in half.train}
    everything = {p.group for p in split.train}
    assert kept < everything
    assert len(kept) == round(0.5 * len(everything))
    assert half.train == [p for p in split.train if p.group in kept]
    assert (half.validation, half.test) == (split.validation, split.test)
    assert with_train_fraction(split, 1.0, seed=1) == split
    with pytest.raises(TrainingError, match="train fraction"):
        with_train_fraction(split, 0.0, seed=1)


def test_the_same_query_text_stays_on_one_side_in_jsonl(tmp_path: Path) -> None:
    lines = [{"query": f"query {n % 7}", "positive_id": str(n % 11 + 1)} for n in range(40)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines), encoding="utf-8")
    for seed in range(5):
        split = split_pairs(read_pairs(path, "jsonl"), 0.3, seed=seed)
        assert not {p.query for p in split.train} & {p.query for p in split.validation}


def test_holdout_withholds_ids_from_training_and_makes_them_unseen(eedi_csv: Path) -> None:
    pairs = read_pairs(eedi_csv, "eedi")
    plain = split_pairs(pairs, 0.3, seed=5)
    split = split_pairs(pairs, 0.3, holdout_fraction=0.25, seed=5)
    ids = {p.positive_id for p in pairs}
    assert len(split.held_out_ids) == round(0.25 * len(ids))
    assert not split.trained_ids & split.held_out_ids
    assert split.validation == plain.validation
    assert split.train == [p for p in plain.train if p.positive_id not in split.held_out_ids]
    assert split.dropped_pairs == len(plain.train) - len(split.train) > 0
    validation = validation_set(split)
    for key, relevant in validation.relevant.items():
        assert (key in validation.seen) == bool(relevant & split.trained_ids)
        if relevant <= split.held_out_ids:
            assert key not in validation.seen


def test_folds_partition_the_training_questions_and_leave_validation_alone(
        eedi_csv: Path) -> None:
    split = split_pairs(read_pairs(eedi_csv, "eedi"), 0.25, seed=3)
    left_out: list[TrainingPair] = []
    for fold in range(3):
        kept = without_fold(split, 3, fold, seed=3)
        assert kept.validation == split.validation
        assert kept.train == [p for p in split.train if fold_of(p.group, 3, 3) != fold]
        left_out += [p for p in split.train if p not in kept.train]
    # Every training pair is left out by exactly one fold, and a question never straddles two.
    assert sorted(left_out, key=split.train.index) == split.train
    assert all(len({fold_of(p.group, 3, 3) for p in split.train if p.group == g}) == 1
               for g in {p.group for p in split.train})
    assert {fold_of(p.group, 3, 3) for p in split.train} == {0, 1, 2}
    with pytest.raises(TrainingError, match="fold 3 of 3"):
        without_fold(split, 3, 3, seed=3)


@pytest.mark.parametrize(("validation", "holdout"), [(0.0, 0.0), (1.0, 0.0), (0.2, 1.0)])
def test_split_fractions_are_checked(eedi_csv: Path, validation: float, holdout: float) -> None:
    with pytest.raises(TrainingError, match="fraction"):
        split_pairs(read_pairs(eedi_csv, "eedi"), validation, holdout)


# ---------------------------------------------------------------- hard negatives


@pytest.fixture(scope="module")
def sample_collection(tmp_path_factory: pytest.TempPathFactory, embedder: Embedder) -> Any:
    directory = build_collection(_entries(), embedder, tmp_path_factory.mktemp("mining"),
                                 SAMPLE_COLLECTION, show_progress=False)
    return load_collection(directory)


@pytest.mark.parametrize("sampling", list(NegativeSampling))
def test_hard_negatives_never_include_the_positive(eedi_csv: Path, embedder: Embedder,
                                                   sample_collection: Any,
                                                   sampling: NegativeSampling) -> None:
    pairs = read_pairs(eedi_csv, "eedi")
    held_out = frozenset({pairs[0].positive_id, pairs[5].positive_id})
    # The window starts at rank 1, where the base model puts most positives.
    negatives = mine_hard_negatives(pairs, sample_collection, embedder, window=(1, 12), count=4,
                                    sampling=sampling, exclude_ids=held_out, seed=3)
    ranked = sample_collection.search(embedder.encode([p.query for p in pairs]), 12)
    positives_in_window = 0
    for pair, chosen, hits in zip(pairs, negatives, ranked, strict=True):
        ranks = [h.id for h in hits]
        positives_in_window += pair.positive_id in ranks
        assert pair.positive_id not in chosen
        assert not held_out & set(chosen)
        assert len(chosen) == len(set(chosen)) == 4
        assert set(chosen) <= set(ranks)
        if sampling is NegativeSampling.TOP:
            eligible = [i for i in ranks if i != pair.positive_id and i not in held_out]
            assert chosen == eligible[:4]
    assert positives_in_window > len(pairs) // 2  # the exclusion was really exercised


def test_negatives_skip_copies_of_the_positive_and_fill_in_after_the_window(
        tmp_path: Path, embedder: Embedder) -> None:
    entries = _entries()
    twin = CatalogEntry("twin", entries[0].text)  # same text as entry 1 under another id
    collection = load_collection(build_collection([*entries, twin], embedder, tmp_path, "c",
                                                  show_progress=False))
    pair = TrainingPair("q", "q", "Adds the numerators and the denominators of fractions", "1")
    hits = collection.search(embedder.encode([pair.query]), len(collection))[0]
    ranks = [h.id for h in hits]
    assert ranks.index("twin") < 3
    chosen = mine_hard_negatives([pair], collection, embedder, window=(1, 3), count=5)[0]
    assert "1" not in chosen
    assert "twin" not in chosen
    eligible = [i for i in ranks if i not in ("1", "twin")]
    assert chosen == eligible[:5]  # the window gave at most 2, the ranks after it the rest
    with pytest.raises(TrainingError, match="too few eligible entries"):
        mine_hard_negatives([pair], collection, embedder, window=(60, 70), count=10)


@pytest.mark.parametrize("text", ["5", "0-3", "9-4", "a-b", "3-"])
def test_bad_negative_windows_are_rejected(text: str) -> None:
    with pytest.raises(TrainingError, match="negative window"):
        parse_window(text)


# ---------------------------------------------------------------- batch sampler


def test_length_grouped_sampler_keeps_texts_unique_and_lengths_close() -> None:
    from datasets import Dataset
    from sentence_transformers.base.sampler import NoDuplicatesBatchSampler

    from retriever.training_components import LengthGroupedNoDuplicatesBatchSampler

    entries = _entries()
    # 300 rows, queries 10 to 400 characters long; 8 positives repeat 15 times each.
    rows = [{"anchor": f"query {n} " + "x" * (10 + (n * 37) % 390),
             "positive": entries[n % 8].text if n < 120 else entries[8 + n % 58].text + f" {n}",
             "negative_1": entries[(n + 3) % 66].text}
            for n in range(300)]
    dataset = Dataset.from_list(rows)
    sampler = LengthGroupedNoDuplicatesBatchSampler(dataset, batch_size=16, drop_last=False,
                                                    seed=7)
    plans = []
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler)
        assert sorted(i for b in batches for i in b) == list(range(300))
        for batch in batches:
            texts = [t for i in batch for t in rows[i].values()]
            assert len(texts) == len(set(texts)), "a text appears twice in one batch"
        plans.append(batches)
    assert plans[0] != plans[1]
    sampler.set_epoch(0)
    assert list(sampler) == plans[0]  # seeded

    def padding(batches: list[list[int]]) -> int:
        return sum(len(b) * max(len(rows[i]["anchor"]) for i in b) for b in batches)

    upstream = list(NoDuplicatesBatchSampler(dataset, batch_size=16, drop_last=False, seed=7))
    assert padding(plans[0]) < 0.8 * padding(upstream)


# ---------------------------------------------------------------- a real training run


@pytest.fixture(scope="module")
def trained(eedi_csv: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """`rankd train-retriever` on the tiny Eedi file: two epochs of a few steps."""
    output = tmp_path_factory.mktemp("trained") / "model"
    argv = ["train-retriever", "--train", str(eedi_csv), "--format", "eedi",
            "--catalog", str(sample_catalog_path()), "--output", str(output),
            "--device", "cpu", "--epochs", "2", "--batch-size", "8", "--lr", "1e-4",
            "--negatives", "2", "--negative-window", "2-20", "--validation-fraction", "0.25",
            "--holdout-misconceptions", "0.1", "--seed", "11", "--quiet"]
    assert main(argv) == 0
    report = json.loads((output / "training_report.json").read_text())
    return {"output": output, "report": report}


@pytest.mark.slow
def test_training_lowers_the_contrastive_loss(trained: dict[str, Any], eedi_csv: Path,
                                              embedder: Embedder) -> None:
    import torch
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    split = split_pairs(read_pairs(eedi_csv, "eedi"), 0.25, 0.1, seed=11, test_fraction=0.2)
    text = {e.id: e.text for e in _entries()}
    anchors = [p.query for p in split.train]
    positives = [text[p.positive_id] for p in split.train]

    def loss_of(model: Any) -> float:
        model.eval()
        with torch.no_grad():
            features = [model.tokenize(anchors), model.tokenize(positives)]
            return float(MultipleNegativesRankingLoss(model)(features, None))

    before = loss_of(embedder.model)
    after = loss_of(Embedder.load(str(trained["output"]), device="cpu").model)
    assert after < 0.9 * before
    logged = trained["report"]["train_loss"]
    assert len(logged) >= 2
    assert logged[-1]["loss"] < logged[0]["loss"]


@pytest.mark.slow
def test_report_keeps_the_best_epoch_and_splits_seen_from_unseen(trained: dict[str, Any]) -> None:
    report = trained["report"]
    assert report["status"] == "complete"
    epochs = report["epochs"]
    assert len(epochs) == 2
    best = max(epochs, key=lambda e: e["validation_map@25"])
    for name in ("map@25", "recall@25"):
        assert report["fine_tuned"][f"validation_{name}"] == pytest.approx(
            best[f"validation_{name}"], abs=2e-4)
    assert Path(report["best_checkpoint"]).is_dir()
    assert Path(report["best_checkpoint"]).name == f"checkpoint-{best['step']}"
    queries = report["validation_queries"]
    assert queries["seen"] > 0
    assert queries["unseen"] > 0
    assert queries["seen"] + queries["unseen"] == queries["total"]
    for metrics in (report["zero_shot"], report["fine_tuned"]):
        assert metrics["validation_seen_queries"] == queries["seen"]
        assert metrics["validation_unseen_queries"] == queries["unseen"]
        for subset in ("seen_", "unseen_", ""):
            assert 0 <= metrics[f"validation_{subset}map@25"] <= metrics[f"validation_{subset}recall@25"] <= 1
    assert report["held_out_ids"]
    assert len(report["seconds"]["train_epochs"]) == 2
    assert report["peak_rss_mib"] > 0


@pytest.mark.slow
def test_the_validation_and_test_questions_are_written_for_the_pipeline(
        trained: dict[str, Any], eedi_csv: Path) -> None:
    report = trained["report"]
    validation = eedi_queries(trained["output"] / "validation.csv")
    assert {q.question_id for q in validation} == set(report["validation_groups"])
    assert len(validation) == report["pairs"]["validation"]
    test = eedi_queries(trained["output"] / "test.csv")
    assert {q.question_id for q in test} == set(report["test_groups"])
    assert len(test) == report["pairs"]["test"] > 0
    # No test question was trained on or chose the checkpoint: the file's questions are
    # neither validation's nor among the training pairs the split (read apart) leaves.
    split = split_pairs(read_pairs(eedi_csv, "eedi"), 0.25, 0.1, seed=11, test_fraction=0.2)
    assert not {q.question_id for q in test} & ({p.group for p in split.train}
                                                 | set(report["validation_groups"]))


@pytest.fixture(scope="module")
def trained_index(trained: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The sample catalogue indexed by `rankd index build --model <trained model>`."""
    output: Path = trained["output"]
    index_dir = tmp_path_factory.mktemp("trained-index")
    assert main(["index", "build", "--catalog", str(sample_catalog_path()),
                 "--id-column", SAMPLE_ID_COLUMN, "--text-column", SAMPLE_TEXT_COLUMN,
                 "--collection", SAMPLE_COLLECTION, "--index-dir", str(index_dir),
                 "--model", str(output), "--device", "cpu", "--quiet"]) == 0
    fine_tuned = Embedder.load(str(output), device="cpu")
    collection = load_collection(index_dir / SAMPLE_COLLECTION)
    query = "Work out 2/3 divided by 4/5. Correct answer: 10/12. Incorrect answer: 12/10"
    return {"settings": Settings(index_dir=index_dir, embedder_model=str(output), embedder_device="cpu",
                                 reranker_backend="none"),
            "name": fine_tuned.name, "output": str(output.resolve()),
            "manifest_embedder": collection.manifest.embedder, "query": query,
            "expected": [h.id for h in collection.search(fine_tuned.encode([query]), 5)[0]]}


@pytest.mark.slow
async def test_the_trained_model_indexes_and_serves_rank(trained_index: dict[str, Any]) -> None:
    assert trained_index["name"] == trained_index["output"] == trained_index["manifest_embedder"]
    async with app_client(trained_index["settings"]) as (_, client):
        response = await client.post("/rank", json={"query": trained_index["query"], "top_k": 5})
    assert response.status_code == 200
    assert [r["id"] for r in response.json()["results"]] == trained_index["expected"]


# ---------------------------------------------------------------- the command line


def test_cli_rejects_bad_options_before_loading_anything(
        eedi_csv: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["train-retriever", "--train", str(eedi_csv), "--format", "eedi",
            "--catalog", str(sample_catalog_path()), "--output", str(tmp_path / "out")]
    assert main([*base, "--negative-window", "50-5"]) == 2
    assert "negative window '50-5'" in capsys.readouterr().err
    assert main([*base, "--batch-size", "1"]) == 2
    assert "batch size must be at least 2" in capsys.readouterr().err
    assert main([*base, "--folds", "2", "--fold", "2"]) == 2
    assert "--fold must be in [0, --folds)" in capsys.readouterr().err
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("keep me")
    assert main([*base, "--overwrite"]) == 2
    assert "not an earlier training run" in capsys.readouterr().err
    assert (tmp_path / "out" / "notes.txt").read_text() == "keep me"
    assert main([*base[:-1], str(tmp_path / "new"), "--catalog", str(eedi_csv)]) == 2
    assert "no column 'MisconceptionId'" in capsys.readouterr().err

