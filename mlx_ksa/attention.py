"""KSA attention over the two streams of `layout`.

``ksa_attention`` is the one entry point the model calls for a block of new
tokens. Its keys are the text stream from ``text_base`` (a chunk boundary at
or before the first query's window) and the whole summary stream; the queries
are text tokens ``[t0, t0 + n)`` and the summaries of the chunks those tokens
complete. A fused kernel serves it where one exists for the back end; the
pure-MLX reference below serves everything else and is the oracle the
kernels are tested against.

The reference never builds an O(N^2) mask. It walks the text queries in
chunk-aligned blocks; a block's keys are the summaries that left the window
of its last query (one contiguous prefix) plus the text band from the first
query's window start to the block's end, and only that [block, keys] mask is
built, from `visibility`.
"""

import mlx.core as mx

from . import visibility
from .kernels import prefill, prefill_backward

# Largest score tile (queries x keys x heads x batch) one reference block may
# build. MLX keeps several tiles in flight, so on the CPU small tiles bound the
# peak (about 100 MB at 32K tokens) and run no slower; on a GPU larger tiles
# save launches.
SCORE_BUDGET = {"cpu": 1 << 21, "gpu": 1 << 27}


def ksa_attention(q_text, q_sum, k_text, v_text, k_sum, v_sum, *, layout, window, t0,
                  text_base, scale):
    """Attention of new text and summary queries over the KSA-visible keys.

    q_text: [B, H, n, D], text indices t0 .. t0+n-1.
    q_sum: [B, H, m*S, D], the summaries of the m chunks completed by those texts.
    k_text, v_text: [B, Hkv, Lt, D], text indices text_base .. t0+n-1.
    k_sum, v_sum: [B, Hkv, Ls, D], the summary stream up to the new queries'
        last summary; it starts at `summary_base` (0, except for a cache
        that keeps no summaries).
    Returns (o_text [B, H, n, D], o_sum [B, H, m*S, D]).
    """
    arrays = (q_text, q_sum, k_text, v_text, k_sum, v_sum)
    opts = dict(layout=layout, window=window, t0=t0, text_base=text_base, scale=scale)
    reference = lambda *xs: reference_attention(*xs, **opts)
    if not prefill.supported(*arrays, scale=scale):  # CPU, or inputs no kernel serves
        return reference(*arrays)
    # The kernels have no autodiff: the vjp runs the backward kernel on the
    # forward's outputs and lse, hidden from the caller. Where causal SDPA serves
    # the text (faster, but no lse) the backward recomputes the forward with lse.
    save_lse = not prefill.causal_text(q_text.shape[2], layout=layout, window=window, t0=t0,
                                       text_base=text_base)
    fused = mx.custom_function(lambda *xs: prefill.prefill_attention(*xs, **opts, return_lse=save_lse))

    # The backward kernel reads summary keys from summary 0 (no cache: training).
    backward_kernel = summary_base(t0, q_sum.shape[2], k_sum.shape[2], layout) == 0

    @fused.vjp
    def fused_vjp(primals, cotangents, outputs):
        if not save_lse:
            outputs = prefill.prefill_attention(*primals, **opts, return_lse=True)
        grads = None
        if backward_kernel:
            grads = prefill_backward.prefill_attention_vjp(primals, outputs, cotangents[:2], **opts)
        if grads is None:
            grads = mx.vjp(reference, list(primals), list(cotangents[:2]))[1]
        return grads

    return tuple(fused(*arrays)[:2])


def reference_attention(q_text, q_sum, k_text, v_text, k_sum, v_sum, *, layout, window, t0,
                        text_base, scale):
    k, S = layout.chunk, layout.summaries
    n = q_text.shape[2]
    if text_base % k or text_base > visibility.band_start(t0, k, window):
        raise ValueError(f"text keys start at {text_base}, after the window of query {t0}")
    base = summary_base(t0, q_sum.shape[2], k_sum.shape[2], layout)
    if base and visibility.summary_prefix(t0 + n - 1, k, S, window):
        raise ValueError(f"summary keys start at {base}, but query {t0 + n - 1} sees older ones")
    o_text = [
        _text_block(q_text[:, :, a - t0 : b - t0], k_text, v_text, k_sum, v_sum,
                    k, S, window, a, b, text_base, scale)
        for a, b in _text_blocks(q_text, k_text, t0, n, layout, window, text_base)
    ]
    o_text = mx.concatenate(o_text, axis=2) if len(o_text) > 1 else o_text[0]
    return o_text, _summary_queries(q_sum, k_text, v_text, k_sum, v_sum, layout, t0,
                                    text_base, base, scale)


