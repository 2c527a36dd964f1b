"""Parity with outputs of the official PyTorch implementation (shared fixture)."""

import mlx.core as mx
import numpy as np
import pytest

import mlx_ksa
from mlx_ksa.layout import Layout

PROMPTS = [("prompt", ""), ("prompt_aligned", "aligned_"), ("prompt_short", "short_")]
TOL = 1e-4


@pytest.fixture(scope="module")
def setup(official_fixture):
    model, config = mlx_ksa.load_model(official_fixture)
    return model, config, np.load(official_fixture / "reference.npz")


@pytest.mark.parametrize("name,prefix", PROMPTS)
def test_prefill_logits(setup, name, prefix):
    model, _, ref = setup
    logits = model(mx.array(ref[f"{name}_ids"])[None])[0]
    assert logits.shape == ref[f"{name}_prefill_logits"].shape
    assert np.abs(np.array(logits) - ref[f"{name}_prefill_logits"]).max() <= TOL


@pytest.mark.parametrize("name,prefix", PROMPTS)
def test_cached_greedy_decode(setup, name, prefix):
    model, _, ref = setup
    cache = mlx_ksa.make_prompt_cache(model)
    logits = model(mx.array(ref[f"{name}_ids"])[None], cache=cache)[0, -1]
    expected = ref[f"{prefix}decode_logits"]
    for step, want in enumerate(ref[f"{prefix}greedy_ids"]):
        assert np.abs(np.array(logits) - expected[step]).max() <= TOL, f"step {step}"
        token = int(mx.argmax(logits))
        assert token == want, f"step {step}"
        logits = model(mx.array([[token]]), cache=cache)[0, -1]


@pytest.mark.parametrize("name,prefix", PROMPTS)
def test_layout_matches_official_expansion(setup, name, prefix):
    _, config, ref = setup
    layout = Layout(config["summary_chunk_size"], config["summary_token_num"])
    ids = ref[f"{name}_ids"]
    exp = "" if name == "prompt" else prefix
    np.testing.assert_array_equal(
        layout.expand(ids, config["summary_token_begin"]), ref[f"{exp}expanded_input_ids"]
    )
    # Positions, mapped back from the two streams onto the interleaved order.
    n = len(ids)
    c0, m = layout.completed_chunks(0, n)
    pos = np.zeros(n + m, np.int64)
    t = np.arange(n)
    pos[layout.expanded_text_index(t)] = layout.text_positions(0, n)
    pos[layout.expanded_summary_index(np.arange(m), 0)] = layout.summary_positions(0, m)
    np.testing.assert_array_equal(pos, ref[f"{exp}expanded_position_ids"])
