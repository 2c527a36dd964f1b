// Backward of the KSA prefill attention (metal/prefill.metal) for
// mx.fast.metal_kernel. Everything above the "kernel body" marker is the
// header, everything below it the body MLX wraps in a [[kernel]] function.
//
// Same inputs, outputs, grid, helpers and structure as cuda/prefill_backward.cu
// (see there for the algorithm). Here a tile is 32 rows and 32 threads, one
// row per thread; the partner rows stream through threadgroup memory in
// blocks of BS rows. Only threadgroup barriers, reached by every thread of a
// tile (rows past the end run the loop on the last row and store nothing).

// The header follows metal/prefill.metal's, whose ksa_band_start and
// ksa_summary_prefix (visibility.band_start / summary_prefix) it uses.

// The launch parameters (params input, see mlx_ksa/kernels/prefill_backward.py).
struct KsaBwd {
  int n, n_sq, t0, text_base, window, Lt, Ls, chunk, S, G, H;
  int tiles[4];  // tiles of summary keys, text queries, text keys, summary queries
};
template <typename P>
inline KsaBwd ksa_read_params(P a) {
  return KsaBwd{a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], a[8], a[9], a[10],
                {a[11], a[12], a[13], a[14]}};
}

// Rows are named by stream index: a text index t, or a summary index c*S + j
// (the j-th summary of chunk c), for queries and keys alike.

// First text index whose window no longer holds chunk c: band_start(t) > c*chunk
// exactly when summary_prefix(t) > c*S, so text queries in [c*chunk,
// window_end(c)) see chunk c's text and later ones its summaries.
inline int ksa_window_end(int c, KsaBwd p) { return (c + p.window + 1) * p.chunk; }

// Stream index range [lo, hi).
struct KsaRange {
  int lo, hi;
};

// The partners of rows [r0, r1] of one kind (sum): for query rows (kv false)
// the keys they may see, for key rows (kv true) the queries that may see them;
// other_sum picks the summary or the text partners. For one row (r0 = r1) the
// range is exactly the visible partners of that kind (visibility.visible);
// for a tile, the union of its rows' ranges.
inline KsaRange ksa_partners(bool kv, bool sum, int r0, int r1, bool other_sum, KsaBwd p) {
  const int k = p.chunk, S = p.S;
  // Chunks whose summaries are queries (S = 0: the no-summary baseline).
  const int c0 = p.t0 / k, c1 = c0 + p.n_sq / max(S, 1);
  if (!kv && !sum)
    return other_sum ? KsaRange{0, ksa_summary_prefix(r1, k, S, p.window)}
                     : KsaRange{ksa_band_start(r0, k, p.window), r1 + 1};
  if (!kv)  // summary queries: their chunks' summaries (causal) and text
    return other_sum ? KsaRange{r0 / S * S, r1 + 1} : KsaRange{r0 / S * k, (r1 / S + 1) * k};
  if (!sum)
    return other_sum ? KsaRange{max(c0, r0 / k) * S, min(c1, r1 / k + 1) * S}
                     : KsaRange{max(p.t0, r0), min(p.t0 + p.n, ksa_window_end(r1 / k, p))};
  return other_sum ? KsaRange{max(c0 * S, r0), min(c1, r1 / S + 1) * S}
                   : KsaRange{max(p.t0, ksa_window_end(r0 / S, p)), p.t0 + p.n};
}

// Stream index of array row 0 and row count of queries (kv false) or keys.
inline int ksa_row0(bool kv, bool sum, KsaBwd p) {
  return kv ? (sum ? 0 : p.text_base) : (sum ? p.t0 / p.chunk * p.S : p.t0);
}
inline int ksa_rows(bool kv, bool sum, KsaBwd p) {
  return kv ? (sum ? p.Ls : p.Lt) : (sum ? p.n_sq : p.n);
}

// Tile x of the grid: its role (dK/dV of key rows, or dQ of query rows), row
// kind and first array row. Heaviest tiles first: the summary keys (the
// earliest are seen by almost every later text query), then the text
// queries latest first (most summaries).
struct KsaTile {
  bool kv, sum;
  int first;
};
inline KsaTile ksa_tile(int x, int rows_per_tile, KsaBwd p) {
  if (x < p.tiles[0]) return KsaTile{true, true, x * rows_per_tile};
  x -= p.tiles[0];
  if (x < p.tiles[1]) return KsaTile{false, false, (p.tiles[1] - 1 - x) * rows_per_tile};
  x -= p.tiles[1];
  if (x < p.tiles[2]) return KsaTile{true, false, x * rows_per_tile};
  return KsaTile{false, true, (x - p.tiles[2]) * rows_per_tile};
}

// ==== kernel body ====
constexpr int BR = 32;        // rows (and threads) per tile
constexpr int BS = 2048 / D;  // partner rows per block: 2 x BS x D elements of threadgroup memory
constexpr float LOG2E = 1.4426950408889634f;

