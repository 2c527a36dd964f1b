// KSA decode attention, CUDA. The same algorithm as metal/decode.metal, with
// the same index math and structure; see that file for the description.
// mlx_ksa/kernels/decode.py cuts this file at the "////" lines into the
// header and the bodies that mx.fast.cuda_kernel takes. A Metal simdgroup is
// a warp here, a threadgroup a block.
//
// params: [B, 3], one row per batch row: [start - first, end - first,
// S + k], the text range within the view Kt/Vt = buffer[:, :, first:last];
// n_splits is the launch's grid.
//
// Two variants share the partial body, "dense" and "quantized"; the wrapper
// puts the variant's prelude (input names, row loader) before it.

//// header
// Finite stand-in for -inf: empty warps merge with weight exp2(-huge) = 0 and
// no inf - inf can appear.
constexpr float NEG_BIG = -3.0e38f;
constexpr float LOG2E = 1.4426950408889634f;
constexpr int U = 4;  // keys a warp loads at once

__device__ inline float warp_sum(float x) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// One lane's E consecutive head-dim elements of a K/V row, as float, in one
// vector load (rows are E-aligned: the head dim is contiguous and D = 32 * E).
template <typename T, int E>
__device__ inline void load_row(const T* p, float* out) {
  struct alignas(sizeof(T) * E) Row { T v[E]; };
  const Row row = *reinterpret_cast<const Row*>(p);
#pragma unroll
  for (int e = 0; e < E; ++e) out[e] = static_cast<float>(row.v[e]);
}

// An array laid out [B, Hkv, slots, *] (the head dim, or its packed words,
// scales or biases, contiguous): at() moves to a batch row, KV head and
// column, row(i) is slot i there.
template <typename P>
struct Strided {
  const P* p;
  int64_t batch, head, slot;
  __device__ Strided at(int b, int hk, int column) const { return {p + b * batch + hk * head + column, batch, head, slot}; }
  __device__ const P* row(int i) const { return p + i * slot; }
};

// The two ways K/V rows are stored; the partial body reads them through
// Rows (chosen by the variant's prelude): at(b, hk, lane) is the lane's part
// of the rows of a batch row and KV head, load(i, out) its E elements of
// slot i as float.
// Dense: one array of T.
template <typename T, int D>
struct DenseRows {
  Strided<T> x;
  __device__ DenseRows at(int b, int hk, int lane) const { return {x.at(b, hk, lane * (D / 32))}; }
  __device__ void load(int i, float* out) const { load_row<T, D / 32>(x.row(i), out); }
};

// mx.quantize (affine): element j of a row is the BITS-bit field at bit
// (j * BITS) % 32 of word j * BITS / 32, worth scale * field + bias, with one
// scale and bias per GS elements. A lane's E = D / 32 elements (E * BITS <= 32
// bits, at a multiple of E * BITS) lie in one word and one group: each row
// costs the lane one word, one scale and one bias.
template <typename T, int D, int BITS, int GS>
struct QuantRows {
  Strided<uint32_t> w;
  Strided<T> s, z;
  int shift;  // the lane's first bit in its word
  __device__ QuantRows at(int b, int hk, int lane) const {
    const int bit = lane * (D / 32) * BITS, group = lane * (D / 32) / GS;
    return {w.at(b, hk, bit / 32), s.at(b, hk, group), z.at(b, hk, group), bit % 32};
  }
  __device__ void load(int i, float* out) const {
    const uint32_t word = *w.row(i) >> shift;
    const float a = static_cast<float>(*s.row(i)), c = static_cast<float>(*z.row(i));
#pragma unroll
    for (int e = 0; e < D / 32; ++e) out[e] = a * static_cast<float>((word >> (e * BITS)) & ((1u << BITS) - 1)) + c;
  }
};

