"""The engine's thread-safe front: ``submit``, ``cancel``, ``stats``, ``set_controller``,
``shutdown``.

Building an :class:`Engine` compiles its step grid (``Executor``) and starts the engine thread
(``EngineLoop``), which owns the device; everything here may be called from any thread. The
request path: ``submit`` validates and queues → the loop hands it to the ``Scheduler`` → the
``Executor`` runs the steps → the request's ``TokenStream`` turns tokens into events on its
``RequestHandle``.
"""

from __future__ import annotations

import dataclasses
import itertools
import queue
import threading
import time

import jax

from brownout_jax.engine.config import EngineConfig
from brownout_jax.engine.controller import ControllerConfig, SloController
from brownout_jax.engine.distributed import PlanChannel
from brownout_jax.engine.executor import Executor, ladder_for, make_grid
from brownout_jax.engine.latency_model import LatencyModel
from brownout_jax.engine.loop import EngineLoop
from brownout_jax.engine.metrics import EngineMetrics, EngineStats, GridStatus, Occupancy
from brownout_jax.engine.paged_cache import check_kv_pool_fits
from brownout_jax.engine.quality_costs import DEFAULT_QUALITY_COSTS, QualityCosts
from brownout_jax.engine.requests import (
    EngineClosedError,
    EngineDeadError,
    EngineOverloadedError,
    GenerationRequest,
    RequestError,
    RequestHandle,
    check_prompt_text,
    longest_token_chars,
    validate_request,
)
from brownout_jax.engine.scheduler import Scheduler, SchedulerLimits
from brownout_jax.engine.step_grid import StepGrid
from brownout_jax.engine.stream import TokenStream
from brownout_jax.engine.structured_output import StructuredOutputCompiler
from brownout_jax.model.config import ModelConfig
from brownout_jax.model.packed_params import dense_paths
from brownout_jax.model.params import ModelParams


def with_stored_quality(config: EngineConfig, united_manifest: dict | None) -> EngineConfig:
    """``config`` whose controller weighs the quality costs stored with the united experts
    (``eval quality --store``), unless it was given costs of its own."""
    if config.controller.quality != DEFAULT_QUALITY_COSTS or not united_manifest:
        return config
    quality = QualityCosts.from_manifest(united_manifest)
    return dataclasses.replace(
        config, controller=dataclasses.replace(config.controller, quality=quality)
    )


