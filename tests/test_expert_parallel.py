"""Expert parallelism over 2 and 4 CPU devices (conftest forces 4 host devices): the same
logits and tokens as one device at every threshold, padding included, one compilation per
engine step, per-device load statistics, clear errors, and a mesh spanning two processes."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import CompileCounter, rel_err, tiny_model_config

from brownout_jax.engine.buckets import EngineBuckets
from brownout_jax.engine.config import EngineConfig
from brownout_jax.engine.controller import ControllerConfig
from brownout_jax.engine.front import Engine
from brownout_jax.engine.input_words import InputLayout
from brownout_jax.engine.requests import GenerationRequest
from brownout_jax.engine.step_grid import StepGrid, abstract_tree
from brownout_jax.engine.steps import (
    PACK_WIDTH,
    engine_decode_step,
    engine_prefill_step,
    host_decode_batch,
    host_prefill_batch,
)
from brownout_jax.model.kv_cache import ContiguousKVCache
from brownout_jax.model.params import init_random_params
from brownout_jax.model.transformer import decode, forward_logits, prefill
from brownout_jax.moe.expert_parallel import (
    ExpertLayout,
    expert_load_per_device,
    expert_parallel_setup,
    make_mesh,
    routed_load,
    shard_params,
)
from brownout_jax.moe.ladder import ThresholdLadder
from brownout_jax.moe.mesh_config import MeshConfig, add_mesh_argument, mesh_from_arg
from brownout_jax.moe.options import MoeOptions
from brownout_jax.offline.generate import generate
from brownout_jax.united.calibration import random_token_sequences
from brownout_jax.united.distill import DistillConfig, build_united_experts
from brownout_jax.united.united import attach_united

pytestmark = pytest.mark.skipif(
    jax.device_count() < 4, reason="needs 4 devices (XLA_FLAGS set by conftest before JAX)"
)

# 6 experts: on 4 devices originals pad to 8 (2 per device) and way-2 united 3 → 4.
CONFIG = tiny_model_config(num_layers=2, num_experts=6, num_experts_per_tok=2)
THRESHOLDS = (0.0, 0.5, 1.0)


@pytest.fixture(scope="module")
def models():
    params = init_random_params(CONFIG, jax.random.key(3), scale=0.3)
    sequences = random_token_sequences(256, CONFIG.vocab_size, 32)
    out = {}
    for grouping in ("contiguous", "similarity"):
        united, _ = build_united_experts(
            params, CONFIG, sequences, 2, grouping, DistillConfig(max_steps=10), progress=False
        )
        out[grouping] = attach_united(params, CONFIG, united)
    groups = [np.asarray(m.layers[0].mlp.group_of_expert).tolist() for m in out.values()]
    assert groups[0] != groups[1]  # the two groupings really differ
    return out


def _mesh(n: int):
    return make_mesh(MeshConfig(n), jax.devices()[:n])


@functools.partial(jax.jit, static_argnames=("options",))
def _prefill_then_decode(params, tokens, lengths, next_tokens, options):
    cache = ContiguousKVCache.allocate(CONFIG, tokens.shape[0], 32, params.embed.dtype)
    first = prefill(params, CONFIG, cache, tokens, lengths, options)
    active = lengths > 0
    second = decode(params, CONFIG, first.cache, next_tokens, lengths, active, options)
    return first.logits, second.logits


def _batch():
    rng = np.random.default_rng(11)
    tokens = jnp.asarray(rng.integers(0, CONFIG.vocab_size, (3, 16)), jnp.int32)
    lengths = jnp.asarray([16, 9, 0], jnp.int32)  # a padding row is never routed
    next_tokens = jnp.asarray(rng.integers(0, CONFIG.vocab_size, 3), jnp.int32)
    return tokens, lengths, next_tokens


@pytest.mark.parametrize("grouping", ["contiguous", "similarity"])
def test_logits_on_2_and_4_devices_equal_one_device(models, grouping):
    params = models[grouping]
    batch = _batch()
    reference = {
        t: _prefill_then_decode(params, *batch, MoeOptions(threshold=t)) for t in THRESHOLDS
    }
    # Brownout really changes the model here, so equality below is not vacuous.
    assert rel_err(reference[0.0][1], reference[1.0][1]) > 1e-3
    for n in (2, 4):
        mesh = _mesh(n)
        placed = shard_params(params, CONFIG, mesh)
        assert placed.layers[0].mlp.experts.w_gate.shape[:2] == (n, {2: 5, 4: 3}[n])
        for t in THRESHOLDS:
            got = _prefill_then_decode(placed, *batch, MoeOptions(threshold=t, mesh=mesh))
            for phase, out, ref in zip(("prefill", "decode"), got, reference[t], strict=True):
                rows = np.asarray(batch[1]) > 0
                err = rel_err(np.asarray(out)[rows], np.asarray(ref)[rows])
                assert err <= 1e-5, (n, t, phase, err)


@functools.partial(jax.jit, static_argnames=("options",))
def _prefill_then_decode_exact(params, tokens, lengths, next_tokens, exact_rows, options):
    cache = ContiguousKVCache.allocate(CONFIG, tokens.shape[0], 32, params.embed.dtype)
    first = prefill(params, CONFIG, cache, tokens, lengths, options, exact_rows)
    active = lengths > 0
    second = decode(params, CONFIG, first.cache, next_tokens, lengths, active, options, exact_rows)
    return first.logits, second.logits


def test_exact_rows_on_4_devices_equal_one_device_and_the_exact_model(models):
    """Routing (and so the exemption of a never-brownout row) happens before the experts are
    sharded: on a mesh the exact row still gets the exact model's logits."""
    params = models["similarity"]
    batch = _batch()
    exact_rows = jnp.asarray([True, False, False])
    exact_model = _prefill_then_decode(params, *batch, MoeOptions(threshold=1.0))
    at_zero = _prefill_then_decode(params, *batch, MoeOptions(threshold=0.0))
    mesh = _mesh(4)
    placed = shard_params(params, CONFIG, mesh)
    options = MoeOptions(threshold=0.0, mesh=mesh)
    got = _prefill_then_decode_exact(placed, *batch, exact_rows, options)
    for out, exact, browned in zip(got, exact_model, at_zero, strict=True):
        out, exact, browned = map(np.asarray, (out, exact, browned))
        assert rel_err(out[0], exact[0]) <= 1e-5  # the never row: the exact model
        assert rel_err(out[1], browned[1]) <= 1e-5  # its neighbour: browned out as before
        # Brownout really changes both rows, so the two checks above are not vacuous.
        assert min(rel_err(browned[r], exact[r]) for r in (0, 1)) > 1e-3


