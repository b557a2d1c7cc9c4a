"""brownout-jax: SLO-aware serving of MoE LLMs on JAX with brownout to united experts."""

__version__ = "0.1.0"
