"""Demonstrations run as ``python -m brownout_jax.demos.*``; never imported by the serving path."""
