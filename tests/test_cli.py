"""python -m mlx_ksa.generate and python -m mlx_ksa.chat, run as a user runs them."""

import json
import os
import pty
import re
import select
import shutil
import string
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlx.core as mx
import pytest
from mlx_lm import stream_generate

import mlx_ksa
from tests import torch_reference as ref

ROOT = Path(__file__).resolve().parents[1]
# 96 single characters, every id the model can emit: generated text re-encodes
# to the same ids. EOS sits on the summary id, which the model never samples,
# so replies run to --max-tokens.
CHARS = string.ascii_letters + string.digits + string.punctuation + " \n"
TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant: {% endif %}")


def write_char_tokenizer(path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {c: i for i, c in enumerate(CHARS)}
    vocab["<eos>"] = len(CHARS)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<eos>", "chat_template": TEMPLATE}))


def make_model(path, seed=0, **overrides):
    """A tiny random KSA checkpoint (official layout) whose greedy text varies."""
    cfg = ref.make_config(summary_sliding_chunk_num="[1]*3+[3]", **overrides)
    weights = ref.random_weights(cfg, seed=seed, scale=0.3)
    ref.save_checkpoint(path, cfg, weights)
    write_char_tokenizer(path)
    return path, cfg, weights


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("cli_model"))[0]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    # Conversions land in a per-run cache, never the user's.
    return {**os.environ, "MLX_KSA_CACHE": str(tmp_path_factory.mktemp("ksa_cache")), "PYTHONPATH": str(ROOT)}


def cli(module, *args, env, input=None, timeout=120):
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=ROOT, env=env, input=input,
                          capture_output=True, text=True, timeout=timeout)


def stats(stdout):
    """The numbers of mlx-lm's closing statistics and the KV cache line."""
    m = {k: re.search(p, stdout) for k, p in {
        "prompt": r"Prompt: (\d+) tokens, ([\d.]+) tokens-per-sec",
        "generation": r"Generation: (\d+) tokens, ([\d.]+) tokens-per-sec",
        "memory": r"Peak memory: ([\d.]+) GB",
        "kv": r"KV cache: ([\d.]+) MB for (\d+) tokens; a dense model of this shape: ([\d.]+) MB",
    }.items()}
    assert all(m.values()), stdout
    return {k: v.groups() for k, v in m.items()}


