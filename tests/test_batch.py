"""mlx-lm's batching (batch_generate, BatchGenerator) over KSA caches at
different chunk phases; decode steps run all rows at once over one buffer."""

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


# S = 1, and S = 2 with the summary branch (summary rows of rows that
# complete no chunk still run it) and a layer whose window covers the whole
# context (a cache without summaries). Windows of 1 and 2 chunks of 4 tokens:
# every sequence passes them.
CONFIGS = {
    "S1": dict(summary_sliding_chunk_num="[1]*3+[3]"),
    "S2": dict(summary_sliding_chunk_num="[1]*2+[2]+[64]", summary_token_num=2,
               summary_independent_parameters=True, mix_coeff=0.5),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def loaded(tmp_path_factory, request):
    path, *_ = tiny_checkpoint(tmp_path_factory.mktemp("batch"), **CONFIGS[request.param])
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
def test_batch_generate_gives_each_sequence_its_own_tokens(loaded, batch_sizes, monkeypatch):
    """Every prompt length puts its sequence at another chunk phase; small
    batch sizes make mlx-lm extend the running batch and filter finished rows."""
    model, tokenizer = loaded
    fused = []  # batch sizes of the decode steps that ran all rows at once
    store = BatchKSACache.store_decode
    monkeypatch.setattr(BatchKSACache, "store_decode",
                        lambda self, k, v: fused.append(len(self.rows)) or store(self, k, v))
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    prefill, completion = batch_sizes
    got = batch_generate(model, tokenizer, prompts, max_tokens=MAX_TOKENS, return_token_ids=True,
                         return_logprobs=True, prefill_batch_size=prefill,
                         completion_batch_size=completion, prefill_step_size=7)
    for prompt, n, tokens, logprobs in zip(prompts, MAX_TOKENS, got.token_ids, got.logprobs):
        expected, expected_logprobs = alone(model, tokenizer, prompt, n)
        assert list(tokens) == expected
        assert np.abs(np.array(logprobs) - expected_logprobs).max() <= 1e-5
    assert max(fused) == min(len(PROMPTS), completion)


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


def prefilled(model, prompt):
    cache = mlx_ksa.make_prompt_cache(model)
    if len(prompt):
        model(mx.array(prompt)[None], cache=cache)
    return cache


def merged(caches):
    return [KSACache.merge([c[i] for c in caches]) for i in range(len(caches[0]))]


def step_alone(model, caches, tokens):
    return np.stack([np.array(model(mx.array([[int(t)]]), cache=c)[0, -1]) for c, t in zip(caches, tokens)])


def step_batch(model, batch, tokens):
    logits = np.array(model(mx.array(tokens)[:, None], cache=batch)[:, -1])
    assert batch[0].keys is not None  # the rows ran as one, over the shared buffer
    return logits


# Prompt lengths at every chunk phase (k = 4), so rows complete chunks on
# different steps; 0 is a sequence whose first token is its decode step's.
LENGTHS = [0, 1, 3, 4, 6, 11, 17, 30]


@pytest.mark.parametrize("step", [256, 4], ids=["default_growth", "grows_mid_batch"])
def test_fused_decode_equals_each_row_alone(loaded, step, monkeypatch):
    """step 4: the rows' rings and summary regions differ when packed, and
    grow (every row's part of the shared buffer) during batched steps."""
    monkeypatch.setattr(KSACache, "step", step)
    model, _ = loaded
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, 96, n).tolist() for n in LENGTHS]
    alone = [prefilled(model, p) for p in prompts]
    batch = merged([prefilled(model, p) for p in prompts])
    for tokens in rng.integers(0, 96, (13, len(prompts))):
        np.testing.assert_allclose(step_batch(model, batch, tokens), step_alone(model, alone, tokens),
                                   atol=1e-5, rtol=0)
    assert [c.offset for c in batch[0].rows] == [c[0].offset for c in alone]


def test_fused_decode_through_filter_extend_extract(loaded, monkeypatch):
    """Rows leave, join (with buffers of another layout) and are taken out mid-decode."""
    monkeypatch.setattr(KSACache, "step", 4)
    model, _ = loaded
    rng = np.random.default_rng(2)
    prompts = [rng.integers(0, 96, n).tolist() for n in LENGTHS]
    alone = [prefilled(model, p) for p in prompts]
    batch = merged([prefilled(model, p) for p in prompts[:5]])

    def check(rows, tokens):
        got = step_batch(model, batch, tokens[rows])
        np.testing.assert_allclose(got, step_alone(model, [alone[i] for i in rows], tokens[rows]),
                                   atol=1e-5, rtol=0)
        return got

    rows = [0, 1, 2, 3, 4]
    for tokens in rng.integers(0, 96, (3, len(prompts))):
        check(rows, tokens)
    for b in batch:
        b.filter([1, 3, 4])
    rows = [1, 3, 4]
    check(rows, rng.integers(0, 96, len(prompts)))
    other = merged([prefilled(model, p) for p in prompts[5:]])
    for _ in range(5):  # the joining rows decode together first
        t = rng.integers(0, 96, 3)
        model(mx.array(t)[:, None], cache=other)
        step_alone(model, alone[5:], t)
    assert any(b.keys.shape != o.keys.shape for b, o in zip(batch, other))
    for b, o in zip(batch, other):
        b.extend(o)
    rows += [5, 6, 7]
    for tokens in rng.integers(0, 96, (6, len(prompts))):
        check(rows, tokens)
    # An extracted row goes on alone as it does in the batch.
    taken = [b.extract(2) for b in batch]
    for tokens in rng.integers(0, 96, (5, len(prompts))):
        got = check(rows, tokens)
        np.testing.assert_allclose(step_alone(model, [taken], tokens[rows[2:3]]), got[2:3], atol=1e-5, rtol=0)
