"""Structured output through the engine on the bundled demo model: every token a constrained
greedy decode emits is one the grammar allows (replayed through a fresh matcher), the text
parses and validates against a schema of nested objects, enums and arrays, an unconstrained
request in the same batch is unaffected, and refused specs name the field."""

from __future__ import annotations

import json
import re

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


def test_openai_sdk_json_schema_request_validates(start_server):
    """The whole path a client takes: the openai SDK's ``response_format`` json_schema against
    ``serve`` on the demo, and a regex through vLLM's ``guided_regex``."""
    import openai

    proc = start_server(None, "--max-model-len", "512")
    try:
        client = openai.OpenAI(base_url=f"{proc.http}/v1", api_key="-", max_retries=0, timeout=300)
        chat = client.chat.completions.create(
            model="demo",
            messages=[{"role": "user", "content": "A person and their pets, as JSON."}],
            max_completion_tokens=400,
            temperature=0,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "person", "schema": SCHEMA},
            },
        )
        assert chat.choices[0].finish_reason == "stop"
        validate(json.loads(chat.choices[0].message.content), SCHEMA)
        regex = client.completions.create(
            model="demo",
            prompt="A date:",
            max_tokens=20,
            temperature=0,
            extra_body={"guided_regex": r"20[0-9]{2}-[01][0-9]-[0-3][0-9]"},
        )
        assert re.fullmatch(r"20[0-9]{2}-[01][0-9]-[0-3][0-9]", regex.choices[0].text)
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(
                model="demo", prompt="x", extra_body={"guided_regex": "(unclosed"}
            )
        assert err.value.body["param"] == "guided_regex"
    finally:
        assert proc.stop() == 0
