"""Prompt/target pairs of ``demo_docstring_gen`` (docstring_gen.yaml), loaded by lm-eval
through ``!function``; lm-eval's dataset objects come in, nothing of the project is imported."""

# Shorter first lines leave a prompt or a target of one or two words, which says little about
# a completion; the docstring_mc task's sentences use the same kind of floor.
MIN_WORDS = 6


def split_line(text: str) -> tuple[str, str] | None:
    """(first half, second half) of the words of ``text``'s first line, or None when the line
    is too short. Whitespace inside the line collapses to single spaces."""
    words = text.split("\n", 1)[0].split()
    if len(words) < MIN_WORDS:
        return None
    cut = len(words) // 2
    return " ".join(words[:cut]), " ".join(words[cut:])


def process_docs(dataset):
    def add_fields(doc):
        context, target = split_line(doc["text"])
        return {"context": context, "target": target}

    return dataset.filter(lambda doc: split_line(doc["text"]) is not None).map(add_fields)
