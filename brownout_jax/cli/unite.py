"""``brownout-jax unite``: united experts for brownout, distilled on calibration data."""

from __future__ import annotations

import time


def add_parser(sub) -> None:
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
    p.set_defaults(run=run)


def run(args) -> int:
    from brownout_jax.checkpoints import load_model
    from brownout_jax.checkpoints.united_store import save_united
    from brownout_jax.united.calibration import (
        load_calibration_texts,
        random_token_sequences,
        tokenize_texts,
    )
    from brownout_jax.united.distill import DistillConfig, build_united_experts

    # The distillation reads the expert stacks as stored (its teacher is each expert).
    model = load_model(args.model, args.dtype, pack_experts=False)
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
