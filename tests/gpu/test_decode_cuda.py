"""The CUDA decode kernel against the reference, and the model with kernels
against the model on the CPU reference path (skips without CUDA).

    python -m pytest -q tests/gpu/test_decode_cuda.py
"""

import mlx.core as mx
import numpy as np
import pytest

from mlx_ksa import cache as cache_module
from mlx_ksa import kernels
from mlx_ksa.cache import KSACache
from mlx_ksa.kernels import decode
from mlx_ksa.model import Model, ModelArgs
from tests.test_decode_kernel import CASES, QUANT_CASES, check, make_case

pytestmark = pytest.mark.skipif(not mx.cuda.is_available(), reason="needs MLX's CUDA back end")

# The emulator's cases, plus contexts long enough for the default split
# (many splits per KV head) and the KSA-4B-base layer shape.
GPU_CASES = CASES + [
    (1, 32, 8, 128, mx.bfloat16, 8, 1, 128, 5000, False),
    (1, 32, 8, 128, mx.bfloat16, 8, 1, 128, 20479, True),
    (2, 16, 2, 64, mx.float16, 4, 2, 16, 3002, False),
    (1, 4, 4, 128, mx.float32, 8, 1, 2100, 9000, False),  # one whole-context layer
    # Batch rows far apart: most of the long row's splits lie past the short rows' ends.
    (8, 32, 8, 128, mx.bfloat16, 8, 1, 128, (7, 100, 1023, 1500, 5000, 20479, 31, 2047), True),
    (3, 16, 2, 64, mx.float16, 4, 2, 16, (3002, 11, 455), False),
]


@pytest.mark.parametrize("case_args", GPU_CASES, ids=lambda c: "-".join(str(v).split(".")[-1] for v in c))
def test_cuda_kernel_matches_reference(case_args):
    case = make_case(*case_args, seed=sum(np.atleast_1d(case_args[8])))
    out = decode.decode_attention(*case)
    assert out is not None
    check(out, case)
    # Forced small splits: many partials per row.
    partial, reduce = decode.kernels("cuda")
    launch = decode.plan_partial(*case, split_len=16)
    part_o, part_ml = partial(**launch)
    check(reduce(**decode.plan_reduce(case[0], part_o, part_ml))[0], case)


# The quantized variant: the emulator's cases, plus long contexts at the
# KSA-4B-base layer shape (a whole-context layer at 9089 keys: where mlx-lm's
# quantized SDPA found no CUDA quantized_matmul), every bits / group size.
GPU_QUANT_CASES = QUANT_CASES + [
    (1, 32, 8, 128, mx.bfloat16, 8, 1, 2100, 9088, False, (64, 8)),
    (1, 32, 8, 128, mx.bfloat16, 8, 1, 128, 9088, False, (64, 8)),
    (1, 32, 8, 128, mx.bfloat16, 8, 1, 128, 20479, True, (128, 4)),
    (1, 32, 8, 128, mx.float16, 8, 1, 128, 5000, False, (32, 4)),
    (2, 16, 2, 64, mx.float32, 4, 2, 16, 3002, False, (64, 8)),
    (3, 16, 2, 64, mx.bfloat16, 4, 2, 16, (3002, 11, 455), False, (32, 4)),
]


@pytest.mark.parametrize("case_args", GPU_QUANT_CASES, ids=lambda c: "-".join(str(v).split(".")[-1] for v in c))
def test_cuda_quantized_kernel_matches_reference(case_args):
    *args, quant = case_args
    case = make_case(*args, seed=sum(np.atleast_1d(args[8])), quant=quant)
    out = decode.decode_attention(*case, quant=quant)
    assert out is not None
    check(out, case, quant)
    partial, reduce = decode.kernels("cuda", "quantized")
    launch = decode.plan_partial(*case, split_len=16, quant=quant)
    part_o, part_ml = partial(**launch)
    check(reduce(**decode.plan_reduce(case[0], part_o, part_ml))[0], case, quant)


