"""Structured output: grammar-constrained greedy decodes over random logits with the demo
tokenizer end in valid text; the JAX bitmask equals its NumPy reference and xgrammar's own."""

from __future__ import annotations

import json
import re
import sys
import threading
from pathlib import Path

import jax
import numpy as np
import pytest

from brownout_jax.engine.requests import RequestError, StructuredKind, StructuredOutput
from brownout_jax.engine.structured_output import (
    FIELD,
    INSTALL_HINT,
    StructuredConfig,
    StructuredOutputCompiler,
    apply_token_bitmask,
    apply_token_bitmask_numpy,
    mask_words,
    token_mask,
)

pytest.importorskip("xgrammar")  # the dev extras carry it; the missing case is tested below
DEMO = Path(__file__).resolve().parent.parent / "checkpoints" / "demo"
VOCAB = 4096  # the demo model's vocab_size
PADDED_VOCAB = 4100  # more ids than the tokenizer's, not a multiple of 32

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "kind": {"enum": ["cat", "dog", "bird"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 99},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "maxItems": 3},
        "owner": {
            "type": "object",
            "properties": {
                "id": {"type": "integer", "minimum": 0, "maximum": 9999},
                "verified": {"type": "boolean"},
                "level": {"enum": ["low", "high"]},
            },
            "required": ["id", "verified", "level"],
        },
        "pets": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"kind": {"enum": ["cat", "dog"]}},
                "required": ["kind"],
            },
            "minItems": 1,
            "maxItems": 2,
        },
    },
    "required": ["name", "kind", "age", "tags", "owner", "pets"],
}


def validate(value, schema: dict, path: str = "$") -> None:
    """The constructs SCHEMA uses, with xgrammar's strict mode (no undeclared members)."""
    if "enum" in schema:
        assert value in schema["enum"], f"{path}: {value!r} not in {schema['enum']}"
    kind = schema.get("type")
    if kind == "object":
        assert isinstance(value, dict), path
        assert set(schema.get("required", ())) <= value.keys(), f"{path}: missing members"
        assert value.keys() <= schema["properties"].keys(), f"{path}: undeclared members"
        for key, item in value.items():
            validate(item, schema["properties"][key], f"{path}.{key}")
    elif kind == "array":
        assert isinstance(value, list), path
        assert schema.get("minItems", 0) <= len(value) <= schema.get("maxItems", 1 << 30), path
        for i, item in enumerate(value):
            validate(item, schema["items"], f"{path}[{i}]")
    elif kind == "string":
        assert isinstance(value, str) and len(value) <= schema.get("maxLength", 1 << 30), path
    elif kind == "integer":
        assert isinstance(value, int) and not isinstance(value, bool), path
        assert schema.get("minimum", -(1 << 60)) <= value <= schema.get("maximum", 1 << 60), path
    elif kind == "boolean":
        assert isinstance(value, bool), path


def test_validator_refuses_what_the_schema_forbids():
    good = {
        "name": "a",
        "kind": "cat",
        "age": 3,
        "tags": [],
        "owner": {"id": 1, "verified": True, "level": "low"},
        "pets": [{"kind": "dog"}],
    }
    validate(good, SCHEMA)
    for bad in (
        {**good, "kind": "cow"},
        {**good, "age": 100},
        {**good, "tags": ["a", "b", "c", "d"]},
        {**good, "name": "ninechars"},
        {**good, "owner": {"id": 1, "verified": 1, "level": "low"}},
        {**good, "pets": []},
        {**good, "extra": 1},
        {key: v for key, v in good.items() if key != "owner"},
    ):
        with pytest.raises(AssertionError):
            validate(bad, SCHEMA)


@pytest.fixture(scope="module")
def tokenizer():
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(DEMO)


@pytest.fixture(scope="module")
def compiler(tokenizer):
    return StructuredOutputCompiler(tokenizer, VOCAB)


