"""Builds ``eval/tasks/docstring_mc.jsonl``: a PIQA-like multiple-choice task for the demo model.

    python eval/build_docstring_task.py [--items 500] [--seed 0] [--out FILE.jsonl]

Every item comes from the *held-out* docstrings of the demo model's corpus (standard-library
modules the model and its tokenizer never saw; ``brownout_jax.demos.demo_corpus``):
``goal`` is the first half of a docstring sentence, ``sol1``..``sol4`` are four candidate
continuations — the true one and the second halves of three sentences from other held-out
docstrings — and ``label`` is the 0-based index of the true one. A model scores each
``goal + " " + solN`` and picks the likeliest continuation; chance is 25 %.

Deterministic for a given Python build (fixed seed; the corpus is extracted in sorted order).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import re
from pathlib import Path

from brownout_jax.demos.demo_corpus import Document, split_documents

DEFAULT_OUT = Path(__file__).resolve().parent / "tasks" / "docstring_mc.jsonl"
MIN_WORDS, MAX_WORDS = 8, 40
SENTENCES_PER_DOCSTRING = 2
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_CODE_LIKE = re.compile(r">>>|\.\.\.|::|[{}\[\]<>=|\\]|__|\w\(|`")


def sentences(doc: Document) -> list[str]:
    """Prose sentences of a docstring: paragraphs without indented (code) lines, split at
    sentence ends, kept when they look like plain prose of 8-40 words ending with a period."""
    out = []
    for paragraph in re.split(r"\n\s*\n", doc.text):
        lines = paragraph.splitlines()
        if not lines or any(line.startswith((" ", "\t")) for line in lines):
            continue
        text = " ".join(line.strip() for line in lines)
        for sentence in _SENTENCE_END.split(text):
            words = sentence.split()
            if (
                MIN_WORDS <= len(words) <= MAX_WORDS
                and sentence.endswith(".")
                and sentence[0].isupper()
                and not _CODE_LIKE.search(sentence)
            ):
                out.append(" ".join(words))
    return out


def split_sentence(sentence: str) -> tuple[str, str]:
    words = sentence.split()
    cut = max(4, len(words) // 2)
    return " ".join(words[:cut]), " ".join(words[cut:])


def build_items(num_items: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    pool: list[tuple[int, str, str, str]] = []  # (docstring index, module, goal, ending)
    _, heldout = split_documents(comments=False)
    for index, doc in enumerate(heldout):
        for sentence in sentences(doc)[:SENTENCES_PER_DOCSTRING]:
            goal, ending = split_sentence(sentence)
            pool.append((index, doc.module, goal, ending))
    seen: set[str] = set()
    unique = []
    for entry in pool:  # one item per distinct goal (docstrings repeat across overloads)
        if entry[2] not in seen:
            seen.add(entry[2])
            unique.append(entry)
    chosen = rng.sample(unique, min(num_items, len(unique)))
    chosen.sort(key=lambda entry: unique.index(entry))
    items = []
    for number, (index, module, goal, ending) in enumerate(chosen):
        distractors: list[str] = []
        while len(distractors) < 3:
            other = rng.choice(unique)
            if other[0] != index and other[3] != ending and other[3] not in distractors:
                distractors.append(other[3])
        label = rng.randrange(4)
        solutions = [*distractors[:label], ending, *distractors[label:]]
        item = {"id": f"docstring-{number:04d}", "module": module, "goal": goal}
        item.update({f"sol{i + 1}": s for i, s in enumerate(solutions)})
        item["label"] = label
        items.append(item)
    return items


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    items = build_items(args.items, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", encoding="utf-8") as f:
        for item in items:
            f.write(json.dumps(item, ensure_ascii=False) + "\n")
    print(
        f"wrote {len(items)} items to {args.out} (held-out docstrings of the CPython "
        f"{platform.python_version()} standard library, seed {args.seed})"
    )


if __name__ == "__main__":
    main()
