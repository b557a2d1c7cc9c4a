"""What several commands share: model, engine and brownout flags, the one flags →
EngineConfig builder (``serve``, ``bench burst``, ``eval throughput|slo``), and small parsers.
No JAX at import: building the parser stays cheap.
"""

from __future__ import annotations

import argparse
import sys

from brownout_jax.moe.expert_backend import add_experts_backend_argument, experts_backend_from_args
from brownout_jax.moe.mesh_config import add_mesh_argument
from brownout_jax.united.exemption import add_exempt_arguments, resolve_exempt_layers


def parse_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"comma-separated integers expected: {err}") from err


def parse_floats(text: str) -> tuple[float, ...]:
    return tuple(float(t) for t in text.split(",") if t.strip())


def check_mesh(mesh) -> None:
    """Fails fast, before a model is loaded, when ``--mesh`` does not match JAX's devices."""
    if mesh is None:
        return
    from brownout_jax.moe.expert_parallel import make_mesh

    try:
        make_mesh(mesh)
    except ValueError as err:
        raise ValueError(f"--mesh: {err}") from None


def add_brownout_arguments(p) -> None:
    group = p.add_argument_group("brownout")
    group.add_argument("--united", help="united experts directory (`brownout-jax unite` output)")
    group.add_argument(
        "--threshold",
        type=float,
        default=1.0,
        help="brownout threshold for prefill and decode (1 = exact model, 0 = all united)",
    )
    group.add_argument("--prefill-threshold", type=float, help="overrides --threshold in prefill")
    group.add_argument("--decode-threshold", type=float, help="overrides --threshold in decode")
    group.add_argument(
        "--ladder", default=None, help="threshold levels, e.g. 0,0.5,1 (default 0, 0.1, …, 1)"
    )
    add_exempt_arguments(group)


def brownout_options(args, config, united_manifest: dict | None = None) -> tuple:
    """(prefill MoeOptions, decode MoeOptions) from the CLI flags; off-ladder values snap down
    to a level, and say so."""
    from brownout_jax.moe.ladder import DEFAULT_LADDER, ThresholdLadder
    from brownout_jax.moe.options import MoeOptions

    ladder = ThresholdLadder.parse(args.ladder) if args.ladder else DEFAULT_LADDER
    chosen = {}
    for phase, value in (("prefill", args.prefill_threshold), ("decode", args.decode_threshold)):
        wanted = args.threshold if value is None else value
        level = ladder.snap(wanted)
        if abs(level - wanted) > 1e-9:
            print(
                f"brownout: {phase} threshold {wanted:g} is not on the ladder; using {level:g}",
                file=sys.stderr,
            )
        chosen[phase] = level
    if min(chosen.values()) < 1.0 and args.united is None:
        raise ValueError("--threshold below 1 needs united experts: pass --united DIR")
    exempt = resolve_exempt_layers(
        args.exempt_layers,
        args.exempt_edge_layers,
        config.moe_layers,
        united_manifest,
        args.united,
    )
    backend = experts_backend_from_args(args)
    return tuple(
        MoeOptions(threshold=chosen[p], exempt_layers=exempt, backend=backend) for p in chosen
    )


def add_brownout_mode_arguments(p, default: str = "auto") -> None:
    """The controller flags of a running engine: ``--brownout`` mode and the two SLOs."""
    p.add_argument(
        "--brownout",
        default=default,
        help="auto (predictive: per step, of the levels predicted to fit the SLOs the one "
        "giving up least quality), "
        "reactive (BrownoutServe's periodic P90 rule), off or fixed=X",
    )
    p.add_argument(
        "--slo-ttft", type=float, default=1.0, help="prefill step SLO (dispatch to tokens), s"
    )
    p.add_argument(
        "--slo-tpot",
        type=float,
        default=0.2,
        help="decode step SLO (the gap a sequence sees between two tokens), s",
    )
    add_slo_margin_argument(p)


def add_slo_margin_argument(p) -> None:
    p.add_argument(
        "--slo-margin",
        type=float,
        default=0.9,
        help="auto: a step must be predicted within this share of its SLO (raising a level "
        "needs 0.75 of it, or this margin if lower)",
    )
    p.add_argument(
        "--no-prefill-pacing",
        dest="prefill_pacing",
        action="store_false",
        help="auto: let a prefill step take as many prompts as fit, even when the decode step "
        "after it then misses its SLO (default: paced)",
    )


def predictive_from_args(args):
    """The predictive policy's settings of ``--slo-margin`` and ``--no-prefill-pacing``."""
    from brownout_jax.engine.predictive import PredictiveConfig

    margin = args.slo_margin
    return PredictiveConfig(
        margin=margin,
        raise_margin=min(PredictiveConfig().raise_margin, margin),
        pace_prefill=args.prefill_pacing,
    )


