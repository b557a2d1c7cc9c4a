"""The engine's logprobs (chosen token, its alternatives, the prompt's) in the shapes clients
parse: OpenAI's legacy completions ``logprobs``, its chat ``logprobs.content`` and vLLM's
``prompt_logprobs``."""

from __future__ import annotations

from collections.abc import Sequence

from brownout_jax.engine.requests import TokenLogprob as EngineTokenLogprob
from brownout_jax.serve.openai_protocol import (
    ChatLogprobs,
    CompletionLogprobs,
    OpenAIError,
    PromptLogprob,
    PromptLogprobs,
    TokenLogprob,
    TopLogprob,
)

Alternatives = Sequence[tuple[int, float]]  # (token id, logprob), best first


def token_text(tokenizer, token_id: int) -> str:
    """How a token reads on its own (vLLM's convention without a tokenizer: token_id:N)."""
    if tokenizer is None:
        return f"token_id:{token_id}"
    return tokenizer.decode([token_id])


def missing_prompt_logprobs() -> OpenAIError:
    """Echo with logprobs needs the engine's prompt logprobs: without them the choice would
    lack the prompt's logprobs, which no client could tell from a real answer."""
    return OpenAIError(
        500,
        "the engine returned no prompt logprobs for an echo with logprobs",
        code="prompt_logprobs_unavailable",
        error_type="internal_error",
    )


def _top_dict(tokenizer, chosen: int, logprob: float, top: Alternatives, k: int) -> dict:
    """{text: logprob} of the chosen token and its ``k`` best alternatives (vLLM's: up to
    k + 1 entries, so that a client can tell whether the chosen token was the best)."""
    entries = {token_text(tokenizer, chosen): logprob}
    for token, value in top[:k]:
        entries.setdefault(token_text(tokenizer, token), value)
    return entries


class CompletionLogprobsBuilder:
    """One choice's legacy ``logprobs``, appended token by token (whole or streamed: each
    chunk takes what was appended since the last ``take``)."""

    def __init__(self, tokenizer, k: int):
        self.tokenizer = tokenizer
        self.k = k
        self.offset = 0  # characters of the choice's text before the next token
        self._part = CompletionLogprobs()

    def add_prompt(self, prompt_ids: Sequence[int], prompt: Sequence[EngineTokenLogprob | None]):
        """An echoed prompt: its first token has no logprob and no alternatives."""
        if prompt is None or len(prompt) != len(prompt_ids):
            raise missing_prompt_logprobs()
        for token, entry in zip(prompt_ids, prompt, strict=True):
            if entry is None:
                self._append(token, None, None)
            else:
                top = _top_dict(self.tokenizer, token, entry.logprob, entry.top, self.k)
                self._append(token, entry.logprob, top)

    def add(self, token: int, logprob: float, top: Alternatives) -> None:
        self._append(token, logprob, _top_dict(self.tokenizer, token, logprob, top, self.k))

    def _append(self, token: int, logprob: float | None, top: dict | None) -> None:
        text = token_text(self.tokenizer, token)
        part = self._part
        part.tokens.append(text)
        part.token_logprobs.append(logprob)
        part.top_logprobs.append(top)
        part.text_offset.append(self.offset)
        self.offset += len(text)

    def take(self) -> CompletionLogprobs:
        part, self._part = self._part, CompletionLogprobs()
        return part


def chat_logprobs(
    tokenizer, k: int, ids: Sequence[int], logprobs: Sequence[float], tops: Sequence[Alternatives]
) -> ChatLogprobs:
    """OpenAI's chat shape: per token its text, logprob, UTF-8 bytes and ``k`` alternatives."""
    content = []
    for token, logprob, top in zip(ids, logprobs, tops, strict=True):
        text = token_text(tokenizer, token)
        alternatives = []
        for alt, value in top[:k]:
            alt_text = token_text(tokenizer, alt)
            alternatives.append(
                TopLogprob(token=alt_text, logprob=value, bytes=list(alt_text.encode()))
            )
        content.append(
            TokenLogprob(
                token=text, logprob=logprob, bytes=list(text.encode()), top_logprobs=alternatives
            )
        )
    return ChatLogprobs(content=content)


def prompt_logprobs(
    tokenizer, k: int, prompt_ids: Sequence[int], prompt: Sequence[EngineTokenLogprob | None]
) -> PromptLogprobs:
    """vLLM's ``prompt_logprobs``: None for the first token, else {id: logprob, rank,
    decoded_token} of the token itself and its ``k`` best alternatives."""
    if prompt is None or len(prompt) != len(prompt_ids):
        raise missing_prompt_logprobs()
    result: PromptLogprobs = []
    for token, entry in zip(prompt_ids, prompt, strict=True):
        if entry is None:
            result.append(None)
            continue
        ranks = {alt: rank for rank, (alt, _) in enumerate(entry.top, start=1)}
        entries = {
            str(token): PromptLogprob(
                logprob=entry.logprob,
                rank=ranks.get(token),
                decoded_token=token_text(tokenizer, token),
            )
        }
        for rank, (alt, value) in enumerate(entry.top[:k], start=1):
            entries.setdefault(
                str(alt),
                PromptLogprob(logprob=value, rank=rank, decoded_token=token_text(tokenizer, alt)),
            )
        result.append(entries)
    return result
