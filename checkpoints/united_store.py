"""United experts on disk: an orbax checkpoint beside a JSON manifest.

Layout::

    united_manifest.json   format, way, grouping, groups per layer, source fingerprint, MSE table,
                           optionally the exempt-layer choice (``brownout_jax.united.exemption``)
    united/                orbax PyTree of UnitedExperts (stacked per layer, experts' layout)

United experts are tied to the checkpoint they were distilled from (its fingerprint); loading
them for another checkpoint, or with another ``way`` than asked, fails naming both values.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from brownout_jax.checkpoints.atomic import atomic_directory
from brownout_jax.checkpoints.errors import CheckpointError
from brownout_jax.model.config import ModelConfig
from brownout_jax.model.params import ExpertWeights
from brownout_jax.united.united import UnitedExperts, UnitedLayer

MANIFEST = "united_manifest.json"
FORMAT = "brownout-jax-united"
FORMAT_VERSION = 1
WEIGHTS_DIR = "united"


def save_united(
    united: UnitedExperts,
    out_dir: str | Path,
    *,
    way: int,
    grouping: str,
    source_fingerprint: str,
    moe_layers: tuple[int, ...],
    reports: list,
    calibration: dict,
    overwrite: bool = False,
) -> Path:
    """Writes into a temporary sibling, renamed at the end: an interrupted run leaves nothing."""
    with atomic_directory(out_dir, overwrite) as tmp:
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(tmp / WEIGHTS_DIR, united)
        manifest = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "way": way,
            "grouping": grouping,
            "source_fingerprint": source_fingerprint,
            "moe_layers": list(moe_layers),
            "dtype": jnp.dtype(united.layers[0].experts.w_gate.dtype).name,
            "groups": [layer.group_of_expert.tolist() for layer in united.layers],
            "mse": [dataclasses.asdict(r) for r in reports],
            "calibration": calibration,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    out = Path(out_dir).absolute()
    return out


def read_united_manifest(directory: str | Path) -> dict:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{directory}: not a united-experts directory (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: unreadable manifest ({err})") from err
    if manifest.get("format") != FORMAT or manifest.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: not a {FORMAT} v{FORMAT_VERSION} manifest")
    return manifest


def update_united_manifest(directory: str | Path, key: str, value) -> Path:
    """Sets one optional manifest entry (e.g. the exempt-layer choice); the file is replaced
    atomically, and manifests without the entry keep loading."""
    path = Path(directory) / MANIFEST
    manifest = read_united_manifest(directory)
    manifest[key] = value
    tmp = path.with_name(f".{MANIFEST}.partial-{os.getpid()}")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def abstract_united(manifest: dict, config: ModelConfig, dtype) -> UnitedExperts:
    """The united experts a manifest describes, as ShapeDtypeStructs of ``dtype``."""
    d, f = config.hidden_size, config.moe_intermediate_size
    sds = jax.ShapeDtypeStruct

    def layer(groups: list[int]) -> UnitedLayer:
        u = max(groups) + 1
        return UnitedLayer(
            experts=ExpertWeights(
                sds((u, d, f), dtype), sds((u, d, f), dtype), sds((u, f, d), dtype)
            ),
            group_of_expert=sds((config.num_experts,), jnp.int32),
        )

    return UnitedExperts(layers=tuple(layer(g) for g in manifest["groups"]))


def load_united(
    directory: str | Path,
    config: ModelConfig,
    model_fingerprint: str,
    dtype,
    expected_way: int | None = None,
) -> tuple[UnitedExperts, dict]:
    directory = Path(directory).absolute()
    manifest = read_united_manifest(directory)
    if manifest["source_fingerprint"] != model_fingerprint:
        raise CheckpointError(
            f"{directory}: united experts were made for checkpoint "
            f"{manifest['source_fingerprint']}, but this model is {model_fingerprint}"
        )
    if expected_way is not None and manifest["way"] != expected_way:
        raise CheckpointError(
            f"{directory}: united experts were made with way {manifest['way']}, "
            f"but way {expected_way} was asked for"
        )
    if tuple(manifest["moe_layers"]) != config.moe_layers:
        raise CheckpointError(f"{directory}: MoE layers {manifest['moe_layers']} do not match")
    target = abstract_united(manifest, config, jnp.dtype(manifest["dtype"]))
    # Onto this process's first device, whatever the topology it was saved from: each process
    # of a multi-process engine restores its own whole copy (and shards it itself).
    here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=here), target
    )
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            united = checkpointer.restore(directory / WEIGHTS_DIR, target)
    except Exception as err:
        raise CheckpointError(
            f"{directory / WEIGHTS_DIR}: cannot restore united experts ({err})"
        ) from err
    united = jax.tree_util.tree_map(
        lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, united
    )
    return united, manifest
