"""``brownout-jax bench cold-start``: seconds from ``brownout-jax serve`` starting to its first
streamed token, over HTTP (OpenAI completions, server-sent events) and over gRPC (Generate).

The server runs as a subprocess with its own XLA compilation cache directory: a fresh, empty
one for the *cold* start (every step compiles), the same one again for the *warm* start (the
steps load from the cache). While the server warms up both fronts refuse (HTTP 503, gRPC
UNAVAILABLE); each client retries every 0.1 s from the moment the front listens, so the time
measured is process start → first token, the way a user waiting on a fresh server sees it.
Then GetStatus is polled until no step is left compiling in the background.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

PROMPT = "Return the"


@dataclasses.dataclass
class StartRun:
    kind: str  # cold | warm
    listening_s: float | None = None  # both fronts bound, answering "not serving"
    serving_s: float | None = None  # the minimal step set compiled: health turns SERVING
    http_first_token_s: float | None = None
    grpc_first_token_s: float | None = None
    steps_compiled_at_serving: int | None = None
    steps_compiling_at_serving: int | None = None
    grid_complete_s: float | None = None  # GetStatus: no step left compiling in the background
    log: list[str] = dataclasses.field(default_factory=list)


def _first_http_token(base: str, started: float, deadline: float) -> float:
    body = json.dumps(
        {"prompt": PROMPT, "max_tokens": 8, "stream": True, "temperature": 0}
    ).encode()
    while time.monotonic() < deadline:
        request = urllib.request.Request(
            base + "/v1/completions", body, {"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=600) as response:
                for line in response:
                    if line.startswith(b"data:") and b'"text"' in line:
                        return time.monotonic() - started
        except urllib.error.HTTPError as err:
            if err.code != 503:
                raise
        except (urllib.error.URLError, ConnectionError):
            pass
        time.sleep(0.1)
    raise TimeoutError("no token over HTTP before the deadline")


def _first_grpc_token(target: str, started: float, deadline: float) -> float:
    import grpc

    from brownout_jax.serve import brownout_pb2 as pb
    from brownout_jax.serve.client import GenerationClient

    request = pb.GenerateRequest(prompt=PROMPT, max_tokens=8, temperature=0.0)
    with GenerationClient(target) as client:
        while time.monotonic() < deadline:
            try:
                for response in client.stream(request, timeout=600):
                    if response.token_ids:
                        return time.monotonic() - started
            except grpc.RpcError as err:
                if err.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
            time.sleep(0.1)
    raise TimeoutError("no token over gRPC before the deadline")


def _grid_complete(target: str, started: float, deadline: float) -> float:
    from brownout_jax.serve.client import GenerationClient

    with GenerationClient(target) as client:
        while time.monotonic() < deadline:
            if client.status(timeout=30).steps_compiling == 0:
                return time.monotonic() - started
            time.sleep(0.5)
    raise TimeoutError("the step grid was still compiling at the deadline")


def measure_start(
    kind: str, cache_dir: str, serve_args: tuple[str, ...] = (), timeout_s: float = 900
) -> StartRun:
    """One server start with ``cache_dir`` as its compilation cache, both fronts measured."""
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": cache_dir}
    command = [sys.executable, "-m", "brownout_jax.cli", "serve", "--port", "0"]
    command += ["--http-port", "0", *serve_args]
    run = StartRun(kind)
    started = time.monotonic()
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    fronts: dict[str, str] = {}
    listening = threading.Event()

    def read() -> None:
        for line in process.stdout:
            now = time.monotonic() - started
            run.log.append(f"{now:7.2f} {line.rstrip()}")
            if "listening on" in line and not listening.is_set():
                run.listening_s = now
                grpc_at = re.search(r"gRPC (\S+?:\d+)", line)
                http_at = re.search(r"HTTP (http://\S+?:\d+)", line)
                fronts.update(grpc=grpc_at.group(1), http=http_at.group(1))
                listening.set()
            found = re.search(r"(\d+) steps compiled, (\d+) more compiling", line)
            if "serving" in line and found:
                run.serving_s = now
                run.steps_compiled_at_serving = int(found.group(1))
                run.steps_compiling_at_serving = int(found.group(2))
        listening.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        deadline = started + timeout_s
        if not listening.wait(timeout_s) or not fronts:
            raise RuntimeError("the server never listened:\n" + "\n".join(run.log))
        results: dict[str, float] = {}

        def client(name, fn, where) -> None:
            try:
                results[name] = fn(where, started, deadline)
            except Exception as err:  # reported below with the server's log
                results[name] = err

        threads = [
            threading.Thread(target=client, args=("http", _first_http_token, fronts["http"])),
            threading.Thread(target=client, args=("grpc", _first_grpc_token, fronts["grpc"])),
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for name, value in results.items():
            if isinstance(value, Exception):
                raise RuntimeError(f"{name}: {value}\n" + "\n".join(run.log)) from value
        run.http_first_token_s, run.grpc_first_token_s = results["http"], results["grpc"]
        run.grid_complete_s = _grid_complete(fronts["grpc"], started, deadline)
    finally:
        process.terminate()
        try:
            process.wait(120)
        except subprocess.TimeoutExpired:
            process.kill()
        reader.join(10)
    return run


def run_cold_start(
    runs: tuple[str, ...] = ("cold", "warm"),
    cache_dir: str | None = None,
    serve_args: tuple[str, ...] = (),
) -> dict:
    """``cold`` uses a fresh empty cache directory (or ``cache_dir``, which must then be
    empty), ``warm`` the same directory again."""
    cache = cache_dir or tempfile.mkdtemp(prefix="brownout-cold-start-")
    if "cold" in runs and os.listdir(cache):
        raise ValueError(f"--cache-dir {cache} is not empty: a cold start needs an empty cache")
    load = os.getloadavg()  # other processes share the cores: say how busy they were
    measured = [measure_start(kind, cache, serve_args) for kind in runs]
    return {
        "cores": len(os.sched_getaffinity(0)),
        "load_average": load,
        "cache_dir": cache,
        "serve_args": list(serve_args),
        "runs": [dataclasses.asdict(r) | {"log": r.log[-4:]} for r in measured],
    }


def format_table(result: dict) -> str:
    rows = [
        "| start | listening s | serving s | first token HTTP s | first token gRPC s | "
        "steps compiled / compiling at serving | whole grid compiled s |",
        "| --- | ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    for r in result["runs"]:
        rows.append(
            f"| {r['kind']} | {r['listening_s']:.1f} | {r['serving_s']:.1f} | "
            f"{r['http_first_token_s']:.1f} | {r['grpc_first_token_s']:.1f} | "
            f"{r['steps_compiled_at_serving']} / {r['steps_compiling_at_serving']} | "
            f"{r['grid_complete_s']:.1f} |"
        )
    load = ", ".join(f"{v:.1f}" for v in result["load_average"])
    rows.append(f"\n{result['cores']} cores, load average before the runs: {load}")
    return "\n".join(rows)
