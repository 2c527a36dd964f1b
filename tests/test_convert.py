"""python -m mlx_ksa.convert: every source format against the independent torch
reference (tests/torch_reference.py), quantization, refusals and atomic output.

torch is used here only to write checkpoints and to run the reference.
"""

import hashlib
import importlib
import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import mlx_ksa
from tests import torch_reference as ref
from tests.helpers import random_ids, tiny_checkpoint

convert_module = importlib.import_module("mlx_ksa.convert")  # `mlx_ksa.convert` is the function
ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-4
CONFIGS = {
    "tied": {},
    # Every optional tensor: lm_head with its zero summary row, summary projections, summary norm.
    "untied_mix": {"tie_word_embeddings": False, "summary_independent_parameters": True, "mix_coeff": 0.5,
                   "summary_independent_attention_layernorm": True},
}
# Muse names (KSA-SPEC section 4), written here from the spec, apart from convert.py's table.
MUSE = [("self_attn.o_proj.", "attn.output_proj."), ("self_attn.", "attn."), ("mlp.gate_proj", "mlp.w1"),
        ("mlp.up_proj", "mlp.w3"), ("mlp.down_proj", "mlp.w2"), ("input_layernorm_summary.", "sa_norm_summary."),
        ("input_layernorm.", "sa_norm."), ("post_attention_layernorm.", "mlp_norm.")]


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def case(request, tmp_path_factory):
    """(official safetensors source, config, torch weights, ids, reference logits)."""
    src, cfg, weights = tiny_checkpoint(tmp_path_factory.mktemp(request.param) / "src", **CONFIGS[request.param])
    (src / "generation_config.json").write_text(json.dumps({"eos_token_id": 1}))
    ids = random_ids(30, cfg["summary_token_begin"], seed=3)
    return src, cfg, weights, ids, ref.forward(cfg, weights, list(ids))


def logits(path, ids):
    model, _ = mlx_ksa.load_model(path)
    return np.array(model(mx.array(ids)[None])[0].astype(mx.float32))


def snapshot(path):
    return {p.relative_to(path): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.rglob("*"))
            if p.is_file()}


def leftovers(parent, *keep):
    """Entries of `parent` other than `keep`: temporary directories a conversion left."""
    return sorted(p.name for p in parent.iterdir() if p.name not in keep) if parent.exists() else []


def halves(weights):
    names = sorted(weights)
    return {k: weights[k] for k in names[::2]}, {k: weights[k] for k in names[1::2]}


def copy_meta(src, dst):
    dst.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        (dst / name).write_bytes((src / name).read_bytes())


