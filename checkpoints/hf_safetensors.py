"""HF safetensors checkpoints (single file or sharded with an index) → typed model params.

Tensors are read one at a time and cast on load; stacked expert arrays are assembled in one
host buffer per layer and moved to the device before the next is built, so peak host memory
stays near the size of the loaded params (never two copies of a large checkpoint).
Every problem names the tensor or file: missing and unexpected tensors and wrong shapes are
all found from the headers before any data is read.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import jax
import ml_dtypes
import numpy as np
from tqdm.auto import tqdm

from brownout_jax.checkpoints.errors import CheckpointError
from brownout_jax.model.config import ModelConfig
from brownout_jax.model.params import (
    AttentionParams,
    DecoderLayerParams,
    DenseMlpParams,
    ExpertWeights,
    ModelParams,
    MoeParams,
)
from brownout_jax.united.united import UnitedLayer

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Non-persistent buffers some exporters wrote; they carry no weights.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}


@dataclasses.dataclass(frozen=True, slots=True)
class TensorEntry:
    path: Path
    dtype: str  # safetensors dtype tag, e.g. "BF16"
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in the file
    nbytes: int


def read_safetensors_header(path: Path) -> dict[str, TensorEntry]:
    """Parses and checks a safetensors header: every tensor's bytes must lie inside the file.

    Reading the header ourselves (instead of memory-mapping the file) keeps file pages out of
    the process's resident memory and lets a truncated or garbled file be named precisely.
    """
    size = path.stat().st_size
    with path.open("rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        header_len = struct.unpack("<Q", prefix)[0]
        if header_len > size - 8:
            raise CheckpointError(f"{path}: corrupt safetensors header (length {header_len})")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{path}: corrupt safetensors header ({err})") from err
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    base = 8 + header_len
    entries: dict[str, TensorEntry] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"{path}: corrupt header entry for tensor {name!r}") from err
        if dtype not in _DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {dtype}")
        expected = int(np.prod(shape, dtype=np.int64)) * _DTYPES[dtype].itemsize
        if end - begin != expected or base + end > size or begin < 0:
            raise CheckpointError(
                f"{path}: tensor {name!r} lies outside the file or has the wrong byte size "
                "(truncated or corrupt file)"
            )
        entries[name] = TensorEntry(path, dtype, shape, base + begin, end - begin)
    return entries


class TensorIndex:
    """Which file holds each tensor, with its HF shape and dtype, read from headers only."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.entries: dict[str, TensorEntry] = {}
        for path, names in self._files().items():
            present = read_safetensors_header(path)
            for name in names if names is not None else sorted(present):
                if name not in present:
                    raise CheckpointError(
                        f"{path}: tensor {name!r} is listed in {INDEX_FILE} but not in the file"
                    )
                self.entries[name] = present[name]

    @property
    def shape_of(self) -> dict[str, tuple[int, ...]]:
        return {name: entry.shape for name, entry in self.entries.items()}

    def _files(self) -> dict[Path, list[str] | None]:
        index = self.directory / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise CheckpointError(f"{index}: not a valid safetensors index ({err})") from err
            files: dict[Path, list[str]] = {}
            for name, filename in weight_map.items():
                files.setdefault(self.directory / filename, []).append(name)
            for path in files:
                if not path.is_file():
                    raise CheckpointError(f"{path}: shard listed in {INDEX_FILE} is missing")
            return dict(files)
        single = self.directory / SINGLE_FILE
        if single.is_file():
            return {single: None}
        shards = sorted(self.directory.glob("*.safetensors"))
        if not shards:
            raise CheckpointError(
                f"{self.directory}: no {SINGLE_FILE}, {INDEX_FILE} or *.safetensors"
            )
        return dict.fromkeys(shards)

    def fingerprint(self) -> str:
        """Identity of the weights: config plus every tensor's name, dtype and shape."""
        digest = hashlib.sha256()
        config = self.directory / "config.json"
        if config.is_file():
            digest.update(config.read_bytes())
        for name in sorted(self.entries):
            entry = self.entries[name]
            digest.update(f"{name}|{entry.dtype}|{entry.shape}\n".encode())
        return digest.hexdigest()[:16]


