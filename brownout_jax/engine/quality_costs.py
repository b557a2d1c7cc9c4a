"""What each brownout level gives up, per phase: the quality side of the controller's choice.

Measured: ``eval quality --store`` writes, into the united experts' manifest (key
``quality_cost``), the mean KL(exact ‖ browned) per generated token of each measured threshold,
for prefill-only and decode-only brownout (rows of full brownout stand in for a phase measured
on its own). A level between measured thresholds costs the straight line between them; the
exact level (1) costs 0.

Not measured (dummy weights, a set never evaluated): the ladder position, 1 − level. Only the
order of the costs matters to the controller's choice, and that default orders levels as the
paper's rule does; the expected KL of a run is then unknown (None). No JAX.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterable

from brownout_jax.engine.phase import Phase

MANIFEST_KEY = "quality_cost"

Curve = tuple[tuple[float, float], ...]  # (threshold, KL nats per token), increasing thresholds


def _curve(points: Iterable[tuple[float, float]]) -> Curve:
    curve = dict((float(t), float(kl)) for t, kl in points)
    if any(not 0.0 <= t <= 1.0 for t in curve):
        raise ValueError(f"quality costs: thresholds must lie in [0, 1], got {sorted(curve)}")
    if any(not kl >= 0.0 for kl in curve.values()):  # NaN fails too
        raise ValueError(f"quality costs: KL must be ≥ 0, got {sorted(curve.values())}")
    curve[1.0] = 0.0  # the exact model gives nothing up, whatever was measured there
    return tuple(sorted(curve.items()))


@dataclasses.dataclass(frozen=True, slots=True)
class QualityCosts:
    prefill: Curve = ()  # empty: not measured
    decode: Curve = ()
    source: str = ""  # what they were measured on

    def __post_init__(self) -> None:
        for name in ("prefill", "decode"):
            if getattr(self, name):
                object.__setattr__(self, name, _curve(getattr(self, name)))

    def measured(self, phase: Phase) -> bool:
        return any(t < 1.0 for t, _ in self.curve(phase))

    def curve(self, phase: Phase) -> Curve:
        return self.prefill if phase == Phase.PREFILL else self.decode

    def kl(self, phase: Phase, level: float) -> float | None:
        """Mean KL per token of a step of ``phase`` at ``level``; None: not measured."""
        curve = self.curve(phase)
        if not self.measured(phase):
            return None
        if level <= curve[0][0]:
            return curve[0][1]
        for (t0, k0), (t1, k1) in itertools.pairwise(curve):
            if level <= t1:
                return k0 + (k1 - k0) * (level - t0) / (t1 - t0)
        return 0.0

    def cost(self, phase: Phase, level: float) -> float:
        """What the controller minimises: the measured KL, else the ladder position."""
        kl = self.kl(phase, level)
        return max(0.0, 1.0 - level) if kl is None else kl

    def to_manifest(self) -> dict:
        return {
            "kl_mean": {
                "prefill": [list(p) for p in self.prefill],
                "decode": [list(p) for p in self.decode],
            },
            "source": self.source,
        }

    @classmethod
    def from_manifest(cls, manifest: dict | None) -> QualityCosts:
        """The costs stored in a united-experts manifest; the default when it has none."""
        entry = (manifest or {}).get(MANIFEST_KEY)
        if not entry:
            return cls()
        try:
            curves = entry["kl_mean"]
            return cls(
                tuple(map(tuple, curves.get("prefill", ()))),
                tuple(map(tuple, curves.get("decode", ()))),
                str(entry.get("source", "")),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"united manifest: unreadable {MANIFEST_KEY!r} ({err})") from None

    @classmethod
    def from_quality_rows(cls, rows: Iterable[dict], source: str = "") -> QualityCosts:
        """From ``eval quality`` rows of one united set (``QualityRow`` as dicts): each phase's
        own rows, or full-brownout rows where a phase was not measured on its own."""
        rows = list(rows)

        def points(phase: Phase) -> list[tuple[float, float]]:
            own = [r for r in rows if r["phase"] == phase.value]
            both = [r for r in rows if r["phase"] == "both"]
            return [(r["threshold"], r["kl_mean"]) for r in (own or both)]

        return cls(tuple(points(Phase.PREFILL)), tuple(points(Phase.DECODE)), source)

    def merged_into(self, stored: QualityCosts) -> QualityCosts:
        """These costs, with ``stored``'s curve for a phase these did not measure."""
        prefill = self.prefill if self.measured(Phase.PREFILL) else stored.prefill
        decode = self.decode if self.measured(Phase.DECODE) else stored.decode
        return QualityCosts(prefill, decode, self.source)


DEFAULT_QUALITY_COSTS = QualityCosts()
