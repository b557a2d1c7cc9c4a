"""Summaries of ``eval quality`` measurements: statistics with standard errors, the markdown
table, the JSON report, the PNG, and the quality cost of an ``eval slo`` run.

Tokens of one window are correlated, so standard errors treat windows as the independent units:
a mean's s.e. is that of the per-window means (every window scores the same number of tokens);
P90 and the greedy median get theirs from a bootstrap over windows / prompts (fixed seed).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np

from brownout_jax.eval.quality import SettingMeasurement

BOOTSTRAP_SAMPLES = 200


@dataclasses.dataclass(frozen=True, slots=True)
class QualityRow:
    united: str  # label of the united-experts set
    threshold: float
    phase: str
    exempt_layers: tuple[int, ...]
    windows: int
    tokens: int
    kl_mean: float  # nats per token
    kl_mean_stderr: float
    kl_p90: float
    kl_p90_stderr: float
    top1_agreement: float
    top1_agreement_stderr: float
    perplexity_exact: float
    perplexity: float
    perplexity_change: float  # perplexity / exact perplexity − 1
    perplexity_change_stderr: float
    expert_bytes_read: float  # routed-expert bytes read, fraction of the exact model's
    greedy_prompts: int
    greedy_tokens: int
    tokens_before_divergence_median: float | None
    tokens_before_divergence_median_stderr: float | None
    identical_continuations: float | None  # share of prompts whose continuation is unchanged
    identical_continuations_stderr: float | None


def _mean_stderr(per_window: np.ndarray) -> tuple[float, float]:
    n = per_window.shape[0]
    mean = float(np.mean(per_window))
    return mean, float(np.std(per_window, ddof=1) / math.sqrt(n)) if n > 1 else math.nan


def _bootstrap_stderr(values: np.ndarray, statistic, seed: int = 0) -> float:
    """s.e. of ``statistic(values[rows])`` over resampled rows (axis 0)."""
    if values.shape[0] < 2:
        return math.nan
    rng = np.random.default_rng(seed)
    stats = [
        statistic(values[rng.integers(0, values.shape[0], values.shape[0])])
        for _ in range(BOOTSTRAP_SAMPLES)
    ]
    return float(np.std(stats, ddof=1))


def summarize(m: SettingMeasurement, united: str) -> QualityRow:
    kl_mean, kl_se = _mean_stderr(m.kl.mean(axis=1))
    agree, agree_se = _mean_stderr(m.agree.mean(axis=1))
    delta, delta_se = _mean_stderr((m.nll_browned - m.nll_exact).mean(axis=1))
    exact_nll = float(m.nll_exact.mean())
    greedy = m.first_divergence
    identical = median = median_se = identical_se = None
    if greedy is not None and greedy.size:
        full = greedy >= m.continuation_tokens
        identical = float(full.mean())
        identical_se = math.sqrt(identical * (1 - identical) / greedy.size)
        median = float(np.median(greedy))
        median_se = _bootstrap_stderr(greedy, np.median)
    return QualityRow(
        united=united,
        threshold=m.setting.threshold,
        phase=m.setting.phase.value,
        exempt_layers=m.setting.exempt_layers,
        windows=m.kl.shape[0],
        tokens=m.scored_tokens,
        kl_mean=kl_mean,
        kl_mean_stderr=kl_se,
        kl_p90=float(np.percentile(m.kl, 90)),
        kl_p90_stderr=_bootstrap_stderr(m.kl, lambda rows: np.percentile(rows, 90)),
        top1_agreement=agree,
        top1_agreement_stderr=agree_se,
        perplexity_exact=math.exp(exact_nll),
        perplexity=math.exp(exact_nll + delta),
        perplexity_change=math.expm1(delta),
        perplexity_change_stderr=math.exp(delta) * delta_se,  # delta method
        expert_bytes_read=m.bytes_read_fraction(),
        greedy_prompts=0 if greedy is None else int(greedy.size),
        greedy_tokens=m.continuation_tokens,
        tokens_before_divergence_median=median,
        tokens_before_divergence_median_stderr=median_se,
        identical_continuations=identical,
        identical_continuations_stderr=identical_se,
    )


def _pm(value: float | None, stderr: float | None, fmt: str) -> str:
    if value is None:
        return "—"
    if stderr is None or math.isnan(stderr):
        return format(value, fmt)
    return f"{format(value, fmt)} ± {format(stderr, fmt.lstrip('+'))}"


def format_table(rows: list[QualityRow]) -> str:
    lines = [
        "| united | phase | threshold | KL mean (nats/token) | KL P90 | top-1 agreement | "
        "perplexity (change) | expert bytes read | greedy: tokens to 1st divergence (median) "
        "| identical continuations |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        change = _pm(100 * r.perplexity_change, 100 * r.perplexity_change_stderr, "+.2f")
        median = _pm(
            r.tokens_before_divergence_median, r.tokens_before_divergence_median_stderr, ".1f"
        )
        if r.tokens_before_divergence_median is not None:
            median += f" / {r.greedy_tokens}"
        lines.append(
            f"| {r.united} | {r.phase} | {r.threshold:g} | "
            f"{_pm(r.kl_mean, r.kl_mean_stderr, '.4f')} | "
            f"{_pm(r.kl_p90, r.kl_p90_stderr, '.4f')} | "
            f"{_pm(r.top1_agreement, r.top1_agreement_stderr, '.4f')} | "
            f"{r.perplexity:.2f} ({change} %) | {100 * r.expert_bytes_read:.1f} % | {median} | "
            f"{_pm(r.identical_continuations, r.identical_continuations_stderr, '.3f')} |"
        )
    return "\n".join(lines)


def plot_quality(rows: list[QualityRow], path: Path, title: str = "") -> None:
    """Metrics vs threshold, and KL vs expert bytes read: one line per united-experts set (and
    brownout phase; phase-only lines start from the exact point they share)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("kl_mean", "kl_mean_stderr", "mean KL(exact ‖ browned), nats/token", 1.0),
        ("kl_p90", "kl_p90_stderr", "P90 KL, nats/token", 1.0),
        ("top1_agreement", "top1_agreement_stderr", "top-1 agreement with exact", 1.0),
        ("perplexity_change", "perplexity_change_stderr", "perplexity change (%)", 100.0),
        (
            "tokens_before_divergence_median",
            "tokens_before_divergence_median_stderr",
            "greedy tokens before 1st divergence (median)",
            1.0,
        ),
        ("kl_mean", "kl_mean_stderr", "mean KL vs routed-expert bytes read", 1.0),
    ]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    lines = sorted({(r.united, r.phase) for r in rows})
    one_phase = len(lines) == len({u for u, _ in lines})
    styles = {"both": "-", "prefill": "--", "decode": ":"}
    for index, (ax, (key, err_key, label, scale)) in enumerate(zip(axes.flat, panels, strict=True)):
        by_bytes = index == len(panels) - 1
        for colour, (united, phase) in enumerate(lines):
            series = [r for r in rows if (r.united, r.phase) == (united, phase)]
            if all(r.threshold < 1.0 for r in series):
                series += [r for r in rows if (r.united, r.threshold) == (united, 1.0)][:1]
            points = sorted(
                (r for r in series if getattr(r, key) is not None), key=lambda r: r.threshold
            )
            if not points:
                continue
            x = [100 * r.expert_bytes_read if by_bytes else r.threshold for r in points]
            y = [scale * getattr(r, key) for r in points]
            err = [scale * (getattr(r, err_key) or 0.0) for r in points]
            ax.errorbar(
                x,
                y,
                yerr=err,
                marker="o",
                markersize=4,
                capsize=3,
                linestyle=styles[phase],
                color=f"C{colour if one_phase else sorted({u for u, _ in lines}).index(united)}",
                label=united if one_phase else f"{united} ({phase})",
            )
        ax.set_xlabel(
            "routed-expert bytes read (% of exact)"
            if by_bytes
            else "brownout threshold (1 = exact)"
        )
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def report_json(rows: list[QualityRow], meta: dict) -> dict:
    return {**meta, "rows": [dataclasses.asdict(r) for r in rows]}


