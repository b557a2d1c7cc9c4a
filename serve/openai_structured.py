"""Structured-output fields of an OpenAI request → the engine's ``StructuredOutput``.

Clients spell one constraint several ways: OpenAI's ``response_format`` (``json_object``,
``json_schema``), vLLM's older ``guided_json`` / ``guided_regex`` / ``guided_choice`` /
``guided_grammar`` and its newer ``structured_outputs`` object. Each maps to one
``StructuredOutput``; two constraints in one request, or a malformed one, are a 400 naming the
field. Whether the engine can compile the constraint (xgrammar) is the engine's verdict, under
the same field name (``PreparedRequest.field_names`` renames ``structured``).
"""

from __future__ import annotations

import json

from brownout_jax.engine.requests import StructuredKind, StructuredOutput
from brownout_jax.serve.openai_protocol import (
    GenerationFields,
    OpenAIError,
    ResponseFormatType,
    StructuredOutputs,
)

_bad = OpenAIError.bad_field


def _schema_text(field: str, schema) -> str:
    """A JSON schema (an object, or JSON text of one) as the engine's spec text."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as err:
            raise _bad(field, f"not valid JSON: {err}") from None
    if not isinstance(schema, dict):
        raise _bad(field, f"a JSON schema must be an object, got {type(schema).__name__}")
    return json.dumps(schema, separators=(",", ":"))


def _text(field: str, value: str) -> str:
    if not value:
        raise _bad(field, "must be a non-empty string")
    return value


def _choices(field: str, choices: list[str]) -> tuple[str, ...]:
    if not choices:
        raise _bad(field, "give at least one choice")
    return tuple(choices)


def _from_response_format(body: GenerationFields) -> StructuredOutput | None:
    fmt = body.response_format
    if fmt is None or fmt.type is ResponseFormatType.TEXT:
        return None
    if fmt.type is ResponseFormatType.JSON_OBJECT:
        return StructuredOutput(StructuredKind.JSON_OBJECT)
    if fmt.json_schema is None:
        raise _bad("response_format.json_schema", 'required with "type": "json_schema"')
    if fmt.json_schema.schema_ is None:
        raise _bad("response_format.json_schema.schema", "required: the JSON schema to follow")
    spec = _schema_text("response_format.json_schema.schema", fmt.json_schema.schema_)
    return StructuredOutput(StructuredKind.JSON_SCHEMA, spec)


def _from_structured_outputs(given: StructuredOutputs) -> StructuredOutput | None:
    field = "structured_outputs"
    kinds = [
        name
        for name, value in (
            ("json", given.json_),
            ("regex", given.regex),
            ("choice", given.choice),
            ("grammar", given.grammar),
            ("json_object", given.json_object or None),
        )
        if value is not None
    ]
    if len(kinds) > 1:
        raise _bad(field, f"give one constraint, got {' and '.join(kinds)}")
    if given.json_ is not None:
        spec = _schema_text(f"{field}.json", given.json_)
        return StructuredOutput(StructuredKind.JSON_SCHEMA, spec)
    if given.regex is not None:
        return StructuredOutput(StructuredKind.REGEX, _text(f"{field}.regex", given.regex))
    if given.choice is not None:
        return StructuredOutput(
            StructuredKind.CHOICE, choices=_choices(f"{field}.choice", given.choice)
        )
    if given.grammar is not None:
        return StructuredOutput(StructuredKind.GRAMMAR, _text(f"{field}.grammar", given.grammar))
    if given.json_object:
        return StructuredOutput(StructuredKind.JSON_OBJECT)
    return None


def structured_output(body: GenerationFields) -> tuple[StructuredOutput | None, str | None]:
    """The request's constraint and the field that set it (None, None: unconstrained)."""
    found: list[tuple[str, StructuredOutput]] = []

    def add(field: str, constraint: StructuredOutput | None) -> None:
        if constraint is None:
            return
        if found:
            raise _bad(
                field,
                f"one structured-output constraint per request; {found[0][0]} already sets one",
            )
        found.append((field, constraint))

    add("response_format", _from_response_format(body))
    if body.guided_json is not None:
        spec = _schema_text("guided_json", body.guided_json)
        add("guided_json", StructuredOutput(StructuredKind.JSON_SCHEMA, spec))
    if body.guided_regex is not None:
        regex = _text("guided_regex", body.guided_regex)
        add("guided_regex", StructuredOutput(StructuredKind.REGEX, regex))
    if body.guided_choice is not None:
        choices = _choices("guided_choice", body.guided_choice)
        add("guided_choice", StructuredOutput(StructuredKind.CHOICE, choices=choices))
    if body.guided_grammar is not None:
        grammar = _text("guided_grammar", body.guided_grammar)
        add("guided_grammar", StructuredOutput(StructuredKind.GRAMMAR, grammar))
    if body.structured_outputs is not None:
        add("structured_outputs", _from_structured_outputs(body.structured_outputs))
    if not found:
        return None, None
    return found[0][1], found[0][0]
