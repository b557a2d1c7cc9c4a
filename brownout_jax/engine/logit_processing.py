"""Per-row logit processing of the serving steps: logit bias, repetition / frequency / presence
penalties, a structured-output token mask and min-p; the top-K alternatives of each sampled
token and the scores of prompt tokens.

Every request field is a per-row array of the step's inputs, of a shape fixed at compile time,
so no request compiles anything. A step whose rows ask for none of it runs none of it: each
part sits behind a ``lax.cond`` on "any row asked". The penalties need what each sequence has
seen: ``TokenHistory`` (in the engine's donated state) counts, per slot, the generated tokens
and marks the prompt's; a prefill step resets a slot's row when a sequence starts, and each
decode step counts its input token (the slot's last sampled one), so a generated token is
counted once, whether it arrives by decode or by a recomputing prefill.

The order is vLLM's: bias (min_tokens' bans are −inf biases), penalties, the grammar's mask;
then the sampler applies temperature, min-p, top-k and top-p. Log-probabilities reported are
the model's own (before any of it), as vLLM reports them by default.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from brownout_jax.engine.requests import MAX_LOGIT_BIAS, MAX_LOGPROBS
from brownout_jax.engine.structured_output import apply_token_bitmask
from brownout_jax.model.dims import Array, Bool, Float, Int

ALTERNATIVES = MAX_LOGPROBS  # K of the top-K alternatives a step computes when asked


@struct.dataclass
class LogitProcessing:
    bias_ids: Int[Array, "B L"]  # (id 0, bias 0) entries are empty
    bias_values: Float[Array, "B L"]
    presence: Float[Array, " B"]
    frequency: Float[Array, " B"]
    repetition: Float[Array, " B"]  # 1 → off
    min_p: Float[Array, " B"]  # 0 → off
    alternatives: Bool[Array, " B"]  # rows whose top-K alternatives are reported
    masked: Bool[Array, " B"]  # rows under a structured-output grammar
    # Allowed tokens, xgrammar's layout (``structured_output``): all bits set where unmasked.
    token_mask: Int[Array, "B M"]

    @classmethod
    def host(cls, batch: int, vocab_words: int) -> LogitProcessing:
        """Every row neutral, in NumPy (filled by the host, uploaded in the step's words)."""
        return cls(
            bias_ids=np.zeros((batch, MAX_LOGIT_BIAS), np.int32),
            bias_values=np.zeros((batch, MAX_LOGIT_BIAS), np.float32),
            presence=np.zeros(batch, np.float32),
            frequency=np.zeros(batch, np.float32),
            repetition=np.ones(batch, np.float32),
            min_p=np.zeros(batch, np.float32),
            alternatives=np.zeros(batch, bool),
            masked=np.zeros(batch, bool),
            token_mask=np.full((batch, vocab_words), -1, np.int32),
        )


@struct.dataclass
class TokenHistory:
    """Per slot: how often each token was generated, and which tokens its prompt holds."""

    output_counts: Int[Array, "SLOTS V"]
    prompt_seen: Bool[Array, "SLOTS V"]

    @classmethod
    def zeros(cls, num_slots: int, vocab_size: int) -> TokenHistory:
        return cls(
            output_counts=jnp.zeros((num_slots, vocab_size), jnp.int32),
            prompt_seen=jnp.zeros((num_slots, vocab_size), bool),
        )

    @classmethod
    def abstract(cls, num_slots: int, vocab_size: int) -> TokenHistory:
        return cls(
            output_counts=jax.ShapeDtypeStruct((num_slots, vocab_size), jnp.int32),
            prompt_seen=jax.ShapeDtypeStruct((num_slots, vocab_size), jnp.bool_),
        )

    def start_and_record(
        self,
        slots: Int[Array, " B"],
        tokens: Int[Array, "B T"],
        starts: Int[Array, " B"],
        lengths: Int[Array, " B"],
        prompt_lengths: Int[Array, " B"],
        history_from: Int[Array, " B"],
    ) -> TokenHistory:
        """A prefill step: rows starting at position 0 begin their slot's history afresh, and
        so do rows starting on blocks shared with another sample (``history_from`` ≥ 0: that
        slot's prompt marks are copied, its prompt being this one's); then each chunk token
        is marked as prompt, or counted as generated when it lies past the prompt (a
        preempted sequence's context, recomputed)."""
        num_slots, vocab = self.output_counts.shape
        copied = history_from >= 0
        starting = ((starts == 0) | copied) & (lengths > 0)
        fresh = jnp.where(starting, slots, num_slots)
        counts = self.output_counts.at[fresh].set(0, mode="drop")
        marks = self.prompt_seen[jnp.clip(history_from, 0, num_slots - 1)] & copied[:, None]
        seen = self.prompt_seen.at[fresh].set(marks, mode="drop")
        offsets = jnp.arange(tokens.shape[1], dtype=jnp.int32)
        real = offsets < lengths[:, None]
        in_prompt = starts[:, None] + offsets < prompt_lengths[:, None]
        rows = jnp.broadcast_to(slots[:, None], tokens.shape)
        ids = jnp.clip(tokens, 0, vocab - 1)
        seen = seen.at[jnp.where(real & in_prompt, rows, num_slots), ids].set(True, mode="drop")
        generated = jnp.where(real & ~in_prompt, rows, num_slots)
        counts = counts.at[generated, ids].add(1, mode="drop")
        return TokenHistory(output_counts=counts, prompt_seen=seen)

    def record_generated(
        self, slots: Int[Array, " B"], tokens: Int[Array, " B"], active: Bool[Array, " B"]
    ) -> TokenHistory:
        """A decode step: its input tokens (each slot's last sampled) are generated ones."""
        num_slots = self.output_counts.shape[0]
        rows = jnp.where(active, slots, num_slots)
        counts = self.output_counts.at[rows, tokens].add(1, mode="drop")
        return self.replace(output_counts=counts)


def needs_processing(proc: LogitProcessing) -> Bool[Array, ""]:
    penalised = (proc.presence != 0) | (proc.frequency != 0) | (proc.repetition != 1)
    biased = jnp.any(proc.bias_values != 0, axis=-1)
    return jnp.any(penalised | biased | proc.masked)


def process_logits(
    logits: Float[Array, "B V"],
    proc: LogitProcessing,
    history: TokenHistory,
    slots: Int[Array, " B"],
) -> Float[Array, "B V"]:
    """Bias, penalties and the grammar's mask, for every row (neutral rows are unchanged:
    a zero bias, penalties 0 / 0 / 1, an all-ones mask)."""
    batch = logits.shape[0]
    logits = logits.astype(jnp.float32)
    rows = jnp.arange(batch)[:, None]
    logits = logits.at[rows, proc.bias_ids].add(proc.bias_values)
    num_slots = history.output_counts.shape[0]
    index = jnp.minimum(slots, num_slots - 1)  # padding rows: any slot, their output unused
    counts = history.output_counts[index].astype(jnp.float32)
    seen = history.prompt_seen[index] | (counts > 0)
    repetition = proc.repetition[:, None]
    logits = jnp.where(
        seen, jnp.where(logits > 0, logits / repetition, logits * repetition), logits
    )
    logits = logits - proc.frequency[:, None] * counts
    logits = logits - proc.presence[:, None] * (counts > 0)
    if proc.token_mask.shape[1] == 0:  # an engine serving no structured output
        return logits
    return apply_token_bitmask(logits, proc.token_mask)


PACK_WIDTH = 2 + 2 * ALTERNATIVES  # a packed row: id, logprob bits, K ids, K logprob bits


def pack_rows(
    first: Int[Array, "..."],
    logprob: Float[Array, "..."],
    ids: Int[Array, "... ALT"],
    values: Float[Array, "... ALT"],
) -> Int[Array, "... PACK"]:
    """(token or target id, its logprob, the alternatives' ids and logprobs) as int32 words:
    the layout of every row the host reads back (``steps.split_packed``)."""
    return jnp.concatenate(
        [first[..., None], _bits(logprob)[..., None], ids, _bits(values)], axis=-1
    )


def top_alternatives(
    logits: Float[Array, "B V"], wanted: Bool[Array, " B"]
) -> tuple[Int[Array, "B ALT"], Float[Array, "B ALT"]]:
    """The K most likely tokens of each row and their log-probabilities, best first;
    computed only when some row asked (zeros otherwise)."""
    batch = logits.shape[0]

    def compute():
        logits32 = logits.astype(jnp.float32)
        return _top_k(logits32, jax.nn.logsumexp(logits32, axis=-1))

    def skip():
        return (
            jnp.zeros((batch, ALTERNATIVES), jnp.int32),
            jnp.zeros((batch, ALTERNATIVES), jnp.float32),
        )

    return jax.lax.cond(jnp.any(wanted), compute, skip)


def _top_k(
    logits: Float[Array, "N V"], normaliser: Float[Array, " N"]
) -> tuple[Int[Array, "N ALT"], Float[Array, "N ALT"]]:
    k = min(ALTERNATIVES, logits.shape[-1])
    values, ids = jax.lax.top_k(logits, k)
    return _pad_k(ids.astype(jnp.int32)), _pad_k(values - normaliser[:, None])


def _pad_k(x: Array) -> Array:
    missing = ALTERNATIVES - x.shape[-1]
    return x if missing == 0 else jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, missing)])


