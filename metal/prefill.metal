// KSA prefill attention for mx.fast.metal_kernel: text and summary queries in
// one launch. Everything above the "kernel body" marker is the header,
// everything below it the body MLX wraps in a [[kernel]] function.
//
// Same inputs, outputs, grid and index math as cuda/prefill.cu (see there):
// x = query tiles (text tiles heaviest first, then summary tiles), y = query
// head, z = batch; 128 threads (4 simdgroups) per tile.
// Text tile: 32 queries, 8 rows per simdgroup, over the two key ranges
// (summary prefix, text band) in blocks of BK keys staged in threadgroup
// memory, with 8x8 simdgroup matrices in float32 (S = Q K^T, O += P V, as
// MLX's steel attention) and the CUDA kernel's online softmax: running
// maxima of raw scores, one fma + exp2 per entry, o rescaled only when a
// row's max grows by more than 2^RESCALE. Only blocks that straddle a row's
// range boundary pay for the per-element mask.
// Summary tile: 32 summary queries, one simdgroup per query (lanes split D),
// over its chunk's summaries 0..j and k text keys (at most 2k keys).
// "Minus infinity" is the finite NEG_BIG, as in metal/decode.metal: exp2 of
// it underflows to 0 and no inf - inf can appear, whatever the math mode.

// visibility.band_start / summary_prefix.
inline int ksa_band_start(int t, int chunk, int window) {
  return max(t / chunk - window, 0) * chunk;
}
inline int ksa_summary_prefix(int t, int chunk, int summaries, int window) {
  return max(t / chunk - window, 0) * summaries;
}

constant float KSA_NEG_BIG = -3.0e38f;

// The two elements of an 8x8 simdgroup matrix a lane holds: row fm, columns
// fn and fn + 1 (the layout MLX's steel kernels use). The 4 lanes of a row
// differ in lane bits 0 and 3.
inline void ksa_frag_coord(int lane, thread int& fm, thread int& fn) {
  const int qid = lane / 4;
  fm = (qid & 4) + ((lane / 2) % 4);
  fn = (qid & 2) * 2 + (lane % 2) * 2;
}
inline void ksa_frag_set(thread simdgroup_float8x8& f, float a, float b) {
  f.thread_elements()[0] = a;
  f.thread_elements()[1] = b;
}

// ==== kernel body ====
constexpr int BQ = 32;        // queries per tile: 4 simdgroups x 8 rows
constexpr int NT = 128;
constexpr int BK = 2048 / D;  // keys per block: 2 x BK x D elements (+ padding) of threadgroup memory
constexpr int DF = D / 8, KF = BK / 8;  // 8x8 fragments along D and along a key block
constexpr float LOG2E = 1.4426950408889634f;
constexpr float LN2 = 0.6931471805599453f;
constexpr float RESCALE = 8.0f;  // log2 of the largest unnormalised probability

const int n = params[0], n_sq = params[1], t0 = params[2], text_base = params[3];
const int window = params[4], Lt = params[5], Ls = params[6], text_tiles = params[7];
const int chunk = params[8], S = params[9], G = params[10], H = params[11];
const float sl2 = scale[0] * LOG2E;  // scores in the log2 domain

const int tile = int(threadgroup_position_in_grid.x);
const int h = int(threadgroup_position_in_grid.y), b = int(threadgroup_position_in_grid.z);
const int lid = int(thread_position_in_threadgroup.x);
const int sg = int(simdgroup_index_in_threadgroup), lane = int(thread_index_in_simdgroup);
const size_t kv_head = size_t(b) * (H / G) + h / G;
const device T* kt = k_text + kv_head * Lt * D;
const device T* vt = v_text + kv_head * Lt * D;
const device T* ks = k_sum + kv_head * Ls * D;
const device T* vs = v_sum + kv_head * Ls * D;