def test_engine_greedy_on_mesh_equals_one_device_and_compiles_once_per_step(models):
    params = models["similarity"]
    config = EngineConfig(
        max_batch=2,
        max_prefill_batch=2,
        max_prefill_tokens=32,
        block_size=8,
        num_blocks=8,
        max_model_len=16,
        ladder=ThresholdLadder((0.5, 1.0)),
        controller=ControllerConfig(mode="fixed", fixed_threshold=0.5),
        mesh=MeshConfig(4),
    )
    engine = Engine(params, CONFIG, config, progress=False)
    try:
        buckets = engine.config.buckets()
        per_level = len(buckets.prefill_batches) * len(buckets.prefill_lengths) + len(
            buckets.decode_batches
        ) * len(buckets.decode_widths)
        assert engine.compiled_steps == 2 * per_level  # one executable per (phase, level, bucket)
        prompts = [[5, 9, 3, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9]]
        reference = {}
        for level in (0.5, 1.0):
            options = MoeOptions(threshold=level)
            for prompt in prompts:
                (alone,) = generate(
                    params, CONFIG, [prompt], 6, prefill_options=options, decode_options=options
                )
                reference[level, tuple(prompt)] = alone.token_ids
        counter = CompileCounter()
        for level in (0.5, 1.0):
            if level == 1.0:  # idle between waves: swapping the controller is safe
                engine.set_controller(ControllerConfig(mode="off"))
            # One at a time: brownout's hot set depends on the batch; the reference ran alone.
            for prompt in prompts:
                request = GenerationRequest(prompt_token_ids=tuple(prompt), max_new_tokens=6)
                got = engine.submit(request).result(timeout=300)
                assert got.token_ids == reference[level, tuple(prompt)], level
            # Together: other batch buckets, still nothing to compile.
            handles = [
                engine.submit(GenerationRequest(prompt_token_ids=tuple(p), max_new_tokens=6))
                for p in prompts
            ]
            assert all(len(h.result(timeout=300).token_ids) == 6 for h in handles)
        assert counter.count == 0, "serving on the mesh compiled something"
    finally:
        engine.shutdown(drain=False)


