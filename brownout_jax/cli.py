"""``brownout-jax`` command line: generate, convert, unite, bench."""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import sys
import time
from pathlib import Path

from brownout_jax.moe.exemption import add_exempt_arguments, resolve_exempt_layers
from brownout_jax.moe.expert_backend import (
    CLI_CHOICES,
    add_experts_backend_argument,
    experts_backend_from_args,
)
from brownout_jax.moe.mesh_config import add_mesh_argument  # no JAX: the parsers stay cheap


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"comma-separated integers expected: {err}") from err


def _add_generate(sub) -> None:
    p = sub.add_parser(
        "generate", help="generate text offline from a checkpoint, or from a running server"
    )
    p.add_argument(
        "--model", help="HF checkpoint or `brownout-jax convert` output (default: the demo model)"
    )
    p.add_argument("--server", help="HOST:PORT of a running `brownout-jax serve`: stream from it")
    p.add_argument(
        "--api-key", help="the server's API key, for --server (default: $BROWNOUT_JAX_API_KEY)"
    )
    p.add_argument("text", nargs="?", help="prompt text (same as --prompt)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="prompt text (needs the checkpoint's tokenizer)")
    src.add_argument("--prompt-ids", type=_parse_ids, help="prompt token ids, e.g. 1,2,3")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument(
        "--chat", action="store_true", help="wrap --prompt in the tokenizer's chat template"
    )
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at the EOS token")
    p.add_argument(
        "--dtype",
        default="auto",
        help="auto (bf16; fp32 on a CPU without the compiled kernel), float32, bfloat16",
    )
    p.add_argument(
        "--warmup", action="store_true", help="run once first so timings exclude compilation"
    )
    _add_brownout_options(p)
    add_mesh_argument(p)
    add_experts_backend_argument(p)
    p.add_argument("--output", choices=("text", "json"), default="text")
    p.set_defaults(run=_run_generate)


def _add_brownout_options(p) -> None:
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


def _add_convert(sub) -> None:
    p = sub.add_parser("convert", help="convert a HF safetensors checkpoint to orbax")
    p.add_argument("--hf", required=True, help="HF checkpoint directory (safetensors)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--dtype", default="bfloat16", help="float32 or bfloat16 (default)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(run=_run_convert)


def _add_unite(sub) -> None:
    p = sub.add_parser("unite", help="build united experts for brownout (distillation)")
    p.add_argument("--model", required=True)
    p.add_argument("--way", type=int, default=4, help="experts per united expert (2, 4, 8, …)")
    p.add_argument("--grouping", choices=("contiguous", "similarity"), default="contiguous")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--calib", help="calibration text: plain, JSONL (text), Alpaca/ShareGPT JSON")
    src.add_argument("--calib-random-tokens", type=int, help="N random tokens instead of text")
    p.add_argument("--calib-tokens", type=int, default=16384, help="cap on calibration tokens")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--max-steps", type=int, default=400, help="distillation steps per layer")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(run=_run_unite)


def _run_unite(args) -> int:
    from brownout_jax.checkpoints import load_model
    from brownout_jax.checkpoints.united_store import save_united
    from brownout_jax.moe.calibration import (
        load_calibration_texts,
        random_token_sequences,
        tokenize_texts,
    )
    from brownout_jax.moe.distill import DistillConfig, build_united_experts

    model = load_model(args.model, args.dtype)
    if args.calib is not None:
        if model.tokenizer is None:
            raise ValueError(f"--calib: {args.model} has no tokenizer; use --calib-random-tokens")
        texts = load_calibration_texts(args.calib)
        sequences = tokenize_texts(texts, model.tokenizer, args.seq_len, args.calib_tokens)
        calibration = {"file": str(args.calib), "texts": len(texts)}
    else:
        n = args.calib_random_tokens
        if n is None or n < 64:
            raise ValueError("--calib-random-tokens must be at least 64")
        sequences = random_token_sequences(n, model.config.vocab_size, args.seq_len, args.seed)
        calibration = {"random_tokens": n, "seed": args.seed}
    calibration["tokens"] = sum(len(s) for s in sequences)
    start = time.perf_counter()
    cfg = DistillConfig(learning_rate=args.lr, max_steps=args.max_steps, seed=args.seed)
    united, reports = build_united_experts(
        model.params, model.config, sequences, args.way, args.grouping, cfg
    )
    out = save_united(
        united,
        args.out,
        way=args.way,
        grouping=args.grouping,
        source_fingerprint=model.fingerprint,
        moe_layers=model.config.moe_layers,
        reports=reports,
        calibration=calibration,
        overwrite=args.overwrite,
    )
    print(
        f"united experts (way {args.way}, {args.grouping}) → {out} "
        f"in {time.perf_counter() - start:.1f}s on {calibration['tokens']} calibration tokens"
    )
    print("layer  groups  mean MSE (average init)  mean MSE (distilled)")
    for layer in model.config.moe_layers:
        rows = [r for r in reports if r.layer == layer]
        init = sum(r.init_mse for r in rows) / len(rows)
        final = sum(r.final_mse for r in rows) / len(rows)
        print(f"{layer:5d}  {len(rows):6d}  {init:23.4g}  {final:20.4g}")
    return 0


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(t) for t in text.split(",") if t.strip())


def _add_bench(sub) -> None:
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
    p.set_defaults(run=_run_bench_moe_layer)
    _add_bench_burst(kinds)
    p = kinds.add_parser("kernels", help="Pallas grouped-matmul kernels vs ragged_dot and dense")
    p.add_argument("--rows", default=None, help="rows counts m (default 1,4,16,64,256,4096)")
    p.add_argument("--small", action="store_true", help="tiny shapes (automatic off GPU)")
    p.add_argument("--skew", type=float, default=1.0, help="Zipf exponent of group popularity")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--output", choices=("table", "json"), default="table")
    p.set_defaults(run=_run_bench_kernels)


def _run_bench_kernels(args) -> int:
    from brownout_jax.bench.kernels import format_table, run_kernel_bench

    result = run_kernel_bench(
        small=True if args.small else None,
        rows=tuple(int(r) for r in args.rows.split(",")) if args.rows else None,
        repeats=args.repeats,
        skew=args.skew,
    )
    print(json.dumps(result) if args.output == "json" else format_table(result))
    return 0


def _add_serve(sub) -> None:
    p = sub.add_parser(
        "serve", help="serve a model over gRPC (brownout.v1) and an OpenAI-compatible HTTP API"
    )
    p.add_argument("--model", help="checkpoint directory (default: the bundled demo model)")
    p.add_argument("--united", help="united experts (default with the demo: its way-4 set)")
    p.add_argument("--host", default="127.0.0.1", help="address both fronts bind")
    p.add_argument("--port", type=int, default=50051, help="gRPC port; 0 = an ephemeral port")
    from brownout_jax.serve.cli_serve import add_http_arguments  # no JAX, no web stack

    add_http_arguments(p)
    p.add_argument("--brownout", default="auto", help="auto, off or fixed=X")
    p.add_argument("--slo-ttft", type=float, default=1.0, help="prefill step SLO, seconds")
    p.add_argument("--slo-tpot", type=float, default=0.2, help="decode step SLO, seconds")
    p.add_argument(
        "--max-queue", type=int, default=1024, help="waiting requests before RESOURCE_EXHAUSTED"
    )
    p.add_argument("--metrics-port", type=int, help="Prometheus metrics on this HTTP port")
    p.add_argument("--grace", type=float, default=30.0, help="drain seconds on SIGTERM")
    _add_engine_options(p)
    add_exempt_arguments(p.add_argument_group("brownout"))
    p.set_defaults(run=_run_serve)


def _run_serve(args) -> int:
    from brownout_jax.engine.front import Engine
    from brownout_jax.serve.cli_serve import server_config_from_args
    from brownout_jax.serve.server import serve

    server_config = server_config_from_args(args)  # flag errors before the model loads
    check_mesh(args.mesh)
    model, united = default_model(args.model, args.united)
    # Serve once the minimal step set is compiled; the rest compiles in the background.
    config = dataclasses.replace(
        engine_config_from_args(args),
        max_queue=args.max_queue,
        exempt_layers=_served_exempt_layers(args, model, united),
        compile_in_background=True,
    )

    def make_engine():
        return Engine.from_checkpoint(model, united, config, args.dtype, progress=False)

    return serve(make_engine, server_config)


def _served_exempt_layers(args, model_dir: str, united: str | None) -> tuple[int, ...]:
    """``--exempt-layers`` / ``--exempt-edge-layers`` resolved before the engine compiles."""
    from brownout_jax.checkpoints.united_store import read_united_manifest
    from brownout_jax.model.config import ModelConfig

    manifest = None if united is None else read_united_manifest(united)
    moe_layers = ModelConfig.from_pretrained_dir(model_dir).moe_layers
    return resolve_exempt_layers(
        args.exempt_layers, args.exempt_edge_layers, moe_layers, manifest, united
    )


def _add_bench_burst(kinds) -> None:
    p = kinds.add_parser("burst", help="N requests at once through the engine: TTFT/TPOT")
    p.add_argument("--model", required=True)
    p.add_argument("--united")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--prompt-len", default="16,128", help="min,max synthetic prompt length")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--brownout", default="off", help="auto, off or fixed=X")
    p.add_argument("--slo-ttft", type=float, default=1.0)
    p.add_argument("--slo-tpot", type=float, default=0.2)
    _add_engine_options(p)
    p.set_defaults(run=_run_bench_burst)


def _add_engine_options(p) -> None:
    group = p.add_argument_group("engine")
    group.add_argument("--max-batch", type=int, default=16, help="decode slots")
    group.add_argument("--max-prefill-batch", type=int, default=4)
    group.add_argument("--kv-blocks", type=int, default=512, help="KV blocks in the pool")
    group.add_argument("--block-size", type=int, default=16)
    group.add_argument(
        "--max-model-len",
        type=int,
        help="prompt + generated tokens per request (default: the model's "
        "max_position_embeddings, capped by what the KV pool holds)",
    )
    group.add_argument("--dtype", default="auto")
    group.add_argument(
        "--ladder",
        default="0,0.5,0.75,1",
        help="brownout levels compiled before serving (each adds a full set of steps; "
        "the controller's ×0.8 / +0.1 moves snap to them)",
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
    add_mesh_argument(group)
    add_experts_backend_argument(group)


def check_mesh(mesh) -> None:
    """Fails fast, before a model is loaded, when ``--mesh`` does not match JAX's devices."""
    if mesh is None:
        return
    from brownout_jax.moe.expert_parallel import make_mesh

    try:
        make_mesh(mesh)
    except ValueError as err:
        raise ValueError(f"--mesh: {err}") from None


def engine_config_from_args(args):
    import jax

    from brownout_jax.engine.config import EngineConfig, default_bucket_growth
    from brownout_jax.engine.controller import ControllerConfig
    from brownout_jax.moe.ladder import ThresholdLadder

    controller = ControllerConfig.parse_mode(
        args.brownout, slo_ttft_s=args.slo_ttft, slo_tpot_s=args.slo_tpot
    )
    return EngineConfig(
        ladder=ThresholdLadder.parse(args.ladder),
        bucket_growth=args.bucket_growth or default_bucket_growth(jax.default_backend()),
        max_batch=args.max_batch,
        max_prefill_batch=args.max_prefill_batch,
        block_size=args.block_size,
        num_blocks=args.kv_blocks,
        max_model_len=args.max_model_len,
        allow_context_extrapolation=args.allow_context_extrapolation,
        controller=controller,
        mesh=args.mesh,
        experts_backend=experts_backend_from_args(args),
    )


def _run_bench_burst(args) -> int:
    from brownout_jax.bench.burst import run_burst
    from brownout_jax.engine.front import Engine

    low, high = (int(v) for v in args.prompt_len.split(","))
    check_mesh(args.mesh)
    engine = Engine.from_checkpoint(
        args.model, args.united, engine_config_from_args(args), args.dtype
    )
    try:
        result = run_burst(engine, args.requests, (low, high), args.max_new_tokens)
    finally:
        engine.shutdown(drain=False)
    print(json.dumps(result, indent=1))
    return 0


def _experts_backends(text: str) -> tuple:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in CLI_CHOICES]
    if unknown or not names:
        choices = ", ".join(CLI_CHOICES)
        raise ValueError(f"--experts-backends: {unknown or text!r}; choose from {choices}")
    return tuple(CLI_CHOICES[name] for name in names)


def _run_bench_moe_layer(args) -> int:
    from brownout_jax.bench.moe_layer import format_table, run_moe_layer_bench

    result = run_moe_layer_bench(
        batches=tuple(int(b) for b in args.batches.split(",")),
        prefill_tokens=args.prefill_tokens,
        thresholds=_floats(args.thresholds),
        way=args.way,
        skew=args.skew,
        repeats=args.repeats,
        weight_dtype=args.weight_dtype,
        backends=_experts_backends(args.experts_backends),
    )
    print(json.dumps(result) if args.output == "json" else format_table(result))
    return 0


def encode_prompt(tokenizer, prompt: str, chat: bool) -> list[int]:
    if not chat:
        return tokenizer.encode(prompt, add_special_tokens=False)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("--chat: the checkpoint's tokenizer has no chat template")
    messages = [{"role": "user", "content": prompt}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids if isinstance(ids, list) else ids["input_ids"])


def default_model(model: str | None, united: str | None) -> tuple[str, str | None]:
    """``--model`` or, when absent, the bundled demo model with its contiguous united experts."""
    if model is not None:
        return model, united
    from brownout_jax.checkpoints.demo_model import demo_model_dir, demo_united_dir

    try:
        demo = demo_model_dir()
    except FileNotFoundError as err:
        raise ValueError(f"no --model given and the bundled demo model is missing ({err})") from err
    if united is None:
        try:
            united = str(demo_united_dir("contiguous"))
        except FileNotFoundError:
            united = None
    return str(demo), united


def _run_generate(args) -> int:
    if args.text is not None:
        if args.prompt is not None or args.prompt_ids is not None:
            raise ValueError("give the prompt once: positional text, --prompt or --prompt-ids")
        args.prompt = args.text
    if args.prompt is None and args.prompt_ids is None:
        raise ValueError("a prompt is required: positional text, --prompt or --prompt-ids")
    if args.server is not None:
        from brownout_jax.serve.cli_client import run_remote_generate

        return run_remote_generate(args)
    if args.stop:
        raise ValueError("--stop strings are applied by the server: use them with --server")
    from brownout_jax.checkpoints import load_model
    from brownout_jax.moe.expert_parallel import expert_parallel_setup
    from brownout_jax.offline.generate import generate

    check_mesh(args.mesh)
    args.model, args.united = default_model(args.model, args.united)
    model = load_model(args.model, args.dtype, progress=args.output == "text", united=args.united)
    prefill_options, decode_options = brownout_options(args, model.config, model.united_manifest)
    try:
        params, (prefill_options, decode_options) = expert_parallel_setup(
            model.params, model.config, args.mesh, (prefill_options, decode_options)
        )
    except ValueError as err:
        raise ValueError(f"--mesh: {err}") from None
    if args.prompt is not None:
        if model.tokenizer is None:
            raise ValueError(
                f"{args.model} has no tokenizer files; pass --prompt-ids instead of --prompt"
            )
        prompt_ids = encode_prompt(model.tokenizer, args.prompt, args.chat)
    else:
        prompt_ids = args.prompt_ids

    def run(arrivals: list[float] | None = None):
        return generate(
            params,
            model.config,
            [prompt_ids],
            args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
            stop_token_ids=() if args.ignore_eos else model.eos_token_ids,
            prefill_options=prefill_options,
            decode_options=decode_options,
            arrival_times=arrivals,
        )[0]

    if args.warmup:
        run()
    arrivals: list[float] = []
    start = time.perf_counter()
    result = run(arrivals)
    elapsed = time.perf_counter() - start
    ttft = arrivals[0] - start
    tpot = (arrivals[-1] - arrivals[0]) / max(len(arrivals) - 1, 1)
    text = None
    if model.tokenizer is not None:
        text = model.tokenizer.decode(result.token_ids, skip_special_tokens=True)
    if args.output == "json":
        print(
            json.dumps(
                {
                    "prompt_token_ids": list(prompt_ids),
                    "token_ids": result.token_ids,
                    "logprobs": result.logprobs,
                    "text": text,
                    "finish_reason": result.finish_reason,
                    "thresholds": {
                        "prefill": prefill_options.threshold,
                        "decode": decode_options.threshold,
                    },
                    "timing": {
                        "elapsed_s": round(elapsed, 4),
                        "ttft_s": round(ttft, 4),
                        "tpot_s": round(tpot, 5),
                        "includes_compilation": not args.warmup,
                    },
                }
            )
        )
    else:
        print(text if text is not None else " ".join(map(str, result.token_ids)))
        print(
            f"[{len(result.token_ids)} tokens in {elapsed:.2f}s (TTFT {ttft * 1e3:.0f} ms, "
            f"TPOT {tpot * 1e3:.1f} ms), finish: {result.finish_reason}]",
            file=sys.stderr,
        )
    return 0


def _run_convert(args) -> int:
    from brownout_jax.checkpoints.hf_safetensors import load_hf_params
    from brownout_jax.checkpoints.loader import resolve_dtype
    from brownout_jax.checkpoints.orbax_store import save_converted
    from brownout_jax.model.config import ModelConfig

    config = ModelConfig.from_pretrained_dir(args.hf)
    start = time.perf_counter()
    params, fingerprint = load_hf_params(args.hf, config, resolve_dtype(args.dtype))
    out = save_converted(params, args.hf, args.out, fingerprint, overwrite=args.overwrite)
    size = sum(f.stat().st_size for f in Path(args.hf).glob("*.safetensors"))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(
        f"converted {args.hf} → {out} in {time.perf_counter() - start:.1f}s; "
        f"checkpoint {size / 2**20:.1f} MiB, peak host memory {peak / 2**20:.1f} MiB "
        f"({peak / max(size, 1):.2f}× the checkpoint)"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="brownout-jax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    _add_convert(sub)
    _add_unite(sub)
    _add_bench(sub)
    _add_serve(sub)
    from brownout_jax.eval.cli_eval import add_eval_parser

    add_eval_parser(sub)
    return parser


def enable_compilation_cache() -> None:
    """Persist compiled steps across runs (a restarted server warms up from disk) unless the
    user chose a cache directory (JAX_COMPILATION_CACHE_DIR) or none
    (BROWNOUT_JAX_XLA_CACHE=off)."""
    import os

    if os.environ.get("BROWNOUT_JAX_XLA_CACHE", "").lower() == "off":
        return
    if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
        import jax

        cache = os.path.join(os.path.expanduser("~"), ".cache", "brownout-jax", "xla")
        jax.config.update("jax_compilation_cache_dir", cache)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    enable_compilation_cache()
    from brownout_jax.checkpoints.errors import CheckpointError
    from brownout_jax.eval.tasks import TaskFormatError
    from brownout_jax.model.config import UnsupportedConfigError
    from brownout_jax.moe.calibration import CalibrationDataError

    try:
        return args.run(args)
    except (
        CheckpointError,
        TaskFormatError,
        UnsupportedConfigError,
        CalibrationDataError,
        ValueError,
        FileNotFoundError,
    ) as err:
        print(f"brownout-jax {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"brownout-jax {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