def expected_hf_tensors(config: ModelConfig, fused_experts: bool) -> dict[str, tuple[int, ...]]:
    """HF tensor name → HF shape ((out, in) for linear weights) of every weight the model needs."""
    d, c = config.hidden_size, config.head_dim
    hc, gc = config.num_heads * c, config.num_kv_heads * c
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config.vocab_size, d)}
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = (d,)
        out[p + "post_attention_layernorm.weight"] = (d,)
        for proj, width in (("q", hc), ("k", gc), ("v", gc)):
            out[f"{p}self_attn.{proj}_proj.weight"] = (width, d)
            if config.qkv_bias:
                out[f"{p}self_attn.{proj}_proj.bias"] = (width,)
        out[p + "self_attn.o_proj.weight"] = (d, hc)
        if config.is_moe_layer(i):
            e, f = config.num_experts, config.moe_intermediate_size
            out[p + "mlp.gate.weight"] = (e, d)
            if fused_experts:
                out[p + "mlp.experts.gate_up_proj"] = (e, 2 * f, d)
                out[p + "mlp.experts.down_proj"] = (e, d, f)
            else:
                for j in range(e):
                    out[f"{p}mlp.experts.{j}.gate_proj.weight"] = (f, d)
                    out[f"{p}mlp.experts.{j}.up_proj.weight"] = (f, d)
                    out[f"{p}mlp.experts.{j}.down_proj.weight"] = (d, f)
            fs = config.shared_expert_intermediate_size
            if fs > 0:
                out.update(_dense_names(p + "mlp.shared_expert.", d, fs))
                out[p + "mlp.shared_expert_gate.weight"] = (1, d)
        else:
            out.update(_dense_names(p + "mlp.", d, config.intermediate_size))
    out["model.norm.weight"] = (d,)
    if not config.tie_word_embeddings:
        out["lm_head.weight"] = (config.vocab_size, d)
    return out


def _dense_names(prefix: str, d: int, f: int) -> dict[str, tuple[int, ...]]:
    return {
        prefix + "gate_proj.weight": (f, d),
        prefix + "up_proj.weight": (f, d),
        prefix + "down_proj.weight": (d, f),
    }


def validate(index: TensorIndex, config: ModelConfig) -> tuple[dict[str, tuple[int, ...]], bool]:
    fused = any(name.endswith("mlp.experts.gate_up_proj") for name in index.shape_of)
    expected = expected_hf_tensors(config, fused)
    present = {n for n in index.shape_of if not n.endswith(_IGNORED_SUFFIXES)}
    if config.tie_word_embeddings:
        present.discard("lm_head.weight")  # some exporters store the tied copy anyway
    missing = sorted(set(expected) - present)
    if missing:
        raise CheckpointError(
            f"{index.directory}: {len(missing)} tensor(s) missing, e.g. {missing[:5]}"
        )
    unexpected = sorted(present - set(expected))
    if unexpected:
        raise CheckpointError(
            f"{index.directory}: {len(unexpected)} unexpected tensor(s), e.g. {unexpected[:5]}"
        )
    for name, shape in expected.items():
        if index.entries[name].shape != shape:
            raise CheckpointError(
                f"tensor {name!r} in {index.entries[name].path} has shape "
                f"{index.entries[name].shape}, "
                f"expected {shape} for this config.json"
            )
    return expected, fused


