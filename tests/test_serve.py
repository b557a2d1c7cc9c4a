"""The gRPC server, as a real separate process on 127.0.0.1 with an ephemeral port."""

from __future__ import annotations

import concurrent.futures
import signal
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from brownout_jax.checkpoints import load_model
from brownout_jax.cli.main import build_parser, main
from brownout_jax.engine.requests import BrownoutClass, StructuredKind, StructuredOutput
from brownout_jax.offline.generate import generate
from brownout_jax.serve import brownout_pb2 as pb
from brownout_jax.serve.cli_client import request_from_args
from brownout_jax.serve.client import GenerationClient
from brownout_jax.serve.grpc_service import request_from_proto

SERVER_ARGS = ("--kv-blocks", "16", "--max-model-len", "32", "--no-http")


@pytest.fixture(scope="module")
def server(tiny_with_tokenizer, start_server):
    proc = start_server(tiny_with_tokenizer, *SERVER_ARGS, "--max-queue", "3")
    yield proc
    assert proc.stop() == 0


@pytest.fixture()
def client(server):
    with GenerationClient(server.target) as c:
        yield c


def _ids_request(ids=(5, 6, 7, 8), max_tokens=8, **fields):
    return pb.GenerateRequest(prompt_token_ids=list(ids), max_tokens=max_tokens, **fields)


def test_streaming_and_unary_equal_the_engine(client, tiny_with_tokenizer):
    model = load_model(tiny_with_tokenizer, "float32", progress=False)
    (expected,) = generate(model.params, model.config, [[5, 6, 7, 8]], 8)
    request = _ids_request(ignore_eos=True)
    streamed = list(client.stream(request, timeout=60))
    assert [t for r in streamed for t in r.token_ids] == expected.token_ids
    assert streamed[-1].finish_reason == "length"
    assert all(r.finish_reason == "" for r in streamed[:-1])
    assert streamed[-1].usage.completion_tokens == 8 and streamed[-1].usage.prompt_tokens == 4
    unary = client.generate(request, timeout=60)
    assert list(unary.token_ids) == expected.token_ids
    assert unary.text == "".join(r.text for r in streamed)
    assert unary.timing.ttft_s > 0 and unary.thresholds.decode == 1.0
    ids_only = client.generate(_ids_request(ignore_eos=True, token_ids_only=True), timeout=60)
    assert list(ids_only.token_ids) == expected.token_ids and ids_only.text == ""


def test_text_prompt_and_stop_string(client):
    first = client.generate(pb.GenerateRequest(prompt="w1 w2 w3", max_tokens=6, ignore_eos=True))
    words = first.text.split()
    assert words
    stop = words[min(2, len(words) - 1)]
    cut = client.generate(
        pb.GenerateRequest(prompt="w1 w2 w3", max_tokens=6, ignore_eos=True, stop=[stop])
    )
    assert cut.finish_reason == "stop"
    assert stop not in cut.text and first.text.startswith(cut.text.rstrip())


