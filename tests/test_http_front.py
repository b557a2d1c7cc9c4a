"""The HTTP front's protocol on a scripted engine (no JAX): error shapes and statuses, the
API key, streaming format, a dropped stream cancelling its request, and the bounds (body size,
the tokenizing pool, a failed step). The same front on a real engine: tests/test_http_api.py."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time

import pytest
from scripted_engine import ScriptedEngine, running_front, serving

from brownout_jax.engine.requests import BrownoutClass
from brownout_jax.serve.http_server import HttpFront
from brownout_jax.serve.request_limits import RequestLimits
from brownout_jax.serve.server import ServerConfig, serve
from brownout_jax.serve.serving_state import ApiKey, ServingState

KEY = "test-key-7f3a"


@pytest.fixture(scope="module")
def front():
    yield from running_front(KEY)


@pytest.fixture()
def engine(front):
    yield from serving(front[0], ScriptedEngine())


LIMIT = 2048  # the bounded front's --max-request-bytes


@pytest.fixture(scope="module")
def bounded():
    """A front with a small body limit and a tokenizing pool of one thread and one place."""
    state = ServingState(ApiKey(KEY))
    limits = RequestLimits(max_request_bytes=LIMIT, prepare_threads=1, prepare_queue=1)
    http_front = HttpFront(state, "127.0.0.1", 0, limits)
    http_front.start()
    state.engine = ScriptedEngine()
    state.set_serving(True)
    yield state, http_front
    http_front.stop()


def raw_post(port: int, headers: bytes, *parts: bytes) -> tuple[int, dict, str]:
    """POST /v1/completions written by hand: ``headers`` (CRLF-ended lines) after the usual
    ones, then ``parts`` of the body as given, then the response."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: test\r\n"
            + f"Authorization: Bearer {KEY}\r\n".encode()
            + b"Content-Type: application/json\r\n"
            + headers
            + b"\r\n"
        )
        for part in parts:
            sock.sendall(part)
        response = http.client.HTTPResponse(sock)
        response.begin()
        text = response.read().decode()
        return response.status, dict(response.getheaders()), text


def _chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def test_body_over_the_limit_is_413_before_it_is_read(bounded):
    state, front = bounded
    # The Content-Length alone decides: not one byte of the body is ever sent.
    status, _, text = raw_post(front.port, f"Content-Length: {50 << 20}\r\n".encode())
    error = json.loads(text)["error"]
    assert status == 413 and error["code"] == "request_too_large"
    assert str(LIMIT) in error["message"] and str(50 << 20) in error["message"]
    # Over the limit and not even JSON: refused for its size, never parsed.
    status, _, text = call(front.port, "POST", "/v1/completions", raw=b"{" * (LIMIT + 1))
    assert status == 413 and str(LIMIT) in json.loads(text)["error"]["message"]
    assert state.engine.submitted == []


def test_chunked_body_is_bounded_while_it_is_read(bounded):
    state, front = bounded
    chunked = b"Transfer-Encoding: chunked\r\n"
    # No Content-Length: refused once what arrived passes the limit; the rest is never sent.
    filler = _chunk(b" " * 1024)
    status, _, text = raw_post(front.port, chunked, filler, filler, filler)
    assert status == 413 and str(LIMIT) in json.loads(text)["error"]["message"]
    assert state.engine.submitted == []
    # Within the limit, a chunked body is served like any other.
    body = json.dumps({"prompt": [1, 2], "max_tokens": 4}).encode()
    parts = (_chunk(body[:5]), _chunk(body[5:]), b"0\r\n\r\n")
    status, _, text = raw_post(front.port, chunked, *parts)
    assert status == 200, text
    assert json.loads(text)["choices"][0]["text"] == " w10 w11 w12 w13"


