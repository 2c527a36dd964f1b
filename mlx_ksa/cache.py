"""KSACache: one layer's decode cache, growing as N/k instead of N.

One buffer per K and V, ``[B, Hkv, slots, D]``, in four regions:

    [ scratch S | chunk k | ring W*k | summaries S*chunks ]

* ``chunk`` holds the text of the chunk being filled, from its right end
  leftwards, so the filled part always touches the ring;
* ``ring`` holds the text of the last W complete chunks (chunk ``c`` in slot
  ``c % W``); it grows in steps up to W chunks, so layers whose window covers
  the whole context never allocate more than the text they saw;
* ``summaries`` holds the summaries of every complete chunk in chunk order;
* ``scratch`` takes a completing chunk's summaries for their own attention.

K/V carry RoPE already, so order inside the buffer is free, and a decode
step's text query reads one contiguous slice: the filled chunk, the ring,
and the summaries that left the window (`visibility.summary_prefix`), which
the slice's end selects. Completing a chunk costs O(k) copies, done at the
start of the next call so the step that reads the buffer never also writes
it (MLX would otherwise copy the whole buffer to keep the read consistent).
"""

import mlx.core as mx
import mlx_lm.models.cache as mlx_lm_cache
from mlx_lm.models.cache import _BaseCache

from . import visibility
from .kernels import decode as decode_kernel