def write_format(fmt, src, weights, dst):
    """The same checkpoint in another on-disk format."""
    copy_meta(src, dst)
    if fmt == "safetensors_sharded":
        index = {}
        for i, part in enumerate(halves(weights), 1):
            name = f"model-{i:05d}-of-00002.safetensors"
            save_file({k: v.contiguous() for k, v in part.items()}, str(dst / name))
            index.update(dict.fromkeys(part, name))
        (dst / "model.safetensors.index.json").write_text(json.dumps({"weight_map": index}))
    elif fmt == "bin":
        torch.save(weights, dst / "pytorch_model.bin")
    elif fmt == "bin_sharded":
        index = {}
        for i, part in enumerate(halves(weights), 1):
            name = f"pytorch_model-{i:05d}-of-00002.bin"
            torch.save(part, dst / name)
            index.update(dict.fromkeys(part, name))
        (dst / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": index}))
    elif fmt == "pt":
        torch.save(weights, dst / "checkpoint.pt")
    return dst


@pytest.mark.parametrize("fmt", ["safetensors", "safetensors_sharded", "bin", "bin_sharded", "pt"])
def test_round_trip_float32(case, fmt, tmp_path):
    src, cfg, weights, ids, expected = case
    if fmt != "safetensors":
        src = write_format(fmt, src, weights, tmp_path / "src")
    before = snapshot(src)
    dst = tmp_path / "out" / "model"
    mlx_ksa.convert(src, dst)
    assert np.abs(logits(dst, ids) - expected).max() <= TOL
    assert snapshot(src) == before
    assert leftovers(dst.parent, "model") == []
    names = {p.name for p in dst.iterdir()}
    assert {"config.json", "model.safetensors", "model.safetensors.index.json", "tokenizer.json",
            "tokenizer_config.json", "generation_config.json", "README.md"} <= names
    config = json.loads((dst / "config.json").read_text())
    assert {k: config[k] for k in cfg if k != "auto_map"} == {k: v for k, v in cfg.items() if k != "auto_map"}
    assert "auto_map" not in config and "quantization" not in config  # the template's code is never shipped
    assert str(src) in (dst / "README.md").read_text()


def test_muse_names(case, tmp_path):
    """A Muse state dict: renamed tensors, summary rows apart, padded token table."""
    src, cfg, weights, ids, expected = case
    begin, S = cfg["summary_token_begin"], cfg["summary_token_num"]
    muse = {}
    for name, w in weights.items():
        if name == "model.embed_tokens.weight":
            pad = torch.randn(8, w.shape[1])  # padding rows past the text vocabulary
            muse["model.tok_embeddings.weight"] = torch.cat([w[:begin], pad])
            muse["summary_embedding.weight"] = w[begin : begin + S].clone()
            continue
        if name == "lm_head.weight":
            muse["model.output.weight"] = w
            continue
        for hf, m in MUSE:
            name = name.replace(hf, m)
        if name.endswith("norm.weight"):
            name = name[: -len("weight")] + "scale"
        muse[name] = w
    assert "model.layers.0.attn.q_norm.scale" in muse and "model.layers.0.mlp.w2.weight" in muse
    dst = write_format("pt", src, muse, tmp_path / "src")
    mlx_ksa.convert(dst, tmp_path / "out")
    assert np.abs(logits(tmp_path / "out", ids) - expected).max() <= TOL


def dequantized_reference_weights(model):
    """The converted model's weights, dequantized (in place), in the official layout for the torch reference."""
    for _, module in model.named_modules():
        if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            w = mx.dequantize(module.weight, module.scales, module.biases, module.group_size, module.bits)
            module.update({"weight": w})
    flat = {k: torch.tensor(np.array(v.astype(mx.float32))) for k, v in
            params_of(model).items() if not k.endswith((".scales", ".biases"))}
    summary = flat.pop("model.summary_embedding")
    flat["model.embed_tokens.weight"] = torch.cat([flat["model.embed_tokens.weight"], summary])
    if "lm_head.weight" in flat:
        flat["lm_head.weight"] = torch.cat([flat["lm_head.weight"], torch.zeros_like(summary)])
    return flat


def params_of(model):
    return dict(tree_flatten(model.parameters()))


@pytest.mark.parametrize("bits,group,rel_tol", [(8, 32, 0.02), (8, 64, 0.02), (4, 64, 0.25), (4, 128, 0.25)])
def test_quantized(case, tmp_path, bits, group, rel_tol):
    src, cfg, weights, ids, expected = case
    dst = tmp_path / "q"
    mlx_ksa.convert(src, dst, quantize=True, q_bits=bits, q_group_size=group)
    config = json.loads((dst / "config.json").read_text())
    assert config["quantization"] == {"group_size": group, "bits": bits, "mode": "affine"}
    got = logits(dst, ids)
    # End to end against the float reference: the tolerance is a relative L2
    # error about 4x (8-bit) and 2x (4-bit) what these random models show.
    assert np.linalg.norm(got - expected) / np.linalg.norm(expected) <= rel_tol
    model, _ = mlx_ksa.load_model(dst)
    params = params_of(model)
    begin = cfg["summary_token_begin"]
    # Summary rows and every norm stay exact; the text embedding is quantized.
    np.testing.assert_array_equal(np.array(params["model.summary_embedding"]),
                                  weights["model.embed_tokens.weight"][begin : begin + 1].numpy())
    norms = [k for k in weights if "norm" in k]
    assert norms
    for k in norms:
        np.testing.assert_array_equal(np.array(params[k]), weights[k].numpy(), err_msg=k)
    # Every matrix whose rows split into groups is quantized, the text embedding included.
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))}
    groupable = {k[: -len(".weight")] for k, w in weights.items() if w.ndim == 2 and w.shape[1] % group == 0}
    assert set(quantized) == groupable
    # Each within one step of its source (affine rounding with the zero point on
    # a level errs by up to one step: (max - min) / (2^bits - 1)).
    for name, module in quantized.items():
        w = weights[name + ".weight"].numpy()[: module.weight.shape[0]]
        deq = np.array(mx.dequantize(module.weight, module.scales, module.biases, group, bits))
        g = w.reshape(w.shape[0], -1, group)
        step = (g.max(-1) - g.min(-1)) / (2**bits - 1)
        err = np.abs(deq.reshape(g.shape) - g).max(-1)
        assert (err <= step * 1.001 + 1e-7).all(), name
    # And the quantized model computes exactly the spec on its dequantized weights.
    deq_weights = dequantized_reference_weights(model)
    np.testing.assert_allclose(got, ref.forward(cfg, deq_weights, list(ids)), atol=TOL, rtol=0)


