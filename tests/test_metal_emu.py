"""The CPU Metal emulator (tests/metal_emu): known kernels match numpy, and
planted bugs (a missing barrier, an off-by-one mask, an out-of-bounds read,
divergent barriers) are caught."""

import mlx.core as mx
import numpy as np
import pytest

from tests.metal_emu import MetalEmuError, available, run_metal_kernel

pytestmark = pytest.mark.skipif(not available(), reason="the Metal emulator needs g++")

BARRIER = "threadgroup_barrier(mem_flags::mem_threadgroup);"

SOFTMAX = f"""
uint row = threadgroup_position_in_grid.y;
uint tid = thread_position_in_threadgroup.x;
uint lane = thread_index_in_simdgroup;
uint sg = simdgroup_index_in_threadgroup;
uint nsg = simdgroups_per_threadgroup;
uint n = threads_per_threadgroup.x;
int D = x_shape[1];
threadgroup float part[32];
const device T* xr = x + row * D;
float m = -INFINITY;
for (int i = tid; i < D; i += n) m = max(m, float(xr[i]));
m = simd_max(m);
if (lane == 0) part[sg] = m;
{BARRIER}
m = part[0];
for (uint s = 1; s < nsg; s++) m = max(m, part[s]);
{BARRIER} // reads of part done
float sum = 0;
for (int i = tid; i < D; i += n) sum += exp(float(xr[i]) - m);
sum = simd_sum(sum);
if (lane == 0) part[sg] = sum;
{BARRIER} // sums written
sum = 0;
for (uint s = 0; s < nsg; s++) sum += part[s];
for (int i = tid; i < D; i += n) out[row * D + i] = T(fast::exp(float(xr[i]) - m) / sum);
"""


def softmax_kernel(source=SOFTMAX, name="emu_softmax"):
    return mx.fast.metal_kernel(name=name, input_names=["x"], output_names=["out"], source=source)


def run_softmax(kernel, rows, d, tg=64, dtype=mx.float32, **kw):
    x = mx.random.normal((rows, d), key=mx.random.key(rows * d))
    (out,) = run_metal_kernel(kernel, inputs=[x.astype(dtype)], output_shapes=[(rows, d)],
                              output_dtypes=[dtype], grid=(tg, rows, 1), threadgroup=(tg, 1, 1),
                              template=[("T", dtype)], **kw)
    xn = np.array(x.astype(dtype).astype(mx.float32), np.float64)
    ref = np.exp(xn - xn.max(1, keepdims=True))
    return out, ref / ref.sum(1, keepdims=True)


def test_softmax_simd_reductions_and_threadgroup_memory():
    out, ref = run_softmax(softmax_kernel(), rows=5, d=200, tg=96)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-7)


def test_softmax_under_stress_schedule():
    out, ref = run_softmax(softmax_kernel(), rows=3, d=100, stress=True)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-7)


def test_correct_kernel_is_clean_under_thread_sanitizer():
    out, ref = run_softmax(softmax_kernel(), rows=2, d=64, sanitizer="thread")
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-7)


def test_missing_barrier_is_a_race():
    # Without the last barrier a simdgroup reads the other's partial sum
    # before it is written.
    buggy = SOFTMAX.replace(f"{BARRIER} // sums written", "")
    with pytest.raises(MetalEmuError, match="data race"):
        run_softmax(softmax_kernel(buggy, "emu_softmax_race"), rows=2, d=64, sanitizer="thread")


