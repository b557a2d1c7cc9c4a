"""Structured output through the engine on the bundled demo model: every token a constrained
greedy decode emits is one the grammar allows (replayed through a fresh matcher), the text
parses and validates against a schema of nested objects, enums and arrays, an unconstrained
request in the same batch is unaffected, and refused specs name the field."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("xgrammar")

from test_structured_output import DEMO, SCHEMA, validate

from brownout_jax.engine.config import EngineConfig
from brownout_jax.engine.controller import ControllerConfig
from brownout_jax.engine.front import Engine
from brownout_jax.engine.requests import (
    FinishReason,
    GenerationRequest,
    RequestError,
    StructuredKind,
    StructuredOutput,
)


@pytest.fixture(scope="module")
def engine():
    config = EngineConfig(
        max_batch=4,
        max_prefill_batch=2,
        block_size=16,
        num_blocks=64,
        max_model_len=512,
        controller=ControllerConfig(mode="off"),
    )
    eng = Engine.from_checkpoint(DEMO, config=config, dtype="float32", progress=False)
    yield eng
    eng.shutdown(drain=False)


def _replay_allowed(engine, structured, token_ids) -> None:
    """Every token was allowed where it was emitted, the last ending the grammar."""
    matcher = engine.structured.matcher(structured)
    for i, token in enumerate(token_ids):
        assert matcher.accept(token), f"token {i} ({token}) is not allowed there"
    assert matcher.terminated


def test_schema_constrained_decode_is_valid_and_leaves_its_batch_alone(engine):
    schema = StructuredOutput(StructuredKind.JSON_SCHEMA, json.dumps(SCHEMA))
    prompt = "Write a JSON record of a person and their pets:"
    plain = GenerationRequest(prompt=prompt, max_new_tokens=24)
    alone = engine.submit(plain).result(timeout=300)
    constrained = engine.submit(
        GenerationRequest(prompt=prompt, max_new_tokens=400, structured=schema)
    )
    beside = engine.submit(plain)
    out = constrained.result(timeout=300)
    assert out.finish_reason == FinishReason.STOP, out.text
    _replay_allowed(engine, schema, out.token_ids)
    validate(json.loads(out.text), SCHEMA)
    assert beside.result(timeout=300).token_ids == alone.token_ids


def test_json_object_with_penalties_and_sampling(engine):
    structured = StructuredOutput(StructuredKind.JSON_OBJECT)
    out = engine.submit(
        GenerationRequest(
            prompt="A JSON object:",
            max_new_tokens=400,
            temperature=0.7,
            seed=5,
            presence_penalty=0.5,
            top_logprobs=3,
            min_tokens=2,
            ignore_eos=True,  # the grammar's end still ends it
            structured=structured,
        )
    ).result(timeout=300)
    assert out.finish_reason == FinishReason.STOP, out.text
    _replay_allowed(engine, structured, out.token_ids)
    assert isinstance(json.loads(out.text), dict)
    assert all(len(top) == 3 for top in out.top_logprobs)


def test_choice_is_one_of_them(engine):
    structured = StructuredOutput(StructuredKind.CHOICE, choices=("yes", "no", "maybe so"))
    out = engine.submit(
        GenerationRequest(prompt="Answer:", max_new_tokens=20, structured=structured)
    ).result(timeout=300)
    assert out.text in structured.choices


def test_a_refused_spec_names_the_field(engine):
    with pytest.raises(RequestError) as err:
        engine.submit(
            GenerationRequest(
                prompt="x", structured=StructuredOutput(StructuredKind.REGEX, "(unclosed")
            )
        )
    assert err.value.field == "structured"
