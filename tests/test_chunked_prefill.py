"""Chunked prefill: a prompt prefilled chunk by chunk against the paged cache equals the
one-shot prefill (logits and the KV it leaves for decoding), with brownout too; the scheduler
interleaves decode steps between a long prompt's chunks and only the last chunk's token is
the sequence's; the engine serves long prompts in chunks exactly and compiles nothing after
warm-up."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import CompileCounter, rel_err

from brownout_jax.cpu_kernels import load_library
from brownout_jax.engine.attention_path import AttentionPath
from brownout_jax.engine.buckets import EngineBuckets
from brownout_jax.engine.config import EngineConfig
from brownout_jax.engine.controller import ControllerConfig
from brownout_jax.engine.front import Engine
from brownout_jax.engine.paged_cache import KVPool, PagedKVCache
from brownout_jax.engine.phase import Phase
from brownout_jax.engine.requests import FinishReason, GenerationRequest, RequestHandle
from brownout_jax.engine.scheduler import Scheduler, SchedulerLimits, Sequence
from brownout_jax.engine.stream import TokenStream
from brownout_jax.model.kv_cache import ContiguousKVCache
from brownout_jax.model.transformer import decode, prefill, prefill_chunk
from brownout_jax.moe.options import MoeOptions
from brownout_jax.offline.generate import generate

needs_kernel = pytest.mark.skipif(
    not load_library().available, reason="the C++ kernel library is not built"
)


def _chunked(params, config, options, attention, prompt, chunk, bs=8, width=6):
    """The prompt prefilled ``chunk`` tokens per step into a fresh paged cache (f32)."""
    step = jax.jit(functools.partial(prefill_chunk, config=config, moe_options=options))
    pool = KVPool.allocate(config, width + 1, bs, jnp.float32)
    table = jnp.arange(1, width + 1, dtype=jnp.int32)[None]
    cache = PagedKVCache(pool=pool, block_tables=table, attention=attention)
    for start in range(0, len(prompt), chunk):
        piece = np.zeros((1, chunk), np.int32)
        take = min(chunk, len(prompt) - start)
        piece[0, :take] = prompt[start : start + take]
        out = step(
            params,
            cache=cache,
            tokens=jnp.asarray(piece),
            starts=jnp.asarray([start]),
            lengths=jnp.asarray([take]),
        )
        cache = out.cache
    return out


def _next_logits(params, config, options, cache, token, position):
    return decode(
        params,
        config,
        cache,
        token,
        jnp.asarray([position]),
        jnp.asarray([True]),
        options,
    ).logits


@needs_kernel
@pytest.mark.parametrize("threshold", [1.0, 0.5, 0.0])
def test_chunks_equal_one_shot_prefill_and_leave_the_same_cache(tiny_moe, threshold):
    """Prompts of 1, 2 and 5 chunks of 8 tokens (f32). Exact model: the last chunk's logits
    and the next decode step's equal the one-shot prefill's within 1e-5, on both attention
    paths. Browned out, the hot set is chosen per step over the step's tokens (as for any
    batch), so chunks of a longer prompt may route differently from the whole: there a
    one-chunk prompt equals the one-shot prefill, and the kernel equals XLA's path on every
    prompt."""
    config, _, _, params, _ = tiny_moe
    options = MoeOptions(threshold=threshold)
    rng = np.random.default_rng(21)
    for length in (7, 16, 37):
        prompt = rng.integers(0, config.vocab_size, length).astype(np.int32)
        one_shot = prefill(
            params,
            config,
            ContiguousKVCache.allocate(config, 1, 48),
            jnp.asarray(prompt[None]),
            jnp.asarray([length]),
            options,
        )
        token = jnp.argmax(one_shot.logits, axis=-1).astype(jnp.int32)
        reference = _next_logits(params, config, options, one_shot.cache, token, length)
        outs = {
            path: _chunked(params, config, options, path, prompt, chunk=8)
            for path in (AttentionPath.KERNEL, AttentionPath.XLA)
        }
        kernel, xla = outs[AttentionPath.KERNEL], outs[AttentionPath.XLA]
        assert rel_err(kernel.logits, xla.logits) <= 1e-5
        after = {
            path: _next_logits(params, config, options, out.cache, token, length)
            for path, out in outs.items()
        }
        assert rel_err(after[AttentionPath.KERNEL], after[AttentionPath.XLA]) <= 1e-5
        if threshold == 1.0 or length <= 8:
            for path, out in outs.items():
                assert rel_err(out.logits, one_shot.logits) <= 1e-5, path
                assert rel_err(after[path], reference) <= 1e-5, path


def _seq(prompt_len: int, max_new_tokens: int = 4, name: str = "r") -> Sequence:
    request = GenerationRequest(
        prompt_token_ids=tuple(range(prompt_len)), max_new_tokens=max_new_tokens
    )
    handle = RequestHandle(name, request, None)
    return Sequence(handle, TokenStream(handle, None, frozenset()), list(request.prompt_token_ids))


def test_the_scheduler_interleaves_decode_between_chunks_and_samples_the_last_only():
    buckets = EngineBuckets(
        prefill_batches=(1, 2),
        prefill_lengths=(4, 16),
        decode_batches=(2,),
        decode_widths=(8,),
        block_size=8,
        prefill_table_width=8,
    )
    limits = SchedulerLimits(
        max_batch=4,
        max_prefill_batch=2,
        max_prefill_tokens=32,
        block_size=8,
        num_blocks=20,
        prefill_chunk=16,
    )
    scheduler = Scheduler(limits)
    short, long = _seq(3, name="short"), _seq(40, name="long")
    scheduler.add(short)
    first = scheduler.next_step(buckets.grid, now=0.0)
    assert first.phase == Phase.PREFILL and first.rows[0].samples
    scheduler.add(long)
    phases, starts = [], []
    for _ in range(6):
        plan = scheduler.next_step(buckets.grid, now=0.0)
        phases.append(plan.phase)
        if plan.phase == Phase.PREFILL:
            (row,) = plan.rows
            starts.append(row.position)
            assert len(row.tokens) == min(16, 40 - row.position)
            assert row.samples == (row.position + len(row.tokens) == 40)
            # Every block of the long prompt is booked at admission.
            assert len(row.blocks) == 5 and long.slot is not None
        else:
            # The long prompt never decodes before its last chunk is dispatched.
            assert (long in plan.sequences) == (len(starts) == 3)
    assert starts == [0, 16, 32]
    # The short prompt decodes between the long one's chunks.
    assert phases == [Phase.DECODE, Phase.PREFILL] * 3


@needs_kernel
def test_the_engine_serves_long_prompts_in_chunks_exactly_and_compiles_nothing(tiny_moe):
    """Prompts of 1, 2 and 5 chunks (chunk 8) together, a short prompt decoding meanwhile,
    equal offline generation of each alone, token for token (the exact model: browned out,
    a batch's hot set depends on its company)."""
    config, _, _, params, _ = tiny_moe
    engine = Engine(
        params,
        config,
        EngineConfig(
            max_batch=4,
            max_prefill_batch=2,
            max_prefill_tokens=32,
            block_size=8,
            num_blocks=40,
            max_model_len=64,
            prefill_chunk=8,
            controller=ControllerConfig(mode="off"),
            attention=AttentionPath.KERNEL,
        ),
        progress=False,
    )
    try:
        assert engine.config.chunked_prefill
        assert engine.config.buckets().prefill_lengths[-1] == 8
        counter = CompileCounter()
        rng = np.random.default_rng(5)
        prompts = [rng.integers(0, config.vocab_size, n).tolist() for n in (7, 16, 37, 3)]
        handles = [
            engine.submit(GenerationRequest(prompt_token_ids=tuple(p), max_new_tokens=5))
            for p in prompts
        ]
        outputs = [handle.result(timeout=300) for handle in handles]
        assert counter.count == 0  # before the references below compile theirs
        assert engine.stats().kv_blocks_used == 0
        for prompt, output in zip(prompts, outputs, strict=True):
            assert output.finish_reason == FinishReason.LENGTH
            (alone,) = generate(params, config, [prompt], 5)
            assert output.token_ids == alone.token_ids
            assert np.allclose(output.logprobs, alone.logprobs, atol=1e-4)
    finally:
        engine.shutdown(drain=False)
