"""Stands in for ``PEER_PYTHON peer_vllm.py REQUEST RESULT`` in tests (CI has no vLLM).

Speaks the same file protocol: records what it was given (request, runner path and the
vLLM env vars) to $FAKE_PEER_RECORD, answers with prompt-echoing token ids and a fixed
$FAKE_PEER_TOKENS_PER_S, or fails like a crashing peer when $FAKE_PEER_FAIL is set.
"""

import json
import os
import sys
from pathlib import Path

runner, request_path, result_path = sys.argv[1:]
request = json.loads(Path(request_path).read_text())
if os.environ.get("FAKE_PEER_FAIL"):
    print("loading the model...\n" + os.environ["FAKE_PEER_FAIL"], file=sys.stderr)
    sys.exit(3)
if "FAKE_PEER_RECORD" in os.environ:
    record = {
        "runner": runner,
        "request": request,
        "bind": os.environ.get("VLLM_CPU_OMP_THREADS_BIND"),
        "kv_cache_space": os.environ.get("VLLM_CPU_KVCACHE_SPACE"),
    }
    Path(os.environ["FAKE_PEER_RECORD"]).write_text(json.dumps(record))
n = request["max_new_tokens"]
token_ids = [(p * n)[:n] for p in request["prompts"]]
rate = float(os.environ.get("FAKE_PEER_TOKENS_PER_S", "100"))
tokens = sum(len(t) for t in token_ids)
result = {
    "peer": "vllm",
    "vllm_version": "fake",
    "elapsed_s": tokens / rate,
    "output_tokens": tokens,
    "output_tokens_per_s": rate,
    "requests_per_s": len(token_ids) / (tokens / rate),
    "batch": request["max_num_seqs"],
    "omp_threads_bind": os.environ.get("VLLM_CPU_OMP_THREADS_BIND"),
    "cores": 1,
    "torch_threads": 1,
    "token_ids": token_ids,
}
Path(result_path).write_text(json.dumps(result))
