"""The executor: the compiled step grid, the device state, dispatch and the one read-back.

``dispatch`` uploads a :class:`StepPlan`'s small host arrays and launches its executable
without waiting; ``read`` is the step's one host sync (the packed sampled tokens, plus the
per-device expert load on a mesh). The engine thread reads step t only after dispatching step
t+1, so the sync overlaps with device work. The state (KV pool, each slot's last token) is
donated to every step and lives here only.

Warm-up. An XLA:CPU executable's first execution is 5–8× slower than later ones (lazy runtime
set-up, fresh buffer pages; demo decode at batch 16: 23 ms vs 4 ms); left to serving, each
first use of a (level, bucket) was a latency spike just when the controller moved to a new
level. So every executable is run once on rows that write only to the null KV block and a
dropped slot (the state's contents are unchanged for any request) before it is used. An
executable compiled in the background is run once by the engine thread, between steps, and
only then offered to the scheduler: the dispatch path never compiles.

Timing. Before serving, each executable also runs ``latency_samples`` more times on random
tokens, timed one by one, in rounds over all steps; the median is its base in the engine's
:class:`LatencyModel` (the predictive controller's table). Random tokens, and decode rows on
distinct slots and KV blocks (free before serving), because identical rows would all route to
the same few experts and make every brownout level cost the same. With background compilation
only the minimal set is timed (serving waits for these runs, and a warm cache has many more
steps ready at start): the others' first executions while serving give their base.

Step failures. A device runtime error (``jax.errors.JaxRuntimeError``: XLA out of memory, a
failed launch) in ``dispatch``, ``read`` or ``warm_up`` is raised as ``StepFailedError``: the
engine loop fails that step's requests and serves on, calling ``recover_state`` first (the
state is donated to the step, so the failure may have taken it). Any other exception is a bug
and still stops the engine.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from brownout_jax.engine.buckets import Bucket
from brownout_jax.engine.config import EngineConfig
from brownout_jax.engine.distributed import (
    PlanChannel,
    check_same_everywhere,
    describe_engine,
    describe_grid,
)
from brownout_jax.engine.input_words import InputLayout, WordBuffers
from brownout_jax.engine.latency_model import LatencyModel
from brownout_jax.engine.logit_processing import TokenHistory
from brownout_jax.engine.paged_cache import KVPool
from brownout_jax.engine.phase import Phase, Thresholds
from brownout_jax.engine.plan_wire import PlanOp
from brownout_jax.engine.requests import BrownoutClass, ProcessGroupError, StepFailedError
from brownout_jax.engine.scheduler import StepPlan, StepRow
from brownout_jax.engine.step_grid import StepGrid, StepKey
from brownout_jax.engine.steps import EngineState, SampledRows, split_packed
from brownout_jax.model.config import ModelConfig
from brownout_jax.model.params import ModelParams, MoeParams
from brownout_jax.moe.expert_parallel import (
    is_expert_parallel,
    make_mesh,
    replicate,
    replicate_across_processes,
    shard_params,
)
from brownout_jax.moe.ladder import ThresholdLadder
from brownout_jax.moe.options import MoeOptions


@dataclasses.dataclass(frozen=True, slots=True)
class InFlight:
    """A dispatched step whose sampled tokens have not been read yet."""

    plan: StepPlan
    packed: jax.Array
    dispatched_at: float
    thresholds: Thresholds  # the levels in force: this step's phase ran at its own
    predicted: tuple[float, float] | None = None  # its latency's (mean, P90) at dispatch
    decision_s: float = 0.0  # host time mode auto took to choose its level (and pacing)


def _device_errors_fail_the_step(method):
    """``JaxRuntimeError`` out of ``method`` becomes ``StepFailedError`` (the whole message
    goes to the log; the requests get its first line); across processes,
    ``ProcessGroupError``."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except jax.errors.JaxRuntimeError as err:
            logging.getLogger("brownout_jax").error("a step failed on the device: %s", err)
            if self.channel is not None:
                raise ProcessGroupError(
                    f"a step across {self.channel.processes} processes failed (a peer died or "
                    f"stalled?): {str(err).splitlines()[0]}"
                ) from err
            raise StepFailedError(str(err)) from err

    return wrapper


