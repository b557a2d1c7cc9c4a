"""Packed weights in the model (``model.packed_params``, ``model.matmul_choice``): logits
through packed weights against the unpacked XLA path, the measured per-shape choice (cached per
machine, forced by the environment, falling back when the kernels are missing), shapes without
data, and loading the demo packed."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err, tiny_model_config

from brownout_jax.cpu_kernels import (
    MatmulPath,
    PackedStack,
    PackedWeight,
    load_library,
)
from brownout_jax.model import matmul_choice
from brownout_jax.model.packed_params import (
    DenseChoice,
    ShapeChoice,
    dense_weight_shapes,
    pack_dense_weights,
    pack_expert_weights,
    packed_stack_count,
    packed_weight_count,
    unpack_dense_weights,
    unpack_expert_weights,
)
from brownout_jax.model.params import init_random_params
from brownout_jax.model.transformer import forward_logits

pytestmark = pytest.mark.skipif(
    not load_library().available, reason="the C++ kernel library is not built"
)
BF16 = jnp.bfloat16


@pytest.fixture(scope="module")
def tiny_bf16():
    config = tiny_model_config()
    params = init_random_params(config, jax.random.key(3), dtype=BF16, scale=0.3)
    tokens = jax.random.randint(jax.random.key(4), (2, 12), 0, config.vocab_size)
    return config, params, tokens


def _logits(params, config, tokens):
    lengths = jnp.full((tokens.shape[0],), tokens.shape[1], jnp.int32)
    return np.asarray(jax.jit(forward_logits, static_argnums=1)(params, config, tokens, lengths))


def test_packed_weights_give_the_unpacked_logits(tiny_bf16):
    config, params, tokens = tiny_bf16
    packed = pack_expert_weights(pack_dense_weights(params))
    assert packed_weight_count(packed) > 0 and packed_stack_count(packed) == config.num_layers
    assert isinstance(packed.lm_head, PackedWeight)
    ref = _logits(params, config, tokens)  # unpacked bf16: XLA's dots, stored-layout experts
    out = _logits(packed, config, tokens)
    # Both multiply the same bf16 values with fp32 accumulation; the order of the sums and the
    # bf16 rounding of the experts' hidden rows (kernel) differ: a bf16-level difference.
    assert rel_err(out, ref) < 2e-2
    # Unpacking restores the original tree bit for bit.
    back = unpack_expert_weights(unpack_dense_weights(packed))
    for a, b in zip(
        jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(params), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_xla_on_the_packed_layout_matches_the_kernel(tiny_bf16):
    config, params, tokens = tiny_bf16
    kernel = pack_dense_weights(params)
    xla_everywhere = DenseChoice(default=ShapeChoice(True, ((1, MatmulPath.XLA),)))
    xla = pack_dense_weights(params, xla_everywhere)
    assert xla.lm_head.path_for(4096) is MatmulPath.XLA
    assert rel_err(_logits(xla, config, tokens), _logits(kernel, config, tokens)) < 1e-2


def test_shapes_alone_pack_to_the_same_tree(tiny_bf16):
    _, params, _ = tiny_bf16
    spec = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
    packed_spec = jax.eval_shape(lambda p: pack_expert_weights(pack_dense_weights(p)), spec)
    packed = pack_expert_weights(pack_dense_weights(params))
    assert jax.tree_util.tree_structure(packed_spec) == jax.tree_util.tree_structure(packed)
    for a, b in zip(
        jax.tree_util.tree_leaves(packed_spec), jax.tree_util.tree_leaves(packed), strict=True
    ):
        assert a.shape == b.shape and a.dtype == b.dtype


def test_consume_frees_the_originals(tiny_bf16):
    _, params, _ = tiny_bf16
    copy = jax.tree_util.tree_map(jnp.copy, params)
    head = copy.lm_head
    packed = pack_dense_weights(copy, consume=True)
    assert head.is_deleted()
    assert isinstance(packed.lm_head, PackedWeight)


def test_dense_paths_report_the_choice_by_row_count(tiny_bf16):
    from brownout_jax.model.packed_params import dense_paths

    _, params, _ = tiny_bf16
    split = DenseChoice(default=ShapeChoice(True, ((8, MatmulPath.KERNEL), (512, MatmulPath.XLA))))
    entries = dense_paths(pack_dense_weights(params, split))
    shapes = dense_weight_shapes(params)
    assert len(entries) == 2 * len(shapes)
    for entry in entries:
        assert entry.packed
        assert (entry.max_rows, entry.path) in ((8, MatmulPath.KERNEL), (0, MatmulPath.XLA))
    unpacked = dense_paths(params)  # bf16 left unpacked: XLA's dot
    assert {(e.packed, e.path) for e in unpacked} == {(False, MatmulPath.XLA)}


def test_float32_weights_are_left_alone():
    config = tiny_model_config()
    params = init_random_params(config, jax.random.key(0))
    assert dense_weight_shapes(params) == ()
    assert packed_weight_count(pack_dense_weights(params)) == 0
    assert packed_stack_count(pack_expert_weights(params)) == 0


def test_measured_choice_is_cached_per_machine(monkeypatch, tmp_path, tiny_bf16):
    _, params, _ = tiny_bf16
    monkeypatch.setenv(matmul_choice.ENV_PATH, "measure")
    monkeypatch.setenv(matmul_choice.ENV_CACHE, str(tmp_path))
    matmul_choice.dense_choice.cache_clear()
    timed = []
    real = matmul_choice.choose_shape

    def counting(shape, rows=(1, 8), repeats=1) -> ShapeChoice:
        timed.append(shape)
        return real(shape, rows, repeats)

    monkeypatch.setattr(matmul_choice, "choose_shape", counting)
    try:
        shapes = dense_weight_shapes(params)
        choice = matmul_choice.dense_choice(shapes)
        assert sorted(timed) == sorted(shapes)
        for shape in shapes:
            picked = choice.of(shape)
            assert picked.packed in (True, False)
            assert all(path in MatmulPath for _, path in picked.paths)
        data = json.loads((tmp_path / matmul_choice.CACHE_FILE).read_text())
        assert list(data) == [matmul_choice.machine_key()]
        # A new process (cleared memo) reads the file and times nothing.
        matmul_choice.dense_choice.cache_clear()
        timed.clear()
        assert matmul_choice.dense_choice(shapes) == choice
        assert timed == []
    finally:
        matmul_choice.dense_choice.cache_clear()


def test_choice_can_be_forced_and_falls_back_without_kernels(monkeypatch, tiny_bf16):
    _, params, _ = tiny_bf16
    matmul_choice.dense_choice.cache_clear()
    try:
        monkeypatch.setenv(matmul_choice.ENV_PATH, "xla")
        unpacked = matmul_choice.pack_for_inference(params, experts=False)
        assert packed_weight_count(unpacked) == 0  # XLA everywhere: nothing packed
        matmul_choice.dense_choice.cache_clear()
        monkeypatch.setenv(matmul_choice.ENV_PATH, "kernel")
        packed = matmul_choice.pack_for_inference(params)
        assert packed_weight_count(packed) > 0 and packed.lm_head.paths == ()
        assert isinstance(packed.layers[0].mlp.experts.w_gate, PackedStack)
        matmul_choice.dense_choice.cache_clear()
        monkeypatch.setenv(matmul_choice.ENV_PATH, "fastest")
        with pytest.raises(ValueError, match="BROWNOUT_JAX_DENSE_PATH"):
            matmul_choice.pack_for_inference(params)
        # No kernel library: the weights stay as loaded, and the model runs on XLA.
        monkeypatch.setenv("BROWNOUT_JAX_CPU_KERNELS", "off")
        load_library.cache_clear()
        assert matmul_choice.pack_for_inference(params) is params
    finally:
        monkeypatch.delenv("BROWNOUT_JAX_CPU_KERNELS", raising=False)
        load_library.cache_clear()
        matmul_choice.dense_choice.cache_clear()


def test_demo_loads_packed_and_generates_like_the_unpacked_model():
    from brownout_jax.checkpoints import load_model
    from brownout_jax.checkpoints.demo_model import demo_model_dir
    from brownout_jax.checkpoints.loader import abstract_model_params

    packed = load_model(demo_model_dir(), "bfloat16", progress=False)
    plain = load_model(demo_model_dir(), "bfloat16", progress=False, pack=False)
    assert packed_weight_count(packed.params) > 0 and packed_stack_count(packed.params) > 0
    spec = abstract_model_params(demo_model_dir(), "bfloat16")
    assert jax.tree_util.tree_structure(spec) == jax.tree_util.tree_structure(packed.params)
    tokens = jnp.asarray([[5, 17, 300, 42, 7, 99, 1000, 3]], jnp.int32)
    out = _logits(packed.params, packed.config, tokens)
    ref = _logits(plain.params, plain.config, tokens)
    assert rel_err(out, ref) < 2e-2
    assert (out[0, -1].argmax()) == (ref[0, -1].argmax())


def test_united_experts_attach_to_packed_stacks(tiny_moe):
    from brownout_jax.united.united import attach_united

    config, params, united, attached, _ = tiny_moe

    def bf16(tree):
        return jax.tree_util.tree_map(
            lambda a: a.astype(BF16) if a.dtype == jnp.float32 else a, tree
        )

    late = attach_united(pack_expert_weights(bf16(params)), config, bf16(united))
    early = pack_expert_weights(bf16(attached))
    assert jax.tree_util.tree_structure(late) == jax.tree_util.tree_structure(early)
    for a, b in zip(jax.tree_util.tree_leaves(late), jax.tree_util.tree_leaves(early), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_saving_packed_weights_writes_the_stored_layout(tmp_path):
    from brownout_jax.checkpoints import load_model
    from brownout_jax.checkpoints.demo_model import demo_model_dir
    from brownout_jax.checkpoints.orbax_store import save_converted

    packed = load_model(demo_model_dir(), "bfloat16", progress=False)
    assert packed_weight_count(packed.params) > 0
    out = save_converted(
        packed.params, demo_model_dir(), tmp_path / "converted", packed.fingerprint
    )
    back = load_model(out, "bfloat16", progress=False, pack=False)
    plain = load_model(demo_model_dir(), "bfloat16", progress=False, pack=False)
    assert jax.tree_util.tree_structure(back.params) == jax.tree_util.tree_structure(plain.params)
    for a, b in zip(
        jax.tree_util.tree_leaves(back.params), jax.tree_util.tree_leaves(plain.params), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
