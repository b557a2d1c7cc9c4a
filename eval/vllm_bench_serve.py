"""vLLM's own serve benchmark (``vllm bench serve``), run inside vLLM's interpreter:
``PEER_PYTHON vllm_bench_serve.py [bench serve flags]``.

vLLM 0.32 has no ``python -m`` entry for it, and its ``vllm`` console script fails in this
install (PackageNotFoundError), so this calls the same parser and ``main`` as
``vllm.entrypoints.cli.benchmark.serve`` does. Standard library and vLLM only: the peer's venv
has no brownout_jax, and the project never depends on vLLM.
"""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    from vllm.benchmarks.serve import add_cli_args
    from vllm.benchmarks.serve import main as bench_main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(prog="vllm bench serve")
    add_cli_args(parser)
    bench_main(parser.parse_args(argv))
    return 0


if __name__ == "__main__":  # vLLM may spawn processes that re-import this file
    sys.exit(main(sys.argv[1:]))
