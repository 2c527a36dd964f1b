"""Training: loss goes down, exact resume, dense -> KSA conversion, LoRA round trip."""

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

import mlx_ksa
from mlx_ksa import train as T
from mlx_ksa.data import Batches, pack, pack_weights, read_tokens, read_tokens_and_mask
from mlx_ksa.model import Model, ModelArgs
from tests import torch_reference as ref
from tests.helpers import tiny_checkpoint, write_tokenizer


def copy_task(n_seq=160, period=6, seed=0):
    """Random 6-token motifs repeated: learnable only by attending back."""
    rng = np.random.default_rng(seed)
    return np.concatenate([np.tile(rng.integers(0, 32, period), 5) for _ in range(n_seq)]).astype(np.int32)


def fresh_model(seed=0, **overrides):
    cfg = ref.make_config(summary_sliding_chunk_num="[1]*3+[64]", num_hidden_layers=4, **overrides)
    mx.random.seed(seed)
    model = Model(ModelArgs.from_dict(cfg))
    mx.eval(model.parameters())
    return model, cfg


def test_loss_goes_down(tmp_path):
    model, cfg = fresh_model()
    targs = T.TrainArgs(steps=240, batch_size=8, seq_len=24, lr=1e-2, warmup=10, report_every=1000)
    losses = T.train(model, cfg, Batches(pack(copy_task(), 24), 8), targs, tmp_path, log=lambda s: None)
    assert np.mean(losses[-10:]) < np.mean(losses[:10]) - 1.0


@pytest.mark.parametrize("schedule,checkpointing", [("cosine", False), ("wsd", True)])
def test_resume_continues_with_identical_loss(tmp_path, schedule, checkpointing):
    targs = T.TrainArgs(steps=12, batch_size=4, seq_len=16, lr=5e-3, warmup=3, schedule=schedule,
                        save_every=6, report_every=1000, grad_checkpoint=checkpointing)
    data = pack(copy_task(), 16)
    model, cfg = fresh_model()
    full = T.train(model, cfg, Batches(data, 4, seed=3), targs, tmp_path / "a", log=lambda s: None)
    model, cfg = fresh_model(seed=1)  # different init: everything must come from the checkpoint
    resumed = T.train(model, cfg, Batches(data, 4, seed=3), targs, tmp_path / "b", log=lambda s: None,
                      resume=tmp_path / "a" / "checkpoints" / "step_0000006")
    assert len(resumed) == 6
    np.testing.assert_allclose(resumed, full[6:], rtol=1e-6)


def test_weighted_loss_is_the_weighted_mean_of_token_losses():
    model, _ = fresh_model()
    tokens = pack(copy_task(), 16)[:3]
    weights = np.random.default_rng(0).choice([0.0, 1.0, 8.0], size=(3, 16)).astype(np.float32)
    logits = np.array(model(mx.array(tokens[:, :-1])).astype(mx.float32), np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    ce = -np.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]
    got = T.lm_loss(model, (mx.array(tokens), mx.array(weights))).item()
    np.testing.assert_allclose(got, (ce * weights).sum() / weights.sum(), rtol=1e-5)
    np.testing.assert_allclose(T.lm_loss(model, mx.array(tokens)).item(), ce.mean(), rtol=1e-5)


def test_fully_masked_batch_has_zero_loss_and_no_nan():
    model, _ = fresh_model()
    tokens = mx.array(pack(copy_task(), 16)[:2])
    loss, grads = nn.value_and_grad(model, T.lm_loss)(model, (tokens, mx.zeros((2, 16))))
    assert loss.item() == 0.0
    assert all(np.isfinite(np.array(g)).all() and not np.array(g).any() for _, g in tree_flatten(grads))


