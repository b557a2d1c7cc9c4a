"""The engine thread's host path (scheduler → executor → streams) against a fake executor
whose "model" is a pure function of each sequence's context: nothing is lost or duplicated,
preemption recomputes exactly, cancellation and failures end every request once, and a step
that fails on the device fails its own requests only. No JAX."""

from __future__ import annotations

import dataclasses
import threading
import time

import numpy as np
import pytest
from prometheus_client import generate_latest

from brownout_jax.engine.buckets import EngineBuckets
from brownout_jax.engine.controller import ControllerConfig, SloController
from brownout_jax.engine.loop import EngineLoop
from brownout_jax.engine.metrics import EngineMetrics, GridStatus, Occupancy
from brownout_jax.engine.phase import Phase, Thresholds
from brownout_jax.engine.requests import (
    FinishReason,
    GenerationRequest,
    RequestHandle,
    StepFailedError,
    StepFailureKind,
)
from brownout_jax.engine.scheduler import Scheduler, SchedulerLimits
from brownout_jax.engine.stream import TokenStream
from brownout_jax.moe.ladder import ThresholdLadder

VOCAB = 97
BUCKETS = EngineBuckets((1, 2, 4), (16, 32, 64), (2, 4, 8), (1, 2, 4, 8), block_size=8)


def next_token(context: list[int]) -> int:
    return (sum(t * (i + 1) for i, t in enumerate(context)) + len(context)) % VOCAB


def expected(prompt: list[int], n: int) -> list[int]:
    out = list(prompt)
    for _ in range(n):
        out.append(next_token(out))
    return out[len(prompt) :]


@dataclasses.dataclass(frozen=True)
class FakeInFlight:
    plan: object
    tokens: np.ndarray
    dispatched_at: float
    thresholds: Thresholds
    predicted: tuple[float, float] | None = None
    decision_s: float = 0.0


@dataclasses.dataclass(frozen=True)
class FakeResult:
    tokens: np.ndarray
    logprobs: np.ndarray
    device_load: None = None


class FakeGrid:
    error = None
    pending = 0  # executables still compiling


class FakeExecutor:
    """Computes at dispatch, like a device; checks that every decode row's position matches
    the context its slot holds (the KV cache of the fake). ``step_failures``: (``"dispatch"``
    or ``"read"``, its count from 1) → whether that step's device error loses the state (its
    contexts: a sequence decoding on without recomputing would fail the position check)."""

    grid = FakeGrid()

    def __init__(
        self,
        fail_after: int | None = None,
        step_failures: dict[tuple[str, int], bool] | None = None,
    ):
        self.contexts: dict[int, list[int]] = {}
        self.dispatches = 0
        self.reads = 0
        self.fail_after = fail_after
        self.step_failures = dict(step_failures or {})
        self.state_lost = False

    def _maybe_fail(self, where: str, count: int) -> None:
        lost = self.step_failures.get((where, count))
        if lost is not None:
            self.state_lost = lost
            raise StepFailedError("INTERNAL: Out of memory while trying to allocate 1.5GiB\nmore")

    def recover_state(self) -> bool:
        lost, self.state_lost = self.state_lost, False
        if lost:
            self.contexts.clear()
        return lost

    def warm_up(self) -> int:
        return 0

    def serving_level(self, phase: Phase, wanted: float) -> float:
        return wanted

    def usable_buckets(self, phase: Phase, level: float):
        return BUCKETS.grid(phase)

    def dispatch(self, plan, thresholds: Thresholds, now: float) -> FakeInFlight:
        self.dispatches += 1
        if self.fail_after is not None and self.dispatches > self.fail_after:
            raise RuntimeError("device lost")
        self._maybe_fail("dispatch", self.dispatches)
        tokens = np.zeros(plan.bucket.batch, np.int32)
        for i, row in enumerate(plan.rows):
            if plan.phase == Phase.PREFILL:
                self.contexts[row.slot] = list(row.tokens)
            else:
                context = self.contexts[row.slot]
                assert len(context) == row.position + 1, "decode position off its context"
            tokens[i] = next_token(self.contexts[row.slot])
            self.contexts[row.slot].append(int(tokens[i]))
        return FakeInFlight(plan, tokens, now, thresholds)

    def read(self, step: FakeInFlight) -> FakeResult:
        self.reads += 1
        self._maybe_fail("read", self.reads)
        return FakeResult(step.tokens, np.full(len(step.tokens), -0.5, np.float32))

    def close(self) -> None:
        pass


