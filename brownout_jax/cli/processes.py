"""``--coordinator / --num-processes / --process-id / --local-devices``: one engine over
several processes (``engine.distributed``), shared by the commands that build an engine.
No JAX at import; ``join_processes`` must run before anything touches a JAX backend.
"""

from __future__ import annotations

import os
import sys
import traceback


def add_process_arguments(p) -> None:
    group = p.add_argument_group(
        "processes",
        "serve one model from several processes (hosts): process 0 leads (fronts, scheduler), "
        "the others run its steps on their devices; start every process with the same flags "
        "but --process-id",
    )
    group.add_argument("--coordinator", help="HOST:PORT of process 0 (jax.distributed)")
    group.add_argument("--num-processes", type=int, default=1)
    group.add_argument("--process-id", type=int, default=0)
    group.add_argument(
        "--local-devices",
        type=int,
        help="CPU devices of this process (forces the CPU platform: several processes on one "
        "machine for testing)",
    )
    group.add_argument(
        "--heartbeat-timeout",
        type=int,
        default=20,
        help="seconds without a heartbeat after which JAX's coordination service ends every "
        "process",
    )
    group.add_argument(
        "--step-timeout",
        type=float,
        default=60.0,
        help="seconds one step may wait on the devices before the leader takes a process for "
        "hung, fails its requests and exits",
    )
    group.add_argument(
        "--follower-timeout",
        type=float,
        default=5.0,
        help="seconds without a follower's heartbeat after which the leader fails its requests "
        "and exits",
    )


def join_processes(args):
    """The flags' ``DistributedConfig``, the process group joined; with several processes
    and no ``--mesh``, the expert mesh spans every process's devices."""
    from brownout_jax.engine.distributed import DistributedConfig, initialize

    config = DistributedConfig(
        coordinator=args.coordinator,
        num_processes=args.num_processes,
        process_id=args.process_id,
        local_devices=args.local_devices,
        heartbeat_timeout_s=args.heartbeat_timeout,
        follower_timeout_s=args.follower_timeout,
        step_timeout_s=args.step_timeout,
    )
    initialize(config)
    if config.enabled and args.mesh is None:
        import jax

        from brownout_jax.moe.mesh_config import MeshConfig

        args.mesh = MeshConfig(expert=jax.device_count())
    return config


def leave_processes(config, code: int, channel=None) -> int:
    """Ends this process's part: a clean exit releases the followers (the leader) and leaves
    the group together (the coordination service's shutdown barrier); a failed one exits at
    once, non-zero, since its peers may be gone and the barrier would only wait for them."""
    if not config.enabled:
        return code
    if code == 0:
        import jax

        try:
            if channel is not None and channel.is_leader:
                channel.release_followers()
            jax.distributed.shutdown()
            return 0
        except Exception as err:  # a peer gone before the barrier: nothing left to wait for
            print(f"brownout-jax: leaving the process group failed: {err}", file=sys.stderr)
            code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_in_processes(args, command: str, body) -> int:
    """``body(channel)`` run as this process's part: ``channel`` None in one
    process (nothing else changes), else the plan channel of the group joined here. Across
    processes a failure is reported here and the process leaves at once (``leave_processes``):
    a lost peer (``ProcessGroupError``) exits 1, a refused configuration (``ValueError``) 2."""
    from brownout_jax.engine.requests import ProcessGroupError

    processes = join_processes(args)
    if not processes.enabled:
        return body(None)
    channel = None
    try:
        from brownout_jax.engine.distributed import PlanChannel

        channel = PlanChannel(
            processes.initialization_timeout_s,
            processes.follower_timeout_s,
            processes.step_timeout_s,
        )
        code = body(channel)
    except (ProcessGroupError, ValueError) as err:
        print(f"brownout-jax {command}: process {processes.process_id}: {err}", file=sys.stderr)
        code = 1 if isinstance(err, ProcessGroupError) else 2
    except BaseException:
        # Peers may be gone: report here and leave at once rather than wait on them.
        traceback.print_exc()
        code = 1
    return leave_processes(processes, code, channel)
