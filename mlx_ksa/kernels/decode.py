"""Decode attention kernel: one step's queries over KSACache's buffer, in place.

The algorithm is described in metal/decode.metal (cuda/decode.cu is its twin).
`decode_attention` returns None where no kernel serves the inputs; the caller
then runs the reference (SDPA over slices of the same buffer).

Two variants, one partial body: "dense" reads K/V arrays, "quantized" reads
QuantizedKSACache's buffers, each given as the tuple of parts mx.quantize
makes (packed words, scales, biases), dequantizing rows as it loads them. The
variant's prelude section (the input names and the row loader) goes before the
shared partial body. The launch parameters come from the plain functions
`plan_partial` and `plan_reduce`, so the tests can hand exactly what the real
launch gets to the CPU Metal emulator.
"""

import functools

import mlx.core as mx
import numpy as np

from . import backend, constant, scalar, source

NW = 8  # simdgroups (warps) per threadgroup of pass 1
# Splits: about one wave of pass-1 threadgroups on the largest GPUs (an H200
# has 132 SMs), each split at least MIN_SPLIT keys, two sweeps of a
# threadgroup (32 * NW = 256 keys at once: each simdgroup reads 32 keys' K
# rows, one per lane, then their V rows U = 4 at a time). Shorter splits
# cost more in partials and their merge than they gain in parallelism:
# measured on an H200, 17K keys, pass 1 alone, by split length 128 / 256 /
# 512 / 1024 / 2048: 78 / 60 / 51 / 46 / 48 us; 9K keys: 44 / 46 / 36 / 36
# / 38 us; 3K keys: 33 / 30 / 28 / 29 / 29 us.
MIN_SPLIT = 512
TARGET_GROUPS = 128
HEAD_DIMS = (64, 128)
DTYPES = (mx.float32, mx.float16, mx.bfloat16)
_FILES = {"metal": "metal/decode.metal", "cuda": "cuda/decode.cu"}
# The quantized variant: mx.quantize's affine mode. A lane's E = D / 32
# elements of a V row, and each C = 8 of a K row, then lie in one group and
# fill at most one word or whole words (see QuantRows).
QUANT_BITS = (4, 8)
QUANT_GROUPS = (32, 64, 128)
# A single sequence's step that completes no chunk (7 in 8) reads one
# contiguous slot range: SDPA over that slice is one op, where the kernel is
# two custom-kernel calls and their plan, and a decode step is host-bound.
# Per call on the H200 (BENCHMARKS.md), SDPA / kernel: 41 / 71 us at 2.9K
# keys, 66 / 76 at 9K, 103 / 84 at 17K; up to this many keys SDPA goes first.
SDPA_MAX_KEYS = 12288
# Input names of pass 1: the variant's K, V (the whole buffer), then Kt, Vt (the view).
_BUFFERS = {
    "dense": ["K", "V", "Kt", "Vt"],
    "quantized": [n + p for n in ("K", "V", "Kt", "Vt") for p in ("w", "s", "b")],
}


def sections(text):
    """{name: text} of a source cut at its '//// name' lines."""
    out, name = {}, None
    for line in text.splitlines(keepends=True):
        if line.startswith("//// "):
            name = line[5:].strip()
            out[name] = ""
        elif name is not None:
            out[name] += line
    return out


def _parts_and_maker(back_end):
    """The back end's source sections and its mx.fast kernel constructor."""
    make = mx.fast.metal_kernel if back_end == "metal" else mx.fast.cuda_kernel
    return sections(source(_FILES[back_end])), make


@functools.lru_cache(maxsize=None)
def kernels(back_end, variant="dense"):
    """(partial, reduce) kernel objects of a back end and variant ("dense"
    or "quantized"), built once."""
    parts, make = _parts_and_maker(back_end)
    partial = make(
        name=f"ksa_decode_partial_{variant}", input_names=["q", *_BUFFERS[variant], "params", "scale"],
        output_names=["part_o", "part_ml"], source=parts[variant] + parts["partial"],
        header=parts["header"],
        # The cache buffer is read where it lies: a copy would cost more than the step.
        ensure_row_contiguous=False,
    )
    return partial, _reduce(back_end)


@functools.lru_cache(maxsize=None)
def _reduce(back_end):
    # Both variants' partials have one layout: one reduce serves them.
    parts, make = _parts_and_maker(back_end)
    return make(
        name="ksa_decode_reduce", input_names=["part_o", "part_ml"],
        output_names=["out"], source=parts["reduce"], header=parts["header"],
    )


