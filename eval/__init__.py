"""Offline evaluation: accuracy vs threshold, throughput against a peer, bursty-load SLO runs.

Installed as ``brownout_jax.eval`` (setuptools package-dir); reached through
``brownout-jax eval …``. Task files live in ``eval/tasks/``.
"""
