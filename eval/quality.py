"""How far brownout moves a model's predictions from the exact model's, on any text.

Each window of W tokens is served as a request would be: its first P tokens are prefilled, the
other C = W − P are decoded one step at a time, teacher-forced (the true token is fed, not the
predicted one). Prefill-only, decode-only and full brownout therefore apply exactly where they
would when serving, and the hot sets are computed per step over the batch's real tokens, as the
engine does. Every metric is per continuation token: the exact and the browned-out model predict
the same token from the same (true) context, and

- KL(exact ‖ browned) is computed from both full next-token distributions (log-softmax of the
  float32 logits), Σ_v p_exact(v) · (log p_exact(v) − log p_browned(v));
- top-1 agreement compares the two arg-maxes; perplexity is of the true tokens.

The exact reference runs on the same batches, of the same shape, as every browned-out setting,
so its routing is the one serving would compute; at threshold 1 both are the same executable on
the same inputs, hence KL exactly 0. Greedy continuations of N prompts (the windows' first P
tokens) measure how many tokens the browned-out model generates before it first differs.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from tqdm.auto import tqdm

from brownout_jax.model.config import ModelConfig
from brownout_jax.model.dims import Array, Bool, Float, Int
from brownout_jax.model.kv_cache import ContiguousKVCache
from brownout_jax.model.params import ModelParams, MoeParams
from brownout_jax.model.transformer import Forward, forward_hidden, lm_logits
from brownout_jax.moe.options import MoeOptions
from brownout_jax.moe.routing import expert_counts
from brownout_jax.offline.generate import generate

EXACT = MoeOptions()


class BrownoutPhase(enum.Enum):
    """Where a setting browns out: prefill and decode, prefill only, or decode only."""

    BOTH = "both"
    PREFILL = "prefill"
    DECODE = "decode"


@dataclasses.dataclass(frozen=True, slots=True)
class BrownoutSetting:
    threshold: float
    phase: BrownoutPhase = BrownoutPhase.BOTH
    exempt_layers: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must lie in [0, 1], got {self.threshold}")

    def moe_options(self) -> tuple[MoeOptions, MoeOptions]:
        """(prefill, decode) options. At threshold 1 both are exactly the reference's options
        (exempt layers dropped too), so the same executable runs."""
        if self.threshold >= 1.0:
            return EXACT, EXACT
        browned = MoeOptions(threshold=self.threshold, exempt_layers=self.exempt_layers)
        prefill = browned if self.phase in (BrownoutPhase.BOTH, BrownoutPhase.PREFILL) else EXACT
        decode = browned if self.phase in (BrownoutPhase.BOTH, BrownoutPhase.DECODE) else EXACT
        return prefill, decode


@dataclasses.dataclass(frozen=True, slots=True)
class QualityConfig:
    window_tokens: int = 128  # W: tokens per teacher-forced window
    prompt_tokens: int = 64  # P: prefilled; the other W − P are decoded and scored
    batch_size: int = 8  # windows per batch (one prefill, then one decode step per token)
    num_prompts: int = 16  # greedy continuations (0: none)
    continuation_tokens: int = 32  # greedy tokens per prompt

    def __post_init__(self) -> None:
        if not 1 <= self.prompt_tokens < self.window_tokens:
            raise ValueError(
                f"prompt tokens ({self.prompt_tokens}) must lie in [1, window tokens "
                f"({self.window_tokens}))"
            )
        for name in ("batch_size", "continuation_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if self.num_prompts < 0:
            raise ValueError(f"num_prompts must be ≥ 0, got {self.num_prompts}")

    @property
    def scored_tokens(self) -> int:
        return self.window_tokens - self.prompt_tokens


@struct.dataclass
class TeacherForced:
    logprobs: Float[Array, "B C V"]  # fp32 log-softmax of each continuation prediction
    experts_prefill: Int[Array, " L"]  # distinct experts read per MoE layer by the prefill
    experts_decode: Int[Array, " L"]  # … summed over the decode steps


def experts_read(
    params: ModelParams,
    config: ModelConfig,
    forward: Forward,
    token_mask: Bool[Array, " N"],
) -> Int[Array, " L"]:
    """Distinct experts (routed and united) one step read per MoE layer, from the expert ids
    each MoE block reports (after brownout)."""
    counts = []
    for layer, trace in zip(config.moe_layers, forward.moe, strict=True):
        moe = params.layers[layer].mlp
        assert isinstance(moe, MoeParams)
        used = expert_counts(trace.expert_ids, token_mask, moe.experts.num_experts) > 0
        counts.append(jnp.sum(used.astype(jnp.int32)))
    return jnp.stack(counts)


@functools.partial(
    jax.jit, static_argnames=("config", "prompt_len", "prefill_options", "decode_options")
)
def teacher_forced(
    params: ModelParams,
    tokens: Int[Array, "B W"],
    active: Bool[Array, " B"],
    *,
    config: ModelConfig,
    prompt_len: int,
    prefill_options: MoeOptions,
    decode_options: MoeOptions,
) -> TeacherForced:
    """Prefill ``tokens[:, :prompt_len]``, then decode the rest teacher-forced; the log-probs of
    the C = W − prompt_len continuation predictions (the first from the prefill)."""
    b, w = tokens.shape
    cache = ContiguousKVCache.allocate(config, b, w, params.embed.dtype)
    positions = jnp.broadcast_to(jnp.arange(prompt_len, dtype=jnp.int32), (b, prompt_len))
    mask = jnp.broadcast_to(active[:, None], (b, prompt_len))
    prefill = forward_hidden(
        params, config, tokens[:, :prompt_len], positions, mask, cache, False, prefill_options
    )
    first = jax.nn.log_softmax(lm_logits(params, prefill.hidden[:, -1]), axis=-1)
    prefill_read = experts_read(params, config, prefill, mask.reshape(-1))

    def step(cache, inputs):
        token, position = inputs
        forward = forward_hidden(
            params,
            config,
            token[:, None],
            jnp.full((b, 1), position, jnp.int32),
            active[:, None],
            cache,
            True,
            decode_options,
        )
        logp = jax.nn.log_softmax(lm_logits(params, forward.hidden[:, 0]), axis=-1)
        return forward.cache, (logp, experts_read(params, config, forward, active))

    fed = tokens[:, prompt_len : w - 1].T  # (C − 1, B): the true tokens, one per step
    _, (rest, decode_read) = jax.lax.scan(
        step, prefill.cache, (fed, jnp.arange(prompt_len, w - 1, dtype=jnp.int32))
    )
    logprobs = jnp.concatenate([first[:, None], jnp.swapaxes(rest, 0, 1)], axis=1)
    return TeacherForced(
        logprobs=logprobs,
        experts_prefill=prefill_read,
        experts_decode=jnp.sum(decode_read, axis=0),
    )


@struct.dataclass
class TokenDivergence:
    kl: Float[Array, "B C"]
    agree: Bool[Array, "B C"]
    nll_exact: Float[Array, "B C"]
    nll_browned: Float[Array, "B C"]


@jax.jit
def token_divergence(
    exact: Float[Array, "B C V"], browned: Float[Array, "B C V"], targets: Int[Array, "B C"]
) -> TokenDivergence:
    kl = jnp.sum(jnp.exp(exact) * (exact - browned), axis=-1)
    agree = jnp.argmax(exact, axis=-1) == jnp.argmax(browned, axis=-1)
    pick = targets[..., None]
    return TokenDivergence(
        kl=kl,
        agree=agree,
        nll_exact=-jnp.take_along_axis(exact, pick, axis=-1)[..., 0],
        nll_browned=-jnp.take_along_axis(browned, pick, axis=-1)[..., 0],
    )


@dataclasses.dataclass(frozen=True, slots=True)
class SettingMeasurement:
    """Raw per-token figures of one setting over all windows (rows) and scored tokens."""

    setting: BrownoutSetting
    kl: np.ndarray  # (windows, C) float64
    agree: np.ndarray  # (windows, C) bool
    nll_exact: np.ndarray  # (windows, C)
    nll_browned: np.ndarray  # (windows, C)
    experts_prefill: np.ndarray  # (L,) distinct experts read, summed over batches
    experts_decode: np.ndarray  # (L,)
    exact_experts_prefill: np.ndarray  # (L,) the same for the exact model
    exact_experts_decode: np.ndarray
    bytes_per_expert: int
    first_divergence: np.ndarray | None  # (prompts,) greedy tokens before the first difference
    continuation_tokens: int

    @property
    def scored_tokens(self) -> int:
        return int(self.kl.size)

    def bytes_saved_per_token(self) -> np.ndarray:
        """(L,) routed-expert weight bytes not read per scored token, per MoE layer."""
        saved = (self.exact_experts_prefill + self.exact_experts_decode) - (
            self.experts_prefill + self.experts_decode
        )
        return saved * self.bytes_per_expert / max(self.scored_tokens, 1)

    def bytes_read_fraction(self) -> float:
        """Routed-expert bytes read relative to the exact model, over all steps and layers."""
        exact = float(np.sum(self.exact_experts_prefill + self.exact_experts_decode))
        return float(np.sum(self.experts_prefill + self.experts_decode)) / max(exact, 1.0)


def expert_bytes(params: ModelParams, config: ModelConfig) -> int:
    """Bytes of one expert's weights (gate, up, down); united experts have the same shape."""
    moe = params.layers[config.moe_layers[0]].mlp
    assert isinstance(moe, MoeParams)
    e = moe.experts
    return sum(int(np.prod(w.shape[1:])) * w.dtype.itemsize for w in (e.w_gate, e.w_up, e.w_down))