@pytest.fixture(scope="module")
def padded_compiler(tokenizer):
    return StructuredOutputCompiler(tokenizer, PADDED_VOCAB)


_masked = jax.jit(apply_token_bitmask)


def _allowed(row: np.ndarray, vocab: int) -> np.ndarray:
    return np.flatnonzero(np.unpackbits(row.view(np.uint8), bitorder="little")[:vocab])


def decode(compiler, tokenizer, structured, *, seed=0, closing_bias=0.0, max_steps=300) -> str:
    """Greedy over random logits, each step masked by the matcher on the JAX path; checks
    every step against the NumPy reference and the grammar itself, returns the text."""
    vocab, rng = compiler.vocab_size, np.random.default_rng(seed)
    # Random JSON tends never to close; favouring the tokens that close keeps it short.
    bias = np.zeros(vocab, np.float32)
    for token in range(len(tokenizer)):
        if any(c in tokenizer.decode([token]) for c in '"}]'):
            bias[token] = closing_bias
    matcher = compiler.matcher(structured)
    mask = np.empty((1, compiler.words), np.int32)
    tokens, narrowed = [], False
    for _ in range(max_steps):
        if matcher.finished:
            break
        matcher.fill_mask(mask[0])
        allowed = _allowed(mask[0], vocab)
        assert allowed.size > 0 and allowed.max() < len(tokenizer)  # padding ids never
        narrowed |= allowed.size < len(tokenizer)
        logits = rng.standard_normal((1, vocab)).astype(np.float32) + bias
        masked = np.asarray(_masked(logits, mask))
        np.testing.assert_array_equal(masked, apply_token_bitmask_numpy(logits, mask))
        assert np.array_equal(np.flatnonzero(np.isfinite(masked[0])), allowed)
        refused = rng.choice(np.setdiff1d(np.arange(vocab), allowed))
        assert not matcher.accept(refused)  # the mask and the grammar agree (state kept)
        token = int(np.argmax(masked[0]))
        assert matcher.accept(token)
        tokens.append(token)
    else:
        pytest.fail(f"not finished in {max_steps} steps: {tokenizer.decode(tokens)!r}")
    assert narrowed
    matcher.fill_mask(mask[0])
    stops = matcher.stop_token_ids
    assert tuple(_allowed(mask[0], vocab)) == stops  # only a stop token may follow
    assert matcher.accept(stops[0]) and matcher.terminated
    return tokenizer.decode(tokens)


@pytest.mark.parametrize("seed", [0, 1])
def test_json_schema_decode_validates(compiler, tokenizer, seed):
    spec = StructuredOutput(StructuredKind.JSON_SCHEMA, json.dumps(SCHEMA))
    text = decode(compiler, tokenizer, spec, seed=seed, closing_bias=1.0)
    validate(json.loads(text), SCHEMA)


def test_json_object_decode_is_an_object(compiler, tokenizer):
    text = decode(compiler, tokenizer, StructuredOutput(StructuredKind.JSON_OBJECT), closing_bias=4)
    assert isinstance(json.loads(text), dict)


def test_regex_decode_matches_with_padded_vocabulary(padded_compiler, tokenizer):
    pattern = r"[a-z]{3,6}-\d{2,4}"
    text = decode(padded_compiler, tokenizer, StructuredOutput(StructuredKind.REGEX, pattern))
    assert re.fullmatch(pattern, text), text


def test_choice_decode_is_one_alternative(compiler, tokenizer):
    choices = ("red", "green", "light blue", 'say "hi"\\n\t')
    spec = StructuredOutput(StructuredKind.CHOICE, choices=choices)
    texts = {decode(compiler, tokenizer, spec, seed=seed) for seed in range(4)}
    assert texts <= set(choices)


def test_grammar_decode_matches(compiler, tokenizer):
    ebnf = 'root ::= "(" num (" + " num)? ")"\nnum ::= [1-9] [0-9]?'
    text = decode(compiler, tokenizer, StructuredOutput(StructuredKind.GRAMMAR, ebnf))
    assert re.fullmatch(r"\([1-9][0-9]?( \+ [1-9][0-9]?)?\)", text), text


