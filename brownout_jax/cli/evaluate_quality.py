"""``brownout-jax eval quality | sensitivity``: argument parsing and the runs."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from brownout_jax.eval.tasks import DOCSTRING_HELDOUT
from brownout_jax.united.exemption import add_exempt_arguments  # no JAX: the parser stays cheap

DEFAULT_TEXT = DOCSTRING_HELDOUT


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(t) for t in text.split(",") if t.strip())


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(t) for t in text.split(",") if t.strip())


def _add_text_options(p) -> None:
    p.add_argument("--model", help="checkpoint dir (default: the bundled demo model)")
    p.add_argument(
        "--text",
        help="text to measure on: plain text, JSONL with 'text', Alpaca or ShareGPT JSON, as "
        "`unite --calib` reads (default: the demo model's held-out docstrings)",
    )
    p.add_argument("--windows", type=int, default=32, help="teacher-forced windows to score")
    p.add_argument("--window-tokens", type=int, default=128, help="tokens per window")
    p.add_argument(
        "--prompt-tokens", type=int, default=64, help="tokens prefilled; the rest are decoded"
    )
    p.add_argument("--batch-size", type=int, default=8, help="windows per batch")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--output", choices=("table", "json"), default="table")


def add_quality_parsers(kinds) -> None:
    p = kinds.add_parser(
        "quality", help="divergence from the exact model vs threshold (KL, agreement, greedy)"
    )
    p.add_argument(
        "--united",
        action="append",
        help="united experts dir; repeat to compare sets (default with the demo: its own)",
    )
    p.add_argument("--thresholds", default="1,0.75,0.5,0.25,0")
    p.add_argument(
        "--phases",
        default="both",
        help="comma list of both, prefill, decode: where brownout applies",
    )
    p.add_argument("--num-prompts", type=int, default=16, help="greedy continuations (0: none)")
    p.add_argument("--continuation-tokens", type=int, default=32, help="greedy tokens per prompt")
    p.add_argument("--plot", help="write a PNG of the metrics vs threshold here")
    p.add_argument(
        "--json-out", help="also write the JSON report (for `eval slo --quality-table`) here"
    )
    p.add_argument(
        "--store",
        action="store_true",
        help="store each set's mean KL per level (its prefill and decode rows, else its full-"
        "brownout rows) in its manifest: the controller of `serve` / `eval slo` then browns out "
        "where it gives up least, and `eval slo` reports the expected KL per token",
    )
    _add_text_options(p)
    add_exempt_arguments(p.add_argument_group("brownout"))
    p.set_defaults(run=run_quality)

    p = kinds.add_parser(
        "sensitivity", help="per-layer KL and bytes saved; choose exempt layers (auto)"
    )
    p.add_argument("--united", help="united experts dir (default with the demo: its own)")
    p.add_argument("--threshold", type=float, default=0.5)
    p.add_argument(
        "--k", type=_ints, help="exempt-layer counts to compare with the edge rule (default 1…4)"
    )
    p.add_argument(
        "--save",
        type=int,
        metavar="K",
        help="store the ranking in the united experts' manifest; `--exempt-layers auto` "
        "then exempts its first K layers",
    )
    p.add_argument(
        "--all-subsets",
        action="store_true",
        help="also measure every other K-subset of MoE layers (small models: ≤ 64 sets)",
    )
    _add_text_options(p)
    p.set_defaults(run=run_sensitivity)


def _quality_config(args, num_prompts: int = 0, continuation: int = 1):
    from brownout_jax.eval.quality import QualityConfig

    return QualityConfig(
        window_tokens=args.window_tokens,
        prompt_tokens=args.prompt_tokens,
        batch_size=args.batch_size,
        num_prompts=num_prompts,
        continuation_tokens=continuation,
    )


def _load_windows(args, cfg, text_path: Path, model_dir: str):
    """Reads the text first (a malformed file fails before any model is loaded), then packs it
    with the model's tokenizer into windows of exactly ``--window-tokens``."""
    from brownout_jax.checkpoints.loader import load_tokenizer
    from brownout_jax.united.calibration import load_calibration_texts, pack_token_windows

    texts = load_calibration_texts(text_path)
    tokenizer = load_tokenizer(model_dir)
    if tokenizer is None:
        raise ValueError(f"{model_dir} has no tokenizer: eval quality needs one for --text")
    separator = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    windows = pack_token_windows(texts, tokenizer, cfg.window_tokens, args.windows, separator)
    if not windows:
        raise ValueError(f"--text {text_path}: shorter than one window of {cfg.window_tokens}")
    return windows


