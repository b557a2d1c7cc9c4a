"""Trains the bundled demo model: a miniature Qwen1.5-MoE on the standard library's docstrings.

    python -m brownout_jax.checkpoints.train_demo --out checkpoints/demo

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
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from brownout_jax.checkpoints.demo_corpus import (
    HELDOUT_MODULUS,
    Document,
    python_build,
    split_documents,
)
from brownout_jax.checkpoints.hf_export import write_hf_checkpoint
from brownout_jax.model.config import PRESETS, ModelConfig
from brownout_jax.model.dense import dense_mlp
from brownout_jax.model.dims import Array, Float, Int
from brownout_jax.model.params import ExpertWeights, ModelParams, MoeParams, init_random_params
from brownout_jax.model.transformer import attention_block, lm_logits, rms_norm, rope_tables
from brownout_jax.moe.expert_matmul import sort_into_tiles
from brownout_jax.moe.routing import route_top_k

EOS = "<|endoftext|>"
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}: {{ message['content'] | trim }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
SKEW_TOP_FRACTION = 0.1  # skew = share of assignments to the busiest 10 % of experts


def demo_config(vocab_size: int, eos_id: int) -> ModelConfig:
    """Qwen1.5-MoE-A2.7B in miniature (``config.DEMO``) with the trained tokenizer's ids."""
    return PRESETS["demo"].replace(
        vocab_size=vocab_size, bos_token_id=eos_id, eos_token_ids=(eos_id,)
    )


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    vocab_size: int = 4096
    steps: int = 520
    batch: int = 16
    seq_len: int = 256
    peak_lr: float = 3e-3
    warmup_steps: int = 30
    final_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    aux_loss_coef: float = 0.004  # Qwen's 0.001 on HF's K-times-larger form of the loss
    tile_rows: int = 32
    seed: int = 0
    init_scale: float = 0.02


# ---------------------------------------------------------------- tokenizer and data


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE on ``texts``; returns a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token=EOS, pad_token=EOS, model_max_length=1024
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def save_tokenizer(tokenizer, directory: Path) -> None:
    """``save_pretrained``, naming the class older transformers know, template included."""
    tokenizer.save_pretrained(directory)
    path = directory / "tokenizer_config.json"
    raw = json.loads(path.read_text())
    raw["tokenizer_class"] = "PreTrainedTokenizerFast"
    raw["chat_template"] = CHAT_TEMPLATE
    path.write_text(json.dumps(raw, indent=2) + "\n")


def encode_documents(tokenizer, docs: list[Document]) -> list[list[int]]:
    # The backend tokenizer directly: no special tokens, no max-length warnings.
    return [e.ids for e in tokenizer.backend_tokenizer.encode_batch([d.text for d in docs])]


def pack(token_lists: list[list[int]], eos_id: int, seq_len: int) -> np.ndarray:
    """Documents joined with EOS, cut into (num_chunks, seq_len + 1); the tail is dropped."""
    stream = np.fromiter((t for ids in token_lists for t in [*ids, eos_id]), dtype=np.int32)
    n = len(stream) // (seq_len + 1)
    return stream[: n * (seq_len + 1)].reshape(n, seq_len + 1)


def batch_order(num_chunks: int, steps: int, batch: int, seed: int) -> np.ndarray:
    """Chunk indices of every step: one fixed-seed permutation per epoch, concatenated."""
    need = steps * batch
    perms = []
    epoch = 0
    while sum(len(p) for p in perms) < need:
        perms.append(np.random.default_rng([seed, epoch]).permutation(num_chunks))
        epoch += 1
    return np.concatenate(perms)[:need].reshape(steps, batch)


# ---------------------------------------------------------------- training forward pass


def routed_experts_train(
    x: Float[Array, "N D"],
    expert_ids: Int[Array, "N K"],
    expert_weights: Float[Array, "N K"],
    experts: ExpertWeights,
    block_rows: int,
) -> Float[Array, "N D"]:
    """Σ_k weight · FFN_expert(x), differentiable: the sorted-tiles layout (``sort_into_tiles``)
    with every tile in one batched matmul against its expert's gathered weights. Tiles past the
    used ones hold only the zero row, so they add nothing (and no gradient)."""
    n, k = expert_ids.shape
    d = x.shape[-1]
    tiles = sort_into_tiles(expert_ids, jnp.ones((n,), bool), experts.num_experts, block_rows)
    x_rows = jnp.concatenate([x, jnp.zeros((1, d), x.dtype)])[tiles.row_token]
    x_tiles = x_rows.reshape(-1, block_rows, d)
    gate = jnp.einsum("tmd,tdf->tmf", x_tiles, experts.w_gate[tiles.tile_expert])
    up = jnp.einsum("tmd,tdf->tmf", x_tiles, experts.w_up[tiles.tile_expert])
    y_tiles = jnp.einsum("tmf,tfd->tmd", jax.nn.silu(gate) * up, experts.w_down[tiles.tile_expert])
    y_assign = y_tiles.reshape(-1, d)[tiles.assignment_row].reshape(n, k, d)
    return jnp.einsum("nkd,nk->nd", y_assign, expert_weights.astype(y_assign.dtype))


