"""``brownout-jax`` command line: generate, convert."""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"comma-separated integers expected: {err}") from err


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a checkpoint, offline")
    p.add_argument("--model", required=True, help="HF checkpoint or `brownout-jax convert` output")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text (needs the checkpoint's tokenizer)")
    src.add_argument("--prompt-ids", type=_parse_ids, help="prompt token ids, e.g. 1,2,3")
    p.add_argument(
        "--chat", action="store_true", help="wrap --prompt in the tokenizer's chat template"
    )
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at the EOS token")
    p.add_argument(
        "--dtype", default="auto", help="auto (fp32 on CPU, bf16 on GPU), float32, bfloat16"
    )
    p.add_argument(
        "--warmup", action="store_true", help="run once first so timings exclude compilation"
    )
    p.add_argument("--output", choices=("text", "json"), default="text")
    p.set_defaults(run=_run_generate)


def _add_convert(sub) -> None:
    p = sub.add_parser("convert", help="convert a HF safetensors checkpoint to orbax")
    p.add_argument("--hf", required=True, help="HF checkpoint directory (safetensors)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--dtype", default="bfloat16", help="float32 or bfloat16 (default)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(run=_run_convert)


def encode_prompt(tokenizer, prompt: str, chat: bool) -> list[int]:
    if not chat:
        return tokenizer.encode(prompt, add_special_tokens=False)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("--chat: the checkpoint's tokenizer has no chat template")
    messages = [{"role": "user", "content": prompt}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids if isinstance(ids, list) else ids["input_ids"])


def _run_generate(args) -> int:
    from brownout_jax.checkpoints import load_model
    from brownout_jax.generate import generate

    model = load_model(args.model, args.dtype, progress=args.output == "text")
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
            model.params,
            model.config,
            [prompt_ids],
            args.max_new_tokens,
            temperature=args.temperature,
            seed=args.seed,
            stop_token_ids=() if args.ignore_eos else model.eos_token_ids,
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
    from brownout_jax.config import ModelConfig

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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from brownout_jax.checkpoints.errors import CheckpointError
    from brownout_jax.config import UnsupportedConfigError

    try:
        return args.run(args)
    except (CheckpointError, UnsupportedConfigError, ValueError, FileNotFoundError) as err:
        print(f"brownout-jax {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"brownout-jax {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
