"""The brownout.v1 gRPC server: Generation service, standard health, reflection, metrics.

Life cycle: the gRPC server starts first with health NOT_SERVING (so probes see a warming
server, and calls get UNAVAILABLE), then the engine loads and compiles every step, then health
turns SERVING. SIGTERM/SIGINT: health NOT_SERVING, the engine stops admitting and drains the
requests it accepted within the grace period, then the server stops and the process exits 0.
A dead engine loop turns health NOT_SERVING and fails its requests with INTERNAL.
"""

from __future__ import annotations

import dataclasses
import signal
import sys
import threading
import time
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from brownout_jax.requests import (
    EngineClosedError,
    EngineDeadError,
    EngineOverloadedError,
    FinishReason,
    GenerationRequest,
    RequestError,
    RequestMetrics,
    TokenEvent,
)
from brownout_jax.serve import brownout_pb2 as pb
from brownout_jax.serve import brownout_pb2_grpc as pb_grpc

SERVICE = "brownout.v1.Generation"


@dataclasses.dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051  # 0: an ephemeral port, printed when ready
    max_workers: int = 128  # concurrent RPCs served (each stream holds one)
    metrics_port: int | None = None
    grace_s: float = 30.0  # drain time on SIGTERM/SIGINT


def request_from_proto(message: pb.GenerateRequest) -> GenerationRequest:
    if message.prompt and message.prompt_token_ids:
        raise RequestError("prompt", "give either prompt or prompt_token_ids, not both")
    return GenerationRequest(
        prompt_token_ids=tuple(message.prompt_token_ids),
        prompt=message.prompt if not message.prompt_token_ids else None,
        max_new_tokens=message.max_tokens,
        temperature=message.temperature,
        top_k=message.top_k,
        top_p=message.top_p if message.HasField("top_p") else 1.0,
        seed=message.seed,
        stop=tuple(message.stop),
        stop_token_ids=tuple(message.stop_token_ids),
        ignore_eos=message.ignore_eos,
        request_id=message.request_id if message.HasField("request_id") else None,
    )


def _timing(metrics: RequestMetrics) -> pb.Timing:
    return pb.Timing(
        ttft_s=metrics.ttft or 0.0,
        tpot_s=metrics.tpot_mean or 0.0,
        queue_s=metrics.queue_time or 0.0,
        e2e_s=metrics.e2e or 0.0,
    )


