"""Per-layer sensitivity to brownout, and exempt layers chosen from it.

``layer_sensitivity`` browns out one MoE layer at a time at a threshold (every other layer
exempt, i.e. exact) on teacher-forced windows (``eval/quality.py``) and reports, per layer, the
mean KL(exact ‖ browned) it causes and the routed-expert bytes it saves per scored token
(distinct experts not read, prefill and decode steps together). ``brownout_jax.united.exemption``
ranks layers by KL removed per byte kept. ``compare_rules`` measures, at equal K, all layers
browned out except the K chosen ones against the reference implementation's edge rule.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Sequence

import numpy as np

from brownout_jax.eval.quality import (
    BrownoutPhase,
    BrownoutSetting,
    QualityConfig,
    SettingMeasurement,
    measure_settings,
)
from brownout_jax.model.config import ModelConfig
from brownout_jax.model.params import ModelParams
from brownout_jax.united.exemption import LayerSensitivity, edge_layers

MAX_SUBSETS = 64


def _mean_stderr(values: np.ndarray) -> tuple[float, float]:
    se = float(np.std(values, ddof=1) / math.sqrt(values.size)) if values.size > 1 else math.nan
    return float(np.mean(values)), se


def layer_sensitivity(
    params: ModelParams,
    config: ModelConfig,
    windows: Sequence[Sequence[int]],
    threshold: float,
    cfg: QualityConfig,
    progress: bool = False,
) -> tuple[LayerSensitivity, ...]:
    moe = config.moe_layers
    settings = [
        BrownoutSetting(threshold, BrownoutPhase.BOTH, tuple(x for x in moe if x != layer))
        for layer in moe
    ]
    teacher_only = dataclasses.replace(cfg, num_prompts=0)
    measured = measure_settings(
        params, config, windows, settings, teacher_only, progress, "sensitivity"
    )
    out = []
    for index, (layer, m) in enumerate(zip(moe, measured, strict=True)):
        kl, kl_se = _mean_stderr(m.kl.mean(axis=1))
        out.append(
            LayerSensitivity(
                layer=layer,
                kl=kl,
                kl_stderr=kl_se,
                bytes_saved_per_token=float(m.bytes_saved_per_token()[index]),
            )
        )
    return tuple(out)


@dataclasses.dataclass(frozen=True, slots=True)
class RuleComparison:
    """All MoE layers browned out at the threshold except ``exempt_layers``."""

    k: int
    rule: str  # "auto" (measured choice), "edge" (reference rule), "none" or "other"
    exempt_layers: tuple[int, ...]
    kl_mean: float
    kl_mean_stderr: float
    top1_agreement: float
    expert_bytes_read: float  # fraction of the exact model's routed-expert bytes
    kl_minus_edge: float | None  # paired over windows: this rule's KL − the edge rule's
    kl_minus_edge_stderr: float | None


def compare_rules(
    params: ModelParams,
    config: ModelConfig,
    windows: Sequence[Sequence[int]],
    threshold: float,
    ranking: Sequence[int],
    ks: Sequence[int],
    cfg: QualityConfig,
    progress: bool = False,
    all_subsets: bool = False,
) -> list[RuleComparison]:
    """For each K: the first K of ``ranking`` exempt vs the edge rule's K layers (and no
    exemption once, as K = 0); with ``all_subsets``, every other K-subset of the MoE layers
    too (small models only). Each distinct exempt set is measured once."""
    moe = config.moe_layers
    plan: list[tuple[int, str, tuple[int, ...]]] = [(0, "none", ())]
    for k in ks:
        plan.append((k, "auto", tuple(sorted(ranking[:k]))))
        plan.append((k, "edge", edge_layers(moe, k)))
    if all_subsets:
        count = sum(math.comb(len(moe), k) for k in ks)
        if count > MAX_SUBSETS:
            raise ValueError(f"all subsets: {count} exempt sets to measure (at most {MAX_SUBSETS})")
        named = {exempt for _, _, exempt in plan}
        for k in ks:
            for subset in itertools.combinations(moe, k):
                if subset not in named:
                    plan.append((k, "other", subset))
    distinct = sorted({exempt for _, _, exempt in plan})
    settings = [BrownoutSetting(threshold, BrownoutPhase.BOTH, exempt) for exempt in distinct]
    teacher_only = dataclasses.replace(cfg, num_prompts=0)
    measured: dict[tuple[int, ...], SettingMeasurement] = dict(
        zip(
            distinct,
            measure_settings(params, config, windows, settings, teacher_only, progress, "rules"),
            strict=True,
        )
    )
    rows = []
    for k, rule, exempt in plan:
        m = measured[exempt]
        per_window = m.kl.mean(axis=1)
        kl, kl_se = _mean_stderr(per_window)
        diff = diff_se = None
        if rule != "none":
            edge = measured[edge_layers(moe, k)].kl.mean(axis=1)
            diff, diff_se = _mean_stderr(per_window - edge)
        rows.append(
            RuleComparison(
                k=k,
                rule=rule,
                exempt_layers=exempt,
                kl_mean=kl,
                kl_mean_stderr=kl_se,
                top1_agreement=float(m.agree.mean()),
                expert_bytes_read=m.bytes_read_fraction(),
                kl_minus_edge=diff,
                kl_minus_edge_stderr=diff_se,
            )
        )
    order = {"none": 0, "auto": 1, "edge": 2, "other": 3}
    return sorted(rows, key=lambda r: (r.k, order[r.rule], r.kl_mean))


def rank_among_subsets(rows: Sequence[RuleComparison], k: int) -> tuple[int, int] | None:
    """(rank of the auto choice by KL among the measured K-subsets, how many), 1 = best;
    None unless every K-subset was measured."""
    measured = {r.exempt_layers: r.kl_mean for r in rows if r.k == k}
    auto = next((r for r in rows if r.k == k and r.rule == "auto"), None)
    if auto is None or not any(r.rule == "other" for r in rows if r.k == k):
        return None
    return 1 + sum(kl < auto.kl_mean for kl in measured.values()), len(measured)


def format_sensitivity(layers: Sequence[LayerSensitivity], ranking: Sequence[int]) -> str:
    lines = [
        "| MoE layer | KL, this layer alone browned (nats/token) | expert KiB saved / token "
        "| KL per MiB saved | rank |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for s in layers:
        per_mib = s.kl_per_byte * 2**20
        lines.append(
            f"| {s.layer} | {s.kl:.4f} ± {s.kl_stderr:.4f} | {s.bytes_saved_per_token / 1024:.1f}"
            f" | {per_mib:.4f} | {ranking.index(s.layer) + 1} |"
        )
    return "\n".join(lines)


def format_comparison(rows: Sequence[RuleComparison]) -> str:
    lines = [
        "| K | rule | exempt layers | KL mean (nats/token) | KL − edge rule (paired) | "
        "top-1 agreement | expert bytes read |",
        "| ---: | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        rule = r.rule
        ranked = rank_among_subsets(rows, r.k) if rule == "auto" else None
        if ranked is not None:
            rule = f"auto (best {ranked[0]} of {ranked[1]})"
        diff = "—"
        if r.kl_minus_edge is not None:
            diff = f"{r.kl_minus_edge:+.4f} ± {r.kl_minus_edge_stderr:.4f}"
        layers = ",".join(map(str, r.exempt_layers)) or "—"
        lines.append(
            f"| {r.k} | {rule} | {layers} | {r.kl_mean:.4f} ± {r.kl_mean_stderr:.4f} | {diff} "
            f"| {r.top1_agreement:.4f} | {100 * r.expert_bytes_read:.1f} % |"
        )
    return "\n".join(lines)
