"""Builds united experts: calibration activations → grouping → average init → MSE distillation.

For each MoE layer, the calibration activations are the MoE block's inputs on the model's own
forward pass. For group g with members m, the distillation target on a token x is
``Σ_m share_m · FFN_m(x)``, where ``share_m`` is m's share of the group's routing mass on the
calibration set; the united expert is trained (optax AdamW, MSE) on the tokens routed to any
member, with early stopping on a held-out part. All groups of a layer train at once (vmap).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from brownout_jax.engine.buckets import right_padded
from brownout_jax.model.config import ModelConfig
from brownout_jax.model.params import ExpertWeights, ModelParams, MoeParams
from brownout_jax.model.transformer import collect_moe_inputs
from brownout_jax.moe.expert_matmul import _swiglu_tile
from brownout_jax.moe.routing import route_top_k
from brownout_jax.united.united import (
    UnitedExperts,
    UnitedLayer,
    average_init,
    check_way,
    contiguous_groups,
    num_groups,
    similarity_groups,
)


@dataclasses.dataclass(frozen=True, slots=True)
class DistillConfig:
    learning_rate: float = 1e-3
    max_steps: int = 400
    batch_tokens: int = 512
    eval_every: int = 20
    patience: int = 3  # evaluations without improvement in any group before stopping
    holdout_fraction: float = 0.2
    min_group_tokens: int = 8  # a group routed fewer tokens trains on all of the layer's
    similarity_sample: int = 256  # tokens whose outputs define expert similarity
    seed: int = 0


DEFAULT_DISTILL = DistillConfig()


@dataclasses.dataclass(frozen=True, slots=True)
class GroupReport:
    layer: int
    group: int
    members: tuple[int, ...]
    tokens: int  # calibration tokens routed to any member
    init_mse: float  # held-out MSE of the parameter-average initialisation
    final_mse: float  # held-out MSE after distillation (best checkpoint)


def collect_calibration(
    params: ModelParams,
    config: ModelConfig,
    sequences: Sequence[Sequence[int]],
    batch_size: int = 8,
) -> list[np.ndarray]:
    """MoE-block inputs of every real calibration token, one (N, D) fp32 array per MoE layer."""
    collect = jax.jit(collect_moe_inputs, static_argnums=1)
    per_layer: list[list[np.ndarray]] = [[] for _ in config.moe_layers]
    for start in range(0, len(sequences), batch_size):
        batch = sequences[start : start + batch_size]
        tokens, lengths = right_padded(batch, batch_size)  # one batch shape: few compiles
        inputs, mask = collect(params, config, jnp.asarray(tokens), jnp.asarray(lengths))
        keep = np.asarray(mask)
        for store, x in zip(per_layer, inputs, strict=True):
            store.append(np.asarray(x, np.float32)[keep])
    return [np.concatenate(parts) for parts in per_layer]


def _expert_outputs(x: jax.Array, experts: ExpertWeights) -> jax.Array:
    """(E, N, D): every expert on every token (fp32)."""
    return jax.vmap(lambda g, u, d: _swiglu_tile(x, g, u, d))(
        experts.w_gate.astype(jnp.float32),
        experts.w_up.astype(jnp.float32),
        experts.w_down.astype(jnp.float32),
    )


@jax.jit
def _group_targets(x, experts: ExpertWeights, mix: jax.Array) -> jax.Array:
    """(U, N, D) targets Σ_m share_m FFN_m(x); ``mix`` is (U, E) with each row's shares."""

    def add_expert(acc, inputs):
        g, u, d, column = inputs
        y = _swiglu_tile(x, g.astype(jnp.float32), u.astype(jnp.float32), d.astype(jnp.float32))
        return acc + column[:, None, None] * y[None], None

    acc = jnp.zeros((mix.shape[0], *x.shape), jnp.float32)
    acc, _ = jax.lax.scan(add_expert, acc, (experts.w_gate, experts.w_up, experts.w_down, mix.T))
    return acc


def _united_forward(weights: ExpertWeights, x: jax.Array) -> jax.Array:
    """(U, n, D) from per-group token batches x (n, D) (all groups see the same tokens)."""
    return jax.vmap(lambda g, u, d: _swiglu_tile(x, g, u, d))(
        weights.w_gate, weights.w_up, weights.w_down
    )


def _masked_mse(weights, x, targets, selected):
    err = jnp.mean((_united_forward(weights, x) - targets) ** 2, axis=-1)  # (U, n)
    return jnp.sum(err * selected, axis=1) / jnp.maximum(jnp.sum(selected, axis=1), 1.0)


