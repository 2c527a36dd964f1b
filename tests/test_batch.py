"""mlx-lm's batching (batch_generate, BatchGenerator) over KSA caches at different chunk phases."""

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm import batch_generate
from mlx_lm.generate import generate_step

import mlx_ksa
from mlx_ksa.cache import BatchKSACache, KSACache
from tests.helpers import tiny_checkpoint

PROMPTS = ["Hi", "The ring keeps W chunks.", "Summaries keep what left the window, chunk by chunk.",
           "batch me", "A longer prompt that straddles prefill steps of seven tokens or so."]
MAX_TOKENS = [20, 12, 25, 16, 9]


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    path, *_ = tiny_checkpoint(tmp_path_factory.mktemp("batch"), summary_sliding_chunk_num="[1]*3+[3]")
    return mlx_ksa.load(str(path))


def alone(model, tokenizer, prompt, max_tokens):
    """Greedy tokens of one sequence and their log-probabilities, up to and
    including an end-of-sequence token."""
    tokens, logprobs = [], []
    for t, lp in generate_step(mx.array(prompt), model, max_tokens=max_tokens, prefill_step_size=7):
        tokens.append(int(t))
        logprobs.append(lp[tokens[-1]].item())
        if tokens[-1] in tokenizer.eos_token_ids:
            break
    return tokens, np.array(logprobs)


@pytest.mark.parametrize("batch_sizes", [(8, 32), (2, 3)], ids=["one_batch", "continuous"])
def test_batch_generate_gives_each_sequence_its_own_tokens(loaded, batch_sizes):
    """Every prompt length puts its sequence at another chunk phase; small
    batch sizes make mlx-lm extend the running batch and filter finished rows."""
    model, tokenizer = loaded
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    prefill, completion = batch_sizes
    got = batch_generate(model, tokenizer, prompts, max_tokens=MAX_TOKENS, return_token_ids=True,
                         return_logprobs=True, prefill_batch_size=prefill,
                         completion_batch_size=completion, prefill_step_size=7)
    for prompt, n, tokens, logprobs in zip(prompts, MAX_TOKENS, got.token_ids, got.logprobs):
        expected, expected_logprobs = alone(model, tokenizer, prompt, n)
        assert list(tokens) == expected
        assert np.abs(np.array(logprobs) - expected_logprobs).max() <= 1e-5


def test_batch_protocol_round_trip(loaded):
    model, tokenizer = loaded
    caches = [mlx_ksa.make_prompt_cache(model) for _ in range(3)]
    for c, n in zip(caches, (3, 9, 14)):
        model(mx.array(tokenizer.encode("x" * n))[None], cache=c)
    batch = [KSACache.merge([c[i] for c in caches]) for i in range(len(caches[0]))]
    assert all(isinstance(b, BatchKSACache) for b in batch)
    assert batch[0].size() == 14 and not batch[0].empty()
    assert sum(b.nbytes for b in batch) == sum(c.nbytes for cs in caches for c in cs)
    # Right-padded prompt: row 0 has 2 real tokens, row 1 has 4, row 2 has 1.
    for b in batch:
        b.prepare(lengths=[2, 4, 1], right_padding=[2, 0, 3])
    tokens = mx.array([[5, 6, 0, 0], [7, 8, 9, 10], [11, 0, 0, 0]])
    logits = model(tokens, cache=batch)
    assert logits.shape == (3, 4, model.args.text_vocab)
    assert [c[0].offset for c in caches] == [3 + 2, 9 + 4, 14 + 1]
    for b in batch:
        b.finalize()
    # Each row's logits are what the sequence computes alone.
    solo = mlx_ksa.make_prompt_cache(model)
    model(mx.array(tokenizer.encode("x" * 9))[None], cache=solo)
    assert mx.array_equal(model(tokens[1:2], cache=solo)[0], logits[1]).item()
    for b in batch:
        b.filter([2, 0])
    assert batch[0].extract(0) is caches[2][0]
    other = [KSACache.merge([c[i] for c in caches[1:2]]) for i in range(len(caches[0]))]
    for b, o in zip(batch, other):
        b.extend(o)
    assert [b.extract(2) for b in batch] == caches[1]