def test_generate_streams_tokens_as_produced(model_dir, env):
    # Far more tokens than the test waits for: text that arrives while the
    # process is still generating can only have been streamed.
    proc = subprocess.Popen([sys.executable, "-m", "mlx_ksa.generate", "--model", str(model_dir), "--prompt",
                             "hello", "-m", "1000000"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    try:
        got = b""
        deadline = time.time() + 90
        while len(got) < 11 + 5 and time.time() < deadline:
            if select.select([proc.stdout], [], [], 1.0)[0]:
                got += os.read(proc.stdout.fileno(), 64)
        assert got.startswith(b"=" * 10 + b"\n") and len(got) >= 16, got
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait()


def test_generate_statistics_and_stdin_prompt(model_dir, env):
    text = "The summaries keep what leaves the window.\nA prompt piped in on stdin.\n"
    r = cli("mlx_ksa.generate", "--model", model_dir, "--prompt", "-", "-m", 400, env=env, input=text)
    assert r.returncode == 0, r.stderr
    s = stats(r.stdout)
    templated = f"user: {text}\nassistant: "
    assert int(s["prompt"][0]) == len(templated)  # one token per character: stdin was the prompt
    assert int(s["generation"][0]) == 400
    assert float(s["prompt"][1]) > 0 and float(s["generation"][1]) > 0 and float(s["memory"][0]) >= 0
    ksa_mb, tokens, dense_mb = s["kv"]
    assert int(tokens) == len(templated) + 400
    cfg = json.loads((model_dir / "config.json").read_text())
    # What mlx-lm's own dense cache holds for these tokens.
    from mlx_lm.models.cache import KVCache

    dense = KVCache()
    kv = mx.zeros((1, cfg["num_key_value_heads"], int(tokens), cfg["head_dim"]), mx.float32)
    dense.update_and_fetch(kv, kv)
    assert abs(float(dense_mb) - cfg["num_hidden_layers"] * dense.nbytes / 1e6) < 1e-3
    # Windows of 1 and 3 chunks of 4: past the window the KSA cache grows at 1/4 the dense rate.
    assert 0 < float(ksa_mb) < float(dense_mb)
    assert "Prefill [" not in r.stderr  # stderr is not a terminal: no progress bar
    q = cli("mlx_ksa.generate", "--model", model_dir, "--prompt", "-", "-m", 400, "--quiet", env=env, input=text)
    assert q.returncode == 0 and "Prompt:" not in q.stdout and "=====" not in q.stdout
    assert q.stdout.strip("\n") == r.stdout.split("=" * 10)[1].strip("\n")  # greedy: the same text, alone


def test_default_model_without_model_flag(env):
    r = cli("mlx_ksa.generate", "--prompt", "def fibonacci(n):", "-m", 60, "--quiet", env=env)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert len(out) >= 60 and all(c in string.printable for c in out)
    # Python-shaped: indented lines, some starting with a keyword or a docstring.
    assert re.search(r"\n {4,}(return|if|else|elif|for|while|self|def|raise|\"\"\")", out), out
    card = (ROOT / "mlx_ksa" / "default_model" / "README.md").read_text()
    assert "-parameter" in card and "examples/train_passkey.py" in card


@pytest.mark.parametrize("args, message", [
    (["--model", "/no/such/model/dir"], "does not exist"),
    (["-m", "many"], "--max-tokens"),
    (["--top-p", "2"], "--top-p"),
    (["--prompt-cache-file", "{corrupt}"], "corrupt"),
    (["--prompt-cache-file", "/no/such/cache.safetensors"], "does not exist"),
    (["--model", "{truncated}"], "cannot read the weights in"),
    (["--adapter-path", "/no/such/adapters"], "--adapter-path /no/such/adapters does not exist"),
], ids=["bad-model", "bad-int", "bad-top-p", "corrupt-cache", "missing-cache", "truncated-weights",
        "missing-adapters"])
def test_errors_are_one_line(model_dir, env, tmp_path, args, message):
    corrupt = tmp_path / "cache.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    truncated = tmp_path / "truncated"
    shutil.copytree(model_dir, truncated)
    for f in truncated.glob("*.safetensors"):
        f.write_bytes(f.read_bytes()[:1000])
    args = [a.replace("{corrupt}", str(corrupt)).replace("{truncated}", str(truncated)) for a in args]
    model = [] if "--model" in args else ["--model", str(model_dir)]
    r = cli("mlx_ksa.generate", *model, *args, "-m", 3, env=env)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_prompt_cache_file_round_trip(model_dir, env, tmp_path):
    doc = "A long document about summary tokens, chunk by chunk, " * 3
    question = "What do the summaries keep?"
    file = tmp_path / "doc.safetensors"
    r = cli("mlx_ksa.generate", "--model", model_dir, "--prompt", doc, "--save-prompt-cache", file,
            "--ignore-chat-template", env=env)
    assert r.returncode == 0, r.stderr
    assert file.is_file() and "Saved" in r.stdout
    # With no --model, the cache file names the model it was made with.
    r = cli("mlx_ksa.generate", "--prompt-cache-file", file, "--prompt", question, "--ignore-chat-template",
            "-m", 24, env=env)
    assert r.returncode == 0, r.stderr
    s = stats(r.stdout)
    assert int(s["prompt"][0]) == len(question)  # only the question was prefilled
    assert int(s["kv"][1]) == len(doc) + len(question) + 24
    cached_text = r.stdout.split("=" * 10)[1].strip("\n")
    # The same continuation as the whole prompt in one go.
    model, tokenizer = mlx_ksa.load(str(model_dir))
    ids = tokenizer.encode(doc + question, add_special_tokens=False)
    full = "".join(x.text for x in stream_generate(model, tokenizer, mx.array(ids), max_tokens=24))
    assert cached_text == full


def test_prefill_progress_bar_on_a_terminal(model_dir, env):
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "mlx_ksa.generate", "--model", str(model_dir), "--prompt",
                             "x" * 300, "--prefill-step-size", "16", "-m", "2"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=slave)
    os.close(slave)
    seen = []

    def drain():
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:  # the child closed the terminal
                return
            if not data:
                return
            seen.append(data)

    t = threading.Thread(target=drain)
    t.start()
    out, _ = proc.communicate(timeout=120)
    t.join(timeout=10)
    os.close(master)
    assert proc.returncode == 0
    err = b"".join(seen).decode()
    assert re.search(r"Prefill \[#*\.*\] \d+/\d+ tokens", err), err
    assert b"Prefill" not in out


def test_generate_converts_a_pytorch_checkpoint(tmp_path, env):
    torch = pytest.importorskip("torch")
    src, cfg, weights = make_model(tmp_path / "hf", seed=1)
    (src / "model.safetensors").unlink()
    torch.save(weights, src / "pytorch_model.bin")  # the official PyTorch layout, as released checkpoints ship
    args = ("--model", src, "--prompt", "hello", "-m", 12, "--quiet")
    r = cli("mlx_ksa.generate", *args, env=env)
    assert r.returncode == 0, r.stderr
    assert "Converting" in r.stderr
    converted = list((Path(env["MLX_KSA_CACHE"]) / "converted").glob("hf-*"))
    assert len(converted) == 1 and (converted[0] / "config.json").is_file()
    # Same text as the checkpoint's safetensors twin; the second run reuses the conversion.
    twin = make_model(tmp_path / "twin", seed=1)[0]
    model, tokenizer = mlx_ksa.load(str(twin))
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True)
    expected = "".join(x.text for x in stream_generate(model, tokenizer, prompt, max_tokens=12))
    assert r.stdout.strip("\n") == expected.strip("\n")
    again = cli("mlx_ksa.generate", *args, env=env)
    assert again.returncode == 0 and "Converting" not in again.stderr and again.stdout == r.stdout


