"""Fused KSA prefill attention: text and summary queries in one launch.

`prefill_attention` has the semantics of `attention.reference_attention` and
returns None where the kernel does not serve the inputs (CPU, head dims other
than 64/128, mixed dtypes, float32 on CUDA where only the tensor-core path
exists), so the caller falls back to the reference. The sources are
metal/prefill.metal and cuda/prefill.cu: one algorithm (see their headers),
each file a header and a kernel body split at SPLIT.

`launch` computes everything a launch needs as plain values, so the tests run
the exact same launch through the CPU Metal emulator.
"""

import functools

import mlx.core as mx

from .. import visibility
from . import backend, constant, cuda_kernel, cuda_launch_bounds, scalar, source, tma

SPLIT = "// ==== kernel body ====\n"
INPUTS = ["q_text", "q_sum", "k_text", "v_text", "k_sum", "v_sum", "params", "scale"]
# CUDA also takes the TMA maps of K and V (kernels.tma), zeros where unused.
CUDA_INPUTS = INPUTS + ["maps"]
OUTPUTS = ["o_text", "o_sum", "lse_text", "lse_sum"]
# Queries (= rows of the grid's x axis) per tile and threads per tile.
TILE = {"metal": 32, "cuda": 128}
THREADS = {"metal": 128, "cuda": 256}
DTYPES = {"metal": (mx.float32, mx.float16, mx.bfloat16), "cuda": (mx.float16, mx.bfloat16)}
HEAD_DIMS = (64, 128)
# The CUDA text tile's Q and two stages of K and V (64 keys) at the largest
# head dim, their two mbarriers, plus the slack that puts them on 1024-byte
# swizzle atoms.
CUDA_SHARED = (TILE["cuda"] + 4 * 64) * max(HEAD_DIMS) * 2 + 16 + 1024
NO_MAPS = mx.zeros((5 * tma.MAP_BYTES,), mx.uint8)


def split_source(name):
    """(header, body) of a kernel source file."""
    header, body = source(name).split(SPLIT)
    return header, body


@functools.lru_cache(maxsize=None)
def kernel(back_end, wgmma=True):
    """The kernel object for 'metal' or 'cuda'; MLX compiles once per template.
    wgmma=False: the CUDA kernel's mma.sync path (see `kernels.cuda_kernel`)."""
    if back_end == "metal":
        header, body = split_source("metal/prefill.metal")
        return mx.fast.metal_kernel("ksa_prefill", INPUTS, OUTPUTS, body, header)
    header, body = split_source("cuda/prefill.cu")
    # 128 registers (from 167, no spill on sm_90a): 2 tiles (16 warps) per SM, not 1.
    header += cuda_launch_bounds(THREADS["cuda"], 2)
    return cuda_kernel("ksa_prefill", CUDA_INPUTS, OUTPUTS, body, header, CUDA_SHARED, wgmma)


def supported(q_text, q_sum, k_text, v_text, k_sum, v_sum, *, scale, back_end=None):
    """Whether the kernel of `back_end` (default: the current one) serves these inputs."""
    back_end = back_end or backend()
    # The kernels take running maxima of unscaled scores, so the scale must be
    # positive (it always is: D ** -0.5 unless a caller overrides it).
    if back_end is None or not scale > 0:
        return False
    arrays = (q_text, q_sum, k_text, v_text, k_sum, v_sum)
    D = q_text.shape[-1]
    return (
        all(x.ndim == 4 and x.dtype == q_text.dtype and x.shape[-1] == D for x in arrays)
        and q_text.dtype in DTYPES[back_end]
        and D in HEAD_DIMS
        and q_text.shape[2] > 0
        and q_text.shape[1] % k_text.shape[1] == 0
    )


def nonempty(x):
    # Zero-size buffers are not bound reliably; the kernel never reads these.
    return x if x.size else mx.zeros((*x.shape[:2], 1, *x.shape[3:]), x.dtype)


