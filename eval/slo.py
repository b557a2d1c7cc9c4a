"""``brownout-jax eval slo``: replay one trace per brownout mode, measure SLO violations.

Per mode: the SLO-violation rate as BrownoutServe defines it (share of 1-second windows whose
P90 step latency exceeds the SLO, prefill and decode separately; windows without steps of
that phase do not count), goodput (requests per second meeting both the TTFT and the TPOT
SLO, as vLLM's --goodput), throughput, mean thresholds, and the accuracy cost looked up in an
accuracy table (``eval accuracy --output json``) and the quality cost (mean KL per generated
token, ``quality_report.quality_cost``) in a quality table (``eval quality --output json``)
when given. Writes JSON and PNG timelines.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from brownout_jax.engine.controller import ControllerConfig
from brownout_jax.engine.metrics import StepRecord
from brownout_jax.engine.phase import Phase
from brownout_jax.engine.quality_costs import DEFAULT_QUALITY_COSTS, QualityCosts
from brownout_jax.engine.requests import EngineOverloadedError, GenerationRequest, RequestError
from brownout_jax.eval.quality_report import quality_cost
from brownout_jax.eval.slo_trace import level_of, violation_causes, windows
from brownout_jax.eval.workload import TraceRequest


@dataclasses.dataclass
class ModeRun:
    mode: str
    start: float
    end: float = 0.0
    steps: list[StepRecord] = dataclasses.field(default_factory=list)
    outputs: list = dataclasses.field(default_factory=list)  # GenerationOutput
    arrivals: list[float] = dataclasses.field(default_factory=list)
    rejected: int = 0
    interrupted: bool = False


def run_mode(
    engine, trace: list[TraceRequest], mode: str, base: ControllerConfig, progress: bool = True
) -> ModeRun:
    """Replays ``trace`` in real time against the engine under one brownout mode (``base``
    gives the SLOs, window and check interval)."""
    # Between runs the engine is idle, so swapping its controller is safe: levels are all
    # compiled already, the mode only decides which ones are used.
    mode_config = ControllerConfig.parse_mode(mode)
    config = dataclasses.replace(
        base, mode=mode_config.mode, fixed_threshold=mode_config.fixed_threshold
    )
    engine.set_controller(config)
    run = ModeRun(mode=mode, start=engine.clock())
    handles = []
    bar = tqdm(total=len(trace), desc=f"slo {mode}", unit="req", disable=not progress)
    try:
        for request in trace:
            delay = run.start + request.arrival_s - engine.clock()
            if delay > 0:
                time.sleep(delay)
            run.arrivals.append(engine.clock() - run.start)
            try:
                handles.append(
                    engine.submit(
                        GenerationRequest(
                            prompt_token_ids=request.prompt_ids,
                            max_new_tokens=request.output_len,
                            ignore_eos=True,
                            detokenize=False,  # timings only: no host time on text
                        )
                    )
                )
            except (EngineOverloadedError, RequestError):
                run.rejected += 1  # counted, not fatal: the trace goes on
            bar.update(1)
        for handle in handles:
            run.outputs.append(handle.result())
    except KeyboardInterrupt:
        run.interrupted = True
        for handle in handles:
            handle.cancel()
    finally:
        bar.close()
    run.end = engine.clock()
    run.steps = [s for s in list(engine.metrics.step_log) if run.start <= s.time <= run.end]
    return run


def violation_rate(
    steps: list[StepRecord], phase: str, slo: float, start: float, end: float
) -> tuple[float | None, list[tuple[float, float]]]:
    """(share of 1-s windows whose P90 latency > slo, [(window start, P90)])."""
    series = [(t0 - start, p90) for t0, _, p90 in windows(steps, phase, start, end)]
    if not series:
        return None, series
    return float(np.mean([p90 > slo for _, p90 in series])), series


def summarize(
    run: ModeRun,
    slo_ttft: float,
    slo_tpot: float,
    accuracy_table: dict | None = None,
    quality_table: dict | None = None,
    united_dir: str | None = None,
    quality_costs: QualityCosts = DEFAULT_QUALITY_COSTS,
) -> dict:
    """``quality_costs``: the served set's stored KL per level (the expected KL per token)."""
    duration = max(run.end - run.start, 1e-9)
    prefill_rate, prefill_series = violation_rate(
        run.steps, "prefill", slo_ttft, run.start, run.end
    )
    decode_rate, decode_series = violation_rate(run.steps, "decode", slo_tpot, run.start, run.end)
    met_ttft = [o.metrics.ttft is not None and o.metrics.ttft <= slo_ttft for o in run.outputs]
    met_tpot = [
        o.metrics.ttft is not None
        and (o.metrics.tpot_mean is None or o.metrics.tpot_mean <= slo_tpot)
        for o in run.outputs
    ]
    good = [o for o, a, b in zip(run.outputs, met_ttft, met_tpot, strict=True) if a and b]
    tokens = sum(len(o.token_ids) for o in run.outputs)
    # The level each phase's steps ran at, averaged over that phase's steps (the level in
    # force between a phase's steps browns nothing out).
    thresholds = {}
    for phase in ("prefill", "decode"):
        ran = [getattr(s, f"{phase}_threshold") for s in run.steps if s.phase == phase]
        thresholds[phase] = float(np.mean(ran)) if ran else 1.0
    by_tokens = token_weighted_thresholds(run.steps)
    ttfts = [o.metrics.ttft for o in run.outputs if o.metrics.ttft is not None]
    tpots = [o.metrics.tpot_mean for o in run.outputs if o.metrics.tpot_mean is not None]
    result = {
        "mode": run.mode,
        "duration_s": round(duration, 3),
        "requests": len(run.outputs),
        "rejected": run.rejected,
        "interrupted": run.interrupted,
        "violation_rate_prefill": prefill_rate,
        "violation_rate_decode": decode_rate,
        "goodput_rps": round(len(good) / duration, 4),
        # Request-level SLO attainment: the share of requests within each SLO, and both.
        "attainment": {
            "ttft": float(np.mean(met_ttft)) if run.outputs else None,
            "tpot": float(np.mean(met_tpot)) if run.outputs else None,
            "both": len(good) / len(run.outputs) if run.outputs else None,
        },
        "throughput_tokens_per_s": round(tokens / duration, 3),
        "mean_ttft_s": float(np.mean(ttfts)) if ttfts else None,
        "p90_ttft_s": float(np.percentile(ttfts, 90)) if ttfts else None,
        "mean_tpot_s": float(np.mean(tpots)) if tpots else None,
        "mean_thresholds": thresholds,
        # Per phase, over the tokens its steps generated: mean and P10 of their levels.
        "token_thresholds": by_tokens,
        "expected_kl_per_token": expected_kl_per_token(run.steps, quality_costs),
        "decision": decision_cost(run.steps),
        "violation_causes": {
            "prefill": violation_causes(run.steps, "prefill", slo_ttft, run.start, run.end),
            "decode": violation_causes(run.steps, "decode", slo_tpot, run.start, run.end),
        },
        "timeline": {
            "arrivals_s": [round(a, 4) for a in run.arrivals],
            "prefill_p90": prefill_series,
            "decode_p90": decode_series,
            "thresholds": [
                (round(s.time - run.start, 4), s.prefill_threshold, s.decode_threshold)
                for s in run.steps
            ],
            "step_phases": "".join("p" if s.phase == "prefill" else "d" for s in run.steps),
        },
    }
    if accuracy_table:
        result["accuracy_cost"] = _accuracy_cost(accuracy_table, thresholds["prefill"])
    if quality_table:
        result["quality_cost"] = quality_cost(run.steps, quality_table, united_dir)
    return result


