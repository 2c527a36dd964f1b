"""The CUDA prefill kernel against the reference (skips without CUDA).

    python -m pytest -q tests/gpu/test_prefill_cuda.py
    python tests/gpu/test_prefill_cuda.py --bench [--out prefill.json]

The second form times one KSA layer's prefill (kernel, reference path, MLX's
causal SDPA over the same text) side by side in one process.
"""

import argparse
import json
import time

import mlx.core as mx
import numpy as np
import pytest

from mlx_ksa import visibility
from mlx_ksa.attention import ksa_attention, reference_attention
from mlx_ksa.kernels import prefill
from tests.test_prefill_kernel import CASES, check, make_case, reference, rising_case

pytestmark = pytest.mark.skipif(not mx.cuda.is_available(), reason="needs MLX's CUDA back end")

def gpu_cases(cases):
    """Emulator cases in the dtypes the CUDA kernels serve, then LONG_CASES."""
    return [c[:-1] + (mx.float16 if c[-1] == mx.float32 else c[-1],) for c in cases] + LONG_CASES


# (B, H, Hkv, D, k, S, window, t0, n, dtype): many tiles, many key blocks,
# summaries longer than a block, a 128-chunk window, a whole-context window.
LONG_CASES = [
    (1, 8, 2, 128, 8, 1, 4, 0, 1000, mx.bfloat16),
    (1, 4, 1, 64, 8, 1, 0, 0, 777, mx.float16),
    (1, 4, 4, 128, 4, 2, 2, 300, 201, mx.float16),
    (2, 4, 1, 64, 8, 1, 1000, 0, 500, mx.bfloat16),
    (1, 4, 1, 128, 8, 1, 128, 0, 2100, mx.bfloat16),
    (1, 8, 1, 128, 8, 1, 16, 1531, 1030, mx.bfloat16),
]
GPU_CASES = gpu_cases(CASES)


@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: "-".join(map(str, c)))
def test_cuda_kernel_matches_reference(case):
    arrays, opts = make_case(*case)
    check(prefill.prefill_attention(*arrays, **opts, return_lse=True), arrays, opts)


@pytest.mark.parametrize("case", LONG_CASES[:3], ids=lambda c: "-".join(map(str, c)))
def test_mma_sync_path_matches_reference(case):
    # The path of NVIDIA GPUs without wgmma, built on the H200 on purpose.
    arrays, opts = make_case(*case)
    outs = prefill.kernel("cuda", wgmma=False)(**prefill.launch("cuda", *arrays, **opts))
    check(prefill.cut(outs, arrays[1]), arrays, opts)


def test_hopper_loads_through_tma_maps_set_on_the_gpu():
    # The H200's kernel reads K and V through the maps kernels.tma makes; each
    # map must name its own array (a wrong address reads another stream).
    from mlx_ksa.kernels import tma

    # Other GPUs have no TMA; on the H200 (and where MLX does not say) the maps must be there.
    if mx.device_info().get("compute_capability_major", 9) != 9:
        pytest.skip("TMA loads: Hopper only")
    assert tma.available()
    arrays, opts = make_case(1, 8, 2, 128, 8, 1, 4, 0, 1000, mx.bfloat16)
    args = prefill.launch("cuda", *arrays, **opts)
    assert args["inputs"][-1] is not prefill.NO_MAPS
    check(prefill.cut(prefill.kernel("cuda")(**args), arrays[1]), arrays, opts)


def test_without_maps_hopper_takes_the_mma_sync_path(monkeypatch):
    from mlx_ksa.kernels import tma

    monkeypatch.setattr(tma, "maps", lambda *arrays: None)
    arrays, opts = make_case(1, 8, 2, 128, 8, 1, 4, 0, 1000, mx.bfloat16)
    check(prefill.prefill_attention(*arrays, **opts, return_lse=True), arrays, opts)


def test_bench_shape_after_other_shapes():
    # The bench's layer at 16K, after launches of other shapes: Q once reached
    # wgmma before its copies landed (uncommitted cp.async), wrong in a few
    # rows here and in none of the small cases alone.
    for case in LONG_CASES[:2]:
        arrays, opts = make_case(*case)
        mx.eval(prefill.prefill_attention(*arrays, **opts))
    arrays, opts = make_case(1, 32, 8, 128, 8, 1, 128, 0, 16384, mx.bfloat16)
    # The outputs only: check's float64 lse oracle would hold 16K x 16K scores per head.
    for got, want in zip(prefill.prefill_attention(*arrays, **opts), reference(arrays, opts)):
        np.testing.assert_allclose(np.array(got.astype(mx.float32)), np.array(want), atol=2e-2, rtol=2e-2)


def test_whole_context_text_goes_to_causal_sdpa():
    arrays, opts = make_case(1, 4, 2, 128, 8, 1, 100, 0, 300, mx.bfloat16)
    got = prefill.prefill_attention(*arrays, **opts)
    check(got + prefill.prefill_attention(*arrays, **opts, return_lse=True)[2:], arrays, opts)


