"""A small client of the brownout.v1 service (used by ``brownout-jax generate --server``)."""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from brownout_jax.serve import brownout_pb2 as pb
from brownout_jax.serve import brownout_pb2_grpc as pb_grpc


class GenerationClient:
    def __init__(self, target: str, api_key: str | None = None):
        self.channel = grpc.insecure_channel(target)
        self.stub = pb_grpc.GenerationStub(self.channel)
        # The server's --api-key, sent as call metadata on every call.
        self._metadata = None if api_key is None else (("authorization", f"Bearer {api_key}"),)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> GenerationClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def wait_ready(self, timeout: float) -> None:
        grpc.channel_ready_future(self.channel).result(timeout=timeout)

    def stream(self, request: pb.GenerateRequest, timeout: float | None = None) -> Iterator:
        """GenerateResponse per token; the last carries finish_reason, usage and timing."""
        return self.stub.Generate(request, timeout=timeout, metadata=self._metadata)

    def generate(self, request: pb.GenerateRequest, timeout: float | None = None):
        return self.stub.GenerateUnary(request, timeout=timeout, metadata=self._metadata)

    def status(self, timeout: float | None = None) -> pb.StatusResponse:
        return self.stub.GetStatus(pb.StatusRequest(), timeout=timeout, metadata=self._metadata)