def token_weighted_thresholds(steps: list[StepRecord]) -> dict[str, dict[str, float | None]]:
    """Per phase, the levels its steps ran at weighted by the tokens each generated (its rows,
    one token each): their mean, and the P10 — the level at or below which 10 % of the
    phase's tokens were generated. None where the phase ran no step."""
    result = {}
    for phase in ("prefill", "decode"):
        pairs = sorted((level_of(s), s.rows) for s in steps if s.phase == phase and s.rows)
        if not pairs:
            result[phase] = {"mean": None, "p10": None}
            continue
        levels = np.asarray([lv for lv, _ in pairs])
        weights = np.asarray([w for _, w in pairs], np.float64)
        cumulative = np.cumsum(weights) / weights.sum()
        p10 = float(levels[np.searchsorted(cumulative, 0.1 - 1e-12)])
        result[phase] = {"mean": float(np.average(levels, weights=weights)), "p10": p10}
    return result


def expected_kl_per_token(steps: list[StepRecord], costs: QualityCosts) -> float | None:
    """Mean KL per generated token the run's level mix is expected to cost. The stored KL of
    a prefill level is per token its request then generates (``eval quality`` browns out the
    prompt and scores the continuation), so each request carries its prefill's KL on every
    token: the mean over prefill rows (a request each; a chunk row of a long prompt counts as
    one too). A decode level's is per token of that step: its rows' KL over all tokens.
    The two add (to first order). None: the served set has no stored KL for a phase that was
    browned out."""
    prefill_rows = prefill_kl = decode_kl = tokens = 0.0
    for s in steps:
        tokens += s.rows
        phase = Phase(s.phase)
        level = level_of(s)
        kl = 0.0 if level >= 1.0 else costs.kl(phase, level)
        if kl is None:
            return None
        if phase == Phase.PREFILL:
            prefill_rows += s.rows
            prefill_kl += s.rows * kl
        else:
            decode_kl += s.rows * kl
    if not tokens:
        return None
    return (prefill_kl / prefill_rows if prefill_rows else 0.0) + decode_kl / tokens


