"""One engine over several processes (hosts) on JAX's own distributed runtime.

``initialize`` joins the processes (``jax.distributed.initialize``: the coordination service
on process 0, CPU collectives through gloo, GPU ones through NCCL) before any JAX work, so
``jax.devices()`` lists every process's devices and one ``expert`` mesh spans them all.

Process 0 is the leader: fronts, tokenizer, scheduler, block allocator, controller and stop
conditions, exactly as in one process. The others are followers: they open no port and run no
scheduler, only ``Follower.run``: receive the step plan, run the same compiled step. Every
process must dispatch identical programs in identical order (each step holds collectives),
so the leader's ``Executor.dispatch`` first sends the plan through ``PlanChannel``: one int32
buffer per step (``plan_wire``) in the coordination service's key-value store, read by every
follower in order. A dead peer surfaces in the next step's collectives (gloo: connection
reset) and a dead leader in the followers' wait (the store lived in it).

What is checked at start (``check_same_everywhere``): each process publishes a description of
its checkpoint, engine config and step grid in the coordination service's key-value store and
compares it with process 0's; a difference is refused on both sides naming the field.

Failure bounds. A follower that dies or stalls stops bumping its heartbeat key: within
``follower_timeout_s`` the leader's watch fails the engine (health NOT_SERVING, every request an
explicit error) and the leader exits non-zero. A dead leader takes the store with it: each
follower's wait for the next plan raises, and it exits non-zero. Behind both, the
coordination service's own heartbeats: after ``heartbeat_timeout_s`` without them it
terminates every process still running (a non-zero exit, without the explicit errors).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import threading
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from brownout_jax.engine.config import EngineConfig
from brownout_jax.engine.plan_wire import (
    PlanMessage,
    PlanOp,
    buffer_words,
    decode,
    encode,
    first_difference,
    mismatch_message,
)
from brownout_jax.engine.requests import ProcessGroupError
from brownout_jax.engine.step_grid import StepGrid
from brownout_jax.model.config import ModelConfig
from brownout_jax.model.params import ModelParams

_KV_PREFIX = "brownout_jax"  # keys in the coordination service's store


@dataclasses.dataclass(frozen=True, slots=True)
class DistributedConfig:
    coordinator: str | None = None  # HOST:PORT of process 0's coordination service
    num_processes: int = 1
    process_id: int = 0
    local_devices: int | None = None  # CPU devices per process (tests on one machine)
    heartbeat_timeout_s: int = 20  # the coordination service's: it ends every process
    follower_timeout_s: float = 5.0  # the leader's watch of its followers' beats
    step_timeout_s: float = 60.0  # the leader's watch of one step's wait on the devices
    initialization_timeout_s: int = 300

    def __post_init__(self) -> None:
        if self.num_processes < 1:
            raise ValueError(f"--num-processes must be ≥ 1, got {self.num_processes}")
        if not 0 <= self.process_id < self.num_processes:
            raise ValueError(
                f"--process-id must be in [0, {self.num_processes}), got {self.process_id}"
            )
        if self.num_processes > 1 and not self.coordinator:
            raise ValueError("--coordinator HOST:PORT is required with --num-processes > 1")
        if self.local_devices is not None and self.local_devices < 1:
            raise ValueError(f"--local-devices must be ≥ 1, got {self.local_devices}")

    @property
    def enabled(self) -> bool:
        return self.num_processes > 1

    @property
    def is_leader(self) -> bool:
        return self.process_id == 0


def force_cpu_devices(count: int) -> None:
    """XLA reads the host device count once, when its backend starts: set it before that."""
    flags = re.sub(
        r"--xla_force_host_platform_device_count=\S+", "", os.environ.get("XLA_FLAGS", "")
    )
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()
    os.environ["JAX_PLATFORMS"] = "cpu"
    jax.config.update("jax_platforms", "cpu")


def initialize(config: DistributedConfig) -> None:
    """Joins the process group (no-op for one process without ``local_devices``); must run
    before anything touches a JAX backend."""
    if config.local_devices is not None:
        force_cpu_devices(config.local_devices)
    if not config.enabled:
        return
    # CPU collectives across processes; GPU backends use NCCL whatever this says.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # Its SIGTERM handler would swallow the signal (it waits for a sync point nothing here
    # reaches): SIGTERM must stop a process, the leader's own handler drains first.
    jax.config.update("jax_enable_preemption_service", False)
    jax.distributed.initialize(
        coordinator_address=config.coordinator,
        num_processes=config.num_processes,
        process_id=config.process_id,
        initialization_timeout=config.initialization_timeout_s,
        heartbeat_timeout_seconds=config.heartbeat_timeout_s,
        shutdown_timeout_seconds=config.heartbeat_timeout_s,
    )


def _kv_client():
    # The client of the coordination service joined above: jax 0.10.2 exposes it only here
    # (jax.distributed has no public key-value API).
    from jax._src import distributed

    client = distributed.global_state.client
    if client is None:
        raise RuntimeError("jax.distributed is not initialized")
    return client


def check_same_everywhere(description: dict[str, str], timeout_s: float) -> None:
    """Every process's ``description`` equals process 0's, or ``ValueError`` naming the first
    field that differs, on every process: process 0 compares them all and publishes its
    verdict, which each follower waits for (a follower that matches must not go on to
    compile while another is refused)."""
    client = _kv_client()
    me, count = jax.process_index(), jax.process_count()
    client.key_value_set(f"{_KV_PREFIX}/description/{me}", json.dumps(description, sort_keys=True))
    timeout_ms = int(timeout_s * 1000)
    verdict_key = f"{_KV_PREFIX}/description/verdict"
    if me != 0:
        verdict = client.blocking_key_value_get(verdict_key, timeout_ms)
        if verdict:
            raise ValueError(verdict)
        return
    verdict = ""
    for process in range(1, count):
        key = f"{_KV_PREFIX}/description/{process}"
        theirs = json.loads(client.blocking_key_value_get(key, timeout_ms))
        field = first_difference(description, theirs)
        if field is not None:
            verdict = mismatch_message(field, process, description, theirs)
            break
    client.key_value_set(verdict_key, verdict)
    if verdict:
        raise ValueError(verdict)


def describe_engine(
    params: ModelParams, model_config: ModelConfig, config: EngineConfig
) -> dict[str, str]:
    """What must be equal on every process: the model (config, every parameter's shape and
    dtype, and a fingerprint of its first values), the engine config, JAX and the devices."""
    fields = {f"engine.{f.name}": repr(getattr(config, f.name)) for f in dataclasses.fields(config)}
    fields |= {
        f"model.{f.name}": repr(getattr(model_config, f.name))
        for f in dataclasses.fields(model_config)
    }
    leaves = jax.tree_util.tree_leaves_with_path(params)
    digest = hashlib.sha256()
    for path, leaf in leaves:
        digest.update(f"{jax.tree_util.keystr(path)}{leaf.shape}{leaf.dtype}".encode())
        if getattr(leaf, "is_fully_addressable", True):
            head = np.asarray(jnp.ravel(leaf)[:16], np.float32)
            digest.update(head.tobytes())
    fields["params"] = digest.hexdigest()
    fields["jax"] = jax.__version__
    fields["backend"] = jax.default_backend()
    fields["local_devices"] = str(jax.local_device_count())
    return fields


def describe_grid(grid: StepGrid) -> dict[str, str]:
    keys = grid.keys()
    sizes = [grid.layout(key.phase, key.bucket).size for key in keys]
    text = repr([(str(key), size) for key, size in zip(keys, sizes, strict=True)])
    return {"step_grid": hashlib.sha256(text.encode()).hexdigest()}


class PlanChannel:
    """The leader's step plans to every follower, through the coordination service's
    key-value store: plan n under its own key, which each follower awaits in turn.

    Not a device collective: on XLA:CPU a collective enqueued behind the running step waits
    for it (the leader lost its overlap of planning with the device) and, interleaved with
    the steps' own collectives on two cores, was seen to deadlock. The store keeps the plans
    off the devices; the steps' collectives alone keep the processes in lock step, so the
    leader is at most two steps ahead and only the last ``KEEP`` plans are kept.

    Liveness. Each follower bumps its own counter in the store every ``BEAT_S``; the leader
    watches them (``watch``) and reports a follower whose counter stood still for
    ``follower_timeout_s``: dead or stalled, whether the leader was idle or waiting on a step
    (a killed peer does not always fail the step's collectives: seen hanging). Followers
    learn of a dead leader from the store itself, which lived in it."""

    KEEP = 64
    BEAT_S = 0.5

    def __init__(
        self,
        start_timeout_s: float = 300.0,
        follower_timeout_s: float = 5.0,
        step_timeout_s: float = 60.0,
    ):
        """``start_timeout_s``: how long the start-up checks wait for the other processes."""
        self.start_timeout_s = start_timeout_s
        self.step_timeout_s = step_timeout_s
        self.follower_timeout_s = follower_timeout_s
        self.process = jax.process_index()
        self.is_leader = self.process == 0
        self.processes = jax.process_count()
        self._client = _kv_client()
        self.capacity = 0
        self._buffer = np.zeros(buffer_words(0), np.int32)
        self._sent = 0  # plans sent (leader) or received (follower): plan n's key is n
        self._step = 0
        self.on_sent: Callable[[float], None] | None = None
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None

    def open(self, capacity: int) -> None:
        """Plans carry step uploads of up to ``capacity`` words (the grid's longest). Once:
        a process group runs one engine (its keys in the store are not reused)."""
        if self.capacity:
            raise RuntimeError("a process group runs one engine: its channel is open already")
        self.capacity = capacity
        self._buffer = np.zeros(buffer_words(capacity), np.int32)
        if not self.is_leader:
            self._thread = threading.Thread(target=self._beat, name="brownout-beat", daemon=True)
            self._thread.start()

    def stop_watching(self) -> None:
        self._closed.set()

    def release_followers(self) -> None:
        """The leader, on a clean exit only: the followers leave their loop and join the
        group's shutdown. Sent as the leader itself leaves (not when its engine stops: what
        it does after, e.g. an evaluation's report, may outlast the shutdown's timeout)."""
        self._closed.set()
        self.send(PlanOp.SHUTDOWN)

    def wait_for_all(self, name: str) -> None:
        """Every process reaches here before any goes on: e.g. all compiled before the first
        run, whose collectives (gloo) give a late peer only 30 s to join."""
        self._client.wait_at_barrier(f"{_KV_PREFIX}/{name}", int(self.start_timeout_s * 1000))

    @staticmethod
    def _key(n: int) -> str:
        return f"{_KV_PREFIX}/plan/{n}"

    @staticmethod
    def _beat_key(process: int) -> str:
        return f"{_KV_PREFIX}/beat/{process}"

    # ------------------------------------------------------------------ the leader's side

    def send(self, op: PlanOp, key_index: int = -1, words: np.ndarray | None = None) -> None:
        start = time.perf_counter()
        if op == PlanOp.STEP:
            self._step += 1
        payload = np.zeros(0, np.int32) if words is None else words
        message = PlanMessage(op, self._step, key_index, payload)
        self._sent += 1
        plan = encode(message, self.capacity, self._buffer)
        self._client.key_value_set_bytes(self._key(self._sent), plan.tobytes())
        if self._sent > self.KEEP:
            self._client.key_value_delete(self._key(self._sent - self.KEEP))
        if op == PlanOp.STEP and self.on_sent is not None:
            self.on_sent(time.perf_counter() - start)

    def watch(
        self,
        on_lost: Callable[[BaseException], None],
        waiting_for: Callable[[], float | None] = lambda: None,
    ) -> None:
        """Calls ``on_lost`` (from its own thread, once) when a follower stops beating, or when
        the leader has waited ``step_timeout_s`` on the device for one step (``waiting_for``:
        how long so far, None when not waiting): a follower that still beats but hangs in a
        collective holds every process there."""

        def run() -> None:
            seen: dict[int, tuple[str | None, float]] = {}
            while not self._closed.wait(self.BEAT_S):
                waited = waiting_for()
                if waited is not None and waited > self.step_timeout_s:
                    on_lost(
                        ProcessGroupError(
                            f"a step has waited {waited:.0f}s on the devices (a process hangs)"
                        )
                    )
                    return
                now = time.monotonic()
                for process in range(1, self.processes):
                    try:
                        beat = self._client.key_value_try_get(self._beat_key(process))
                    except jax.errors.JaxRuntimeError:  # NOT_FOUND before its first beat
                        beat = None
                    last, since = seen.setdefault(process, (beat, now))
                    if beat != last:
                        seen[process] = (beat, now)
                    elif now - since > self.follower_timeout_s:
                        on_lost(
                            ProcessGroupError(
                                f"process {process} sent no heartbeat for "
                                f"{now - since:.1f}s (dead or stalled)"
                            )
                        )
                        return

        self._thread = threading.Thread(target=run, name="brownout-watch", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ a follower's side

    def _beat(self) -> None:
        beats = 0
        while not self._closed.wait(self.BEAT_S):
            beats += 1
            try:
                self._client.key_value_set(self._beat_key(self.process), str(beats), True)
            except jax.errors.JaxRuntimeError:  # the leader is gone: receive() says so
                return

    def receive(self) -> PlanMessage:
        """The next plan, waiting as long as the leader lives (its death ends the store: the
        wait raises ``JaxRuntimeError`` UNAVAILABLE)."""
        self._sent += 1
        key = self._key(self._sent)
        while True:
            try:
                data = self._client.blocking_key_value_get_bytes(key, 1000)
                break
            except jax.errors.JaxRuntimeError as err:
                if "DEADLINE_EXCEEDED" not in str(err):
                    raise
        message = decode(np.frombuffer(data, np.int32))
        if message.op == PlanOp.SHUTDOWN:
            self._closed.set()
        return message
