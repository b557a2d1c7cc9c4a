"""A step's one int32 upload: every field of both batch types survives pack → unpack (inside
jit) bit for bit, the host's typed views write the words the step reads, and the ring of
buffers never hands out a buffer that a step still in flight may read."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from brownout_jax.engine.input_words import InputLayout, WordBuffers
from brownout_jax.engine.steps import host_decode_batch, host_prefill_batch


def _random(batch, rng):
    leaves, treedef = jax.tree_util.tree_flatten(batch)
    filled = []
    for leaf in leaves:
        if leaf.dtype == np.bool_:
            filled.append(rng.random(leaf.shape) < 0.5)
        elif leaf.dtype == np.float32:
            filled.append(rng.standard_normal(leaf.shape).astype(np.float32))
        else:
            info = np.iinfo(leaf.dtype)
            filled.append(rng.integers(info.min, info.max, leaf.shape, dtype=leaf.dtype))
    return jax.tree_util.tree_unflatten(treedef, filled)


EMPTY = [host_prefill_batch(3, 16, 5, 8), host_decode_batch(4, 7, 8)]


@pytest.mark.parametrize("empty", EMPTY, ids=["prefill", "decode"])
def test_every_field_survives_pack_and_unpack_bit_for_bit(empty):
    batch = _random(empty, np.random.default_rng(0))
    layout = InputLayout.of(batch)
    words = layout.pack(batch)
    assert words.dtype == np.int32 and words.shape == (layout.size,)
    out = jax.jit(layout.unpack)(words)
    leaves = jax.tree_util.tree_leaves(batch)
    for got, want in zip(jax.tree_util.tree_leaves(out), leaves, strict=True):
        assert np.asarray(got).dtype == want.dtype
        assert np.array_equal(np.asarray(got).view(np.uint8), want.view(np.uint8))
    # Writing through the typed views is the same as packing the batch.
    views = layout.views(np.zeros(layout.size, np.int32))
    for view, value in zip(jax.tree_util.tree_leaves(views), leaves, strict=True):
        view[...] = value
    assert np.array_equal(layout.pack(views), words)


def test_the_ring_presets_each_buffer_and_reuses_none_too_soon():
    empty = host_decode_batch(2, 3, 4)
    layout = InputLayout.of(empty)
    buffers = WordBuffers()
    seen = []
    for step in range(WordBuffers.RING + 1):
        words, host = buffers.next(layout, lambda: empty)
        assert np.array_equal(words, layout.pack(empty))  # preset to the empty batch
        host.positions[:] = step
        seen.append(words)
    assert len({id(w) for w in seen[: WordBuffers.RING]}) == WordBuffers.RING
    assert seen[WordBuffers.RING] is seen[0]


def test_only_32_bit_and_bool_fields_are_accepted():
    with pytest.raises(ValueError, match="32-bit"):
        InputLayout.of({"x": np.zeros(3, np.int64)})
