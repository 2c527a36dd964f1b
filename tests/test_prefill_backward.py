"""The Metal prefill backward kernel, run through the CPU Metal emulator,
against `mx.vjp` of the reference (float32), and `ksa_attention`'s custom
vjp end to end with both emulated kernels standing in for the GPU.

The launch is the one `prefill_backward.launch` computes for the real GPU.
The forward's outputs come from the reference and the float64 lse oracle, so
only the backward kernel is under test. `make_grad_case`, `reference_grads`
and `check_grads` also serve tests/gpu/test_prefill_backward_cuda.py.
"""

import mlx.core as mx
import numpy as np
import pytest

from mlx_ksa import attention
from mlx_ksa.attention import reference_attention
from mlx_ksa.kernels import prefill, prefill_backward
from tests.test_prefill_kernel import emulator, lse_oracle, make_case, reference  # noqa: F401 (fixture)

# Relative to the largest gradient entry of each array.
TOL = {mx.float32: 2e-4, mx.float16: 4e-3, mx.bfloat16: 3e-2}
NAMES = ["q_text", "q_sum", "k_text", "v_text", "k_sum", "v_sum"]


def make_grad_case(*case, seed=0):
    """Inputs, options and cotangents (do_text, do_sum) of one case."""
    arrays, opts = make_case(*case, seed=seed)
    keys = mx.random.split(mx.random.key(seed + 1), 2)
    cot = tuple(mx.random.normal(x.shape, key=kk).astype(x.dtype) for x, kk in zip(arrays[:2], keys))
    return arrays, opts, cot


def forward_outputs(arrays, opts):
    """(o_text, o_sum, lse_text, lse_sum) as the forward kernel saves them."""
    o = [x.astype(arrays[0].dtype) for x in reference(arrays, opts)]
    return (*o, *(mx.array(x, mx.float32) for x in lse_oracle(arrays, opts)))


def reference_grads(arrays, opts, cot):
    """mx.vjp of reference_attention in float32 on the (rounded) inputs."""
    f32 = lambda xs: [x.astype(mx.float32) for x in xs]
    fn = lambda *xs: reference_attention(*xs, **opts)
    return mx.vjp(fn, f32(arrays), f32(cot))[1]


def check_grads(got, arrays, opts, cot):
    tol = TOL[arrays[0].dtype]
    for name, g, w, x in zip(NAMES, got, reference_grads(arrays, opts, cot), arrays):
        g = np.array(g.astype(mx.float32)) if isinstance(g, mx.array) else np.asarray(g, np.float32)
        w = np.array(w)
        assert g.shape == tuple(x.shape), name
        scale = max(float(np.abs(w).max(initial=0.0)), 1e-3)
        np.testing.assert_allclose(g, w, atol=tol * scale, rtol=tol, err_msg=name)


# (B, H, Hkv, D, k, S, window, t0, n, dtype): N not a multiple of k, N below
# the window, S = 1 and 2, GQA 1/2/4, continuation (t0 > 0, text_base > 0,
# t0 not chunk aligned), a whole-context window, window 0. Two (dtype, D)
# instantiations only: each costs an emulator compile.
CASES = [
    (1, 4, 1, 64, 4, 1, 1, 0, 19, mx.float32),
    (1, 2, 2, 128, 4, 2, 2, 22, 13, mx.float16),
    (1, 2, 1, 64, 4, 1, 1000, 0, 21, mx.float32),
    (2, 2, 1, 128, 4, 1, 8, 0, 10, mx.float16),
    (1, 4, 4, 64, 4, 2, 3, 45, 33, mx.float32),
    (1, 8, 2, 128, 8, 1, 0, 0, 40, mx.float16),
    (1, 4, 1, 64, 4, 2, 1, 9, 3, mx.float32),  # no chunk completes: no summary queries
]


def run_emulated(emulator, arrays, opts, cot, sanitizer=None):
    args = prefill_backward.launch("metal", arrays, forward_outputs(arrays, opts), cot, **opts)
    outs = emulator.run_metal_kernel(prefill_backward.kernel("metal"), sanitizer=sanitizer, **args)
    return prefill_backward.cut(outs, arrays)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_metal_backward_matches_reference_vjp(emulator, case):
    arrays, opts, cot = make_grad_case(*case)
    check_grads(run_emulated(emulator, arrays, opts, cot), arrays, opts, cot)


def test_metal_backward_over_many_partner_blocks(emulator):
    # 200 tokens, a 2-chunk window: summary key tiles stream about 190 text
    # queries (6 blocks of 32), key tiles sum over 2 query heads.
    arrays, opts, cot = make_grad_case(1, 4, 2, 64, 4, 1, 2, 0, 200, mx.float32)
    check_grads(run_emulated(emulator, arrays, opts, cot), arrays, opts, cot)


@pytest.mark.parametrize("sanitizer", ["thread", "address"])
def test_metal_backward_is_clean_under_sanitizers(emulator, sanitizer):
    arrays, opts, cot = make_grad_case(1, 2, 1, 64, 4, 1, 1, 5, 14, mx.float32)
    check_grads(run_emulated(emulator, arrays, opts, cot, sanitizer), arrays, opts, cot)


def test_launch_covers_every_row():
    arrays, opts, cot = make_grad_case(1, 4, 2, 64, 4, 1, 1, 6, 70, mx.float16)
    outs = forward_outputs(arrays, opts)
    for back_end in ("metal", "cuda"):
        args = prefill_backward.launch(back_end, arrays, outs, cot, **opts)
        rows = prefill_backward.TILE[back_end]
        tiles = sum(-(-x.shape[2] // rows) for x in (arrays[4], arrays[0], arrays[2], arrays[1]))
        assert args["grid"] == (tiles * prefill_backward.THREADS[back_end], 4, 1)
        assert list(args["inputs"][-2].tolist()[-4:]) == [-(-x.shape[2] // rows) for x in
                                                         (arrays[4], arrays[0], arrays[2], arrays[1])]


def test_ksa_attention_gradient_through_emulated_kernels(emulator, monkeypatch):
    """mx.grad through ksa_attention's custom function, with the forward and
    backward Metal kernels run by the emulator, equals the reference's."""
    arrays, opts, _ = make_grad_case(1, 4, 2, 64, 4, 1, 2, 6, 23, mx.float32)

    def emulated(real):
        def run(**args):
            outs = emulator.run_metal_kernel(real, **args)
            return [mx.array(o).astype(dt) for o, dt in zip(outs, args["output_dtypes"])]
        return lambda back_end, wgmma=True: run

    for module in (prefill, prefill_backward):
        monkeypatch.setattr(module, "backend", lambda: "metal")
        monkeypatch.setattr(module, "kernel", emulated(module.kernel("metal")))
    w = [mx.random.normal(x.shape, key=mx.random.key(i)) for i, x in enumerate(arrays[:2])]

    def loss(f):
        return lambda *xs: sum((o * wi).sum() for o, wi in zip(f(*xs, **opts), w))

    got = mx.grad(loss(attention.ksa_attention), argnums=tuple(range(6)))(*arrays)
    want = mx.grad(loss(reference_attention), argnums=tuple(range(6)))(*arrays)
    for name, g, r in zip(NAMES, got, want):
        np.testing.assert_allclose(np.array(g), np.array(r), atol=2e-4, rtol=2e-4, err_msg=name)
