"""The demo model's tokenizer and training data: byte-level BPE trained on the corpus
(``demo_corpus``), documents packed into fixed-length chunks, a fixed-seed batch order."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from brownout_jax.demos.demo_corpus import Document

EOS = "<|endoftext|>"
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}: {{ message['content'] | trim }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


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
