"""``brownout-jax bench sampling``: what the OpenAI sampling features cost a decode step —
TPOT of a batch decoding plainly, with top-20 alternatives per token, with penalties, logit
bias and min-p, and under a JSON grammar, through the engine ``serve`` runs, the modes
interleaved round by round so that a noisy machine weighs on each alike. A benchmark, not a
test.
"""

from __future__ import annotations

import dataclasses
import enum
import statistics

import numpy as np

from brownout_jax.engine.requests import (
    MAX_LOGPROBS,
    GenerationRequest,
    StructuredKind,
    StructuredOutput,
)


class SamplingMode(enum.StrEnum):
    PLAIN = "plain"
    ALTERNATIVES = "top-logprobs"  # MAX_LOGPROBS alternatives per token
    PENALTIES = "penalties"  # presence, frequency, repetition, a 16-entry logit bias, min-p
    GRAMMAR = "json-object"  # structured output: any JSON object


def _request(mode: SamplingMode, prompt: tuple[int, ...], tokens: int, seed: int):
    fields: dict = {}
    if mode is SamplingMode.ALTERNATIVES:
        fields = {"top_logprobs": MAX_LOGPROBS}
    elif mode is SamplingMode.PENALTIES:
        fields = {
            "presence_penalty": 0.5,
            "frequency_penalty": 0.5,
            "repetition_penalty": 1.1,
            "logit_bias": tuple((t, -1.0) for t in range(1, 17)),
            "min_p": 0.05,
        }
    elif mode is SamplingMode.GRAMMAR:
        fields = {"structured": StructuredOutput(StructuredKind.JSON_OBJECT)}
    return GenerationRequest(
        prompt_token_ids=prompt,
        max_new_tokens=tokens,
        temperature=1.0,
        seed=seed,
        ignore_eos=mode is not SamplingMode.GRAMMAR,  # a grammar ends with its object
        detokenize=False,
        **fields,
    )


def _batch_tpot(engine, mode: SamplingMode, batch: int, tokens: int, rng) -> float:
    """The median over the batch of each request's mean time per output token."""
    vocab = engine.model_config.vocab_size
    handles = [
        engine.submit(_request(mode, tuple(rng.integers(0, vocab, 32).tolist()), tokens, int(seed)))
        for seed in rng.integers(0, 2**31, batch)
    ]
    tpots = [h.result(timeout=600).metrics.tpot_mean for h in handles]
    return statistics.median(t for t in tpots if t is not None)


def run_sampling_bench(
    engine, batch: int, tokens: int, rounds: int, modes: tuple[SamplingMode, ...]
) -> dict:
    rng = np.random.default_rng(0)
    _batch_tpot(engine, SamplingMode.PLAIN, batch, 4, rng)  # first runs of the buckets
    samples: dict[SamplingMode, list[float]] = {mode: [] for mode in modes}
    for _ in range(rounds):
        for mode in modes:
            samples[mode].append(_batch_tpot(engine, mode, batch, tokens, rng))
    plain = statistics.median(samples[SamplingMode.PLAIN]) if SamplingMode.PLAIN in modes else None
    rows = []
    for mode in modes:
        tpot = statistics.median(samples[mode])
        rows.append(
            dataclasses.asdict(
                _Row(mode.value, tpot * 1e3, None if plain is None else tpot / plain)
            )
        )
    return {"batch": batch, "tokens": tokens, "rounds": rounds, "modes": rows}


@dataclasses.dataclass(frozen=True, slots=True)
class _Row:
    mode: str
    tpot_ms: float  # median over rounds of the batch's median TPOT
    vs_plain: float | None
