"""Sampling: the bisection truncation against the sort reference, and the greedy shortcut."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from brownout_jax.engine.sampling import (
    SamplingParams,
    sample_tokens,
    truncate_logits,
    truncate_logits_by_sort,
)

_truncate = jax.jit(truncate_logits)
_reference = jax.jit(truncate_logits_by_sort)


def _random_case(seed: int, batch: int, vocab: int):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, rng.uniform(0.5, 6.0), (batch, vocab)).astype(np.float32)
    # Ties (rounded values), masked entries and both signs of zero, as real logits have.
    logits[: batch // 2] = np.round(logits[: batch // 2], 1)
    logits[:, rng.integers(0, vocab, 3)] = -np.inf
    logits[0, :2] = [0.0, -0.0]
    top_k = rng.choice([0, 1, 2, 5, vocab, vocab + 7], batch).astype(np.int32)
    top_p = rng.choice([1.0, 0.05, 0.5, 0.9, 0.999], batch).astype(np.float32)
    return logits, top_k, top_p


@pytest.mark.parametrize("seed,batch,vocab", [(0, 16, 4096), (1, 7, 33), (2, 3, 8), (3, 32, 517)])
def test_bisection_keeps_the_same_tokens_as_sorting(seed, batch, vocab):
    logits, top_k, top_p = _random_case(seed, batch, vocab)
    out = np.asarray(_truncate(logits, top_k, top_p))
    ref = np.asarray(_reference(logits, top_k, top_p))
    np.testing.assert_array_equal(np.isfinite(out), np.isfinite(ref))
    kept = np.isfinite(ref)
    np.testing.assert_array_equal(out[kept], logits[kept])
    # Every row keeps its best token, and top-k never keeps more than k distinct values.
    assert kept[np.arange(batch), np.argmax(logits, axis=-1)].all()
    for row in range(batch):
        if top_k[row] > 0:
            assert len(np.unique(logits[row][kept[row]])) <= top_k[row]


def test_off_settings_keep_every_token():
    logits, _, _ = _random_case(4, 8, 300)
    out = np.asarray(_truncate(logits, np.zeros(8, np.int32), np.ones(8, np.float32)))
    np.testing.assert_array_equal(out, logits)


def _sampling(temperature, top_k=None, top_p=None, seed=None):
    n = len(temperature)
    seed = np.arange(n) if seed is None else seed
    host = SamplingParams.host(np.asarray(temperature), seed, top_k, top_p)
    return jax.tree_util.tree_map(jnp.asarray, host)


def test_greedy_rows_take_the_argmax_and_logprobs_are_the_models():
    logits = jax.random.normal(jax.random.key(0), (6, 50)) * 3
    positions = jnp.arange(6, dtype=jnp.int32)
    tokens, logprobs = jax.jit(sample_tokens)(logits, _sampling(np.zeros(6)), positions)
    np.testing.assert_array_equal(tokens, np.argmax(logits, axis=-1))
    l64 = np.asarray(logits, np.float64)
    log_softmax = l64 - l64.max(-1, keepdims=True)
    log_softmax -= np.log(np.exp(log_softmax).sum(-1, keepdims=True))
    expected = log_softmax[np.arange(6), np.asarray(tokens)]
    np.testing.assert_allclose(logprobs, expected, rtol=1e-5, atol=1e-6)


def test_first_argmax_is_argmax_with_ties_and_extremes():
    from brownout_jax.engine.sampling import first_argmax

    rng = np.random.default_rng(0)
    logits = rng.standard_normal((5, 151936)).astype(np.float32)
    logits[1, [7, 9000, 151935]] = 50.0  # ties: the first wins, as np.argmax
    logits[2, -1] = 1e30
    logits[3, :] = -np.inf
    logits[3, 12] = -1e30
    logits[4, :] = 0.0
    np.testing.assert_array_equal(
        np.asarray(jax.jit(first_argmax)(jnp.asarray(logits))), np.argmax(logits, axis=-1)
    )


def test_mixed_batch_samples_inside_top_k_and_greedy_rows_stay_greedy():
    logits = jax.random.normal(jax.random.key(1), (8, 64)) * 2
    temperature = np.array([0, 1.5, 0, 1.5, 0, 1.5, 0, 1.5])
    top_k = np.array([0, 3, 0, 3, 0, 1, 0, 3])
    sampled = jax.jit(sample_tokens)
    seen: set[tuple[int, int]] = set()
    for step in range(40):
        tokens, _ = sampled(logits, _sampling(temperature, top_k), jnp.full((8,), step, jnp.int32))
        tokens = np.asarray(tokens)
        order = np.argsort(-np.asarray(logits), axis=-1)
        for row in range(8):
            if temperature[row] == 0 or top_k[row] == 1:
                assert tokens[row] == order[row, 0]
            else:
                assert tokens[row] in order[row, :3]
                seen.add((row, int(tokens[row])))
    # Temperature 1.5 over three candidates draws more than one of them.
    assert len(seen) > 3


def test_nucleus_sampling_stays_inside_the_nucleus():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 4))
    tokens = set()
    for step in range(60):
        out, _ = jax.jit(sample_tokens)(
            logits,
            _sampling(np.ones(4), top_p=np.full(4, 0.7)),
            jnp.full((4,), step, jnp.int32),
        )
        tokens.update(np.asarray(out).tolist())
    assert tokens == {0, 1}  # mass before token 2 is 0.8 ≥ 0.7: tokens 2 and 3 are cut
