"""``brownout-jax generate --server HOST:PORT``: stream text from a running server."""

from __future__ import annotations

import json
import os
import sys

import grpc

from brownout_jax.serve import brownout_pb2 as pb
from brownout_jax.serve.client import GenerationClient
from brownout_jax.serve.serving_state import API_KEY_ENV


def api_key_from(flag: str | None) -> str | None:
    return flag if flag is not None else os.environ.get(API_KEY_ENV)


def request_from_args(args) -> pb.GenerateRequest:
    request = pb.GenerateRequest(
        max_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop=args.stop,
        ignore_eos=args.ignore_eos,
        brownout=args.brownout_class,
    )
    if args.prompt_ids is not None:
        request.prompt_token_ids.extend(args.prompt_ids)
    else:
        request.prompt = args.prompt
    return request


def run_remote_generate(args) -> int:
    request = request_from_args(args)
    tokens, logprobs, text = [], [], []
    last = None
    with GenerationClient(args.server, api_key_from(args.api_key)) as client:
        try:
            for response in client.stream(request):
                tokens.extend(response.token_ids)
                logprobs.extend(response.logprobs)
                text.append(response.text)
                if args.output == "text":
                    print(response.text, end="", flush=True)
                last = response
        except grpc.RpcError as err:
            print(f"\nbrownout-jax generate: {err.code().name}: {err.details()}", file=sys.stderr)
            return 1
    if args.output == "json":
        print(
            json.dumps(
                {
                    "token_ids": tokens,
                    "logprobs": logprobs,
                    "text": "".join(text),
                    "finish_reason": last.finish_reason,
                    "thresholds": {
                        "prefill": last.thresholds.prefill,
                        "decode": last.thresholds.decode,
                    },
                    "timing": {"ttft_s": last.timing.ttft_s, "tpot_s": last.timing.tpot_s},
                }
            )
        )
    else:
        print(
            f"\n[{len(tokens)} tokens, finish: {last.finish_reason}, TTFT "
            f"{last.timing.ttft_s * 1e3:.0f} ms, TPOT {last.timing.tpot_s * 1e3:.1f} ms]",
            file=sys.stderr,
        )
    return 0
