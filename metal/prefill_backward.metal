// Backward of the KSA prefill attention (metal/prefill.metal) for
// mx.fast.metal_kernel. Everything above the "kernel body" marker is the
// header, everything below it the body MLX wraps in a [[kernel]] function.
//
// Same inputs, outputs, grid, helpers and structure as cuda/prefill_backward.cu
// (see there for the algorithm). Here a tile is 32 rows, 8 per simdgroup of
// 4; the partner rows stream through threadgroup memory in blocks of BS rows
// and every product is an 8x8 simdgroup matrix multiply in float32, as in the
// forward. Only threadgroup barriers, reached by every thread of a tile (rows
// past the end run the loop on the last row and store nothing).

// The header follows metal/prefill.metal's, whose ksa_band_start and
// ksa_summary_prefix (visibility.band_start / summary_prefix) and fragment
// helpers it uses.

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
constexpr int BR = 32;        // rows per tile: 4 simdgroups x 8
constexpr int NT = 128;
constexpr int BS = 2048 / D;  // partner rows per block: 2 x BS x D elements (+ padding) of threadgroup memory
constexpr int DF = D / 8, KF = BS / 8;  // 8x8 fragments along D and along a partner block
constexpr float LOG2E = 1.4426950408889634f;

const KsaBwd p = ksa_read_params(params);
const float sl2 = scale[0] * LOG2E;  // scores in the log2 domain
const KsaTile tile = ksa_tile(int(threadgroup_position_in_grid.x), BR, p);
const int h = int(threadgroup_position_in_grid.y), b = int(threadgroup_position_in_grid.z);
const int lid = int(thread_position_in_threadgroup.x);
const int sg = int(simdgroup_index_in_threadgroup), lane = int(thread_index_in_simdgroup);
const int Hkv = p.H / p.G;
const bool kv = tile.kv, rsum = tile.sum;
if (kv && h >= Hkv) return;  // key tiles use the grid's first Hkv heads

// This lane's row (fm of its simdgroup's 8) and columns (fn, fn + 1):
// queries (q, dO, lse, Delta of head h) or keys (k, v of kv head h).
int fm, fn;
ksa_frag_coord(lane, fm, fn);
const int rows = ksa_rows(kv, rsum, p), lrow = tile.first + sg * 8 + fm, row = min(lrow, rows - 1);
const int base = ksa_row0(kv, rsum, p);
const int r0 = base + tile.first, r1 = base + min(tile.first + BR, rows) - 1, ri = base + row;
const size_t roff = (size_t(b) * (kv ? Hkv : p.H) + h) * rows + row;
const device T* A0 = kv ? (rsum ? k_sum : k_text) : (rsum ? q_sum : q_text);
const device T* A1 = kv ? (rsum ? v_sum : v_text) : (rsum ? do_sum : do_text);
simdgroup_float8x8 a0[DF], a1[DF], acc0[DF], acc1[DF];  // acc0: dQ or dK, acc1: dV
for (int d = 0; d < DF; ++d) {
  ksa_frag_set(a0[d], float(A0[roff * D + d * 8 + fn]), float(A0[roff * D + d * 8 + fn + 1]));
  ksa_frag_set(a1[d], float(A1[roff * D + d * 8 + fn]), float(A1[roff * D + d * 8 + fn + 1]));
  acc0[d] = acc1[d] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
}
const float row_lse2 = kv ? 0.0f : (rsum ? lse_sum : lse_text)[roff] * LOG2E;
const float row_delta = kv ? 0.0f : (rsum ? delta_sum : delta_text)[roff];