const KsaBwd p = ksa_read_params(params);
const float sl2 = scale[0] * LOG2E;  // scores in the log2 domain
const KsaTile tile = ksa_tile(int(threadgroup_position_in_grid.x), BR, p);
const int h = int(threadgroup_position_in_grid.y), b = int(threadgroup_position_in_grid.z);
const int lid = int(thread_position_in_threadgroup.x);
const int Hkv = p.H / p.G;
const bool kv = tile.kv, rsum = tile.sum;
if (kv && h >= Hkv) return;  // key tiles use the grid's first Hkv heads

// This thread's row: queries (q, dO, lse, Delta of head h) or keys (k, v of kv head h).
const int rows = ksa_rows(kv, rsum, p), row = min(tile.first + lid, rows - 1);
const int base = ksa_row0(kv, rsum, p);
const int r0 = base + tile.first, r1 = base + min(tile.first + BR, rows) - 1, ri = base + row;
const size_t roff = (size_t(b) * (kv ? Hkv : p.H) + h) * rows + row;
const device T* A0 = kv ? (rsum ? k_sum : k_text) : (rsum ? q_sum : q_text);
const device T* A1 = kv ? (rsum ? v_sum : v_text) : (rsum ? do_sum : do_text);
float a0[D], a1[D], acc0[D], acc1[D];  // acc0: dQ or dK, acc1: dV
for (int d = 0; d < D; ++d) {
  a0[d] = float(A0[roff * D + d]);
  a1[d] = float(A1[roff * D + d]);
  acc0[d] = acc1[d] = 0.0f;
}
const float row_lse2 = kv ? 0.0f : (rsum ? lse_sum : lse_text)[roff] * LOG2E;
const float row_delta = kv ? 0.0f : (rsum ? delta_sum : delta_text)[roff];

threadgroup T sb0[BS * D];  // partner keys (dQ) or queries (dK/dV)
threadgroup T sb1[BS * D];  // partner values (dQ) or dO (dK/dV)

// Key rows sum over the G query heads that share them.
for (int g = 0; g < (kv ? p.G : 1); ++g) {
  const int hp = kv ? h * p.G + g : h / p.G;  // the partners' head
  for (int pass = 0; pass < 2; ++pass) {
    const bool osum = pass == 0;
    const KsaRange range = ksa_partners(kv, rsum, r0, r1, osum, p);  // the tile's
    const KsaRange vis = ksa_partners(kv, rsum, ri, ri, osum, p);     // this row's
    const int obase = ksa_row0(!kv, osum, p);
    const size_t ohead = (size_t(b) * (kv ? p.H : Hkv) + hp) * ksa_rows(!kv, osum, p);
    const device T* B0 = kv ? (osum ? q_sum : q_text) : (osum ? k_sum : k_text);
    const device T* B1 = kv ? (osum ? do_sum : do_text) : (osum ? v_sum : v_text);
    const device float* olse = osum ? lse_sum : lse_text;
    const device float* odelta = osum ? delta_sum : delta_text;
    for (int s0 = range.lo; s0 < range.hi; s0 += BS) {
      threadgroup_barrier(mem_flags::mem_threadgroup);  // the previous block is consumed
      for (int i = lid; i < BS * D; i += BR) {
        const int s = s0 + i / D;
        const bool ok = s < range.hi;
        sb0[i] = ok ? B0[(ohead + s - obase) * D + i % D] : T(0);
        sb1[i] = ok ? B1[(ohead + s - obase) * D + i % D] : T(0);
      }
      threadgroup_barrier(mem_flags::mem_threadgroup);

      for (int s = max(s0, vis.lo); s < min(s0 + BS, vis.hi); ++s) {
        const int c = s - s0;
        float x = 0.0f, dp = 0.0f;
        for (int d = 0; d < D; ++d) {
          x += a0[d] * float(sb0[c * D + d]);
          dp += a1[d] * float(sb1[c * D + d]);
        }
        // FlashAttention-2: P from the saved lse, dS = P * (dP - Delta).
        const float lse2 = kv ? olse[ohead + s - obase] * LOG2E : row_lse2;
        const float delta = kv ? odelta[ohead + s - obase] : row_delta;
        const float prob = exp2(x * sl2 - lse2), ds = prob * (dp - delta);
        for (int d = 0; d < D; ++d) acc0[d] += ds * float(sb0[c * D + d]);
        if (kv)
          for (int d = 0; d < D; ++d) acc1[d] += prob * float(sb1[c * D + d]);
      }
    }
  }
}

if (tile.first + lid < rows) {
  const float sc = scale[0];
  device T* out0 = kv ? (rsum ? dk_sum : dk_text) : (rsum ? dq_sum : dq_text);
  for (int d = 0; d < D; ++d) out0[roff * D + d] = T(acc0[d] * sc);
  if (kv) {
    device T* out1 = rsum ? dv_sum : dv_text;
    for (int d = 0; d < D; ++d) out1[roff * D + d] = T(acc1[d]);
  }
}
