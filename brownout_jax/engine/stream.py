"""One request's output: detokenization, stop checks and its token events. No JAX.

The engine thread calls :meth:`TokenStream.token` for every token read back and
:meth:`TokenStream.close` when the request ends for another reason; every request gets
exactly one finishing event. ``token`` runs for every row of every step on the thread that
also feeds the device: it does no work a step does not need (text only for a reader of it or
for stop strings, the thresholds set touched only when the levels change).
"""

from __future__ import annotations

from brownout_jax.engine.detokenize import IncrementalText
from brownout_jax.engine.phase import Thresholds
from brownout_jax.engine.requests import FinishReason, RequestHandle, TokenEvent, TokenLogprob


class TokenStream:
    def __init__(self, handle: RequestHandle, tokenizer, eos_token_ids: frozenset[int]):
        request = handle.request
        stop_ids = set(request.stop_token_ids)
        # A grammar ends with EOS (its mask allows nothing else once the text is complete):
        # that ends the request even under ignore_eos.
        if not request.ignore_eos or request.structured is not None:
            stop_ids |= eos_token_ids
        self.handle = handle
        self.stop_ids = frozenset(stop_ids)
        self.max_new_tokens = request.max_new_tokens
        # A grammar decides where the text ends: min_tokens does not hold it open.
        self.min_tokens = request.min_tokens if request.structured is None else 0
        # Without a reader of the text (``detokenize=False``) it is decoded only to find stop
        # strings in, and the events carry none.
        needed = tokenizer is not None and (request.detokenize or bool(request.stop))
        self.text = IncrementalText(tokenizer, request.stop) if needed else None
        self.emits_text = request.detokenize
        self._thresholds: Thresholds | None = None  # the last added to thresholds_used

    def token(
        self,
        generated: list[int],
        logprob: float,
        now: float,
        thresholds: Thresholds,
        top: tuple[tuple[int, float], ...] = (),
        prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None,
        grammar_ended: bool = False,
    ) -> FinishReason | None:
        """Emits the last of ``generated`` (with its alternatives ``top``, and on the first
        token the prompt's logprobs when asked); returns why the request finished with it, if
        it did (a stop string, a stop id or EOS — none before min_tokens — or
        max_new_tokens; ``grammar_ended``: the token was its grammar's stop token)."""
        metrics = self.handle.metrics
        if metrics.first_token is None:
            metrics.first_token = now
        metrics.token_times.append(now)
        if thresholds is not self._thresholds:
            metrics.thresholds_used.add(thresholds)
            self._thresholds = thresholds
        token = generated[-1]
        text = self.text
        delta, stopped = ("", False) if text is None else text.update(generated)
        finish = None
        if grammar_ended or (
            (stopped or token in self.stop_ids) and len(generated) > self.min_tokens
        ):
            finish = FinishReason.STOP
        elif len(generated) >= self.max_new_tokens:
            finish = FinishReason.LENGTH
        if finish is not None:
            if text is not None:
                delta += text.flush()
            metrics.finished = now  # before the event: a reader of it sees a complete record
        if not self.emits_text:
            delta = ""
        event = TokenEvent(
            token, logprob, delta, finish, None, thresholds, None, top, prompt_logprobs
        )
        self.handle._push(event)
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
