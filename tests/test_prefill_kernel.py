"""The Metal prefill kernel, run through the CPU Metal emulator, against the reference.

The launch is the one `prefill.launch` computes for the real GPU, so the
emulator compiles the exact source MLX generates. `make_case` and `lse_oracle`
also serve tests/gpu/test_prefill_cuda.py.
"""

import math

import mlx.core as mx
import numpy as np
import pytest

from mlx_ksa import visibility
from mlx_ksa.attention import reference_attention
from mlx_ksa.kernels import prefill
from mlx_ksa.layout import Layout

TOL = {mx.float32: 2e-4, mx.float16: 3e-3, mx.bfloat16: 2e-2}


def make_case(B, H, Hkv, D, k, S, window, t0, n, dtype, seed=0):
    """Random inputs of one ksa_attention call: text_base is the earliest
    chunk boundary the cache may start at (0 when t0 = 0)."""
    layout = Layout(k, S)
    text_base = visibility.band_start(t0, k, window) // 2 // k * k
    _, m = layout.completed_chunks(t0, n)
    Ls = (t0 + n) // k * S
    keys = iter(mx.random.split(mx.random.key(seed), 6))
    arr = lambda *shape: mx.random.normal(shape, key=next(keys)).astype(dtype)
    arrays = (arr(B, H, n, D), arr(B, H, m * S, D), arr(B, Hkv, t0 + n - text_base, D),
              arr(B, Hkv, t0 + n - text_base, D), arr(B, Hkv, Ls, D), arr(B, Hkv, Ls, D))
    opts = dict(layout=layout, window=window, t0=t0, text_base=text_base, scale=D**-0.5)
    return arrays, opts


def rising_case(case, rise):
    """make_case with every text query all ones and the summary keys ramped so
    that summary scores rise by `rise` (log2 units) per key: a text row's max
    keeps growing along the keys, so a kernel moves its reference max (and
    rescales its output) mid-loop, where random inputs settle after the
    first key block."""
    arrays, opts = make_case(*case)
    q_t, q_s, k_t, v_t, k_s, v_s = arrays
    step = rise * math.log(2) / (q_t.shape[-1] * opts["scale"])
    ramp = step * mx.arange(k_s.shape[2], dtype=mx.float32)[:, None]
    k_s = (ramp + 0.1 * k_s.astype(mx.float32)).astype(k_s.dtype)
    return (mx.ones_like(q_t), q_s, k_t, v_t, k_s, v_s), opts


def reference(arrays, opts):
    """reference_attention in float32 on the (rounded) inputs."""
    return reference_attention(*(x.astype(mx.float32) for x in arrays), **opts)


def lse_oracle(arrays, opts):
    """float64 logsumexp of the scaled visible scores: (text [B,H,n], summaries [B,H,m*S])."""
    q_t, q_s, k_t, _, k_s, _ = (np.array(x.astype(mx.float32), np.float64) for x in arrays)
    lay, W, t0, base = opts["layout"], opts["window"], opts["t0"], opts["text_base"]
    k, S = lay.chunk, lay.summaries
    G = q_t.shape[1] // k_t.shape[1]
    k_t, k_s = np.repeat(k_t, G, axis=1), np.repeat(k_s, G, axis=1)

    def lse(q, keys):
        s = np.einsum("bhd,bhkd->bhk", q, keys) * opts["scale"]
        mx_ = s.max(-1, keepdims=True)
        return (mx_ + np.log(np.exp(s - mx_).sum(-1, keepdims=True)))[..., 0]

    text = []
    for i in range(q_t.shape[2]):
        t = t0 + i
        keys = np.concatenate([k_s[:, :, : visibility.summary_prefix(t, k, S, W)],
                               k_t[:, :, visibility.band_start(t, k, W) - base : t + 1 - base]], 2)
        text.append(lse(q_t[:, :, i], keys))
    summ = []
    for r in range(q_s.shape[2]):
        c, j = t0 // k + r // S, r % S
        keys = np.concatenate([k_s[:, :, c * S : c * S + j + 1],
                               k_t[:, :, c * k - base : (c + 1) * k - base]], 2)
        summ.append(lse(q_s[:, :, r], keys))
    stack = lambda xs, B, H: np.stack(xs, 2) if xs else np.zeros((B, H, 0))
    return stack(text, *q_t.shape[:2]), stack(summ, *q_t.shape[:2])


def check(outs, arrays, opts):
    """Compare kernel outputs (o_text, o_sum, lse_text, lse_sum) with the oracles."""
    tol = TOL[arrays[0].dtype]
    want = [np.array(x) for x in reference(arrays, opts)] + list(lse_oracle(arrays, opts))
    for name, got, ref in zip(prefill.OUTPUTS, outs, want):
        got = np.array(got.astype(mx.float32)) if isinstance(got, mx.array) else np.asarray(got, np.float32)
        assert got.shape == ref.shape, name
        np.testing.assert_allclose(got, ref, atol=tol, rtol=tol, err_msg=name)


