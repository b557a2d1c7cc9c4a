"""``brownout-jax bench moe-layer | burst | long-prompt | sampling | serve-load | linear |
attention | kernels | cold-start``: the measurement commands behind docs/BENCHMARKS.md (their
code lives in ``brownout_jax.bench``)."""

from __future__ import annotations

import json

from brownout_jax.cli.options import (
    add_brownout_mode_arguments,
    add_engine_arguments,
    check_mesh,
    controller_from_args,
    engine_config_from_args,
    parse_floats,
)
from brownout_jax.moe.expert_backend import CLI_CHOICES


def add_parser(sub) -> None:
    bench = sub.add_parser("bench", help="micro-benchmarks (figures for docs/BENCHMARKS.md)")
    kinds = bench.add_subparsers(dest="bench_kind", required=True)
    p = kinds.add_parser("moe-layer", help="one MoE layer at Qwen1.5-MoE size, brownout on/off")
    p.add_argument("--batches", default="1,8,32,64", help="decode batch sizes")
    p.add_argument("--prefill-tokens", type=int, default=512, help="0 to skip the prefill case")
    p.add_argument("--thresholds", default="0,0.5,1")
    p.add_argument("--way", type=int, default=4)
    p.add_argument("--skew", type=float, default=1.0, help="Zipf exponent of expert popularity")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument(
        "--weight-dtype",
        choices=("bfloat16", "float32"),
        default=None,
        help="default: as --dtype auto (bfloat16; float32 on a CPU without the kernel)",
    )
    p.add_argument(
        "--experts-backends",
        default="auto",
        help="comma list of experts backends to measure side by side, e.g. cpu-kernel,reference",
    )
    p.add_argument("--output", choices=("table", "json"), default="table")
    p.set_defaults(run=_run_moe_layer)
    _add_burst(kinds)
    _add_long_prompt(kinds)
    _add_sampling(kinds)
    p = kinds.add_parser(
        "serve-load",
        help="a running server's decode step and plan-broadcast times under N concurrent "
        "completions",
    )
    p.add_argument("--http", default="http://127.0.0.1:8000", help="the server's HTTP base URL")
    p.add_argument("--grpc", default="127.0.0.1:50051", help="its gRPC HOST:PORT ('' for none)")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--output", choices=("table", "json"), default="table")
    p.set_defaults(run=_run_serve_load)
    p = kinds.add_parser("linear", help="dense matmuls: packed CPU kernel vs XLA's dot")
    p.add_argument("--rows", default="1,8,16,32,64,512", help="row counts m")
    p.add_argument("--preset", default="qwen1.5-moe-a2.7b", help="model whose dense shapes to time")
    p.add_argument("--model", help="a checkpoint directory (its config's shapes)")
    p.add_argument("--shapes", help="explicit k x n list, e.g. 2048x2048,2048x151936")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--output", choices=("table", "json"), default="table")
    p.set_defaults(run=_run_linear)
    p = kinds.add_parser(
        "attention", help="paged decode attention: the kernel vs XLA's window, by context"
    )
    p.add_argument("--preset", default="qwen1.5-moe-a2.7b", help="model whose head dims to use")
    p.add_argument("--model", help="a checkpoint directory (its config's head dims)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--contexts", default="1024,4096,8192", help="tokens attended per row")
    p.add_argument("--chunk", type=int, default=512, help="prefill chunk timed at each context")
    p.add_argument("--no-xla", action="store_true", help="time the kernel only")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--output", choices=("table", "json"), default="table")
    p.set_defaults(run=_run_attention)
    p = kinds.add_parser("kernels", help="Pallas grouped-matmul kernels vs ragged_dot and dense")
    p.add_argument("--rows", default=None, help="rows counts m (default 1,4,16,64,256,4096)")
    p.add_argument("--small", action="store_true", help="tiny shapes (automatic off GPU)")
    p.add_argument("--skew", type=float, default=1.0, help="Zipf exponent of group popularity")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--output", choices=("table", "json"), default="table")
    p.set_defaults(run=_run_kernels)
    p = kinds.add_parser(
        "cold-start", help="serve from a fresh process to its first streamed token, cold/warm"
    )
    p.add_argument("--runs", default="cold,warm", help="cold (empty XLA cache), warm (same)")
    p.add_argument("--cache-dir", help="XLA cache directory (default: a fresh temporary one)")
    p.add_argument(
        "--serve-args", default="", help="extra `serve` flags, e.g. '--model DIR --max-batch 8'"
    )
    p.add_argument("--output", choices=("table", "json"), default="table")
    p.set_defaults(run=_run_cold_start)


def _add_burst(kinds) -> None:
    p = kinds.add_parser("burst", help="N requests at once through the engine: TTFT/TPOT")
    p.add_argument("--model", required=True)
    p.add_argument("--united")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--prompt-len", default="16,128", help="min,max synthetic prompt length")
    p.add_argument("--max-new-tokens", type=int, default=32)
    add_brownout_mode_arguments(p, default="off")
    add_engine_arguments(p)
    p.set_defaults(run=_run_burst)


def _add_long_prompt(kinds) -> None:
    p = kinds.add_parser(
        "long-prompt", help="a long prompt while requests decode: TTFT, their TPOT, memory"
    )
    p.add_argument("--model", required=True)
    p.add_argument("--united")
    p.add_argument("--prompt-len", type=int, default=8000)
    p.add_argument("--decoders", type=int, default=8)
    add_brownout_mode_arguments(p, default="off")
    add_engine_arguments(p)
    p.set_defaults(run=_run_long_prompt)


