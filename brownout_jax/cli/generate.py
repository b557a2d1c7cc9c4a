"""``brownout-jax generate``: offline generation from a checkpoint, or streamed from a server."""

from __future__ import annotations

import json
import sys
import time

from brownout_jax.cli.options import (
    add_brownout_arguments,
    brownout_options,
    check_mesh,
    parse_ids,
)
from brownout_jax.engine.requests import BrownoutClass
from brownout_jax.moe.expert_backend import add_experts_backend_argument
from brownout_jax.moe.mesh_config import add_mesh_argument


def add_parser(sub) -> None:
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
    src.add_argument("--prompt-ids", type=parse_ids, help="prompt token ids, e.g. 1,2,3")
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
        "--brownout-class",
        choices=[c.value for c in BrownoutClass],
        default=BrownoutClass.ALLOWED.value,
        help="with --server: never = this request is never browned out (its own experts at "
        "every level)",
    )
    p.add_argument(
        "--dtype",
        default="auto",
        help="auto (bf16; fp32 on a CPU without the compiled kernel), float32, bfloat16",
    )
    p.add_argument(
        "--warmup", action="store_true", help="run once first so timings exclude compilation"
    )
    add_brownout_arguments(p)
    add_mesh_argument(p)
    add_experts_backend_argument(p)
    p.add_argument("--output", choices=("text", "json"), default="text")
    p.set_defaults(run=run)


def encode_prompt(tokenizer, prompt: str, chat: bool) -> list[int]:
    if not chat:
        return tokenizer.encode(prompt, add_special_tokens=False)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("--chat: the checkpoint's tokenizer has no chat template")
    messages = [{"role": "user", "content": prompt}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids if isinstance(ids, list) else ids["input_ids"])


def run(args) -> int:
    from brownout_jax.checkpoints.demo_model import default_model

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
    if args.brownout_class != BrownoutClass.ALLOWED:
        raise ValueError(
            "--brownout-class is applied by the server's engine: use it with --server "
            "(offline, --threshold 1 runs the exact model)"
        )
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
