"""Expert-parallel measurements for docs/ARCHITECTURE.md ("Expert parallelism").

1. Bytes each token dispatch/combine scheme moves per MoE layer at Qwen1.5-MoE size (hidden
   2048, 60 experts top-4, way-4 united, bf16 activations): analytic figures, and the
   collectives of compiled HLO with their operand sizes. The chosen scheme is the real
   ``moe_block`` under a mesh; the two token-sharded alternatives are lowered as minimal
   dispatch/combine sketches (their expert compute is left out: only the collectives count).
2. Per-device load (rows, tokens, distinct experts) of one Zipf-skewed random MoE layer at
   thresholds 1, 0.5 and 0.
3. With ``--engine-demo``: the serving engine's own per-device load statistics
   (``Engine.stats().device_load``) on the bundled demo model, 16 requests per fixed threshold.

Needs as many devices as the mesh: ``XLA_FLAGS=--xla_force_host_platform_device_count=4
python -m brownout_jax.bench.expert_parallel``. A measurement script, not a test.
"""

from __future__ import annotations

import argparse
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from brownout_jax.bench.moe_layer import MoeLayerShape, make_layer, tokens_for
from brownout_jax.model.params import DenseMlpParams, ExpertWeights, MoeParams
from brownout_jax.moe.block import moe_block
from brownout_jax.moe.expert_parallel import ExpertLayout, make_mesh, routed_load
from brownout_jax.moe.mesh_config import AXIS, MeshConfig
from brownout_jax.moe.options import MoeOptions

