"""The serving engine's jitted steps over the paged KV cache.

``(params, EngineState, words) -> (EngineState, packed)``; the state (KV pool and each slot's
last sampled token) is donated. A decode step reads its input tokens from the state on
device, so the host never has to send sampled tokens back: it uploads one int32 array, the
words of the typed batch (slots, positions, block tables, sampling; ``input_words``, rebuilt
here from the static ``layout``), and reads one packed (R, C) int32 array per step: per row
the sampled token, its logprob and the top-K alternatives (``logit_processing``); after them,
in a prefill step, the scores of every chunk token (B·T rows, zeros unless a row asked); on
an expert-parallel mesh, DEV rows of per-device expert load, all riding the same sync.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from brownout_jax.engine.attention_path import AttentionPath
from brownout_jax.engine.input_words import InputLayout
from brownout_jax.engine.logit_processing import (
    ALTERNATIVES,
    PACK_WIDTH,
    LogitProcessing,
    TokenHistory,
    needs_processing,
    pack_rows,
    process_logits,
    score_prompts,
    top_alternatives,
)
from brownout_jax.engine.paged_cache import KVPool, PagedKVCache
from brownout_jax.engine.sampling import SamplingParams, sample_tokens
from brownout_jax.model.config import ModelConfig
from brownout_jax.model.dims import Array, Bool, Int
from brownout_jax.model.params import ModelParams
from brownout_jax.model.transformer import StepOutput, decode, lm_logits, prefill_chunk
from brownout_jax.moe.expert_parallel import DeviceLoad
from brownout_jax.moe.options import MoeOptions


@struct.dataclass
class EngineState:
    pool: KVPool
    last_tokens: Int[Array, " SLOTS"]  # last sampled token of every slot: next decode input
    history: TokenHistory  # per slot, the tokens its penalties look at


@struct.dataclass
class PrefillBatch:
    # Right-padded pieces of prompts (prompt + generated, when recomputing): row b's tokens
    # at positions starts[b] … starts[b] + lengths[b] − 1 (a chunk of a long prompt, or all).
    tokens: Int[Array, "B T"]
    starts: Int[Array, " B"]
    lengths: Int[Array, " B"]  # 0 for padding rows of the bucket
    block_tables: Int[Array, "B W"]
    slots: Int[Array, " B"]  # slot of each row; num_slots for padding rows (dropped)
    sampling: SamplingParams
    exact: Bool[Array, " B"]  # rows whose request is never browned out (BrownoutClass.NEVER)
    processing: LogitProcessing
    prompt_lengths: Int[Array, " B"]  # positions below are prompt, the rest were generated
    scoring: Bool[Array, " B"]  # rows whose chunk tokens are scored (prompt logprobs)
    next_tokens: Int[Array, " B"]  # the token after the chunk (scored rows; −1: none)
    history_from: Int[Array, " B"]  # a sample on shared prompt blocks: whose history it copies


@struct.dataclass
class DecodeBatch:
    slots: Int[Array, " B"]
    positions: Int[Array, " B"]  # position of the input token (the slot's last sampled token)
    block_tables: Int[Array, "B W"]
    active: Bool[Array, " B"]
    sampling: SamplingParams
    exact: Bool[Array, " B"]  # rows whose request is never browned out (BrownoutClass.NEVER)
    processing: LogitProcessing


def _sample(
    out: StepOutput,
    history: TokenHistory,
    batch: PrefillBatch | DecodeBatch,
    positions: Int[Array, " B"],
) -> tuple[Int[Array, " B"], Int[Array, "B PACK"]]:
    """The step's tokens and their packed rows (``PACK_WIDTH``)."""
    logits, sampling, processing, slots = out.logits, batch.sampling, batch.processing, batch.slots
    adjusted = jax.lax.cond(
        needs_processing(processing),
        lambda: process_logits(logits, processing, history, slots),
        lambda: logits.astype(jnp.float32),
    )
    tokens, logprobs = sample_tokens(logits, sampling, positions, adjusted, processing.min_p)
    ids, values = top_alternatives(logits, processing.alternatives)
    return tokens, pack_rows(tokens, logprobs, ids, values)


def _with_load(packed: Int[Array, "ROWS PACK"], load: DeviceLoad | None) -> Int[Array, "ROWS PACK"]:
    """On a mesh, DEV rows follow, one per device of the expert axis: (tokens it received,
    distinct experts it ran), each summed over the MoE layers of the step."""
    if load is None:
        return packed
    rows = jnp.stack([load.tokens, load.experts], axis=1).astype(jnp.int32)
    rows = jnp.pad(rows, [(0, 0), (0, packed.shape[1] - 2)])
    return jnp.concatenate([packed, rows])


@dataclasses.dataclass(frozen=True, slots=True)
class SampledRows:
    """Host side of a step's packed output."""

    tokens: np.ndarray  # (B,) int32
    logprobs: np.ndarray  # (B,) float32
    top_ids: np.ndarray  # (B, K) int32, best first (zeros where not asked)
    top_logprobs: np.ndarray  # (B, K) float32
    # Prefill: (B, T, C) scores of the chunk tokens (``score_prompts``' packing), else None.
    prompt_scores: np.ndarray | None
    device_load: np.ndarray | None  # (DEV, 2) on a mesh


