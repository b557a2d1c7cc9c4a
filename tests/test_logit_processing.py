"""Per-row logit processing on device (bias, penalties, token masks, min-p), top-K
alternatives and prompt scores: each against a NumPy reference, then through the engine
against the model's own teacher-forced logits (float32)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_model_config

from brownout_jax.cpu_kernels import load_library
from brownout_jax.engine.attention_path import AttentionPath
from brownout_jax.engine.config import EngineConfig
from brownout_jax.engine.controller import ControllerConfig
from brownout_jax.engine.front import Engine
from brownout_jax.engine.logit_processing import (
    LogitProcessing,
    TokenHistory,
    process_logits,
    top_alternatives,
)
from brownout_jax.engine.requests import (
    MAX_LOGIT_BIAS,
    FinishReason,
    GenerationRequest,
    RequestError,
)
from brownout_jax.engine.sampling import apply_min_p
from brownout_jax.engine.structured_output import mask_words
from brownout_jax.model.params import init_random_params
from brownout_jax.model.transformer import forward_logits

CONFIG = tiny_model_config()


def _reference_process(logits, bias, presence, frequency, repetition, counts, seen, mask):
    """vLLM's order in float64: bias, repetition, frequency, presence, the mask."""
    out = logits.astype(np.float64).copy()
    for b, entries in enumerate(bias):
        for token, value in entries:
            out[b, token] += value
    hit = seen | (counts > 0)
    rep = repetition[:, None]
    out = np.where(hit, np.where(out > 0, out / rep, out * rep), out)
    out -= frequency[:, None] * counts
    out -= presence[:, None] * (counts > 0)
    return np.where(mask, out, -np.inf)


@pytest.mark.parametrize("batch,vocab", [(1, 33), (3, 64), (5, 100), (4, 257)])
def test_process_logits_matches_numpy(batch, vocab):
    rng = np.random.default_rng(batch * vocab)
    logits = rng.normal(size=(batch, vocab)).astype(np.float32) * 3
    words = mask_words(vocab)
    proc = LogitProcessing.host(batch, words)
    bias = []
    for b in range(batch):
        ids = rng.choice(vocab, size=int(rng.integers(0, 6)), replace=False)
        entries = [(int(t), float(rng.uniform(-5, 5))) for t in ids]
        bias.append(entries)
        for j, (t, v) in enumerate(entries):
            proc.bias_ids[b, j], proc.bias_values[b, j] = t, v
    proc.presence[:] = rng.uniform(-2, 2, batch)
    proc.frequency[:] = rng.uniform(-2, 2, batch)
    proc.repetition[:] = rng.uniform(0.5, 2, batch)
    allowed = rng.random((batch, vocab)) < 0.7
    allowed[0] = True  # a row with every bit set
    if batch > 1:
        allowed[1] = False
        allowed[1, vocab - 1] = True  # one allowed token, in the last, partial word
    bits = np.zeros((batch, words * 32), bool)
    bits[:, :vocab] = allowed
    proc.token_mask[:] = (
        np.packbits(bits.reshape(batch, words, 32)[..., ::-1], axis=-1)
        .view(">u4")
        .reshape(batch, words)
        .astype(np.uint32)
        .view(np.int32)
    )
    proc.masked[:] = True
    num_slots = batch + 2
    slots = rng.permutation(num_slots)[:batch].astype(np.int32)
    counts_all = rng.integers(0, 3, (num_slots, vocab)).astype(np.int32)
    seen_all = rng.random((num_slots, vocab)) < 0.2
    history = TokenHistory(jnp.asarray(counts_all), jnp.asarray(seen_all))
    got = jax.jit(process_logits)(jnp.asarray(logits), jax.device_put(proc), history, slots)
    ref = _reference_process(
        logits,
        bias,
        proc.presence,
        proc.frequency,
        proc.repetition,
        counts_all[slots],
        seen_all[slots],
        allowed,
    )
    got = np.asarray(got)
    assert not np.isnan(got).any()
    np.testing.assert_array_equal(np.isinf(got), np.isinf(ref))
    finite = np.isfinite(ref)
    err = np.linalg.norm(got[finite] - ref[finite]) / np.linalg.norm(ref[finite])
    assert err < 1e-6


def test_history_counts_generated_tokens_and_marks_the_prompt():
    history = TokenHistory.zeros(3, 10)
    history = history.replace(output_counts=history.output_counts.at[1, 4].set(7))  # stale
    tokens = jnp.asarray([[1, 2, 3, 0], [5, 6, 0, 0]], jnp.int32)
    # Row 0: slot 1, a recomputation (prompt of 2 tokens, then 3 generated); row 1: slot 2,
    # a later chunk (start 4) of a prompt of 5 tokens: position 5 is generated.
    history = history.start_and_record(
        jnp.asarray([1, 2]),
        tokens,
        jnp.asarray([0, 4]),
        jnp.asarray([3, 2]),
        jnp.asarray([2, 5]),
        jnp.asarray([-1, -1]),
    )
    counts, seen = np.asarray(history.output_counts), np.asarray(history.prompt_seen)
    assert counts[1, 4] == 0  # slot 1 started afresh
    assert seen[1, 1] and seen[1, 2] and not seen[1, 3]
    assert counts[1, 3] == 1
    assert seen[2, 5] and counts[2, 6] == 1
    history = history.record_generated(
        jnp.asarray([1, 2]), jnp.asarray([3, 9]), jnp.asarray([True, False])
    )
    assert np.asarray(history.output_counts)[1, 3] == 2
    assert np.asarray(history.output_counts)[2, 9] == 0  # inactive row