@pytest.mark.parametrize("quant", [(64, 8), (32, 4)])
def test_quantized_cache_fallback_runs_on_cuda(quant):
    """Where no kernel serves (here: kernels off), QuantizedKSACache.decode
    on CUDA dequantizes the slices it reads instead of calling mlx-lm's
    quantized SDPA, which crashed at this shape (a whole-context layer, 9089
    keys): no CUDA quantized_matmul for it."""
    rng = np.random.default_rng(0)
    arr = lambda *shape: mx.array(rng.standard_normal(shape).astype(np.float32)).astype(mx.bfloat16)
    t, Hkv, D = 9088, 8, 128
    cache = KSACache(8, 1, 2100)
    cache.context(t, arr(1, Hkv, 1, D))
    cache.commit(arr(1, Hkv, t, D), arr(1, Hkv, t, D), 0, arr(1, Hkv, t // 8, D), arr(1, Hkv, t // 8, D))
    cache = cache.to_quantized(*quant)
    ranges, store = [], cache.store_decode
    cache.store_decode = lambda k, v: ranges.append(store(k, v)) or ranges[-1]
    q = arr(1, 32, 1, D)
    with kernels.disabled():
        out = cache.decode(q, arr(1, Hkv, 1, D), arr(1, Hkv, 1, D), D**-0.5)
        mx.eval(out)
    (start, end, sum_end), = ranges
    assert end - start == t + 1
    case = (q, cache.keys, cache.values, start, end, sum_end, D**-0.5)
    check(out, case, quant)


def tiny_model(dtype):
    args = ModelArgs(
        model_type="qwen3", hidden_size=128, num_hidden_layers=4, intermediate_size=256,
        num_attention_heads=8, num_key_value_heads=2, rms_norm_eps=1e-6, vocab_size=97,
        summary_token_begin=96, summary_chunk_size=4, summary_sliding_chunk_num="[2]*3+[64]",
        head_dim=64, max_position_embeddings=1024,
    )
    mx.random.seed(0)
    model = Model(args)
    model.model.summary_embedding = mx.random.normal((1, 128))
    model.set_dtype(dtype)
    mx.eval(model.parameters())
    return model


def run(model, prompt, tokens, device, quant=None):
    """Logits of a prefill of `prompt`, then one decode step per token;
    quant: (group_size, bits) for a QuantizedKSACache."""
    mx.set_default_device(device)
    try:
        cache = model.make_cache()
        if quant:
            cache = [c.to_quantized(*quant) for c in cache]
        out = [model(mx.array(prompt)[None], cache=cache)[0, -1]]
        for t in tokens:
            out.append(model(mx.array([[t]]), cache=cache)[0, -1])
        return np.array(mx.stack(out).astype(mx.float32))
    finally:
        mx.set_default_device(mx.gpu)


@pytest.mark.parametrize("dtype, tol", [(mx.float32, 1e-3), (mx.bfloat16, 0.25)])
def test_model_with_kernels_equals_cpu_reference(dtype, tol, monkeypatch):
    model = tiny_model(dtype)
    prompt = np.random.default_rng(0).integers(0, 96, 37).tolist()
    # Greedy tokens from the CPU reference path; both runs decode the same ones.
    mx.set_default_device(mx.cpu)
    try:
        cache, tokens, y = model.make_cache(), [], mx.array(prompt)[None]
        for _ in range(40):  # past every KSA window (2 chunks of 4) several times
            y = mx.argmax(model(y, cache=cache)[:, -1:], axis=-1)
            tokens.append(y.item())
    finally:
        mx.set_default_device(mx.gpu)
    expected = run(model, prompt, tokens[:-1], mx.cpu)

    served = []
    kernel = decode.decode_attention
    monkeypatch.setattr(decode, "SDPA_MAX_KEYS", -1)  # every step on the kernel
    monkeypatch.setattr(cache_module.decode_kernel, "decode_attention",
                        lambda *a, **kw: served.append(1) or kernel(*a, **kw))
    got = run(model, prompt, tokens[:-1], mx.gpu)
    assert len(served) == 4 * len(tokens[:-1])  # every layer, every step, on the kernel
    assert np.abs(got - expected).max() <= tol * max(1.0, np.abs(expected).max())
    if dtype == mx.float32:
        assert (got.argmax(-1) == expected.argmax(-1)).all()


@pytest.mark.parametrize("dtype, tol", [(mx.float32, 1e-3), (mx.bfloat16, 0.25)])
def test_batched_decode_with_kernels_equals_rows_alone(dtype, tol, monkeypatch):
    """BatchKSACache decode steps on the GPU (one kernel launch per layer,
    a slot range per row) against each sequence decoded alone on the CPU
    reference path; rows at every chunk phase, past the windows."""
    model = tiny_model(dtype)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, 96, n).tolist() for n in (1, 6, 13, 37, 50)]
    steps = rng.integers(0, 96, (30, len(prompts)))

    def prefilled(prompt):
        cache = model.make_cache()
        model(mx.array(prompt)[None], cache=cache)
        return cache

    mx.set_default_device(mx.cpu)
    try:
        alone = [prefilled(p) for p in prompts]
        expected = np.stack([
            [np.array(model(mx.array([[int(t)]]), cache=c)[0, -1].astype(mx.float32)) for c, t in zip(alone, step)]
            for step in steps])
    finally:
        mx.set_default_device(mx.gpu)

    batched = []  # kernel calls with one range per row
    kernel = decode.decode_attention
    monkeypatch.setattr(cache_module.decode_kernel, "decode_attention",
                        lambda *a, **kw: batched.append(np.ndim(a[3]) == 1) or kernel(*a, **kw))
    caches = [prefilled(p) for p in prompts]
    batch = [cache_module.KSACache.merge([c[i] for c in caches]) for i in range(len(caches[0]))]
    got = np.stack([np.array(model(mx.array(step)[:, None], cache=batch)[:, -1].astype(mx.float32))
                    for step in steps])
    assert sum(batched) == 4 * len(steps)  # every layer, every step
    assert np.abs(got - expected).max() <= tol * max(1.0, np.abs(expected).max())
    if dtype == mx.float32:
        assert (got.argmax(-1) == expected.argmax(-1)).all()