ATTENTION = """
uint head = threadgroup_position_in_grid.x;
uint lane = thread_index_in_simdgroup;
uint sg = simdgroup_index_in_threadgroup;
constexpr int PER = D / 32;
int L = k_shape[1];
const device T* qh = q + head * D;
const device T* kh = k + head * L * D;
const device T* vh = v + head * L * D;
float qv[PER], acc[PER];
for (int e = 0; e < PER; e++) {
  qv[e] = float(qh[lane * PER + e]) * scale;
  acc[e] = 0;
}
float m = -INFINITY, l = 0;
for (int j = sg; j < n_valid; j += SPLIT) {
  float s = 0;
  for (int e = 0; e < PER; e++) s += qv[e] * float(kh[j * D + lane * PER + e]);
  s = simd_sum(s);
  float mn = max(m, s);
  float f = exp(m - mn), p = exp(s - mn);
  l = l * f + p;
  for (int e = 0; e < PER; e++) acc[e] = acc[e] * f + p * float(vh[j * D + lane * PER + e]);
  m = mn;
}
threadgroup float tm[SPLIT], tl[SPLIT], tacc[SPLIT * D];
if (lane == 0) {
  tm[sg] = m;
  tl[sg] = l;
}
for (int e = 0; e < PER; e++) tacc[sg * D + lane * PER + e] = acc[e];
threadgroup_barrier(mem_flags::mem_threadgroup);
if (sg == 0) {
  float M = tm[0];
  for (int s = 1; s < SPLIT; s++) M = max(M, tm[s]);
  float total = 0, o[PER] = {0};
  for (int s = 0; s < SPLIT; s++) {
    float w = exp(tm[s] - M);
    total += tl[s] * w;
    for (int e = 0; e < PER; e++) o[e] += tacc[s * D + lane * PER + e] * w;
  }
  for (int e = 0; e < PER; e++) out[head * D + lane * PER + e] = T(o[e] / total);
}
"""


def run_attention(source, dtype, heads=3, length=40, n_valid=29, d=64, split=2):
    kernel = mx.fast.metal_kernel(name="emu_attention", input_names=["q", "k", "v", "scale", "n_valid"],
                                  output_names=["out"], source=source)
    key = mx.random.key(7)
    q, k, v = (mx.random.normal(s, key=kk).astype(dtype)
               for s, kk in zip([(heads, d), (heads, length, d), (heads, length, d)], mx.random.split(key, 3)))
    scale = d ** -0.5
    (out,) = run_metal_kernel(kernel, inputs=[q, k, v, mx.array(scale), n_valid], output_shapes=[(heads, d)],
                              output_dtypes=[dtype], grid=(32 * split * heads, 1, 1),
                              threadgroup=(32 * split, 1, 1),
                              template=[("T", dtype), ("D", d), ("SPLIT", split)])
    qn, kn, vn = (np.array(a.astype(mx.float32), np.float64) for a in (q, k, v))
    s = np.einsum("hd,hld->hl", qn, kn[:, :n_valid]) * scale
    p = np.exp(s - s.max(1, keepdims=True))
    ref = np.einsum("hl,hld->hd", p / p.sum(1, keepdims=True), vn[:, :n_valid])
    return out, ref


@pytest.mark.parametrize("dtype,tol", [(mx.float16, 2e-3), (mx.bfloat16, 1.6e-2)])
def test_online_softmax_attention(dtype, tol):
    out, ref = run_attention(ATTENTION, dtype)
    np.testing.assert_allclose(out, ref, rtol=tol, atol=tol)


def test_off_by_one_mask_is_a_mismatch():
    buggy = ATTENTION.replace("j < n_valid", "j <= n_valid")
    out, ref = run_attention(buggy, mx.float16)
    assert np.abs(out - ref).max() > 1e-2


STRIDED = """
uint j = thread_position_in_grid.x, i = thread_position_in_grid.y;
if (i >= uint(x_shape[0]) || j >= uint(x_shape[1])) return;
T a = x[i * x_strides[0] + j * x_strides[1]];
T b = bias[j * bias_strides[0]];
out[i * x_shape[1] + j] = a * scale + b + small[j % 3];
"""


def test_strided_broadcast_scalar_and_constant_inputs():
    kernel = mx.fast.metal_kernel(name="emu_strided", input_names=["x", "bias", "scale", "small"],
                                  output_names=["out"], source=STRIDED, ensure_row_contiguous=False)
    big = mx.arange(12 * 20, dtype=mx.float32).reshape(12, 20)
    x = big[2:, 1::3].T  # (7, 10), strides (3, 20), offset 41
    bias = mx.broadcast_to(mx.array(0.5), (10,))  # stride 0
    small = mx.array([1.0, 2.0, 3.0])  # < 8 elements: a `constant` buffer
    (out,) = run_metal_kernel(kernel, inputs=[x, bias, mx.array(2.0), small], output_shapes=[x.shape],
                              output_dtypes=[mx.float32], grid=(16, 8, 1), threadgroup=(8, 4, 1),
                              template=[("T", mx.float32)])
    ref = np.array(x) * 2 + 0.5 + np.array([1.0, 2.0, 3.0])[np.arange(10) % 3]
    np.testing.assert_array_equal(out, ref)


