"""Trains the bundled demo model: a miniature Qwen1.5-MoE on the standard library's docstrings.

    python -m brownout_jax.demos.train_demo --out checkpoints/demo

Recipe (every step deterministic, fixed seeds; CPU, JAX + optax):

1. Corpus: docstrings and comments of the running interpreter's standard library
   (``demo_corpus.py``); modules whose name hashes to 0 mod 10 are held out.
2. Tokenizer: byte-level BPE (``tokenizers``) trained on the training documents only, saved
   with ``PreTrainedTokenizerFast.save_pretrained`` (``<|endoftext|>`` = EOS, a chat template).
3. Model: the exact Qwen2-MoE architecture (32 routed experts, top-4, no top-k renormalisation,
   sigmoid-gated shared expert, qkv bias), typed params from ``init_random_params``.
4. Training: AdamW with warm-up and cosine decay on packed sequences, cross-entropy plus a mild
   Switch-style load-balancing loss per MoE layer (E · Σ_e f_e · P_e, f_e the fraction of top-k
   assignments to e, P_e the mean router probability), averaged over layers.
   The forward pass is the repository's own (attention, norms, router, shared expert, lm head);
   only the routed experts run through a training twin of the sorted-tiles backend whose tiles
   are processed as one batched matmul (the serving backend's dynamic-trip-count loop is not
   reverse-differentiable; the dense backend is, but costs all 32 experts per token). Before
   training, the training forward is checked against ``model.forward_logits``.
5. Output: HF ``Qwen2MoeForCausalLM`` checkpoint in bfloat16, tokenizer, generation config,
   ``training_metadata.json`` and ``README.md`` with held-out loss, perplexity, the unigram
   baseline and the expert-usage skew, all measured on the saved (bf16-rounded) weights.

The training state is saved every ``--save-every`` steps (and on Ctrl-C) under
``--state-dir``; rerunning the same command resumes from it.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from brownout_jax.checkpoints.hf_export import write_hf_checkpoint
from brownout_jax.demos.demo_corpus import HELDOUT_MODULUS, python_build, split_documents
from brownout_jax.demos.demo_data import (
    EOS,
    batch_order,
    encode_documents,
    pack,
    save_tokenizer,
    train_tokenizer,
)
from brownout_jax.demos.demo_report import (
    dir_size,
    evaluate_saved,
    sample_generations,
    unigram_nll,
    write_readme,
)
from brownout_jax.demos.demo_training import (
    TrainSettings,
    make_optimizer,
    token_nll,
    train_forward,
)
from brownout_jax.model.config import PRESETS, ModelConfig
from brownout_jax.model.params import ModelParams, init_random_params
from brownout_jax.model.transformer import lm_logits


def demo_config(vocab_size: int, eos_id: int) -> ModelConfig:
    """Qwen1.5-MoE-A2.7B in miniature (``config.DEMO``) with the trained tokenizer's ids."""
    return PRESETS["demo"].replace(
        vocab_size=vocab_size, bos_token_id=eos_id, eos_token_ids=(eos_id,)
    )


def save_state(directory: Path, state, step: int, elapsed: float, fingerprint: str) -> None:
    """Atomic: a half-written state is never picked up."""
    directory.mkdir(parents=True, exist_ok=True)
    leaves = [np.asarray(x) for x in jax.tree_util.tree_leaves(state)]
    tmp = directory / f".state-{os.getpid()}.npz"
    with tmp.open("wb") as f:
        np.savez(f, *leaves)
    os.replace(tmp, directory / "state.npz")
    info = {"step": step, "elapsed_s": elapsed, "fingerprint": fingerprint}
    (directory / "state.json").write_text(json.dumps(info) + "\n")


def load_state(directory: Path, template, fingerprint: str):
    """(state, step, elapsed) from ``directory`` when it belongs to this run, else None."""
    info_path, data_path = directory / "state.json", directory / "state.npz"
    if not (info_path.is_file() and data_path.is_file()):
        return None
    info = json.loads(info_path.read_text())
    if info.get("fingerprint") != fingerprint:
        return None
    treedef = jax.tree_util.tree_structure(template)
    with np.load(data_path) as data:
        leaves = [jnp.asarray(data[f"arr_{i}"]) for i in range(len(data.files))]
    return jax.tree_util.tree_unflatten(treedef, leaves), info["step"], info["elapsed_s"]


def _fingerprint(settings: TrainSettings, config: ModelConfig, data: np.ndarray) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps(dataclasses.asdict(settings), sort_keys=True).encode())
    digest.update(repr(config).encode())
    digest.update(data.tobytes())
    return digest.hexdigest()[:16]


