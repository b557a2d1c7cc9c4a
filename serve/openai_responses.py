"""The engine's token events → OpenAI response bodies and stream chunks, with brownout-jax's
extensions (timing and the brownout thresholds a request ran at).

A request is one or more samples (engine requests, ``PreparedRequest.samples``): whole, each
prompt's best ``n`` of its ``best_of`` samples become its choices; streamed, every sample is a
choice (best_of > n is not streamed) and its chunks carry its index."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from brownout_jax.engine.requests import (
    FinishReason,
    GenerationOutput,
    RequestMetrics,
    TokenEvent,
)
from brownout_jax.engine.requests import (
    TokenLogprob as EngineTokenLogprob,
)
from brownout_jax.serve.openai_logprobs import (
    CompletionLogprobsBuilder,
    chat_logprobs,
    prompt_logprobs,
)
from brownout_jax.serve.openai_protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatDelta,
    CompletionChoice,
    CompletionChunk,
    CompletionResponse,
    Thresholds,
    Timing,
    Usage,
)
from brownout_jax.serve.openai_requests import PreparedRequest, finish_reason


@dataclasses.dataclass
class Collected:
    """One sample's generation, gathered from its events."""

    text: str
    token_ids: list[int]
    logprobs: list[float]
    top_logprobs: list[tuple[tuple[int, float], ...]]
    finish: FinishReason
    metrics: RequestMetrics
    prompt_ids: tuple[int, ...] = ()  # as the engine tokenized the prompt
    prompt_logprobs: tuple[EngineTokenLogprob | None, ...] | None = None

    @classmethod
    def from_events(
        cls,
        events: list[TokenEvent],
        metrics: RequestMetrics,
        prompt_ids: Sequence[int] = (),
        echo_only: bool = False,
    ) -> Collected:
        """``echo_only``: the token generated to score the prompt is dropped (max_tokens = 0)."""
        out = GenerationOutput.from_events("", events, metrics)
        finish = out.finish_reason
        return cls(
            text="" if echo_only else out.text,
            token_ids=[] if echo_only else out.token_ids,
            logprobs=[] if echo_only else out.logprobs,
            top_logprobs=[] if echo_only else out.top_logprobs,
            finish=FinishReason.LENGTH if echo_only and finish is FinishReason.STOP else finish,
            metrics=metrics,
            prompt_ids=tuple(prompt_ids),
            prompt_logprobs=out.prompt_logprobs,
        )

    @property
    def cumulative_logprob(self) -> float:
        return float(sum(self.logprobs))


# ----------------------------------------------------------------------------- extensions


