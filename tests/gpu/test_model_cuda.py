"""The model on the GPU with its kernels against the same model on the GPU with
kernels turned off (the reference path), through prefill in pieces and decode
(skips without CUDA).

    python -m pytest -q tests/gpu/test_model_cuda.py
"""

import mlx.core as mx
import numpy as np
import pytest

from mlx_ksa import kernels
from mlx_ksa.kernels import decode, prefill
from mlx_ksa.model import Model, ModelArgs

pytestmark = pytest.mark.skipif(not mx.cuda.is_available(), reason="needs MLX's CUDA back end")


def model_of(dtype, S):
    # KSA-4B-base's layer mix at toy size: three 4-chunk windows, then a layer
    # whose window covers every context below.
    args = ModelArgs(
        model_type="qwen3", hidden_size=256, num_hidden_layers=4, intermediate_size=512,
        num_attention_heads=8, num_key_value_heads=2, rms_norm_eps=1e-6, vocab_size=257,
        summary_token_begin=257 - S, summary_token_num=S, summary_chunk_size=8,
        summary_sliding_chunk_num="[4]*3+[1024]", head_dim=128, max_position_embeddings=8192,
    )
    mx.random.seed(1)
    model = Model(args)
    model.set_dtype(dtype)
    mx.eval(model.parameters())
    return model


def logits(model, prompt, pieces, steps):
    """Last-position logits after each prefill piece, then greedy decode steps
    (the tokens fed come from `steps`, so both runs see the same ones)."""
    cache, out, a = model.make_cache(), [], 0
    for size in pieces:
        out.append(model(mx.array(prompt[a : a + size])[None], cache=cache)[0, -1])
        a += size
    for t in steps:
        out.append(model(mx.array([[t]]), cache=cache)[0, -1])
    return np.array(mx.stack(out).astype(mx.float32))


@pytest.mark.parametrize("S", [1, 2])
def test_kernels_equal_reference_path_through_prefill_pieces_and_decode(S, monkeypatch):
    model = model_of(mx.bfloat16, S)
    rng = np.random.default_rng(S)
    prompt = rng.integers(0, 257 - S, 1500).tolist()
    pieces = [700, 3, 797]  # several calls, none chunk-aligned
    steps = rng.integers(0, 257 - S, 20).tolist()  # crosses chunk boundaries
    with kernels.disabled():
        expected = logits(model, prompt, pieces, steps)
    served = {"prefill": 0, "decode": 0}
    monkeypatch.setattr(decode, "SDPA_MAX_KEYS", -1)  # every decode step on the kernel
    for name, module, fn in (("prefill", prefill, "prefill_attention"), ("decode", decode, "decode_attention")):
        real = getattr(module, fn)
        monkeypatch.setattr(module, fn, lambda *a, _r=real, _n=name, **k: served.__setitem__(_n, served[_n] + 1) or _r(*a, **k))
    got = logits(model, prompt, pieces, steps)
    assert served["prefill"] >= 4 * len(pieces) and served["decode"] == 4 * len(steps)
    scale = np.abs(expected).max()
    assert np.abs(got - expected).max() <= 0.05 * scale
    assert (got.argmax(-1) == expected.argmax(-1)).mean() >= 0.9  # bf16 ties aside