def generated(stdout):
    """The text between mlx-lm's ===== rulers."""
    return stdout.split("=" * 10)[1].strip("\n")


def test_speculative_decoding_gives_the_greedy_text(model_dir, env, tmp_path):
    # Another seed: the draft is often wrong, so rejected drafts are trimmed
    # off, across chunk boundaries too (4 tokens drafted, chunks of 4).
    draft = make_model(tmp_path / "draft", seed=1)[0]
    args = ("--model", model_dir, "--prompt", "speculate", "-m", 60)
    plain = cli("mlx_ksa.generate", *args, env=env)
    fast = cli("mlx_ksa.generate", *args, "--draft-model", draft, "--num-draft-tokens", 4, env=env)
    assert plain.returncode == 0 and fast.returncode == 0, plain.stderr + fast.stderr
    assert generated(fast.stdout) == generated(plain.stdout)
    assert int(stats(fast.stdout)["generation"][0]) == 60
    too_many = cli("mlx_ksa.generate", *args, "--draft-model", draft, "--num-draft-tokens", 5, env=env)
    assert too_many.returncode == 1
    assert too_many.stderr.strip() == ("error: --num-draft-tokens 5 is more than 4, the summary chunk size: "
                                       "a KSA cache can take back rejected draft tokens only within one chunk")


def test_draft_model_needs_the_same_vocabulary(model_dir, env, tmp_path):
    from tests.helpers import tiny_checkpoint

    draft = tiny_checkpoint(tmp_path / "draft")[0]  # a tokenizer of 96 entries; the model's has 97
    r = cli("mlx_ksa.generate", "--model", model_dir, "--draft-model", draft, "-m", 3, env=env)
    assert r.returncode == 1 and "speculative decoding needs the model's tokenizer" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_kv_bits_quantize_the_cache_the_statistics_measure(env, tmp_path):
    model_dir = make_model(tmp_path / "hd64", head_dim=64)[0]  # mx.quantize groups of 32 or 64
    args = ("--model", model_dir, "--prompt", "quantize me", "-m", 200)
    runs = {bits: cli("mlx_ksa.generate", *args, *(("--kv-bits", bits, "--kv-group-size", 32,
                                                     "--quantized-kv-start", 0) if bits else ()), env=env)
            for bits in (None, 8, 4)}
    assert all(r.returncode == 0 for r in runs.values()), [r.stderr for r in runs.values()]
    kv = {bits: stats(r.stdout)["kv"] for bits, r in runs.items()}
    assert kv[8][1:] == kv[4][1:] == kv[None][1:]  # same tokens, same dense reference
    assert float(kv[4][0]) < float(kv[8][0]) < float(kv[None][0]) / 3  # float32 model: 8 bits is ~1/3.6
    # The bytes the quantized caches hold, as the Python API measures them.
    model, tokenizer = mlx_ksa.load(str(model_dir))
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "quantize me"}], add_generation_prompt=True)
    cache = mlx_ksa.make_prompt_cache(model)
    text = "".join(r.text for r in stream_generate(model, tokenizer, prompt, max_tokens=200, prompt_cache=cache,
                                                   kv_bits=8, kv_group_size=32, quantized_kv_start=0))
    assert generated(runs[8].stdout) == text.strip("\n")
    assert abs(float(kv[8][0]) - sum(c.nbytes for c in cache) / 1e6) < 1e-3
    bad = cli("mlx_ksa.generate", *args, "--kv-bits", 4, "--kv-group-size", 128, env=env)
    assert bad.returncode == 1 and bad.stderr.strip() == ("error: --kv-group-size 128 does not divide the "
                                                          "model's head_dim 64")