if (tile >= text_tiles) {
  // ---- summary queries: one simdgroup per query, lanes split D ----
  constexpr int E = D / 32;
  const int c0 = t0 / chunk;
  const int sum_base = c0 * S + n_sq - Ls;  // k_sum may start after summary 0 (attention.summary_base)
  for (int i = 0; i < BQ / 4; ++i) {
    const int r = (tile - text_tiles) * BQ + sg * (BQ / 4) + i;
    if (r >= n_sq) break;  // the same in every lane; no barrier follows
    const int c = c0 + r / S, j = r % S;
    const size_t qrow = (size_t(b) * H + h) * n_sq + r;
    float q[E], acc[E];
    for (int e = 0; e < E; ++e) {
      q[e] = float(q_sum[qrow * D + lane * E + e]) * sl2;
      acc[e] = 0.0f;
    }
    float m = KSA_NEG_BIG, l = 0.0f;
    // Keys: summaries c*S .. c*S+j, then texts c*k .. c*k+k-1.
    for (int key = 0; key <= j + chunk; ++key) {
      const bool is_sum = key <= j;
      const size_t row = is_sum ? size_t(c) * S + key - sum_base : size_t(c) * chunk + (key - j - 1) - text_base;
      const device T* kp = (is_sum ? ks : kt) + row * D + lane * E;
      const device T* vp = (is_sum ? vs : vt) + row * D + lane * E;
      float x = 0.0f;
      for (int e = 0; e < E; ++e) x += q[e] * float(kp[e]);
      x = simd_sum(x);
      const float mn = max(m, x), alpha = exp2(m - mn), p = exp2(x - mn);
      l = l * alpha + p;
      for (int e = 0; e < E; ++e) acc[e] = acc[e] * alpha + p * float(vp[e]);
      m = mn;
    }
    for (int e = 0; e < E; ++e) o_sum[qrow * D + lane * E + e] = T(acc[e] / l);
    if (lane == 0) lse_sum[qrow] = (m + log2(l)) * LN2;
  }
  return;
}

// ---- text queries ----
// Rows padded by 16 bytes, as MLX's steel attention does: the 8 rows of a
// fragment then start in different banks.
constexpr int PAD = 16 / sizeof(T), LK = BK + PAD, LV = D + PAD;
threadgroup T skt[D * LK];  // the key block transposed, [D][BK]: K^T fragments read row pairs
threadgroup T sv[BK * LV];

const int qt = text_tiles - 1 - tile;  // heaviest tiles (most summaries) first
const int qa = qt * BQ;
const int t_first = t0 + qa, t_last = t0 + min(qa + BQ, n) - 1;
const int n_sum = ksa_summary_prefix(t_last, chunk, S, window);
const int lo = ksa_band_start(t_first, chunk, window), hi = t_last + 1;
const int n_sb = (n_sum + BK - 1) / BK, n_blocks = n_sb + (hi - lo + BK - 1) / BK;
const size_t qbase = (size_t(b) * H + h) * n;
// Summary blocks ending by sum_full and text blocks in [band_full, t_first]
// are visible to every row of the tile: no mask.
const int sum_full = ksa_summary_prefix(t_first, chunk, S, window);
const int band_full = ksa_band_start(t_last, chunk, window);

// This lane's row (fm of its simdgroup's 8) and columns (fn, fn + 1). Rows
// past n run on the last query (the barriers and matrices need every lane)
// and store nothing.
int fm, fn;
ksa_frag_coord(lane, fm, fn);
const int row = qa + sg * 8 + fm, t = t0 + min(row, n - 1);
const int row_lo = ksa_band_start(t, chunk, window), row_sum = ksa_summary_prefix(t, chunk, S, window);

simdgroup_float8x8 qf[DF], of[DF];
{
  const device T* qp = q_text + (qbase + (t - t0)) * D + fn;
  for (int d = 0; d < DF; ++d) {
    ksa_frag_set(qf[d], float(qp[d * 8]), float(qp[d * 8 + 1]));
    of[d] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
  }
}
float m = KSA_NEG_BIG, l = 0.0f;  // running max of raw scores; this lane's partial sum

