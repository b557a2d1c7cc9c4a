"""Engine metrics: a typed snapshot for ``Engine.stats()`` and Prometheus collectors.

Each engine owns its own ``CollectorRegistry`` (several engines, e.g. in tests, never collide);
the server publishes ``metrics.registry`` on its metrics port.
"""

from __future__ import annotations

import collections
import dataclasses

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from brownout_jax.requests import FinishReason, RequestMetrics

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)


@dataclasses.dataclass(frozen=True, slots=True)
class StepRecord:
    time: float  # engine clock when the step's tokens were read
    phase: str
    latency_s: float
    rows: int
    prefill_threshold: float
    decode_threshold: float


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
    finished: dict[str, int]
    controller_updates: int
    compile_seconds: float
    compiled_steps: int
    mean_ttft_s: float | None  # over the last finished requests
    mean_tpot_s: float | None


class EngineMetrics:
    def __init__(self, recent: int = 256):
        self.registry = CollectorRegistry()
        r = self.registry
        self.g_running = Gauge("brownout_running_requests", "Sequences running", registry=r)
        self.g_waiting = Gauge("brownout_waiting_requests", "Requests waiting", registry=r)
        self.g_kv = Gauge("brownout_kv_blocks_used", "KV blocks in use", registry=r)
        self.g_threshold = Gauge(
            "brownout_threshold", "Brownout threshold in force", ["phase"], registry=r
        )
        self.h_step = Histogram(
            "brownout_step_latency_seconds",
            "Step latency",
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
        self.c_tokens = Counter("brownout_tokens", "Tokens processed", ["kind"], registry=r)
        self.c_finished = Counter(
            "brownout_requests_finished", "Finished requests", ["reason"], registry=r
        )
        self.c_preempt = Counter("brownout_preemptions", "Sequences preempted", registry=r)
        self.steps: collections.Counter[str] = collections.Counter()
        self.finished: collections.Counter[str] = collections.Counter()
        self.preemptions = 0
        self._recent: collections.deque[RequestMetrics] = collections.deque(maxlen=recent)
        # Every step of the last hours, for offline SLO evaluation (bounded).
        self.step_log: collections.deque[StepRecord] = collections.deque(maxlen=1 << 20)

    def record_step(
        self,
        phase: str,
        latency_s: float,
        rows: int,
        now: float = 0.0,
        thresholds: tuple[float, float] = (1.0, 1.0),
    ) -> None:
        self.step_log.append(StepRecord(now, phase, latency_s, rows, *thresholds))
        self.steps[phase] += 1
        self.h_step.labels(phase).observe(latency_s)
        self.c_tokens.labels("generated").inc(rows)

    def record_preemption(self) -> None:
        self.preemptions += 1
        self.c_preempt.inc()

    def record_finish(self, metrics: RequestMetrics, reason: FinishReason) -> None:
        self.finished[reason.value] += 1
        self.c_finished.labels(reason.value).inc()
        self.c_tokens.labels("prompt").inc(metrics.prompt_tokens)
        if metrics.ttft is not None:
            self.h_ttft.observe(metrics.ttft)
        if metrics.tpot_mean is not None:
            self.h_tpot.observe(metrics.tpot_mean)
        self._recent.append(metrics)

    def snapshot(self, engine, controller) -> EngineStats:
        thresholds = controller.thresholds
        cfg = controller.config
        self.g_running.set(engine.num_running)
        self.g_waiting.set(engine.num_waiting)
        self.g_kv.set(engine.kv_blocks_used)
        for phase, value in thresholds.items():
            self.g_threshold.labels(phase).set(value)
        ttfts = [m.ttft for m in self._recent if m.ttft is not None]
        tpots = [m.tpot_mean for m in self._recent if m.tpot_mean is not None]
        return EngineStats(
            running=engine.num_running,
            waiting=engine.num_waiting,
            kv_blocks_used=engine.kv_blocks_used,
            kv_blocks_total=engine.config.num_blocks - 1,
            prefill_threshold=thresholds["prefill"],
            decode_threshold=thresholds["decode"],
            controller_mode=cfg.mode,
            slo_ttft_s=cfg.slo_ttft_s,
            slo_tpot_s=cfg.slo_tpot_s,
            prefill_p90_s=controller.p90("prefill"),
            decode_p90_s=controller.p90("decode"),
            prefill_slo_attainment=controller.attainment("prefill"),
            decode_slo_attainment=controller.attainment("decode"),
            steps=dict(self.steps),
            preemptions=self.preemptions,
            finished=dict(self.finished),
            controller_updates=controller.updates,
            compile_seconds=engine.compile_seconds,
            compiled_steps=engine.compiled_steps,
            mean_ttft_s=float(np.mean(ttfts)) if ttfts else None,
            mean_tpot_s=float(np.mean(tpots)) if tpots else None,
        )
