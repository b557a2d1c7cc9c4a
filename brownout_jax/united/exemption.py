"""Which MoE layers never brown out: the reference's edge rule, a list, or a measured choice.

Brownout hurts some layers more than others. ``brownout-jax eval sensitivity`` browns out one
MoE layer at a time (the others exact) and measures, per layer, the KL divergence from the exact
model it causes and the routed-expert bytes it saves; layers are ranked by KL removed per byte
kept if exempted, and the ranking is stored in the united experts' manifest (key
``exemption``) so that ``serve``, ``generate`` and ``eval`` apply the same choice.

``--exempt-layers`` takes ``auto`` (the stored choice with its K), ``auto:K`` (the first K of the
stored ranking) or a comma list of layer indices; ``--exempt-edge-layers N`` keeps the rule of
the reference implementation (the first and last N MoE layers). No JAX here: the CLI resolves
the flags before a model is loaded.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path

MANIFEST_KEY = "exemption"


@dataclasses.dataclass(frozen=True, slots=True)
class LayerSensitivity:
    """One MoE layer browned out alone at a threshold, every other layer exact."""

    layer: int
    kl: float  # mean KL(exact ‖ browned) per scored token, nats
    kl_stderr: float
    bytes_saved_per_token: float  # routed-expert weight bytes not read, per scored token

    @property
    def kl_per_byte(self) -> float:
        """KL removed per byte kept by exempting this layer; a layer that saves nothing is
        free to exempt (infinite)."""
        if self.bytes_saved_per_token <= 0:
            return math.inf
        return self.kl / self.bytes_saved_per_token


def rank_layers(sensitivities: Sequence[LayerSensitivity]) -> tuple[int, ...]:
    """Layers by KL removed per byte kept, most first (ties: more KL first, then lower id)."""
    ordered = sorted(sensitivities, key=lambda s: (-s.kl_per_byte, -s.kl, s.layer))
    return tuple(s.layer for s in ordered)


@dataclasses.dataclass(frozen=True, slots=True)
class ExemptionChoice:
    """A ranking of MoE layers measured at one threshold, and how many ``auto`` exempts."""

    threshold: float
    k: int
    ranking: tuple[int, ...]
    layers: tuple[LayerSensitivity, ...]
    text: str  # the text the sensitivity was measured on

    def __post_init__(self) -> None:
        if not 0 <= self.k <= len(self.ranking):
            raise ValueError(f"exemption: k must lie in [0, {len(self.ranking)}], got {self.k}")

    def exempt(self, k: int | None = None) -> tuple[int, ...]:
        k = self.k if k is None else k
        if not 0 <= k <= len(self.ranking):
            raise ValueError(
                f"--exempt-layers auto:{k}: the stored ranking has {len(self.ranking)} layers"
            )
        return tuple(sorted(self.ranking[:k]))

    def to_manifest(self) -> dict:
        return {
            "threshold": self.threshold,
            "k": self.k,
            "ranking": list(self.ranking),
            "layers": [dataclasses.asdict(s) for s in self.layers],
            "text": self.text,
            "rule": "KL removed per byte kept, one layer browned out at a time",
        }

    @classmethod
    def from_manifest(cls, record: dict, where: str) -> ExemptionChoice:
        try:
            return cls(
                threshold=float(record["threshold"]),
                k=int(record["k"]),
                ranking=tuple(int(layer) for layer in record["ranking"]),
                layers=tuple(LayerSensitivity(**s) for s in record.get("layers", ())),
                text=str(record.get("text", "")),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{where}: malformed '{MANIFEST_KEY}' entry ({err})") from err


def edge_layers(moe_layers: Sequence[int], k: int) -> tuple[int, ...]:
    """The reference implementation's rule for K exempt layers: the first ⌈K/2⌉ and the last
    ⌊K/2⌋ MoE layers (K = 4 of 24: layers 0, 1, 22, 23)."""
    if not 0 <= k <= len(moe_layers):
        raise ValueError(f"exempt layers: K must lie in [0, {len(moe_layers)}], got {k}")
    first = -(-k // 2)
    return tuple(sorted(set(moe_layers[:first]) | set(moe_layers[len(moe_layers) - k // 2 :])))


def stored_choice(manifest: dict | None, united_dir: str | Path | None) -> ExemptionChoice | None:
    if manifest is None or MANIFEST_KEY not in manifest:
        return None
    return ExemptionChoice.from_manifest(manifest[MANIFEST_KEY], f"{united_dir}")


def resolve_exempt_layers(
    spec: str | None,
    edge_per_side: int,
    moe_layers: Sequence[int],
    manifest: dict | None = None,
    united_dir: str | Path | None = None,
) -> tuple[int, ...]:
    """``--exempt-layers SPEC`` / ``--exempt-edge-layers N`` → the exempt MoE layers."""
    if edge_per_side < 0:
        raise ValueError(f"--exempt-edge-layers must be ≥ 0, got {edge_per_side}")
    if spec is None or not spec.strip():
        return edge_layers(moe_layers, min(2 * edge_per_side, len(moe_layers)))
    if edge_per_side:
        raise ValueError("give either --exempt-layers or --exempt-edge-layers, not both")
    spec = spec.strip()
    if spec == "auto" or spec.startswith("auto:"):
        k = None
        if spec != "auto":
            try:
                k = int(spec.removeprefix("auto:"))
            except ValueError:
                raise ValueError(
                    f"--exempt-layers: expected auto or auto:K, got {spec!r}"
                ) from None
        if manifest is None:
            raise ValueError("--exempt-layers auto needs united experts (--united DIR)")
        choice = stored_choice(manifest, united_dir)
        if choice is None:
            raise ValueError(
                f"--exempt-layers {spec}: {united_dir} stores no exemption choice; measure one "
                f"with `brownout-jax eval sensitivity --united {united_dir} --save K`"
            )
        layers = choice.exempt(k)
    else:
        try:
            layers = tuple(sorted({int(t) for t in spec.split(",") if t.strip()}))
        except ValueError:
            raise ValueError(
                f"--exempt-layers: expected auto, auto:K or layer indices such as 0,3; got {spec!r}"
            ) from None
    unknown = [layer for layer in layers if layer not in moe_layers]
    if unknown:
        raise ValueError(f"--exempt-layers: {unknown} are not MoE layers ({list(moe_layers)})")
    return layers


def add_exempt_arguments(group) -> None:
    """``--exempt-layers`` and ``--exempt-edge-layers`` on an argparse group."""
    group.add_argument(
        "--exempt-layers",
        default=None,
        help="MoE layers that never brown out: auto (the choice stored with the united "
        "experts by `eval sensitivity --save`), auto:K (its first K) or a list such as 0,3",
    )
    group.add_argument(
        "--exempt-edge-layers",
        type=int,
        default=0,
        help="never brown out the first and last N MoE layers (the reference uses 2)",
    )
