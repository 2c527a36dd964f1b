"""Issue #7: a small KSA model that retrieves a passkey through its summaries,
against a "sliding chunks only" baseline (summary_token_num = 0) trained on the
same data for the same number of steps.

    python examples/train_passkey.py --out runs/passkey --minutes 3 --bundle runs/passkey.tar.gz

Everything is offline and seeded:
1. data: the Python standard library's source (sysconfig stdlib path) plus
   synthetic passkey examples in mlx_ksa.eval's exact format (random lengths up
   to the training length, random depths, the answer appended), so the eval
   asks exactly what training taught; the answer's digits weigh more in the
   loss (--answer-weight);
2. a sentencepiece BPE tokenizer trained on that text (digits split, byte
   fallback, whitespace kept), written as tokenizer.json for mlx-lm's loader;
3. the KSA model: hybrid 3:1 windows ([2]*3+[8]) repeated, chunk 8, one
   summary per chunk; no layer's window covers the training context, so a key
   more than (8+1)*8 tokens back is reachable only through summaries;
4. the baseline: the same network with summary_token_num = 0, same init (apart
   from the summary row), same batches, same steps;
5. passkey accuracy with mlx_ksa.eval.run_task (greedy generation, 100 trials
   per length over 5 depths) at 1x..16x the largest window;
6. the KSA model quantized (mlx-lm affine, summary embedding left exact),
   saved with its tokenizer and model card, evaluated again after loading.

Outputs: OUT/ksa, OUT/baseline, OUT/report.json, OUT/report.md, OUT/train.log
and, with --bundle, one .tar.gz of all of it (baseline weights only with
--bundle-baseline-weights, to stay under --bundle-max-mb).

Training time is set per model by --minutes: a few steps measure the step time
first, then both models train for the number of steps that fits (a deadline
stops a run that is slower than measured). --steps fixes the count instead.
"""

import argparse
import functools
import io
import json
import math
import os
import platform
import shlex
import sys
import sysconfig
import tarfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from mlx_ksa import eval as ksa_eval
from mlx_ksa.data import Batches
from mlx_ksa.model import Model, ModelArgs
from mlx_ksa.train import TrainArgs, save_pretrained, train
from mlx_ksa.utils import load as ksa_load

CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
SPECIALS = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2
_LOG_FILE = None


def log(msg):
    print(msg, file=sys.stderr, flush=True)
    if _LOG_FILE is not None:
        with open(_LOG_FILE, "a") as f:
            f.write(msg + "\n")


# -- data ---------------------------------------------------------------------
def stdlib_texts(root, max_chars):
    """Source files of the standard library (sorted, site-packages excluded)."""
    files = sorted(p for p in Path(root).rglob("*.py") if "site-packages" not in p.parts)
    texts, total = [], 0
    for f in files:
        try:
            t = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if t.strip():
            texts.append(t)
            total += len(t)
        if total >= max_chars:
            break
    if not texts:
        raise ValueError(f"no Python source found under {root}")
    return texts, total


