"""Log-likelihood scoring of multiple-choice items and perplexity, at a brownout threshold.

Brownout is applied as when serving a prefill: the threshold's hot set is computed over each
scoring batch's real tokens. Batches have a fixed size so that a rerun routes identically.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from brownout_jax.engine.buckets import right_padded
from brownout_jax.eval.tasks import ChoiceItem
from brownout_jax.model.config import ModelConfig
from brownout_jax.model.params import ModelParams
from brownout_jax.model.transformer import forward_logits
from brownout_jax.moe.options import MoeOptions


@functools.partial(jax.jit, static_argnames=("config", "options"))
def token_logprobs(params, tokens, lengths, *, config: ModelConfig, options: MoeOptions):
    """log p(tokens[:, t + 1] | tokens[:, : t + 1]) for every t, shape (B, T - 1)."""
    logits = forward_logits(params, config, tokens, lengths, options)
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    return jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]


def continuation_logprobs(
    params: ModelParams,
    config: ModelConfig,
    sequences: Sequence[Sequence[int]],
    starts: Sequence[int],
    options: MoeOptions,
    batch_size: int = 16,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """(sum of log-probs, token count) of ``seq[start:]`` given ``seq[:start]``, per sequence."""
    sums = np.zeros(len(sequences))
    counts = np.zeros(len(sequences), np.int64)
    batches = range(0, len(sequences), batch_size)
    for begin in tqdm(batches, desc="scoring", disable=not progress):
        chunk = sequences[begin : begin + batch_size]
        tokens, lengths = right_padded(chunk, batch_size)  # fixed rows: reruns route alike
        logp = np.asarray(
            token_logprobs(
                params, jnp.asarray(tokens), jnp.asarray(lengths), config=config, options=options
            )
        )
        for i, seq in enumerate(chunk):
            start = starts[begin + i]
            # Token t + 1 is predicted at position t: continuation tokens start..len-1.
            picked = logp[i, start - 1 : len(seq) - 1]
            sums[begin + i] = float(picked.sum())
            counts[begin + i] = picked.size
    return sums, counts


@dataclasses.dataclass(frozen=True, slots=True)
class AccuracyResult:
    accuracy: float
    accuracy_stderr: float
    accuracy_norm: float  # choice picked by mean log-prob per token
    items: int


def score_items(
    params: ModelParams,
    config: ModelConfig,
    tokenizer,
    items: Sequence[ChoiceItem],
    options: MoeOptions,
    num_fewshot: int = 0,
    batch_size: int = 16,
    progress: bool = False,
) -> AccuracyResult:
    shots, evaluated = items[:num_fewshot], items[num_fewshot:]
    if not evaluated:
        raise ValueError(f"--num-fewshot {num_fewshot} leaves no items to evaluate")
    prefix = "".join(f"{s.context} {s.choices[s.label]}\n\n" for s in shots)
    sequences, starts, owner = [], [], []
    for index, item in enumerate(evaluated):
        context = tokenizer.encode(prefix + item.context, add_special_tokens=False)
        for choice in item.choices:
            continuation = tokenizer.encode(" " + choice, add_special_tokens=False)
            sequences.append(context + continuation)
            starts.append(len(context))
            owner.append(index)
    too_long = max(len(s) for s in sequences)
    if too_long > config.max_position_embeddings:
        raise ValueError(
            f"an item needs {too_long} tokens; the context is {config.max_position_embeddings}"
        )
    sums, counts = continuation_logprobs(
        params, config, sequences, starts, options, batch_size, progress
    )
    correct = correct_norm = 0
    cursor = 0
    for item in evaluated:
        n = len(item.choices)
        item_sums = sums[cursor : cursor + n]
        item_means = item_sums / np.maximum(counts[cursor : cursor + n], 1)
        correct += int(np.argmax(item_sums) == item.label)
        correct_norm += int(np.argmax(item_means) == item.label)
        cursor += n
    total = len(evaluated)
    accuracy = correct / total
    return AccuracyResult(
        accuracy=accuracy,
        accuracy_stderr=math.sqrt(accuracy * (1 - accuracy) / total),
        accuracy_norm=correct_norm / total,
        items=total,
    )


def perplexity(
    params: ModelParams,
    config: ModelConfig,
    token_ids: Sequence[int],
    options: MoeOptions,
    seq_len: int = 256,
    batch_size: int = 8,
) -> float:
    windows = [list(token_ids[i : i + seq_len]) for i in range(0, len(token_ids), seq_len)]
    windows = [w for w in windows if len(w) > 1]
    if not windows:
        raise ValueError("perplexity: the text has fewer than 2 tokens")
    sums, counts = continuation_logprobs(
        params, config, windows, [1] * len(windows), options, batch_size
    )
    return float(math.exp(-sums.sum() / counts.sum()))