def decision_cost(steps: list[StepRecord]) -> dict[str, float | None]:
    """Mode ``auto``'s host time choosing a decode step's level, against the step, over the
    decode steps of the largest batch bucket run: the medians of both (the step's measured
    execution where timed, else its latency)."""
    decode = [s for s in steps if s.phase == Phase.DECODE and s.decision_s > 0 and s.bucket]
    if not decode:
        return {"batch": None, "decode_median_s": None, "decode_step_median_s": None, "share": None}
    batch = max(s.bucket[0] for s in decode)
    largest = [s for s in decode if s.bucket[0] == batch]
    median = float(np.median([s.decision_s for s in largest]))
    step_median = float(np.median([s.execution_s or s.latency_s for s in largest]))
    return {
        "batch": batch,
        "decode_median_s": median,
        "decode_step_median_s": step_median,
        "share": median / step_median,
    }


def _rate(value: float | None, fmt: str = ".3f") -> str:
    return "—" if value is None else format(value, fmt)


def format_results(results: list[dict], quality_table: bool = False) -> str:
    """The markdown table ``eval slo`` prints: per mode, latency and quality side by side."""
    kl_header, kl_rule = (" KL (quality table) |", " ---: |") if quality_table else ("", "")
    lines = [
        "| mode | violation periods prefill | violation periods decode | goodput req/s | "
        "requests within TTFT / TPOT / both | tokens/s | token-weighted threshold mean / P10 "
        f"prefill | … decode | expected KL per token |{kl_header}",
        f"| --- | ---: | ---: | ---: | --- | ---: | --- | --- | ---: |{kl_rule}",
    ]
    for r in results:
        met, th = r["attainment"], r["token_thresholds"]
        kl = ""
        if quality_table:
            kl = f" {_rate((r.get('quality_cost') or {}).get('mean_kl'), '.4f')} |"
        levels = [f"{_rate(th[p]['mean'], '.2f')} / {_rate(th[p]['p10'], '.2f')}" for p in th]
        lines.append(
            f"| {r['mode']} | {_rate(r['violation_rate_prefill'])} | "
            f"{_rate(r['violation_rate_decode'])} | {r['goodput_rps']} | "
            f"{_rate(met['ttft'])} / {_rate(met['tpot'])} / {_rate(met['both'])} | "
            f"{r['throughput_tokens_per_s']} | {levels[0]} | {levels[1]} | "
            f"{_rate(r['expected_kl_per_token'], '.4f')} |{kl}"
        )
    causes = [
        f"{r['mode']} {phase}: "
        + ", ".join(f"{c} {n}" for c, n in v["over_slo_steps_by_cause"].items() if n)
        for r in results
        for phase, v in r["violation_causes"].items()
        if v["violated_windows"]
    ]
    if causes:
        lines.append("\nOver-SLO steps in violated windows, by cause: " + "; ".join(causes))
    for r in results:
        cost = r["decision"]
        if cost["share"] is not None:
            lines.append(
                f"\n{r['mode']}: deciding the level of a decode step of batch {cost['batch']} took "
                f"{1e6 * cost['decode_median_s']:.0f} µs (median), {100 * cost['share']:.2f} % "
                "of the step's "
                f"{1e3 * cost['decode_step_median_s']:.2f} ms"
            )
    return "\n".join(lines)


