"""The engine's token events → OpenAI response bodies and stream chunks, with brownout-jax's
extensions (timing and the brownout thresholds a request ran at)."""

from __future__ import annotations

import dataclasses

from brownout_jax.engine.requests import FinishReason, RequestMetrics, TokenEvent
from brownout_jax.serve.openai_protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionResponse,
    Thresholds,
    Timing,
    TokenLogprob,
    Usage,
)
from brownout_jax.serve.openai_requests import PreparedRequest, finish_reason


def usage(metrics: RequestMetrics) -> Usage:
    return Usage(
        prompt_tokens=metrics.prompt_tokens,
        completion_tokens=metrics.completion_tokens,
        total_tokens=metrics.prompt_tokens + metrics.completion_tokens,
    )


def timing(metrics: RequestMetrics) -> Timing:
    return Timing(
        ttft_s=metrics.ttft, tpot_s=metrics.tpot_mean, queue_s=metrics.queue_time, e2e_s=metrics.e2e
    )


def thresholds(metrics: RequestMetrics) -> list[Thresholds]:
    return [Thresholds(prefill=t.prefill, decode=t.decode) for t in sorted(metrics.thresholds_used)]


def token_text(tokenizer, token_id: int) -> str:
    """How a token reads on its own (vLLM's convention without a tokenizer: token_id:N)."""
    if tokenizer is None:
        return f"token_id:{token_id}"
    return tokenizer.decode([token_id])


def to_json(model) -> dict:
    """A response as JSON; the extension fields only where set."""
    data = model.model_dump(mode="json")
    for optional in ("timing", "thresholds", "usage"):
        if data.get(optional) is None:
            data.pop(optional, None)
    for choice in data.get("choices", ()):
        if "delta" in choice:  # a stream's delta carries only what changed
            choice["delta"] = {k: v for k, v in choice["delta"].items() if v is not None}
    return data


@dataclasses.dataclass
class Collected:
    """A whole generation, gathered from its events."""

    text: str
    token_ids: list[int]
    logprobs: list[float]
    finish: FinishReason

    @classmethod
    def from_events(cls, events: list[TokenEvent]) -> Collected:
        tokens = [e for e in events if e.token_id is not None]
        return cls(
            text="".join(e.text for e in events),
            token_ids=[e.token_id for e in tokens],
            logprobs=[e.logprob for e in tokens],
            finish=events[-1].finish_reason,
        )


def _completion_logprobs(tokenizer, ids, logprobs, start_offset: int) -> CompletionLogprobs:
    texts = [token_text(tokenizer, t) for t in ids]
    offsets, position = [], start_offset
    for text in texts:
        offsets.append(position)
        position += len(text)
    return CompletionLogprobs(
        tokens=texts, token_logprobs=list(logprobs), top_logprobs=None, text_offset=offsets
    )


def _chat_logprobs(tokenizer, ids, logprobs) -> ChatLogprobs:
    content = []
    for token, logprob in zip(ids, logprobs, strict=True):
        text = token_text(tokenizer, token)
        content.append(TokenLogprob(token=text, logprob=logprob, bytes=list(text.encode())))
    return ChatLogprobs(content=content)


def completion_response(
    request_id: str,
    model: str,
    prepared: PreparedRequest,
    done: Collected,
    metrics: RequestMetrics,
    tokenizer,
) -> CompletionResponse:
    logprobs = None
    if prepared.logprobs:
        logprobs = _completion_logprobs(tokenizer, done.token_ids, done.logprobs, 0)
    return CompletionResponse(
        id=request_id,
        model=model,
        choices=[
            CompletionChoice(
                text=done.text, logprobs=logprobs, finish_reason=finish_reason(done.finish)
            )
        ],
        usage=usage(metrics),
        timing=timing(metrics),
        thresholds=thresholds(metrics),
    )


def chat_response(
    request_id: str,
    model: str,
    prepared: PreparedRequest,
    done: Collected,
    metrics: RequestMetrics,
    tokenizer,
) -> ChatCompletionResponse:
    logprobs = (
        _chat_logprobs(tokenizer, done.token_ids, done.logprobs) if prepared.logprobs else None
    )
    return ChatCompletionResponse(
        id=request_id,
        model=model,
        choices=[
            ChatChoice(
                message=AssistantMessage(content=done.text),
                logprobs=logprobs,
                finish_reason=finish_reason(done.finish),
            )
        ],
        usage=usage(metrics),
        timing=timing(metrics),
        thresholds=thresholds(metrics),
    )


class ChunkWriter:
    """One stream's chunks: one per token event (so a client times every token), the
    finishing one with timing and thresholds, then usage when the client asked for it."""

    def __init__(
        self, chat: bool, request_id: str, model: str, prepared: PreparedRequest, tokenizer
    ):
        self.chat = chat
        self.request_id = request_id
        self.model = model
        self.prepared = prepared
        self.tokenizer = tokenizer
        self._first = True
        self._offset = 0

    def event(self, event: TokenEvent, metrics: RequestMetrics):
        ids = [] if event.token_id is None else [event.token_id]
        lps = [] if event.logprob is None else [event.logprob]
        finish = None if event.finish_reason is None else finish_reason(event.finish_reason)
        extras = {}
        if event.finish_reason is not None:
            extras = {"timing": timing(metrics), "thresholds": thresholds(metrics)}
        if self.chat:
            # The role rides on the first token's chunk, so a client's first chunk is a token.
            delta = ChatDelta(role="assistant" if self._first else None, content=event.text)
            logprobs = _chat_logprobs(self.tokenizer, ids, lps) if self.prepared.logprobs else None
            choice = ChatChunkChoice(delta=delta, logprobs=logprobs, finish_reason=finish)
            chunk = ChatCompletionChunk(
                id=self.request_id, model=self.model, choices=[choice], **extras
            )
        else:
            logprobs = None
            if self.prepared.logprobs:
                logprobs = _completion_logprobs(self.tokenizer, ids, lps, self._offset)
            choice = CompletionChoice(text=event.text, logprobs=logprobs, finish_reason=finish)
            chunk = CompletionChunk(
                id=self.request_id, model=self.model, choices=[choice], **extras
            )
        self._first = False
        self._offset += len(event.text)
        return chunk

    def usage(self, metrics: RequestMetrics):
        kind = ChatCompletionChunk if self.chat else CompletionChunk
        return kind(id=self.request_id, model=self.model, choices=[], usage=usage(metrics))