def _loop(
    executor: FakeExecutor, num_blocks: int = 17, max_batch: int = 4, tokenizer=None
) -> EngineLoop:
    metrics = EngineMetrics()
    scheduler = Scheduler(
        SchedulerLimits(max_batch, 4, 256, 8, num_blocks),
        on_preempt=lambda _: metrics.record_preemption(),
    )
    controller = SloController(ControllerConfig(mode="off"), ThresholdLadder((1.0,)))
    return EngineLoop(
        executor,
        scheduler,
        controller,
        metrics,
        lambda handle: TokenStream(handle, tokenizer, frozenset({0})),
    )


def _submit(loop: EngineLoop, prompt, n, name, **fields) -> RequestHandle:
    request = GenerationRequest(prompt_token_ids=tuple(prompt), max_new_tokens=n, **fields)
    handle = RequestHandle(name, request, None)
    loop.incoming.put(handle)
    return handle


def _run_until_drained(loop: EngineLoop) -> None:
    loop.closing = True
    thread = threading.Thread(target=loop.run)
    thread.start()
    thread.join(60)
    assert not thread.is_alive()


def test_a_burst_with_preemption_loses_and_duplicates_nothing():
    rng = np.random.default_rng(0)
    loop = _loop(FakeExecutor(), num_blocks=9)  # 8 usable blocks: the burst must preempt
    jobs = [
        (rng.integers(1, VOCAB, int(rng.integers(2, 20))).tolist(), int(rng.integers(4, 24)))
        for _ in range(30)
    ]
    handles = [_submit(loop, p, n, f"r{i}", ignore_eos=True) for i, (p, n) in enumerate(jobs)]
    _run_until_drained(loop)
    assert loop.metrics.preemptions > 0
    for handle, (prompt, n) in zip(handles, jobs, strict=True):
        events = handle.ready_events()
        assert [e.finish_reason is None for e in events] == [True] * (n - 1) + [False]
        assert events[-1].finish_reason == FinishReason.LENGTH  # with the last token
        assert [e.token_id for e in events] == expected(prompt, n)
    assert loop.scheduler.allocator.used == 0 and loop.scheduler.idle


def test_eos_stops_and_finished_rows_in_flight_are_dropped():
    prompt = [5, 7]
    tokens = expected(prompt, 40)
    stop_at = tokens.index(0) + 1 if 0 in tokens else None
    loop = _loop(FakeExecutor())
    handle = _submit(loop, prompt, 40, "eos")
    _run_until_drained(loop)
    events = handle.ready_events()
    got = [e.token_id for e in events]
    if stop_at is None:
        assert got == tokens and events[-1].finish_reason == FinishReason.LENGTH
    else:
        assert got == tokens[:stop_at] and events[-1].finish_reason == FinishReason.STOP


def test_cancel_ends_a_request_once_and_frees_its_blocks():
    loop = _loop(FakeExecutor())
    handle = _submit(loop, [1, 2, 3], 50, "cancelled", ignore_eos=True)
    loop._take_new_requests()
    for _ in range(3):  # prefill, decode, decode
        loop._in_flight, previous = loop._dispatch(), loop._in_flight
        if previous is not None:
            loop._process(previous)
    loop.cancels.put(handle)
    _run_until_drained(loop)
    events = handle.ready_events()
    assert [e.finish_reason for e in events].count(FinishReason.CANCELLED) == 1
    assert events[-1].finish_reason == FinishReason.CANCELLED
    assert loop.scheduler.allocator.used == 0


def test_a_failing_executor_ends_every_open_request_with_the_cause():
    loop = _loop(FakeExecutor(fail_after=3))
    handles = [_submit(loop, [i + 1, 2], 20, f"f{i}", ignore_eos=True) for i in range(6)]
    _run_until_drained(loop)
    assert isinstance(loop.error, RuntimeError)
    for handle in handles:
        last = handle.ready_events()[-1]
        assert last.finish_reason == FinishReason.ERROR and "device lost" in last.error


