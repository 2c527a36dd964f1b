"""Training data: text, JSONL or token arrays, packed into fixed-length rows."""

import json
from pathlib import Path

import mlx.core as mx
import numpy as np


def read_tokens(paths, tokenizer=None):
    """One token stream from .txt / .jsonl ({"text": ...}) / .npy files, documents
    separated by the tokenizer's EOS."""
    parts = []
    for path in map(Path, paths):
        if path.suffix == ".npy":
            arr = np.load(path, allow_pickle=False)
            if arr.dtype.kind not in "iu" or arr.ndim != 1:
                raise ValueError(f"{path}: expected a 1-D integer token array, got {arr.dtype} {arr.shape}")
            parts.append(arr.astype(np.int32))
            continue
        if tokenizer is None:
            raise ValueError(f"{path}: text data needs a tokenizer")
        if path.suffix == ".jsonl":
            docs = []
            for i, line in enumerate(path.read_text().splitlines()):
                if line.strip():
                    try:
                        docs.append(json.loads(line)["text"])
                    except (json.JSONDecodeError, KeyError, TypeError):
                        raise ValueError(f"{path}:{i + 1}: expected a JSON object with a 'text' field") from None
        else:
            docs = [path.read_text(errors="replace")]
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        for doc in docs:
            parts.append(np.array(tokenizer.encode(doc) + eos, np.int32))
    if not parts:
        raise ValueError("no training data given")
    return np.concatenate(parts)


def pack(tokens, seq_len):
    """Rows of seq_len + 1 tokens (inputs and shifted targets), end dropped."""
    n = (len(tokens) - 1) // seq_len
    if n < 1:
        raise ValueError(f"{len(tokens)} tokens are fewer than one sequence of {seq_len + 1}")
    starts = np.arange(n) * seq_len
    return tokens[starts[:, None] + np.arange(seq_len + 1)[None]]


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
