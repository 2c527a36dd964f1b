// KSA prefill attention for mx.fast.cuda_kernel: text and summary queries in
// one launch. Everything above the "kernel body" marker is the header (device
// helpers), everything below it the body MLX wraps in a __global__ function.
//
// Inputs: q_text [B,H,n,D], q_sum [B,H,mS,D], k_text/v_text [B,Hkv,Lt,D]
// (text indices text_base..), k_sum/v_sum [B,Hkv,Ls,D], params (int32, see
// mlx_ksa/kernels/prefill.py), scale [1] (float32).
// Outputs: o_text, o_sum (like the queries), lse_text [B,H,n], lse_sum [B,H,mS].
//
// Grid: x = query tiles (the text tiles, heaviest first, then the summary
// tiles), y = query head, z = batch; 256 threads (8 warps, 2 warpgroups) per
// tile, 2 tiles per SM (mlx_ksa/kernels/prefill.py caps registers at 128).
// Text tile: 128 text queries of one head, flash attention over two key
// ranges -- the visible summary prefix [0, summary_prefix(last query)) and
// the text band [band_start(first query), last query] -- in blocks of 64
// keys, with tensor cores and float32 accumulators: one warpgroup MMA (wgmma)
// per product and 64 rows on Hopper (sm_90a), mma.sync m16n8k16 per warp and
// 16 rows elsewhere. The two warpgroups share each K/V block (at 64 rows per
// block the loads kept L2 70% busy), which loads into a second stage while
// the one before it computes. A warpgroup skips the blocks none of its rows
// sees, and only blocks that straddle a row's range boundary pay for the
// per-element mask.
// Summary tile: 128 summary queries, 8 lanes per query, over its chunk's
// summaries 0..j and k text keys (at most 2k keys: no tiling needed).
// The index math is the one in mlx_ksa/visibility.py and metal/prefill.metal.

