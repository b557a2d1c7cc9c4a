"""A scripted engine for the HTTP front's tests (no JAX): it validates like the engine and
answers with fixed tokens, their alternatives and prompt logprobs when asked for."""

from __future__ import annotations

import dataclasses
import threading
import time
import types

from brownout_jax.engine.metrics import EngineMetrics
from brownout_jax.engine.phase import Thresholds
from brownout_jax.engine.requests import (
    EngineClosedError,
    EngineDeadError,
    EngineOverloadedError,
    FinishReason,
    RequestHandle,
    StepFailureKind,
    TokenEvent,
    TokenLogprob,
    validate_request,
)

VOCAB = 100


def scripted_top(token: int, logprob: float, k: int) -> tuple[tuple[int, float], ...]:
    """The k best (id, logprob) at a position whose chosen token is ``token`` (the best)."""
    return tuple(((token + m) % VOCAB, logprob - m) for m in range(k))


def scripted_prompt_logprobs(ids, k: int) -> tuple[TokenLogprob | None, ...]:
    """Prompt token i > 0: logprob −0.1·i and its k alternatives (itself the best)."""
    later = [TokenLogprob(t, -0.1 * i, scripted_top(t, -0.1 * i, k)) for i, t in enumerate(ids)]
    return (None, *later[1:])


class WordTokenizer:
    """Token i is the word "w<i>"; a chat turn is its words, the assistant's turn token 99."""

    chat_template = "scripted"

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return ([0] if add_special_tokens else []) + [int(w[1:]) for w in text.split()]

    def decode(self, ids) -> str:
        return " ".join(f"w{i}" for i in ids)

    def convert_ids_to_tokens(self, ids) -> list[str]:
        return [f"w{i}" for i in ids]

    def apply_chat_template(self, messages, add_generation_prompt: bool, tokenize: bool):
        ids = [t for m in messages for t in self.encode(m["content"])]
        return [*ids, 99] if add_generation_prompt else ids


class ScriptedEngine:
    """Validates like the engine (the shared validate_request), then answers per ``mode``:
    ok (tokens 10, 11, … up to 4 or max_tokens, logprob −0.25 each after the first),
    overloaded, closed, dead, error_event, hang (one token, then waits), step_oom / step_error
    (one token, then its step fails on the device), block (``submit`` waits for ``release``,
    then ok)."""

    model_name = "scripted"
    max_model_len = 64
    tokenizer = None
    longest_token = None
    model_config = types.SimpleNamespace(vocab_size=VOCAB)

    def __init__(self, max_queue: int = 1024):
        self.config = types.SimpleNamespace(max_queue=max_queue)
        self.mode = "ok"
        self.alive = True
        self.metrics = EngineMetrics()
        self.cancelled = threading.Event()
        self.release = threading.Event()
        self.submitted = []  # every request that passed validation
        self.shared_with = []  # per submit: the handle of the sample whose prefix it shares
        self.logprob_shift = None  # request → added to each token's logprob (best_of tests)
        self.gives_prompt_logprobs = True

    def stats(self):
        return None

    def submit(self, request, share_prefix_with=None):
        if self.mode == "block":
            assert self.release.wait(60)
        if request.prompt is not None and self.tokenizer is not None:
            ids = tuple(self.tokenizer.encode(request.prompt))
            request = dataclasses.replace(request, prompt=None, prompt_token_ids=ids)
        validate_request(request, vocab_size=VOCAB, max_model_len=self.max_model_len)
        errors = {
            "overloaded": EngineOverloadedError("3 requests already wait for admission"),
            "closed": EngineClosedError("the engine is shutting down"),
            "dead": EngineDeadError("the engine loop died: RuntimeError('boom')"),
        }
        if self.mode in errors:
            raise errors[self.mode]
        self.submitted.append(request)
        self.shared_with.append(share_prefix_with)
        handle = RequestHandle(f"scripted-{len(self.submitted) - 1}", request, self)
        handle.metrics.prompt_tokens = len(request.prompt_token_ids)
        threading.Thread(target=self._play, args=(handle, self.mode), daemon=True).start()
        return handle

    def _play(self, handle, mode):
        thresholds = Thresholds(prefill=1.0, decode=0.5)
        if mode == "error_event":
            handle._push(TokenEvent(7, -0.5, "w7", None, None, thresholds))
            handle._push(TokenEvent(None, None, "", FinishReason.ERROR, "engine failure: X"))
            return
        if mode in ("step_oom", "step_error"):
            kind = StepFailureKind("out_of_memory" if mode == "step_oom" else "device_error")
            error = "the decode step running this request failed on the device: INTERNAL: X"
            handle._push(TokenEvent(7, -0.5, "w7", None, None, thresholds))
            handle._push(TokenEvent(None, None, "", FinishReason.ERROR, error, thresholds, kind))
            return
        request = handle.request
        prompt = None
        if request.prompt_logprobs is not None and self.gives_prompt_logprobs:
            prompt = scripted_prompt_logprobs(request.prompt_token_ids, request.prompt_logprobs)
        count = 1 if mode == "hang" else min(4, request.max_new_tokens)
        for i in range(count):
            now = time.monotonic()
            handle.metrics.first_token = handle.metrics.first_token or now
            handle.metrics.token_times.append(now)
            handle.metrics.thresholds_used.add(thresholds)
            finish = FinishReason.LENGTH if i == count - 1 and mode != "hang" else None
            if finish is not None:
                handle.metrics.finished = now
                handle.done = True
            token, logprob = 10 + i, -0.25 * i
            if self.logprob_shift is not None:
                logprob += self.logprob_shift(request)
            handle._push(
                TokenEvent(
                    token,
                    logprob,
                    f" w{token}",
                    finish,
                    None,
                    thresholds,
                    top_logprobs=scripted_top(token, logprob, request.top_logprobs),
                    prompt_logprobs=prompt if i == 0 else None,
                )
            )

    def cancel(self, handle):
        self.cancelled.set()
        handle._push(TokenEvent(None, None, "", FinishReason.CANCELLED))


def running_front(key: str):
    """An HTTP front on an ephemeral port with API key ``key`` (a fixture's body: yields
    (state, port), stops the front after)."""
    from brownout_jax.serve.http_server import HttpFront
    from brownout_jax.serve.serving_state import ApiKey, ServingState

    state = ServingState(ApiKey(key))
    http_front = HttpFront(state, "127.0.0.1", 0)
    http_front.start()
    yield state, http_front.port
    http_front.stop()


def serving(state, engine):
    """``engine`` behind ``state`` while the fixture lasts (a fixture's body: yields it)."""
    state.engine = engine
    state.set_serving(True)
    yield engine
    state.engine = None
    state.set_serving(False)
