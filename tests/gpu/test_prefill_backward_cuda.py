"""The CUDA prefill backward kernel against mx.vjp of the reference (skips without CUDA).

    python -m pytest -q tests/gpu/test_prefill_backward_cuda.py
    python tests/gpu/test_prefill_backward_cuda.py --bench [--out backward.json]

The second form times one KSA layer's backward at 16K tokens (bf16, 32/8
heads, D 128, k 8, S 1, W 128): the fused backward kernel alone, forward +
backward through ksa_attention, and the reference path's vjp.
"""

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_ksa.attention import ksa_attention, reference_attention
from mlx_ksa.kernels import prefill, prefill_backward
from mlx_ksa.model import Model, ModelArgs
from tests import torch_reference as ref
from tests.gpu.test_prefill_cuda import bench_cli, gpu_cases, timed
from tests.test_prefill_backward import CASES, NAMES, check_grads, make_grad_case

pytestmark = pytest.mark.skipif(not mx.cuda.is_available(), reason="needs MLX's CUDA back end")

GPU_CASES = gpu_cases(CASES)


def kernel_grads(arrays, opts, cot):
    outs = prefill.prefill_attention(*arrays, **opts, return_lse=True)
    return prefill_backward.prefill_attention_vjp(arrays, outs, cot, **opts)


@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: "-".join(map(str, c)))
def test_cuda_backward_matches_reference_vjp(case):
    arrays, opts, cot = make_grad_case(*case)
    check_grads(kernel_grads(arrays, opts, cot), arrays, opts, cot)


@pytest.mark.parametrize("case", GPU_CASES[:4], ids=lambda c: "-".join(map(str, c)))
def test_mma_sync_path_matches_reference_vjp(case):
    # The path of NVIDIA GPUs without wgmma, built on the H200 on purpose.
    arrays, opts, cot = make_grad_case(*case)
    outs = prefill.prefill_attention(*arrays, **opts, return_lse=True)
    args = prefill_backward.launch("cuda", arrays, outs, cot, **opts)
    check_grads(prefill_backward.cut(prefill_backward.kernel("cuda", wgmma=False)(**args), arrays),
                arrays, opts, cot)


@pytest.mark.parametrize("window", [2, 100])  # a KSA layer; a whole-context layer (causal SDPA forward)
def test_grad_through_ksa_attention_uses_the_kernel(window):
    arrays, opts, cot = make_grad_case(1, 4, 2, 128, 8, 1, window, 0, 300, mx.bfloat16)
    fn = lambda *xs: ksa_attention(*xs, **opts)
    got = mx.vjp(fn, list(arrays), list(cot))[1]
    check_grads(got, arrays, opts, cot)
    # The kernel's own gradients, bit for bit: the vjp did not fall back to the reference.
    for name, g, w in zip(NAMES, got, kernel_grads(arrays, opts, cot)):
        assert mx.array_equal(g, w), name


def test_float32_falls_back_to_the_reference_vjp():
    arrays, opts, cot = make_grad_case(1, 2, 1, 64, 4, 1, 1, 0, 9, mx.float32)
    assert prefill_backward.prefill_attention_vjp(arrays, (None,) * 4, cot, **opts) is None
    check_grads(mx.vjp(lambda *xs: ksa_attention(*xs, **opts), list(arrays), list(cot))[1],
                arrays, opts, cot)


def test_model_gradients_match_the_reference_path(monkeypatch):
    """nn.value_and_grad of a tiny bf16 KSA model (3 KSA layers, 1 whole-context
    layer) through the kernels equals the reference path's, within bf16 noise."""
    cfg = ref.make_config(hidden_size=256, head_dim=64, num_attention_heads=4, num_key_value_heads=2,
                          summary_chunk_size=8, summary_sliding_chunk_num="[2]*3+[64]")
    mx.random.seed(0)
    model = Model(ModelArgs.from_dict(cfg))
    model.set_dtype(mx.bfloat16)
    ids = mx.array(np.random.default_rng(0).integers(0, cfg["summary_token_begin"], (2, 301)), mx.int32)

    def loss(m, x):
        logits = m(x[:, :-1]).astype(mx.float32)
        return nn.losses.cross_entropy(logits, x[:, 1:]).mean()

    step = nn.value_and_grad(model, loss)
    value, grads = step(model, ids)
    monkeypatch.setattr(prefill, "supported", lambda *a, **k: False)  # the reference path
    ref_value, ref_grads = step(model, ids)
    assert abs(value.item() - ref_value.item()) < 1e-2 * abs(ref_value.item())
    flat, ref_flat = dict(nn.utils.tree_flatten(grads)), dict(nn.utils.tree_flatten(ref_grads))
    for name, g in flat.items():
        g, w = (np.array(x.astype(mx.float32)) for x in (g, ref_flat[name]))
        err = np.linalg.norm(g - w) / max(np.linalg.norm(w), 1e-6)
        assert err < 3e-2, (name, err)


def test_compiled_training_steps_equal_eager_ones(tmp_path):
    """mlx_ksa.train compiles its step: the kernels and their vjp inside
    mx.compile must train exactly as the eager step does."""
    from mlx_ksa.data import Batches
    from mlx_ksa.train import TrainArgs, train

    cfg = ref.make_config(hidden_size=256, head_dim=64, num_attention_heads=4, num_key_value_heads=2,
                          summary_chunk_size=8, summary_sliding_chunk_num="[2]*3+[64]")
    rows = np.random.default_rng(0).integers(0, cfg["summary_token_begin"], (16, 257)).astype(np.int32)
    runs = []
    for compiled in (False, True):
        mx.random.seed(0)
        model = Model(ModelArgs.from_dict(cfg))
        model.set_dtype(mx.bfloat16)
        targs = TrainArgs(steps=6, batch_size=2, seq_len=256, lr=1e-3, warmup=1, compile=compiled)
        runs.append(train(model, cfg, Batches(rows, 2), targs, tmp_path / str(compiled), log=lambda s: None))
    np.testing.assert_allclose(runs[1], runs[0], rtol=2e-2)


# -- benchmark ------------------------------------------------------------
def bench(n=16384, reps=5):
    H, Hkv, D, k, S, W = 32, 8, 128, 8, 1, 128
    arrays, opts, cot = make_grad_case(1, H, Hkv, D, k, S, W, 0, n, mx.bfloat16)
    outs = prefill.prefill_attention(*arrays, **opts, return_lse=True)
    mx.eval(outs)
    row = dict(n=n, window=W, H=H, Hkv=Hkv, D=D, k=k, S=S, dtype="bfloat16")
    row["forward_kernel_ms"] = 1e3 * timed(lambda: prefill.prefill_attention(*arrays, **opts), reps)
    row["backward_kernel_ms"] = 1e3 * timed(
        lambda: prefill_backward.prefill_attention_vjp(arrays, outs, cot, **opts), reps)
    vjp = lambda f: (lambda: mx.vjp(lambda *xs: f(*xs, **opts), list(arrays), list(cot)))
    row["ksa_attention_fwd_bwd_ms"] = 1e3 * timed(vjp(ksa_attention), reps)
    row["reference_fwd_bwd_ms"] = 1e3 * timed(vjp(reference_attention), 2)
    row["speedup_fwd_bwd_vs_reference"] = row["reference_fwd_bwd_ms"] / row["ksa_attention_fwd_bwd_ms"]
    print(json.dumps(row), flush=True)
    return [row]


if __name__ == "__main__":
    bench_cli(bench)