class _Reader:
    """Reads tensors one at a time with plain file reads, casting on the way."""

    def __init__(self, index: TensorIndex, dtype, progress: tqdm | None):
        self.index = index
        self.dtype = np.dtype(dtype)
        self.progress = progress
        self._stack = contextlib.ExitStack()
        self._files: dict[Path, BinaryIO] = {}

    def __enter__(self) -> _Reader:
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def _file(self, entry: TensorEntry) -> BinaryIO:
        if entry.path not in self._files:
            self._files[entry.path] = self._stack.enter_context(entry.path.open("rb"))
        return self._files[entry.path]

    def _read_into(self, name: str, entry: TensorEntry, out: np.ndarray, offset: int) -> None:
        f = self._file(entry)
        f.seek(entry.offset + offset)
        if f.readinto(memoryview(out.reshape(-1).view(np.uint8))) != out.nbytes:
            raise CheckpointError(f"{entry.path}: tensor {name!r} is truncated")

    def raw(self, name: str) -> np.ndarray:
        entry = self.index.entries[name]
        array = np.empty(entry.shape, _DTYPES[entry.dtype])
        self._read_into(name, entry, array, 0)
        if self.progress is not None:
            self.progress.update(1)
        return array

    def host(self, name: str, transpose: bool = False) -> np.ndarray:
        if not transpose:
            return np.ascontiguousarray(self.raw(name), dtype=self.dtype)
        # Transposed (HF stores (out, in)): read row blocks straight into the (in, out) result,
        # so the host holds the result and one block, not the raw tensor as well (for an LM
        # head, 622 MB less at the loading peak).
        entry = self.index.entries[name]
        rows, cols = entry.shape
        out = np.empty((cols, rows), self.dtype)
        block_rows = max(1, (16 << 20) // max(1, cols * np.dtype(_DTYPES[entry.dtype]).itemsize))
        block = np.empty((min(block_rows, rows), cols), _DTYPES[entry.dtype])
        for start in range(0, rows, block_rows):
            part = block[: min(block_rows, rows - start)]
            self._read_into(name, entry, part, start * cols * part.itemsize)
            out[:, start : start + part.shape[0]] = part.T
        if self.progress is not None:
            self.progress.update(1)
        return out

    def device(self, name: str, transpose: bool = False) -> jax.Array:
        # Wait for the copy so that host buffers are freed one tensor at a time.
        return jax.device_put(self.host(name, transpose)).block_until_ready()


def load_hf_params(
    directory: str | Path,
    config: ModelConfig,
    dtype,
    progress: bool = True,
    united: dict[int, UnitedLayer] | None = None,
) -> tuple[ModelParams, str]:
    """Loads and validates a HF checkpoint; returns the params and the source fingerprint.
    ``united`` experts per MoE layer index (checked against the fingerprint by the caller) are
    stacked after each layer's originals as they are read — the (E + U) stacks are built once,
    never as a copy of loaded (E) stacks — and dropped from the dict once stacked."""
    index = TensorIndex(directory)
    expected, fused = validate(index, config)
    extra = {} if united is None else united
    bar = tqdm(total=len(expected), desc="loading tensors", unit="tensor", disable=not progress)
    with bar, _Reader(index, dtype, bar) as reader:
        params = ModelParams(
            embed=reader.device("model.embed_tokens.weight"),
            layers=tuple(
                _layer(reader, config, i, fused, extra.pop(i, None))
                for i in range(config.num_layers)
            ),
            final_norm=reader.device("model.norm.weight"),
            lm_head=None if config.tie_word_embeddings else reader.device("lm_head.weight", True),
        )
    return params, index.fingerprint()


def _dense(reader: _Reader, prefix: str) -> DenseMlpParams:
    return DenseMlpParams(
        w_gate=reader.device(prefix + "gate_proj.weight", True),
        w_up=reader.device(prefix + "up_proj.weight", True),
        w_down=reader.device(prefix + "down_proj.weight", True),
    )


def _stacked(
    reader: _Reader,
    count: int,
    read_one: Callable[[int], np.ndarray],
    appended: jax.Array | None = None,
) -> jax.Array:
    """The ``count`` tensors stacked, then ``appended`` rows (united experts), in one buffer."""
    first = read_one(0)
    extra = 0 if appended is None else appended.shape[0]
    buffer = np.empty((count + extra, *first.shape), reader.dtype)
    buffer[0] = first
    del first
    for j in range(1, count):
        buffer[j] = read_one(j)
    if extra:
        buffer[count:] = np.asarray(appended).astype(reader.dtype)
    return jax.device_put(buffer).block_until_ready()


def _experts(
    reader: _Reader, prefix: str, config: ModelConfig, fused: bool, united: UnitedLayer | None
) -> ExpertWeights:
    e, f = config.num_experts, config.moe_intermediate_size
    extra = None if united is None else united.experts
    if fused:
        gate_up = reader.raw(prefix + "gate_up_proj")  # (E, 2F, D)
        down = reader.raw(prefix + "down_proj")  # (E, D, F)
        parts = (
            gate_up[:, :f].transpose(0, 2, 1),
            gate_up[:, f:].transpose(0, 2, 1),
            down.transpose(0, 2, 1),
        )
        appended = (None,) * 3 if extra is None else (extra.w_gate, extra.w_up, extra.w_down)
        return ExpertWeights(
            *(
                _stacked(reader, e, lambda j, part=part: part[j], more)
                for part, more in zip(parts, appended, strict=True)
            )
        )

    def one(kind: str) -> Callable[[int], np.ndarray]:
        return lambda j: reader.raw(f"{prefix}{j}.{kind}_proj.weight").T

    return ExpertWeights(
        w_gate=_stacked(reader, e, one("gate"), None if extra is None else extra.w_gate),
        w_up=_stacked(reader, e, one("up"), None if extra is None else extra.w_up),
        w_down=_stacked(reader, e, one("down"), None if extra is None else extra.w_down),
    )


def _layer(
    reader: _Reader, config: ModelConfig, i: int, fused: bool, united: UnitedLayer | None
) -> DecoderLayerParams:
    p = f"model.layers.{i}."
    bias = config.qkv_bias

    def maybe_bias(proj: str) -> jax.Array | None:
        return reader.device(f"{p}self_attn.{proj}_proj.bias") if bias else None

    attention = AttentionParams(
        wq=reader.device(p + "self_attn.q_proj.weight", True),
        wk=reader.device(p + "self_attn.k_proj.weight", True),
        wv=reader.device(p + "self_attn.v_proj.weight", True),
        wo=reader.device(p + "self_attn.o_proj.weight", True),
        bq=maybe_bias("q"),
        bk=maybe_bias("k"),
        bv=maybe_bias("v"),
    )
    if config.is_moe_layer(i):
        has_shared = config.shared_expert_intermediate_size > 0
        mlp = MoeParams(
            router=reader.device(p + "mlp.gate.weight", True),
            experts=_experts(reader, p + "mlp.experts.", config, fused, united),
            shared=_dense(reader, p + "mlp.shared_expert.") if has_shared else None,
            shared_gate=reader.device(p + "mlp.shared_expert_gate.weight", True)
            if has_shared
            else None,
            group_of_expert=None if united is None else united.group_of_expert,
        )
    else:
        mlp = _dense(reader, p + "mlp.")
    return DecoderLayerParams(
        input_norm=reader.device(p + "input_layernorm.weight"),
        attention=attention,
        post_attention_norm=reader.device(p + "post_attention_layernorm.weight"),
        mlp=mlp,
    )