class Engine:
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
        grid: StepGrid | None = None,
        channel: PlanChannel | None = None,
    ):
        """``grid``: the step grid, compiled already for these params' shapes
        (``from_checkpoint`` compiles it while the weights load); else compiled here.
        ``channel``: this engine leads several processes (``distributed``): each step's plan
        goes to the followers through it."""
        self.model_config = model_config
        config = config.for_model(model_config.max_position_embeddings, model_config.head_dim)
        self.config = config
        self.tokenizer = tokenizer
        # Bounds prompt text before it is tokenized (check_prompt_text): once per tokenizer.
        self.longest_token = None if tokenizer is None else longest_token_chars(tokenizer)
        self.eos_token_ids = frozenset(eos_token_ids)
        self.model_name = model_name
        self.clock = clock
        self.ladder = ladder_for(params, config)
        self.metrics = EngineMetrics(
            num_devices=0 if config.mesh is None else config.mesh.num_devices,
            num_moe_layers=len(model_config.moe_layers),
            processes=1 if channel is None else channel.processes,
            local_devices=jax.local_device_count(),
        )
        if channel is not None:
            channel.on_sent = self.metrics.record_plan_broadcast
        # Step latencies: timed before serving, corrected while serving; every controller
        # of this engine (set_controller) predicts from the same one.
        self.latency = LatencyModel()
        self.dense_paths = dense_paths(params)  # the measured matmul path per shape
        # Structured outputs: grammars compiled by the fronts' threads at submit (a bad spec
        # is that request's error), matched on the engine thread. None: not served.
        self.structured = None
        if config.structured_output:
            self.structured = StructuredOutputCompiler(
                tokenizer, model_config.vocab_size, sorted(self.eos_token_ids) or None
            )
        check_kv_pool_fits(model_config, config.num_blocks, config.block_size, params.embed.dtype)
        self._executor = Executor(
            params,
            model_config,
            config,
            self.ladder,
            progress,
            grid,
            self.latency,
            eos_token_ids=self.eos_token_ids,
            channel=channel,
        )
        scheduler = Scheduler(
            SchedulerLimits(
                max_batch=config.max_batch,
                max_prefill_batch=config.max_prefill_batch,
                max_prefill_tokens=config.max_prefill_tokens,
                block_size=config.block_size,
                num_blocks=config.num_blocks,
                prefill_chunk=config.prefill_chunk if config.chunked_prefill else None,
            ),
            on_preempt=lambda _: self.metrics.record_preemption(),
            on_share=self.metrics.record_shared_prefix,
        )
        self._loop = EngineLoop(
            self._executor,
            scheduler,
            SloController(config.controller, self.ladder, clock, self.latency),
            self.metrics,
            lambda handle: TokenStream(handle, tokenizer, self.eos_token_ids),
            clock,
            config.max_queue,
            make_grammar=None if self.structured is None else self.structured.matcher,
        )
        self._ids = itertools.count()
        self._thread = threading.Thread(target=self._loop.run, name="brownout-engine", daemon=True)
        self._thread.start()
        if channel is not None:  # a follower lost kills this engine, even mid-step
            channel.watch(self._loop.fail, self._loop.reading_for)

    @classmethod
    def from_checkpoint(
        cls,
        model_dir,
        united_dir=None,
        config: EngineConfig = EngineConfig(),  # noqa: B008 (frozen)
        dtype: str = "auto",
        progress: bool = True,
        channel: PlanChannel | None = None,
    ) -> Engine:
        """Loads a checkpoint (and united experts) and builds its engine. Compiling needs only
        the parameters' shapes, which the configs and manifests give: on one device the step
        grid compiles on its own thread while the weights load."""
        from brownout_jax.checkpoints import load_model
        from brownout_jax.checkpoints.loader import abstract_model_params

        compiling = None
        if config.mesh is None:
            shapes = abstract_model_params(model_dir, dtype, united_dir)
            model_config = ModelConfig.from_pretrained_dir(model_dir)
            resolved = config.for_model(model_config.max_position_embeddings, model_config.head_dim)
            grid = make_grid(shapes, model_config, resolved, ladder_for(shapes, resolved))
            compiling = _CompileThread(grid, resolved.compile_in_background, progress)
        try:
            model = load_model(
                model_dir,
                dtype,
                progress=progress,
                united=united_dir,
                pack_experts=config.mesh is None,
            )
        except BaseException:
            if compiling is not None:  # no point compiling for weights that did not load
                compiling.grid.cancel()
                compiling.join()
            raise
        if compiling is not None:
            compiling.join()
        config = with_stored_quality(config, model.united_manifest)
        return cls(
            model.params,
            model.config,
            config,
            model.tokenizer,
            model.eos_token_ids,
            model_name=str(model.directory.name),
            progress=progress,
            grid=None if compiling is None else compiling.result(),
            channel=channel,
        )

    # ------------------------------------------------------------------------- properties

    @property
    def compile_seconds(self) -> float:
        return self._executor.grid.compile_seconds

    @property
    def compiled_steps(self) -> int:
        return self._executor.grid.count

    @property
    def steps_compiling(self) -> int:
        """Executables of the step grid still compiling in the background."""
        return self._executor.grid.pending

    @property
    def max_model_len(self) -> int:
        """Prompt + generated tokens one request may use (see EngineConfig.for_model)."""
        return self.config.max_model_len

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self._loop.error is None

    @property
    def failure(self) -> BaseException | None:
        """What killed the engine loop (None while it lives or after a clean stop)."""
        return self._loop.error

    @property
    def controller(self) -> SloController:
        return self._loop.controller

    @property
    def num_waiting(self) -> int:
        """Requests not yet admitted: queued in the scheduler and not yet handed to it."""
        return self._loop.scheduler.num_waiting + self._loop.incoming.qsize()

    # ------------------------------------------------------------------------- any thread

    def submit(
        self, request: GenerationRequest, share_prefix_with: RequestHandle | None = None
    ) -> RequestHandle:
        """Validates and queues a request. Raises RequestError (bad field),
        EngineOverloadedError (queue full), EngineClosedError (draining), EngineDeadError.
        ``share_prefix_with``: another sample of the same prompt (n / best_of), submitted
        before this one; this one shares its full prompt blocks of KV where it can."""
        self._raise_if_dead()
        if self._loop.closing:
            raise EngineClosedError("the engine is shutting down and takes no new requests")
        if request.prompt is not None and not request.prompt_token_ids:
            if self.tokenizer is None:
                raise RequestError("prompt", "this model has no tokenizer; send prompt_token_ids")
            if not request.prompt:
                raise RequestError("prompt", "empty prompt")
            check_prompt_text(
                "prompt", len(request.prompt), self.longest_token, self.config.max_model_len
            )
            ids = tuple(self.tokenizer.encode(request.prompt, add_special_tokens=False))
            request = dataclasses.replace(request, prompt_token_ids=ids, prompt=None)
        if request.stop and self.tokenizer is None:
            raise RequestError("stop", "stop strings need a tokenizer; use stop_token_ids")
        validate_request(request, self.model_config.vocab_size, self.config.max_model_len)
        if request.structured is not None:
            if self.structured is None:
                raise RequestError(
                    "structured",
                    "this server runs without structured output (--no-structured-output)",
                )
            self.structured.compile(request.structured)  # a refused spec: RequestError
        request_id = request.request_id or f"req-{next(self._ids)}"
        handle = RequestHandle(request_id, request, self)
        handle.share_prefix_with = share_prefix_with
        handle.metrics.arrival = self.clock()
        handle.metrics.prompt_tokens = len(request.prompt_token_ids)
        # The bound covers every request not yet admitted (new and queued alike).
        full = f"{self.config.max_queue} requests already wait for admission"
        if self.num_waiting >= self.config.max_queue:
            raise EngineOverloadedError(full)
        try:
            self._loop.incoming.put_nowait(handle)
        except queue.Full:
            raise EngineOverloadedError(full) from None
        self._loop.wake.set()
        return handle

    def on_failure(self, listener) -> None:
        """``listener(cause)`` is called on the engine thread if the loop dies, before its
        requests are failed (the server turns health NOT_SERVING with it). A step that fails
        on the device is not a death: its requests fail, the engine serves on."""
        self._loop.on_fatal = listener

    def cancel(self, handle: RequestHandle) -> None:
        self._loop.cancels.put(handle)
        self._loop.wake.set()

    def set_controller(self, config: ControllerConfig) -> None:
        """Replaces the brownout controller (mode, SLOs, window) with a fresh one over the
        same ladder; safe at any time (every level is compiled), meant for idle moments such
        as between evaluation runs."""
        controller = SloController(config, self.ladder, self.clock, self.latency)
        with self._loop.lock:
            self._loop.controller = controller

    def stats(self) -> EngineStats:
        scheduler, grid = self._loop.scheduler, self._executor.grid
        occupancy = Occupancy(
            running=scheduler.num_running,
            waiting=self.num_waiting,
            kv_blocks_used=scheduler.allocator.used,
            kv_blocks_total=self.config.num_blocks - 1,
        )
        compiling = GridStatus(grid.compile_seconds, grid.count, grid.pending)
        with self._loop.lock:
            stats = self.metrics.snapshot(
                occupancy, self._loop.controller, compiling, self.latency.table()
            )
        return dataclasses.replace(stats, dense_paths=self.dense_paths)

    def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stops taking requests; with ``drain`` finishes those accepted, else cancels them."""
        self._loop.closing = True
        self._loop.drain = drain
        self._loop.wake.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"engine did not stop within {timeout}s")
        self._raise_if_dead()

    def _raise_if_dead(self) -> None:
        error = self._loop.error
        if error is not None:
            raise EngineDeadError(f"the engine loop died: {error!r}") from error


class _CompileThread(threading.Thread):
    """``StepGrid.compile`` on its own thread; ``result`` re-raises its failure."""

    def __init__(self, grid: StepGrid, background: bool, progress: bool):
        super().__init__(name="brownout-compile-start", daemon=True)
        self.grid, self.background, self.progress = grid, background, progress
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            self.grid.compile(background=self.background, progress=self.progress)
        except BaseException as err:  # handed to the thread that waits for the grid
            self.error = err

    def result(self) -> StepGrid:
        if self.error is not None:
            raise self.error
        return self.grid
