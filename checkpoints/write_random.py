"""Writes a random-weight HF checkpoint (Qwen2-MoE layout, sharded safetensors) for a config.

For measuring at real dimensions without the real weights, e.g. conversion memory::

    python -m brownout_jax.checkpoints.write_random --preset qwen1.5-moe-a2.7b \
        --num-layers 2 --out /tmp/qwen-2l

Tensors are generated one at a time and flushed shard by shard, so memory stays near one
shard.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file
from tqdm.auto import tqdm

from brownout_jax.checkpoints.hf_safetensors import INDEX_FILE, expected_hf_tensors
from brownout_jax.model.config import PRESETS, ModelConfig


def hf_config_dict(config: ModelConfig) -> dict:
    return {
        "architectures": ["Qwen2MoeForCausalLM"],
        "model_type": "qwen2_moe",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "rope_theta": config.rope_theta,
        "rms_norm_eps": config.rms_norm_eps,
        "num_experts": config.num_experts,
        "num_experts_per_tok": config.num_experts_per_tok,
        "moe_intermediate_size": config.moe_intermediate_size,
        "shared_expert_intermediate_size": config.shared_expert_intermediate_size,
        "intermediate_size": config.intermediate_size,
        "norm_topk_prob": config.norm_topk_prob,
        "decoder_sparse_step": config.decoder_sparse_step,
        "mlp_only_layers": list(config.mlp_only_layers),
        "qkv_bias": config.qkv_bias,
        "tie_word_embeddings": config.tie_word_embeddings,
        "max_position_embeddings": config.max_position_embeddings,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": list(config.eos_token_ids) or None,
        "hidden_act": "silu",
        "use_sliding_window": False,
        "torch_dtype": "bfloat16",
    }


def write_random_checkpoint(
    config: ModelConfig, out: Path, seed: int = 0, shard_bytes: int = 1 << 30
) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(hf_config_dict(config), indent=2) + "\n")
    rng = np.random.default_rng(seed)
    shapes = expected_hf_tensors(config, fused_experts=False)
    weight_map: dict[str, str] = {}
    shard: dict[str, np.ndarray] = {}
    shard_size = 0
    files: list[str] = []

    def flush() -> None:
        nonlocal shard, shard_size
        name = f"model-{len(files) + 1:05d}.safetensors"
        save_file(shard, out / name, metadata={"format": "pt"})
        files.append(name)
        weight_map.update(dict.fromkeys(shard, name))
        shard, shard_size = {}, 0

    for name, shape in tqdm(shapes.items(), desc="writing tensors", unit="tensor"):
        if "norm" in name:
            value = np.ones(shape, np.float32)
        else:
            value = rng.standard_normal(shape, np.float32) * 0.02
        shard[name] = value.astype(ml_dtypes.bfloat16)
        shard_size += shard[name].nbytes
        if shard_size >= shard_bytes:
            flush()
    if shard:
        flush()
    total = sum((out / f).stat().st_size for f in files)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--preset", choices=sorted(PRESETS))
    source.add_argument("--config", help="a HF config.json")
    parser.add_argument("--num-layers", type=int, help="keep only this many layers")
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.preset:
        config = PRESETS[args.preset]
    else:
        config = ModelConfig.from_hf_dict(json.loads(Path(args.config).read_text()))
    if args.num_layers:
        config = dataclasses.replace(
            config,
            num_layers=args.num_layers,
            mlp_only_layers=tuple(i for i in config.mlp_only_layers if i < args.num_layers),
        )
    write_random_checkpoint(config, Path(args.out), args.seed)


if __name__ == "__main__":
    main()
