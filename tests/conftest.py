"""Shared fixtures: tiny Qwen2-MoE checkpoints written by transformers itself."""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

# Four host devices for the expert-parallel tests (tests/test_expert_parallel.py). XLA reads
# the flag once, when the first test touches a device, so it must be set before any of that;
# every other test keeps running on device 0, the default.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    ).strip()

# One persistent XLA compilation cache for the whole run (and the server subprocesses it
# starts): engines and servers built with the same shapes reuse each other's executables.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "brownout-jax-test-xla")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# Packed dense weights run the kernel at every row count: the same code path on every machine
# (the measured choice is tested on its own, test_packed_params.py), no timing in tests, and
# nothing written to the user's cache.
os.environ.setdefault("BROWNOUT_JAX_DENSE_PATH", "kernel")
os.environ.setdefault(
    "BROWNOUT_JAX_CACHE_DIR", os.path.join(tempfile.gettempdir(), "brownout-jax-test-cache")
)

import numpy as np
import pytest


@dataclasses.dataclass(frozen=True)
class TinySpec:
    """A random tiny Qwen2-MoE config, varied along the axes parity must hold on."""

    name: str
    overrides: dict
    seed: int = 0


def _base_config(**overrides):
    from transformers import Qwen2MoeConfig

    fields = dict(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=24,
        max_position_embeddings=256,
        initializer_range=0.1,
        rope_theta=10000.0,
        eos_token_id=None,
    )
    fields.update(overrides)
    rope_theta = fields.pop("rope_theta")
    config = Qwen2MoeConfig(**fields)
    config.rope_parameters = {"rope_type": "default", "rope_theta": rope_theta}
    return config


# Three+ configs that differ in GQA, norm_topk_prob, tying, dense layers, top-k, expert count.
PARITY_SPECS = [
    TinySpec(
        "gqa_norm_topk_dense_layer",
        dict(
            num_hidden_layers=3,
            num_key_value_heads=2,
            norm_topk_prob=True,
            mlp_only_layers=[1],
            num_experts=8,
            num_experts_per_tok=2,
        ),
        seed=1,
    ),
    TinySpec(
        "tied_top1_sparse_step2",
        dict(
            tie_word_embeddings=True,
            num_experts=4,
            num_experts_per_tok=1,
            decoder_sparse_step=2,
            qkv_bias=False,
        ),
        seed=2,
    ),
    TinySpec(
        "gqa4_top4_16experts",
        dict(
            num_attention_heads=8,
            num_key_value_heads=2,
            num_experts=16,
            num_experts_per_tok=4,
            hidden_size=64,
            rope_theta=1_000_000.0,
        ),
        seed=3,
    ),
]


def write_tiny_checkpoint(
    directory: Path, spec: TinySpec, max_shard_size: str | None = None, tokenizer: bool = False
) -> Path:
    import torch
    from transformers import Qwen2MoeForCausalLM

    torch.manual_seed(spec.seed)
    config = _base_config(**spec.overrides)
    model = Qwen2MoeForCausalLM(config).eval()
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, **kwargs)
    if tokenizer:
        write_tiny_tokenizer(directory, config.vocab_size)
    return directory