def test_steps_are_recorded_per_phase_with_their_thresholds():
    loop = _loop(FakeExecutor())
    _submit(loop, [3, 4], 5, "one", ignore_eos=True)
    _run_until_drained(loop)
    phases = [record.phase for record in loop.metrics.step_log]
    assert phases[0] == Phase.PREFILL and set(phases[1:]) == {Phase.DECODE}
    assert len(phases) == 5  # one prefill, four decodes
    assert {(r.prefill_threshold, r.decode_threshold) for r in loop.metrics.step_log} == {
        (1.0, 1.0)
    }


@pytest.mark.parametrize("lost", [False, True], ids=["state-kept", "state-lost"])
@pytest.mark.parametrize("where", ["dispatch", "read"])
def test_a_failed_step_fails_its_own_requests_and_the_engine_serves_on(where, lost):
    """Step 3 is the prefill of r4 and r5 (step 1 prefilled r0-r3, step 2 decoded them). Its
    failure ends r4 and r5 with a marked error; r0-r3 finish exactly, recomputed when the
    state (their KV) was lost; r6, submitted after the failure, is served exactly."""
    loop = _loop(FakeExecutor(step_failures={(where, 3): lost}), max_batch=8)
    jobs = [([i + 1, 2, 3], 12) for i in range(6)]
    handles = [_submit(loop, p, n, f"r{i}", ignore_eos=True) for i, (p, n) in enumerate(jobs)]
    events = {h: [] for h in handles}
    thread = threading.Thread(target=loop.run)
    thread.start()
    for handle in handles:
        events[handle].extend(handle.events(timeout=30))
    late = _submit(loop, [9, 8, 7], 10, "r6", ignore_eos=True)
    loop.wake.set()
    _run_until_drained_thread(loop, thread)
    assert loop.error is None
    for i, handle in enumerate(handles):
        got = events[handle]
        prompt, n = jobs[i]
        if i >= 4:
            last = got[-1]
            assert last.finish_reason == FinishReason.ERROR and last.token_id is None
            assert last.step_failure == StepFailureKind.OUT_OF_MEMORY
            assert "prefill step" in last.error and "Out of memory" in last.error
            assert "more" not in last.error  # the first line only: the log has the rest
            assert [e.finish_reason for e in got].count(FinishReason.ERROR) == 1
        else:
            assert [e.token_id for e in got] == expected(prompt, n)
            assert got[-1].finish_reason == FinishReason.LENGTH
    assert [e.token_id for e in late.ready_events()] == expected([9, 8, 7], 10)
    assert loop.metrics.preemptions == (4 if lost else 0)  # recomputed, not failed
    assert loop.scheduler.allocator.used == 0 and loop.scheduler.idle


def _run_until_drained_thread(loop: EngineLoop, thread: threading.Thread) -> None:
    loop.closing = True
    loop.wake.set()
    thread.join(60)
    assert not thread.is_alive()


def test_a_state_that_cannot_be_rebuilt_stops_the_engine_after_telling_health():
    executor = FakeExecutor(step_failures={("dispatch", 2): True})

    def no_memory_left() -> bool:
        raise RuntimeError("RESOURCE_EXHAUSTED: cannot allocate the KV pool again")

    executor.recover_state = no_memory_left
    loop = _loop(executor)
    handles = [_submit(loop, [i + 1, 2], 20, f"f{i}", ignore_eos=True) for i in range(3)]
    told = []
    loop.on_fatal = lambda err: told.append((err, [h.done for h in handles]))
    _run_until_drained(loop)
    assert isinstance(loop.error, RuntimeError)
    ((cause, done_then),) = told
    assert cause is loop.error and done_then == [False] * 3  # told before any request
    for handle in handles:
        last = handle.ready_events()[-1]
        assert last.finish_reason == FinishReason.ERROR and last.step_failure is None
        assert "cannot allocate the KV pool" in last.error