namespace ksa {

template <typename T> constexpr bool is_bf16 = false;
template <> constexpr bool is_bf16<__nv_bfloat16> = true;
constexpr float NEG_INF = -cuda::std::numeric_limits<float>::infinity();

__device__ __forceinline__ unsigned smem_addr(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

// 16-byte global->shared copy; zero fill when !valid (src must still be a
// mapped address).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)),
               "l"(src), "r"(valid ? 16 : 0));
}
// 4-byte copy (cp.async's .ca form), zero fill when !valid.
__device__ __forceinline__ void cp_async4(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(valid ? 4 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// ldmatrix from a shared-window address (see ldsm_base).
__device__ __forceinline__ void ldsm_x4(unsigned (&r)[4], unsigned addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_trans(unsigned (&r)[4], unsigned addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// c += a (16x16, row major) * b (16x8, column major), float32 accumulators.
template <typename T>
__device__ __forceinline__ void mma(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
  if constexpr (is_bf16<T>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// Two floats as the 16-bit pair an mma operand register holds (low = first).
template <typename T>
__device__ __forceinline__ unsigned pack2(float lo, float hi) {
  if constexpr (is_bf16<T>) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<unsigned*>(&v);
  } else {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<unsigned*>(&v);
  }
}

// Shared tiles hold ROWS rows as D/64 blocks of 64 columns, each [ROWS][64]
// with 128-byte rows whose 16-byte chunks are XOR-swizzled by row & 7. That
// is wgmma's 128-byte swizzle (8-row atoms of 1024 bytes), and the 8 rows one
// ldmatrix phase reads fall in distinct banks. 16-bit T only.
template <int ROWS>
__device__ __forceinline__ int swz(int row, int col) {
  return (col >> 6) * ROWS * 64 + row * 64 + ((((col >> 3) & 7) ^ (row & 7)) << 3) + (col & 7);
}
// Whole swizzle atoms: the swizzle is a function of the address bits, and
// wgmma descriptors here carry no base offset.
#define KSA_TILE __align__(1024)

// E consecutive values at p (16-byte aligned, E a multiple of 8) as floats.
template <typename T, int E>
__device__ __forceinline__ void load_lane(float (&f)[E], const T* p) {
  static_assert(E % 8 == 0, "16-byte loads");
  alignas(16) T x[E];
  #pragma unroll
  for (int i = 0; i < E / 8; ++i) reinterpret_cast<uint4*>(x)[i] = reinterpret_cast<const uint4*>(p)[i];
  #pragma unroll
  for (int e = 0; e < E; ++e) f[e] = float(x[e]);
}

// op over this thread's entries of row rr (r or r + 8) of x (16 x 8N,
// accumulator layout), as a tree: depth log2(2N), not a chain of 2N.
template <int N, typename Op>
__device__ __forceinline__ float reduce(const float (&x)[N][4], int rr, Op op) {
  float v[N];
  #pragma unroll
  for (int i = 0; i < N; ++i) v[i] = op(x[i][rr * 2], x[i][rr * 2 + 1]);
  #pragma unroll
  for (int w = N / 2; w; w /= 2)
    #pragma unroll
    for (int i = 0; i < w; ++i) v[i] = op(v[i], v[i + w]);
  return v[0];
}

// 2^x in one instruction (MUFU.EX2). exp2f adds a denormal fix-up around it
// (four instructions), and probabilities below 2^-126 are 0 to bfloat16 anyway.
__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// Async copy of ROWS rows [r0, r0 + ROWS) of src into a swizzled tile (rows
// >= end zero filled); NT threads. Each thread copies one column chunk of
// every RP-th row: RP is a multiple of 8, so every row it copies has the same
// swizzle and the addresses are a base plus constants.
template <typename T, int D, int ROWS, int NT>
__device__ __forceinline__ void load_rows(T* dst, const T* src, int r0, int end, int tid) {
  constexpr int CH = D / 8, RP = NT / CH;  // 16-byte chunks per row, rows per pass
  static_assert(RP % 8 == 0 && ROWS % RP == 0, "one swizzle per thread");
  const int r = tid / CH, cc = tid % CH;
  T* d = dst + swz<ROWS>(r, cc * 8);
  const T* s = src + size_t(r0 + r) * D + cc * 8;
  if (r0 + ROWS <= end) {  // the common case: one address pair plus immediates
    #pragma unroll
    for (int i = 0; i < ROWS / RP; ++i) cp_async16(d + i * RP * 64, s + i * RP * D, true);
    return;
  }
  #pragma unroll
  for (int i = 0; i < ROWS / RP; ++i) {
    const bool ok = r0 + r + i * RP < end;
    cp_async16(d + i * RP * 64, ok ? s + size_t(i) * RP * D : src, ok);
  }
}

// x as the compiler then knows it is: the same on every lane of the warp
// (CUTLASS's canonical_warp_idx_sync). What derives from it stays in uniform
// registers, where wgmma reads its descriptors, rather than being moved there
// by R2UR before every wgmma.
template <typename X>
__device__ __forceinline__ X warp_uniform(X x) {
  return __shfl_sync(0xffffffffu, x, 0);
}

// ldmatrix addresses. Columns [16kk, 16kk + 16) are chunks 2kk' and 2kk' + 1
// (kk' = kk % 4) of column block kk / 4, stored at chunk (2kk' + c) ^ (row & 7)
// = 2kk' ^ (c ^ (row & 7)): a per-thread base (chunk c ^ (row & 7)) XOR
// kk' << 5 (in bytes), plus the block and row offsets.
template <typename T>
__device__ __forceinline__ unsigned ldsm_base(const T* tile, int row, int c) {
  return smem_addr(tile) + unsigned(row * 128 + ((c ^ (row & 7)) << 4));
}
template <int ROWS>
__device__ __forceinline__ unsigned ldsm_col(unsigned base, int kk) {
  return (base ^ ((kk & 3) << 5)) + (kk >> 2) * ROWS * 128;
}

// c (16 x N, this warp's rows) += a[16 rows of the warp] * bt[N rows]^T, as
// Q K^T; a has M rows.
template <typename T, int D, int M, int N>
__device__ __forceinline__ void mma_abt(float (&c)[N / 8][4], const T* a, const T* bt, int warp,
                                        int lane) {
  const int i = lane >> 3;
  const unsigned a0 = ldsm_base(a, warp * 16 + (lane & 15), lane >> 4);
  const unsigned b0 = ldsm_base(bt, (i >> 1) * 8 + (lane & 7), i & 1);
  #pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    unsigned af[4];
    ldsm_x4(af, ldsm_col<M>(a0, kk));
    #pragma unroll
    for (int nb = 0; nb < N / 16; ++nb) {
      unsigned bf[4];
      ldsm_x4(bf, ldsm_col<N>(b0, kk) + nb * 16 * 128);
      mma<T>(c[2 * nb], af, bf[0], bf[1]);
      mma<T>(c[2 * nb + 1], af, bf[2], bf[3]);
    }
  }
}

// The mma A fragment of columns [16kk, 16kk + 16) of x (16 x N, accumulator
// layout), rounded to T.
template <typename T, int N>
__device__ __forceinline__ void a_fragment(unsigned (&f)[4], const float (&x)[N / 8][4], int kk) {
  f[0] = pack2<T>(x[2 * kk][0], x[2 * kk][1]);
  f[1] = pack2<T>(x[2 * kk][2], x[2 * kk][3]);
  f[2] = pack2<T>(x[2 * kk + 1][0], x[2 * kk + 1][1]);
  f[3] = pack2<T>(x[2 * kk + 1][2], x[2 * kk + 1][3]);
}

// c (16 x D) += x (16 x N, accumulator layout, rounded to T) * b[N rows], as
// P V.
template <typename T, int D, int N>
__device__ __forceinline__ void mma_ab(float (&c)[D / 8][4], const float (&x)[N / 8][4], const T* b,
                                       int lane) {
  const int i = lane >> 3;
  const unsigned b0 = ldsm_base(b, (i & 1) * 8 + (lane & 7), i >> 1);
  #pragma unroll
  for (int kk = 0; kk < N / 16; ++kk) {
    unsigned xf[4];
    a_fragment<T, N>(xf, x, kk);
    #pragma unroll
    for (int db = 0; db < D / 16; ++db) {
      unsigned bf[4];
      ldsm_x4_trans(bf, ldsm_col<N>(b0, db) + kk * 16 * 128);
      mma<T>(c[2 * db], xf, bf[0], bf[1]);
      mma<T>(c[2 * db + 1], xf, bf[2], bf[3]);
    }
  }
}

#if defined(__CUDA_ARCH_FEAT_SM90_ALL) && !defined(KSA_NO_WGMMA)
// Hopper (sm_90a): warpgroup MMA. One wgmma reads a shared operand once for
// the 64 rows of 4 warps, where mma.sync has each warp re-read it through
// ldmatrix -- the shared-memory traffic that bounds the mma.sync kernel.
#define KSA_WGMMA 1

// Descriptor of a swizzled tile region: low word = start address >> 4 and,
// for an MN-major operand, the byte offset of its 64-column blocks (lbo) >> 4;
// high word = 8-row atoms 1024 bytes apart, 128-byte swizzle. Offsets into
// a tile add to the low word (addresses stay below 2^18).
__device__ __forceinline__ unsigned gmma_lo(unsigned addr, unsigned lbo) {
  return ((addr & 0x3FFFF) >> 4) | (lbo >> 4) << 16;
}
__device__ __forceinline__ unsigned long long gmma_desc(unsigned lo) {
  constexpr unsigned long long hi = (1024 >> 4) | 1u << 30;
  return hi << 32 | lo;
}
// Shared memory written by threads (cp.async) becomes visible to wgmma, which
// reads it through the async proxy; then a barrier.
__device__ __forceinline__ void async_proxy_fence() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_wait() { asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory"); }
// Keeps the compiler from moving accesses of c across a wgmma's issue and wait.
template <int N>
__device__ __forceinline__ void fence_operands(float (&c)[N][4]) {
  #pragma unroll
  for (int i = 0; i < N; ++i)
    #pragma unroll
    for (int e = 0; e < 4; ++e) asm volatile("" : "+f"(c[i][e])::"memory");
}

// c (64 x N, N = 32 or 64) (+)= A B^T with A, B K-major in shared memory
// (descriptors); accumulate 0 overwrites c.
template <typename T, int N>
__device__ __forceinline__ void wgmma_ss(float (&c)[N / 8][4], unsigned long long a, unsigned long long b,
                                         int accumulate) {
#define KSA_SS32(TY) asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n" \
    "wgmma.mma_async.sync.aligned.m64n32k16.f32." TY "." TY " \
    {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15}, \
    %16, %17, p, 1, 1, 0, 0;\n}\n" : "+f"(c[0][0]), "+f"(c[0][1]), "+f"(c[0][2]), "+f"(c[0][3]), \
    "+f"(c[1][0]), "+f"(c[1][1]), "+f"(c[1][2]), "+f"(c[1][3]), "+f"(c[2][0]), "+f"(c[2][1]), \
    "+f"(c[2][2]), "+f"(c[2][3]), "+f"(c[3][0]), "+f"(c[3][1]), "+f"(c[3][2]), "+f"(c[3][3]) \
    : "l"(a), "l"(b), "r"(accumulate))
#define KSA_SS64(TY) asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n" \
    "wgmma.mma_async.sync.aligned.m64n64k16.f32." TY "." TY " \
    {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, \
    %32, %33, p, 1, 1, 0, 0;\n}\n" : "+f"(c[0][0]), "+f"(c[0][1]), "+f"(c[0][2]), "+f"(c[0][3]), \
    "+f"(c[1][0]), "+f"(c[1][1]), "+f"(c[1][2]), "+f"(c[1][3]), "+f"(c[2][0]), "+f"(c[2][1]), \
    "+f"(c[2][2]), "+f"(c[2][3]), "+f"(c[3][0]), "+f"(c[3][1]), "+f"(c[3][2]), "+f"(c[3][3]), \
    "+f"(c[4][0]), "+f"(c[4][1]), "+f"(c[4][2]), "+f"(c[4][3]), "+f"(c[5][0]), "+f"(c[5][1]), \
    "+f"(c[5][2]), "+f"(c[5][3]), "+f"(c[6][0]), "+f"(c[6][1]), "+f"(c[6][2]), "+f"(c[6][3]), \
    "+f"(c[7][0]), "+f"(c[7][1]), "+f"(c[7][2]), "+f"(c[7][3]) : "l"(a), "l"(b), "r"(accumulate))
  static_assert(N == 32 || N == 64, "wgmma_ss");
  if constexpr (N == 32) {
    if constexpr (is_bf16<T>) KSA_SS32("bf16"); else KSA_SS32("f16");
  } else {
    if constexpr (is_bf16<T>) KSA_SS64("bf16"); else KSA_SS64("f16");
  }
#undef KSA_SS32
#undef KSA_SS64
}

// c (64 x N) += a B with a in registers (each warp's 16 rows, mma A fragments)
// and B MN-major in shared memory (tnspB = 1).
template <typename T, int N>
__device__ __forceinline__ void wgmma_rs(float (&c)[N / 8][4], const unsigned (&a)[4], unsigned long long b) {
#define KSA_RS64(TY) asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n" \
    "wgmma.mma_async.sync.aligned.m64n64k16.f32." TY "." TY " \
    {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, \
    {%32,%33,%34,%35}, %36, p, 1, 1, 1;\n}\n" : "+f"(c[0][0]), "+f"(c[0][1]), "+f"(c[0][2]), \
    "+f"(c[0][3]), "+f"(c[1][0]), "+f"(c[1][1]), "+f"(c[1][2]), "+f"(c[1][3]), "+f"(c[2][0]), \
    "+f"(c[2][1]), "+f"(c[2][2]), "+f"(c[2][3]), "+f"(c[3][0]), "+f"(c[3][1]), "+f"(c[3][2]), \
    "+f"(c[3][3]), "+f"(c[4][0]), "+f"(c[4][1]), "+f"(c[4][2]), "+f"(c[4][3]), "+f"(c[5][0]), \
    "+f"(c[5][1]), "+f"(c[5][2]), "+f"(c[5][3]), "+f"(c[6][0]), "+f"(c[6][1]), "+f"(c[6][2]), \
    "+f"(c[6][3]), "+f"(c[7][0]), "+f"(c[7][1]), "+f"(c[7][2]), "+f"(c[7][3]) : "r"(a[0]), \
    "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(1))
#define KSA_RS128(TY) asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n" \
    "wgmma.mma_async.sync.aligned.m64n128k16.f32." TY "." TY " \
    {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63}, \
    {%64,%65,%66,%67}, %68, p, 1, 1, 1;\n}\n" : "+f"(c[0][0]), "+f"(c[0][1]), "+f"(c[0][2]), \
    "+f"(c[0][3]), "+f"(c[1][0]), "+f"(c[1][1]), "+f"(c[1][2]), "+f"(c[1][3]), "+f"(c[2][0]), \
    "+f"(c[2][1]), "+f"(c[2][2]), "+f"(c[2][3]), "+f"(c[3][0]), "+f"(c[3][1]), "+f"(c[3][2]), \
    "+f"(c[3][3]), "+f"(c[4][0]), "+f"(c[4][1]), "+f"(c[4][2]), "+f"(c[4][3]), "+f"(c[5][0]), \
    "+f"(c[5][1]), "+f"(c[5][2]), "+f"(c[5][3]), "+f"(c[6][0]), "+f"(c[6][1]), "+f"(c[6][2]), \
    "+f"(c[6][3]), "+f"(c[7][0]), "+f"(c[7][1]), "+f"(c[7][2]), "+f"(c[7][3]), "+f"(c[8][0]), \
    "+f"(c[8][1]), "+f"(c[8][2]), "+f"(c[8][3]), "+f"(c[9][0]), "+f"(c[9][1]), "+f"(c[9][2]), \
    "+f"(c[9][3]), "+f"(c[10][0]), "+f"(c[10][1]), "+f"(c[10][2]), "+f"(c[10][3]), "+f"(c[11][0]), \
    "+f"(c[11][1]), "+f"(c[11][2]), "+f"(c[11][3]), "+f"(c[12][0]), "+f"(c[12][1]), "+f"(c[12][2]), \
    "+f"(c[12][3]), "+f"(c[13][0]), "+f"(c[13][1]), "+f"(c[13][2]), "+f"(c[13][3]), "+f"(c[14][0]), \
    "+f"(c[14][1]), "+f"(c[14][2]), "+f"(c[14][3]), "+f"(c[15][0]), "+f"(c[15][1]), "+f"(c[15][2]), \
    "+f"(c[15][3]) : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(1))
  if constexpr (N == 64) {
    if constexpr (is_bf16<T>) KSA_RS64("bf16"); else KSA_RS64("f16");
  } else {
    if constexpr (is_bf16<T>) KSA_RS128("bf16"); else KSA_RS128("f16");
  }
#undef KSA_RS64
#undef KSA_RS128
}

// The products of both kernels, one warpgroup MMA group each, waited for.
// c (64 x N) = A B^T: A of M rows and B of N rows, K-major tiles in shared
// memory, given by their descriptors' low words (a_lo at this warpgroup's rows).
template <typename T, int D, int M, int N>
__device__ __forceinline__ void wgmma_abt(float (&c)[N / 8][4], unsigned a_lo, unsigned b_lo) {
  wgmma_fence();
  #pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    // Columns 16kk.. are 32 bytes per kk into the 128-byte rows of block kk / 4.
    const unsigned col = (kk & 3) * 2;
    wgmma_ss<T, N>(c, gmma_desc(a_lo + (kk >> 2) * M * 8 + col), gmma_desc(b_lo + (kk >> 2) * N * 8 + col),
                   kk > 0);
  }
  wgmma_commit();
  wgmma_wait();
  fence_operands(c);
}
// c (64 x D) += x B: x (64 x N, accumulator layout) rounded to T, B of N rows
// in shared memory read MN-major (b_lo's lbo: N * 128).
template <typename T, int D, int N>
__device__ __forceinline__ void wgmma_ab(float (&c)[D / 8][4], const float (&x)[N / 8][4], unsigned b_lo) {
  fence_operands(c);
  wgmma_fence();
  #pragma unroll
  for (int kk = 0; kk < N / 16; ++kk) {
    unsigned xf[4];
    a_fragment<T, N>(xf, x, kk);
    wgmma_rs<T, D>(c, xf, gmma_desc(b_lo + kk * 16 * 8));  // 16 rows of 128 bytes
  }
  wgmma_commit();
  wgmma_wait();
  fence_operands(c);
}
#endif

// The same products on any tile in shared memory, over this warpgroup's 64
// rows of A (Hopper; A holds one warpgroup's rows) or else this warp's 16:
// c = A B^T (A: M rows, B: N rows) and c += x B (B: N rows).
template <typename T, int D, int M, int N>
__device__ __forceinline__ void product_abt(float (&c)[N / 8][4], const T* a, const T* b, int warp, int lane) {
#ifdef KSA_WGMMA
  wgmma_abt<T, D, M, N>(c, gmma_lo(smem_addr(a), 16), gmma_lo(smem_addr(b), 16));
#else
  #pragma unroll
  for (int i = 0; i < N / 8; ++i) c[i][0] = c[i][1] = c[i][2] = c[i][3] = 0.f;
  mma_abt<T, D, M, N>(c, a, b, warp, lane);
#endif
}
template <typename T, int D, int N>
__device__ __forceinline__ void product_ab(float (&c)[D / 8][4], const float (&x)[N / 8][4], const T* b, int lane) {
#ifdef KSA_WGMMA
  wgmma_ab<T, D, N>(c, x, gmma_lo(smem_addr(b), N * 128));
#else
  mma_ab<T, D, N>(c, x, b, lane);
#endif
}

// A text tile's shared operands as its products read them: Q of M rows, K and
// V of N. On Hopper, the descriptors' low words, computed once (per wgmma
// they cost 9 instructions); q_lo starts at this warpgroup's 64 rows.
template <typename T, int M, int N>
struct Operands {
  const T *q, *k, *v;
#ifdef KSA_WGMMA
  unsigned q_lo, k_lo, v_lo;
#endif
  __device__ Operands(const T* q_, const T* k_, const T* v_, int warpgroup) : q(q_), k(k_), v(v_) {
#ifdef KSA_WGMMA
    q_lo = gmma_lo(smem_addr(q) + warpgroup * 64 * 128, 16);  // K-major: lbo unused
    k_lo = gmma_lo(smem_addr(k), 16);
    v_lo = gmma_lo(smem_addr(v), N * 128);
#endif
  }
  // The same operands with K and V `elems` further on (another stage).
  __device__ Operands stage(int elems) const {
    Operands t = *this;
    t.k += elems;
    t.v += elems;
#ifdef KSA_WGMMA
    t.k_lo += elems * int(sizeof(T)) / 16;
    t.v_lo += elems * int(sizeof(T)) / 16;
#endif
    return t;
  }
};

// Scores s = Q K^T of this warpgroup's 64 rows (Hopper: one warpgroup MMA)
// or else of this warp's 16 rows; Q and K in shared memory.
template <typename T, int D, int M, int N>
__device__ __forceinline__ void scores(float (&s)[N / 8][4], const Operands<T, M, N>& t, int warp, int lane) {
#ifdef KSA_WGMMA
  // Q's descriptor is made uniform here, at each use: made uniform once per
  // tile, ptxas hoists all eight of its per-step descriptors into uniform
  // registers and then serialises every wgmma (C7512).
  wgmma_abt<T, D, M, N>(s, warp_uniform(t.q_lo), t.k_lo);
#else
  product_abt<T, D, M, N>(s, t.q, t.k, warp, lane);
#endif
}

// o += P V over this warpgroup's (or warp's) rows, P = p (accumulator
// layout) rounded to T and V of N rows in shared memory.
template <typename T, int D, int M, int N>
__device__ __forceinline__ void accumulate(float (&o)[D / 8][4], const float (&p)[N / 8][4],
                                           const Operands<T, M, N>& t, int lane) {
#ifdef KSA_WGMMA
  wgmma_ab<T, D, N>(o, p, t.v_lo);
#else
  mma_ab<T, D, N>(o, p, t.v, lane);
#endif
}

// Before the barrier that publishes cp.async data to the tile's readers.
__device__ __forceinline__ void publish_fence() {
#ifdef KSA_WGMMA
  async_proxy_fence();
#endif
}

#ifdef KSA_WGMMA
// The text tile's K and V blocks through the Tensor Memory Accelerator: one
// thread issues a block's copies, which land in wgmma's swizzled layout and
// complete an mbarrier's transaction count, where every thread's cp.async
// copies took about a third of the loop's instructions (addresses recomputed
// each block at 128 registers). The tensor maps (mlx_ksa/kernels/tma.py) are
// in global memory, their global addresses set on the GPU.
__device__ __forceinline__ void mbar_init(unsigned long long* bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(count) : "memory");
}
// One arrival that also expects `bytes` of copies to complete the phase.
__device__ __forceinline__ void mbar_expect(unsigned long long* bar, unsigned bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(bytes)
               : "memory");
}
// Until the barrier's phase of this parity completes.
__device__ __forceinline__ void mbar_wait(unsigned long long* bar, int parity) {
  asm volatile("{\n.reg .pred p;\nKSA_WAIT:\nmbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
               "@!p bra KSA_WAIT;\n}\n" ::"r"(smem_addr(bar)), "r"(parity) : "memory");
}
// The maps in their buffer (mlx_ksa/kernels/tma.py): from its first 128-byte boundary.
__device__ __forceinline__ const unsigned char* aligned(const unsigned char* maps) {
  return reinterpret_cast<const unsigned char*>((reinterpret_cast<size_t>(maps) + 127) & ~size_t(127));
}
// Before a tensor map written on the GPU is used.
__device__ __forceinline__ void tma_acquire(const void* map) {
  asm volatile("fence.proxy.tensormap::generic.acquire.gpu [%0], 128;\n" ::"l"(map) : "memory");
}
// The box at element coordinates (c0, c1, c2) of a rank-3 map into dst.
__device__ __forceinline__ void tma_load(void* dst, const void* map, int c0, int c1, int c2,
                                         unsigned long long* bar) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], [%5];\n"
      ::"r"(smem_addr(dst)), "l"(map), "r"(c0), "r"(c1), "r"(c2), "r"(smem_addr(bar)) : "memory");
}
#endif

