"""KSACache: one layer's decode cache, growing as N/k instead of N.

One buffer per K and V, ``[B, Hkv, slots, D]``, in five regions:

    [ scratch S | chunk k | ring W*k | summaries S*chunks | spare k ]

* ``chunk`` holds the text of the chunk being filled, from its right end
  leftwards (token j of the chunk in slot ``S + k - 1 - j``), so the filled
  part always touches the ring and dropping its last tokens is free;
* ``ring`` holds the text of the last W complete chunks in stream order
  (chunk ``c`` in slot ``c % W``); it grows in steps up to W chunks, so layers
  whose window covers the whole context never allocate more than the text
  they saw;
* ``summaries`` holds the summaries of every complete chunk in chunk order;
* ``spare`` holds the text of the chunk that last left the ring, so that the
  last chunk completion can be undone by `trim` (speculative decoding rejects
  drafted tokens); it sits after the summaries, where no read reaches;
* ``scratch`` takes a completing chunk's summaries for their own attention.

K/V carry RoPE already, so order inside a chunk is free, and a decode step's
text query reads one contiguous slice: the filled chunk, the ring, and the
summaries that left the window (`visibility.summary_prefix`), which the
slice's end selects. Every token still has one slot that depends only on its
index, whatever calls brought it, so trimming and re-feeding tokens restores
the buffer bit for bit. Completing a chunk costs O(k) copies, done at the
start of the next call so the step that reads the buffer never also writes
it (MLX would otherwise copy the whole buffer to keep the read consistent).
"""

