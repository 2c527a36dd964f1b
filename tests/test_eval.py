"""Long-context task generators, scoring, and a smoke run of the eval CLI."""

import collections
import json
import re

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


def test_cli_rejects_bad_depth(tmp_path, capsys):
    path, *_ = tiny_checkpoint(tmp_path / "m")
    assert E.main(["--model", str(path), "--depths", "1.5"]) == 1
    assert "error:" in capsys.readouterr().err


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
