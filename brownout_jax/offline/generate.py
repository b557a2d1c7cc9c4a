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

from brownout_jax.engine.buckets import padded_size, right_padded
from brownout_jax.engine.requests import GenerationRequest, RequestError, validate_request
from brownout_jax.engine.sampling import SamplingParams, unpack_sampled
from brownout_jax.model.config import ModelConfig
from brownout_jax.model.kv_cache import ContiguousKVCache
from brownout_jax.model.params import ModelParams
from brownout_jax.moe.options import DEFAULT_MOE_OPTIONS, MoeOptions
from brownout_jax.offline.steps import PrefillInputs, decode_step, prefill_step


@dataclasses.dataclass(slots=True)
class GenerationResult:
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" (an EOS/stop id) or "length" (max_new_tokens)


# Field names of the serving API (validate_request's) → this function's parameters.
_OFFLINE_FIELD = {"prompt": "prompts[{i}]", "prompt_token_ids": "prompts[{i}]"}
_OFFLINE_FIELD |= {"max_tokens": "max_new_tokens"}


def _validate(i: int, request: GenerationRequest, config: ModelConfig) -> None:
    """The serving engine's validation, with this function's names for the fields."""
    try:
        validate_request(request, config.vocab_size, config.max_position_embeddings)
    except RequestError as err:
        field = _OFFLINE_FIELD.get(err.field, err.field).format(i=i)
        raise RequestError(field, err.message) from None


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
        raise RequestError("prompts", "at least one prompt is required")
    for i, prompt in enumerate(prompts):
        request = GenerationRequest(
            prompt_token_ids=tuple(prompt),
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed + i,
            stop_token_ids=tuple(stop_token_ids),
        )
        _validate(i, request, config)

    batch = len(prompts)
    tokens, lengths = right_padded(prompts)
    cache_len = padded_size(int(lengths.max()) + max_new_tokens)  # ≥ the padded prompts too
    sampling = SamplingParams.host(
        temperature=np.full(batch, temperature),
        seed=np.arange(seed, seed + batch),
        top_k=np.full(batch, top_k),
        top_p=np.full(batch, top_p),
    )
    inputs = PrefillInputs(
        tokens=jnp.asarray(tokens),
        lengths=jnp.asarray(lengths),
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