def test_a_full_tokenizing_pool_is_429_at_once(bounded):
    state, front = bounded
    port = front.port
    state.engine.mode = "block"
    answers = []

    def blocked() -> None:
        answers.append(call(port, "POST", "/v1/completions", {"prompt": [1, 2]}))

    threads = [threading.Thread(target=blocked) for _ in range(2)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 60  # a bound on a wait for a state, not a timing claim
    while front.prepare_pool.pending < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert front.prepare_pool.pending == 2  # one on the pool's thread, one waiting
    try:
        status, headers, text = call(port, "POST", "/v1/completions", {"prompt": [1, 2]})
        error = json.loads(text)["error"]
        assert status == 429 and headers["retry-after"] == "1"
        assert error["code"] == "prepare_queue_full" and "retry later" in error["message"]
    finally:
        state.engine.release.set()
        for thread in threads:
            thread.join(60)
    assert [a[0] for a in answers] == [200, 200]
    assert front.prepare_pool.pending == 0
    state.engine.mode = "ok"


def call(port, method, path, body=None, key=KEY, raw: bytes | None = None):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    payload = raw if raw is not None else None if body is None else json.dumps(body).encode()
    connection.request(method, path, body=payload, headers=headers)
    response = connection.getresponse()
    text = response.read().decode()
    connection.close()
    return response.status, dict(response.getheaders()), text


def test_warming_up_is_503_with_retry_after(front):
    _, port = front
    status, _, text = call(port, "GET", "/health")
    assert status == 503 and "warming up" in text
    status, headers, text = call(port, "POST", "/v1/completions", {"prompt": [1, 2]})
    assert status == 503 and headers["retry-after"] == "5"
    assert json.loads(text)["error"]["code"] == "warming_up"


def test_health_models_version_metrics(front, engine):
    _, port = front
    assert call(port, "GET", "/health", key=None)[0] == 200
    assert "version" in json.loads(call(port, "GET", "/version", key=None)[2])
    status, _, text = call(port, "GET", "/metrics", key=None)
    assert status == 200 and "brownout_requests_finished" in text
    models = json.loads(call(port, "GET", "/v1/models")[2])
    assert models["data"][0]["id"] == "scripted" and models["data"][0]["max_model_len"] == 64


@pytest.mark.parametrize(
    ("fields", "param", "words"),
    [
        ({"max_tokens": 0}, "max_tokens", ["≥ 1"]),
        ({"temperature": -1}, "temperature", []),
        ({"top_p": 0}, "top_p", []),
        ({"top_k": -2}, "top_k", []),
        ({"seed": -1}, "seed", []),
        ({"prompt": [1, 1000]}, "prompt", ["1000"]),
        ({"prompt": []}, "prompt", ["empty"]),
        ({"prompt": [1] * 70}, "prompt", ["70", "64"]),
        ({"prompt": [1] * 40, "max_tokens": 30}, "max_tokens", ["40", "30", "64"]),
        ({"prompt": [[1], [200]]}, "prompt", ["prompt 1:", "200"]),
        ({"stop": [""]}, "stop", []),
        ({"stop_token_ids": [500]}, "stop_token_ids", []),
        ({"max_tokens": "many"}, "max_tokens", []),
        ({"prompt": 5}, "prompt", ["str, list[int]"]),
        ({"stop": 3}, "stop", ["str, list[str]"]),
        ({"n": 0}, "n", ["≥ 1"]),
        ({"logprobs": 21}, "logprobs", ["20"]),
        ({"brownout": "sometimes"}, "brownout", ["allowed", "never"]),
    ],
)
def test_bad_field_is_400_naming_it(front, engine, fields, param, words):
    _, port = front
    body = {"prompt": [1, 2, 3], "max_tokens": 4, **fields}
    status, _, text = call(port, "POST", "/v1/completions", body)
    error = json.loads(text)["error"]
    assert status == 400, text
    assert error["param"] == param and error["message"].startswith(param)
    assert error["type"] == "invalid_request_error"
    assert all(w in error["message"] for w in words), error["message"]
    assert "Traceback" not in text


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({}, BrownoutClass.ALLOWED),
        ({"brownout": "allowed"}, BrownoutClass.ALLOWED),
        ({"brownout": "never"}, BrownoutClass.NEVER),
    ],
)
def test_brownout_class_reaches_the_engine(front, engine, fields, expected):
    _, port = front
    status, _, text = call(port, "POST", "/v1/completions", {"prompt": [1, 2], **fields})
    assert status == 200, text
    (request,) = engine.submitted
    assert request.brownout is expected


def test_missing_prompt_and_malformed_json_are_400(front, engine):
    _, port = front
    status, _, text = call(port, "POST", "/v1/completions", {"max_tokens": 3})
    assert status == 400 and json.loads(text)["error"]["param"] == "prompt"
    status, _, text = call(port, "POST", "/v1/completions", raw=b"{not json")
    assert status == 400 and "not valid JSON" in json.loads(text)["error"]["message"]


@pytest.mark.parametrize(
    ("mode", "status", "retry_after"),
    [("overloaded", 429, "1"), ("closed", 503, "5"), ("dead", 500, None)],
)
def test_engine_refusals_map_to_statuses(front, engine, mode, status, retry_after):
    state, port = front
    engine.mode = mode
    got, headers, text = call(port, "POST", "/v1/completions", {"prompt": [1, 2]})
    assert got == status and headers.get("retry-after") == retry_after
    assert "Traceback" not in text and json.loads(text)["error"]["message"]
    assert state.serving == (mode != "dead")


def test_error_event_is_500_whole_and_an_error_chunk_streamed(front, engine):
    state, port = front
    engine.mode = "error_event"
    status, _, text = call(port, "POST", "/v1/completions", {"prompt": [1, 2]})
    assert status == 500 and json.loads(text)["error"]["code"] == "engine_failure"
    assert "Traceback" not in text
    state.set_serving(True)
    body = {"prompt": [1, 2], "stream": True}
    status, _, text = call(port, "POST", "/v1/completions", body)
    events = [line[len("data: ") :] for line in text.splitlines() if line.startswith("data: ")]
    assert status == 200 and events[-1] == "[DONE]"
    assert json.loads(events[0])["choices"][0]["text"] == "w7"
    assert json.loads(events[-2])["error"]["code"] == "engine_failure"


