"""``brownout-jax serve``: one engine behind the gRPC and the OpenAI-compatible HTTP fronts."""

from __future__ import annotations

import dataclasses

from brownout_jax.cli.options import (
    add_brownout_mode_arguments,
    add_engine_arguments,
    check_mesh,
    controller_from_args,
    engine_config_from_args,
)
from brownout_jax.cli.processes import add_process_arguments, run_in_processes
from brownout_jax.united.exemption import add_exempt_arguments, resolve_exempt_layers


def add_parser(sub) -> None:
    p = sub.add_parser(
        "serve", help="serve a model over gRPC (brownout.v1) and an OpenAI-compatible HTTP API"
    )
    p.add_argument("--model", help="checkpoint directory (default: the bundled demo model)")
    p.add_argument("--united", help="united experts (default with the demo: its way-4 set)")
    p.add_argument("--host", default="127.0.0.1", help="address both fronts bind")
    p.add_argument("--port", type=int, default=50051, help="gRPC port; 0 = an ephemeral port")
    from brownout_jax.serve.cli_serve import add_http_arguments  # no JAX, no web stack

    add_http_arguments(p)
    add_brownout_mode_arguments(p)
    p.add_argument(
        "--max-queue", type=int, default=1024, help="waiting requests before RESOURCE_EXHAUSTED"
    )
    p.add_argument("--metrics-port", type=int, help="Prometheus metrics on this HTTP port")
    p.add_argument("--grace", type=float, default=30.0, help="drain seconds on SIGTERM")
    add_engine_arguments(p)
    add_exempt_arguments(p.add_argument_group("brownout"))
    add_process_arguments(p)
    p.set_defaults(run=run)


def run(args) -> int:
    from brownout_jax.serve.cli_serve import server_config_from_args

    server_config_from_args(args)  # flag errors before the model loads (and JAX starts)
    return run_in_processes(args, "serve", lambda channel: _serve(args, channel))


def _serve(args, channel) -> int:
    from brownout_jax.checkpoints.demo_model import default_model
    from brownout_jax.checkpoints.united_store import read_united_manifest
    from brownout_jax.engine.front import Engine
    from brownout_jax.model.config import ModelConfig
    from brownout_jax.serve.cli_serve import server_config_from_args
    from brownout_jax.serve.server import serve

    check_mesh(args.mesh)
    model, united = default_model(args.model, args.united)
    manifest = None if united is None else read_united_manifest(united)
    # Serve once the minimal step set is compiled; the rest compiles in the background (in
    # one process: across processes a step must be usable on all at once).
    config = engine_config_from_args(
        args,
        controller=controller_from_args(args, manifest),
        max_queue=args.max_queue,
        exempt_layers=_served_exempt_layers(args, model, united, manifest),
        compile_in_background=channel is None,
    )
    if channel is not None and not channel.is_leader:
        from brownout_jax.engine.follower import follow_checkpoint

        return follow_checkpoint(model, united, config, channel, args.dtype)
    # The context limit the engine will settle on (its config.json alone): both fronts bound
    # requests by it from the start, while the engine still warms up.
    positions = ModelConfig.from_pretrained_dir(model).max_position_embeddings
    server_config = server_config_from_args(args, config.for_model(positions).max_model_len)
    if channel is not None:  # a follower lost is the end of this engine: exit, non-zero
        server_config = dataclasses.replace(server_config, exit_when_engine_dies=True)

    def make_engine():
        return Engine.from_checkpoint(
            model, united, config, args.dtype, progress=False, channel=channel
        )

    return serve(make_engine, server_config)


def _served_exempt_layers(
    args, model_dir: str, united: str | None, manifest: dict | None
) -> tuple[int, ...]:
    """``--exempt-layers`` / ``--exempt-edge-layers`` resolved before the engine compiles."""
    from brownout_jax.model.config import ModelConfig

    moe_layers = ModelConfig.from_pretrained_dir(model_dir).moe_layers
    return resolve_exempt_layers(
        args.exempt_layers, args.exempt_edge_layers, moe_layers, manifest, united
    )
