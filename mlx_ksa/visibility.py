"""The KSA visibility rule (KSA-SPEC section 2), stated once.

In the two-stream view of `layout` the rule is a pair of ranges per query:

* a text query at text index ``t`` in chunk ``c = t // k`` sees the text
  ``[band_start(t), t]`` (its own chunk causally and the ``W`` chunks before
  it) and the summary prefix ``[0, summary_prefix(t))`` (the summaries of the
  chunks ``0 .. c - W - 1``, which left its window);
* the ``j``-th summary query of chunk ``c`` sees the text of chunk ``c`` and
  the summaries ``c*S .. c*S + j`` of its own chunk.

Every other piece (reference attention, kernels, cache slicing, masks) calls
these functions; ``visible`` restates them on the interleaved index so the
tests can compare them with the spec's predicate. The arithmetic works on
Python ints, numpy arrays and mx arrays alike.
"""

import numpy as np


def _relu(x):
    return x * (x > 0)


def band_start(t, chunk, window):
    """First text index visible to the text query at text index t."""
    return _relu(t // chunk - window) * chunk


def summary_prefix(t, chunk, summaries, window):
    """Number of leading summaries visible to the text query at text index t."""
    return _relu(t // chunk - window) * summaries


def summary_mask(chunk, summaries):
    """[S, S + k] mask of one chunk's summary queries over [its summaries | its text]."""
    j = np.arange(summaries)[:, None]
    col = np.arange(summaries + chunk)[None, :]
    return (col >= summaries) | (col <= j)


def visible(q, kv, layout, window):
    """Whether expanded index q may attend to expanded index kv (numpy, broadcasts)."""
    k, S = layout.chunk, layout.summaries
    q_sum, q_chunk, q_off = layout.split(q)
    kv_sum, kv_chunk, kv_off = layout.split(kv)
    t_q = q_chunk * k + q_off  # text index, when q is text
    t_kv = kv_chunk * k + kv_off
    s_kv = kv_chunk * S + kv_off  # summary index, when kv is a summary
    text_sees = np.where(
        kv_sum,
        s_kv < summary_prefix(t_q, k, S, window),
        (band_start(t_q, k, window) <= t_kv) & (t_kv <= t_q),
    )
    summary_sees = (kv_chunk == q_chunk) & np.where(kv_sum, kv_off <= q_off, True)
    return np.where(q_sum, summary_sees, text_sees)