class GenerationService(pb_grpc.GenerationServicer):
    def __init__(self, health_servicer: health.HealthServicer):
        self.engine = None  # set once warm-up is done
        self.health = health_servicer
        self.draining = False

    # -- helpers

    def _engine_or_abort(self, context):
        if self.engine is None:
            context.abort(grpc.StatusCode.UNAVAILABLE, "the server is warming up")
        return self.engine

    def _submit(self, request: pb.GenerateRequest, context):
        engine = self._engine_or_abort(context)
        try:
            handle = engine.submit(request_from_proto(request))
        except RequestError as err:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        except EngineOverloadedError as err:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{err}; retry later")
        except EngineClosedError as err:
            context.abort(grpc.StatusCode.UNAVAILABLE, str(err))
        except EngineDeadError as err:
            self.mark_not_serving()
            context.abort(grpc.StatusCode.INTERNAL, str(err))
        # A cancelled or expired RPC stops its generation and frees its KV blocks.
        context.add_callback(handle.cancel)
        return handle

    def _events(self, handle, context):
        for event in handle.events():
            if event.finish_reason is FinishReason.ERROR:
                self.mark_not_serving()
                context.abort(grpc.StatusCode.INTERNAL, event.error or "generation failed")
            yield event

    def mark_not_serving(self) -> None:
        self.health.set(SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
        self.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)

    @staticmethod
    def _response(handle, event: TokenEvent, text: str, ids, logprobs) -> pb.GenerateResponse:
        response = pb.GenerateResponse(
            request_id=handle.request_id,
            text=text,
            token_ids=ids,
            logprobs=logprobs,
            thresholds=pb.Thresholds(prefill=event.thresholds[0], decode=event.thresholds[1]),
        )
        if event.finish_reason is not None:
            metrics = handle.metrics
            response.finish_reason = event.finish_reason.value
            response.usage.CopyFrom(
                pb.Usage(
                    prompt_tokens=metrics.prompt_tokens, completion_tokens=metrics.completion_tokens
                )
            )
            response.timing.CopyFrom(_timing(metrics))
        return response

    # -- RPCs

    def Generate(self, request, context):
        handle = self._submit(request, context)
        for event in self._events(handle, context):
            ids = [event.token_id] if event.token_id is not None else []
            logprobs = [event.logprob] if event.logprob is not None else []
            yield self._response(handle, event, event.text, ids, logprobs)

    def GenerateUnary(self, request, context):
        handle = self._submit(request, context)
        ids, logprobs, text, last = [], [], [], None
        for event in self._events(handle, context):
            if event.token_id is not None:
                ids.append(event.token_id)
                logprobs.append(event.logprob)
            text.append(event.text)
            last = event
        return self._response(handle, last, "".join(text), ids, logprobs)

    def GetStatus(self, request, context):
        engine = self._engine_or_abort(context)
        stats = engine.stats()
        return pb.StatusResponse(
            model=engine.model_name,
            prefill_threshold=stats.prefill_threshold,
            decode_threshold=stats.decode_threshold,
            controller_mode=stats.controller_mode,
            slo_ttft_s=stats.slo_ttft_s,
            slo_tpot_s=stats.slo_tpot_s,
            queue_depth=stats.waiting,
            running=stats.running,
            kv_blocks_used=stats.kv_blocks_used,
            kv_blocks_total=stats.kv_blocks_total,
            prefill_slo_attainment=_or(stats.prefill_slo_attainment, -1.0),
            decode_slo_attainment=_or(stats.decode_slo_attainment, -1.0),
            preemptions=stats.preemptions,
            warmup_s=stats.compile_seconds,
            compiled_steps=stats.compiled_steps,
        )


def _or(value, default):
    return default if value is None else value


def serve(make_engine, config: ServerConfig, log=print) -> int:
    """Runs until SIGTERM/SIGINT; ``make_engine()`` builds the engine (load + compile)."""
    health_servicer = health.HealthServicer()
    service = GenerationService(health_servicer)
    service.mark_not_serving()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=config.max_workers))
    pb_grpc.add_GenerationServicer_to_server(service, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (
            pb.DESCRIPTOR.services_by_name["Generation"].full_name,
            health.SERVICE_NAME,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    port = server.add_insecure_port(f"{config.host}:{config.port}")
    if port == 0:
        raise OSError(f"cannot bind {config.host}:{config.port}")
    server.start()
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())

    start = time.perf_counter()
    engine = make_engine()
    service.engine = engine
    if config.metrics_port is not None:
        from prometheus_client import start_http_server

        start_http_server(config.metrics_port, addr=config.host, registry=engine.metrics.registry)
    health_servicer.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    log(
        f"brownout-jax serving {engine.model_name} on {config.host}:{port} "
        f"(warm-up {time.perf_counter() - start:.1f}s, {engine.compiled_steps} steps compiled)",
        flush=True,
    )
    while not stop.wait(0.2):
        if not engine.alive:
            service.mark_not_serving()
    log("brownout-jax: draining", flush=True)
    service.mark_not_serving()
    try:
        engine.shutdown(drain=True, timeout=config.grace_s)
    except TimeoutError:
        log(f"brownout-jax: drain exceeded {config.grace_s}s; cancelling the rest", flush=True)
        engine.shutdown(drain=False, timeout=10)
    except EngineDeadError as err:
        log(f"brownout-jax: engine had failed: {err}", file=sys.stderr, flush=True)
    server.stop(grace=5).wait()
    log("brownout-jax: stopped", flush=True)
    return 0
