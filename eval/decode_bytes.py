"""Bytes one decode step reads, per brownout threshold, and the throughput floor they imply.

A decode step of B rows reads every dense weight once (attention projections, shared
experts, dense MLPs, routers), the LM head, and each *distinct* routed or united expert the B
tokens are routed to in each MoE layer — brownout's whole saving is that last term. Reading
them at the machine's read bandwidth is the floor: no kernel decodes faster (KV-cache reads
are small at these context lengths and are left out). ``eval throughput`` reports, per
threshold, these bytes, the floor's tokens/s and the share of it the engine reached.

The distinct experts are estimated from the prompts: each of B prompts is run through the
exact model, and its last token's input to every MoE layer is routed at each threshold, as a
decode step of those B rows would be (under brownout the hidden states drift a little from the
exact model's; the count is an estimate).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from brownout_jax.model.config import ModelConfig
from brownout_jax.model.params import DenseMlpParams, ModelParams, MoeParams
from brownout_jax.model.transformer import moe_traces
from brownout_jax.moe.brownout import route


def _nbytes(w) -> int:
    if w is None:
        return 0
    return int(np.prod(w.shape)) * jnp.dtype(w.dtype).itemsize


def _mlp_bytes(mlp: DenseMlpParams | None) -> int:
    return 0 if mlp is None else sum(_nbytes(w) for w in (mlp.w_gate, mlp.w_up, mlp.w_down))


def dense_bytes(params: ModelParams) -> int:
    """Every weight a decode step reads whole, the LM head excepted."""
    total = _nbytes(params.final_norm)
    for layer in params.layers:
        a = layer.attention
        total += sum(_nbytes(w) for w in (a.wq, a.wk, a.wv, a.wo, a.bq, a.bk, a.bv))
        total += _nbytes(layer.input_norm) + _nbytes(layer.post_attention_norm)
        if isinstance(layer.mlp, MoeParams):
            total += _nbytes(layer.mlp.router) + _nbytes(layer.mlp.shared_gate)
            total += _mlp_bytes(layer.mlp.shared)
        else:
            total += _mlp_bytes(layer.mlp)
    return total


def expert_bytes(params: ModelParams) -> int:
    """One routed (or united) expert's three matrices."""
    for layer in params.layers:
        if isinstance(layer.mlp, MoeParams):
            e = layer.mlp.experts
            return sum(_nbytes(w) // w.shape[0] for w in (e.w_gate, e.w_up, e.w_down))
    return 0


ESTIMATE_CONTEXT = 256


def distinct_experts_per_step(
    params: ModelParams,
    config: ModelConfig,
    prompts: list[list[int]],
    thresholds: tuple[float, ...],
) -> dict[float, float]:
    """Mean over MoE layers of the distinct experts a decode step of ``len(prompts)`` rows
    runs, per threshold (a model without united experts runs exact at every threshold)."""
    if not config.moe_layers or not prompts:
        return dict.fromkeys(thresholds, 0.0)
    # The last tokens' routing is what is estimated: their last CONTEXT tokens are enough
    # context for it, and a whole long prompt's forward pass (T × T scores, no cache) would
    # not fit in memory.
    prompts = [p[-ESTIMATE_CONTEXT:] for p in prompts]
    length = max(len(p) for p in prompts)
    tokens = np.zeros((len(prompts), length), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    lengths = np.asarray([len(p) for p in prompts], np.int32)
    traces, _ = jax.jit(moe_traces, static_argnums=1)(
        params, config, jnp.asarray(tokens), jnp.asarray(lengths)
    )
    last = np.arange(len(prompts)) * length + lengths - 1  # flattened (B T) index
    mask = jnp.ones(len(prompts), bool)
    out = {}
    for threshold in thresholds:
        counts = []
        for trace, i in zip(traces, config.moe_layers, strict=True):
            moe = params.layers[i].mlp
            # Without united experts every level runs the exact model (the engine's ladder).
            level = threshold if moe.num_united else 1.0
            routing = route(
                trace.inputs[last],
                moe,
                mask,
                config.num_experts_per_tok,
                config.norm_topk_prob,
                level,
                moe.num_united,
            )
            counts.append(len(np.unique(np.asarray(routing.expert_ids))))
        out[threshold] = float(np.mean(counts))
    return out


def decode_floor(
    params: ModelParams,
    config: ModelConfig,
    prompts: list[list[int]],
    batch: int,
    thresholds: tuple[float, ...],
    bandwidth_gb_s: float,
) -> dict[float, dict]:
    """Per threshold: the bytes of one decode step of ``batch`` rows by part, and the floor
    (tokens/s at ``bandwidth_gb_s``) they imply."""
    distinct = distinct_experts_per_step(params, config, prompts[:batch], thresholds)
    fixed = dense_bytes(params)
    head = _nbytes(params.lm_head if params.lm_head is not None else params.embed)
    per_expert = expert_bytes(params)
    layers = len(config.moe_layers)
    rows = min(batch, len(prompts))
    out = {}
    for threshold, experts in distinct.items():
        routed = experts * layers * per_expert
        total = fixed + head + routed
        out[threshold] = {
            "rows": rows,
            "distinct_experts_per_layer": round(experts, 2),
            "expert_mb": round(routed / 1e6, 1),
            "dense_mb": round(fixed / 1e6, 1),
            "lm_head_mb": round(head / 1e6, 1),
            "total_mb": round(total / 1e6, 1),
            "total_bytes": int(total),
            "floor_tokens_per_s": round(rows * bandwidth_gb_s * 1e9 / total, 1),
        }
    return out
