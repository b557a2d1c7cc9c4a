"""Requests, their validation, streamed token events and per-request metrics."""

from __future__ import annotations

import dataclasses
import enum
import json
import queue
import time
from collections.abc import Callable

import numpy as np

from brownout_jax.engine.phase import EXACT, Thresholds


class FinishReason(enum.StrEnum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_new_tokens
    CANCELLED = "cancelled"
    ERROR = "error"


class BrownoutClass(enum.StrEnum):
    """Whether a request's tokens may be browned out (sent to united experts)."""

    ALLOWED = "allowed"  # follows the step's brownout level
    NEVER = "never"  # always its own experts, whatever the level


_BROWNOUT_NAMES = tuple(c.value for c in BrownoutClass)  # a tuple: unhashable input is fine


MAX_LOGPROBS = 20  # alternatives per token a step can return (OpenAI's and vLLM's bound)
# Logit-bias entries per row a step takes: the request's own plus, until min_tokens are out,
# one −inf per stop token id (EOS included). Fixed so that the steps' inputs keep one shape.
MAX_LOGIT_BIAS = 64


class StructuredKind(enum.StrEnum):
    """What a structured-output request constrains its text to."""

    JSON_OBJECT = "json_object"  # any JSON object
    JSON_SCHEMA = "json_schema"  # JSON valid against ``spec`` (a JSON-schema document)
    REGEX = "regex"  # text matching ``spec``
    CHOICE = "choice"  # exactly one of ``choices``
    GRAMMAR = "grammar"  # text of the EBNF grammar ``spec``


@dataclasses.dataclass(frozen=True, slots=True)
class StructuredOutput:
    kind: StructuredKind
    spec: str = ""  # the schema's JSON text, the regex or the grammar; "" for JSON_OBJECT
    choices: tuple[str, ...] = ()  # CHOICE only


@dataclasses.dataclass(frozen=True, slots=True)
class TokenLogprob:
    """A token with its log-probability under the model (before temperature, penalties and
    truncation) and the ``top`` most likely tokens there, (id, logprob) best first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


class RequestError(ValueError):
    """A request field is invalid (gRPC: INVALID_ARGUMENT). ``field`` names it."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class EngineOverloadedError(RuntimeError):
    """The admission queue is full (gRPC: RESOURCE_EXHAUSTED)."""


class EngineClosedError(RuntimeError):
    """The engine is draining or stopped and takes no new requests (gRPC: UNAVAILABLE)."""


class EngineDeadError(RuntimeError):
    """The engine loop died; the cause is chained (gRPC: INTERNAL)."""


class StepFailureKind(enum.StrEnum):
    """Why a step failed on the device. Either way the engine serves on; the fronts tell
    the step's requests apart by it (a retry may succeed once memory frees up)."""

    OUT_OF_MEMORY = "out_of_memory"  # HTTP 503 with Retry-After, gRPC RESOURCE_EXHAUSTED
    DEVICE_ERROR = "device_error"  # HTTP 500, gRPC INTERNAL


_STEP_DETAIL_CHARS = 300  # XLA's messages can run to pages of buffer dumps: the log has them


class StepFailedError(RuntimeError):
    """A device runtime error in one step (the executor's form of JAX's ``JaxRuntimeError``):
    recoverable, the loop fails that step's requests, not the engine. Programming errors never
    take this form: they still stop the engine (fail fast)."""

    def __init__(self, detail: str):
        first = detail.strip().splitlines()[0] if detail.strip() else "unknown device error"
        if len(first) > _STEP_DETAIL_CHARS:
            first = first[: _STEP_DETAIL_CHARS - 1] + "…"
        super().__init__(first)
        lowered = detail.lower()
        # XLA reports an allocation failure as RESOURCE_EXHAUSTED, or as INTERNAL with
        # "Out of memory" in the text (seen on the demo): both are memory pressure.
        oom = "out of memory" in lowered or "resource_exhausted" in lowered
        self.kind = StepFailureKind.OUT_OF_MEMORY if oom else StepFailureKind.DEVICE_ERROR


class ProcessGroupError(RuntimeError):
    """A step failed while the engine spans several processes: a peer died or its
    collectives failed. Not recoverable (the other processes' state is unknown): the engine
    stops, failing every request it holds."""


@dataclasses.dataclass(frozen=True, slots=True)
class GenerationRequest:
    prompt_token_ids: tuple[int, ...] = ()
    prompt: str | None = None  # tokenized by the engine when no ids are given
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    request_id: str | None = None
    brownout: BrownoutClass = BrownoutClass.ALLOWED  # its name is accepted too ("never")
    # False: token ids only (an evaluation or benchmark client): no text is decoded for it
    # unless stop strings need it, and its events' text stays "" either way.
    detokenize: bool = True
    top_logprobs: int = 0  # alternatives returned per generated token, 0 … MAX_LOGPROBS
    # None: no prompt logprobs; k ≥ 0: each prompt token's logprob (the first has none) and
    # its k alternatives, on the first event (echo + logprobs; lm-eval's loglikelihood).
    prompt_logprobs: int | None = None
    presence_penalty: float = 0.0  # subtracted once from every token generated so far
    frequency_penalty: float = 0.0  # subtracted per occurrence in the generated tokens
    # HF/vLLM's: positive logits of prompt and output tokens divided by it, negative ones times it
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    min_p: float = 0.0  # tokens below min_p × the most likely's probability are dropped
    min_tokens: int = 0  # EOS and stop_token_ids are banned until this many were generated
    structured: StructuredOutput | None = None

    def __post_init__(self) -> None:
        # A known name becomes the enum; anything else stays as given for validate_request
        # to refuse with the field's name (a front builds the request before validating it).
        if not isinstance(self.brownout, BrownoutClass) and self.brownout in _BROWNOUT_NAMES:
            object.__setattr__(self, "brownout", BrownoutClass(self.brownout))


def longest_token_chars(tokenizer) -> int | None:
    """The most characters of text one token of ``tokenizer`` stands for: the longest entry
    of its vocabulary (added and special tokens included). A byte-level vocabulary writes
    one character per byte, and a character is at least one byte, so no token covers more
    text characters than its entry is long. None: the tokenizer does not list its vocabulary.
    Scans the vocabulary: compute it once per tokenizer."""
    get_vocab = getattr(tokenizer, "get_vocab", None)
    if get_vocab is None:
        return None
    return max(map(len, get_vocab()), default=None)


def check_prompt_text(
    field: str, chars: int, longest_token: int | None, max_model_len: int
) -> None:
    """Refuses, before any tokenizing, a prompt text that needs more tokens than the context
    holds even if every token were the tokenizer's longest (``longest_token_chars``)."""
    if longest_token is None:
        return
    limit = longest_token * max_model_len
    if chars > limit:
        raise RequestError(
            field,
            f"{chars} characters of prompt text cannot fit the context of {max_model_len} "
            f"tokens (max_model_len): at most {limit} characters ({longest_token} per token, "
            "this tokenizer's longest)",
        )


def validate_request(request: GenerationRequest, vocab_size: int, max_model_len: int) -> None:
    """Raises :class:`RequestError` naming the first bad field."""
    ids = request.prompt_token_ids
    if request.prompt is not None and ids:
        raise RequestError("prompt", "give either prompt text or prompt_token_ids, not both")
    if not ids:
        raise RequestError("prompt", "empty prompt")
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise RequestError("prompt_token_ids", f"ids outside [0, {vocab_size}): {bad[:5]}")
    if request.max_new_tokens < 1:
        raise RequestError("max_tokens", f"must be ≥ 1, got {request.max_new_tokens}")
    if len(ids) >= max_model_len:
        verb = "exceed" if len(ids) > max_model_len else "fill"
        raise RequestError(
            "prompt",
            f"{len(ids)} prompt tokens {verb} the context limit of {max_model_len} tokens "
            "(max_model_len), leaving no room to generate",
        )
    if len(ids) + request.max_new_tokens > max_model_len:
        raise RequestError(
            "max_tokens",
            f"prompt ({len(ids)} tokens) + max_tokens ({request.max_new_tokens}) exceeds the "
            f"context limit of {max_model_len} tokens (max_model_len)",
        )
    if not request.temperature >= 0:
        raise RequestError("temperature", f"must be ≥ 0, got {request.temperature}")
    if not 0 < request.top_p <= 1:
        raise RequestError("top_p", f"must lie in (0, 1], got {request.top_p}")
    if request.top_k < 0:
        raise RequestError("top_k", f"must be ≥ 0, got {request.top_k}")
    if not 0 <= request.seed < 2**32:
        raise RequestError("seed", f"must lie in [0, 2^32), got {request.seed}")
    if any(not s for s in request.stop):
        raise RequestError("stop", "stop strings must be non-empty")
    if not isinstance(request.brownout, BrownoutClass):
        names = " or ".join(repr(name) for name in _BROWNOUT_NAMES)
        raise RequestError("brownout", f"must be {names}, got {request.brownout!r}")
    bad_stop = [t for t in request.stop_token_ids if not 0 <= t < vocab_size]
    if bad_stop:
        raise RequestError("stop_token_ids", f"ids outside [0, {vocab_size}): {bad_stop[:5]}")
    _validate_logit_processing(request, vocab_size)


def _validate_logit_processing(request: GenerationRequest, vocab_size: int) -> None:
    if not 0 <= request.top_logprobs <= MAX_LOGPROBS:
        raise RequestError(
            "logprobs", f"must lie in [0, {MAX_LOGPROBS}], got {request.top_logprobs}"
        )
    if request.prompt_logprobs is not None and not 0 <= request.prompt_logprobs <= MAX_LOGPROBS:
        raise RequestError(
            "prompt_logprobs", f"must lie in [0, {MAX_LOGPROBS}], got {request.prompt_logprobs}"
        )
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(request, name)
        if not -2.0 <= value <= 2.0:
            raise RequestError(name, f"must lie in [-2, 2], got {value}")
    if not 0 < request.repetition_penalty <= 10:  # NaN fails too
        raise RequestError(
            "repetition_penalty", f"must lie in (0, 10], got {request.repetition_penalty}"
        )
    if not 0 <= request.min_p <= 1:
        raise RequestError("min_p", f"must lie in [0, 1], got {request.min_p}")
    if not 0 <= request.min_tokens <= request.max_new_tokens:
        raise RequestError(
            "min_tokens",
            f"must lie in [0, max_tokens = {request.max_new_tokens}], got {request.min_tokens}",
        )
    bias = request.logit_bias
    banned = len(request.stop_token_ids) + 1 if request.min_tokens else 0  # + EOS
    if len(bias) + banned > MAX_LOGIT_BIAS:
        raise RequestError(
            "logit_bias",
            f"at most {MAX_LOGIT_BIAS - banned} entries with these stop_token_ids and "
            f"min_tokens, got {len(bias)}",
        )
    for token, value in bias:
        if not 0 <= token < vocab_size:
            raise RequestError("logit_bias", f"token id {token} outside [0, {vocab_size})")
        if not -100 <= value <= 100:
            raise RequestError("logit_bias", f"bias of token {token} must lie in [-100, 100]")
    if request.structured is not None:
        _validate_structured(request.structured)


def _validate_structured(structured: StructuredOutput) -> None:
    """Its form only (both fronts build one); whether the grammar compiles is the engine's."""
    kind = structured.kind
    if not isinstance(kind, StructuredKind):
        raise RequestError("structured", f"unknown kind {kind!r}")
    if kind is StructuredKind.JSON_SCHEMA:
        try:
            schema = json.loads(structured.spec)
        except json.JSONDecodeError as err:
            raise RequestError("structured", f"the JSON schema is not valid JSON: {err}") from None
        if not isinstance(schema, dict):
            raise RequestError("structured", "a JSON schema must be a JSON object")
    elif kind in (StructuredKind.REGEX, StructuredKind.GRAMMAR) and not structured.spec:
        raise RequestError("structured", f"an empty {kind.value}")
    elif kind is StructuredKind.CHOICE and not structured.choices:
        raise RequestError("structured", "give at least one choice")


@dataclasses.dataclass(frozen=True, slots=True)
class TokenEvent:
    token_id: int | None
    logprob: float | None
    text: str  # text delta ("" without a tokenizer, or for a detokenize=False request)
    finish_reason: FinishReason | None = None
    error: str | None = None
    thresholds: Thresholds = EXACT  # the levels this token's steps ran at
    # Set on the finishing event of a request whose step failed on the device: that request
    # failed, the engine serves on (None with ERROR: the engine itself failed).
    step_failure: StepFailureKind | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()  # (id, logprob) best first, if asked
    # On a request's first event, when it asked for prompt_logprobs: one entry per prompt
    # token, the first None (nothing precedes it).
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None


@dataclasses.dataclass(slots=True)
class RequestMetrics:
    arrival: float
    prompt_tokens: int
    admitted: float | None = None
    first_token: float | None = None
    finished: float | None = None
    token_times: list[float] = dataclasses.field(default_factory=list)
    preemptions: int = 0
    thresholds_used: set[Thresholds] = dataclasses.field(default_factory=set)

    @property
    def completion_tokens(self) -> int:
        return len(self.token_times)

    @property
    def queue_time(self) -> float | None:
        return None if self.admitted is None else self.admitted - self.arrival

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival

    def tpots(self) -> np.ndarray:
        return np.diff(np.asarray(self.token_times))

    @property
    def tpot_mean(self) -> float | None:
        gaps = self.tpots()
        return float(gaps.mean()) if gaps.size else None

    @property
    def tpot_p90(self) -> float | None:
        gaps = self.tpots()
        return float(np.percentile(gaps, 90)) if gaps.size else None

    @property
    def e2e(self) -> float | None:
        return None if self.finished is None else self.finished - self.arrival


@dataclasses.dataclass(slots=True)
class GenerationOutput:
    request_id: str
    token_ids: list[int]
    logprobs: list[float]
    text: str  # "" for a detokenize=False request: decode token_ids if it is wanted after all
    finish_reason: FinishReason
    error: str | None
    metrics: RequestMetrics
    top_logprobs: list[tuple[tuple[int, float], ...]] = dataclasses.field(default_factory=list)
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None

    @classmethod
    def from_events(
        cls, request_id: str, events: list[TokenEvent], metrics: RequestMetrics
    ) -> GenerationOutput:
        """A request's output from its events, the finishing one last."""
        tokens = [e for e in events if e.token_id is not None]
        prompt = next((e.prompt_logprobs for e in events if e.prompt_logprobs is not None), None)
        last = events[-1] if events else None
        return cls(
            request_id=request_id,
            token_ids=[e.token_id for e in tokens],
            logprobs=[e.logprob for e in tokens],
            text="".join(e.text for e in events),
            finish_reason=FinishReason.ERROR if last is None else last.finish_reason,
            error=None if last is None else last.error,
            metrics=metrics,
            top_logprobs=[e.top_logprobs for e in tokens],
            prompt_logprobs=prompt,
        )


class RequestHandle:
    """What ``Engine.submit`` returns: iterate it for token events, or wait for the result."""

    def __init__(self, request_id: str, request: GenerationRequest, engine):
        self.request_id = request_id
        self.request = request
        self.metrics = RequestMetrics(arrival=time.monotonic(), prompt_tokens=0)
        # SimpleQueue: the engine thread puts every token of every request through it.
        self._events: queue.SimpleQueue[TokenEvent] = queue.SimpleQueue()
        self._engine = engine
        self._on_event: Callable[[], None] | None = None
        self.done = False
        self.share_prefix_with: RequestHandle | None = None  # see Engine.submit

    def _push(self, event: TokenEvent) -> None:
        self._events.put(event)
        if self._on_event is not None:
            self._on_event()

    def notify(self, on_event: Callable[[], None]) -> None:
        """Calls ``on_event()`` from the engine thread after each event is queued, so that an
        event loop can wait without a blocked thread per request (the HTTP front's streams);
        it must return at once and never raise. Read the events with :meth:`ready_events`."""
        self._on_event = on_event

    def ready_events(self) -> list[TokenEvent]:
        """The events queued so far, without waiting (the finishing one is the last ever)."""
        ready = []
        while True:
            try:
                ready.append(self._events.get_nowait())
            except queue.Empty:
                return ready

    def cancel(self) -> None:
        self._engine.cancel(self)

    def events(self, timeout: float | None = None):
        """Token events until (and including) the finishing one. Raises
        :class:`EngineDeadError` if the engine dies, TimeoutError after ``timeout`` idle s."""
        while True:
            try:
                event = self._events.get(timeout=timeout)
            except queue.Empty:
                raise TimeoutError(f"{self.request_id}: no event within {timeout}s") from None
            yield event
            if event.finish_reason is not None:
                return

    def __iter__(self):
        return self.events()

    def result(self, timeout: float | None = None) -> GenerationOutput:
        return GenerationOutput.from_events(
            self.request_id, list(self.events(timeout)), self.metrics
        )
