"""The demo model's measurements and README: held-out loss and perplexity, the unigram
baseline, expert-usage skew and sample continuations, all on the checkpoint as written, through
the serving code path; ``README.md`` written from ``training_metadata.json``."""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

SKEW_TOP_FRACTION = 0.1  # skew = share of assignments to the busiest 10 % of experts


def expert_skew(counts: np.ndarray, fraction: float = SKEW_TOP_FRACTION) -> float:
    """Share of assignments that go to the busiest ⌈fraction · E⌉ experts."""
    top = max(1, math.ceil(fraction * counts.shape[-1]))
    return float(np.sort(counts)[::-1][:top].sum() / counts.sum())


def evaluate_saved(out: Path, heldout: np.ndarray, train_sample: np.ndarray) -> dict:
    """Loss, perplexity and expert usage of the checkpoint as written (bf16 weights, loaded in
    fp32), through the serving code path: ``load_model`` + ``forward_logits``."""
    from brownout_jax.checkpoints import load_model
    from brownout_jax.model.transformer import forward_logits, moe_traces

    model = load_model(out, "float32", progress=False)
    config, params = model.config, model.params
    logits_fn = jax.jit(forward_logits, static_argnums=1)
    routed = jax.jit(moe_traces, static_argnums=1)

    def mean_nll(chunks: np.ndarray, usage: np.ndarray | None) -> float:
        total, count = 0.0, 0
        for start in range(0, len(chunks), 16):
            batch = jnp.asarray(chunks[start : start + 16])
            lengths = jnp.full((batch.shape[0],), batch.shape[1] - 1, jnp.int32)
            logits = logits_fn(params, config, batch[:, :-1], lengths)
            nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:])
            total += float(jnp.sum(nll))
            count += nll.size
            if usage is not None:
                traces, _ = routed(params, config, batch[:, :-1], lengths)
                for j, trace in enumerate(traces):
                    ids = np.asarray(trace.expert_ids).reshape(-1)
                    usage[j] += np.bincount(ids, minlength=usage.shape[1])
        return total / count

    usage = np.zeros((len(config.moe_layers), config.num_experts), np.int64)
    heldout_loss = mean_nll(heldout, usage)
    train_loss = mean_nll(train_sample, None)
    return {
        "heldout_loss": heldout_loss,
        "heldout_perplexity": math.exp(heldout_loss),
        "train_loss": train_loss,
        "train_perplexity": math.exp(train_loss),
        "heldout_expert_counts": usage.tolist(),
        "heldout_expert_skew": [expert_skew(u) for u in usage],
    }


def unigram_nll(train_counts: np.ndarray, targets: np.ndarray) -> float:
    """Mean NLL of ``targets`` under add-one-smoothed training token frequencies."""
    probs = (train_counts + 1.0) / (train_counts.sum() + len(train_counts))
    return float(-np.mean(np.log(probs[targets])))


def sample_generations(out: Path, prompts: list[str], max_new_tokens: int = 40) -> list[dict]:
    from brownout_jax.checkpoints import load_model
    from brownout_jax.offline.generate import generate

    model = load_model(out, "float32", progress=False)
    results = []
    for prompt in prompts:
        ids = model.tokenizer.encode(prompt, add_special_tokens=False)
        result = generate(
            model.params,
            model.config,
            [ids],
            max_new_tokens,
            stop_token_ids=model.eos_token_ids,
        )[0]
        text = model.tokenizer.decode(result.token_ids, skip_special_tokens=True)
        results.append({"prompt": prompt, "greedy_continuation": text})
    return results


def dir_size(path: Path, exclude_dirs: bool = True) -> int:
    files = path.iterdir() if exclude_dirs else path.rglob("*")
    return sum(f.stat().st_size for f in files if f.is_file())


def _united_summary(out: Path) -> list[str]:
    lines = []
    for united in sorted(out.glob("united-way4-*")):
        manifest_path = united / "united_manifest.json"
        if not manifest_path.is_file():
            continue
        manifest = json.loads(manifest_path.read_text())
        size = dir_size(united, exclude_dirs=False)
        lines += [
            "",
            _wrap(
                f"`{united.name}/` (grouping `{manifest['grouping']}`, "
                f"{manifest['calibration'].get('tokens', '?')} calibration tokens of training "
                f"text, {size / 2**20:.1f} MiB): MSE of the united experts against their "
                "members' routing-weighted outputs on the 20 % of calibration tokens held out "
                "from distillation, mean over groups:"
            ),
            "",
            "| layer | groups | MSE, average init | MSE, distilled |",
            "| ---: | ---: | ---: | ---: |",
        ]
        for layer in manifest["moe_layers"]:
            rows = [r for r in manifest["mse"] if r["layer"] == layer]
            init = sum(r["init_mse"] for r in rows) / len(rows)
            final = sum(r["final_mse"] for r in rows) / len(rows)
            lines.append(f"| {layer} | {len(rows)} | {init:.4g} | {final:.4g} |")
    return lines


