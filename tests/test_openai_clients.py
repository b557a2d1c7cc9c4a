"""What OpenAI clients send, against a real `brownout-jax serve` process (tiny random model,
word-level tokenizer) through the official `openai` SDK and raw HTTP: batched prompts, n and
best_of, echo (lm-eval's loglikelihood request), logprob shapes, chat n / logprobs / usage,
vLLM's /tokenize and /detokenize; echo's prompt logprobs against the model's own teacher-forced
ones."""

from __future__ import annotations

import http.client
import json
import urllib.parse

import openai
import pytest

from brownout_jax.checkpoints import load_model


@pytest.fixture(scope="module")
def server(tiny_with_tokenizer, start_server):
    proc = start_server(tiny_with_tokenizer, "--kv-blocks", "64")
    yield proc
    assert proc.stop() == 0


@pytest.fixture(scope="module")
def tokenizer(tiny_with_tokenizer):
    return load_model(tiny_with_tokenizer, "float32", progress=False).tokenizer


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.http}/v1", api_key="unused", max_retries=0, timeout=60)


def _post(base: str, path: str, body: dict) -> tuple[int, dict]:
    url = urllib.parse.urlsplit(base)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    connection.request("POST", path, body=json.dumps(body), headers={"Content-Type": "json"})
    response = connection.getresponse()
    data = json.loads(response.read())
    connection.close()
    return response.status, data


GREEDY = {"model": "model", "temperature": 0, "extra_body": {"ignore_eos": True}}


def test_batched_prompts_with_n_2_return_4_choices_in_order(client):
    batched = client.completions.create(prompt=[[5, 6, 7], [8, 9]], n=2, max_tokens=4, **GREEDY)
    assert [c.index for c in batched.choices] == [0, 1, 2, 3]
    alone = [
        client.completions.create(prompt=p, max_tokens=4, **GREEDY) for p in ([5, 6, 7], [8, 9])
    ]
    texts = [a.choices[0].text for a in alone]
    assert [c.text for c in batched.choices] == [texts[0], texts[0], texts[1], texts[1]]
    assert batched.usage.prompt_tokens == 5 and batched.usage.completion_tokens == 16
    words = client.completions.create(prompt=["w5 w6 w7", "w8 w9"], max_tokens=4, **GREEDY)
    assert [c.index for c in words.choices] == [0, 1]
    one = client.completions.create(prompt="w8 w9", max_tokens=4, **GREEDY)
    assert words.choices[1].text == one.choices[0].text


def test_seeded_samples_differ_from_each_other_and_repeat_across_runs(client):
    sampled = {"model": "model", "prompt": [5, 6, 7], "max_tokens": 8, "temperature": 1.5}
    sampled["extra_body"] = {"ignore_eos": True}
    first = client.completions.create(n=2, seed=3, **sampled)
    again = client.completions.create(n=2, seed=3, **sampled)
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    assert first.choices[0].text != first.choices[1].text
    alone = client.completions.create(n=1, seed=3, **sampled)  # sample 0 keeps the seed
    assert alone.choices[0].text == first.choices[0].text


def test_best_of_returns_the_sample_with_the_highest_cumulative_logprob(client):
    sampled = {"model": "model", "prompt": [5, 6, 7], "max_tokens": 6, "temperature": 1.5}
    sampled.update(seed=9, logprobs=0, extra_body={"ignore_eos": True})
    every = client.completions.create(n=3, **sampled)  # the same three samples, all returned
    sums = [sum(c.logprobs.token_logprobs) for c in every.choices]
    best = client.completions.create(n=1, best_of=3, **sampled)
    (choice,) = best.choices
    assert choice.text == every.choices[sums.index(max(sums))].text
    assert sum(choice.logprobs.token_logprobs) == pytest.approx(max(sums), abs=1e-4)
    assert best.usage.completion_tokens == 18  # the discarded samples were generated too
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(n=1, best_of=2, stream=True, **sampled)
    assert info.value.body["param"] == "best_of"