def test_offline_generate_on_mesh_equals_one_device(models):
    params = models["contiguous"]
    options = (MoeOptions(threshold=0.5), MoeOptions(threshold=0.0))
    placed, (pre, dec) = expert_parallel_setup(params, CONFIG, MeshConfig(4), options)
    prompts = [[5, 9, 3, 7], [1, 2, 3]]
    got = generate(placed, CONFIG, prompts, 5, prefill_options=pre, decode_options=dec)
    ref = generate(
        params, CONFIG, prompts, 5, prefill_options=options[0], decode_options=options[1]
    )
    assert [r.token_ids for r in got] == [r.token_ids for r in ref]
    assert expert_parallel_setup(params, CONFIG, None, options) == (params, options)


def test_load_per_device_counts_rows_tokens_and_experts():
    # 6 experts, 3 united, 2 devices: originals 0-2 | 3-5, united 6 (g0), 7 (g1) | 8 (g2).
    layout = ExpertLayout.for_counts(6, 3, 2)
    assert (layout.originals_per_shard, layout.united_per_shard) == (3, 2)
    ids = jnp.asarray([[0, 4], [1, 2], [6, 8], [5, 5]], jnp.int32)
    mask = jnp.asarray([True, True, True, False])
    load = expert_load_per_device(ids, mask, layout)
    assert np.asarray(load.assignments).tolist() == [4, 2]
    assert np.asarray(load.tokens).tolist() == [3, 2]
    assert np.asarray(load.experts).tolist() == [4, 2]  # {0, 1, 2, 6} | {4, 8}


def test_routed_load_sums_to_the_single_device_work(models):
    params = models["contiguous"]
    moe = params.layers[0].mlp
    x = jax.random.normal(jax.random.key(1), (40, CONFIG.hidden_size))
    mask = jnp.arange(40) < 33
    for t in THRESHOLDS:
        one = routed_load(x, moe, mask, 2, False, t, 1)
        four = routed_load(x, moe, mask, 2, False, t, 4)
        assert int(one.assignments[0]) == 33 * 2 == int(np.sum(four.assignments))
        assert int(one.experts[0]) == int(np.sum(four.experts))
        assert int(one.tokens[0]) == 33 <= int(np.sum(four.tokens))


@pytest.mark.parametrize(
    ("text", "expected"),
    [("expert=4", MeshConfig(4)), (" expert = 2 ", MeshConfig(2)), ("", None), (None, None)],
)
def test_mesh_strings(text, expected):
    assert mesh_from_arg(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("expert", "AXIS=SIZE"),
        ("=4", "AXIS=SIZE"),
        ("data=2", "unknown axis 'data'"),
        ("expert=two", "must be an integer"),
        ("expert=0", "positive integer"),
        ("expert=-2", "positive integer"),
        ("expert=2,expert=4", "given twice"),
    ],
)
def test_bad_mesh_strings_are_refused(text, message):
    with pytest.raises(ValueError, match=message):
        MeshConfig.parse(text)


def test_mesh_argument_parses_and_refuses(capsys):
    parser = argparse.ArgumentParser()
    add_mesh_argument(parser)
    assert parser.parse_args(["--mesh", "expert=4"]).mesh == MeshConfig(4)
    assert parser.parse_args([]).mesh is None
    with pytest.raises(SystemExit) as info:
        parser.parse_args(["--mesh", "tensor=2"])
    assert info.value.code == 2 and "unknown axis" in capsys.readouterr().err


def test_device_count_mismatch_names_both_numbers():
    with pytest.raises(ValueError, match=r"expert=8 needs 8 devices, but JAX sees 4"):
        make_mesh(MeshConfig(8))
    with pytest.raises(ValueError, match=r"needs 2 devices, but JAX sees 3"):
        make_mesh(MeshConfig(2), jax.devices()[:3])
    params = init_random_params(CONFIG, jax.random.key(0))
    with pytest.raises(ValueError, match="needs 8 devices"):
        Engine(params, CONFIG, EngineConfig(mesh=MeshConfig(8)), progress=False)


