"""The demo model's training forward pass, loss and optimiser.

The forward pass is the repository's own (attention, norms, router, shared expert, LM head);
only the routed experts run through a training twin of the sorted-tiles backend whose tiles
are processed as one batched matmul (the serving backend's dynamic-trip-count loop is not
reverse-differentiable; the dense backend is, but costs every expert per token).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from brownout_jax.model.config import ModelConfig
from brownout_jax.model.dense import dense_mlp
from brownout_jax.model.dims import Array, Float, Int
from brownout_jax.model.params import ExpertWeights, ModelParams, MoeParams
from brownout_jax.model.transformer import attention_block, lm_logits, rms_norm, rope_tables
from brownout_jax.moe.block import shared_expert
from brownout_jax.moe.expert_matmul import sort_into_tiles
from brownout_jax.moe.routing import route_top_k


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    vocab_size: int = 4096
    steps: int = 520
    batch: int = 16
    seq_len: int = 256
    peak_lr: float = 3e-3
    warmup_steps: int = 30
    final_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    aux_loss_coef: float = 0.004  # Qwen's 0.001 on HF's K-times-larger form of the loss
    tile_rows: int = 32
    seed: int = 0
    init_scale: float = 0.02


def routed_experts_train(
    x: Float[Array, "N D"],
    expert_ids: Int[Array, "N K"],
    expert_weights: Float[Array, "N K"],
    experts: ExpertWeights,
    block_rows: int,
) -> Float[Array, "N D"]:
    """Σ_k weight · FFN_expert(x), differentiable: the sorted-tiles layout (``sort_into_tiles``)
    with every tile in one batched matmul against its expert's gathered weights. Tiles past the
    used ones hold only the zero row, so they add nothing (and no gradient)."""
    n, k = expert_ids.shape
    d = x.shape[-1]
    tiles = sort_into_tiles(expert_ids, jnp.ones((n,), bool), experts.num_experts, block_rows)
    x_rows = jnp.concatenate([x, jnp.zeros((1, d), x.dtype)])[tiles.row_token]
    x_tiles = x_rows.reshape(-1, block_rows, d)
    gate = jnp.einsum("tmd,tdf->tmf", x_tiles, experts.w_gate[tiles.tile_expert])
    up = jnp.einsum("tmd,tdf->tmf", x_tiles, experts.w_up[tiles.tile_expert])
    y_tiles = jnp.einsum("tmf,tfd->tmd", jax.nn.silu(gate) * up, experts.w_down[tiles.tile_expert])
    y_assign = y_tiles.reshape(-1, d)[tiles.assignment_row].reshape(n, k, d)
    return jnp.einsum("nkd,nk->nd", y_assign, expert_weights.astype(y_assign.dtype))


def load_balancing_loss(
    expert_ids: Int[Array, "N K"], router_probs: Float[Array, "N E"]
) -> Float[Array, ""]:
    """Switch-style E · Σ_e f_e · P_e (1 when perfectly balanced)."""
    e = router_probs.shape[-1]
    fraction = jnp.bincount(expert_ids.reshape(-1), length=e) / expert_ids.size
    return e * jnp.sum(fraction * jnp.mean(router_probs, axis=0))


def train_moe_block(
    x: Float[Array, "N D"], params: MoeParams, config: ModelConfig, block_rows: int
) -> tuple[Float[Array, "N D"], Float[Array, ""]]:
    routing = route_top_k(x, params.router, config.num_experts_per_tok, config.norm_topk_prob)
    out = routed_experts_train(
        x, routing.expert_ids, routing.expert_weights, params.experts, block_rows
    )
    out = out + shared_expert(x, params)
    return out, load_balancing_loss(routing.expert_ids, routing.router_probs)


def train_forward(
    params: ModelParams, config: ModelConfig, tokens: Int[Array, "B T"], block_rows: int
) -> tuple[Float[Array, "B T D"], Float[Array, ""]]:
    """``model.forward_hidden`` on full (unpadded) sequences with the differentiable experts;
    also returns the load-balancing loss averaged over MoE layers."""
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    h = params.embed[tokens]
    rope = rope_tables(positions, config.head_dim, config.rope_theta, h.dtype)
    aux = []
    for i, layer in enumerate(params.layers):
        attn, _ = attention_block(
            rms_norm(h, layer.input_norm, config.rms_norm_eps),
            layer.attention,
            config,
            i,
            positions,
            rope,
            None,
            False,
        )
        h = h + attn
        x = rms_norm(h, layer.post_attention_norm, config.rms_norm_eps).reshape(b * t, -1)
        if isinstance(layer.mlp, MoeParams):
            out, layer_aux = train_moe_block(x, layer.mlp, config, block_rows)
            aux.append(layer_aux)
        else:
            out = dense_mlp(x, layer.mlp)
        h = h + out.reshape(h.shape)
    aux_loss = jnp.mean(jnp.stack(aux)) if aux else jnp.zeros((), jnp.float32)
    return rms_norm(h, params.final_norm, config.rms_norm_eps), aux_loss


def token_nll(
    params: ModelParams, config: ModelConfig, chunks: Int[Array, "B T1"], block_rows: int
) -> tuple[Float[Array, "B T"], Float[Array, ""]]:
    hidden, aux = train_forward(params, config, chunks[:, :-1], block_rows)
    logits = lm_logits(params, hidden)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, chunks[:, 1:])
    return nll, aux


def make_optimizer(s: TrainSettings) -> optax.GradientTransformation:
    warmup = min(s.warmup_steps, max(1, s.steps // 10))  # short runs (timing) warm up less
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, s.peak_lr, warmup, s.steps, end_value=s.peak_lr * s.final_lr_ratio
    )
    return optax.chain(
        optax.clip_by_global_norm(s.grad_clip),
        optax.adamw(
            schedule,
            b1=0.9,
            b2=0.95,
            weight_decay=s.weight_decay,
            mask=lambda p: jax.tree_util.tree_map(lambda w: w.ndim >= 2, p),
        ),
    )
