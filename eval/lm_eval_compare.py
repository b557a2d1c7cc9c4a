"""Per-sample agreement of two lm-evaluation-harness runs of one task, from their samples files.

    python -m brownout_jax.eval.lm_eval_compare A_SAMPLES.jsonl B_SAMPLES.jsonl [--tol 1e-3]

The files are what ``lm_eval --log_samples --output_path DIR`` writes
(``DIR/<model>/samples_<task>_<time>.jsonl``), typically the ``hf`` backend on a checkpoint (A)
and ``local-completions`` against ``brownout-jax serve`` on the same checkpoint (B). Samples pair
up by ``doc_id``. Loglikelihood requests (multiple choice) compare their log-probabilities
(max and mean |A − B|) and is_greedy flags; generate_until requests compare their texts
exactly. Exit status 0 when every paired loglikelihood is within ``--tol``, every is_greedy
flag and every generation agrees, and both files hold the same documents; else 1.

Reads the files only: no lm-eval import, so it runs wherever the project does.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

import numpy as np

DEFAULT_TOL = 1e-3
SHOWN_MISMATCHES = 5


@dataclasses.dataclass(frozen=True, slots=True)
class Comparison:
    docs: int  # documents in both files
    only_a: tuple[int, ...]  # doc_ids in one file only
    only_b: tuple[int, ...]
    prompt_mismatches: tuple[int, ...]  # paired doc_ids whose requests differ
    loglikelihoods: int  # paired loglikelihood requests
    max_abs_diff: float  # nan when there are none
    mean_abs_diff: float
    worst_doc: int | None  # doc_id of the largest |diff|
    greedy_disagreements: int
    greedy_a: int  # A's loglikelihoods flagged greedy (all-false flags agree trivially)
    choice_docs: int  # paired docs with more than one loglikelihood request (multiple choice)
    choice_disagreements: int  # of those, docs whose argmax choice differs
    generations: int
    identical_generations: int
    # Identical empty or one-word generations say little: how much text was compared.
    mean_generation_chars: float  # of A's generations; nan when there are none
    empty_generations: int  # of A's
    generation_mismatches: tuple[int, ...]  # doc_ids
    metrics_a: dict[str, float]  # per-sample metrics averaged over the paired docs
    metrics_b: dict[str, float]

    def agrees(self, tol: float = DEFAULT_TOL) -> bool:
        within = self.loglikelihoods == 0 or self.max_abs_diff <= tol
        return (
            within
            and not (self.only_a or self.only_b or self.prompt_mismatches)
            and self.greedy_disagreements == 0
            and self.identical_generations == self.generations
        )


def read_samples(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _loglikelihood(response) -> tuple[float, bool] | None:
    """(logprob, is_greedy) of one loglikelihood response, or None for a generation. lm-eval
    0.4.x writes the pair as strings ("-3.2", "False"); older versions as numbers."""
    if isinstance(response, str):
        return None
    logprob, greedy = response
    if isinstance(greedy, str):
        if greedy not in ("True", "False"):
            raise ValueError(f"is_greedy flag {greedy!r} is neither True nor False")
        greedy = greedy == "True"
    return float(logprob), bool(greedy)


def _responses(sample: dict) -> list:
    """One response per request of the sample: lm-eval stores ``resps`` as a list per request
    of its repeats; these tasks run each request once."""
    return [resp[0] for resp in sample["resps"]]


def _numeric_metrics(samples: list[dict]) -> dict[str, float]:
    """The per-sample metrics that are numbers aggregated as lm-eval does: perplexity from
    its per-sample loglikelihoods, the others (acc, exact_match, …) as means. Corpus-level
    metrics such as chrf store (reference, prediction) pairs and are left out."""
    out = {}
    for name in samples[0].get("metrics", []) if samples else []:
        values = [s.get(name) for s in samples]
        if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
            mean = float(np.mean(values))
            out[name] = math.exp(-mean) if name == "perplexity" else mean
    return out


def compare(a: list[dict], b: list[dict]) -> Comparison:
    by_a = {s["doc_id"]: s for s in a}
    by_b = {s["doc_id"]: s for s in b}
    common = sorted(by_a.keys() & by_b.keys())
    prompt_mismatches = []
    diffs: list[float] = []
    diff_docs: list[int] = []
    greedy_disagreements = greedy_a = choice_docs = choice_disagreements = 0
    generations = identical = 0
    generation_mismatches = []
    generation_chars: list[int] = []
    for doc_id in common:
        sa, sb = by_a[doc_id], by_b[doc_id]
        # Same requests on both sides, else the pairing is meaningless (a different task file
        # or --limit order); prompt_hash is absent from old lm-eval versions.
        if sa.get("prompt_hash") != sb.get("prompt_hash") or len(sa["resps"]) != len(sb["resps"]):
            prompt_mismatches.append(doc_id)
            continue
        ra, rb = _responses(sa), _responses(sb)
        lls_a = [_loglikelihood(r) for r in ra]
        lls_b = [_loglikelihood(r) for r in rb]
        if all(x is not None for x in lls_a + lls_b):
            for (la, ga), (lb, gb) in zip(lls_a, lls_b, strict=True):
                diffs.append(abs(la - lb))
                diff_docs.append(doc_id)
                greedy_disagreements += ga != gb
                greedy_a += ga
            if len(lls_a) > 1:
                choice_docs += 1
                pick_a = int(np.argmax([x[0] for x in lls_a]))
                pick_b = int(np.argmax([x[0] for x in lls_b]))
                choice_disagreements += pick_a != pick_b
        elif all(x is None for x in lls_a + lls_b):
            for ta, tb in zip(ra, rb, strict=True):
                generations += 1
                generation_chars.append(len(ta))
                if ta == tb:
                    identical += 1
                elif doc_id not in generation_mismatches:
                    generation_mismatches.append(doc_id)
        else:
            prompt_mismatches.append(doc_id)
    d = np.asarray(diffs, dtype=np.float64)
    worst = int(np.argmax(d)) if d.size else None
    paired_a = [by_a[i] for i in common if i not in prompt_mismatches]
    paired_b = [by_b[i] for i in common if i not in prompt_mismatches]
    return Comparison(
        docs=len(common),
        only_a=tuple(sorted(by_a.keys() - by_b.keys())),
        only_b=tuple(sorted(by_b.keys() - by_a.keys())),
        prompt_mismatches=tuple(prompt_mismatches),
        loglikelihoods=int(d.size),
        max_abs_diff=float(d.max()) if d.size else float("nan"),
        mean_abs_diff=float(d.mean()) if d.size else float("nan"),
        worst_doc=None if worst is None else diff_docs[worst],
        greedy_disagreements=int(greedy_disagreements),
        greedy_a=int(greedy_a),
        choice_docs=choice_docs,
        choice_disagreements=int(choice_disagreements),
        generations=generations,
        identical_generations=identical,
        mean_generation_chars=float(np.mean(generation_chars)) if generations else float("nan"),
        empty_generations=sum(n == 0 for n in generation_chars),
        generation_mismatches=tuple(generation_mismatches),
        metrics_a=_numeric_metrics(paired_a),
        metrics_b=_numeric_metrics(paired_b),
    )


def report(c: Comparison, tol: float = DEFAULT_TOL) -> str:
    lines = [f"documents paired: {c.docs}"]
    if c.only_a or c.only_b:
        lines.append(f"only in A: {len(c.only_a)}, only in B: {len(c.only_b)} (doc_ids differ)")
    if c.prompt_mismatches:
        shown = list(c.prompt_mismatches[:SHOWN_MISMATCHES])
        lines.append(f"requests differ in {len(c.prompt_mismatches)} docs, e.g. {shown}")
    if c.loglikelihoods:
        lines.append(
            f"loglikelihoods: {c.loglikelihoods}, max |A-B| {c.max_abs_diff:.3g} "
            f"(doc {c.worst_doc}), mean |A-B| {c.mean_abs_diff:.3g}, tolerance {tol:g}"
        )
        lines.append(
            f"is_greedy disagreements: {c.greedy_disagreements}/{c.loglikelihoods} "
            f"(A: {c.greedy_a} greedy)"
        )
    if c.choice_docs:
        lines.append(f"argmax choice disagreements: {c.choice_disagreements}/{c.choice_docs}")
    if c.generations:
        lines.append(
            f"identical generations: {c.identical_generations}/{c.generations} (A's: "
            f"{c.mean_generation_chars:.1f} characters on average, {c.empty_generations} empty)"
        )
        if c.generation_mismatches:
            shown = list(c.generation_mismatches[:SHOWN_MISMATCHES])
            lines.append(f"generations differ in docs {shown}")
    for name in sorted(c.metrics_a.keys() | c.metrics_b.keys()):
        va, vb = c.metrics_a.get(name, float("nan")), c.metrics_b.get(name, float("nan"))
        lines.append(f"{name}: A {va:.4f}, B {vb:.4f}")
    lines.append("AGREE" if c.agrees(tol) else "DISAGREE")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m brownout_jax.eval.lm_eval_compare",
        description="Per-sample agreement of two lm-eval samples files of one task.",
    )
    p.add_argument("a", help="samples_<task>_*.jsonl of the reference run (e.g. the hf backend)")
    p.add_argument("b", help="samples_<task>_*.jsonl of the run checked against it")
    p.add_argument(
        "--tol", type=float, default=DEFAULT_TOL, help="largest |loglikelihood difference|"
    )
    args = p.parse_args(argv)
    comparison = compare(read_samples(args.a), read_samples(args.b))
    print(report(comparison, args.tol))
    return 0 if comparison.agrees(args.tol) else 1


if __name__ == "__main__":
    sys.exit(main())
