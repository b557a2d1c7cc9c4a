"""Request traces: Poisson/gamma or constant-interval arrivals, the paper's burst, a ramp; fixed
seed → same trace."""

from __future__ import annotations

import dataclasses
import enum
import json
from pathlib import Path

import numpy as np


class Arrivals(enum.StrEnum):
    GAMMA = "gamma"  # gamma inter-arrival times of shape ``burstiness`` (1: Poisson)
    # One request every 1/rate(t) seconds: the reference implementation's workload (with a
    # burst_factor of 2 from burst_start_s on, its rate doubling).
    CONSTANT = "constant"


@dataclasses.dataclass(frozen=True, slots=True)
class WorkloadConfig:
    request_rate: float  # requests per second (base)
    duration_s: float
    burstiness: float = 1.0  # gamma shape of inter-arrival times; 1 = Poisson (as vLLM)
    burst_start_s: float | None = None  # the paper's burst: rate × burst_factor in a window
    burst_duration_s: float = 0.0
    burst_factor: float = 1.0
    ramp_to: float | None = None  # linear ramp of the rate to this value over the duration
    prompt_len: tuple[int, int] = (16, 64)  # synthetic lengths, inclusive range
    output_len: tuple[int, int] = (16, 64)
    seed: int = 0
    arrivals: Arrivals = Arrivals.GAMMA

    def __post_init__(self) -> None:
        object.__setattr__(self, "arrivals", Arrivals(self.arrivals))
        if self.request_rate <= 0 or self.duration_s <= 0 or self.burstiness <= 0:
            raise ValueError("request_rate, duration_s and burstiness must be positive")

    def rate_at(self, t: float) -> float:
        rate = self.request_rate
        if self.ramp_to is not None:
            rate += (self.ramp_to - self.request_rate) * min(t / self.duration_s, 1.0)
        if self.burst_start_s is not None and (
            self.burst_start_s <= t < self.burst_start_s + self.burst_duration_s
        ):
            rate *= self.burst_factor
        return rate


@dataclasses.dataclass(frozen=True, slots=True)
class TraceRequest:
    arrival_s: float
    prompt_ids: tuple[int, ...]
    output_len: int


def arrival_times(cfg: WorkloadConfig, rng: np.random.Generator) -> np.ndarray:
    """Inter-arrival times with mean 1/rate(t): gamma of shape ``burstiness``, or constant."""
    times, t = [], 0.0
    while True:
        rate = cfg.rate_at(t)
        if cfg.arrivals is Arrivals.CONSTANT:
            t += 1.0 / rate
        else:
            t += rng.gamma(cfg.burstiness, 1.0 / (rate * cfg.burstiness))
        if t >= cfg.duration_s:
            return np.asarray(times)
        times.append(t)


def load_prompt_pool(path: str | Path, tokenizer, max_prompt: int, max_output: int) -> list:
    """(prompt ids, output length) pairs from an Alpaca or ShareGPT JSON file."""
    records = json.loads(Path(path).read_text(encoding="utf-8"))
    pool = []
    for record in records:
        if "instruction" in record:
            prompt = "\n".join(p for p in (record["instruction"], record.get("input", "")) if p)
            answer = record.get("output", "")
        else:
            turns = record.get("conversations") or []
            if len(turns) < 2:
                continue
            prompt, answer = turns[0].get("value", ""), turns[1].get("value", "")
        ids = tokenizer.encode(prompt, add_special_tokens=False)[:max_prompt]
        out = len(tokenizer.encode(answer, add_special_tokens=False))
        if ids:
            pool.append((tuple(ids), int(np.clip(out, 1, max_output))))
    if not pool:
        raise ValueError(f"{path}: no usable prompts")
    return pool


def make_trace(cfg: WorkloadConfig, vocab_size: int, pool: list | None = None) -> list:
    rng = np.random.default_rng(cfg.seed)
    trace = []
    for arrival in arrival_times(cfg, rng):
        if pool:
            ids, out = pool[int(rng.integers(len(pool)))]
        else:
            n = int(rng.integers(cfg.prompt_len[0], cfg.prompt_len[1] + 1))
            ids = tuple(int(t) for t in rng.integers(0, vocab_size, n))
            out = int(rng.integers(cfg.output_len[0], cfg.output_len[1] + 1))
        trace.append(TraceRequest(float(arrival), ids, out))
    return trace
