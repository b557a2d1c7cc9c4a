"""The OpenAI surface clients drive, on a scripted engine (no JAX): batched prompts, n and
best_of, echo, logprob shapes, vLLM's sampling extras and structured outputs as they reach
the engine, /tokenize and /detokenize, and every new field's bad value as a 400 naming it.
The same surface on a real engine: tests/test_openai_clients.py."""

from __future__ import annotations

import http.client
import json

import pytest
from scripted_engine import ScriptedEngine, WordTokenizer, running_front, scripted_top, serving

from brownout_jax.engine.requests import StructuredKind, StructuredOutput

KEY = "surface-key-1b2c"
STRIDE = 0x9E3779B9  # openai_requests._SEED_STRIDE


@pytest.fixture(scope="module")
def front():
    yield from running_front(KEY)


@pytest.fixture()
def engine(front):
    yield from serving(front[0], ScriptedEngine(max_queue=8))


def call(port, path, body, key=KEY):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}
    connection.request("POST", path, body=json.dumps(body).encode(), headers=headers)
    response = connection.getresponse()
    text = response.read().decode()
    connection.close()
    return response.status, text


def ok(port, path, body):
    status, text = call(port, path, body)
    assert status == 200, text
    return json.loads(text)


def sse(text: str) -> list[dict]:
    data = [line[len("data: ") :] for line in text.splitlines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


def test_batched_prompts_with_n_2_are_4_choices_in_openai_order(front, engine):
    _, port = front
    body = {"prompt": [[1, 2, 3], [4, 5]], "n": 2, "max_tokens": 3, "seed": 7}
    response = ok(port, "/v1/completions", body)
    assert [c["index"] for c in response["choices"]] == [0, 1, 2, 3]
    prompts = [r.prompt_token_ids for r in engine.submitted]
    assert prompts == [(1, 2, 3), (1, 2, 3), (4, 5), (4, 5)]  # index i * n + j
    # Distinct seeds per sample, derived from the request's: reproducible, sample 0 unchanged.
    assert [r.seed for r in engine.submitted] == [7, 7 + STRIDE, 7, 7 + STRIDE]
    # A prompt's later samples share the first one's prompt blocks.
    shared = [None if h is None else h.request_id for h in engine.shared_with]
    assert shared == [None, "scripted-0", None, "scripted-2"]
    usage = response["usage"]
    assert usage["prompt_tokens"] == 5  # each prompt once
    assert usage["completion_tokens"] == 4 * 3 and usage["total_tokens"] == 17
    # The same request streamed: every choice's chunks carry its index; one usage chunk.
    chunks = sse(
        call(
            port,
            "/v1/completions",
            {**body, "stream": True, "stream_options": {"include_usage": True}},
        )[1]
    )
    by_index = {}
    for chunk in chunks[:-1]:
        (choice,) = chunk["choices"]
        by_index.setdefault(choice["index"], []).append(choice)
    assert sorted(by_index) == [0, 1, 2, 3]
    assert all(c[-1]["finish_reason"] == "length" for c in by_index.values())
    assert all("".join(x["text"] for x in c) == " w10 w11 w12" for c in by_index.values())
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 12


def test_best_of_returns_the_n_highest_cumulative_logprobs(front, engine):
    _, port = front
    engine.logprob_shift = lambda r: -((r.seed * 2654435761) % 1000) / 100
    body = {"prompt": [[1, 2], [3, 4]], "n": 2, "best_of": 4, "max_tokens": 2, "seed": 11}
    response = ok(port, "/v1/completions", {**body, "logprobs": 0})
    assert len(engine.submitted) == 8 and len(response["choices"]) == 4
    for prompt in range(2):
        samples = engine.submitted[prompt * 4 : prompt * 4 + 4]
        totals = sorted((2 * engine.logprob_shift(r) - 0.25 for r in samples), reverse=True)
        got = [
            sum(c["logprobs"]["token_logprobs"])
            for c in response["choices"][prompt * 2 : prompt * 2 + 2]
        ]
        assert got == pytest.approx(totals[:2])  # the best two, best first
    assert [c["index"] for c in response["choices"]] == [0, 1, 2, 3]
    assert response["usage"]["completion_tokens"] == 8 * 2  # every sample was generated


def test_echo_with_logprobs_is_lm_evals_loglikelihood_request(front, engine):
    """lm-eval's local-completions: token ids, echo, logprobs 1, max_tokens 1, temperature 0."""
    _, port = front
    engine.tokenizer = WordTokenizer()
    body = {"prompt": [[1, 2, 3], [4, 5]], "echo": True, "logprobs": 1, "max_tokens": 1}
    response = ok(port, "/v1/completions", {**body, "temperature": 0, "seed": 1234})
    assert [r.prompt_logprobs for r in engine.submitted] == [1, 1]
    first, second = response["choices"]
    assert first["text"] == "w1 w2 w3 w10" and second["text"] == "w4 w5 w10"
    logprobs = first["logprobs"]
    assert logprobs["tokens"] == ["w1", "w2", "w3", "w10"]
    assert logprobs["token_logprobs"] == pytest.approx([None, -0.1, -0.2, 0.0])
    assert logprobs["top_logprobs"][0] is None
    assert logprobs["top_logprobs"][1:] == [{"w2": -0.1}, {"w3": pytest.approx(-0.2)}, {"w10": 0.0}]
    assert logprobs["text_offset"] == [0, 2, 4, 6]
    # lm-eval's parse: sum(token_logprobs[ctxlen:-1]), greedy if each equals max(top.values()).
    ctxlen = 1
    assert sum(logprobs["token_logprobs"][ctxlen:-1]) == pytest.approx(-0.3)
    assert all(
        lp == max(top.values())
        for lp, top in zip(
            logprobs["token_logprobs"][ctxlen:-1], logprobs["top_logprobs"][ctxlen:-1], strict=True
        )
    )
    assert response["usage"] == {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}


def test_echo_with_max_tokens_0_returns_the_prompt_alone(front, engine):
    _, port = front
    engine.tokenizer = WordTokenizer()
    body = {"prompt": "w1 w2 w3", "echo": True, "logprobs": 2, "max_tokens": 0}
    response = ok(port, "/v1/completions", body)
    (request,) = engine.submitted
    assert request.max_new_tokens == 1  # one token scores the prompt; the choice drops it
    (choice,) = response["choices"]
    assert choice["text"] == "w1 w2 w3" and choice["finish_reason"] == "length"
    assert choice["logprobs"]["tokens"] == ["w1", "w2", "w3"]
    assert [len(t) for t in choice["logprobs"]["top_logprobs"][1:]] == [2, 2]
    assert response["usage"]["completion_tokens"] == 0
    chunks = sse(call(port, "/v1/completions", {**body, "stream": True})[1])
    assert "".join(c["choices"][0]["text"] for c in chunks) == "w1 w2 w3"
    assert chunks[0]["choices"][0]["logprobs"]["tokens"] == ["w1", "w2", "w3"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_echo_logprobs_without_the_engines_prompt_logprobs_is_an_error_not_a_guess(front, engine):
    _, port = front
    engine.gives_prompt_logprobs = False
    status, text = call(port, "/v1/completions", {"prompt": [1, 2], "echo": True, "logprobs": 0})
    assert status == 500 and json.loads(text)["error"]["code"] == "prompt_logprobs_unavailable"


def test_completion_logprobs_shape_and_vllm_prompt_logprobs(front, engine):
    _, port = front
    body = {"prompt": [5, 6, 7], "max_tokens": 2, "logprobs": 3, "prompt_logprobs": 1}
    (choice,) = ok(port, "/v1/completions", body)["choices"]
    logprobs = choice["logprobs"]
    assert logprobs["tokens"] == ["token_id:10", "token_id:11"]
    assert logprobs["top_logprobs"][1] == {
        f"token_id:{t}": pytest.approx(v) for t, v in scripted_top(11, -0.25, 3)
    }
    assert logprobs["text_offset"] == [0, len("token_id:10")]
    assert choice["prompt_logprobs"][0] is None
    assert choice["prompt_logprobs"][2] == {
        "7": {"logprob": pytest.approx(-0.2), "rank": 1, "decoded_token": "token_id:7"}
    }


def test_chat_n_logprobs_top_logprobs_and_include_usage(front, engine):
    _, port = front
    engine.tokenizer = WordTokenizer()
    body = {
        "messages": [{"role": "user", "content": "w1 w2"}],
        "n": 2,
        "max_completion_tokens": 3,
        "logprobs": True,
        "top_logprobs": 2,
        "stop": ["w12"],
    }
    response = ok(port, "/v1/chat/completions", body)
    assert [c["index"] for c in response["choices"]] == [0, 1]
    assert [r.prompt_token_ids for r in engine.submitted] == [(1, 2, 99)] * 2
    assert engine.submitted[0].stop == ("w12",) and engine.submitted[0].top_logprobs == 2
    content = response["choices"][1]["logprobs"]["content"]
    assert [t["token"] for t in content] == ["w10", "w11", "w12"]
    assert content[0]["bytes"] == list(b"w10")
    assert content[1]["top_logprobs"] == [
        {"token": "w11", "logprob": -0.25, "bytes": list(b"w11")},
        {"token": "w12", "logprob": -1.25, "bytes": list(b"w12")},
    ]
    assert response["usage"] == {"prompt_tokens": 3, "completion_tokens": 6, "total_tokens": 9}
    stream = {**body, "stream": True, "stream_options": {"include_usage": True}}
    chunks = sse(call(port, "/v1/chat/completions", stream)[1])
    firsts = {}
    for chunk in chunks[:-1]:
        (choice,) = chunk["choices"]
        firsts.setdefault(choice["index"], choice)
        assert len(choice["logprobs"]["content"][0]["top_logprobs"]) == 2
    assert sorted(firsts) == [0, 1] and all(
        c["delta"]["role"] == "assistant" for c in firsts.values()
    )
    assert chunks[-1]["usage"]["completion_tokens"] == 6


def test_sampling_extras_reach_the_engine(front, engine):
    _, port = front
    body = {
        "prompt": [1, 2],
        "max_tokens": 4,
        "top_k": -1,
        "min_p": 0.05,
        "min_tokens": 2,
        "presence_penalty": 0.5,
        "frequency_penalty": -0.5,
        "repetition_penalty": 1.3,
        "logit_bias": {"5": 2.5, "17": -100},
        "stop_token_ids": [3],
        "ignore_eos": True,
        "seed": 42,
    }
    ok(port, "/v1/completions", body)
    (request,) = engine.submitted
    assert (request.top_k, request.min_p, request.min_tokens) == (0, 0.05, 2)
    assert (request.presence_penalty, request.frequency_penalty) == (0.5, -0.5)
    assert request.repetition_penalty == 1.3 and request.seed == 42
    assert request.logit_bias == ((5, 2.5), (17, -100.0))
    assert request.stop_token_ids == (3,) and request.ignore_eos


SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
SCHEMA_TEXT = json.dumps(SCHEMA, separators=(",", ":"))


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"response_format": {"type": "text"}}, None),
        (
            {"response_format": {"type": "json_object"}},
            StructuredOutput(StructuredKind.JSON_OBJECT),
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": SCHEMA},
                }
            },
            StructuredOutput(StructuredKind.JSON_SCHEMA, SCHEMA_TEXT),
        ),
        ({"guided_json": SCHEMA}, StructuredOutput(StructuredKind.JSON_SCHEMA, SCHEMA_TEXT)),
        (
            {"guided_json": json.dumps(SCHEMA)},
            StructuredOutput(StructuredKind.JSON_SCHEMA, SCHEMA_TEXT),
        ),
        ({"guided_regex": "w[0-9]+"}, StructuredOutput(StructuredKind.REGEX, "w[0-9]+")),
        (
            {"guided_choice": ["yes", "no"]},
            StructuredOutput(StructuredKind.CHOICE, choices=("yes", "no")),
        ),
        (
            {"guided_grammar": 'root ::= "a"'},
            StructuredOutput(StructuredKind.GRAMMAR, 'root ::= "a"'),
        ),
        (
            {"structured_outputs": {"json": SCHEMA}},
            StructuredOutput(StructuredKind.JSON_SCHEMA, SCHEMA_TEXT),
        ),
        ({"structured_outputs": {"regex": "a+"}}, StructuredOutput(StructuredKind.REGEX, "a+")),
        (
            {"structured_outputs": {"choice": ["x"]}},
            StructuredOutput(StructuredKind.CHOICE, choices=("x",)),
        ),
        ({"structured_outputs": {"grammar": "g"}}, StructuredOutput(StructuredKind.GRAMMAR, "g")),
        (
            {"structured_outputs": {"json_object": True}},
            StructuredOutput(StructuredKind.JSON_OBJECT),
        ),
    ],
)
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_structured_output_forms_reach_the_engine(front, engine, fields, expected, path):
    _, port = front
    engine.tokenizer = WordTokenizer()
    base = (
        {"prompt": [1, 2]}
        if "chat" not in path
        else {"messages": [{"role": "user", "content": "w1"}]}
    )
    ok(port, path, {**base, "max_tokens": 2, **fields})
    (request,) = engine.submitted
    assert request.structured == expected


SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"logit_bias": {"abc": 1}}, "logit_bias"),
        ({"logit_bias": {"5": 200}}, "logit_bias"),
        ({"logit_bias": {"500": 1}}, "logit_bias"),
        ({"min_p": 2}, "min_p"),
        ({"min_tokens": 9}, "min_tokens"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"prompt_logprobs": 21}, "prompt_logprobs"),
        ({"logprobs": -1}, "logprobs"),
        ({"best_of": 1, "n": 2}, "best_of"),
        ({"best_of": 2, "stream": True}, "best_of"),
        ({"n": 9}, "n"),  # more generations than the admission queue (8) holds
        ({"prompt": [[1]] * 3, "best_of": 3}, "best_of"),
        ({"suffix": "x"}, "suffix"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 0, "echo": True, "min_tokens": 1}, "min_tokens"),
        ({"echo": "loud"}, "echo"),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            "response_format.json_schema.schema",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": [1]},
                }
            },
            "response_format.json_schema.schema",
        ),
        ({"guided_json": "{not json"}, "guided_json"),
        ({"guided_json": "[1, 2]"}, "guided_json"),
        ({"guided_json": 5}, "guided_json"),
        ({"guided_regex": 5}, "guided_regex"),
        ({"guided_regex": ""}, "guided_regex"),
        ({"guided_choice": []}, "guided_choice"),
        ({"guided_grammar": ""}, "guided_grammar"),
        ({"response_format": SCHEMA_FORMAT, "guided_regex": "a"}, "guided_regex"),
        ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
        ({"structured_outputs": {"structural_tag": "t"}}, "structured_outputs.structural_tag"),
        ({"structured_outputs": {"json": [1]}}, "structured_outputs.json"),
    ],
)
def test_bad_completion_field_is_400_naming_it(front, engine, fields, param):
    _, port = front
    status, text = call(port, "/v1/completions", {"prompt": [1, 2, 3], "max_tokens": 4, **fields})
    error = json.loads(text)["error"]
    assert status == 400, text
    assert error["param"] == param and error["message"].startswith(param), error
    assert "Traceback" not in text


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"top_logprobs": 2}, "top_logprobs"),  # without logprobs: true
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"n": 0}, "n"),
        ({"max_completion_tokens": 2, "min_tokens": 3}, "min_tokens"),
        ({"guided_choice": ["a"], "structured_outputs": {"regex": "b"}}, "structured_outputs"),
        ({"stream_options": {"include_usage": "maybe"}}, "stream_options.include_usage"),
    ],
)
def test_bad_chat_field_is_400_naming_it(front, engine, fields, param):
    _, port = front
    engine.tokenizer = WordTokenizer()
    body = {"messages": [{"role": "user", "content": "w1"}], "max_tokens": 4, **fields}
    status, text = call(port, "/v1/chat/completions", body)
    error = json.loads(text)["error"]
    assert status == 400 and error["param"] == param, text
    assert error["message"].startswith(param) and "Traceback" not in text


