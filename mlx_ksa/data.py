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
    training target. JSONL records take mlx-lm's formats: {"text": ...},
    {"prompt": ..., "completion": ...} and {"messages": [...]} (through the
    tokenizer's chat template). With mask_prompt the prompt's tokens (all
    messages before the last, and the assistant header) are 0, so only the
    completion is learned."""
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
            records = [_record(path, i, line) for i, line in enumerate(path.read_text().splitlines())
                       if line.strip()]
        else:
            records = [{"text": path.read_text(errors="replace")}]
        for record in records:
            ids, n_prompt = _encode(tokenizer, record, mask_prompt)
            n_prompt = min(n_prompt, len(ids))
            parts.append(np.array(ids, np.int32))
            masks.append(np.concatenate([np.zeros(n_prompt, np.uint8), np.ones(len(ids) - n_prompt, np.uint8)]))
    if not parts:
        raise ValueError("no training data given")
    return np.concatenate(parts), np.concatenate(masks)


def _encode(tokenizer, record, mask_prompt):
    """(token ids, how many of them are the masked prompt) of one record; the
    prompt is tokenized on its own only when it is masked."""
    if "messages" in record:
        # As mlx-lm's chat datasets: the template ends each turn itself.
        messages = record["messages"]
        masked = mask_prompt and len(messages) > 1
        prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True) if masked else []
        return tokenizer.apply_chat_template(messages), len(prompt)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    prompt = record.get("prompt", "")
    ids = tokenizer.encode(prompt + record.get("completion", record.get("text", ""))) + eos
    # The prompt alone tokenizes as the start of the whole (BOS included).
    return ids, len(tokenizer.encode(prompt)) if mask_prompt and prompt else 0


def _record(path, i, line):
    """One JSONL line as a dict of one of the formats read_tokens_and_mask takes."""
    try:
        obj = json.loads(line)
        if "messages" in obj:
            messages = obj["messages"]
            if messages and all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                and isinstance(m.get("role"), str) for m in messages):
                return {"messages": messages}
        elif "text" in obj:
            if isinstance(obj["text"], str):
                return {"text": obj["text"]}
        elif isinstance(obj["prompt"], str) and isinstance(obj["completion"], str):
            return {"prompt": obj["prompt"], "completion": obj["completion"]}
    except (json.JSONDecodeError, KeyError, TypeError):
        pass
    raise ValueError(f"{path}:{i + 1}: expected a JSON object with a 'text' field, 'prompt' and "
                     "'completion' fields, or a non-empty 'messages' list of {role, content} (strings)")


def _rows(n_tokens, seq_len):
    """Token indices of the rows `pack` makes: seq_len + 1 each, end dropped."""
    n = (n_tokens - 1) // seq_len
    if n < 1:
        raise ValueError(f"{n_tokens} tokens are fewer than one sequence of {seq_len + 1}: "
                         "give more data or a shorter sequence (--seq-len)")
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
