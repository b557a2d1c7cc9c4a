"""Incremental detokenization (engine/detokenize.py) against decoding the whole list: the same
text, given out at the same moments, on the demo tokenizer and on tiny tokenizers trained here
(byte-level BPE whose emoji and CJK characters split across tokens, SentencePiece-style with
byte fallback, WordPiece with cleanup), on real text and on arbitrary ids; stop strings cut
exactly where the whole-list decode cuts them. No JAX."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from brownout_jax.engine.detokenize import IncrementalText

TEXTS = (
    "héllo 世界 🎉 x👍🏽 naïve — «ok» 日本語のテキスト 🇯🇵 end",
    "plain text, with stops. STOP here\n\nand more 🎉🎉",
    "emoji 🎉🎉 and 中文字符 mixed with ascii, then 👩‍👩‍👧 a family",
)
DEMO = Path(__file__).resolve().parent.parent / "checkpoints" / "demo"  # its tokenizer only
STOPS = ((), ("STOP",), ("\n\n", "x"), ("🎉",), ("世界",), ("e",), ("ab", "abc"), ("\ufffd",))


class WholeListText:
    """What IncrementalText did before it was incremental: decode every id at every update,
    hold back what may still become a stop string or a character; the reference."""

    def __init__(self, tokenizer, stop=()):
        self.tokenizer, self.stop = tokenizer, stop
        self.holdback = max((len(s) for s in stop), default=1) - 1
        self.emitted, self.text = 0, ""

    def update(self, ids):
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.text = text[: min(hits)]
            return self._take(len(self.text)), True
        self.text = text
        settled = len(text) - self.holdback
        while settled > self.emitted and text[settled - 1] == "\ufffd":
            settled -= 1
        return self._take(max(settled, self.emitted)), False

    def flush(self):
        return self._take(len(self.text))

    def _take(self, end):
        delta = self.text[self.emitted : end]
        self.emitted = max(self.emitted, end)
        return delta


def _stream(text, ids):
    """Every update's (delta, stopped) over growing prefixes of ``ids``, then the flush."""
    out = []
    for k in range(1, len(ids) + 1):
        out.append(text.update(ids[:k]))
        if out[-1][1]:
            break
    out.append(text.flush())
    return out


def _check(tokenizer, sequences, stops=STOPS):
    for ids in sequences:
        for stop in stops:
            new = _stream(IncrementalText(tokenizer, stop), ids)
            assert new == _stream(WholeListText(tokenizer, stop), ids), (stop, ids)
            if not stop:
                joined = "".join(delta for delta, _ in new[:-1]) + new[-1]
                assert joined == tokenizer.decode(ids, skip_special_tokens=True)


def _random_ids(vocab: int, seed: int, count: int = 60) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(rng.randrange(1, 48))] for _ in range(count)]


@pytest.fixture(scope="module")
def demo_tokenizer():
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    return AutoTokenizer.from_pretrained(str(DEMO), local_files_only=True)


def _train(model, trainer, normalizer=None, pre_tokenizer=None, decoder=None) -> Tokenizer:
    tokenizer = Tokenizer(model)
    if normalizer is not None:
        tokenizer.normalizer = normalizer
    if pre_tokenizer is not None:
        tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoder
    tokenizer.train_from_iterator(list(TEXTS) * 4, trainer)
    return tokenizer


def byte_level_bpe() -> Tokenizer:
    # Few merges: most non-ASCII characters stay split into their UTF-8 bytes.
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    return _train(
        models.BPE(),
        trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"], initial_alphabet=alphabet),
        pre_tokenizer=pre_tokenizers.ByteLevel(add_prefix_space=False),
        decoder=decoders.ByteLevel(),
    )


