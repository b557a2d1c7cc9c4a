"""Engine metrics: a typed snapshot for ``Engine.stats()`` and Prometheus collectors.

Each engine owns its own ``CollectorRegistry`` (several engines, e.g. in tests, never collide);
the server publishes ``metrics.registry`` on its metrics port.
"""

from __future__ import annotations

import collections
import dataclasses

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from brownout_jax.engine.controller import SloController
from brownout_jax.engine.latency_model import LatencyEntry
from brownout_jax.engine.phase import Phase, Thresholds
from brownout_jax.engine.requests import FinishReason, RequestMetrics, StepFailureKind

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
# Host time per step: a fraction of a millisecond when lean, milliseconds when it is not.
_HOST_BUCKETS = (1e-4, 2e-4, 3e-4, 5e-4, 1e-3, 2e-3, 5e-3, 0.01, 0.05)
_HOST_WINDOW = 1024  # steps per phase behind the stats' median and P90


@dataclasses.dataclass(frozen=True, slots=True)
class StepRecord:
    time: float  # engine clock when the step's tokens were read
    phase: Phase
    # Prefill: dispatch → read; decode: the longest gap a row saw since its previous token
    # (``EngineLoop._process``).
    latency_s: float
    rows: int
    prefill_threshold: float
    decode_threshold: float
    # The per-step trace (``eval slo``): how long the device ran the step (from the read of
    # the step before; None where that read did not wait for the device), and what the latency
    # model predicted at its dispatch for its latency (its lead, ``step_view.lead_s``, + its
    # execution): mean and P90. None: no prediction.
    execution_s: float | None = None
    predicted_s: float | None = None
    predicted_p90_s: float | None = None
    # The bucket it was compiled for: prefill (rows, tokens per row), decode (rows, blocks).
    bucket: tuple[int, int] | None = None
    decision_s: float = 0.0  # host time mode auto took to choose its level (and pacing)


@dataclasses.dataclass(frozen=True, slots=True)
class DeviceLoadStats:
    """Expert-parallel load of the steps run in one phase at one brownout threshold, per MoE
    layer and step (a step's counts are summed over its MoE layers, then divided by their
    number). A step lasts as long as its busiest device, hence ``busiest_*``: the mean over
    steps of the largest device's count, and ``*_imbalance`` = busiest / mean over devices."""

    phase: Phase
    threshold: float
    steps: int
    tokens: tuple[float, ...]  # tokens received (with ≥ 1 assignment on that device)
    experts: tuple[float, ...]  # distinct experts computed (originals + united)
    busiest_tokens: float
    busiest_experts: float
    token_imbalance: float | None  # None when nothing was routed
    expert_imbalance: float | None


class _LoadAccumulator:
    """Running sums for one (phase, threshold): per device, and of the per-step maximum."""

    def __init__(self, num_devices: int):
        self.steps = 0
        self.sums = np.zeros((num_devices, 2), np.int64)  # (tokens, experts) per device
        self.max_sums = np.zeros(2, np.int64)

    def add(self, load: np.ndarray) -> None:
        self.steps += 1
        self.sums += load
        self.max_sums += load.max(axis=0)

    def stats(self, phase: Phase, threshold: float, num_layers: int) -> DeviceLoadStats:
        per = max(self.steps, 1) * max(num_layers, 1)
        means = self.sums / per
        busiest = self.max_sums / per
        average = means.mean(axis=0)
        ratio = [float(b / a) if a > 0 else None for b, a in zip(busiest, average, strict=True)]
        return DeviceLoadStats(
            phase=phase,
            threshold=threshold,
            steps=self.steps,
            tokens=tuple(float(v) for v in means[:, 0]),
            experts=tuple(float(v) for v in means[:, 1]),
            busiest_tokens=float(busiest[0]),
            busiest_experts=float(busiest[1]),
            token_imbalance=ratio[0],
            expert_imbalance=ratio[1],
        )


