"""``brownout-jax``: serve, generate, convert, unite, bench and eval a MoE model with brownout."""

from __future__ import annotations

import argparse
import sys

from brownout_jax.cli import bench, convert, generate, serve, unite
from brownout_jax.cli.evaluate import add_eval_parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="brownout-jax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for command in (generate, convert, unite, bench, serve):
        command.add_parser(sub)
    add_eval_parser(sub)
    return parser


def enable_compilation_cache() -> None:
    """Persist compiled steps across runs (a restarted server warms up from disk) unless the
    user chose a cache directory (JAX_COMPILATION_CACHE_DIR) or none
    (BROWNOUT_JAX_XLA_CACHE=off)."""
    import os

    if os.environ.get("BROWNOUT_JAX_XLA_CACHE", "").lower() == "off":
        return
    if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
        import jax

        cache = os.path.join(os.path.expanduser("~"), ".cache", "brownout-jax", "xla")
        jax.config.update("jax_compilation_cache_dir", cache)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    enable_compilation_cache()
    from brownout_jax.checkpoints.errors import CheckpointError
    from brownout_jax.eval.tasks import TaskFormatError
    from brownout_jax.model.config import UnsupportedConfigError
    from brownout_jax.united.calibration import CalibrationDataError

    try:
        return args.run(args)
    except (
        CheckpointError,
        TaskFormatError,
        UnsupportedConfigError,
        CalibrationDataError,
        ValueError,
        FileNotFoundError,
    ) as err:
        print(f"brownout-jax {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"brownout-jax {args.command}: interrupted", file=sys.stderr)
        return 130
