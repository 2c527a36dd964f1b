// Backward of the KSA prefill attention (cuda/prefill.cu) for
// mx.fast.cuda_kernel. Everything above the "kernel body" marker is the
// header, everything below it the body MLX wraps in a __global__ function.
// The header follows cuda/prefill.cu's, whose ksa:: helpers (load_rows,
// mma_abt, mma_ab, band_start, summary_prefix) it uses.
//
// Inputs: the forward's q_text, q_sum, k_text, v_text, k_sum, v_sum; do_text,
// do_sum (cotangents of o_text, o_sum); lse_text, lse_sum (the forward's,
// float32); delta_text, delta_sum (rowsum(dO * O), float32); params (int32,
// see mlx_ksa/kernels/prefill_backward.py); scale [1] (float32).
// Outputs: dq_text, dq_sum (like the queries), dk_text, dv_text, dk_sum,
// dv_sum (like the keys).
//
// FlashAttention-2: with P = exp(s - lse) and dS = P * (dP - Delta), dP = dO v,
//   dQ = scale * dS K,  dK = scale * dS^T Q,  dV = P^T dO.
// Every tile owns 64 rows of one kind and one head and pairs them with the
// rows of the other side, streamed in blocks of 32:
//   dQ tiles: 64 query rows (text or summary) of head h; the partners are the
//     keys they may see (summary keys, then text keys) of kv head h / G;
//   dK/dV tiles: 64 key rows (text or summary) of kv head h (h < Hkv; the grid
//     has H heads, the rest exit); the partners are the queries that may see
//     them (summary queries, then text queries) of each of its G query heads.
// So every output row is written by one tile, without atomics. Both roles run
// the same matrix code with (A0, A1) = the tile's rows and (B0, B1) = a block
// of partners: S = A0 B0^T, dP = A1 B1^T; then acc0 += dS B0, and for dK/dV
// acc1 += P B1 (dQ: A = (Q, dO), B = (K, V); dK/dV: A = (K, V), B = (Q, dO),
// i.e. the transposed products). Tensor cores with float32 accumulators, as
// in the forward (ksa::product_abt, product_ab): a tile is one warpgroup, so
// on Hopper each product is one warpgroup MMA group over its 64 rows, and
// elsewhere mma.sync m16n8k16 on 4 warps of 16 rows. Which pairs exist
// comes from ksa::partners, the visibility math of mlx_ksa/visibility.py in
// stream indices: a tile streams the union of its rows' partner ranges, and
// each row keeps the pairs in its own range. metal/prefill_backward.metal has
// the same helpers and structure.

namespace ksa {

// The launch parameters (params input).
struct Bwd {
  int n, n_sq, t0, text_base, window, Lt, Ls, chunk, S, G, H;
  int tiles[4];  // tiles of summary keys, text queries, text keys, summary queries
};
__device__ __forceinline__ Bwd read_params(const int* a) {
  return Bwd{a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], a[8], a[9], a[10],
             {a[11], a[12], a[13], a[14]}};
}

// Rows are named by stream index: a text index t, or a summary index c*S + j
// (the j-th summary of chunk c), for queries and keys alike.

// First text index whose window no longer holds chunk c: band_start(t) > c*chunk
// exactly when summary_prefix(t) > c*S, so text queries in [c*chunk,
// window_end(c)) see chunk c's text and later ones its summaries.
__device__ __forceinline__ int window_end(int c, const Bwd& p) { return (c + p.window + 1) * p.chunk; }

// Stream index range [lo, hi).
struct Range {
  int lo, hi;
};

// The partners of rows [r0, r1] of one kind (sum): for query rows (kv false)
// the keys they may see, for key rows (kv true) the queries that may see them;
// other_sum picks the summary or the text partners. For one row (r0 = r1) the
// range is exactly the visible partners of that kind (visibility.visible);
// for a tile, the union of its rows' ranges.
__device__ __forceinline__ Range partners(bool kv, bool sum, int r0, int r1, bool other_sum,
                                          const Bwd& p) {
  const int k = p.chunk, S = p.S;
  // Chunks whose summaries are queries (S = 0: the no-summary baseline).
  const int c0 = p.t0 / k, c1 = c0 + p.n_sq / max(S, 1);
  if (!kv && !sum)
    return other_sum ? Range{0, summary_prefix(r1, k, S, p.window)}
                     : Range{band_start(r0, k, p.window), r1 + 1};
  if (!kv)  // summary queries: their chunks' summaries (causal) and text
    return other_sum ? Range{r0 / S * S, r1 + 1} : Range{r0 / S * k, (r1 / S + 1) * k};
  if (!sum)
    return other_sum ? Range{max(c0, r0 / k) * S, min(c1, r1 / k + 1) * S}
                     : Range{max(p.t0, r0), min(p.t0 + p.n, window_end(r1 / k, p))};
  return other_sum ? Range{max(c0 * S, r0), min(c1, r1 / S + 1) * S}
                   : Range{max(p.t0, window_end(r0 / S, p)), p.t0 + p.n};
}

