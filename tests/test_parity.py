"""Exact parity with transformers' Qwen2MoeForCausalLM (torch CPU, fp32)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import PARITY_SPECS, rel_err
from transformers import Qwen2MoeForCausalLM

from brownout_jax.checkpoints import load_model
from brownout_jax.cli import main as cli
from brownout_jax.model.kv_cache import ContiguousKVCache
from brownout_jax.model.transformer import decode, forward_logits, prefill

SPEC_NAMES = [s.name for s in PARITY_SPECS]


def _hf(path):
    return Qwen2MoeForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize("name", SPEC_NAMES)
def test_full_sequence_logits_match_transformers(tiny_checkpoints, name):
    path = tiny_checkpoints[name]
    model = load_model(path, "float32", progress=False)
    ids = np.random.default_rng(10).integers(0, model.config.vocab_size, (3, 17))
    with torch.no_grad():
        ref = _hf(path)(torch.tensor(ids)).logits.numpy()
    out = forward_logits(model.params, model.config, jnp.asarray(ids), jnp.full((3,), 17))
    assert rel_err(out, ref) <= 1e-5


@pytest.mark.parametrize("name", SPEC_NAMES)
def test_prefill_then_decode_equals_full_forward(tiny_checkpoints, name):
    """Right-padded prompts of different lengths, then teacher-forced decode through the cache:
    every step's logits equal the full forward at that position."""
    model = load_model(tiny_checkpoints[name], "float32", progress=False)
    config, params = model.config, model.params
    rng = np.random.default_rng(11)
    lengths = np.array([5, 9])
    total = 16
    seqs = rng.integers(0, config.vocab_size, (2, total))
    full = np.asarray(forward_logits(params, config, jnp.asarray(seqs), jnp.full((2,), total)))

    prompt = np.where(np.arange(12)[None] < lengths[:, None], seqs[:, :12], 0)
    cache = ContiguousKVCache.allocate(config, 2, 32)
    out = jax.jit(prefill, static_argnums=1)(
        params, config, cache, jnp.asarray(prompt), jnp.asarray(lengths)
    )
    cache, last = out.cache, out.logits
    ref_last = full[np.arange(2), lengths - 1]
    assert rel_err(last, ref_last) <= 1e-5

    positions = lengths.copy()
    decode_jit = jax.jit(decode, static_argnums=1)
    for _ in range(total - lengths.max()):
        tokens = seqs[np.arange(2), positions]
        out = decode_jit(
            params,
            config,
            cache,
            jnp.asarray(tokens),
            jnp.asarray(positions),
            jnp.ones(2, bool),
        )
        cache = out.cache
        assert rel_err(out.logits, full[np.arange(2), positions]) <= 1e-5
        positions += 1


@pytest.mark.parametrize("name", SPEC_NAMES)
def test_cli_greedy_generation_matches_transformers_generate(tiny_checkpoints, name, capsys):
    path = tiny_checkpoints[name]
    prompt = [3, 17, 42, 5, 8, 61, 2]
    hf = _hf(path)
    with torch.no_grad():
        generated = hf.generate(
            torch.tensor([prompt]),
            max_new_tokens=24,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
            pad_token_id=0,
        )
    ref_tokens = generated.sequences[0, len(prompt) :].tolist()
    ref_logprobs = [
        torch.log_softmax(score[0], -1)[tok].item()
        for score, tok in zip(generated.scores, ref_tokens, strict=True)
    ]

    code = cli.main(
        [
            "generate",
            "--model",
            str(path),
            "--prompt-ids",
            ",".join(map(str, prompt)),
            "--max-new-tokens",
            "24",
            "--temperature",
            "0",
            "--dtype",
            "float32",
            "--ignore-eos",
            "--output",
            "json",
        ]
    )
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["token_ids"] == ref_tokens
    assert len(ref_tokens) == 24
    np.testing.assert_allclose(out["logprobs"], ref_logprobs, rtol=1e-4, atol=1e-5)
    assert out["finish_reason"] == "length"