def check_training_forward(params: ModelParams, config: ModelConfig, s: TrainSettings) -> float:
    """The training forward equals the serving forward (``forward_logits``) on a real batch."""
    from brownout_jax.model.transformer import forward_logits

    tokens = jax.random.randint(jax.random.key(s.seed + 1), (2, 64), 0, config.vocab_size)
    ref = jax.jit(forward_logits, static_argnums=1)(params, config, tokens, jnp.full((2,), 64))
    hidden, _ = train_forward(params, config, tokens, s.tile_rows)
    out = lm_logits(params, hidden)
    err = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
    if err > 1e-5:
        raise AssertionError(f"training forward differs from forward_logits: rel. error {err:.2e}")
    return err


def train(args: argparse.Namespace) -> int:
    out: Path = args.out
    s = TrainSettings(steps=args.steps, seed=args.seed)
    started = time.perf_counter()
    print(f"corpus: CPython {platform.python_version()} standard library", file=sys.stderr)
    train_docs, heldout_docs = split_documents()
    tokenizer = train_tokenizer([d.text for d in train_docs], s.vocab_size)
    eos_id = tokenizer.convert_tokens_to_ids(EOS)
    train_ids = encode_documents(tokenizer, train_docs)
    heldout_ids = encode_documents(tokenizer, heldout_docs)
    train_chunks = pack(train_ids, eos_id, s.seq_len)
    heldout_chunks = pack(heldout_ids, eos_id, s.seq_len)
    counts = np.bincount(
        np.fromiter((t for ids in train_ids for t in [*ids, eos_id]), np.int64),
        minlength=len(tokenizer),
    )
    config = demo_config(len(tokenizer), eos_id)
    print(
        f"{len(train_docs)} training documents → {len(train_chunks)} chunks, "
        f"{len(heldout_docs)} held-out → {len(heldout_chunks)} chunks; vocab {len(tokenizer)}",
        file=sys.stderr,
    )

    params = init_random_params(config, jax.random.key(s.seed), scale=s.init_scale)
    err = check_training_forward(params, config, s)
    print(f"training forward = forward_logits (rel. error {err:.1e})", file=sys.stderr)
    optimizer = make_optimizer(s)
    state = (params, optimizer.init(params))
    fingerprint = _fingerprint(s, config, train_chunks)
    state_dir = args.state_dir
    step, elapsed_before = 0, 0.0
    resumed = load_state(state_dir, state, fingerprint)
    if resumed is not None:
        state, step, elapsed_before = resumed
        print(f"resuming from step {step} ({state_dir})", file=sys.stderr)
    order = batch_order(len(train_chunks), s.steps, s.batch, s.seed)
    sample = np.random.default_rng([s.seed, 99]).choice(
        len(train_chunks), min(len(heldout_chunks), len(train_chunks)), replace=False
    )

    def loss_fn(params, chunks):
        nll, aux = token_nll(params, config, chunks, s.tile_rows)
        ce = jnp.mean(nll)
        return ce + s.aux_loss_coef * aux, (ce, aux)

    @functools.partial(jax.jit, donate_argnums=0)
    def train_step(state, chunks):
        params, opt_state = state
        (_, (ce, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, chunks)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), ce, aux

    @jax.jit
    def eval_nll(params, chunks):
        return jnp.mean(token_nll(params, config, chunks, s.tile_rows)[0])

    probe = jnp.asarray(heldout_chunks[: 2 * s.batch])
    history: list[dict] = []
    train_start = time.perf_counter()
    bar = tqdm(total=s.steps, initial=step, desc="training demo model", unit="step")
    ce_window: list[float] = []
    stopped_early = None
    try:
        while step < s.steps:
            state, ce, aux = train_step(state, jnp.asarray(train_chunks[order[step]]))
            step += 1
            ce_window.append(float(ce))
            ce_window = ce_window[-50:]
            bar.update(1)
            bar.set_postfix(loss=f"{float(ce):.3f}", aux=f"{float(aux):.3f}")
            if step % args.eval_every == 0 or step == s.steps:
                heldout_probe = float(eval_nll(state[0], probe))
                history.append(
                    {
                        "step": step,
                        "train_loss_last50": float(np.mean(ce_window)),
                        "aux_loss": float(aux),
                        "heldout_probe_loss": heldout_probe,
                    }
                )
                bar.write(
                    f"step {step}: train {np.mean(ce_window):.3f} (last 50), aux {float(aux):.3f},"
                    f" held-out probe {heldout_probe:.3f}"
                )
            elapsed = elapsed_before + time.perf_counter() - train_start
            if step % args.save_every == 0 or step == s.steps:
                save_state(state_dir, state, step, elapsed, fingerprint)
            if elapsed > 60 * args.max_minutes and step < s.steps:
                stopped_early = step
                save_state(state_dir, state, step, elapsed, fingerprint)
                bar.write(f"time budget of {args.max_minutes} min reached: stopping at {step}")
                break
    except KeyboardInterrupt:
        bar.close()
        elapsed = elapsed_before + time.perf_counter() - train_start
        save_state(state_dir, state, step, elapsed, fingerprint)
        print(
            f"\ninterrupted at step {step}; state saved to {state_dir}. "
            "Rerun the same command to resume.",
            file=sys.stderr,
        )
        return 130
    bar.close()
    train_seconds = elapsed_before + time.perf_counter() - train_start

    params = state[0]
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    write_hf_checkpoint(params, config, tmp, "bfloat16")
    save_tokenizer(tokenizer, tmp)
    generation = {"bos_token_id": eos_id, "eos_token_id": eos_id, "pad_token_id": eos_id}
    (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    results = evaluate_saved(tmp, heldout_chunks, train_chunks[np.sort(sample)])
    unigram = unigram_nll(counts, heldout_chunks[:, 1:].reshape(-1))
    results.update(
        heldout_eval_tokens=int(heldout_chunks[:, 1:].size),
        train_eval_tokens=int(len(sample) * s.seq_len),
        unigram_heldout_loss=unigram,
        unigram_heldout_perplexity=math.exp(unigram),
        samples=sample_generations(
            tmp, ["Return the", "This module provides", "Raise ValueError if"]
        ),
    )
    leaves = jax.tree_util.tree_leaves(params)
    num_params = sum(x.size for x in leaves)
    expert_params = sum(
        x.size for layer in params.layers for x in jax.tree_util.tree_leaves(layer.mlp.experts)
    )
    active = num_params - expert_params * (1 - config.num_experts_per_tok / config.num_experts)
    metadata = {
        "model": {
            "architecture": "Qwen2MoeForCausalLM",
            "config": dataclasses.asdict(config),
            "parameters": int(num_params),
            "active_parameters": int(active),
            "storage_dtype": "bfloat16",
        },
        "corpus": {
            "python": python_build(),
            "heldout_rule": f"int(sha256(module name), 16) % {HELDOUT_MODULUS} == 0",
            "heldout_modulus": HELDOUT_MODULUS,
            "train_documents": len(train_docs),
            "heldout_documents": len(heldout_docs),
            "train_modules": len({d.module for d in train_docs}),
            "heldout_modules": len({d.module for d in heldout_docs}),
            "heldout_module_names": sorted({d.module for d in heldout_docs}),
            "train_tokens": int(sum(len(i) + 1 for i in train_ids)),
            "heldout_tokens": int(sum(len(i) + 1 for i in heldout_ids)),
            "train_chunks": len(train_chunks),
            "heldout_chunks": len(heldout_chunks),
            "train_token_counts": counts.tolist(),
        },
        "training": {
            "settings": dataclasses.asdict(s),
            "steps": step,
            "tokens_seen": step * s.batch * s.seq_len,
            "epochs": step * s.batch / len(train_chunks),
            "wall_s": train_seconds,
            "total_wall_s": time.perf_counter() - started,
            "tokens_per_s": step * s.batch * s.seq_len / max(train_seconds, 1e-9),
            "machine": f"{os.cpu_count()} CPU cores (shared), JAX {jax.__version__} "
            f"{jax.default_backend()}",
            "history": history,
            "final_train_loss_last50": float(np.mean(ce_window)) if ce_window else None,
            "stopped_early_at_step": stopped_early,
        },
        "results": results,
    }
    (tmp / "training_metadata.json").write_text(json.dumps(metadata, indent=1) + "\n")
    # Keep united experts made earlier out of the new directory: they belong to old weights.
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    for _ in range(2):  # the second pass counts the metadata file with the size in it
        results["size_bytes"] = dir_size(out)
        (out / "training_metadata.json").write_text(json.dumps(metadata, indent=1) + "\n")
    write_readme(out)
    shutil.rmtree(state_dir, ignore_errors=True)
    print(
        f"wrote {out}: held-out loss {results['heldout_loss']:.3f} "
        f"(perplexity {results['heldout_perplexity']:.1f}; unigram "
        f"{results['unigram_heldout_perplexity']:.1f}), training {train_seconds / 60:.1f} min",
        file=sys.stderr,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=TrainSettings.steps)
    parser.add_argument("--seed", type=int, default=TrainSettings.seed)
    parser.add_argument(
        "--max-minutes",
        type=float,
        default=32.0,
        help="stop training early (and say so in the metadata) past this many minutes",
    )
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--save-every", type=int, default=25)
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "brownout_jax_train_demo",
        help="where the resumable training state lives (removed when training completes)",
    )
    parser.add_argument(
        "--readme-only", action="store_true", help="rewrite README.md from the metadata"
    )
    args = parser.parse_args(argv)
    if args.readme_only:
        write_readme(args.out)
        return 0
    return train(args)


if __name__ == "__main__":
    sys.exit(main())
