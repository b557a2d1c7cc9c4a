"""Batched generation, sampling and stopping on top of the jitted step functions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err, tiny_model_config

from brownout_jax.engine.sampling import pack_sampled, unpack_sampled
from brownout_jax.model.params import init_random_params
from brownout_jax.model.transformer import forward_logits
from brownout_jax.moe.expert_backend import ExpertBackend
from brownout_jax.moe.options import MoeOptions
from brownout_jax.offline.generate import generate

CONFIG = tiny_model_config(
    num_layers=2,
    num_experts=8,
    num_experts_per_tok=2,
    max_position_embeddings=64,
    eos_token_ids=(0,),
)


@pytest.fixture(scope="module")
def params():
    return init_random_params(CONFIG, jax.random.key(0), scale=0.3)


PROMPTS = [[5, 9, 3], [7] * 11, [1, 2, 3, 4, 5, 6], [100, 90, 80, 70, 60, 50, 40, 30, 20, 10]]


def test_batched_greedy_equals_one_at_a_time(params):
    batched = generate(params, CONFIG, PROMPTS, 12)
    for prompt, result in zip(PROMPTS, batched, strict=True):
        (alone,) = generate(params, CONFIG, [prompt], 12)
        assert result.token_ids == alone.token_ids
        np.testing.assert_allclose(result.logprobs, alone.logprobs, atol=1e-5)


def test_logprobs_are_the_models_own(params):
    (result,) = generate(params, CONFIG, [PROMPTS[0]], 8, temperature=0.9, seed=3)
    seq = PROMPTS[0] + result.token_ids
    logits = forward_logits(params, CONFIG, jnp.asarray([seq]), jnp.asarray([len(seq)]))
    logprobs = jax.nn.log_softmax(logits[0], -1)
    start = len(PROMPTS[0]) - 1
    expected = [float(logprobs[start + i, t]) for i, t in enumerate(result.token_ids)]
    assert rel_err(result.logprobs, expected) <= 1e-5


def test_sampling_is_seeded(params):
    a = generate(params, CONFIG, PROMPTS, 10, temperature=1.5, seed=7)
    b = generate(params, CONFIG, PROMPTS, 10, temperature=1.5, seed=7)
    c = generate(params, CONFIG, PROMPTS, 10, temperature=1.5, seed=8)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert [r.token_ids for r in a] != [r.token_ids for r in c]


def test_stop_token_ends_a_sequence(params):
    (free,) = generate(params, CONFIG, [PROMPTS[1]], 10)
    stop_at = free.token_ids[4]
    (stopped,) = generate(params, CONFIG, [PROMPTS[1]], 10, stop_token_ids=[stop_at])
    first = free.token_ids.index(stop_at)
    assert stopped.token_ids == free.token_ids[: first + 1]
    assert stopped.finish_reason == "stop"
    assert free.finish_reason == "length"


def test_dense_reference_backend_generates_the_same(params):
    fast = generate(params, CONFIG, PROMPTS, 6)
    dense_options = MoeOptions(ExpertBackend.DENSE)
    dense = generate(
        params, CONFIG, PROMPTS, 6, prefill_options=dense_options, decode_options=dense_options
    )
    assert [r.token_ids for r in fast] == [r.token_ids for r in dense]


@pytest.mark.parametrize(
    ("prompts", "max_new", "kwargs", "field"),
    [
        ([[1, 2]], 0, {}, "max_new_tokens"),
        ([[]], 4, {}, r"prompts\[0\]"),
        ([[1, 128]], 4, {}, r"prompts\[0\].*outside"),
        ([[1] * 60], 5, {}, "max_new_tokens.*context limit of 64"),
        ([[1]], 4, {"temperature": -1.0}, "temperature"),
        ([], 4, {}, "prompts"),
    ],
)
def test_bad_requests_name_the_field(params, prompts, max_new, kwargs, field):
    with pytest.raises(ValueError, match=field):
        generate(params, CONFIG, prompts, max_new, **kwargs)


def test_packed_sampled_output_round_trips():
    tokens = jnp.asarray([3, 151935, 0], jnp.int32)
    logprobs = jnp.asarray([-0.5, -12.25, -1e-7], jnp.float32)
    got_tokens, got_logprobs = unpack_sampled(np.asarray(pack_sampled(tokens, logprobs)))
    assert got_tokens.tolist() == [3, 151935, 0]
    assert np.array_equal(got_logprobs, np.asarray(logprobs))
