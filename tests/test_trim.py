"""Trimming KSACache: exact undo within what it keeps, and mlx-lm's speculative decoding."""

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_map
from mlx_lm import stream_generate
from mlx_lm.generate import generate_step, speculative_generate_step
from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

import mlx_ksa
from tests.helpers import random_ids, run_steps, tiny_checkpoint
from tests.test_cache import full_logits, model  # noqa: F401 (a fixture: the same three cache layouts)

TOL = 1e-4


# (sizes fed first, sizes of the block trimmed whole and fed again), for a
# chunk of k: decode steps across a chunk boundary, ending with a completed
# chunk's flush pending or not; blocks that complete a chunk; blocks whose
# trim reaches back into the chunk before the one they end in.
SCHEDULES = {
    "decode_across": lambda k: ([7 * k + 1], [1] * k),
    "decode_pending": lambda k: ([4 * k + 1] + [1] * (k - 1), [1] * k),
    "after_pending": lambda k: ([7 * k - 2, 1, 1], [1, 1]),
    "block_completes": lambda k: ([7 * k - 1], [k]),
    "block_reaches_back": lambda k: ([7 * k + 1], [k + 1]),
    "mixed_reaches_back": lambda k: ([8 * k, 1], [2, 1, k - 2]),
}


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_trim_and_refeed_is_bit_identical(model, schedule):
    head, block = SCHEDULES[schedule](model.args.summary_chunk_size)
    n_head, n_block = sum(head), sum(block)
    ids = random_ids(n_head + n_block + 9, 96, seed=n_head)
    twin = mlx_ksa.make_prompt_cache(model)
    cache = mlx_ksa.make_prompt_cache(model)
    run_steps(model, ids[:n_head], head, cache)
    first = run_steps(model, ids[n_head : n_head + n_block], block, cache)
    assert trim_prompt_cache(cache, n_block) == n_block
    assert all(c.offset == n_head for c in cache)
    again = run_steps(model, ids[n_head : n_head + n_block], block, cache)
    np.testing.assert_array_equal(again, first)
    # ...and the cache goes on exactly as one that never trimmed.
    expected = run_steps(model, ids, head + block + [4, 1, 1, 1, 1, 1], twin)
    got = run_steps(model, ids[n_head + n_block :], [4, 1, 1, 1, 1, 1], cache)
    np.testing.assert_array_equal(got, expected[n_head + n_block :])
    assert np.abs(got - full_logits(model, ids)[n_head + n_block :]).max() <= TOL


def test_random_feeds_and_trims_match_prefill(model):
    """Speculative decoding's pattern at random: feed a few tokens (decode
    steps or blocks), drop up to what the cache keeps, feed other tokens."""
    rng = np.random.default_rng(7)
    k = model.args.summary_chunk_size
    cache = mlx_ksa.make_prompt_cache(model)
    ids = []
    for _ in range(40):
        new = [int(x) for x in rng.integers(0, 96, int(rng.integers(1, k + 3)))]
        got = run_steps(model, np.array(new, np.int32), [1] * len(new) if rng.random() < 0.5 else [len(new)],
                        cache)
        ids += new
        assert np.abs(got - full_logits(model, ids)[-len(new):]).max() <= TOL
        keep = cache[0].trimmable()
        assert all(c.trimmable() == keep and c.offset == len(ids) for c in cache)
        # Mostly less than was fed (as a verifier rejects drafts), at times all there is.
        n = keep if rng.random() < 0.2 else int(rng.integers(0, min(keep, len(new) - 1) + 1))
        assert trim_prompt_cache(cache, n) == n
        ids = ids[: len(ids) - n]
    assert len(ids) > 6 * k  # well past every window


