"""The executor: first runs of every compiled step leave every request's state untouched."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from brownout_jax.engine.blocks import NULL_BLOCK
from brownout_jax.engine.config import EngineConfig
from brownout_jax.engine.executor import Executor
from brownout_jax.engine.logit_processing import TokenHistory
from brownout_jax.engine.paged_cache import KVPool
from brownout_jax.engine.steps import EngineState
from brownout_jax.moe.ladder import ThresholdLadder


def _engine_config(model_config) -> EngineConfig:
    return EngineConfig(
        max_batch=4, max_prefill_batch=2, block_size=8, num_blocks=12, max_model_len=32
    ).for_model(model_config.max_position_embeddings)


def test_first_runs_leave_every_real_block_and_slot_unchanged(tiny_moe):
    config, _, _, params, _ = tiny_moe
    engine_config = _engine_config(config)
    executor = Executor(params, config, engine_config, ThresholdLadder((0.0, 1.0)), False)
    pool = KVPool.allocate(config, engine_config.num_blocks, 8, jnp.float32)
    keys = jax.random.split(jax.random.key(1), 2 * config.num_layers)
    pool = pool.replace(
        keys=tuple(
            jax.random.normal(k, a.shape) for k, a in zip(keys[::2], pool.keys, strict=True)
        ),
        values=tuple(
            jax.random.normal(k, a.shape) for k, a in zip(keys[1::2], pool.values, strict=True)
        ),
    )
    before = jax.tree_util.tree_map(np.asarray, pool)
    history = TokenHistory.zeros(4, config.vocab_size)
    history = history.replace(output_counts=history.output_counts + 3)
    executor._state = EngineState(
        pool=pool, last_tokens=jnp.arange(4, dtype=jnp.int32) + 7, history=history
    )
    for key, _ in executor.grid.compiled_items():
        executor._state, _ = executor._run_empty(key)
    state = executor._state
    np.testing.assert_array_equal(state.last_tokens, np.arange(4) + 7)
    np.testing.assert_array_equal(state.history.output_counts, 3)
    assert not np.asarray(state.history.prompt_seen).any()
    real = np.arange(engine_config.num_blocks) != NULL_BLOCK
    for new, old in zip(
        state.pool.keys + state.pool.values, before.keys + before.values, strict=True
    ):
        np.testing.assert_array_equal(np.asarray(new)[real], old[real])


def test_every_step_compiled_before_serving_is_timed_into_the_latency_model(tiny_moe):
    config, _, _, params, _ = tiny_moe
    engine_config = _engine_config(config)
    executor = Executor(params, config, engine_config, ThresholdLadder((0.0, 1.0)), False)
    compiled = {(key.phase, key.level, key.bucket) for key, _ in executor.grid.compiled_items()}
    table = executor.latency.table()
    assert {(e.phase, e.level, e.bucket) for e in table} == compiled
    assert all(np.isfinite(e.base_s) and e.base_s > 0 and e.correction == 1.0 for e in table)
    untimed = Executor(
        params,
        config,
        dataclasses.replace(engine_config, latency_samples=0),
        ThresholdLadder((0.0, 1.0)),
        False,
    )
    assert untimed.latency.table() == ()  # learned from the first executions while serving


def test_with_background_compilation_only_the_minimal_set_is_timed(tiny_moe):
    config, _, _, params, _ = tiny_moe
    engine_config = dataclasses.replace(_engine_config(config), compile_in_background=True)
    executor = Executor(params, config, engine_config, ThresholdLadder((0.0, 1.0)), False)
    try:
        timed = {(e.phase, e.level, e.bucket) for e in executor.latency.table()}
        minimal = {(k.phase, k.level, k.bucket) for k in executor.grid.minimal_keys()}
        assert timed == minimal
    finally:
        executor.close()