def test_min_p_and_alternatives_match_numpy():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(4, 50)).astype(np.float32) * 2
    min_p = np.asarray([0.0, 0.1, 0.5, 1.0], np.float32)
    got = np.asarray(apply_min_p(jnp.asarray(logits), jnp.asarray(min_p)))
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    keep = (probs >= min_p[:, None] * probs.max(-1, keepdims=True)) | (min_p[:, None] == 0)
    np.testing.assert_array_equal(np.isfinite(got), keep)
    ids, values = top_alternatives(jnp.asarray(logits), jnp.asarray([True] * 4))
    log_softmax = logits - np.log(np.exp(logits.astype(np.float64)).sum(-1, keepdims=True))
    order = np.argsort(-log_softmax, axis=-1)[:, : ids.shape[1]]
    np.testing.assert_array_equal(np.asarray(ids), order)
    ref = np.take_along_axis(log_softmax, order, -1)
    assert np.max(np.abs(np.asarray(values) - ref)) < 1e-5
    zeros, _ = top_alternatives(jnp.asarray(logits), jnp.asarray([False] * 4))
    assert not np.asarray(zeros).any()  # not asked: not computed


# ------------------------------------------------------------------------- through the engine


@pytest.fixture(scope="module")
def params():
    return init_random_params(CONFIG, jax.random.key(0), scale=0.3)


@pytest.fixture(scope="module")
def engine(params):
    """f32, the paged-attention kernel where built, prompts prefilled in chunks of 8 (so a
    prompt's scores cross chunk boundaries)."""
    kernel = load_library().available
    config = EngineConfig(
        max_batch=4,
        max_prefill_batch=2,
        max_prefill_tokens=64,
        block_size=8,
        num_blocks=32,
        max_model_len=64,
        prefill_chunk=8,
        attention=AttentionPath.KERNEL if kernel else AttentionPath.XLA,
        controller=ControllerConfig(mode="off"),
    )
    eng = Engine(params, CONFIG, config, progress=False)
    yield eng
    eng.shutdown(drain=False)


