"""Regenerates brownout_pb2.py / brownout_pb2_grpc.py from brownout.proto.

    python -m brownout_jax.serve.generate_stubs

protoc runs on a copy laid out as ``brownout_jax/serve/brownout.proto`` so that the generated
gRPC module imports ``brownout_jax.serve.brownout_pb2`` (the installed package path).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    from grpc_tools import protoc  # dev dependency (grpcio-tools)

    with tempfile.TemporaryDirectory() as tmp:
        package = Path(tmp) / "brownout_jax" / "serve"
        package.mkdir(parents=True)
        shutil.copy(HERE / "brownout.proto", package / "brownout.proto")
        code = protoc.main(
            [
                "protoc",
                f"-I{tmp}",
                f"--python_out={tmp}",
                f"--grpc_python_out={tmp}",
                f"--pyi_out={tmp}",
                str(package / "brownout.proto"),
            ]
        )
        if code:
            raise SystemExit(f"protoc failed with exit code {code}")
        for name in ("brownout_pb2.py", "brownout_pb2.pyi", "brownout_pb2_grpc.py"):
            shutil.copy(package / name, HERE / name)


if __name__ == "__main__":
    main()
