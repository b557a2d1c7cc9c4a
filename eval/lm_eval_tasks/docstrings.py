"""Documents of ``demo_docstring_gen`` and ``demo_docstring_next_word`` (the yaml files here),
loaded by lm-eval through ``!function``; lm-eval's dataset objects come in, nothing of the
project is imported."""

import re

# Shorter paragraphs leave a prompt or a target of one or two words, which says little about a
# completion; the docstring_mc task's sentences use the same kind of floor.
MIN_WORDS = 6
_WORD = re.compile(r"\S+")


def split_paragraph(text: str) -> tuple[str, str, str] | None:
    """(prompt, next word, rest) of ``text``'s first paragraph cut before its middle word, or
    None when it is too short. The paragraph keeps its line breaks (the model saw docstrings
    wrapped); the next word keeps the whitespace before it, as the model has to produce it."""
    paragraph = text.split("\n\n", 1)[0]
    words = list(_WORD.finditer(paragraph))
    if len(words) < MIN_WORDS:
        return None
    middle = words[len(words) // 2]
    context = paragraph[: middle.start()].rstrip()
    return context, paragraph[len(context) : middle.end()], paragraph[middle.start() :].rstrip()


def _fields(doc) -> dict:
    context, next_word, target = split_paragraph(doc["text"])
    return {"context": context, "next_word": next_word, "target": target}


def process_docs(dataset):
    return dataset.filter(lambda doc: split_paragraph(doc["text"]) is not None).map(_fields)