def test_bfloat16_keeps_summary_rows_and_norms_exact(case, tmp_path):
    src, cfg, weights, ids, expected = case
    mlx_ksa.convert(src, tmp_path / "q", quantize=True, dtype="bfloat16")
    model, config = mlx_ksa.load_model(tmp_path / "q")
    assert config["torch_dtype"] == "bfloat16"
    params = params_of(model)
    begin = cfg["summary_token_begin"]
    to_bf16 = lambda t: t.to(torch.bfloat16).view(torch.int16).numpy()
    assert params["model.summary_embedding"].dtype == mx.bfloat16
    for k, source in [("model.summary_embedding", weights["model.embed_tokens.weight"][begin : begin + 1]),
                      ("model.norm.weight", weights["model.norm.weight"])]:
        np.testing.assert_array_equal(np.array(params[k].view(mx.int16)), to_bf16(source), err_msg=k)


def test_mixed_recipe_and_custom_predicate(case, tmp_path):
    src, cfg, weights, ids, expected = case
    mlx_ksa.convert(src, tmp_path / "mixed", quantize=True, quant_predicate="mixed_4_6")
    config = json.loads((tmp_path / "mixed" / "config.json").read_text())
    bits = {v["bits"] for k, v in config["quantization"].items() if isinstance(v, dict)}
    assert bits == {4, 6}
    assert np.linalg.norm(logits(tmp_path / "mixed", ids) - expected) / np.linalg.norm(expected) <= 0.25
    assert "mixed_4_6" in (tmp_path / "mixed" / "README.md").read_text()
    # A callable: 8-bit MLP only; attention and embeddings stay float32.
    mlx_ksa.convert(src, tmp_path / "mlp", quantize=True, quant_predicate=lambda path, m: "mlp" in path and
                    {"group_size": 64, "bits": 8, "mode": "affine"})
    model, _ = mlx_ksa.load_model(tmp_path / "mlp")
    assert isinstance(model.layers[0].mlp.up_proj, nn.QuantizedLinear)
    assert type(model.layers[0].self_attn.q_proj) is nn.Linear
    assert type(model.model.embed_tokens) is nn.Embedding


def test_quantized_model_generates(case, tmp_path):
    from mlx_lm import generate

    src, cfg, weights, ids, expected = case
    mlx_ksa.convert(src, tmp_path / "q", quantize=True, q_bits=8)
    model, tokenizer = mlx_ksa.load(tmp_path / "q")
    text = generate(model, tokenizer, "hello world", max_tokens=8)
    # Greedy from a random model: the tokens the reference's argmax would choose.
    deq_weights = dequantized_reference_weights(mlx_ksa.load_model(tmp_path / "q")[0])
    prompt = tokenizer.encode("hello world")
    out = list(prompt)
    for _ in range(8):
        out.append(int(np.argmax(ref.forward(cfg, deq_weights, out)[-1])))
        if out[-1] == tokenizer.eos_token_id:
            out.pop()
            break
    assert text == tokenizer.decode(out[len(prompt) :])


def test_official_fixture(official_fixture, tmp_path):
    """The official implementation's own checkpoint and logits (shared fixture), float and 8-bit."""
    reference = np.load(official_fixture / "reference.npz")
    ids, want = reference["prompt_ids"], reference["prompt_prefill_logits"]
    mlx_ksa.convert(official_fixture, tmp_path / "f32")
    assert np.abs(logits(tmp_path / "f32", ids) - want).max() <= TOL
    assert (tmp_path / "f32" / "generation_config.json").is_file()
    mlx_ksa.convert(official_fixture, tmp_path / "q8", quantize=True, q_bits=8, q_group_size=32)
    assert np.linalg.norm(logits(tmp_path / "q8", ids) - want) / np.linalg.norm(want) <= 0.02


