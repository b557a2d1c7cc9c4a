"""Converted checkpoints: typed params in orbax, beside the HF config and tokenizer files.

Layout of a converted directory::

    config.json, generation_config.json, tokenizer files   (copied from the HF checkpoint)
    brownout_checkpoint.json                               (format, dtype, source fingerprint)
    params/                                                (orbax PyTree checkpoint)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from brownout_jax.checkpoints.atomic import atomic_directory
from brownout_jax.checkpoints.errors import CheckpointError
from brownout_jax.model.config import ModelConfig
from brownout_jax.model.packed_params import unpack_dense_weights, unpack_expert_weights
from brownout_jax.model.params import ModelParams, abstract_params

MANIFEST = "brownout_checkpoint.json"
FORMAT = "brownout-jax-params"
FORMAT_VERSION = 1
PARAMS_DIR = "params"
# Small files that travel with the weights: config, generation and tokenizer files.
_CARRIED_SUFFIXES = (".json", ".txt", ".model", ".tiktoken", ".jinja")


def is_converted(directory: str | Path) -> bool:
    return (Path(directory) / MANIFEST).is_file()


def read_manifest(directory: str | Path) -> dict:
    path = Path(directory) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: unreadable manifest ({err})") from err
    if manifest.get("format") != FORMAT or manifest.get("version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format {manifest.get('format')!r} v{manifest.get('version')} is not "
            f"{FORMAT!r} v{FORMAT_VERSION}"
        )
    return manifest


def save_converted(
    params: ModelParams,
    source_dir: str | Path,
    out_dir: str | Path,
    fingerprint: str,
    overwrite: bool = False,
) -> Path:
    """Writes into a temporary sibling and renames at the end: an interrupted conversion
    leaves no half-written checkpoint behind. Weights packed for the CPU kernels are written
    in their stored (K, N) / stacked layout: the format on disk never depends on the machine."""
    params = unpack_expert_weights(unpack_dense_weights(params))
    with atomic_directory(out_dir, overwrite) as tmp:
        for item in sorted(Path(source_dir).iterdir()):
            carried = item.suffix in _CARRIED_SUFFIXES and "safetensors" not in item.name
            if item.is_file() and carried:
                shutil.copy2(item, tmp / item.name)
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(tmp / PARAMS_DIR, params)
        dtype = jax.tree_util.tree_leaves(params)[0].dtype
        manifest = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "dtype": jnp.dtype(dtype).name,
            "fingerprint": fingerprint,
            "source": str(Path(source_dir).absolute()),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    out = Path(out_dir).absolute()
    return out


def load_converted(directory: str | Path, config: ModelConfig, dtype) -> tuple[ModelParams, str]:
    """Restores params (cast to ``dtype``) and returns them with the source fingerprint."""
    directory = Path(directory).absolute()
    manifest = read_manifest(directory)
    target = abstract_params(config, dtype)
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            params = checkpointer.restore(directory / PARAMS_DIR, target)
    except Exception as err:
        raise CheckpointError(
            f"{directory / PARAMS_DIR}: cannot restore params for this config.json ({err})"
        ) from err
    return params, manifest["fingerprint"]