// Stream index of array row 0 and row count of queries (kv false) or keys.
__device__ __forceinline__ int row0(bool kv, bool sum, const Bwd& p) {
  return kv ? (sum ? 0 : p.text_base) : (sum ? p.t0 / p.chunk * p.S : p.t0);
}
__device__ __forceinline__ int rows(bool kv, bool sum, const Bwd& p) {
  return kv ? (sum ? p.Ls : p.Lt) : (sum ? p.n_sq : p.n);
}

// Tile x of the grid: its role (dK/dV of key rows, or dQ of query rows), row
// kind and first array row. Heaviest tiles first: the summary keys (the
// earliest are seen by almost every later text query), then the text
// queries latest first (most summaries).
struct Tile {
  bool kv, sum;
  int first;
};
__device__ __forceinline__ Tile tile_of(int x, int rows_per_tile, const Bwd& p) {
  if (x < p.tiles[0]) return Tile{true, true, x * rows_per_tile};
  x -= p.tiles[0];
  if (x < p.tiles[1]) return Tile{false, false, (p.tiles[1] - 1 - x) * rows_per_tile};
  x -= p.tiles[1];
  if (x < p.tiles[2]) return Tile{true, false, x * rows_per_tile};
  return Tile{false, true, (x - p.tiles[2]) * rows_per_tile};
}

}  // namespace ksa

// ==== kernel body ====
constexpr int BR = 64;  // rows per tile: 4 warps x 16
constexpr int BS = 32;  // partner rows per block
constexpr int NT = 128;
constexpr int STAGE = 2 * BS * D;  // a block's two partner tiles
constexpr float LOG2E = 1.4426950408889634f;

const ksa::Bwd p = ksa::read_params(params);
const float sl2 = scale[0] * LOG2E;  // scores in the log2 domain
const ksa::Tile tile = ksa::tile_of(blockIdx.x, BR, p);
const int h = blockIdx.y, b = blockIdx.z, Hkv = p.H / p.G;
const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
const bool kv = tile.kv, rsum = tile.sum;
if (kv && h >= Hkv) return;  // key tiles use the grid's first Hkv heads

// The tile's rows: queries (q, dO, lse, Delta of head h) or keys (k, v of kv head h).
const int rows = ksa::rows(kv, rsum, p), base = ksa::row0(kv, rsum, p);
const int r0 = base + tile.first, r1 = base + min(tile.first + BR, rows) - 1;
const size_t rhead = (size_t(b) * (kv ? Hkv : p.H) + h) * rows;  // array row 0 of this head
const T* A0 = kv ? (rsum ? k_sum : k_text) : (rsum ? q_sum : q_text);
const T* A1 = kv ? (rsum ? v_sum : v_text) : (rsum ? do_sum : do_text);

// Dynamic shared memory (64 KB at D = 128), on whole swizzle atoms: the
// tile's rows, then two stages of a partner block, so that block i + 1 loads
// while block i computes behind one barrier per block. A stage holds B0
// (partner keys for dQ, queries for dK/dV), B1 (values, or dO), and for
// dK/dV the partner queries' lse and Delta.
extern __shared__ unsigned char smem[];
T* const sA0 = reinterpret_cast<T*>(smem + (-ksa::smem_addr(smem) & 1023u));
T* const sA1 = sA0 + BR * D;
T* const sB = sA1 + BR * D;  // stage i: sB + i * STAGE (B0, then B1)
float* const sLse = reinterpret_cast<float*>(sB + 2 * STAGE);  // [2 stages][lse BS | Delta BS]
ksa::load_rows<T, D, BR, NT>(sA0, A0 + rhead * D, tile.first, rows, tid);
ksa::load_rows<T, D, BR, NT>(sA1, A1 + rhead * D, tile.first, rows, tid);
ksa::cp_async_commit();

// This thread's two rows (r and r+8 of the warp's 16), as in the forward; a
// dQ row's lse and Delta (rows past the end read the last row's, store nothing).
const int lrow[2] = {warp * 16 + (lane >> 2), warp * 16 + (lane >> 2) + 8};
float row_lse2[2] = {0.f, 0.f}, row_delta[2] = {0.f, 0.f};
if (!kv) {
  const float* lse = rsum ? lse_sum : lse_text;
  const float* delta = rsum ? delta_sum : delta_text;
  for (int rr = 0; rr < 2; ++rr) {
    const size_t o = rhead + min(tile.first + lrow[rr], rows - 1);
    row_lse2[rr] = lse[o] * LOG2E;
    row_delta[rr] = delta[o];
  }
}
float acc0[D / 8][4], acc1[D / 8][4];  // acc0: dQ or dK, acc1: dV
#pragma unroll
for (int i = 0; i < D / 8; ++i)
  #pragma unroll
  for (int e = 0; e < 4; ++e) acc0[i][e] = acc1[i][e] = 0.f;

