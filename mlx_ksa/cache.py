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

Each token is stored once, when it arrives; later it only moves slot to
slot. That lets `QuantizedKSACache` keep the same layout quantized
(`to_quantized`, mlx-lm's --kv-bits) without ever re-quantizing a token.
"""

import copy
import functools

import mlx.core as mx
import mlx_lm.models.cache as mlx_lm_cache
import numpy as np
from mlx_lm.models.base import quantized_scaled_dot_product_attention
from mlx_lm.models.cache import _BaseCache

from . import visibility
from .kernels import decode as decode_kernel


class KSACache(_BaseCache):
    step = 256  # growth of the ring and the summary region, in slots
    # The batch rows this cache's reads and writes touch: all of its buffer,
    # or its own row of a buffer a BatchKSACache shares among its sequences.
    _row = slice(None)

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

    def _slots(self):
        return self._parts(self.keys)[0].shape[2]

    def _summary_slots(self):
        return self._slots() - self._sum0 - self.chunk

    def _chunk_slots(self):
        """Slots of tokens 0..k-1 of the chunk being filled."""
        return self._ring0 - 1 - np.arange(self.chunk)

    def _ring_slots(self, c):
        return self._ring0 + (c % self.window) * self.chunk + np.arange(self.chunk)

    @property
    def _spare0(self):
        return self._slots() - self.chunk

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

    # -- storage ---------------------------------------------------------
    # KSACache keeps each buffer as one array; QuantizedKSACache as the parts
    # mx.quantize gives. Every part is laid out by slot on axis 2, so the
    # code below slices, grows and copies the parts alike.
    def _parts(self, buf):
        return (buf,)

    def _join(self, parts):
        return parts[0]

    def _encode(self, x):
        """The parts that store the dense keys or values x."""
        return (x,)

    def _decode(self, parts):
        return parts[0]

    def _read(self, buf, index):
        """Dense keys or values of buf at slot index (a slice)."""
        return self._decode(tuple(x[self._row, :, index] for x in self._parts(buf)))

    def _reserve(self, ring_chunks, summary_slots, like=None):
        """Allocates (like: the first keys) or grows the buffers, keeping what they hold.

        Growth applies to every row of the buffer: rows a BatchKSACache shares
        keep one region layout."""
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

        def grown(x):
            zeros = lambda n: mx.zeros((*x.shape[:2], n, x.shape[3]), x.dtype)
            kept = x.shape[2] - self._sum0 - k  # the whole summary region: rows fill it unevenly
            return mx.concatenate([
                x[:, :, : self._sum0], zeros((ring_chunks - self.ring_chunks) * k),
                x[:, :, self._sum0 : self._sum0 + kept], zeros(summary_slots - kept), x[:, :, -k:],
            ], 2)

        if self.keys is None:
            # [scratch | chunk | spare], which `grown` puts the rest between.
            B, H, _, D = like.shape
            self.keys = self.values = self._join(self._encode(mx.zeros((B, H, self._ring0 + k, D), like.dtype)))
        self.keys, self.values = (
            self._join(tuple(grown(x) for x in self._parts(buf))) for buf in (self.keys, self.values)
        )
        self.ring_chunks = ring_chunks

    def _move(self, src, dst):
        """Copies slots src to slots dst (lists of index arrays), reading all first."""
        if not sum(map(len, src)):
            return
        # Sources and destinations overlap (the ring slot whose chunk goes to
        # the spare takes the new chunk): gather all, then scatter. Slots
        # move as stored, so a quantized cache never quantizes twice.
        src, dst = (mx.array(np.concatenate(x).astype(np.int32)) for x in (src, dst))
        for x in self._parts(self.keys) + self._parts(self.values):
            x[self._row, :, dst] = x[self._row, :, src]

    def _write(self, a, keys, values):
        """Stores new dense keys and values at slots a, a+1, ..."""
        for buf, new in ((self.keys, keys), (self.values, values)):
            for x, part in zip(self._parts(buf), self._encode(new)):
                x[self._row, :, a : a + new.shape[2]] = part

    def _write_ring(self, t, keys, values):
        """Writes the text of tokens t, t+1, ... (at most W chunks) into the ring,
        where token i sits at i mod W*k."""
        size = self.window * self.chunk
        a, n = t % size, keys.shape[2]
        head = min(n, size - a)
        self._write(self._ring0 + a, keys[:, :, :head], values[:, :, :head])
        if n > head:
            self._write(self._ring0, keys[:, :, head:], values[:, :, head:])

    def _write_summaries(self, first_chunk, keys, values):
        if self.keep_summaries and keys.shape[2]:
            self._write(self._sum0 + first_chunk * self.summaries, keys, values)

    def _flush(self):
        """Moves a chunk completed by the last decode step out of chunk / scratch."""
        c = self.flushed
        if c == self.offset // self.chunk:
            return
        S, W = self.summaries, self.window
        self._reserve(c + 1, (c + 1) * S)
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
            self._reserve(0, 0, like)
        self._flush()
        k, S, W = self.chunk, self.summaries, self.window
        c, f = divmod(self.offset, k)
        n_ring = min(c, W)
        first = (c - n_ring) % W if W else 0
        runs = [(first, min(n_ring, W - first)), (0, n_ring - min(n_ring, W - first))]
        text = [slice(self._ring0 + s * k, self._ring0 + (s + m) * k) for s, m in runs if m]
        text.append(slice(self._ring0 - 1, self._ring0 - 1 - f, -1))
        summaries = slice(self._sum0, self._sum0 + (c * S if self.keep_summaries else 0))
        return (
            [self._read(self.keys, i) for i in text],
            [self._read(self.values, i) for i in text],
            (c - n_ring) * k,
            [self._read(self.keys, summaries)],
            [self._read(self.values, summaries)],
        )

    def commit(self, text_keys, text_values, text_base, new_sum_keys, new_sum_values):
        """Stores a block's new tokens; the text streams are context() + new text.

        Only the new tokens are written; cached ones that change region (the
        filled part of a chunk the block completes, a chunk going to the
        spare) are moved slot to slot.
        """
        k, S, W = self.chunk, self.summaries, self.window
        t0 = self.offset
        t1 = text_base + text_keys.shape[2]
        c0, c1 = t0 // k, t1 // k
        self._reserve(c1, c1 * S, text_keys)
        new_keys, new_values = text_keys[:, :, t0 - text_base :], text_values[:, :, t0 - text_base :]
        new = lambda a, b: (new_keys[:, :, a - t0 : b - t0], new_values[:, :, a - t0 : b - t0])
        spare = c1 - 1 - W  # the chunk this block pushes out of the window last
        if c1 > c0:
            filled = self._chunk_slots()[: t0 - c0 * k]
            src, dst = [], []
            if c0 >= c1 - W:
                src.append(filled)
                dst.append(self._ring_slots(c0)[: len(filled)])
            if 0 <= spare < c0:
                src.append(self._ring_slots(spare))
                dst.append(self._spare_slots())
            elif spare == c0:
                src.append(filled)
                dst.append(self._spare_slots()[: len(filled)])
            self._move(src, dst)
            if W:
                a = max(t0, (c1 - W) * k)
                self._write_ring(a, *new(a, c1 * k))
            if spare >= c0:
                a = max(t0, spare * k)
                self._write(self._spare0 + a - spare * k, *new(a, (spare + 1) * k))
        # The chunk being filled, right to left.
        a = max(t0, c1 * k)
        if t1 > a:
            keys, values = new(a, t1)
            self._write(self._ring0 - (t1 - c1 * k), keys[:, :, ::-1], values[:, :, ::-1])
        self._write_summaries(c0, new_sum_keys, new_sum_values)
        self.offset, self.flushed = t1, c1
        self.reopenable = self.reopenable or c1 > c0

    # -- one decode step ---------------------------------------------------
    def decode(self, q, keys, values, scale):
        """Attention of one decode step; stores its keys and values.

        q, keys, values: [B, H or Hkv, 1 (+S), D], the text token, then the
        summaries of the chunk it completes (if it does). Returns
        [B, H, 1 (+S), D], from the fused kernel where one serves and SDPA
        over the slice is not faster (`kernels.decode.sdpa_first`).
        """
        ranges = self.store_decode(keys, values)
        args = (q, self.keys, self.values, *ranges, scale)
        quant = self._quant()
        out = None
        if not decode_kernel.sdpa_first(q, *ranges[:2], quant):
            out = decode_kernel.decode_attention(*args, quant=quant)
        return decode_reference(*args, self._sdpa()) if out is None else out

    def _quant(self):
        """(group_size, bits) of a quantized buffer, for the kernel; None: dense."""
        return None

    def _sdpa(self):
        """The attention `decode_reference` runs over slices of the buffer."""
        return mx.fast.scaled_dot_product_attention

    def store_decode(self, keys, values):
        """Stores one decode step's keys and values (see `decode`).

        Returns (start, end, sum_end): the text query sees the slots
        [start, end), one contiguous range (the filled chunk, the ring, and
        the summaries that left the window, `visibility.summary_prefix`,
        which the range's end selects); the summary queries see
        [scratch | chunk] = [0, sum_end).
        """
        start, end, sum_end = self._decode_slots(keys)
        if keys.shape[2] == 1:  # 7 steps in 8: no summaries, and no slicing ops
            self._write(start, keys, values)
        else:
            self._write(start, keys[:, :, :1], values[:, :, :1])
            self._write(0, keys[:, :, 1:], values[:, :, 1:])
        return start, end, sum_end

    def _decode_slots(self, like):
        """Readies the buffer for the decode step of the next token and counts
        that token in; returns the step's (start, end, sum_end), the text
        token's key going to slot start and the summaries' to scratch."""
        t = self.offset
        self._check_reach(t)
        if self.keys is None:
            self._reserve(0, 0, like)
        self._flush()
        k, S, W = self.chunk, self.summaries, self.window
        c, f = divmod(t, k)
        self.offset = t + 1
        n_sum = visibility.summary_prefix(t, k, S, W)
        end = self._sum0 + n_sum if n_sum else self._ring0 + min(c, W) * k
        return S + k - 1 - f, end, S + k

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
        if self.keys is None:
            return 0
        return sum(x.nbytes for x in self._parts(self.keys) + self._parts(self.values))

    @classmethod
    def merge(cls, caches):
        """mlx-lm's batching: one batch cache of these sequences' caches."""
        return BatchKSACache(caches)

    def to_quantized(self, group_size=64, bits=4):
        """This cache with its buffers quantized (mlx-lm's --kv-bits)."""
        q = QuantizedKSACache(self.chunk, self.summaries, self.window, self.keep_summaries,
                              group_size=group_size, bits=bits)
        q.offset, q.flushed, q.ring_chunks, q.reopenable = (
            self.offset, self.flushed, self.ring_chunks, self.reopenable)
        if self.keys is not None:
            q.keys, q.values = q._encode(self.keys), q._encode(self.values)
        return q


class QuantizedKSACache(KSACache):
    """KSACache with K/V stored by mx.quantize along the head dimension.

    Same layout and protocol. Blocks of new tokens attend over dequantized
    slices; a decode step runs the fused decode kernel's quantized variant
    over the buffer (dequantizing rows as it loads them), or where none
    serves, the reference with quantized matmuls (mlx-lm's quantized SDPA).
    Tokens are quantized once, when stored.
    """

    def __init__(self, chunk, summaries, window, keep_summaries=True, group_size=64, bits=4):
        super().__init__(chunk, summaries, window, keep_summaries)
        self.group_size, self.bits = group_size, bits

    def _parts(self, buf):
        return buf

    def _join(self, parts):
        return tuple(parts)

    def _encode(self, x):
        if x.shape[-1] % self.group_size:
            raise ValueError(f"head_dim {x.shape[-1]} is not a multiple of the KV group size {self.group_size}")
        return tuple(mx.quantize(x, group_size=self.group_size, bits=self.bits))

    def _decode(self, parts):
        packed, scales, _ = parts
        if packed.shape[2] == 0:  # mx.dequantize cannot take an empty slice
            return mx.zeros((*packed.shape[:3], packed.shape[3] * 32 // self.bits), scales.dtype)
        return mx.dequantize(*parts, group_size=self.group_size, bits=self.bits)

    def _quant(self):
        return self.group_size, self.bits

    def _sdpa(self):
        if mx.default_device().type == mx.gpu and mx.cuda.is_available():
            # MLX's CUDA back end has no quantized_matmul for the shapes of
            # mlx-lm's quantized SDPA (one query row against thousands of
            # keys: "No implementation for problem shape"), so there the
            # reference dequantizes the slices it reads and runs plain SDPA.
            return lambda q, k, v, **kw: mx.fast.scaled_dot_product_attention(
                q, self._decode(k), self._decode(v), **kw)
        return functools.partial(quantized_scaled_dot_product_attention,
                                 group_size=self.group_size, bits=self.bits)

    def to_quantized(self, group_size=64, bits=4):
        # mlx-lm asks again at every step once the cache qualifies.
        if (group_size, bits) != (self.group_size, self.bits):
            raise ValueError(f"cache already quantized with group size {self.group_size}, {self.bits} bits")
        return self

    @property
    def state(self):
        return super().state + (self.group_size, self.bits)

    @state.setter
    def state(self, v):
        KSACache.state.fset(self, v[:-2])
        self.group_size, self.bits = v[-2:]
        if self.keys is not None:  # a loaded cache has lists
            self.keys, self.values = tuple(self.keys), tuple(self.values)


class BatchKSACache(_BaseCache):
    """mlx-lm's batch protocol (merge, prepare, finalize, filter, extend,
    extract) over one KSACache per sequence.

    Sequences of a batch sit at different chunk phases: they complete chunks,
    and so gain summary tokens, at different steps. Blocks of new tokens
    (padded prompts) run row by row, each through its own caches (`Model`).
    Decode steps run all rows at once (`decode`): the rows then share one
    buffer [B, Hkv, slots, D] in one region layout, each row's KSACache
    keeping its own counters and touching only its row of it (`_row`), so
    every slot range, flush and trim is the one-sequence code. All rows
    compute their text token, and S summary queries when any row completes a
    chunk: the summaries of a row that completes none land in its scratch,
    which nothing reads before its next completion overwrites it, and their
    outputs are dropped.
    """

    def __init__(self, rows):
        self.rows = list(rows)
        self.keys = self.values = None  # the buffers the rows share, once a decode step packed them
        self.spans = None  # (first, end) input columns of each row's real tokens
        self.column = 0  # input columns consumed since `prepare`

    def prepare(self, *, left_padding=None, lengths=None, right_padding=None):
        """The next calls carry padded prompts (left or right padded)."""
        if left_padding is not None and max(left_padding) > 0:
            self.spans = [(p, None) for p in left_padding]
        elif right_padding is not None and max(right_padding) > 0:
            self.spans = [(0, n) for n in lengths]
        self.column = 0

    def finalize(self):
        self.spans = None

    def take(self, L):
        """(first, count) of each row's real tokens among the next L input columns."""
        a, self.column = self.column, self.column + L
        if self.spans is None:
            return [(0, L)] * len(self.rows)
        out = []
        for first, end in self.spans:
            lo, hi = max(a, first), a + L if end is None else min(a + L, end)
            out.append((lo - a, max(0, hi - lo)))
        return out

    # -- decode steps of all rows at once ------------------------------------
    def fusable(self):
        """Whether the rows can share one buffer: unquantized caches of one layout."""
        layouts = {(c.chunk, c.summaries, c.window, c.keep_summaries) for c in self.rows}
        return len(layouts) == 1 and all(type(c) is KSACache for c in self.rows)

    @property
    def offset(self):
        """Text tokens each row has seen."""
        return np.array([c.offset for c in self.rows])

    def _share(self, keys, values, ring_chunks):
        self.keys, self.values = keys, values
        for b, c in enumerate(self.rows):
            c.keys, c.values, c.ring_chunks, c._row = keys, values, ring_chunks, slice(b, b + 1)

    def _pack(self, like):
        """Moves the rows' buffers into one (like: this step's keys, for rows with none yet)."""
        if self.keys is not None:
            return
        for c in self.rows:
            if c.keys is None:
                c._reserve(0, 0, like[:1])
        # The largest ring and summary region of any row: sizes are already
        # multiples of the growth steps, so every row grows to exactly these.
        ring = max(c.ring_chunks for c in self.rows)
        summary_slots = max(c._summary_slots() for c in self.rows)
        for c in self.rows:
            c._reserve(ring, summary_slots)
        self._share(mx.concatenate([c.keys for c in self.rows]),
                    mx.concatenate([c.values for c in self.rows]), ring)

    def unpack(self):
        """Gives every row its own buffer again, for blocks of tokens run row by row."""
        if self.keys is None:
            return
        for b, c in enumerate(self.rows):
            c.keys, c.values, c._row = self.keys[b : b + 1], self.values[b : b + 1], slice(None)
        self.keys = self.values = None

    def store_decode(self, keys, values):
        """KSACache.store_decode for every row; start, end and sum_end come
        back as arrays, one entry per row."""
        self._pack(keys)
        ranges = []
        for c in self.rows:
            ranges.append(c._decode_slots(keys))
            if c.keys is not self.keys:  # its flush grew the buffer, every row's part of it
                self._share(c.keys, c.values, c.ring_chunks)
        start, end, sum_end = np.array(ranges).T
        rows, slots = mx.arange(len(self.rows)), mx.array(start)
        for buf, new in ((self.keys, keys), (self.values, values)):
            buf[rows, :, slots] = new[:, :, 0]
            if new.shape[2] > 1:
                buf[:, :, : new.shape[2] - 1] = new[:, :, 1:]
        return start, end, sum_end

    # One sequence's decode step, over the shared buffer with per-row ranges.
    decode, _quant, _sdpa = KSACache.decode, KSACache._quant, KSACache._sdpa

    # -- the rest of the protocol ------------------------------------------
    def filter(self, batch_indices):
        self.rows = [self.rows[i] for i in batch_indices]
        if self.spans is not None:
            self.spans = [self.spans[i] for i in batch_indices]
        if self.keys is not None and self.rows:
            index = mx.array(batch_indices, dtype=mx.int32)
            self._share(self.keys[index], self.values[index], self.rows[0].ring_chunks)

    def extend(self, other):
        if (self.spans, other.spans) != (None, None):
            raise ValueError("cannot extend a batch in the middle of a padded prompt")
        # Rows of two layouts: the next decode step packs them anew.
        self.unpack()
        other.unpack()
        self.rows += other.rows

    def extract(self, idx):
        c = self.rows[idx]
        if self.keys is None:
            return c
        # A cache of its own: the batch may go on without this sequence.
        out = copy.copy(c)
        out.keys, out.values, out._row = self.keys[idx : idx + 1], self.values[idx : idx + 1], slice(None)
        return out

    @property
    def state(self):
        return [c.state for c in self.rows]

    def size(self):
        return max((c.offset for c in self.rows), default=0)

    def empty(self):
        return all(c.empty() for c in self.rows)

    @property
    def nbytes(self):
        if self.keys is not None:
            return self.keys.nbytes + self.values.nbytes
        return sum(c.nbytes for c in self.rows)


def decode_reference(q, keys, values, start, end, sum_end, scale, sdpa=mx.fast.scaled_dot_product_attention):
    """SDPA over slices of the cache buffer: what `kernels.decode` computes.

    Row 0 of q sees slots [start, end); rows 1..S, the summaries of a
    completing chunk, see [scratch S | chunk] = [0, sum_end) under
    `visibility.summary_mask`. start, end and sum_end are ints, or arrays
    with one entry per batch row (a BatchKSACache step): each row then runs
    as a sequence of its own. keys and values may be a quantized buffer's
    parts, with the matching `sdpa` (QuantizedKSACache).
    """
    # A buffer is one array or a tuple of parts, all laid out by slot on axis 2.
    index = lambda buf, *i: tuple(x[i] for x in buf) if isinstance(buf, tuple) else buf[i]
    if np.ndim(start):
        return mx.concatenate([
            decode_reference(q[b : b + 1], index(keys, slice(b, b + 1)), index(values, slice(b, b + 1)),
                             int(start[b]), int(end[b]), int(sum_end[b]), scale, sdpa)
            for b in range(q.shape[0])
        ])
    slots = lambda buf, a, b: index(buf, slice(None), slice(None), slice(a, b))
    out = sdpa(q[:, :, :1], slots(keys, start, end), slots(values, start, end), scale=scale, mask=None)
    S = q.shape[2] - 1
    if S:
        mask = mx.array(visibility.summary_mask(sum_end - S, S))
        out_sum = sdpa(q[:, :, 1:], slots(keys, 0, sum_end), slots(values, 0, sum_end), scale=scale, mask=mask)
        out = mx.concatenate([out, out_sum], axis=2)
    return out


# mlx-lm's load_prompt_cache looks cache classes up by name in its own module.
mlx_lm_cache.KSACache = KSACache
mlx_lm_cache.QuantizedKSACache = QuantizedKSACache
