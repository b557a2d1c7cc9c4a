"""The OpenAI-compatible HTTP front of a real `brownout-jax serve` process (tiny random model
with a word-level tokenizer), through the official `openai` client and raw HTTP, against the
gRPC front and the Python API of the same process and model."""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.parse

import grpc
import numpy as np
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from brownout_jax.checkpoints import load_model
from brownout_jax.offline.generate import generate
from brownout_jax.serve import brownout_pb2 as pb
from brownout_jax.serve.client import GenerationClient

KEY = "sk-test-5d1e9c"


@pytest.fixture(scope="module")
def server(tiny_with_tokenizer, start_server):
    # No --max-model-len: the context limit is the model's max_position_embeddings (256).
    # Prompts over 32 tokens are prefilled in chunks (with the attention kernel).
    proc = start_server(
        tiny_with_tokenizer, "--kv-blocks", "40", "--max-queue", "3", "--prefill-chunk", "32"
    )
    yield proc
    assert proc.stop() == 0


@pytest.fixture(scope="module")
def tiny_model(tiny_with_tokenizer):
    return load_model(tiny_with_tokenizer, "float32", progress=False)


def _client(server, key="unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.http}/v1", api_key=key, max_retries=0, timeout=60)


def _post(base: str, path: str, body: dict, key: str | None = None, read_all: bool = True):
    url = urllib.parse.urlsplit(base)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    connection.request("POST", path, body=json.dumps(body).encode(), headers=headers)
    response = connection.getresponse()
    if not read_all:
        return connection, response
    text = response.read().decode()
    connection.close()
    return response.status, dict(response.getheaders()), text


def _sse_data(text: str) -> list[str]:
    return [line[len("data: ") :] for line in text.splitlines() if line.startswith("data: ")]