def test_official_template_config(tmp_path):
    """KSA-4B-base's config keys and window pattern, at tiny widths (36 layers)."""
    src, cfg, weights = tiny_checkpoint(
        tmp_path / "src", tokenizer=False, num_hidden_layers=36, hidden_size=32, intermediate_size=64,
        num_attention_heads=4, num_key_value_heads=1, head_dim=8, summary_chunk_size=8,
        summary_sliding_chunk_num="([128]*3+[16768]*1)*9", torch_dtype="bfloat16", max_position_embeddings=131072)
    mlx_ksa.convert(src, tmp_path / "out", dtype="float32")
    model, config = mlx_ksa.load_model(tmp_path / "out")
    assert config["summary_sliding_chunk_num"] == "([128]*3+[16768]*1)*9"
    assert model.args.windows == [128, 128, 128, 16768] * 9
    ids = random_ids(20, cfg["summary_token_begin"])
    assert np.abs(np.array(model(mx.array(ids)[None])[0]) - ref.forward(cfg, weights, list(ids))).max() <= TOL


def test_malicious_pickle_is_refused(case, tmp_path):
    """A checkpoint whose pickle would run a command: refused, and the command never runs."""
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    src, cfg, weights, ids, expected = case
    bad = write_format("bin", src, {}, tmp_path / "src")
    torch.save({**weights, "model.norm.weight": Exploit()}, bad / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"refusing to load global '(posix|os)\.system'"):
        mlx_ksa.convert(bad, tmp_path / "out" / "dst")
    assert not marker.exists()
    assert leftovers(tmp_path / "out") == []


def truncate(file, keep):
    file.write_bytes(file.read_bytes()[:keep])


@pytest.mark.parametrize("damage,match", [
    (lambda d: truncate(d / "model.safetensors", 2000), r"model\.safetensors: unreadable safetensors file"),
    (lambda d: truncate(d / "model.safetensors", 4), r"model\.safetensors: unreadable safetensors file"),
    (lambda d: (d / "config.json").write_text("{not json"), r"config\.json is not valid JSON"),
    (lambda d: (d / "config.json").unlink(), r"has no config\.json"),
    (lambda d: (d / "model.safetensors").unlink(), r"has no model\*\.safetensors, pytorch_model\.bin"),
])
def test_corrupt_safetensors_source(case, tmp_path, damage, match):
    src, cfg, weights, ids, expected = case
    bad = write_format("safetensors_sharded", src, weights, tmp_path / "src")
    for f in bad.glob("model-*.safetensors"):
        f.unlink()
    (bad / "model.safetensors.index.json").unlink()
    save_file({k: v.contiguous() for k, v in weights.items()}, str(bad / "model.safetensors"))
    damage(bad)
    with pytest.raises(ValueError, match=match):
        mlx_ksa.convert(bad, tmp_path / "out" / "dst")
    assert leftovers(tmp_path / "out") == []


@pytest.mark.parametrize("fmt,damage,match", [
    ("bin", lambda d: truncate(d / "pytorch_model.bin", 3000), r"pytorch_model\.bin: truncated or corrupt zip"),
    ("pt", lambda d: (d / "checkpoint.pt").write_bytes(b"hello"), r"checkpoint\.pt: not a torch checkpoint"),
    ("bin_sharded", lambda d: (d / "pytorch_model-00002-of-00002.bin").unlink(),
     r"lists pytorch_model-00002-of-00002\.bin, which is missing"),
    ("safetensors_sharded", lambda d: (d / "model-00001-of-00002.safetensors").unlink(),
     r"lists model-00001-of-00002\.safetensors, which is missing"),
])
def test_corrupt_sharded_and_pickle_sources(case, tmp_path, fmt, damage, match):
    src, cfg, weights, ids, expected = case
    bad = write_format(fmt, src, weights, tmp_path / "src")
    damage(bad)
    with pytest.raises(ValueError, match=match):
        mlx_ksa.convert(bad, tmp_path / "out" / "dst")
    assert leftovers(tmp_path / "out") == []  # the staging copy of a torch checkpoint is gone too