class RecordingExecutor(FakeExecutor):
    """``device_s``: each read waits this long, as for a device still running the step."""

    def __init__(self, device_s: float = 0.0):
        super().__init__()
        self.levels: list[tuple[Phase, float]] = []
        self.plans: list[tuple[Phase, int]] = []  # (phase, rows) of each step
        self.device_s = device_s

    def dispatch(self, plan, thresholds: Thresholds, now: float) -> FakeInFlight:
        self.levels.append((plan.phase, thresholds.of(plan.phase)))
        self.plans.append((plan.phase, len(plan.rows)))
        return super().dispatch(plan, thresholds, now)

    def read(self, step: FakeInFlight) -> FakeResult:
        time.sleep(self.device_s)
        return super().read(step)


def _predicted_table(ladder: ThresholdLadder, decode_ms: dict[float, float]):
    from brownout_jax.engine.latency_model import LatencyModel

    latency = LatencyModel(alpha=0.5)
    for level in ladder.levels:
        for bucket in BUCKETS.grid(Phase.DECODE):
            latency.set_base(Phase.DECODE, level, bucket, [decode_ms[level] / 1e3])
        for bucket in BUCKETS.grid(Phase.PREFILL):
            latency.set_base(Phase.PREFILL, level, bucket, [0.001])
    return latency


def test_auto_runs_each_step_at_the_level_the_latency_model_predicts_fits():
    """Decode at level 1 is predicted at 300 ms against a 120-ms SLO, 0.5 at 50 ms (also with
    the 50-ms step before it still in flight): the first decode step already runs at 0.5.
    The fake's device takes 2 ms a step, so the online correction then learns that level 1
    fits, and the level climbs back (after the hysteresis)."""
    ladder = ThresholdLadder((0.0, 0.5, 1.0))
    latency = _predicted_table(ladder, {1.0: 300.0, 0.5: 50.0, 0.0: 40.0})
    controller = SloController(
        ControllerConfig(slo_ttft_s=1.0, slo_tpot_s=0.12), ladder, latency=latency
    )
    executor = RecordingExecutor(device_s=0.002)
    loop = _loop(executor)
    loop.controller = controller
    prompt, n = [3, 1, 4, 1, 5], 30
    handle = _submit(loop, prompt, n, "auto", ignore_eos=True)
    _run_until_drained(loop)
    events = handle.ready_events()
    assert [e.token_id for e in events] == expected(prompt, n)
    assert handle.metrics.thresholds_used == {e.thresholds for e in events}
    assert len(handle.metrics.thresholds_used) > 1
    decode_levels = [level for phase, level in executor.levels if phase == Phase.DECODE]
    assert decode_levels[0] == 0.5
    assert decode_levels[-1] == 1.0 and 0.0 not in decode_levels
    # Learned online: level 1's prediction fell below the SLO for the bucket it ran.
    bucket = BUCKETS.grid(Phase.DECODE)[0]
    assert latency.predict(Phase.DECODE, 1.0, bucket) < 0.1
    assert loop.metrics.step_log[-1].decode_threshold == 1.0
    # The trace: each step's measured execution and what was predicted at its dispatch.
    decode = [r for r in loop.metrics.step_log if r.phase == Phase.DECODE]
    assert decode[0].predicted_p90_s >= decode[0].predicted_s >= 0.05
    assert all(r.execution_s is None or r.execution_s >= 0.002 for r in decode)


def test_steps_read_without_waiting_for_the_device_do_not_teach_the_latency_model():
    """Reads that never wait (the host behind a device that finished long ago: millisecond
    steps) say nothing of a step's execution — the time between two reads is the host's.
    The table stays as timed; and still every step of the trace has its prediction."""
    ladder = ThresholdLadder((0.0, 0.5, 1.0))
    latency = _predicted_table(ladder, {1.0: 30.0, 0.5: 20.0, 0.0: 10.0})
    before = {(e.phase, e.level, e.bucket): e.predicted_s for e in latency.table()}
    loop = _loop(RecordingExecutor(device_s=0.0))
    loop.controller = SloController(ControllerConfig(slo_tpot_s=1.0), ladder, latency=latency)
    _submit(loop, [3, 1, 4], 20, "quick", ignore_eos=True)
    _run_until_drained(loop)
    after = {(e.phase, e.level, e.bucket): e.predicted_s for e in latency.table()}
    # Taught by every step, the correction would have fallen to the fake's microseconds
    # (0.7 of itself a step); a rare read slowed by the OS may still count as a wait.
    assert all(after[key] > 0.3 * before[key] for key in before)
    assert sum(r.execution_s is None for r in loop.metrics.step_log) >= 15
    assert all(r.predicted_s for r in loop.metrics.step_log)


