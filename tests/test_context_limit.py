"""The context limit comes from the model; a request past it is refused naming both numbers.
Host-only (no JAX compilation), plus the transformers import that serve/generate make."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from brownout_jax.engine.config import EngineConfig
from brownout_jax.engine.requests import GenerationRequest, RequestError, validate_request


def test_default_limit_is_the_models_positions():
    config = EngineConfig(num_blocks=512, block_size=16).for_model(256)
    assert config.max_model_len == 256
    assert config.max_prefill_tokens == 2048
    assert config.buckets().prefill_lengths[-1] == 256


def test_default_limit_is_capped_by_the_kv_pool():
    config = EngineConfig(num_blocks=9, block_size=16).for_model(8192)
    assert config.max_model_len == 8 * 16  # block 0 is reserved
    assert EngineConfig(num_blocks=600).for_model(8192).max_prefill_tokens == 8192


def test_explicit_limit_past_the_positions_needs_the_extrapolation_flag():
    with pytest.raises(ValueError, match=r"512 exceeds .*max_position_embeddings 256") as info:
        EngineConfig(max_model_len=512).for_model(256)
    assert "--allow-context-extrapolation" in str(info.value)
    forced = EngineConfig(max_model_len=512, allow_context_extrapolation=True).for_model(256)
    assert forced.max_model_len == 512
    assert EngineConfig(max_model_len=128).for_model(256).max_model_len == 128


def test_unresolved_config_has_no_buckets():
    with pytest.raises(ValueError, match="for_model"):
        EngineConfig().buckets()


@pytest.mark.parametrize(
    ("prompt_len", "max_tokens", "field", "numbers"),
    [
        (266, 1, "prompt", ("266", "256")),
        (256, 1, "prompt", ("256 prompt tokens", "256 tokens")),
        (200, 100, "max_tokens", ("200", "100", "256")),
    ],
)
def test_requests_past_the_limit_name_the_numbers(prompt_len, max_tokens, field, numbers):
    request = GenerationRequest(prompt_token_ids=(1,) * prompt_len, max_new_tokens=max_tokens)
    with pytest.raises(RequestError) as info:
        validate_request(request, vocab_size=96, max_model_len=256)
    assert info.value.field == field
    assert all(n in str(info.value) for n in numbers)
    validate_request(
        GenerationRequest(prompt_token_ids=(1,) * 200, max_new_tokens=56), 96, max_model_len=256
    )


_NO_TORCH = "import sys; sys.modules['torch'] = None; "  # find_spec('torch') is then None


def _stderr_of(code: str) -> str:
    # A fresh environment: this test process may have set the variable itself by loading a
    # tokenizer in an earlier test.
    env = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_NO_ADVISORY_WARNINGS"}
    run = subprocess.run(
        [sys.executable, "-c", _NO_TORCH + code],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert run.returncode == 0, run.stderr
    return run.stderr


def test_tokenizer_load_without_torch_prints_no_pytorch_warning(tiny_with_tokenizer):
    # The warning is real without the loader's setting (so this test can see it) ...
    assert "PyTorch was not found" in _stderr_of("import transformers")
    # ... and absent on the path serve and generate take to load a tokenizer.
    stderr = _stderr_of(
        "from brownout_jax.checkpoints.loader import load_tokenizer; "
        f"assert load_tokenizer({str(tiny_with_tokenizer)!r}) is not None"
    )
    assert "PyTorch was not found" not in stderr


def test_a_kv_pool_the_machine_cannot_hold_is_refused_naming_the_flag(monkeypatch):
    import jax

    from brownout_jax.engine import paged_cache
    from brownout_jax.engine.front import Engine
    from brownout_jax.model.config import PRESETS
    from brownout_jax.model.params import init_random_params

    config = PRESETS["tiny"]
    params = init_random_params(config, jax.random.key(0))
    need = paged_cache.kv_pool_bytes(config, 64, 16, params.embed.dtype)
    monkeypatch.setattr(paged_cache, "available_memory_bytes", lambda: need - 1)
    with pytest.raises(ValueError, match="--kv-blocks"):
        Engine(params, config, EngineConfig(num_blocks=64, max_model_len=32), progress=False)