@pytest.mark.parametrize("change,match", [
    (lambda w: w.update({"model.layers.0.mlp.extra.weight": torch.zeros(3, 4)}),
     r"unexpected weight model\.layers\.0\.mlp\.extra\.weight with shape \(3, 4\)"),
    (lambda w: w.pop("model.layers.2.mlp.up_proj.weight"), r"missing weight model\.layers\.2\.mlp\.up_proj\.weight "
                                                            r"with shape \(128, 64\)"),
    (lambda w: w.update({"model.layers.1.self_attn.k_proj.weight": torch.zeros(16, 64)}),
     r"weight model\.layers\.1\.self_attn\.k_proj\.weight has shape \(16, 64\), expected \(32, 64\)"),
    (lambda w: w.update({"model.norm.weight": torch.ones(64, dtype=torch.int32)}),
     r"weight model\.norm\.weight has dtype .*int32, expected a floating-point type"),
    (lambda w: w.update({"model.embed_tokens.weight": w["model.embed_tokens.weight"][:96]}),
     r"model\.embed_tokens\.weight has 96 rows; the summary rows 96\.\.96 are missing"),
])
def test_wrong_weights_are_named(tmp_path, change, match):
    src, cfg, weights = tiny_checkpoint(tmp_path / "src", tokenizer=False)
    change(weights)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(src / "model.safetensors"))
    with pytest.raises(ValueError, match=match):
        mlx_ksa.convert(src, tmp_path / "dst")
    assert not (tmp_path / "dst").exists()


@pytest.mark.parametrize("change,match", [
    ({"summary_chunk_size": 0}, r"summary_chunk_size must be a positive integer, got 0"),
    ({"summary_token_position_ids_type": "middle"}, r"unknown summary_token_position_ids_type 'middle'"),
    ({"summary_chunk_position_ids_type": None}, r"unknown summary_chunk_position_ids_type None"),
    ({"summary_sliding_chunk_num": "__import__('os').system('touch {marker}')"}, r"unexpected character '_'"),
    ({"summary_sliding_chunk_num": "[2]*3"}, r"gives 3 windows for 4 layers"),
    ({"summary_sliding_chunk_num": None}, r"must be an int, a list or a pattern string"),
    ({"summary_chunk_size": None}, r"summary_chunk_size must be a positive integer, got None"),
    ({"hidden_size": -64}, r"hidden_size must be a positive integer, got -64"),
    ({"num_hidden_layers": 10**9}, r"gives 4 windows for 1000000000 layers"),
    ({"num_hidden_layers": 10**9, "summary_sliding_chunk_num": 2}, r"num_hidden_layers 1000000000 is more than"),
    ({"summary_token_begin": 97}, r"summary ids 97\.\.97 do not fit in vocab_size 97"),
    ({"use_summary_attention": False}, r"a dense model, load it with mlx-lm"),
    ({"quantization": {"bits": 4, "group_size": 64}}, r"already quantized"),
    ({"summary_token_begin": "__delete__"}, r"config is missing summary_token_begin"),
])
def test_bad_configs_are_refused(tmp_path, change, match):
    marker = tmp_path / "pwned"
    src, cfg, weights = tiny_checkpoint(tmp_path / "src", tokenizer=False)
    for key, value in change.items():
        if value == "__delete__":
            del cfg[key]
        else:
            cfg[key] = value.format(marker=marker) if isinstance(value, str) else value
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=match):
        mlx_ksa.convert(src, tmp_path / "dst")
    assert not marker.exists()
    assert leftovers(tmp_path, "src") == []


def test_bad_arguments(case, tmp_path):
    src = case[0]
    for kwargs, match in [({"q_bits": 5, "quantize": True}, r"supports bits \(2, 3, 4, 6, 8\)"),
                          ({"q_group_size": 48, "quantize": True}, r"group sizes \(32, 64, 128\)"),
                          ({"q_bits": 4}, r"need quantize=True"),
                          ({"quantize": True, "quant_predicate": "mixed_9"}, r"unknown quant predicate 'mixed_9'"),
                          ({"dtype": "int8"}, r"dtype must be one of")]:
        with pytest.raises(ValueError, match=match):
            mlx_ksa.convert(src, tmp_path / "dst", **kwargs)
    with pytest.raises(ValueError, match="overlaps the source"):
        mlx_ksa.convert(src, src / "mlx")
    with pytest.raises(ValueError, match="does not exist"):
        mlx_ksa.convert(tmp_path / "missing", tmp_path / "dst")
    # The same check guards mlx_ksa.load, before mlx-lm's hub download sees the path.
    with pytest.raises(ValueError, match=r"missing does not exist \(and is not a Hugging Face repo id\)"):
        mlx_ksa.load(tmp_path / "missing")
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("failing", ["_copy_tokenizer", "save_config", "_publish"])
@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_failure_leaves_no_destination(case, tmp_path, monkeypatch, failing, error):
    """A failure or Ctrl-C at any late step: no DST, no temporary directory, an old DST intact."""
    src = case[0]
    before = snapshot(src)

    def fail(*args, **kwargs):
        raise error("stop")

    monkeypatch.setattr(convert_module, failing, fail)
    with pytest.raises(error):
        mlx_ksa.convert(src, tmp_path / "dst")
    assert leftovers(tmp_path) == []
    old = tmp_path / "old"
    old.mkdir()
    (old / "keep.txt").write_text("mine")
    with pytest.raises(error):
        mlx_ksa.convert(src, old, overwrite=True)
    assert leftovers(tmp_path, "old") == []
    assert [p.name for p in old.iterdir()] == ["keep.txt"] and (old / "keep.txt").read_text() == "mine"
    assert snapshot(src) == before


