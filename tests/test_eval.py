"""Long-context task generators, scoring, and a smoke run of the eval CLI."""

import collections
import json
import re
import sys

import numpy as np
import pytest

from mlx_ksa import eval as E
from tests.helpers import tiny_checkpoint

count_words = lambda s: len(s.split())


@pytest.mark.parametrize("task", sorted(E.TASKS))
def test_generators_are_deterministic_and_sized(task):
    a = E.make_instances(task, [300, 900], [0.0, 0.5, 1.0], 2, seed=1, count_tokens=count_words)
    b = E.make_instances(task, [300, 900], [0.0, 0.5, 1.0], 2, seed=1, count_tokens=count_words)
    c = E.make_instances(task, [300, 900], [0.0, 0.5, 1.0], 2, seed=2, count_tokens=count_words)
    assert [i.prompt for i in a] == [i.prompt for i in b]
    assert [i.prompt for i in a] != [i.prompt for i in c]
    for inst in a:
        assert 0.7 * inst.length <= count_words(inst.prompt) <= 1.3 * inst.length + 60


@pytest.mark.parametrize("task", ["passkey", "niah_single", "niah_multikey", "niah_multivalue",
                                  "variable_tracking"])
def test_answers_are_in_the_context_at_the_requested_depth(task):
    for inst in E.make_instances(task, [2000], [0.0, 0.3, 0.7, 1.0], 3, seed=0, count_tokens=count_words):
        question_at = inst.prompt.rfind("\n")
        context = inst.prompt[:question_at]
        for answer in inst.answers:
            assert answer in context
        where = np.mean([context.find(a) for a in inst.answers]) / len(context)
        assert abs(where - inst.depth) < 0.1, (inst.depth, where)  # needles spread by 0.05


@pytest.mark.parametrize("task", ["common_words", "frequent_words"])
def test_word_answers_are_the_most_common(task):
    for inst in E.make_instances(task, [1500], [0.5], 3, seed=4, count_tokens=count_words):
        listing = inst.prompt.split("\n")[1]
        counts = collections.Counter(re.findall(r"\d+\. (\w+)", listing))
        top = sorted(counts, key=lambda w: -counts[w])[: len(inst.answers)]
        assert set(top) == set(inst.answers)


def test_passkey_key_is_asked_for():
    inst = E.make_instances("passkey", [500], [0.5], 1, seed=0, count_tokens=count_words)[0]
    assert re.fullmatch(r"\d{5}", inst.answers[0])
    assert inst.prompt.endswith("The pass key is")


@pytest.mark.parametrize("pred,answers,expected", [
    (" 71432.", ["71432"], 1.0),
    (" 7143", ["71432"], 0.0),
    ("123, 456 and 789", ["123", "456", "789", "000"], 0.75),
    ("", ["1"], 0.0),
])
def test_score(pred, answers, expected):
    assert E.score(pred, answers) == expected


def test_summary_and_table():
    rows = [{"task": "passkey", "length": 100, "depth": d, "score": s}
            for d, s in [(0.0, 1.0), (0.0, 0.0), (1.0, 1.0)]]
    summary = E.summarize(rows)
    assert summary == {"passkey": {100: {0.0: 0.5, 1.0: 1.0}}}
    assert "| 100 | 0.50 | 1.00 | 0.75 |" in E.format_table(summary)


def test_cli_smoke_run(tmp_path, capsys):
    path, *_ = tiny_checkpoint(tmp_path / "m")
    text = tmp_path / "ppl.txt"
    text.write_text("def add(a, b):\n    return a + b\n" * 10)
    out = tmp_path / "r.json"
    rc = E.main(["--model", str(path), "--tasks", "passkey", "niah_single", "--lengths", "128", "256",
                 "--depths", "0", "1", "--trials", "2", "--max-tokens", "4", "--out", str(out),
                 "--perplexity", str(text)])
    assert rc == 0
    result = json.loads(out.read_text())
    assert len(result["rows"]) == 2 * 2 * 2 * 2
    assert set(result["summary"]) == {"passkey", "niah_single"}
    assert result["perplexity"] > 1.0
    assert "| length |" in capsys.readouterr().out


