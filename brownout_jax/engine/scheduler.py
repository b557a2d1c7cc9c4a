"""The scheduler: which sequences go into the next step. Host only (imports no JAX).

It owns the waiting queue, admission, preemption, the KV block allocator and the decode slots,
and turns them into a :class:`StepPlan` (phase, bucket, rows) for the executor. Policy: while
requests wait and sequences run, prefill and decode steps alternate, so a burst can neither
starve running decodes nor leave a new request behind more than one decode step. Admission is
FIFO and stops at the first request that does not fit (no overtaking). When a running
sequence needs a new KV block and none is free, the most recently admitted other sequence is
preempted: its blocks and slot are freed and, once no step in flight still owes it a token,
it is re-queued at the front, to be recomputed from prompt + generated tokens.

Chunked prefill (``SchedulerLimits.prefill_chunk``): a context longer than a chunk is admitted
whole (its slot and every block booked at once) and prefilled a chunk per prefill step, the
admitted sequences' next chunks before new admissions; only the last chunk's sampled token is
the sequence's first. Decode steps alternate with the chunks like with any prefill.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
from collections.abc import Callable, Collection
from typing import Protocol

import numpy as np

from brownout_jax.engine.blocks import BlockAllocator, blocks_needed
from brownout_jax.engine.buckets import Bucket, cheapest_fit
from brownout_jax.engine.phase import Phase
from brownout_jax.engine.requests import (
    MAX_LOGPROBS,
    GenerationRequest,
    RequestHandle,
    TokenLogprob,
)
from brownout_jax.engine.stream import TokenStream


@dataclasses.dataclass(frozen=True, slots=True)
class SchedulerLimits:
    max_batch: int  # decode slots
    max_prefill_batch: int  # prompts per prefill step
    max_prefill_tokens: int  # padded prompt tokens per prefill step
    block_size: int
    num_blocks: int  # KV blocks in the pool, block 0 reserved
    prefill_chunk: int | None = None  # context tokens per row of a prefill step; None: all


@dataclasses.dataclass(eq=False)
class Sequence:
    """One request inside the engine: its tokens, slot, blocks and progress."""

    handle: RequestHandle
    stream: TokenStream
    prompt: list[int]
    admitted_order: int = 0
    slot: int | None = None
    blocks: list[int] = dataclasses.field(default_factory=list)
    generated: list[int] = dataclasses.field(default_factory=list)
    dispatched: int = 0  # sampled tokens dispatched (processed or still in flight)
    finished: bool = False
    preempted: bool = False
    prefilled: int = 0  # context tokens dispatched to prefill steps (chunked prefill)
    prefilling: bool = False  # admitted, chunks still to dispatch: not decodable yet
    # Scores of the prompt's tokens so far (prompt logprobs), position 1 onwards.
    prompt_scores: list[TokenLogprob] = dataclasses.field(default_factory=list)
    grammar: TokenMaskSource | None = None  # structured output: what may come next
    # Another sample of the same request and prompt (n / best_of), whose full prompt blocks
    # this one may share instead of computing them again (``Scheduler._shared_prefix``).
    shares_with: Sequence | None = None

    @property
    def request(self) -> GenerationRequest:
        return self.handle.request

    @property
    def context(self) -> list[int]:
        return self.prompt + self.generated

    def collect_prompt_scores(self, row: StepRow, scores: np.ndarray) -> None:
        """A scored prefill chunk's rows (``score_prompts``' packing) appended to the prompt
        scores: offset t scores the token after it, while that is a prompt token."""
        if row.position == 0:
            self.prompt_scores.clear()  # computed again from the start (after a preemption)
        k = row.request.prompt_logprobs or 0
        width = MAX_LOGPROBS  # the packing holds that many alternatives, k of them asked for
        for t in range(len(row.tokens)):
            target = int(scores[t, 0])
            if target < 0:
                break
            logprob = float(scores[t, 1:2].view(np.float32)[0])
            ids = scores[t, 2 : 2 + k].tolist()
            values = scores[t, 2 + width : 2 + width + k].view(np.float32).tolist()
            self.prompt_scores.append(
                TokenLogprob(target, logprob, tuple(zip(ids, values, strict=True)))
            )


class TokenMaskSource(Protocol):
    """A structured-output request's grammar state (the engine thread's alone)."""

    def fill_mask(self, row: np.ndarray) -> None:
        """Writes the bitmask of the tokens allowed next into ``row`` (int32 words)."""

    def accept(self, token: int) -> bool:
        """Advances past ``token``; False if the grammar does not allow it."""

    @property
    def terminated(self) -> bool:
        """Its stop token was accepted: the text is complete."""


@dataclasses.dataclass(frozen=True, slots=True)
class StepRow:
    """What the executor uploads for one row of a step."""

    slot: int
    blocks: tuple[int, ...]
    request: GenerationRequest  # its sampling fields
    tokens: tuple[int, ...] = ()  # prefill: the context (or the chunk of it) to compute
    # Decode: position of the input token (the slot's last sampled one); prefill: of the
    # first of ``tokens``.
    position: int = 0
    samples: bool = True  # its sampled token is the sequence's (False: a chunk before the last)
    prompt_length: int = 0  # the request's prompt tokens (positions past it were generated)
    # Prefill rows of a request that asked for prompt logprobs, on its first computation
    # (not a recomputation after preemption): its chunk's tokens are scored, the last
    # against ``next_token``, the context's token after the chunk (−1: the chunk ends it).
    scores_prompt: bool = False
    next_token: int = -1
    grammar: TokenMaskSource | None = None  # a structured-output request's matcher
    # A sample starting on blocks shared with another: the slot whose prompt marks its token
    # history copies (−1: none).
    history_from: int = -1

    @property
    def generated_before(self) -> int:
        """Tokens the sequence had generated before the one this row samples."""
        end = self.position + (len(self.tokens) if self.tokens else 1)
        return max(0, end - self.prompt_length)


@dataclasses.dataclass(frozen=True, slots=True)
class StepPlan:
    phase: Phase
    bucket: Bucket
    rows: tuple[StepRow, ...]
    sequences: tuple[Sequence, ...]  # who receives each row's token, in row order

    @property
    def constrained(self) -> bool:
        """A row samples under a grammar (its mask needs the token before it)."""
        return any(row.grammar is not None for row in self.rows)


# Buckets the executor can run for a phase right now (all of them once warm-up is complete).
UsableBuckets = Callable[[Phase], Collection[Bucket]]


class Scheduler:
    def __init__(
        self,
        limits: SchedulerLimits,
        on_preempt: Callable[[Sequence], None] | None = None,
        on_share: Callable[[int], None] | None = None,
    ):
        """``on_share(tokens)``: a sample was admitted on another's prompt blocks."""
        self.limits = limits
        self._on_preempt = on_preempt
        self._on_share = on_share
        self.allocator = BlockAllocator(limits.num_blocks)
        self._free_slots = list(range(limits.max_batch - 1, -1, -1))
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []
        self._admissions = itertools.count()
        self._last_phase = Phase.DECODE
        self.preemptions = 0

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def idle(self) -> bool:
        return not (self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def next_step(self, usable: UsableBuckets, now: float) -> StepPlan | None:
        """Plans (and books slots and blocks for) the next step, or None when nothing can run.
        The plan is assumed dispatched: its rows count as in flight."""
        decodable = self._decodable()
        prefill_work = self.waiting or any(s.prefilling for s in self.running)
        prefer_prefill = prefill_work and (not decodable or self._last_phase == Phase.DECODE)
        if prefer_prefill:
            plan = self._plan_prefill(usable(Phase.PREFILL), now)
            if plan is not None:
                return plan
        if decodable:
            return self._plan_decode(decodable, usable(Phase.DECODE))
        return None

    def next_bucket(
        self, phase: Phase, usable: Collection[Bucket], extra_rows: int = 0
    ) -> Bucket | None:
        """The bucket the next step of ``phase`` would take now (None: no such step); books
        nothing. What the predictive controller looks ahead to. ``extra_rows``: decode, with
        that many more sequences (those a prefill about to be planned would add)."""
        if phase == Phase.PREFILL:
            return self._prefill_rows(usable)[1]
        decodable = [s for s in self._decodable() if not s.preempted]
        if not decodable:
            return None
        need = max(
            blocks_needed(len(s.prompt) + s.dispatched, self.limits.block_size) for s in decodable
        )
        fit = cheapest_fit(usable, len(decodable) + extra_rows, need)
        if fit is None and extra_rows:  # more than a decode step holds: the step as it is
            fit = cheapest_fit(usable, len(decodable), need)
        return fit

    def decoding_besides(self, plan: StepPlan) -> bool:
        """Whether sequences other than ``plan``'s await a decode step (they wait through
        ``plan``; the ones it starts do not)."""
        planned = {id(s) for s in plan.sequences}
        return any(id(s) not in planned and not s.preempted for s in self._decodable())

    def _decodable(self) -> list[Sequence]:
        return [
            s for s in self.running if not s.prefilling and s.dispatched < s.request.max_new_tokens
        ]

    def _prefill_rows(
        self, usable: Collection[Bucket]
    ) -> tuple[list[tuple[Sequence, int, int]], Bucket | None]:
        """(sequence, first position, tokens) of each row of the next prefill step, and its
        bucket; books nothing. Admitted sequences' next chunks first (oldest first), then new
        admissions in FIFO order."""
        limits = self.limits
        chunk = limits.prefill_chunk
        rows: list[tuple[Sequence, int, int]] = []
        bucket = None
        longest = 0

        def add(seq: Sequence, start: int) -> bool:
            nonlocal bucket, longest
            left = len(seq.context) - start
            take = left if chunk is None else min(left, chunk)
            fit = cheapest_fit(usable, len(rows) + 1, max(longest, take))
            if fit is None or fit.cost > limits.max_prefill_tokens:
                return False
            rows.append((seq, start, take))
            bucket, longest = fit, max(longest, take)
            return True

        continuing = [s for s in self.running if s.prefilling and not s.preempted]
        for seq in sorted(continuing, key=lambda s: s.admitted_order):
            if len(rows) == limits.max_prefill_batch or not add(seq, seq.prefilled):
                return rows, bucket
        free_blocks, free_slots = self.allocator.free, len(self._free_slots)
        for seq in self.waiting:
            if len(rows) == limits.max_prefill_batch or free_slots == 0:
                break
            if seq.shares_with is not None and self._source_pending(seq.shares_with):
                break  # FIFO: its blocks are a step away; computing them again costs more
            shared = len(self._shared_prefix(seq))
            need = blocks_needed(len(seq.context), limits.block_size) - shared
            if need > free_blocks or not add(seq, shared * limits.block_size):
                break  # FIFO: nobody overtakes the head of the queue
            free_blocks -= need
            free_slots -= 1
        return rows, bucket

    def _source_pending(self, source: Sequence) -> bool:
        """The sample whose blocks a waiting one would share is still being prefilled (or
        waits itself): not yet in the pool when this step runs."""
        if source.finished or source.preempted:
            return False
        return source.prefilling or source in self.waiting

    def _shared_prefix(self, seq: Sequence) -> list[int]:
        """The blocks a new admission shares with another sample of its request: those its
        prompt fills completely, at least one token left to compute (its first token is
        sampled from it). Only from a sample whose prompt is wholly in the pool, on the first
        computation (a recomputation owns all it computes), and with chunked prefill (a
        prefill that starts past position 0 reads the cache). None when it scores its
        prompt (prompt logprobs need every position)."""
        source = seq.shares_with
        if (
            source is None
            or self.limits.prefill_chunk is None
            or seq.generated
            or seq.request.prompt_logprobs is not None
            or source.finished
            or source.preempted
            or source.prefilling
            or source.slot is None
            or source.prompt != seq.prompt
        ):
            return []
        full = (len(seq.prompt) - 1) // self.limits.block_size
        return source.blocks[:full]

    def _plan_prefill(self, usable: Collection[Bucket], now: float) -> StepPlan | None:
        planned, bucket = self._prefill_rows(usable)
        if not planned:
            return None
        rows, sequences = [], []
        for seq, start, take in planned:
            history_from = -1
            if not seq.prefilling:  # a new admission: its slot and all its blocks
                self.waiting.popleft()
                # _prefill_rows started it past the blocks it shares (_shared_prefix).
                shared = seq.shares_with.blocks[: start // self.limits.block_size] if start else []
                if shared:
                    history_from = seq.shares_with.slot
                    if self._on_share is not None:
                        self._on_share(len(shared) * self.limits.block_size)
                seq.slot = self._free_slots.pop()
                fresh = self.allocator.allocate(
                    blocks_needed(len(seq.context), self.limits.block_size) - len(shared)
                )
                seq.blocks = self.allocator.share(shared) + fresh
                seq.admitted_order = next(self._admissions)
                if seq.handle.metrics.admitted is None:
                    seq.handle.metrics.admitted = now
                self.running.append(seq)
            context = seq.context
            last = start + take == len(context)
            seq.prefilled = start + take
            seq.prefilling = not last
            if last:
                seq.dispatched = len(seq.generated) + 1
            scores = seq.request.prompt_logprobs is not None and not seq.generated
            rows.append(
                StepRow(
                    seq.slot,
                    tuple(seq.blocks),
                    seq.request,
                    tuple(context[start : start + take]),
                    position=start,
                    samples=last,
                    prompt_length=len(seq.prompt),
                    scores_prompt=scores,
                    next_token=context[start + take] if scores and not last else -1,
                    grammar=seq.grammar,
                    history_from=history_from,
                )
            )
            sequences.append(seq)
        self._last_phase = Phase.PREFILL
        return StepPlan(Phase.PREFILL, bucket, tuple(rows), tuple(sequences))

    def _plan_decode(
        self, decodable: list[Sequence], usable: Collection[Bucket]
    ) -> StepPlan | None:
        block_size = self.limits.block_size
        chosen: list[Sequence] = []
        for seq in sorted(decodable, key=lambda s: s.admitted_order):
            if seq.preempted or seq.finished:
                continue
            need = blocks_needed(len(seq.prompt) + seq.dispatched, block_size)
            while len(seq.blocks) < need and not seq.preempted:
                got = self.allocator.allocate(1)
                if got is not None:
                    seq.blocks.extend(got)
                    continue
                victim = self._preemption_victim(exclude=seq) or seq  # else this one waits
                self._preempt(victim)
            if not seq.preempted:
                chosen.append(seq)
        chosen = [s for s in chosen if not s.preempted]
        bucket = cheapest_fit(usable, len(chosen), max((len(s.blocks) for s in chosen), default=0))
        if not chosen or bucket is None:
            return None
        rows = []
        for seq in chosen:
            position = len(seq.prompt) + seq.dispatched - 1
            rows.append(
                StepRow(
                    seq.slot,
                    tuple(seq.blocks),
                    seq.request,
                    position=position,
                    prompt_length=len(seq.prompt),
                    grammar=seq.grammar,
                )
            )
            seq.dispatched += 1
        self._last_phase = Phase.DECODE
        return StepPlan(Phase.DECODE, bucket, tuple(rows), tuple(chosen))

    def _preemption_victim(self, exclude: Sequence) -> Sequence | None:
        candidates = [s for s in self.running if s is not exclude and not s.preempted]
        return max(candidates, key=lambda s: s.admitted_order) if candidates else None

    def _preempt(self, seq: Sequence) -> None:
        seq.preempted = True
        seq.handle.metrics.preemptions += 1
        self.preemptions += 1
        self._release(seq)
        if self._on_preempt is not None:
            self._on_preempt(seq)

    def drop_kv(self) -> None:
        """The KV pool was lost (a failed step took the donated engine state with it): every
        running sequence is preempted, to be recomputed from prompt + generated tokens like
        any other preemption (``requeue_preempted``)."""
        for seq in list(self.running):
            if not seq.preempted:
                self._preempt(seq)

    def requeue_preempted(self, in_flight: StepPlan | None) -> None:
        """Preempted sequences go back to the front of the queue once no step in flight still
        owes them a token (the recompute needs every generated token)."""
        owed = set(in_flight.sequences) if in_flight is not None else set()
        ready = [s for s in self.running if s.preempted and s not in owed]
        for seq in sorted(ready, key=lambda s: s.admitted_order, reverse=True):
            self.running.remove(seq)
            seq.preempted = False
            seq.prefilling, seq.prefilled = False, 0
            if not seq.finished:
                seq.dispatched = len(seq.generated)
                self.waiting.appendleft(seq)

    def remove(self, seq: Sequence) -> None:
        """A finished or cancelled sequence leaves: its slot and blocks are freed."""
        self._release(seq)
        if seq in self.running:
            self.running.remove(seq)
        if seq in self.waiting:
            self.waiting.remove(seq)

    def _release(self, seq: Sequence) -> None:
        self.allocator.release(seq.blocks)
        seq.blocks = []
        if seq.slot is not None:
            self._free_slots.append(seq.slot)
            seq.slot = None
