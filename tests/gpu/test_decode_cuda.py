"""The CUDA decode kernel against the reference, and the model with kernels
against the model on the CPU reference path (skips without CUDA).

    python -m pytest -q tests/gpu/test_decode_cuda.py
"""

import mlx.core as mx
import numpy as np
import pytest

from mlx_ksa import cache as cache_module
from mlx_ksa.kernels import decode
from mlx_ksa.model import Model, ModelArgs
from tests.test_decode_kernel import CASES, check, make_case

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


def run(model, prompt, tokens, device):
    """Logits of a prefill of `prompt`, then one decode step per token."""
    mx.set_default_device(device)
    try:
        cache = model.make_cache()
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
    monkeypatch.setattr(cache_module.decode_kernel, "decode_attention",
                        lambda *a: served.append(1) or kernel(*a))
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
                        lambda *a: batched.append(np.ndim(a[3]) == 1) or kernel(*a))
    caches = [prefilled(p) for p in prompts]
    batch = [cache_module.KSACache.merge([c[i] for c in caches]) for i in range(len(caches[0]))]
    got = np.stack([np.array(model(mx.array(step)[:, None], cache=batch)[:, -1].astype(mx.float32))
                    for step in steps])
    assert sum(batched) == 4 * len(steps)  # every layer, every step
    assert np.abs(got - expected).max() <= tol * max(1.0, np.abs(expected).max())
    if dtype == mx.float32:
        assert (got.argmax(-1) == expected.argmax(-1)).all()
