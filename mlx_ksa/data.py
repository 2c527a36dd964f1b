"""Training data: text, JSONL or token arrays, packed into fixed-length rows."""

import json
from pathlib import Path

import mlx.core as mx
import numpy as np


def read_tokens(paths, tokenizer=None):
    """One token stream from .txt / .jsonl / .npy files, documents separated
    by the tokenizer's EOS (see read_tokens_and_mask)."""
    return read_tokens_and_mask(paths, tokenizer)[0]


def read_tokens_and_mask(paths, tokenizer=None, mask_prompt=False):
    """read_tokens' stream and a 0/1 mask over it: 1 where a token is a
    training target. JSONL records are {"text": ...} or {"prompt": ...,
    "completion": ...} (mlx-lm's completions format); with mask_prompt a
    prompt's tokens are 0, so only the completion and its EOS are learned."""
    parts, masks = [], []
    for path in map(Path, paths):
        if path.suffix == ".npy":
            arr = np.load(path, allow_pickle=False)
            if arr.dtype.kind not in "iu" or arr.ndim != 1:
                raise ValueError(f"{path}: expected a 1-D integer token array, got {arr.dtype} {arr.shape}")
            parts.append(arr.astype(np.int32))
            masks.append(np.ones(len(arr), np.uint8))
            continue
        if tokenizer is None:
            raise ValueError(f"{path}: text data needs a tokenizer")
        if path.suffix == ".jsonl":
            docs = [_record(path, i, line) for i, line in enumerate(path.read_text().splitlines()) if line.strip()]
        else:
            docs = [("", path.read_text(errors="replace"))]
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        for prompt, completion in docs:
            ids = tokenizer.encode(prompt + completion) + eos
            # The prompt alone tokenizes as the start of the whole (BOS included).
            n_prompt = min(len(tokenizer.encode(prompt)), len(ids)) if mask_prompt and prompt else 0
            parts.append(np.array(ids, np.int32))
            masks.append(np.concatenate([np.zeros(n_prompt, np.uint8), np.ones(len(ids) - n_prompt, np.uint8)]))
    if not parts:
        raise ValueError("no training data given")
    return np.concatenate(parts), np.concatenate(masks)


def _record(path, i, line):
    """(prompt, completion) of one JSONL line."""
    try:
        obj = json.loads(line)
        record = ("", obj["text"]) if "text" in obj else (obj["prompt"], obj["completion"])
        if all(isinstance(x, str) for x in record):
            return record
    except (json.JSONDecodeError, KeyError, TypeError):
        pass
    raise ValueError(f"{path}:{i + 1}: expected a JSON object with a 'text' field, or 'prompt' and "
                     "'completion' fields (strings)")


def _rows(n_tokens, seq_len):
    """Token indices of the rows `pack` makes: seq_len + 1 each, end dropped."""
    n = (n_tokens - 1) // seq_len
    if n < 1:
        raise ValueError(f"{n_tokens} tokens are fewer than one sequence of {seq_len + 1}")
    return (np.arange(n) * seq_len)[:, None] + np.arange(seq_len + 1)[None]


def pack(tokens, seq_len):
    """Rows of seq_len + 1 tokens (inputs and shifted targets), end dropped."""
    return tokens[_rows(len(tokens), seq_len)]


def pack_weights(mask, seq_len):
    """Loss weights [rows, seq_len] for pack's rows: each target token's mask."""
    return mask[_rows(len(mask), seq_len)][:, 1:].astype(np.float32)


class Batches:
    """Seeded shuffled batches whose position is a small state, for exact resume.

    weights: optional per-target loss weights, [rows, seq_len] aligned with
    rows[:, 1:] (0 masks a target out, as mlx-lm's prompt masking does; more
    than 1 stresses it); batches are then (tokens, weights) pairs."""

    def __init__(self, rows, batch_size, seed=0, weights=None):
        if len(rows) < batch_size:
            raise ValueError(f"{len(rows)} sequences are fewer than a batch of {batch_size}")
        if weights is not None and weights.shape != (rows.shape[0], rows.shape[1] - 1):
            raise ValueError(f"loss weights of shape {weights.shape} do not match rows of shape {rows.shape}: "
                             f"expected {(rows.shape[0], rows.shape[1] - 1)}, one weight per target")
        self.rows, self.weights, self.batch_size, self.seed = rows, weights, batch_size, seed
        self.epoch, self.index = 0, 0

    def _order(self):
        return np.random.default_rng((self.seed, self.epoch)).permutation(len(self.rows))

    def __next__(self):
        if self.index + self.batch_size > len(self.rows):
            self.epoch, self.index = self.epoch + 1, 0
        idx = self._order()[self.index : self.index + self.batch_size]
        self.index += self.batch_size
        if self.weights is None:
            return mx.array(self.rows[idx])
        return mx.array(self.rows[idx]), mx.array(self.weights[idx], dtype=mx.float32)

    def __iter__(self):
        return self

    @property
    def state(self):
        return {"epoch": self.epoch, "index": self.index}

    @state.setter
    def state(self, s):
        self.epoch, self.index = s["epoch"], s["index"]
