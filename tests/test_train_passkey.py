"""examples/train_passkey.py end to end at a toy size on the CPU: the outputs
load, and the report's numbers are the ones its own eval rows give."""

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

import mlx_ksa
from mlx_ksa import eval as ksa_eval

ROOT = Path(__file__).resolve().parents[1]
TOY = ["--steps", "4", "--hidden", "64", "--layers", "4", "--ffn", "128", "--heads", "1",
       "--kv-heads", "1", "--head-dim", "64", "--seq-len", "256", "--chunk", "4",
       "--windows", "[2]*3+[4]", "--eval-multiples", "8", "16", "--eval-depths", "0", "1",
       "--eval-trials", "4", "--q-eval-trials", "2", "--vocab", "384", "--text-mb", "0.3", "--batch-size", "2",
       "--passkey-templates", "16", "--tokenizer-lines", "5000", "--report-every", "2",
       "--held-out-chars", "3000", "--sample-tokens", "12", "--grad-clip", "0.5"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("passkey")
    out, bundle = tmp / "passkey", tmp / "passkey.tar.gz"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "examples/train_passkey.py", "--out", str(out),
                           "--bundle", str(bundle), *TOY],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, bundle, json.loads((out / "report.json").read_text()), proc.stderr


def test_outputs_load(run):
    out, _, report, _ = run
    ksa, tok = mlx_ksa.load(out / "ksa")
    base, _ = mlx_ksa.load(out / "baseline")
    assert ksa.args.summary_token_num == 1 and base.args.summary_token_num == 0
    cfg = json.loads((out / "ksa" / "config.json").read_text())
    assert cfg["quantization"]["bits"] == 8
    # No layer's window covers the training context.
    assert (max(ksa.args.windows) + 1) * ksa.args.layout.chunk < report["args"]["seq_len"]
    # The summary row is kept exact, beside the quantized text embedding.
    assert ksa.model.summary_embedding.shape == (1, 64)
    assert "scales" in dict(ksa.model.embed_tokens.parameters())
    ids = tok.encode("The pass key is 12345.")
    assert tok.decode(ids) == "The pass key is 12345."
    assert [tok.decode([i]) for i in ids[-6:-1]] == list("12345")  # digits split
    card = (out / "ksa" / "README.md").read_text()
    assert "examples/train_passkey.py" in card and str(report["models"]["ksa"]["steps"]) in card
    assert "clipped at 0.5," in card
    # The card shows the shipped (quantized, re-loaded) model's language checks, and they are its own.
    lang = report["models"]["ksa_quantized"]["language"]
    assert f"{lang['held_out_perplexity']:.2f}" in card and "def fibonacci(n):" + lang["sample"] in card
    held_out = "\n".join(f.read_text() for f in sorted((ROOT / "mlx_ksa").rglob("*.py")))
    held_out = held_out[: report["args"]["held_out_chars"]]
    assert lang["held_out_perplexity"] == pytest.approx(
        ksa_eval.perplexity(ksa, tok, held_out, seq_len=report["args"]["seq_len"]), rel=1e-4)


def test_report_matches_its_eval(run):
    out, _, report, log = run
    lengths, depths = report["lengths"], report["depths"]
    assert lengths == [int(round(m * report["window_tokens"])) for m in (8, 16)]
    assert "tok/s" in log and "step 4/4" in log
    for name in ("ksa", "baseline", "ksa_quantized"):
        ev = report["models"][name]["eval"]
        rows = ev["rows"]
        assert len(rows) == len(lengths) * ev["trials_per_length"]
        for L in lengths:
            sel = [r for r in rows if r["length"] == L]
            assert ev["accuracy"][str(L)] == pytest.approx(np.mean([r["score"] for r in sel]))
            for d in depths:
                assert ev["accuracy_by_depth"][str(L)][f"{d:g}"] == pytest.approx(
                    np.mean([r["score"] for r in sel if r["depth"] == d]))
            far = [r["score"] for r in sel if r["beyond_window"]]
            assert ev["accuracy_beyond_window"][str(L)] == (pytest.approx(np.mean(far)) if far else None)
            assert ev["kv_cache_bytes"][str(L)] > 0
        for r in rows:
            assert r["score"] == ksa_eval.score(r["prediction"], r["answers"])
            assert r["beyond_window"] == (r["distance"] > report["window_tokens"])
    for name in ("ksa", "baseline"):
        m = report["models"][name]
        assert m["steps"] == 4 and m["tokens"] == 4 * 2 * 256
        assert len(m["loss_curve"]) == 2 and m["final_loss"] == m["loss_curve"][-1][1]
    # KSA keeps summaries, the baseline keeps the window's text only.
    L = str(lengths[-1])
    assert report["models"]["ksa"]["kv_cache_used_bytes"][L] > report["models"]["baseline"]["kv_cache_used_bytes"][L]
    md = (out / "report.md").read_text()
    for L in lengths:
        assert f"| {L} |" in md


def test_saved_model_reproduces_its_rows(run):
    """Greedy generation is deterministic: the shipped (quantized) model gives
    the predictions the report recorded for it."""
    out, _, report, _ = run
    model, tok = mlx_ksa.load(out / "ksa")
    ev = report["models"]["ksa_quantized"]["eval"]
    L = report["lengths"][0]
    rows = ksa_eval.run_task(model, tok, "passkey", [L], report["depths"], ev["trials_per_depth"],
                             seed=report["args"]["eval_seed"], max_tokens=report["args"]["eval_max_tokens"])
    recorded = [r for r in ev["rows"] if r["length"] == L]
    assert [r["prediction"] for r in rows] == [r["prediction"] for r in recorded]


def test_bundle(run):
    out, bundle, _, _ = run
    with tarfile.open(bundle) as tar:
        names = set(tar.getnames())
    for f in ("report.json", "report.md", "train.log", "ksa/config.json", "ksa/model.safetensors",
              "ksa/tokenizer.json", "ksa/README.md", "baseline/config.json"):
        assert f"{out.name}/{f}" in names
    assert f"{out.name}/baseline/model.safetensors" not in names


def test_rows_weight_exactly_the_answer_digits():
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_passkey", ROOT / "examples" / "train_passkey.py")
    tp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tp)
    digit_ids = list(range(100, 110))
    # A template: filler 7, three copies of a 5-digit key at known positions.
    ids = np.full(40, 7, np.int32)
    pos = np.array([3, 4, 5, 6, 7, 12, 13, 14, 15, 16, 33, 34, 35, 36, 37])
    stream = np.arange(1000, 3000, dtype=np.int32)
    rows, weights = tp.make_rows(50, 64, [(ids, pos)], stream, 0.5, 2, digit_ids,
                                 np.random.default_rng(0), answer_weight=9.0)
    assert rows.shape == (50, 65) and weights.shape == (50, 64)
    passkey_rows = [r for r in range(50) if rows[r, 0] == 7]
    assert 0 < len(passkey_rows) < 50
    for r in range(50):
        heavy = np.flatnonzero(weights[r] != 1)
        if r in passkey_rows:
            np.testing.assert_array_equal(heavy, pos[-5:] - 1)  # targets rows[r, pos[-5:]]
            assert (weights[r, heavy] == 9).all()
            key = rows[r, pos[:5]]
            np.testing.assert_array_equal(rows[r, pos[-5:]], key)  # the answer repeats the key
            assert set(key.tolist()) <= set(digit_ids) and rows[r, 40] == 2  # EOS after the example
        else:
            assert heavy.size == 0