COPY = """
uint idx = thread_position_in_grid.x;
if (idx < uint(out_size)) out[idx] = x[elem_to_loc(idx, x_shape, x_strides, x_ndim)];
"""


@pytest.mark.parametrize("row_contiguous", [False, True])
def test_elem_to_loc_copy_of_a_transposed_array(row_contiguous):
    kernel = mx.fast.metal_kernel(name="emu_copy", input_names=["x", "out_size"], output_names=["out"],
                                  source=COPY, ensure_row_contiguous=row_contiguous)
    x = mx.arange(2 * 3 * 5, dtype=mx.int32).reshape(2, 3, 5).transpose(2, 0, 1)
    (out,) = run_metal_kernel(kernel, inputs=[x, x.size], output_shapes=[x.shape], output_dtypes=[mx.int32],
                              grid=(x.size, 1, 1), threadgroup=(16, 1, 1))
    np.testing.assert_array_equal(out, np.array(x))


SIMD_OPS = """
uint t = thread_position_in_grid.x;
uint lane = thread_index_in_simdgroup;
if (t >= uint(n)) return;  // the last simdgroup runs with some lanes gone
int v = x[t];
device int* o = out + t * 7;
o[0] = simd_sum(v);
o[1] = simd_shuffle_xor(v, 1);
o[2] = simd_shuffle_down(v, 3);
o[3] = simd_prefix_exclusive_sum(v);
o[4] = simd_broadcast(v, 2);
o[5] = simd_max(v);
o[6] = quad_sum(v);
"""


def test_simd_collectives_with_inactive_lanes():
    kernel = mx.fast.metal_kernel(name="emu_simd_ops", input_names=["x", "n"], output_names=["out"],
                                  source=SIMD_OPS)
    n = 52  # a full simdgroup and one of 20 active lanes (of 32 launched)
    x = np.random.default_rng(0).integers(-50, 50, n).astype(np.int32)
    (out,) = run_metal_kernel(kernel, inputs=[mx.array(x), n], output_shapes=[(n, 7)],
                              output_dtypes=[mx.int32], grid=(64, 1, 1), threadgroup=(64, 1, 1))
    for lo in (0, 32):
        g = x[lo:min(lo + 32, n)]
        lanes = np.arange(len(g))
        ref = np.stack([
            np.full(len(g), g.sum()), g[lanes ^ 1],
            np.where(lanes + 3 < 32, g[np.minimum(lanes + 3, len(g) - 1)], g),
            np.cumsum(g) - g, np.full(len(g), g[2]), np.full(len(g), g.max()),
            g.reshape(-1, 4).sum(1).repeat(4)], 1)
        # Shuffles reading lanes past the 20 live ones are undefined in Metal.
        valid = np.ones_like(ref, bool)
        valid[:, 2] = lanes + 3 < len(g)
        np.testing.assert_array_equal(out[lo:lo + len(g)][valid], ref[valid])


MATMUL = """
uint2 tile = threadgroup_position_in_grid.xy;
uint tid = thread_index_in_threadgroup;
uint sg = simdgroup_index_in_threadgroup;
int K = a_shape[1], N = b_shape[1];
threadgroup half As[16 * 8];
threadgroup half Bs[8 * 16];
simdgroup_float8x8 acc = make_filled_simdgroup_matrix<float, 8, 8>(0.f);
uint sr = (sg / 2) * 8, sc = (sg % 2) * 8;
for (int k0 = 0; k0 < K; k0 += 8) {
  As[tid] = a[(tile.y * 16 + tid / 8) * K + k0 + tid % 8];
  Bs[tid] = b[(k0 + tid / 16) * N + tile.x * 16 + tid % 16];
  threadgroup_barrier(mem_flags::mem_threadgroup);
  simdgroup_half8x8 ma, mb;
  simdgroup_load(ma, As, 8, ulong2(0, sr));
  simdgroup_load(mb, Bs, 16, ulong2(sc, 0));
  simdgroup_multiply_accumulate(acc, ma, mb, acc);
  threadgroup_barrier(mem_flags::mem_threadgroup);
}
acc.thread_elements() *= alpha;
simdgroup_store(acc, c, N, ulong2(tile.x * 16 + sc, tile.y * 16 + sr));
"""


