"""Every (phase, level, bucket) compiles ahead; switching levels afterwards compiles nothing."""

from __future__ import annotations

import jax
import numpy as np

from brownout_jax.engine.compiled_steps import CompiledSteps, StepBuckets
from brownout_jax.model.kv_cache import ContiguousKVCache
from brownout_jax.moe.brownout import ThresholdLadder
from brownout_jax.offline.generate import generate
from brownout_jax.offline.steps import PrefillInputs, SamplingParams, unpack_sampled


class CompileCounter:
    def __init__(self):
        self.count = 0
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, name, duration, **kwargs):
        if name == "/jax/core/compile/backend_compile_duration":
            self.count += 1


def test_level_switching_after_precompile_compiles_nothing(tiny_moe):
    config, _, _, params, _ = tiny_moe
    ladder = ThresholdLadder((0.0, 0.5, 1.0))
    buckets = StepBuckets(prefill=((2, 16),), decode=(2,), cache_len=32)
    steps = CompiledSteps(params, config, ladder, buckets)
    steps.compile(progress=False)
    assert steps.count == 6 and steps.compile_seconds > 0

    prompts = [[5, 9, 3, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9]]
    tokens = np.zeros((2, 16), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    inputs = jax.device_put(
        PrefillInputs(
            tokens=tokens,
            lengths=np.asarray([4, 9], np.int32),
            sampling=SamplingParams.host(np.zeros(2), np.zeros(2)),
        )
    )
    cache = ContiguousKVCache.allocate(config, 2, 32, params.embed.dtype)
    jax.block_until_ready((inputs, cache))

    counter = CompileCounter()
    produced = []
    state, packed = steps.prefill(1.0, 2, 16)(params, cache, inputs)
    produced.append(unpack_sampled(packed)[0])
    for level in (1.0, 1.0, 0.0, 0.5, 1.0, 0.0, 0.5):
        state, packed = steps.decode(level, 2)(params, state)
        produced.append(unpack_sampled(packed)[0])
    assert counter.count == 0

    # The level-1.0 executables are the exact model: the first three tokens match generate().
    reference = generate(params, config, prompts, 3)
    for i, result in enumerate(reference):
        assert [int(step[i]) for step in produced[:3]] == result.token_ids
