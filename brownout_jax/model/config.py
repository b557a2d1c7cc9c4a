"""Model configuration: every field of a HF Qwen2-MoE ``config.json`` that changes the math.

A config the port cannot run faithfully (sliding-window attention, RoPE scaling, another
activation) is refused with :class:`UnsupportedConfigError` instead of being run wrongly.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES = ("qwen2_moe",)


class UnsupportedConfigError(ValueError):
    """A config.json asks for something this port does not implement."""


@dataclasses.dataclass(frozen=True, slots=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    num_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    shared_expert_intermediate_size: int
    intermediate_size: int
    norm_topk_prob: bool
    decoder_sparse_step: int
    mlp_only_layers: tuple[int, ...]
    qkv_bias: bool
    tie_word_embeddings: bool
    max_position_embeddings: int
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        positive = (
            "vocab_size",
            "hidden_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "intermediate_size",
            "max_position_embeddings",
            "decoder_sparse_step",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise UnsupportedConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedConfigError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise UnsupportedConfigError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.num_experts > 0 and not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise UnsupportedConfigError(
                f"num_experts_per_tok must be in [1, num_experts={self.num_experts}], "
                f"got {self.num_experts_per_tok}"
            )
        bad = [i for i in self.mlp_only_layers if not 0 <= i < self.num_layers]
        if bad:
            raise UnsupportedConfigError(f"mlp_only_layers has layers out of range: {bad}")

    def is_moe_layer(self, layer: int) -> bool:
        """Same rule as HF ``Qwen2MoeDecoderLayer``: sparse unless listed or off the step."""
        return (
            layer not in self.mlp_only_layers
            and self.num_experts > 0
            and (layer + 1) % self.decoder_sparse_step == 0
        )

    @property
    def moe_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_layers) if self.is_moe_layer(i))

    @property
    def heads_per_kv_head(self) -> int:
        return self.num_heads // self.num_kv_heads

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        """Builds the config from a parsed HF ``config.json``; refuses what the port cannot run."""
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedConfigError(
                f"model_type {model_type!r} is not supported (supported: {SUPPORTED_MODEL_TYPES})"
            )
        act = raw.get("hidden_act", "silu")
        if act != "silu":
            raise UnsupportedConfigError(f"hidden_act {act!r} is not supported (only 'silu')")
        if raw.get("use_sliding_window", False):
            raise UnsupportedConfigError("use_sliding_window=true is not supported")
        layer_types = raw.get("layer_types")
        if layer_types and any(t != "full_attention" for t in layer_types):
            raise UnsupportedConfigError(
                "layer_types other than 'full_attention' are not supported: "
                f"{sorted(set(layer_types))}"
            )
        rope_theta = _rope_theta(raw)
        num_heads = int(raw["num_attention_heads"])
        hidden = int(raw["hidden_size"])
        head_dim = raw.get("head_dim") or hidden // num_heads
        eos = raw.get("eos_token_id")
        eos_ids = (
            () if eos is None else tuple(int(e) for e in (eos if isinstance(eos, list) else [eos]))
        )
        num_kv = raw.get("num_key_value_heads")
        return cls(
            vocab_size=int(raw["vocab_size"]),
            hidden_size=hidden,
            num_layers=int(raw["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(num_kv if num_kv is not None else num_heads),
            head_dim=int(head_dim),
            rope_theta=rope_theta,
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            num_experts=int(raw.get("num_experts", 0)),
            num_experts_per_tok=int(raw.get("num_experts_per_tok", 1)),
            moe_intermediate_size=int(raw.get("moe_intermediate_size", 0)),
            shared_expert_intermediate_size=int(raw.get("shared_expert_intermediate_size", 0)),
            intermediate_size=int(raw["intermediate_size"]),
            norm_topk_prob=bool(raw.get("norm_topk_prob", False)),
            decoder_sparse_step=int(raw.get("decoder_sparse_step", 1)),
            mlp_only_layers=tuple(int(i) for i in (raw.get("mlp_only_layers") or ())),
            qkv_bias=bool(raw.get("qkv_bias", True)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            max_position_embeddings=int(raw.get("max_position_embeddings", 32768)),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )

    @classmethod
    def from_pretrained_dir(cls, directory: str | Path) -> ModelConfig:
        path = Path(directory) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no config.json in the checkpoint directory")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise UnsupportedConfigError(f"{path}: not valid JSON ({err})") from err
        return cls.from_hf_dict(raw)


def _rope_theta(raw: dict[str, Any]) -> float:
    # Older configs carry rope_theta + rope_scaling; transformers 5 writes rope_parameters.
    params = raw.get("rope_parameters")
    scaling = raw.get("rope_scaling")
    if params is not None:
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type != "default":
            raise UnsupportedConfigError(
                f"rope_parameters.rope_type {rope_type!r} is not supported"
            )
        return float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind != "default":
            raise UnsupportedConfigError(f"rope_scaling {scaling!r} is not supported")
    return float(raw.get("rope_theta", 10000.0))


# Named presets. Qwen1.5-MoE-A2.7B as published on the Hugging Face hub.
QWEN1_5_MOE_A2_7B = ModelConfig(
    vocab_size=151936,
    hidden_size=2048,
    num_layers=24,
    num_heads=16,
    num_kv_heads=16,
    head_dim=128,
    rope_theta=1_000_000.0,
    rms_norm_eps=1e-6,
    num_experts=60,
    num_experts_per_tok=4,
    moe_intermediate_size=1408,
    shared_expert_intermediate_size=5632,
    intermediate_size=5632,
    norm_topk_prob=False,
    decoder_sparse_step=1,
    mlp_only_layers=(),
    qkv_bias=True,
    tie_word_embeddings=False,
    max_position_embeddings=8192,
    bos_token_id=151643,
    eos_token_ids=(151643,),
)

# The bundled demo model (checkpoints/demo): Qwen1.5-MoE-A2.7B in miniature, same block
# structure, 32 experts top-4; its vocabulary is its own trained tokenizer's.
DEMO = QWEN1_5_MOE_A2_7B.replace(
    vocab_size=4096,
    hidden_size=192,
    num_layers=4,
    num_heads=4,
    num_kv_heads=4,
    head_dim=48,
    rope_theta=10000.0,
    num_experts=32,
    moe_intermediate_size=80,
    shared_expert_intermediate_size=320,
    intermediate_size=320,
    max_position_embeddings=1024,
    bos_token_id=0,
    eos_token_ids=(0,),
)

# A random model small enough to compile in seconds: tests and the multi-process demo.
TINY = DEMO.replace(
    vocab_size=128,
    hidden_size=32,
    num_layers=3,
    num_kv_heads=2,
    head_dim=8,
    num_experts=16,
    moe_intermediate_size=16,
    shared_expert_intermediate_size=24,
    intermediate_size=40,
    max_position_embeddings=128,
    bos_token_id=None,
    eos_token_ids=(),
)

PRESETS: dict[str, ModelConfig] = {
    "qwen1.5-moe-a2.7b": QWEN1_5_MOE_A2_7B,
    "demo": DEMO,
    "tiny": TINY,
}
