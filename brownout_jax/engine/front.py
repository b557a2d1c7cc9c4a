"""The serving engine: continuous batching over a paged KV cache, with SLO-aware brownout.

One engine thread owns the device. Each iteration it drains new requests and cancellations,
lets the controller adjust the brownout thresholds, plans one step (a prefill of waiting
requests or a decode of running ones), dispatches it, and only then reads the *previous*
step's sampled tokens — the one host sync per step overlaps with the device computing the
next. Scheduling policy (documented in docs/ARCHITECTURE.md): while requests wait and
sequences run, prefill and decode steps alternate, so a burst can neither starve running
decodes nor leave a new request behind more than one decode step; admission is FIFO and stops
at the first request that does not fit (no overtaking). When a running sequence needs a new KV
block and none is free, the most recently admitted other sequence is preempted: its blocks are
freed and it is re-queued at the front, to be recomputed from prompt + generated tokens.
Nothing accepted is lost: every request ends with exactly one finishing event.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import queue
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

from brownout_jax.engine.compiled_steps import has_united_experts
from brownout_jax.engine.config import EngineConfig
from brownout_jax.engine.controller import SloController
from brownout_jax.engine.detokenize import IncrementalText
from brownout_jax.engine.metrics import EngineMetrics, EngineStats
from brownout_jax.engine.paged_cache import BlockAllocator, KVPool, blocks_needed
from brownout_jax.engine.requests import (
    EngineClosedError,
    EngineDeadError,
    EngineOverloadedError,
    FinishReason,
    GenerationRequest,
    RequestError,
    RequestHandle,
    TokenEvent,
    validate_request,
)
from brownout_jax.engine.steps import (
    EngineState,
    EngineSteps,
    host_decode_batch,
    host_prefill_batch,
    split_packed,
)
from brownout_jax.model.config import ModelConfig
from brownout_jax.model.params import ModelParams
from brownout_jax.moe.block import MoeOptions
from brownout_jax.moe.expert_parallel import is_expert_parallel, make_mesh, replicate, shard_params
from brownout_jax.offline.steps import unpack_sampled


@dataclasses.dataclass(eq=False)
class _Sequence:
    handle: RequestHandle
    prompt: list[int]
    stop_ids: frozenset[int]
    text: IncrementalText
    admitted_order: int = 0
    slot: int | None = None
    blocks: list[int] = dataclasses.field(default_factory=list)
    generated: list[int] = dataclasses.field(default_factory=list)
    dispatched: int = 0  # sampled tokens dispatched (processed or still in flight)
    finished: bool = False
    preempted: bool = False

    @property
    def request(self) -> GenerationRequest:
        return self.handle.request

    @property
    def context(self) -> list[int]:
        return self.prompt + self.generated


@dataclasses.dataclass
class _InFlight:
    """A dispatched step whose sampled tokens have not been read yet."""

    phase: str
    rows: list[_Sequence]
    packed: jax.Array
    dispatched_at: float
    thresholds: tuple[float, float]


class Engine:
    """Thread-safe front (``submit``, ``cancel``, ``stats``, ``shutdown``) of one engine loop."""

    def __init__(
        self,
        params: ModelParams,
        model_config: ModelConfig,
        config: EngineConfig = EngineConfig(),  # noqa: B008 (frozen)
        tokenizer=None,
        eos_token_ids: tuple[int, ...] = (),
        model_name: str = "model",
        clock=time.monotonic,
        progress: bool = True,
    ):
        self.model_config = model_config
        config = config.for_model(model_config.max_position_embeddings)
        self.config = config
        self.tokenizer = tokenizer
        self.eos_token_ids = frozenset(eos_token_ids)
        self.model_name = model_name
        self.clock = clock
        ladder = config.ladder if has_united_experts(params) else _exact_only(config)
        self.ladder = ladder
        self.controller = SloController(config.controller, ladder, clock)
        self._load_rows = 0 if config.mesh is None else config.mesh.num_devices
        self.metrics = EngineMetrics(
            num_devices=self._load_rows, num_moe_layers=len(model_config.moe_layers)
        )
        mesh = None if config.mesh is None else make_mesh(config.mesh)
        if mesh is not None and not is_expert_parallel(params):
            params = shard_params(params, model_config, mesh)
        self._params = params
        self._steps = EngineSteps(
            params,
            model_config,
            ladder,
            config.buckets(),
            config.num_blocks,
            config.max_batch,
            MoeOptions(
                exempt_layers=config.exempt_layers, mesh=mesh, backend=config.experts_backend
            ),
        )
        self._steps.compile(progress=progress)
        self._state = EngineState(
            pool=KVPool.allocate(
                model_config, config.num_blocks, config.block_size, params.embed.dtype
            ),
            last_tokens=jnp.zeros((config.max_batch,), jnp.int32),
        )
        if mesh is not None:
            self._state = replicate(self._state, mesh)
        self._state = self._steps.run_each_once(self._params, self._state, progress=progress)
        self._allocator = BlockAllocator(config.num_blocks)
        self._free_slots = list(range(config.max_batch - 1, -1, -1))
        self._incoming: queue.Queue = queue.Queue(maxsize=config.max_queue)
        self._cancels: queue.Queue[RequestHandle] = queue.Queue()
        self._waiting: collections.deque[_Sequence] = collections.deque()
        self._running: list[_Sequence] = []
        self._by_handle: dict[RequestHandle, _Sequence] = {}
        self._ids = itertools.count()
        self._admissions = itertools.count()
        self._in_flight: _InFlight | None = None
        self._last_phase = "decode"
        self._closing = False
        self._drain = True
        self._error: BaseException | None = None
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="brownout-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_checkpoint(
        cls,
        model_dir,
        united_dir=None,
        config: EngineConfig = EngineConfig(),  # noqa: B008 (frozen)
        dtype: str = "auto",
        progress: bool = True,
    ) -> Engine:
        from brownout_jax.checkpoints import load_model

        model = load_model(model_dir, dtype, progress=progress, united=united_dir)
        return cls(
            model.params,
            model.config,
            config,
            model.tokenizer,
            model.eos_token_ids,
            model_name=str(model.directory.name),
            progress=progress,
        )

    # ----------------------------------------------------------------- public, any thread

    @property
    def compile_seconds(self) -> float:
        return self._steps.compile_seconds

    @property
    def compiled_steps(self) -> int:
        return self._steps.count

    @property
    def max_model_len(self) -> int:
        """Prompt + generated tokens one request may use (see EngineConfig.for_model)."""
        return self.config.max_model_len

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self._error is None

    def submit(self, request: GenerationRequest) -> RequestHandle:
        """Validates and queues a request. Raises RequestError (bad field),
        EngineOverloadedError (queue full), EngineClosedError (draining), EngineDeadError."""
        self._raise_if_dead()
        if self._closing:
            raise EngineClosedError("the engine is shutting down and takes no new requests")
        if request.prompt is not None and not request.prompt_token_ids:
            if self.tokenizer is None:
                raise RequestError("prompt", "this model has no tokenizer; send prompt_token_ids")
            if not request.prompt:
                raise RequestError("prompt", "empty prompt")
            ids = tuple(self.tokenizer.encode(request.prompt, add_special_tokens=False))
            request = dataclasses.replace(request, prompt_token_ids=ids, prompt=None)
        if request.stop and self.tokenizer is None:
            raise RequestError("stop", "stop strings need a tokenizer; use stop_token_ids")
        validate_request(request, self.model_config.vocab_size, self.config.max_model_len)
        request_id = request.request_id or f"req-{next(self._ids)}"
        handle = RequestHandle(request_id, request, self)
        handle.metrics.arrival = self.clock()
        handle.metrics.prompt_tokens = len(request.prompt_token_ids)
        # The bound covers every request not yet admitted (new and queued alike).
        if self.num_waiting >= self.config.max_queue:
            raise EngineOverloadedError(
                f"{self.config.max_queue} requests already wait for admission"
            )
        try:
            self._incoming.put_nowait(handle)
        except queue.Full:
            raise EngineOverloadedError(
                f"{self.config.max_queue} requests already wait for admission"
            ) from None
        self._wake.set()
        return handle

    def cancel(self, handle: RequestHandle) -> None:
        self._cancels.put(handle)
        self._wake.set()

    def stats(self) -> EngineStats:
        with self._lock:
            return self.metrics.snapshot(self, self.controller)

    def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stops taking requests; with ``drain`` finishes those accepted, else cancels them."""
        self._closing = True
        self._drain = drain
        self._wake.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"engine did not stop within {timeout}s")
        self._raise_if_dead()

    def _raise_if_dead(self) -> None:
        if self._error is not None:
            raise EngineDeadError(f"the engine loop died: {self._error!r}") from self._error

    # ----------------------------------------------------------------- engine thread only

    def _run(self) -> None:
        try:
            while True:
                self._take_new_requests()
                self._take_cancellations()
                if self._closing and not self._drain:
                    self._cancel_all()
                idle = not (self._waiting or self._running or self._in_flight)
                if self._closing and idle and self._incoming.empty():
                    return
                self.controller.maybe_update()
                dispatched = self._dispatch_step()
                if self._in_flight is not None and dispatched is not self._in_flight:
                    self._process(self._in_flight)
                self._in_flight = dispatched
                self._requeue_preempted()
                if dispatched is None and not self._waiting:
                    self._wake.wait(timeout=0.05)
                    self._wake.clear()
        except BaseException as err:  # fail fast: every open request learns why
            self._error = err
            for seq in list(self._waiting) + self._running:
                self._finish(seq, FinishReason.ERROR, error=f"engine failure: {err!r}")
            while not self._incoming.empty():
                handle = self._incoming.get_nowait()
                handle._push(
                    TokenEvent(None, None, "", FinishReason.ERROR, f"engine failure: {err!r}")
                )

    def _take_new_requests(self) -> None:
        while True:
            try:
                handle = self._incoming.get_nowait()
            except queue.Empty:
                return
            request = handle.request
            stop_ids = set(request.stop_token_ids)
            if not request.ignore_eos:
                stop_ids |= self.eos_token_ids
            seq = _Sequence(
                handle=handle,
                prompt=list(request.prompt_token_ids),
                stop_ids=frozenset(stop_ids),
                text=IncrementalText(self.tokenizer, request.stop),
            )
            self._by_handle[handle] = seq
            self._waiting.append(seq)

    def _take_cancellations(self) -> None:
        while True:
            try:
                handle = self._cancels.get_nowait()
            except queue.Empty:
                return
            seq = self._by_handle.get(handle)
            if seq is not None and not seq.finished:
                self._finish(seq, FinishReason.CANCELLED)

    def _cancel_all(self) -> None:
        self._take_new_requests()
        for seq in list(self._waiting) + self._running:
            self._finish(seq, FinishReason.CANCELLED)

    # -- planning and dispatch

    def _dispatch_step(self) -> _InFlight | None:
        decodable = [s for s in self._running if s.dispatched < s.request.max_new_tokens]
        prefer_prefill = self._waiting and (not decodable or self._last_phase == "decode")
        if prefer_prefill:
            step = self._dispatch_prefill()
            if step is not None:
                return step
        if decodable:
            return self._dispatch_decode(decodable)
        return None

    def _admissible(self) -> list[_Sequence]:
        cfg, buckets = self.config, self._steps.buckets
        batch: list[_Sequence] = []
        free_blocks = self._allocator.free
        longest = 0
        for seq in self._waiting:
            if len(batch) == cfg.max_prefill_batch or len(batch) == len(self._free_slots):
                break
            need = blocks_needed(len(seq.context), cfg.block_size)
            new_longest = max(longest, len(seq.context))
            padded = buckets.pick(buckets.prefill_lengths, new_longest)
            rows = buckets.pick(buckets.prefill_batches, len(batch) + 1)
            if need > free_blocks or padded * rows > cfg.max_prefill_tokens:
                break  # FIFO: nobody overtakes the head of the queue
            batch.append(seq)
            free_blocks -= need
            longest = new_longest
        return batch

    def _dispatch_prefill(self) -> _InFlight | None:
        batch = self._admissible()
        if not batch:
            return None
        buckets = self._steps.buckets
        length = buckets.pick(buckets.prefill_lengths, max(len(s.context) for s in batch))
        rows = buckets.pick(buckets.prefill_batches, len(batch))
        host = host_prefill_batch(
            rows, length, buckets.prefill_width(length), self.config.max_batch
        )
        now = self.clock()
        for i, seq in enumerate(batch):
            self._waiting.popleft()
            seq.slot = self._free_slots.pop()
            seq.blocks = self._allocator.allocate(
                blocks_needed(len(seq.context), self.config.block_size)
            )
            seq.admitted_order = next(self._admissions)
            if seq.handle.metrics.admitted is None:
                seq.handle.metrics.admitted = now
            context = seq.context
            host.tokens[i, : len(context)] = context
            host.lengths[i] = len(context)
            host.block_tables[i, : len(seq.blocks)] = seq.blocks
            host.slots[i] = seq.slot
            _fill_sampling(host.sampling, i, seq.request)
            seq.dispatched = len(seq.generated) + 1
            self._running.append(seq)
        level = self.controller.threshold("prefill")
        executable = self._steps.prefill(level, rows, length)
        self._state, packed = executable(
            self._params, self._state, jax.device_put(host, self._steps.input_sharding)
        )
        packed.copy_to_host_async()
        self._last_phase = "prefill"
        return _InFlight("prefill", batch, packed, now, self._thresholds())

    def _dispatch_decode(self, decodable: list[_Sequence]) -> _InFlight | None:
        block_size = self.config.block_size
        rows: list[_Sequence] = []
        for seq in sorted(decodable, key=lambda s: s.admitted_order):
            if seq.preempted or seq.finished:
                continue
            need = blocks_needed(len(seq.prompt) + seq.dispatched, block_size)
            while len(seq.blocks) < need and not seq.preempted:
                got = self._allocator.allocate(1)
                if got is not None:
                    seq.blocks.extend(got)
                elif not self._preempt_victim(exclude=seq):
                    self._preempt(seq)  # nothing else to free: this one waits
            if not seq.preempted:
                rows.append(seq)
        rows = [s for s in rows if not s.preempted]
        if not rows:
            return None
        buckets = self._steps.buckets
        batch = buckets.pick(buckets.decode_batches, len(rows))
        width = buckets.pick(buckets.decode_widths, max(len(s.blocks) for s in rows))
        host = host_decode_batch(batch, width, self.config.max_batch)
        for i, seq in enumerate(rows):
            host.slots[i] = seq.slot
            host.positions[i] = len(seq.prompt) + seq.dispatched - 1
            host.block_tables[i, : len(seq.blocks)] = seq.blocks
            host.active[i] = True
            _fill_sampling(host.sampling, i, seq.request)
            seq.dispatched += 1
        level = self.controller.threshold("decode")
        executable = self._steps.decode(level, batch, width)
        now = self.clock()
        self._state, packed = executable(
            self._params, self._state, jax.device_put(host, self._steps.input_sharding)
        )
        packed.copy_to_host_async()
        self._last_phase = "decode"
        return _InFlight("decode", rows, packed, now, self._thresholds())

    def _preempt_victim(self, exclude: _Sequence) -> bool:
        candidates = [s for s in self._running if s is not exclude and not s.preempted]
        if not candidates:
            return False
        self._preempt(max(candidates, key=lambda s: s.admitted_order))
        return True

    def _preempt(self, seq: _Sequence) -> None:
        seq.preempted = True
        seq.handle.metrics.preemptions += 1
        self.metrics.record_preemption()
        self._release(seq)

    def _requeue_preempted(self) -> None:
        """Preempted sequences go back to the front of the queue once no step in flight still
        owes them a token (the recompute needs every generated token)."""
        owed = set(self._in_flight.rows) if self._in_flight is not None else set()
        ready = [s for s in self._running if s.preempted and s not in owed]
        for seq in sorted(ready, key=lambda s: s.admitted_order, reverse=True):
            self._running.remove(seq)
            seq.preempted = False
            if not seq.finished:
                seq.dispatched = len(seq.generated)
                self._waiting.appendleft(seq)

    # -- reading results

    def _process(self, step: _InFlight) -> None:
        packed = np.asarray(step.packed)  # the step's one sync
        sampled, load = split_packed(packed, self._load_rows)
        tokens, logprobs = unpack_sampled(sampled)
        now = self.clock()
        latency = now - step.dispatched_at
        with self._lock:
            self.controller.record(step.phase, latency, now)
            self.metrics.record_step(step.phase, latency, len(step.rows), now, step.thresholds)
            if load is not None:
                level = step.thresholds[0 if step.phase == "prefill" else 1]
                self.metrics.record_device_load(step.phase, level, load)
        for i, seq in enumerate(step.rows):
            if seq.finished:
                continue  # finished or cancelled while this step was in flight
            self._emit(seq, int(tokens[i]), float(logprobs[i]), now, step.thresholds)

    def _emit(
        self,
        seq: _Sequence,
        token: int,
        logprob: float,
        now: float,
        thresholds: tuple[float, float],
    ) -> None:
        metrics = seq.handle.metrics
        if metrics.first_token is None:
            metrics.first_token = now
        metrics.token_times.append(now)
        metrics.thresholds_used.add(thresholds)
        seq.generated.append(token)
        delta, stopped = seq.text.update(seq.generated)
        finish = None
        if stopped or token in seq.stop_ids:
            finish = FinishReason.STOP
        elif len(seq.generated) >= seq.request.max_new_tokens:
            finish = FinishReason.LENGTH
        if finish is not None:
            delta += seq.text.flush()
            metrics.finished = now  # before the event: a reader of it sees a complete record
        seq.handle._push(TokenEvent(token, logprob, delta, finish, None, thresholds))
        if finish is not None:
            self._finish(seq, finish, event_sent=True)

    def _finish(
        self,
        seq: _Sequence,
        reason: FinishReason,
        error: str | None = None,
        event_sent: bool = False,
    ) -> None:
        if seq.finished:
            return
        seq.finished = True
        if seq.handle.metrics.finished is None:
            seq.handle.metrics.finished = self.clock()
        if not event_sent:
            seq.handle._push(TokenEvent(None, None, "", reason, error, self._thresholds()))
        seq.handle.done = True
        self._release(seq)
        if seq in self._running:
            self._running.remove(seq)
        if seq in self._waiting:
            self._waiting.remove(seq)
        self._by_handle.pop(seq.handle, None)
        self.metrics.record_finish(seq.handle.metrics, reason)

    def _release(self, seq: _Sequence) -> None:
        self._allocator.release(seq.blocks)
        seq.blocks = []
        if seq.slot is not None:
            self._free_slots.append(seq.slot)
            seq.slot = None

    def _thresholds(self) -> tuple[float, float]:
        return (self.controller.threshold("prefill"), self.controller.threshold("decode"))

    # -- for stats

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting) + self._incoming.qsize()

    @property
    def kv_blocks_used(self) -> int:
        return self._allocator.used


def _fill_sampling(sampling, row: int, request: GenerationRequest) -> None:
    sampling.temperature[row] = request.temperature
    sampling.seed[row] = request.seed
    sampling.top_k[row] = request.top_k
    sampling.top_p[row] = request.top_p


def _exact_only(config: EngineConfig):
    from brownout_jax.moe.brownout import ThresholdLadder

    if config.controller.mode == "fixed" and config.controller.fixed_threshold < 1.0:
        raise ValueError("a fixed brownout threshold below 1 needs united experts")
    return ThresholdLadder((1.0,))