def _with_united(model, united_dir: str):
    from brownout_jax.checkpoints.united_store import load_united
    from brownout_jax.united.united import attach_united

    united, manifest = load_united(united_dir, model.config, model.fingerprint, model.dtype)
    return attach_united(model.params, model.config, united), manifest


def _labels(dirs: list[str]) -> list[str]:
    names = [Path(d).name for d in dirs]
    return names if len(set(names)) == len(names) else [str(Path(d)) for d in dirs]


def run_quality(args) -> int:
    from brownout_jax.checkpoints import load_model
    from brownout_jax.checkpoints.demo_model import default_model
    from brownout_jax.eval.quality import BrownoutPhase, BrownoutSetting, measure_settings
    from brownout_jax.eval.quality_report import (
        format_table,
        plot_quality,
        report_json,
        summarize,
    )
    from brownout_jax.united.exemption import resolve_exempt_layers

    thresholds = _floats(args.thresholds)
    try:
        phases = [BrownoutPhase(p.strip()) for p in args.phases.split(",") if p.strip()]
    except ValueError:
        raise ValueError(f"--phases: expected both, prefill, decode; got {args.phases!r}") from None
    cfg = _quality_config(args, args.num_prompts, args.continuation_tokens)
    text = Path(args.text) if args.text else DEFAULT_TEXT
    model_dir, default_united = default_model(args.model, None)
    united_dirs = args.united or ([default_united] if default_united else [])
    if not united_dirs:
        raise ValueError("eval quality needs united experts: pass --united DIR")
    windows = _load_windows(args, cfg, text, model_dir)
    progress = args.output == "table"
    model = load_model(model_dir, args.dtype, progress=progress)
    rows = []
    for united_dir, label in zip(united_dirs, _labels(united_dirs), strict=True):
        params, manifest = _with_united(model, united_dir)
        exempt = resolve_exempt_layers(
            args.exempt_layers,
            args.exempt_edge_layers,
            model.config.moe_layers,
            manifest,
            united_dir,
        )
        settings = [
            BrownoutSetting(t, phase, exempt)
            for phase in phases
            for t in thresholds
            if phase is BrownoutPhase.BOTH or t < 1.0  # phase makes no difference at 1
        ]
        measured = measure_settings(
            params, model.config, windows, settings, cfg, progress, f"quality {label}"
        )
        measured_rows = [summarize(m, label) for m in measured]
        rows.extend(measured_rows)
        del params
        if args.store:
            _store_quality_costs(united_dir, measured_rows, text, len(windows), cfg, exempt)
    meta = {
        "model": str(model_dir),
        "text": str(text),
        "united": dict(zip(_labels(united_dirs), map(str, united_dirs), strict=True)),
        "windows": len(windows),
        "window_tokens": cfg.window_tokens,
        "prompt_tokens": cfg.prompt_tokens,
        "batch_size": cfg.batch_size,
        "num_prompts": min(cfg.num_prompts, len(windows)),
        "continuation_tokens": cfg.continuation_tokens,
        "dtype": str(model.dtype),
    }
    if args.plot:
        plot_quality(rows, Path(args.plot), f"{Path(model_dir).name} on {text.name}")
        print(f"wrote {args.plot}", file=sys.stderr)
    report = json.dumps(report_json(rows, meta))
    if args.json_out:
        Path(args.json_out).write_text(report + "\n")
    if args.output == "json":
        print(report)
        return 0
    print(
        f"{meta['windows']} windows of {cfg.window_tokens} tokens from {text} "
        f"({cfg.prompt_tokens} prefilled, {cfg.scored_tokens} decoded teacher-forced and scored "
        f"per window); greedy: {meta['num_prompts']} prompts × {cfg.continuation_tokens} tokens"
    )
    print(format_table(rows))
    return 0