def usage(prepared: PreparedRequest, metrics: Sequence[RequestMetrics]) -> Usage:
    """Every prompt once, every generated sample's tokens (best_of's discarded ones too: they
    were generated; OpenAI counts them as well); none for max_tokens = 0."""
    prompt = sum(
        metrics[i * prepared.best_of].prompt_tokens for i in range(len(metrics) // prepared.best_of)
    )
    completion = 0 if prepared.echo_only else sum(m.completion_tokens for m in metrics)
    return Usage(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
    )


def timing(metrics: Sequence[RequestMetrics]) -> Timing:
    """One sample's latencies; over several, from the first arrival to the first token and to
    the last finish, the longest queueing, and the mean of the samples' TPOTs."""
    if len(metrics) == 1:
        (one,) = metrics
        return Timing(ttft_s=one.ttft, tpot_s=one.tpot_mean, queue_s=one.queue_time, e2e_s=one.e2e)
    arrival = min(m.arrival for m in metrics)
    firsts = [m.first_token for m in metrics if m.first_token is not None]
    finishes = [m.finished for m in metrics]
    queues = [m.queue_time for m in metrics if m.queue_time is not None]
    tpots = [m.tpot_mean for m in metrics if m.tpot_mean is not None]
    return Timing(
        ttft_s=min(firsts) - arrival if firsts else None,
        tpot_s=sum(tpots) / len(tpots) if tpots else None,
        queue_s=max(queues) if queues else None,
        e2e_s=None if None in finishes else max(finishes) - arrival,
    )


def thresholds(metrics: Sequence[RequestMetrics]) -> list[Thresholds]:
    used = set().union(*(m.thresholds_used for m in metrics))
    return [Thresholds(prefill=t.prefill, decode=t.decode) for t in sorted(used)]


def to_json(model) -> dict:
    """A response as JSON; the extension fields only where set."""
    data = model.model_dump(mode="json")
    for optional in ("timing", "thresholds", "usage", "prompt_logprobs"):
        if data.get(optional) is None:
            data.pop(optional, None)
    for choice in data.get("choices", ()):
        if choice.get("prompt_logprobs", ()) is None:
            del choice["prompt_logprobs"]
        if "delta" in choice:  # a stream's delta carries only what changed
            choice["delta"] = {k: v for k, v in choice["delta"].items() if v is not None}
    return data


# ----------------------------------------------------------------------------- whole


def _best(prepared: PreparedRequest, samples: list[Collected]) -> list[list[Collected]]:
    """Per prompt, its choices: all its samples in order (best_of = n), else the n with the
    highest cumulative logprob, best first."""
    per_prompt = [
        samples[i : i + prepared.best_of] for i in range(0, len(samples), prepared.best_of)
    ]
    if prepared.best_of == prepared.n:
        return per_prompt
    return [
        sorted(group, key=lambda s: s.cumulative_logprob, reverse=True)[: prepared.n]
        for group in per_prompt
    ]


def echo_text(prepared: PreparedRequest, prompt: int, prompt_ids: Sequence[int], tokenizer):
    """The prompt as sent; token ids decoded (nothing without a tokenizer, like any text)."""
    text = prepared.prompt_texts[prompt]
    if text is not None:
        return text
    return "" if tokenizer is None else tokenizer.decode(list(prompt_ids))


def completion_response(
    request_id: str,
    model: str,
    prepared: PreparedRequest,
    samples: list[Collected],
    tokenizer,
) -> CompletionResponse:
    choices = []
    for prompt, group in enumerate(_best(prepared, samples)):
        for j, sample in enumerate(group):
            text = sample.text
            logprobs = None
            if prepared.logprobs is not None:
                builder = CompletionLogprobsBuilder(tokenizer, prepared.logprobs)
                if prepared.echo:
                    builder.add_prompt(sample.prompt_ids, sample.prompt_logprobs)
                for token, lp, top in zip(
                    sample.token_ids, sample.logprobs, sample.top_logprobs, strict=True
                ):
                    builder.add(token, lp, top)
                logprobs = builder.take()
            if prepared.echo:
                text = echo_text(prepared, prompt, sample.prompt_ids, tokenizer) + text
            choices.append(
                CompletionChoice(
                    index=prompt * prepared.n + j,
                    text=text,
                    logprobs=logprobs,
                    finish_reason=finish_reason(sample.finish),
                    prompt_logprobs=_prompt_logprobs(prepared, sample, tokenizer),
                )
            )
    metrics = [s.metrics for s in samples]
    return CompletionResponse(
        id=request_id,
        model=model,
        choices=choices,
        usage=usage(prepared, metrics),
        timing=timing(metrics),
        thresholds=thresholds(metrics),
    )


def _prompt_logprobs(prepared: PreparedRequest, sample: Collected, tokenizer):
    if prepared.prompt_logprobs is None:
        return None
    return prompt_logprobs(
        tokenizer, prepared.prompt_logprobs, sample.prompt_ids, sample.prompt_logprobs
    )


def chat_response(
    request_id: str,
    model: str,
    prepared: PreparedRequest,
    samples: list[Collected],
    tokenizer,
) -> ChatCompletionResponse:
    choices = []
    for j, sample in enumerate(samples):
        logprobs = None
        if prepared.logprobs is not None:
            logprobs = chat_logprobs(
                tokenizer, prepared.logprobs, sample.token_ids, sample.logprobs, sample.top_logprobs
            )
        choices.append(
            ChatChoice(
                index=j,
                message=AssistantMessage(content=sample.text),
                logprobs=logprobs,
                finish_reason=finish_reason(sample.finish),
            )
        )
    metrics = [s.metrics for s in samples]
    return ChatCompletionResponse(
        id=request_id,
        model=model,
        choices=choices,
        usage=usage(prepared, metrics),
        timing=timing(metrics),
        thresholds=thresholds(metrics),
        prompt_logprobs=_prompt_logprobs(prepared, samples[0], tokenizer),
    )


# ----------------------------------------------------------------------------- streamed


@dataclasses.dataclass
class _ChoiceState:
    first: bool = True
    logprobs: CompletionLogprobsBuilder | None = None


class ChunkWriter:
    """One stream's chunks: one per token event of each choice (so a client times every
    token), its finishing one with timing and thresholds, then usage when asked for."""

    def __init__(
        self, chat: bool, request_id: str, model: str, prepared: PreparedRequest, tokenizer
    ):
        self.chat = chat
        self.request_id = request_id
        self.model = model
        self.prepared = prepared
        self.tokenizer = tokenizer
        k = prepared.logprobs
        self._choices = [
            _ChoiceState(
                logprobs=None if chat or k is None else CompletionLogprobsBuilder(tokenizer, k)
            )
            for _ in prepared.samples
        ]

    def event(
        self,
        sample: int,
        event: TokenEvent,
        metrics: RequestMetrics,
        prompt_ids: Sequence[int] = (),
    ):
        """The chunk of ``sample``'s event (``prompt_ids``: its prompt as the engine
        tokenized it, for echo)."""
        state = self._choices[sample]
        prepared = self.prepared
        keep = not prepared.echo_only
        ids = [event.token_id] if keep and event.token_id is not None else []
        lps = [event.logprob] if ids else []
        tops = [event.top_logprobs] if ids else []
        reason = event.finish_reason
        if prepared.echo_only and reason is FinishReason.STOP:
            reason = FinishReason.LENGTH
        finish = None if reason is None else finish_reason(reason)
        extras = {}
        if reason is not None:
            extras = {"timing": timing([metrics]), "thresholds": thresholds([metrics])}
        index = prepared.choice_index(sample)
        text = event.text if keep else ""
        if self.chat:
            # The role rides on the first token's chunk, so a client's first chunk is a token.
            delta = ChatDelta(role="assistant" if state.first else None, content=text)
            logprobs = None
            if prepared.logprobs is not None:
                logprobs = chat_logprobs(self.tokenizer, prepared.logprobs, ids, lps, tops)
            choice = ChatChunkChoice(
                index=index, delta=delta, logprobs=logprobs, finish_reason=finish
            )
            chunk = ChatCompletionChunk(
                id=self.request_id, model=self.model, choices=[choice], **extras
            )
            if state.first and prepared.prompt_logprobs is not None:
                chunk.prompt_logprobs = prompt_logprobs(
                    self.tokenizer, prepared.prompt_logprobs, prompt_ids, event.prompt_logprobs
                )
        else:
            prompt_part = None
            if state.first and prepared.echo:
                prompt = prepared.prompt_of(sample)
                text = echo_text(prepared, prompt, prompt_ids, self.tokenizer) + text
                if state.logprobs is not None:
                    state.logprobs.add_prompt(prompt_ids, event.prompt_logprobs)
            if state.first and prepared.prompt_logprobs is not None:
                prompt_part = prompt_logprobs(
                    self.tokenizer, prepared.prompt_logprobs, prompt_ids, event.prompt_logprobs
                )
            logprobs = None
            if state.logprobs is not None:
                for token, lp, top in zip(ids, lps, tops, strict=True):
                    state.logprobs.add(token, lp, top)
                logprobs = state.logprobs.take()
            choice = CompletionChoice(
                index=index,
                text=text,
                logprobs=logprobs,
                finish_reason=finish,
                prompt_logprobs=prompt_part,
            )
            chunk = CompletionChunk(
                id=self.request_id, model=self.model, choices=[choice], **extras
            )
        state.first = False
        return chunk

    def usage(self, metrics: Sequence[RequestMetrics]):
        kind = ChatCompletionChunk if self.chat else CompletionChunk
        return kind(
            id=self.request_id, model=self.model, choices=[], usage=usage(self.prepared, metrics)
        )
