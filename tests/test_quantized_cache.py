"""QuantizedKSACache: 8- and 4-bit K/V, against the 16/32-bit cache and against itself."""

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import load_prompt_cache, save_prompt_cache, trim_prompt_cache

import mlx_ksa
from mlx_ksa import cache as cache_module
from mlx_ksa.cache import KSACache, QuantizedKSACache
from mlx_ksa.kernels import decode
from tests.helpers import random_ids, run_steps, tiny_checkpoint
from tests.test_decode_kernel import emulator

# Prefill straddling calls, decode steps completing chunks, past every window.
SIZES = [33, 1, 1, 1, 20, 1, 1, 1, 1, 60]
# Measured on these random models (logits up to ~27): 8 bits differ by at
# most 0.07 (mean 0.008), 4 bits by 1.6 (mean 0.16). The bounds leave 2x.
TOL = {8: (0.15, 0.02), 4: (3.0, 0.35)}


@pytest.fixture(scope="module", params=[
    ("w1_k4_s1", {"summary_sliding_chunk_num": "[1]*3+[4]"}),
    ("w3_k3_s2", {"summary_chunk_size": 3, "summary_token_num": 2, "summary_sliding_chunk_num": 3}),
], ids=lambda p: p[0])
def model(request, tmp_path_factory):
    # head_dim 64: mx.quantize groups are 32, 64 or 128 wide.
    path, *_ = tiny_checkpoint(tmp_path_factory.mktemp("m"), tokenizer=False, head_dim=64,
                               **request.param[1])
    return mlx_ksa.load_model(path)[0]


def quantized_cache(model, group_size, bits):
    return [c.to_quantized(group_size, bits) for c in mlx_ksa.make_prompt_cache(model)]


class RoundedKSACache(KSACache):
    """A 32-bit cache that stores each token as quantizing and dequantizing it gives."""

    def __init__(self, cache, group_size, bits):
        super().__init__(cache.chunk, cache.summaries, cache.window, cache.keep_summaries)
        self.quantized = QuantizedKSACache(cache.chunk, cache.summaries, cache.window,
                                           group_size=group_size, bits=bits)

    def _encode(self, x):
        return (self.quantized._decode(self.quantized._encode(x)),)


@pytest.mark.parametrize("bits,group_size", [(8, 32), (8, 64), (4, 32), (4, 64)])
def test_logits_close_to_the_full_precision_cache(model, bits, group_size):
    ids = random_ids(sum(SIZES), 96, seed=3)
    dense = run_steps(model, ids, SIZES, mlx_ksa.make_prompt_cache(model))
    cache = quantized_cache(model, group_size, bits)
    got = run_steps(model, ids, SIZES, cache)
    assert all(type(c) is QuantizedKSACache for c in cache)
    err = np.abs(got - dense)
    max_tol, mean_tol = TOL[bits]
    assert err.max() <= max_tol and err.mean() <= mean_tol, (err.max(), err.mean())
    if bits == 8:
        np.testing.assert_array_equal(got.argmax(-1), dense.argmax(-1))
    # The whole difference is the rounding of stored K/V: a 32-bit cache
    # holding the rounded values gives the same logits.
    rounded = [RoundedKSACache(c, group_size, bits) for c in mlx_ksa.make_prompt_cache(model)]
    assert np.abs(run_steps(model, ids, SIZES, rounded) - got).max() <= 1e-4


@pytest.mark.parametrize("bits", [8, 4])
def test_bytes_drop_by_the_quantization_factor(model, bits):
    group_size, D = 32, model.args.head_dim
    ids = random_ids(150, 96, seed=4)
    dense = mlx_ksa.make_prompt_cache(model)
    run_steps(model, ids, [100, 50], dense)
    # Quantizing a filled cache keeps its slots; then both grow alike.
    converted = [c.to_quantized(group_size, bits) for c in dense]
    fresh = quantized_cache(model, group_size, bits)
    run_steps(model, ids, [100, 50], fresh)
    more = random_ids(300, 96, seed=5)
    run_steps(model, more, [300], dense)
    run_steps(model, more, [300], converted)
    run_steps(model, more, [300], fresh)
    # Per slot and head: D*bits/8 packed bytes plus a float32 scale and bias
    # per group, against 4*D bytes.
    factor = (D * bits / 8 + 2 * 4 * D / group_size) / (4 * D)
    for d, c, f in zip(dense, converted, fresh):
        assert c.nbytes == f.nbytes == d.nbytes * factor


def test_prompt_cache_round_trip(model, tmp_path):
    ids = random_ids(80, 96, seed=6)
    cache = quantized_cache(model, 64, 4)
    run_steps(model, ids[:43], [41, 1, 1], cache)
    mx.eval([c.state for c in cache])
    save_prompt_cache(str(tmp_path / "q.safetensors"), cache)
    loaded = load_prompt_cache(str(tmp_path / "q.safetensors"))
    assert all(type(c) is QuantizedKSACache and (c.group_size, c.bits) == (64, 4) for c in loaded)
    assert sum(c.nbytes for c in loaded) == sum(c.nbytes for c in cache)
    a = run_steps(model, ids[43:], [20, 1, 1, 15], cache)
    b = run_steps(model, ids[43:], [20, 1, 1, 15], loaded)
    np.testing.assert_array_equal(a, b)


