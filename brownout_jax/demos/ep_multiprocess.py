"""Expert parallelism across processes: one ``expert`` mesh spanning every process's devices.

Each process calls ``jax.distributed.initialize`` (coordinator on process 0), so
``jax.devices()`` lists all processes' devices and :func:`expert_parallel.make_mesh` builds one
mesh over them; CPU collectives go through gloo (``jax_cpu_collectives_implementation``), GPU
ones through NCCL. Every process runs the same program on the same inputs (multi-controller
SPMD): a tiny random model with united experts, 6 experts on 4 devices (so padding is used),
logits at thresholds 0, 0.5, 1 and a few greedy tokens. Process 0 writes them to ``--out``.

Two processes with two CPU devices each, on loopback::

    python -m brownout_jax.demos.ep_multiprocess --coordinator 127.0.0.1:12355 \\
        --num-processes 2 --process-id 0 --local-devices 2 --out ep.npz &
    python -m brownout_jax.demos.ep_multiprocess --coordinator 127.0.0.1:12355 \\
        --num-processes 2 --process-id 1 --local-devices 2

One process with four devices gives the same arrays (``--local-devices 4``, no coordinator);
``--no-mesh`` runs the single-device model. ``--platform gpu`` uses each process's visible GPUs
(NCCL) instead.
"""

from __future__ import annotations

import argparse

THRESHOLDS = (0.0, 0.5, 1.0)
NEW_TOKENS = 5


def demo_model():
    """A tiny random model with way-2 united experts (members' averages): deterministic, so
    every process builds the same weights without exchanging them."""
    import jax
    import jax.numpy as jnp

    from brownout_jax.model.config import PRESETS
    from brownout_jax.model.params import init_random_params
    from brownout_jax.united.united import (
        UnitedExperts,
        UnitedLayer,
        attach_united,
        average_init,
        contiguous_groups,
    )

    config = PRESETS["tiny"].replace(
        vocab_size=64,
        num_layers=2,
        num_experts=6,
        num_experts_per_tok=2,
        max_position_embeddings=64,
    )
    params = init_random_params(config, jax.random.key(0), scale=0.3)
    group = contiguous_groups(config.num_experts, 2)
    united = UnitedExperts(
        tuple(
            UnitedLayer(average_init(params.layers[i].mlp.experts, group), jnp.asarray(group))
            for i in config.moe_layers
        )
    )
    return config, attach_united(params, config, united)


def run_demo(mesh) -> dict:
    """Logits per threshold and greedy tokens; ``mesh`` None → the single-device model."""
    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np

    from brownout_jax.model.transformer import forward_logits
    from brownout_jax.moe.expert_parallel import replicate, shard_params
    from brownout_jax.moe.options import MoeOptions

    config, params = demo_model()
    rng = np.random.default_rng(7)
    tokens = rng.integers(0, config.vocab_size, (3, 16)).astype(np.int32)
    lengths = np.asarray([9, 5, 3], np.int32)
    if mesh is not None:
        params = shard_params(params, config, mesh)

    def on_mesh(x):
        return replicate(jnp.asarray(x), mesh) if mesh is not None else jnp.asarray(x)

    def fetch(x):
        # Replicated over the mesh: this process's own copy is the whole value.
        return np.asarray(x.addressable_data(0))

    @functools.partial(jax.jit, static_argnames="options")
    def next_tokens(params, tokens, lengths, options):
        logits = forward_logits(params, config, tokens, lengths, options)
        last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
        return logits, jnp.argmax(last, axis=-1).astype(jnp.int32)

    out = {}
    for threshold in THRESHOLDS:
        options = MoeOptions(threshold=threshold, mesh=mesh)
        logits, _ = next_tokens(params, on_mesh(tokens), on_mesh(lengths), options)
        out[f"logits_{threshold}"] = fetch(logits)
    # Greedy continuation at threshold 0.5, the buffer's shape fixed: one compilation.
    options = MoeOptions(threshold=0.5, mesh=mesh)
    buffer, length = tokens.copy(), lengths.copy()
    for _ in range(NEW_TOKENS):
        _, chosen = next_tokens(params, on_mesh(buffer), on_mesh(length), options)
        buffer[np.arange(len(length)), length] = fetch(chosen)
        length = length + 1
    out["greedy"] = buffer
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--coordinator", help="HOST:PORT of process 0 (multi-process runs)")
    parser.add_argument("--num-processes", type=int, default=1)
    parser.add_argument("--process-id", type=int, default=0)
    parser.add_argument("--platform", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument(
        "--local-devices", type=int, default=2, help="CPU devices per process (cpu only)"
    )
    parser.add_argument("--timeout", type=int, default=60, help="seconds to wait for peers")
    parser.add_argument("--no-mesh", action="store_true", help="the single-device model")
    parser.add_argument("--out", help="write the results (.npz) here (process 0)")
    args = parser.parse_args(argv)
    if args.platform == "cpu":
        from brownout_jax.engine.distributed import force_cpu_devices

        force_cpu_devices(args.local_devices)

    import jax
    import numpy as np

    from brownout_jax.moe.expert_parallel import make_mesh
    from brownout_jax.moe.mesh_config import MeshConfig

    if args.platform == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if args.num_processes > 1:
        if not args.coordinator:
            raise SystemExit("--coordinator HOST:PORT is required with --num-processes > 1")
        jax.distributed.initialize(
            coordinator_address=args.coordinator,
            num_processes=args.num_processes,
            process_id=args.process_id,
            initialization_timeout=args.timeout,
        )
    mesh = None
    if not args.no_mesh:
        mesh = make_mesh(MeshConfig(expert=len(jax.devices())))
    result = run_demo(mesh)
    print(
        f"process {jax.process_index()}/{jax.process_count()}: "
        f"{jax.local_device_count()} local of {jax.device_count()} devices, "
        f"mesh {dict(mesh.shape) if mesh is not None else None}, "
        f"greedy {result['greedy'].tolist()}",
        flush=True,
    )
    if args.out and jax.process_index() == 0:
        np.savez(args.out, **result)
    if args.num_processes > 1:
        jax.distributed.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
