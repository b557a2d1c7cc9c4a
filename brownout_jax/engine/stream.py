"""One request's output: detokenization, stop checks and its token events. No JAX.

The engine thread calls :meth:`TokenStream.token` for every token read back and
:meth:`TokenStream.close` when the request ends for another reason; every request gets
exactly one finishing event.
"""

from __future__ import annotations

from brownout_jax.engine.detokenize import IncrementalText
from brownout_jax.engine.phase import Thresholds
from brownout_jax.engine.requests import FinishReason, RequestHandle, TokenEvent


class TokenStream:
    def __init__(self, handle: RequestHandle, tokenizer, eos_token_ids: frozenset[int]):
        request = handle.request
        stop_ids = set(request.stop_token_ids)
        if not request.ignore_eos:
            stop_ids |= eos_token_ids
        self.handle = handle
        self.stop_ids = frozenset(stop_ids)
        self.text = IncrementalText(tokenizer, request.stop)

    def token(
        self, generated: list[int], logprob: float, now: float, thresholds: Thresholds
    ) -> FinishReason | None:
        """Emits the last of ``generated``; returns why the request finished with it, if it
        did (a stop string, a stop id or EOS, or max_new_tokens)."""
        metrics = self.handle.metrics
        if metrics.first_token is None:
            metrics.first_token = now
        metrics.token_times.append(now)
        metrics.thresholds_used.add(thresholds)
        token = generated[-1]
        delta, stopped = self.text.update(generated)
        finish = None
        if stopped or token in self.stop_ids:
            finish = FinishReason.STOP
        elif len(generated) >= self.handle.request.max_new_tokens:
            finish = FinishReason.LENGTH
        if finish is not None:
            delta += self.text.flush()
            metrics.finished = now  # before the event: a reader of it sees a complete record
        self.handle._push(TokenEvent(token, logprob, delta, finish, None, thresholds))
        return finish

    def close(
        self,
        reason: FinishReason,
        now: float,
        thresholds: Thresholds,
        error: str | None = None,
        event_sent: bool = False,
    ) -> None:
        """Ends the request: the finishing event (unless its last token carried it)."""
        if self.handle.metrics.finished is None:
            self.handle.metrics.finished = now
        if not event_sent:
            self.handle._push(TokenEvent(None, None, "", reason, error, thresholds))
        self.handle.done = True