//// dense
// Prelude of the dense variant: K, V (the whole buffer) and Kt, Vt (the text
// view) are arrays of T.
using Rows = DenseRows<T, D>;
const Rows K_all = {{K, K_strides[0], K_strides[1], K_strides[2]}};
const Rows V_all = {{V, V_strides[0], V_strides[1], V_strides[2]}};
const Rows K_text = {{Kt, Kt_strides[0], Kt_strides[1], Kt_strides[2]}};
const Rows V_text = {{Vt, Vt_strides[0], Vt_strides[1], Vt_strides[2]}};
const int n = Kt_shape[2];  // slots in the view

//// quantized
// Prelude of the quantized variant (QuantizedKSACache): each buffer and view
// comes as mx.quantize's packed words (w), scales (s) and biases (b).
using Rows = QuantRows<T, D, BITS, GS>;
const Rows K_all = {{Kw, Kw_strides[0], Kw_strides[1], Kw_strides[2]},
                    {Ks, Ks_strides[0], Ks_strides[1], Ks_strides[2]},
                    {Kb, Kb_strides[0], Kb_strides[1], Kb_strides[2]}, 0};
const Rows V_all = {{Vw, Vw_strides[0], Vw_strides[1], Vw_strides[2]},
                    {Vs, Vs_strides[0], Vs_strides[1], Vs_strides[2]},
                    {Vb, Vb_strides[0], Vb_strides[1], Vb_strides[2]}, 0};
const Rows K_text = {{Ktw, Ktw_strides[0], Ktw_strides[1], Ktw_strides[2]},
                     {Kts, Kts_strides[0], Kts_strides[1], Kts_strides[2]},
                     {Ktb, Ktb_strides[0], Ktb_strides[1], Ktb_strides[2]}, 0};
const Rows V_text = {{Vtw, Vtw_strides[0], Vtw_strides[1], Vtw_strides[2]},
                     {Vts, Vts_strides[0], Vts_strides[1], Vts_strides[2]},
                     {Vtb, Vtb_strides[0], Vtb_strides[1], Vtb_strides[2]}, 0};
const int n = Ktw_shape[2];  // slots in the view

//// partial
// Follows a variant's prelude (above), which defines Rows, the rows K_all,
// V_all (the whole buffer) and K_text, V_text (the view), and n.
// Templates: T (dtype), D (head dim), G (query heads per KV head), NW
// (simdgroups); the quantized variant adds BITS and GS (group size).
constexpr int E = D / 32;  // head-dim elements per lane
const int x = blockIdx.x;
const int hk = blockIdx.y;
const int b = blockIdx.z;
const int sg = threadIdx.x / 32;
const int lane = threadIdx.x % 32;
const int tid = threadIdx.x;
// This batch row's parameters (read by index: MLX puts small inputs in
// constant memory, larger ones in device memory). The end is clipped to the
// view: a single sequence passes INT32_MAX, so that its params never change.
const int start = params[b * 3], end = min(params[b * 3 + 1], n), sum_end = params[b * 3 + 2];
const int H = q_shape[1], R = q_shape[2];
// The splits come from the launch, for the same reason: one threadgroup per
// split, plus one for the summary rows when there are any.
const int n_splits = int(gridDim.x) - (R > 1);
const int split_len = (n + n_splits - 1) / n_splits;
const int P = n_splits + R - 1;  // partials per query head
const bool text = x < n_splits;
const float qscale = scale[0] * LOG2E;  // scores in log2 units: exp2 below

__shared__ float tg_o[NW * D];
__shared__ float tg_m[NW];
__shared__ float tg_l[NW];

