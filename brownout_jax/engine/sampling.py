"""On-device sampling: greedy, temperature, top-k and top-p (nucleus), and the packed output.

Truncation finds each row's cutoff logit by bisection over the ordered bit patterns of the
float32 logits (32 counting passes over the vocabulary) instead of sorting it: on CPU a sort
of (16, 4096) logits cost ~11 ms, more than the rest of a small model's decode step. The sort
is kept as the reference (``truncate_logits_by_sort``). Steps where no row samples skip all of
it behind a ``lax.cond``.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from brownout_jax.model.dims import Array, Float, Int


@struct.dataclass
class SamplingParams:
    temperature: Float[Array, " B"]  # 0 → greedy
    seed: Int[Array, " B"]  # per-sequence seed; the key for a token is fold_in(seed, position)
    top_k: Int[Array, " B"]  # 0 → off
    top_p: Float[Array, " B"]  # 1 → off

    @classmethod
    def host(
        cls,
        temperature: np.ndarray,
        seed: np.ndarray,
        top_k: np.ndarray | None = None,
        top_p: np.ndarray | None = None,
    ) -> SamplingParams:
        """NumPy arrays in the device dtypes (upload with ``jax.device_put``)."""
        batch = len(temperature)
        return cls(
            temperature=np.asarray(temperature, np.float32),
            seed=np.asarray(seed, np.uint32),
            top_k=np.zeros(batch, np.int32) if top_k is None else np.asarray(top_k, np.int32),
            top_p=np.ones(batch, np.float32) if top_p is None else np.asarray(top_p, np.float32),
        )


def sample_tokens(
    logits: Float[Array, "B V"],
    sampling: SamplingParams,
    positions: Int[Array, " B"],
    adjusted: Float[Array, "B V"] | None = None,
    min_p: Float[Array, " B"] | None = None,
) -> tuple[Int[Array, " B"], Float[Array, " B"]]:
    """Greedy, or temperature sampling restricted by min-p, top-k and top-p (nucleus), from
    ``adjusted`` (the logits after bias, penalties and masks; ``logits`` when None); the
    returned log-probabilities are the model's own ``logits``', before all of it."""
    raw = logits
    logits = raw if adjusted is None else adjusted
    greedy = first_argmax(logits)
    sampled = sampling.temperature > 0

    def draw() -> Int[Array, " B"]:
        keys = jax.vmap(lambda s, p: jax.random.fold_in(jax.random.key(s), p))(
            sampling.seed.astype(jnp.uint32), positions
        )
        temperature = jnp.maximum(sampling.temperature, 1e-6)[:, None]
        scaled = logits / temperature
        if min_p is not None:
            scaled = apply_min_p(scaled, min_p)
        truncating = jnp.any(sampled & ((sampling.top_k > 0) | (sampling.top_p < 1.0)))
        scaled = jax.lax.cond(
            truncating,
            lambda s: truncate_logits(s, sampling.top_k, sampling.top_p),
            lambda s: s,
            scaled,
        )
        drawn = jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32)
        return jnp.where(sampled, drawn, greedy)

    tokens = jax.lax.cond(jnp.any(sampled), draw, lambda: greedy)
    # log p(token) = logit − logsumexp: the row's normaliser alone, not the whole (B, V)
    # log-softmax (a 19 MB array per step at batch 32 with Qwen's vocabulary).
    chosen = jnp.take_along_axis(raw, tokens[:, None], axis=-1)[:, 0]
    return tokens, chosen - jax.nn.logsumexp(raw, axis=-1)


def apply_min_p(scaled: Float[Array, "B V"], min_p: Float[Array, " B"]) -> Float[Array, "B V"]:
    """Drops tokens whose probability is below ``min_p`` × the most likely's, i.e. whose
    (temperature-scaled) logit is below the top one's + log(min_p); 0 → off."""
    top = jnp.max(scaled, axis=-1, keepdims=True)
    floor = top + jnp.log(jnp.maximum(min_p, 1e-30))[:, None]
    return jnp.where((min_p[:, None] > 0) & (scaled < floor), -jnp.inf, scaled)