def has_united_experts(params: ModelParams) -> bool:
    return any(
        isinstance(layer.mlp, MoeParams) and layer.mlp.group_of_expert is not None
        for layer in params.layers
    )


def ladder_for(params: ModelParams, config: EngineConfig) -> ThresholdLadder:
    """The configured ladder, or the exact model alone when there are no united experts."""
    if has_united_experts(params):
        return config.ladder
    if config.controller.mode == "fixed" and config.controller.fixed_threshold < 1.0:
        raise ValueError("a fixed brownout threshold below 1 needs united experts")
    return ThresholdLadder((1.0,))


def make_grid(
    params: ModelParams, model_config: ModelConfig, config: EngineConfig, ladder: ThresholdLadder
) -> StepGrid:
    """The step grid of an engine (uncompiled). ``params`` may be abstract (their shapes are all
    compiling needs), but must be placed on the mesh already when there is one."""
    mesh = None if config.mesh is None else make_mesh(config.mesh)
    options = MoeOptions(
        exempt_layers=config.exempt_layers, mesh=mesh, backend=config.experts_backend
    )
    return StepGrid(
        params,
        model_config,
        ladder,
        config.buckets(),
        config.num_blocks,
        config.max_batch,
        options,
        workers=config.compile_workers,
        first_level=config.controller.initial_level(ladder),
        attention=config.attention,
        token_masks=config.structured_output,
    )