// Rows padded by 16 bytes (as in the forward): a fragment's 8 rows start in
// different banks.
constexpr int LB = D + 16 / sizeof(T);
threadgroup T sb0[BS * LB];  // partner keys (dQ) or queries (dK/dV)
threadgroup T sb1[BS * LB];  // partner values (dQ) or dO (dK/dV)

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
      for (int i = lid; i < BS * D; i += NT) {
        const int r = i / D, d = i % D, s = s0 + r;
        const bool ok = s < range.hi;
        sb0[r * LB + d] = ok ? B0[(ohead + s - obase) * D + d] : T(0);
        sb1[r * LB + d] = ok ? B1[(ohead + s - obase) * D + d] : T(0);
      }
      threadgroup_barrier(mem_flags::mem_threadgroup);

      // Scores and dP (8 x BS, transposed for dK/dV): A0 B0^T and A1 B1^T;
      // fragment (i, j) of B^T is B[partner j][dim i].
      simdgroup_float8x8 sf[KF], dpf[KF];
      for (int kn = 0; kn < KF; ++kn) sf[kn] = dpf[kn] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
      for (int d = 0; d < DF; ++d) {
        for (int kn = 0; kn < KF; ++kn) {
          const int o = (kn * 8 + fn) * LB + d * 8 + fm;
          simdgroup_float8x8 bt;
          ksa_frag_set(bt, float(sb0[o]), float(sb0[o + LB]));
          simdgroup_multiply_accumulate(sf[kn], a0[d], bt, sf[kn]);
          ksa_frag_set(bt, float(sb1[o]), float(sb1[o + LB]));
          simdgroup_multiply_accumulate(dpf[kn], a1[d], bt, dpf[kn]);
        }
      }

      // FlashAttention-2: P from the saved lse, dS = P * (dP - Delta); pairs
      // outside the row's range (which ends by the block's last valid
      // partner s1) get 0. lse and Delta belong to the query: the row for
      // dQ, the column for dK/dV.
      const int s1 = min(s0 + BS, range.hi) - 1;
      for (int kn = 0; kn < KF; ++kn) {
        for (int e = 0; e < 2; ++e) {
          const int s = s0 + kn * 8 + fn + e;
          const size_t o = ohead + min(s, s1) - obase;
          const float lse2 = kv ? olse[o] * LOG2E : row_lse2;
          const float delta = kv ? odelta[o] : row_delta;
          const float x = sf[kn].thread_elements()[e], dp = dpf[kn].thread_elements()[e];
          const float prob = s >= vis.lo && s < vis.hi ? exp2(x * sl2 - lse2) : 0.0f;
          sf[kn].thread_elements()[e] = prob;
          dpf[kn].thread_elements()[e] = prob * (dp - delta);
        }
      }

      // acc0 += dS B0 (dQ += dS K, or dK += dS^T Q), and for dK/dV acc1 +=
      // P B1 (dV += P^T dO); fragment (i, j) of B is B[partner i][dim j].
      for (int kn = 0; kn < KF; ++kn) {
        for (int d = 0; d < DF; ++d) {
          const int o = (kn * 8 + fm) * LB + d * 8 + fn;
          simdgroup_float8x8 bf;
          ksa_frag_set(bf, float(sb0[o]), float(sb0[o + 1]));
          simdgroup_multiply_accumulate(acc0[d], dpf[kn], bf, acc0[d]);
          if (kv) {
            ksa_frag_set(bf, float(sb1[o]), float(sb1[o + 1]));
            simdgroup_multiply_accumulate(acc1[d], sf[kn], bf, acc1[d]);
          }
        }
      }
    }
  }
}

if (lrow < rows) {
  const float sc = scale[0];
  device T* out0 = kv ? (rsum ? dk_sum : dk_text) : (rsum ? dq_sum : dq_text);
  device T* out1 = rsum ? dv_sum : dv_text;
  for (int d = 0; d < DF; ++d) {
    for (int e = 0; e < 2; ++e) {
      out0[roff * D + d * 8 + fn + e] = T(acc0[d].thread_elements()[e] * sc);
      if (kv) out1[roff * D + d * 8 + fn + e] = T(acc1[d].thread_elements()[e]);
    }
  }
}
