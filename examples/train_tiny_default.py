"""Trains the tiny model shipped in mlx_ksa/default_model/ (what `python -m
mlx_ksa.generate` runs when no --model is given).

A character-level KSA model (chunk k = 8, one summary per chunk, three KSA
layers with a 2-chunk window and one layer whose window covers the whole
training context), trained from scratch on the CPU on the Python standard
library's own source, so the package can show KSA generating code offline.

    nice -n 10 python examples/train_tiny_default.py --out mlx_ksa/default_model

Uses mlx_ksa.train (the same loop as `python -m mlx_ksa.train pretrain`) and
writes the weights in float16 with a model card recording how they were made.
The size and step count are set so that training takes about 11 minutes of
CPU time with MLX's CPU back end (about 800 tokens per CPU second here).
"""

import argparse
import json
import platform
import string
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.utils import load_tokenizer

from mlx_ksa.data import Batches, pack, read_tokens
from mlx_ksa.model import Model, ModelArgs
from mlx_ksa.train import TrainArgs, lm_loss, save_pretrained, train

# Printable ASCII plus tab and newline: Python source is almost all of it;
# anything else becomes <unk>.
CHARS = string.digits + string.ascii_letters + string.punctuation + " \t\n"
TOKENS = ["<unk>", "<eos>"] + list(CHARS)
# The default model completes text: its chat template only joins the messages,
# so `generate` and `chat` hand the prompt through unchanged.
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"

CONFIG = {
    "model_type": "qwen3",
    "architectures": ["Qwen3ForCausalLM"],
    "hidden_size": 128,
    "num_hidden_layers": 4,
    "intermediate_size": 384,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": True,
    "vocab_size": len(TOKENS) + 1,
    "eos_token_id": 1,
    "use_summary_attention": True,
    "summary_chunk_size": 8,
    "summary_token_num": 1,
    "summary_token_begin": len(TOKENS),
    "summary_sliding_chunk_num": "[2]*3+[64]",
    "torch_dtype": "float16",
}


def write_tokenizer(path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(TOKENS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<eos>", "unk_token": "<unk>",
        "chat_template": CHAT_TEMPLATE,
    }))


MODEL_CARD = """\
# mlx-ksa tiny default model

A {params:,}-parameter character-level Qwen3 with Kwai Summary Attention,
shipped inside the package so that `python -m mlx_ksa.generate`, `mlx_ksa.chat`
and `mlx_ksa.server` work offline with no `--model`. It is a demonstration,
not a useful language model: it writes Python-looking text and nothing more.

- Architecture: {layers} layers, hidden {hidden}, MLP {ffn}, {heads} query / {kv} KV
  heads of dim {head_dim}, tied embeddings; KSA chunk k = {k}, {S} summary per
  chunk, windows `{windows}` (three KSA layers seeing 2 chunks of text plus the
  summaries of older chunks, one layer whose window covers 512 tokens).
- Tokenizer: one token per character ({vocab} ids: `<unk>`, `<eos>`, printable
  ASCII, tab, newline); the chat template only joins the messages' contents.
- Data: the {n_files} `*.py` files of the Python {py} standard library
  (`{data_dir}`), {n_train:,} training characters; the last {n_val} files
  ({n_val_tokens:,} characters) held out.
- Training: `{command}`
  {steps} AdamW steps, batch {batch} x {seq} tokens ({seen:,} tokens, about
  {epochs:.2f} of one pass over the data), lr {lr} cosine with {warmup} warm-up
  steps, float32 on the CPU ({machine}), {minutes:.1f} minutes wall clock,
  {cpu_minutes:.1f} minutes of CPU time.
- Result: training loss {train_loss:.3f} (mean of the last 50 steps), held-out
  loss {val_loss:.3f} nats per character (on {val_chars:,} held-out characters).
  Weights stored in float16 ({size_mb:.1f} MB).
- Quality: it has learned the look of Python (indentation, `return`, `self.`,
  `if`, brackets, `_private` names) but hardly any words and no meaning:
  expect Python-shaped nonsense. Greedy decoding (`--temp 0`, the default) and
  temperatures below about 0.8 fall into long runs of spaces, indentation
  being the most common thing in its data; sample with `--temp 0.8`.
  `python -m mlx_ksa.generate --prompt "def fibonacci(n):" --temp 0.8 --seed 1 -m 200`
  gave, with MLX {mlx} on the CPU:

```
{sample}
```

Made by `examples/train_tiny_default.py`; retrain with that command. A properly
trained small default model is planned.
"""


