"""The serving engine's jitted steps over the paged KV cache.

``(params, EngineState, words) -> (EngineState, packed)``; the state (KV pool and each slot's
last sampled token) is donated. A decode step reads its input tokens from the state on
device, so the host never has to send sampled tokens back: it uploads one int32 array, the
words of the typed batch (slots, positions, block tables, sampling; ``input_words``, rebuilt
here from the static ``layout``), and reads one packed (B, 2) array per step — on an
expert-parallel mesh (B + DEV, 2), the model's per-device expert load riding the same sync.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from brownout_jax.engine.attention_path import AttentionPath
from brownout_jax.engine.input_words import InputLayout
from brownout_jax.engine.paged_cache import KVPool, PagedKVCache
from brownout_jax.engine.sampling import SamplingParams, pack_sampled, sample_tokens
from brownout_jax.model.config import ModelConfig
from brownout_jax.model.dims import Array, Bool, Int
from brownout_jax.model.params import ModelParams
from brownout_jax.model.transformer import StepOutput, decode, prefill_chunk
from brownout_jax.moe.expert_parallel import DeviceLoad
from brownout_jax.moe.options import MoeOptions


@struct.dataclass
class EngineState:
    pool: KVPool
    last_tokens: Int[Array, " SLOTS"]  # last sampled token of every slot: next decode input


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


@struct.dataclass
class DecodeBatch:
    slots: Int[Array, " B"]
    positions: Int[Array, " B"]  # position of the input token (the slot's last sampled token)
    block_tables: Int[Array, "B W"]
    active: Bool[Array, " B"]
    sampling: SamplingParams
    exact: Bool[Array, " B"]  # rows whose request is never browned out (BrownoutClass.NEVER)


def _pack(tokens: Int[Array, " B"], logprobs: Array, load: DeviceLoad | None) -> Int[Array, "R 2"]:
    """(B, 2) sampled tokens and log-probabilities; on a mesh followed by DEV rows, one per
    device of the expert axis: (tokens it received, distinct experts it ran), each summed over
    the MoE layers of the step."""
    packed = pack_sampled(tokens, logprobs)
    if load is None:
        return packed
    rows = jnp.stack([load.tokens, load.experts], axis=1).astype(jnp.int32)
    return jnp.concatenate([packed, rows])


def split_packed(packed: np.ndarray, num_devices: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Host side of ``_pack``: (sampled (B, 2), per-device load (DEV, 2) or None)."""
    if num_devices == 0:
        return packed, None
    return packed[:-num_devices], packed[-num_devices:]


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
) -> tuple[EngineState, Int[Array, "R 2"]]:
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
    tokens, logprobs = sample_tokens(out.logits, batch.sampling, batch.starts + batch.lengths)
    last = state.last_tokens.at[batch.slots].set(tokens, mode="drop")
    packed = _pack(tokens, logprobs, out.device_load)
    return EngineState(pool=out.cache.pool, last_tokens=last), packed


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
) -> tuple[EngineState, Int[Array, "R 2"]]:
    """``words``: a ``DecodeBatch`` laid out by ``layout``."""
    batch: DecodeBatch = layout.unpack(words)
    num_slots = state.last_tokens.shape[0]
    inputs = state.last_tokens[jnp.minimum(batch.slots, num_slots - 1)]
    cache = PagedKVCache(pool=state.pool, block_tables=batch.block_tables, attention=attention)
    out: StepOutput = decode(
        params, config, cache, inputs, batch.positions, batch.active, moe_options, batch.exact
    )
    tokens, logprobs = sample_tokens(out.logits, batch.sampling, batch.positions + 1)
    targets = jnp.where(batch.active, batch.slots, num_slots)
    last = state.last_tokens.at[targets].set(tokens, mode="drop")
    packed = _pack(tokens, logprobs, out.device_load)
    return EngineState(pool=out.cache.pool, last_tokens=last), packed


def host_prefill_batch(batch: int, length: int, width: int, num_slots: int) -> PrefillBatch:
    """An empty prefill batch in NumPy (padding rows everywhere), to be filled by the host."""
    return PrefillBatch(
        tokens=np.zeros((batch, length), np.int32),
        starts=np.zeros(batch, np.int32),
        lengths=np.zeros(batch, np.int32),
        block_tables=np.zeros((batch, width), np.int32),
        slots=np.full(batch, num_slots, np.int32),
        sampling=SamplingParams.host(np.zeros(batch), np.zeros(batch)),
        exact=np.zeros(batch, bool),
    )


def host_decode_batch(batch: int, width: int, num_slots: int) -> DecodeBatch:
    return DecodeBatch(
        slots=np.full(batch, num_slots, np.int32),
        positions=np.zeros(batch, np.int32),
        block_tables=np.zeros((batch, width), np.int32),
        active=np.zeros(batch, bool),
        sampling=SamplingParams.host(np.zeros(batch), np.zeros(batch)),
        exact=np.zeros(batch, bool),
    )