def train_sentencepiece(lines, vocab_size):
    """A BPE sentencepiece model (bytes of its proto) for source code and digits."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, vocab_size=vocab_size, model_type="bpe",
        split_digits=True, byte_fallback=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, add_dummy_prefix=False,
        character_coverage=0.9995, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        input_sentence_size=0, max_sentence_length=16384, num_threads=os.cpu_count() or 1,
        minloglevel=2,
    )
    return buf.getvalue()


def write_hf_tokenizer(sp_proto, path):
    """tokenizer.json (a `tokenizers` BPE with the sentencepiece vocabulary and
    merges, byte fallback) + tokenizer_config.json + the sentencepiece model.

    mlx-lm loads it with PreTrainedTokenizerFast and picks its sentencepiece
    streaming detokenizer (the decoder is Replace + ByteFallback + Fuse)."""
    import sentencepiece as spm
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

    sp = spm.SentencePieceProcessor(model_proto=sp_proto)
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    merges = []
    for piece, i in sorted(vocab.items(), key=lambda kv: kv[1]):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or len(piece) < 2:
            continue
        splits = [(piece[:j], piece[j:]) for j in range(1, len(piece))
                  if piece[:j] in vocab and piece[j:] in vocab]
        merges += sorted(splits, key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True,
                               fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                     decoders.Fuse()])
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "</s>", "unk_token": "<unk>",
        "bos_token": None, "add_bos_token": False, "chat_template": CHAT_TEMPLATE,
    }, indent=1))
    (path / "sentencepiece.model").write_bytes(sp_proto)
    agree = sum(sp.encode(s) == tok.encode(s, add_special_tokens=False).ids
                for s in ("The pass key is 12345. Remember it.", "def f(x):\n    return x  # 42\n"))
    return tok, agree


def passkey_templates(encode, digit_ids, n, min_len, max_tokens, rng):
    """n tokenized passkey examples (eval format + ' KEY.'), with the positions
    of the key's digits (3 copies x 5) so that new keys are written as tokens.

    Digits are single tokens (split_digits) and the rest of the text holds
    none, so writing digit ids there equals tokenizing the text with that key."""
    count_cache = {}

    def count(s):
        if s not in count_cache:
            count_cache[s] = len(encode(s))
        return count_cache[s]

    digit_set = {int(d): k for k, d in enumerate(digit_ids)}
    out, tries = [], 0
    while len(out) < n:
        tries += 1
        if tries > 20 * n + 100:
            raise ValueError(f"cannot make passkey examples of at most {max_tokens} tokens")
        length = int(rng.integers(min_len, max_tokens + 1))
        depth = float(rng.random())
        seed = int(rng.integers(1 << 31))
        while True:  # the nominal length is approximate: shrink until it fits
            prompt, (key,) = ksa_eval.passkey(length, depth, np.random.default_rng(seed), count)
            ids = np.array(encode(prompt + " " + key + "."), np.int32)
            if len(ids) <= max_tokens or length < 16:
                break
            length = int(length * max_tokens / len(ids)) - 1
        pos = np.array([i for i, t in enumerate(ids) if int(t) in digit_set], np.int64)
        if len(ids) > max_tokens or len(pos) != 15:
            continue
        out.append((ids, pos))
    return out


def make_rows(n_rows, seq_len, templates, stream, passkey_frac, eos, digit_ids, rng, answer_weight=1.0):
    """[n_rows, seq_len + 1]: a passkey example (fresh random key) then EOS and
    library source, or library source only (1 - passkey_frac of the rows).

    Also the loss weights [n_rows, seq_len]: answer_weight on the answer's
    digits, 1 elsewhere. The answer is 5 targets among seq_len, and the only
    ones that need the summaries: unweighted, the code and the filler drown
    their gradient."""
    rows = np.empty((n_rows, seq_len + 1), np.int32)
    weights = np.ones((n_rows, seq_len), np.float32)
    digit_ids = np.asarray(digit_ids, np.int32)
    for r in range(n_rows):
        pos = 0
        if rng.random() < passkey_frac:
            ids, dpos = templates[int(rng.integers(len(templates)))]
            key = rng.integers(0, 10, 5)
            key[0] = rng.integers(1, 10)
            ids = ids.copy()
            ids[dpos] = digit_ids[np.tile(key, 3)]
            rows[r, : len(ids)] = ids
            weights[r, dpos[-5:] - 1] = answer_weight  # the answer: the key's last copy
            rows[r, len(ids)] = eos
            pos = len(ids) + 1
        need = seq_len + 1 - pos
        if need:
            a = int(rng.integers(0, len(stream) - need))
            rows[r, pos:] = stream[a : a + need]
    return rows, weights


# -- models -------------------------------------------------------------------
def model_config(a, vocab, summaries):
    return {
        "model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"],
        "hidden_size": a.hidden, "num_hidden_layers": a.layers, "intermediate_size": a.ffn,
        "num_attention_heads": a.heads, "num_key_value_heads": a.kv_heads, "head_dim": a.head_dim,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "max_position_embeddings": max(4096, 4 * a.seq_len), "tie_word_embeddings": True,
        "vocab_size": vocab + summaries, "eos_token_id": 2,
        "use_summary_attention": True, "summary_chunk_size": a.chunk, "summary_token_num": summaries,
        "summary_token_begin": vocab, "summary_sliding_chunk_num": a.windows,
        "summary_chunk_position_ids_type": "origin",
        "summary_token_position_ids_type": "last_chunk_slice_right",
        "torch_dtype": a.dtype,
    }


def new_model(cfg, a):
    mx.random.seed(a.seed)
    model = Model(ModelArgs.from_dict(cfg))
    S = cfg["summary_token_num"]
    if S:
        # Random rows like the text embedding's: a zero row would go through the
        # first RMSNorm as 0 with a 1/sqrt(eps) gradient. Drawn after the rest,
        # so the baseline (S = 0) starts from the same text weights.
        d = cfg["hidden_size"]
        model.model.summary_embedding = mx.random.normal((S, d)) * (d ** -0.5)
    model.set_dtype(getattr(mx, a.dtype))
    return model


def n_params(model):
    return sum(v.size for _, v in tree_flatten(model.parameters()))


class _Deadline(Exception):
    pass


def train_one(name, cfg, rows, weights, steps, a, budget_s):
    model = new_model(cfg, a)
    warmup = max(1, min(a.warmup, steps // 4)) if a.warmup else max(1, steps // 20)
    targs = TrainArgs(steps=steps, batch_size=a.batch_size, seq_len=a.seq_len, lr=a.lr,
                      min_lr=a.lr / 10, warmup=warmup, weight_decay=0.01, grad_clip=a.grad_clip,
                      report_every=max(1, min(a.report_every, steps)), seed=a.seed)
    curve = []

    def capture(msg):
        log(f"[{name}] {msg}")
        if msg.startswith("step ") and "| loss " in msg:
            curve.append((int(msg.split()[1].split("/")[0]), float(msg.split("| loss ")[1].split()[0])))

    t0 = time.perf_counter()

    def check(step):
        if budget_s and time.perf_counter() - t0 > budget_s:
            raise _Deadline(step)

    done, stopped = steps, False
    try:
        train(model, cfg, Batches(rows, a.batch_size, a.seed, weights), targs, Path(a.out) / name, log=capture,
              on_step=check)
    except _Deadline as e:
        done, stopped = e.args[0], True
        log(f"[{name}] deadline: stopped after {done} of {steps} steps")
    seconds = time.perf_counter() - t0
    tokens = done * a.batch_size * a.seq_len
    log(f"[{name}] {done} steps, {tokens:,} tokens in {seconds:.1f}s ({tokens / seconds:,.0f} tok/s)")
    return model, {"params": n_params(model), "steps": done, "planned_steps": steps,
                   "stopped_by_deadline": stopped, "tokens": tokens, "train_seconds": seconds,
                   "tokens_per_second": tokens / seconds, "warmup_steps": warmup,
                   "final_loss": curve[-1][1] if curve else None, "loss_curve": curve}


def measure_step_seconds(cfg, rows, weights, a):
    """Median seconds per optimizer step, after three warm-up steps (kernel JIT,
    the compiled step's trace)."""
    model = new_model(cfg, a)
    stamps = []
    targs = TrainArgs(steps=a.calibration_steps + 4, batch_size=a.batch_size, seq_len=a.seq_len, lr=a.lr,
                      warmup=1, report_every=1000)
    train(model, cfg, Batches(rows, a.batch_size, a.seed, weights), targs, Path(a.out) / "calibration",
          log=lambda s: None, on_step=lambda step: stamps.append(time.perf_counter()))
    return float(np.median(np.diff(stamps[3:])))


# -- evaluation ---------------------------------------------------------------
def kv_bytes(model, tokenizer, prompt):
    """Bytes the decode caches hold (allocated) after prefilling `prompt`."""
    from mlx_ksa.utils import make_prompt_cache

    cache = make_prompt_cache(model)
    mx.eval(model(mx.array(tokenizer.encode(prompt))[None], cache=cache))
    return int(sum(c.nbytes for c in cache))


def kv_used_bytes(cfg, n_tokens, dtype_bytes):
    """Slots the KSA decode layout needs (KSA-SPEC section 5), not the reserve."""
    k, S = cfg["summary_chunk_size"], cfg["summary_token_num"]
    windows = ModelArgs.from_dict(dict(cfg)).windows
    per_slot = 2 * cfg["num_key_value_heads"] * cfg["head_dim"] * dtype_bytes
    c = n_tokens // k
    slots = sum(S + k + min(W, c) * k + S * c for W in windows)
    return slots * per_slot


def evaluate(name, model, tokenizer, cfg, a, lengths, depths, window_tokens, reach_tokens, trials=None):
    per_depth = max(1, math.ceil((trials or a.eval_trials) / len(depths)))
    t0 = time.perf_counter()
    rows = ksa_eval.run_task(model, tokenizer, "passkey", lengths, depths, per_depth, seed=a.eval_seed,
                             max_tokens=a.eval_max_tokens)
    count = lambda s: len(tokenizer.encode(s))
    instances = ksa_eval.make_instances("passkey", lengths, depths, per_depth, a.eval_seed, count)
    for r, inst in zip(rows, instances):
        # Tokens from the needle's start to the end of the prompt.
        r["distance"] = count(inst.prompt[inst.prompt.index("The pass key is"):])
        r["beyond_window"] = r["distance"] > window_tokens
        r["beyond_baseline_reach"] = r["distance"] > reach_tokens
    seconds = time.perf_counter() - t0
    by_length, by_depth, far, kv, tokens = {}, {}, {}, {}, {}
    for L in lengths:
        sel = [r for r in rows if r["length"] == L]
        tokens[str(L)] = float(np.mean([r["tokens"] for r in sel]))
        by_length[str(L)] = float(np.mean([r["score"] for r in sel]))
        by_depth[str(L)] = {f"{d:g}": float(np.mean([r["score"] for r in sel if r["depth"] == d]))
                            for d in depths}
        beyond = [r["score"] for r in sel if r["beyond_window"]]
        far[str(L)] = float(np.mean(beyond)) if beyond else None
        kv[str(L)] = kv_bytes(model, tokenizer, instances[[r["length"] for r in rows].index(L)].prompt)
        log(f"[{name}] passkey length {L}: accuracy {by_length[str(L)]:.2f} "
            f"(needle beyond the window: {far[str(L)] if far[str(L)] is None else round(far[str(L)], 2)}, "
            f"{len(beyond)} trials), KV cache {kv[str(L)]:,} bytes")
    log(f"[{name}] eval: {len(rows)} generations in {seconds:.1f}s")
    return {"trials_per_length": per_depth * len(depths), "trials_per_depth": per_depth,
            "accuracy": by_length, "accuracy_by_depth": by_depth, "accuracy_beyond_window": far,
            "kv_cache_bytes": kv, "mean_prompt_tokens": tokens, "eval_seconds": seconds,
            "rows": [{k: r[k] for k in ("length", "depth", "tokens", "distance", "beyond_window",
                                         "beyond_baseline_reach", "score", "answers", "prediction")}
                     for r in rows]}


SAMPLE_PROMPT = "def fibonacci(n):"  # the README's first command


@functools.lru_cache(maxsize=None)  # read once for the three models checked
def held_out_text(max_chars):
    """Python source not in the training data: this package's own."""
    files = sorted(Path(ksa_eval.__file__).parent.rglob("*.py"))
    return "\n".join(f.read_text(encoding="utf-8") for f in files)[:max_chars]


def language_checks(name, model, tokenizer, a):
    """What shipping also needs beside retrieval: perplexity on held-out
    Python, and the greedy continuation of the README's prompt."""
    from mlx_lm.generate import generate

    ppl = ksa_eval.perplexity(model, tokenizer, held_out_text(a.held_out_chars), seq_len=a.seq_len)
    sample = generate(model, tokenizer, SAMPLE_PROMPT, max_tokens=a.sample_tokens, verbose=False)
    log(f"[{name}] held-out perplexity {ppl:.2f}; greedy {SAMPLE_PROMPT!r} -> {sample!r}")
    return {"held_out_perplexity": ppl, "sample_prompt": SAMPLE_PROMPT, "sample": sample}


# -- outputs ------------------------------------------------------------------
def device_string():
    try:
        info = mx.device_info()
        name = info.get("device_name") or info.get("architecture") or ""
    except Exception:
        name = ""
    return f"{mx.default_device()} ({name}), {platform.machine()}, MLX {mx.__version__}"


MODEL_CARD = """\
# KSA passkey model (issue #7)

A {params:,}-parameter Qwen3 with Kwai Summary Attention, trained from scratch
to retrieve a passkey through its summary tokens. A demonstration of KSA
retrieval beyond the attention window, not a general language model.

- Architecture: {layers} layers, hidden {hidden}, MLP {ffn}, {heads} query /
  {kv} KV heads of dim {head_dim}, tied embeddings; KSA chunk k = {k}, {S}
  summary per chunk, windows `{windows}` (largest window {window_tokens}
  tokens; no layer sees the whole {seq} token training context).
- Tokenizer: sentencepiece BPE, {vocab} pieces (digits split, byte fallback,
  whitespace kept), trained on the data below; stored as tokenizer.json
  (the sentencepiece model is `sentencepiece.model`).
- Data: {n_chars:,} characters of Python {py} standard library source
  (`{data_dir}`), {n_text_tokens:,} tokens, plus synthetic passkey examples in
  `mlx_ksa.eval`'s format (random length {min_len}..{max_len} tokens, random
  depth, fresh random 5-digit key) in {passkey_frac:.0%} of the rows.
- Loss: cross-entropy over every text target, the answer's 5 digits weighted
  {answer_weight:g}x (a weighted mean).
- Training: {steps} AdamW steps, batch {batch} x {seq} tokens = {tokens:,}
  tokens, lr {lr} cosine (warm-up {warmup} steps, floor lr/10), gradient
  norm clipped at {grad_clip:g}, {dtype},
  {seconds:.0f} s ({tok_s:,.0f} tokens/s) on {device}.
- Weights: {quant}; the summary embedding is not quantized.
- Passkey accuracy (greedy, {trials} trials per length, depths {depths}; the
  baseline is the same network without summaries, trained identically):

{table}

- Held-out perplexity (this package's Python source, {held_out_chars:,}
  characters, not in the training data): {ppl:.2f} (baseline {base_ppl:.2f}).
- Greedy continuation of `{sample_prompt}`:

```python
{sample_prompt}{sample}
```

Made by:

    {command}
"""


def table_md(report, lengths, window_tokens):
    m = report["models"]
    q = "ksa_quantized" in m
    head = ("| context (nominal tokens) | prompt tokens (mean) | x largest window | KSA | " + (f"KSA quantized, re-loaded ({m['ksa_quantized']['eval']['trials_per_length']} trials) | " if q else "")
            + "baseline (no summaries) | KSA, needle beyond window | baseline, needle beyond window "
            "| KSA KV bytes, used (allocated) | baseline KV bytes, used (allocated) | full attention KV bytes |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    fmt = lambda v: "-" if v is None else f"{v:.2f}"
    for L in lengths:
        s = str(L)
        cells = [s, f"{m['ksa']['eval']['mean_prompt_tokens'][s]:.0f}", f"{L / window_tokens:g}", fmt(m["ksa"]["eval"]["accuracy"][s])]
        if q:
            cells.append(fmt(m["ksa_quantized"]["eval"]["accuracy"][s]))
        cells += [fmt(m["baseline"]["eval"]["accuracy"][s]),
                  fmt(m["ksa"]["eval"]["accuracy_beyond_window"][s]),
                  fmt(m["baseline"]["eval"]["accuracy_beyond_window"][s]),
                  f"{m['ksa']['kv_cache_used_bytes'][s]:,} ({m['ksa']['eval']['kv_cache_bytes'][s]:,})",
                  f"{m['baseline']['kv_cache_used_bytes'][s]:,} ({m['baseline']['eval']['kv_cache_bytes'][s]:,})",
                  f"{m['ksa']['kv_cache_full_attention_bytes'][s]:,}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_bundle(out, path, include_baseline_weights, max_mb):
    out, path = Path(out), Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    skipped = []

    def keep(info):
        rel = Path(info.name)
        if (not include_baseline_weights and len(rel.parts) > 1 and rel.parts[1] == "baseline"
                and rel.name.endswith(".safetensors")):
            skipped.append(info.name)
            return None
        return info

    with tarfile.open(path, "w:gz") as tar:
        tar.add(out, arcname=out.name, filter=keep)
    mb = path.stat().st_size / 2**20
    log(f"bundle {path}: {mb:.1f} MB" + (f" (left out {', '.join(skipped)})" if skipped else ""))
    if mb > max_mb:
        log(f"WARNING: bundle is {mb:.1f} MB, over --bundle-max-mb {max_mb}")
    return mb, skipped


# -- main -----------------------------------------------------------------------
def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--minutes", type=float, default=3.0, help="training time per model")
    p.add_argument("--steps", type=int, help="fixed step count (skips the timing)")
    p.add_argument("--bundle", help="also write everything into this .tar.gz")
    p.add_argument("--bundle-baseline-weights", action="store_true")
    p.add_argument("--bundle-max-mb", type=float, default=15.5)
    # data and tokenizer
    p.add_argument("--data-dir", default=sysconfig.get_paths()["stdlib"])
    p.add_argument("--text-mb", type=float, default=12.0, help="characters of source to use, millions")
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--tokenizer-lines", type=int, default=150_000)
    p.add_argument("--passkey-frac", type=float, default=0.8)
    p.add_argument("--passkey-templates", type=int, default=512)
    p.add_argument("--min-passkey-len", type=int, default=64)
    p.add_argument("--answer-weight", type=float, default=32.0,
                   help="loss weight of the answer's digits (1: plain mean over all targets)")
    # model
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--ffn", type=int, default=1024)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--chunk", type=int, default=8)
    p.add_argument("--windows", help='window pattern (default "([2]*3+[8])*(layers/4)")')
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    # training
    p.add_argument("--seq-len", type=int, default=1088)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--grad-clip", type=float, default=1.0,
                   help="gradient norm clip (0: off); a large --answer-weight makes the answer's "
                        "gradients dominate the clipped norm")
    p.add_argument("--warmup", type=int, default=0, help="warm-up steps (default: 5%% of the steps)")
    p.add_argument("--calibration-steps", type=int, default=5)
    p.add_argument("--max-steps", type=int, default=100_000)
    p.add_argument("--report-every", type=int, default=25)
    p.add_argument("--seed", type=int, default=0)
    # evaluation and export
    p.add_argument("--eval-multiples", type=float, nargs="+", default=[1, 2, 4, 8, 16],
                   help="context lengths as multiples of the largest window")
    p.add_argument("--eval-depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    p.add_argument("--eval-trials", type=int, default=100, help="trials per length (over the depths)")
    p.add_argument("--q-eval-trials", type=int, default=50,
                   help="trials per length for the re-loaded quantized model (0: skip)")
    p.add_argument("--eval-seed", type=int, default=1234)
    p.add_argument("--eval-max-tokens", type=int, default=8)
    p.add_argument("--held-out-chars", type=int, default=100_000,
                   help="characters of held-out Python (this package's source) for perplexity")
    p.add_argument("--sample-tokens", type=int, default=60, help="tokens of the greedy sample")
    p.add_argument("--q-bits", type=int, default=8, choices=[0, 4, 8], help="0: no quantization")
    p.add_argument("--q-group-size", type=int, default=64)
    a = p.parse_args(argv)
    if a.windows is None:
        if a.layers % 4:
            p.error("--layers must be a multiple of 4 for the default 3:1 windows; give --windows")
        a.windows = f"([2]*3+[8])*{a.layers // 4}"
    return a


def main(argv=None):
    global _LOG_FILE
    a = parse_args(argv)
    t_start = time.perf_counter()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    _LOG_FILE = out / "train.log"
    _LOG_FILE.write_text("")
    command = "python3 examples/train_passkey.py " + " ".join(map(shlex.quote, argv if argv is not None else sys.argv[1:]))
    log(f"{command}\ndevice: {device_string()}")

    ksa_cfg = model_config(a, a.vocab, 1)
    windows = ModelArgs.from_dict(dict(ksa_cfg)).windows
    window_tokens = max(windows) * a.chunk
    if (max(windows) + 1) * a.chunk >= a.seq_len:
        raise SystemExit(f"largest window ({window_tokens} tokens) covers the {a.seq_len}-token training "
                         "context: retrieval would not need summaries")
    # How far back the baseline can see through its stacked windows (text t
    # sees back to the start of chunk c - W).
    reach_tokens = sum((W + 1) * a.chunk for W in windows)
    lengths = sorted({int(round(m * window_tokens)) for m in a.eval_multiples})
    if min(lengths) < 64:
        raise SystemExit(f"eval lengths {lengths}: mlx_ksa.eval's passkey needs >= 64 tokens; raise the window")

    # 1. data + 2. tokenizer
    t = time.perf_counter()
    texts, n_chars = stdlib_texts(a.data_dir, int(a.text_mb * 1e6))
    rng = np.random.default_rng([a.seed, 1])
    lines = [ln for tx in texts for ln in tx.splitlines() if ln.strip()]
    if len(lines) > a.tokenizer_lines:
        lines = [lines[i] for i in np.sort(rng.choice(len(lines), a.tokenizer_lines, replace=False))]
    probe = np.random.default_rng([a.seed, 2])
    lines += [ln for _ in range(200) for ln in ksa_eval.passkey(
        256, float(probe.random()), probe, lambda s: len(s) // 4)[0].splitlines() if ln.strip()]
    sp_proto = train_sentencepiece(lines, a.vocab)
    tok_dir = out / "tokenizer"
    hf_tok, agree = write_hf_tokenizer(sp_proto, tok_dir)
    from mlx_lm.utils import load_tokenizer

    tokenizer = load_tokenizer(tok_dir)
    sample = "The pass key is 90817. Remember it.\n    x = 3\n"
    if tokenizer.encode(sample) != hf_tok.encode(sample, add_special_tokens=False).ids:
        raise SystemExit("mlx-lm's tokenizer does not encode like tokenizer.json: check the tokenizer files")
    if tokenizer.decode(tokenizer.encode(sample)) != sample:
        raise SystemExit("tokenizer does not round-trip text")
    vocab_size = hf_tok.get_vocab_size()
    assert vocab_size == a.vocab, (vocab_size, a.vocab)
    digit_ids = [hf_tok.token_to_id(str(d)) for d in range(10)]
    if None in digit_ids:
        raise SystemExit("the tokenizer has no single-digit pieces")
    encode = lambda s: hf_tok.encode(s, add_special_tokens=False).ids
    eos = hf_tok.token_to_id("</s>")
    stream = np.concatenate([np.array(e.ids + [eos], np.int32)
                             for e in hf_tok.encode_batch(texts, add_special_tokens=False)])
    templates = passkey_templates(encode, digit_ids, a.passkey_templates, a.min_passkey_len,
                                  a.seq_len - 1, np.random.default_rng([a.seed, 3]))
    # Writing digits as tokens must equal tokenizing the text with that key.
    ids, pos = templates[0]
    check = ids.copy()
    check[pos] = np.array(digit_ids)[np.tile([9, 0, 1, 2, 3], 3)]
    if encode(hf_tok.decode(check.tolist())) != check.tolist() or "90123" not in hf_tok.decode(check.tolist()):
        raise SystemExit("passkey digits do not tokenize one by one")
    log(f"data: {len(texts)} files, {n_chars:,} chars -> {len(stream):,} tokens; tokenizer {vocab_size} pieces "
        f"({agree}/2 probes equal to sentencepiece); {len(templates)} passkey templates; "
        f"{time.perf_counter() - t:.1f}s")

    base_cfg = model_config(a, a.vocab, 0)
    for name, cfg in (("ksa", ksa_cfg), ("baseline", base_cfg)):
        log(f"{name}: {n_params(new_model(cfg, a)):,} parameters, windows {a.windows} (chunk {a.chunk}, "
            f"summaries {cfg['summary_token_num']})")

    # 3./4. steps for the time budget, then both models on the same rows
    if a.steps:
        steps, step_s = a.steps, None
    else:
        calib = make_rows(a.batch_size * (a.calibration_steps + 4), a.seq_len, templates, stream,
                          a.passkey_frac, eos, digit_ids, np.random.default_rng([a.seed, 9]), a.answer_weight)
        step_s = measure_step_seconds(ksa_cfg, *calib, a)
        steps = int(max(10, min(a.max_steps, a.minutes * 60 * 0.97 / step_s)))
        log(f"timing: {step_s * 1000:.0f} ms per step -> {steps} steps in {a.minutes} minutes")
    rows, weights = make_rows(steps * a.batch_size, a.seq_len, templates, stream, a.passkey_frac, eos,
                              digit_ids, np.random.default_rng([a.seed, 4]), a.answer_weight)
    budget = a.minutes * 60 * 1.15 if not a.steps else 0
    report = {"command": command, "device": device_string(), "args": vars(a), "lengths": lengths,
              "depths": a.eval_depths, "window_tokens": window_tokens, "baseline_reach_tokens": reach_tokens,
              "step_seconds_measured": step_s,
              "data": {"files": len(texts), "chars": n_chars, "text_tokens": int(len(stream)),
                       "passkey_templates": len(templates), "rows": int(len(rows)),
                       "vocab": vocab_size},
              "models": {}}
    models = {}
    for name, cfg in (("ksa", ksa_cfg), ("baseline", base_cfg)):
        models[name], info = train_one(name, cfg, rows, weights, steps, a, budget)
        info["config"] = cfg
        report["models"][name] = info
    del rows, weights

    # 5. evaluation
    for name, cfg in (("ksa", ksa_cfg), ("baseline", base_cfg)):
        report["models"][name]["eval"] = evaluate(name, models[name], tokenizer, cfg, a, lengths,
                                                  a.eval_depths, window_tokens, reach_tokens)
        report["models"][name]["language"] = language_checks(name, models[name], tokenizer, a)

    # 6. export: baseline as trained, KSA quantized (summary row exact)
    dtype_bytes = {"float32": 4, "bfloat16": 2, "float16": 2}[a.dtype]
    for name, cfg in (("ksa", ksa_cfg), ("baseline", base_cfg)):
        report["models"][name]["kv_cache_used_bytes"] = {
            str(L): kv_used_bytes(cfg, L, dtype_bytes) for L in lengths}
        # The same network with plain causal attention keeps every token.
        report["models"][name]["kv_cache_full_attention_bytes"] = {
            str(L): L * a.layers * 2 * a.kv_heads * a.head_dim * dtype_bytes for L in lengths}
    save_pretrained(out / "baseline", models["baseline"], base_cfg, tokenizer)
    ksa_model, ksa_save_cfg = models["ksa"], dict(ksa_cfg)
    quant = f"{a.dtype}, not quantized"
    if a.q_bits:
        from mlx_lm.utils import quantize_model

        summary = np.array(ksa_model.model.summary_embedding)
        ksa_model, ksa_save_cfg = quantize_model(ksa_model, ksa_save_cfg, a.q_group_size, a.q_bits)
        assert np.array_equal(np.array(ksa_model.model.summary_embedding), summary)
        quant = f"affine {a.q_bits}-bit, group size {a.q_group_size} (linear and embedding layers)"
    save_pretrained(out / "ksa", ksa_model, ksa_save_cfg, tokenizer)
    for name in ("ksa", "baseline"):
        (out / name / "sentencepiece.model").write_bytes(sp_proto)
    if a.q_bits and a.q_eval_trials:
        loaded, loaded_tok = ksa_load(out / "ksa")
        report["models"]["ksa_quantized"] = {
            "quantization": ksa_save_cfg.get("quantization"),
            "eval": evaluate("ksa_quantized", loaded, loaded_tok, ksa_cfg, a, lengths, a.eval_depths,
                             window_tokens, reach_tokens, trials=a.q_eval_trials),
            "language": language_checks("ksa_quantized", loaded, loaded_tok, a)}
    report["models"]["ksa"]["weights"] = quant
    report["wall_seconds"] = time.perf_counter() - t_start

    table = table_md(report, lengths, window_tokens)
    k = report["models"]["ksa"]
    shipped = report["models"].get("ksa_quantized", k)["language"]  # what the card's folder holds
    card = MODEL_CARD.format(
        params=k["params"], layers=a.layers, hidden=a.hidden, ffn=a.ffn, heads=a.heads, kv=a.kv_heads,
        head_dim=a.head_dim, k=a.chunk, S=1, windows=a.windows, window_tokens=window_tokens, seq=a.seq_len,
        vocab=vocab_size, n_chars=n_chars, py=platform.python_version(), data_dir=a.data_dir,
        n_text_tokens=len(stream), min_len=a.min_passkey_len, max_len=a.seq_len - 1,
        passkey_frac=a.passkey_frac, answer_weight=a.answer_weight, steps=k["steps"], batch=a.batch_size,
        tokens=k["tokens"], lr=a.lr, warmup=k["warmup_steps"], grad_clip=a.grad_clip, dtype=a.dtype,
        seconds=k["train_seconds"], tok_s=k["tokens_per_second"],
        device=report["device"], quant=quant, trials=k["eval"]["trials_per_length"],
        depths=", ".join(f"{d:g}" for d in a.eval_depths), table=table, command=command,
        held_out_chars=a.held_out_chars, ppl=shipped["held_out_perplexity"],
        base_ppl=report["models"]["baseline"]["language"]["held_out_perplexity"],
        sample_prompt=SAMPLE_PROMPT, sample=shipped["sample"])
    (out / "ksa" / "README.md").write_text(card)
    md = ["# Issue #7: KSA vs sliding chunks only, passkey retrieval\n",
          f"`{command}`\n", f"Device: {report['device']}. Total wall time {report['wall_seconds']:.0f} s.\n",
          f"Largest window {window_tokens} tokens (chunk {a.chunk}, windows `{a.windows}`); the baseline's "
          f"stacked windows reach about {reach_tokens} tokens back.\n"]
    for name in ("ksa", "baseline"):
        m = report["models"][name]
        md.append(f"- {name}: {m['params']:,} parameters, {m['steps']} steps, {m['tokens']:,} tokens, "
                  f"{m['train_seconds']:.0f} s ({m['tokens_per_second']:,.0f} tok/s), final loss "
                  f"{m['final_loss'] if m['final_loss'] is None else round(m['final_loss'], 4)}, held-out "
                  f"perplexity {m['language']['held_out_perplexity']:.2f}, greedy {SAMPLE_PROMPT!r} -> "
                  f"{m['language']['sample']!r}")
    md += ["", f"Passkey accuracy ({k['eval']['trials_per_length']} trials per length, depths "
               f"{', '.join(f'{d:g}' for d in a.eval_depths)}; 'needle beyond window': the trials whose "
               f"needle starts more than {window_tokens} tokens before the end of the prompt). KV cache "
               f"bytes in {a.dtype} at that context: used = the slots the decode layout needs "
               "(KSA-SPEC section 5), allocated = what KSACache held after prefilling one prompt "
               "(it reserves in steps of 256 slots).", "", table, ""]
    (out / "report.md").write_text("\n".join(md))
    (out / "report.json").write_text(json.dumps(report, indent=1))
    log("\n".join(md))
    if a.bundle:
        mb, skipped = write_bundle(out, a.bundle, a.bundle_baseline_weights, a.bundle_max_mb)
    log(f"done in {time.perf_counter() - t_start:.0f}s")
    return report


if __name__ == "__main__":
    main()