def test_chat_without_a_template_is_a_clear_400(front, engine):
    _, port = front
    status, text = call(
        port, "/v1/chat/completions", {"messages": [{"role": "user", "content": "w1"}]}
    )
    error = json.loads(text)["error"]
    assert status == 400 and error["param"] == "messages"
    assert "no chat template" in error["message"] and "/v1/completions" in error["message"]


def test_a_refused_sample_cancels_those_submitted_before_it(front, engine):
    _, port = front
    engine.mode = "hang"  # the first sample still generates when the second is refused
    status, text = call(port, "/v1/completions", {"prompt": [[1, 2], [1, 500]], "max_tokens": 60})
    error = json.loads(text)["error"]
    assert status == 400 and error["param"] == "prompt" and error["message"].startswith("prompt 1:")
    assert len(engine.submitted) == 1 and engine.cancelled.is_set()


def test_tokenize_detokenize_round_trip(front, engine):
    _, port = front
    status, text = call(port, "/tokenize", {"prompt": "w1 w2"})
    assert status == 400 and json.loads(text)["error"]["param"] == "prompt"  # no tokenizer
    engine.tokenizer = WordTokenizer()
    tokens = ok(port, "/tokenize", {"prompt": "w5 w6 w7", "return_token_strs": True})
    assert tokens == {
        "count": 3,
        "max_model_len": 64,
        "tokens": [5, 6, 7],
        "token_strs": ["w5", "w6", "w7"],
    }
    special = ok(port, "/tokenize", {"prompt": "w5", "add_special_tokens": True})
    assert special["tokens"] == [0, 5]
    chat = ok(port, "/tokenize", {"messages": [{"role": "user", "content": "w1 w2"}]})
    assert chat["tokens"] == [1, 2, 99] and chat["count"] == 3
    assert ok(port, "/detokenize", {"tokens": tokens["tokens"]}) == {"prompt": "w5 w6 w7"}


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/tokenize", {}, "prompt"),
        ("/tokenize", {"prompt": "w1", "messages": [{"role": "user", "content": "w1"}]}, "prompt"),
        ("/tokenize", {"prompt": 5}, "prompt"),
        (
            "/tokenize",
            {"messages": [{"role": "user", "content": "w1"}], "add_special_tokens": True},
            "add_special_tokens",
        ),
        ("/detokenize", {"tokens": [1, 100]}, "tokens"),
        ("/detokenize", {"tokens": [-1]}, "tokens"),
        ("/detokenize", {"tokens": "w1"}, "tokens"),
        ("/detokenize", {}, "tokens"),
    ],
)
def test_bad_tokenize_input_is_400_naming_the_field(front, engine, path, body, param):
    _, port = front
    engine.tokenizer = WordTokenizer()
    status, text = call(port, path, body)
    error = json.loads(text)["error"]
    assert status == 400 and error["param"] == param, text
    assert "Traceback" not in text


def test_tokenize_takes_the_api_key(front, engine):
    _, port = front
    engine.tokenizer = WordTokenizer()
    for path, body in (("/tokenize", {"prompt": "w1"}), ("/detokenize", {"tokens": [1]})):
        status, text = call(port, path, body, key="wrong")
        assert status == 401 and json.loads(text)["error"]["code"] == "invalid_api_key"
