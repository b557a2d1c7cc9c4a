"""Engine configuration: capacity, shape buckets, brownout ladder and controller."""

from __future__ import annotations

import dataclasses

from brownout_jax.engine.attention_path import AttentionPath, resolve_attention
from brownout_jax.engine.buckets import EngineBuckets, geometric
from brownout_jax.engine.controller import DEFAULT_CONTROLLER, ControllerConfig
from brownout_jax.moe.expert_backend import ExpertBackend
from brownout_jax.moe.ladder import DEFAULT_LADDER, ThresholdLadder
from brownout_jax.moe.mesh_config import MeshConfig


def default_bucket_growth(backend: str) -> int:
    """4 on XLA:CPU, where every compiled step holds hundreds of memory mappings for the
    whole run (see map_budget); 2 elsewhere, which pads least."""
    return 4 if backend == "cpu" else 2


@dataclasses.dataclass(frozen=True, slots=True)
class EngineConfig:
    max_batch: int = 16  # decode slots (sequences running at once)
    max_prefill_batch: int = 4  # prompts per prefill step
    # Padded prompt tokens per prefill step; None: max(2048, the longest prefill row).
    max_prefill_tokens: int | None = None
    # With the attention kernel, a prompt longer than this is prefilled in chunks of this
    # many tokens (each attending to the cache written so far): a step's memory is bounded
    # by the chunk, and decode steps run between a long prompt's chunks.
    prefill_chunk: int = 512
    # AUTO: the paged-attention kernel where it runs (XLA:CPU), else XLA's ops; resolved by
    # for_model(…, head_dim).
    attention: AttentionPath = AttentionPath.AUTO
    block_size: int = 16
    num_blocks: int = 512  # KV blocks in the pool (block 0 is reserved)
    # Prompt + generated tokens of one sequence. None: the model's max_position_embeddings,
    # capped by what the KV pool holds (see for_model).
    max_model_len: int | None = None
    # Let max_model_len exceed max_position_embeddings: positions past it were never trained
    # and RoPE extrapolates, so quality is not guaranteed; off unless asked for.
    allow_context_extrapolation: bool = False
    min_prefill_len: int = 16
    max_queue: int = 1024  # requests waiting for admission before RESOURCE_EXHAUSTED
    # Ratio between consecutive shape buckets: 2 pads least; 4 compiles about half the steps
    # (on XLA:CPU each step holds hundreds of memory mappings, see map_budget).
    bucket_growth: int = 2
    ladder: ThresholdLadder = DEFAULT_LADDER
    controller: ControllerConfig = DEFAULT_CONTROLLER
    exempt_layers: tuple[int, ...] = ()  # MoE layers that never brown out
    mesh: MeshConfig | None = None  # expert parallelism over this many devices; None: one
    experts_backend: ExpertBackend = ExpertBackend.AUTO  # how routed experts run
    # Warm-up: False compiles the whole step grid before the engine starts; True starts
    # serving once the minimal set is compiled (every request fits it, padded) and compiles
    # the rest in the background, each executable put to use as it arrives (the server).
    compile_in_background: bool = False
    # Timed executions of each step compiled before serving (the latency model's base; the
    # first, untimed execution is always made). 0: learn every step's latency while serving.
    latency_samples: int = 3
    compile_workers: int | None = None  # concurrent compilations; None: every usable core
    # Structured outputs: every step takes a (rows, vocab/32) token mask in its upload (0.6 MB
    # a step at Qwen's vocabulary and batch 32); False leaves it out and refuses such requests.
    structured_output: bool = True

    def __post_init__(self) -> None:
        names = ("max_batch", "max_prefill_batch", "block_size", "max_model_len", "max_queue")
        for name in (*names, "prefill_chunk"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be ≥ 1, got {value}")
        if self.latency_samples < 0:
            raise ValueError(f"latency_samples must be ≥ 0, got {self.latency_samples}")
        if self.bucket_growth < 2:
            raise ValueError(f"bucket_growth must be ≥ 2, got {self.bucket_growth}")
        if self.num_blocks < 2:
            raise ValueError(f"num_blocks must be ≥ 2 (one is reserved), got {self.num_blocks}")
        if self.max_model_len is None:
            return  # checked again once for_model resolves it
        per_sequence = -(-self.max_model_len // self.block_size)
        if self.num_blocks - 1 < per_sequence:
            raise ValueError(
                f"num_blocks ({self.num_blocks}, one reserved) cannot hold one sequence of "
                f"max_model_len {self.max_model_len} in blocks of {self.block_size}"
            )
        longest = self.longest_prefill_row
        if self.max_prefill_tokens is not None and self.max_prefill_tokens < longest:
            raise ValueError(
                f"max_prefill_tokens ({self.max_prefill_tokens}) must be ≥ {longest} (the "
                "longest prefill row: max_model_len, or prefill_chunk with the attention "
                "kernel) so that any prompt can be prefilled"
            )

    @property
    def chunked_prefill(self) -> bool:
        """Long prompts go in chunks: only with the kernel (its cost follows the tokens
        attended; XLA would gather a whole window per chunk)."""
        return self.attention == AttentionPath.KERNEL

    @property
    def longest_prefill_row(self) -> int:
        """Tokens of one row of a prefill step at most (the prefill length buckets' top)."""
        if self.max_model_len is None:
            raise ValueError("resolve the context limit first: EngineConfig.for_model")
        if self.chunked_prefill:
            return min(self.prefill_chunk, self.max_model_len)
        return self.max_model_len

    @property
    def kv_capacity(self) -> int:
        """Tokens the KV pool holds for one sequence (block 0 is reserved)."""
        return (self.num_blocks - 1) * self.block_size

    def for_model(self, max_position_embeddings: int, head_dim: int | None = None) -> EngineConfig:
        """This config with its context limit settled against the model: ``max_model_len``
        defaults to the model's positions capped by the KV pool, and may exceed the positions
        only with ``allow_context_extrapolation``. The one place the engine's context limit
        is set. With ``head_dim``, the attention path is settled for this machine too."""
        length = self.max_model_len
        if length is None:
            length = min(max_position_embeddings, self.kv_capacity)
        elif length > max_position_embeddings and not self.allow_context_extrapolation:
            raise ValueError(
                f"max_model_len (--max-model-len) {length} exceeds the model's "
                f"max_position_embeddings {max_position_embeddings}: positions past it were never "
                "trained and RoPE would extrapolate; leave it unset to use the model's limit, or "
                "force it with allow_context_extrapolation (--allow-context-extrapolation)"
            )
        attention = self.attention
        if head_dim is not None:
            attention = resolve_attention(attention, head_dim)
        resolved = dataclasses.replace(self, max_model_len=length, attention=attention)
        if self.max_prefill_tokens is None:
            longest = resolved.longest_prefill_row
            resolved = dataclasses.replace(resolved, max_prefill_tokens=max(2048, longest))
        return resolved

    def buckets(self) -> EngineBuckets:
        if self.max_model_len is None:
            raise ValueError("resolve the context limit first: EngineConfig.for_model")
        g = self.bucket_growth
        longest = self.longest_prefill_row
        lengths = geometric(min(self.min_prefill_len, longest), longest, g)
        max_width = -(-self.max_model_len // self.block_size)
        return EngineBuckets(
            prefill_batches=geometric(1, self.max_prefill_batch, g),
            prefill_lengths=lengths,
            # No decode bucket of one row: XLA:CPU then copies the whole KV pool around the
            # cache update (24 pool copies, 34 ms vs 3.7 ms for 4 rows on the demo); a padded
            # second row costs nothing in comparison.
            decode_batches=geometric(min(2, self.max_batch), self.max_batch, g),
            # The kernel reads each row up to its own length: one width (the whole table)
            # costs nothing more than a narrow one, and saves compiling the others.
            decode_widths=(max_width,) if self.chunked_prefill else geometric(1, max_width, g),
            block_size=self.block_size,
            # A chunk attends to every earlier position: its table is the whole sequence's.
            prefill_table_width=max_width if self.chunked_prefill else None,
        )
