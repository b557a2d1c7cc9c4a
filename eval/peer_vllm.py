"""vLLM peer for ``brownout-jax eval throughput --peer vllm``: runs inside vLLM's interpreter.

Usage: ``PEER_PYTHON peer_vllm.py REQUEST.json RESULT.json``. It imports only the standard
library and vLLM (the project never depends on vLLM, and the peer's venv has no brownout_jax).
The request carries the exact prompt token ids the engine was measured on; the result carries
the timing and the generated ids, so the caller can check both sides ran the same model.

Request keys: model (checkpoint dir), dtype, prompts (token id lists), max_new_tokens,
max_num_seqs, max_model_len, seed, warmup_prompts. Decoding is always greedy with EOS ignored
and a fixed output length, matching the engine's run.
"""

from __future__ import annotations

import json
import os
import sys
import time


def _bound_cores(bind: str | None) -> int | None:
    """Cores named by VLLM_CPU_OMP_THREADS_BIND (``0-1``, ``0,2``); None when not a list."""
    if not bind or bind in ("auto", "nobind"):
        return None
    cores: set[int] = set()
    for rank_part in bind.split("|")[:1]:  # one rank on CPU: the first group is ours
        for part in rank_part.split(","):
            low, _, high = part.partition("-")
            cores.update(range(int(low), int(high or low) + 1))
    return len(cores)


def _worker_threads(llm) -> int | None:
    """torch's thread count inside the engine-core worker (the process that computes)."""
    try:
        return int(llm.collective_rpc(_torch_threads)[0])
    except Exception:  # older/newer RPC rules: the count is informative, not essential
        return None


def _torch_threads(_worker=None) -> int:
    import torch

    return torch.get_num_threads()


def run(request: dict) -> dict:
    # The thread count is read by a function sent to the worker process over vLLM's local
    # IPC, which refuses pickled callables unless this is set (no network listener here).
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    from vllm import LLM, SamplingParams, __version__

    prompts = [{"prompt_token_ids": list(p)} for p in request["prompts"]]
    max_new = int(request["max_new_tokens"])
    llm = LLM(
        model=request["model"],
        dtype=request.get("dtype", "auto"),
        max_num_seqs=int(request["max_num_seqs"]),
        max_model_len=int(request["max_model_len"]),
        seed=int(request.get("seed", 0)),
        skip_tokenizer_init=True,  # prompts are ids; the engine's run never detokenizes either
        # The warm-up reuses the first prompts; cached prefixes would make their timed prefill
        # free, which the engine (no prefix cache) does not get.
        enable_prefix_caching=False,
    )
    params = SamplingParams(
        temperature=0.0,
        max_tokens=max_new,
        min_tokens=max_new,
        ignore_eos=True,
        detokenize=False,
    )
    warm = prompts[: max(1, int(request.get("warmup_prompts", 4)))]
    llm.generate(warm, params, use_tqdm=False)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    token_ids = [list(o.outputs[0].token_ids) for o in outputs]
    tokens = sum(len(t) for t in token_ids)
    bind = os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
    return {
        "peer": "vllm",
        "vllm_version": __version__,
        "dtype": str(llm.llm_engine.model_config.dtype).removeprefix("torch."),
        "requests": len(prompts),
        "max_new_tokens": max_new,
        "elapsed_s": round(elapsed, 3),
        "output_tokens": tokens,
        "output_tokens_per_s": round(tokens / elapsed, 2),
        "requests_per_s": round(len(prompts) / elapsed, 3),
        "batch": int(request["max_num_seqs"]),
        "omp_threads_bind": bind,
        "cores": _bound_cores(bind),
        "torch_threads": _worker_threads(llm),
        "token_ids": token_ids,
    }


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: peer_vllm.py REQUEST.json RESULT.json", file=sys.stderr)
        return 2
    with open(argv[0], encoding="utf-8") as f:
        request = json.load(f)
    result = run(request)
    with open(argv[1], "w", encoding="utf-8") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":  # vLLM spawns workers that re-import this file: keep work here
    sys.exit(main(sys.argv[1:]))
