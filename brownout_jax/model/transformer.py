"""Flax port of HF ``Qwen2MoeForCausalLM`` as pure functions over typed parameters.

Data flow of one step: embed → L × [RMSNorm → GQA attention (qkv bias, RoPE) → residual →
RMSNorm → dense MLP or sparse MoE block → residual] → final RMSNorm → lm head.

Three entry points: ``forward_logits`` (full sequence, no cache: parity tests, scoring),
``prefill`` (padded prompts → cache filled, last-token logits) and ``decode`` (one token per
sequence at its own position). The step functions (``offline/steps.py``, ``engine/steps.py``)
jit them. Whatever a step reports besides logits (the MoE inputs for calibration, the
per-device expert load on a mesh) is returned as typed values, never collected in lists.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from brownout_jax.model.attention import attend_positions
from brownout_jax.model.bit_storage import take_rows
from brownout_jax.model.config import ModelConfig
from brownout_jax.model.dense import dense_mlp, matmul, matmul_f32
from brownout_jax.model.dims import Array, Bool, Float, Int
from brownout_jax.model.kv_cache import KVCache
from brownout_jax.model.params import AttentionParams, DecoderLayerParams, ModelParams, MoeParams
from brownout_jax.moe.block import moe_block
from brownout_jax.moe.expert_parallel import DeviceLoad
from brownout_jax.moe.options import DEFAULT_MOE_OPTIONS, MoeOptions


def rms_norm(
    x: Float[Array, "... D"], weight: Float[Array, " D"], eps: float
) -> Float[Array, "... D"]:
    # Normalise in fp32, scale in the activation dtype: the order HF uses, so bf16 matches too.
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * x32.astype(x.dtype)


def rope_tables(
    positions: Int[Array, "B T"], head_dim: int, theta: float, dtype
) -> tuple[Float[Array, "B T C"], Float[Array, "B T C"]]:
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions[..., None].astype(jnp.float32) * inv_freq
    angles = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def apply_rope(
    x: Float[Array, "B T H C"], cos: Float[Array, "B T C"], sin: Float[Array, "B T C"]
) -> Float[Array, "B T H C"]:
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


def _project(x, w, b, rows):
    y = matmul(x, w, rows)
    return y if b is None else y + b


def attention_block(
    x: Float[Array, "B T D"],
    params: AttentionParams,
    config: ModelConfig,
    layer: int,
    positions: Int[Array, "B T"],
    rope: tuple[Float[Array, "B T C"], Float[Array, "B T C"]],
    cache: KVCache | None,
    read_cache: bool,
    token_mask: Bool[Array, "B T"] | None = None,
) -> tuple[Float[Array, "B T D"], KVCache | None]:
    """Self-attention. With ``read_cache`` the queries attend to the cache after their own
    keys are written to it, each to the positions up to its own (decode; a prefill chunk
    after earlier chunks); otherwise to the step's own tokens, causally (prefill from
    position 0), writing them to the cache. ``token_mask``: the real tokens; projections of
    padding may be skipped (and are zero)."""
    b, t, _ = x.shape
    c = config.head_dim
    q = _project(x, params.wq, params.bq, token_mask).reshape(b, t, config.num_heads, c)
    k = _project(x, params.wk, params.bk, token_mask).reshape(b, t, config.num_kv_heads, c)
    v = _project(x, params.wv, params.bv, token_mask).reshape(b, t, config.num_kv_heads, c)
    cos, sin = rope
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if cache is not None:
        cache = cache.write(layer, k, v, positions)
    if read_cache:
        out = cache.attend(layer, q, positions, token_mask)
    else:
        out = attend_positions(q, k, v, positions, positions)
    out = out.astype(x.dtype).reshape(b, t, config.num_heads * c)
    return matmul(out, params.wo, token_mask), cache


@struct.dataclass
class MoeTrace:
    """What one MoE layer reports besides its output."""

    inputs: Float[Array, "N D"]  # the block's input (calibration data for united experts)
    expert_ids: Int[Array, "N K"]  # the experts each token ran (after brownout)
    device_load: DeviceLoad | None  # on an expert-parallel mesh: what each device computed


def decoder_layer(
    h: Float[Array, "B T D"],
    params: DecoderLayerParams,
    config: ModelConfig,
    layer: int,
    positions: Int[Array, "B T"],
    token_mask: Bool[Array, "B T"],
    rope: tuple[Float[Array, "B T C"], Float[Array, "B T C"]],
    cache: KVCache | None,
    read_cache: bool,
    moe_options: MoeOptions,
    exact_rows: Bool[Array, " B"] | None = None,
) -> tuple[Float[Array, "B T D"], KVCache | None, MoeTrace | None]:
    """One decoder layer; the trace is None for a dense-MLP layer. ``exact_rows``: sequences
    whose tokens are never browned out (their requests' ``BrownoutClass.NEVER``)."""
    attn_out, cache = attention_block(
        rms_norm(h, params.input_norm, config.rms_norm_eps),
        params.attention,
        config,
        layer,
        positions,
        rope,
        cache,
        read_cache,
        token_mask,
    )
    h = h + attn_out
    b, t, d = h.shape
    x = rms_norm(h, params.post_attention_norm, config.rms_norm_eps).reshape(b * t, d)
    if not isinstance(params.mlp, MoeParams):
        return h + dense_mlp(x, params.mlp, token_mask.reshape(b * t)).reshape(b, t, d), cache, None
    exact_tokens = None
    if exact_rows is not None:
        exact_tokens = jnp.broadcast_to(exact_rows[:, None], (b, t)).reshape(b * t)
    moe = moe_block(
        x,
        params.mlp,
        token_mask.reshape(b * t),
        config.num_experts_per_tok,
        config.norm_topk_prob,
        moe_options.at_layer(layer),
        exact_tokens,
    )
    return h + moe.out.reshape(b, t, d), cache, MoeTrace(x, moe.expert_ids, moe.device_load)


@struct.dataclass
class Forward:
    hidden: Float[Array, "B T D"]  # after the final norm
    cache: KVCache | None
    moe: tuple[MoeTrace, ...]  # one per MoE layer, in ``config.moe_layers`` order

    @property
    def device_load(self) -> DeviceLoad | None:
        """Each device's work summed over the MoE layers (None off a mesh)."""
        loads = [m.device_load for m in self.moe if m.device_load is not None]
        if not loads:
            return None
        return jax.tree_util.tree_map(lambda *per_layer: sum(per_layer), *loads)


def forward_hidden(
    params: ModelParams,
    config: ModelConfig,
    tokens: Int[Array, "B T"],
    positions: Int[Array, "B T"],
    token_mask: Bool[Array, "B T"],
    cache: KVCache | None,
    read_cache: bool,
    moe_options: MoeOptions,
    exact_rows: Bool[Array, " B"] | None = None,
) -> Forward:
    """``exact_rows``: sequences never browned out (None: none)."""
    h = take_rows(params.embed, tokens)
    rope = rope_tables(positions, config.head_dim, config.rope_theta, h.dtype)
    traces = []
    for layer, layer_params in enumerate(params.layers):
        h, cache, trace = decoder_layer(
            h,
            layer_params,
            config,
            layer,
            positions,
            token_mask,
            rope,
            cache,
            read_cache,
            moe_options,
            exact_rows,
        )
        if trace is not None:
            traces.append(trace)
    hidden = rms_norm(h, params.final_norm, config.rms_norm_eps)
    return Forward(hidden=hidden, cache=cache, moe=tuple(traces))


@struct.dataclass
class StepOutput:
    """A cached step's result: the cache written, each row's next-token logits, and on an
    expert-parallel mesh each device's expert work (summed over MoE layers)."""

    cache: KVCache
    logits: Float[Array, "B V"]
    device_load: DeviceLoad | None = None
    # The final hidden states of every position (prefill): a step scoring its prompt's tokens
    # takes the logits of all of them, not just the last (unused: XLA drops it).
    hidden: Float[Array, "B T D"] | None = None


def moe_traces(
    params: ModelParams,
    config: ModelConfig,
    tokens: Int[Array, "B T"],
    lengths: Int[Array, " B"],
    moe_options: MoeOptions = DEFAULT_MOE_OPTIONS,
) -> tuple[tuple[MoeTrace, ...], Bool[Array, " N"]]:
    """What every MoE block (in ``config.moe_layers`` order) saw and chose on right-padded
    sequences, with the mask of real tokens."""
    positions, token_mask = _prompt_positions(tokens, lengths)
    forward = forward_hidden(
        params, config, tokens, positions, token_mask, None, False, moe_options
    )
    return forward.moe, token_mask.reshape(-1)


def collect_moe_inputs(
    params: ModelParams,
    config: ModelConfig,
    tokens: Int[Array, "B T"],
    lengths: Int[Array, " B"],
) -> tuple[tuple[Float[Array, "N D"], ...], Bool[Array, " N"]]:
    """The input of every MoE block on right-padded sequences, with the mask of real
    tokens: calibration data for united experts."""
    traces, token_mask = moe_traces(params, config, tokens, lengths)
    return tuple(trace.inputs for trace in traces), token_mask


def lm_logits(
    params: ModelParams, hidden: Float[Array, "... D"], rows: Bool[Array, "..."] | None = None
) -> Float[Array, "... V"]:
    """``rows``: the rows whose logits are used (padding may be skipped and is then zero)."""
    if params.lm_head is None:
        # Tied: XLA's dot reads the embedding transposed in place (a kernel call would need a
        # transposed copy of the table).
        return jnp.dot(hidden, params.embed.T).astype(jnp.float32)
    # The float32 logits straight from the fp32 accumulator, not rounded to the activations'
    # dtype first.
    return matmul_f32(hidden, params.lm_head, rows)


def forward_logits(
    params: ModelParams,
    config: ModelConfig,
    tokens: Int[Array, "B T"],
    lengths: Int[Array, " B"],
    moe_options: MoeOptions = DEFAULT_MOE_OPTIONS,
) -> Float[Array, "B T V"]:
    """Logits at every position of right-padded sequences; no cache."""
    positions, token_mask = _prompt_positions(tokens, lengths)
    forward = forward_hidden(
        params, config, tokens, positions, token_mask, None, False, moe_options
    )
    return lm_logits(params, forward.hidden)


def prefill(
    params: ModelParams,
    config: ModelConfig,
    cache: KVCache,
    tokens: Int[Array, "B T"],
    lengths: Int[Array, " B"],
    moe_options: MoeOptions = DEFAULT_MOE_OPTIONS,
    exact_rows: Bool[Array, " B"] | None = None,
) -> StepOutput:
    """Right-padded prompts from position 0 → cache filled, logits of each last real token.
    ``exact_rows``: prompts never browned out."""
    positions, token_mask = _prompt_positions(tokens, lengths)
    forward = forward_hidden(
        params, config, tokens, positions, token_mask, cache, False, moe_options, exact_rows
    )
    return _last_token_output(params, forward, lengths)


def prefill_chunk(
    params: ModelParams,
    config: ModelConfig,
    cache: KVCache,
    tokens: Int[Array, "B T"],
    starts: Int[Array, " B"],
    lengths: Int[Array, " B"],
    moe_options: MoeOptions = DEFAULT_MOE_OPTIONS,
    exact_rows: Bool[Array, " B"] | None = None,
) -> StepOutput:
    """Right-padded pieces of prompts, row b's at positions ``starts[b]`` onwards, attending
    to what the cache holds before them and to themselves (causally) → cache filled, logits
    of each last real token. With every start 0 it is ``prefill``; a long prompt goes in as
    consecutive chunks, each bounded in memory, the last one's logits its next token's."""
    offsets = jnp.arange(tokens.shape[1], dtype=jnp.int32)
    positions = starts[:, None] + offsets
    token_mask = offsets < lengths[:, None]
    forward = forward_hidden(
        params, config, tokens, positions, token_mask, cache, True, moe_options, exact_rows
    )
    return _last_token_output(params, forward, lengths)


def _last_token_output(params: ModelParams, forward: Forward, lengths: Int[Array, " B"]):
    """The step's cache and the logits of each row's last real token (rows of length 0:
    padding, their logits may be skipped)."""
    last = jnp.maximum(lengths - 1, 0)
    last_hidden = jnp.take_along_axis(forward.hidden, last[:, None, None], axis=1)[:, 0]
    return StepOutput(
        forward.cache,
        lm_logits(params, last_hidden, lengths > 0),
        forward.device_load,
        forward.hidden,
    )


def decode(
    params: ModelParams,
    config: ModelConfig,
    cache: KVCache,
    tokens: Int[Array, " B"],
    positions: Int[Array, " B"],
    active: Bool[Array, " B"],
    moe_options: MoeOptions = DEFAULT_MOE_OPTIONS,
    exact_rows: Bool[Array, " B"] | None = None,
) -> StepOutput:
    """One token per sequence, each at its own position; inactive rows are never routed.
    ``exact_rows``: sequences never browned out."""
    forward = forward_hidden(
        params,
        config,
        tokens[:, None],
        positions[:, None],
        active[:, None],
        cache,
        True,
        moe_options,
        exact_rows,
    )
    logits = lm_logits(params, forward.hidden[:, 0], active)
    return StepOutput(forward.cache, logits, forward.device_load)


def _prompt_positions(
    tokens: Int[Array, "B T"], lengths: Int[Array, " B"]
) -> tuple[Int[Array, "B T"], Bool[Array, "B T"]]:
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    return positions, positions < lengths[:, None]