def _log_softmax(params, tokens):
    logits = forward_logits(params, CONFIG, jnp.asarray([tokens]), jnp.asarray([len(tokens)]))
    logits = np.asarray(logits[0], np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    return logits, shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def _prompt(seed, length):
    return tuple(int(t) for t in np.random.default_rng(seed).integers(0, CONFIG.vocab_size, length))


def test_prompt_logprobs_and_alternatives_equal_teacher_forcing(engine, params):
    prompt = _prompt(1, 21)  # three chunks of 8
    out = engine.submit(
        GenerationRequest(
            prompt_token_ids=prompt, max_new_tokens=5, top_logprobs=5, prompt_logprobs=3
        )
    ).result(timeout=120)
    full = list(prompt) + out.token_ids
    _, ref = _log_softmax(params, full)
    scores = out.prompt_logprobs
    assert scores[0] is None and len(scores) == len(prompt)
    for position in range(1, len(prompt)):
        entry = scores[position]
        assert entry.token_id == prompt[position]
        assert abs(entry.logprob - ref[position - 1, prompt[position]]) < 1e-4
        best = np.argsort(-ref[position - 1])[:3]
        assert [t for t, _ in entry.top] == best.tolist()
    for i, (token, top) in enumerate(zip(out.token_ids, out.top_logprobs, strict=True)):
        row = ref[len(prompt) - 1 + i]
        assert abs(out.logprobs[i] - row[token]) < 1e-4
        ids = [t for t, _ in top]
        assert ids == np.argsort(-row)[:5].tolist()
        assert np.max(np.abs(np.asarray([v for _, v in top]) - row[ids])) < 1e-4
        assert token == ids[0]  # greedy


def _greedy_reference(params, prompt, steps, bias, presence, frequency, repetition):
    """Greedy decoding with the penalties applied in NumPy to the model's logits; returns
    the processed logits of every step (to judge ties by a margin)."""
    tokens, rows = list(prompt), []
    vocab = CONFIG.vocab_size
    seen = np.zeros(vocab, bool)
    seen[list(prompt)] = True
    counts = np.zeros(vocab)
    for _ in range(steps):
        logits, _ = _log_softmax(params, tokens)
        row = _reference_process(
            logits[-1:],
            [bias],
            np.asarray([presence]),
            np.asarray([frequency]),
            np.asarray([repetition]),
            counts[None],
            seen[None],
            np.ones((1, vocab), bool),
        )[0]
        rows.append(row)
        token = int(np.argmax(row))
        tokens.append(token)
        counts[token] += 1
    return tokens[len(prompt) :], rows


@pytest.mark.parametrize(
    "presence,frequency,repetition",
    [(1.5, 0.0, 1.0), (0.0, 1.0, 1.0), (0.0, 0.0, 1.8), (0.5, 0.5, 1.3)],
)
def test_penalties_and_bias_follow_the_numpy_reference(
    engine, params, presence, frequency, repetition
):
    prompt = _prompt(2, 11)
    bias = [(int(prompt[0]), 3.0), (7, -100.0)]
    steps = 8
    out = engine.submit(
        GenerationRequest(
            prompt_token_ids=prompt,
            max_new_tokens=steps,
            presence_penalty=presence,
            frequency_penalty=frequency,
            repetition_penalty=repetition,
            logit_bias=tuple(bias),
        )
    ).result(timeout=120)
    expected, rows = _greedy_reference(params, prompt, steps, bias, presence, frequency, repetition)
    for i, token in enumerate(out.token_ids):
        assert rows[i][token] >= rows[i].max() - 1e-3, (i, token, expected[i])
        if token != expected[i]:  # a near-tie: the rest of the reference no longer applies
            break
    else:
        assert out.token_ids == expected
    plain = engine.submit(GenerationRequest(prompt_token_ids=prompt, max_new_tokens=steps))
    unpenalised, _ = _greedy_reference(params, prompt, steps, [], 0.0, 0.0, 1.0)
    if expected[: len(out.token_ids)] != unpenalised[: len(out.token_ids)]:
        assert plain.result(timeout=120).token_ids != out.token_ids  # they did something


def test_min_tokens_bans_stop_ids_and_min_p_one_is_greedy(engine):
    prompt = _prompt(3, 9)
    greedy = engine.submit(GenerationRequest(prompt_token_ids=prompt, max_new_tokens=6)).result(
        timeout=120
    )
    stop = greedy.token_ids[0]
    # The stop id is the model's favourite at once, and made likelier still by a bias.
    request = GenerationRequest(
        prompt_token_ids=prompt,
        max_new_tokens=6,
        stop_token_ids=(stop,),
        min_tokens=3,
        logit_bias=((stop, 50.0),),
    )
    out = engine.submit(request).result(timeout=120)
    assert stop not in out.token_ids[:3]
    assert out.token_ids[3] == stop and out.finish_reason == FinishReason.STOP
    sampled = engine.submit(
        GenerationRequest(prompt_token_ids=prompt, max_new_tokens=6, temperature=5.0, min_p=1.0)
    ).result(timeout=120)
    assert sampled.token_ids == greedy.token_ids  # only the most likely token survives


@pytest.mark.parametrize(
    "fields,field",
    [
        ({"top_logprobs": 21}, "logprobs"),
        ({"prompt_logprobs": -1}, "prompt_logprobs"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": float("nan")}, "frequency_penalty"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"min_p": 1.5}, "min_p"),
        ({"min_tokens": 9}, "min_tokens"),
        ({"logit_bias": ((CONFIG.vocab_size, 1.0),)}, "logit_bias"),
        ({"logit_bias": ((1, 101.0),)}, "logit_bias"),
        ({"logit_bias": tuple((i, 1.0) for i in range(MAX_LOGIT_BIAS + 1))}, "logit_bias"),
    ],
)
def test_bad_processing_fields_are_refused_by_name(engine, fields, field):
    with pytest.raises(RequestError) as err:
        engine.submit(GenerationRequest(prompt_token_ids=(1, 2), max_new_tokens=8, **fields))
    assert err.value.field == field


def test_samples_sharing_prompt_blocks_sample_what_they_would_alone(engine):
    """n samples of one 21-token prompt (blocks of 8): the later ones start on the first's
    two full blocks (its token history copied for the repetition penalty) and compute the
    last 5 tokens themselves; each samples exactly what it samples submitted alone (f32)."""
    prompt = _prompt(4, 21)

    # Two tokens of the shared blocks pushed up, then the repetition penalty (prompt tokens
    # too) pushes them down: a sample missing the first's prompt marks would emit them.
    bias = ((prompt[0], 8.0), (prompt[1], 8.0))

    def request(seed):
        return GenerationRequest(
            prompt_token_ids=prompt,
            max_new_tokens=6,
            temperature=0.0 if seed == 11 else 1.0,
            seed=seed,
            repetition_penalty=10.0,
            logit_bias=bias,
            top_logprobs=2,
        )

    alone = [engine.submit(request(s)).result(timeout=120) for s in (11, 12, 13)]
    before = engine.stats().shared_prompt_tokens
    first = engine.submit(request(11))
    later = [engine.submit(request(s), share_prefix_with=first) for s in (12, 13)]
    together = [h.result(timeout=120) for h in (first, *later)]
    for a, b in zip(alone, together, strict=True):
        assert a.token_ids == b.token_ids
        assert not {prompt[0], prompt[1]} & set(b.token_ids)
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)
    shared = engine.stats().shared_prompt_tokens - before
    if engine.config.chunked_prefill:
        assert shared == 2 * 16  # two later samples, two full blocks of 8 each
    else:  # no prefill past position 0: each computes its whole prompt
        assert shared == 0
