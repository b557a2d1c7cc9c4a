"""One engine over two processes (``serve --num-processes 2``): the plan's wire format
(host-only), and real process pairs on loopback (2 CPU devices each, gloo) against one
process with the same 4 devices; a dead follower, a dead leader, a clean stop and a
mismatched configuration."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np
import pytest

from brownout_jax.engine.plan_wire import (
    PlanMessage,
    PlanOp,
    PlanWireError,
    buffer_words,
    decode,
    encode,
    first_difference,
    mismatch_message,
)

# ----------------------------------------------------------------------- host-only: the wire


@pytest.mark.parametrize("seed", range(5))
def test_plan_round_trip_on_random_uploads(seed):
    rng = np.random.default_rng(seed)
    capacity = int(rng.integers(1, 500))
    words = rng.integers(-(2**31), 2**31 - 1, int(rng.integers(0, capacity + 1)), np.int64)
    message = PlanMessage(
        PlanOp.STEP, int(rng.integers(0, 2**40)), int(rng.integers(0, 99)), words.astype(np.int32)
    )
    out = np.full(buffer_words(capacity), 7, np.int32)
    buffer = encode(message, capacity, out)
    assert buffer.shape == (buffer_words(len(words)),) and buffer.dtype == np.int32
    back = decode(buffer)
    assert (back.op, back.step, back.key_index) == (message.op, message.step, message.key_index)
    np.testing.assert_array_equal(back.words, message.words)
    # The same buffer reused for a shorter plan: only that plan is read back.
    short = decode(encode(PlanMessage(PlanOp.SHUTDOWN, 0), capacity, out))
    assert (short.op, short.step, short.key_index, short.words.size) == (PlanOp.SHUTDOWN, 0, -1, 0)


def test_malformed_plans_are_refused():
    good = encode(PlanMessage(PlanOp.STEP, 3, 1, np.arange(4, dtype=np.int32)), 8)
    with pytest.raises(PlanWireError, match="exceeds"):
        encode(PlanMessage(PlanOp.STEP, 1, 0, np.zeros(9, np.int32)), 8)
    with pytest.raises(PlanWireError, match="carries no words"):
        encode(PlanMessage(PlanOp.SHUTDOWN, 1, -1, np.zeros(1, np.int32)), 8)
    for index, value, match in (
        (0, 7, "magic"),
        (1, 99, "unknown plan op"),
        (5, 50, "claims"),
        (4, -1, "names no executable"),
    ):
        bad = good.copy()
        bad[index] = value
        with pytest.raises(PlanWireError, match=match):
            decode(bad)
    with pytest.raises(PlanWireError, match="1-D int32"):
        decode(good.astype(np.int64))


def test_the_first_differing_field_is_named():
    leader = {"engine.max_batch": "4", "model.hidden_size": "64", "params": "ab"}
    assert first_difference(leader, dict(leader)) is None
    assert first_difference(leader, leader | {"engine.max_batch": "8"}) == "engine.max_batch"
    assert first_difference(leader, {k: v for k, v in leader.items() if k != "params"}) == "params"
    text = mismatch_message("engine.max_batch", 1, leader, leader | {"engine.max_batch": "8"})
    assert "engine.max_batch" in text and "8 on process 1, 4 on process 0" in text


def test_the_load_benchmark_reads_histogram_means_over_its_run():
    from brownout_jax.bench.serve_load import histogram_mean, parse_metrics

    text = """# HELP brownout_plan_broadcast_seconds x