def test_trimming_more_than_is_kept_raises(model):
    k = model.args.summary_chunk_size
    cache = mlx_ksa.make_prompt_cache(model)
    assert can_trim_prompt_cache(cache) and trim_prompt_cache(cache, 3) == 0  # empty: nothing to trim
    model(mx.array(random_ids(4 * k + 1, 96))[None], cache=cache)
    assert cache[0].trimmable() == k + 1  # the filled token and the chunk before it
    with pytest.raises(ValueError, match=f"keeps only its last {k + 1} "):
        cache[0].trim(k + 2)
    assert cache[0].offset == 4 * k + 1
    # Undoing a chunk completion once uses up the chunk before: to its start, nothing is left.
    assert trim_prompt_cache(cache, k + 1) == k + 1
    assert not can_trim_prompt_cache(cache) and cache[0].trimmable() == 0
    with pytest.raises(ValueError, match="keeps only its last 0 "):
        cache[0].trim(1)
    # New tokens are trimmable again.
    model(mx.array(random_ids(2, 96))[None], cache=cache)
    assert cache[0].trimmable() == 2


def test_trimmed_cache_saves_and_loads(model, tmp_path):
    from mlx_lm.models.cache import load_prompt_cache, save_prompt_cache

    k = model.args.summary_chunk_size
    ids = random_ids(60, 96, seed=4)
    cache = mlx_ksa.make_prompt_cache(model)
    run_steps(model, ids[:40], [38, 1, 1], cache)
    trim_prompt_cache(cache, 40 % k + 1)  # back across a chunk boundary
    mx.eval([c.state for c in cache])
    save_prompt_cache(str(tmp_path / "c.safetensors"), cache)
    loaded = load_prompt_cache(str(tmp_path / "c.safetensors"))
    head = 40 - (40 % k + 1)
    a = run_steps(model, ids[head:], [len(ids) - head], cache)
    b = run_steps(model, ids[head:], [len(ids) - head], loaded)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - full_logits(model, ids)[head:]).max() <= TOL


# -- speculative decoding ------------------------------------------------------

@pytest.fixture(scope="module")
def target_and_drafts(tmp_path_factory):
    path, *_ = tiny_checkpoint(tmp_path_factory.mktemp("target"), summary_sliding_chunk_num="[1]*3+[3]")
    target, tokenizer = mlx_ksa.load(str(path))
    # A draft close to the target accepts some tokens and rejects others; an
    # unrelated one (other weights, other windows) rejects nearly everything.
    near = mlx_ksa.load_model(path)[0]
    noise = np.random.default_rng(0)
    near.update(tree_map(lambda p: p + mx.array(noise.normal(0, 0.06, p.shape).astype(np.float32)),
                         near.parameters()))
    other_path, *_ = tiny_checkpoint(tmp_path_factory.mktemp("draft"), seed=1, tokenizer=False,
                                     summary_sliding_chunk_num=[2, 0, 1, 5])
    other = mlx_ksa.load_model(other_path)[0]
    return target, tokenizer, {"self": target, "near": near, "other": other}


@pytest.mark.parametrize("draft", ["self", "near", "other"])
@pytest.mark.parametrize("num_draft", [1, 3, 4])
def test_speculative_decoding_gives_the_targets_greedy_tokens(target_and_drafts, draft, num_draft):
    target, tokenizer, drafts = target_and_drafts
    prompt = mx.array(tokenizer.encode("Speculative decoding trims what the target rejects."))
    expected = [int(t) for t, _ in generate_step(prompt, target, max_tokens=40)]
    steps = list(speculative_generate_step(prompt, target, drafts[draft], num_draft_tokens=num_draft,
                                           max_tokens=40, prefill_step_size=16))
    assert [int(t) for t, _, _ in steps] == expected
    accepted = sum(from_draft for *_, from_draft in steps)
    if draft == "self":
        assert accepted >= 40 * num_draft // (num_draft + 1) - 1
    elif draft == "near":
        assert 0 < accepted < 40 - 40 // (num_draft + 1)  # both outcomes happen


def test_stream_generate_with_a_draft_model(target_and_drafts):
    target, tokenizer, drafts = target_and_drafts
    plain = list(stream_generate(target, tokenizer, "hello there", max_tokens=30))
    spec = list(stream_generate(target, tokenizer, "hello there", max_tokens=30,
                                draft_model=drafts["near"], num_draft_tokens=4))
    assert [r.token for r in spec] == [r.token for r in plain]
    assert "".join(r.text for r in spec) == "".join(r.text for r in plain)