def _wrap(text: str, bullet: bool = False) -> str:
    return textwrap.fill(
        text,
        width=95,
        initial_indent="- " if bullet else "",
        subsequent_indent="  " if bullet else "",
        break_long_words=False,
        break_on_hyphens=False,
    )


def write_readme(out: Path) -> None:
    meta = json.loads((out / "training_metadata.json").read_text())
    m, r, t, c = meta["model"], meta["results"], meta["training"], meta["corpus"]
    cfg, st = m["config"], t["settings"]
    skew = ", ".join(f"{s:.1%}" for s in r["heldout_expert_skew"])
    top = max(1, math.ceil(SKEW_TOP_FRACTION * cfg["num_experts"]))
    stopped = t.get("stopped_early_at_step")
    united_size = sum(dir_size(u, exclude_dirs=False) for u in out.glob("united-way4-*"))
    paragraphs = [
        "# Demo model: a miniature Qwen1.5-MoE trained on standard-library docstrings",
        _wrap(
            "A small *trained* `Qwen2MoeForCausalLM` checkpoint bundled with brownout-jax, for "
            "tests, examples and brownout experiments without downloading Qwen1.5-MoE. It loads "
            "with transformers (`Qwen2MoeForCausalLM.from_pretrained`, "
            "`AutoTokenizer.from_pretrained`) and with `brownout_jax.checkpoints.load_model`. "
            "It is a toy: it continues Python-docstring-like English and nothing more."
        ),
        "```python\n"
        "from brownout_jax.checkpoints import load_model\n"
        "from brownout_jax.checkpoints.demo_model import demo_model_dir, demo_united_dir\n\n"
        'model = load_model(demo_model_dir(), united=demo_united_dir("similarity"))\n'
        "```",
        "## Recipe",
        "```bash\n"
        "python -m brownout_jax.demos.train_demo --out checkpoints/demo\n"
        "python -m brownout_jax.demos.demo_corpus --calib /tmp/demo_calib.jsonl\n"
        "for grouping in contiguous similarity; do\n"
        "  brownout-jax unite --model checkpoints/demo --way 4 --grouping $grouping \\\n"
        "      --calib /tmp/demo_calib.jsonl --out checkpoints/demo/united-way4-$grouping\n"
        "done\n"
        "```",
        "\n".join(
            [
                _wrap(
                    f"Corpus: docstrings and comments of the CPython {c['python']['version']} "
                    "standard library, extracted from the interpreter's own source files "
                    "(`sysconfig` stdlib directory, sorted walk; test suites, IDLE, lib2to3, "
                    "ensurepip, turtledemo, site-packages and the generated codec tables of "
                    "`encodings` skipped; `ast.get_docstring` for modules, classes and "
                    "functions, `tokenize` for blocks of whole-line comments; each text once). "
                    f"Modules with int(sha256(name)) ≡ 0 mod {c['heldout_modulus']} are held "
                    f"out: {c['train_documents']} training documents "
                    f"({c['train_tokens']:,} tokens) from {c['train_modules']} modules, "
                    f"{c['heldout_documents']} held-out documents ({c['heldout_tokens']:,} "
                    f"tokens) from {c['heldout_modules']} modules (texts that also occur in a "
                    "training module dropped). Documents are joined with "
                    f"`<|endoftext|>` and cut into chunks of {st['seq_len'] + 1} tokens.",
                    bullet=True,
                ),
                _wrap(
                    f"Tokenizer: byte-level BPE with {cfg['vocab_size']} tokens (`tokenizers`), "
                    "trained on the training documents only; `<|endoftext|>` is EOS, BOS and "
                    "padding; the chat template renders `User: …` / `Assistant: …` lines "
                    "(assistant turns end with EOS) and `Assistant:` as generation prompt.",
                    bullet=True,
                ),
                _wrap(
                    f"Model: {m['parameters']:,} parameters ({m['active_parameters']:,} active "
                    f"per token), stored in bfloat16. Hidden size {cfg['hidden_size']}, "
                    f"{cfg['num_layers']} layers, {cfg['num_heads']} attention heads of "
                    f"{cfg['head_dim']} (no GQA, qkv bias), every layer sparse: "
                    f"{cfg['num_experts']} routed experts with top-{cfg['num_experts_per_tok']} "
                    f"routing (intermediate size {cfg['moe_intermediate_size']}, "
                    "`norm_topk_prob` false) plus a sigmoid-gated shared expert (intermediate "
                    f"size {cfg['shared_expert_intermediate_size']}), untied lm head, RoPE θ = "
                    f"{cfg['rope_theta']:g}, context {cfg['max_position_embeddings']}.",
                    bullet=True,
                ),
                _wrap(
                    f"Training: {t['steps']} steps of {st['batch']} × {st['seq_len']} tokens "
                    f"({t['tokens_seen']:,} tokens, {t['epochs']:.2f} epochs), AdamW (β = 0.9, "
                    f"0.95; weight decay {st['weight_decay']} on matrices), peak learning rate "
                    f"{st['peak_lr']} after {st['warmup_steps']} warm-up steps, cosine decay to "
                    f"{st['final_lr_ratio']}× peak, gradient clipping at {st['grad_clip']}, "
                    f"load-balancing loss coefficient {st['aux_loss_coef']} (E · Σ_e f_e · P_e "
                    f"per MoE layer, averaged over layers), seed {st['seed']}, float32. "
                    f"{t['wall_s'] / 60:.1f} minutes of training ({t['total_wall_s'] / 60:.1f} "
                    f"minutes in all, with corpus, tokenizer and evaluation) on {t['machine']}: "
                    f"{t['tokens_per_s']:,.0f} tokens/s."
                    + (f" Stopped early at step {stopped} (time budget)." if stopped else ""),
                    bullet=True,
                ),
                _wrap(
                    "The forward pass is the repository's own; only the routed experts run "
                    "through a differentiable twin of the sorted-tiles backend (all tiles as one "
                    "batched matmul), checked against `forward_logits` before training. A rerun "
                    "reproduces the corpus, tokenizer and initialisation exactly; the trained "
                    "weights may differ in the last bits (floating-point reduction order).",
                    bullet=True,
                ),
            ]
        ),
        "## Results",
        _wrap(
            "Measured on the saved bfloat16 weights, loaded in float32 through the serving path "
            "(`load_model` + `forward_logits`):"
        ),
        "\n".join(
            [
                "| text | loss (nats/token) | perplexity |",
                "| --- | ---: | ---: |",
                f"| training (sample of {r['train_eval_tokens']:,} tokens) | "
                f"{r['train_loss']:.3f} | {r['train_perplexity']:.1f} |",
                f"| held-out ({r['heldout_eval_tokens']:,} tokens) | {r['heldout_loss']:.3f} | "
                f"{r['heldout_perplexity']:.1f} |",
                f"| held-out, unigram model (add-one, training counts) | "
                f"{r['unigram_heldout_loss']:.3f} | {r['unigram_heldout_perplexity']:.1f} |",
            ]
        ),
        _wrap(
            f"Expert-usage skew on the held-out text — the share of top-"
            f"{cfg['num_experts_per_tok']} assignments that go to the busiest {top} of "
            f"{cfg['num_experts']} experts (10 %; {top / cfg['num_experts']:.1%} if uniform) — "
            f"per layer: {skew}."
        ),
        _wrap(
            f"Size on disk: {r['size_bytes'] / 2**20:.1f} MiB for the checkpoint (config, "
            "safetensors, tokenizer, generation config, metadata)"
            + (
                f", {united_size / 2**20:.1f} MiB for the two united-expert directories."
                if united_size
                else "."
            )
        ),
        "Greedy continuations (`brownout-jax generate --model checkpoints/demo --prompt TEXT "
        "--temperature 0`):",
        "\n".join(
            f"- `{sample['prompt']}` → {json.dumps(sample['greedy_continuation'])}"
            for sample in r.get("samples", [])
        ),
    ]
    united = _united_summary(out)
    if united:
        paragraphs += ["## United experts (way 4)", "\n".join(united).strip()]
    paragraphs.append(
        _wrap(
            "Every number on this page is in `training_metadata.json`; regenerate the page "
            "with `python -m brownout_jax.demos.train_demo --out checkpoints/demo "
            "--readme-only`."
        )
    )
    (out / "README.md").write_text("\n\n".join(paragraphs) + "\n")
