"""OpenAI request bodies → the engine's ``GenerationRequest``, and the engine's verdicts back
to the client's field names.

Range and length checks are not repeated here: the engine validates every request with
``brownout_jax.engine.requests.validate_request`` (the gRPC front's path too), and ``client_error``
renames the field its ``RequestError`` names; ``step_error`` words a step's device failure.
What is decided here is only what the OpenAI surface adds: which of its fields this server
cannot honour, and how a prompt is written.
"""

from __future__ import annotations

import dataclasses
import secrets

from brownout_jax.engine.requests import (
    FinishReason,
    GenerationRequest,
    RequestError,
    StepFailureKind,
    check_prompt_text,
)
from brownout_jax.serve.openai_protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    GenerationFields,
    OpenAIError,
)

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's documented default for /v1/completions


@dataclasses.dataclass(frozen=True, slots=True)
class PreparedRequest:
    generation: GenerationRequest
    field_names: tuple[tuple[str, str], ...]  # (engine field, client field) renames
    logprobs: bool  # report the chosen token's logprob
    stream: bool
    include_usage: bool  # a streamed usage chunk before [DONE]

    def client_field(self, engine_field: str) -> str:
        return dict(self.field_names).get(engine_field, engine_field)


def client_error(err: RequestError, prepared: PreparedRequest) -> OpenAIError:
    """A 400 for a field the engine's validation refused, under the name the client sent."""
    field = prepared.client_field(err.field)
    message = str(err)
    if field != err.field and message.startswith(f"{err.field}:"):
        message = f"{field}:{message[len(err.field) + 1 :]}"
    return OpenAIError(400, message, param=field)


def step_error(message: str | None, kind: StepFailureKind) -> OpenAIError:
    """A request whose step failed on the device; the engine serves on (health unchanged).
    Out of memory may pass (503, retry); another device error is a 500."""
    if kind is StepFailureKind.OUT_OF_MEMORY:
        return OpenAIError(
            503,
            f"{message}; the server serves on, retry later",
            code="step_out_of_memory",
            error_type="service_unavailable",
            retry_after_s=1,
        )
    return OpenAIError(
        500, f"{message}; the server serves on", code="step_failed", error_type="internal_error"
    )


def _bad(field: str, message: str) -> OpenAIError:
    return OpenAIError(400, f"{field}: {message}", param=field)


def _refuse_unsupported(body: GenerationFields) -> None:
    if body.n != 1:
        raise _bad("n", f"only n = 1 is served (got {body.n}); send n requests instead")
    for name, neutral in (
        ("presence_penalty", 0.0),
        ("frequency_penalty", 0.0),
        ("repetition_penalty", 1.0),
    ):
        value = getattr(body, name)
        if value is not None and value != neutral:
            raise _bad(name, f"not supported by this server; leave it out or send {neutral:g}")
    if body.logit_bias:
        raise _bad("logit_bias", "not supported by this server")


def _sampling(body: GenerationFields, max_tokens: int) -> dict:
    top_k = body.top_k
    return {
        "max_new_tokens": max_tokens,
        "temperature": 1.0 if body.temperature is None else body.temperature,
        "top_p": 1.0 if body.top_p is None else body.top_p,
        "top_k": 0 if top_k is None or top_k == -1 else top_k,  # vLLM's -1: off
        # An unseeded sampled request must not repeat every other unseeded one.
        "seed": secrets.randbelow(2**32) if body.seed is None else body.seed,
        "stop": (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ()),
        "stop_token_ids": tuple(body.stop_token_ids or ()),
        "ignore_eos": body.ignore_eos,
        "brownout": body.brownout,  # brownout-jax's extension: "never" is never browned out
    }


def _include_usage(body: GenerationFields) -> bool:
    return body.stream and body.stream_options is not None and body.stream_options.include_usage


