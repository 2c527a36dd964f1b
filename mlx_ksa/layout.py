"""The KSA sequence layout (KSA-SPEC sections 1 and 3).

Text is cut into chunks of ``chunk`` tokens and ``summaries`` learned summary
tokens follow each complete chunk: ``t0..t7 s0 t8..t15 s1 ...``. mlx-ksa never
materialises that interleaved order. It keeps two streams, the text tokens
(text index ``t``) and the summary tokens (summary index ``c * S + j`` for the
``j``-th summary of chunk ``c``), because every per-token operation (norms,
MLP, projections) ignores order and attention only needs to know which chunk
a token belongs to. The interleaved ("expanded") index is still defined here,
as the spec states the rules in it.
"""

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

TEXT_POSITION_TYPES = ("origin", "inner_chunk")
SUMMARY_POSITION_TYPES = ("last_chunk_slice_right", "last_chunk_slice_left", "zeros")


@dataclass(frozen=True)
class Layout:
    chunk: int  # k = summary_chunk_size
    # S = summary_token_num. S = 0 is the no-summary baseline, not a KSA
    # layout: text sees its sliding chunk window only (band_start(t) .. t).
    summaries: int = 1
    text_positions_type: str = "origin"
    summary_positions_type: str = "last_chunk_slice_right"

    def __post_init__(self):
        for name, least in (("chunk", 1), ("summaries", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < least:
                key = "summary_chunk_size" if name == "chunk" else "summary_token_num"
                kind = "positive" if least else "non-negative"
                raise ValueError(f"{key} must be a {kind} integer, got {v!r}")
        if self.summaries > self.chunk:
            raise ValueError(
                f"summary_token_num ({self.summaries}) larger than summary_chunk_size "
                f"({self.chunk}) is not supported"
            )
        if self.text_positions_type not in TEXT_POSITION_TYPES:
            raise ValueError(
                f"unknown summary_chunk_position_ids_type {self.text_positions_type!r}; "
                f"expected one of {TEXT_POSITION_TYPES}"
            )
        if self.summary_positions_type not in SUMMARY_POSITION_TYPES:
            raise ValueError(
                f"unknown summary_token_position_ids_type {self.summary_positions_type!r}; "
                f"expected one of {SUMMARY_POSITION_TYPES}"
            )

    @property
    def block(self):
        """Length of one chunk in the expanded sequence (k + S)."""
        return self.chunk + self.summaries

    def completed_chunks(self, t0, n):
        """(first chunk, count) of the chunks that text tokens [t0, t0 + n) complete."""
        return t0 // self.chunk, (t0 + n) // self.chunk - t0 // self.chunk

    # -- RoPE positions --------------------------------------------------
    def text_positions(self, t0, n):
        t = np.arange(t0, t0 + n, dtype=np.int64)
        if self.text_positions_type == "inner_chunk":
            t = t % self.chunk
        return t

    def summary_positions(self, c0, m):
        """Positions of the summaries of chunks c0 .. c0 + m - 1, chunk-major."""
        k, S = self.chunk, self.summaries
        if S == 0:
            return np.zeros(0, np.int64)
        c = np.arange(c0, c0 + m, dtype=np.int64)[:, None]
        j = np.arange(S, dtype=np.int64)[None, :]
        if self.summary_positions_type == "zeros":
            pos = np.zeros((m, S), np.int64)
        else:
            first = j + 1 if self.summary_positions_type == "last_chunk_slice_right" else j
            pos = c * k + np.maximum((first * k) // S - 1, 0)
        return pos.reshape(-1)

    # -- the expanded (interleaved) order ----------------------------------
    def expanded_text_index(self, t):
        return t + (t // self.chunk) * self.summaries

    def expanded_summary_index(self, c, j):
        return c * self.block + self.chunk + j

    def split(self, p):
        """(is_summary, chunk, offset in chunk or summary slot) of expanded index p."""
        p = np.asarray(p)
        c, r = p // self.block, p % self.block
        is_summary = r >= self.chunk
        return is_summary, c, np.where(is_summary, r - self.chunk, r)

    def expand(self, ids, summary_token_begin):
        """The interleaved id sequence (numpy, last axis) the official model runs on."""
        ids = np.asarray(ids)
        n = ids.shape[-1]
        m = n // self.chunk
        full = ids[..., : m * self.chunk].reshape(*ids.shape[:-1], m, self.chunk)
        summ = np.broadcast_to(
            summary_token_begin + np.arange(self.summaries), (*ids.shape[:-1], m, self.summaries)
        )
        body = np.concatenate([full, summ.astype(ids.dtype)], axis=-1).reshape(*ids.shape[:-1], -1)
        return np.concatenate([body, ids[..., m * self.chunk :]], axis=-1)


def rope_cos_sin(positions, head_dim, theta, dtype=mx.float32):
    """HF-style (half-split) RoPE tables for arbitrary integer positions."""
    # float32 throughout, as HF computes it, so long positions round the same way.
    exponent = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    inv_freq = mx.array(np.float32(1.0) / np.power(np.float32(theta), exponent))
    ang = mx.array(np.asarray(positions, np.float32))[:, None] * inv_freq[None, :]
    ang = mx.concatenate([ang, ang], axis=-1)
    return mx.cos(ang).astype(dtype), mx.sin(ang).astype(dtype)


def apply_rope(x, cos, sin):
    """x: [B, H, L, D] with cos/sin: [L, D]."""
    h = x.shape[-1] // 2
    rot = mx.concatenate([-x[..., h:], x[..., :h]], axis=-1)
    return x * cos + rot * sin
