"""Multiple-choice task files (JSONL) → uniform items, with format detection by fields.

Formats: PIQA (goal, sol1, sol2, label), COPA (premise, choice1, choice2, question, label),
OpenBookQA (question_stem or question.stem, choices, answerKey), C-Eval (question, A…D,
answer), and ``mc`` (goal, sol1…solN, label: the demo docstring task). A malformed line is
reported with its line number.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

FORMATS = ("auto", "piqa", "copa", "obqa", "ceval", "mc")
# The bundled demo tasks (installed with the package): multiple choice, and held-out text.
BUNDLED = Path(__file__).resolve().parent / "tasks"
DOCSTRING_MC = BUNDLED / "docstring_mc.jsonl"
DOCSTRING_HELDOUT = BUNDLED / "docstring_heldout.jsonl"


class TaskFormatError(ValueError):
    """A task file line cannot be read; the message names the file and line."""


@dataclasses.dataclass(frozen=True, slots=True)
class ChoiceItem:
    context: str
    choices: tuple[str, ...]
    label: int


def detect_format(record: dict) -> str:
    if "premise" in record and "choice1" in record:
        return "copa"
    if "question_stem" in record or (
        isinstance(record.get("question"), dict) and "stem" in record["question"]
    ):
        return "obqa"
    if "question" in record and all(k in record for k in "ABCD"):
        return "ceval"
    if "goal" in record and "sol1" in record:
        return "mc" if "sol3" in record else "piqa"
    raise KeyError("no known field set (goal/sol1, premise/choice1, question_stem, question+A-D)")


def _solutions(record: dict) -> tuple[str, ...]:
    out, i = [], 1
    while f"sol{i}" in record:
        out.append(str(record[f"sol{i}"]))
        i += 1
    return tuple(out)


def parse_record(record: dict, fmt: str) -> ChoiceItem:
    if fmt in ("piqa", "mc"):
        return ChoiceItem(str(record["goal"]), _solutions(record), int(record["label"]))
    if fmt == "copa":
        connective = "because" if record["question"] == "cause" else "so"
        premise = str(record["premise"]).rstrip(".")
        return ChoiceItem(
            f"{premise} {connective}",
            (str(record["choice1"]), str(record["choice2"])),
            int(record["label"]),
        )
    if fmt == "obqa":
        stem = record.get("question_stem") or record["question"]["stem"]
        choices = record.get("choices") or record["question"]["choices"]
        if isinstance(choices, dict):  # HF datasets: {"text": [...], "label": [...]}
            texts, labels = list(choices["text"]), list(choices["label"])
        else:
            texts = [c["text"] for c in choices]
            labels = [c["label"] for c in choices]
        return ChoiceItem(str(stem), tuple(texts), labels.index(record["answerKey"]))
    if fmt == "ceval":
        return ChoiceItem(
            str(record["question"]) + "\nAnswer:",
            tuple(str(record[k]) for k in "ABCD"),
            "ABCD".index(str(record["answer"]).strip()),
        )
    raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")


def load_task(path: str | Path, fmt: str = "auto") -> tuple[list[ChoiceItem], str]:
    """Items of a JSONL task file and the format used."""
    path = Path(path)
    if not path.is_file():
        raise TaskFormatError(f"{path}: task file not found")
    items: list[ChoiceItem] = []
    used = fmt
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise TypeError("not a JSON object")
            if used == "auto":
                used = detect_format(record)
            item = parse_record(record, used)
            if not 0 <= item.label < len(item.choices) or len(item.choices) < 2:
                raise ValueError(f"label {item.label} does not index {len(item.choices)} choices")
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, IndexError) as err:
            raise TaskFormatError(f"{path}:{number}: malformed {used} item ({err})") from err
        items.append(item)
    if not items:
        raise TaskFormatError(f"{path}: no items")
    return items, used