class LetterTokenizer:
    """One letter per id; counts its decodes."""

    def __init__(self):
        self.decodes = 0

    def decode(self, ids, skip_special_tokens=False):
        self.decodes += 1
        return "".join(chr(97 + i % 26) for i in ids)


def test_token_ids_only_requests_decode_only_for_stop_strings():
    """detokenize=False: no text in the events; without stop strings nothing is decoded at
    all, with them the request stops on the same token as one that reads the text."""
    prompt, n = [2, 9, 4], 24
    tokens = expected(prompt, n)
    whole = LetterTokenizer().decode(tokens)
    stop = whole[10:12]
    cut = whole.index(stop)  # one letter per token: the stop ends with token cut + 1
    tokenizer = LetterTokenizer()
    loop = _loop(FakeExecutor(), tokenizer=tokenizer)
    handles = {
        (text, stops): _submit(
            loop, prompt, n, f"{text}-{stops}", ignore_eos=True, detokenize=text, stop=stops
        )
        for text in (True, False)
        for stops in ((), (stop,))
    }
    loop._take_new_requests()
    streams = {key: loop._by_handle[handle].stream for key, handle in handles.items()}
    assert streams[(False, ())].text is None and streams[(False, (stop,))].text is not None
    _run_until_drained(loop)
    for (text, stops), handle in handles.items():
        events = handle.ready_events()
        assert [e.token_id for e in events] == (tokens[: cut + 2] if stops else tokens)
        assert events[-1].finish_reason == (FinishReason.STOP if stops else FinishReason.LENGTH)
        wanted = (whole[:cut] if stops else whole) if text else ""
        assert "".join(e.text for e in events) == wanted


def test_host_time_per_step_leaves_out_the_wait_for_the_device(monkeypatch):
    """A fake clock: each dispatch takes 0.25 s of host time, each read 4 s of waiting on
    the device, nothing else takes any. An iteration that warmed up executables (device
    work) is not counted."""
    now = [0.0]
    monkeypatch.setattr(time, "perf_counter", lambda: now[0])

    class Compiling(FakeGrid):
        pending = 1  # warm-up is called every iteration

    class Timed(FakeExecutor):
        grid = Compiling()
        warm_ups = 0

        def warm_up(self) -> int:
            self.warm_ups += 1
            return int(self.warm_ups == 3)  # the iteration of the second decode dispatch

        def dispatch(self, plan, thresholds, at):
            now[0] += 0.25
            return super().dispatch(plan, thresholds, at)

        def read(self, step):
            now[0] += 4.0
            return super().read(step)

    loop = _loop(Timed())
    _submit(loop, [3, 4], 5, "one", ignore_eos=True)  # one prefill, four decode steps
    _run_until_drained(loop)
    metrics = loop.metrics
    assert list(metrics.host_steps[Phase.PREFILL]) == [0.25]
    # Three decode dispatches counted (one was in the warm-up iteration), then the last
    # iteration, which only handed out the last token.
    assert list(metrics.host_steps[Phase.DECODE]) == [0.25, 0.25, 0.25, 0.0]
    stats = metrics.snapshot(Occupancy(0, 0, 0, 0), loop.controller, GridStatus(0.0, 0, 0))
    assert stats.host_step_p50_s == {"prefill": 0.25, "decode": 0.25}
    assert stats.host_step_p90_s == {"prefill": 0.25, "decode": 0.25}
    exported = generate_latest(metrics.registry).decode()
    assert 'brownout_host_step_seconds_count{phase="decode"} 4.0' in exported
    assert 'brownout_host_step_seconds_sum{phase="decode"} 0.75' in exported
    assert 'brownout_host_step_seconds_bucket{le="0.0001",phase="decode"} 1.0' in exported