def test_prompt_masks_and_their_packing(tmp_path):
    from mlx_lm.utils import load_tokenizer

    write_tokenizer(tmp_path, 96)
    tok = load_tokenizer(tmp_path)
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "and?"}, {"role": "assistant", "content": "bye"}]
    records = [{"prompt": "Q: 2+2? ", "completion": "A: 4"}, {"text": "plain text"},
               {"messages": chat}, {"prompt": "Q: hi ", "completion": "A: hello"}]
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in records))
    tokens, mask = read_tokens_and_mask([data], tok, mask_prompt=True)
    np.testing.assert_array_equal(tokens, read_tokens([data], tok))
    # Independently: each record's ids, its prompt's ids zero, the rest (EOS included) one.
    eos, want_ids, want_mask = tok.eos_token_id, [], []
    for r in records:
        if "messages" in r:  # the chat template's text: every turn but the last is prompt
            text = "".join(f"{m['role']}: {m['content']}\n" for m in r["messages"])
            ids = tok.encode(text)
            n = len(tok.encode(text[: text.rindex("assistant: ") + len("assistant: ")]))
        else:
            prompt, completion = r.get("prompt", ""), r.get("completion", r.get("text"))
            ids = tok.encode(prompt + completion) + [eos]
            n = len(tok.encode(prompt)) if prompt else 0
        want_ids += ids
        want_mask += [0] * n + [1] * (len(ids) - n)
    np.testing.assert_array_equal(tokens, want_ids)
    np.testing.assert_array_equal(mask, want_mask)
    assert read_tokens_and_mask([data], tok)[1].all()  # without mask_prompt every token is learned
    rows, weights = pack(tokens, 5), pack_weights(mask, 5)
    assert weights.shape == (len(rows), 5)
    for r in range(len(rows)):  # target j of row r is token r*5 + j + 1
        np.testing.assert_array_equal(weights[r], mask[r * 5 + 1 : r * 5 + 6])
        np.testing.assert_array_equal(rows[r], tokens[r * 5 : r * 5 + 6])
    with pytest.raises(ValueError, match=r"^5 tokens are fewer than one sequence of 6: give more data"):
        pack(tokens[:5], 5)  # a row is seq_len + 1 tokens: inputs and the shifted targets
    for bad in ({"prompt": "x"}, {"messages": []}, {"messages": [{"role": "user"}]}, {"text": 3}):
        data.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=r"d\.jsonl:1: expected .* 'prompt' and 'completion' .*'messages'"):
            read_tokens_and_mask([data], tok)


def test_finetune_mask_prompt_learns_only_completions(tmp_path, monkeypatch):
    """--mask-prompt: the batches the trainer sees weigh exactly the completion targets."""
    path, cfg, _ = tiny_checkpoint(tmp_path / "base")
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"question {i}: ", "completion": f"answer {i * 7}"})
                              for i in range(60)))
    seen = []
    real = T.train
    monkeypatch.setattr(T, "train", lambda model, config, batches, *a, **k: seen.append(batches)
                        or real(model, config, batches, *a, **k))
    args = ["finetune", "--model", str(path), "--data", str(data), "--out", str(tmp_path / "ad"),
            "--steps", "2", "--batch-size", "2", "--seq-len", "24", "--lora-layers", "2", "--lora-rank", "4"]
    assert T.main(args + ["--mask-prompt"]) == 0
    tokens, weights = next(seen[-1])
    assert set(np.unique(np.array(weights))) == {0.0, 1.0}
    from mlx_lm.utils import load_tokenizer

    ids, mask = read_tokens_and_mask([data], load_tokenizer(path), mask_prompt=True)
    np.testing.assert_array_equal(seen[-1].weights, pack_weights(mask, 24))
    assert T.main(args) == 0
    assert seen[-1].weights is None


def test_batches_reject_misshaped_weights():
    rows = pack(copy_task(), 16)
    with pytest.raises(ValueError, match="one weight per target"):
        Batches(rows, 4, weights=np.ones(rows.shape, np.float32))