def test_rescaling_as_the_scores_grow_along_the_keys():
    # About 5 (log2) more per block of 64 keys: the reference max moves at
    # every other block, the output is rescaled mid-loop.
    arrays, opts = rising_case((1, 2, 1, 64, 8, 1, 2, 0, 4096, mx.bfloat16), rise=5 / 64)
    check(prefill.prefill_attention(*arrays, **opts, return_lse=True), arrays, opts)


def test_a_scale_that_is_not_positive_goes_to_the_reference():
    # The kernel's running maxima are of unscaled scores.
    arrays, opts = make_case(1, 2, 1, 64, 4, 1, 1, 0, 64, mx.bfloat16)
    opts["scale"] = -0.125
    assert prefill.prefill_attention(*arrays, **opts) is None
    got, want = ksa_attention(*arrays, **opts), reference_attention(*arrays, **opts)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.array(g.astype(mx.float32)), np.array(w.astype(mx.float32)), atol=1e-6)


def test_float32_falls_back_to_the_reference():
    arrays, opts = make_case(1, 2, 1, 64, 4, 1, 1, 0, 9, mx.float32)
    assert prefill.prefill_attention(*arrays, **opts) is None
    got, want = ksa_attention(*arrays, **opts), reference_attention(*arrays, **opts)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.array(g), np.array(w), atol=1e-5)


def test_ksa_attention_dispatches_and_differentiates():
    arrays, opts = make_case(1, 4, 2, 64, 8, 1, 2, 0, 100, mx.bfloat16)
    fused = prefill.prefill_attention(*arrays, **opts)
    for g, w in zip(ksa_attention(*arrays, **opts), fused):
        assert mx.array_equal(g, w)
    loss = lambda f: (lambda *xs: sum(o.astype(mx.float32).sum() for o in f(*xs, **opts)))
    g_kernel = mx.grad(loss(ksa_attention), argnums=tuple(range(6)))(*arrays)
    g_ref = mx.grad(loss(reference_attention), argnums=tuple(range(6)))(*arrays)
    # The gradients come from the backward kernel (tests/gpu/test_prefill_backward_cuda.py
    # checks it closely); here, that they are the reference's up to bf16 rounding.
    for g, w in zip(g_kernel, g_ref):
        g, w = np.array(g.astype(mx.float32)), np.array(w.astype(mx.float32))
        assert np.abs(g - w).max() <= 2e-2 * np.abs(w).max()


# -- benchmark ------------------------------------------------------------
def visible_entries(layout, window, n):
    """(query, key) pairs a prefill of n text tokens computes, per head."""
    k, S = layout.chunk, layout.summaries
    t = np.arange(n, dtype=np.int64)
    text = (t + 1 - visibility.band_start(t, k, window) + visibility.summary_prefix(t, k, S, window)).sum()
    return int(text) + (n // k) * sum(j + 1 + k for j in range(S))


def timed(f, reps):
    mx.eval(f())
    mx.synchronize()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        mx.eval(f())
        mx.synchronize()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def bench(sizes=(16384, 65536, 131072), reference_up_to=65536, reps=5):
    H, Hkv, D, k, S, W = 32, 8, 128, 8, 1, 128
    rows = []
    for n in sizes:
        arrays, opts = make_case(1, H, Hkv, D, k, S, W, 0, n, mx.bfloat16)
        for window in (W, n // k):  # a KSA layer, then a whole-context layer
            opts = dict(opts, window=window)
            flops = lambda entries: 4 * D * H * entries
            row = dict(n=n, window=window, H=H, Hkv=Hkv, D=D, k=k, S=S, dtype="bfloat16",
                       visible_entries=visible_entries(opts["layout"], window, n))
            row["kernel_ms"] = 1e3 * timed(lambda: prefill.prefill_attention(*arrays, **opts), reps)
            row["kernel_tflops"] = flops(row["visible_entries"]) / row["kernel_ms"] / 1e9
            q, kt, vt = arrays[0], arrays[2], arrays[3]
            sdpa = lambda: mx.fast.scaled_dot_product_attention(q, kt, vt, scale=opts["scale"], mask="causal")
            row["sdpa_causal_ms"] = 1e3 * timed(sdpa, reps)
            row["sdpa_causal_tflops"] = flops(n * (n + 1) // 2) / row["sdpa_causal_ms"] / 1e9
            if n <= reference_up_to and window == W:
                row["reference_ms"] = 1e3 * timed(lambda: reference_attention(*arrays, **opts), 2)
            row["speedup_vs_sdpa"] = row["sdpa_causal_ms"] / row["kernel_ms"]
            if "reference_ms" in row:
                row["speedup_vs_reference"] = row["reference_ms"] / row["kernel_ms"]
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def bench_cli(bench):
    """`python FILE --bench [--out JSON]`: the rows bench() prints, also as JSON."""
    p = argparse.ArgumentParser()
    p.add_argument("--bench", action="store_true")
    p.add_argument("--out")
    a = p.parse_args()
    if a.bench:
        rows = bench()
        if a.out:
            with open(a.out, "w") as f:
                json.dump(dict(device=str(mx.default_device()), rows=rows), f, indent=1)


if __name__ == "__main__":
    bench_cli(bench)
