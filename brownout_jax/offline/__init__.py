"""Offline generation: a batch of prompts through jitted prefill/decode steps, no engine."""
