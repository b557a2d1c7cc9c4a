"""Typed params → a HF ``Qwen2MoeForCausalLM`` checkpoint (config.json + model.safetensors).

The inverse of ``hf_safetensors.load_hf_params``: our (in, out) linear weights are transposed
back to HF's (out, in), routed experts are written one tensor per expert (the hub format), and
the tensor names are exactly ``expected_hf_tensors(config, fused_experts=False)``.
"""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from brownout_jax.checkpoints.hf_safetensors import SINGLE_FILE, expected_hf_tensors
from brownout_jax.checkpoints.write_random import hf_config_dict
from brownout_jax.model.config import ModelConfig
from brownout_jax.model.params import DenseMlpParams, ModelParams, MoeParams

STORAGE_DTYPES = {"bfloat16": ml_dtypes.bfloat16, "float32": np.float32}


def _t(w) -> np.ndarray:
    return np.asarray(w, np.float32).T


def _dense(prefix: str, mlp: DenseMlpParams) -> dict[str, np.ndarray]:
    return {
        prefix + "gate_proj.weight": _t(mlp.w_gate),
        prefix + "up_proj.weight": _t(mlp.w_up),
        prefix + "down_proj.weight": _t(mlp.w_down),
    }


def hf_tensors(params: ModelParams, config: ModelConfig) -> dict[str, np.ndarray]:
    """HF name → fp32 array in HF layout, for every tensor the checkpoint needs."""
    out = {"model.embed_tokens.weight": np.asarray(params.embed, np.float32)}
    for i, layer in enumerate(params.layers):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = np.asarray(layer.input_norm, np.float32)
        out[p + "post_attention_layernorm.weight"] = np.asarray(
            layer.post_attention_norm, np.float32
        )
        att = layer.attention
        for proj, w, b in (("q", att.wq, att.bq), ("k", att.wk, att.bk), ("v", att.wv, att.bv)):
            out[f"{p}self_attn.{proj}_proj.weight"] = _t(w)
            if b is not None:
                out[f"{p}self_attn.{proj}_proj.bias"] = np.asarray(b, np.float32)
        out[p + "self_attn.o_proj.weight"] = _t(att.wo)
        mlp = layer.mlp
        if isinstance(mlp, MoeParams):
            out[p + "mlp.gate.weight"] = _t(mlp.router)
            experts = mlp.experts
            for j in range(config.num_experts):
                q = f"{p}mlp.experts.{j}."
                out[q + "gate_proj.weight"] = _t(experts.w_gate[j])
                out[q + "up_proj.weight"] = _t(experts.w_up[j])
                out[q + "down_proj.weight"] = _t(experts.w_down[j])
            if mlp.shared is not None:
                out.update(_dense(p + "mlp.shared_expert.", mlp.shared))
                out[p + "mlp.shared_expert_gate.weight"] = _t(mlp.shared_gate)
        else:
            out.update(_dense(p + "mlp.", mlp))
    out["model.norm.weight"] = np.asarray(params.final_norm, np.float32)
    if params.lm_head is not None:
        out["lm_head.weight"] = _t(params.lm_head)
    expected = expected_hf_tensors(config, fused_experts=False)
    if set(out) != set(expected):
        differ = sorted(set(out) ^ set(expected))
        raise ValueError(f"tensor names differ from the HF layout: {differ}")
    for name, shape in expected.items():
        if out[name].shape != shape:
            raise ValueError(f"{name}: shape {out[name].shape}, HF expects {shape}")
    return out


def write_hf_checkpoint(
    params: ModelParams,
    config: ModelConfig,
    out: Path,
    storage_dtype: str = "bfloat16",
    extra_config: dict | None = None,
) -> Path:
    """Writes config.json and a single model.safetensors (weights cast to ``storage_dtype``)."""
    out.mkdir(parents=True, exist_ok=True)
    raw = hf_config_dict(config)
    raw["torch_dtype"] = storage_dtype
    raw.update(extra_config or {})
    (out / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    dtype = STORAGE_DTYPES[storage_dtype]
    tensors = {
        name: np.ascontiguousarray(value.astype(dtype))
        for name, value in hf_tensors(params, config).items()
    }
    save_file(tensors, out / SINGLE_FILE, metadata={"format": "pt"})
    (out / SINGLE_FILE).chmod(0o644)
    return out