for (int jb = 0; jb < n_blocks; ++jb) {
  // Key block jb: summary blocks first, then the text band.
  const bool is_sum = jb < n_sb;
  const int first = is_sum ? jb * BK : lo + (jb - n_sb) * BK;
  const int row0 = is_sum ? first : first - text_base;
  const int end = is_sum ? n_sum : hi - text_base;
  const device T* kp = is_sum ? ks : kt;
  const device T* vp = is_sum ? vs : vt;
  threadgroup_barrier(mem_flags::mem_threadgroup);  // the previous block is consumed
  for (int i = lid; i < BK * D; i += NT) {
    const int r = i / D, d = i % D;
    const bool ok = row0 + r < end;
    skt[d * LK + r] = ok ? kp[size_t(row0 + r) * D + d] : T(0);
    sv[r * LV + d] = ok ? vp[size_t(row0 + r) * D + d] : T(0);
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);

  // S (8 x BK) = Q K^T: fragment (i, j) of K^T is K[key j][dim i].
  simdgroup_float8x8 sf[KF];
  for (int kn = 0; kn < KF; ++kn) sf[kn] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
  for (int d = 0; d < DF; ++d) {
    for (int kn = 0; kn < KF; ++kn) {
      simdgroup_float8x8 kf;
      const threadgroup T* kp2 = skt + (d * 8 + fm) * LK + kn * 8 + fn;
      ksa_frag_set(kf, float(kp2[0]), float(kp2[1]));
      simdgroup_multiply_accumulate(sf[kn], qf[d], kf, sf[kn]);
    }
  }

  // Online softmax over this lane's 2 * KF entries of its row.
  const bool full = is_sum ? first + BK <= sum_full : first >= band_full && first + BK - 1 <= t_first;
  float x[2 * KF];
  for (int kn = 0; kn < KF; ++kn) {
    x[2 * kn] = sf[kn].thread_elements()[0];
    x[2 * kn + 1] = sf[kn].thread_elements()[1];
  }
  if (!full) {
    const int klo = is_sum ? 0 : row_lo, khi = is_sum ? row_sum : t + 1;
    for (int i = 0; i < 2 * KF; ++i) {
      const int key = first + (i / 2) * 8 + fn + i % 2;
      if (key < klo || key >= khi) x[i] = KSA_NEG_BIG;
    }
  }
  float mx = KSA_NEG_BIG;
  for (int i = 0; i < 2 * KF; ++i) mx = max(mx, x[i]);
  mx = max(mx, simd_shuffle_xor(mx, ushort(1)));
  mx = max(mx, simd_shuffle_xor(mx, ushort(8)));
  // The reference max moves only when a score beats it by more than RESCALE
  // (log2 domain); the first visible score always moves it off NEG_BIG.
  const bool raise = (mx - m) * sl2 > RESCALE;
  const float mn = raise ? mx : m;
  const float base = mn == KSA_NEG_BIG ? 0.0f : mn * sl2;  // nothing visible yet: every p is 0
  const float alpha = raise ? exp2(m * sl2 - base) : 1.0f;
  float sum = 0.0f;
  for (int i = 0; i < 2 * KF; ++i) {
    x[i] = exp2(fma(x[i], sl2, -base));
    sum += x[i];
  }
  l = l * alpha + sum;
  m = mn;
  if (simd_any(raise)) {
    for (int d = 0; d < DF; ++d) {
      of[d].thread_elements()[0] *= alpha;
      of[d].thread_elements()[1] *= alpha;
    }
  }
  for (int kn = 0; kn < KF; ++kn) ksa_frag_set(sf[kn], x[2 * kn], x[2 * kn + 1]);

  // O (8 x D) += P V: fragment (i, j) of V is V[key i][dim j].
  for (int kn = 0; kn < KF; ++kn) {
    for (int d = 0; d < DF; ++d) {
      simdgroup_float8x8 vf;
      const threadgroup T* vp2 = sv + (kn * 8 + fm) * LV + d * 8 + fn;
      ksa_frag_set(vf, float(vp2[0]), float(vp2[1]));
      simdgroup_multiply_accumulate(of[d], sf[kn], vf, of[d]);
    }
  }
}

l += simd_shuffle_xor(l, ushort(1));
l += simd_shuffle_xor(l, ushort(8));
if (row < n) {
  const float inv = 1.0f / l;
  device T* op = o_text + (qbase + row) * D + fn;
  for (int d = 0; d < DF; ++d) {
    op[d * 8] = T(of[d].thread_elements()[0] * inv);
    op[d * 8 + 1] = T(of[d].thread_elements()[1] * inv);
  }
  if (fn == 0) lse_text[qbase + row] = (m * sl2 + log2(l)) * LN2;
}
