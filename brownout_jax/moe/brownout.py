"""Brownout routing: per MoE layer and step, cold assignments go to their group's united expert.

After top-k routing, assignments of the step's real tokens are counted per expert. Experts are
ranked by count (ties: lower id first); the *hot set* is the smallest prefix of that ranking
whose cumulative count reaches ``threshold × total assignments`` (threshold 0: empty). Every
other assignment is redirected to the united expert of its expert's group, keeping its routing
weight — except in a group where only one cold expert is active: redirecting it would read as
many weights as it saves, so it keeps its own expert (as the reference implementation does).

Thresholds are exact fractions (``p / q``) so that the hot-set cut ``count · q ≥ p · total`` is
integer arithmetic, identical on every backend and in the NumPy reference.
"""

from __future__ import annotations

import dataclasses
import fractions

import jax.numpy as jnp
import numpy as np

from brownout_jax.model.dims import Array, Bool, Int


@dataclasses.dataclass(frozen=True, slots=True)
class ThresholdLadder:
    """The thresholds step functions are compiled for; switching among them compiles nothing."""

    levels: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.levels:
            raise ValueError("ladder: at least one level is required")
        if any(not 0.0 <= t <= 1.0 for t in self.levels):
            raise ValueError(f"ladder: levels must lie in [0, 1], got {self.levels}")
        if tuple(sorted(set(self.levels))) != self.levels:
            raise ValueError(f"ladder: levels must be increasing and distinct, got {self.levels}")
        if self.levels[-1] != 1.0:
            raise ValueError("ladder: the top level must be 1.0 (the exact model)")

    def snap(self, threshold: float) -> float:
        """The highest level ≤ ``threshold`` (snapping down keeps latency promises)."""
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must lie in [0, 1], got {threshold}")
        below = [t for t in self.levels if t <= threshold + 1e-9]
        return below[-1] if below else self.levels[0]

    def snap_up(self, threshold: float) -> float:
        """The lowest level ≥ ``threshold`` (recovery must be able to climb a coarse ladder)."""
        above = [t for t in self.levels if t >= threshold - 1e-9]
        return above[0] if above else self.levels[-1]

    @classmethod
    def parse(cls, text: str) -> ThresholdLadder:
        try:
            return cls(tuple(sorted(float(t) for t in text.split(",") if t.strip())))
        except ValueError as err:
            raise ValueError(f"ladder: {err}") from err


DEFAULT_LADDER = ThresholdLadder(tuple(round(0.1 * i, 1) for i in range(11)))


def threshold_fraction(threshold: float) -> tuple[int, int]:
    frac = fractions.Fraction(threshold).limit_denominator(1000)
    return frac.numerator, frac.denominator


def expert_counts(
    expert_ids: Int[Array, "N K"], token_mask: Bool[Array, " N"], num_experts: int
) -> Int[Array, " E"]:
    """Assignments per expert over the real tokens (bucket padding never counts)."""
    ids = jnp.where(token_mask[:, None], expert_ids, num_experts)
    return jnp.zeros(num_experts + 1, jnp.int32).at[ids.reshape(-1)].add(1)[:num_experts]


def select_hot_experts(counts: Int[Array, " E"], threshold: float) -> Bool[Array, " E"]:
    """The smallest count-ranked prefix covering ``threshold`` of all assignments."""
    num, den = threshold_fraction(threshold)
    e = counts.shape[0]
    order = jnp.argsort(-counts, stable=True)  # by count, ties by lower id
    covered = jnp.cumsum(counts[order]) * den
    need = num * jnp.sum(counts)
    # First prefix length whose coverage reaches the need; 0 when nothing is needed.
    reached = covered >= need
    n_hot = jnp.where(need <= 0, 0, jnp.argmax(reached) + 1)
    hot_in_rank_order = jnp.arange(e) < n_hot
    return jnp.zeros(e, bool).at[order].set(hot_in_rank_order)


def route_with_brownout(
    expert_ids: Int[Array, "N K"],
    token_mask: Bool[Array, " N"],
    group_of_expert: Int[Array, " E"],
    num_groups: int,
    threshold: float,
) -> Int[Array, "N K"]:
    """Rewrites expert ids: hot experts stay, cold ones become ``E + group`` (united experts are
    stacked after the E originals)."""
    e = group_of_expert.shape[0]
    counts = expert_counts(expert_ids, token_mask, e)
    hot = select_hot_experts(counts, threshold)
    cold_active = (counts > 0) & ~hot
    cold_per_group = (
        jnp.zeros(num_groups, jnp.int32).at[group_of_expert].add(cold_active.astype(jnp.int32))
    )
    redirect = ~hot & (cold_per_group[group_of_expert] > 1)  # (E,)
    target = jnp.where(redirect, e + group_of_expert, jnp.arange(e, dtype=jnp.int32))
    return target[expert_ids].astype(jnp.int32)


def select_hot_experts_reference(counts: np.ndarray, threshold: float) -> np.ndarray:
    """Plain NumPy twin of :func:`select_hot_experts`, for tests."""
    num, den = threshold_fraction(threshold)
    order = sorted(range(len(counts)), key=lambda i: (-int(counts[i]), i))
    need = num * int(np.sum(counts))
    hot = np.zeros(len(counts), bool)
    covered = 0
    for i in order:
        if covered * den >= need:
            break
        hot[i] = True
        covered += int(counts[i])
    return hot
