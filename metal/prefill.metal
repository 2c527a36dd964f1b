// KSA prefill attention for mx.fast.metal_kernel: text and summary queries in
// one launch. Everything above the "kernel body" marker is the header,
// everything below it the body MLX wraps in a [[kernel]] function.
//
// Same inputs, outputs, grid and index math as cuda/prefill.cu (see there):
// x = query tiles (text tiles heaviest first, then summary tiles), y = query
// head, z = batch. Here a tile is 32 queries and 32 threads, one query per
// thread: a text tile streams its two key ranges (summary prefix, text band)
// through threadgroup memory in blocks of BK keys with an online softmax in
// float32; a summary tile reads its at most 2k keys straight from memory.
// Only threadgroup barriers are used (no simd collectives), and every thread
// of a tile takes the same path, so the barriers are uniform.

// visibility.band_start / summary_prefix.
inline int ksa_band_start(int t, int chunk, int window) {
  return max(t / chunk - window, 0) * chunk;
}
inline int ksa_summary_prefix(int t, int chunk, int summaries, int window) {
  return max(t / chunk - window, 0) * summaries;
}

// ==== kernel body ====
constexpr int BQ = 32;        // queries (and threads) per tile
constexpr int BK = 2048 / D;  // keys per block: 2 x BK x D elements of threadgroup memory
constexpr float LOG2E = 1.4426950408889634f;
constexpr float LN2 = 0.6931471805599453f;

const int n = params[0], n_sq = params[1], t0 = params[2], text_base = params[3];
const int window = params[4], Lt = params[5], Ls = params[6], text_tiles = params[7];
const int chunk = params[8], S = params[9], G = params[10], H = params[11];
const float sl2 = scale[0] * LOG2E;  // scores in the log2 domain

const int tile = int(threadgroup_position_in_grid.x);
const int h = int(threadgroup_position_in_grid.y), b = int(threadgroup_position_in_grid.z);
const int lid = int(thread_position_in_threadgroup.x);
const size_t kv_head = size_t(b) * (H / G) + h / G;
const device T* kt = k_text + kv_head * Lt * D;
const device T* vt = v_text + kv_head * Lt * D;
const device T* ks = k_sum + kv_head * Ls * D;
const device T* vs = v_sum + kv_head * Ls * D;

float q[D], acc[D];
float m = -INFINITY, l = 0.0f;

if (tile >= text_tiles) {
  // ---- summary query r: its chunk's summaries 0..j, then its k texts ----
  const int r = (tile - text_tiles) * BQ + lid;
  if (r >= n_sq) return;
  const int c = t0 / chunk + r / S, j = r % S;
  // k_sum may start after summary 0 (see attention.summary_base).
  const int sum_base = (t0 / chunk) * S + n_sq - Ls;
  const size_t qrow = (size_t(b) * H + h) * n_sq + r;
  for (int d = 0; d < D; ++d) {
    q[d] = float(q_sum[qrow * D + d]) * sl2;
    acc[d] = 0.0f;
  }
  for (int key = 0; key <= j + chunk; ++key) {
    const bool is_sum = key <= j;
    const size_t row = is_sum ? size_t(c) * S + key - sum_base : size_t(c) * chunk + (key - j - 1) - text_base;
    const device T* kp = (is_sum ? ks : kt) + row * D;
    const device T* vp = (is_sum ? vs : vt) + row * D;
    float s = 0.0f;
    for (int d = 0; d < D; ++d) s += q[d] * float(kp[d]);
    const float mn = max(m, s), alpha = exp2(m - mn), p = exp2(s - mn);
    l = l * alpha + p;
    for (int d = 0; d < D; ++d) acc[d] = acc[d] * alpha + p * float(vp[d]);
    m = mn;
  }
  for (int d = 0; d < D; ++d) o_sum[qrow * D + d] = T(acc[d] / l);
  lse_sum[qrow] = (m + log2(l)) * LN2;
  return;
}

// ---- text queries ----
threadgroup T sk[BK * D];
threadgroup T sv[BK * D];

const int qt = text_tiles - 1 - tile;  // heaviest tiles (most summaries) first
const int qa = qt * BQ;
const int t_first = t0 + qa, t_last = t0 + min(qa + BQ, n) - 1;
const int n_sum = ksa_summary_prefix(t_last, chunk, S, window);
const int lo = ksa_band_start(t_first, chunk, window), hi = t_last + 1;
const int n_sb = (n_sum + BK - 1) / BK, n_blocks = n_sb + (hi - lo + BK - 1) / BK;
const size_t qbase = (size_t(b) * H + h) * n;

// Rows past n run the loop on the last query (the barriers need every thread)
// and store nothing.
const int row = min(qa + lid, n - 1), t = t0 + row;
for (int d = 0; d < D; ++d) {
  q[d] = float(q_text[(qbase + row) * D + d]) * sl2;
  acc[d] = 0.0f;
}

for (int jb = 0; jb < n_blocks; ++jb) {
  // Key block jb: summary blocks first, then the text band.
  const bool is_sum = jb < n_sb;
  const int first = is_sum ? jb * BK : lo + (jb - n_sb) * BK;
  const int row0 = is_sum ? first : first - text_base;
  const int end = is_sum ? n_sum : hi - text_base;
  const device T* kp = is_sum ? ks : kt;
  const device T* vp = is_sum ? vs : vt;
  threadgroup_barrier(mem_flags::mem_threadgroup);  // the previous block is consumed
  for (int i = lid; i < BK * D; i += BQ) {
    const int r = row0 + i / D;
    const bool ok = r < end;
    sk[i] = ok ? kp[size_t(r) * D + i % D] : T(0);
    sv[i] = ok ? vp[size_t(r) * D + i % D] : T(0);
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);

  const int klo = is_sum ? 0 : ksa_band_start(t, chunk, window);
  const int khi = is_sum ? ksa_summary_prefix(t, chunk, S, window) : t + 1;
  float s[BK];
  float mx = -INFINITY;
  for (int kb = 0; kb < BK; ++kb) {
    const int key = first + kb;
    float x = -INFINITY;
    if (key >= klo && key < khi) {
      x = 0.0f;
      for (int d = 0; d < D; ++d) x += q[d] * float(sk[kb * D + d]);
    }
    s[kb] = x;
    mx = max(mx, x);
  }
  if (mx == -INFINITY) continue;  // nothing visible to this row in this block
  const float mn = max(m, mx), alpha = exp2(m - mn);
  l *= alpha;
  for (int d = 0; d < D; ++d) acc[d] *= alpha;
  for (int kb = 0; kb < BK; ++kb) {
    const float p = exp2(s[kb] - mn);
    l += p;
    for (int d = 0; d < D; ++d) acc[d] += p * float(sv[kb * D + d]);
  }
  m = mn;
}

if (qa + lid < n) {
  for (int d = 0; d < D; ++d) o_text[(qbase + row) * D + d] = T(acc[d] / l);
  lse_text[qbase + row] = (m + log2(l)) * LN2;
}