def _metric(base: str, name: str) -> float:
    url = urllib.parse.urlsplit(base)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    connection.request("GET", "/metrics")
    text = connection.getresponse().read().decode()
    connection.close()
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def test_greedy_completion_equals_grpc_and_the_python_api(server, tiny_model):
    (expected,) = generate(tiny_model.params, tiny_model.config, [[5, 6, 7, 8]], 8)
    expected_text = tiny_model.tokenizer.decode(expected.token_ids)
    with GenerationClient(server.target) as grpc_client:
        unary = grpc_client.generate(
            pb.GenerateRequest(prompt_token_ids=[5, 6, 7, 8], max_tokens=8, ignore_eos=True)
        )
    assert list(unary.token_ids) == expected.token_ids
    client = _client(server)
    whole = client.completions.create(
        model="model",
        prompt=[5, 6, 7, 8],
        max_tokens=8,
        temperature=0,
        logprobs=0,
        extra_body={"ignore_eos": True},
    )
    choice = whole.choices[0]
    assert choice.text == unary.text and choice.text.split() == expected_text.split()
    assert choice.finish_reason == "length"
    assert choice.logprobs.token_logprobs == pytest.approx(list(unary.logprobs), abs=1e-5)
    assert whole.usage.prompt_tokens == 4 and whole.usage.completion_tokens == 8
    assert whole.model_extra["thresholds"] == [{"prefill": 1.0, "decode": 1.0}]
    assert whole.model_extra["timing"]["ttft_s"] > 0
    chunks = list(
        client.completions.create(
            model="model",
            prompt=[5, 6, 7, 8],
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == unary.text
    assert len([c for c in chunks if c.choices]) == 8  # one chunk per token
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8


def test_a_long_prompt_in_chunks_equals_the_python_api_on_both_fronts(server, tiny_model):
    """200 prompt tokens: 7 chunks of 32 where the kernel runs (one prefill step on XLA's
    path); greedy tokens equal offline generation over HTTP and gRPC."""
    prompt = [int(t) for t in np.random.default_rng(3).integers(3, 90, 200)]
    (expected,) = generate(tiny_model.params, tiny_model.config, [prompt], 8)
    with GenerationClient(server.target) as grpc_client:
        unary = grpc_client.generate(
            pb.GenerateRequest(prompt_token_ids=prompt, max_tokens=8, ignore_eos=True)
        )
    assert list(unary.token_ids) == expected.token_ids
    assert list(unary.logprobs) == pytest.approx(expected.logprobs, abs=1e-4)
    whole = _client(server).completions.create(
        model="model",
        prompt=prompt,
        max_tokens=8,
        temperature=0,
        logprobs=0,
        extra_body={"ignore_eos": True},
    )
    assert whole.choices[0].logprobs.token_logprobs == pytest.approx(expected.logprobs, abs=1e-4)
    assert whole.choices[0].text == unary.text
    assert whole.usage.prompt_tokens == 200


def test_chat_equals_grpc_on_the_templated_prompt(server, tiny_model):
    messages = [{"role": "user", "content": "w5 w6 w7"}]
    ids = tiny_model.tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True
    )
    ids = list(ids if isinstance(ids, list) else ids["input_ids"])
    with GenerationClient(server.target) as grpc_client:
        unary = grpc_client.generate(
            pb.GenerateRequest(prompt_token_ids=ids, max_tokens=6, ignore_eos=True)
        )
    client = _client(server)
    whole = client.chat.completions.create(
        model="model",
        messages=messages,
        max_completion_tokens=6,
        temperature=0,
        logprobs=True,
        extra_body={"ignore_eos": True},
    )
    assert whole.choices[0].message.content == unary.text
    assert whole.choices[0].message.role == "assistant"
    assert [t.logprob for t in whole.choices[0].logprobs.content] == pytest.approx(
        list(unary.logprobs), abs=1e-5
    )
    assert whole.usage.prompt_tokens == len(ids)
    stream = client.chat.completions.create(
        model="model",
        messages=messages,
        max_tokens=6,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == unary.text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_raw_http_text_prompt_stop_string_and_sse(server):
    body = {"prompt": "w1 w2 w3", "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    status, _, text = _post(server.http, "/v1/completions", body)
    first = json.loads(text)
    assert status == 200 and first["object"] == "text_completion"
    words = first["choices"][0]["text"].split()
    stop = words[min(2, len(words) - 1)]
    status, headers, text = _post(
        server.http, "/v1/completions", {**body, "stop": stop, "stream": True}
    )
    data = _sse_data(text)
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    cut = "".join(c["choices"][0]["text"] for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert stop not in cut and first["choices"][0]["text"].startswith(cut.rstrip())


def test_models_health_metrics_version(server):
    models = _client(server).models.list()
    assert [m.id for m in models.data] == ["model"]
    assert models.data[0].model_extra["max_model_len"] == 256  # the model's positions
    url = urllib.parse.urlsplit(server.http)
    for path in ("/health", "/version", "/metrics"):
        connection = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
        connection.request("GET", path)
        assert connection.getresponse().status == 200, path
        connection.close()


@pytest.mark.parametrize(
    ("path", "fields", "param"),
    [
        ("/v1/completions", {"temperature": -1.0}, "temperature"),
        ("/v1/completions", {"top_p": 1.5}, "top_p"),
        ("/v1/completions", {"top_k": -2}, "top_k"),
        ("/v1/completions", {"seed": 2**32}, "seed"),
        ("/v1/completions", {"prompt": [1, 10_000]}, "prompt"),
        ("/v1/completions", {"max_tokens": 0}, "max_tokens"),
        ("/v1/completions", {"stop": [""]}, "stop"),
        ("/v1/completions", {"n": 0}, "n"),
        ("/v1/completions", {"logprobs": 21}, "logprobs"),
        ("/v1/completions", {"logit_bias": {"7": 101}}, "logit_bias"),
        ("/v1/completions", {"guided_json": "[1]"}, "guided_json"),
        ("/v1/completions", {"brownout": "sometimes"}, "brownout"),
        ("/v1/chat/completions", {"messages": []}, "messages"),
        ("/v1/chat/completions", {"max_completion_tokens": 0}, "max_completion_tokens"),
        ("/v1/chat/completions", {"top_logprobs": 3}, "top_logprobs"),  # without logprobs
        ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ("/v1/chat/completions", {"min_p": -0.5}, "min_p"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            "messages.0.content",
        ),
    ],
)
def test_bad_field_is_400_naming_it(server, path, fields, param):
    base = {"max_tokens": 4}
    base.update(
        {"prompt": [1, 2]}
        if "chat" not in path
        else {"messages": [{"role": "user", "content": "w1"}]}
    )
    status, _, text = _post(server.http, path, {**base, **fields})
    error = json.loads(text)["error"]
    assert status == 400 and error["param"] == param, text
    assert error["message"].startswith(param) and "Traceback" not in text


def test_never_brownout_class_is_served_on_both_fronts(server):
    """The server runs the exact model (--brownout off): a never request gets the same tokens
    as the default class; what the class changes under brownout is tests/test_engine.py's."""
    request = pb.GenerateRequest(prompt_token_ids=[5, 6, 7], max_tokens=6, ignore_eos=True)
    with GenerationClient(server.target) as grpc_client:
        allowed = grpc_client.generate(request)
        request.brownout = "never"
        never = grpc_client.generate(request)
    assert list(never.token_ids) == list(allowed.token_ids) and never.finish_reason == "length"
    completion = _client(server).completions.create(
        model="model",
        prompt=[5, 6, 7],
        max_tokens=6,
        temperature=0,
        extra_body={"ignore_eos": True, "brownout": "never"},
    )
    assert completion.choices[0].text == never.text


def test_prompt_past_the_context_names_the_limit_on_both_fronts(server):
    status, _, text = _post(server.http, "/v1/completions", {"prompt": [3] * 266, "max_tokens": 1})
    error = json.loads(text)["error"]
    assert status == 400 and error["param"] == "prompt"
    assert "266" in error["message"] and "256" in error["message"]
    status, _, text = _post(
        server.http, "/v1/completions", {"prompt": [3] * 200, "max_tokens": 100}
    )
    error = json.loads(text)["error"]
    assert status == 400 and error["param"] == "max_tokens"
    assert all(n in error["message"] for n in ("200", "100", "256"))
    with GenerationClient(server.target) as grpc_client, pytest.raises(grpc.RpcError) as info:
        grpc_client.generate(pb.GenerateRequest(prompt_token_ids=[3] * 266, max_tokens=1))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "266" in info.value.details() and "256" in info.value.details()


def test_request_size_bound_derives_from_the_context_on_both_fronts(server):
    limit = 256 * 32 + (1 << 20)  # --max-request-bytes' default at max_model_len 256
    url = urllib.parse.urlsplit(server.http)
    with socket.create_connection((url.hostname, url.port), timeout=60) as sock:
        sock.sendall(  # the headers alone: the body is refused before a byte of it is sent
            b"POST /v1/completions HTTP/1.1\r\nHost: test\r\n"
            + f"Content-Type: application/json\r\nContent-Length: {limit + 1}\r\n\r\n".encode()
        )
        response = http.client.HTTPResponse(sock)
        response.begin()
        error = json.loads(response.read())["error"]
    assert response.status == 413 and str(limit) in error["message"]
    with GenerationClient(server.target) as grpc_client, pytest.raises(grpc.RpcError) as info:
        grpc_client.generate(pb.GenerateRequest(prompt="w1 " * (limit // 3 + 1), max_tokens=1))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_prompt_text_too_long_for_the_context_is_refused_before_tokenizing(server):
    """At most 13 characters a token ("<|endoftext|>") × 256: 3328 characters. Spaces make no
    token at all: tokenized, this prompt would be one token; its length alone refuses it."""
    prompt = " " * 3400 + "w1"
    status, _, text = _post(server.http, "/v1/completions", {"prompt": prompt, "max_tokens": 1})
    error = json.loads(text)["error"]
    assert status == 400 and error["param"] == "prompt", text
    assert "3402" in error["message"] and "3328" in error["message"]
    chat = {"messages": [{"role": "user", "content": prompt}], "max_tokens": 1}
    status, _, text = _post(server.http, "/v1/chat/completions", chat)
    error = json.loads(text)["error"]
    assert status == 400 and error["param"] == "messages" and "3328" in error["message"]
    with GenerationClient(server.target) as grpc_client, pytest.raises(grpc.RpcError) as info:
        grpc_client.generate(pb.GenerateRequest(prompt=prompt, max_tokens=1))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("prompt:") and "3402" in info.value.details()


def test_32_concurrent_streams_complete_and_a_full_queue_is_429(server):
    def one(i):
        for attempt in range(400):
            body = {"prompt": [i % 90 + 1, 7], "max_tokens": 6, "stream": True, "ignore_eos": True}
            status, headers, text = _post(server.http, "/v1/completions", body)
            if status == 429:
                assert int(headers["retry-after"]) >= 1
                time.sleep(0.05)  # the bounded queue is full: retry, as a client should
                continue
            assert status == 200, text
            data = _sse_data(text)
            assert data[-1] == "[DONE]"
            return len(data) - 1, attempt
        raise AssertionError("never admitted")

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one, range(32)))
    assert [chunks for chunks, _ in results] == [6] * 32
    assert any(attempts > 0 for _, attempts in results)  # 429 did happen


def test_dropped_stream_frees_its_blocks(server):
    cancelled = 'brownout_requests_finished_total{reason="cancelled"}'
    before = _metric(server.http, cancelled)
    body = {"prompt": [3, 4], "max_tokens": 250, "stream": True, "ignore_eos": True}
    connection, response = _post(server.http, "/v1/completions", body, read_all=False)
    assert response.status == 200
    assert response.readline().startswith(b"data: ")  # generating
    connection.sock.close()  # the client goes away mid-stream
    connection.close()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if (
            _metric(server.http, cancelled) == before + 1
            and _metric(server.http, "brownout_kv_blocks_used") == 0
            and _metric(server.http, "brownout_running_requests") == 0
        ):
            break
        time.sleep(0.05)
    assert _metric(server.http, cancelled) == before + 1  # cancelled, not run to its length
    assert _metric(server.http, "brownout_kv_blocks_used") == 0


def test_api_key_on_both_fronts_then_sigterm_drains_both(tiny_with_tokenizer, start_server):
    proc = start_server(
        tiny_with_tokenizer,
        *("--kv-blocks", "16", "--max-model-len", "32"),
        env={"BROWNOUT_JAX_API_KEY": KEY},
    )
    request = {"prompt": [5, 6], "max_tokens": 4}
    for key in (None, "sk-wrong"):
        status, _, text = _post(proc.http, "/v1/completions", request, key=key)
        assert status == 401 and json.loads(text)["error"]["code"] == "invalid_api_key"
        with GenerationClient(proc.target, api_key=key) as c, pytest.raises(grpc.RpcError) as info:
            c.generate(pb.GenerateRequest(prompt_token_ids=[5, 6], max_tokens=4))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(openai.AuthenticationError):
        _client(proc, "sk-wrong").models.list()
    assert _client(proc, KEY).completions.create(model="model", prompt=[5, 6], max_tokens=2)
    remote = [sys.executable, "-m", "brownout_jax.cli", "generate", "--server", proc.target]
    remote += ["--prompt-ids", "5,6", "--max-new-tokens", "2"]
    no_key = {k: v for k, v in os.environ.items() if k != "BROWNOUT_JAX_API_KEY"}
    refused = subprocess.run(remote, capture_output=True, text=True, timeout=300, env=no_key)
    assert refused.returncode == 1 and "UNAUTHENTICATED" in refused.stderr
    allowed = subprocess.run(
        remote,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "BROWNOUT_JAX_API_KEY": KEY},
    )
    assert allowed.returncode == 0, allowed.stderr
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(proc.target))
    reply = health.Check(health_pb2.HealthCheckRequest(service=""))  # open without a key
    assert reply.status == health_pb2.HealthCheckResponse.SERVING

    # Requests in flight on both fronts when SIGTERM arrives all finish.
    stream = {"prompt": [3, 4], "max_tokens": 20, "stream": True, "ignore_eos": True}
    http_streams = [
        _post(proc.http, "/v1/completions", stream, KEY, read_all=False) for _ in range(3)
    ]
    grpc_client = GenerationClient(proc.target, api_key=KEY)
    grpc_calls = [
        grpc_client.stream(
            pb.GenerateRequest(prompt_token_ids=[i + 1, 2], max_tokens=20, ignore_eos=True)
        )
        for i in range(3)
    ]
    firsts = [response.readline() for _, response in http_streams]
    assert all(line.startswith(b"data: ") for line in firsts)
    assert all(len(next(call).token_ids) == 1 for call in grpc_calls)
    proc.process.send_signal(signal.SIGTERM)
    for connection, response in http_streams:
        rest = _sse_data(response.read().decode())  # after the first token's chunk
        connection.close()
        assert rest[-1] == "[DONE]"
        assert json.loads(rest[-2])["choices"][0]["finish_reason"] == "length"
        assert 1 + len(rest[:-1]) == 20
    for call in grpc_calls:
        rest = list(call)
        assert 1 + sum(len(r.token_ids) for r in rest) == 20
        assert rest[-1].finish_reason == "length"
    grpc_client.close()
    assert proc.stop() == 0
    assert "draining" in proc.output and KEY not in proc.output