@pytest.mark.parametrize("checkpointing, weighted", [(False, False), (True, False), (False, True)])
def test_compiled_step_trains_like_the_eager_step(tmp_path, checkpointing, weighted):
    targs = T.TrainArgs(steps=8, batch_size=4, seq_len=16, lr=5e-3, warmup=2, report_every=1000,
                        grad_checkpoint=checkpointing)
    data = pack(copy_task(), 16)
    weights = np.random.default_rng(1).uniform(0, 4, (len(data), 16)).astype(np.float32) if weighted else None
    runs = {}
    for compiled in (False, True):
        model, cfg = fresh_model()
        losses = T.train(model, cfg, Batches(data, 4, seed=3, weights=weights),
                         T.TrainArgs(**{**targs.__dict__, "compile": compiled}),
                         tmp_path / str(compiled), log=lambda s: None)
        runs[compiled] = losses, dict(tree_flatten(model.parameters()))
    np.testing.assert_allclose(runs[True][0], runs[False][0], rtol=1e-5)
    for name, w in runs[False][1].items():
        np.testing.assert_allclose(np.array(runs[True][1][name]), np.array(w), rtol=1e-4, atol=1e-6, err_msg=name)


def test_distill_loss_has_gradients_only_for_summary_weights(tmp_path):
    dense, dense_cfg = tiny_dense(tmp_path)
    student, cfg = T.dense_to_ksa(dense, dense_cfg, chunk=4, windows="[1]*3+[8]")
    T.freeze_to_summary_parameters(student)
    trainable = {k for k, _ in tree_flatten(student.trainable_parameters())}
    assert "model.summary_embedding" in trainable
    assert all("summary" in k for k in trainable)
    batch = mx.array(pack(copy_task(), 40)[:2])
    value, grads = nn.value_and_grad(student, T.distill_loss(dense))(student, batch)
    assert np.isfinite(value.item())
    assert any(np.abs(np.array(g)).sum() > 0 for _, g in tree_flatten(grads))


def tiny_dense(tmp_path):
    from mlx_lm.models import qwen3
    from mlx_lm.utils import save_config, save_model

    cfg = {"model_type": "qwen3", "hidden_size": 64, "num_hidden_layers": 4, "intermediate_size": 128,
           "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "rms_norm_eps": 1e-6,
           "vocab_size": 96, "max_position_embeddings": 4096, "rope_theta": 10000.0,
           "tie_word_embeddings": True}
    mx.random.seed(4)
    model = qwen3.Model(qwen3.ModelArgs.from_dict(cfg))
    mx.eval(model.parameters())
    path = tmp_path / "dense"
    save_model(path, model)
    save_config(dict(cfg), path / "config.json")
    write_tokenizer(path, 96)
    return model, cfg


def test_cpt_starts_as_the_dense_model_and_saves_a_loadable_ksa_model(tmp_path):
    dense, dense_cfg = tiny_dense(tmp_path)
    student, cfg = T.dense_to_ksa(dense, dense_cfg, chunk=4, windows="[2]*3+[16]")
    assert student.args.mix_coeff == 1.0 and student.args.summary_branch
    ids = mx.array(copy_task()[:12])[None]  # inside every window: summaries are never seen
    np.testing.assert_allclose(np.array(student(ids)), np.array(dense(ids)), atol=1e-5)

    data = tmp_path / "data.txt"
    data.write_text("def f(x):\n    return x * 2\n" * 40)
    small = ["steps", "3", "batch-size", "2", "seq-len", "32", "warmup", "1"]
    assert T.main(["cpt", "--dense", str(tmp_path / "dense"), "--data", str(data), "--out", str(tmp_path / "ksa"),
                   "--chunk", "4", "--windows", "[2]*3+[16]",
                   *(f"--{a}" if i % 2 == 0 else a for i, a in enumerate(small)),  # stage 1: distillation
                   *(f"--anneal-{a}" if i % 2 == 0 else a for i, a in enumerate(small))]) == 0
    saved = json.loads((tmp_path / "ksa" / "config.json").read_text())
    assert saved["mix_coeff"] == 0.0 and saved["summary_chunk_size"] == 4
    model, tokenizer = mlx_ksa.load(tmp_path / "ksa")
    from mlx_lm import generate
    assert isinstance(generate(model, tokenizer, "def f", max_tokens=8), str)
    assert not any("_proj_summary" in k for k, _ in tree_flatten(model.parameters()))