def test_trim_and_refeed_is_bit_identical(model):
    k = model.args.summary_chunk_size
    ids = random_ids(10 * k, 96, seed=7)
    cache = quantized_cache(model, 32, 8)
    run_steps(model, ids[: 7 * k + 1], [7 * k + 1], cache)
    first = run_steps(model, ids[7 * k + 1 : 8 * k + 2], [k + 1], cache)
    assert trim_prompt_cache(cache, k + 1) == k + 1
    np.testing.assert_array_equal(run_steps(model, ids[7 * k + 1 : 8 * k + 2], [k + 1], cache), first)


def test_generate_step_with_kv_bits(model):
    """mlx-lm's --kv-bits path: the caches switch at quantized_kv_start."""
    prompt = mx.array(random_ids(30, 96, seed=8))
    dense = [int(t) for t, _ in generate_step(prompt, model, max_tokens=30)]
    cache = mlx_ksa.make_prompt_cache(model)
    tokens = [int(t) for t, _ in generate_step(prompt, model, max_tokens=30, prompt_cache=cache,
                                               kv_bits=8, kv_group_size=32, quantized_kv_start=40)]
    assert all(type(c) is QuantizedKSACache for c in cache)
    assert tokens == dense
    with pytest.raises(ValueError, match="already quantized"):
        cache[0].to_quantized(64, 4)


@pytest.mark.parametrize("bits,group_size", [(8, 64), (4, 32)])
def test_decode_steps_on_the_quantized_kernel(model, bits, group_size, monkeypatch):
    """QuantizedKSACache.decode hands its buffer's parts to the decode
    kernel's quantized variant (run here by the CPU Metal emulator, as on a
    GPU): every layer's decode steps, one completing a chunk, give the
    logits of the reference path (mlx-lm's quantized SDPA) on the same cache."""
    emu = emulator()
    ids, sizes = random_ids(37, 96, seed=9), [33, 1, 1, 1, 1]
    expected = run_steps(model, ids, sizes, quantized_cache(model, group_size, bits))

    served = []

    def on_emulator(q, keys, values, start, end, sum_end, scale, quant=None):
        assert quant == (group_size, bits) and decode.supported(q, keys, values, quant)
        served.append(q.shape[2])
        partial, reduce = decode.kernels("metal", "quantized")
        launch = decode.plan_partial(q, keys, values, start, end, sum_end, scale, split_len=8, quant=quant)
        part_o, part_ml = emu.run_metal_kernel(partial, **launch)
        out = emu.run_metal_kernel(reduce, **decode.plan_reduce(q, mx.array(part_o), mx.array(part_ml)))[0]
        return mx.array(out).astype(q.dtype)

    monkeypatch.setattr(cache_module.decode_kernel, "decode_attention", on_emulator)
    got = run_steps(model, ids, sizes, quantized_cache(model, group_size, bits))
    layers = len(mlx_ksa.make_prompt_cache(model))
    assert len(served) == layers * 4 and max(served) > 1  # every step; summary rows too
    np.testing.assert_allclose(got, expected, atol=1e-3, rtol=1e-4)


def test_cuda_fallback_dequantizes_instead_of_quantized_sdpa(model, monkeypatch):
    """Where no kernel serves on MLX's CUDA back end, decode steps dequantize
    the slices they read and run plain SDPA: mlx-lm's quantized SDPA finds no
    CUDA quantized_matmul for a decode step's shapes. Forced here on the CPU
    by claiming a CUDA GPU; the logits stay those of the quantized SDPA."""
    ids, sizes = random_ids(40, 96, seed=10), [1, 1, 1, 1, 1, 1, 1]
    prefill = random_ids(33, 96, seed=11)
    caches = [quantized_cache(model, 32, 4) for _ in range(2)]
    for cache in caches:
        run_steps(model, prefill, [33], cache)
    expected = run_steps(model, ids[:7], sizes, caches[0])

    def crash(*a, **kw):
        raise RuntimeError("[quantized_matmul] No implementation for problem shape")

    # Kernels off, so that none is picked for the claimed CUDA back end.
    monkeypatch.setattr(mlx_ksa.kernels, "_enabled", False)
    monkeypatch.setattr(cache_module, "quantized_scaled_dot_product_attention", crash)
    monkeypatch.setattr(mx.cuda, "is_available", lambda: True)
    monkeypatch.setattr(mx, "default_device", lambda: mx.Device(mx.gpu))
    got = run_steps(model, ids[:7], sizes, caches[1])
    np.testing.assert_allclose(got, expected, atol=1e-3, rtol=1e-4)