def controller_from_args(args, united_manifest: dict | None = None):
    """``--brownout`` and the SLOs; the quality costs stored with the served united experts."""
    from brownout_jax.engine.controller import ControllerConfig
    from brownout_jax.engine.quality_costs import QualityCosts

    return ControllerConfig.parse_mode(
        args.brownout,
        slo_ttft_s=args.slo_ttft,
        slo_tpot_s=args.slo_tpot,
        predictive=predictive_from_args(args),
        quality=QualityCosts.from_manifest(united_manifest),
    )


def add_engine_arguments(
    p,
    *,
    max_batch: int = 16,
    kv_blocks: int | None = 512,
    max_model_len: int | None = None,
    ladder: str | None = "0,0.5,0.75,1",
    dtype: bool = True,
) -> None:
    """The engine's flags, with a command's own defaults. ``kv_blocks`` None: enough blocks
    for every slot at the full context (needs ``max_model_len``); ``ladder`` None: no
    ``--ladder`` (the command chooses the levels); ``dtype`` False: the command has its own
    ``--dtype``."""
    group = p.add_argument_group("engine")
    group.add_argument("--max-batch", type=int, default=max_batch, help="decode slots")
    group.add_argument("--max-prefill-batch", type=int, default=4)
    blocks_help = "KV blocks in the pool" + (
        "" if kv_blocks else " (default: every slot at --max-model-len)"
    )
    group.add_argument("--kv-blocks", type=int, default=kv_blocks, help=blocks_help)
    group.add_argument("--block-size", type=int, default=16)
    group.add_argument(
        "--latency-samples",
        type=int,
        default=3,
        help="timed runs of each step compiled before serving: the predictive controller's "
        "latency table (0: learned while serving)",
    )
    group.add_argument(
        "--max-model-len",
        type=int,
        default=max_model_len,
        help="prompt + generated tokens per request (default: the model's "
        "max_position_embeddings, capped by what the KV pool holds)",
    )
    if dtype:
        group.add_argument("--dtype", default="auto")
    if ladder is not None:
        group.add_argument(
            "--ladder",
            default=ladder,
            help="brownout levels compiled before serving (each adds a full set of steps; "
            "the controller's moves snap to them)",
        )
    group.add_argument(
        "--allow-context-extrapolation",
        action="store_true",
        help="let --max-model-len exceed the model's max_position_embeddings: positions past "
        "it were never trained and RoPE extrapolates (quality not guaranteed)",
    )
    group.add_argument(
        "--bucket-growth",
        type=int,
        default=None,
        help="ratio between shape buckets (default: 4 on CPU, whose executables are costly "
        "to keep, else 2)",
    )
    group.add_argument(
        "--prefill-chunk",
        type=int,
        default=512,
        help="with the attention kernel, prompts longer than this many tokens are prefilled "
        "in chunks (memory bounded by the chunk; decode steps run between chunks)",
    )
    group.add_argument(
        "--attention",
        choices=("auto", "kernel", "xla"),
        default="auto",
        help="kernel: the paged-attention kernel reads each row's KV in place up to its "
        "length (CPU); xla: gather each row's window of blocks; auto: the kernel where it "
        "runs",
    )
    group.add_argument(
        "--no-structured-output",
        dest="structured_output",
        action="store_false",
        help="leave the per-row token mask out of every step's upload (ceil(vocab/32) words a "
        "row) and refuse response_format / guided_* requests",
    )
    add_mesh_argument(group)
    add_experts_backend_argument(group)


def engine_config_from_args(args, **fields):
    """The EngineConfig of the flags ``add_engine_arguments`` added; ``fields`` (e.g. the
    controller, exempt layers, a ladder) override."""
    import jax

    from brownout_jax.engine.attention_path import AttentionPath
    from brownout_jax.engine.config import EngineConfig, default_bucket_growth
    from brownout_jax.moe.ladder import ThresholdLadder

    num_blocks = args.kv_blocks
    if num_blocks is None:
        if args.max_model_len is None:
            raise ValueError("--kv-blocks is needed when --max-model-len is not given")
        num_blocks = 1 + args.max_batch * -(-args.max_model_len // args.block_size)
    ladder = fields.pop("ladder", None) or ThresholdLadder.parse(args.ladder)
    values = dict(
        ladder=ladder,
        bucket_growth=args.bucket_growth or default_bucket_growth(jax.default_backend()),
        max_batch=args.max_batch,
        max_prefill_batch=min(args.max_prefill_batch, args.max_batch),
        block_size=args.block_size,
        num_blocks=num_blocks,
        max_model_len=args.max_model_len,
        allow_context_extrapolation=args.allow_context_extrapolation,
        mesh=args.mesh,
        experts_backend=experts_backend_from_args(args),
        latency_samples=args.latency_samples,
        prefill_chunk=args.prefill_chunk,
        attention=AttentionPath(args.attention),
        structured_output=args.structured_output,
    )
    values.update(fields)
    return EngineConfig(**values)