// Key rows sum over the G query heads that share them.
for (int g = 0; g < (kv ? p.G : 1); ++g) {
  const int hp = kv ? h * p.G + g : h / p.G;  // the partners' head
  for (int pass = 0; pass < 2; ++pass) {
    const bool osum = pass == 0;
    const ksa::Range range = ksa::partners(kv, rsum, r0, r1, osum, p);
    const ksa::Range vis[2] = {ksa::partners(kv, rsum, r0 + lrow[0], r0 + lrow[0], osum, p),
                               ksa::partners(kv, rsum, r0 + lrow[1], r0 + lrow[1], osum, p)};
    const int obase = ksa::row0(!kv, osum, p);
    const size_t ohead = (size_t(b) * (kv ? p.H : Hkv) + hp) * ksa::rows(!kv, osum, p);
    const T* B0 = kv ? (osum ? q_sum : q_text) : (osum ? k_sum : k_text);
    const T* B1 = kv ? (osum ? do_sum : do_text) : (osum ? v_sum : v_text);
    const float* olse = osum ? lse_sum : lse_text;
    const float* odelta = osum ? delta_sum : delta_text;
    // Partner block i (rows from s0 = range.lo + i * BS) into stage i & 1:
    // B0 and B1, and for dK/dV the partners' lse and Delta (zero past the
    // range; those pairs are masked).
    auto load_block = [&](int i) {
      const int first = range.lo + i * BS - obase, end = range.hi - obase;
      T* st = sB + (i & 1) * STAGE;
      ksa::load_rows<T, D, BS, NT>(st, B0 + ohead * D, first, end, tid);
      ksa::load_rows<T, D, BS, NT>(st + BS * D, B1 + ohead * D, first, end, tid);
      if (kv && tid < 2 * BS) {  // one float each: the rows need not be 16-byte aligned
        const int r = first + tid % BS;
        const float* src = (tid < BS ? olse : odelta) + ohead;
        ksa::cp_async4(sLse + (i & 1) * 2 * BS + tid, r < end ? src + r : src, r < end);
      }
      ksa::cp_async_commit();
    };
    const int n_blocks = (range.hi - range.lo + BS - 1) / BS;
    __syncthreads();  // every warp is done with the previous range's last block
    if (n_blocks > 0) load_block(0);
    for (int blk = 0; blk < n_blocks; ++blk) {
      const int s0 = range.lo + blk * BS;
      // Block blk landed (and, the first time, the tile's rows), and every
      // warp is done with block blk - 1: its stage takes block blk + 1.
      ksa::cp_async_wait<0>();
      ksa::publish_fence();
      __syncthreads();
      if (blk + 1 < n_blocks) load_block(blk + 1);
      const T* sB0 = sB + (blk & 1) * STAGE;
      const T* sB1 = sB0 + BS * D;
      const float* blk_lse = sLse + (blk & 1) * 2 * BS;

      float s[BS / 8][4], dp[BS / 8][4];
      ksa::product_abt<T, D, BR, BS>(s, sA0, sB0, warp, lane);   // scores (transposed for dK/dV)
      ksa::product_abt<T, D, BR, BS>(dp, sA1, sB1, warp, lane);  // dP (transposed for dK/dV)

      // s -> P, dp -> dS; pairs outside the row's range get 0. lse and Delta
      // belong to the query: the row for dQ, the column for dK/dV.
      #pragma unroll
      for (int nb = 0; nb < BS / 8; ++nb) {
        #pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int si = s0 + nb * 8 + (lane & 3) * 2 + e;
          float col_lse2 = 0.f, col_delta = 0.f;
          if (kv) {
            col_lse2 = blk_lse[si - s0] * LOG2E;
            col_delta = blk_lse[BS + si - s0];
          }
          #pragma unroll
          for (int rr = 0; rr < 2; ++rr) {
            float& x = s[nb][rr * 2 + e];
            float& y = dp[nb][rr * 2 + e];
            x = si >= vis[rr].lo && si < vis[rr].hi ? ksa::ex2(fmaf(x, sl2, -(kv ? col_lse2 : row_lse2[rr]))) : 0.f;
            y = x * (y - (kv ? col_delta : row_delta[rr]));
          }
        }
      }
      ksa::product_ab<T, D, BS>(acc0, dp, sB0, lane);       // dQ += dS K, or dK += dS^T Q
      if (kv) ksa::product_ab<T, D, BS>(acc1, s, sB1, lane);  // dV += P^T dO
    }
  }
}
ksa::cp_async_wait<0>();  // a tile without partners still has its own rows in flight

const float sc = scale[0];
T* out0 = kv ? (rsum ? dk_sum : dk_text) : (rsum ? dq_sum : dq_text);
T* out1 = rsum ? dv_sum : dv_text;
#pragma unroll
for (int rr = 0; rr < 2; ++rr) {
  const int row = tile.first + lrow[rr];
  if (row >= rows) continue;
  const size_t o = (rhead + row) * D + (lane & 3) * 2;
  #pragma unroll
  for (int i = 0; i < D / 8; ++i) {
    out0[o + i * 8] = T(acc0[i][rr * 2] * sc);
    out0[o + i * 8 + 1] = T(acc0[i][rr * 2 + 1] * sc);
    if (kv) {
      out1[o + i * 8] = T(acc1[i][rr * 2]);
      out1[o + i * 8 + 1] = T(acc1[i][rr * 2 + 1]);
    }
  }
}
