"""One entry point for every checkpoint form: ``load_model(dir)`` → config, params, tokenizer."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp

from brownout_jax.checkpoints.errors import CheckpointError
from brownout_jax.checkpoints.hf_safetensors import TensorIndex, load_hf_params
from brownout_jax.checkpoints.orbax_store import is_converted, load_converted
from brownout_jax.checkpoints.united_store import abstract_united, load_united, read_united_manifest
from brownout_jax.model.config import ModelConfig
from brownout_jax.model.matmul_choice import pack_for_inference
from brownout_jax.model.params import ModelParams, abstract_params
from brownout_jax.united.united import attach_united

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    directory: Path
    config: ModelConfig
    params: ModelParams
    tokenizer: object | None  # a transformers tokenizer, or None: token ids only
    fingerprint: str  # identity of the source weights (united experts are tied to it)
    eos_token_ids: tuple[int, ...]
    united_manifest: dict | None = None  # set when united experts are attached

    @property
    def dtype(self):
        return self.params.embed.dtype


def resolve_dtype(name: str | None):
    """``auto``: bfloat16, except on a CPU without the compiled expert kernel: there the
    pure-JAX expert path is pathological in bf16 (XLA:CPU upcasts the whole expert stack)."""
    if name in (None, "auto"):
        if jax.default_backend() != "cpu":
            return jnp.bfloat16
        from brownout_jax.cpu_kernels import load_library

        return jnp.bfloat16 if load_library().available else jnp.float32
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {name!r}")
    return DTYPES[name]


def load_tokenizer(directory: str | Path):
    directory = Path(directory)
    if not any((directory / name).is_file() for name in _TOKENIZER_FILES):
        return None
    # transformers greets a torch-less import with an advisory "PyTorch was not found"
    # warning; the tokenizer is all we take from it, so that advice is noise. setdefault: a
    # user who sets the variable keeps their choice.
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    from transformers import AutoTokenizer  # heavy import, only when a tokenizer exists

    try:
        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except Exception as err:
        raise CheckpointError(
            f"{directory}: tokenizer files present but unreadable ({err})"
        ) from err


def _eos_ids(directory: Path, config: ModelConfig) -> tuple[int, ...]:
    ids = list(config.eos_token_ids)
    generation = directory / "generation_config.json"
    if generation.is_file():
        eos = json.loads(generation.read_text()).get("eos_token_id")
        for token in eos if isinstance(eos, list) else [eos]:
            if token is not None and int(token) not in ids:
                ids.append(int(token))
    return tuple(ids)


def abstract_model_params(
    directory: str | Path,
    dtype: str | None = "auto",
    united: str | Path | None = None,
    pack: bool = True,
    pack_experts: bool = True,
) -> ModelParams:
    """The parameters ``load_model`` will return, as ShapeDtypeStructs, from the configs and
    manifests alone (no weights read): what compiling the model's steps needs."""
    config = ModelConfig.from_pretrained_dir(directory)
    jdtype = resolve_dtype(dtype)
    params = abstract_params(config, jdtype)
    if united is not None:
        experts = abstract_united(read_united_manifest(united), config, jdtype)
        params = jax.eval_shape(lambda p, u: attach_united(p, config, u), params, experts)
    return pack_for_inference(params, experts=pack_experts) if pack else params


def load_model(
    directory: str | Path,
    dtype: str | None = "auto",
    progress: bool = True,
    united: str | Path | None = None,
    expected_way: int | None = None,
    pack: bool = True,
    pack_experts: bool = True,
) -> LoadedModel:
    """Loads a HF safetensors checkpoint or a ``brownout-jax convert`` output, with the united
    experts of ``united`` (a ``brownout-jax unite`` output) attached when given. With ``pack``
    (inference) the bf16 dense weights are packed for the CPU kernels as this machine's
    measured choice says (``model.matmul_choice``; a no-op off CPU), and with ``pack_experts``
    the expert stacks too (not for an expert-parallel mesh, which shards the stored stacks)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: checkpoint directory not found")
    config = ModelConfig.from_pretrained_dir(directory)
    jdtype = resolve_dtype(dtype)
    manifest = None
    if is_converted(directory):
        params, fingerprint = load_converted(directory, config, jdtype)
        if united is not None:
            united_experts, manifest = load_united(
                united, config, fingerprint, jdtype, expected_way
            )
            params = attach_united(params, config, united_experts)
    elif united is None:
        params, fingerprint = load_hf_params(directory, config, jdtype, progress)
    else:
        # United experts first (small, checked against the checkpoint's header fingerprint),
        # so the loader stacks them with the originals: no second copy of any expert stack.
        fingerprint = TensorIndex(directory).fingerprint()
        united_experts, manifest = load_united(united, config, fingerprint, jdtype, expected_way)
        if len(united_experts.layers) != len(config.moe_layers):
            raise CheckpointError(
                f"{united}: united experts cover {len(united_experts.layers)} MoE layers, the "
                f"model has {len(config.moe_layers)}"
            )
        by_layer = dict(zip(config.moe_layers, united_experts.layers, strict=True))
        del united_experts  # each layer's united experts are freed once stacked
        params, _ = load_hf_params(directory, config, jdtype, progress, united=by_layer)
    if pack:
        params = pack_for_inference(params, progress, consume=True, experts=pack_experts)
    return LoadedModel(
        directory=directory,
        config=config,
        params=params,
        tokenizer=load_tokenizer(directory),
        fingerprint=fingerprint,
        eos_token_ids=_eos_ids(directory, config),
        united_manifest=manifest,
    )
