"""The scheduler alone (host only): admission, alternation, preemption, buckets, slots."""

from __future__ import annotations

import subprocess
import sys

import pytest

from brownout_jax.engine.buckets import Bucket, EngineBuckets
from brownout_jax.engine.phase import Phase
from brownout_jax.engine.requests import GenerationRequest, RequestHandle
from brownout_jax.engine.scheduler import Scheduler, SchedulerLimits, Sequence
from brownout_jax.engine.stream import TokenStream

BUCKETS = EngineBuckets(
    prefill_batches=(1, 2, 4),
    prefill_lengths=(16, 32, 64),
    decode_batches=(2, 4),
    decode_widths=(1, 2, 4, 8),
    block_size=8,
)


def _limits(**changes) -> SchedulerLimits:
    fields = dict(
        max_batch=4, max_prefill_batch=4, max_prefill_tokens=256, block_size=8, num_blocks=33
    )
    fields.update(changes)
    return SchedulerLimits(**fields)


def _seq(prompt_len: int, max_new_tokens: int = 8, name: str = "r") -> Sequence:
    request = GenerationRequest(
        prompt_token_ids=tuple(range(prompt_len)), max_new_tokens=max_new_tokens
    )
    handle = RequestHandle(name, request, None)
    return Sequence(handle, TokenStream(handle, None, frozenset()), list(request.prompt_token_ids))


def _all(phase: Phase):
    return BUCKETS.grid(phase)