class Executor:
    def __init__(
        self,
        params: ModelParams,
        model_config: ModelConfig,
        config: EngineConfig,
        ladder: ThresholdLadder,
        progress: bool = True,
        grid: StepGrid | None = None,
        latency: LatencyModel | None = None,
        eos_token_ids: frozenset[int] = frozenset(),
        channel: PlanChannel | None = None,
    ):
        """``grid``: one already compiled (``make_grid``, e.g. while the weights loaded) for
        exactly these params' shapes; else the grid is made and compiled here. ``latency``:
        the model the steps compiled before serving are timed into. ``channel``: the engine
        spans several processes (``distributed``); the leader sends each step's plan through
        it before running the step, and every process checks at start that it serves what
        process 0 serves."""
        self.config = config
        self.channel = channel
        if channel is not None and config.compile_in_background:
            raise ValueError(
                "across processes every step is compiled before serving: background "
                "compilation would make a step usable on one process before another"
            )
        self.latency = LatencyModel() if latency is None else latency
        self._vocab_size = model_config.vocab_size
        self._eos_token_ids = tuple(sorted(eos_token_ids))  # banned until min_tokens
        mesh = None if config.mesh is None else make_mesh(config.mesh)
        description = None if channel is None else describe_engine(params, model_config, config)
        if mesh is not None and not is_expert_parallel(params):
            params = shard_params(params, model_config, mesh)
        self.num_devices = 0 if config.mesh is None else config.mesh.num_devices
        self._params = params
        if grid is not None and not grid.fits(params):
            grid.cancel()
            logging.getLogger("brownout_jax").warning(
                "the step grid compiled from the checkpoint's configs does not fit the loaded "
                "parameters; compiling again"
            )
            grid = None
        if grid is None:
            grid = make_grid(params, model_config, config, ladder)
            if channel is not None:
                channel.open(plan_capacity(grid))
                check_same_everywhere(description | describe_grid(grid), channel.start_timeout_s)
            grid.compile(background=config.compile_in_background, progress=progress)
            if channel is not None:  # one process may compile from its cache, another not
                channel.wait_for_all("compiled")
        elif channel is not None:
            raise ValueError("across processes the grid is compiled by the executor")
        self.grid = grid
        self._keys = tuple(grid.keys())
        self._key_index = {key: i for i, key in enumerate(self._keys)}
        self._model_config, self._mesh = model_config, mesh
        self._state = self._new_state()
        self._layouts: dict[tuple[Phase, Bucket], InputLayout] = {}
        self._words = WordBuffers()
        # (phase, level) → buckets run once and offered to the scheduler.
        self._usable: dict[tuple[Phase, float], set[Bucket]] = {}
        # (phase, level) whose covering bucket is usable: any step of the phase fits.
        self._ready_levels: set[tuple[Phase, float]] = set()
        self.warm_up(progress=progress, wait=True)

    # -------------------------------------------------------------------------- what runs

    @property
    def buckets(self):
        return self.grid.buckets

    def serving_level(self, phase: Phase, wanted: float) -> float:
        """The level a step of ``phase`` runs at: ``wanted`` once that level can run every
        step (its covering bucket is usable); before that the highest such level below it, or
        failing one, the lowest usable level (the minimal set holds the starting level)."""
        ready = [level for (p, level) in self._ready_levels if p == phase]
        below = [level for level in ready if level <= wanted]
        return max(below) if below else min(ready)

    def usable_buckets(self, phase: Phase, level: float) -> frozenset[Bucket]:
        return frozenset(self._usable.get((phase, level), ()))

    def _new_state(self) -> EngineState:
        """A fresh state: the KV pool zeroed, every slot's last token 0."""
        config = self.config
        state = EngineState(
            pool=KVPool.allocate(
                self._model_config, config.num_blocks, config.block_size, self._params.embed.dtype
            ),
            last_tokens=jnp.zeros((config.max_batch,), jnp.int32),
            history=TokenHistory.zeros(config.max_batch, self._vocab_size),
        )
        return state if self._mesh is None else replicate(state, self._mesh)

    def recover_state(self) -> bool:
        """After a failed step: whether the state was lost, and then a fresh one replaces it.
        Lost means donated to the step that failed (its buffers are deleted), or the output
        of a failed execution (awaiting it raises); both are checked, waiting for the device
        (an error path: the sync costs nothing that matters). Raises ``JaxRuntimeError`` when
        no fresh state can be allocated: not recoverable, the engine stops."""
        leaves = jax.tree.leaves(self._state)
        try:
            if not any(leaf.is_deleted() for leaf in leaves):
                jax.block_until_ready(leaves)
                return False
        except jax.errors.JaxRuntimeError:
            pass
        self._state = None
        for leaf in leaves:  # whatever the lost state still holds goes before the new one
            if not leaf.is_deleted():
                with contextlib.suppress(jax.errors.JaxRuntimeError):  # an error buffer
                    leaf.delete()
        self._state = self._new_state()
        return True

    # -------------------------------------------------------------------------- warm-up

    @_device_errors_fail_the_step
    def warm_up(self, progress: bool = False, wait: bool = False) -> int:
        """Runs every newly compiled executable once and makes it usable; returns how many.
        With ``wait``, blocks until those runs finished (before serving starts)."""
        keys = sorted(self.grid.take_compiled())
        outputs = []
        for key in tqdm(keys, desc="first runs", disable=not progress or not keys):
            self._state, packed = self._run_empty(key)
            outputs.append(packed)
            self._usable.setdefault((key.phase, key.level), set()).add(key.bucket)
            if key.bucket == self.grid.buckets.covering(key.phase):
                self._ready_levels.add((key.phase, key.level))
        if wait:
            jax.block_until_ready(outputs)
            self._time(keys, progress)
        return len(keys)

    def _time(self, keys: list[StepKey], progress: bool) -> None:
        """The latency model's base: the median of ``latency_samples`` timed executions of
        each step on random tokens (before serving: decode rows then read real slots)."""
        samples = self.config.latency_samples
        if self.config.compile_in_background:
            # Serving waits for these runs: only the minimal set is timed (the rest, loaded
            # or compiled meanwhile, is learned from its first executions while serving).
            minimal = set(self.grid.minimal_keys())
            keys = [key for key in keys if key in minimal]
        if not samples or not keys:
            return
        rng = np.random.default_rng(0)
        last = self._state.last_tokens
        random_tokens = rng.integers(0, self._vocab_size, last.shape, dtype=np.int32)
        self._state = self._state.replace(last_tokens=self._place(random_tokens, last.sharding))
        # Round by round over all steps, not step by step: a slow stretch of the machine (a
        # noisy neighbour) then costs one sample of many steps, not every sample of a few —
        # the levels of a bucket are compared with each other, and one level's base timed in
        # a slow stretch made it look slower than lower levels (measured at Qwen dims).
        times: dict[StepKey, list[float]] = {key: [] for key in keys}
        with tqdm(total=samples * len(keys), desc="timing steps", disable=not progress) as bar:
            for _ in range(samples):
                for key in keys:
                    start = time.perf_counter()
                    self._state, packed = self._run_empty(key, rng)
                    packed.block_until_ready()
                    times[key].append(time.perf_counter() - start)
                    bar.update()
        for key, samples_s in times.items():
            self.latency.set_base(key.phase, key.level, key.bucket, samples_s)

    def _run_empty(self, key: StepKey, rng: np.random.Generator | None = None):
        """One execution whose every row is real work (so the expert loops run) but writes
        only to the null KV block and a dropped slot. With ``rng`` (before serving only, when
        no request owns a slot or block), prefill rows are random tokens and decode rows read
        and write real slots and blocks."""
        slots = self.config.max_batch
        batch, size = key.bucket.batch, key.bucket.size
        host = self.grid.empty_batch(key.phase, key.bucket)
        if key.phase == Phase.PREFILL:
            host.lengths[:] = size
            if rng is not None:
                host.tokens[:] = rng.integers(0, self._vocab_size, host.tokens.shape)
        else:
            host.active[:] = True
            if rng is not None:
                # Each row its own real block: on the shared null block every row would
                # attend to the same cached token, their hidden states would nearly agree and
                # all route to the same few experts, so every level would time alike.
                host.slots[:] = np.arange(batch) % slots
                host.block_tables[:, 0] = 1 + np.arange(batch) % (self.config.num_blocks - 1)
        words = self.grid.layout(key.phase, key.bucket).pack(host)
        inputs = self._place(words, self.grid.input_sharding)
        return self.grid.executable(key)(self._params, self._state, inputs)

    # -------------------------------------------------------------------------- one step

    @_device_errors_fail_the_step
    def dispatch(self, plan: StepPlan, thresholds: Thresholds, now: float) -> InFlight:
        """Launches the plan's step at its phase's level in ``thresholds``; does not wait."""
        key = StepKey(plan.phase, thresholds.of(plan.phase), plan.bucket)
        # Without a mesh the executable takes the NumPy words itself (its C++ path: 8 µs
        # against device_put's 40 µs, measured).
        inputs = self._host_words(plan)
        if self.channel is not None:  # every process runs this step, in this order
            self.channel.send(PlanOp.STEP, self._key_index[key], inputs)
        if self.grid.input_sharding is not None:
            inputs = self._place(inputs, self.grid.input_sharding)
        self._state, packed = self.grid.executable(key)(self._params, self._state, inputs)
        packed.copy_to_host_async()
        return InFlight(plan, packed, now, thresholds)

    @_device_errors_fail_the_step
    def run_received(self, key_index: int, words: np.ndarray) -> None:
        """A follower's step: the leader's plan run on this process's devices (its sampled
        tokens, replicated, are the leader's to read)."""
        key = self._keys[key_index]
        inputs = self._place(words, self.grid.input_sharding)
        self._state, _ = self.grid.executable(key)(self._params, self._state, inputs)

    def _place(self, host: np.ndarray, sharding) -> jax.Array:
        """Host values onto the mesh, replicated. Across processes each process places its
        own copy (``device_put`` would first gather every process's value to compare them:
        a collective and a host sync in every step)."""
        if self.channel is None:
            return jax.device_put(host, sharding)
        return replicate_across_processes(host, sharding)

    def _host_words(self, plan: StepPlan) -> np.ndarray:
        """The plan's batch, written straight into a reused buffer of its upload's words."""
        layout = self._layouts.get((plan.phase, plan.bucket))
        if layout is None:
            layout = self._layouts[(plan.phase, plan.bucket)] = self.grid.layout(
                plan.phase, plan.bucket
            )
        words, host = self._words.next(
            layout, lambda: self.grid.empty_batch(plan.phase, plan.bucket)
        )
        if plan.phase == Phase.PREFILL:
            for i, row in enumerate(plan.rows):
                host.tokens[i, : len(row.tokens)] = row.tokens
                host.starts[i] = row.position
                host.lengths[i] = len(row.tokens)
                host.block_tables[i, : len(row.blocks)] = row.blocks
                host.slots[i] = row.slot
                host.exact[i] = row.request.brownout == BrownoutClass.NEVER
                host.prompt_lengths[i] = row.prompt_length
                host.history_from[i] = row.history_from
                if row.scores_prompt:
                    host.scoring[i] = True
                    host.next_tokens[i] = row.next_token
                _fill_sampling(host.sampling, i, row.request)
                self._fill_processing(host.processing, i, row)
            return words
        for i, row in enumerate(plan.rows):
            host.slots[i] = row.slot
            host.positions[i] = row.position
            host.block_tables[i, : len(row.blocks)] = row.blocks
            host.active[i] = True
            host.exact[i] = row.request.brownout == BrownoutClass.NEVER
            _fill_sampling(host.sampling, i, row.request)
            self._fill_processing(host.processing, i, row)
        return words

    def _fill_processing(self, proc, i: int, row: StepRow) -> None:
        """Row ``i``'s logit processing; a request using none of it costs two attribute
        reads (the buffer starts neutral)."""
        request = row.request
        if request.top_logprobs:
            proc.alternatives[i] = True
        if not (_processes_logits(request) or row.grammar is not None):
            return
        proc.presence[i] = request.presence_penalty
        proc.frequency[i] = request.frequency_penalty
        proc.repetition[i] = request.repetition_penalty
        proc.min_p[i] = request.min_p
        bias = list(request.logit_bias)
        # Under a grammar, its mask decides where the text ends (a ban on EOS after a
        # complete object would leave no token at all).
        if row.generated_before < request.min_tokens and row.grammar is None:
            stops = set(request.stop_token_ids)
            if not request.ignore_eos:
                stops.update(self._eos_token_ids)
            bias += [(token, -np.inf) for token in sorted(stops)]
        for j, (token, value) in enumerate(bias):
            proc.bias_ids[i, j] = token
            proc.bias_values[i, j] = value
        if row.grammar is not None:
            proc.masked[i] = True
            row.grammar.fill_mask(proc.token_mask[i])

    @_device_errors_fail_the_step
    def read(self, step: InFlight) -> SampledRows:
        """The step's one host sync."""
        plan = step.plan
        chunk = plan.bucket.size if plan.phase == Phase.PREFILL else None
        # Replicated: this process's own copy is the whole value (across processes the
        # others' copies are not addressable here).
        packed = step.packed if self.channel is None else step.packed.addressable_data(0)
        return split_packed(np.asarray(packed), plan.bucket.batch, chunk, self.num_devices)

    def close(self) -> None:
        self.grid.cancel()
        if self.channel is not None:
            self.channel.stop_watching()


def plan_capacity(grid: StepGrid) -> int:
    """The longest step upload of ``grid``: the plan buffer's payload."""
    keys = grid.keys()
    return max(grid.layout(key.phase, key.bucket).size for key in keys)


def _processes_logits(request) -> bool:
    return bool(
        request.logit_bias
        or request.min_tokens
        or request.min_p
        or request.presence_penalty
        or request.frequency_penalty
        or request.repetition_penalty != 1.0
    )


def _fill_sampling(sampling, row: int, request) -> None:
    sampling.temperature[row] = request.temperature
    sampling.seed[row] = request.seed
    sampling.top_k[row] = request.top_k
    sampling.top_p[row] = request.top_p
