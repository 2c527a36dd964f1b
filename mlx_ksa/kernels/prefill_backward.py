"""Backward of the fused KSA prefill attention: dQ, dK, dV in one launch.

FlashAttention-2 style from the forward's saved output and log-sum-exp:
Delta = rowsum(dO * O) (here, with mx ops), then per visible (query, key)
pair P = exp(s - lse), dV += P dO, dS = P (dP - Delta) with dP = dO . v,
dQ += dS k, dK += dS q (scaled). Query tiles compute dQ over the keys their
rows see, key tiles dK/dV over the queries that see their rows (summed over
the G query heads of a KV head), so no output is written twice and no
atomics are needed. The visible pairs come from the `visibility` math; see
metal/prefill_backward.metal and cuda/prefill_backward.cu (one algorithm).

`launch` returns a launch as plain values, so the tests run the exact same
launch through the CPU Metal emulator.
"""

import functools

import mlx.core as mx

from . import backend, constant, cuda_kernel, prefill, scalar
from .prefill import nonempty

INPUTS = ["q_text", "q_sum", "k_text", "v_text", "k_sum", "v_sum", "do_text", "do_sum",
          "lse_text", "lse_sum", "delta_text", "delta_sum", "params", "scale"]
OUTPUTS = ["dq_text", "dq_sum", "dk_text", "dv_text", "dk_sum", "dv_sum"]
# Rows per tile and threads per tile.
TILE = {"metal": 32, "cuda": 64}
THREADS = {"metal": 128, "cuda": 128}
# The CUDA tile's two row tiles and two stages of a 32-row partner block (two
# tiles, and the partners' lse and Delta) at the largest head dim, plus the
# slack that puts them on 1024-byte swizzle atoms.
CUDA_SHARED = (2 * TILE["cuda"] + 4 * 32) * max(prefill.HEAD_DIMS) * 2 + 4 * 32 * 4 + 1024


@functools.lru_cache(maxsize=None)
def kernel(back_end, wgmma=True):
    """The kernel object for 'metal' or 'cuda'; MLX compiles once per template.
    wgmma=False: the CUDA kernel's mma.sync path (see `kernels.cuda_kernel`)."""
    path = {"metal": "metal/prefill_backward.metal", "cuda": "cuda/prefill_backward.cu"}[back_end]
    header, body = prefill.split_source(path)
    # After the forward's header: its device helpers and visibility math.
    header = prefill.split_source(path.replace("_backward", ""))[0] + header
    if back_end == "metal":
        return mx.fast.metal_kernel("ksa_prefill_backward", INPUTS, OUTPUTS, body, header)
    return cuda_kernel("ksa_prefill_backward", INPUTS, OUTPUTS, body, header, CUDA_SHARED, wgmma)


def supported(*arrays, scale, back_end=None):
    """Whether the backward kernel serves these primals: wherever the forward does."""
    return prefill.supported(*arrays, scale=scale, back_end=back_end)


def launch(back_end, primals, outputs, cotangents, *, layout, window, t0, text_base, scale):
    """Keyword arguments of one kernel call (inputs, grid, threadgroup, template, outputs).

    primals: (q_text, q_sum, k_text, v_text, k_sum, v_sum); outputs: the
    forward's (o_text, o_sum, lse_text, lse_sum); cotangents: (do_text, do_sum).
    """
    q_text, q_sum, k_text, v_text, k_sum, v_sum = primals
    B, H, n, D = q_text.shape
    Hkv, Lt, Ls, n_sq = k_text.shape[1], k_text.shape[2], k_sum.shape[2], q_sum.shape[2]
    k, dtype = layout.chunk, q_text.dtype
    dos = [c.astype(dtype) for c in cotangents]
    # Delta in float32 from the output the kernel rounded, as FlashAttention does.
    deltas = [(c.astype(mx.float32) * o.astype(mx.float32)).sum(-1) for c, o in zip(dos, outputs)]
    rows = TILE[back_end]
    tiles = [-(-x // rows) for x in (Ls, n, Lt, n_sq)]  # the kernel's tile order
    # A window past the last chunk changes no band_start / summary_prefix and
    # keeps the kernel's window_end (c + window + 1) * k inside int32.
    window = min(window, (t0 + n) // k + 1)
    params = [n, n_sq, t0, text_base, window, Lt, Ls, k, layout.summaries, H // Hkv, H, *tiles]
    return dict(
        inputs=[*map(nonempty, (q_text, q_sum, k_text, v_text, k_sum, v_sum, dos[0], dos[1],
                                 outputs[2], outputs[3], deltas[0], deltas[1])),
                constant(tuple(map(int, params))), scalar(scale)],
        grid=(sum(tiles) * THREADS[back_end], H, B),
        threadgroup=(THREADS[back_end], 1, 1),
        template=[("T", dtype), ("D", D)],
        # At least one summary row, so that no output is empty; cut back after.
        output_shapes=[q_text.shape, (B, H, max(n_sq, 1), D), k_text.shape, v_text.shape,
                       (B, Hkv, max(Ls, 1), D), (B, Hkv, max(Ls, 1), D)],
        output_dtypes=[dtype] * 6,
    )


def cut(grads, primals):
    """The kernel's outputs cut back to the primals' shapes."""
    return [g[:, :, : x.shape[2]] for g, x in zip(grads, primals)]


def prefill_attention_vjp(primals, outputs, cotangents, *, layout, window, t0, text_base, scale):
    """Gradients of (q_text, q_sum, k_text, v_text, k_sum, v_sum) from the
    forward's outputs (o_text, o_sum, lse_text, lse_sum) and the cotangents of
    (o_text, o_sum), or None where the kernel does not serve the inputs."""
    back_end = backend()
    if not supported(*primals, scale=scale, back_end=back_end):
        return None
    args = launch(back_end, primals, outputs, cotangents, layout=layout, window=window, t0=t0,
                  text_base=text_base, scale=scale)
    return cut(kernel(back_end)(**args), primals)
