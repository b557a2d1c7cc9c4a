"""The brownout.v1 gRPC front: the Generation service, standard health, reflection and the
optional API key check. Its life cycle (warm-up, drain) is serve/server.py's.

While the engine warms up calls get UNAVAILABLE and health says NOT_SERVING; a dead engine
loop turns health NOT_SERVING (on both fronts) and fails its requests with INTERNAL. A request
whose step failed on the device gets RESOURCE_EXHAUSTED (out of memory) or INTERNAL with the
step's error, and the server serves on.

Bounds: a request message over ``max_request_bytes`` (``--max-request-bytes``) is refused by
gRPC itself with RESOURCE_EXHAUSTED before it is deserialized; prompt text too long for the
context is INVALID_ARGUMENT naming ``prompt`` before it is tokenized (``Engine.submit``).
"""

from __future__ import annotations

from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from brownout_jax.engine.requests import (
    BrownoutClass,
    EngineClosedError,
    EngineDeadError,
    EngineOverloadedError,
    FinishReason,
    GenerationRequest,
    RequestError,
    RequestMetrics,
    StepFailureKind,
    StructuredKind,
    StructuredOutput,
    TokenEvent,
)
from brownout_jax.serve import brownout_pb2 as pb
from brownout_jax.serve import brownout_pb2_grpc as pb_grpc
from brownout_jax.serve.request_limits import GRPC_DEFAULT_MAX_RECEIVE
from brownout_jax.serve.serving_state import ApiKey, ServingState

SERVICE = "brownout.v1.Generation"


# The engine names a field as the OpenAI API does; gRPC's own name where it differs.
_FIELD_NAMES = {"logprobs": "top_logprobs"}


def _structured(message: pb.GenerateRequest) -> StructuredOutput | None:
    kind = message.WhichOneof("structured")
    if kind is None:
        return None
    if kind == "json_object":
        return StructuredOutput(StructuredKind.JSON_OBJECT)
    if kind == "choice":
        return StructuredOutput(StructuredKind.CHOICE, choices=tuple(message.choice.choices))
    spec = getattr(message, kind)
    kinds = {
        "json_schema": StructuredKind.JSON_SCHEMA,
        "regex": StructuredKind.REGEX,
        "grammar": StructuredKind.GRAMMAR,
    }
    return StructuredOutput(kinds[kind], spec)


def field_name(err: RequestError, message: pb.GenerateRequest) -> str:
    """The request field the engine's verdict is about, as this API names it."""
    if err.field == "structured":
        return message.WhichOneof("structured") or err.field
    return _FIELD_NAMES.get(err.field, err.field)


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
        # proto3's unset string is "": the default class. A bad name is refused by the
        # engine's validation (INVALID_ARGUMENT naming the field).
        brownout=message.brownout or BrownoutClass.ALLOWED,
        detokenize=not message.token_ids_only,
        top_logprobs=message.top_logprobs,
        prompt_logprobs=(message.prompt_logprobs if message.HasField("prompt_logprobs") else None),
        presence_penalty=message.presence_penalty,
        frequency_penalty=message.frequency_penalty,
        repetition_penalty=(
            message.repetition_penalty if message.HasField("repetition_penalty") else 1.0
        ),
        logit_bias=tuple(sorted(message.logit_bias.items())),  # a map has no order
        min_p=message.min_p,
        min_tokens=message.min_tokens,
        structured=_structured(message),
    )


def _alternatives(top) -> pb.Alternatives:
    return pb.Alternatives(token_ids=[t for t, _ in top], logprobs=[v for _, v in top])


def _prompt_logprobs(prompt) -> list[pb.PromptLogprob]:
    """The prompt's logprobs from its second token (the first has none)."""
    return [
        pb.PromptLogprob(token_id=e.token_id, logprob=e.logprob, top=_alternatives(e.top))
        for e in prompt
        if e is not None
    ]


def _timing(metrics: RequestMetrics) -> pb.Timing:
    return pb.Timing(
        ttft_s=metrics.ttft or 0.0,
        tpot_s=metrics.tpot_mean or 0.0,
        queue_s=metrics.queue_time or 0.0,
        e2e_s=metrics.e2e or 0.0,
    )


