"""Logits against the independent PyTorch reference of the spec (tests/torch_reference.py)."""

import mlx.core as mx
import numpy as np
import pytest

import mlx_ksa
from tests import torch_reference as ref
from tests.helpers import random_ids, run_steps, tiny_checkpoint

TOL = 1e-4

CONFIGS = {
    "gqa_full_layer": {},
    # The last layer's window (6 chunks) is passed at 24 tokens: summaries of
    # chunks that leave it become visible there, as in every other layer.
    "window_passed": {"summary_sliding_chunk_num": "([1]*3+[6]*1)*1"},
    "two_summaries": {"summary_token_num": 2, "summary_sliding_chunk_num": [2, 3, 1, 64]},
    "mha_k8": {"num_key_value_heads": 4, "summary_chunk_size": 8, "summary_sliding_chunk_num": 2},
    "mix_half": {"summary_independent_parameters": True, "mix_coeff": 0.5},
    "mix_one_untied": {"summary_independent_parameters": True, "mix_coeff": 1.0,
                       "tie_word_embeddings": False, "summary_independent_attention_layernorm": True},
    "inner_chunk_zeros": {"summary_chunk_position_ids_type": "inner_chunk",
                          "summary_token_position_ids_type": "zeros", "summary_sliding_chunk_num": 1},
    "slice_left_s2": {"summary_token_num": 2, "summary_token_position_ids_type": "last_chunk_slice_left",
                      "summary_sliding_chunk_num": 0},
    "gqa4_head32": {"num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 32,
                    "summary_sliding_chunk_num": "[3]*2+[1,2]"},
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def case(request, tmp_path_factory):
    path, cfg, weights = tiny_checkpoint(tmp_path_factory.mktemp(request.param), tokenizer=False,
                                         **CONFIGS[request.param])
    model, _ = mlx_ksa.load_model(path)
    ids = random_ids(70, cfg["summary_token_begin"], seed=len(request.param))
    return model, cfg, ids, ref.forward(cfg, weights, list(ids))


@pytest.mark.parametrize("n", [70, 64, 9, 3])
def test_prefill(case, n):
    model, cfg, ids, expected = case
    k = cfg["summary_chunk_size"]
    logits = np.array(model(mx.array(ids[:n])[None])[0])
    # Causality makes the reference's prefix rows the logits of the shorter prompt.
    assert np.abs(logits - expected[:n]).max() <= TOL, f"n={n} (n % k = {n % k})"


def test_decode_every_step(case):
    model, cfg, ids, expected = case
    cache = mlx_ksa.make_prompt_cache(model)
    logits = run_steps(model, ids, [5] + [1] * (len(ids) - 5), cache)
    assert np.abs(logits - expected).max() <= TOL


@pytest.mark.parametrize("sizes", ["k", "k+1", "3", "random"])
def test_chunked_prefill(case, sizes):
    model, cfg, ids, expected = case
    k, n = cfg["summary_chunk_size"], len(ids)
    step = {"k": k, "k+1": k + 1, "3": 3}.get(sizes)
    if step is None:
        cuts = np.sort(np.random.default_rng(7).choice(np.arange(1, n), 6, replace=False))
        pieces = np.diff(np.concatenate([[0], cuts, [n]])).tolist()
    else:
        pieces = [step] * (n // step) + ([n % step] if n % step else [])
    logits = run_steps(model, ids, pieces, mlx_ksa.make_prompt_cache(model))
    assert np.abs(logits - expected).max() <= TOL


def test_batch_of_two(case):
    model, cfg, ids, expected = case
    other = random_ids(len(ids), cfg["summary_token_begin"], seed=99)
    logits = np.array(model(mx.array(np.stack([other, ids])))[1])
    assert np.abs(logits - expected).max() <= TOL


def test_cache_sized_to_the_context(case):
    """make_cache(max_context) drops the summaries of layers whose window covers
    the whole context; chunked prefill and decode through it stay exact."""
    model, cfg, ids, expected = case
    cache = model.make_cache(max_context=len(ids))
    logits = run_steps(model, ids, [30, 3, 17] + [1] * (len(ids) - 50), cache)
    assert np.abs(logits - expected).max() <= TOL