def test_finished_only_when_nothing_but_a_stop_token_may_follow(compiler, tokenizer):
    matcher = compiler.matcher(StructuredOutput(StructuredKind.CHOICE, choices=("ab", "abab")))
    stop = matcher.stop_token_ids[0]
    assert not matcher.accept(stop)  # nothing complete yet
    for token in tokenizer.encode("ab", add_special_tokens=False):
        assert matcher.accept(token)
    assert not matcher.finished  # complete, but "abab" may still follow
    for token in tokenizer.encode("ab", add_special_tokens=False):
        assert matcher.accept(token)
    assert matcher.finished and not matcher.terminated
    assert not matcher.accept(tokenizer.encode("a", add_special_tokens=False)[0])
    assert matcher.accept(stop) and matcher.terminated and matcher.finished
    row = np.zeros(compiler.words, np.int32)
    matcher.fill_mask(row)  # after termination: still a valid row, stop tokens only
    assert tuple(_allowed(row, VOCAB)) == matcher.stop_token_ids


def test_mask_bits_are_the_tokens_the_grammar_accepts(compiler, tokenizer):
    """Bit j of word i ⇔ token 32i + j, against xgrammar's matcher token by token."""
    import xgrammar as xgr

    compiled = compiler.compile(StructuredOutput(StructuredKind.REGEX, r"[0-9]+(\.[a-f]+)?"))
    reference = xgr.GrammarMatcher(compiled)
    matcher = compiler.matcher(StructuredOutput(StructuredKind.REGEX, r"[0-9]+(\.[a-f]+)?"))
    for token in tokenizer.encode("12", add_special_tokens=False):
        assert reference.accept_token(token) and matcher.accept(token)
    row = np.empty(compiler.words, np.int32)
    matcher.fill_mask(row)
    accepted = [t for t in range(VOCAB) if reference.fork().accept_token(t)]
    assert 1 < len(accepted) < VOCAB // 2
    assert _allowed(row, VOCAB).tolist() == accepted


def test_mask_layout_equals_xgrammars_own_apply():
    torch = pytest.importorskip("torch")
    import xgrammar as xgr

    rng = np.random.default_rng(3)
    for vocab in (1, 31, 32, 33, 100, 4100):
        mask = rng.integers(-(2**31), 2**31, (3, mask_words(vocab)), dtype=np.int64)
        mask = mask.astype(np.int32)
        logits = rng.standard_normal((3, vocab)).astype(np.float32)
        theirs = torch.from_numpy(logits.copy())
        xgr.apply_token_bitmask_inplace(theirs, torch.from_numpy(mask), vocab_size=vocab)
        np.testing.assert_array_equal(apply_token_bitmask_numpy(logits, mask), theirs.numpy())


@pytest.mark.parametrize("vocab", [1, 31, 32, 33, 100, 4096, 4100])
@pytest.mark.parametrize("extra_words", [0, 2])
@pytest.mark.parametrize("dtype", [np.float32, jax.numpy.bfloat16])
def test_apply_token_bitmask_equals_numpy_reference(vocab, extra_words, dtype):
    rng = np.random.default_rng(vocab * 7 + extra_words)
    batch, words = 4, mask_words(vocab) + extra_words
    mask = rng.integers(-(2**31), 2**31, (batch, words), dtype=np.int64).astype(np.int32)
    mask[0] = -1  # every bit set: the row must come back unchanged
    one = int(rng.integers(vocab))
    mask[1] = token_mask([one], words)
    logits = rng.standard_normal((batch, vocab)).astype(dtype)
    got = np.asarray(jax.jit(apply_token_bitmask)(logits, mask))
    assert got.dtype == logits.dtype
    np.testing.assert_array_equal(got, apply_token_bitmask_numpy(logits, mask))
    np.testing.assert_array_equal(got[0], logits[0])
    assert np.flatnonzero(np.isfinite(got[1])).tolist() == [one] and got[1, one] == logits[1, one]


