"""Side-by-side benchmark of KSA against dense attention, in one process.

    python -m mlx_ksa.bench --out bench.json            # the full run (H200: minutes)
    python -m mlx_ksa.bench --quick --sections cpu      # CPU smoke run: seconds

Sections:
  prefill  one KSA layer's prefill attention (bf16, B=1, 32/8 heads, D=128,
           k=8, W=128): `attention.ksa_attention` (the fused kernel where one
           serves), MLX's causal SDPA over the text, `attention.reference_attention`;
           TFLOP/s over the KSA-visible score entries (visibility formulas) and,
           for SDPA, over the causal ones.
  decode   one KSA layer's decode attention at a context: the decode kernel
           over KSACache's buffer (the whole call, and its GPU time with the
           graphs built before the clock starts) vs SDPA over a dense cache of
           the same length; bytes of K/V read per second against a measured
           copy bandwidth.
  model    the whole model with random weights in the KSA-4B-base shapes vs the
           same shapes with every layer dense (mlx-lm's qwen3): prefill
           tokens/s, decode tokens/s (caches filled with random K/V: decode
           speed does not depend on the values, and no long prefill is needed),
           KV bytes.
  batch    decode steps of the whole model (the model section's shapes, KV
           caches filled with random K/V) for 8 sequences of mixed lengths,
           at different chunk phases: all rows together (BatchKSACache, one
           fused step per layer) against the same sequences decoded one at a
           time; aggregate tokens/s.
  kvbits   decode steps of the whole model (the model section's shapes) at one
           context with the KSA caches in 16-bit and quantized to 8 and 4 bits
           (QuantizedKSACache): tokens/s and KV bytes.
  train    training steps (forward, backward, AdamW) of a small model in the
           KSA-4B-base layer mix vs the same shapes dense (mlx-lm's qwen3):
           tokens/s at each sequence length.
  cpu      the CPU reference path (float32) vs MLX's dense SDPA on the CPU.

Timing: warmup, then the median of several runs, each ended by mx.eval and
mx.synchronize; sub-millisecond ops run `inner` times per timed run. The
prefill section's three contenders take turns run by run, so that the GPU's
clock changes reach all of them alike.
"""

import argparse
import json
import statistics
import time

import mlx.core as mx
import numpy as np

from . import visibility
from .attention import ksa_attention, reference_attention
from .cache import KSACache, decode_reference
from .kernels import backend
from .kernels import decode as decode_kernel
from .layout import Layout

SECTIONS = ("prefill", "decode", "model", "batch", "kvbits", "train", "cpu")
# Full and --quick sizes. The layer shapes are KSA-4B-base's.
FULL = dict(
    layer=dict(H=32, Hkv=8, D=128, k=8, S=1, W=128),
    prefill=[16384, 65536, 131072], reference_max=65536,
    decode=[16384, 65536, 131072],
    model=dict(hidden_size=2560, num_hidden_layers=36, intermediate_size=9728,
               num_attention_heads=32, num_key_value_heads=8, head_dim=128,
               vocab_size=151937, windows="([128]*3+[16768]*1)*9"),
    model_prefill=[16384, 65536], model_decode=[16384, 65536, 131072], decode_steps=20,
    # + i: every sequence at another chunk phase.
    batch_contexts=[n + i for i, n in enumerate([512, 1024, 2048, 4096, 8192, 12288, 16384, 20480])],
    kvbits_context=65536, kv_bits=[8, 4],
    train=dict(hidden_size=1024, num_hidden_layers=12, intermediate_size=3072,
               num_attention_heads=8, num_key_value_heads=2, head_dim=128,
               vocab_size=32001, windows="([128]*3+[2048])*3"),
    train_lengths=[4096, 16384], train_steps=5,
    cpu=8192, copy_bytes=1 << 30,
)
QUICK = dict(
    layer=dict(H=4, Hkv=1, D=64, k=8, S=1, W=4),
    prefill=[256], reference_max=256, decode=[256],
    model=dict(hidden_size=64, num_hidden_layers=4, intermediate_size=128,
               num_attention_heads=4, num_key_value_heads=1, head_dim=64,
               vocab_size=257, windows="[4]*3+[64]"),
    model_prefill=[128], model_decode=[128], decode_steps=3,
    batch_contexts=[n + i for i, n in enumerate([8, 16, 24, 32, 48, 64, 96, 128])],
    kvbits_context=128, kv_bits=[8, 4],
    train=dict(hidden_size=64, num_hidden_layers=4, intermediate_size=128,
               num_attention_heads=4, num_key_value_heads=1, head_dim=64,
               vocab_size=257, windows="[4]*3+[64]"),
    train_lengths=[128], train_steps=2,
    cpu=256, copy_bytes=1 << 22,
)