def _add_sampling(kinds) -> None:
    p = kinds.add_parser(
        "sampling", help="decode TPOT with top logprobs, penalties and a grammar vs plain"
    )
    p.add_argument("--model", required=True)
    p.add_argument("--united")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--tokens", type=int, default=64, help="tokens generated per request")
    p.add_argument("--rounds", type=int, default=3, help="every mode once per round")
    p.add_argument(
        "--modes",
        default="plain,top-logprobs,penalties,json-object",
        help="comma list of plain, top-logprobs, penalties, json-object",
    )
    add_brownout_mode_arguments(p, default="off")
    add_engine_arguments(p)
    p.set_defaults(run=_run_sampling)


def _run_sampling(args) -> int:
    from brownout_jax.bench.sampling import SamplingMode, run_sampling_bench

    modes = tuple(SamplingMode(m) for m in args.modes.split(","))
    engine = _engine_from_args(args)
    try:
        result = run_sampling_bench(engine, args.batch, args.tokens, args.rounds, modes)
    finally:
        engine.shutdown(drain=False)
    print(json.dumps(result, indent=1))
    return 0


def _engine_from_args(args):
    """The engine of a command's --model, --united and engine flags."""
    from brownout_jax.engine.front import Engine

    check_mesh(args.mesh)
    return Engine.from_checkpoint(
        args.model,
        args.united,
        engine_config_from_args(args, controller=controller_from_args(args)),
        args.dtype,
    )


def _run_long_prompt(args) -> int:
    from brownout_jax.bench.long_prompt import run_long_prompt

    engine = _engine_from_args(args)
    try:
        result = run_long_prompt(engine, args.prompt_len, args.decoders)
    finally:
        engine.shutdown(drain=False)
    print(json.dumps(result, indent=1))
    return 0


def _run_burst(args) -> int:
    from brownout_jax.bench.burst import run_burst

    low, high = (int(v) for v in args.prompt_len.split(","))
    engine = _engine_from_args(args)
    try:
        result = run_burst(engine, args.requests, (low, high), args.max_new_tokens)
    finally:
        engine.shutdown(drain=False)
    print(json.dumps(result, indent=1))
    return 0


def _run_linear(args) -> int:
    from brownout_jax.bench.linear import format_table, model_dense_shapes, run_linear_bench
    from brownout_jax.model.config import PRESETS, ModelConfig

    if args.shapes:
        shapes = tuple(tuple(int(v) for v in s.split("x")) for s in args.shapes.split(","))
    elif args.model:
        shapes = model_dense_shapes(ModelConfig.from_pretrained_dir(args.model))
    else:
        if args.preset not in PRESETS:
            raise ValueError(f"--preset: {args.preset!r}; choose from {', '.join(PRESETS)}")
        shapes = model_dense_shapes(PRESETS[args.preset])
    rows = tuple(int(r) for r in args.rows.split(","))
    result = run_linear_bench(shapes, rows, args.repeats)
    print(json.dumps(result, indent=1) if args.output == "json" else format_table(result))
    return 0


def _run_attention(args) -> int:
    from brownout_jax.bench.attention import format_table, run_attention_bench
    from brownout_jax.model.config import PRESETS, ModelConfig

    if args.model:
        config = ModelConfig.from_pretrained_dir(args.model)
    elif args.preset in PRESETS:
        config = PRESETS[args.preset]
    else:
        raise ValueError(f"--preset: {args.preset!r}; choose from {', '.join(PRESETS)}")
    contexts = tuple(int(v) for v in args.contexts.split(","))
    result = run_attention_bench(
        config, args.batch, contexts, args.chunk, args.repeats, xla=not args.no_xla
    )
    print(json.dumps(result, indent=1) if args.output == "json" else format_table(result))
    return 0


def _run_kernels(args) -> int:
    from brownout_jax.bench.kernels import format_table, run_kernel_bench

    result = run_kernel_bench(
        small=True if args.small else None,
        rows=tuple(int(r) for r in args.rows.split(",")) if args.rows else None,
        repeats=args.repeats,
        skew=args.skew,
    )
    print(json.dumps(result) if args.output == "json" else format_table(result))
    return 0


def _experts_backends(text: str) -> tuple:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in CLI_CHOICES]
    if unknown or not names:
        choices = ", ".join(CLI_CHOICES)
        raise ValueError(f"--experts-backends: {unknown or text!r}; choose from {choices}")
    return tuple(CLI_CHOICES[name] for name in names)


def _run_serve_load(args) -> int:
    from brownout_jax.bench.serve_load import format_load, run_load

    result = run_load(args.http, args.grpc or None, args.concurrency, args.max_tokens)
    print(json.dumps(result, indent=1) if args.output == "json" else format_load(result))
    return 0


def _run_moe_layer(args) -> int:
    from brownout_jax.bench.moe_layer import format_table, run_moe_layer_bench

    result = run_moe_layer_bench(
        batches=tuple(int(b) for b in args.batches.split(",")),
        prefill_tokens=args.prefill_tokens,
        thresholds=parse_floats(args.thresholds),
        way=args.way,
        skew=args.skew,
        repeats=args.repeats,
        weight_dtype=args.weight_dtype,
        backends=_experts_backends(args.experts_backends),
    )
    print(json.dumps(result) if args.output == "json" else format_table(result))
    return 0


def _run_cold_start(args) -> int:
    import shlex

    from brownout_jax.bench.cold_start import format_table, run_cold_start

    runs = tuple(r.strip() for r in args.runs.split(",") if r.strip())
    if not runs or set(runs) - {"cold", "warm"}:
        raise ValueError(f"--runs: cold and/or warm, got {args.runs!r}")
    result = run_cold_start(runs, args.cache_dir, tuple(shlex.split(args.serve_args)))
    print(json.dumps(result, indent=1) if args.output == "json" else format_table(result))
    return 0
