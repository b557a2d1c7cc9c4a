"""``brownout-jax bench serve-load``: a running server's step and plan-broadcast times under
a fixed load: ``concurrency`` greedy completions at once over HTTP, the server's own metrics
read before and after (``/metrics``), and its median plan-broadcast time (gRPC
``GetStatus``). Host-only: it measures a server, whatever runs it (one process or several).
"""

from __future__ import annotations

import concurrent.futures
import json
import re
import time
import urllib.request

_SAMPLE = re.compile(r"^([a-zA-Z_:][\w:]*)(\{[^}]*\})?\s+(\S+)$")


def scrape(http: str) -> dict[str, float]:
    return parse_metrics(urllib.request.urlopen(f"{http}/metrics", timeout=30).read().decode())


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text as {name + labels: value} (comments skipped)."""
    values = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match:
            values[match.group(1) + (match.group(2) or "")] = float(match.group(3))
    return values


def histogram_mean(
    after: dict, before: dict, name: str, labels: str = ""
) -> tuple[float | None, int]:
    """Mean of a histogram (``labels`` as in the text, e.g. ``{phase="decode"}``) over the
    run (its sum's and count's deltas), and the count."""
    count = after.get(f"{name}_count{labels}", 0.0) - before.get(f"{name}_count{labels}", 0.0)
    total = after.get(f"{name}_sum{labels}", 0.0) - before.get(f"{name}_sum{labels}", 0.0)
    return (total / count if count else None), int(count)


def run_load(http: str, grpc_target: str | None, concurrency: int, max_tokens: int) -> dict:
    def one(i: int) -> int:
        body = {
            "prompt": f"def function_{i}(values):",
            "max_tokens": max_tokens,
            "temperature": 0,
            "ignore_eos": True,
        }
        headers = {"content-type": "application/json"}
        url = f"{http}/v1/completions"
        request = urllib.request.Request(url, json.dumps(body).encode(), headers)
        with urllib.request.urlopen(request, timeout=600) as response:
            return json.loads(response.read())["usage"]["completion_tokens"]

    before = scrape(http)
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        tokens = sum(pool.map(one, range(concurrency)))
    wall = time.perf_counter() - start
    after = scrape(http)
    decode_s, decode_steps = histogram_mean(
        after, before, "brownout_step_latency_seconds", '{phase="decode"}'
    )
    plan_s, plans = histogram_mean(after, before, "brownout_plan_broadcast_seconds")
    result = {
        "processes": int(after.get("brownout_processes", 1)),
        "local_devices": int(after.get("brownout_local_devices", 1)),
        "requests": concurrency,
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "decode_steps": decode_steps,
        "decode_step_mean_s": decode_s,
        "plans": plans,
        "plan_broadcast_mean_s": plan_s,
        "plan_broadcast_p50_s": None,
    }
    if grpc_target is not None:
        from brownout_jax.serve.client import GenerationClient

        with GenerationClient(grpc_target) as client:
            median = client.status(timeout=30).plan_broadcast_s
        result["plan_broadcast_p50_s"] = median if median >= 0 else None
    return result


def format_load(result: dict) -> str:
    def ms(value):
        return "—" if value is None else f"{value * 1e3:.3f}"

    share = None
    if result["plan_broadcast_p50_s"] and result["decode_step_mean_s"]:
        share = result["plan_broadcast_p50_s"] / result["decode_step_mean_s"]
    return (
        f"processes {result['processes']} × {result['local_devices']} devices, "
        f"{result['requests']} requests, {result['tokens']} tokens in {result['wall_s']:.2f}s "
        f"({result['tokens_per_s']:.1f} tok/s)\n"
        f"decode step mean {ms(result['decode_step_mean_s'])} ms over "
        f"{result['decode_steps']} steps; plan broadcast median "
        f"{ms(result['plan_broadcast_p50_s'])} ms, mean {ms(result['plan_broadcast_mean_s'])} ms"
        + ("" if share is None else f" ({share:.1%} of a decode step)")
    )
