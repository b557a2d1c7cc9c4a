"""The network: configuration, typed parameters, the Qwen2-MoE forward pass, KV caches."""