def test_overwrite(case, tmp_path):
    src = case[0]
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"already exists \(pass overwrite=True / --overwrite"):
        mlx_ksa.convert(src, dst)
    assert [p.name for p in dst.iterdir()] == ["keep.txt"]
    mlx_ksa.convert(src, dst, overwrite=True)
    assert not (dst / "keep.txt").exists() and (dst / "model.safetensors").is_file()
    assert leftovers(tmp_path, "dst") == []


def cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "mlx_ksa.convert", *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})


def test_cli(tmp_path, capsys):
    """The real command line, three runs (each pays the interpreter and mlx-lm start-up),
    then main() in-process for the --overwrite cases."""
    src, cfg, weights = tiny_checkpoint(tmp_path / "src")
    ids = random_ids(30, cfg["summary_token_begin"])
    expected = ref.forward(cfg, weights, list(ids))
    dst = tmp_path / "dst"
    run = cli("--hf-path", src, "--mlx-path", dst, "-q", "--q-bits", "8", "--q-group-size", "32")
    assert run.returncode == 0 and run.stderr == "", run.stderr
    assert json.loads((dst / "config.json").read_text())["quantization"]["bits"] == 8
    assert np.linalg.norm(logits(dst, ids) - expected) / np.linalg.norm(expected) <= 0.02
    for args, match in [(["--mlx-path", tmp_path / "new", "--q-bits", "5"], "argument --q-bits: invalid choice: 5"),
                        (["--mlx-path", tmp_path / "new", "--hf-path", tmp_path / "nowhere"], "nowhere does not exist")]:
        run = cli("--hf-path", src, *args)
        assert run.returncode != 0
        assert run.stderr.count("\n") == 1 and run.stderr.startswith("error: ") and match in run.stderr, run.stderr
        assert "Traceback" not in run.stdout + run.stderr
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit:
        convert_module.main(["--hf-path", str(src), "--mlx-path", str(dst)])
    assert exit.value.code == 1
    assert capsys.readouterr().err == f"error: {dst} already exists (pass overwrite=True / --overwrite to replace it)\n"
    assert json.loads((dst / "config.json").read_text())["quantization"]["bits"] == 8
    convert_module.main(["--hf-path", str(src), "--mlx-path", str(dst), "--overwrite", "--dtype", "bfloat16"])
    config = json.loads((dst / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16" and "quantization" not in config
    assert leftovers(tmp_path, "src", "dst") == []


def test_cli_killed_midway_leaves_nothing(tmp_path):
    """SIGTERM while the shards are already written: exit 130, no DST, no temporary directory."""
    src = tiny_checkpoint(tmp_path / "src")[0]
    code = ("import os, signal, sys, importlib; m = importlib.import_module('mlx_ksa.convert');"
            "m._copy_tokenizer = lambda *a: os.kill(os.getpid(), signal.SIGTERM); m.main(sys.argv[1:])")
    run = subprocess.run([sys.executable, "-c", code, "--hf-path", str(src), "--mlx-path", str(tmp_path / "dst")],
                         capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 130 and run.stderr == "error: interrupted, nothing was written\n", run.stderr
    assert leftovers(tmp_path, "src") == []


def test_example_script(tmp_path, monkeypatch, capsys):
    src, cfg, weights = tiny_checkpoint(tmp_path / "src")
    monkeypatch.setattr(sys, "argv", ["convert_and_quantize.py", str(src), str(tmp_path / "work")])
    runpy.run_path(str(ROOT / "examples" / "convert_and_quantize.py"), run_name="__main__")
    assert mlx_ksa.load_model(tmp_path / "work" / "q4")[1]["quantization"]["bits"] == 4
    assert "bf16: " in capsys.readouterr().out
