"""``python -m brownout_jax.bench.host_step``: the engine thread's host time per decode step.

Runs the real engine loop (scheduler, streams, detokenization, metrics) over a fake executor
whose "device" costs nothing and whose sampled tokens replay real text (held-out docstrings,
demo tokenizer), so that what is timed is the host work that competes with the device step:
the whole loop per decode step, ``EngineLoop._process`` alone, and
``IncrementalText.update`` per token. The executor's upload (``dispatch``) is not part of it.
No JAX.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

import numpy as np

from brownout_jax.engine.buckets import EngineBuckets
from brownout_jax.engine.controller import ControllerConfig, SloController
from brownout_jax.engine.detokenize import IncrementalText
from brownout_jax.engine.loop import EngineLoop
from brownout_jax.engine.metrics import EngineMetrics
from brownout_jax.engine.phase import Phase
from brownout_jax.engine.requests import GenerationRequest, RequestHandle
from brownout_jax.engine.scheduler import Scheduler, SchedulerLimits
from brownout_jax.engine.stream import TokenStream
from brownout_jax.moe.ladder import ThresholdLadder

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "checkpoints" / "demo"
TEXT = ROOT / "eval" / "tasks" / "docstring_heldout.jsonl"
PROMPT = 16
BLOCK = 16


@dataclasses.dataclass(frozen=True)
class _InFlight:
    plan: object
    tokens: np.ndarray
    dispatched_at: float
    thresholds: object


@dataclasses.dataclass(frozen=True)
class _Result:
    tokens: np.ndarray
    logprobs: np.ndarray
    device_load: None = None


class _Grid:
    error = None
    pending = 0


class _NoWait:
    """The loop's wake-up event, minus the idle wait once the last request ended."""

    def set(self) -> None:
        pass

    def clear(self) -> None:
        pass

    def wait(self, timeout: float | None = None) -> bool:
        return True


class _ReplayExecutor:
    """Each row's next token is the next one of its text."""

    grid = _Grid()

    def __init__(self, targets: dict[str, list[int]], buckets: EngineBuckets):
        self.targets = targets
        self.buckets = buckets
        self.sent: dict[str, int] = {}

    def warm_up(self) -> int:
        return 0

    def serving_level(self, phase: Phase, wanted: float) -> float:
        return wanted

    def usable_buckets(self, phase: Phase, level: float):
        return self.buckets.grid(phase)

    def dispatch(self, plan, thresholds, now: float) -> _InFlight:
        tokens = np.zeros(plan.bucket.batch, np.int32)
        for i, seq in enumerate(plan.sequences):
            name = seq.handle.request_id
            n = self.sent.get(name, 0)
            tokens[i] = self.targets[name][n]
            self.sent[name] = n + 1
        return _InFlight(plan, tokens, now, thresholds)

    def read(self, step: _InFlight) -> _Result:
        return _Result(step.tokens, np.full(len(step.tokens), -0.5, np.float32))

    def recover_state(self) -> bool:
        return False

    def close(self) -> None:
        pass


def load_demo_tokenizer(directory: Path = DEMO):
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)


def text_rows(tokenizer, rows: int, tokens: int, path: Path = TEXT) -> list[list[int]]:
    """``rows`` runs of ``tokens`` ids of consecutive held-out docstrings."""
    docs = [json.loads(line)["text"] for line in path.read_text().splitlines() if line]
    ids: list[int] = []
    for doc in docs:
        ids += tokenizer.encode(doc + "\n\n", add_special_tokens=False)
        if len(ids) >= rows * tokens:
            break
    return [ids[r * tokens : (r + 1) * tokens] for r in range(rows)]


def _percentiles(seconds: list[float]) -> dict:
    ms = np.asarray(seconds) * 1e3
    return {
        "p50_ms": round(float(np.median(ms)), 4),
        "p90_ms": round(float(np.percentile(ms, 90)), 4),
    }


