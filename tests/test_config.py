"""Model config from HF config.json: all math-relevant fields; unsupported configs refused."""

from __future__ import annotations

import pytest

from brownout_jax.model.config import QWEN1_5_MOE_A2_7B, ModelConfig, UnsupportedConfigError

# config.json of Qwen/Qwen1.5-MoE-A2.7B as published on the hub.
QWEN_CONFIG_JSON = {
    "architectures": ["Qwen2MoeForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "decoder_sparse_step": 1,
    "eos_token_id": 151643,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 5632,
    "max_position_embeddings": 8192,
    "max_window_layers": 21,
    "model_type": "qwen2_moe",
    "moe_intermediate_size": 1408,
    "norm_topk_prob": False,
    "num_attention_heads": 16,
    "num_experts": 60,
    "num_experts_per_tok": 4,
    "num_hidden_layers": 24,
    "num_key_value_heads": 16,
    "output_router_logits": False,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "router_aux_loss_coef": 0.001,
    "shared_expert_intermediate_size": 5632,
    "sliding_window": 32768,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}


def test_real_qwen_config_equals_preset():
    assert ModelConfig.from_hf_dict(QWEN_CONFIG_JSON) == QWEN1_5_MOE_A2_7B
    assert QWEN1_5_MOE_A2_7B.moe_layers == tuple(range(24))


def test_transformers5_rope_parameters_are_read():
    raw = dict(QWEN_CONFIG_JSON)
    del raw["rope_theta"]
    raw["rope_parameters"] = {"rope_type": "default", "rope_theta": 1234.0}
    assert ModelConfig.from_hf_dict(raw).rope_theta == 1234.0


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"use_sliding_window": True}, "use_sliding_window"),
        ({"rope_scaling": {"type": "yarn", "factor": 4.0}}, "rope_scaling"),
        ({"rope_parameters": {"rope_type": "linear", "factor": 2.0}}, "rope_type"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"model_type": "llama"}, "model_type"),
        ({"num_key_value_heads": 5}, "num_key_value_heads"),
        ({"mlp_only_layers": [30]}, "mlp_only_layers"),
        ({"num_experts_per_tok": 61}, "num_experts_per_tok"),
        ({"layer_types": ["sliding_attention"] * 24}, "layer_types"),
    ],
)
def test_unsupported_configs_are_refused_naming_the_field(change, field):
    with pytest.raises(UnsupportedConfigError, match=field):
        ModelConfig.from_hf_dict({**QWEN_CONFIG_JSON, **change})


def test_sparse_layer_rule_matches_transformers():
    import transformers

    hf = transformers.Qwen2MoeConfig(
        num_hidden_layers=6,
        decoder_sparse_step=2,
        mlp_only_layers=[3],
        hidden_size=16,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=8,
        vocab_size=10,
        num_experts=4,
        moe_intermediate_size=4,
        shared_expert_intermediate_size=4,
    )
    model = transformers.Qwen2MoeModel(hf)
    sparse = tuple(
        i
        for i, layer in enumerate(model.layers)
        if type(layer.mlp).__name__ == "Qwen2MoeSparseMoeBlock"
    )
    assert ModelConfig.from_hf_dict(hf.to_dict()).moe_layers == sparse == (1, 5)