def score_prompts(
    logits_of: Callable[[Float[Array, "T D"]], Float[Array, "T V"]],
    hidden: Float[Array, "B T D"],
    tokens: Int[Array, "B T"],
    lengths: Int[Array, " B"],
    next_tokens: Int[Array, " B"],
    scoring: Bool[Array, " B"],
) -> Int[Array, "B T PACK"]:
    """Teacher-forced scores of a prefill chunk's tokens: at offset t the token that follows
    it (the chunk's next token, or ``next_tokens`` after its last: the next chunk's first;
    < 0 when none), its log-probability and the top-K alternatives there (``pack_rows``).
    Rows not ``scoring`` are zeros and compute nothing: a scoring row's (T, V) logits are
    made one row at a time (at Qwen's vocabulary a whole batch's would not fit)."""
    batch, length = tokens.shape
    offsets = jnp.arange(length, dtype=jnp.int32)
    following = jnp.concatenate([tokens[:, 1:], jnp.full((batch, 1), -1, jnp.int32)], axis=1)
    last = offsets == (lengths - 1)[:, None]
    targets = jnp.where(last, next_tokens[:, None], following)
    targets = jnp.where(offsets < lengths[:, None], targets, -1)
    zeros = jnp.zeros((length, PACK_WIDTH), jnp.int32)

    def score(h, target):
        logits = logits_of(h).astype(jnp.float32)
        normaliser = jax.nn.logsumexp(logits, axis=-1)
        chosen = jnp.take_along_axis(logits, jnp.maximum(target, 0)[:, None], axis=-1)[:, 0]
        ids, values = _top_k(logits, normaliser)
        return pack_rows(target, chosen - normaliser, ids, values)

    def row(args):
        h, target, scored = args
        return jax.lax.cond(scored, score, lambda *_: zeros, h, target)

    def compute():
        return jax.lax.map(row, (hidden, targets, scoring))

    return jax.lax.cond(
        jnp.any(scoring), compute, lambda: jnp.zeros((batch, length, PACK_WIDTH), jnp.int32)
    )


def _bits(x: Float[Array, "..."]) -> Int[Array, "..."]:
    return jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
