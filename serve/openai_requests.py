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
    TokenizeRequest,
)
from brownout_jax.serve.openai_structured import structured_output

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's documented default for /v1/completions
# Sample j of a request runs at seed + j × this (mod 2^32): odd, so the n samples of one
# seeded request get n distinct seeds, the same ones on every run; sample 0 keeps the seed
# (a request with n = 1 samples as it always did).
_SEED_STRIDE = 0x9E3779B9


@dataclasses.dataclass(frozen=True, slots=True)
class PreparedRequest:
    """One OpenAI request as engine requests: ``best_of`` samples per prompt, each its own
    ``GenerationRequest`` (a prompt's later samples share its first sample's full prompt
    blocks: ``Engine.submit``'s ``share_prefix_with``)."""

    samples: tuple[GenerationRequest, ...]  # prompt i's sample j at i * best_of + j
    prompt_texts: tuple[str | None, ...]  # per prompt: the text sent (echo), None for ids
    field_names: tuple[tuple[str, str], ...]  # (engine field, client field) renames
    stream: bool
    include_usage: bool  # a streamed usage chunk before [DONE]
    n: int = 1  # choices per prompt: the best n of best_of samples
    best_of: int = 1
    logprobs: int | None = None  # None: none reported; k: the chosen token's and k more
    echo: bool = False  # the prompt before each choice's text (and tokens)
    # echo with max_tokens = 0 (lm-eval's loglikelihood): the engine generates one token to
    # score the prompt, and the choice drops it, as vLLM does.
    echo_only: bool = False
    prompt_logprobs: int | None = None  # vLLM's prompt_logprobs, returned as asked

    @property
    def generation(self) -> GenerationRequest:
        return self.samples[0]

    def client_field(self, engine_field: str) -> str:
        return dict(self.field_names).get(engine_field, engine_field)

    def prompt_of(self, sample: int) -> int:
        return sample // self.best_of

    def choice_index(self, sample: int) -> int:
        """OpenAI's numbering when every sample is a choice (best_of = n): prompt i's
        choice j is i * n + j."""
        return self.prompt_of(sample) * self.n + sample % self.best_of


def client_error(err: RequestError, prepared: PreparedRequest, sample: int = 0) -> OpenAIError:
    """A 400 for a field the engine's validation refused, under the name the client sent
    (and which prompt of a batch, when there are several)."""
    field = prepared.client_field(err.field)
    which = ""
    if len(prepared.prompt_texts) > 1 and field == "prompt":
        which = f" {prepared.prompt_of(sample)}"
    return OpenAIError(400, f"{field}{which}: {err.message}", param=field)


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


_bad = OpenAIError.bad_field


def _logit_bias(given: dict[str, float] | None) -> tuple[tuple[int, float], ...]:
    """OpenAI's JSON object keyed by token ids written as strings."""
    bias = []
    for key, value in (given or {}).items():
        try:
            token = int(key)
        except ValueError:
            raise _bad("logit_bias", f"keys are token ids, got {key!r}") from None
        bias.append((token, value))
    return tuple(bias)


def _sampling(body: GenerationFields, max_tokens: int, structured) -> dict:
    top_k = body.top_k
    return {
        "max_new_tokens": max_tokens,
        "temperature": 1.0 if body.temperature is None else body.temperature,
        "top_p": 1.0 if body.top_p is None else body.top_p,
        "top_k": 0 if top_k is None or top_k == -1 else top_k,  # vLLM's -1: off
        "min_p": 0.0 if body.min_p is None else body.min_p,
        # An unseeded sampled request must not repeat every other unseeded one.
        "seed": secrets.randbelow(2**32) if body.seed is None else body.seed,
        "stop": (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ()),
        "stop_token_ids": tuple(body.stop_token_ids or ()),
        "ignore_eos": body.ignore_eos,
        "min_tokens": body.min_tokens,
        "presence_penalty": body.presence_penalty or 0.0,
        "frequency_penalty": body.frequency_penalty or 0.0,
        "repetition_penalty": 1.0 if body.repetition_penalty is None else body.repetition_penalty,
        "logit_bias": _logit_bias(body.logit_bias),
        "structured": structured,
        "brownout": body.brownout,  # brownout-jax's extension: "never" is never browned out
    }


