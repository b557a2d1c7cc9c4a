"""The serving engine's jitted steps over the paged KV cache, and their AOT compilation.

``(params, EngineState, batch) -> (EngineState, packed)``; the state (KV pool and each slot's
last sampled token) is donated. A decode step reads its input tokens from the state on
device, so the host never has to send sampled tokens back: it uploads small int32 arrays
(slots, positions, block tables, sampling) and reads one packed (B, 2) array per step — on an
expert-parallel mesh (B + DEV, 2), the step's per-device expert load riding the same sync.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.stages import Compiled
from tqdm.auto import tqdm

from brownout_jax.engine.compiled_steps import abstract_tree
from brownout_jax.engine.map_budget import MappingBudget
from brownout_jax.engine.paged_cache import KVPool, PagedKVCache
from brownout_jax.model.config import ModelConfig
from brownout_jax.model.dims import Array, Bool, Int
from brownout_jax.model.params import ModelParams
from brownout_jax.model.transformer import decode, prefill
from brownout_jax.moe.block import MoeOptions
from brownout_jax.moe.brownout import ThresholdLadder
from brownout_jax.moe.expert_parallel import AXIS, DeviceLoad, abstract_placed, replicated
from brownout_jax.offline.steps import SamplingParams, pack_sampled, sample_tokens


@struct.dataclass
class EngineState:
    pool: KVPool
    last_tokens: Int[Array, " SLOTS"]  # last sampled token of every slot: next decode input


@struct.dataclass
class PrefillBatch:
    tokens: Int[Array, "B T"]  # right-padded prompts (prompt + generated, when recomputing)
    lengths: Int[Array, " B"]  # 0 for padding rows of the bucket
    block_tables: Int[Array, "B W"]
    slots: Int[Array, " B"]  # slot of each row; num_slots for padding rows (dropped)
    sampling: SamplingParams


@struct.dataclass
class DecodeBatch:
    slots: Int[Array, " B"]
    positions: Int[Array, " B"]  # position of the input token (the slot's last sampled token)
    block_tables: Int[Array, "B W"]
    active: Bool[Array, " B"]
    sampling: SamplingParams


def _pack(
    tokens: Int[Array, " B"],
    logprobs: Array,
    loads: list[DeviceLoad] | None,
    options: MoeOptions,
) -> Int[Array, "R 2"]:
    """(B, 2) sampled tokens and log-probabilities; on a mesh followed by DEV rows, one per
    device of the expert axis: (tokens it received, distinct experts it ran), each summed over
    the MoE layers of the step."""
    packed = pack_sampled(tokens, logprobs)
    if loads is None:
        return packed
    load = jnp.zeros((options.mesh.shape[AXIS], 2), jnp.int32)
    for layer in loads:
        load += jnp.stack([layer.tokens, layer.experts], axis=1).astype(jnp.int32)
    return jnp.concatenate([packed, load])


def split_packed(packed: np.ndarray, num_devices: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Host side of ``_pack``: (sampled (B, 2), per-device load (DEV, 2) or None)."""
    if num_devices == 0:
        return packed, None
    return packed[:-num_devices], packed[-num_devices:]


@functools.partial(jax.jit, static_argnames=("config", "moe_options"), donate_argnames=("state",))
def engine_prefill_step(
    params: ModelParams,
    state: EngineState,
    batch: PrefillBatch,
    *,
    config: ModelConfig,
    moe_options: MoeOptions,
) -> tuple[EngineState, Int[Array, "R 2"]]:
    cache = PagedKVCache(pool=state.pool, block_tables=batch.block_tables)
    loads = None if moe_options.mesh is None else []
    cache, logits = prefill(params, config, cache, batch.tokens, batch.lengths, moe_options, loads)
    tokens, logprobs = sample_tokens(logits, batch.sampling, batch.lengths)
    last = state.last_tokens.at[batch.slots].set(tokens, mode="drop")
    packed = _pack(tokens, logprobs, loads, moe_options)
    return EngineState(pool=cache.pool, last_tokens=last), packed


@functools.partial(jax.jit, static_argnames=("config", "moe_options"), donate_argnames=("state",))
def engine_decode_step(
    params: ModelParams,
    state: EngineState,
    batch: DecodeBatch,
    *,
    config: ModelConfig,
    moe_options: MoeOptions,
) -> tuple[EngineState, Int[Array, "R 2"]]:
    num_slots = state.last_tokens.shape[0]
    inputs = state.last_tokens[jnp.minimum(batch.slots, num_slots - 1)]
    cache = PagedKVCache(pool=state.pool, block_tables=batch.block_tables)
    loads = None if moe_options.mesh is None else []
    cache, logits = decode(
        params, config, cache, inputs, batch.positions, batch.active, moe_options, loads
    )
    tokens, logprobs = sample_tokens(logits, batch.sampling, batch.positions + 1)
    targets = jnp.where(batch.active, batch.slots, num_slots)
    last = state.last_tokens.at[targets].set(tokens, mode="drop")
    packed = _pack(tokens, logprobs, loads, moe_options)
    return EngineState(pool=cache.pool, last_tokens=last), packed


