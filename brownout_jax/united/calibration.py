"""Calibration text for united experts: plain text, JSONL, Alpaca or ShareGPT JSON → token ids."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np


class CalibrationDataError(ValueError):
    """A calibration file is malformed; the message names the file and line or record."""


def _alpaca_text(record: dict) -> str:
    parts = [record.get("instruction", ""), record.get("input", ""), record.get("output", "")]
    return "\n".join(str(p) for p in parts if p)


def _sharegpt_text(record: dict) -> str:
    turns = record.get("conversations") or record.get("messages") or []
    return "\n".join(str(t.get("value", t.get("content", ""))) for t in turns)


def _record_text(record, where: str) -> str:
    if isinstance(record, str):
        return record
    if not isinstance(record, dict):
        raise CalibrationDataError(f"{where}: expected an object or a string")
    if "text" in record:
        return str(record["text"])
    if "instruction" in record:
        return _alpaca_text(record)
    if "conversations" in record or "messages" in record:
        return _sharegpt_text(record)
    raise CalibrationDataError(
        f"{where}: no 'text', Alpaca ('instruction') or ShareGPT ('conversations') field"
    )


def load_calibration_texts(path: str | Path) -> list[str]:
    """Texts from: ``.jsonl`` (one object per line with ``text``, or Alpaca/ShareGPT records),
    ``.json`` (a list of Alpaca or ShareGPT records), anything else as plain text split on
    blank lines."""
    path = Path(path)
    if not path.is_file():
        raise CalibrationDataError(f"{path}: calibration file not found")
    raw = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        texts = []
        for number, line in enumerate(raw.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise CalibrationDataError(f"{path}:{number}: invalid JSON ({err})") from err
            texts.append(_record_text(record, f"{path}:{number}"))
    elif path.suffix == ".json":
        try:
            records = json.loads(raw)
        except json.JSONDecodeError as err:
            raise CalibrationDataError(f"{path}: invalid JSON ({err})") from err
        if not isinstance(records, list):
            raise CalibrationDataError(f"{path}: expected a JSON list of records")
        texts = [_record_text(r, f"{path}: record {i}") for i, r in enumerate(records)]
    else:
        texts = [block.strip() for block in raw.split("\n\n")]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise CalibrationDataError(f"{path}: no calibration text found")
    return texts


def tokenize_texts(
    texts: Sequence[str], tokenizer, seq_len: int, max_tokens: int
) -> list[list[int]]:
    """Tokenizes and packs texts into sequences of at most ``seq_len``, up to ``max_tokens``."""
    sequences: list[list[int]] = []
    total = 0
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False)
        for start in range(0, len(ids), seq_len):
            chunk = ids[start : start + seq_len]
            if total + len(chunk) > max_tokens:
                chunk = chunk[: max_tokens - total]
            if chunk:
                sequences.append(chunk)
                total += len(chunk)
            if total >= max_tokens:
                return sequences
    return sequences


def pack_token_windows(
    texts: Sequence[str],
    tokenizer,
    window: int,
    max_windows: int,
    separator_ids: Sequence[int] = (),
) -> list[list[int]]:
    """Texts joined by ``separator_ids`` (e.g. EOS) into one stream, cut into windows of exactly
    ``window`` tokens (the tail that does not fill a window is dropped), at most
    ``max_windows`` of them. Equal lengths give every evaluation batch the same shape."""
    if window < 2:
        raise ValueError(f"window must be at least 2 tokens, got {window}")
    windows: list[list[int]] = []
    stream: list[int] = []
    for index, text in enumerate(texts):
        if index:
            stream.extend(separator_ids)
        stream.extend(tokenizer.encode(text, add_special_tokens=False))
        while len(stream) >= window and len(windows) < max_windows:
            windows.append(stream[:window])
            del stream[:window]
        if len(windows) >= max_windows:
            break
    return windows


def random_token_sequences(
    num_tokens: int, vocab_size: int, seq_len: int, seed: int = 0
) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab_size, num_tokens)
    return [ids[i : i + seq_len].tolist() for i in range(0, num_tokens, seq_len)]