def test_chat_two_turns_keep_the_cache(model_dir, env):
    turns = ["hello there", "and once more"]
    r = cli("mlx_ksa.chat", "--model", model_dir, "-m", 10, env=env, input="\n".join(turns) + "\n")
    assert r.returncode == 0, r.stderr
    # ">> " prompts, each reply of exactly 10 characters (EOS is never sampled), a final prompt.
    out = r.stdout
    assert out[:3] == ">> " and out[13:17] == "\n>> " and out[27:] == "\n>> \n", out
    replies = [out[3:13], out[17:27]]
    new = [int(n) for n in re.findall(r"\[prompt (\d+) new tokens", r.stderr)]
    first = f"user: {turns[0]}\nassistant: "
    # Turn 2 feeds only what follows the cached turn 1 (its prompt and reply).
    assert new == [len(first), len(f"\nuser: {turns[1]}\nassistant: ")], r.stderr
    # The reply is the one the whole conversation gets from scratch.
    model, tokenizer = mlx_ksa.load(str(model_dir))
    convo = first + replies[0] + f"\nuser: {turns[1]}\nassistant: "
    fresh = "".join(x.text for x in stream_generate(model, tokenizer, convo, max_tokens=10))
    assert replies[1] == fresh


def test_long_document_example_retrieves_the_passkey_through_the_summaries(env):
    """The shipped model answers from a cache whose windows (64 tokens) end far
    after the key: the answer can only come through the summaries."""
    r = subprocess.run([sys.executable, "examples/long_document_qa.py"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    key, before = re.search(r"passkey (\d+), (\d+) tokens before the question", r.stdout).groups()
    assert int(before) > 8 * 64
    assert re.search(rf"^A: {key}\b", r.stdout, re.M), r.stdout


def test_generate_example_runs(env):
    r = subprocess.run([sys.executable, "examples/generate.py"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "--- the KV cache after that reply ---" in r.stdout and "dense / KSA" in r.stdout


def test_readme_python_example_runs_outside_the_checkout(tmp_path):
    """The README's Python block, up to its hub download (no network here),
    from a directory that is not the source checkout."""
    block = re.search(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    offline = block.split("\n# Convert an official")[0]
    assert "mlx_ksa.load()" in offline and "stream_generate" in offline
    r = subprocess.run([sys.executable, "-c", offline], cwd=tmp_path, capture_output=True, text=True,
                       timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    assert "tokens," in r.stdout and "bytes of KV cache" in r.stdout


def test_convert_and_quantize_example_runs(env, tmp_path):
    from tests.helpers import tiny_checkpoint

    src, cfg, _ = tiny_checkpoint(tmp_path / "src", hidden_size=128, head_dim=64)
    r = subprocess.run([sys.executable, "examples/convert_and_quantize.py", str(src), str(tmp_path / "work")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert re.search(r"^bf16: '", r.stdout, re.M) and re.search(r"^q4: '", r.stdout, re.M), r.stdout
    assert json.loads((tmp_path / "work" / "q4" / "config.json").read_text())["quantization"]["bits"] == 4