def prepare_completion(body: CompletionRequest, request_id: str) -> PreparedRequest:
    _refuse_unsupported(body)
    if body.logprobs is not None and body.logprobs != 0:
        raise _bad(
            "logprobs",
            f"alternatives per token are not computed (got {body.logprobs}); send 0 for the "
            "chosen token's logprob",
        )
    if body.echo:
        raise _bad("echo", "not supported by this server")
    if body.suffix:
        raise _bad("suffix", "not supported by this server")
    if body.best_of not in (None, 1):
        raise _bad("best_of", f"only best_of = 1 is served (got {body.best_of})")
    prompt = body.prompt
    if prompt and isinstance(prompt, list) and isinstance(prompt[0], str | list):
        if len(prompt) != 1:
            raise _bad("prompt", f"one prompt per request (got {len(prompt)}); send several")
        prompt = prompt[0]
    max_tokens = COMPLETIONS_DEFAULT_MAX_TOKENS if body.max_tokens is None else body.max_tokens
    text = isinstance(prompt, str)
    source = {"prompt": prompt} if text else {"prompt_token_ids": tuple(prompt)}
    generation = GenerationRequest(**source, **_sampling(body, max_tokens), request_id=request_id)
    return PreparedRequest(
        generation=generation,
        field_names=(("prompt_token_ids", "prompt"),),
        logprobs=body.logprobs is not None,
        stream=body.stream,
        include_usage=_include_usage(body),
    )


def _message_text(message, index: int) -> str:
    content = message.content
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for part in content:
        if part.type != "text" or part.text is None:
            raise _bad(f"messages.{index}.content", f"only text parts are served (got {part.type})")
        texts.append(part.text)
    return "".join(texts)


def chat_prompt_ids(tokenizer, body: ChatCompletionRequest) -> list[int]:
    """The messages through the tokenizer's chat template, ending with the assistant's turn."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise _bad(
            "messages",
            "this model's tokenizer has no chat template; use /v1/completions with a prompt",
        )
    messages = [
        {"role": m.role, "content": _message_text(m, i)} for i, m in enumerate(body.messages)
    ]
    try:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    except Exception as err:  # a user-supplied conversation through the model's own template
        raise _bad("messages", f"the chat template refused them: {err}") from None
    return list(ids if isinstance(ids, list) else ids["input_ids"])


def prepare_chat(
    body: ChatCompletionRequest,
    tokenizer,
    max_model_len: int,
    request_id: str,
    longest_token: int | None = None,
) -> PreparedRequest:
    """``longest_token``: the tokenizer's longest token in characters (``Engine.longest_token``),
    bounding the messages' text before the template renders it."""
    _refuse_unsupported(body)
    if body.top_logprobs:
        raise _bad(
            "top_logprobs",
            f"alternatives per token are not computed (got {body.top_logprobs}); send 0 "
            "or leave it out (logprobs=true gives the chosen token's)",
        )
    texts = sum(len(_message_text(m, i)) for i, m in enumerate(body.messages))
    try:
        check_prompt_text("messages", texts, longest_token, max_model_len)
    except RequestError as err:
        raise _bad("messages", err.message) from None
    ids = chat_prompt_ids(tokenizer, body)
    given = body.max_completion_tokens if body.max_completion_tokens is not None else None
    max_field = "max_completion_tokens" if given is not None else "max_tokens"
    max_tokens = given if given is not None else body.max_tokens
    if max_tokens is None:  # OpenAI's chat default: whatever room the context leaves
        max_tokens = max(1, max_model_len - len(ids))
    generation = GenerationRequest(
        prompt_token_ids=tuple(ids), **_sampling(body, max_tokens), request_id=request_id
    )
    return PreparedRequest(
        generation=generation,
        field_names=(
            ("prompt", "messages"),
            ("prompt_token_ids", "messages"),
            ("max_tokens", max_field),
        ),
        logprobs=body.logprobs,
        stream=body.stream,
        include_usage=_include_usage(body),
    )


def finish_reason(reason: FinishReason) -> str:
    """OpenAI's names; a request cancelled by the server (drain timeout) is vLLM's "abort"."""
    return "abort" if reason is FinishReason.CANCELLED else reason.value