def write_tiny_tokenizer(directory: Path, vocab_size: int) -> None:
    """A word-level tokenizer over a fixed word list; ids below ``vocab_size``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<|endoftext|>", "[UNK]"] + [f"w{i}" for i in range(vocab_size - 2)]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="<|endoftext|>", unk_token="[UNK]"
    )
    fast.chat_template = (
        "{% for m in messages %}w1 {{ m['content'] }} w2 {% endfor %}"
        "{% if add_generation_prompt %}w3{% endif %}"
    )
    fast.save_pretrained(directory)


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {spec.name: write_tiny_checkpoint(root / spec.name, spec) for spec in PARITY_SPECS}


@pytest.fixture(scope="session")
def tiny_with_tokenizer(tmp_path_factory) -> Path:
    spec = PARITY_SPECS[0]
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tok") / "model", spec, tokenizer=True)


@pytest.fixture(autouse=True, scope="module")
def _release_executables():
    """XLA:CPU maps each compiled model step's code in ~200 memory mappings, and JAX's caches
    keep every executable alive: a whole run crosses the kernel's vm.max_map_count (65530) and
    the process dies with a segfault inside XLA. Dropping them after each module keeps the run
    far below that (the persistent cache makes a later recompile a cheap load)."""
    yield
    import gc

    import jax

    jax.clear_caches()
    gc.collect()


class CompileCounter:
    """Counts XLA compilations from now on, and the threads they ran on."""

    def __init__(self):
        import threading

        import jax

        self._threading = threading
        self.threads: list[str] = []
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, name, duration, **kwargs):
        if name == "/jax/core/compile/backend_compile_duration":
            self.threads.append(self._threading.current_thread().name)

    @property
    def count(self) -> int:
        return len(self.threads)


def rel_err(out, ref) -> float:
    out = np.asarray(out, np.float64)
    ref = np.asarray(ref, np.float64)
    assert np.all(np.isfinite(out)), "output has NaN/inf"
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def tiny_model_config(**changes):
    from brownout_jax.model.config import PRESETS

    return PRESETS["tiny"].replace(**changes)


@pytest.fixture(scope="session")
def tiny_moe():
    """A random 3-layer model with 16 experts (top-4) and way-4 united experts attached."""
    import jax

    from brownout_jax.model.params import init_random_params
    from brownout_jax.united.calibration import random_token_sequences
    from brownout_jax.united.distill import DistillConfig, build_united_experts
    from brownout_jax.united.united import attach_united

    config = tiny_model_config()
    params = init_random_params(config, jax.random.key(0), scale=0.3)
    sequences = random_token_sequences(1024, config.vocab_size, 64)
    united, reports = build_united_experts(
        params, config, sequences, 4, "contiguous", DistillConfig(max_steps=60), progress=False
    )
    return config, params, united, attach_united(params, config, united), reports


# Small engine shapes every server test shares (each process compiles its steps; the persistent
# cache above makes a second process with the same shapes load them instead).
SERVER_BASE_ARGS = (
    "--max-batch",
    "4",
    "--max-prefill-batch",
    "2",
    "--block-size",
    "16",
    "--brownout",
    "off",
    "--dtype",
    "float32",
)


class ServerProcess:
    """``brownout-jax serve`` as a separate process on 127.0.0.1, both fronts on ephemeral
    ports; ``target`` is the gRPC HOST:PORT and ``http`` the HTTP base URL (None when off).
    Its output is read on a thread (a full pipe would stall the server) into ``lines``."""

    def __init__(
        self,
        model,
        *args,
        env: dict | None = None,
        timeout: float = 600,
        python: tuple[str, ...] = (sys.executable,),
        wait: bool = True,
    ):
        """``model`` None: the bundled demo; ``python``: the interpreter and its flags;
        ``wait`` False: return at once (a follower process, which never says "serving")."""
        command = [*python, "-m", "brownout_jax.cli", "serve"]
        command += [] if model is None else ["--model", str(model)]
        self.process = subprocess.Popen(
            [*command, "--port", "0", "--http-port", "0", *SERVER_BASE_ARGS, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=None if env is None else {**os.environ, **env},
        )
        self.lines: list[str] = []
        self.target = self.http = None
        self._listening = threading.Event()
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if wait and (not self._ready.wait(timeout) or self.process.poll() is not None):
            self.process.kill()
            raise RuntimeError("server did not become ready:\n" + self.output)

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)
            if "listening on" in line:
                grpc_at = re.search(r"gRPC (127\.0\.0\.1:\d+)", line)
                http_at = re.search(r"HTTP (http://127\.0\.0\.1:\d+)", line)
                self.target = grpc_at.group(1) if grpc_at else None
                self.http = http_at.group(1) if http_at else None
                self._listening.set()
            if "serving" in line and " on " in line:
                self._ready.set()
        self._ready.set()  # exited: __init__ reports the output

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def stop(self, timeout: float = 120) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=timeout)
        self._reader.join(10)
        return code


@pytest.fixture(scope="session")
def start_server():
    """``start_server(model, *flags, env=None)`` → a ready :class:`ServerProcess`."""
    return ServerProcess
