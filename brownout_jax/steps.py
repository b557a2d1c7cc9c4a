"""Jitted step functions: pure ``(params, state, inputs) -> (state, outputs)``, state donated.

Each step samples on device and returns the sampled tokens with their log-probabilities packed
in one int32 array, so the host syncs once per step to read a (B, 2) array.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from brownout_jax.config import ModelConfig
from brownout_jax.dims import Array, Bool, Float, Int
from brownout_jax.kv_cache import ContiguousKVCache
from brownout_jax.model import decode, prefill
from brownout_jax.moe import MoeOptions
from brownout_jax.params import ModelParams


@struct.dataclass
class SamplingParams:
    temperature: Float[Array, " B"]  # 0 → greedy
    seed: Int[Array, " B"]  # per-sequence seed; the key for a token is fold_in(seed, position)
    top_k: Int[Array, " B"]  # 0 → off
    top_p: Float[Array, " B"]  # 1 → off

    @classmethod
    def host(
        cls,
        temperature: np.ndarray,
        seed: np.ndarray,
        top_k: np.ndarray | None = None,
        top_p: np.ndarray | None = None,
    ) -> SamplingParams:
        """NumPy arrays in the device dtypes (upload with ``jax.device_put``)."""
        batch = len(temperature)
        return cls(
            temperature=np.asarray(temperature, np.float32),
            seed=np.asarray(seed, np.uint32),
            top_k=np.zeros(batch, np.int32) if top_k is None else np.asarray(top_k, np.int32),
            top_p=np.ones(batch, np.float32) if top_p is None else np.asarray(top_p, np.float32),
        )

    @classmethod
    def abstract(cls, batch: int) -> SamplingParams:
        return jax.tree_util.tree_map(
            lambda a: jax.ShapeDtypeStruct((batch,), a.dtype),
            cls.host(np.zeros(1), np.zeros(1)),
        )


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


def sample_tokens(
    logits: Float[Array, "B V"], sampling: SamplingParams, positions: Int[Array, " B"]
) -> tuple[Int[Array, " B"], Float[Array, " B"]]:
    """Greedy, or temperature sampling restricted by top-k and top-p (nucleus); the returned
    log-probabilities are the model's own, before temperature and truncation."""
    logprobs_all = jax.nn.log_softmax(logits, axis=-1)
    greedy = jnp.argmax(logits, axis=-1)
    keys = jax.vmap(lambda s, p: jax.random.fold_in(jax.random.key(s), p))(
        sampling.seed.astype(jnp.uint32), positions
    )
    temperature = jnp.maximum(sampling.temperature, 1e-6)[:, None]
    scaled = _truncate(logits / temperature, sampling.top_k, sampling.top_p)
    drawn = jax.vmap(jax.random.categorical)(keys, scaled)
    tokens = jnp.where(sampling.temperature > 0, drawn, greedy).astype(jnp.int32)
    return tokens, jnp.take_along_axis(logprobs_all, tokens[:, None], axis=-1)[:, 0]


def _truncate(
    logits: Float[Array, "B V"], top_k: Int[Array, " B"], top_p: Float[Array, " B"]
) -> Float[Array, "B V"]:
    """Masks logits outside the top-k and outside the smallest nucleus of mass ≥ top-p."""
    vocab = logits.shape[-1]
    ordered = jnp.sort(logits, axis=-1)[:, ::-1]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    kth = jnp.take_along_axis(ordered, (k - 1)[:, None], axis=-1)
    probs = jax.nn.softmax(ordered, axis=-1)
    # Keep a token while the mass strictly before it is below top_p (the first always stays).
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = jnp.sum(mass_before < top_p[:, None], axis=-1)
    pth = jnp.take_along_axis(ordered, (keep - 1)[:, None], axis=-1)
    cutoff = jnp.maximum(kth, pth)
    return jnp.where(logits >= cutoff, logits, -jnp.inf)


def pack_sampled(tokens: Int[Array, " B"], logprobs: Float[Array, " B"]) -> Int[Array, "B 2"]:
    return jnp.stack([tokens, jax.lax.bitcast_convert_type(logprobs, jnp.int32)], axis=-1)


def unpack_sampled(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    packed = np.asarray(packed)
    return packed[:, 0], packed[:, 1].view(np.float32)


@functools.partial(jax.jit, static_argnames=("config", "moe_options"), donate_argnames=("cache",))
def prefill_step(
    params: ModelParams,
    cache: ContiguousKVCache,
    inputs: PrefillInputs,
    *,
    config: ModelConfig,
    moe_options: MoeOptions,
) -> tuple[DecodeState, Int[Array, "B 2"]]:
    cache, logits = prefill(params, config, cache, inputs.tokens, inputs.lengths, moe_options)
    tokens, logprobs = sample_tokens(logits, inputs.sampling, inputs.lengths)
    state = DecodeState(
        cache=cache,
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
    cache, logits = decode(
        params, config, state.cache, state.tokens, state.positions, state.active, moe_options
    )
    next_positions = state.positions + 1
    tokens, logprobs = sample_tokens(logits, state.sampling, next_positions)
    state = state.replace(cache=cache, tokens=tokens, positions=next_positions)
    return state, pack_sampled(tokens, logprobs)
