"""``--load-format dummy``: random weights at any config, with a router popularity skew.

A shared direction c is added to every token embedding, and each router gets logit offsets
``skew · log(1 / rank)`` along c, so routing follows a fixed Zipf-like popularity as in real
MoE checkpoints (brownout only pays off when routing is skewed). United experts are the
members' averages (no distillation): enough for latency, not for accuracy.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from brownout_jax.model.config import ModelConfig
from brownout_jax.model.params import ModelParams, MoeParams, init_random_params
from brownout_jax.united.united import (
    UnitedExperts,
    UnitedLayer,
    attach_united,
    average_init,
    contiguous_groups,
)


def dummy_params(
    config: ModelConfig, dtype, skew: float = 1.0, way: int | None = 4, seed: int = 0
) -> ModelParams:
    params = init_random_params(config, jax.random.key(seed), dtype)
    rng = np.random.default_rng(seed)
    direction = rng.standard_normal(config.hidden_size)
    direction /= np.linalg.norm(direction)
    embed = params.embed + jnp.asarray(direction * 0.05, dtype)
    layers = list(params.layers)
    for i in config.moe_layers:
        moe = layers[i].mlp
        assert isinstance(moe, MoeParams)
        offsets = -skew * np.log(rng.permutation(config.num_experts) + 1.0)
        router = moe.router + jnp.asarray(np.outer(direction, offsets), dtype)
        layers[i] = layers[i].replace(mlp=moe.replace(router=router))
    params = params.replace(embed=embed, layers=tuple(layers))
    if way is None:
        return params
    group = contiguous_groups(config.num_experts, way)
    united = UnitedExperts(
        layers=tuple(
            UnitedLayer(average_init(params.layers[i].mlp.experts, group), jnp.asarray(group))
            for i in config.moe_layers
        )
    )
    return attach_united(params, config, united)


def dummy_config(config: ModelConfig, num_layers: int | None) -> ModelConfig:
    if num_layers is None:
        return config
    return dataclasses.replace(
        config,
        num_layers=num_layers,
        mlp_only_layers=tuple(i for i in config.mlp_only_layers if i < num_layers),
    )