DENSE_CPU_MAX = 8192


def timeit(fns, warmup=1, repeats=5, inner=1):
    """Median seconds of one call of fns (a function), or of each function in
    fns (a dict of them: a dict of medians). A dict's functions take turns,
    one call each per repeat, so that the GPU's clock changes over the run
    (boost, temperature) reach all of them alike."""
    named = fns if isinstance(fns, dict) else {None: fns}
    for _ in range(warmup):
        for fn in named.values():
            mx.eval(fn())
    mx.synchronize()
    times = {name: [] for name in named}
    for _ in range(repeats):
        for name, fn in named.items():
            t = time.perf_counter()
            mx.eval([fn() for _ in range(inner)])
            mx.synchronize()
            times[name].append((time.perf_counter() - t) / inner)
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    return medians if isinstance(fns, dict) else medians[None]


def timeit_prebuilt(fn, warmup=1, repeats=5, inner=50):
    """Median seconds per fn() output when `inner` graphs are built before the
    clock starts and evaluated together: the GPU's time where the host can
    launch faster than the kernels run (no GPU timers in MLX)."""
    for _ in range(warmup):
        mx.eval(fn())
    mx.synchronize()
    times = []
    for _ in range(repeats):
        outs = [fn() for _ in range(inner)]
        t = time.perf_counter()
        mx.eval(outs)
        mx.synchronize()
        times.append((time.perf_counter() - t) / inner)
    return statistics.median(times)


def randn(*shape, dtype=mx.bfloat16):
    return mx.random.normal(shape).astype(dtype)