@pytest.mark.parametrize("quant", [(64, 8), (32, 4)])
@pytest.mark.parametrize("dtype, tol", [(mx.float32, 2e-2), (mx.bfloat16, 0.25)])
def test_quantized_cache_with_kernels_equals_cpu_reference(dtype, tol, quant, monkeypatch):
    """A whole QuantizedKSACache decode on the GPU (the kernel's quantized
    variant, every layer and step) against the same quantized cache on the
    CPU reference path (mlx-lm's quantized SDPA). Both quantize the same K/V;
    the tolerance leaves room for a quantized field rounding the other way
    on the two devices, well below the quantization's own error
    (tests/test_quantized_cache.py)."""
    model = tiny_model(dtype)
    prompt = np.random.default_rng(2).integers(0, 96, 37).tolist()
    tokens = np.random.default_rng(3).integers(0, 96, 40).tolist()  # past every window
    expected = run(model, prompt, tokens, mx.cpu, quant)

    served = []
    kernel = decode.decode_attention
    monkeypatch.setattr(cache_module.decode_kernel, "decode_attention",
                        lambda *a, **kw: served.append(kw.get("quant")) or kernel(*a, **kw))
    got = run(model, prompt, tokens, mx.gpu, quant)
    assert served == [quant] * (4 * len(tokens))  # every layer, every step, on the quantized kernel
    assert np.abs(got - expected).max() <= tol * max(1.0, np.abs(expected).max())
