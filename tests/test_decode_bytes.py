"""The bytes of one decode step per threshold (``eval/decode_bytes.py``): the parts add up to
the model's weights, brownout reads fewer distinct experts, the floor follows the bandwidth."""

from __future__ import annotations

import numpy as np

from brownout_jax.eval.decode_bytes import decode_floor, dense_bytes, expert_bytes
from brownout_jax.model.params import MoeParams, param_bytes


def test_parts_add_up_and_brownout_reads_fewer_experts(tiny_moe):
    config, _, _, params, _ = tiny_moe
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, config.vocab_size, 12).tolist() for _ in range(8)]
    floors = decode_floor(params, config, prompts, 8, (1.0, 0.0), bandwidth_gb_s=10.0)
    moe = [layer.mlp for layer in params.layers if isinstance(layer.mlp, MoeParams)]
    num_experts = moe[0].experts.num_experts
    per_expert = expert_bytes(params)
    # Every weight is dense, LM head, embedding or an expert.
    head = params.lm_head if params.lm_head is not None else params.embed
    accounted = dense_bytes(params) + head.size * head.dtype.itemsize
    accounted += per_expert * num_experts * len(moe) + params.embed.size * params.embed.itemsize
    if params.lm_head is None:
        accounted -= params.embed.size * params.embed.itemsize
    assert accounted == param_bytes(params) - sum(
        m.group_of_expert.size * m.group_of_expert.itemsize for m in moe
    )
    exact, browned = floors[1.0], floors[0.0]
    assert 0 < browned["distinct_experts_per_layer"] <= moe[0].num_united
    assert browned["distinct_experts_per_layer"] <= exact["distinct_experts_per_layer"]
    assert exact["distinct_experts_per_layer"] <= min(num_experts, 8 * config.num_experts_per_tok)
    assert browned["total_bytes"] < exact["total_bytes"]
    # The floor: rows × bandwidth / bytes.
    expected = 8 * 10e9 / exact["total_bytes"]
    assert abs(exact["floor_tokens_per_s"] - expected) / expected < 1e-2


def test_without_united_experts_every_threshold_reads_the_exact_experts(tiny_moe):
    config, plain, _, _, _ = tiny_moe
    prompts = [[1, 2, 3, 4], [5, 6, 7], [8, 9, 10, 11, 12]]
    floors = decode_floor(plain, config, prompts, 3, (1.0, 0.0), bandwidth_gb_s=10.0)
    assert floors[0.0] == floors[1.0]
