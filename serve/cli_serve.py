"""``brownout-jax serve``'s front flags (HTTP, gRPC, API key) and its ServerConfig. Imports
nothing heavy, so that building the CLI parser stays cheap."""

from __future__ import annotations

import os

from brownout_jax.serve.request_limits import (
    BYTES_PER_TOKEN,
    FIELDS_ALLOWANCE,
    RequestLimits,
    default_max_request_bytes,
)
from brownout_jax.serve.serving_state import API_KEY_ENV, ApiKey


def add_http_arguments(p) -> None:
    group = p.add_argument_group("fronts")
    group.add_argument(
        "--http-port",
        type=int,
        default=8000,
        help="OpenAI-compatible HTTP API port (/v1/completions, /v1/chat/completions, "
        "/v1/models, /health, /metrics); 0 = an ephemeral port",
    )
    group.add_argument("--no-http", action="store_true", help="serve gRPC only")
    group.add_argument("--no-grpc", action="store_true", help="serve HTTP only")
    group.add_argument(
        "--api-key",
        help=f"require Authorization: Bearer KEY on both fronts (default: ${API_KEY_ENV}; "
        "prefer the variable, a command line is visible to every user of the machine)",
    )
    group.add_argument(
        "--max-request-bytes",
        type=int,
        help="largest request accepted: an HTTP body over it gets 413 before it is read, a gRPC "
        f"message RESOURCE_EXHAUSTED (default: {BYTES_PER_TOKEN} bytes per token of the context "
        f"limit, --max-model-len or the model's, + {FIELDS_ALLOWANCE >> 20} MiB for the other "
        "fields)",
    )
    group.add_argument(
        "--served-model-name",
        help="the model name clients send and /v1/models lists (default: the checkpoint "
        "directory's name)",
    )


def api_key_from(flag: str | None) -> ApiKey | None:
    secret = flag if flag is not None else os.environ.get(API_KEY_ENV)
    return None if secret is None else ApiKey(secret)


def request_limits_from_args(args, max_model_len: int | None) -> RequestLimits:
    """``max_model_len``: the engine's context limit (None: not known yet, gRPC's default)."""
    size = args.max_request_bytes
    if size is None:
        if max_model_len is None:
            return RequestLimits()
        size = default_max_request_bytes(max_model_len)
    try:
        return RequestLimits(size)
    except ValueError as err:
        raise ValueError(f"--max-request-bytes: {err}") from None


def server_config_from_args(args, max_model_len: int | None = None):
    """``max_model_len``: the context limit the request size derives from (see
    ``request_limits_from_args``)."""
    from brownout_jax.serve.server import ServerConfig

    return ServerConfig(
        host=args.host,
        port=None if args.no_grpc else args.port,
        http_port=None if args.no_http else args.http_port,
        metrics_port=args.metrics_port,
        grace_s=args.grace,
        api_key=api_key_from(args.api_key),
        served_model_name=args.served_model_name,
        limits=request_limits_from_args(args, max_model_len),
    )