import mlx.core as mx
import mlx_lm.models.cache as mlx_lm_cache
import numpy as np
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
        # Whether the last chunk completion can be undone: false once undone,
        # as the spare then no longer holds the chunk its ring slot needs.
        self.reopenable = False

    # -- regions ---------------------------------------------------------
    @property
    def _ring0(self):
        return self.summaries + self.chunk

    @property
    def _sum0(self):
        return self._ring0 + self.ring_chunks * self.chunk

    def _summary_slots(self):
        return self.keys.shape[2] - self._sum0 - self.chunk

    def _chunk_slots(self):
        """Slots of tokens 0..k-1 of the chunk being filled."""
        return self._ring0 - 1 - np.arange(self.chunk)

    def _ring_slots(self, c):
        return self._ring0 + (c % self.window) * self.chunk + np.arange(self.chunk)

    @property
    def _spare0(self):
        return self.keys.shape[2] - self.chunk

    def _spare_slots(self):
        return self._spare0 + np.arange(self.chunk)

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
            zeros = lambda n: mx.zeros((B, H, n, D), like.dtype)
            ring = zeros((ring_chunks - self.ring_chunks) * k)
            if old is None:
                return mx.concatenate([zeros(self._ring0), ring, zeros(summary_slots + k)], 2)
            kept = self.flushed * self.summaries if self.keep_summaries else 0
            return mx.concatenate([
                old[:, :, : self._sum0], ring, old[:, :, self._sum0 : self._sum0 + kept],
                zeros(summary_slots - kept), old[:, :, -k:],
            ], 2)

        self.keys, self.values = grown(self.keys), grown(self.values)
        self.ring_chunks = ring_chunks

    def _move(self, src, dst):
        """Copies slots src to slots dst (lists of index arrays), reading all first."""
        src, dst = np.concatenate(src), np.concatenate(dst)
        if src.size:
            # Sources and destinations overlap (the ring slot whose chunk
            # goes to the spare takes the new chunk): gather all, then scatter.
            src, dst = mx.array(src), mx.array(dst)
            self.keys[:, :, dst] = self.keys[:, :, src]
            self.values[:, :, dst] = self.values[:, :, src]

    def _write(self, a, keys, values):
        self.keys[:, :, a : a + keys.shape[2]] = keys
        self.values[:, :, a : a + keys.shape[2]] = values

    def _write_ring(self, first_chunk, keys, values):
        """Writes whole chunks first_chunk.. (at most W of them) into their slots."""
        k, W = self.chunk, self.window
        n = keys.shape[2] // k
        slot = first_chunk % W if W else 0
        run = min(n, W - slot)
        for src, dst, m in ((0, slot, run), (run, 0, n - run)):
            if m:
                s = slice(src * k, (src + m) * k)
                self._write(self._ring0 + dst * k, keys[:, :, s], values[:, :, s])

    def _write_summaries(self, first_chunk, keys, values):
        if self.keep_summaries and keys.shape[2]:
            self._write(self._sum0 + first_chunk * self.summaries, keys, values)

    def _flush(self):
        """Moves a chunk completed by the last decode step out of chunk / scratch."""
        c = self.flushed
        if c == self.offset // self.chunk:
            return
        S, W = self.summaries, self.window
        self._reserve(self.keys, c + 1, (c + 1) * S)
        src, dst = [], []
        if c >= W:  # chunk c - W leaves the window: keep its text in the spare
            src.append(self._ring_slots(c) if W else self._chunk_slots())
            dst.append(self._spare_slots())
        if W:
            src.append(self._chunk_slots())
            dst.append(self._ring_slots(c))
        if self.keep_summaries:
            src.append(np.arange(S))
            dst.append(self._sum0 + c * S + np.arange(S))
        self._move(src, dst)
        self.flushed, self.reopenable = c + 1, True

    # -- a block of new tokens -------------------------------------------
    def context(self, n_new, like):
        """Cached keys the next n_new text tokens may see, in stream order.

        Returns (text_keys, text_values, text_base, summary_keys, summary_values):
        lists of arrays to put before the new tokens' keys; the text starts at
        text index text_base, the summaries at summary index 0. The filled
        part of the current chunk comes in stream order; the complete chunks
        before it in chunk order (attention never tells a complete chunk's
        tokens apart).
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
        ring = [(self._ring0 + s * k, self._ring0 + (s + m) * k) for s, m in runs if m]
        filled = slice(self._ring0 - 1, self._ring0 - 1 - f, -1)
        n_sum = c * S if self.keep_summaries else 0
        return (
            [self.keys[:, :, a:b] for a, b in ring] + [self.keys[:, :, filled]],
            [self.values[:, :, a:b] for a, b in ring] + [self.values[:, :, filled]],
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
        if c1 > c0 and c1 - 1 - W >= 0:
            # The text of chunk c1-1-W, which the last completion pushed out
            # of the window, is within the block (text_base <= its start).
            a = (c1 - 1 - W) * k - text_base
            self._write(self._spare0, text_keys[:, :, a : a + k], text_values[:, :, a : a + k])
        f = t1 - c1 * k
        if f:
            a = t1 - f - text_base
            self._write(self._ring0 - f, text_keys[:, :, a:][:, :, ::-1], text_values[:, :, a:][:, :, ::-1])
        self._write_summaries(c0, new_sum_keys, new_sum_values)
        self.offset, self.flushed = t1, c1
        self.reopenable = self.reopenable or c1 > c0

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
        self._write(start, keys[:, :, :1], values[:, :, :1])
        if keys.shape[2] > 1:
            self._write(0, keys[:, :, 1:], values[:, :, 1:])
        self.offset = t + 1
        n_sum = visibility.summary_prefix(t, k, S, W)
        end = self._sum0 + n_sum if n_sum else self._ring0 + min(c, W) * k
        return start, end, S + k

    # -- trimming ------------------------------------------------------------
    def trimmable(self):
        """How many of the last tokens `trim` can remove: those of the chunk
        being filled, and of the chunk before while its completion can be
        undone (one chunk boundary; k tokens at least)."""
        floor = self.flushed - (self.flushed > 0 and self.reopenable)
        return self.offset - floor * self.chunk

    def is_trimmable(self):
        return self.offset == 0 or self.trimmable() > 0

    def trim(self, n):
        """Removes the last n tokens (at most `trimmable()`); returns how many."""
        n = min(n, self.offset)
        if n > self.trimmable():
            raise ValueError(
                f"cannot trim {n} tokens: this KSACache keeps only its last "
                f"{self.trimmable()} (the chunk being filled, and the chunk of "
                f"{self.chunk} before it until a trim has reached into it)"
            )
        t = self.offset - n
        if t // self.chunk < self.flushed:
            self._reopen()
        self.offset = t
        return n

    def _reopen(self):
        """Undoes the last chunk completion: its text goes back to the chunk
        region, and the text it pushed out of the window back to the ring. Its
        summaries need no undoing: reads stop before them, the next
        completion overwrites them."""
        c, W = self.flushed - 1, self.window
        src = [self._ring_slots(c) if W else self._spare_slots()]
        dst = [self._chunk_slots()]
        if W and c >= W:
            src.append(self._spare_slots())
            dst.append(self._ring_slots(c))
        self._move(src, dst)
        self.flushed, self.reopenable = c, False

    # -- mlx-lm cache protocol -------------------------------------------
    @property
    def state(self):
        return (self.keys, self.values, self.offset, self.flushed, self.ring_chunks,
                self.chunk, self.summaries, self.window, self.keep_summaries, self.reopenable)

    @state.setter
    def state(self, v):
        if len(v) != 10:
            raise ValueError("this KSACache state comes from an older mlx-ksa layout; "
                             "recompute the prompt cache")
        (self.keys, self.values, self.offset, self.flushed, self.ring_chunks,
         self.chunk, self.summaries, self.window, self.keep_summaries, self.reopenable) = v
        self.keep_summaries, self.reopenable = bool(self.keep_summaries), bool(self.reopenable)

    def size(self):
        return self.offset

    def empty(self):
        return self.keys is None

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
