"""``--coordinator / --num-processes / --process-id / --local-devices``: one engine over
several processes (``engine.distributed``), shared by the commands that build an engine.
No JAX at import; ``join_processes`` must run before anything touches a JAX backend.
"""

from __future__ import annotations

import os
import sys


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
        "--peer-timeout",
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
        peer_timeout_s=args.peer_timeout,
    )
    initialize(config)
    if config.enabled and args.mesh is None:
        import jax

        from brownout_jax.moe.mesh_config import MeshConfig

        args.mesh = MeshConfig(expert=jax.device_count())
    return config


def leave_processes(config, code: int) -> int:
    """Ends this process's part: a clean exit leaves the group together (the coordination
    service's shutdown barrier); a failed one exits at once, non-zero, since its peers may be
    gone and the barrier would only wait for them."""
    if not config.enabled:
        return code
    if code == 0:
        import jax

        jax.distributed.shutdown()
        return 0
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
