"""Benchmarks (``brownout-jax bench …`` and ``python -m brownout_jax.bench.*``): measurement
commands for docs/BENCHMARKS.md, never imported by the serving path."""