def load_balancing_loss(
    expert_ids: Int[Array, "N K"], router_probs: Float[Array, "N E"]
) -> Float[Array, ""]:
    """Switch-style E · Σ_e f_e · P_e (1 when perfectly balanced)."""
    e = router_probs.shape[-1]
    fraction = jnp.bincount(expert_ids.reshape(-1), length=e) / expert_ids.size
    return e * jnp.sum(fraction * jnp.mean(router_probs, axis=0))


def train_moe_block(
    x: Float[Array, "N D"], params: MoeParams, config: ModelConfig, block_rows: int
) -> tuple[Float[Array, "N D"], Float[Array, ""]]:
    routing = route_top_k(x, params.router, config.num_experts_per_tok, config.norm_topk_prob)
    out = routed_experts_train(
        x, routing.expert_ids, routing.expert_weights, params.experts, block_rows
    )
    if params.shared is not None:
        gate = jax.nn.sigmoid(jnp.dot(x, params.shared_gate))
        out = out + gate * dense_mlp(x, params.shared)
    return out, load_balancing_loss(routing.expert_ids, routing.router_probs)


def train_forward(
    params: ModelParams, config: ModelConfig, tokens: Int[Array, "B T"], block_rows: int
) -> tuple[Float[Array, "B T D"], Float[Array, ""]]:
    """``model.forward_hidden`` on full (unpadded) sequences with the differentiable experts;
    also returns the load-balancing loss averaged over MoE layers."""
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    h = params.embed[tokens]
    rope = rope_tables(positions, config.head_dim, config.rope_theta, h.dtype)
    aux = []
    for i, layer in enumerate(params.layers):
        attn, _ = attention_block(
            rms_norm(h, layer.input_norm, config.rms_norm_eps),
            layer.attention,
            config,
            i,
            positions,
            rope,
            None,
            False,
        )
        h = h + attn
        x = rms_norm(h, layer.post_attention_norm, config.rms_norm_eps).reshape(b * t, -1)
        if isinstance(layer.mlp, MoeParams):
            out, layer_aux = train_moe_block(x, layer.mlp, config, block_rows)
            aux.append(layer_aux)
        else:
            out = dense_mlp(x, layer.mlp)
        h = h + out.reshape(h.shape)
    aux_loss = jnp.mean(jnp.stack(aux)) if aux else jnp.zeros((), jnp.float32)
    return rms_norm(h, params.final_norm, config.rms_norm_eps), aux_loss


def token_nll(
    params: ModelParams, config: ModelConfig, chunks: Int[Array, "B T1"], block_rows: int
) -> tuple[Float[Array, "B T"], Float[Array, ""]]:
    hidden, aux = train_forward(params, config, chunks[:, :-1], block_rows)
    logits = lm_logits(params, hidden)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, chunks[:, 1:])
    return nll, aux


# ---------------------------------------------------------------- optimiser and state


def make_optimizer(s: TrainSettings) -> optax.GradientTransformation:
    warmup = min(s.warmup_steps, max(1, s.steps // 10))  # short runs (timing) warm up less
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, s.peak_lr, warmup, s.steps, end_value=s.peak_lr * s.final_lr_ratio
    )
    return optax.chain(
        optax.clip_by_global_norm(s.grad_clip),
        optax.adamw(
            schedule,
            b1=0.9,
            b2=0.95,
            weight_decay=s.weight_decay,
            mask=lambda p: jax.tree_util.tree_map(lambda w: w.ndim >= 2, p),
        ),
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


# ---------------------------------------------------------------- evaluation


def expert_skew(counts: np.ndarray, fraction: float = SKEW_TOP_FRACTION) -> float:
    """Share of assignments that go to the busiest ⌈fraction · E⌉ experts."""
    top = max(1, math.ceil(fraction * counts.shape[-1]))
    return float(np.sort(counts)[::-1][:top].sum() / counts.sum())


def evaluate_saved(out: Path, heldout: np.ndarray, train_sample: np.ndarray) -> dict:
    """Loss, perplexity and expert usage of the checkpoint as written (bf16 weights, loaded in
    fp32), through the serving code path: ``load_model`` + ``forward_logits``."""
    from brownout_jax.checkpoints import load_model
    from brownout_jax.model.transformer import collect_moe_inputs, forward_logits

    model = load_model(out, "float32", progress=False)
    config, params = model.config, model.params
    logits_fn = jax.jit(forward_logits, static_argnums=1)
    collect = jax.jit(collect_moe_inputs, static_argnums=1)

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
                inputs, _ = collect(params, config, batch[:, :-1], lengths)
                for j, (layer, x) in enumerate(zip(config.moe_layers, inputs, strict=True)):
                    router = params.layers[layer].mlp.router
                    ids = route_top_k(x, router, config.num_experts_per_tok, False).expert_ids
                    usage[j] += np.bincount(np.asarray(ids).reshape(-1), minlength=usage.shape[1])
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


# ---------------------------------------------------------------- README


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
        "python -m brownout_jax.checkpoints.train_demo --out checkpoints/demo\n"
        "python -m brownout_jax.checkpoints.demo_corpus --calib /tmp/demo_calib.jsonl\n"
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
            "with `python -m brownout_jax.checkpoints.train_demo --out checkpoints/demo "
            "--readme-only`."
        )
    )
    (out / "README.md").write_text("\n\n".join(paragraphs) + "\n")


# ---------------------------------------------------------------- main


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
