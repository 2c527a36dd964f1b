// KSA decode attention, Metal. cuda/decode.cu is the same algorithm with the
// same index math; only the primitives differ (thread ids, barriers, simd sums).
// mlx_ksa/kernels/decode.py cuts this file at the "////" lines into the
// header and the bodies that mx.fast.metal_kernel takes.
//
// One step reads KSACache's buffer [B, Hkv, slots, D] in place (strides for
// batch, head and slot; the head dim is contiguous). Query rows: row 0 is the
// text query over slots [start, end); rows 1..S, present when the step
// completes a chunk, are its summary queries over [scratch S | chunk k] =
// slots [0, S + k), where summary j sees scratch slots 0..j
// (visibility.summary_mask).
//
// Inputs: q, K and V (the whole buffer, read by the summary rows), Kt and Vt
// (the text keys: the view buffer[:, :, first:last], first the rows'
// smallest start, last their largest end), params, scale. The text range
// travels as a view, not as numbers: numbers change every step, and an array
// of them made on the host and copied over costs more than the reduce pass,
// while a view is free (MLX hands the kernel the view's own pointer and
// strides).
//
// Two variants share the partial body: "dense" (KSACache: K/V arrays of T)
// and "quantized" (QuantizedKSACache: each of K, V, Kt, Vt as mx.quantize's
// three parts, dequantized as loaded). The wrapper puts the variant's
// prelude section before the partial body; the prelude names the inputs and
// picks the row loader (DenseRows or QuantRows), the body only calls it.
//
// Batch rows may sit at different chunk phases (BatchKSACache): each row has
// its own [start, end) within the view. The launch cuts the view's n keys
// into n_splits splits of split_len = ceil(n / n_splits) keys, counted from
// each row's start; a row's splits past its own end are empty and merge with
// weight 0 (split 0 always holds the text token's own key).
//
// Flash decoding: pass 1 ("partial") cuts the text range into splits; one
// threadgroup per (split, KV head, batch row) covers the G = H / Hkv query
// heads of that KV head, so K/V are read once per KV head. One extra
// threadgroup per (KV head, batch row) does the summary rows. Each writes an
// unnormalized output with its running max and sum; pass 2 ("reduce") merges
// the text splits and normalizes every row.
//
// params: [B, 3], one row per batch row: [start - first, end - first,
// S + k]. A single sequence's view is exactly its range, so its row is
// [0, INT32_MAX, S + k], clipped to the view in the kernel: the same every
// step, made once. n_splits is the launch's grid, not a parameter, for the
// same reason.

//// header
// Finite stand-in for -inf: empty simdgroups merge with weight exp2(-huge) = 0
// and no inf - inf can appear, even under fast math.
constant float NEG_BIG = -3.0e38f;
constant float LOG2E = 1.4426950408889634f;
constant constexpr int U = 4;  // V rows a simdgroup loads at once
constant constexpr int C = 8;  // elements of its key's K row a lane loads at once

// N consecutive elements of a K/V row, as float.
template <typename T, int N>
inline void load_row(const device T* p, thread float* out) {
  for (int e = 0; e < N; ++e) out[e] = float(p[e]);
}

// An array laid out [B, Hkv, slots, *] (the head dim, or its packed words,
// scales or biases, contiguous): at() moves to a batch row and KV head,
// row(i) is slot i there.
template <typename P>
struct Strided {
  const device P* p;
  int64_t batch, head, slot;
  Strided at(int b, int hk) const { return {p + b * batch + hk * head, batch, head, slot}; }
  const device P* row(int i) const { return p + i * slot; }
};

// The two ways K/V rows are stored; the partial body reads them through
// Rows (chosen by the variant's prelude): at(b, hk) is the rows of a batch
// row and KV head; load(i, d0, out) gives elements d0.. of slot i as float,
// E = D / 32 of them (a lane's share of a V row), load_chunk(i, d0, out) C
// of them (a piece of the K row of the lane's own key). d0 is a multiple of
// the count.
// Dense: one array of T.
template <typename T, int D>
struct DenseRows {
  Strided<T> x;
  DenseRows at(int b, int hk) const { return {x.at(b, hk)}; }
  void load(int i, int d0, thread float* out) const { load_row<T, D / 32>(x.row(i) + d0, out); }
  void load_chunk(int i, int d0, thread float* out) const { load_row<T, C>(x.row(i) + d0, out); }
};

