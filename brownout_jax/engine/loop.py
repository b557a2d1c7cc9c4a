"""The engine thread: one step per iteration, the previous step read while the next runs.

Each iteration drains new requests and cancellations, lets the controller adjust the brownout
thresholds, asks the scheduler for the next step, has the executor dispatch it, and only then
reads the *previous* step's sampled tokens — the one host sync per step overlaps with the
device computing the next. Tokens go to each request's stream (detokenize, stop checks,
events); step latencies to the controller and the metrics. The thread's own time per step,
all of an iteration but the wait for the device (``executor.read``), is measured too: host
work the device step competes with on a small machine. Nothing accepted is lost: every
request ends with exactly one finishing event, also when the loop dies (fail fast: every open
request learns why). A device error in one step (``StepFailedError``, e.g. XLA out of memory)
fails that step's requests only, and the engine serves on (``_step_failed``); across processes
any failed step is fatal (``ProcessGroupError``), and so is a peer found dead while the loop
waits on the device (``fail``, from the watching thread). No JAX here: the device is the
executor's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import queue
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from brownout_jax.engine.controller import SloController
from brownout_jax.engine.metrics import EngineMetrics
from brownout_jax.engine.phase import Phase, Thresholds
from brownout_jax.engine.requests import (
    FinishReason,
    RequestHandle,
    StepFailedError,
    StructuredOutput,
    TokenEvent,
)
from brownout_jax.engine.scheduler import (
    Scheduler,
    Sequence,
    StepPlan,
    TokenMaskSource,
)
from brownout_jax.engine.step_view import (
    last_token_time,
    lead_s,
    paced_prefill_buckets,
    predicted_latency,
    step_view,
)
from brownout_jax.engine.stream import TokenStream

if TYPE_CHECKING:  # the loop itself is host-only: tests drive it with a fake executor
    from brownout_jax.engine.executor import Executor, InFlight

# A read that took longer than this waited for the device (a finished step's tokens are
# copied in tens of microseconds; a Python hiccup adds a few more).
READ_BLOCKED_S = 5e-4


class EngineLoop:
    def __init__(
        self,
        executor: Executor,
        scheduler: Scheduler,
        controller: SloController,
        metrics: EngineMetrics,
        make_stream: Callable[[RequestHandle], TokenStream],
        clock: Callable[[], float] = time.monotonic,
        max_queue: int = 1024,
        make_grammar: Callable[[StructuredOutput], TokenMaskSource] | None = None,
    ):
        """``make_grammar``: a structured-output request's matcher (None: none served; the
        engine refuses such requests at submit)."""
        self.executor = executor
        self.scheduler = scheduler
        self.controller = controller  # replaced whole by Engine.set_controller
        self.metrics = metrics
        self.make_stream = make_stream
        self.make_grammar = make_grammar
        self.clock = clock
        self.incoming: queue.Queue[RequestHandle] = queue.Queue(maxsize=max_queue)
        self.cancels: queue.SimpleQueue[RequestHandle] = queue.SimpleQueue()
        self.lock = threading.Lock()  # the controller and metrics, shared with stats()
        self.wake = threading.Event()
        self.closing = False
        self.drain = True
        self.error: BaseException | None = None
        # Told the cause when the loop dies, before any request is: the server turns its
        # health NOT_SERVING first, so that no balancer sends more work to a dying engine.
        self.on_fatal: Callable[[BaseException], None] | None = None
        self._failing = threading.Lock()  # error, _reading and _requests_failed
        self._reading = False  # the engine thread waits on the device (executor.read)
        self._reading_since = 0.0
        self._requests_failed = False
        self._engine_thread: threading.Thread | None = None
        self._by_handle: dict[RequestHandle, Sequence] = {}
        self._in_flight: InFlight | None = None
        self._last_read = 0.0  # when the last step's tokens arrived (engine clock)
        self._last_read_blocked = False  # … and whether reading them waited for the device
        self._decision_s = 0.0  # host seconds mode auto spent deciding the step dispatched
        self._device_wait = 0.0  # this iteration's wait for the device (perf_counter seconds)
        self._unusual = False  # this iteration warmed up executables or lost a step
        # One object per distinct levels: streams tell a change of levels by identity.
        self._levels: dict[Thresholds, Thresholds] = {}
        # Once every executable of the grid is compiled and warmed up, what the executor can
        # run never changes again: no more warm-up calls (each costs about 0.1 ms even with
        # nothing to take), and the serving levels and usable buckets are kept.
        self._grid_complete = False
        self._serving: tuple[Thresholds | None, Thresholds | None] = (None, None)
        self._usable: dict[tuple[Phase, float], frozenset] = {}

    def run(self) -> None:
        self._engine_thread = threading.current_thread()
        try:
            while True:
                if self.error is not None:  # failed from another thread (``fail``)
                    raise self.error
                started = time.perf_counter()
                self._device_wait = 0.0
                self._unusual = False
                self._take_new_requests()
                self._take_cancellations()
                if self.closing and not self.drain:
                    self._cancel_all()
                idle = self.scheduler.idle and self._in_flight is None
                if self.closing and idle and self.incoming.empty():
                    return
                self._raise_compile_failure()
                self._warm_up()
                with self.lock:
                    self.controller.maybe_update()
                if self._in_flight is not None and self._in_flight.plan.constrained:
                    # A grammar's mask for a sequence's next token needs the token in
                    # flight: read it before planning (such steps lose the overlap of the
                    # host's work with the device's).
                    early, self._in_flight = self._in_flight, None
                    self._process(early)
                dispatched = self._dispatch()
                processed = self._in_flight
                if processed is not None and not self._process(processed):
                    dispatched = None  # it ran on the state the failed step lost: void
                self._in_flight = dispatched
                self.scheduler.requeue_preempted(None if dispatched is None else dispatched.plan)
                step = dispatched or processed
                if step is not None and not self._unusual:
                    host = time.perf_counter() - started - self._device_wait
                    with self.lock:
                        self.metrics.record_host_step(step.plan.phase, host)
                if dispatched is None and not self.scheduler.waiting:
                    self.wake.wait(timeout=0.05)
                    self.wake.clear()
        except BaseException as err:  # fail fast: every open request learns why
            self.fail(err)
        finally:
            self.executor.close()

    def fail(self, err: BaseException) -> None:
        """The engine is dead: health first, then every open request learns why (once).

        From another thread (a lost peer process, seen by the distributed watch) the requests
        are this thread's to touch: they are failed here only while the engine thread waits
        on the device (it cannot leave that wait without seeing the error, see ``_read``);
        otherwise the engine thread raises at its next check and fails them itself."""
        with self._failing:
            first = self.error is None
            if first:
                self.error = err
                if self.on_fatal is not None:
                    with contextlib.suppress(Exception):  # must not hide the cause
                        self.on_fatal(err)
            on_engine_thread = threading.current_thread() is self._engine_thread
            if self._requests_failed or not (on_engine_thread or self._reading):
                self.wake.set()
                return
            self._requests_failed = True
            reason = f"engine failure: {self.error!r}"
            for seq in list(self.scheduler.waiting) + self.scheduler.running:
                self._finish(seq, FinishReason.ERROR, error=reason)
            while not self.incoming.empty():
                handle = self.incoming.get_nowait()
                handle._push(TokenEvent(None, None, "", FinishReason.ERROR, reason))

    def reading_for(self) -> float | None:
        """Seconds the engine thread has waited on the device for a step (None: not now)."""
        return time.monotonic() - self._reading_since if self._reading else None

    def _read(self, step: InFlight):
        """The step's one sync, marked as a device wait for ``fail``."""
        with self._failing:
            if self.error is not None:
                raise self.error
            self._reading = True
            self._reading_since = time.monotonic()
        try:
            return self.executor.read(step)
        finally:
            with self._failing:
                self._reading = False
                if self.error is not None:
                    raise self.error

    def _raise_compile_failure(self) -> None:
        if self.executor.grid.error is not None:
            raise RuntimeError(
                f"compiling the step grid failed: {self.executor.grid.error}"
            ) from self.executor.grid.error

    def _warm_up(self) -> None:
        """Runs executables compiled in the background once (on the device), if any."""
        if self._grid_complete:
            return
        # Read before taking: with nothing left to compile, this call takes the last ones.
        complete = self.executor.grid.pending == 0
        try:
            self._unusual = self.executor.warm_up() > 0
        except StepFailedError as err:  # no request's step: at most the state is lost
            self._step_failed(None, err)
            return
        self._grid_complete = complete

    def _usable_buckets(self, phase: Phase, level: float):
        if not self._grid_complete:
            return self.executor.usable_buckets(phase, level)
        usable = self._usable.get((phase, level))
        if usable is None:
            usable = self._usable[(phase, level)] = self.executor.usable_buckets(phase, level)
        return usable

    def _take_new_requests(self) -> None:
        # Checked before taking, not by catching queue.Empty: this runs every step, and only
        # this thread takes from these queues.
        while not self.incoming.empty():
            handle = self.incoming.get_nowait()
            request = handle.request
            seq = Sequence(handle, self.make_stream(handle), list(request.prompt_token_ids))
            if request.structured is not None and self.make_grammar is not None:
                seq.grammar = self.make_grammar(request.structured)  # compiled at submit
            if handle.share_prefix_with is not None:  # None once that sample has left
                seq.shares_with = self._by_handle.get(handle.share_prefix_with)
            self._by_handle[handle] = seq
            self.scheduler.add(seq)

    def _take_cancellations(self) -> None:
        while not self.cancels.empty():
            handle = self.cancels.get_nowait()
            seq = self._by_handle.get(handle)
            if seq is not None and not seq.finished:
                self._finish(seq, FinishReason.CANCELLED)

    def _cancel_all(self) -> None:
        self._take_new_requests()
        for seq in list(self.scheduler.waiting) + self.scheduler.running:
            self._finish(seq, FinishReason.CANCELLED)

    def thresholds(self) -> Thresholds:
        """The levels steps run at now: the controller's, as far as they are compiled."""
        wanted = self.controller.thresholds
        if self._serving[0] is wanted:
            return self._serving[1]
        levels = Thresholds(
            *(self.executor.serving_level(phase, wanted.of(phase)) for phase in Phase)
        )
        levels = self._levels.setdefault(levels, levels)
        if self._grid_complete:  # the controller replaces its thresholds when they change
            self._serving = (wanted, levels)
        return levels

    def _dispatch(self) -> InFlight | None:
        levels = self.thresholds()
        executor = self.executor

        def usable(phase: Phase):
            buckets = self._usable_buckets(phase, levels.of(phase))
            if phase == Phase.PREFILL and self.controller.paces_prefill:
                return self._paced_prefill(buckets, levels)
            return buckets

        now = self.clock()
        self._decision_s = 0.0
        plan = self.scheduler.next_step(usable, now)
        if plan is None:
            return None
        lead = self._lead(plan, now)
        if self.controller.predictive:
            started = time.perf_counter()
            levels = self._choose_level(plan, levels, lead, now)
            self._decision_s += time.perf_counter() - started
        levels = self._levels.setdefault(levels, levels)
        predicted = predicted_latency(self.controller.latency, plan, levels.of(plan.phase), lead)
        try:
            step = executor.dispatch(plan, levels, self.clock())
        except StepFailedError as err:
            self._step_failed(plan, err)
            return None
        if predicted is None and not self._decision_s:
            return step
        return dataclasses.replace(step, predicted=predicted, decision_s=self._decision_s)

    def _lead(self, plan: StepPlan, now: float) -> float:
        in_flight = None if self._in_flight is None else self._in_flight.plan
        return lead_s(plan, in_flight, self._in_flight_rest(now), now)

    def _paced_prefill(self, buckets, levels: Thresholds):
        """Mode ``auto``: the prefill buckets that leave the decode step after it its SLO."""
        started = time.perf_counter()
        with self.lock:
            paced = paced_prefill_buckets(
                buckets,
                levels,
                self.scheduler,
                self._usable_buckets,
                self.controller.ladder.levels,
                self.controller.policy,
            )
        self._decision_s += time.perf_counter() - started
        return paced

    def _choose_level(
        self, plan: StepPlan, levels: Thresholds, lead: float, now: float
    ) -> Thresholds:
        """Mode ``auto``: the level of this step from the latency model (host state only)."""
        view, runnable, other_levels = step_view(
            plan,
            levels,
            lead,
            now,
            self.scheduler,
            self._usable_buckets,
            self.controller.ladder.levels,
        )
        with self.lock:
            level = self.controller.choose(view, runnable or [levels.of(plan.phase)], other_levels)
        return levels.with_level(plan.phase, level)

    def _in_flight_rest(self, now: float) -> float:
        """Predicted seconds the step on the device still runs: it started when the one
        before it was read (or at its dispatch, if later)."""
        step = self._in_flight
        if step is None:
            return 0.0
        phase = step.plan.phase
        predicted = self.controller.latency.predict(
            phase, step.thresholds.of(phase), step.plan.bucket
        )
        started = max(step.dispatched_at, self._last_read)
        return 0.0 if predicted is None else max(0.0, predicted - (now - started))

    def _process(self, step: InFlight) -> bool:
        """Hands the step's tokens to their streams. False when the step failed on the device
        and the engine state with it: the step dispatched after it ran on that state."""
        waiting = time.perf_counter()
        try:
            result = self._read(step)  # the step's one sync
        except StepFailedError as err:
            return not self._step_failed(step.plan, err)
        finally:
            self._device_wait = time.perf_counter() - waiting
        now = self.clock()
        latency = now - step.dispatched_at
        if step.plan.phase == Phase.DECODE:
            # What its sequences see: the longest gap since a row's previous token (which
            # the step in flight at its dispatch brought, or the one before a prefill step).
            latency = now - last_token_time(step.plan, step.dispatched_at)
        # Its execution: the device ran it once the step before was done (read). That holds
        # only when the read of the step before waited for the device: read late (the host
        # busy), this step had been running meanwhile and the difference understates it — on
        # a model of millisecond steps, down to nothing, which dragged the latency model's
        # correction down by its whole weight. So only such a pair teaches the model.
        blocked = self._device_wait > READ_BLOCKED_S
        execution = now - max(step.dispatched_at, self._last_read)
        timed = blocked and (self._last_read_blocked or step.dispatched_at >= self._last_read)
        self._last_read, self._last_read_blocked = now, blocked
        phase = step.plan.phase
        with self.lock:
            self.controller.record(phase, latency, now)
            if timed:
                self.controller.latency.observe(
                    phase, step.thresholds.of(phase), step.plan.bucket, execution
                )
            bucket = (step.plan.bucket.batch, step.plan.bucket.size)
            self.metrics.record_step(
                phase,
                latency,
                len(step.plan.rows),
                now,
                step.thresholds,
                execution if timed else None,
                step.predicted,
                bucket,
                step.decision_s,
            )
            if result.device_load is not None:
                self.metrics.record_device_load(
                    phase, step.thresholds.of(phase), result.device_load
                )
        thresholds = step.thresholds
        # Rows past the plan's sequences are the bucket's padding: zip stops before them.
        rows = zip(
            step.plan.sequences,
            step.plan.rows,
            result.tokens.tolist(),
            result.logprobs.tolist(),
            strict=False,
        )
        for i, (seq, row, token, logprob) in enumerate(rows):
            if seq.finished:
                continue  # finished or cancelled meanwhile
            if row.scores_prompt:
                seq.collect_prompt_scores(row, result.prompt_scores[i])
            if not row.samples:
                continue  # a chunk before its prompt's last
            top = ()
            if row.request.top_logprobs:
                k = row.request.top_logprobs
                top = tuple(
                    zip(
                        result.top_ids[i, :k].tolist(),
                        result.top_logprobs[i, :k].tolist(),
                        strict=True,
                    )
                )
            generated = seq.generated
            generated.append(token)
            grammar_ended = False
            if row.grammar is not None:
                if not row.grammar.accept(token):
                    # The step's mask allowed only what the matcher accepts: a refusal is a
                    # bug in the mask's path; this request must not go on unconstrained.
                    self._finish(seq, FinishReason.ERROR, error="the grammar refused a token")
                    continue
                grammar_ended = row.grammar.terminated
            prompt = None
            if row.scores_prompt:  # the first token: the prompt's scores go with it
                prompt = (None, *seq.prompt_scores)
            finish = seq.stream.token(
                generated, logprob, now, thresholds, top, prompt, grammar_ended
            )
            if finish is not None:
                self._finish(seq, finish, event_sent=True)
        return True

    def _step_failed(self, plan: StepPlan | None, err: StepFailedError) -> bool:
        """A step that failed on the device (``plan``; None: a warm-up run) fails its own
        requests, not the engine; returns whether the engine state was lost with it.

        The state (KV pool, last tokens) is donated to every step. Two cases:
        - it survived (the step failed before taking it, or only its read-back failed): the
          step's requests fail, every other request goes on as if nothing happened;
        - it was lost (taken by the failed step, or the output of a failed execution): the
          executor allocates a fresh one, the step's requests fail, and every other running
          sequence, whose KV lived in the lost pool, is preempted: recomputed from prompt +
          generated tokens like any preemption, so it loses nothing and gets no error. A step
          dispatched on the lost state is void (``_process`` returns False).
        No fresh state (``recover_state`` raises): the loop dies as on any other error."""
        self._unusual = True  # device work (a fresh state) in this iteration's host time
        lost = self.executor.recover_state()
        # The next step ran (if at all) from now on, not from the last read: its execution
        # must not include the failed one's or the recovery's.
        self._last_read, self._last_read_blocked = self.clock(), False
        with self.lock:
            self.metrics.record_step_failure(
                None if plan is None else plan.phase, err.kind, state_lost=lost
            )
        if plan is not None:
            reason = f"the {plan.phase} step running this request failed on the device: {err}"
            for seq in plan.sequences:
                if not seq.finished:
                    # Its own finishing event, marked: the fronts must not take the engine
                    # for dead (and turn health NOT_SERVING) when only this step failed.
                    seq.handle._push(
                        TokenEvent(
                            None, None, "", FinishReason.ERROR, reason, self.thresholds(), err.kind
                        )
                    )
                    self._finish(seq, FinishReason.ERROR, error=reason, event_sent=True)
        if lost:
            self.scheduler.drop_kv()
        return lost

    def _finish(
        self,
        seq: Sequence,
        reason: FinishReason,
        error: str | None = None,
        event_sent: bool = False,
    ) -> None:
        if seq.finished:
            return
        seq.finished = True
        seq.stream.close(reason, self.clock(), self.thresholds(), error, event_sent)
        self.scheduler.remove(seq)
        self._by_handle.pop(seq.handle, None)
        self.metrics.record_finish(seq.handle.metrics, reason)
