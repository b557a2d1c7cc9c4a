"""The compiled step grid: one executable per (phase, ladder level, shape bucket).

Serving switches brownout levels and batch shapes from one step to the next; each is a
different static shape or ``MoeOptions`` and so a different executable. Every one is compiled
ahead of time, so serving never compiles: a switch is a dictionary lookup.

Compilation runs on a thread pool (XLA compiles release the GIL; tracing is serialised), the
*minimal set* first: for each phase the bucket every step fits by padding up
(``EngineBuckets.covering``) at the level the controller starts at (1.0, or the fixed level).
With that set compiled the engine can serve every request; the rest of the grid can then
compile in the background and be put to use as each executable arrives (``take_compiled``):
next the lowest level's covering buckets (the controller's first move under a burst, no
earlier than its first check), then level by level.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import threading
import time

import jax
import jax.numpy as jnp
from jax.stages import Compiled
from tqdm.auto import tqdm

from brownout_jax.engine.attention_path import AttentionPath
from brownout_jax.engine.buckets import Bucket, EngineBuckets
from brownout_jax.engine.input_words import InputLayout
from brownout_jax.engine.logit_processing import TokenHistory
from brownout_jax.engine.map_budget import MappingBudget
from brownout_jax.engine.paged_cache import KVPool
from brownout_jax.engine.phase import Phase
from brownout_jax.engine.steps import (
    EngineState,
    engine_decode_step,
    engine_prefill_step,
    host_decode_batch,
    host_prefill_batch,
)
from brownout_jax.engine.structured_output import mask_words
from brownout_jax.model.config import ModelConfig
from brownout_jax.model.params import ModelParams
from brownout_jax.moe.expert_parallel import abstract_placed, replicated
from brownout_jax.moe.ladder import ThresholdLadder
from brownout_jax.moe.options import MoeOptions


@dataclasses.dataclass(frozen=True, slots=True, order=True)
class StepKey:
    phase: Phase
    level: float  # brownout threshold (a ladder level)
    bucket: Bucket


def abstract_tree(tree, sharding=None):
    return jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), tree
    )


def compile_workers() -> int:
    """Concurrent compilations: every core this process may use."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)


