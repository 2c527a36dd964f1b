"""The Metal decode kernel, run through the CPU Metal emulator, against the reference.

Cases come from a real KSACache filled to a context below or past the
window, so the kernel sees the slot ranges the model gives it; batch rows at
different contexts come from a BatchKSACache step, one range per row. The launch is
the one `kernels.decode.plan_partial` / `plan_reduce` compute for the GPU.
`make_case` and `reference` also serve tests/gpu/test_decode_cuda.py.

The quantized variant (QuantizedKSACache's buffer: mx.quantize's packed
words, scales and biases) runs the same cases over a quantized cache, against
the reference over that cache dequantized.
"""

import functools

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.base import quantized_scaled_dot_product_attention

from mlx_ksa import kernels
from mlx_ksa.cache import BatchKSACache, KSACache, QuantizedKSACache, decode_reference
from mlx_ksa.kernels import decode

TOL = {mx.float32: 1e-5, mx.float16: 2e-3, mx.bfloat16: 1.6e-2}


def make_case(B, H, Hkv, D, dtype, k, S, window, t, strided=False, seed=0, quant=None):
    """A cache holding t text tokens (and their chunks' summaries), then the
    decode step of token t. t may be a tuple, one context per batch row
    (B of them): a BatchKSACache step, with one slot range per row. quant:
    (group_size, bits) for a quantized cache, whose keys and values are then
    the tuples of parts mx.quantize makes. Returns (q, keys, values, start,
    end, sum_end, scale) as `decode.decode_attention` takes them."""
    rng = np.random.default_rng(seed)
    arr = lambda *shape: mx.array(rng.standard_normal(shape).astype(np.float32)).astype(dtype)

    def filled(B, t):
        cache = KSACache(k, S, window)
        cache.context(t, arr(B, Hkv, 1, D))
        cache.commit(arr(B, Hkv, t, D), arr(B, Hkv, t, D), 0, arr(B, Hkv, t // k * S, D),
                     arr(B, Hkv, t // k * S, D))
        return cache

    if isinstance(t, tuple):
        assert len(t) == B
        cache = BatchKSACache([filled(1, x) for x in t])
    else:
        cache = filled(B, t)
        if quant:  # QuantizedKSACache itself: it stores this step's keys quantized
            cache = cache.to_quantized(*quant)
            assert type(cache) is QuantizedKSACache
    R = 1 + S if any((x + 1) % k == 0 for x in np.atleast_1d(t)) else 1
    start, end, sum_end = cache.store_decode(arr(B, Hkv, R, D), arr(B, Hkv, R, D))
    keys, values = cache.keys, cache.values
    if quant and isinstance(t, tuple):
        # BatchKSACache packs dense rows only: quantize its buffer slot by
        # slot, as QuantizedKSACache stores each token.
        keys, values = (tuple(mx.quantize(x, group_size=quant[0], bits=quant[1])) for x in (keys, values))
    if strided:
        # The same contents in a [B, slots, 2*Hkv, *] buffer seen through a
        # transposed, head-strided view: nothing row-contiguous about it.
        def view(x):
            big = mx.zeros((B, x.shape[2], 2 * Hkv, x.shape[3]), x.dtype)
            big[:, :, 1::2] = x.transpose(0, 2, 1, 3)
            return big.transpose(0, 2, 1, 3)[:, 1::2]

        keys, values = (tuple(map(view, x)) if quant else view(x) for x in (keys, values))
    return arr(B, H, R, D), keys, values, start, end, sum_end, D**-0.5


def dequantized(parts, group_size):
    """A quantized buffer's values in float32 (scales and biases widened first,
    as the kernel computes scale * field + bias in float)."""
    w, s, b = parts
    bits = w.shape[3] * 32 // (s.shape[3] * group_size)  # packed words * 32 / D
    f32 = lambda x: x.astype(mx.float32)
    return mx.dequantize(w, f32(s), f32(b), group_size=group_size, bits=bits)


def reference(q, keys, values, start, end, sum_end, scale, quant=None):
    """decode_reference in float32 on the (rounded) inputs; over the
    dequantized buffer for a quantized case."""
    f32 = lambda x: x.astype(mx.float32)
    if quant:
        keys, values = dequantized(keys, quant[0]), dequantized(values, quant[0])
    return decode_reference(f32(q), f32(keys), f32(values), start, end, sum_end, scale)


def emulator():
    emu = pytest.importorskip("tests.metal_emu", reason="the CPU Metal emulator is not there")
    if not hasattr(emu, "run_metal_kernel"):
        pytest.skip("the CPU Metal emulator is not there")
    return emu


def check(out, case, quant=None):
    q = case[0]
    expected = np.array(reference(*case, quant=quant))
    got = np.array(mx.array(out).astype(mx.float32))
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= TOL[q.dtype] * max(1.0, np.abs(expected).max())


# (B, H, Hkv, D, dtype, k, S, window, t, strided): GQA 1/4/8, D 64/128, every
# dtype, S 1/2, contexts inside the window, at its edge and past it (where
# the text query's range ends in the summaries), steps that complete a chunk
# (summary rows) and steps that do not, batch 2, strided buffers; batch rows
# at different contexts (their own ranges; the longest sets the splits, which
# run past the shorter rows' ends), with and without a row completing a chunk.
CASES = [
    (1, 2, 2, 64, mx.float32, 4, 1, 3, 5, False),
    (1, 2, 2, 64, mx.float32, 4, 1, 3, 7, False),  # completes a chunk
    (2, 4, 1, 128, mx.bfloat16, 4, 1, 2, 37, True),  # past the window, strided
    (1, 8, 1, 64, mx.float16, 3, 2, 2, 28, False),  # past the window, S = 2
    (1, 8, 1, 128, mx.float16, 3, 2, 4, 11, True),  # completes, S = 2, strided
    (2, 8, 2, 64, mx.bfloat16, 8, 1, 1, 47, False),  # completes past the window
    (3, 4, 2, 64, mx.float32, 4, 1, 2, (5, 30, 11), False),  # row 2 completes
    (4, 8, 1, 128, mx.bfloat16, 3, 2, 1, (2, 0, 40, 19), True),  # row 0 completes, S = 2
    (2, 4, 4, 64, mx.float16, 8, 1, 1, (3, 100), False),  # none completes
]


@pytest.mark.parametrize("case_args", CASES, ids=lambda c: "-".join(str(v).split(".")[-1] for v in c))
def test_metal_kernel_matches_reference(case_args):
    emu = emulator()
    case = make_case(*case_args, seed=len(case_args) + sum(np.atleast_1d(case_args[8])))
    q, keys, values, start, end, sum_end, scale = case
    partial, reduce = decode.kernels("metal")
    # Small splits, so that a few keys already cross several of them.
    launch = decode.plan_partial(q, keys, values, start, end, sum_end, scale, split_len=16)
    part_o, part_ml = emu.run_metal_kernel(partial, **launch)
    out = emu.run_metal_kernel(
        reduce, **decode.plan_reduce(q, mx.array(part_o), mx.array(part_ml))
    )[0]
    check(out, case)


@pytest.mark.parametrize("split_len", [None, 10**6])
def test_metal_kernel_sweeps_long_splits(split_len):
    """Splits longer than one sweep of a threadgroup (32 * NW keys): the
    default plan's (two splits of 260 keys: a full sweep and 4 keys), and one
    split of every key (two full sweeps and a partial one); batch rows whose
    ranges differ. float32, so that even a few dropped keys show."""
    emu = emulator()
    case = make_case(2, 4, 2, 64, mx.float32, 4, 1, 2, (2043, 1500), seed=5)
    q, keys, values, start, end, sum_end, scale = case
    assert end.max() - start.min() > 2 * 32 * decode.NW
    partial, reduce = decode.kernels("metal")
    launch = decode.plan_partial(*case, split_len=split_len)
    part_o, part_ml = emu.run_metal_kernel(partial, **launch)
    out = emu.run_metal_kernel(reduce, **decode.plan_reduce(q, mx.array(part_o), mx.array(part_ml)))[0]
    check(out, case)


def test_single_sequence_steps_make_no_array():
    """Consecutive steps of one sequence, one of them completing a chunk:
    the text range travels as a view of the buffer, and the params and scale
    are the very same arrays every step (made once, not per step)."""
    plans = []
    for t in (4, 5, 7):
        q, keys, values, start, end, sum_end, scale = make_case(1, 4, 2, 64, mx.float32, 4, 1, 2, t)
        launch = decode.plan_partial(q, keys, values, start, end, sum_end, scale)
        assert launch["inputs"][3].shape == (1, 2, end - start, 64)
        plans.append(launch["inputs"][5:])
    assert all(a is b for plan in plans[1:] for a, b in zip(plan, plans[0]))


@pytest.mark.parametrize("sanitizer", ["thread", "address"])
@pytest.mark.parametrize("quant", [None, (32, 4)], ids=["dense", "quantized"])
@pytest.mark.parametrize("B,t", [(1, 23), (2, (23, 6))], ids=["single", "batch"])
def test_metal_kernels_are_clean_under_sanitizers(sanitizer, quant, B, t):
    """Both passes of both variants, once under ThreadSanitizer and once under
    AddressSanitizer (reads past a view's end or a buffer's: a single
    sequence's range end is the view's, clipped in the kernel)."""
    emu = emulator()
    case = make_case(B, 4, 1, 64, mx.float32, 4, 1, 2, t, seed=5, quant=quant)
    launch = decode.plan_partial(*case, split_len=8, quant=quant)
    partial, reduce = decode.kernels("metal", "dense" if quant is None else "quantized")
    part_o, part_ml = emu.run_metal_kernel(partial, **launch, sanitizer=sanitizer)
    emu.run_metal_kernel(reduce, **decode.plan_reduce(case[0], mx.array(part_o), mx.array(part_ml)),
                         sanitizer=sanitizer)


def test_back_ends_keep_the_same_structure():
    """metal/decode.metal and cuda/decode.cu: same sections (each variant's
    prelude too), same line count once CUDA's unroll pragmas are left out
    (each line maps to its twin)."""
    def shape(name):
        parts = decode.sections(kernels.source(name))
        return {k: sum(not l.strip().startswith("#pragma") for l in v.splitlines())
                for k, v in parts.items() if k != "header"}

    assert shape("metal/decode.metal") == shape("cuda/decode.cu")
    assert {"dense", "quantized", "partial", "reduce"} <= set(shape("metal/decode.metal"))


# The quantized variant: bits 4/8, group sizes 32/64/128, D 64/128, every
# dtype, GQA 1/4/8, steps completing a chunk (S 1/2), strided parts, batch
# rows with one range and with a range per row. (..., strided, (group_size, bits)).
QUANT_CASES = [
    (1, 2, 2, 64, mx.float32, 4, 1, 3, 7, False, (32, 4)),  # completes a chunk
    (2, 4, 1, 128, mx.bfloat16, 4, 1, 2, 37, True, (64, 8)),  # past the window, strided
    (1, 8, 1, 64, mx.float16, 3, 2, 2, 28, False, (64, 8)),  # past the window, S = 2
    (1, 8, 1, 128, mx.float16, 3, 2, 4, 11, True, (128, 4)),  # completes, S = 2, strided
    (2, 8, 2, 64, mx.bfloat16, 8, 1, 1, 47, False, (32, 8)),  # completes past the window
    (3, 4, 2, 64, mx.float32, 4, 1, 2, (5, 30, 11), False, (64, 4)),  # row 2 completes
    (4, 8, 1, 128, mx.bfloat16, 3, 2, 1, (2, 0, 40, 19), True, (32, 8)),  # row 0 completes, S = 2
]


def run_quantized(emu, case, quant, split_len=16):
    q, keys, values, start, end, sum_end, scale = case
    partial, reduce = decode.kernels("metal", "quantized")
    launch = decode.plan_partial(*case, split_len=split_len, quant=quant)
    part_o, part_ml = emu.run_metal_kernel(partial, **launch)
    return emu.run_metal_kernel(reduce, **decode.plan_reduce(q, mx.array(part_o), mx.array(part_ml)))[0]


@pytest.mark.parametrize("case_args", QUANT_CASES, ids=lambda c: "-".join(str(v).split(".")[-1] for v in c))
def test_metal_quantized_kernel_matches_reference(case_args):
    emu = emulator()
    *args, quant = case_args
    case = make_case(*args, seed=len(args) + sum(np.atleast_1d(args[8])), quant=quant)
    assert decode.supported(case[0], case[1], case[2], quant)
    check(run_quantized(emu, case, quant), case, quant)


def test_quantized_reference_is_the_cache_dequantized():
    """The emulator tests' reference is the one QuantizedKSACache's own
    fallback computes (mlx-lm's quantized SDPA over the parts), on CPU."""
    quant = (64, 4)
    case = make_case(1, 8, 2, 64, mx.float32, 4, 1, 2, 23, quant=quant)
    q, keys, values, start, end, sum_end, scale = case
    sdpa = functools.partial(quantized_scaled_dot_product_attention, group_size=64, bits=4)
    got = np.array(decode_reference(q, keys, values, start, end, sum_end, scale, sdpa))
    assert np.abs(got - np.array(reference(*case, quant=quant))).max() < 1e-4


def test_quantized_single_sequence_steps_make_no_array():
    """As for the dense variant: the views, one per part, are zero-copy
    slices of the parts, and params and scale are made once."""
    plans = []
    for t in (4, 5, 7):
        case = make_case(1, 4, 2, 64, mx.float32, 4, 1, 2, t, quant=(32, 8))
        q, keys, values, start, end, sum_end, scale = case
        launch = decode.plan_partial(*case, quant=(32, 8))
        inputs = launch["inputs"]
        assert len(inputs) == 1 + 12 + 2
        assert [x.shape[2] for x in inputs[7:13]] == [end - start] * 6
        assert [x.shape[3] for x in inputs[7:13]] == [16, 2, 2] * 2
        assert ("BITS", 8) in launch["template"] and ("GS", 32) in launch["template"]
        plans.append(inputs[-2:])
    assert all(a is b for plan in plans[1:] for a, b in zip(plan, plans[0]))


def test_quantized_variant_serves_only_its_layouts():
    q = mx.zeros((1, 4, 1, 64), mx.float16)
    parts = lambda gs, bits, dtype=mx.float16: tuple(
        mx.quantize(mx.zeros((1, 2, 8, 64), dtype), group_size=gs, bits=bits))
    assert decode.supported(q, parts(64, 4), parts(64, 4), (64, 4))
    assert decode.supported(q, parts(32, 8), parts(32, 8), (32, 8))
    assert not decode.supported(q, parts(64, 2), parts(64, 2), (64, 2))  # bits 2: reference
    assert not decode.supported(q, parts(64, 4, mx.float32), parts(64, 4, mx.float32), (64, 4))
    assert not decode.supported(q, parts(64, 4), parts(64, 4), None)  # parts are not a dense buffer
    assert not decode.supported(q, parts(64, 8), parts(64, 8), (64, 4))  # the wrong bits
    dense = mx.zeros((1, 2, 8, 64), mx.float16)
    assert not decode.supported(q, dense, dense, (64, 4))  # a dense buffer is no parts


@pytest.mark.parametrize("quant", [None, (64, 8)])
def test_kernel_takes_the_steps_sdpa_over_the_slice_does_not_serve_faster(quant, monkeypatch):
    """KSACache.decode routing: one text row of one sequence over at most
    SDPA_MAX_KEYS keys runs as SDPA over its slice (one op); a chunk's
    completing step (summary rows), a longer range or a quantized cache goes
    to the kernel (here a spy that declines, so the reference still answers)."""
    k, S, W, H, Hkv, D = 4, 1, 2, 4, 2, 64
    rng = np.random.default_rng(0)
    arr = lambda *shape: mx.array(rng.standard_normal(shape).astype(np.float32))
    steps, asked = [], []  # (rows, keys) of every step; of those handed to the kernel
    first = decode.sdpa_first
    monkeypatch.setattr(decode, "sdpa_first",
                        lambda q, start, end, quant=None: steps.append((q.shape[2], end - start))
                        or first(q, start, end, quant))
    monkeypatch.setattr(decode, "decode_attention",
                        lambda *a, **kw: asked.append((a[0].shape[2], a[4] - a[3])) or None)
    for limit in (20, -1):
        monkeypatch.setattr(decode, "SDPA_MAX_KEYS", limit)
        steps.clear()
        asked.clear()
        cache = KSACache(k, S, W)
        if quant:
            cache = cache.to_quantized(*quant)
        for t in range(60):
            R = 1 + S if (t + 1) % k == 0 else 1
            q, kv = arr(1, H, R, D), arr(1, Hkv, R, D)
            assert cache.decode(q, kv, kv, D**-0.5).shape == (1, H, R, D)
        assert len(steps) == 60
        assert asked == [(R, n) for R, n in steps if quant or R > 1 or n > limit]
        if not quant and limit > 0:  # both ways taken
            assert 0 < len(asked) < 60 and any(R == 1 for R, _ in asked)
