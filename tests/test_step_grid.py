"""The compiled step grid: the minimal set first, concurrent and background compilation, and
serving that never compiles on the engine thread (the dispatch path)."""

from __future__ import annotations

import time

import pytest
from conftest import CompileCounter

from brownout_jax.engine.buckets import Bucket
from brownout_jax.engine.config import EngineConfig
from brownout_jax.engine.front import Engine
from brownout_jax.engine.phase import Phase
from brownout_jax.engine.requests import FinishReason, GenerationRequest
from brownout_jax.engine.step_grid import StepGrid, StepKey
from brownout_jax.moe.ladder import ThresholdLadder
from brownout_jax.moe.options import MoeOptions
from brownout_jax.offline.generate import generate


def _config(**changes) -> EngineConfig:
    fields = dict(
        max_batch=4,
        max_prefill_batch=2,
        max_prefill_tokens=64,
        block_size=8,
        num_blocks=17,
        max_model_len=32,
        ladder=ThresholdLadder((0.0, 0.5, 1.0)),
    )
    fields.update(changes)
    return EngineConfig(**fields)


def test_the_minimal_set_comes_first_then_each_level_from_its_covering_bucket(tiny_moe):
    config, _, _, params, _ = tiny_moe
    engine_config = _config()
    buckets = engine_config.buckets()
    grid = StepGrid(params, config, engine_config.ladder, buckets, 17, 4, MoeOptions())
    keys = grid.keys()
    covering = {phase: buckets.covering(phase) for phase in Phase}
    assert covering == {Phase.PREFILL: Bucket(1, 32), Phase.DECODE: Bucket(4, 4)}
    # What the first request needs (the starting level 1.0), then the lowest level's.
    assert grid.minimal_keys() == keys[:2]
    assert set(keys[:2]) == {StepKey(p, 1.0, covering[p]) for p in Phase}
    assert set(keys[2:4]) == {StepKey(p, 0.0, covering[p]) for p in Phase}
    assert len(keys) == len(set(keys)) == 3 * sum(len(buckets.grid(p)) for p in Phase)
    # The intermediate level comes last, each phase's covering bucket before its others.
    middle = [k for k in keys if k.level == 0.5]
    assert keys[-len(middle) :] == middle
    first_of = {p: next(k for k in middle if k.phase == p) for p in Phase}
    assert all(first_of[p].bucket == covering[p] for p in Phase)
    # Compiled from shapes alone, the grid fits exactly those params.
    assert grid.fits(params) and not grid.fits(tiny_moe[1])  # without the united experts
    # A fixed threshold starts there.
    fixed = StepGrid(params, config, engine_config.ladder, buckets, 17, 4, MoeOptions(), 2, 0.5)
    assert {k.level for k in fixed.minimal_keys()} == {0.5}


@pytest.fixture(scope="module")
def background_engine(tiny_moe):
    config, _, _, params, _ = tiny_moe
    counter = CompileCounter()
    engine = Engine(
        params, config, _config(compile_in_background=True, compile_workers=2), progress=False
    )
    yield engine, counter, params, config
    engine.shutdown(drain=False)


def test_serving_starts_before_the_grid_is_compiled_and_never_compiles_on_the_engine_thread(
    background_engine,
):
    engine, counter, params, config = background_engine
    total = engine.compiled_steps + engine.steps_compiling
    buckets = engine.config.buckets()
    decode_widths = 1 if engine.config.chunked_prefill else 3  # the kernel reads in place
    assert len(buckets.decode_widths) == decode_widths
    # levels × (prefill 2 × 2 + decode 2 × widths) buckets
    assert total == 3 * (2 * 2 + 2 * decode_widths)
    prompts = [[5, 9, 3, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9], [11, 12], [40, 41, 42, 43, 44]]
    deadline = time.monotonic() + 600
    while True:  # requests keep being served, exactly, while the rest compiles
        handles = [
            engine.submit(GenerationRequest(prompt_token_ids=tuple(p), max_new_tokens=6))
            for p in prompts
        ]
        for prompt, handle in zip(prompts, handles, strict=True):
            output = handle.result(timeout=300)
            assert output.finish_reason == FinishReason.LENGTH
            (alone,) = generate(params, config, [prompt], 6)
            assert output.token_ids == alone.token_ids
        if engine.stats().steps_compiling == 0 or time.monotonic() > deadline:
            break
    stats = engine.stats()
    assert stats.steps_compiling == 0 and stats.compiled_steps == total
    assert "brownout-engine" not in counter.threads  # compilations (if not cached) ran elsewhere
