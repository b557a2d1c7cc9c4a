"""The demo model's corpus: docstrings and comments of the running interpreter's standard library.

Extraction is deterministic for a given Python build: the stdlib directory
(``sysconfig.get_paths()["stdlib"]``) is walked in sorted order; test suites, IDLE, lib2to3,
the generated codec tables of ``encodings``, bundled wheels and site-packages are skipped;
every ``.py`` file is parsed with :mod:`ast` (docstrings of modules, classes and functions via
:func:`ast.get_docstring`) and :mod:`tokenize` (blocks of consecutive whole-line comments), and
each file's documents are kept in source order. Each text is kept once.

The held-out split is by module: a module is held out when the SHA-256 of its dotted name,
read as an integer, is divisible by ``HELDOUT_MODULUS``. Nothing of a held-out module is used
for the tokenizer, training or calibration, and held-out texts that also occur in a training
module are dropped.

``python -m brownout_jax.demos.demo_corpus --calib FILE.jsonl`` writes calibration text
(training documents only, shuffled with a fixed seed) for ``brownout-jax unite``;
``--heldout FILE.jsonl`` the held-out documents (shuffled with a fixed seed), the default text
of ``brownout-jax eval quality`` (``eval/tasks/docstring_heldout.jsonl``).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import hashlib
import io
import json
import os
import platform
import random
import re
import sys
import sysconfig
import tokenize
from collections.abc import Iterator
from pathlib import Path

HELDOUT_MODULUS = 10
SKIPPED_DIRS = frozenset(
    {
        "__pycache__",
        "dist-packages",
        "encodings",  # generated codec tables: comment lines like "0x41 -> LATIN CAPITAL A"
        "ensurepip",
        "idlelib",
        "lib-dynload",
        "lib2to3",
        "pydoc_data",
        "site-packages",
        "test",
        "tests",
        "turtledemo",
    }
)
MIN_DOC_CHARS = 12
_COMMENT_NOISE = re.compile(r"^(!|-\*-|\s*(noqa|type:|pragma|fmt:|XXX$))", re.IGNORECASE)
_HAS_WORD = re.compile(r"[A-Za-z]{3}")


@dataclasses.dataclass(frozen=True, slots=True)
class Document:
    module: str  # dotted module name, e.g. "json.decoder"
    kind: str  # "docstring" or "comment"
    line: int  # first line in the source file (0: module docstring)
    text: str


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def python_build() -> dict[str, str]:
    """Which interpreter the corpus came from (the text differs between Python versions)."""
    return {
        "version": platform.python_version(),
        "implementation": platform.python_implementation(),
        "full": sys.version,
        "stdlib": str(stdlib_dir()),
    }


def is_heldout(module: str) -> bool:
    digest = hashlib.sha256(module.encode()).hexdigest()
    return int(digest, 16) % HELDOUT_MODULUS == 0


def module_files(root: Path | None = None) -> Iterator[tuple[str, Path]]:
    """(dotted module name, path) of every stdlib source file, in sorted walk order."""
    root = root or stdlib_dir()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(
            d for d in dirnames if d not in SKIPPED_DIRS and not d.startswith("config-")
        )
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            path = Path(dirpath) / name
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            if parts:
                yield ".".join(parts), path


def _docstrings(tree: ast.Module) -> Iterator[tuple[int, str]]:
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    for node in ast.walk(tree):
        if isinstance(node, kinds):
            text = ast.get_docstring(node, clean=True)
            if text:
                yield getattr(node, "lineno", 0), text.strip()


def _comments(source: str) -> Iterator[tuple[int, str]]:
    """Blocks of comments on consecutive lines, '#' and the following space removed."""
    block: list[str] = []
    first = last = -2
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type != tokenize.COMMENT or not tok.line.lstrip().startswith("#"):
                continue  # whole-line comments only; trailing ones are fragments
            line = tok.start[0]
            text = tok.string.lstrip("#").strip()
            if line != last + 1 and block:
                yield first, "\n".join(block)
                block = []
            if not block:
                first = line
            last = line
            if text and not _COMMENT_NOISE.match(text):
                block.append(text)
    except (tokenize.TokenError, SyntaxError):
        pass
    if block:
        yield first, "\n".join(block)


def file_documents(module: str, path: Path, comments: bool = True) -> list[Document]:
    try:
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source)
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    found = [(line, "docstring", text) for line, text in _docstrings(tree)]
    if comments:
        found += [(line, "comment", text) for line, text in _comments(source)]
    found.sort(key=lambda item: (item[0], item[1]))
    return [
        Document(module, kind, line, text)
        for line, kind, text in found
        if len(text) >= MIN_DOC_CHARS and _HAS_WORD.search(text)
    ]


def documents(heldout: bool | None = None, comments: bool = True) -> list[Document]:
    """All documents of the standard library; ``heldout`` True/False keeps one side only."""
    out: list[Document] = []
    for module, path in module_files():
        if heldout is not None and is_heldout(module) != heldout:
            continue
        out.extend(file_documents(module, path, comments))
    return out


def split_documents(comments: bool = True) -> tuple[list[Document], list[Document]]:
    """(training, held-out) documents, each text once: repeats are dropped, and a held-out
    document whose text also occurs in a training module (shared boilerplate) is dropped."""
    train: list[Document] = []
    heldout: list[Document] = []
    seen: set[str] = set()
    for doc in documents(None, comments):
        if not is_heldout(doc.module) and doc.text not in seen:
            seen.add(doc.text)
            train.append(doc)
    for doc in documents(True, comments):
        if doc.text not in seen:
            seen.add(doc.text)
            heldout.append(doc)
    return train, heldout


def write_calibration(path: Path, max_docs: int = 2000, seed: int = 0) -> int:
    """Training documents (never held-out ones), shuffled, as JSONL records with ``text``."""
    train, _ = split_documents()
    random.Random(seed).shuffle(train)
    chosen = train[:max_docs]
    with path.open("w", encoding="utf-8") as f:
        for doc in chosen:
            f.write(json.dumps({"text": doc.text}) + "\n")
    return len(chosen)


def write_heldout(path: Path, seed: int = 0) -> int:
    """Held-out documents (never trained on), shuffled so that any prefix samples many
    modules, as JSONL records with ``text``."""
    _, heldout = split_documents()
    random.Random(seed).shuffle(heldout)
    with path.open("w", encoding="utf-8") as f:
        for doc in heldout:
            f.write(json.dumps({"text": doc.text}) + "\n")
    return len(heldout)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calib", type=Path, help="write calibration JSONL here")
    parser.add_argument("--max-docs", type=int, default=2000)
    parser.add_argument("--heldout", type=Path, help="write the held-out documents here (JSONL)")
    args = parser.parse_args(argv)
    train, heldout = split_documents()
    chars = sum(len(d.text) for d in train), sum(len(d.text) for d in heldout)
    print(
        f"Python {platform.python_version()}: {len(train)} training documents ({chars[0]} chars), "
        f"{len(heldout)} held-out ({chars[1]} chars)"
    )
    if args.calib:
        n = write_calibration(args.calib, args.max_docs)
        print(f"wrote {n} training documents to {args.calib}")
    if args.heldout:
        n = write_heldout(args.heldout)
        print(f"wrote {n} held-out documents to {args.heldout}")


if __name__ == "__main__":
    main()