QWEN = MoeLayerShape()
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_HLO_OP = re.compile(
    r"=\s+(\(?[a-z0-9]+\[[0-9,]*\][^=]*?)\s+(" + "|".join(COLLECTIVES) + r")(?:-start)?\("
)
_SHAPE = re.compile(r"([a-z]+[0-9]*)\[([0-9,]*)\]")
_HLO_ITEMSIZE = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2}
_HLO_ITEMSIZE |= {"f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}


def collectives(hlo_text: str) -> list[tuple[str, str, int, str]]:
    """(collective, element type, result elements, result shapes) of every collective in an
    HLO module's text; a tuple-shaped result (XLA:CPU's all-to-all) counts all its parts."""
    found = []
    for match in _HLO_OP.finditer(hlo_text):
        result, op = match.groups()
        shapes = _SHAPE.findall(result)
        elements = sum(math.prod(int(d) for d in dims.split(",") if d) for _, dims in shapes)
        text = f"{shapes[0][0]}[{shapes[0][1]}]"
        if len(shapes) > 1:
            text = f"{len(shapes)} × {text}"
        found.append((op, shapes[0][0], elements, text))
    return found


def link_bytes(op: str, result_bytes: float, n: int) -> float:
    """Bytes one device sends for a collective whose result has ``result_bytes``, with ring
    algorithms (all-reduce = reduce-scatter + all-gather; a reduce-scatter's result is one
    device's 1/n of the payload)."""
    share = (n - 1) / n
    if op == "all-reduce":
        return 2 * share * result_bytes
    if op == "reduce-scatter":
        return share * result_bytes * n
    return share * result_bytes


def _abstract_ep_moe(shape: MoeLayerShape, way: int, mesh, dtype) -> MoeParams:
    n = mesh.shape[AXIS]
    layout = ExpertLayout.for_counts(shape.experts, -(-shape.experts // way), n)
    d, f, fs = shape.hidden, shape.intermediate, shape.shared_intermediate
    rep = NamedSharding(mesh, P())
    split = NamedSharding(mesh, P(AXIS))
    slots = layout.slots_per_shard

    def sds(s, sharding=rep, dt=dtype):
        return jax.ShapeDtypeStruct(s, dt, sharding=sharding)

    return MoeParams(
        router=sds((d, shape.experts)),
        experts=ExpertWeights(
            sds((n, slots, d, f), split), sds((n, slots, d, f), split), sds((n, slots, f, d), split)
        ),
        shared=DenseMlpParams(sds((d, fs)), sds((d, fs)), sds((fs, d))),
        shared_gate=sds((d, 1)),
        group_of_expert=sds((shape.experts,), dt=jnp.int32),
    )


def _chosen_hlo(tokens: int, shape: MoeLayerShape, mesh, threshold: float, dtype) -> str:
    params = _abstract_ep_moe(shape, 4, mesh, dtype)
    rep = NamedSharding(mesh, P())
    x = jax.ShapeDtypeStruct((tokens, shape.hidden), dtype, sharding=rep)
    mask = jax.ShapeDtypeStruct((tokens,), jnp.bool_, sharding=rep)
    options = MoeOptions(threshold=threshold, mesh=mesh)

    def layer(x, params, mask):
        return moe_block(x, params, mask, shape.top_k, False, options).out

    return jax.jit(layer).lower(x, params, mask).compile().as_text()


def _gather_scatter_hlo(tokens: int, shape: MoeLayerShape, mesh, dtype) -> str:
    """Token-sharded activations: all-gather the tokens, reduce-scatter the outputs."""

    def per_device(x):
        everyone = jax.lax.all_gather(x, AXIS, tiled=True)
        return jax.lax.psum_scatter(everyone * 2, AXIS, tiled=True)

    x = jax.ShapeDtypeStruct((tokens, shape.hidden), dtype, sharding=NamedSharding(mesh, P(AXIS)))
    f = jax.shard_map(per_device, mesh=mesh, in_specs=P(AXIS), out_specs=P(AXIS))
    return jax.jit(f).lower(x).compile().as_text()


def _all_to_all_hlo(tokens: int, shape: MoeLayerShape, mesh, dtype) -> str:
    """Token-sharded activations, each assignment sent to its expert's device and back. Exact
    routing (no dropped tokens) needs room for all of a device's assignments in every peer's
    slot: a static (n, N/n · K, D) buffer each way."""
    n = mesh.shape[AXIS]
    capacity = tokens // n * shape.top_k

    def per_device(x):
        send = jnp.broadcast_to(x.reshape(1, -1, x.shape[-1])[:, :1], (n, capacity, x.shape[-1]))
        received = jax.lax.all_to_all(send, AXIS, 0, 0, tiled=True)
        back = jax.lax.all_to_all(received * 2, AXIS, 0, 0, tiled=True)
        return x + jnp.sum(back, axis=(0, 1))[None]

    x = jax.ShapeDtypeStruct((tokens, shape.hidden), dtype, sharding=NamedSharding(mesh, P(AXIS)))
    f = jax.shard_map(per_device, mesh=mesh, in_specs=P(AXIS), out_specs=P(AXIS))
    return jax.jit(f).lower(x).compile().as_text()


def analytic_bytes(tokens: int, n: int, shape: MoeLayerShape = QWEN, itemsize: int = 2) -> dict:
    """Per-device bytes sent per MoE layer by each scheme (ring collectives)."""
    act = tokens * shape.hidden * itemsize  # (N, D) activations
    share = (n - 1) / n
    return {
        "replicated + psum (chosen)": 2 * share * act,
        "all-gather + reduce-scatter": 2 * share * act,
        "all-to-all, expected (ragged)": 2 * share * act * shape.top_k / n,
        "all-to-all, static no-drop": 2 * share * act * shape.top_k,
    }


def comm_table(n: int = 4, shape: MoeLayerShape = QWEN) -> list[dict]:
    mesh = make_mesh(MeshConfig(n), jax.devices()[:n])
    dtype = jnp.bfloat16
    rows = []
    for phase, tokens in (("decode", 32), ("prefill", 512)):
        measured = {
            "replicated + psum (chosen)": _chosen_hlo(tokens, shape, mesh, 0.5, dtype),
            "all-gather + reduce-scatter": _gather_scatter_hlo(tokens, shape, mesh, dtype),
            "all-to-all, static no-drop": _all_to_all_hlo(tokens, shape, mesh, dtype),
        }
        for scheme, figure in analytic_bytes(tokens, n, shape).items():
            ops = collectives(measured[scheme]) if scheme in measured else []
            as_bf16 = sum(link_bytes(op, count * 2, n) for op, _, count, _ in ops)
            compiled = sum(link_bytes(op, count * _HLO_ITEMSIZE[dt], n) for op, dt, count, _ in ops)
            rows.append(
                {
                    "phase": f"{phase} {tokens}",
                    "scheme": scheme,
                    "analytic_kib": round(figure / 1024, 1),
                    "hlo_collectives": ", ".join(f"{op} {text}" for op, _, _, text in ops) or "-",
                    "hlo_kib_as_bf16": round(as_bf16 / 1024, 1) if ops else "-",
                    "hlo_kib_as_compiled": round(compiled / 1024, 1) if ops else "-",
                }
            )
    return rows


def load_table(
    n: int = 4, way: int = 4, skew: float = 1.0, batches: int = 20, seed: int = 0
) -> list[dict]:
    """Mean over ``batches`` random batches of per-device load, one Zipf-skewed layer with
    Qwen's expert count and top-k at a small hidden size."""
    shape = MoeLayerShape(hidden=64, intermediate=32, shared_intermediate=64)
    params, direction = make_layer(shape, way, skew, jnp.float32, seed)
    rows = []
    for phase, tokens in (("decode", 32), ("prefill", 512)):
        for threshold in (1.0, 0.5, 0.0):
            stats = []
            for b in range(batches):
                x = tokens_for(tokens, shape, direction, seed + 1000 * b + tokens, jnp.float32)
                mask = jnp.ones(tokens, bool)
                one = routed_load(x, params, mask, shape.top_k, False, threshold, 1)
                load = routed_load(x, params, mask, shape.top_k, False, threshold, n)
                rows_dev = np.asarray(load.assignments)
                experts = np.asarray(load.experts)
                stats.append(
                    (
                        int(one.experts[0]),
                        experts.max(),
                        experts.mean(),
                        rows_dev.max(),
                        rows_dev.mean(),
                        np.asarray(load.tokens).max(),
                    )
                )
            m = np.mean(np.asarray(stats, np.float64), axis=0)
            rows.append(
                {
                    "phase": f"{phase} {tokens}",
                    "threshold": threshold,
                    "experts_one_device": round(m[0], 1),
                    "experts_max": round(m[1], 1),
                    "experts_mean": round(m[2], 1),
                    "rows_max": round(m[3], 1),
                    "rows_mean": round(m[4], 1),
                    "rows_max_over_mean": round(m[3] / m[4], 2),
                    "tokens_max": round(m[5], 1),
                }
            )
    return rows


DEMO_PROMPTS = (
    "Return the absolute value of",
    "Sort the list in place",
    "Open a file and return",
    "Compute the greatest common divisor",
    "Split the string at",
    "Return True if the path",
    "Encode the object as JSON",
    "Raise ValueError if",
    "Read all lines from",
    "Join the path components",
    "Return a copy of the dictionary",
    "Create a new thread",
    "Parse the date string",
    "Return the number of items",
    "Close the socket",
    "Remove the directory tree",
)


def engine_load_table(n: int = 4, levels=(0.0, 0.5, 1.0), new_tokens: int = 20) -> list[dict]:
    """Engine stats on the demo model (contiguous way-4 united experts) under a mesh of n:
    the 16 prompts together at each fixed threshold, greedy, EOS ignored."""
    from brownout_jax.checkpoints import load_model
    from brownout_jax.checkpoints.demo_model import demo_model_dir, demo_united_dir
    from brownout_jax.engine.config import EngineConfig
    from brownout_jax.engine.controller import ControllerConfig
    from brownout_jax.engine.front import Engine
    from brownout_jax.engine.requests import GenerationRequest
    from brownout_jax.moe.ladder import ThresholdLadder

    model = load_model(
        demo_model_dir(), "float32", progress=False, united=demo_united_dir("contiguous")
    )
    config = EngineConfig(
        max_batch=16,
        max_prefill_batch=16,
        max_prefill_tokens=1024,
        block_size=32,  # one block per sequence: few decode buckets to compile
        num_blocks=1 + 16,
        max_model_len=32,  # prompts of ≤ 10 tokens + 20 new
        ladder=ThresholdLadder(tuple(levels)),
        mesh=MeshConfig(n),
    )
    engine = Engine(model.params, model.config, config, model.tokenizer, progress=False)
    try:
        for level in levels:
            fixed = ControllerConfig(mode="fixed", fixed_threshold=level)
            engine.set_controller(fixed)
            handles = [
                engine.submit(
                    GenerationRequest(
                        prompt=p, max_new_tokens=new_tokens, ignore_eos=True, detokenize=False
                    )
                )
                for p in DEMO_PROMPTS
            ]
            for handle in handles:
                handle.result(timeout=600)
        loads = engine.stats().device_load
    finally:
        engine.shutdown(drain=False)
    return [
        {
            "phase": s.phase,
            "threshold": s.threshold,
            "steps": s.steps,
            "tokens_per_device": " / ".join(f"{v:.1f}" for v in s.tokens),
            "experts_per_device": " / ".join(f"{v:.2f}" for v in s.experts),
            "busiest_experts": round(s.busiest_experts, 2),
            "token_imbalance": round(s.token_imbalance, 2),
            "expert_imbalance": round(s.expert_imbalance, 2),
        }
        for s in sorted(loads, key=lambda s: (s.phase != "prefill", -s.threshold))
    ]


def _markdown(rows: list[dict]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys)]
    lines += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--skew", type=float, default=1.0)
    parser.add_argument(
        "--engine-demo", action="store_true", help="also the engine's stats on the demo model"
    )
    args = parser.parse_args(argv)
    print(f"communication per MoE layer, per device, {args.devices} devices")
    print(_markdown(comm_table(args.devices)))
    print(f"\nload per device, {args.devices} devices, zipf skew {args.skew}")
    print(_markdown(load_table(args.devices, skew=args.skew)))
    if args.engine_demo:
        print(f"\nengine stats, demo model, {args.devices} devices, per MoE layer per step")
        print(_markdown(engine_load_table(args.devices)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