def test_apply_token_bitmask_refuses_a_mask_too_narrow():
    with pytest.raises(ValueError, match="covers 32 < 33"):
        apply_token_bitmask(np.zeros((1, 33), np.float32), np.zeros((1, 1), np.int32))


@pytest.mark.parametrize(
    "structured, says",
    [
        (StructuredOutput(StructuredKind.JSON_SCHEMA, '{"type": "objec"}'), "objec"),
        (StructuredOutput(StructuredKind.JSON_SCHEMA, '{"type": '), "not valid JSON"),
        (StructuredOutput(StructuredKind.REGEX, "(ab"), "parenthesis"),
        (StructuredOutput(StructuredKind.GRAMMAR, "root ::= missing"), "missing"),
        (StructuredOutput(StructuredKind.CHOICE), "at least one"),
    ],
)
def test_refused_spec_names_the_field(compiler, structured, says):
    with pytest.raises(RequestError) as caught:
        compiler.compile(structured)
    assert caught.value.field == FIELD == "structured"
    message = caught.value.message
    assert says in message and "\n" not in message
    assert ".cc:" not in message and "Check failed" not in message  # xgrammar's log noise


def test_without_xgrammar_a_structured_request_is_refused(tokenizer, monkeypatch):
    monkeypatch.setitem(sys.modules, "xgrammar", None)  # import raises ImportError
    compiler = StructuredOutputCompiler(tokenizer, VOCAB)
    assert not compiler.prepare()
    with pytest.raises(RequestError) as caught:
        compiler.compile(StructuredOutput(StructuredKind.JSON_OBJECT))
    assert caught.value.field == FIELD and INSTALL_HINT in caught.value.message


def test_without_a_tokenizer_a_structured_request_is_refused():
    compiler = StructuredOutputCompiler(None, VOCAB)
    with pytest.raises(RequestError, match="tokenizer"):
        compiler.compile(StructuredOutput(StructuredKind.JSON_OBJECT))


def test_cache_reuses_and_evicts_by_bytes(tokenizer):
    a = StructuredOutput(StructuredKind.REGEX, "a+")
    b = StructuredOutput(StructuredKind.REGEX, "b+")
    roomy = StructuredOutputCompiler(tokenizer, VOCAB)
    assert roomy.prepare() and roomy.cached_bytes == 0
    assert roomy.compile(a) is roomy.compile(a) and roomy.cached_bytes > 0
    tight = StructuredOutputCompiler(tokenizer, VOCAB, config=StructuredConfig(cache_bytes=1))
    first = tight.compile(a)
    assert tight.compile(a) is first  # the newest entry stays even over budget
    tight.compile(b)  # evicts a
    assert tight.compile(a) is not first
    assert tight.cached_bytes == tight.compile(a).memory_size_bytes


def test_compiles_from_several_threads(tokenizer):
    compiler = StructuredOutputCompiler(tokenizer, VOCAB)
    specs = [StructuredOutput(StructuredKind.REGEX, f"x{i}[a-z]{{1,{i + 1}}}") for i in range(6)]
    bad = StructuredOutput(StructuredKind.REGEX, "(")
    results, errors = [], []

    def work(offset: int) -> None:
        for i in range(len(specs)):
            index = (i + offset) % len(specs)
            results.append((index, compiler.matcher(specs[index])))
            try:
                compiler.compile(bad)
            except RequestError as error:
                errors.append(error.field)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 24 and errors == [FIELD] * 24
    for index, matcher in results:  # each matcher runs its own spec's grammar
        assert all(map(matcher.accept, tokenizer.encode(f"x{index}q", add_special_tokens=False)))
    for spec in specs:  # one cached grammar per spec after the race
        assert compiler.compile(spec) is compiler.compile(spec)