def _store_quality_costs(
    united_dir: str, rows, text: Path, windows: int, cfg, exempt: tuple[int, ...]
) -> None:
    """A phase measured here replaces its stored curve; the other phase's stays."""
    from brownout_jax.checkpoints.united_store import read_united_manifest, update_united_manifest
    from brownout_jax.engine.phase import Phase
    from brownout_jax.engine.quality_costs import MANIFEST_KEY, QualityCosts

    source = f"eval quality: {text.name}, {windows} windows of {cfg.window_tokens} tokens"
    if exempt:
        source += f", MoE layers {list(exempt)} exempt"
    costs = QualityCosts.from_quality_rows(map(dataclasses.asdict, rows), source)
    if not any(costs.measured(phase) for phase in Phase):
        raise ValueError("--store needs a threshold below 1 in --thresholds")
    stored = QualityCosts.from_manifest(read_united_manifest(united_dir))
    costs = costs.merged_into(stored)
    path = update_united_manifest(united_dir, MANIFEST_KEY, costs.to_manifest())
    print(f"stored the quality costs in {path}", file=sys.stderr)


def run_sensitivity(args) -> int:
    from brownout_jax.checkpoints import load_model
    from brownout_jax.checkpoints.demo_model import default_model
    from brownout_jax.checkpoints.united_store import update_united_manifest
    from brownout_jax.eval.sensitivity import (
        compare_rules,
        format_comparison,
        format_sensitivity,
        layer_sensitivity,
    )
    from brownout_jax.united.exemption import MANIFEST_KEY, ExemptionChoice, rank_layers

    if not 0.0 <= args.threshold < 1.0:
        raise ValueError(f"--threshold must lie in [0, 1), got {args.threshold}")
    cfg = _quality_config(args)
    text = Path(args.text) if args.text else DEFAULT_TEXT
    model_dir, united_dir = default_model(args.model, args.united)
    if united_dir is None:
        raise ValueError("eval sensitivity needs united experts: pass --united DIR")
    windows = _load_windows(args, cfg, text, model_dir)
    progress = args.output == "table"
    model = load_model(model_dir, args.dtype, progress=progress)
    moe = model.config.moe_layers
    ks = args.k or tuple(range(1, min(len(moe) - 1, 4) + 1))
    if any(not 0 < k <= len(moe) for k in ks):
        raise ValueError(f"--k: counts must lie in [1, {len(moe)}], got {list(ks)}")
    if args.save is not None and not 0 <= args.save <= len(moe):
        raise ValueError(f"--save: K must lie in [0, {len(moe)}], got {args.save}")
    params, _ = _with_united(model, united_dir)
    layers = layer_sensitivity(params, model.config, windows, args.threshold, cfg, progress)
    ranking = rank_layers(layers)
    comparison = compare_rules(
        params, model.config, windows, args.threshold, ranking, ks, cfg, progress, args.all_subsets
    )
    saved = None
    if args.save is not None:
        choice = ExemptionChoice(
            threshold=args.threshold,
            k=args.save,
            ranking=ranking,
            layers=layers,
            text=f"{text.name}: {len(windows)} windows of {cfg.window_tokens} tokens",
        )
        saved = str(update_united_manifest(united_dir, MANIFEST_KEY, choice.to_manifest()))
    if args.output == "json":
        report = {
            "model": str(model_dir),
            "united": str(united_dir),
            "text": str(text),
            "threshold": args.threshold,
            "windows": len(windows),
            "layers": [dataclasses.asdict(s) for s in layers],
            "ranking": list(ranking),
            "comparison": [dataclasses.asdict(r) for r in comparison],
            "saved_to": saved,
        }
        print(json.dumps(report))
        return 0
    print(
        f"threshold {args.threshold:g}, {len(windows)} windows of {cfg.window_tokens} tokens "
        f"from {text}, united experts {united_dir}"
    )
    print(format_sensitivity(layers, ranking))
    print()
    print(format_comparison(comparison))
    if saved:
        print(f"stored ranking {list(ranking)} (auto = first {args.save}) in {saved}")
    return 0
