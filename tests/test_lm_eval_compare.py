"""eval/lm_eval_compare.py on small samples files written the way lm-eval 0.4.13's
--log_samples writes them (responses as strings, one list of repeats per request)."""

from __future__ import annotations

import json
import math

import pytest

from brownout_jax.eval.lm_eval_compare import compare, main, read_samples, report


def mc_sample(doc_id: int, logprobs, greedy=None, prompt="p") -> dict:
    greedy = greedy or [False] * len(logprobs)
    return {
        "doc_id": doc_id,
        "doc": {"goal": "g", "label": 0},
        "target": "0",
        "arguments": {f"gen_args_{i}": {"arg_0": "g", "arg_1": " c"} for i in range(len(logprobs))},
        "resps": [[[str(lp), str(g)]] for lp, g in zip(logprobs, greedy, strict=True)],
        "filtered_resps": [[str(lp), str(g)] for lp, g in zip(logprobs, greedy, strict=True)],
        "filter": "none",
        "metrics": ["acc", "acc_norm"],
        "doc_hash": "d",
        "prompt_hash": prompt,
        "target_hash": "t",
        "acc": 1.0 if max(logprobs) == logprobs[0] else 0.0,
        "acc_norm": 0.0,
    }


def gen_sample(doc_id: int, text: str) -> dict:
    return {
        "doc_id": doc_id,
        "doc": {"text": "a b", "context": "a", "target": "b"},
        "target": "b",
        "arguments": {"gen_args_0": {"arg_0": "a", "arg_1": {"until": ["\n"]}}},
        "resps": [[text]],
        "filtered_resps": [text],
        "filter": "none",
        "metrics": ["exact_match", "chrf"],
        "doc_hash": "d",
        "prompt_hash": f"p{doc_id}",
        "target_hash": "t",
        "exact_match": float(text.strip() == "b"),
        "chrf": ["b", text],
    }


def write(path, samples) -> str:
    path.write_text("".join(json.dumps(s) + "\n" for s in samples))
    return str(path)


def test_multiple_choice_within_tolerance_agrees(tmp_path, capsys):
    a = [
        mc_sample(0, [-1.0, -2.0, -3.0, -4.0], [True, False, False, False]),
        mc_sample(1, [-5.0, -1.5]),
    ]
    b = [
        mc_sample(1, [-5.0004, -1.5]),
        mc_sample(0, [-1.0002, -2.0, -3.0, -4.0009], [True, False, False, False]),
    ]
    rc = main([write(tmp_path / "a.jsonl", a), write(tmp_path / "b.jsonl", b)])
    out = capsys.readouterr().out
    assert rc == 0, out
    c = compare(read_samples(tmp_path / "a.jsonl"), read_samples(tmp_path / "b.jsonl"))
    assert c.docs == 2 and c.loglikelihoods == 6
    assert c.max_abs_diff == pytest.approx(9e-4) and c.worst_doc == 0
    assert c.greedy_disagreements == 0 and c.greedy_a == 1
    assert (c.choice_docs, c.choice_disagreements) == (2, 0)
    assert c.metrics_a == {"acc": 0.5, "acc_norm": 0.0}
    assert "loglikelihoods: 6" in out and "is_greedy disagreements: 0/6 (A: 1 greedy)" in out
    assert out.rstrip().endswith("AGREE")


def test_multiple_choice_beyond_tolerance_or_greedy_flag_disagrees(tmp_path, capsys):
    a = [mc_sample(0, [-1.0, -2.0])]
    far = [mc_sample(0, [-1.0, -0.5])]  # 1.5 nats off, and the argmax moves
    c = compare(a, far)
    assert c.max_abs_diff == pytest.approx(1.5) and c.choice_disagreements == 1
    assert not c.agrees()
    flag = [mc_sample(0, [-1.0, -2.0], [True, False])]
    assert compare(a, flag).greedy_disagreements == 1 and not compare(a, flag).agrees()
    rc = main([write(tmp_path / "a.jsonl", a), write(tmp_path / "b.jsonl", far)])
    assert rc == 1 and capsys.readouterr().out.rstrip().endswith("DISAGREE")
    assert main(["--tol", "2", str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")]) == 0


def test_generations_compare_exactly(tmp_path, capsys):
    a = [gen_sample(0, " b"), gen_sample(1, " c d"), gen_sample(2, " e")]
    same = compare(a, [gen_sample(2, " e"), gen_sample(0, " b"), gen_sample(1, " c d")])
    assert (same.generations, same.identical_generations) == (3, 3) and same.agrees()
    assert same.mean_generation_chars == pytest.approx(8 / 3) and same.empty_generations == 0
    assert same.metrics_a == {"exact_match": pytest.approx(1 / 3)}  # chrf pairs left out
    # A trailing space is a different generation: the fronts must return the same text.
    b = [gen_sample(0, " b"), gen_sample(1, " c d "), gen_sample(2, " e")]
    rc = main([write(tmp_path / "a.jsonl", a), write(tmp_path / "b.jsonl", b)])
    out = capsys.readouterr().out
    assert rc == 1
    assert "identical generations: 2/3 (A's: 2.7 characters" in out
    assert "generations differ in docs [1]" in out


def test_unpaired_documents_and_different_requests_disagree():
    a = [gen_sample(0, " b"), gen_sample(1, " c")]
    c = compare(a, [gen_sample(0, " b")])
    assert c.only_a == (1,) and c.docs == 1 and not c.agrees()
    other_prompt = mc_sample(0, [-1.0, -2.0], prompt="q")
    c = compare([mc_sample(0, [-1.0, -2.0])], [other_prompt])
    assert c.prompt_mismatches == (0,) and c.loglikelihoods == 0 and not c.agrees()


def test_single_continuation_tasks_report_perplexity_as_lm_eval_aggregates_it():
    # LAMBADA-style: one loglikelihood per doc, acc = is_greedy, per-sample perplexity = ll.
    a = []
    for doc_id, (ll, greedy) in enumerate([(-1.0, True), (-3.0, False)]):
        sample = mc_sample(doc_id, [ll], [greedy])
        sample.update(metrics=["perplexity", "acc"], perplexity=ll, acc=float(greedy))
        a.append(sample)
    c = compare(a, a)
    assert c.choice_docs == 0 and c.greedy_a == 1 and c.agrees()
    assert c.metrics_a == {"perplexity": pytest.approx(math.exp(2.0)), "acc": 0.5}
    assert "argmax choice" not in report(c)


def test_numeric_responses_of_older_lm_eval_versions():
    a = mc_sample(0, [-1.0, -2.0])
    b = dict(a, resps=[[[-1.0, False]], [[-2.0, False]]])
    assert compare([a], [b]).max_abs_diff == 0.0 and compare([a], [b]).agrees()