def _accuracy_cost(table: dict, threshold: float) -> float | None:
    """Accuracy loss at the level nearest the mean prefill threshold (scoring is a prefill)."""
    rows = table.get("rows", [])
    if not rows:
        return None
    nearest = min(rows, key=lambda r: abs(r["threshold"] - threshold))
    return nearest.get("accuracy_loss")


def plot_timeline(result: dict, slo_ttft: float, slo_tpot: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timeline = result["timeline"]
    fig, axes = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
    arrivals = np.asarray(timeline["arrivals_s"])
    if arrivals.size:
        edges = np.arange(0, max(arrivals.max(), 1.0) + 1.0, 1.0)
        counts, _ = np.histogram(arrivals, edges)
        axes[0].step(edges[:-1], counts, where="post")
    axes[0].set_ylabel("requests / s")
    for key, slo, colour in (
        ("prefill_p90", slo_ttft, "tab:blue"),
        ("decode_p90", slo_tpot, "tab:orange"),
    ):
        series = np.asarray(timeline[key]).reshape(-1, 2)
        if series.size:
            axes[1].plot(series[:, 0], series[:, 1], marker=".", color=colour, label=key)
        axes[1].axhline(slo, color=colour, linestyle="--", linewidth=1)
    axes[1].set_yscale("log")
    axes[1].set_ylabel("P90 step latency (s)")
    axes[1].legend()
    thresholds = np.asarray(timeline["thresholds"]).reshape(-1, 3)
    if thresholds.size:
        axes[2].step(thresholds[:, 0], thresholds[:, 1], where="post", label="prefill")
        axes[2].step(thresholds[:, 0], thresholds[:, 2], where="post", label="decode")
    axes[2].set_ylim(-0.05, 1.05)
    axes[2].set_ylabel("threshold")
    axes[2].set_xlabel("time (s)")
    axes[2].legend()
    fig.suptitle(f"brownout mode: {result['mode']}")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_comparison(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [r["mode"] for r in results]
    x = np.arange(len(modes))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    axes[0].bar(x - 0.2, [r["violation_rate_prefill"] or 0 for r in results], 0.4, label="prefill")
    axes[0].bar(x + 0.2, [r["violation_rate_decode"] or 0 for r in results], 0.4, label="decode")
    axes[0].set_title("SLO-violation rate (1-s windows)")
    axes[0].legend()
    axes[1].bar(x, [r["goodput_rps"] for r in results])
    axes[1].set_title("goodput (requests/s within both SLOs)")
    for ax in axes:
        ax.set_xticks(x, modes)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_results(
    results: list[dict], out_dir: Path, slo_ttft: float, slo_tpot: float, meta: dict
) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    for result in results:
        name = result["mode"].replace("=", "-")
        plot_timeline(result, slo_ttft, slo_tpot, out_dir / f"timeline-{name}.png")
    if results:
        plot_comparison(results, out_dir / "comparison.png")
    path = out_dir / "slo.json"
    path.write_text(json.dumps({**meta, "runs": results}, indent=1) + "\n")
    return path