def test_echo_prepends_the_prompt_and_max_tokens_0_returns_it_alone(client):
    plain = client.completions.create(prompt="w5 w6 w7", max_tokens=3, **GREEDY)
    echoed = client.completions.create(prompt="w5 w6 w7", echo=True, max_tokens=3, **GREEDY)
    assert echoed.choices[0].text == "w5 w6 w7" + plain.choices[0].text
    alone = client.completions.create(prompt=[7, 8, 9], echo=True, max_tokens=0, **GREEDY)
    (choice,) = alone.choices
    assert choice.text == "w5 w6 w7" and choice.finish_reason == "length"
    assert alone.usage.prompt_tokens == 3 and alone.usage.completion_tokens == 0


def test_lm_eval_loglikelihood_request(server, client):
    """lm-eval 0.4's local-completions with tokenized_requests: a batch of token-id prompts,
    echo, logprobs 1, max_tokens 1; it reads token_logprobs[ctxlen:-1] and whether each equals
    max(top_logprobs[i].values())."""
    prompts = [[5, 6, 7, 8], [9, 10]]
    body = {"model": "model", "prompt": prompts, "temperature": 0, "max_tokens": 1}
    status, data = _post(
        server.http, "/v1/completions", {**body, "logprobs": 1, "echo": True, "seed": 1234}
    )
    assert status == 200, data
    generated = _post(server.http, "/v1/completions", {**body, "logprobs": 0})[1]
    for prompt, choice, alone in zip(prompts, data["choices"], generated["choices"], strict=True):
        logprobs = choice["logprobs"]
        assert len(logprobs["tokens"]) == len(prompt) + 1
        assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
        assert logprobs["token_logprobs"][-1] == pytest.approx(
            alone["logprobs"]["token_logprobs"][0], abs=1e-5
        )
        for value, top in zip(
            logprobs["token_logprobs"][1:], logprobs["top_logprobs"][1:], strict=True
        ):
            assert 1 <= len(top) <= 2 and max(top.values()) >= value - 1e-6
        greedy = logprobs["top_logprobs"][-1]  # the generated (greedy) token is the best
        assert max(greedy.values()) == pytest.approx(logprobs["token_logprobs"][-1])


def test_completion_logprobs_in_openais_shape(client):
    whole = client.completions.create(prompt=[5, 6, 7], max_tokens=4, logprobs=3, **GREEDY)
    logprobs = whole.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == 4
    assert len(logprobs.top_logprobs) == len(logprobs.text_offset) == 4
    assert logprobs.text_offset[0] == 0
    offsets = logprobs.text_offset
    steps = zip(offsets[:-1], offsets[1:], logprobs.tokens[:-1], strict=True)
    assert all(b - a == len(token) for a, b, token in steps)
    for token, value, top in zip(
        logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs, strict=True
    ):
        assert top[token] == pytest.approx(value)  # the chosen token is always listed
        # Greedy: the chosen token is the best of the 3 alternatives, so they are 3 in all.
        assert len(top) == 3
        assert max(top.values()) == pytest.approx(value)


def test_chat_n_logprobs_stop_and_include_usage(client):
    messages = [{"role": "user", "content": "w5 w6 w7"}]
    chat = {"model": "model", "messages": messages, "temperature": 0}
    whole = client.chat.completions.create(
        n=2,
        max_completion_tokens=4,
        logprobs=True,
        top_logprobs=2,
        extra_body={"ignore_eos": True},
        **chat,
    )
    assert [c.index for c in whole.choices] == [0, 1]
    for choice in whole.choices:
        content = choice.logprobs.content
        assert len(content) == 4
        assert all(item.bytes == list(item.token.encode()) for item in content)
        assert all(len(item.top_logprobs) == 2 for item in content)
    assert whole.usage.completion_tokens == 8
    stream = client.chat.completions.create(
        n=2,
        max_completion_tokens=4,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
        **chat,
    )
    chunks = list(stream)
    texts = {0: "", 1: ""}
    for chunk in chunks[:-1]:
        (choice,) = chunk.choices
        texts[choice.index] += choice.delta.content or ""
    assert texts == {0: whole.choices[0].message.content, 1: whole.choices[1].message.content}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    stop = whole.choices[0].message.content.split()[1]
    cut = client.chat.completions.create(max_completion_tokens=4, stop=[stop], **chat)
    assert cut.choices[0].finish_reason == "stop" and stop not in cut.choices[0].message.content


