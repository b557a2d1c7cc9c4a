"""The one bucket rule: geometric series, padding up, the covering buckets, cheapest fits."""

from __future__ import annotations

import pytest

from brownout_jax.engine.buckets import (
    Bucket,
    EngineBuckets,
    cheapest_fit,
    geometric,
    padded_size,
    pick,
    right_padded,
)
from brownout_jax.engine.phase import Phase


def test_geometric_series_is_clamped_at_the_largest_shape():
    assert geometric(16, 1024, 4) == (16, 64, 256, 1024)
    assert geometric(16, 100, 2) == (16, 32, 64, 100)
    assert geometric(2, 1, 2) == (2,)


@pytest.mark.parametrize("need", [1, 15, 16, 17, 100, 1000])
def test_padding_up_picks_the_smallest_bucket_that_holds(need):
    sizes = geometric(16, 1024, 2)
    got = pick(sizes, need)
    assert got >= need and all(s < need for s in sizes if s < got)
    assert padded_size(need) == max(16, 1 << (need - 1).bit_length())
    with pytest.raises(ValueError, match="no bucket holds"):
        pick(sizes, 1025)


def test_covering_buckets_hold_every_step_of_their_phase():
    buckets = EngineBuckets((1, 4), (16, 64, 256), (2, 8, 16), (1, 4, 16), block_size=16)
    prefill, decode = buckets.covering(Phase.PREFILL), buckets.covering(Phase.DECODE)
    assert prefill == Bucket(1, 256) and decode == Bucket(16, 16)
    for phase, cover in ((Phase.PREFILL, prefill), (Phase.DECODE, decode)):
        for bucket in buckets.grid(phase):
            assert cover.size >= bucket.size
    # With only the covering bucket usable, any single row fits; with all, the cheapest.
    assert cheapest_fit({decode}, 3, 2) == decode
    assert cheapest_fit(buckets.grid(Phase.DECODE), 3, 2) == buckets.fit(Phase.DECODE, 3, 2)
    assert cheapest_fit({prefill}, 2, 10) is None  # two prompts wait for a larger bucket


def test_right_padded_batches_pad_rows_and_length():
    tokens, lengths = right_padded([[5, 6, 7], [1] * 20], rows=3)
    assert tokens.shape == (3, 32) and lengths.tolist() == [3, 20, 0]
    assert tokens[0, :4].tolist() == [5, 6, 7, 0] and not tokens[2].any()