def visible_entries(n, k, S, W):
    """Score entries a KSA prefill of n text tokens computes (KSA-SPEC section 2)."""
    t = np.arange(n, dtype=np.int64)
    text = t - visibility.band_start(t, k, W) + 1 + visibility.summary_prefix(t, k, S, W)
    return int(text.sum()) + (n // k) * (S * k + S * (S + 1) // 2)


def tflops(entries, H, D, seconds):
    return 4 * entries * H * D / seconds / 1e12  # QK^T and PV, 2 flops per MAC


# -- sections ------------------------------------------------------------
def bench_prefill(cfg, dtype=mx.bfloat16):
    L = cfg["layer"]
    H, Hkv, D, k, S, W = (L[x] for x in ("H", "Hkv", "D", "k", "S", "W"))
    layout, scale = Layout(k, S), D**-0.5
    rows = []
    for n in cfg["prefill"]:
        m = n // k * S
        q_t, q_s = randn(1, H, n, D, dtype=dtype), randn(1, H, m, D, dtype=dtype)
        k_t, v_t = randn(1, Hkv, n, D, dtype=dtype), randn(1, Hkv, n, D, dtype=dtype)
        k_s, v_s = randn(1, Hkv, m, D, dtype=dtype), randn(1, Hkv, m, D, dtype=dtype)
        mx.eval(q_t, q_s, k_t, v_t, k_s, v_s)
        opts = dict(layout=layout, window=W, t0=0, text_base=0, scale=scale)
        args = (q_t, q_s, k_t, v_t, k_s, v_s)
        entries, causal = visible_entries(n, k, S, W), n * (n + 1) // 2
        row = dict(n=n, visible_entries=entries, causal_entries=causal)
        fns = {"ksa_s": lambda: ksa_attention(*args, **opts),
               "sdpa_causal_s": lambda: mx.fast.scaled_dot_product_attention(
                   q_t, k_t, v_t, scale=scale, mask="causal")}
        row["reference_s"] = row["reference_peak_bytes"] = None
        if n <= cfg["reference_max"]:
            fns["reference_s"] = lambda: reference_attention(*args, **opts)
            row["reference_peak_bytes"] = peak(lambda: mx.eval(fns["reference_s"]()))[1]
        row.update(timeit(fns, repeats=7))
        row["dense_mask_bytes"] = (n + m) ** 2  # the boolean mask alone a masked SDPA would need
        row["ksa_tflops"] = tflops(entries, H, D, row["ksa_s"])
        row["sdpa_causal_tflops"] = tflops(causal, H, D, row["sdpa_causal_s"])
        if row["reference_s"]:
            row["reference_tflops"] = tflops(entries, H, D, row["reference_s"])
        rows.append(row)
    return rows


def peak(fn):
    """(fn(), peak bytes MLX allocated during it beyond what was live before)."""
    mx.synchronize()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    out = fn()
    return out, mx.get_peak_memory() - base


def copy_bandwidth(nbytes):
    """Bytes read + written per second by an elementwise op over nbytes."""
    x = randn(nbytes // 2)
    mx.eval(x)
    return 2 * nbytes / timeit(lambda: x + 1, warmup=2, repeats=7)


def ksa_layer_cache(T, Hkv, D, k, S, W, dtype, keys=None, values=None):
    """A KSACache holding T text tokens of random K/V (or the given [1, Hkv, >=T, D] ones)."""
    keys = randn(1, Hkv, T, D, dtype=dtype) if keys is None else keys[:, :, :T]
    values = randn(1, Hkv, T, D, dtype=dtype) if values is None else values[:, :, :T]
    cache = KSACache(k, S, W, keep_summaries=visibility.summary_prefix(T, k, S, W) > 0)
    cache.context(T, keys)
    n_sum = T // k * S
    cache.commit(keys, values, 0, keys[:, :, :n_sum], values[:, :, :n_sum])
    return cache


def bench_decode(cfg, dtype=mx.bfloat16):
    L = cfg["layer"]
    H, Hkv, D, k, S, W = (L[x] for x in ("H", "Hkv", "D", "k", "S", "W"))
    scale, size = D**-0.5, mx.finfo(dtype).bits // 8
    copy = copy_bandwidth(cfg["copy_bytes"])
    served = backend() is not None
    rows = []
    for T in cfg["decode"]:
        cache = ksa_layer_cache(T, Hkv, D, k, S, W, dtype)
        q = randn(1, H, 1, D, dtype=dtype)
        ranges = cache.store_decode(randn(1, Hkv, 1, D, dtype=dtype), randn(1, Hkv, 1, D, dtype=dtype))
        args = (q, cache.keys, cache.values, *ranges, scale)
        dense_k, dense_v = randn(1, Hkv, T + 1, D, dtype=dtype), randn(1, Hkv, T + 1, D, dtype=dtype)
        mx.eval(cache.keys, cache.values, q, dense_k, dense_v)
        keys_read = ranges[1] - ranges[0]
        kernel = decode_kernel.decode_attention(*args) is not None
        row = dict(context=T, ksa_keys_read=keys_read, kernel=kernel)
        row["ksa_s"] = timeit(lambda: (decode_kernel.decode_attention if kernel else decode_reference)(*args),
                              warmup=3, inner=50)
        row["reference_s"] = timeit(lambda: decode_reference(*args), warmup=3, inner=50)
        row["dense_sdpa_s"] = timeit(
            lambda: mx.fast.scaled_dot_product_attention(q, dense_k, dense_v, scale=scale),
            warmup=3, inner=50)
        kv = lambda keys: 2 * Hkv * keys * D * size
        row["ksa_GBps"] = kv(keys_read) / row["ksa_s"] / 1e9
        row["dense_GBps"] = kv(T + 1) / row["dense_sdpa_s"] / 1e9
        row["prebuilt_s"] = row["prebuilt_GBps"] = None
        if kernel:
            # The kernel's own cost: the graphs are built before the clock
            # starts, as the per-call planning makes a lone step host-bound.
            row["prebuilt_s"] = timeit_prebuilt(lambda: decode_kernel.decode_attention(*args), warmup=3)
            row["prebuilt_GBps"] = kv(keys_read) / row["prebuilt_s"] / 1e9
        rows.append(row)
    return dict(copy_GBps=copy / 1e9, backend=backend() if served else "cpu", rows=rows)


def model_args(cfg, max_context, key="model"):
    from .model import ModelArgs

    M = cfg[key]
    shapes = {x: M[x] for x in ("hidden_size", "num_hidden_layers", "intermediate_size",
                                "num_attention_heads", "num_key_value_heads", "head_dim")}
    common = dict(model_type="qwen3", rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=True,
                  max_position_embeddings=max_context, **shapes)
    import mlx_lm.models.qwen3 as qwen3

    ksa = ModelArgs(vocab_size=M["vocab_size"], summary_token_begin=M["vocab_size"] - 1,
                    summary_chunk_size=8, summary_token_num=1,
                    summary_sliding_chunk_num=M["windows"], **common)
    dense = qwen3.ModelArgs(vocab_size=M["vocab_size"] - 1, **common)
    return ksa, dense


def build(kind, args, dtype):
    if kind == "ksa":
        from .model import Model
    else:
        from mlx_lm.models.qwen3 import Model
    mx.random.seed(0)
    model = Model(args)
    model.set_dtype(dtype)
    mx.eval(model.parameters())
    return model


def fill_caches(kind, model, T, max_context, keys, values):
    """Caches holding T tokens of random K/V (the same arrays in every layer)."""
    if kind == "dense":
        from mlx_lm.models.cache import make_prompt_cache

        caches = make_prompt_cache(model)
        for c in caches:
            c.update_and_fetch(keys[:, :, :T], values[:, :, :T])
        return caches
    a = model.args
    caches = model.make_cache(max_context)
    for c in caches:
        c.context(T, keys)
        n_sum = T // a.summary_chunk_size * a.summary_token_num if c.keep_summaries else 0
        c.commit(keys[:, :, :T], values[:, :, :T], 0, keys[:, :, :n_sum], values[:, :, :n_sum])
    return caches


def bench_model(cfg, dtype=mx.bfloat16):
    steps = cfg["decode_steps"]
    max_context = max(cfg["model_decode"] + cfg["model_prefill"]) + steps + 8
    args = dict(zip(("ksa", "dense"), model_args(cfg, max_context)))
    M = cfg["model"]
    Hkv, D = M["num_key_value_heads"], M["head_dim"]
    rows = {}
    for kind in ("ksa", "dense"):
        model = build(kind, args[kind], dtype)
        vocab = M["vocab_size"] - 1
        make = (lambda: model.make_cache(max_context)) if kind == "ksa" else None

        def prefill(n):
            from mlx_lm.models.cache import make_prompt_cache

            cache = make() if make else make_prompt_cache(model)
            ids = mx.random.randint(0, vocab, (1, n))
            h = model.model(ids, cache=cache)
            return model.model.embed_tokens.as_linear(h[:, -1:])

        for n in cfg["model_prefill"]:
            rows.setdefault(("prefill", n), {})[kind] = n / timeit(lambda: prefill(n), repeats=3)
        T_max = max(cfg["model_decode"])
        keys, values = randn(1, Hkv, T_max, D, dtype=dtype), randn(1, Hkv, T_max, D, dtype=dtype)
        for T in cfg["model_decode"]:
            caches = fill_caches(kind, model, T, max_context, keys, values)
            mx.eval([c.state for c in caches])
            row = rows.setdefault(("decode", T), {})
            row[kind] = 1 / step_seconds(model, caches, 1, steps)
            row[kind + "_kv_bytes"] = sum(c.nbytes for c in caches)
            del caches
        del model
    return [dict(phase=p, tokens=n, **v) for (p, n), v in rows.items()]


def step_seconds(model, caches, B, steps):
    """Median seconds of one decode step of B sequences, after 3 warmup steps
    (a batch's first step also packs its rows into one buffer)."""
    token = mx.ones((B, 1), mx.int32)
    times = []
    for i in range(steps + 3):
        t = time.perf_counter()
        mx.eval(model(token, cache=caches))
        mx.synchronize()
        if i >= 3:
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_batch(cfg, dtype=mx.bfloat16):
    from .cache import KSACache

    contexts, steps = cfg["batch_contexts"], cfg["decode_steps"]
    max_context = max(contexts) + 2 * (steps + 3) + 8
    args, _ = model_args(cfg, max_context)
    M = cfg["model"]
    Hkv, D = M["num_key_value_heads"], M["head_dim"]
    model = build("ksa", args, dtype)
    keys, values = randn(1, Hkv, max(contexts), D, dtype=dtype), randn(1, Hkv, max(contexts), D, dtype=dtype)
    seqs = [fill_caches("ksa", model, T, max_context, keys, values) for T in contexts]
    mx.eval([c.state for cs in seqs for c in cs])
    # One at a time first: merging hands the caches to the batch.
    alone = sum(step_seconds(model, cs, 1, steps) for cs in seqs)
    batch = [KSACache.merge([cs[i] for cs in seqs]) for i in range(len(seqs[0]))]
    together = step_seconds(model, batch, len(seqs), steps)
    return dict(contexts=contexts, batch=len(seqs), batched_tokens_per_s=len(seqs) / together,
                one_at_a_time_tokens_per_s=len(seqs) / alone, speedup=alone / together,
                kv_bytes=sum(c.nbytes for c in batch), backend=backend() or "cpu")


def bench_kvbits(cfg, dtype=mx.bfloat16):
    T, steps = cfg["kvbits_context"], cfg["decode_steps"]
    max_context = T + steps + 8
    args, _ = model_args(cfg, max_context)
    M = cfg["model"]
    model = build("ksa", args, dtype)
    keys, values = (randn(1, M["num_key_value_heads"], T, M["head_dim"], dtype=dtype) for _ in range(2))
    rows = []
    for bits in [None, *cfg["kv_bits"]]:
        caches = fill_caches("ksa", model, T, max_context, keys, values)
        if bits:
            caches = [c.to_quantized(group_size=64, bits=bits) for c in caches]
        mx.eval([c.state for c in caches])
        rows.append(dict(bits=bits or mx.finfo(dtype).bits, context=T,
                         tokens_per_s=1 / step_seconds(model, caches, 1, steps),
                         kv_bytes=sum(c.nbytes for c in caches)))
        del caches
    return rows


def bench_train(cfg, dtype=mx.bfloat16):
    """Training tokens/s, one sequence per step (the layout of long-context training)."""
    import mlx.nn as nn
    import mlx.optimizers as optim

    from .train import lm_loss

    args = dict(zip(("ksa", "dense"), model_args(cfg, max(cfg["train_lengths"]) + 1, key="train")))
    vocab = cfg["train"]["vocab_size"] - 1
    rows = {}
    for kind in ("ksa", "dense"):
        model = build(kind, args[kind], dtype)
        opt = optim.AdamW(1e-4)
        loss_and_grad = nn.value_and_grad(model, lm_loss)

        def step(batch):
            loss, grads = loss_and_grad(model, batch)
            opt.update(model, grads)
            return loss, model.parameters(), opt.state

        for n in cfg["train_lengths"]:
            batch = mx.random.randint(0, vocab, (1, n + 1))
            rows.setdefault(n, {})[kind] = n / timeit(lambda: step(batch), repeats=cfg["train_steps"])
        del model, opt
    return [dict(tokens=n, **v) for n, v in rows.items()]


def bench_cpu(cfg):
    L = cfg["layer"]
    H, Hkv, D, k, S, W = (L[x] for x in ("H", "Hkv", "D", "k", "S", "W"))
    n, m, scale = cfg["cpu"], cfg["cpu"] // k * S, D**-0.5
    with mx.stream(mx.cpu):
        args = [randn(1, h, t, D, dtype=mx.float32) for h, t in
                ((H, n), (H, m), (Hkv, n), (Hkv, n), (Hkv, m), (Hkv, m))]
        mx.eval(args)
        opts = dict(layout=Layout(k, S), window=W, t0=0, text_base=0, scale=scale)
        ref, ref_peak = peak(lambda: timeit(lambda: reference_attention(*args, **opts), repeats=3))
        # MLX's CPU SDPA builds the whole [H, N, N] score matrix: 128 GiB at 32K.
        dense = timeit(lambda: mx.fast.scaled_dot_product_attention(
            args[0], args[2], args[3], scale=scale, mask="causal"), repeats=3) if n <= DENSE_CPU_MAX else None
    return dict(n=n, dtype="float32", reference_s=ref, dense_sdpa_s=dense, ratio=dense and ref / dense,
                reference_peak_bytes=ref_peak, dense_mask_bytes=(n + m) ** 2,
                dense_scores_bytes=4 * H * (n + m) ** 2)


# -- report --------------------------------------------------------------
def fmt(x, digits=3):
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    return str(x)


def table(head, rows):
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def markdown(results, only=None):
    """The results as markdown tables; `only` one section, without the header."""
    if only:
        results = {k: v for k, v in results.items() if k not in SECTIONS or k == only}
    out = [] if only else [f"device: {results['device']}" + (" (quick sizes)" if results["quick"] else "")]
    ms = lambda s: None if s is None else s * 1e3
    us = lambda s: s * 1e6
    if "prefill" in results:
        out += ["", "### Prefill attention, one KSA layer (ms; TFLOP/s over visible / causal entries)",
                table(["N", "ksa_attention", "TFLOP/s", "SDPA causal", "TFLOP/s", "reference", "TFLOP/s",
                       "vs SDPA", "vs reference", "reference peak MB", "dense mask MB"],
                      [(r["n"], ms(r["ksa_s"]), r["ksa_tflops"], ms(r["sdpa_causal_s"]),
                        r["sdpa_causal_tflops"], ms(r["reference_s"]) or "skipped", r.get("reference_tflops"),
                        r["sdpa_causal_s"] / r["ksa_s"], r["reference_s"] and r["reference_s"] / r["ksa_s"],
                        r["reference_peak_bytes"] and r["reference_peak_bytes"] / 2**20,
                        r["dense_mask_bytes"] / 2**20)
                       for r in results["prefill"]])]
    if "decode" in results:
        d = results["decode"]
        out += ["", f"### Decode attention, one KSA layer (us; GB/s of K/V read; copy {d['copy_GBps']:.0f} GB/s)",
                table(["context", "keys read", "ksa (kernel)" if d["backend"] != "cpu" else "ksa (reference)",
                       "GB/s", "kernel, graphs prebuilt", "GB/s", "reference", "dense SDPA", "GB/s"],
                      [(r["context"], r["ksa_keys_read"], us(r["ksa_s"]), r["ksa_GBps"],
                        r["prebuilt_s"] and us(r["prebuilt_s"]), r["prebuilt_GBps"],
                        us(r["reference_s"]), us(r["dense_sdpa_s"]), r["dense_GBps"]) for r in d["rows"]])]
    if "model" in results:
        out += ["", "### Whole model, random weights (tokens/s; KV GB)",
                table(["phase", "tokens", "KSA", "dense", "KSA / dense", "KV KSA", "KV dense"],
                      [(r["phase"], r["tokens"], r["ksa"], r["dense"], r["ksa"] / r["dense"],
                        r.get("ksa_kv_bytes", 0) / 1e9 or None, r.get("dense_kv_bytes", 0) / 1e9 or None)
                       for r in results["model"]])]
    if "batch" in results:
        b = results["batch"]
        out += ["", f"### Batched decode, whole model: {b['batch']} sequences of mixed lengths "
                    f"(aggregate tokens/s; {b['backend']})",
                table(["contexts", "batched", "one at a time", "batched / one at a time", "KV GB (batch)"],
                      [(" ".join(map(str, b["contexts"])), b["batched_tokens_per_s"],
                        b["one_at_a_time_tokens_per_s"], b["speedup"], b["kv_bytes"] / 1e9)])]
    if "kvbits" in results:
        r0 = results["kvbits"][0]
        out += ["", f"### Quantized KV cache, whole model decode at {r0['context']} tokens (tokens/s; KV GB)",
                table(["KV bits", "tokens/s", "vs 16-bit", "KV GB", "vs 16-bit"],
                      [(r["bits"], r["tokens_per_s"], r["tokens_per_s"] / r0["tokens_per_s"], r["kv_bytes"] / 1e9,
                        r["kv_bytes"] / r0["kv_bytes"]) for r in results["kvbits"]])]
    if "train" in results:
        out += ["", "### Training, small model (tokens/s; forward + backward + AdamW, one sequence per step)",
                table(["sequence", "KSA", "dense", "KSA / dense"],
                      [(r["tokens"], r["ksa"], r["dense"], r["ksa"] / r["dense"]) for r in results["train"]])]
    if "cpu" in results:
        c = results["cpu"]
        out += ["", f"### CPU, one KSA layer prefill at N={c['n']} ({c['dtype']})",
                table(["reference (ms)", "dense SDPA (ms)", "ratio", "reference peak MB", "dense mask MB",
                       "dense float32 scores MB"],
                      [(ms(c["reference_s"]), ms(c["dense_sdpa_s"]) or "skipped", c["ratio"],
                        c["reference_peak_bytes"] / 2**20, c["dense_mask_bytes"] / 2**20,
                        c["dense_scores_bytes"] / 2**20)])]
    if results["notes"]:
        out += [""] + [f"- {n}" for n in results["notes"]]
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--quick", action="store_true", help="tiny sizes (a CPU smoke run)")
    p.add_argument("--out", help="write the results as JSON here")
    for key in ("prefill", "decode", "model-prefill", "model-decode", "train-lengths"):
        p.add_argument(f"--{key}", help="comma-separated sizes, overriding the defaults")
    p.add_argument("--cpu", type=int, help=f"tokens of the cpu section (dense SDPA skipped above {DENSE_CPU_MAX})")
    p.add_argument("--vocab", type=int, help="model vocabulary (default 151937), to save memory")
    a = p.parse_args(argv)
    sections = a.sections.split(",")
    if unknown := set(sections) - set(SECTIONS):
        p.error(f"unknown sections {sorted(unknown)}")
    cfg = {**(QUICK if a.quick else FULL)}
    for key in ("prefill", "decode", "model_prefill", "model_decode", "train_lengths"):
        if getattr(a, key):
            cfg[key] = [int(x) for x in getattr(a, key).split(",")]
    if a.cpu:
        cfg["cpu"] = a.cpu
    if a.vocab:
        cfg["model"] = {**cfg["model"], "vocab_size": a.vocab}
    results = dict(device=str(mx.default_device()) + (f" ({backend()})" if backend() else ""),
                   quick=a.quick, config=cfg, notes=[])
    notes = {
        "prefill": lambda r: any(x["reference_s"] is None for x in r)
        and f"reference_attention skipped above N={cfg['reference_max']} (too slow)",
        "model": lambda r: "model decode: caches filled with random K/V at the context, no prefill",
    }
    if cfg["model"]["vocab_size"] != FULL["model"]["vocab_size"]:
        results["notes"].append(f"model vocabulary {cfg['model']['vocab_size']} "
                                f"(KSA-4B-base: {FULL['model']['vocab_size']})")
    run = {"prefill": bench_prefill, "decode": bench_decode, "model": bench_model,
           "batch": bench_batch, "kvbits": bench_kvbits, "train": bench_train, "cpu": bench_cpu}
    print(markdown({k: v for k, v in results.items() if k != "notes"} | {"notes": []}), flush=True)
    for name in SECTIONS:
        if name not in sections:
            continue
        results[name] = run[name](cfg)
        if name in notes and (note := notes[name](results[name])):
            results["notes"].append(note)
        # Each section as it ends: a later one may take the process down.
        print(markdown({**results, "notes": []}, only=name), flush=True)
        if a.out:
            with open(a.out, "w") as f:
                json.dump(results, f, indent=1, default=str)
    if results["notes"]:
        print("\n".join(f"- {n}" for n in results["notes"]))
    return results


if __name__ == "__main__":
    main()