def test_impossible_and_mismatched_layouts_are_refused(models):
    params = models["contiguous"]
    with pytest.raises(ValueError, match="exceeds the 3 routed experts"):
        ExpertLayout.for_counts(3, 1, 4)
    placed = shard_params(params, CONFIG, _mesh(2))
    tokens, lengths = jnp.zeros((1, 4), jnp.int32), jnp.asarray([4])
    with pytest.raises(ValueError, match=r"laid out for expert=2, the mesh has expert=4"):
        forward_logits(placed, CONFIG, tokens, lengths, MoeOptions(mesh=_mesh(4)))
    with pytest.raises(ValueError, match=r"pass MoeOptions\(mesh=\.\.\.\)"):
        forward_logits(placed, CONFIG, tokens, lengths, MoeOptions())
    with pytest.raises(ValueError, match="not laid out for expert parallelism"):
        forward_logits(params, CONFIG, tokens, lengths, MoeOptions(mesh=_mesh(2)))
    with pytest.raises(ValueError, match="already laid out"):
        shard_params(placed, CONFIG, _mesh(2))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_mesh_across_two_processes_equals_one_process_and_one_device(tmp_path):
    from brownout_jax.demos.ep_multiprocess import THRESHOLDS as DEMO_THRESHOLDS
    from brownout_jax.demos.ep_multiprocess import run_demo

    out = tmp_path / "two.npz"
    coordinator = f"127.0.0.1:{_free_port()}"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "brownout_jax.demos.ep_multiprocess",
                "--coordinator",
                coordinator,
                "--num-processes",
                "2",
                "--process-id",
                str(i),
                "--local-devices",
                "2",
                "--timeout",
                "60",
                *(["--out", str(out)] if i == 0 else []),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=240)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    for proc, log in zip(procs, logs, strict=True):
        assert proc.returncode == 0, log[-3000:]
        assert "2 local of 4 devices" in log, log[-3000:]
    two = np.load(out)
    one_process = run_demo(_mesh(4))
    one_device = run_demo(None)
    assert np.array_equal(two["greedy"], one_process["greedy"])
    assert np.array_equal(two["greedy"], one_device["greedy"])
    for t in DEMO_THRESHOLDS:
        key = f"logits_{t}"
        assert rel_err(two[key], one_process[key]) <= 1e-6
        assert rel_err(two[key], one_device[key]) <= 1e-5


def test_mesh_config_is_hashable_static():
    options = MoeOptions(threshold=0.5, mesh=_mesh(2))
    assert hash(options) == hash(dataclasses.replace(options))
    assert EngineConfig(mesh=MeshConfig(2)).mesh == MeshConfig(2)


def test_packed_step_output_gains_one_load_row_per_device_only_on_a_mesh(models):
    """The engine's one host sync per step: B sampled rows (+ B·T prompt-score rows in a
    prefill step) on one device, DEV more rows of load on a mesh (shapes only: nothing is
    compiled)."""
    params = models["contiguous"]
    buckets = EngineBuckets((2,), (16,), (2,), (2,), 8)
    for mesh in (None, _mesh(4)):
        placed = params if mesh is None else shard_params(params, CONFIG, mesh)
        options = MoeOptions(mesh=mesh)
        grid = StepGrid(placed, CONFIG, ThresholdLadder((1.0,)), buckets, 8, 2, options)
        for step, batch, rows in (
            (engine_prefill_step, host_prefill_batch(2, 16, 2, 2), 2 + 2 * 16),
            (engine_decode_step, host_decode_batch(2, 2, 2), 2),
        ):
            layout = InputLayout.of(batch)
            _, packed = jax.eval_shape(
                functools.partial(
                    step,
                    config=CONFIG,
                    moe_options=grid.options(0.5),
                    attention=grid.attention,
                    layout=layout,
                ),
                grid._params,
                grid._state,
                abstract_tree(layout.pack(batch), grid.input_sharding),
            )
            devices = 0 if mesh is None else 4
            assert packed.shape == (rows + devices, PACK_WIDTH), (mesh, step)