for (int r = text ? 0 : 1; r < (text ? 1 : R); ++r) {
  // Key range of this row; keys in [skip_lo, skip_hi) are masked out.
  int lo = 0, hi = sum_end, skip_lo = r, skip_hi = R - 1, part = n_splits + r - 1;
  // Summary rows read the whole buffer, text rows the view (slot 0 = first).
  Rows kr = K_all.at(b, hk, lane), vr = V_all.at(b, hk, lane);
  if (text) {
    lo = start + x * split_len;
    hi = min(end, lo + split_len);
    skip_lo = skip_hi = 0;
    part = x;
    kr = K_text.at(b, hk, lane);
    vr = V_text.at(b, hk, lane);
  }
  float qv[G][E], o[G][E], m[G], l[G];
  #pragma unroll
  for (int g = 0; g < G; ++g) {
    const T* qp = q + b * q_strides[0] + (hk * G + g) * q_strides[1] + r * q_strides[2] + lane * E;
    #pragma unroll
    for (int e = 0; e < E; ++e) {
      qv[g][e] = static_cast<float>(qp[e]) * qscale;
      o[g][e] = 0.0f;
    }
    m[g] = NEG_BIG;
    l[g] = 0.0f;
  }
  // Each simdgroup takes U consecutive keys at a time and loads them all
  // before using any: U rows of K and V in flight per simdgroup, not one.
  for (int i0 = lo + sg * U; i0 < hi; i0 += NW * U) {
    float kv[U][E], vv[U][E];
    #pragma unroll
    for (int u = 0; u < U; ++u) {
      if (i0 + u < hi) {
        kr.load(i0 + u, kv[u]);
        vr.load(i0 + u, vv[u]);
      }
    }
    #pragma unroll
    for (int u = 0; u < U; ++u) {
      const int i = i0 + u;
      if (i >= hi || (i >= skip_lo && i < skip_hi)) continue;  // uniform over the simdgroup
      #pragma unroll
      for (int g = 0; g < G; ++g) {
        float s = 0.0f;
        #pragma unroll
        for (int e = 0; e < E; ++e) s += qv[g][e] * kv[u][e];
        s = warp_sum(s);
        const float m_new = fmaxf(m[g], s);
        const float a = exp2f(m[g] - m_new), p = exp2f(s - m_new);
        l[g] = l[g] * a + p;
        #pragma unroll
        for (int e = 0; e < E; ++e) o[g][e] = o[g][e] * a + p * vv[u][e];
        m[g] = m_new;
      }
    }
  }
  // Merge the NW simdgroups' partials, one query head at a time.
  #pragma unroll
  for (int g = 0; g < G; ++g) {
    if (lane == 0) {
      tg_m[sg] = m[g];
      tg_l[sg] = l[g];
    }
    #pragma unroll
    for (int e = 0; e < E; ++e) tg_o[sg * D + lane * E + e] = o[g][e];
    __syncthreads();
    if (tid < D) {
      float M = NEG_BIG;
      #pragma unroll
      for (int w = 0; w < NW; ++w) M = fmaxf(M, tg_m[w]);
      float L = 0.0f, acc = 0.0f;
      #pragma unroll
      for (int w = 0; w < NW; ++w) {
        const float f = exp2f(tg_m[w] - M);
        L += tg_l[w] * f;
        acc += tg_o[w * D + tid] * f;
      }
      const int64_t row = (int64_t(b) * H + hk * G + g) * P + part;
      part_o[row * D + tid] = acc;
      if (tid == 0) {
        part_ml[row * 2] = M;
        part_ml[row * 2 + 1] = L;
      }
    }
    __syncthreads();
  }
}

//// reduce
// Grid (D, R, B*H), threadgroup (D, 1, 1): one thread per output element.
const int d = threadIdx.x;
const int r = blockIdx.y;
const int bh = blockIdx.z;
const int R = int(gridDim.y);  // one threadgroup row per query row
const int P = part_ml_shape[2];
const int n_splits = P - R + 1;
const int p0 = r == 0 ? 0 : n_splits + r - 1;
const int p1 = r == 0 ? n_splits : p0 + 1;
const int64_t row = int64_t(bh) * P;
float M = NEG_BIG;
for (int p = p0; p < p1; ++p) M = fmaxf(M, part_ml[(row + p) * 2]);
float L = 0.0f, acc = 0.0f;
for (int p = p0; p < p1; ++p) {
  const float f = exp2f(part_ml[(row + p) * 2] - M);
  L += part_ml[(row + p) * 2 + 1] * f;
  acc += part_o[(row + p) * D + d] * f;
}
out[(int64_t(bh) * R + r) * D + d] = T(acc / L);