def split_packed(
    packed: np.ndarray, batch: int, chunk: int | None, num_devices: int
) -> SampledRows:
    """``chunk``: a prefill step's tokens per row (its scores follow the sampled rows)."""
    packed = np.asarray(packed)
    sampled, rest = packed[:batch], packed[batch:]
    scores = None
    if chunk is not None:
        scores = rest[: batch * chunk].reshape(batch, chunk, PACK_WIDTH)
        rest = rest[batch * chunk :]
    k = ALTERNATIVES
    return SampledRows(
        tokens=sampled[:, 0],
        logprobs=sampled[:, 1].view(np.float32),
        top_ids=sampled[:, 2 : 2 + k],
        top_logprobs=sampled[:, 2 + k :].view(np.float32),
        prompt_scores=scores,
        device_load=rest[:, :2] if num_devices else None,
    )


_STATIC = ("config", "moe_options", "attention", "layout")


@functools.partial(jax.jit, static_argnames=_STATIC, donate_argnames=("state",))
def engine_prefill_step(
    params: ModelParams,
    state: EngineState,
    words: Int[Array, " N"],
    *,
    config: ModelConfig,
    moe_options: MoeOptions,
    attention: AttentionPath,
    layout: InputLayout,
) -> tuple[EngineState, Int[Array, "ROWS PACK"]]:
    """``words``: a ``PrefillBatch`` laid out by ``layout``. A chunk that is not a prompt's
    last samples a token nobody reads; the last chunk's overwrites it before the sequence
    decodes."""
    batch: PrefillBatch = layout.unpack(words)
    cache = PagedKVCache(pool=state.pool, block_tables=batch.block_tables, attention=attention)
    out: StepOutput = prefill_chunk(
        params,
        config,
        cache,
        batch.tokens,
        batch.starts,
        batch.lengths,
        moe_options,
        batch.exact,
    )
    history = state.history.start_and_record(
        batch.slots,
        batch.tokens,
        batch.starts,
        batch.lengths,
        batch.prompt_lengths,
        batch.history_from,
    )
    tokens, packed = _sample(out, history, batch, batch.starts + batch.lengths)
    scores = score_prompts(
        lambda h: lm_logits(params, h),
        out.hidden,
        batch.tokens,
        batch.lengths,
        batch.next_tokens,
        batch.scoring,
    )
    last = state.last_tokens.at[batch.slots].set(tokens, mode="drop")
    packed = jnp.concatenate([packed, scores.reshape(-1, PACK_WIDTH)])
    packed = _with_load(packed, out.device_load)
    return EngineState(pool=out.cache.pool, last_tokens=last, history=history), packed


@functools.partial(jax.jit, static_argnames=_STATIC, donate_argnames=("state",))
def engine_decode_step(
    params: ModelParams,
    state: EngineState,
    words: Int[Array, " N"],
    *,
    config: ModelConfig,
    moe_options: MoeOptions,
    attention: AttentionPath,
    layout: InputLayout,
) -> tuple[EngineState, Int[Array, "ROWS PACK"]]:
    """``words``: a ``DecodeBatch`` laid out by ``layout``."""
    batch: DecodeBatch = layout.unpack(words)
    num_slots = state.last_tokens.shape[0]
    inputs = state.last_tokens[jnp.minimum(batch.slots, num_slots - 1)]
    cache = PagedKVCache(pool=state.pool, block_tables=batch.block_tables, attention=attention)
    out: StepOutput = decode(
        params, config, cache, inputs, batch.positions, batch.active, moe_options, batch.exact
    )
    history = state.history.record_generated(batch.slots, inputs, batch.active)
    tokens, packed = _sample(out, history, batch, batch.positions + 1)
    targets = jnp.where(batch.active, batch.slots, num_slots)
    last = state.last_tokens.at[targets].set(tokens, mode="drop")
    packed = _with_load(packed, out.device_load)
    return EngineState(pool=out.cache.pool, last_tokens=last, history=history), packed


def host_prefill_batch(
    batch: int, length: int, width: int, num_slots: int, vocab_words: int = 0
) -> PrefillBatch:
    """An empty prefill batch in NumPy (padding rows everywhere), to be filled by the host.
    ``vocab_words``: the width of a row's structured-output token mask (0: none served)."""
    return PrefillBatch(
        tokens=np.zeros((batch, length), np.int32),
        starts=np.zeros(batch, np.int32),
        lengths=np.zeros(batch, np.int32),
        block_tables=np.zeros((batch, width), np.int32),
        slots=np.full(batch, num_slots, np.int32),
        sampling=SamplingParams.host(np.zeros(batch), np.zeros(batch)),
        exact=np.zeros(batch, bool),
        processing=LogitProcessing.host(batch, vocab_words),
        prompt_lengths=np.zeros(batch, np.int32),
        scoring=np.zeros(batch, bool),
        next_tokens=np.full(batch, -1, np.int32),
        history_from=np.full(batch, -1, np.int32),
    )


def host_decode_batch(batch: int, width: int, num_slots: int, vocab_words: int = 0) -> DecodeBatch:
    return DecodeBatch(
        slots=np.full(batch, num_slots, np.int32),
        positions=np.zeros(batch, np.int32),
        block_tables=np.zeros((batch, width), np.int32),
        active=np.zeros(batch, bool),
        sampling=SamplingParams.host(np.zeros(batch), np.zeros(batch)),
        exact=np.zeros(batch, bool),
        processing=LogitProcessing.host(batch, vocab_words),
    )