// mx.quantize (affine): element j of a row is the BITS-bit field at bit
// (j * BITS) % 32 of word j * BITS / 32, worth scale * field + bias, with one
// scale and bias per GS elements. N elements from a multiple of N (N <= GS,
// both powers of two) lie in one group, and their N * BITS bits, at a
// multiple of N * BITS, either lie in one word (N * BITS <= 32) or fill
// whole words from the first one's bit 0.
template <typename T, int D, int BITS, int GS>
struct QuantRows {
  Strided<uint32_t> w;
  Strided<T> s, z;
  QuantRows at(int b, int hk) const { return {w.at(b, hk), s.at(b, hk), z.at(b, hk)}; }
  template <int N>
  void get(int i, int d0, thread float* out) const {
    constexpr int PER = N * BITS < 32 ? N : 32 / BITS;  // elements taken per word
    const device uint32_t* p = w.row(i) + d0 * BITS / 32;
    const int shift = d0 * BITS % 32;
    const float a = float(s.row(i)[d0 / GS]), c = float(z.row(i)[d0 / GS]);
    for (int k = 0; k < N / PER; ++k) {
      const uint32_t word = p[k] >> shift;
      for (int e = 0; e < PER; ++e) out[k * PER + e] = a * float((word >> (e * BITS)) & ((1u << BITS) - 1)) + c;
    }
  }
  void load(int i, int d0, thread float* out) const { get<D / 32>(i, d0, out); }
  void load_chunk(int i, int d0, thread float* out) const { get<C>(i, d0, out); }
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
                    {Kb, Kb_strides[0], Kb_strides[1], Kb_strides[2]}};
const Rows V_all = {{Vw, Vw_strides[0], Vw_strides[1], Vw_strides[2]},
                    {Vs, Vs_strides[0], Vs_strides[1], Vs_strides[2]},
                    {Vb, Vb_strides[0], Vb_strides[1], Vb_strides[2]}};
const Rows K_text = {{Ktw, Ktw_strides[0], Ktw_strides[1], Ktw_strides[2]},
                     {Kts, Kts_strides[0], Kts_strides[1], Kts_strides[2]},
                     {Ktb, Ktb_strides[0], Ktb_strides[1], Ktb_strides[2]}};
const Rows V_text = {{Vtw, Vtw_strides[0], Vtw_strides[1], Vtw_strides[2]},
                     {Vts, Vts_strides[0], Vts_strides[1], Vts_strides[2]},
                     {Vtb, Vtb_strides[0], Vtb_strides[1], Vtb_strides[2]}};
const int n = Ktw_shape[2];  // slots in the view

//// partial
// Follows a variant's prelude (above), which defines Rows, the rows K_all,
// V_all (the whole buffer) and K_text, V_text (the view), and n.
// Templates: T (dtype), D (head dim), G (query heads per KV head), NW
// (simdgroups); the quantized variant adds BITS and GS (group size).
constexpr int E = D / 32;  // head-dim elements per lane
const int x = threadgroup_position_in_grid.x;
const int hk = threadgroup_position_in_grid.y;
const int b = threadgroup_position_in_grid.z;
const int sg = simdgroup_index_in_threadgroup;
const int lane = thread_index_in_simdgroup;
const int tid = thread_position_in_threadgroup.x;
// This batch row's parameters (read by index: MLX puts small inputs in
// constant memory, larger ones in device memory). The end is clipped to the
// view: a single sequence passes INT32_MAX, so that its params never change.
const int start = params[b * 3], end = min(params[b * 3 + 1], n), sum_end = params[b * 3 + 2];
const int H = q_shape[1], R = q_shape[2];
// The splits come from the launch, for the same reason: one threadgroup per
// split, plus one for the summary rows when there are any.
const int n_splits = int(threadgroups_per_grid.x) - (R > 1);
const int split_len = (n + n_splits - 1) / n_splits;
const int P = n_splits + R - 1;  // partials per query head
const bool text = x < n_splits;
const float qscale = scale[0] * LOG2E;  // scores in log2 units: exp2 below

threadgroup float4 tg_q[G * D / 4];
threadgroup float tg_o[NW * D];
threadgroup float tg_m[NW];
threadgroup float tg_l[NW];