def _batches(windows: Sequence[Sequence[int]], batch_size: int):
    for begin in range(0, len(windows), batch_size):
        chunk = windows[begin : begin + batch_size]
        tokens = np.zeros((batch_size, len(chunk[0])), np.int32)
        tokens[: len(chunk)] = np.asarray(chunk, np.int32)
        active = np.arange(batch_size) < len(chunk)
        yield len(chunk), jnp.asarray(tokens), jnp.asarray(active)


def measure_settings(
    params: ModelParams,
    config: ModelConfig,
    windows: Sequence[Sequence[int]],
    settings: Sequence[BrownoutSetting],
    cfg: QualityConfig,
    progress: bool = False,
    desc: str = "quality",
) -> list[SettingMeasurement]:
    """Every setting against the exact model on the same batches of ``windows`` (each exactly
    ``cfg.window_tokens`` long), plus greedy continuations of the first ``cfg.num_prompts``."""
    if not windows:
        raise ValueError("no windows to evaluate: the text is shorter than one window")
    if any(len(w) != cfg.window_tokens for w in windows):
        raise ValueError(f"every window must hold exactly {cfg.window_tokens} tokens")
    if cfg.window_tokens > config.max_position_embeddings:
        raise ValueError(
            f"window of {cfg.window_tokens} tokens exceeds the context length "
            f"{config.max_position_embeddings}"
        )
    num_batches = -(-len(windows) // cfg.batch_size)
    prompts = [list(w[: cfg.prompt_tokens]) for w in windows[: cfg.num_prompts]]
    greedy_batches = -(-len(prompts) // cfg.batch_size)
    bar = tqdm(
        total=(num_batches + greedy_batches) * (1 + len(settings)),
        desc=desc,
        unit="run",
        disable=not progress,
    )
    n_layers = len(config.moe_layers)
    parts: list[list[TokenDivergence]] = [[] for _ in settings]
    read = np.zeros((len(settings), 2, n_layers), np.int64)
    exact_read = np.zeros((2, n_layers), np.int64)
    prompt_len = cfg.prompt_tokens
    with bar:
        for real, tokens, active in _batches(windows, cfg.batch_size):
            targets = tokens[:, prompt_len:]
            exact = teacher_forced(
                params,
                tokens,
                active,
                config=config,
                prompt_len=prompt_len,
                prefill_options=EXACT,
                decode_options=EXACT,
            )
            exact_read += np.asarray([exact.experts_prefill, exact.experts_decode])
            bar.update(1)
            for i, setting in enumerate(settings):
                prefill_options, decode_options = setting.moe_options()
                browned = teacher_forced(
                    params,
                    tokens,
                    active,
                    config=config,
                    prompt_len=prompt_len,
                    prefill_options=prefill_options,
                    decode_options=decode_options,
                )
                div = token_divergence(exact.logprobs, browned.logprobs, targets)
                parts[i].append(jax.tree_util.tree_map(lambda a, n=real: np.asarray(a)[:n], div))
                read[i] += np.asarray([browned.experts_prefill, browned.experts_decode])
                bar.update(1)
        divergence = _greedy_divergence(params, config, prompts, settings, cfg, bar)
    per_expert = expert_bytes(params, config)
    out = []
    for i, setting in enumerate(settings):
        joined = jax.tree_util.tree_map(lambda *a: np.concatenate(a), *parts[i])
        out.append(
            SettingMeasurement(
                setting=setting,
                kl=joined.kl.astype(np.float64),
                agree=joined.agree,
                nll_exact=joined.nll_exact.astype(np.float64),
                nll_browned=joined.nll_browned.astype(np.float64),
                experts_prefill=read[i, 0],
                experts_decode=read[i, 1],
                exact_experts_prefill=exact_read[0],
                exact_experts_decode=exact_read[1],
                bytes_per_expert=per_expert,
                first_divergence=None if divergence is None else divergence[i],
                continuation_tokens=cfg.continuation_tokens,
            )
        )
    return out


def first_divergence(exact: np.ndarray, browned: np.ndarray) -> np.ndarray:
    """(N,) index of the first differing token per row; the row length where none differs."""
    differs = exact != browned
    return np.where(differs.any(axis=1), np.argmax(differs, axis=1), exact.shape[1])


def _greedy_tokens(params, config, prompts, options: tuple[MoeOptions, MoeOptions], n: int):
    results = generate(
        params,
        config,
        prompts,
        n,
        temperature=0.0,
        prefill_options=options[0],
        decode_options=options[1],
    )
    return np.asarray([r.token_ids for r in results], np.int64)


def _greedy_divergence(params, config, prompts, settings, cfg: QualityConfig, bar):
    """(settings, prompts) first-divergence indices; batches of ``batch_size`` prompts, each
    batch generated exactly and under every setting (no stop tokens: all run to the end)."""
    if not prompts:
        return None
    out = np.zeros((len(settings), len(prompts)), np.int64)
    n = cfg.continuation_tokens
    for begin in range(0, len(prompts), cfg.batch_size):
        chunk = prompts[begin : begin + cfg.batch_size]
        exact = _greedy_tokens(params, config, chunk, (EXACT, EXACT), n)
        bar.update(1)
        for i, setting in enumerate(settings):
            browned = _greedy_tokens(params, config, chunk, setting.moe_options(), n)
            out[i, begin : begin + len(chunk)] = first_divergence(exact, browned)
            bar.update(1)
    return out
