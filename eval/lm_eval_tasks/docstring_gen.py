"""Prompt/target pairs of ``demo_docstring_gen`` (docstring_gen.yaml), loaded by lm-eval
through ``!function``; lm-eval's dataset objects come in, nothing of the project is imported."""

import re

# Shorter paragraphs leave a prompt or a target of one or two words, which says little about a
# completion; the docstring_mc task's sentences use the same kind of floor.
MIN_WORDS = 6
_WORD = re.compile(r"\S+")


def split_paragraph(text: str) -> tuple[str, str] | None:
    """(prompt, target) of ``text``'s first paragraph cut before its middle word, or None when
    it is too short. The paragraph keeps its line breaks: the model saw docstrings wrapped."""
    paragraph = text.split("\n\n", 1)[0]
    starts = [m.start() for m in _WORD.finditer(paragraph)]
    if len(starts) < MIN_WORDS:
        return None
    cut = starts[len(starts) // 2]
    return paragraph[:cut].rstrip(), paragraph[cut:].rstrip()


def process_docs(dataset):
    def add_fields(doc):
        context, target = split_paragraph(doc["text"])
        return {"context": context, "target": target}

    return dataset.filter(lambda doc: split_paragraph(doc["text"]) is not None).map(add_fields)