// visibility.band_start / summary_prefix.
__device__ __forceinline__ int band_start(int t, int chunk, int window) {
  return max(t / chunk - window, 0) * chunk;
}
__device__ __forceinline__ int summary_prefix(int t, int chunk, int summaries, int window) {
  return max(t / chunk - window, 0) * summaries;
}

}  // namespace ksa

// ==== kernel body ====
constexpr int BQ = 128;  // queries per tile: 8 warps x 16 rows
constexpr int BK = 64;   // keys per block
constexpr int NT = 256, NW = NT / 32;
constexpr float LOG2E = 1.4426950408889634f;
constexpr float LN2 = 0.6931471805599453f;
constexpr float RESCALE = 8.f;  // log2 of the largest unnormalised probability

const int n = params[0], n_sq = params[1], t0 = params[2], text_base = params[3];
const int window = params[4], Lt = params[5], Ls = params[6], text_tiles = params[7];
const int chunk = params[8], S = params[9], G = params[10];
const float sl2 = scale[0] * LOG2E;  // scores in the log2 domain: exp2 is one instruction

const int H = gridDim.y, h = blockIdx.y, b = blockIdx.z, Hkv = H / G;
// The warp's index as uniform: so are the warpgroup's rows, its branches and
// its K and V descriptors.
const int tid = threadIdx.x, warp = ksa::warp_uniform(tid >> 5), lane = tid & 31;
const size_t kv_head = size_t(b) * Hkv + h / G;
const T* kt = k_text + kv_head * Lt * D;
const T* vt = v_text + kv_head * Lt * D;
const T* ks = k_sum + kv_head * Ls * D;
const T* vs = v_sum + kv_head * Ls * D;