def _field_names(structured_field: str | None, *renames: tuple[str, str]) -> tuple:
    """The engine's field names as the client wrote them (``structured``: the field that set
    the constraint)."""
    names = list(renames)
    if structured_field is not None:
        names.append(("structured", structured_field))
    return tuple(names)


def _include_usage(body: GenerationFields) -> bool:
    return body.stream and body.stream_options is not None and body.stream_options.include_usage


def _sample_seed(seed: int, sample: int) -> int:
    if sample == 0 or not 0 <= seed < 2**32:  # an invalid seed is refused as sent
        return seed
    return (seed + sample * _SEED_STRIDE) % 2**32


def _samples(
    sources: list[dict], sampling: dict, best_of: int, request_id: str
) -> tuple[GenerationRequest, ...]:
    """``best_of`` engine requests per prompt source, seeds apart (``_SEED_STRIDE``)."""
    samples = []
    for i, source in enumerate(sources):
        for j in range(best_of):
            suffix = "" if len(sources) * best_of == 1 else f"-{i * best_of + j}"
            samples.append(
                GenerationRequest(
                    **source,
                    **{**sampling, "seed": _sample_seed(sampling["seed"], j)},
                    request_id=f"{request_id}{suffix}",
                )
            )
    return tuple(samples)


def _counts(body: GenerationFields, best_of: int | None, prompts: int, limit: int | None):
    """(n, best_of), refused when inconsistent or beyond ``limit`` engine requests (the
    admission queue: more could never all be admitted together)."""
    if body.n < 1:
        raise _bad("n", f"must be ≥ 1, got {body.n}")
    best_of = body.n if best_of is None else best_of
    if best_of < body.n:
        raise _bad("best_of", f"must be ≥ n = {body.n}, got {best_of}")
    if best_of > body.n and body.stream:
        raise _bad("best_of", f"best_of > n (got {best_of} > {body.n}) cannot be streamed")
    if limit is not None and prompts * best_of > limit:
        field = "best_of" if best_of > body.n else "n" if body.n > 1 else "prompt"
        raise _bad(
            field,
            f"{prompts} prompt(s) × {best_of} sample(s) = {prompts * best_of} generations, more "
            f"than this server queues at once ({limit}, --max-queue)",
        )
    return body.n, best_of


def _prompt_list(prompt) -> list[str | list[int]]:
    """OpenAI's four forms: a string, token ids, strings, lists of token ids."""
    if isinstance(prompt, str):
        return [prompt]
    if prompt and isinstance(prompt[0], str | list):
        return list(prompt)
    return [prompt]


