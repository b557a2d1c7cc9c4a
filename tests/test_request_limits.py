"""The request bounds both fronts share (body size, prompt text before tokenizing), the step
failure's classification, and the gRPC front's side of them on a scripted engine (no JAX).
The HTTP side: tests/test_http_front.py; on a real server: tests/test_http_api.py."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_http_front import ScriptedEngine

from brownout_jax.cli.main import build_parser
from brownout_jax.engine.requests import (
    RequestError,
    StepFailedError,
    StepFailureKind,
    check_prompt_text,
    longest_token_chars,
)
from brownout_jax.serve import brownout_pb2 as pb
from brownout_jax.serve.cli_serve import request_limits_from_args
from brownout_jax.serve.client import GenerationClient
from brownout_jax.serve.grpc_service import start_grpc_server
from brownout_jax.serve.openai_protocol import ChatCompletionRequest, OpenAIError
from brownout_jax.serve.openai_requests import prepare_chat
from brownout_jax.serve.request_limits import RequestLimits, default_max_request_bytes
from brownout_jax.serve.serving_state import ServingState

LIMIT = 2048


class Vocab:
    def get_vocab(self) -> dict[str, int]:
        return {"a": 0, "Ġhello": 1, "<|endoftext|>": 2}


def test_longest_token_and_the_prompt_text_bound():
    assert longest_token_chars(Vocab()) == len("<|endoftext|>") == 13
    assert longest_token_chars(object()) is None  # no vocabulary listed: no text bound
    check_prompt_text("prompt", 13 * 10, 13, 10)  # could just fit
    with pytest.raises(RequestError) as info:
        check_prompt_text("prompt", 13 * 10 + 1, 13, 10)
    assert info.value.field == "prompt"
    assert all(n in info.value.message for n in ("131", "130", "13 per token", "10 tokens"))
    check_prompt_text("prompt", 10**9, None, 10)


def test_chat_text_is_bounded_before_the_template_renders():
    body = ChatCompletionRequest(
        messages=[{"role": "user", "content": "x" * 600}, {"role": "user", "content": "y" * 41}]
    )
    with pytest.raises(OpenAIError) as info:  # 641 > 64 × 10, and no tokenizer was needed
        prepare_chat(body, None, 64, "chatcmpl-1", longest_token=10)
    assert info.value.status == 400 and info.value.param == "messages"
    assert "641" in info.value.message and "640" in info.value.message


@pytest.mark.parametrize(
    ("message", "kind"),
    [
        ("INTERNAL: Failed to execute: Out of memory allocating 3.1GiB", "out_of_memory"),
        ("RESOURCE_EXHAUSTED: while trying to allocate 96.00MiB.", "out_of_memory"),
        ("INTERNAL: CUDA launch failed: an illegal memory access", "device_error"),
    ],
)
def test_a_step_error_is_classified_and_kept_short(message, kind):
    err = StepFailedError(message + "\n" + "buffer dump " * 1000)
    assert err.kind is StepFailureKind(kind)
    assert str(err) == message  # the first line: the log has the dump


def test_max_request_bytes_flag_and_its_default():
    parser = build_parser()
    args = parser.parse_args(["serve"])
    assert request_limits_from_args(args, 8192).max_request_bytes == 8192 * 32 + (1 << 20)
    assert default_max_request_bytes(131072) == 5 << 20
    assert request_limits_from_args(args, None) == RequestLimits()  # gRPC's own 4 MiB
    args = parser.parse_args(["serve", "--max-request-bytes", "5000"])
    assert request_limits_from_args(args, 8192).max_request_bytes == 5000
    with pytest.raises(ValueError, match="--max-request-bytes"):
        request_limits_from_args(parser.parse_args(["serve", "--max-request-bytes", "0"]), 64)


@pytest.fixture(scope="module")
def grpc_front():
    state = ServingState()
    server, port = start_grpc_server(state, "127.0.0.1", 0, 4, max_request_bytes=LIMIT)
    state.engine = ScriptedEngine()
    state.set_serving(True)
    with GenerationClient(f"127.0.0.1:{port}") as client:
        yield state, client
    server.stop(0)


def test_grpc_message_over_the_limit_is_resource_exhausted(grpc_front):
    state, client = grpc_front
    state.engine.mode = "ok"
    with pytest.raises(grpc.RpcError) as info:
        client.generate(pb.GenerateRequest(prompt="x" * (LIMIT + 1), max_tokens=4), timeout=30)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert state.engine.submitted == []
    reply = client.generate(pb.GenerateRequest(prompt_token_ids=[1, 2], max_tokens=4), timeout=30)
    assert reply.finish_reason == "length"


@pytest.mark.parametrize(
    ("mode", "code"),
    [
        ("step_oom", grpc.StatusCode.RESOURCE_EXHAUSTED),
        ("step_error", grpc.StatusCode.INTERNAL),
    ],
)
def test_grpc_failed_step_is_its_requests_error_and_health_stays_serving(grpc_front, mode, code):
    state, client = grpc_front
    state.engine.mode = mode
    for call in (client.generate, lambda r, timeout: list(client.stream(r, timeout))):
        with pytest.raises(grpc.RpcError) as info:
            call(pb.GenerateRequest(prompt_token_ids=[1, 2], max_tokens=4), timeout=30)
        assert info.value.code() == code
        assert "failed on the device" in info.value.details()
        assert "serves on" in info.value.details()
    health = health_pb2_grpc.HealthStub(client.channel)
    reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=30)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING and state.serving
    state.engine.mode = "ok"