brownout_plan_broadcast_seconds_count 10.0
brownout_plan_broadcast_seconds_sum 0.002
brownout_step_latency_seconds_count{phase="decode"} 4.0
brownout_step_latency_seconds_sum{phase="decode"} 1.0
"""
    before = parse_metrics(text)
    after = parse_metrics(text.replace("10.0", "30.0").replace("0.002", "0.012"))
    assert before['brownout_step_latency_seconds_count{phase="decode"}'] == 4.0
    mean, count = histogram_mean(after, before, "brownout_plan_broadcast_seconds")
    assert count == 20 and mean == pytest.approx(0.0005)
    assert histogram_mean(after, before, "absent") == (None, 0)
    step = histogram_mean(after, before, "brownout_step_latency_seconds", '{phase="decode"}')
    assert step == (None, 0)  # no decode step in between
    assert histogram_mean(after, {}, "brownout_step_latency_seconds", '{phase="decode"}') == (
        0.25,
        4,
    )


# ----------------------------------------------------------------------- real processes

# The demo at f32, a small grid (two levels, two slots), nothing timed: a short warm-up.
FLAGS = (
    "--ladder",
    "0,1",
    "--max-batch",
    "2",
    "--max-prefill-batch",
    "1",
    "--max-model-len",
    "96",
    "--kv-blocks",
    "16",
    "--latency-samples",
    "0",
    "--brownout",
    "fixed=0",
    "--heartbeat-timeout",
    "60",
)
PROMPTS = ["def add(a, b):", "import os\n", "class Stack:"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _group() -> tuple[str, ...]:
    """Two processes × 2 CPU devices around a fresh loopback coordinator."""
    return ("--coordinator", f"127.0.0.1:{_free_port()}", "--num-processes", "2",
            "--local-devices", "2")  # fmt: skip


def _pair(start_server, *extra, follower_extra=()):
    """A follower (not waited for) and its leader (ready)."""
    flags = (*_group(), *FLAGS, *extra)
    follower = start_server(None, *flags, "--process-id", "1", *follower_extra, wait=False)
    try:
        leader = start_server(None, *flags, "--process-id", "0")
    except BaseException:
        follower.process.kill()
        raise
    return leader, follower


def _post(base: str, body: dict, timeout: float = 120) -> dict:
    request = urllib.request.Request(
        f"{base}/v1/completions", json.dumps(body).encode(), {"content-type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as err:
        return {"status": err.code, **json.loads(err.read())}


def _completions(base: str) -> list[dict]:
    """Greedy completions with logprobs: a batch of prompts, one never browned out."""
    out = _post(
        base,
        {"prompt": PROMPTS, "max_tokens": 12, "temperature": 0, "logprobs": 1, "ignore_eos": True},
    )["choices"]
    out += _post(
        base,
        {
            "prompt": PROMPTS[0],
            "max_tokens": 12,
            "temperature": 0,
            "logprobs": 1,
            "ignore_eos": True,
            "brownout": "never",
        },
    )["choices"]
    return [
        {
            "text": c["text"],
            "tokens": c["logprobs"]["tokens"],
            "logprobs": c["logprobs"]["token_logprobs"],
        }
        for c in out
    ]


def _wait_exit(proc, timeout: float) -> int | None:
    try:
        return proc.process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None


def test_two_processes_serve_what_one_process_with_their_devices_serves(start_server):
    from brownout_jax.serve import brownout_pb2 as pb
    from brownout_jax.serve.client import GenerationClient

    one = start_server(None, "--local-devices", "4", "--mesh", "expert=4", *FLAGS)
    try:
        expected = _completions(one.http)
        with GenerationClient(one.target) as client:
            grpc_expected = client.generate(
                pb.GenerateRequest(prompt=PROMPTS[1], max_tokens=12, ignore_eos=True), timeout=120
            )
    finally:
        assert one.stop() == 0, one.output
    leader, follower = _pair(start_server)
    try:
        got = _completions(leader.http)
        with GenerationClient(leader.target) as client:
            grpc_got = client.generate(
                pb.GenerateRequest(prompt=PROMPTS[1], max_tokens=12, ignore_eos=True), timeout=120
            )
            status = client.status(timeout=30)
        metrics = urllib.request.urlopen(f"{leader.http}/metrics", timeout=30).read().decode()
    except BaseException:
        follower.process.kill()
        leader.process.kill()
        raise
    # A clean stop: the leader drains, tells the follower, both leave the group with 0.
    assert leader.stop() == 0, leader.output
    assert _wait_exit(follower, 60) == 0, follower.output
    assert "stopped after" in follower.output
    assert [c["tokens"] for c in got] == [c["tokens"] for c in expected]
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(g["logprobs"], e["logprobs"], rtol=1e-4, atol=1e-4)
    assert list(grpc_got.token_ids) == list(grpc_expected.token_ids)
    np.testing.assert_allclose(grpc_got.logprobs, grpc_expected.logprobs, rtol=1e-4, atol=1e-4)
    assert grpc_got.thresholds.decode == 0.0  # browned out: the united experts ran
    assert (status.processes, status.local_devices) == (2, 2) and status.plan_broadcast_s > 0
    assert (
        "brownout_processes 2.0" in metrics and "brownout_plan_broadcast_seconds_count" in metrics
    )


@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGTERM, signal.SIGSTOP])
def test_a_lost_follower_fails_requests_explicitly_and_the_leader_exits(start_server, stop):
    """Killed (its sockets close: the step fails) or stopped (nothing fails: the leader's
    watch sees its heartbeats stop and fails the engine from outside the stuck step)."""
    leader, follower = _pair(start_server)
    try:
        answers = []
        body = {"prompt": PROMPTS[0], "max_tokens": 80, "temperature": 0, "ignore_eos": True}
        streamer = threading.Thread(target=lambda: answers.append(_post(leader.http, body)))
        streamer.start()
        time.sleep(1.0)
        follower.process.send_signal(stop)
        code = _wait_exit(leader, 60)
        follower_code = None if stop == signal.SIGSTOP else _wait_exit(follower, 30)
        streamer.join(60)
    finally:
        follower.process.kill()
        leader.process.kill()
    assert code == 1, leader.output
    assert stop == signal.SIGSTOP or follower_code not in (None, 0), follower.output
    assert answers and answers[0].get("status") == 500, answers
    message = answers[0]["error"]["message"]
    assert "engine failed" in message or "ProcessGroupError" in message, message
    if stop == signal.SIGSTOP:  # where the engine thread hangs, the front answers for it
        assert "process 1 sent no heartbeat" in leader.output, leader.output
    else:
        assert "ProcessGroupError" in message, message


def test_a_dead_leader_ends_the_follower(start_server):
    leader, follower = _pair(start_server)
    try:
        leader.process.send_signal(signal.SIGKILL)
        code = _wait_exit(follower, 60)
    finally:
        follower.process.kill()
        leader.process.kill()
    assert code not in (None, 0), follower.output
    # Whichever notices first: its wait for the next plan, or the runtime's own poll of the
    # coordination service (which lived in the leader), which ends the process at once.
    assert (
        "process 0 died" in follower.output
        or "JAX distributed service detected fatal errors" in follower.output
    ), follower.output


def test_a_mismatched_configuration_is_refused_naming_the_field(start_server):
    flags = (*_group(), *FLAGS)
    follower = start_server(None, *flags, "--process-id", "1", "--max-batch", "3", wait=False)
    leader = start_server(None, *flags, "--process-id", "0", wait=False)
    codes = [_wait_exit(p, 120) for p in (follower, leader)]
    for proc in (follower, leader):
        proc.process.kill()
    assert codes == [2, 2], (follower.output, leader.output)
    for proc in (follower, leader):
        assert "engine.max_batch" in proc.output and "does not match process 0" in proc.output


def test_process_flags_are_checked_before_jax_starts():
    from brownout_jax.engine.distributed import DistributedConfig

    with pytest.raises(ValueError, match="--coordinator"):
        DistributedConfig(num_processes=2)
    with pytest.raises(ValueError, match="--process-id"):
        DistributedConfig(coordinator="h:1", num_processes=2, process_id=2)
    assert not DistributedConfig().enabled and DistributedConfig().is_leader


def test_eval_throughput_across_two_processes():
    flags = [*_group(), "--peer", "none", "--num-prompts", "3",
             "--max-new-tokens", "6", "--thresholds", "0,1", "--max-batch", "2",
             "--max-model-len", "96", "--kv-blocks", "16", "--latency-samples", "0",
             "--dtype", "float32"]  # fmt: skip
    command = [sys.executable, "-m", "brownout_jax.cli", "eval", "throughput", *flags]
    procs = [
        subprocess.Popen(
            [*command, "--process-id", str(i)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in (1, 0)
    ]
    try:
        follower, leader = (p.communicate(timeout=600)[0] for p in procs)
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], (follower, leader)
    report = json.loads(leader[leader.index("{\n") :])
    assert [row["threshold"] for row in report["engine"]] == [0.0, 1.0]
    assert all(row["requests"] == 3 and row["output_tokens_per_s"] > 0 for row in report["engine"])
    assert "stopped after" in follower and '"engine"' not in follower  # the leader reports