class GenerationService(pb_grpc.GenerationServicer):
    def __init__(self, state: ServingState):
        self.state = state

    # -- helpers

    def _engine_or_abort(self, context):
        if self.state.engine is None:
            context.abort(grpc.StatusCode.UNAVAILABLE, "the server is warming up")
        return self.state.engine

    def _submit(self, request: pb.GenerateRequest, context):
        engine = self._engine_or_abort(context)
        try:
            handle = engine.submit(request_from_proto(request))
        except RequestError as err:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"{field_name(err, request)}: {err.message}"
            )
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
            if event.finish_reason is FinishReason.ERROR and event.step_failure is not None:
                # This request's step failed; the engine serves on: health stays SERVING.
                oom = event.step_failure is StepFailureKind.OUT_OF_MEMORY
                code = grpc.StatusCode.RESOURCE_EXHAUSTED if oom else grpc.StatusCode.INTERNAL
                context.abort(code, f"{event.error}; the server serves on")
            if event.finish_reason is FinishReason.ERROR:
                self.mark_not_serving()
                context.abort(grpc.StatusCode.INTERNAL, event.error or "generation failed")
            yield event

    def mark_not_serving(self) -> None:
        self.state.set_serving(False)

    @staticmethod
    def _response(
        handle, event: TokenEvent, text: str, ids, logprobs, tops=(), prompt=None
    ) -> pb.GenerateResponse:
        """``tops``: each token's alternatives; ``prompt``: the prompt's logprobs (first)."""
        response = pb.GenerateResponse(
            request_id=handle.request_id,
            text=text,
            token_ids=ids,
            logprobs=logprobs,
            thresholds=pb.Thresholds(
                prefill=event.thresholds.prefill, decode=event.thresholds.decode
            ),
        )
        if handle.request.top_logprobs:
            response.top_logprobs.extend(_alternatives(top) for top in tops)
        if prompt is not None:
            response.prompt_logprobs.extend(_prompt_logprobs(prompt))
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
            token = event.token_id is not None
            ids = [event.token_id] if token else []
            logprobs = [event.logprob] if event.logprob is not None else []
            tops = [event.top_logprobs] if token else []
            yield self._response(
                handle, event, event.text, ids, logprobs, tops, event.prompt_logprobs
            )

    def GenerateUnary(self, request, context):
        handle = self._submit(request, context)
        ids, logprobs, tops, text, last, prompt = [], [], [], [], None, None
        for event in self._events(handle, context):
            if event.token_id is not None:
                ids.append(event.token_id)
                logprobs.append(event.logprob)
                tops.append(event.top_logprobs)
            if event.prompt_logprobs is not None:
                prompt = event.prompt_logprobs
            text.append(event.text)
            last = event
        return self._response(handle, last, "".join(text), ids, logprobs, tops, prompt)

    def GetStatus(self, request, context):
        engine = self._engine_or_abort(context)
        stats = engine.stats()
        return pb.StatusResponse(
            model=self.state.model_name,
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
            steps_compiling=stats.steps_compiling,
            step_latency=[
                pb.StepLatency(
                    phase=entry.phase,
                    level=entry.level,
                    rows=entry.bucket.batch,
                    size=entry.bucket.size,
                    base_s=entry.base_s,
                    predicted_s=entry.predicted_s,
                    predicted_p90_s=entry.predicted_p90_s,
                )
                for entry in stats.latency
            ],
            dense_paths=[
                pb.DensePath(
                    k=entry.k,
                    n=entry.n,
                    packed=entry.packed,
                    max_rows=entry.max_rows,
                    path=entry.path.value,
                )
                for entry in stats.dense_paths
            ],
            processes=stats.processes,
            local_devices=stats.local_devices,
            plan_broadcast_s=_or(stats.plan_broadcast_p50_s, -1.0),
        )


def _or(value, default):
    return default if value is None else value


class ApiKeyInterceptor(grpc.ServerInterceptor):
    """Refuses Generation calls without ``authorization: Bearer KEY`` metadata with
    UNAUTHENTICATED; health and reflection stay open (probes carry no key)."""

    def __init__(self, api_key: ApiKey):
        self._api_key = api_key

        def deny(request, context):
            context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "missing or wrong API key: send call metadata authorization: Bearer KEY",
            )

        self._deny = deny

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None or not details.method.startswith(f"/{SERVICE}/"):
            return handler
        metadata = dict(details.invocation_metadata or ())
        if self._api_key.accepts(metadata.get("authorization")):
            return handler
        make = (
            grpc.unary_stream_rpc_method_handler
            if handler.response_streaming
            else grpc.unary_unary_rpc_method_handler
        )
        return make(
            self._deny,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


def start_grpc_server(
    state: ServingState,
    host: str,
    port: int,
    max_workers: int,
    max_request_bytes: int = GRPC_DEFAULT_MAX_RECEIVE,
):
    """The Generation service, health and reflection, started; returns (server, bound port).
    A request message over ``max_request_bytes`` is RESOURCE_EXHAUSTED (gRPC's own check)."""
    health_servicer = health.HealthServicer()

    def publish(serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        health_servicer.set(SERVICE, status)
        health_servicer.set("", status)

    state.on_change(publish)
    interceptors = [] if state.api_key is None else [ApiKeyInterceptor(state.api_key)]
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers),
        interceptors=interceptors,
        options=[("grpc.max_receive_message_length", max_request_bytes)],
    )
    pb_grpc.add_GenerationServicer_to_server(GenerationService(state), server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (
            pb.DESCRIPTOR.services_by_name["Generation"].full_name,
            health.SERVICE_NAME,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"gRPC: cannot bind {host}:{port}")
    server.start()
    return server, bound