def prepare_completion(
    body: CompletionRequest, request_id: str, max_samples: int | None = None
) -> PreparedRequest:
    """``max_samples``: the most engine requests one request may become (the engine's
    admission queue)."""
    if body.suffix:
        raise _bad("suffix", "not supported by this server")
    prompts = _prompt_list(body.prompt)
    n, best_of = _counts(body, body.best_of, len(prompts), max_samples)
    max_tokens = COMPLETIONS_DEFAULT_MAX_TOKENS if body.max_tokens is None else body.max_tokens
    echo_only = body.echo and max_tokens == 0
    if echo_only and body.min_tokens:
        raise _bad("min_tokens", "must be 0 with max_tokens = 0")
    structured, structured_field = structured_output(body)
    sampling = _sampling(body, 1 if echo_only else max_tokens, structured)
    logprobs = body.logprobs
    sampling["top_logprobs"] = logprobs or 0
    # An echoed prompt's logprobs come from the prompt's own (with as many alternatives).
    wanted = [k for k in (body.prompt_logprobs, logprobs if body.echo else None) if k is not None]
    sampling["prompt_logprobs"] = max(wanted) if wanted else None
    sources = [
        {"prompt": p} if isinstance(p, str) else {"prompt_token_ids": tuple(p)} for p in prompts
    ]
    return PreparedRequest(
        samples=_samples(sources, sampling, best_of, request_id),
        prompt_texts=tuple(p if isinstance(p, str) else None for p in prompts),
        field_names=_field_names(structured_field, ("prompt_token_ids", "prompt")),
        stream=body.stream,
        include_usage=_include_usage(body),
        n=n,
        best_of=best_of,
        logprobs=logprobs,
        echo=body.echo,
        echo_only=echo_only,
        prompt_logprobs=body.prompt_logprobs,
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


def chat_prompt_ids(
    tokenizer,
    body: ChatCompletionRequest | TokenizeRequest,
    max_model_len: int,
    longest_token: int | None,
    add_generation_prompt: bool = True,
) -> list[int]:
    """The messages through the tokenizer's chat template, ending with the assistant's turn;
    their text bounded first (``check_prompt_text``)."""
    texts = [_message_text(m, i) for i, m in enumerate(body.messages)]
    try:
        check_prompt_text("messages", sum(map(len, texts)), longest_token, max_model_len)
    except RequestError as err:
        raise _bad("messages", err.message) from None
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise _bad(
            "messages",
            "this model has no chat template (its tokenizer_config.json or chat_template.jinja "
            "sets none); use /v1/completions with a prompt",
        )
    messages = [{"role": m.role, "content": t} for m, t in zip(body.messages, texts, strict=True)]
    try:
        ids = tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=True
        )
    except Exception as err:  # a user-supplied conversation through the model's own template
        raise _bad("messages", f"the chat template refused them: {err}") from None
    return list(ids if isinstance(ids, list) else ids["input_ids"])


def prepare_chat(
    body: ChatCompletionRequest,
    tokenizer,
    max_model_len: int,
    request_id: str,
    longest_token: int | None = None,
    max_samples: int | None = None,
) -> PreparedRequest:
    """``longest_token``: the tokenizer's longest token in characters (``Engine.longest_token``),
    bounding the messages' text before the template renders it."""
    if body.top_logprobs and not body.logprobs:
        raise _bad("top_logprobs", "needs logprobs: true")
    n, best_of = _counts(body, None, 1, max_samples)
    ids = chat_prompt_ids(tokenizer, body, max_model_len, longest_token)
    given = body.max_completion_tokens if body.max_completion_tokens is not None else None
    max_field = "max_completion_tokens" if given is not None else "max_tokens"
    max_tokens = given if given is not None else body.max_tokens
    if max_tokens is None:  # OpenAI's chat default: whatever room the context leaves
        max_tokens = max(1, max_model_len - len(ids))
    structured, structured_field = structured_output(body)
    sampling = _sampling(body, max_tokens, structured)
    sampling["top_logprobs"] = (body.top_logprobs or 0) if body.logprobs else 0
    sampling["prompt_logprobs"] = body.prompt_logprobs
    return PreparedRequest(
        samples=_samples([{"prompt_token_ids": tuple(ids)}], sampling, best_of, request_id),
        prompt_texts=(None,),
        field_names=_field_names(
            structured_field,
            ("prompt", "messages"),
            ("prompt_token_ids", "messages"),
            ("max_tokens", max_field),
            ("logprobs", "top_logprobs"),
        ),
        stream=body.stream,
        include_usage=_include_usage(body),
        n=n,
        best_of=best_of,
        logprobs=(body.top_logprobs or 0) if body.logprobs else None,
        prompt_logprobs=body.prompt_logprobs,
    )


def finish_reason(reason: FinishReason) -> str:
    """OpenAI's names; a request cancelled by the server (drain timeout) is vLLM's "abort"."""
    return "abort" if reason is FinishReason.CANCELLED else reason.value