def test_simdgroup_matrix_tiled_matmul():
    kernel = mx.fast.metal_kernel(name="emu_matmul", input_names=["a", "b", "alpha"], output_names=["c"],
                                  source=MATMUL)
    m, k, n = 32, 24, 48
    a = mx.random.normal((m, k), key=mx.random.key(1)).astype(mx.float16)
    b = mx.random.normal((k, n), key=mx.random.key(2)).astype(mx.float16)
    (c,) = run_metal_kernel(kernel, inputs=[a, b, mx.array(0.5)], output_shapes=[(m, n)],
                            output_dtypes=[mx.float32], grid=(n // 16 * 128, m // 16, 1),
                            threadgroup=(128, 1, 1))
    ref = 0.5 * np.array(a, np.float64) @ np.array(b, np.float64)
    np.testing.assert_allclose(c, ref, rtol=1e-4, atol=1e-4)


HISTOGRAM = """
uint i = thread_position_in_grid.x;
uint t = thread_position_in_threadgroup.x;
threadgroup atomic<uint> local[BINS];
if (t < BINS) atomic_store_explicit(&local[t], 0u, memory_order_relaxed);
threadgroup_barrier(mem_flags::mem_threadgroup);
atomic_fetch_add_explicit(&local[x[i]], 1u, memory_order_relaxed);
threadgroup_barrier(mem_flags::mem_threadgroup);
if (t < BINS)
  atomic_fetch_add_explicit(&hist[t], atomic_load_explicit(&local[t], memory_order_relaxed),
                            memory_order_relaxed);
"""


def test_atomic_histogram():
    kernel = mx.fast.metal_kernel(name="emu_histogram", input_names=["x"], output_names=["hist"],
                                  source=HISTOGRAM, atomic_outputs=True)
    x = np.random.default_rng(3).integers(0, 16, 300).astype(np.int32)
    (hist,) = run_metal_kernel(kernel, inputs=[mx.array(x)], output_shapes=[(16,)], output_dtypes=[mx.uint32],
                               grid=(300, 1, 1), threadgroup=(64, 1, 1), template=[("BINS", 16)],
                               init_value=0)
    np.testing.assert_array_equal(hist, np.bincount(x, minlength=16))


def test_out_of_bounds_read_is_caught_by_address_sanitizer():
    kernel = mx.fast.metal_kernel(name="emu_oob", input_names=["x"], output_names=["out"],
                                  source="uint i = thread_position_in_grid.x;\nout[i] = x[i] + x[i + 1];")
    x = mx.arange(37, dtype=mx.float32)
    args = dict(inputs=[x], output_shapes=[(37,)], output_dtypes=[mx.float32], grid=(37, 1, 1),
                threadgroup=(32, 1, 1))
    with pytest.raises(MetalEmuError, match="heap-buffer-overflow"):
        run_metal_kernel(kernel, sanitizer="address", **args)


def test_divergent_barrier_and_early_return_are_errors():
    divergent = f"""
uint t = thread_position_in_threadgroup.x;
threadgroup float s[64];
s[t] = x[t];
if (t < 32) {{ {BARRIER} }} else {{ {BARRIER} }}
out[t] = s[63 - t];
"""
    early = f"""
uint t = thread_position_in_threadgroup.x;
threadgroup float s[64];
s[t] = x[t];
if (t >= 40) return;
{BARRIER}
out[t] = s[63 - t];
"""
    args = dict(inputs=[mx.zeros(64)], output_shapes=[(64,)], output_dtypes=[mx.float32], grid=(64, 1, 1),
                threadgroup=(64, 1, 1))
    for name, src, msg in [("emu_divergent", divergent, "divergent barrier"), ("emu_early", early, "returned")]:
        kernel = mx.fast.metal_kernel(name=name, input_names=["x"], output_names=["out"], source=src)
        with pytest.raises(MetalEmuError, match=msg):
            run_metal_kernel(kernel, **args)