def summary_base(t0, n_sum_queries, n_sum_keys, layout):
    """Summary index of the first summary key. The keys run up to the last new
    summary; a cache that keeps no summaries (a layer whose window covers every
    context it sees) passes only the new ones, which is enough: its text
    queries see no summary, and a summary query sees its own chunk's only."""
    base = (t0 // layout.chunk) * layout.summaries + n_sum_queries - n_sum_keys
    if base < 0:
        raise ValueError(f"{n_sum_keys} summary keys, more than the {base + n_sum_keys} up to the new ones")
    return base


def _text_blocks(q, k_text, t0, n, layout, window, text_base):
    """Chunk-aligned [a, b) query ranges whose score tiles fit SCORE_BUDGET."""
    k = layout.chunk
    B, H = q.shape[:2]
    t1 = t0 + n
    # Worst-case keys of a block: the window band plus every visible summary.
    band = min(window + 1, t1 // k + 1) * k
    keys = band + visibility.summary_prefix(t1 - 1, k, layout.summaries, window)
    budget = SCORE_BUDGET["gpu" if mx.default_device().type == mx.gpu else "cpu"]
    rows = max(k, budget // max(1, B * H * (keys + 1)) // k * k)
    blocks, a = [], t0
    while a < t1:
        b = min(t1, (a // k) * k + rows)
        blocks.append((a, b))
        a = b
    return blocks


def _text_block(q, k_text, v_text, k_sum, v_sum, k, S, window, a, b, text_base, scale):
    lo = visibility.band_start(a, k, window)
    n_sum = visibility.summary_prefix(b - 1, k, S, window)
    keys = k_text[:, :, lo - text_base : b - text_base]
    vals = v_text[:, :, lo - text_base : b - text_base]
    t = mx.arange(a, b)[:, None]
    t_key = mx.arange(lo, b)[None, :]
    if n_sum == 0 and visibility.band_start(b - 1, k, window) == lo:
        mask = "causal"
    else:
        mask = (visibility.band_start(t, k, window) <= t_key) & (t_key <= t)
        if n_sum:
            s_key = mx.arange(n_sum)[None, :]
            mask = mx.concatenate(
                [s_key < visibility.summary_prefix(t, k, S, window), mask], axis=1
            )
            keys = mx.concatenate([k_sum[:, :, :n_sum], keys], axis=2)
            vals = mx.concatenate([v_sum[:, :, :n_sum], vals], axis=2)
    return mx.fast.scaled_dot_product_attention(q, keys, vals, scale=scale, mask=mask)


def _summary_queries(q_sum, k_text, v_text, k_sum, v_sum, layout, t0, text_base, sum_base, scale):
    """Each completed chunk's summaries over [its summaries | its text], chunks as batch."""
    k, S = layout.chunk, layout.summaries
    B, H, mS, D = q_sum.shape
    if mS == 0:  # no completed chunk, or S = 0 (the no-summary baseline)
        return q_sum
    m = mS // S
    c0 = t0 // k

    def per_chunk(x, start, width):
        x = x[:, :, start : start + m * width]
        x = x.reshape(x.shape[0], x.shape[1], m, width, D).transpose(0, 2, 1, 3, 4)
        return x.reshape(-1, x.shape[2], width, D)

    keys = mx.concatenate(
        [per_chunk(k_sum, c0 * S - sum_base, S), per_chunk(k_text, c0 * k - text_base, k)], axis=2
    )
    vals = mx.concatenate(
        [per_chunk(v_sum, c0 * S - sum_base, S), per_chunk(v_text, c0 * k - text_base, k)], axis=2
    )
    mask = mx.array(visibility.summary_mask(k, S))
    out = mx.fast.scaled_dot_product_attention(
        per_chunk(q_sum, 0, S), keys, vals, scale=scale, mask=mask
    )
    out = out.reshape(B, m, H, S, D).transpose(0, 2, 1, 3, 4)
    return out.reshape(B, H, m * S, D)