@dataclasses.dataclass(frozen=True, slots=True)
class Occupancy:
    running: int
    waiting: int
    kv_blocks_used: int
    kv_blocks_total: int


@dataclasses.dataclass(frozen=True, slots=True)
class GridStatus:
    compile_seconds: float
    compiled: int
    compiling: int


@dataclasses.dataclass(frozen=True, slots=True)
class EngineStats:
    running: int
    waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    prefill_threshold: float
    decode_threshold: float
    controller_mode: str
    slo_ttft_s: float
    slo_tpot_s: float
    prefill_p90_s: float | None  # step latency P90 over the controller's window
    decode_p90_s: float | None
    prefill_slo_attainment: float | None  # share of the window's steps within SLO
    decode_slo_attainment: float | None
    steps: dict[str, int]
    preemptions: int
    shared_prompt_tokens: int  # prompt tokens samples took from another's KV blocks (n > 1)
    finished: dict[str, int]
    controller_updates: int
    compile_seconds: float  # compiling the step grid (so far, while steps_compiling > 0)
    compiled_steps: int
    mean_ttft_s: float | None  # over the last finished requests
    mean_tpot_s: float | None
    # Expert parallelism only (empty on one device): per (phase, threshold) in use so far.
    device_load: tuple[DeviceLoadStats, ...] = ()
    steps_compiling: int = 0  # executables of the grid still compiling in the background
    # The predictive controller's table: each step's measured base and corrected prediction.
    latency: tuple[LatencyEntry, ...] = ()
    # Which matmul path each dense weight shape runs, by row count (model.packed_params).
    dense_paths: tuple = ()
    # The engine thread's time per step outside waiting on the device (loop top, dispatch,
    # handing out tokens), by the phase of the step it dispatched (or read, when it dispatched
    # none): median and P90 of the last steps.
    host_step_p50_s: dict[str, float] = dataclasses.field(default_factory=dict)
    host_step_p90_s: dict[str, float] = dataclasses.field(default_factory=dict)
    # Across processes (``distributed``): how many, the devices of each, and the median time
    # the leader spent sending a step's plan to the followers (None: one process).
    processes: int = 1
    local_devices: int = 1
    plan_broadcast_p50_s: float | None = None


