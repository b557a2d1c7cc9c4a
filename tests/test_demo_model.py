"""The bundled demo model (checkpoints/demo): transformers parity, tokenizer, quality, united."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import rel_err, tiny_model_config
from transformers import AutoTokenizer, Qwen2MoeForCausalLM

from brownout_jax.checkpoints import load_model
from brownout_jax.checkpoints.demo_model import demo_model_dir, demo_united_dir
from brownout_jax.model.transformer import forward_logits, lm_logits
from brownout_jax.moe.options import MoeOptions
from brownout_jax.offline.generate import generate

TEXT = (
    "Return a new list containing all items from the iterable in ascending order.\n\n"
    "A custom key function can be supplied to customize the sort order."
)
_forward = jax.jit(forward_logits, static_argnums=(1, 4))


@pytest.fixture(scope="module")
def demo():
    return load_model(demo_model_dir(), "float32", progress=False)


@pytest.fixture(scope="module")
def hf_model():
    return Qwen2MoeForCausalLM.from_pretrained(demo_model_dir(), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def metadata() -> dict:
    return json.loads((demo_model_dir() / "training_metadata.json").read_text())


def test_shape_is_qwen_moe_in_miniature(demo):
    config = demo.config
    assert config.num_experts >= 32 and config.num_experts_per_tok == 4
    assert config.num_layers >= 4 and config.moe_layers == tuple(range(config.num_layers))
    assert config.qkv_bias and not config.norm_topk_prob
    assert config.shared_expert_intermediate_size > 0
    assert demo.eos_token_ids == (demo.tokenizer.eos_token_id,)
    files = [f for f in demo_model_dir().iterdir() if f.is_file()]
    assert sum(f.stat().st_size for f in files) <= 32 * 2**20


def test_logits_match_transformers(demo, hf_model):
    ids = demo.tokenizer.encode(TEXT, add_special_tokens=False)
    with torch.no_grad():
        ref = hf_model(torch.tensor([ids])).logits.numpy()
    out = _forward(
        demo.params, demo.config, jnp.asarray([ids]), jnp.asarray([len(ids)]), MoeOptions()
    )
    assert rel_err(out, ref) <= 1e-5


def test_greedy_generation_matches_transformers_without_eos(demo, hf_model):
    # Greedy decoding from this prompt emits EOS within 32 tokens: both sides must go past it.
    prompt = demo.tokenizer.encode("This module provides", add_special_tokens=False)
    ours = generate(demo.params, demo.config, [prompt], 32, stop_token_ids=())[0]
    with torch.no_grad():
        generated = hf_model.generate(
            torch.tensor([prompt]),
            do_sample=False,
            max_new_tokens=32,
            eos_token_id=None,
            pad_token_id=demo.tokenizer.pad_token_id,
        )
    ref = generated[0, len(prompt) :].tolist()
    assert len(ref) == 32 and ours.finish_reason == "length"
    assert ours.token_ids == ref
    assert demo.tokenizer.eos_token_id in ref


def test_tokenizer_round_trips_text():
    tokenizer = AutoTokenizer.from_pretrained(str(demo_model_dir()), local_files_only=True)
    for text in (
        TEXT,
        "def f(x):\n    return x ** 2  # square\n",
        "Unicode: naïve café — “quotes”, 日本語, emoji 🐍, tabs\tand  spaces.",
    ):
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert all(0 <= i < tokenizer.vocab_size for i in ids)
        assert tokenizer.decode(ids) == text
    assert tokenizer.eos_token == "<|endoftext|>"


def test_chat_template_renders_turns_and_generation_prompt():
    tokenizer = AutoTokenizer.from_pretrained(str(demo_model_dir()), local_files_only=True)
    messages = [
        {"role": "user", "content": "What does json.loads do?"},
        {"role": "assistant", "content": "Deserialize a JSON document."},
        {"role": "user", "content": "And json.dumps?"},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "User: What does json.loads do?\n"
        "Assistant: Deserialize a JSON document.<|endoftext|>\n"
        "User: And json.dumps?\n"
        "Assistant:"
    )
    plain = tokenizer.apply_chat_template(messages[:1], tokenize=False)
    assert plain == "User: What does json.loads do?\n"


def test_heldout_perplexity_beats_unigram_by_half(demo, metadata):
    """On held-out docstrings (modules never trained on), the model's perplexity is less than
    half that of a unigram model estimated from the training-token counts."""
    from brownout_jax.demos.demo_corpus import split_documents

    _, heldout = split_documents(comments=False)
    docs = [d for d in heldout if len(d.text) >= 200][:24]
    eos = demo.tokenizer.eos_token_id
    seqs = [[*demo.tokenizer.encode(d.text, add_special_tokens=False)[:127], eos] for d in docs]
    tokens = np.zeros((len(seqs), 128), np.int32)
    lengths = np.array([len(s) for s in seqs])
    for i, s in enumerate(seqs):
        tokens[i, : len(s)] = s
    logits = _forward(
        demo.params, demo.config, jnp.asarray(tokens), jnp.asarray(lengths), MoeOptions()
    )
    logprobs = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    counts = np.asarray(metadata["corpus"]["train_token_counts"], np.float64)
    unigram = np.log((counts + 1) / (counts.sum() + len(counts)))
    model_nll, unigram_nll = [], []
    for i, s in enumerate(seqs):
        targets = np.asarray(s[1:])
        model_nll.extend(-logprobs[i, np.arange(len(targets)), targets])
        unigram_nll.extend(-unigram[targets])
    model_ppl, unigram_ppl = math.exp(np.mean(model_nll)), math.exp(np.mean(unigram_nll))
    assert model_ppl < 0.5 * unigram_ppl, (model_ppl, unigram_ppl)


@pytest.mark.parametrize("grouping", ["contiguous", "similarity"])
def test_united_experts_load_and_run(demo, grouping):
    united = load_model(
        demo_model_dir(), "float32", progress=False, united=demo_united_dir(grouping)
    )
    assert united.united_manifest["way"] == 4
    assert united.united_manifest["grouping"] == grouping
    for layer in united.config.moe_layers:
        assert united.params.layers[layer].mlp.num_united == united.config.num_experts // 4
    if grouping == "similarity":
        ids = demo.tokenizer.encode(TEXT, add_special_tokens=False)
        args = (united.config, jnp.asarray([ids]), jnp.asarray([len(ids)]))
        browned = _forward(united.params, *args, MoeOptions(threshold=0.0))
        exact = _forward(demo.params, *args, MoeOptions())
        assert np.all(np.isfinite(browned))
        assert np.mean(np.argmax(browned, -1) == np.argmax(exact, -1)) > 0.3


def test_training_forward_matches_model_and_differentiates():
    """The training twin (differentiable expert tiles + load-balancing loss) equals
    ``forward_logits`` and yields finite gradients for every parameter."""
    from brownout_jax.demos.train_demo import token_nll, train_forward
    from brownout_jax.model.params import init_random_params

    config = tiny_model_config(num_layers=2)
    params = init_random_params(config, jax.random.key(3), scale=0.3)
    tokens = jax.random.randint(jax.random.key(4), (2, 33), 0, config.vocab_size)
    hidden, aux = train_forward(params, config, tokens[:, :-1], 8)
    ref = forward_logits(params, config, tokens[:, :-1], jnp.full((2,), 32))
    assert rel_err(lm_logits(params, hidden), ref) <= 1e-5
    assert 0.0 < float(aux) <= config.num_experts  # E · Σ_e f_e · P_e

    def loss(p):
        nll, aux = token_nll(p, config, tokens, 8)
        return jnp.mean(nll) + 0.01 * aux

    grads = jax.grad(loss)(params)
    leaves = jax.tree_util.tree_leaves(grads)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    experts = grads.layers[0].mlp.experts
    assert float(jnp.abs(experts.w_down).sum()) > 0 and float(jnp.abs(grads.embed).sum()) > 0
