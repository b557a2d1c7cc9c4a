"""Checkpoint I/O: HF safetensors → typed params, orbax save/restore, conversion.

Installed as ``brownout_jax.checkpoints`` (setuptools package-dir), so no generic top-level
``checkpoints`` module lands in site-packages.
"""

from brownout_jax.checkpoints.errors import CheckpointError
from brownout_jax.checkpoints.loader import LoadedModel, load_model

__all__ = ["CheckpointError", "LoadedModel", "load_model"]
