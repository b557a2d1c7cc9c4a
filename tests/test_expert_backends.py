"""The routed experts through each backend give the same model: logits, brownout levels,
bf16, greedy generation on the demo; the CLI falls back when the kernel library is missing."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err

from brownout_jax.checkpoints import load_model
from brownout_jax.checkpoints.demo_model import demo_model_dir
from brownout_jax.model.transformer import forward_logits
from brownout_jax.moe.expert_backend import ExpertBackend
from brownout_jax.moe.options import MoeOptions
from brownout_jax.offline.generate import generate

# Stated tolerance of the bf16 model (weights and activations bf16, the CPU kernel's bf16-dot
# copy) against the float32 model on the pure-JAX path: bf16 rounding of activations between
# layers, as in HF's bf16 model (docs/BENCHMARKS.md: 7e-3 … 3e-2 for bf16 vs fp32 parity).
BF16_TOLERANCE = 5e-2


def _sequences(config, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, config.vocab_size, (3, 20)).astype(np.int32)
    return jnp.asarray(tokens), jnp.asarray([20, 13, 7], jnp.int32)


@pytest.mark.parametrize("threshold", [1.0, 0.5, 0.0])
def test_cpu_kernel_logits_equal_the_reference_paths_in_f32(tiny_moe, threshold):
    config, _, _, params, _ = tiny_moe
    tokens, lengths = _sequences(config)

    def logits(backend):
        options = MoeOptions(backend=backend, threshold=threshold)
        return forward_logits(params, config, tokens, lengths, options)

    kernel = logits(ExpertBackend.CPU_KERNEL)
    assert rel_err(kernel, logits(ExpertBackend.SORTED_TILES)) <= 1e-5
    assert rel_err(kernel, logits(ExpertBackend.DENSE)) <= 1e-5


@pytest.mark.parametrize("threshold", [1.0, 0.0])
def test_bf16_model_through_the_kernel_within_the_stated_tolerance(tiny_moe, threshold):
    config, _, _, params, _ = tiny_moe
    tokens, lengths = _sequences(config, seed=1)
    reference = forward_logits(
        params,
        config,
        tokens,
        lengths,
        MoeOptions(backend=ExpertBackend.SORTED_TILES, threshold=threshold),
    )
    bf16 = jax.tree_util.tree_map(
        lambda a: a.astype(jnp.bfloat16) if jnp.issubdtype(a.dtype, jnp.floating) else a, params
    )
    out = forward_logits(
        bf16,
        config,
        tokens,
        lengths,
        MoeOptions(backend=ExpertBackend.CPU_KERNEL, threshold=threshold),
    )
    mask = np.arange(tokens.shape[1])[None, :] < np.asarray(lengths)[:, None]
    assert rel_err(np.asarray(out)[mask], np.asarray(reference)[mask]) <= BF16_TOLERANCE


def test_greedy_generation_on_the_demo_is_identical_between_backends():
    demo = load_model(demo_model_dir(), "float32")
    prompts = [
        demo.tokenizer.encode(text)
        for text in ("Return the absolute value of", "Create a new", "def f(x):")
    ]

    def run(backend):
        options = MoeOptions(backend=backend)
        results = generate(
            demo.params, demo.config, prompts, 24, prefill_options=options, decode_options=options
        )
        return [r.token_ids for r in results]

    assert run(ExpertBackend.CPU_KERNEL) == run(ExpertBackend.SORTED_TILES)


def test_cli_without_the_library_says_so_once_and_still_generates():
    env = dict(os.environ, BROWNOUT_JAX_CPU_KERNELS="off")
    args = ["generate", "--prompt-ids", "5,6,7", "--max-new-tokens", "4", "--output", "json"]
    done = subprocess.run(
        [sys.executable, "-m", "brownout_jax.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stderr.count("CPU expert kernel unavailable") == 1
    assert '"token_ids"' in done.stdout