class KSACache(_BaseCache):
    step = 256  # growth of the ring and the summary region, in slots

    def __init__(self, chunk, summaries, window, keep_summaries=True):
        self.chunk, self.summaries, self.window = chunk, summaries, window
        # A layer whose window covers every context it will see never reads a
        # summary; the model builds its cache without them to save S/k memory.
        self.keep_summaries = keep_summaries
        self.keys = self.values = None
        self.offset = 0  # text tokens seen
        self.flushed = 0  # complete chunks already moved to the ring / summaries
        self.ring_chunks = 0  # ring capacity, in chunks

    # -- regions ---------------------------------------------------------
    @property
    def _ring0(self):
        return self.summaries + self.chunk

    @property
    def _sum0(self):
        return self._ring0 + self.ring_chunks * self.chunk

    def _summary_slots(self):
        return self.keys.shape[2] - self._sum0

    def _check_reach(self, t):
        if not self.keep_summaries and visibility.summary_prefix(
            t, self.chunk, self.summaries, self.window
        ):
            raise ValueError(
                f"context of {t + 1} tokens passes this layer's window of "
                f"{self.window * self.chunk} tokens, and its cache was made without "
                "summaries; make the cache with a larger max_context"
            )

    def _reserve(self, like, ring_chunks, summary_slots):
        """Allocates or grows the buffers, keeping what they hold."""
        B, H, _, D = like.shape
        ring_chunks = min(self.window, ring_chunks)
        if not self.keep_summaries:
            summary_slots = 0
        if self.keys is not None:
            if ring_chunks <= self.ring_chunks and summary_slots <= self._summary_slots():
                return
            ring_chunks = max(ring_chunks, self.ring_chunks)
            summary_slots = max(summary_slots, self._summary_slots())
        k, step = self.chunk, self.step
        grow_ring = max(1, step // k)
        ring_chunks = min(self.window, -(-ring_chunks // grow_ring) * grow_ring)
        summary_slots = -(-summary_slots // step) * step

        def grown(old):
            ring = mx.zeros((B, H, (ring_chunks - self.ring_chunks) * k, D), like.dtype)
            tail = mx.zeros((B, H, summary_slots, D), like.dtype)
            if old is None:
                return mx.concatenate([mx.zeros((B, H, self._ring0, D), like.dtype), ring, tail], 2)
            kept = self.flushed * self.summaries if self.keep_summaries else 0
            tail = tail[:, :, kept:]
            return mx.concatenate(
                [old[:, :, : self._sum0], ring, old[:, :, self._sum0 : self._sum0 + kept], tail], 2
            )

        self.keys, self.values = grown(self.keys), grown(self.values)
        self.ring_chunks = ring_chunks

    def _write_ring(self, first_chunk, keys, values):
        """Writes whole chunks first_chunk.. (at most W of them) into their slots."""
        k, W = self.chunk, self.window
        n = keys.shape[2] // k
        slot = first_chunk % W if W else 0
        run = min(n, W - slot)
        for src, dst, m in ((0, slot, run), (run, 0, n - run)):
            if m:
                s, d = slice(src * k, (src + m) * k), slice(self._ring0 + dst * k, self._ring0 + (dst + m) * k)
                self.keys[:, :, d] = keys[:, :, s]
                self.values[:, :, d] = values[:, :, s]

    def _write_summaries(self, first_chunk, keys, values):
        if self.keep_summaries and keys.shape[2]:
            a = self._sum0 + first_chunk * self.summaries
            self.keys[:, :, a : a + keys.shape[2]] = keys
            self.values[:, :, a : a + keys.shape[2]] = values

    def _flush(self):
        """Moves a chunk completed by the last decode step out of chunk / scratch."""
        c = self.flushed
        if c == self.offset // self.chunk:
            return
        S, k = self.summaries, self.chunk
        self._reserve(self.keys, c + 1, (c + 1) * S)
        if self.window:
            self._write_ring(c, self.keys[:, :, S : S + k], self.values[:, :, S : S + k])
        self._write_summaries(c, self.keys[:, :, :S], self.values[:, :, :S])
        self.flushed = c + 1

    # -- a block of new tokens -------------------------------------------
    def context(self, n_new, like):
        """Cached keys the next n_new text tokens may see, in stream order.

        Returns (text_keys, text_values, text_base, summary_keys, summary_values):
        lists of arrays to put before the new tokens' keys; the text starts at
        text index text_base, the summaries at summary index 0.
        """
        if n_new:
            self._check_reach(self.offset + n_new - 1)
        if self.keys is None:
            self._reserve(like, 0, 0)
        self._flush()
        k, S, W = self.chunk, self.summaries, self.window
        c, f = divmod(self.offset, k)
        n_ring = min(c, W)
        first = (c - n_ring) % W if W else 0
        runs = [(first, min(n_ring, W - first)), (0, n_ring - min(n_ring, W - first))]
        parts = [
            (self._ring0 + s * k, self._ring0 + (s + m) * k) for s, m in runs if m
        ] + [(S + k - f, S + k)]
        n_sum = c * S if self.keep_summaries else 0
        return (
            [self.keys[:, :, a:b] for a, b in parts],
            [self.values[:, :, a:b] for a, b in parts],
            (c - n_ring) * k,
            [self.keys[:, :, self._sum0 : self._sum0 + n_sum]],
            [self.values[:, :, self._sum0 : self._sum0 + n_sum]],
        )

    def commit(self, text_keys, text_values, text_base, new_sum_keys, new_sum_values):
        """Stores a block's new tokens; the text streams are context() + new text."""
        k, S, W = self.chunk, self.summaries, self.window
        t0 = self.offset
        t1 = text_base + text_keys.shape[2]
        c0, c1 = t0 // k, t1 // k
        self._reserve(text_keys, c1, c1 * S)
        first = max(c0, c1 - W)
        if c1 > first:
            a, b = first * k - text_base, c1 * k - text_base
            self._write_ring(first, text_keys[:, :, a:b], text_values[:, :, a:b])
        f = t1 - c1 * k
        if f:
            self.keys[:, :, S + k - f : S + k] = text_keys[:, :, t1 - f - text_base :]
            self.values[:, :, S + k - f : S + k] = text_values[:, :, t1 - f - text_base :]
        self._write_summaries(c0, new_sum_keys, new_sum_values)
        self.offset, self.flushed = t1, c1

    # -- one decode step ---------------------------------------------------
    def decode(self, q, keys, values, scale):
        """Attention of one decode step; stores its keys and values.

        q, keys, values: [B, H or Hkv, 1 (+S), D], the text token, then the
        summaries of the chunk it completes (if it does). Returns
        [B, H, 1 (+S), D], from the fused kernel where one serves.
        """
        ranges = self.store_decode(keys, values)
        args = (q, self.keys, self.values, *ranges, scale)
        out = decode_kernel.decode_attention(*args)
        return decode_reference(*args) if out is None else out

    def store_decode(self, keys, values):
        """Stores one decode step's keys and values (see `decode`).

        Returns (start, end, sum_end): the text query sees the slots
        [start, end), one contiguous range (the filled chunk, the ring, and
        the summaries that left the window, `visibility.summary_prefix`,
        which the range's end selects); the summary queries see
        [scratch | chunk] = [0, sum_end).
        """
        t = self.offset
        self._check_reach(t)
        if self.keys is None:
            self._reserve(keys, 0, 0)
        self._flush()
        k, S, W = self.chunk, self.summaries, self.window
        c, f = divmod(t, k)
        start = S + k - 1 - f
        self.keys[:, :, start : start + 1] = keys[:, :, :1]
        self.values[:, :, start : start + 1] = values[:, :, :1]
        if keys.shape[2] > 1:
            self.keys[:, :, :S] = keys[:, :, 1:]
            self.values[:, :, :S] = values[:, :, 1:]
        self.offset = t + 1
        n_sum = visibility.summary_prefix(t, k, S, W)
        end = self._sum0 + n_sum if n_sum else self._ring0 + min(c, W) * k
        return start, end, S + k

    # -- mlx-lm cache protocol -------------------------------------------
    @property
    def state(self):
        return (self.keys, self.values, self.offset, self.flushed, self.ring_chunks,
                self.chunk, self.summaries, self.window, self.keep_summaries)

    @state.setter
    def state(self, v):
        (self.keys, self.values, self.offset, self.flushed, self.ring_chunks,
         self.chunk, self.summaries, self.window, self.keep_summaries) = v
        self.keep_summaries = bool(self.keep_summaries)

    def size(self):
        return self.offset

    def empty(self):
        return self.keys is None

    def is_trimmable(self):
        return False

    @property
    def nbytes(self):
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes


def decode_reference(q, keys, values, start, end, sum_end, scale):
    """SDPA over slices of the cache buffer: what `kernels.decode` computes.

    Row 0 of q sees slots [start, end); rows 1..S, the summaries of a
    completing chunk, see [scratch S | chunk] = [0, sum_end) under
    `visibility.summary_mask`.
    """
    sdpa = mx.fast.scaled_dot_product_attention
    out = sdpa(q[:, :, :1], keys[:, :, start:end], values[:, :, start:end], scale=scale)
    S = q.shape[2] - 1
    if S:
        mask = mx.array(visibility.summary_mask(sum_end - S, S))
        out_sum = sdpa(q[:, :, 1:], keys[:, :, :sum_end], values[:, :, :sum_end], scale=scale, mask=mask)
        out = mx.concatenate([out, out_sum], axis=2)
    return out


# mlx-lm's load_prompt_cache looks cache classes up by name in its own module.
mlx_lm_cache.KSACache = KSACache
