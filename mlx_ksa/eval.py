"""Offline long-context evaluation: seeded synthetic tasks in the style of
RULER (passkey, needle-in-a-haystack, variable tracking, common / frequent
word extraction) and perplexity on a text file.

    python -m mlx_ksa.eval --model DIR --tasks passkey niah_single --lengths 1024 4096 \\
        --depths 0 0.25 0.5 0.75 1 --trials 10 --out results.json [--plot heat.png] [--dense] \\
        [--kv-bits 8 --kv-group-size 64]

A task instance is (prompt, answers): the score is the fraction of answers
found verbatim in the greedy continuation, averaged over trials. With
--kv-bits the generation keeps its K/V cache quantized from the first token
(mlx-lm's kv_bits with quantized_kv_start=0: the prompt is prefilled, then
every cached token is stored quantized, and decoding attends over the
quantized cache).
"""

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
          "There and back again. ")
WORDS = ("apple river stone cloud maple silver window garden candle forest harbor "
         "lantern meadow pepper quartz saddle timber velvet walnut yellow anchor "
         "basket copper dragon ember falcon glacier hollow island jasmine kettle "
         "lemon marble nickel orchid pillow quiver raven shadow thistle umber "
         "violet willow xenon yonder zephyr").split()


@dataclass
class Instance:
    prompt: str
    answers: list
    depth: float
    length: int