def distill_layer(
    x: np.ndarray,
    targets: jax.Array,
    selected: np.ndarray,
    init: ExpertWeights,
    cfg: DistillConfig,
    progress: tqdm | None = None,
) -> tuple[ExpertWeights, np.ndarray, np.ndarray]:
    """Trains all groups' united experts together; returns (weights, init MSE, final MSE),
    the MSEs per group on held-out tokens, weights from each group's best evaluation."""
    n = x.shape[0]
    rng = np.random.default_rng(cfg.seed)
    order = rng.permutation(n)
    n_val = max(1, round(n * cfg.holdout_fraction))
    val, train = order[:n_val], order[n_val:] if n > n_val else order
    x_all = jnp.asarray(x)
    sel = jnp.asarray(selected, jnp.float32)
    weights = jax.tree_util.tree_map(lambda w: w.astype(jnp.float32), init)
    optimizer = optax.adamw(cfg.learning_rate, weight_decay=0.0)
    opt_state = optimizer.init(weights)

    @jax.jit
    def train_step(weights, opt_state, idx):
        loss_fn = lambda w: jnp.sum(_masked_mse(w, x_all[idx], targets[:, idx], sel[:, idx]))  # noqa: E731
        loss, grads = jax.value_and_grad(loss_fn)(weights)
        updates, opt_state = optimizer.update(grads, opt_state, weights)
        return optax.apply_updates(weights, updates), opt_state, loss

    @jax.jit
    def evaluate(weights):
        return _masked_mse(weights, x_all[val], targets[:, val], sel[:, val])

    init_mse = np.asarray(evaluate(weights))
    best, best_mse = weights, init_mse.copy()
    stale = 0
    batch = min(cfg.batch_tokens, len(train))
    for step in range(1, cfg.max_steps + 1):
        idx = jnp.asarray(rng.choice(train, size=batch, replace=False))
        weights, opt_state, _ = train_step(weights, opt_state, idx)
        if progress is not None:
            progress.update(1)
        if step % cfg.eval_every and step != cfg.max_steps:
            continue
        mse = np.asarray(evaluate(weights))
        improved = mse < best_mse
        if improved.any():
            best = _keep_improved(best, weights, jnp.asarray(improved))
            best_mse = np.where(improved, mse, best_mse)
            stale = 0
        else:
            stale += 1
            if stale >= cfg.patience:
                break
    return best, init_mse, best_mse


def _keep_improved(best: ExpertWeights, current: ExpertWeights, improved) -> ExpertWeights:
    """Per group (axis 0): the current weights where the group improved, else the best."""
    return jax.tree_util.tree_map(
        lambda b, w: jnp.where(improved.reshape((-1,) + (1,) * (w.ndim - 1)), w, b),
        best,
        current,
    )


def build_united_experts(
    params: ModelParams,
    config: ModelConfig,
    sequences: Sequence[Sequence[int]],
    way: int,
    grouping: str = "contiguous",
    cfg: DistillConfig = DEFAULT_DISTILL,
    progress: bool = True,
) -> tuple[UnitedExperts, list[GroupReport]]:
    check_way(way, config.num_experts)
    if grouping not in ("contiguous", "similarity"):
        raise ValueError(f"grouping must be 'contiguous' or 'similarity', got {grouping!r}")
    activations = collect_calibration(params, config, sequences)
    e = config.num_experts
    layers: list[UnitedLayer] = []
    reports: list[GroupReport] = []
    bar = tqdm(
        total=len(config.moe_layers) * cfg.max_steps,
        desc="distilling united experts",
        unit="step",
        disable=not progress,
    )
    with bar:
        for layer, x in zip(config.moe_layers, activations, strict=True):
            moe = params.layers[layer].mlp
            assert isinstance(moe, MoeParams)
            experts = moe.experts
            routing = route_top_k(
                jnp.asarray(x, moe.router.dtype),
                moe.router,
                config.num_experts_per_tok,
                config.norm_topk_prob,
            )
            ids = np.asarray(routing.expert_ids)
            mass = np.zeros(e)
            np.add.at(
                mass, ids.reshape(-1), np.asarray(routing.expert_weights, np.float64).reshape(-1)
            )
            if grouping == "contiguous":
                group = contiguous_groups(e, way)
            else:
                sample = jnp.asarray(x[: cfg.similarity_sample])
                group = similarity_groups(np.asarray(_expert_outputs(sample, experts)), way)
            u = int(group.max()) + 1
            assert u == num_groups(e, way)
            mix = np.zeros((u, e))
            for g in range(u):
                members = np.flatnonzero(group == g)
                total = mass[members].sum()
                mix[g, members] = mass[members] / total if total > 0 else 1.0 / len(members)
            selected = (group[ids][None, :, :] == np.arange(u)[:, None, None]).any(-1)  # (U, N)
            routed = selected.sum(axis=1)
            selected[routed < cfg.min_group_tokens] = True
            targets = _group_targets(jnp.asarray(x), experts, jnp.asarray(mix, jnp.float32))
            weights, init_mse, final_mse = distill_layer(
                x, targets, selected, average_init(experts, group), cfg, bar
            )
            dtype = experts.w_gate.dtype
            layers.append(
                UnitedLayer(
                    experts=jax.tree_util.tree_map(lambda w, dtype=dtype: w.astype(dtype), weights),
                    group_of_expert=jnp.asarray(group, jnp.int32),
                )
            )
            for g in range(u):
                reports.append(
                    GroupReport(
                        layer=layer,
                        group=g,
                        members=tuple(np.flatnonzero(group == g).tolist()),
                        tokens=int(routed[g]),
                        init_mse=float(init_mse[g]),
                        final_mse=float(final_mse[g]),
                    )
                )
            bar.n = len(layers) * cfg.max_steps  # early stopping skips the rest of the layer
            bar.refresh()
    return UnitedExperts(layers=tuple(layers)), reports