if (int(blockIdx.x) >= text_tiles) {
  // ---- summary queries: 8 lanes per query (E = D / 8 values each), so a
  // warp runs 4 queries at once, in rounds of NW warps x 4 ----
  constexpr int QL = 8, E = D / QL;
  const int c0 = t0 / chunk;
  const int sum_base = c0 * S + n_sq - Ls;  // k_sum may start after summary 0 (attention.summary_base)
  const int g = lane / QL, gl = lane % QL;
  for (int i = 0; i < BQ / NW / 4; ++i) {
    const int r0 = (blockIdx.x - text_tiles) * BQ + warp * (BQ / NW) + i * 4, r = r0 + g;
    if (r0 >= n_sq) break;  // warp-uniform
    // A group past the end still runs (the shuffles need every lane), on the
    // last query, and stores nothing.
    const int rq = min(r, n_sq - 1);
    const int c = c0 + rq / S, j = rq % S;
    const size_t qrow = (size_t(b) * H + h) * n_sq + rq;
    float q[E], acc[E];
    ksa::load_lane<T, E>(q, q_sum + qrow * D + gl * E);
    #pragma unroll
    for (int e = 0; e < E; ++e) acc[e] = 0.f;
    float m = ksa::NEG_INF, l = 0.f;
    // Keys: summaries c*S .. c*S+j, then texts c*k .. c*k+k-1; the trip count
    // S + k is the same for every group (key past j + k: skipped).
    #pragma unroll 3
    for (int key = 0; key < S + chunk; ++key) {
      const bool valid = key <= j + chunk, is_sum = key <= j;
      const int kt_i = min(key - j - 1, chunk - 1);
      const size_t row = is_sum ? size_t(c) * S + key - sum_base : size_t(c) * chunk + kt_i - text_base;
      float kr[E], vr[E];
      ksa::load_lane<T, E>(kr, (is_sum ? ks : kt) + row * D + gl * E);
      ksa::load_lane<T, E>(vr, (is_sum ? vs : vt) + row * D + gl * E);
      float x = 0.f;
      #pragma unroll
      for (int e = 0; e < E; ++e) x = fmaf(q[e], kr[e], x);
      #pragma unroll
      for (int o = QL / 2; o; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
      x = valid ? x * sl2 : ksa::NEG_INF;
      const float mn = fmaxf(m, x), base = mn == ksa::NEG_INF ? 0.f : mn;
      const float alpha = ksa::ex2(m - base), p = ksa::ex2(x - base);
      l = l * alpha + p;
      #pragma unroll
      for (int e = 0; e < E; ++e) acc[e] = fmaf(acc[e], alpha, p * vr[e]);
      m = mn;
    }
    if (r < n_sq) {
      const float inv = 1.f / l;
      unsigned* op = reinterpret_cast<unsigned*>(o_sum + qrow * D + gl * E);
      #pragma unroll
      for (int e = 0; e < E / 2; ++e) op[e] = ksa::pack2<T>(acc[2 * e] * inv, acc[2 * e + 1] * inv);
      if (gl == 0) lse_sum[qrow] = (m + log2f(l)) * LN2;
    }
  }
  return;
}

// ---- text queries ----
// Dynamic shared memory (96 KB at D = 128, past the 48 KB static limit),
// its tiles on whole swizzle atoms: Q, then two stages of K and V, so that
// block j + 1 loads while block j computes behind one barrier per block.
constexpr int STAGE = 2 * BK * D;
extern __shared__ unsigned char smem[];
T* const sQ = reinterpret_cast<T*>(smem + (-ksa::smem_addr(smem) & 1023u));
T* const sK = sQ + BQ * D;
T* const sV = sK + BK * D;
#ifdef KSA_WGMMA
// Each stage's mbarrier (TMA), after the stages; the maps k_sum, v_sum, k_text, v_text.
unsigned long long* const landed = reinterpret_cast<unsigned long long*>(sK + 2 * STAGE);
const unsigned char* const map = ksa::aligned(maps);
#endif
const int qt = text_tiles - 1 - blockIdx.x;  // heaviest tiles (most summaries) first
const int qa = qt * BQ;                       // first query, relative to t0
const int t_first = t0 + qa, t_last = t0 + min(qa + BQ, n) - 1;
const int n_sum = ksa::summary_prefix(t_last, chunk, S, window);
const int lo = ksa::band_start(t_first, chunk, window), hi = t_last + 1;
const int n_sb = (n_sum + BK - 1) / BK, n_blocks = n_sb + (hi - lo + BK - 1) / BK;
const size_t qbase = (size_t(b) * H + h) * n;
// This warpgroup's rows [w_first, w_last] (none when w_first > t_last) see
// summaries [0, w_sum) and texts [w_lo, w_last] between them; summary blocks
// ending by sum_full and text blocks in [band_full, w_first] are visible to
// every one of them: no mask.
const int w_first = t_first + warp / 4 * 64, w_last = min(w_first + 63, t_last);
const int w_sum = ksa::summary_prefix(w_last, chunk, S, window);
const int w_lo = ksa::band_start(w_first, chunk, window);
const int sum_full = ksa::summary_prefix(w_first, chunk, S, window);
const int band_full = ksa::band_start(w_last, chunk, window);

// Key block j: summary blocks first, then the text band. first_key is the
// key (summary index or text index) of its row 0.
auto first_key = [&](int j) { return j < n_sb ? j * BK : lo + (j - n_sb) * BK; };
// K and V block j (its stage) from global rows into shared memory.
auto load_block = [&](int j) {
  const bool is_sum = j < n_sb;
  const int first = first_key(j);
  const int row0 = is_sum ? first : first - text_base;
#ifdef KSA_WGMMA
  // One thread, 64 x 64 boxes. Rows past the array land as zeros; rows past
  // the tile's range within it (later summaries, later text) hold real keys,
  // which the mask hides as it hides the zeros cp.async writes there.
  if (tid == 0) {
    const unsigned char* m = map + (is_sum ? 0 : 256);
    unsigned long long* bar = landed + (j & 1);
    ksa::mbar_expect(bar, 2 * BK * D * sizeof(T));
    #pragma unroll
    for (int c = 0; c < D / 64; ++c) {
      ksa::tma_load(sK + (j & 1) * STAGE + c * BK * 64, m, c * 64, row0, int(kv_head), bar);
      ksa::tma_load(sV + (j & 1) * STAGE + c * BK * 64, m + 128, c * 64, row0, int(kv_head), bar);
    }
  }
#else
  const int end = is_sum ? n_sum : hi - text_base;
  ksa::load_rows<T, D, BK, NT>(sK + (j & 1) * STAGE, is_sum ? ks : kt, row0, end, tid);
  ksa::load_rows<T, D, BK, NT>(sV + (j & 1) * STAGE, is_sum ? vs : vt, row0, end, tid);
  ksa::cp_async_commit();
#endif
};

#ifdef KSA_WGMMA
if (tid == 0) {
  ksa::mbar_init(landed, 1);
  ksa::mbar_init(landed + 1, 1);
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  for (int i = 0; i < 4; ++i) ksa::tma_acquire(map + 128 * i);
}
__syncthreads();
#endif
ksa::load_rows<T, D, BQ, NT>(sQ, q_text + qbase * D, qa, n, tid);
load_block(0);
#ifdef KSA_WGMMA
// Q's copies form a group of their own: wait_group waits for committed groups only.
ksa::cp_async_commit();
ksa::cp_async_wait<0>();  // published by the loop's first barrier
ksa::publish_fence();
#endif

// This thread's two rows (r and r+8 of the warp's 16) and their key ranges:
// summaries [0, row_sum), text [row_lo, t + 1).
int t_row[2], row_lo[2], row_sum[2];
#pragma unroll
for (int rr = 0; rr < 2; ++rr) {
  t_row[rr] = t_first + warp * 16 + (lane >> 2) + rr * 8;
  row_lo[rr] = ksa::band_start(t_row[rr], chunk, window);
  row_sum[rr] = ksa::summary_prefix(t_row[rr], chunk, S, window);
}
float o[D / 8][4];
#pragma unroll
for (int i = 0; i < D / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
// Running maxima of the raw scores (the scale is positive, so it commutes
// with max and folds into the exponent's fma).
float m_row[2] = {ksa::NEG_INF, ksa::NEG_INF}, l_row[2] = {0.f, 0.f};
// The warpgroup from the thread index, not the uniform warp: `scores` makes
// Q's descriptor uniform at each use (see there).
const ksa::Operands<T, BQ, BK> tiles(sQ, sK, sV, tid >> 7);

for (int j = 0; j < n_blocks; ++j) {
  const int first = first_key(j);
  const bool is_sum = j < n_sb;
  // Warpgroup-uniform: the wgmma inside must run on all 128 threads or none.
  const bool mine = w_first <= t_last && (is_sum ? first < w_sum : first <= w_last && first + BK > w_lo);

#ifdef KSA_WGMMA
  // Every warp is done with block j - 1: its stage takes block j + 1; then
  // block j has landed.
  __syncthreads();
  if (j + 1 < n_blocks) load_block(j + 1);
  ksa::mbar_wait(landed + (j & 1), (j >> 1) & 1);
#else
  // Block j landed, and every warp is done with block j - 1: its stage
  // takes block j + 1.
  ksa::cp_async_wait<0>();
  ksa::publish_fence();
  __syncthreads();
  if (j + 1 < n_blocks) load_block(j + 1);
#endif
  const auto tile = tiles.stage((j & 1) * STAGE);
  float s[BK / 8][4];
  if (mine) ksa::scores<T, D, BQ, BK>(s, tile, warp, lane);

  if (mine) {
    const bool full = is_sum ? first + BK <= sum_full : first >= band_full && first + BK - 1 <= w_first;
    bool raise[2];
    float alpha[2];
    #pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      if (!full) {
        // Key first + nb*8 + (lane&3)*2 + e is visible iff its offset from klo is below the span.
        const int klo = is_sum ? 0 : row_lo[rr], khi = is_sum ? row_sum[rr] : t_row[rr] + 1;
        const int k0 = first + (lane & 3) * 2 - klo;
        #pragma unroll
        for (int nb = 0; nb < BK / 8; ++nb) {
          #pragma unroll
          for (int e = 0; e < 2; ++e)
            if (unsigned(k0 + nb * 8 + e) >= unsigned(khi - klo)) s[nb][rr * 2 + e] = ksa::NEG_INF;
        }
      }
      float mx = ksa::reduce<BK / 8>(s, rr, fmaxf);
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      // The exponent's reference max moves only when a score beats it by more
      // than RESCALE in the log2 domain (FlashAttention-4's lazy rescaling):
      // probabilities up to 2^RESCALE are exact in float32 and as P operands,
      // and most blocks then leave o alone. The first finite score always moves
      // it (mx - -inf = inf); a block with nothing visible never does.
      raise[rr] = (mx - m_row[rr]) * sl2 > RESCALE;
      const float mn = raise[rr] ? mx : m_row[rr];
      const float base = mn == ksa::NEG_INF ? 0.f : mn * sl2;  // a row with nothing visible yet
      alpha[rr] = raise[rr] ? ksa::ex2(m_row[rr] * sl2 - base) : 1.f;
      #pragma unroll
      for (int nb = 0; nb < BK / 8; ++nb) {
        s[nb][rr * 2] = ksa::ex2(fmaf(s[nb][rr * 2], sl2, -base));
        s[nb][rr * 2 + 1] = ksa::ex2(fmaf(s[nb][rr * 2 + 1], sl2, -base));
      }
      const float sum = ksa::reduce<BK / 8>(s, rr, [](float a, float b) { return a + b; });
      l_row[rr] = l_row[rr] * alpha[rr] + sum;  // per-thread partial; quad-reduced at the end
      m_row[rr] = mn;
    }
    if (__any_sync(0xffffffffu, raise[0] || raise[1])) {
      #pragma unroll
      for (int i = 0; i < D / 8; ++i) {
        o[i][0] *= alpha[0];
        o[i][1] *= alpha[0];
        o[i][2] *= alpha[1];
        o[i][3] *= alpha[1];
      }
    }
  }

  if (mine) ksa::accumulate<T, D, BQ, BK>(o, s, tile, lane);
}

#pragma unroll
for (int rr = 0; rr < 2; ++rr) {
  float l = l_row[rr];
  l += __shfl_xor_sync(0xffffffffu, l, 1);
  l += __shfl_xor_sync(0xffffffffu, l, 2);
  const int row = t_row[rr] - t0;
  if (row >= n) continue;
  const float inv = 1.f / l;
  unsigned* op = reinterpret_cast<unsigned*>(o_text + (qbase + row) * D + (lane & 3) * 2);
  #pragma unroll
  for (int i = 0; i < D / 8; ++i) op[i * 4] = ksa::pack2<T>(o[i][rr * 2] * inv, o[i][rr * 2 + 1] * inv);
  if ((lane & 3) == 0) lse_text[qbase + row] = (m_row[rr] * sl2 + log2f(l)) * LN2;
}
