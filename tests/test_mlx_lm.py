"""mlx-lm's generation API runs KSA models unchanged."""

import re

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm import generate, stream_generate
from mlx_lm.generate import generate_step
from mlx_lm.sample_utils import make_logits_processors, make_sampler

import mlx_ksa
from tests import torch_reference as ref
from tests.helpers import tiny_checkpoint


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    path, cfg, weights = tiny_checkpoint(tmp_path_factory.mktemp("gen"),
                                         summary_sliding_chunk_num="[1]*3+[3]")
    model, tokenizer = mlx_ksa.load(str(path))
    return model, tokenizer, cfg, weights


def greedy_reference(cfg, weights, ids, n):
    ids = list(ids)
    for _ in range(n):
        ids.append(int(np.argmax(ref.forward(cfg, weights, ids)[-1])))
    return ids[-n:]


def test_generate_step_matches_reference_greedy(loaded):
    model, tokenizer, cfg, weights = loaded
    prompt = tokenizer.encode("The quick brown fox jumps over the lazy dog, again and again.")
    # Small prefill steps make the prompt straddle several calls, as mlx-lm does at 2048.
    steps = generate_step(mx.array(prompt), model, max_tokens=30, prefill_step_size=7)
    tokens = [int(t) for t, _ in steps]
    assert tokens == greedy_reference(cfg, weights, prompt, 30)


def test_stream_generate_with_sampler_processors_and_progress(loaded):
    model, tokenizer, cfg, weights = loaded
    progress = []
    responses = list(stream_generate(
        model, tokenizer, "hello there", max_tokens=12,
        sampler=make_sampler(temp=0.8, top_p=0.9, min_p=0.05, top_k=20),
        logits_processors=make_logits_processors(repetition_penalty=1.3),
        prompt_progress_callback=lambda done, total: progress.append((done, total)),
    ))
    assert len(responses) == 12 and responses[-1].generation_tokens == 12
    assert all(0 <= r.token < cfg["summary_token_begin"] for r in responses)
    assert progress[-1][0] == progress[-1][1] == responses[-1].prompt_tokens
    text = generate(model, tokenizer, "hello there", max_tokens=12)
    assert isinstance(text, str) and len(text) > 0


def test_prompt_cache_reuse_across_calls(loaded):
    model, tokenizer, *_ = loaded
    prompt = tokenizer.encode("Summaries keep what left the window.")
    fresh = [int(t) for t, _ in generate_step(mx.array(prompt), model, max_tokens=6)]
    # A cache already holding the prompt's head (a saved system prompt, say).
    cache = mlx_ksa.make_prompt_cache(model)
    model(mx.array(prompt[:21])[None], cache=cache)
    cont = [int(t) for t, _ in generate_step(mx.array(prompt[21:]), model, max_tokens=6, prompt_cache=cache)]
    assert cont == fresh
    assert cache[0].offset >= len(prompt) + 5


def test_load_without_arguments_gives_the_shipped_model():
    """A notebook's first line: mlx_ksa.load() with no path is the package's own model."""
    from mlx_ksa.utils import DEFAULT_MODEL

    model, tokenizer = mlx_ksa.load()
    same, _ = mlx_ksa.load(str(DEFAULT_MODEL))
    ids = mx.array(tokenizer.encode("def fibonacci(n):"))[None]
    assert mx.array_equal(model(ids), same(ids))
    assert generate(model, tokenizer, "def fibonacci(n):", max_tokens=8)


@pytest.mark.parametrize("quantized", [False, True])
def test_load_names_a_config_that_does_not_match_the_weights(tmp_path, quantized):
    import json
    import shutil

    from mlx_ksa.utils import DEFAULT_MODEL  # 8-bit weights

    if quantized:
        path = tmp_path / "m"
        shutil.copytree(DEFAULT_MODEL, path)
    else:
        path, *_ = tiny_checkpoint(tmp_path / "m")
    cfg = json.loads((path / "config.json").read_text())
    cfg["intermediate_size"] //= 2
    (path / "config.json").write_text(json.dumps(cfg))
    match = r"config\.json's sizes match the weights" if quantized else r"Expected shape .*\.mlp\."
    with pytest.raises(ValueError, match=rf"cannot load the KSA model in {re.escape(str(path))}: .*{match}"):
        mlx_ksa.load(path)