class EngineMetrics:
    def __init__(
        self,
        recent: int = 256,
        num_devices: int = 0,
        num_moe_layers: int = 0,
        processes: int = 1,
        local_devices: int = 1,
    ):
        self.registry = CollectorRegistry()
        r = self.registry
        self.processes, self.local_devices = processes, local_devices
        Gauge("brownout_processes", "Processes the engine spans", registry=r).set(processes)
        Gauge("brownout_local_devices", "Devices of each process (the leader's)", registry=r).set(
            local_devices
        )
        self.plan_broadcasts: collections.deque[float] = collections.deque(maxlen=_HOST_WINDOW)
        self._plan_observe = None
        if processes > 1:
            self._plan_observe = Histogram(
                "brownout_plan_broadcast_seconds",
                "Time the leader spends sending a step's plan to the other processes",
                buckets=_HOST_BUCKETS,
                registry=r,
            ).observe
        self.num_devices = num_devices  # of the expert axis; 0: no expert parallelism
        self.num_moe_layers = num_moe_layers
        self._loads: dict[tuple[Phase, float], _LoadAccumulator] = {}
        if num_devices:
            # Sums over steps and MoE layers; rate() of each over rate(steps) gives per step.
            self.c_device_tokens = Counter(
                "brownout_expert_device_tokens",
                "Tokens received per expert-parallel device (summed over MoE layers)",
                ["phase", "device"],
                registry=r,
            )
            self.c_device_experts = Counter(
                "brownout_expert_device_experts",
                "Distinct experts computed per expert-parallel device (summed over MoE layers)",
                ["phase", "device"],
                registry=r,
            )
        self.g_running = Gauge("brownout_running_requests", "Sequences running", registry=r)
        self.g_waiting = Gauge("brownout_waiting_requests", "Requests waiting", registry=r)
        self.g_kv = Gauge("brownout_kv_blocks_used", "KV blocks in use", registry=r)
        self.g_threshold = Gauge(
            "brownout_threshold", "Brownout threshold in force", ["phase"], registry=r
        )
        self.h_step = Histogram(
            "brownout_step_latency_seconds",
            "Step latency: prefill, dispatch to tokens read; decode, the longest gap a row "
            "sees since its previous token",
            ["phase"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.h_ttft = Histogram(
            "brownout_ttft_seconds", "Time to first token", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.h_tpot = Histogram(
            "brownout_tpot_seconds",
            "Time per output token (per request mean)",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.h_host_step = Histogram(
            "brownout_host_step_seconds",
            "Engine thread time per step outside waiting on the device (loop top, dispatch, "
            "handing out tokens), by the phase of the step dispatched (else read)",
            ["phase"],
            buckets=_HOST_BUCKETS,
            registry=r,
        )
        # Children looked up once: labels() costs more than observe, and these run every step.
        self._step_observe = {phase: self.h_step.labels(phase).observe for phase in Phase}
        self._host_observe = {phase: self.h_host_step.labels(phase).observe for phase in Phase}
        self.host_steps: dict[Phase, collections.deque[float]] = {
            phase: collections.deque(maxlen=_HOST_WINDOW) for phase in Phase
        }
        self.c_tokens = Counter("brownout_tokens", "Tokens processed", ["kind"], registry=r)
        self._generated_inc = self.c_tokens.labels("generated").inc
        self.c_finished = Counter(
            "brownout_requests_finished", "Finished requests", ["reason"], registry=r
        )
        self.c_preempt = Counter("brownout_preemptions", "Sequences preempted", registry=r)
        self.c_shared = Counter(
            "brownout_shared_prompt_tokens",
            "Prompt tokens a sample read from another sample's KV blocks instead of computing",
            registry=r,
        )
        self.c_step_failures = Counter(
            "brownout_step_failures",
            "Steps failed on the device (their requests failed; the engine served on)",
            ["phase", "kind", "state_lost"],
            registry=r,
        )
        self.steps: collections.Counter[str] = collections.Counter()
        self.finished: collections.Counter[str] = collections.Counter()
        self.preemptions = 0
        self.shared_prompt_tokens = 0
        self._recent: collections.deque[RequestMetrics] = collections.deque(maxlen=recent)
        # Every step of the last hours, for offline SLO evaluation (bounded).
        self.step_log: collections.deque[StepRecord] = collections.deque(maxlen=1 << 20)

    def record_step(
        self,
        phase: Phase,
        latency_s: float,
        rows: int,
        now: float,
        thresholds: Thresholds,
        execution_s: float | None = None,
        predicted: tuple[float, float] | None = None,
        bucket: tuple[int, int] | None = None,
        decision_s: float = 0.0,
    ) -> None:
        """``predicted``: (mean, P90) latency predicted at the step's dispatch."""
        mean, p90 = (None, None) if predicted is None else predicted
        self.step_log.append(
            StepRecord(
                now,
                phase,
                latency_s,
                rows,
                thresholds.prefill,
                thresholds.decode,
                execution_s,
                mean,
                p90,
                bucket,
                decision_s,
            )
        )
        self.steps[phase] += 1
        self._step_observe[phase](latency_s)
        self._generated_inc(rows)

    def record_host_step(self, phase: Phase, seconds: float) -> None:
        self.host_steps[phase].append(seconds)
        self._host_observe[phase](seconds)

    def record_plan_broadcast(self, seconds: float) -> None:
        self.plan_broadcasts.append(seconds)
        if self._plan_observe is not None:
            self._plan_observe(seconds)

    def record_device_load(self, phase: Phase, threshold: float, load: np.ndarray) -> None:
        """One step's (DEV, 2) load rows: (tokens received, distinct experts) per device."""
        acc = self._loads.get((phase, threshold))
        if acc is None:
            acc = self._loads[(phase, threshold)] = _LoadAccumulator(self.num_devices)
        acc.add(load)
        for device, (tokens, experts) in enumerate(load.tolist()):
            self.c_device_tokens.labels(phase, str(device)).inc(tokens)
            self.c_device_experts.labels(phase, str(device)).inc(experts)

    def record_preemption(self) -> None:
        self.preemptions += 1
        self.c_preempt.inc()

    def record_shared_prefix(self, tokens: int) -> None:
        self.shared_prompt_tokens += tokens
        self.c_shared.inc(tokens)

    def record_step_failure(
        self, phase: Phase | None, kind: StepFailureKind, state_lost: bool
    ) -> None:
        """``phase`` None: a warm-up run of a newly compiled step."""
        self.c_step_failures.labels(
            "warm_up" if phase is None else phase.value, kind.value, str(state_lost).lower()
        ).inc()

    def record_finish(self, metrics: RequestMetrics, reason: FinishReason) -> None:
        self.finished[reason.value] += 1
        self.c_finished.labels(reason.value).inc()
        self.c_tokens.labels("prompt").inc(metrics.prompt_tokens)
        if metrics.ttft is not None:
            self.h_ttft.observe(metrics.ttft)
        if metrics.tpot_mean is not None:
            self.h_tpot.observe(metrics.tpot_mean)
        self._recent.append(metrics)

    def snapshot(
        self,
        occupancy: Occupancy,
        controller: SloController,
        grid: GridStatus,
        latency: tuple[LatencyEntry, ...] = (),
    ) -> EngineStats:
        thresholds = controller.thresholds
        cfg = controller.config
        self.g_running.set(occupancy.running)
        self.g_waiting.set(occupancy.waiting)
        self.g_kv.set(occupancy.kv_blocks_used)
        for phase in Phase:
            self.g_threshold.labels(phase).set(thresholds.of(phase))
        ttfts = [m.ttft for m in self._recent if m.ttft is not None]
        tpots = [m.tpot_mean for m in self._recent if m.tpot_mean is not None]
        host = {phase.value: np.asarray(times) for phase, times in self.host_steps.items() if times}
        return EngineStats(
            running=occupancy.running,
            waiting=occupancy.waiting,
            kv_blocks_used=occupancy.kv_blocks_used,
            kv_blocks_total=occupancy.kv_blocks_total,
            prefill_threshold=thresholds.prefill,
            decode_threshold=thresholds.decode,
            controller_mode=cfg.mode,
            slo_ttft_s=cfg.slo_ttft_s,
            slo_tpot_s=cfg.slo_tpot_s,
            prefill_p90_s=controller.p90(Phase.PREFILL),
            decode_p90_s=controller.p90(Phase.DECODE),
            prefill_slo_attainment=controller.attainment(Phase.PREFILL),
            decode_slo_attainment=controller.attainment(Phase.DECODE),
            steps=dict(self.steps),
            preemptions=self.preemptions,
            shared_prompt_tokens=self.shared_prompt_tokens,
            finished=dict(self.finished),
            controller_updates=controller.updates,
            compile_seconds=grid.compile_seconds,
            compiled_steps=grid.compiled,
            mean_ttft_s=float(np.mean(ttfts)) if ttfts else None,
            mean_tpot_s=float(np.mean(tpots)) if tpots else None,
            device_load=tuple(
                acc.stats(phase, threshold, self.num_moe_layers)
                for (phase, threshold), acc in sorted(self._loads.items())
            ),
            steps_compiling=grid.compiling,
            latency=latency,
            host_step_p50_s={phase: float(np.median(t)) for phase, t in host.items()},
            host_step_p90_s={phase: float(np.percentile(t, 90)) for phase, t in host.items()},
            processes=self.processes,
            local_devices=self.local_devices,
            plan_broadcast_p50_s=(
                float(np.median(list(self.plan_broadcasts))) if self.plan_broadcasts else None
            ),
        )