def test_the_scheduler_imports_no_jax():
    code = (
        "import sys, brownout_jax.engine.scheduler, brownout_jax.engine.loop, "
        "brownout_jax.engine.plan_wire; "
        "print(sorted(m for m in sys.modules if m == 'jax' or m.startswith('jax.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_fifo_admission_stops_at_the_first_request_that_does_not_fit():
    # 5 free blocks of 8 tokens: the 50-token head needs 7, so nobody behind it is admitted.
    scheduler = Scheduler(_limits(num_blocks=6))
    head, small = _seq(50, name="head"), _seq(4, name="small")
    scheduler.add(head)
    scheduler.add(small)
    assert scheduler.next_step(_all, now=0.0) is None
    assert list(scheduler.waiting) == [head, small] and scheduler.allocator.used == 0


def test_prefill_batches_padded_to_the_cheapest_bucket_and_slots_booked():
    scheduler = Scheduler(_limits())
    seqs = [_seq(n) for n in (5, 20, 9)]
    for seq in seqs:
        scheduler.add(seq)
    plan = scheduler.next_step(_all, now=1.5)
    assert plan.phase == Phase.PREFILL and plan.bucket == Bucket(4, 32)
    assert plan.sequences == tuple(seqs)
    assert [len(row.tokens) for row in plan.rows] == [5, 20, 9]
    assert len({row.slot for row in plan.rows}) == 3
    assert [len(row.blocks) for row in plan.rows] == [1, 3, 2]
    assert all(s.handle.metrics.admitted == 1.5 and s.dispatched == 1 for s in seqs)
    assert scheduler.num_running == 3 and scheduler.num_waiting == 0


def test_prefill_and_decode_alternate_while_both_have_work():
    scheduler = Scheduler(_limits(max_prefill_batch=1))
    for _ in range(3):
        scheduler.add(_seq(4))
    phases = [scheduler.next_step(_all, now=0.0).phase for _ in range(5)]
    assert phases == [Phase.PREFILL, Phase.DECODE, Phase.PREFILL, Phase.DECODE, Phase.PREFILL]


def test_decode_positions_follow_what_was_dispatched():
    scheduler = Scheduler(_limits())
    seq = _seq(6, max_new_tokens=4)
    scheduler.add(seq)
    scheduler.next_step(_all, now=0.0)  # prefill samples the token at position 6
    positions = []
    for _ in range(3):
        plan = scheduler.next_step(_all, now=0.0)
        assert plan.phase == Phase.DECODE and plan.bucket.batch == 2  # no one-row bucket
        positions.append(plan.rows[0].position)
    assert positions == [6, 7, 8]
    assert scheduler.next_step(_all, now=0.0) is None  # max_new_tokens dispatched


def test_preemption_takes_the_latest_admitted_and_requeues_it_at_the_front():
    # 4 blocks of 8: two 15-token prompts hold 2 each; the first to cross 16 tokens needs a
    # fifth block, so the later-admitted sequence gives its blocks up.
    preempted = []
    scheduler = Scheduler(_limits(num_blocks=5), on_preempt=preempted.append)
    first, second = _seq(15, 16, "first"), _seq(15, 16, "second")
    scheduler.add(first)
    scheduler.add(second)
    prefill = scheduler.next_step(_all, now=0.0)
    assert prefill.sequences == (first, second)
    first.generated.append(1)  # the prefill's tokens were read
    second.generated.append(1)
    decode = scheduler.next_step(_all, now=0.0)  # positions 15: still within 2 blocks
    assert decode.sequences == (first, second)
    decode = scheduler.next_step(_all, now=0.0)  # position 16 needs a third block each
    assert decode.sequences == (first,) and preempted == [second]
    assert second.preempted and second.slot is None and second.blocks == []
    assert second.handle.metrics.preemptions == 1
    scheduler.requeue_preempted(in_flight=decode)  # not owed by the step in flight
    assert list(scheduler.waiting) == [second] and second.dispatched == len(second.generated)


def test_a_sequence_owed_a_token_is_requeued_only_after_that_step():
    scheduler = Scheduler(_limits())
    a, b = _seq(15, 16, "a"), _seq(15, 16, "b")
    scheduler.add(a)
    scheduler.add(b)
    scheduler.next_step(_all, now=0.0)
    in_flight = scheduler.next_step(_all, now=0.0)  # a decode that still owes b a token
    scheduler._preempt(b)
    scheduler.requeue_preempted(in_flight=in_flight)
    assert b not in scheduler.waiting and b.preempted
    scheduler.requeue_preempted(in_flight=None)
    assert list(scheduler.waiting) == [b] and not b.preempted


def test_only_usable_buckets_are_planned():
    """Before the whole grid is compiled only the covering buckets exist: a prefill admits one
    prompt padded to the longest length, a decode pads to every slot and the widest table."""
    covering = {phase: BUCKETS.covering(phase) for phase in Phase}
    scheduler = Scheduler(_limits())
    for n in (3, 4):
        scheduler.add(_seq(n))
    usable = lambda phase: {covering[phase]}  # noqa: E731
    first = scheduler.next_step(usable, now=0.0)
    assert first.bucket == Bucket(1, 64) and len(first.rows) == 1
    decode = scheduler.next_step(usable, now=0.0)
    assert decode.phase == Phase.DECODE and decode.bucket == Bucket(4, 8)
    second = scheduler.next_step(usable, now=0.0)
    assert second.phase == Phase.PREFILL and len(second.rows) == 1


def test_remove_frees_slot_and_blocks():
    scheduler = Scheduler(_limits(max_batch=1))
    seq, other = _seq(10), _seq(3)
    scheduler.add(seq)
    scheduler.add(other)
    scheduler.next_step(_all, now=0.0)
    assert scheduler.allocator.used == 2
    assert scheduler.next_step(_all, now=0.0).phase == Phase.DECODE  # no free slot for other
    scheduler.remove(seq)
    assert scheduler.allocator.used == 0 and scheduler.num_running == 0
    plan = scheduler.next_step(_all, now=0.0)
    assert plan.phase == Phase.PREFILL and plan.sequences == (other,)


@pytest.mark.parametrize("rows", [1, 3])
def test_decode_never_plans_a_one_row_bucket(rows):
    scheduler = Scheduler(_limits())
    for _ in range(rows):
        scheduler.add(_seq(4))
    scheduler.next_step(_all, now=0.0)
    plan = scheduler.next_step(_all, now=0.0)
    assert plan.phase == Phase.DECODE and plan.bucket.batch == (2 if rows == 1 else 4)


def test_next_bucket_looks_ahead_without_booking_anything():
    scheduler = Scheduler(_limits())
    assert scheduler.next_bucket(Phase.PREFILL, _all(Phase.PREFILL)) is None
    assert scheduler.next_bucket(Phase.DECODE, _all(Phase.DECODE)) is None
    for n in (5, 20, 9):
        scheduler.add(_seq(n))
    assert scheduler.next_bucket(Phase.PREFILL, _all(Phase.PREFILL)) == Bucket(4, 32)
    assert scheduler.num_waiting == 3 and scheduler.allocator.used == 0
    plan = scheduler.next_step(_all, now=0.0)
    assert plan.bucket == Bucket(4, 32)
    # The decode step the three would take next: 3 rows, 3 blocks for the 20+1 tokens.
    ahead = scheduler.next_bucket(Phase.DECODE, _all(Phase.DECODE))
    used = scheduler.allocator.used
    assert ahead == Bucket(4, 4) and scheduler.next_step(_all, now=0.0).bucket == ahead
    assert scheduler.allocator.used == used


def test_blocks_shared_by_samples_return_when_their_last_holder_leaves():
    from brownout_jax.engine.blocks import BlockAllocator

    allocator = BlockAllocator(6)
    blocks = allocator.allocate(3)
    assert allocator.share(blocks[:2]) == blocks[:2] and allocator.free == 2
    allocator.release(blocks)  # the first holder leaves: the shared two stay taken
    assert allocator.free == 3 and [allocator.holders(b) for b in blocks] == [1, 1, 0]
    allocator.release(blocks[:2])
    assert allocator.free == 5 and allocator.used == 0
    with pytest.raises(ValueError, match="not held"):
        allocator.share(blocks[:1])


def test_a_later_sample_shares_the_full_prompt_blocks_once_they_are_computed():
    """Prompt of 20 tokens, blocks of 8: two full blocks are shared, the last 4 tokens are
    computed again by the second sample (its first token is sampled from them); with a
    chunked prefill only, and only once the first sample's prompt is wholly dispatched."""
    scheduler = Scheduler(_limits(prefill_chunk=16))
    first, second = _seq(20, name="a"), _seq(20, name="b")
    second.shares_with = first
    scheduler.add(first)
    scheduler.add(second)
    step = scheduler.next_step(_all, now=0.0)  # a's first chunk; b waits for its blocks
    assert step.sequences == (first,) and [len(r.tokens) for r in step.rows] == [16]
    step = scheduler.next_step(_all, now=0.0)  # a's last chunk: still pending for b
    assert step.sequences == (first,) and step.rows[0].position == 16
    step = scheduler.next_step(_all, now=0.0)  # a decodes (alternation) …
    assert step.phase == Phase.DECODE
    step = scheduler.next_step(_all, now=0.0)  # … then b starts on a's two full blocks
    (row,) = step.rows
    assert step.sequences == (second,) and row.position == 16 and len(row.tokens) == 4
    assert second.blocks[:2] == first.blocks[:2] and second.blocks[2] != first.blocks[2]
    assert row.history_from == first.slot
    assert scheduler.allocator.used == 4  # 3 for a, 1 of b's own
    scheduler.remove(first)
    assert scheduler.allocator.used == 3  # the shared two stay with b
    scheduler.remove(second)
    assert scheduler.allocator.used == 0


def test_without_chunked_prefill_a_sample_computes_its_whole_prompt():
    scheduler = Scheduler(_limits())
    first, second = _seq(20, name="a"), _seq(20, name="b")
    second.shares_with = first
    scheduler.add(first)
    scheduler.add(second)
    scheduler.next_step(_all, now=0.0)
    scheduler.next_step(_all, now=0.0)
    step = scheduler.next_step(_all, now=0.0)
    (row,) = step.rows
    assert row.position == 0 and len(row.tokens) == 20 and row.history_from == -1
