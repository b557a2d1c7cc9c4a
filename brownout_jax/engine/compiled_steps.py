"""Ahead-of-time compilation of every (phase, threshold level, shape bucket) step.

Serving switches brownout levels from one step to the next; each level is a different static
``MoeOptions`` and so a different executable. Compiling them all before the engine reports
ready means a switch costs a dictionary lookup, never a compilation.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
from jax.stages import Compiled
from tqdm.auto import tqdm

from brownout_jax.model.bit_storage import storage_dtype
from brownout_jax.model.config import ModelConfig
from brownout_jax.model.kv_cache import ContiguousKVCache
from brownout_jax.model.params import ModelParams, MoeParams
from brownout_jax.moe.block import DEFAULT_MOE_OPTIONS, MoeOptions
from brownout_jax.moe.brownout import ThresholdLadder
from brownout_jax.offline.steps import (
    DecodeState,
    PrefillInputs,
    SamplingParams,
    decode_step,
    prefill_step,
)


@dataclasses.dataclass(frozen=True, slots=True)
class StepBuckets:
    """The static shapes steps are compiled for."""

    prefill: tuple[tuple[int, int], ...]  # (batch, padded prompt length)
    decode: tuple[int, ...]  # batch sizes
    cache_len: int  # KV slots per sequence


def has_united_experts(params: ModelParams) -> bool:
    return any(
        isinstance(layer.mlp, MoeParams) and layer.mlp.group_of_expert is not None
        for layer in params.layers
    )


def abstract_tree(tree):
    return jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)


def _abstract_cache(config: ModelConfig, batch: int, cache_len: int, dtype) -> ContiguousKVCache:
    shape = (batch, cache_len, config.num_kv_heads, config.head_dim)
    layer = jax.ShapeDtypeStruct(shape, storage_dtype(dtype))
    return ContiguousKVCache(
        keys=(layer,) * config.num_layers,
        values=(layer,) * config.num_layers,
        dtype=jnp.dtype(dtype),
    )


class CompiledSteps:
    """Executables for every (phase, level, bucket), compiled by :meth:`compile`."""

    def __init__(
        self,
        params: ModelParams,
        config: ModelConfig,
        ladder: ThresholdLadder,
        buckets: StepBuckets,
        base_options: MoeOptions = DEFAULT_MOE_OPTIONS,
    ):
        if not has_united_experts(params) and ladder.levels != (1.0,):
            raise ValueError("a ladder below 1.0 needs united experts attached to the params")
        self.config = config
        self.ladder = ladder
        self.buckets = buckets
        self.base_options = base_options
        self._params = abstract_tree(params)
        self._dtype = params.embed.dtype
        self._prefill: dict[tuple[float, int, int], Compiled] = {}
        self._decode: dict[tuple[float, int], Compiled] = {}
        self.compile_seconds = 0.0

    def options(self, level: float) -> MoeOptions:
        return dataclasses.replace(self.base_options, threshold=level)

    def compile(self, progress: bool = True) -> float:
        """Compiles everything; returns (and records) the seconds it took."""
        start = time.perf_counter()
        jobs = [("prefill", level, b) for level in self.ladder.levels for b in self.buckets.prefill]
        jobs += [("decode", level, b) for level in self.ladder.levels for b in self.buckets.decode]
        for phase, level, bucket in tqdm(jobs, desc="compiling steps", disable=not progress):
            if phase == "prefill":
                self._compile_prefill(level, *bucket)
            else:
                self._compile_decode(level, bucket)
        self.compile_seconds = time.perf_counter() - start
        return self.compile_seconds

    def _compile_prefill(self, level: float, batch: int, length: int) -> None:
        inputs = PrefillInputs(
            tokens=jax.ShapeDtypeStruct((batch, length), jnp.int32),
            lengths=jax.ShapeDtypeStruct((batch,), jnp.int32),
            sampling=SamplingParams.abstract(batch),
        )
        cache = _abstract_cache(self.config, batch, self.buckets.cache_len, self._dtype)
        lowered = prefill_step.lower(
            self._params, cache, inputs, config=self.config, moe_options=self.options(level)
        )
        self._prefill[(level, batch, length)] = lowered.compile()

    def _compile_decode(self, level: float, batch: int) -> None:
        vector = jax.ShapeDtypeStruct((batch,), jnp.int32)
        state = DecodeState(
            cache=_abstract_cache(self.config, batch, self.buckets.cache_len, self._dtype),
            tokens=vector,
            positions=vector,
            active=jax.ShapeDtypeStruct((batch,), jnp.bool_),
            sampling=SamplingParams.abstract(batch),
        )
        lowered = decode_step.lower(
            self._params, state, config=self.config, moe_options=self.options(level)
        )
        self._decode[(level, batch)] = lowered.compile()

    def prefill(self, level: float, batch: int, length: int) -> Compiled:
        """``(params, cache, PrefillInputs) -> (DecodeState, packed)`` for this level/bucket."""
        return self._prefill[(level, batch, length)]

    def decode(self, level: float, batch: int) -> Compiled:
        """``(params, DecodeState) -> (DecodeState, packed)`` for this level/bucket."""
        return self._decode[(level, batch)]

    @property
    def count(self) -> int:
        return len(self._prefill) + len(self._decode)
