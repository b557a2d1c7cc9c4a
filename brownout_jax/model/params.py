"""Typed parameter trees of the model (flax.struct dataclasses, never string-keyed dicts).

Linear weights are stored as (in, out) so that ``x @ w`` needs no transpose; routed experts
are stacked per layer, (E, D, F) for gate/up and (E, F, D) for down. For inference on CPU the
bf16 weights are packed after loading into the CPU kernels' layout (``model.packed_params``):
dense weights become ``PackedWeight``s, expert stacks ``PackedStack``s.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from brownout_jax.cpu_kernels.packing import PackedStack, PackedWeight, unpack_stack
from brownout_jax.model.config import ModelConfig
from brownout_jax.model.dims import Array, Float, Int


@struct.dataclass
class AttentionParams:
    wq: Float[Array, "D HC"] | PackedWeight
    wk: Float[Array, "D GC"] | PackedWeight
    wv: Float[Array, "D GC"] | PackedWeight
    wo: Float[Array, "HC D"] | PackedWeight
    bq: Float[Array, " HC"] | None
    bk: Float[Array, " GC"] | None
    bv: Float[Array, " GC"] | None


@struct.dataclass
class DenseMlpParams:
    w_gate: Float[Array, "D F"] | PackedWeight
    w_up: Float[Array, "D F"] | PackedWeight
    w_down: Float[Array, "F D"] | PackedWeight


@struct.dataclass
class ExpertWeights:
    """Routed experts of one layer, stacked along E; for the CPU kernels each stack may be
    packed (``cpu_kernels.PackedStack``, see ``model.packed_params``)."""

    w_gate: Float[Array, "E D F"] | PackedStack
    w_up: Float[Array, "E D F"] | PackedStack
    w_down: Float[Array, "E F D"] | PackedStack

    @property
    def num_experts(self) -> int:
        return self.w_gate.shape[0]

    @property
    def packed(self) -> bool:
        return isinstance(self.w_gate, PackedStack)

    def unpacked(self) -> ExpertWeights:
        """The (E, D, F) / (E, F, D) stacks (a copy when packed)."""
        if not self.packed:
            return self
        return ExpertWeights(*(unpack_stack(w) for w in (self.w_gate, self.w_up, self.w_down)))


@struct.dataclass
class MoeParams:
    router: Float[Array, "D E"]
    # E routed experts; with united experts attached, E + U: the U united ones follow the E.
    experts: ExpertWeights
    shared: DenseMlpParams | None
    shared_gate: Float[Array, "D 1"] | None
    group_of_expert: Int[Array, " E"] | None = None  # united group of each routed expert

    @property
    def num_united(self) -> int:
        if self.group_of_expert is None:
            return 0
        return self.experts.num_experts - self.group_of_expert.shape[0]


@struct.dataclass
class DecoderLayerParams:
    input_norm: Float[Array, " D"]
    attention: AttentionParams
    post_attention_norm: Float[Array, " D"]
    mlp: DenseMlpParams | MoeParams


@struct.dataclass
class ModelParams:
    embed: Float[Array, "V D"]
    layers: tuple[DecoderLayerParams, ...]
    final_norm: Float[Array, " D"]
    lm_head: Float[Array, "D V"] | PackedWeight | None  # None when tied to ``embed``


def _sds(shape: tuple[int, ...], dtype) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, dtype)


def abstract_params(config: ModelConfig, dtype=jnp.float32) -> ModelParams:
    """The parameter tree of ``config`` as ShapeDtypeStructs: the single source of shapes."""
    d, c = config.hidden_size, config.head_dim
    hc, gc = config.num_heads * c, config.num_kv_heads * c

    def dense(f: int) -> DenseMlpParams:
        return DenseMlpParams(_sds((d, f), dtype), _sds((d, f), dtype), _sds((f, d), dtype))

    def layer(i: int) -> DecoderLayerParams:
        bias = config.qkv_bias
        attention = AttentionParams(
            wq=_sds((d, hc), dtype),
            wk=_sds((d, gc), dtype),
            wv=_sds((d, gc), dtype),
            wo=_sds((hc, d), dtype),
            bq=_sds((hc,), dtype) if bias else None,
            bk=_sds((gc,), dtype) if bias else None,
            bv=_sds((gc,), dtype) if bias else None,
        )
        if config.is_moe_layer(i):
            e, f = config.num_experts, config.moe_intermediate_size
            fs = config.shared_expert_intermediate_size
            mlp = MoeParams(
                router=_sds((d, e), dtype),
                experts=ExpertWeights(
                    _sds((e, d, f), dtype), _sds((e, d, f), dtype), _sds((e, f, d), dtype)
                ),
                shared=dense(fs) if fs > 0 else None,
                shared_gate=_sds((d, 1), dtype) if fs > 0 else None,
            )
        else:
            mlp = dense(config.intermediate_size)
        return DecoderLayerParams(_sds((d,), dtype), attention, _sds((d,), dtype), mlp)

    return ModelParams(
        embed=_sds((config.vocab_size, d), dtype),
        layers=tuple(layer(i) for i in range(config.num_layers)),
        final_norm=_sds((d,), dtype),
        lm_head=None if config.tie_word_embeddings else _sds((d, config.vocab_size), dtype),
    )


def init_random_params(
    config: ModelConfig, key: jax.Array, dtype=jnp.float32, scale: float = 0.02
) -> ModelParams:
    """Random weights of the right shapes (tests, dummy-weight benchmarks); norms start at 1."""
    abstract = abstract_params(config, dtype)
    paths_and_leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    keys = jax.random.split(key, len(paths_and_leaves))
    values = [
        jnp.ones(s.shape, dtype)
        if "norm" in jax.tree_util.keystr(path)
        else (scale * jax.random.normal(k, s.shape, jnp.float32)).astype(dtype)
        for k, (path, s) in zip(keys, paths_and_leaves, strict=True)
    ]
    return jax.tree_util.tree_unflatten(treedef, values)


def param_bytes(params: ModelParams) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(params))