def sentencepiece_style() -> Tokenizer:
    """Llama's layout: ▁ for spaces, <0xNN> byte fallback, the first space stripped."""
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    return _train(
        models.BPE(byte_fallback=True),
        trainers.BpeTrainer(vocab_size=400, special_tokens=["<eos>", *byte_tokens]),
        normalizer=normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]),
        decoder=decoders.Sequence(
            [
                decoders.Replace("▁", " "),
                decoders.ByteFallback(),
                decoders.Fuse(),
                decoders.Strip(" ", 1, 0),
            ]
        ),
    )


def word_piece() -> Tokenizer:
    return _train(
        models.WordPiece(unk_token="[UNK]"),
        trainers.WordPieceTrainer(vocab_size=200, special_tokens=["[UNK]", "<eos>"]),
        pre_tokenizer=pre_tokenizers.BertPreTokenizer(),
        decoder=decoders.WordPiece(),
    )


def test_the_demo_tokenizer_splits_characters_across_tokens(demo_tokenizer):
    ids = demo_tokenizer.encode("🎉世", add_special_tokens=False)
    assert "\ufffd" in demo_tokenizer.decode(ids[:1])  # else the tests below prove little


def test_demo_text_with_multibyte_characters_decodes_as_the_whole_list(demo_tokenizer):
    eos = demo_tokenizer.convert_tokens_to_ids("<|endoftext|>")
    texts = [demo_tokenizer.encode(t, add_special_tokens=False) for t in TEXTS]
    with_special = [[*ids[:7], eos, *ids[7:], eos] for ids in texts]  # skipped, not text
    _check(demo_tokenizer, texts + with_special)


def test_demo_arbitrary_ids_decode_as_the_whole_list(demo_tokenizer):
    vocab = len(demo_tokenizer)
    byte_ids = [[i % 256 for i in ids] for ids in _random_ids(vocab, 1)]  # invalid UTF-8 runs
    _check(demo_tokenizer, _random_ids(vocab, 0) + byte_ids)


@pytest.mark.parametrize("make", [byte_level_bpe, sentencepiece_style, word_piece])
@pytest.mark.parametrize("wrapped", [False, True], ids=["tokenizers", "transformers"])
def test_trained_tokenizers_decode_as_the_whole_list(make, wrapped):
    core = make()
    tokenizer = core
    if wrapped:
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>")
    texts = [core.encode(t).ids for t in TEXTS]
    if make is byte_level_bpe:
        assert any("\ufffd" in core.decode(ids[:k]) for ids in texts for k in range(len(ids)))
    _check(tokenizer, texts + _random_ids(core.get_vocab_size(), 2, count=40))


def test_a_tokenizer_that_cleans_up_spaces_decodes_the_whole_list():
    """Cleanup rewrites text across tokens (" ." → "."): no window can be exact."""
    core = word_piece()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="<eos>", clean_up_tokenization_spaces=True
    )
    assert IncrementalText(tokenizer)._decode is None
    _check(tokenizer, [core.encode(t).ids for t in TEXTS] + _random_ids(200, 3, count=10))


def test_a_decoder_whose_windows_disagree_falls_back_to_the_whole_list():
    class Marking:
        """Ends an odd number of ids with a mark: a window's text does not extend the last."""

        def decode(self, ids, skip_special_tokens=False):
            return "".join(chr(97 + i % 26) for i in ids) + "." * (len(ids) % 2)

    ids = list(range(12))
    text = IncrementalText(Marking())
    assert _stream(text, ids) == _stream(WholeListText(Marking()), ids)
    assert text._decode is None


def test_work_per_token_does_not_grow_with_the_text(demo_tokenizer):
    """The window and the kept text stay small however long the generation gets."""
    ids = demo_tokenizer.encode(" ".join(TEXTS) * 20, add_special_tokens=False)
    text = IncrementalText(demo_tokenizer, ("never appears",))
    widest = longest = 0
    for k in range(1, len(ids) + 1):
        text.update(ids[:k])
        widest = max(widest, k - text._prefix)
        longest = max(longest, len(text._buf))
    assert len(ids) > 1000
    assert widest <= 8 and longest <= 64