def sample(model, tokenizer, prompt="def fibonacci(n):", seed=1):
    """What `python -m mlx_ksa.generate --prompt PROMPT --temp 0.8 --seed 1 -m 200` prints."""
    from mlx_lm import stream_generate
    from mlx_lm.sample_utils import make_sampler

    mx.random.seed(seed)
    text = "".join(r.text for r in stream_generate(model, tokenizer, prompt, max_tokens=200,
                                                   sampler=make_sampler(temp=0.8)))
    return prompt + text.rstrip()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="mlx_ksa/default_model")
    p.add_argument("--data-dir", default=sysconfig.get_paths()["stdlib"])
    p.add_argument("--steps", type=int, default=260)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--val-files", type=int, default=4)
    p.add_argument("--val-rows", type=int, default=64, help="held-out rows scored (bounds eval time)")
    a = p.parse_args(argv)

    files = sorted(Path(a.data_dir).glob("*.py"))
    train_files, val_files = files[: -a.val_files], files[-a.val_files :]
    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer(Path(tmp))
        tokenizer = load_tokenizer(Path(tmp))
    tokens, val_tokens = read_tokens(train_files, tokenizer), read_tokens(val_files, tokenizer)

    mx.random.seed(0)
    model = Model(ModelArgs.from_dict(CONFIG))
    params = sum(v.size for _, v in tree_flatten(model.parameters()))
    targs = TrainArgs(steps=a.steps, batch_size=a.batch_size, seq_len=a.seq_len, lr=a.lr,
                      min_lr=a.lr / 10, warmup=a.warmup, weight_decay=0.01, report_every=50)
    print(f"{params:,} parameters, {len(tokens):,} training tokens", file=sys.stderr)
    t0, c0 = time.perf_counter(), time.process_time()
    losses = train(model, CONFIG, Batches(pack(tokens, a.seq_len), a.batch_size), targs, a.out)
    minutes, cpu_minutes = (time.perf_counter() - t0) / 60, (time.process_time() - c0) / 60
    val_rows = mx.array(pack(val_tokens, a.seq_len)[: a.val_rows])
    val_loss = np.mean([lm_loss(model, val_rows[i : i + 16]).item() for i in range(0, len(val_rows), 16)])

    model.set_dtype(mx.float16)
    card = MODEL_CARD.format(
        params=params, layers=CONFIG["num_hidden_layers"], hidden=CONFIG["hidden_size"],
        ffn=CONFIG["intermediate_size"], heads=CONFIG["num_attention_heads"],
        kv=CONFIG["num_key_value_heads"], head_dim=CONFIG["head_dim"],
        k=CONFIG["summary_chunk_size"], S=CONFIG["summary_token_num"],
        windows=CONFIG["summary_sliding_chunk_num"], vocab=len(TOKENS), n_files=len(files),
        py=platform.python_version(), data_dir=a.data_dir, n_train=len(tokens), n_val=len(val_files),
        n_val_tokens=len(val_tokens), command="python " + " ".join(["examples/train_tiny_default.py", *sys.argv[1:]]),
        steps=a.steps, batch=a.batch_size, seq=a.seq_len, lr=a.lr, warmup=a.warmup,
        seen=a.steps * a.batch_size * a.seq_len, epochs=a.steps * a.batch_size * a.seq_len / len(tokens),
        machine=f"{platform.machine()}, MLX {mx.__version__}", minutes=minutes, cpu_minutes=cpu_minutes,
        train_loss=float(np.mean(losses[-50:])), val_loss=val_loss, val_chars=val_rows.size,
        size_mb=params * 2 / 1e6, mlx=mx.__version__, sample=sample(model, tokenizer),
    )
    save_pretrained(a.out, model, CONFIG, tokenizer, extra={"README.md": lambda f: f.write_text(card)})
    print(card)


if __name__ == "__main__":
    main()