def test_warm_up_is_left_alone_once_the_grid_is_complete():
    """While executables compile, every iteration puts those that arrived to use; once none
    is left to compile, one more call takes the last of them and the loop stops asking."""

    class Grid(FakeGrid):
        pending = 2

    class Counting(FakeExecutor):
        grid = Grid()
        calls = 0

        def warm_up(self) -> int:
            self.calls += 1
            if self.calls == 3:
                self.grid.pending = 0  # the last executables arrived
            return 0

    executor = Counting()
    loop = _loop(executor)
    handle = _submit(loop, [3, 4], 8, "one", ignore_eos=True)
    _run_until_drained(loop)
    assert [e.token_id for e in handle.ready_events()] == expected([3, 4], 8)
    assert executor.calls == 4  # the call that saw pending 0 was the last


@pytest.mark.parametrize("paced", [True, False])
def test_a_burst_of_prompts_is_prefilled_one_per_step_while_sequences_decode(paced):
    """Prefill steps of more than one prompt are predicted too long for the decode step after
    them to keep its 120-ms SLO (a 2-row step 150 ms); one prompt 10 ms. Paced, the burst
    arriving while a sequence decodes goes in one prompt per step; not paced, together."""
    from brownout_jax.engine.predictive import PredictiveConfig

    ladder = ThresholdLadder((0.0, 1.0))
    latency = _predicted_table(ladder, {1.0: 10.0, 0.0: 10.0})
    for level in ladder.levels:
        for bucket in BUCKETS.grid(Phase.PREFILL):
            seconds = 0.01 if bucket.batch == 1 else 0.15
            latency.set_base(Phase.PREFILL, level, bucket, [seconds])
    config = ControllerConfig(
        slo_ttft_s=10.0, slo_tpot_s=0.12, predictive=PredictiveConfig(pace_prefill=paced)
    )
    executor = RecordingExecutor()
    loop = _loop(executor)
    loop.controller = SloController(config, ladder, latency=latency)
    first = _submit(loop, [1, 2, 3], 12, "first", ignore_eos=True)
    original = executor.dispatch

    def dispatch(plan, thresholds, now):
        if plan.phase == Phase.DECODE and executor.plans.count((Phase.DECODE, 1)) == 2:
            for i in range(3):  # a burst while the first sequence decodes
                burst.append(_submit(loop, [4 + i, 5, 6], 4, f"burst{i}", ignore_eos=True))
        return original(plan, thresholds, now)

    burst: list[RequestHandle] = []
    executor.dispatch = dispatch
    _run_until_drained(loop)
    for handle in (first, *burst):
        assert handle.ready_events()[-1].finish_reason == FinishReason.LENGTH
    prefill_rows = [rows for phase, rows in executor.plans if phase == Phase.PREFILL]
    assert len(burst) == 3 and sum(prefill_rows) == 4
    assert (max(prefill_rows) == 1) is paced


def test_a_decode_steps_latency_is_the_gap_its_sequences_see_between_tokens():
    """Reads overlap the next step's dispatch, so dispatch → read would count the step before
    a decode step twice. A decode step's latency is the gap since its rows' previous tokens:
    since the read before it behind a decode step, and behind another request's prefill step
    since the read before that one — the stall that request's prompt caused."""
    executor = RecordingExecutor()
    loop = _loop(executor)
    original = executor.dispatch
    later: list[RequestHandle] = []

    def dispatch(plan, thresholds, now):
        if plan.phase == Phase.DECODE and executor.plans.count((Phase.DECODE, 1)) == 3:
            later.append(_submit(loop, [7, 8, 9], 3, "later", ignore_eos=True))
        return original(plan, thresholds, now)

    executor.dispatch = dispatch
    _submit(loop, [1, 2, 3], 10, "first", ignore_eos=True)
    _run_until_drained(loop)
    log = list(loop.metrics.step_log)
    phases = [r.phase for r in log]
    assert phases.count(Phase.PREFILL) == 2 and later
    stalled = 0
    for i, record in enumerate(log):
        if record.phase != Phase.DECODE:
            continue
        if i == 1 or log[i - 1].phase == Phase.DECODE:  # (1: its first token, prefilled)
            assert record.latency_s == pytest.approx(record.time - log[i - 1].time)
        else:  # behind the later request's prefill: since the decode step before it
            assert log[i - 2].phase == Phase.DECODE
            assert record.latency_s == pytest.approx(record.time - log[i - 2].time)
            stalled += 1
    assert stalled == 1
