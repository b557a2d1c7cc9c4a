"""The OpenAI API's request and response bodies (the subset brownout-jax serves), as pydantic
models, and its error shape.

These models only parse: types, and the fields a client may send. Whether a value is valid for
this model (lengths, ranges, token ids) is decided by the one validation path every front
shares, ``brownout_jax.engine.requests.validate_request``; serve/openai_requests.py maps its verdict
back to the client's field names.
"""

from __future__ import annotations

import enum
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class OpenAIError(Exception):
    """An error answered in OpenAI's shape: ``{"error": {message, type, param, code}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        error_type: str = "invalid_request_error",
        retry_after_s: int | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.error_type = error_type
        self.retry_after_s = retry_after_s

    @classmethod
    def bad_field(cls, field: str, message: str) -> OpenAIError:
        """A 400 naming the request field it is about."""
        return cls(400, f"{field}: {message}", param=field)

    def body(self) -> dict:
        return error_body(self.message, self.error_type, self.param, self.code)

    def headers(self) -> dict[str, str]:
        return {} if self.retry_after_s is None else {"Retry-After": str(self.retry_after_s)}


def error_body(
    message: str, error_type: str, param: str | None = None, code: str | None = None
) -> dict:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


# ----------------------------------------------------------------------------- requests


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class ResponseFormatType(enum.StrEnum):
    TEXT = "text"
    JSON_OBJECT = "json_object"
    JSON_SCHEMA = "json_schema"


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    name: str
    description: str | None = None
    # "schema" would shadow BaseModel.schema: the attribute has another name.
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None  # a constrained request is always held to its schema


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: ResponseFormatType
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(BaseModel):
    """vLLM's ``structured_outputs`` object: one of its constraints. Unknown keys are refused
    (a constraint of a kind this server does not know must not be dropped silently)."""

    model_config = ConfigDict(extra="forbid")
    json_: str | dict[str, Any] | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


class GenerationFields(BaseModel):
    """Fields both endpoints take. Unknown fields are ignored, as OpenAI's own server does
    for new ones; known fields this server cannot honour are refused (openai_requests)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None  # None: 1.0, OpenAI's default
    top_p: float | None = None
    top_k: int | None = None  # vLLM's extension; -1 or 0: off
    min_p: float | None = None  # vLLM's extension
    seed: int | None = None  # None: a fresh random seed per request
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None  # vLLM's extension
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # vLLM's extension
    min_tokens: int = 0  # vLLM's extension
    # brownout-jax's extension: "never" asks that no expert of this request be browned out.
    brownout: Literal["allowed", "never"] = "allowed"
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None  # vLLM's extension
    logit_bias: dict[str, float] | None = None  # {token id as a string: added to its logit}
    prompt_logprobs: int | None = None  # vLLM's extension
    user: str | None = None
    # Structured outputs: OpenAI's response_format, vLLM's guided_* fields and their newer
    # form, structured_outputs. At most one constraint per request.
    response_format: ResponseFormat | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    structured_outputs: StructuredOutputs | None = None


class CompletionRequest(GenerationFields):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = None  # alternatives per token (0: the chosen token's logprob only)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None


class ChatCompletionRequest(GenerationFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None  # alternatives per token, with logprobs = true


class TokenizeRequest(BaseModel):
    """vLLM's /tokenize: a prompt, or chat messages through the chat template."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    # None: as this server's own endpoints tokenize (completions: no special tokens added).
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True  # messages only
    return_token_strs: bool = False


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    tokens: list[int]


# ----------------------------------------------------------------------------- responses


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Timing(BaseModel):
    """brownout-jax's extension: the request's latencies, in seconds."""

    ttft_s: float | None
    tpot_s: float | None  # mean over the request's tokens
    queue_s: float | None
    e2e_s: float | None


class Thresholds(BaseModel):
    """brownout-jax's extension: a (prefill, decode) brownout threshold pair the request ran
    at (1 = the exact model, lower = more experts served by their united expert)."""

    prefill: float
    decode: float


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy shape. An echoed prompt's first token has no logprob (None), and no
    alternatives: nothing precedes it."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    # Per token: {token text: logprob} of the ``logprobs`` most likely tokens and the chosen one.
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class PromptLogprob(BaseModel):
    """vLLM's shape of one entry of ``prompt_logprobs`` (keyed by token id as a string)."""

    logprob: float
    rank: int | None = None  # 1 = the most likely; None: not among the alternatives computed
    decoded_token: str | None = None


# vLLM's prompt_logprobs: per prompt token, None for the first, else {id: PromptLogprob} of the
# token itself and its alternatives.
PromptLogprobs = list[dict[str, PromptLogprob] | None]


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    prompt_logprobs: PromptLogprobs | None = None  # vLLM's extension, when asked for


class _Response(BaseModel):
    id: str
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    usage: Usage | None = None
    # Extensions, set on a whole response and on a stream's finishing chunk.
    timing: Timing | None = None
    thresholds: list[Thresholds] | None = None


class CompletionResponse(_Response):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] = Field(default_factory=list)


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(_Response):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    prompt_logprobs: PromptLogprobs | None = None  # vLLM's extension, when asked for


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class CompletionChunk(_Response):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]


class ChatCompletionChunk(_Response):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]
    prompt_logprobs: PromptLogprobs | None = None  # on a choice's first chunk, when asked for


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "brownout-jax"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