def launch(back_end, q_text, q_sum, k_text, v_text, k_sum, v_sum, *, layout, window, t0,
           text_base, scale, text=True):
    """Keyword arguments of one kernel call (inputs, grid, threadgroup, template, outputs).

    text=False launches the summary tiles only (o_text, lse_text stay unwritten).
    """
    B, H, n, D = q_text.shape
    Hkv, Lt, Ls, n_sq = k_text.shape[1], k_text.shape[2], k_sum.shape[2], q_sum.shape[2]
    rows = TILE[back_end]
    text_tiles, sum_tiles = -(-n // rows) if text else 0, -(-n_sq // rows)
    params = [n, n_sq, t0, text_base, window, Lt, Ls, text_tiles,
              layout.chunk, layout.summaries, H // Hkv, H]
    dtype = q_text.dtype
    k_sum, v_sum = nonempty(k_sum), nonempty(v_sum)
    extra = []
    if back_end == "cuda":
        # The maps name these arrays' buffers: made contiguous here, the
        # kernel gets the very buffers (it would copy a strided one).
        k_text, v_text, k_sum, v_sum = (mx.contiguous(x) for x in (k_text, v_text, k_sum, v_sum))
        maps = tma.maps(k_text, v_text, k_sum, v_sum)
        extra = [maps if maps is not None else NO_MAPS]
    return dict(
        inputs=[q_text, nonempty(q_sum), k_text, v_text, k_sum, v_sum,
                constant(tuple(map(int, params))), scalar(scale), *extra],
        grid=((text_tiles + sum_tiles) * THREADS[back_end], H, B),
        threadgroup=(THREADS[back_end], 1, 1),
        template=[("T", dtype), ("D", D)],
        # At least one summary row, so that no output is empty; cut back after.
        output_shapes=[(B, H, n if text else 1, D), (B, H, max(n_sq, 1), D),
                       (B, H, n if text else 1), (B, H, max(n_sq, 1))],
        output_dtypes=[dtype, dtype, mx.float32, mx.float32],
    )


def cut(outputs, q_sum):
    """A launch's (o_text, o_sum, lse_text, lse_sum) with the summary outputs
    cut back to q_sum's rows (the launch makes at least one)."""
    o_text, o_sum, lse_text, lse_sum = outputs
    n_sq = q_sum.shape[2]
    return o_text, o_sum[:, :, :n_sq], lse_text, lse_sum[:, :, :n_sq]


def causal_text(n, *, layout, window, t0, text_base, back_end=None):
    """Whether prefill_attention sends the text queries to causal SDPA (unless
    asked for lse): a whole-context layer's text queries over keys of their own
    length are plain causal attention, which cuDNN runs at ~2.5x this kernel's rate."""
    k, lo = layout.chunk, visibility.band_start(t0, layout.chunk, window)
    return ((back_end or backend()) == "cuda" and lo == text_base == t0
            and visibility.summary_prefix(t0 + n - 1, k, layout.summaries, window) == 0
            and visibility.band_start(t0 + n - 1, k, window) == lo)


def prefill_attention(q_text, q_sum, k_text, v_text, k_sum, v_sum, *, layout, window, t0,
                      text_base, scale, return_lse=False):
    """`reference_attention` in one fused launch, or None where unsupported.

    Returns (o_text, o_sum), plus (lse_text [B, H, n], lse_sum [B, H, m*S]) in
    float32 (natural log of each query's softmax denominator, scores scaled)
    when return_lse.
    """
    back_end = backend()
    arrays = (q_text, q_sum, k_text, v_text, k_sum, v_sum)
    if not supported(*arrays, scale=scale, back_end=back_end):
        return None
    k, n = layout.chunk, q_text.shape[2]
    if text_base % k or text_base > visibility.band_start(t0, k, window):
        raise ValueError(f"text keys start at {text_base}, after the window of query {t0}")
    causal = not return_lse and causal_text(n, layout=layout, window=window, t0=t0,
                                            text_base=text_base, back_end=back_end)
    args = launch(back_end, *arrays, layout=layout, window=window, t0=t0,
                  text_base=text_base, scale=scale, text=not causal)
    # Without maps (no driver found) a Hopper's kernel must not take its TMA path.
    wgmma = back_end != "cuda" or args["inputs"][-1] is not NO_MAPS
    o_text, o_sum, lse_text, lse_sum = cut(kernel(back_end, wgmma)(**args), q_sum)
    if causal:
        o_text = mx.fast.scaled_dot_product_attention(q_text, k_text, v_text, scale=scale,
                                                      mask="causal")
    return (o_text, o_sum, lse_text, lse_sum) if return_lse else (o_text, o_sum)
