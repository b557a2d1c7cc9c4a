"""The XLA:CPU memory-mapping guard: a step grid too large for vm.max_map_count stops with the
knobs to change instead of crashing inside LLVM; coarser buckets compile fewer steps."""

from __future__ import annotations

import jax
import pytest
from conftest import tiny_model_config

from brownout_jax.engine import map_budget
from brownout_jax.engine.config import EngineConfig
from brownout_jax.engine.front import Engine
from brownout_jax.engine.map_budget import CompileBudgetError, MappingBudget, count_mappings
from brownout_jax.model.params import init_random_params


def test_projection_raises_once_the_grid_cannot_fit(monkeypatch):
    counts = iter([1000, 1500, 2000])
    monkeypatch.setattr(map_budget, "count_mappings", lambda: next(counts))
    budget = MappingBudget(total=20, limit=10_000, start=1000)
    budget.check()  # nothing compiled yet
    budget.check()  # one executable: not extrapolated
    with pytest.raises(CompileBudgetError):
        budget.check()  # 2000 + 500 per step · 18 = 11000 > 90 % of 10000


def test_projection_within_the_limit_passes(monkeypatch):
    counts = iter(range(1000, 100_000, 100))
    monkeypatch.setattr(map_budget, "count_mappings", lambda: next(counts))
    budget = MappingBudget(total=20, limit=65_530, start=1000)
    for _ in range(20):
        budget.check()


def test_engine_stops_before_the_limit_with_the_knobs_to_change(monkeypatch):
    config = tiny_model_config()
    params = init_random_params(config, jax.random.key(0), scale=0.3)
    # A limit just above what the process holds now: the first executables exhaust it.
    monkeypatch.setattr(map_budget, "mapping_limit", lambda: int(count_mappings() / 0.9) + 50)
    engine_config = EngineConfig(max_batch=4, max_model_len=64, block_size=8, num_blocks=32)
    with pytest.raises(CompileBudgetError) as err:
        Engine(params, config, engine_config, progress=False)
    message = str(err.value)
    assert "vm.max_map_count" in message and "--ladder" in message
    assert "--bucket-growth" in message


def test_bucket_growth_four_compiles_fewer_steps_and_still_covers_every_shape():
    fine = EngineConfig(max_batch=16, max_model_len=512).buckets()
    coarse = EngineConfig(max_batch=16, max_model_len=512, bucket_growth=4).buckets()
    assert coarse.prefill_lengths == (16, 64, 256, 512)
    assert coarse.decode_batches == (2, 8, 16)
    for b in (fine, coarse):
        assert b.prefill_lengths[-1] >= 512 and b.decode_batches[-1] >= 16
        assert b.decode_widths[-1] * b.block_size >= 512
    count = lambda b: (  # noqa: E731
        len(b.prefill_batches) * len(b.prefill_lengths)
        + len(b.decode_batches) * len(b.decode_widths)
    )
    assert count(coarse) < count(fine) / 2
    with pytest.raises(ValueError, match="bucket_growth"):
        EngineConfig(bucket_growth=1)