for (int r = text ? 0 : 1; r < (text ? 1 : R); ++r) {
  // Key range of this row; keys in [skip_lo, skip_hi) are masked out.
  int lo = 0, hi = sum_end, skip_lo = r, skip_hi = R - 1, part = n_splits + r - 1;
  // Summary rows read the whole buffer, text rows the view (slot 0 = first).
  Rows kr = K_all.at(b, hk), vr = V_all.at(b, hk);
  if (text) {
    lo = start + x * split_len;
    hi = min(end, lo + split_len);
    skip_lo = skip_hi = 0;
    part = x;
    kr = K_text.at(b, hk);
    vr = V_text.at(b, hk);
  }
  // The G query rows, scaled, where every lane reads them: a lane's dot
  // products take each q element as a broadcast. Rewriting them for the next
  // summary row is safe: the last row's readers are past the merge's barriers.
  for (int t = tid; t < G * D / 4; t += NW * 32) {
    const device T* qp = q + b * q_strides[0] + (hk * G + t * 4 / D) * q_strides[1] + r * q_strides[2] + t * 4 % D;
    tg_q[t] = float4(qscale * float(qp[0]), qscale * float(qp[1]), qscale * float(qp[2]), qscale * float(qp[3]));
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  // m is the simdgroup's running max (the same in every lane); o and l are
  // the lane's: o its E output elements, l the sum of its own keys' weights
  // (summed over the simdgroup at the merge).
  float o[G][E], m[G], l[G];
  for (int g = 0; g < G; ++g) {
    for (int e = 0; e < E; ++e) o[g][e] = 0.0f;
    m[g] = NEG_BIG;
    l[g] = 0.0f;
  }
  // Each simdgroup takes 32 consecutive keys at a time, one per lane: a
  // lane computes its key's G scores alone (no reduction per key), the
  // simdgroup rescales once per 32 keys, then every lane takes each key's
  // weights by a shuffle and its E elements of that key's V row.
  for (int i0 = lo + sg * 32; i0 < hi; i0 += NW * 32) {
    const int i = i0 + lane;
    const bool live = i < hi && (i < skip_lo || i >= skip_hi);
    float p[G];
    for (int g = 0; g < G; ++g) p[g] = 0.0f;
    if (live) {
      for (int d0 = 0; d0 < D; d0 += C) {
        float kc[C];
        kr.load_chunk(i, d0, kc);
        for (int g = 0; g < G; ++g)
          for (int c = 0; c < C; c += 4) {
            const float4 qc = tg_q[(g * D + d0 + c) / 4];
            p[g] = p[g] + qc.x * kc[c] + qc.y * kc[c + 1] + qc.z * kc[c + 2] + qc.w * kc[c + 3];
          }
      }
    }
    for (int g = 0; g < G; ++g) {
      const float m_new = max(m[g], simd_max(live ? p[g] : NEG_BIG));
      const float a = exp2(m[g] - m_new);
      // Masked lanes weigh 0, even where every key so far is masked (m_new = NEG_BIG).
      p[g] = live ? exp2(p[g] - m_new) : 0.0f;
      l[g] = l[g] * a + p[g];
      for (int e = 0; e < E; ++e) o[g][e] *= a;
      m[g] = m_new;
    }
    // Masked keys inside the range weigh 0 but their V rows are read, so that
    // the loop stays uniform over the simdgroup; U rows in flight, not one.
    const int keys = min(32, hi - i0);
    for (int j0 = 0; j0 < keys; j0 += U) {
      float vv[U][E];
      for (int u = 0; u < U; ++u)
        if (j0 + u < keys) vr.load(i0 + j0 + u, lane * E, vv[u]);
      for (int u = 0; u < U; ++u) {
        if (j0 + u >= keys) continue;  // uniform over the simdgroup
        for (int g = 0; g < G; ++g) {
          const float pj = simd_shuffle(p[g], ushort(j0 + u));
          for (int e = 0; e < E; ++e) o[g][e] += pj * vv[u][e];
        }
      }
    }
  }
  // Merge the NW simdgroups' partials, one query head at a time.
  for (int g = 0; g < G; ++g) {
    const float lsum = simd_sum(l[g]);
    if (lane == 0) {
      tg_m[sg] = m[g];
      tg_l[sg] = lsum;
    }
    for (int e = 0; e < E; ++e) tg_o[sg * D + lane * E + e] = o[g][e];
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (tid < D) {
      float M = NEG_BIG;
      for (int w = 0; w < NW; ++w) M = max(M, tg_m[w]);
      float L = 0.0f, acc = 0.0f;
      for (int w = 0; w < NW; ++w) {
        const float f = exp2(tg_m[w] - M);
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
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
}

//// reduce
// Grid (D, R, B*H), threadgroup (D, 1, 1): one thread per output element.
const int d = thread_position_in_threadgroup.x;
const int r = threadgroup_position_in_grid.y;
const int bh = threadgroup_position_in_grid.z;
const int R = int(threadgroups_per_grid.y);  // one threadgroup row per query row
const int P = part_ml_shape[2];
const int n_splits = P - R + 1;
const int p0 = r == 0 ? 0 : n_splits + r - 1;
const int p1 = r == 0 ? n_splits : p0 + 1;
const int64_t row = int64_t(bh) * P;
float M = NEG_BIG;
for (int p = p0; p < p1; ++p) M = max(M, part_ml[(row + p) * 2]);
float L = 0.0f, acc = 0.0f;
for (int p = p0; p < p1; ++p) {
  const float f = exp2(part_ml[(row + p) * 2] - M);
  L += part_ml[(row + p) * 2 + 1] * f;
  acc += part_o[(row + p) * D + d] * f;
}
out[(int64_t(bh) * R + r) * D + d] = T(acc / L);