def _kl_at(rows: list[dict], phase: str, threshold: float) -> float:
    """Mean KL of the table row nearest ``threshold`` for ``phase`` (full-brownout rows when
    the table has none for that phase)."""
    candidates = [r for r in rows if r["phase"] == phase] or [
        r for r in rows if r["phase"] == "both"
    ]
    if not candidates:
        raise ValueError(f"--quality-table: no rows for phase {phase!r} or 'both'")
    return min(candidates, key=lambda r: abs(r["threshold"] - threshold))["kl_mean"]


def quality_cost(steps, table: dict, united_dir: str | None) -> dict | None:
    """Mean KL per generated token of an ``eval slo`` run: each step's ``rows`` tokens (one per
    sequence) cost the KL measured at that step's threshold for its phase — prefill-only rows
    for prefill steps, decode-only for decode steps, full-brownout rows when the table has no
    such rows — at the nearest measured threshold (a step at threshold 1 costs nothing). The
    table's set is the one measured from ``united_dir``, or its only set."""
    rows = table.get("rows", [])
    sets = sorted({r["united"] for r in rows})
    if not sets:
        return None
    paths = table.get("united", {})
    served = None if united_dir is None else Path(united_dir).resolve()
    matching = [
        label for label in sets if label in paths and Path(paths[label]).resolve() == served
    ]
    if matching:
        chosen = matching[0]
    elif len(sets) == 1:
        chosen = sets[0]
    else:
        raise ValueError(f"--quality-table has sets {sets}; none is the served {united_dir}")
    rows = [r for r in rows if r["united"] == chosen]
    total = weighted = 0.0
    for s in steps:
        threshold = s.prefill_threshold if s.phase == "prefill" else s.decode_threshold
        if threshold < 1.0:  # at 1 the step is the exact model: no cost
            weighted += s.rows * _kl_at(rows, s.phase, threshold)
        total += s.rows
    return {
        "united": chosen,
        "tokens": int(total),
        "mean_kl": weighted / total if total else None,
    }


def main(argv: list[str] | None = None) -> None:
    """Re-plots a saved report: ``python -m brownout_jax.eval.quality_report REPORT.json
    OUT.png`` (the same figure as ``eval quality --plot``, without measuring again)."""
    import argparse
    import json

    parser = argparse.ArgumentParser(description=main.__doc__.split("\n")[0])
    parser.add_argument("report", type=Path, help="`eval quality --json-out` file")
    parser.add_argument("png", type=Path)
    args = parser.parse_args(argv)
    report = json.loads(args.report.read_text())
    rows = [QualityRow(**{**r, "exempt_layers": tuple(r["exempt_layers"])}) for r in report["rows"]]
    plot_quality(rows, args.png, f"{Path(report['model']).name} on {Path(report['text']).name}")


if __name__ == "__main__":
    main()
