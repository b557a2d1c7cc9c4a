"""``brownout-jax serve``: one engine behind two fronts, gRPC (brownout.v1) and the
OpenAI-compatible HTTP API, with one life cycle.

Both fronts listen first and answer "not serving" (gRPC health NOT_SERVING and UNAVAILABLE,
HTTP /health 503) while the engine loads and compiles every step; then both turn serving.
SIGTERM/SIGINT: both turn not serving, the engine stops admitting and drains the requests it
accepted (from either front) within the grace period, then the fronts close and the process
exits 0. A dead engine loop turns both not serving (before its requests hear of it) and fails
its requests (INTERNAL / 500); a step that fails on the device fails only its own requests.
With ``exit_when_engine_dies`` (an engine across processes, which cannot recover a lost one)
the server then closes both fronts, letting the failed requests' answers out, and returns 1.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import signal
import sys
import threading
import time

from brownout_jax.engine.requests import EngineDeadError
from brownout_jax.serve.request_limits import RequestLimits
from brownout_jax.serve.serving_state import ApiKey, ServingState


@dataclasses.dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int | None = 50051  # gRPC; 0: an ephemeral port; None: no gRPC front
    http_port: int | None = 8000  # 0: an ephemeral port; None: no HTTP front
    max_workers: int = 128  # concurrent gRPC calls served (each stream holds one)
    metrics_port: int | None = None
    grace_s: float = 30.0  # drain time on SIGTERM/SIGINT
    api_key: ApiKey | None = dataclasses.field(default=None, repr=False)
    served_model_name: str | None = None  # default: the checkpoint directory's name
    # Request size and the HTTP tokenizing pool; `serve` derives the size from the context.
    limits: RequestLimits = dataclasses.field(default_factory=RequestLimits)
    # Exit (non-zero) instead of staying up NOT_SERVING when the engine dies: across
    # processes a dead engine means a lost process, and the service cannot come back.
    exit_when_engine_dies: bool = False

    def __post_init__(self) -> None:
        if self.port is None and self.http_port is None:
            raise ValueError("--no-grpc with --no-http leaves nothing to serve")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: assume it is reachable from elsewhere


def serve(make_engine, config: ServerConfig, log=print) -> int:
    """Runs until SIGTERM/SIGINT; ``make_engine()`` builds the engine (load + compile)."""
    state = ServingState(config.api_key, config.served_model_name)
    if config.api_key is None and not is_loopback(config.host):
        log(
            f"brownout-jax: warning: serving on {config.host} without an API key: anyone who "
            "can reach the port can use the model (set BROWNOUT_JAX_API_KEY or --api-key)",
            file=sys.stderr,
            flush=True,
        )
    fronts = []
    grpc_server = http_front = None
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        if config.port is not None:
            from brownout_jax.serve.grpc_service import start_grpc_server

            grpc_server, grpc_port = start_grpc_server(
                state,
                config.host,
                config.port,
                config.max_workers,
                config.limits.max_request_bytes,
            )
            fronts.append(f"gRPC {config.host}:{grpc_port}")
        if config.http_port is not None:
            from brownout_jax.serve.http_server import HttpFront

            http_front = HttpFront(state, config.host, config.http_port, config.limits)
            http_front.start()
            fronts.append(f"HTTP http://{config.host}:{http_front.port}")
        log(f"brownout-jax: warming up; listening on {', '.join(fronts)}", flush=True)
        code = _run(make_engine, config, state, stop, fronts, log)
    except BaseException:
        # Failed (e.g. in warm-up): the caller gets its signals back. After a drain they stay
        # caught, so a repeated SIGTERM while the process exits cannot turn exit 0 into a kill.
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        raise
    finally:
        if http_front is not None:
            http_front.stop()
        if grpc_server is not None:
            grpc_server.stop(grace=5).wait()
    log("brownout-jax: stopped", flush=True)
    return code


def _run(make_engine, config: ServerConfig, state, stop, fronts, log) -> int:
    """Warm-up, serving until ``stop``, then the drain; the exit code."""
    start = time.perf_counter()
    engine = make_engine()
    # A dying engine turns both fronts not serving before its requests are failed.
    engine.on_failure(lambda _cause: state.set_serving(False))
    state.engine = engine
    if config.metrics_port is not None:
        from prometheus_client import start_http_server

        start_http_server(config.metrics_port, addr=config.host, registry=engine.metrics.registry)
    state.set_serving(True)
    log(
        f"brownout-jax serving {state.model_name} on {', '.join(fronts)} "
        f"(context {engine.max_model_len} tokens, warm-up {time.perf_counter() - start:.1f}s, "
        f"{engine.compiled_steps} steps compiled, {engine.steps_compiling} more compiling)",
        flush=True,
    )
    while not stop.wait(0.2):
        if not engine.alive:
            state.set_serving(False)
            if config.exit_when_engine_dies:
                log(
                    f"brownout-jax: the engine died: {engine.failure!r}; exiting",
                    file=sys.stderr,
                    flush=True,
                )
                return 1
    log("brownout-jax: draining", flush=True)
    state.start_draining()
    try:
        engine.shutdown(drain=True, timeout=config.grace_s)
    except TimeoutError:
        log(f"brownout-jax: drain exceeded {config.grace_s}s; cancelling the rest", flush=True)
        engine.shutdown(drain=False, timeout=10)
    except EngineDeadError as err:
        log(f"brownout-jax: engine had failed: {err}", file=sys.stderr, flush=True)
        return 1 if config.exit_when_engine_dies else 0
    return 0
