"""vLLM's /tokenize and /detokenize: the served model's tokenizer, as the server itself uses
it (a prompt without special tokens added, unless asked; chat messages through the chat
template), so that a client counts and builds prompts the way the server will read them
(lm-eval's remote tokenizer, prompt-length checks)."""

from __future__ import annotations

from brownout_jax.serve.openai_protocol import DetokenizeRequest, OpenAIError, TokenizeRequest
from brownout_jax.serve.openai_requests import chat_prompt_ids

_bad = OpenAIError.bad_field


def _tokenizer(engine, field: str):
    if engine.tokenizer is None:
        raise _bad(field, "this model has no tokenizer")
    return engine.tokenizer


def tokenize(engine, body: TokenizeRequest) -> dict:
    """{"count", "max_model_len", "tokens"} (and "token_strs" when asked). Runs on the
    preparing pool: a long prompt is work."""
    if (body.prompt is None) == (body.messages is None):
        raise _bad("prompt", "give either prompt or messages")
    if body.messages is not None:
        tokenizer = _tokenizer(engine, "messages")
        if body.add_special_tokens:  # the chat template writes the special tokens itself
            raise _bad("add_special_tokens", "only false with messages")
        ids = chat_prompt_ids(
            tokenizer,
            body,
            engine.max_model_len,
            engine.longest_token,
            add_generation_prompt=body.add_generation_prompt,
        )
    else:
        tokenizer = _tokenizer(engine, "prompt")
        ids = tokenizer.encode(body.prompt, add_special_tokens=bool(body.add_special_tokens))
    result = {"count": len(ids), "max_model_len": engine.max_model_len, "tokens": list(ids)}
    if body.return_token_strs:
        result["token_strs"] = tokenizer.convert_ids_to_tokens(list(ids))
    return result


def detokenize(engine, body: DetokenizeRequest) -> dict:
    """{"prompt": the tokens' text}; ids outside the model's vocabulary are a 400."""
    tokenizer = _tokenizer(engine, "tokens")
    vocab = engine.model_config.vocab_size
    bad = [t for t in body.tokens if not 0 <= t < vocab]
    if bad:
        raise _bad("tokens", f"ids outside [0, {vocab}): {bad[:5]}")
    try:
        text = tokenizer.decode(body.tokens)
    except Exception as err:  # ids the model has but its tokenizer does not (padded vocab)
        raise _bad("tokens", f"the tokenizer cannot decode them: {err}") from None
    return {"prompt": text}