def first_argmax(logits: Float[Array, "B V"]) -> Int[Array, " B"]:
    """``argmax`` (the first of equal maxima) from two plain max reductions: XLA:CPU runs
    ``argmax``'s value-and-index reduction unvectorised (11 ms on 32 × 151936 logits, against
    3 ms for this)."""
    top = jnp.max(logits, axis=-1, keepdims=True)
    index = jax.lax.broadcasted_iota(jnp.float32, logits.shape, 1)  # exact below 2^24
    first = -jnp.max(jnp.where(logits == top, -index, -jnp.inf), axis=-1)
    return jnp.minimum(first, logits.shape[-1] - 1).astype(jnp.int32)


def _ordered_keys(x: Float[Array, "B V"]) -> Int[Array, "B V"]:
    """uint32 keys with the order of the float32 values (IEEE bits: flip negatives, then the
    sign), so that a bisection over 32 bits finds any value exactly."""
    x = x.astype(jnp.float32)
    x = jnp.where(x == 0, 0.0, x)  # -0.0 == 0.0 as logits: one key for both
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    negative = (bits >> 31) == 1
    return jnp.where(negative, ~bits, bits | jnp.uint32(0x80000000))


def _bisect(ok_at: Callable[[Array], Array], batch: int, find_largest: bool) -> Int[Array, " B"]:
    """Per row, the largest (or smallest) uint32 t with ``ok_at(t)``; ``ok_at`` is monotone
    (true below the answer for largest, above it for smallest) and true at the answer."""
    lo = jnp.zeros((batch,), jnp.uint32)
    hi = jnp.full((batch,), 0xFFFFFFFF, jnp.uint32)

    def step(_, bounds):
        lo, hi = bounds
        half = (hi - lo) // 2
        if find_largest:
            mid = lo + half + ((hi - lo) & 1)  # round up: lo = mid must make progress
            ok = ok_at(mid)
            return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)
        mid = lo + half
        ok = ok_at(mid)
        return jnp.where(ok, lo, mid + 1), jnp.where(ok, mid, hi)

    lo, _ = jax.lax.fori_loop(0, 32, step, (lo, hi))
    return lo


def truncate_logits(
    logits: Float[Array, "B V"], top_k: Int[Array, " B"], top_p: Float[Array, " B"]
) -> Float[Array, "B V"]:
    """Masks logits outside the top-k and outside the smallest nucleus of mass ≥ top-p: the
    same tokens as :func:`truncate_logits_by_sort`, without sorting."""
    batch, vocab = logits.shape
    keys = _ordered_keys(logits)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)

    # k-th largest value: the largest t that at least k logits reach.
    kth = _bisect(lambda t: jnp.sum(keys >= t[:, None], axis=-1) >= k, batch, find_largest=True)
    # Nucleus: a token stays while the mass of the tokens above it is below top_p, so the
    # cutoff is the smallest value whose strictly-greater mass is below top_p.
    pth = _bisect(
        lambda t: jnp.sum(jnp.where(keys > t[:, None], probs, 0.0), axis=-1) < top_p,
        batch,
        find_largest=False,
    )
    pth = jnp.where(top_p >= 1.0, jnp.uint32(0), pth)  # off: keep all, whatever the rounding
    cutoff = jnp.maximum(kth, pth)
    return jnp.where(keys >= cutoff[:, None], logits, -jnp.inf)


def truncate_logits_by_sort(
    logits: Float[Array, "B V"], top_k: Int[Array, " B"], top_p: Float[Array, " B"]
) -> Float[Array, "B V"]:
    """Reference for :func:`truncate_logits`: sort, cumulative mass, cutoff."""
    vocab = logits.shape[-1]
    ordered = jnp.sort(logits, axis=-1)[:, ::-1]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    kth = jnp.take_along_axis(ordered, (k - 1)[:, None], axis=-1)
    probs = jax.nn.softmax(ordered, axis=-1)
    # Keep a token while the mass strictly before it is below top_p (the first always stays).
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = jnp.sum(mass_before < top_p[:, None], axis=-1)
    pth = jnp.take_along_axis(ordered, (keep - 1)[:, None], axis=-1)
    pth = jnp.where(top_p[:, None] >= 1.0, -jnp.inf, pth)
    cutoff = jnp.maximum(kth, pth)
    return jnp.where(logits >= cutoff, logits, -jnp.inf)


def pack_sampled(tokens: Int[Array, " B"], logprobs: Float[Array, " B"]) -> Int[Array, "B 2"]:
    return jnp.stack([tokens, jax.lax.bitcast_convert_type(logprobs, jnp.int32)], axis=-1)


def unpack_sampled(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    packed = np.asarray(packed)
    return packed[:, 0], packed[:, 1].view(np.float32)