def test_engine_stats_report_device_load_and_brownout_shrinks_the_busiest_device(models):
    params = models["contiguous"]  # groups {0, 1} {2, 3} {4, 5}: each on one device
    config = EngineConfig(
        max_batch=4,
        max_prefill_batch=4,
        max_prefill_tokens=64,
        block_size=8,
        num_blocks=12,
        max_model_len=16,
        ladder=ThresholdLadder((0.0, 1.0)),
        controller=ControllerConfig(mode="fixed", fixed_threshold=0.0),
        mesh=MeshConfig(4),
    )
    engine = Engine(params, CONFIG, config, progress=False)
    prompts = [[5, 9, 3, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9], [11, 40, 2], [60, 61, 62, 63, 64]]
    try:
        for level in (0.0, 1.0):
            if level == 1.0:  # idle between waves: swapping the controller is safe
                engine.set_controller(ControllerConfig(mode="off"))
            handles = [
                engine.submit(GenerationRequest(prompt_token_ids=tuple(p), max_new_tokens=6))
                for p in prompts
            ]
            assert all(len(h.result(timeout=300).token_ids) == 6 for h in handles)
        loads = {(s.phase, s.threshold): s for s in engine.stats().device_load}
        registry = engine.metrics.registry
        received = registry.get_sample_value(
            "brownout_expert_device_tokens_total", {"phase": "decode", "device": "0"}
        )
    finally:
        engine.shutdown(drain=False)
    assert set(loads) == {(p, t) for p in ("prefill", "decode") for t in (0.0, 1.0)}
    for load in loads.values():
        assert load.steps > 0 and len(load.tokens) == len(load.experts) == 4
        # 6 experts on 4 devices: device 3 holds only padding, which is never routed to.
        assert load.tokens[3] == load.experts[3] == 0
        assert load.busiest_experts == pytest.approx(load.expert_imbalance * np.mean(load.experts))
        # Each real token is received somewhere, and by at most its top-k (2) devices.
        assert 0 < max(load.tokens) <= load.busiest_tokens <= sum(load.tokens)
    assert received is not None and received > 0
    for phase in ("prefill", "decode"):
        exact, brownout = loads[phase, 1.0], loads[phase, 0.0]
        # At threshold 0 a group's two active experts become its one united expert, on the
        # same device: fewer experts everywhere, the busiest device included.
        assert sum(brownout.experts) < sum(exact.experts), phase
        assert brownout.busiest_experts < exact.busiest_experts, phase


def _cli(*args: str, devices: int = 4) -> subprocess.CompletedProcess:
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
    )
    return subprocess.run(
        [sys.executable, "-m", "brownout_jax.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_greedy_generation_on_mesh_equals_one_device():
    """The bundled demo model (32 experts, way-4 united: 8 per device, 2 united each), in
    float32 (in bf16 the mesh sums its partial outputs in bf16: same tokens, logprobs ~1e-2)."""
    outputs = {}
    for threshold in ("1", "0.5"):
        for mesh in ((), ("--mesh", "expert=4")):
            result = _cli(
                "generate",
                "def absolute(x):",
                "--max-new-tokens",
                "12",
                "--ignore-eos",
                "--dtype",
                "float32",
                "--threshold",
                threshold,
                *mesh,
                "--output",
                "json",
            )
            assert result.returncode == 0, result.stderr[-3000:]
            outputs[threshold, bool(mesh)] = json.loads(result.stdout)
    for threshold in ("1", "0.5"):
        one, four = outputs[threshold, False], outputs[threshold, True]
        assert four["token_ids"] == one["token_ids"], threshold
        np.testing.assert_allclose(four["logprobs"], one["logprobs"], rtol=1e-5, atol=1e-5)
    # Brownout at 0.5 really changes the model on this prompt.
    assert not np.allclose(outputs["0.5", False]["logprobs"], outputs["1", False]["logprobs"])


@pytest.mark.parametrize("command", ["generate", "serve"])
def test_cli_refuses_a_mesh_larger_than_the_devices(command):
    args = ("generate", "x") if command == "generate" else ("serve", "--port", "0")
    result = _cli(*args, "--mesh", "expert=8")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "--mesh: mesh expert=8 needs 8 devices, but JAX sees 4" in result.stderr
    assert "Traceback" not in result.stderr
    if command == "generate":
        bad = _cli("generate", "x", "--mesh", "expert=0")
        assert bad.returncode == 2 and "positive integer" in bad.stderr


def test_engine_options_of_the_cli_carry_the_mesh():
    from brownout_jax.cli.main import build_parser
    from brownout_jax.cli.options import engine_config_from_args

    for argv in (["serve"], ["bench", "burst", "--model", "m"]):
        args = build_parser().parse_args([*argv, "--mesh", "expert=4"])
        assert engine_config_from_args(args).mesh == MeshConfig(4)
    assert engine_config_from_args(build_parser().parse_args(["serve"])).mesh is None
