"""The ``--mesh`` setting, kept free of JAX so that building the CLI parser stays cheap.

``expert_parallel.make_mesh`` turns a :class:`MeshConfig` into a mesh.
"""

from __future__ import annotations

import argparse
import dataclasses

AXIS = "expert"


@dataclasses.dataclass(frozen=True, slots=True)
class MeshConfig:
    """The device mesh: one axis, ``expert``, over which routed experts are sharded."""

    expert: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.expert, bool) or not isinstance(self.expert, int) or self.expert < 1:
            raise ValueError(f"mesh: expert must be a positive integer, got {self.expert!r}")

    @property
    def num_devices(self) -> int:
        return self.expert

    def __str__(self) -> str:
        return f"{AXIS}={self.expert}"

    @classmethod
    def parse(cls, text: str) -> MeshConfig:
        """``"expert=4"`` → MeshConfig(expert=4)."""
        sizes: dict[str, int] = {}
        for part in text.split(","):
            name, sep, value = (s.strip() for s in part.partition("="))
            if not sep or not name:
                raise ValueError(f"mesh: expected AXIS=SIZE such as 'expert=4', got {text!r}")
            if name != AXIS:
                raise ValueError(f"mesh: unknown axis {name!r} in {text!r} (known: {AXIS})")
            if name in sizes:
                raise ValueError(f"mesh: axis {name!r} given twice in {text!r}")
            try:
                sizes[name] = int(value)
            except ValueError:
                message = f"mesh: size of {name!r} must be an integer, got {value!r}"
                raise ValueError(message) from None
        return cls(**sizes)


def mesh_from_arg(text: str | None) -> MeshConfig | None:
    """``--mesh`` value → MeshConfig; None or empty → None (one device, no mesh)."""
    if text is None or not text.strip():
        return None
    return MeshConfig.parse(text)


def _mesh_type(text: str) -> MeshConfig | None:
    try:
        return mesh_from_arg(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def add_mesh_argument(parser: argparse.ArgumentParser) -> None:
    """Adds ``--mesh expert=N`` to a parser (or argument group); ``args.mesh`` is then a
    MeshConfig or None. A bad value exits with status 2 and the reason, as argparse does."""
    parser.add_argument(
        "--mesh",
        type=_mesh_type,
        default=None,
        metavar="expert=N",
        help="shard routed and united experts over N devices (expert parallelism)",
    )