def _haystack(n_tokens, count_tokens):
    """Filler text of about n_tokens tokens, as a list of sentences."""
    return [FILLER] * max(1, n_tokens // max(1, count_tokens(FILLER)))


def _insert(sentences, needles, depth):
    """Places each needle at `depth` (0 = start, 1 = end) of the sentence list;
    several needles spread around that depth."""
    out = list(sentences)
    for i, needle in enumerate(needles):
        at = min(1.0, max(0.0, depth + (i - (len(needles) - 1) / 2) * 0.05))
        out.insert(int(round(at * len(out))), needle)
    return "".join(out)


def _digits(rng, n=5):
    return str(rng.integers(10 ** (n - 1), 10**n))


def passkey(length, depth, rng, count_tokens):
    key = _digits(rng)
    head = "There is an important piece of information hidden inside a lot of irrelevant text. Find it and memorize it.\n"
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    body = _insert(_haystack(length - 60, count_tokens), [needle], depth)
    return head + body + "\nWhat is the pass key? The pass key is", [key]


def _niah(length, depth, rng, count_tokens, n_keys, n_values, query_keys):
    keys = rng.choice(WORDS, size=n_keys, replace=False)
    values = {k: [_digits(rng, 6) for _ in range(n_values)] for k in keys}
    needles = [f"One of the special magic numbers for {k} is: {v}. " for k in keys for v in values[k]]
    rng.shuffle(needles)
    body = _insert(_haystack(length - 80, count_tokens), needles, depth)
    asked = keys[:query_keys]
    question = ", ".join(asked)
    prompt = ("Some special magic numbers are hidden within the following text. Make sure to memorize them.\n"
              + body + f"\nWhat are all the special magic numbers for {question} mentioned in the text? "
              f"The special magic numbers for {question} are:")
    return prompt, [v for k in asked for v in values[k]]


def niah_single(length, depth, rng, count_tokens):
    return _niah(length, depth, rng, count_tokens, 1, 1, 1)


def niah_multikey(length, depth, rng, count_tokens):
    return _niah(length, depth, rng, count_tokens, 4, 1, 1)


def niah_multivalue(length, depth, rng, count_tokens):
    return _niah(length, depth, rng, count_tokens, 1, 4, 1)


def variable_tracking(length, depth, rng, count_tokens, hops=4):
    value = _digits(rng)
    names = ["".join(rng.choice(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ"), 5)) for _ in range(hops + 1)]
    chain = [f"VAR {names[0]} = {value}. "] + [f"VAR {names[i]} = VAR {names[i - 1]}. " for i in range(1, hops + 1)]
    body = _insert(_haystack(length - 40 - 8 * hops, count_tokens), chain, depth)
    return (body + f"\nFind all variables that are assigned the value {value}. Answer: they are",
            names)


def _word_list_task(length, rng, count_tokens, shares, top):
    """A numbered word list filling `length` tokens: len(shares) words repeated
    in proportion to shares (the top ones strictly most frequent), the rest
    single distinct fillers."""
    per_item = max(1, count_tokens("123. apple"))
    n_items = max(len(shares) * 2, (length - 60) // per_item)
    scale = 0.7 * n_items / sum(shares)
    counts = [max(1, int(s * scale)) for s in shares]
    words = list(rng.choice(WORDS, size=len(shares), replace=False))
    items = [w for w, c in zip(words, counts) for _ in range(c)]
    items += [f"{rng.choice(WORDS)}{i}" for i in range(n_items - len(items))]
    rng.shuffle(items)
    listing = " ".join(f"{i + 1}. {w}" for i, w in enumerate(items))
    return (f"Below is a numbered list of words.\n{listing}\nQuestion: what are the {top} most common "
            f"words in the list above? Answer: the top {top} words are", words[:top])


def common_words(length, depth, rng, count_tokens):
    return _word_list_task(length, rng, count_tokens, [6] * 10 + [1] * 20, 10)


def frequent_words(length, depth, rng, count_tokens):
    return _word_list_task(length, rng, count_tokens, [1 / (i + 1) for i in range(20)], 3)


TASKS = {f.__name__: f for f in (passkey, niah_single, niah_multikey, niah_multivalue,
                                 variable_tracking, common_words, frequent_words)}


def make_instances(task, lengths, depths, trials, seed, count_tokens):
    """Deterministic for (task, seed): trial t at (length, depth) uses its own stream."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    out = []
    for length in lengths:
        for depth in depths:
            for t in range(trials):
                rng = np.random.default_rng([seed, length, int(depth * 1000), t, sorted(TASKS).index(task)])
                prompt, answers = TASKS[task](length, depth, rng, count_tokens)
                out.append(Instance(prompt, [str(a) for a in answers], depth, length))
    return out


def score(prediction, answers):
    """Fraction of the expected strings present in the prediction."""
    return sum(a in prediction for a in answers) / len(answers)


KV_BITS = (4, 8)


def _check_kv(kv_bits, kv_group_size):
    if kv_bits is not None and kv_bits not in KV_BITS:
        raise ValueError(f"kv_bits must be one of {KV_BITS} or None, not {kv_bits!r}")
    if kv_group_size not in (32, 64, 128):
        raise ValueError(f"kv_group_size must be 32, 64 or 128, not {kv_group_size!r}")


def _generation_kwargs(kv_bits, kv_group_size):
    """What mlx-lm's generate needs to keep the cache quantized from the start."""
    if kv_bits is None:
        return {}
    return {"kv_bits": kv_bits, "kv_group_size": kv_group_size, "quantized_kv_start": 0}


def kv_cache_bytes(cache):
    """Bytes the caches hold (allocated, all layers): sum of their nbytes."""
    return int(sum(c.nbytes for c in cache))


def kv_cache_dtype(cache):
    """What one layer's cache stores: its dtype, or bits, group and scale dtype when quantized."""
    c = next((c for c in cache if not c.empty()), None)
    if c is None:
        return None
    if isinstance(c.keys, (tuple, list)):  # mx.quantize parts: packed, scales, biases
        return f"{c.bits}-bit (group {c.group_size}, {str(c.keys[1].dtype).split('.')[-1]} scales)"
    return str(c.keys.dtype).split(".")[-1]


def prompt_kv(model, tokenizer, prompt, kv_bits=None, kv_group_size=64):
    """(bytes, dtype) of the decode caches after prefilling `prompt` in one call,
    quantized as run_task's generation quantizes them."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    _check_kv(kv_bits, kv_group_size)
    cache = make_prompt_cache(model)
    mx.eval(model(mx.array(tokenizer.encode(prompt))[None], cache=cache))
    if kv_bits is not None:
        cache = [c.to_quantized(group_size=kv_group_size, bits=kv_bits) for c in cache]
    return kv_cache_bytes(cache), kv_cache_dtype(cache)


def run_task(model, tokenizer, task, lengths, depths, trials, seed=0, max_tokens=None, log=None,
             kv_bits=None, kv_group_size=64):
    """Greedy generation on each instance; one row per instance. kv_bits (4 or 8)
    keeps the K/V cache quantized (group kv_group_size) from the first token;
    each row records the cache it ended with: kv_bytes (allocated) and kv_dtype."""
    from mlx_lm import generate
    from mlx_lm.models.cache import make_prompt_cache

    _check_kv(kv_bits, kv_group_size)
    count = lambda s: len(tokenizer.encode(s))
    rows = []
    for inst in make_instances(task, lengths, depths, trials, seed, count):
        budget = max_tokens or (8 + 8 * len(inst.answers))
        # generate quantizes the caches in this list in place.
        cache = make_prompt_cache(model)
        pred = generate(model, tokenizer, inst.prompt, max_tokens=budget, verbose=False,
                        prompt_cache=cache, **_generation_kwargs(kv_bits, kv_group_size))
        rows.append({"task": task, "length": inst.length, "depth": inst.depth,
                     "tokens": count(inst.prompt), "score": score(pred, inst.answers),
                     "answers": inst.answers, "prediction": pred,
                     "kv_bits": kv_bits, "kv_group_size": kv_group_size if kv_bits else None,
                     "kv_bytes": kv_cache_bytes(cache), "kv_dtype": kv_cache_dtype(cache)})
        if log:
            log(f"{task} len={inst.length} depth={inst.depth:.2f} score={rows[-1]['score']:.2f}")
    return rows


def perplexity(model, tokenizer, text, seq_len=2048):
    """exp(mean next-token CE) over non-overlapping windows of the text."""
    import mlx.core as mx
    import mlx.nn as nn

    ids = np.array(tokenizer.encode(text), np.int32)
    if len(ids) < 2:
        raise ValueError(f"perplexity needs at least 2 tokens of text, got {len(ids)}")
    total, n = 0.0, 0
    for a in range(0, len(ids) - 1, seq_len):
        chunk = ids[a : a + seq_len + 1]
        if len(chunk) < 2:
            break
        logits = model(mx.array(chunk[:-1])[None]).astype(mx.float32)
        ce = nn.losses.cross_entropy(logits, mx.array(chunk[1:])[None], reduction="sum")
        total, n = total + ce.item(), n + len(chunk) - 1
    return math.exp(total / n)


def summarize(rows):
    """{task: {length: {depth: mean score}}}"""
    table = {}
    for r in rows:
        cell = table.setdefault(r["task"], {}).setdefault(r["length"], {}).setdefault(r["depth"], [])
        cell.append(r["score"])
    return {t: {L: {d: float(np.mean(s)) for d, s in ds.items()} for L, ds in ls.items()}
            for t, ls in table.items()}


def format_table(summary, kv_bytes=None, kv=None):
    """Markdown tables of summary; kv_bytes ({task: {length: bytes}}) adds a
    column, kv (a description of the K/V cache) a line above each table."""
    lines = []
    for task, by_len in summary.items():
        depths = sorted({d for ds in by_len.values() for d in ds})
        extra = task in (kv_bytes or {})
        lines.append(f"\n{task}" + (f" (KV cache: {kv})" if kv else "") + "\n| length | "
                     + " | ".join(f"depth {d:g}" for d in depths) + " | mean |" + (" KV bytes |" if extra else ""))
        lines.append("|---" * (len(depths) + 2 + extra) + "|")
        for L in sorted(by_len):
            vals = [by_len[L].get(d, float("nan")) for d in depths]
            lines.append(f"| {L} | " + " | ".join(f"{v:.2f}" for v in vals) + f" | {np.nanmean(vals):.2f} |"
                         + (f" {kv_bytes[task][L]:,} |" if extra else ""))
    return "\n".join(lines)


def _pyplot():
    # An optional extra: main asks before the tasks run, so a missing install
    # does not surface after minutes of evaluation.
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("--plot needs matplotlib: pip install 'mlx-ksa[plot]'") from None
    return plt


def plot(summary, path):
    """A PNG heat map per task: score by needle depth (rows) and length (columns).
    Returns the matplotlib figure (for a notebook)."""
    plt = _pyplot()
    tasks = list(summary)
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        lengths = sorted(summary[task])
        depths = sorted({d for L in lengths for d in summary[task][L]})
        grid = np.array([[summary[task][L].get(d, np.nan) for L in lengths] for d in depths])
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="upper")
        ax.set_xticks(range(len(lengths)), [str(L) for L in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("needle depth")
        ax.set_title(task)
    fig.colorbar(im, ax=axes[0].tolist())
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return fig


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m mlx_ksa.eval", description=__doc__.split("\n")[0])
    p.add_argument("--model", help="a model directory or Hugging Face repo id, as for mlx_ksa.generate "
                   "(default: the model shipped in the package); dense models load through mlx-lm")
    p.add_argument("--dense", action="store_true", help="load --model with mlx_lm.load (a dense baseline)")
    p.add_argument("--tasks", nargs="*", default=["passkey"], choices=sorted(TASKS),
                   help="tasks to run (default passkey; none with --perplexity: perplexity only)")
    p.add_argument("--lengths", nargs="+", type=int, default=[1024, 4096])
    p.add_argument("--depths", nargs="+", type=float, default=[0.0, 0.25, 0.5, 0.75, 1.0])
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-tokens", type=int)
    p.add_argument("--kv-bits", type=int, choices=KV_BITS,
                   help="keep the K/V cache quantized to this many bits from the first token")
    p.add_argument("--kv-group-size", type=int, default=64, choices=(32, 64, 128),
                   help="group size of the K/V quantization (default 64)")
    p.add_argument("--perplexity", help="a text file to measure perplexity on")
    p.add_argument("--out", help="JSON file for all rows and the summary")
    p.add_argument("--plot", help="PNG heat map of score by depth and length")
    a = p.parse_args(argv)
    try:
        if bad := [d for d in a.depths if not 0 <= d <= 1]:
            raise ValueError(f"--depths {' '.join(map(str, bad))}: a depth lies in [0, 1]")
        if bad := [L for L in a.lengths if L < 64]:
            raise ValueError(f"--lengths {' '.join(map(str, bad))}: a prompt is at least 64 tokens")
        if a.trials < 1:
            raise ValueError(f"--trials must be >= 1, got {a.trials}")
        if a.max_tokens is not None and a.max_tokens < 1:
            raise ValueError(f"--max-tokens must be >= 1, got {a.max_tokens}")
        if not a.tasks and not a.perplexity:
            raise ValueError("nothing to evaluate: give --tasks or --perplexity")
        if a.plot:
            if not a.tasks:
                raise ValueError("--plot draws the tasks' scores: give --tasks")
            _pyplot()
        # Read before the model loads and the tasks run, so a bad path fails at once.
        text = Path(a.perplexity).read_text(errors="replace") if a.perplexity else None
        from .generate import load_any

        model, tokenizer = load_any(a.model, dense=a.dense)
        start, rows = time.perf_counter(), []
        kv = {"kv_bits": a.kv_bits, "kv_group_size": a.kv_group_size if a.kv_bits else None}
        for task in a.tasks:
            rows += run_task(model, tokenizer, task, a.lengths, a.depths, a.trials, a.seed, a.max_tokens,
                             log=lambda s: print(s, file=sys.stderr), kv_bits=a.kv_bits,
                             kv_group_size=a.kv_group_size)
        seconds = time.perf_counter() - start
        summary = summarize(rows)
        # The caches after each length's first prompt: what a prompt that long costs.
        kv_bytes, kv_dtype = {}, None
        for r in rows:
            if r["length"] not in kv_bytes.setdefault(r["task"], {}):
                first = make_instances(r["task"], [r["length"]], a.depths, 1, a.seed,
                                       lambda s: len(tokenizer.encode(s)))[0]
                kv_bytes[r["task"]][r["length"]], kv_dtype = prompt_kv(
                    model, tokenizer, first.prompt, a.kv_bits, a.kv_group_size)
        result = {"model": a.model, "dense": a.dense, "seed": a.seed, **kv, "kv_dtype": kv_dtype,
                  "kv_bytes": kv_bytes, "summary": summary, "rows": rows, "seconds": seconds}
        if a.perplexity:
            result["perplexity"] = perplexity(model, tokenizer, text)
            print(f"perplexity: {result['perplexity']:.3f}")
        if summary:
            print(format_table(summary, kv_bytes, kv_dtype))
        if a.out:
            Path(a.out).write_text(json.dumps(result, indent=1))
        if a.plot:
            plot(summary, a.plot)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
