"""The Eedi competition layout: one query per (question, incorrect answer with a misconception).

This is the one place that turns an Eedi row into query text; the batch client and retriever
training both use it, so what the model is trained on is what it is queried with.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

ANSWERS = ("A", "B", "C", "D")

DEFAULT_QUERY_TEMPLATE = (
    "{ConstructName}. {SubjectName}. {QuestionText} Correct answer: {CorrectAnswerText}. "
    "Incorrect answer: {IncorrectAnswerText}"
)
TEMPLATE_FIELDS = ("ConstructName", "SubjectName", "QuestionText", "CorrectAnswer",
                   "CorrectAnswerText", "IncorrectAnswer", "IncorrectAnswerText", "QuestionId")


@dataclass(frozen=True)
class EediQuery:
    id: str  # QuestionId_Answer, the competition's row key
    question_id: str
    text: str
    misconception_id: str | None  # None where the row has no label


def _misconception(value: str | None) -> str | None:
    if value is None or not value.strip():
        return None
    number = float(value)
    return str(int(number)) if number.is_integer() else value.strip()


def validate_template(template: str) -> None:
    try:
        template.format(**dict.fromkeys(TEMPLATE_FIELDS, ""))
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(
            f"query template uses an unknown field or bad braces ({exc!r}); fields are "
            + ", ".join("{" + f + "}" for f in TEMPLATE_FIELDS)
        ) from None


def eedi_queries(path: str | Path, template: str = DEFAULT_QUERY_TEMPLATE,
                 labelled_only: bool = True) -> list[EediQuery]:
    """Queries in file order, answers A-D within a question.

    ``labelled_only`` keeps incorrect answers that carry a misconception id (the competition's
    scored rows); otherwise every incorrect answer becomes a query.
    """
    validate_template(template)
    queries = []
    with Path(path).open(newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            correct = row["CorrectAnswer"].strip()
            for answer in ANSWERS:
                if answer == correct:
                    continue
                label = _misconception(row.get(f"Misconception{answer}Id"))
                if labelled_only and label is None:
                    continue
                text = template.format(
                    ConstructName=row["ConstructName"].strip(),
                    SubjectName=row["SubjectName"].strip(),
                    QuestionText=row["QuestionText"].strip(),
                    CorrectAnswer=correct,
                    CorrectAnswerText=row[f"Answer{correct}Text"].strip(),
                    IncorrectAnswer=answer,
                    IncorrectAnswerText=row[f"Answer{answer}Text"].strip(),
                    QuestionId=row["QuestionId"],
                )
                queries.append(EediQuery(f"{row['QuestionId']}_{answer}", row["QuestionId"],
                                         text, label))
    return queries
