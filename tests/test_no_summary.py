"""summary_token_num = 0: the "sliding chunks only" baseline (no summary tokens;
text t sees the text [band_start(t), t] and nothing older), against the
independent PyTorch reference and a banded mask built here from the spec."""

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

import mlx_ksa
from mlx_ksa.layout import Layout
from mlx_ksa.model import Model, ModelArgs
from mlx_ksa.train import save_pretrained
from tests import torch_reference as ref
from tests.helpers import random_ids, run_steps, tiny_checkpoint

TOL = 1e-4

CONFIGS = {
    "hybrid_k4": {"summary_sliding_chunk_num": "([2]*3+[8]*1)*1"},
    "mha_k8_w1": {"num_key_value_heads": 4, "summary_chunk_size": 8, "summary_sliding_chunk_num": 1},
    "window0_gqa4": {"num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 32,
                     "summary_sliding_chunk_num": "[0, 3, 1, 64]"},
}


def banded(n, k, W):
    """[n, n] mask straight from the spec: text t sees text (t//k - W)^+ * k .. t."""
    t = np.arange(n)[:, None]
    kv = np.arange(n)[None, :]
    return (kv <= t) & (kv >= np.maximum(t // k - W, 0) * k)


@pytest.mark.parametrize("k,W", [(4, 0), (4, 2), (8, 1), (3, 64)])
def test_reference_mask_is_the_band(k, W):
    # With S = 0 the interleaved sequence is the text alone, and the spec's
    # predicate reduces to the band.
    rows = ref.expanded_layout(50, k, 0)
    assert len(rows) == 50
    assert (ref.spec_mask(rows, k, W) == banded(50, k, W)).all()
    layout = Layout(k, 0)
    from mlx_ksa.visibility import visible
    p = np.arange(50)
    assert (visible(p[:, None], p[None, :], layout, W) & (p[None, :] <= p[:, None]) == banded(50, k, W)).all()


def test_negative_summaries_rejected():
    with pytest.raises(ValueError, match="non-negative"):
        Layout(8, -1)
    cfg = ref.make_config(summary_token_num=-1)
    with pytest.raises(ValueError, match="summary_token_num"):
        ModelArgs.from_dict(cfg)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def case(request, tmp_path_factory):
    path, cfg, weights = tiny_checkpoint(tmp_path_factory.mktemp(request.param), tokenizer=False,
                                         summary_token_num=0, vocab_size=96, **CONFIGS[request.param])
    assert cfg["vocab_size"] == cfg["summary_token_begin"]
    model, _ = mlx_ksa.load_model(path)
    assert "summary_embedding" not in model.model  # no zero-row parameter
    ids = random_ids(70, cfg["summary_token_begin"], seed=len(request.param))
    return model, cfg, weights, ids, ref.forward(cfg, weights, list(ids))


@pytest.mark.parametrize("n", [70, 64, 9, 3])
def test_prefill(case, n):
    model, cfg, _, ids, expected = case
    logits = np.array(model(mx.array(ids[:n])[None])[0])
    assert np.abs(logits - expected[:n]).max() <= TOL


def test_decode_every_step(case):
    model, cfg, _, ids, expected = case
    cache = mlx_ksa.make_prompt_cache(model)
    logits = run_steps(model, ids, [5] + [1] * (len(ids) - 5), cache)
    assert np.abs(logits - expected).max() <= TOL
    # No summary slots anywhere: the cache holds at most the window's text.
    k = cfg["summary_chunk_size"]
    for c, W in zip(cache, model.args.windows):
        assert c.offset == len(ids)
        assert c.keys.shape[2] <= k + max(W, 1) * k + c.step


@pytest.mark.parametrize("sizes", [[8, 8, 8, 46], [3] * 23 + [1], [33, 1, 36]])
def test_chunked_prefill(case, sizes):
    model, cfg, _, ids, expected = case
    logits = run_steps(model, ids, sizes, mlx_ksa.make_prompt_cache(model))
    assert np.abs(logits - expected).max() <= TOL


def test_old_text_is_invisible(case):
    """Changing text older than every layer's reach leaves the logits unchanged."""
    model, cfg, _, ids, _ = case
    k = cfg["summary_chunk_size"]
    reach = sum(model.args.windows) * k + k  # stacked receptive field, in tokens
    n = reach + 3 * k
    ids = random_ids(n, cfg["summary_token_begin"], seed=1)
    other = ids.copy()
    other[:2] = (other[:2] + 1) % cfg["summary_token_begin"]
    a = np.array(model(mx.array(ids)[None])[0])
    b = np.array(model(mx.array(other)[None])[0])
    assert np.abs(a[-k:] - b[-k:]).max() == 0
    assert np.abs(a[:4] - b[:4]).max() > 0


def test_save_and_load(tmp_path):
    cfg = ref.make_config(summary_token_num=0, summary_sliding_chunk_num="[1]*3+[2]")
    cfg["vocab_size"] = cfg["summary_token_begin"]
    mx.random.seed(0)
    model = Model(ModelArgs.from_dict(cfg))
    save_pretrained(tmp_path / "m", model, cfg)
    loaded, _ = mlx_ksa.load_model(tmp_path / "m")
    ids = mx.array(random_ids(40, cfg["summary_token_begin"]))[None]
    assert np.abs(np.array(model(ids)) - np.array(loaded(ids))).max() == 0


def test_checkpoint_with_an_empty_summary_block_loads(case):
    """Checkpoints saved before S = 0 models dropped the parameter carry a
    [0, hidden] summary_embedding; it is dropped, not a load error."""
    model, cfg, *_ = case
    weights = dict(tree_flatten(model.parameters()))
    weights["model.summary_embedding"] = mx.zeros((0, cfg["hidden_size"]))
    model.load_weights(list(model.sanitize(weights).items()), strict=True)