def test_smoke_run_on_the_shipped_model(tmp_path):
    """The CI-sized eval of the default model: passkeys 4x past its largest
    window, scored from the model's own answers."""
    from mlx_ksa.generate import DEFAULT_MODEL

    out = tmp_path / "r.json"
    assert E.main(["--model", str(DEFAULT_MODEL), "--tasks", "passkey", "--lengths", "256",
                   "--depths", "0", "0.5", "--trials", "2", "--seed", "1234", "--max-tokens", "8",
                   "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert len(rows) == 4
    for r in rows:  # exact match of the one key, read off the model's own text
        assert r["score"] == float(re.search(r"\d+", r["prediction"] or "x") is not None
                                   and re.search(r"\d+", r["prediction"]).group() == r["answers"][0])
    for depth, mean in result["summary"]["passkey"]["256"].items():
        assert mean == pytest.approx(np.mean([r["score"] for r in rows if r["depth"] == float(depth)]))
    assert any(r["score"] for r in rows)  # it does retrieve: the shipped model is not noise


@pytest.mark.parametrize("args, message", [
    (["--depths", "0.5", "1.5"], "--depths 1.5: a depth lies in [0, 1]"),
    (["--lengths", "128", "32"], "--lengths 32: a prompt is at least 64 tokens"),
    (["--trials", "0"], "--trials must be >= 1, got 0"),
    (["--max-tokens", "0"], "--max-tokens must be >= 1, got 0"),
    (["--tasks", "--perplexity", "{text}", "--plot", "{png}"], "--plot draws the tasks' scores"),
])
def test_cli_names_a_bad_option_before_loading(tmp_path, capsys, args, message):
    text = tmp_path / "t.txt"
    text.write_text("x = 1\n")
    args = [s.replace("{text}", str(text)).replace("{png}", str(tmp_path / "h.png")) for s in args]
    # A model that does not exist: the option is checked first.
    assert E.main(["--model", str(tmp_path / "nope"), *args]) == 1
    assert f"error: {message}" in capsys.readouterr().err
    assert not (tmp_path / "h.png").exists()


def test_plot_without_matplotlib_fails_before_the_tasks(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import raises ImportError
    assert E.main(["--model", str(tmp_path / "nope"), "--plot", str(tmp_path / "h.png")]) == 1
    assert "--plot needs matplotlib" in capsys.readouterr().err


def test_plot_draws_each_task_by_depth_and_length(tmp_path):
    rows = [{"task": t, "length": L, "depth": d, "score": s}
            for t, L, d, s in [("passkey", 128, 0.0, 1.0), ("passkey", 128, 0.0, 0.0),
                               ("passkey", 128, 1.0, 1.0), ("passkey", 256, 0.0, 0.0),
                               ("passkey", 256, 1.0, 1.0), ("niah_single", 128, 0.5, 1.0)]]
    png = tmp_path / "h.png"
    fig = E.plot(E.summarize(rows), png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    heat = {ax.get_title(): np.asarray(ax.images[0].get_array()) for ax in fig.axes if ax.images}
    # Rows are depths, columns lengths, cells the mean score of those trials.
    np.testing.assert_array_equal(heat["passkey"], [[0.5, 0.0], [1.0, 1.0]])
    np.testing.assert_array_equal(heat["niah_single"], [[1.0]])


def test_cli_model_defaults_to_the_shipped_one_and_names_a_bad_one(tmp_path, capsys):
    assert E.main(["--model", str(tmp_path / "nope")]) == 1
    assert f"error: model {tmp_path / 'nope'} does not exist" in capsys.readouterr().err
    assert E.main(["--lengths", "64", "--depths", "0", "--trials", "1", "--out", str(tmp_path / "r.json")]) == 0
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    assert len(rows) == 1 and rows[0]["length"] == 64


def test_perplexity_is_exp_mean_ce_over_windows(tmp_path):
    import mlx.core as mx

    import mlx_ksa

    path, *_ = tiny_checkpoint(tmp_path / "m")
    model, tokenizer = mlx_ksa.load(path)
    text = "while True:\n    pass\n" * 3
    ids = np.array(tokenizer.encode(text))
    nll = []
    for a in range(0, len(ids) - 1, 16):
        w = ids[a : a + 17]
        logits = np.array(model(mx.array(w[:-1])[None])[0], np.float64)
        logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
        nll += list(-logp[np.arange(len(w) - 1), w[1:]])
    assert E.perplexity(model, tokenizer, text, seq_len=16) == pytest.approx(np.exp(np.mean(nll)), rel=1e-4)


@pytest.fixture(scope="module")
def qmodel(tmp_path_factory):
    """A tiny KSA model whose head_dim (32) takes KV groups of 32."""
    import mlx_ksa

    path, *_ = tiny_checkpoint(tmp_path_factory.mktemp("q"), head_dim=32)
    return mlx_ksa.load(path)


def _greedy_with_cache(model, tokenizer, prompt, max_tokens, cache):
    """Greedy text of `prompt` decoded through `cache`, stopping at EOS (as generate)."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    tokens = []
    for t, _ in generate_step(mx.array(tokenizer.encode(prompt)), model, max_tokens=max_tokens,
                              prompt_cache=cache):
        if t in tokenizer.eos_token_ids:
            break
        tokens.append(t)
    return tokenizer.decode(tokens)


@pytest.mark.parametrize("bits", [8, 4])
def test_run_task_with_kv_bits_decodes_through_a_quantized_cache(qmodel, bits):
    import mlx_ksa
    from mlx_ksa.cache import QuantizedKSACache

    model, tokenizer = qmodel
    args = ("passkey", [128, 200], [0.0, 1.0], 1)
    rows = E.run_task(model, tokenizer, *args, seed=3, max_tokens=6, kv_bits=bits, kv_group_size=32)
    dense = E.run_task(model, tokenizer, *args, seed=3, max_tokens=6)
    count = lambda s: len(tokenizer.encode(s))
    instances = E.make_instances(*args, seed=3, count_tokens=count)
    assert len(rows) == len(instances) == 4
    D, g = model.args.head_dim, 32
    # Per slot and head: D*bits/8 packed bytes plus a float32 scale and bias per group.
    factor = (D * bits / 8 + 2 * 4 * D / g) / (4 * D)
    for row, d, inst in zip(rows, dense, instances):
        # The same greedy decoding through a cache quantized before the first
        # token: every token is stored quantized once either way.
        cache = [c.to_quantized(g, bits) for c in mlx_ksa.make_prompt_cache(model)]
        expected = _greedy_with_cache(model, tokenizer, inst.prompt, 6, cache)
        assert all(type(c) is QuantizedKSACache for c in cache)
        assert row["prediction"] == expected
        assert row["score"] == E.score(expected, inst.answers)
        assert row["kv_bytes"] == sum(c.nbytes for c in cache)
        assert (row["kv_bits"], row["kv_group_size"]) == (bits, g)
        assert row["kv_dtype"] == f"{bits}-bit (group {g}, float32 scales)"
        # Without kv_bits: the float32 cache of the same slots.
        assert (d["kv_bits"], d["kv_group_size"], d["kv_dtype"]) == (None, None, "float32")
        assert row["kv_bytes"] == d["kv_bytes"] * factor


def test_prompt_kv_is_the_caches_after_the_prompt(qmodel):
    import mlx.core as mx

    import mlx_ksa

    model, tokenizer = qmodel
    prompt = "The pass key is 12345. " * 20
    n, dtype = E.prompt_kv(model, tokenizer, prompt)
    cache = mlx_ksa.make_prompt_cache(model)
    model(mx.array(tokenizer.encode(prompt))[None], cache=cache)
    assert (n, dtype) == (sum(c.nbytes for c in cache), "float32")
    q = [c.to_quantized(64 // 2, 4) for c in cache]
    assert E.prompt_kv(model, tokenizer, prompt, 4, 32) == (sum(c.nbytes for c in q),
                                                            "4-bit (group 32, float32 scales)")


def test_cli_kv_bits(tmp_path, capsys):
    path, *_ = tiny_checkpoint(tmp_path / "m", head_dim=32)
    out = tmp_path / "r.json"
    rc = E.main(["--model", str(path), "--lengths", "128", "--depths", "0.5", "--trials", "2",
                 "--max-tokens", "4", "--kv-bits", "8", "--kv-group-size", "32", "--out", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    assert (result["kv_bits"], result["kv_group_size"]) == (8, 32)
    assert result["kv_dtype"] == "8-bit (group 32, float32 scales)"
    assert all(r["kv_bits"] == 8 and r["kv_dtype"] == result["kv_dtype"] for r in result["rows"])
    assert result["kv_bytes"]["passkey"]["128"] > 0
    text = capsys.readouterr().out
    assert "KV cache: 8-bit (group 32, float32 scales)" in text
    assert f"{result['kv_bytes']['passkey']['128']:,} |" in text


def test_cli_rejects_bad_kv_settings(tmp_path, capsys):
    path, *_ = tiny_checkpoint(tmp_path / "m")  # head_dim 16
    with pytest.raises(SystemExit):
        E.main(["--model", str(path), "--kv-bits", "3"])
    capsys.readouterr()
    assert E.main(["--model", str(path), "--lengths", "128", "--depths", "0", "--trials", "1",
                   "--kv-bits", "4", "--kv-group-size", "32"]) == 1
    assert "group size 32" in capsys.readouterr().err
    with pytest.raises(ValueError, match="kv_bits"):
        E.run_task(None, None, "passkey", [128], [0.0], 1, kv_bits=2)


def test_cli_perplexity_only_and_bad_text(tmp_path, capsys):
    path, *_ = tiny_checkpoint(tmp_path / "m")
    text = tmp_path / "ppl.txt"
    text.write_text("def add(a, b):\n    return a + b\n" * 10)
    out = tmp_path / "r.json"
    assert E.main(["--model", str(path), "--tasks", "--perplexity", str(text), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["rows"] == [] and result["perplexity"] > 1.0
    capsys.readouterr()
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert E.main(["--model", str(path), "--tasks", "--perplexity", str(empty)]) == 1
    assert "error: perplexity needs at least 2 tokens of text, got 0" in capsys.readouterr().err
    # A missing file is named before any task runs.
    assert E.main(["--model", str(tmp_path / "nope"), "--perplexity", str(tmp_path / "missing.txt")]) == 1
    assert "missing.txt" in capsys.readouterr().err
    assert E.main(["--model", str(path), "--tasks"]) == 1
    assert "nothing to evaluate" in capsys.readouterr().err


@pytest.mark.parametrize("dense", [False, True])
def test_cli_names_truncated_weights(tmp_path, capsys, dense):
    path, *_ = tiny_checkpoint(tmp_path / "m")
    for f in path.glob("*.safetensors"):
        f.write_bytes(f.read_bytes()[:1000])
    assert E.main(["--model", str(path), *(["--dense"] if dense else []), "--lengths", "64",
                   "--depths", "0", "--trials", "1"]) == 1
    assert f"error: cannot read the weights in {path}" in capsys.readouterr().err