@pytest.mark.parametrize(
    ("mode", "status", "code", "retry_after"),
    [("step_oom", 503, "step_out_of_memory", "1"), ("step_error", 500, "step_failed", None)],
)
def test_a_failed_step_is_its_requests_error_and_the_server_serves_on(
    front, engine, mode, status, code, retry_after
):
    state, port = front
    engine.mode = mode
    got, headers, text = call(port, "POST", "/v1/completions", {"prompt": [1, 2]})
    error = json.loads(text)["error"]
    assert got == status and headers.get("retry-after") == retry_after
    assert error["code"] == code and "failed on the device" in error["message"]
    assert "serves on" in error["message"] and "Traceback" not in text
    assert state.serving  # only this request failed: health stays 200
    got, _, text = call(port, "POST", "/v1/completions", {"prompt": [1, 2], "stream": True})
    events = [line[len("data: ") :] for line in text.splitlines() if line.startswith("data: ")]
    assert got == 200 and events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == code
    assert state.serving and call(port, "GET", "/health")[0] == 200


def test_unknown_model_and_route_are_404(front, engine):
    _, port = front
    status, _, text = call(port, "POST", "/v1/completions", {"model": "gpt-5", "prompt": [1]})
    assert status == 404 and json.loads(text)["error"]["param"] == "model"
    status, _, text = call(port, "GET", "/v1/nothing")
    assert status == 404 and "error" in json.loads(text)


@pytest.mark.parametrize("key", [None, "wrong-key"])
def test_api_key_is_required_on_v1_only(front, engine, key):
    _, port = front
    for method, path in (("GET", "/v1/models"), ("POST", "/v1/completions")):
        status, _, text = call(port, method, path, {"prompt": [1]}, key=key)
        assert status == 401 and json.loads(text)["error"]["code"] == "invalid_api_key"
        assert KEY not in text
    assert call(port, "GET", "/health", key=key)[0] == 200
    assert call(port, "GET", "/metrics", key=key)[0] == 200


def test_api_key_never_shown():
    key = ApiKey("s3cret-value")
    assert "s3cret" not in repr(key) and "s3cret" not in str(key)
    assert key.accepts("Bearer s3cret-value") and key.accepts("bearer s3cret-value")
    assert not key.accepts("Bearer s3cret") and not key.accepts("s3cret-value")
    assert not key.accepts(None)


def test_stream_chunks_usage_and_extensions(front, engine):
    _, port = front
    body = {"prompt": [1, 2], "stream": True, "stream_options": {"include_usage": True}}
    status, headers, text = call(port, "POST", "/v1/completions", body)
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    data = [line[len("data: ") :] for line in text.splitlines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    tokens, usage = chunks[:-1], chunks[-1]
    assert "".join(c["choices"][0]["text"] for c in tokens) == " w10 w11 w12 w13"
    assert [c["choices"][0]["finish_reason"] for c in tokens] == [None, None, None, "length"]
    assert tokens[-1]["thresholds"] == [{"prefill": 1.0, "decode": 0.5}]
    assert tokens[-1]["timing"]["ttft_s"] >= 0 and "timing" not in tokens[0]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 4
    assert usage["usage"]["prompt_tokens"] == 2 and usage["usage"]["total_tokens"] == 6


def test_whole_completion_with_logprobs(front, engine):
    _, port = front
    status, _, text = call(port, "POST", "/v1/completions", {"prompt": [1, 2], "logprobs": 0})
    response = json.loads(text)
    assert status == 200 and response["object"] == "text_completion"
    choice = response["choices"][0]
    assert choice["text"] == " w10 w11 w12 w13" and choice["finish_reason"] == "length"
    assert choice["logprobs"]["token_logprobs"] == [0.0, -0.25, -0.5, -0.75]
    assert choice["logprobs"]["tokens"] == [f"token_id:{t}" for t in (10, 11, 12, 13)]
    assert response["usage"]["completion_tokens"] == 4


def test_dropped_stream_cancels_its_request(front, engine):
    _, port = front
    engine.mode = "hang"
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    body = json.dumps({"prompt": [1, 2], "stream": True}).encode()
    connection.request(
        "POST", "/v1/completions", body=body, headers={"Authorization": f"Bearer {KEY}"}
    )
    response = connection.getresponse()
    assert response.status == 200
    assert response.readline().startswith(b"data: ")  # the first token arrived
    connection.sock.close()  # the client goes away mid-stream
    connection.close()
    assert engine.cancelled.wait(30)


class _WarmUpFailed(RuntimeError):
    pass


@pytest.mark.parametrize(
    ("host", "key", "warned"),
    [("0.0.0.0", None, True), ("0.0.0.0", KEY, False), ("127.0.0.1", None, False)],
)
def test_non_loopback_without_key_warns(host, key, warned):
    lines = []

    def make_engine():
        raise _WarmUpFailed("no model here")

    config = ServerConfig(
        host=host, port=0, http_port=0, api_key=None if key is None else ApiKey(key)
    )
    with pytest.raises(_WarmUpFailed):  # the fronts close again, and the error surfaces
        serve(make_engine, config, log=lambda *a, **_: lines.append(" ".join(map(str, a))))
    assert any("without an API key" in line for line in lines) == warned
    assert all(KEY not in line for line in lines)
