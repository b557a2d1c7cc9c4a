"""Jitted step functions: pure ``(params, state, inputs) -> (state, outputs)``, state donated.

Each step samples on device and returns the sampled tokens with their log-probabilities packed
in one int32 array, so the host syncs once per step to read a (B, 2) array.
"""

from __future__ import annotations

import functools

import jax
from flax import struct

from brownout_jax.engine.sampling import SamplingParams, pack_sampled, sample_tokens
from brownout_jax.model.config import ModelConfig
from brownout_jax.model.dims import Array, Bool, Int
from brownout_jax.model.kv_cache import ContiguousKVCache
from brownout_jax.model.params import ModelParams
from brownout_jax.model.transformer import decode, prefill
from brownout_jax.moe.options import MoeOptions


@struct.dataclass
class PrefillInputs:
    tokens: Int[Array, "B T"]  # right-padded prompts
    lengths: Int[Array, " B"]  # real prompt lengths (0: an empty row of the bucket)
    sampling: SamplingParams


@struct.dataclass
class DecodeState:
    cache: ContiguousKVCache
    tokens: Int[Array, " B"]  # last sampled token: the input of the next decode step
    positions: Int[Array, " B"]  # position of ``tokens`` in its sequence
    active: Bool[Array, " B"]
    sampling: SamplingParams


@functools.partial(jax.jit, static_argnames=("config", "moe_options"), donate_argnames=("cache",))
def prefill_step(
    params: ModelParams,
    cache: ContiguousKVCache,
    inputs: PrefillInputs,
    *,
    config: ModelConfig,
    moe_options: MoeOptions,
) -> tuple[DecodeState, Int[Array, "B 2"]]:
    out = prefill(params, config, cache, inputs.tokens, inputs.lengths, moe_options)
    tokens, logprobs = sample_tokens(out.logits, inputs.sampling, inputs.lengths)
    state = DecodeState(
        cache=out.cache,
        tokens=tokens,
        positions=inputs.lengths,
        active=inputs.lengths > 0,
        sampling=inputs.sampling,
    )
    return state, pack_sampled(tokens, logprobs)


@functools.partial(jax.jit, static_argnames=("config", "moe_options"), donate_argnames=("state",))
def decode_step(
    params: ModelParams,
    state: DecodeState,
    *,
    config: ModelConfig,
    moe_options: MoeOptions,
) -> tuple[DecodeState, Int[Array, "B 2"]]:
    out = decode(
        params, config, state.cache, state.tokens, state.positions, state.active, moe_options
    )
    next_positions = state.positions + 1
    tokens, logprobs = sample_tokens(out.logits, state.sampling, next_positions)
    state = state.replace(cache=out.cache, tokens=tokens, positions=next_positions)
    return state, pack_sampled(tokens, logprobs)
