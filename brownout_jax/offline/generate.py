"""Offline generation for a batch of prompts: prefill once, then decode step by step.

The host stays one step behind the device: step t+1 is dispatched before the tokens of step t
are read, so reading them (the one sync per step) overlaps with device work.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from brownout_jax.model.config import ModelConfig
from brownout_jax.model.kv_cache import ContiguousKVCache
from brownout_jax.model.params import ModelParams
from brownout_jax.moe.block import DEFAULT_MOE_OPTIONS, MoeOptions
from brownout_jax.offline.steps import (
    PrefillInputs,
    SamplingParams,
    decode_step,
    prefill_step,
    unpack_sampled,
)


@dataclasses.dataclass(slots=True)
class GenerationResult:
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" (an EOS/stop id) or "length" (max_new_tokens)


def bucket_length(n: int, minimum: int = 16) -> int:
    """Next power of two ≥ n: few distinct shapes, so few compilations."""
    size = minimum
    while size < n:
        size *= 2
    return size


def generate(
    params: ModelParams,
    config: ModelConfig,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    stop_token_ids: Sequence[int] = (),
    prefill_options: MoeOptions = DEFAULT_MOE_OPTIONS,
    decode_options: MoeOptions = DEFAULT_MOE_OPTIONS,
    arrival_times: list[float] | None = None,
) -> list[GenerationResult]:
    """Generates for all prompts at once. ``arrival_times``, when given, receives the host
    clock (``time.perf_counter``) at which each step's tokens were read."""
    if not prompts:
        raise ValueError("prompts: at least one prompt is required")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be ≥ 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be ≥ 0, got {temperature}")
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompts[{i}]: empty prompt")
        bad = [t for t in prompt if not 0 <= t < config.vocab_size]
        if bad:
            raise ValueError(f"prompts[{i}]: token ids outside [0, {config.vocab_size}): {bad[:5]}")
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > config.max_position_embeddings:
        raise ValueError(
            f"max_new_tokens: prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) "
            f"exceeds "
            f"the context length {config.max_position_embeddings}"
        )

    batch = len(prompts)
    prompt_len = bucket_length(longest)
    cache_len = bucket_length(longest + max_new_tokens)  # ≥ prompt_len too
    tokens = np.zeros((batch, prompt_len), np.int32)
    for i, prompt in enumerate(prompts):
        tokens[i, : len(prompt)] = prompt
    sampling = SamplingParams.host(
        temperature=np.full(batch, temperature),
        seed=np.arange(seed, seed + batch),
        top_k=np.full(batch, top_k),
        top_p=np.full(batch, top_p),
    )
    inputs = PrefillInputs(
        tokens=jnp.asarray(tokens),
        lengths=jnp.asarray([len(p) for p in prompts], jnp.int32),
        sampling=sampling,
    )
    cache = ContiguousKVCache.allocate(config, batch, cache_len, params.embed.dtype)
    state, packed = prefill_step(params, cache, inputs, config=config, moe_options=prefill_options)

    results = [GenerationResult([], [], "length") for _ in prompts]
    done = np.zeros(batch, bool)
    stop = set(stop_token_ids)
    for step in range(max_new_tokens):
        following = None
        if step + 1 < max_new_tokens:
            state, following = decode_step(params, state, config=config, moe_options=decode_options)
            following.copy_to_host_async()
        step_tokens, step_logprobs = unpack_sampled(packed)
        if arrival_times is not None:
            arrival_times.append(time.perf_counter())
        for i in np.flatnonzero(~done):
            token = int(step_tokens[i])
            results[i].token_ids.append(token)
            results[i].logprobs.append(float(step_logprobs[i]))
            if token in stop:
                results[i].finish_reason = "stop"
                done[i] = True
        if done.all() or following is None:
            break
        packed = following
    return results