@dataclasses.dataclass(frozen=True, slots=True)
class EngineBuckets:
    """Static shapes of the engine's steps. Prefill: (batch, padded length); decode: (batch,
    block-table width in blocks). The block-table width of a prefill covers its length."""

    prefill_batches: tuple[int, ...]
    prefill_lengths: tuple[int, ...]
    decode_batches: tuple[int, ...]
    decode_widths: tuple[int, ...]
    block_size: int

    def prefill_width(self, length: int) -> int:
        return -(-length // self.block_size)

    @staticmethod
    def pick(options: tuple[int, ...], need: int) -> int:
        """Smallest bucket ≥ need."""
        for size in options:
            if size >= need:
                return size
        raise ValueError(f"no bucket holds {need} (buckets: {options})")


def host_prefill_batch(batch: int, length: int, width: int, num_slots: int) -> PrefillBatch:
    """An empty prefill batch in NumPy (padding rows everywhere), to be filled by the host."""
    return PrefillBatch(
        tokens=np.zeros((batch, length), np.int32),
        lengths=np.zeros(batch, np.int32),
        block_tables=np.zeros((batch, width), np.int32),
        slots=np.full(batch, num_slots, np.int32),
        sampling=SamplingParams.host(np.zeros(batch), np.zeros(batch)),
    )


def host_decode_batch(batch: int, width: int, num_slots: int) -> DecodeBatch:
    return DecodeBatch(
        slots=np.full(batch, num_slots, np.int32),
        positions=np.zeros(batch, np.int32),
        block_tables=np.zeros((batch, width), np.int32),
        active=np.zeros(batch, bool),
        sampling=SamplingParams.host(np.zeros(batch), np.zeros(batch)),
    )


class EngineSteps:
    """Every (phase, ladder level, bucket) executable, compiled before serving."""

    def __init__(
        self,
        params: ModelParams,
        config: ModelConfig,
        ladder: ThresholdLadder,
        buckets: EngineBuckets,
        num_blocks: int,
        num_slots: int,
        base_options: MoeOptions,
    ):
        self.config = config
        self.ladder = ladder
        self.buckets = buckets
        self.num_slots = num_slots
        self.base_options = base_options
        # On a mesh the executables take placed arrays: params as sharded, the rest replicated.
        self.input_sharding = replicated(base_options.mesh)
        dtype = params.embed.dtype
        self._params = (
            abstract_tree(params) if base_options.mesh is None else abstract_placed(params)
        )
        self._state = self._abstract(
            EngineState(
                pool=KVPool.abstract(config, num_blocks, buckets.block_size, dtype),
                last_tokens=jax.ShapeDtypeStruct((num_slots,), jnp.int32),
            )
        )
        self._prefill: dict[tuple[float, int, int], Compiled] = {}
        self._decode: dict[tuple[float, int, int], Compiled] = {}
        self.compile_seconds = 0.0

    def options(self, level: float) -> MoeOptions:
        return dataclasses.replace(self.base_options, threshold=level)

    def _abstract(self, tree):
        return jax.tree_util.tree_map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=self.input_sharding), tree
        )

    def jobs(self) -> list[tuple[str, float, int, int]]:
        b = self.buckets
        out = [
            ("prefill", level, batch, length)
            for level in self.ladder.levels
            for batch in b.prefill_batches
            for length in b.prefill_lengths
        ]
        out += [
            ("decode", level, batch, width)
            for level in self.ladder.levels
            for batch in b.decode_batches
            for width in b.decode_widths
        ]
        return out

    def compile(self, progress: bool = True) -> float:
        start = time.perf_counter()
        jobs = self.jobs()
        budget = MappingBudget.for_cpu_compilation(len(jobs), jax.default_backend())
        for phase, level, batch, size in tqdm(jobs, desc="compiling steps", disable=not progress):
            if budget is not None:
                budget.check()
            if phase == "prefill":
                inputs = self._abstract(
                    host_prefill_batch(
                        batch, size, self.buckets.prefill_width(size), self.num_slots
                    )
                )
                lowered = engine_prefill_step.lower(
                    self._params,
                    self._state,
                    inputs,
                    config=self.config,
                    moe_options=self.options(level),
                )
                self._prefill[(level, batch, size)] = lowered.compile()
            else:
                inputs = self._abstract(host_decode_batch(batch, size, self.num_slots))
                lowered = engine_decode_step.lower(
                    self._params,
                    self._state,
                    inputs,
                    config=self.config,
                    moe_options=self.options(level),
                )
                self._decode[(level, batch, size)] = lowered.compile()
        self.compile_seconds = time.perf_counter() - start
        return self.compile_seconds

    def run_each_once(self, params: ModelParams, state: EngineState, progress: bool = True):
        """Executes every compiled step once and returns the state. The first execution of an
        XLA:CPU executable is 5–8× slower than later ones (lazy runtime set-up, fresh buffer
        pages): left to serving, each first use of a (level, bucket) showed up as a latency
        spike right when the controller moved to a new level. Every row is real work (so the
        expert loops run) but writes only to the null KV block and a dropped slot, so the
        state's contents are unchanged for any request."""
        jobs = [("prefill", *key) for key in self._prefill] + [
            ("decode", *key) for key in self._decode
        ]
        sharding = self.input_sharding
        for phase, level, batch, size in tqdm(jobs, desc="first runs", disable=not progress):
            if phase == "prefill":
                host = host_prefill_batch(
                    batch, size, self.buckets.prefill_width(size), self.num_slots
                )
                host.lengths[:] = size
                state, packed = self._prefill[(level, batch, size)](
                    params, state, jax.device_put(host, sharding)
                )
            else:
                host = host_decode_batch(batch, size, self.num_slots)
                host.active[:] = True
                state, packed = self._decode[(level, batch, size)](
                    params, state, jax.device_put(host, sharding)
                )
            packed.block_until_ready()
        return state

    def prefill(self, level: float, batch: int, length: int) -> Compiled:
        return self._prefill[(level, batch, length)]

    def decode(self, level: float, batch: int, width: int) -> Compiled:
        return self._decode[(level, batch, width)]

    @property
    def count(self) -> int:
        return len(self._prefill) + len(self._decode)