class StepGrid:
    def __init__(
        self,
        params: ModelParams,
        config: ModelConfig,
        ladder: ThresholdLadder,
        buckets: EngineBuckets,
        num_blocks: int,
        num_slots: int,
        base_options: MoeOptions,
        workers: int | None = None,
        first_level: float = 1.0,
        attention: AttentionPath = AttentionPath.XLA,
        token_masks: bool = False,
    ):
        """``token_masks``: steps take a structured-output token mask per row."""
        self.config = config
        self.ladder = ladder
        self.first_level = first_level  # the minimal set's level
        self.buckets = buckets
        self.num_slots = num_slots
        self.base_options = base_options
        self.attention = attention
        self.vocab_words = mask_words(config.vocab_size) if token_masks else 0
        self.workers = workers or compile_workers()
        # On a mesh the executables take placed arrays: params as sharded, the rest replicated.
        self.input_sharding = replicated(base_options.mesh)
        dtype = params.embed.dtype
        self._params = (
            abstract_tree(params) if base_options.mesh is None else abstract_placed(params)
        )
        state = EngineState(
            pool=KVPool.abstract(config, num_blocks, buckets.block_size, dtype),
            last_tokens=jax.ShapeDtypeStruct((num_slots,), jnp.int32),
            history=TokenHistory.abstract(num_slots, config.vocab_size),
        )
        self._state = abstract_tree(state, self.input_sharding)
        self._compiled: dict[StepKey, Compiled] = {}
        self._arrived: list[StepKey] = []  # compiled, not yet taken by the executor
        self._lock = threading.Lock()
        self._trace_lock = threading.Lock()
        self._cancelled = threading.Event()
        self._background: threading.Thread | None = None
        self.error: BaseException | None = None  # a background compilation's failure
        self.compile_seconds = 0.0  # until the whole grid was compiled (or so far)
        self._keys = self._compile_order()
        self._budget = MappingBudget.for_cpu_compilation(len(self._keys), jax.default_backend())

    # -------------------------------------------------------------------------- the grid

    def keys(self) -> list[StepKey]:
        return list(self._keys)

    def _compile_order(self) -> list[StepKey]:
        """Every key, in compilation order: the minimal set, the lowest level's covering
        buckets, then level by level (the first, the lowest, the rest downwards), per phase
        the covering bucket first (with it a level can serve every step), then the buckets
        smallest first."""
        levels = self.ladder.levels
        order = dict.fromkeys([self.first_level, levels[0], *reversed(levels)])
        keys = self.minimal_keys()
        keys += [StepKey(p, levels[0], self.buckets.covering(p)) for p in Phase]
        for level in order:
            for phase in Phase:
                covering = self.buckets.covering(phase)
                for bucket in (covering, *self.buckets.grid(phase)):
                    keys.append(StepKey(phase, level, bucket))
        return list(dict.fromkeys(keys))

    def minimal_keys(self) -> list[StepKey]:
        """What the first request needs: each phase's covering bucket at the first level."""
        return [StepKey(phase, self.first_level, self.buckets.covering(phase)) for phase in Phase]

    @property
    def total(self) -> int:
        return len(self._keys)

    @property
    def count(self) -> int:
        """Executables compiled so far."""
        with self._lock:
            return len(self._compiled)

    @property
    def pending(self) -> int:
        """Executables still to compile."""
        return self.total - self.count

    def executable(self, key: StepKey) -> Compiled:
        with self._lock:
            return self._compiled[key]

    def compiled_items(self) -> list[tuple[StepKey, Compiled]]:
        with self._lock:
            return sorted(self._compiled.items())

    def fits(self, params: ModelParams) -> bool:
        """Whether ``params`` have the tree, shapes and dtypes the grid was compiled for."""
        mine, theirs = self._params, abstract_tree(params)
        if jax.tree_util.tree_structure(mine) != jax.tree_util.tree_structure(theirs):
            return False
        pairs = zip(jax.tree_util.tree_leaves(mine), jax.tree_util.tree_leaves(theirs), strict=True)
        return all(a.shape == b.shape and a.dtype == b.dtype for a, b in pairs)

    def take_compiled(self) -> list[StepKey]:
        """Keys compiled since the last call (each is handed out once)."""
        with self._lock:
            arrived, self._arrived = self._arrived, []
        return arrived

    # -------------------------------------------------------------------------- compiling

    def options(self, level: float) -> MoeOptions:
        return dataclasses.replace(self.base_options, threshold=level)

    def compile(self, background: bool = False, progress: bool = True) -> None:
        """Compiles the minimal set, then the rest: before returning, or with ``background``
        on a thread that returns at once (its failure is kept in :attr:`error`)."""
        start = time.perf_counter()
        keys = self.keys()
        minimal = len(self.minimal_keys())
        bar = tqdm(total=len(keys), desc="compiling steps", disable=not progress)
        self._compile_keys(keys[:minimal], bar)
        self.compile_seconds = time.perf_counter() - start
        if not background:
            self._compile_keys(keys[minimal:], bar)
            self.compile_seconds = time.perf_counter() - start
            bar.close()
            return
        bar.close()

        def rest() -> None:
            try:
                # While serving, one core is left to the engine: compilations must not
                # take every core from the steps being served.
                self._compile_keys(keys[minimal:], None, max(1, self.workers - 1))
            except BaseException as err:  # the engine thread raises it: fail fast
                self.error = err
            self.compile_seconds = time.perf_counter() - start

        self._background = threading.Thread(target=rest, name="brownout-compile", daemon=True)
        self._background.start()

    def cancel(self) -> None:
        """Stops a background compilation (the engine is shutting down)."""
        self._cancelled.set()

    def _compile_keys(self, keys: list[StepKey], bar, workers: int | None = None) -> None:
        with concurrent.futures.ThreadPoolExecutor(
            workers or self.workers, thread_name_prefix="brownout-compile"
        ) as pool:
            futures = [pool.submit(self._compile_one, key) for key in keys]
            try:
                for future in concurrent.futures.as_completed(futures):
                    future.result()
                    if bar is not None:
                        bar.update(1)
            except BaseException:
                self._cancelled.set()
                raise

    def _compile_one(self, key: StepKey) -> None:
        if self._cancelled.is_set():
            return
        with self._trace_lock:  # tracing is Python work: one at a time
            if self._budget is not None:
                self._budget.check()
            lowered = self._lower(key)
        compiled = lowered.compile()  # XLA releases the GIL: compilations overlap
        with self._lock:
            self._compiled[key] = compiled
            self._arrived.append(key)

    def empty_batch(self, phase: Phase, bucket: Bucket):
        """A step's host batch with every row padding (NumPy), in the bucket's shapes."""
        batch, size = bucket.batch, bucket.size
        if phase == Phase.PREFILL:
            width = self.buckets.prefill_width(size)
            return host_prefill_batch(batch, size, width, self.num_slots, self.vocab_words)
        return host_decode_batch(batch, size, self.num_slots, self.vocab_words)

    def layout(self, phase: Phase, bucket: Bucket) -> InputLayout:
        """How a step's batch is laid out in its one int32 upload."""
        return InputLayout.of(self.empty_batch(phase, bucket))

    def _lower(self, key: StepKey):
        layout = self.layout(key.phase, key.bucket)
        step = engine_prefill_step if key.phase == Phase.PREFILL else engine_decode_step
        words = jax.ShapeDtypeStruct((layout.size,), jnp.int32, sharding=self.input_sharding)
        return step.lower(
            self._params,
            self._state,
            words,
            config=self.config,
            moe_options=self.options(key.level),
            attention=self.attention,
            layout=layout,
        )