def test_64_concurrent_streams_complete(server):
    def one(i):
        with GenerationClient(server.target) as c:
            for attempt in range(200):
                try:
                    responses = list(c.stream(_ids_request((i % 90 + 1, 7), 6, ignore_eos=True)))
                    return sum(len(r.token_ids) for r in responses), attempt
                except grpc.RpcError as err:
                    if err.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                        raise
                    time.sleep(0.05)  # the bounded queue is full: retry, as a client should
        raise AssertionError("never admitted")

    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        results = list(pool.map(one, range(64)))
    assert [tokens for tokens, _ in results] == [6] * 64
    assert any(attempts > 0 for _, attempts in results)  # RESOURCE_EXHAUSTED did happen


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({"max_tokens": 4}, "prompt"),
        ({"prompt": "w1", "prompt_token_ids": [1], "max_tokens": 4}, "prompt"),
        ({"prompt_token_ids": [1, 10_000], "max_tokens": 4}, "prompt_token_ids"),
        ({"prompt_token_ids": [1], "max_tokens": 0}, "max_tokens"),
        ({"prompt_token_ids": [1] * 20, "max_tokens": 20}, "max_tokens"),
        ({"prompt_token_ids": [1] * 40, "max_tokens": 1}, "prompt"),
        ({"prompt_token_ids": [1], "max_tokens": 4, "temperature": -1.0}, "temperature"),
        ({"prompt_token_ids": [1], "max_tokens": 4, "top_p": 0.0}, "top_p"),
        ({"prompt_token_ids": [1], "max_tokens": 4, "top_p": 1.5}, "top_p"),
        ({"prompt_token_ids": [1], "max_tokens": 4, "top_k": -2}, "top_k"),
        ({"prompt_token_ids": [1], "max_tokens": 4, "brownout": "Never"}, "brownout"),
        ({"prompt_token_ids": [1], "max_tokens": 4, "top_logprobs": 21}, "top_logprobs"),
        ({"prompt_token_ids": [1], "max_tokens": 4, "prompt_logprobs": 21}, "prompt_logprobs"),
        ({"prompt_token_ids": [1], "max_tokens": 4, "presence_penalty": 2.5}, "presence_penalty"),
        ({"prompt_token_ids": [1], "max_tokens": 4, "frequency_penalty": -3}, "frequency_penalty"),
        (
            {"prompt_token_ids": [1], "max_tokens": 4, "repetition_penalty": 0.0},
            "repetition_penalty",
        ),
        ({"prompt_token_ids": [1], "max_tokens": 4, "logit_bias": {500: 1.0}}, "logit_bias"),
        ({"prompt_token_ids": [1], "max_tokens": 4, "logit_bias": {5: 101.0}}, "logit_bias"),
        ({"prompt_token_ids": [1], "max_tokens": 4, "min_p": 1.5}, "min_p"),
        ({"prompt_token_ids": [1], "max_tokens": 4, "min_tokens": 5}, "min_tokens"),
        ({"prompt_token_ids": [1], "max_tokens": 4, "json_schema": "[1, 2]"}, "json_schema"),
        ({"prompt_token_ids": [1], "max_tokens": 4, "json_schema": "{oops"}, "json_schema"),
        ({"prompt_token_ids": [1], "max_tokens": 4, "regex": ""}, "regex"),
        ({"prompt_token_ids": [1], "max_tokens": 4, "grammar": ""}, "grammar"),
        ({"prompt_token_ids": [1], "max_tokens": 4, "choice": pb.Choices()}, "choice"),
    ],
)
def test_bad_input_is_invalid_argument_naming_the_field(client, request_fields, field):
    with pytest.raises(grpc.RpcError) as info:
        client.generate(pb.GenerateRequest(**request_fields), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith(f"{field}:")
    assert "Traceback" not in info.value.details()


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("", BrownoutClass.ALLOWED),
        ("allowed", BrownoutClass.ALLOWED),
        ("never", BrownoutClass.NEVER),
    ],
)
def test_brownout_field_maps_to_the_request_class(name, expected):
    assert request_from_proto(_ids_request(brownout=name)).brownout is expected


def test_sampling_fields_map_to_the_engine_request():
    request = request_from_proto(
        _ids_request(
            top_logprobs=3,
            prompt_logprobs=0,
            presence_penalty=0.5,
            frequency_penalty=-0.25,
            repetition_penalty=1.5,
            logit_bias={9: -1.0, 4: 2.0},
            min_p=0.1,
            min_tokens=2,
            json_schema='{"type": "object"}',
        )
    )
    assert (request.top_logprobs, request.prompt_logprobs) == (3, 0)
    assert (request.presence_penalty, request.frequency_penalty) == (0.5, -0.25)
    assert request.repetition_penalty == 1.5 and request.min_tokens == 2
    assert request.logit_bias == ((4, 2.0), (9, -1.0)) and request.min_p == pytest.approx(0.1)
    assert request.structured == StructuredOutput(StructuredKind.JSON_SCHEMA, '{"type": "object"}')
    unset = request_from_proto(_ids_request())
    assert unset.prompt_logprobs is None and unset.repetition_penalty == 1.0
    assert unset.structured is None and unset.top_logprobs == 0
    kinds = {
        "json_object": (pb.JsonObject(), StructuredOutput(StructuredKind.JSON_OBJECT)),
        "regex": ("a+", StructuredOutput(StructuredKind.REGEX, "a+")),
        "grammar": ('root ::= "a"', StructuredOutput(StructuredKind.GRAMMAR, 'root ::= "a"')),
        "choice": (
            pb.Choices(choices=["yes", "no"]),
            StructuredOutput(StructuredKind.CHOICE, choices=("yes", "no")),
        ),
    }
    for name, (value, expected) in kinds.items():
        assert request_from_proto(_ids_request(**{name: value})).structured == expected


