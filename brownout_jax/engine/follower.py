"""A follower process of an engine that spans several processes (``distributed``).

It loads the same checkpoint, builds the same ``Executor`` (same step grid, compiled and
warmed up in the same order as the leader's, since each of those runs is a collective), then
runs what the leader's plans say until told to stop. No port, no tokenizer, no scheduler:
everything a step needs is in its plan.
"""

from __future__ import annotations

import jax

from brownout_jax.engine.config import EngineConfig
from brownout_jax.engine.distributed import PlanChannel
from brownout_jax.engine.executor import Executor, ladder_for
from brownout_jax.engine.plan_wire import PlanOp, PlanWireError
from brownout_jax.engine.requests import ProcessGroupError
from brownout_jax.model.config import ModelConfig
from brownout_jax.model.params import ModelParams


class Follower:
    def __init__(self, executor: Executor, channel: PlanChannel):
        self.executor = executor
        self.channel = channel
        self.steps = 0

    def run(self) -> None:
        """Until the leader's SHUTDOWN. A dead leader (or any failed collective) raises
        ``ProcessGroupError`` out of here; a malformed plan ``PlanWireError``."""
        while True:
            try:
                message = self.channel.receive()
            except jax.errors.JaxRuntimeError as err:
                raise ProcessGroupError(
                    f"the leader's plans stopped (process 0 died?): {str(err).splitlines()[0]}"
                ) from err
            except PlanWireError as err:
                raise ProcessGroupError(f"a plan from the leader is malformed: {err}") from err
            if message.op == PlanOp.SHUTDOWN:
                return
            if message.step != self.steps + 1:  # free: a desynchronised follower stops here
                raise ProcessGroupError(
                    f"plan for step {message.step} after step {self.steps}: out of step"
                )
            self.executor.run_received(message.key_index, message.words)
            self.steps += 1


def follow(
    params: ModelParams,
    model_config: ModelConfig,
    config: EngineConfig,
    channel: PlanChannel,
    eos_token_ids: frozenset[int] = frozenset(),
    progress: bool = False,
) -> int:
    """Builds the executor the leader's ``Engine`` builds from the same arguments and follows
    its plans until it stops; returns 0 (the process's exit code)."""
    config = config.for_model(model_config.max_position_embeddings, model_config.head_dim)
    print(
        f"brownout-jax: process {channel.process} of {channel.processes} following process 0 "
        f"on {config.mesh}",
        flush=True,
    )
    executor = Executor(
        params,
        model_config,
        config,
        ladder_for(params, config),
        progress,
        eos_token_ids=eos_token_ids,
        channel=channel,
    )
    follower = Follower(executor, channel)
    try:
        follower.run()
    finally:
        executor.grid.cancel()
    print(f"brownout-jax: process {channel.process} stopped after {follower.steps} steps")
    return 0


def follow_checkpoint(
    model_dir,
    united_dir,
    config: EngineConfig,
    channel: PlanChannel,
    dtype: str = "auto",
    progress: bool = False,
) -> int:
    """``follow`` on the checkpoint, loaded as the leader's ``Engine.from_checkpoint`` does."""
    from brownout_jax.checkpoints import load_model

    model = load_model(model_dir, dtype, progress=progress, united=united_dir, pack_experts=False)
    eos = frozenset(model.eos_token_ids)
    return follow(model.params, model.config, config, channel, eos, progress)