def time_loop(tokenizer, runs: list[list[int]], **request_fields) -> dict:
    """One engine loop over ``runs`` (prompt = the first PROMPT ids, the rest generated)."""
    rows = len(runs)
    new_tokens = len(runs[0]) - PROMPT
    blocks = -(-(PROMPT + new_tokens) // BLOCK)
    buckets = EngineBuckets((rows,), (PROMPT,), (rows,), (blocks,), block_size=BLOCK)
    targets = {f"r{i}": run[PROMPT:] for i, run in enumerate(runs)}
    metrics = EngineMetrics()
    loop = EngineLoop(
        _ReplayExecutor(targets, buckets),
        Scheduler(SchedulerLimits(rows, rows, rows * PROMPT, BLOCK, 1 + rows * blocks)),
        SloController(ControllerConfig(mode="off"), ThresholdLadder((1.0,))),
        metrics,
        lambda handle: TokenStream(handle, tokenizer, frozenset()),
    )
    handles = []
    for i, run in enumerate(runs):
        request = GenerationRequest(
            prompt_token_ids=tuple(run[:PROMPT]),
            max_new_tokens=new_tokens,
            ignore_eos=True,
            **request_fields,
        )
        handles.append(RequestHandle(f"r{i}", request, None))
        loop.incoming.put(handles[-1])
    process_times: list[float] = []
    process = loop._process

    def timed_process(step):
        start = time.perf_counter()
        try:
            return process(step)
        finally:
            if step.plan.phase == Phase.DECODE:
                process_times.append(time.perf_counter() - start)

    loop._process = timed_process
    loop.wake = _NoWait()
    loop.closing = True
    start = time.perf_counter()
    loop.run()
    elapsed = time.perf_counter() - start
    assert loop.error is None, loop.error
    text = "".join(e.text for e in handles[0].ready_events())
    steps = sum(metrics.steps.values())
    own = getattr(metrics, "host_steps", {}).get(Phase.DECODE)  # the loop's own measurement
    return {
        "steps": steps,
        "loop_per_step_ms": round(elapsed / steps * 1e3, 4),
        "host_step_decode": _percentiles(list(own)) if own else None,
        "process": _percentiles(process_times),
        "text_ok": text == tokenizer.decode(runs[0][PROMPT:], skip_special_tokens=True)
        if request_fields.get("detokenize", True)
        else None,
    }


def time_update(tokenizer, runs: list[list[int]]) -> dict:
    """``IncrementalText.update`` per token, one text per row, step by step."""
    texts = [IncrementalText(tokenizer) for _ in runs]
    generated: list[list[int]] = [[] for _ in runs]
    per_step: list[float] = []
    for k in range(len(runs[0])):
        start = time.perf_counter()
        for text, ids, run in zip(texts, generated, runs, strict=True):
            ids.append(run[k])
            text.update(ids)
        per_step.append(time.perf_counter() - start)
    per_token = [s / len(runs) for s in per_step]
    return {"per_step": _percentiles(per_step), "per_token": _percentiles(per_token)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--tokens", type=int, default=200, help="generated per row")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    tokenizer = load_demo_tokenizer()
    runs = text_rows(tokenizer, args.rows, PROMPT + args.tokens)
    report: dict = {"rows": args.rows, "tokens": args.tokens}
    cases = {"text": {}}
    if "detokenize" in {f.name for f in dataclasses.fields(GenerationRequest)}:
        cases["token_ids_only"] = {"detokenize": False}
    for name, fields in cases.items():
        results = [time_loop(tokenizer, runs, **fields) for _ in range(args.repeats)]
        report[f"loop_{name}"] = min(results, key=lambda r: r["loop_per_step_ms"])
    updates = [time_update(tokenizer, [r[PROMPT:] for r in runs]) for _ in range(args.repeats)]
    report["update"] = min(updates, key=lambda r: r["per_step"]["p50_ms"])
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