# (B, H, Hkv, D, k, S, window, t0, n, dtype): partial last chunks, n < window,
# window 0, a whole-context window, S = 2, GQA 1/4/8, continuation (t0 > 0,
# text_base < t0, t0 not chunk aligned).
CASES = [
    (1, 4, 1, 64, 4, 1, 1, 0, 19, mx.float32),
    (1, 2, 2, 128, 4, 2, 2, 22, 13, mx.float16),
    (1, 8, 1, 64, 8, 1, 0, 0, 40, mx.bfloat16),
    (1, 2, 1, 128, 4, 1, 1000, 0, 21, mx.float32),
    (2, 2, 1, 64, 4, 1, 8, 0, 10, mx.float16),
    (1, 2, 1, 128, 8, 2, 1, 3, 37, mx.bfloat16),
    (1, 4, 4, 64, 4, 2, 3, 45, 33, mx.float32),
]


def run_emulated(emulator, arrays, opts, sanitizer=None):
    args = prefill.launch("metal", *arrays, **opts)
    return prefill.cut(emulator.run_metal_kernel(prefill.kernel("metal"), sanitizer=sanitizer, **args),
                       arrays[1])


@pytest.fixture(scope="module")
def emulator():
    emu = pytest.importorskip("tests.metal_emu")
    if not emu.available():
        pytest.skip("the Metal emulator found no C++ compiler")
    return emu


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_metal_kernel_matches_reference(emulator, case):
    arrays, opts = make_case(*case)
    check(run_emulated(emulator, arrays, opts), arrays, opts)


def test_metal_kernel_over_many_key_blocks(emulator):
    # 25 tiles of 32 queries; up to 6 summary blocks and a 2-block band each.
    arrays, opts = make_case(1, 2, 1, 64, 4, 1, 8, 0, 800, mx.bfloat16)
    check(run_emulated(emulator, arrays, opts), arrays, opts)


def test_metal_kernel_rescales_as_scores_grow(emulator):
    # About 5 (log2) more per block of 32 keys (BK at D = 64): the reference
    # max moves at every other block, the output is rescaled mid-loop.
    arrays, opts = rising_case((1, 2, 1, 64, 4, 1, 2, 0, 800, mx.float16), rise=5 / 32)
    check(run_emulated(emulator, arrays, opts), arrays, opts)


@pytest.mark.parametrize("sanitizer", ["thread", "address"])
def test_metal_kernel_is_clean_under_sanitizers(emulator, sanitizer):
    arrays, opts = make_case(1, 2, 1, 64, 4, 1, 1, 5, 14, mx.float32)
    check(run_emulated(emulator, arrays, opts, sanitizer), arrays, opts)


def test_launch_covers_every_query():
    arrays, opts = make_case(1, 4, 2, 64, 4, 1, 1, 0, 70, mx.float16)
    for back_end in ("metal", "cuda"):
        args = prefill.launch(back_end, *arrays, **opts)
        tiles = args["grid"][0] // args["threadgroup"][0]
        rows = prefill.TILE[back_end]
        assert tiles == -(-70 // rows) + -(-arrays[1].shape[2] // rows)
        assert args["grid"][1:] == (4, 1)


def test_kernels_serve_only_a_positive_scale():
    # Their running maxima are of unscaled scores; a scale <= 0 (or NaN) goes to
    # the reference, which tests/gpu checks end to end through ksa_attention.
    arrays, opts = make_case(1, 2, 1, 64, 4, 1, 1, 0, 9, mx.float16)
    for back_end in ("metal", "cuda"):
        assert prefill.supported(*arrays, scale=opts["scale"], back_end=back_end)
        for scale in (0.0, -opts["scale"], float("nan")):
            assert not prefill.supported(*arrays, scale=scale, back_end=back_end)


def test_launch_parameters_are_made_once_per_value():
    # A fresh parameter array costs a page-in on MLX's CUDA back end at every
    # launch (kernels.constant); equal launches share theirs.
    arrays, opts = make_case(1, 2, 1, 64, 4, 1, 1, 0, 9, mx.float16)
    at = prefill.INPUTS.index("params")
    a, b = (prefill.launch("cuda", *arrays, **opts)["inputs"][at : at + 2] for _ in range(2))
    assert a[0] is b[0] and a[1] is b[1]
    moved = prefill.launch("cuda", *arrays, **{**opts, "scale": 0.5})["inputs"][at : at + 2]
    assert moved[0] is a[0] and moved[1] is not a[1] and moved[1].item() == 0.5
    assert a[0].tolist()[:4] == [9, arrays[1].shape[2], 0, opts["text_base"]]
