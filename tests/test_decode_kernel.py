"""The Metal decode kernel, run through the CPU Metal emulator, against the reference.

Cases come from a real KSACache filled to a context below or past the
window, so the kernel sees the slot ranges the model gives it; batch rows at
different contexts come from a BatchKSACache step, one range per row. The launch is
the one `kernels.decode.plan_partial` / `plan_reduce` compute for the GPU.
`make_case` and `reference` also serve tests/gpu/test_decode_cuda.py.
"""

import mlx.core as mx
import numpy as np
import pytest

from mlx_ksa import kernels
from mlx_ksa.cache import BatchKSACache, KSACache, decode_reference
from mlx_ksa.kernels import decode

TOL = {mx.float32: 1e-5, mx.float16: 2e-3, mx.bfloat16: 1.6e-2}


def make_case(B, H, Hkv, D, dtype, k, S, window, t, strided=False, seed=0):
    """A cache holding t text tokens (and their chunks' summaries), then the
    decode step of token t. t may be a tuple, one context per batch row
    (B of them): a BatchKSACache step, with one slot range per row. Returns
    (q, keys, values, start, end, sum_end, scale) as
    `decode.decode_attention` takes them."""
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
    R = 1 + S if any((x + 1) % k == 0 for x in np.atleast_1d(t)) else 1
    start, end, sum_end = cache.store_decode(arr(B, Hkv, R, D), arr(B, Hkv, R, D))
    keys, values = cache.keys, cache.values
    if strided:
        # The same contents in a [B, slots, 2*Hkv, D] buffer seen through a
        # transposed, head-strided view: nothing row-contiguous about it.
        def view(x):
            big = mx.zeros((B, x.shape[2], 2 * Hkv, D), dtype)
            big[:, :, 1::2] = x.transpose(0, 2, 1, 3)
            return big.transpose(0, 2, 1, 3)[:, 1::2]

        keys, values = view(keys), view(values)
    return arr(B, H, R, D), keys, values, start, end, sum_end, D**-0.5


def reference(q, keys, values, start, end, sum_end, scale):
    """decode_reference in float32 on the (rounded) inputs."""
    f32 = lambda x: x.astype(mx.float32)
    return decode_reference(f32(q), f32(keys), f32(values), start, end, sum_end, scale)


def emulator():
    emu = pytest.importorskip("tests.metal_emu", reason="the CPU Metal emulator is not there")
    if not hasattr(emu, "run_metal_kernel"):
        pytest.skip("the CPU Metal emulator is not there")
    return emu


def check(out, case):
    q = case[0]
    expected = np.array(reference(*case))
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


def test_metal_kernel_is_race_free():
    emu = emulator()
    case = make_case(2, 4, 1, 64, mx.float32, 4, 1, 2, (23, 6), seed=5)
    launch = decode.plan_partial(*case, split_len=8)
    partial, _ = decode.kernels("metal")
    emu.run_metal_kernel(partial, **launch, sanitizer="thread")


def test_back_ends_keep_the_same_structure():
    """metal/decode.metal and cuda/decode.cu: same sections, same line count
    once CUDA's unroll pragmas are left out (each line maps to its twin)."""
    def shape(name):
        parts = decode.sections(kernels.source(name))
        return {k: sum(not l.strip().startswith("#pragma") for l in v.splitlines())
                for k, v in parts.items() if k != "header"}

    assert shape("metal/decode.metal") == shape("cuda/decode.cu")