def test_alternatives_and_prompt_logprobs_travel_in_the_responses(client):
    """Shapes: one alternatives entry per token, the prompt's logprobs (tokens 1 … of 4) on the
    first response only."""
    request = _ids_request(top_logprobs=2, prompt_logprobs=1, max_tokens=3, ignore_eos=True)
    k, prompt = 2, 3
    unary = client.generate(request, timeout=60)
    assert len(unary.top_logprobs) == len(unary.token_ids) == 3
    assert [len(t.token_ids) for t in unary.top_logprobs] == [k] * 3
    assert all(len(t.logprobs) == len(t.token_ids) for t in unary.top_logprobs)
    assert len(unary.prompt_logprobs) == prompt
    assert [e.token_id for e in unary.prompt_logprobs] == [6, 7, 8][:prompt]
    streamed = list(client.stream(request, timeout=60))
    assert [len(r.top_logprobs) for r in streamed] == [len(r.token_ids) for r in streamed]
    assert [len(r.prompt_logprobs) for r in streamed] == [prompt] + [0] * (len(streamed) - 1)


def test_token_ids_only_asks_the_engine_for_no_text():
    assert request_from_proto(_ids_request()).detokenize is True
    assert request_from_proto(_ids_request(token_ids_only=True)).detokenize is False


def test_cli_brownout_class_goes_to_the_server_only(capsys):
    argv = ["generate", "--prompt-ids", "1,2", "--brownout-class", "never"]
    args = build_parser().parse_args([*argv, "--server", "127.0.0.1:1"])
    assert request_from_args(args).brownout == "never"
    assert request_from_args(build_parser().parse_args(argv[:3])).brownout == "allowed"
    assert main(argv) == 2  # offline generation has no engine to exempt the request in
    assert "--brownout-class" in capsys.readouterr().err


def test_never_request_is_served(client):
    """The server runs the exact model (--brownout off): a never request's tokens are the
    same as the default class's; brownout's effect on it is tests/test_engine.py's."""
    allowed = client.generate(_ids_request(ignore_eos=True), timeout=60)
    never = client.generate(_ids_request(ignore_eos=True, brownout="never"), timeout=60)
    assert never.finish_reason == "length" and list(never.token_ids) == list(allowed.token_ids)


def test_cancelled_stream_frees_its_blocks(client):
    call = client.stream(_ids_request((3, 4), max_tokens=28, ignore_eos=True))
    next(call)
    call.cancel()
    deadline = time.monotonic() + 30
    status = client.status()
    while (status.running or status.kv_blocks_used) and time.monotonic() < deadline:
        time.sleep(0.05)
        status = client.status()
    assert status.running == 0 and status.kv_blocks_used == 0


def test_health_and_status(server, client):
    channel = grpc.insecure_channel(server.target)
    health = health_pb2_grpc.HealthStub(channel)
    reply = health.Check(health_pb2.HealthCheckRequest(service="brownout.v1.Generation"))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    status = client.status()
    assert status.model == "model" and status.controller_mode == "off"
    assert status.kv_blocks_total == 15 and status.compiled_steps > 0
    # The latency table: every step timed before serving (the minimal set at least), by phase.
    table = list(status.step_latency)
    assert {entry.phase for entry in table} == {"prefill", "decode"}
    assert all(entry.rows > 0 and entry.size > 0 and entry.predicted_s > 0 for entry in table)
    # The dense matmul path per weight shape: this float32 model's weights stay unpacked.
    paths = list(status.dense_paths)
    assert paths and all(p.k > 0 and p.n > 0 and not p.packed for p in paths)
    assert {p.path for p in paths} <= {"kernel", "xla"}


def test_sigterm_drains_in_flight_requests(tiny_with_tokenizer, start_server):
    proc = start_server(tiny_with_tokenizer, *SERVER_ARGS)
    channel = grpc.insecure_channel(proc.target)
    health = health_pb2_grpc.HealthStub(channel)
    with GenerationClient(proc.target) as c:
        calls = [c.stream(_ids_request((i + 1, 2), 20, ignore_eos=True)) for i in range(6)]
        firsts = [next(call) for call in calls]
        assert all(len(f.token_ids) == 1 for f in firsts)
        proc.process.send_signal(signal.SIGTERM)
        rest = [list(call) for call in calls]
        assert [1 + sum(len(r.token_ids) for r in responses) for responses in rest] == [20] * 6
        assert all(responses[-1].finish_reason == "length" for responses in rest)
        try:
            reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
        except grpc.RpcError:
            pass  # already stopped: the drain finished first
    assert proc.stop() == 0
    assert any("draining" in line for line in proc.lines)