def supported(q, keys, values, quant=None):
    """Whether a kernel serves these inputs: keys/values arrays (quant None)
    or, quant = (group_size, bits), the parts of a quantized buffer."""
    B, H, R, D = q.shape
    if q.dtype not in DTYPES or D not in HEAD_DIMS:
        return False
    if quant is None:
        return (
            not isinstance(keys, tuple) and keys.dtype == values.dtype == q.dtype
            and keys.shape == values.shape and keys.shape[0] == B and keys.shape[3] == D
            and H % keys.shape[1] == 0
        )
    group_size, bits = quant
    if group_size not in QUANT_GROUPS or bits not in QUANT_BITS or not all(
            isinstance(x, tuple) and len(x) == 3 for x in (keys, values)):
        return False
    (kw, ks, kb), (vw, vs, vb) = keys, values
    shape = (B, kw.shape[1], kw.shape[2])
    return (
        H % kw.shape[1] == 0 and kw.dtype == vw.dtype == mx.uint32
        and all(x.dtype == q.dtype for x in (ks, kb, vs, vb))
        and all(x.shape == (*shape, D * bits // 32) for x in (kw, vw))
        and all(x.shape == (*shape, D // group_size) for x in (ks, kb, vs, vb))
    )


INT32_MAX = 2**31 - 1


def _whole_view(B, sum_end):
    # Rows that all see the whole view (the kernel clips INT32_MAX to its
    # length): the same every step of a cache.
    return constant(((0, INT32_MAX, sum_end),) * B)


def _one(x):
    """An int, or the single entry of an array."""
    return int(np.ravel(x)[0]) if np.ndim(x) else int(x)


def plan_partial(q, keys, values, start, end, sum_end, scale, split_len=None, quant=None):
    """Pass-1 launch: queries [B, H, 1 (+S), D], the text query over slots
    [start, end) of keys/values [B, Hkv, slots, D], the summary queries (rows
    1..S) over [0, sum_end = S + k). start, end and sum_end are ints or one
    per batch row (a BatchKSACache step). split_len: at most this many keys
    per split (default: TARGET_GROUPS, MIN_SPLIT). quant: (group_size, bits)
    when keys and values are a quantized buffer's parts (the quantized
    variant). Keyword arguments of the kernel call."""
    B, H, R, D = q.shape
    Hkv = (keys[0] if quant else keys).shape[1]
    if B == 1 or not np.ndim(start):
        # One range for every row (a KSACache step, most often of a single
        # sequence): the view is that range, and no array is made per step.
        first, last = _one(start), _one(end)
        params = _whole_view(B, _one(sum_end))
    else:
        start, end, sum_end = (np.broadcast_to(x, (B,)) for x in (start, end, sum_end))
        first, last = int(start.min()), int(end.max())
        # Row-major, as the kernel indexes it (stack on axis 1 gives that).
        params = mx.array(np.stack([start - first, end - first, sum_end], axis=1).astype(np.int32))
    n = last - first  # the view's keys, which the splits cover from every row's start
    if split_len is None:
        per_head = max(1, TARGET_GROUPS // (B * Hkv))
        split_len = max(MIN_SPLIT, -(-n // per_head))
    n_splits = -(-n // split_len)
    P = n_splits + R - 1
    buffers = [keys, values] if quant is None else [*keys, *values]
    template = [("T", q.dtype), ("D", D), ("G", H // Hkv), ("NW", NW)]
    if quant is not None:
        template += [("BITS", quant[1]), ("GS", quant[0])]
    return dict(
        # The text range as zero-copy views of the buffer (of each part).
        inputs=[q, *buffers, *(x[:, :, first:last] for x in buffers), params, scalar(scale)],
        output_shapes=[(B, H, P, D), (B, H, P, 2)],
        output_dtypes=[mx.float32, mx.float32],
        # The kernel reads n_splits off the grid.
        grid=(32 * NW * (n_splits + (R > 1)), Hkv, B),
        threadgroup=(32 * NW, 1, 1),
        template=template,
    )


def plan_reduce(q, part_o, part_ml):
    """Pass-2 launch: merges the text splits, normalizes every row (the
    kernel reads R off the grid, n_splits off the partials' shape)."""
    B, H, R, D = q.shape
    return dict(
        inputs=[part_o, part_ml],
        output_shapes=[q.shape],
        output_dtypes=[q.dtype],
        grid=(D, R, B * H),
        threadgroup=(D, 1, 1),
        template=[("T", q.dtype), ("D", D)],
    )


def sdpa_first(q, start, end, quant=None):
    """Whether SDPA over the slice [start, end) beats the kernel for this step
    (see SDPA_MAX_KEYS): one query row of one sequence, a dense buffer (the
    quantized cache's SDPA is several ops), few keys."""
    return (quant is None and q.shape[0] == 1 and q.shape[2] == 1 and not np.ndim(start)
            and end - start <= SDPA_MAX_KEYS)


def decode_attention(q, keys, values, start, end, sum_end, scale, quant=None):
    """Attention of one decode step over a KSACache buffer, or with quant =
    (group_size, bits) over a QuantizedKSACache's (see plan_partial);
    [B, H, 1 (+S), D], or None where no kernel serves these inputs."""
    back_end = backend()
    if back_end is None or not supported(q, keys, values, quant):
        return None
    partial, reduce = kernels(back_end, "dense" if quant is None else "quantized")
    part_o, part_ml = partial(**plan_partial(q, keys, values, start, end, sum_end, scale, quant=quant))
    return reduce(**plan_reduce(q, part_o, part_ml))[0]