def test_lora_finetune_load_and_fuse(tmp_path, capsys):
    path, cfg, _ = tiny_checkpoint(tmp_path / "base")
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"question {i}: answer {i * 7}"}) for i in range(60)))
    rc = T.main(["finetune", "--model", str(path), "--data", str(data), "--out", str(tmp_path / "ad"),
                 "--steps", "8", "--batch-size", "2", "--seq-len", "24", "--lr", "1e-2",
                 "--lora-layers", "2", "--lora-rank", "4"])
    assert rc == 0
    assert (tmp_path / "ad" / "adapters.safetensors").is_file()
    adapted, _ = mlx_ksa.load(path, adapter_path=tmp_path / "ad")
    base, _ = mlx_ksa.load(path)
    ids = mx.array([[5, 9, 14, 3, 7, 2, 11, 40, 41]])
    assert np.abs(np.array(adapted(ids)) - np.array(base(ids))).max() > 1e-4
    assert T.main(["fuse", "--model", str(path), "--adapter-path", str(tmp_path / "ad"),
                   "--save-path", str(tmp_path / "fused")]) == 0
    fused, _ = mlx_ksa.load(tmp_path / "fused")
    np.testing.assert_allclose(np.array(fused(ids)), np.array(adapted(ids)), atol=1e-4)
    layers = len(base.layers)
    assert T.main(["finetune", "--model", str(path), "--data", str(data), "--out", str(tmp_path / "ad2"),
                   "--lora-layers", str(layers + 1)]) == 1
    assert f"--lora-layers {layers + 1} is more than the model's {layers} layers" in capsys.readouterr().err
    assert not (tmp_path / "ad2").exists()


def test_cli_reports_bad_input(tmp_path, capsys):
    assert T.main(["finetune", "--model", str(tmp_path / "missing"), "--data", "x.txt",
                   "--out", str(tmp_path / "o")]) == 1
    assert "error:" in capsys.readouterr().err
    assert T.main(["cpt", "--dense", str(tmp_path / "missing"), "--data", "x.txt", "--out", str(tmp_path / "o"),
                   "--anneal-compile"]) == 1
    assert "--anneal-compile" in capsys.readouterr().err
    (tmp_path / "cfg.json").write_text('{"hidden_size": 64}')
    assert T.main(["pretrain", "--config", str(tmp_path / "cfg.json"), "--tokenizer", str(tmp_path),
                   "--data", "x.txt", "--out", str(tmp_path / "o")]) == 1
    assert "config is missing model_type, num_hidden_layers" in capsys.readouterr().err
    (tmp_path / "cfg.json").write_text('{"hidden_size": 64,')
    assert T.main(["pretrain", "--config", str(tmp_path / "cfg.json"), "--tokenizer", str(tmp_path),
                   "--data", "x.txt", "--out", str(tmp_path / "o")]) == 1
    assert f"{tmp_path / 'cfg.json'} is not valid JSON" in capsys.readouterr().err
    for flags in (["--lora-rank", "0"], ["--lora-layers", "0"]):
        assert T.main(["finetune", "--model", str(tmp_path / "missing"), "--data", "x.txt",
                       "--out", str(tmp_path / "o"), *flags]) == 1
        assert "--lora-rank must be positive and --lora-layers positive or -1" in capsys.readouterr().err


def test_cpt_rejects_a_ksa_source_and_a_bad_pattern_before_loading(tmp_path, capsys, monkeypatch):
    import mlx_lm

    tiny_dense(tmp_path)
    ksa_dir, *_ = tiny_checkpoint(tmp_path / "ksa")
    loads = []
    monkeypatch.setattr(mlx_lm, "load", lambda *a, **k: loads.append(a) or pytest.fail("loaded the teacher"))
    common = ["--data", "x.txt", "--out", str(tmp_path / "o")]
    assert T.main(["cpt", "--dense", str(ksa_dir), *common]) == 1
    assert "is already a KSA model" in capsys.readouterr().err
    assert T.main(["cpt", "--dense", str(tmp_path / "dense"), "--windows", "([2]*3", *common]) == 1
    assert "error:" in capsys.readouterr().err
    assert T.main(["cpt", "--dense", str(tmp_path / "dense"), "--windows", "[2]*3", *common]) == 1
    assert "gives 3 windows for 4 layers" in capsys.readouterr().err
    assert T.main(["cpt", "--dense", str(tmp_path / "no" / "such"), *common]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert loads == []