def test_sampling_extras_and_structured_outputs_are_accepted(client):
    extras = {
        "min_p": 0.05,
        "min_tokens": 2,
        "repetition_penalty": 1.2,
        "top_k": 20,
        "stop_token_ids": [3],
    }
    whole = client.completions.create(
        model="model",
        prompt=[5, 6, 7],
        max_tokens=4,
        presence_penalty=0.5,
        frequency_penalty=0.5,
        logit_bias={"9": 1.0},
        seed=5,
        extra_body=extras,
    )
    assert whole.choices[0].finish_reason in ("length", "stop")
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model="model",
            messages=[{"role": "user", "content": "w1"}],
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}},
        )
    assert info.value.body["param"] == "response_format.json_schema.schema"


def test_tokenize_detokenize_round_trip_and_what_completions_read(server, client, tokenizer):
    status, tokens = _post(
        server.http, "/tokenize", {"prompt": "w5 w6 w7", "add_special_tokens": False}
    )
    assert status == 200
    assert tokens["tokens"] == tokenizer.encode("w5 w6 w7", add_special_tokens=False)
    assert tokens["count"] == 3 and tokens["max_model_len"] == 256
    status, text = _post(server.http, "/detokenize", {"tokens": tokens["tokens"]})
    assert status == 200 and text == {"prompt": "w5 w6 w7"}
    # The ids /tokenize gives are what /v1/completions reads from the text.
    by_text = client.completions.create(prompt="w5 w6 w7", max_tokens=4, **GREEDY)
    by_ids = client.completions.create(prompt=tokens["tokens"], max_tokens=4, **GREEDY)
    assert by_text.choices[0].text == by_ids.choices[0].text
    messages = [{"role": "user", "content": "w5 w6"}]
    status, chat = _post(server.http, "/tokenize", {"messages": messages})
    expected = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    expected = list(expected if isinstance(expected, list) else expected["input_ids"])
    assert status == 200 and chat["tokens"] == expected
    status, error = _post(server.http, "/detokenize", {"tokens": [5, 96]})
    assert status == 400 and error["error"]["param"] == "tokens"


def test_echo_logprobs_equal_the_models_teacher_forced_ones(server, tiny_with_tokenizer, tokenizer):
    """The server's float32 echo against the same checkpoint's full forward pass."""
    import jax.numpy as jnp
    import numpy as np

    from brownout_jax.model.transformer import forward_logits

    model = load_model(tiny_with_tokenizer, "float32", progress=False)
    prompt = [5, 6, 7, 8, 9, 10, 11, 12, 13]
    body = {"model": "model", "prompt": prompt, "temperature": 0, "max_tokens": 1}
    status, data = _post(server.http, "/v1/completions", {**body, "logprobs": 2, "echo": True})
    assert status == 200, data
    logprobs = data["choices"][0]["logprobs"]
    logits = forward_logits(
        model.params, model.config, jnp.asarray([prompt]), jnp.asarray([len(prompt)])
    )
    logits = np.asarray(logits[0], np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    reference = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    got = np.asarray(logprobs["token_logprobs"][1 : len(prompt)])
    expected = reference[np.arange(len(prompt) - 1), prompt[1:]]
    assert np.max(np.abs(got - expected)) < 1e-4
    for i, top in enumerate(logprobs["top_logprobs"][1 : len(prompt)]):
        best = np.argsort(-reference[i])[:2]
        want = {tokenizer.decode([int(t)]): reference[i, t] for t in best}
        for text, value in want.items():
            assert top[text] == pytest.approx(value, abs=1e-4)
