"""The Python API in one page: load a KSA model, generate, stream, and look
inside its KV cache against what a dense model of the same shape would hold.

    python examples/generate.py                      # the default model shipped in the package
    python examples/generate.py --model DIR_OR_REPO --prompt "Tell me about summary tokens."

KSA models load with `mlx_ksa.load` and then run through mlx-lm's own
`generate` / `stream_generate` unchanged; the cache is `model.make_cache()`
(one KSACache per layer).
"""

import argparse
import time

import mlx.core as mx
from mlx_lm import generate, stream_generate
from mlx_lm.sample_utils import make_sampler

import mlx_ksa
from mlx_ksa.generate import DEFAULT_MODEL, kv_cache_stats


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(DEFAULT_MODEL))
    p.add_argument("--prompt", default="def fibonacci(n):")
    p.add_argument("--context", type=int, default=3000, help="tokens fed for the cache growth table")
    a = p.parse_args()

    model, tokenizer = mlx_ksa.load(a.model)
    args = model.args
    print(f"{a.model}: {len(model.layers)} layers, KSA chunk {args.layout.chunk}, "
          f"{args.layout.summaries} summary per chunk, windows (chunks) {args.windows}\n")

    # 1. One call; mlx-lm samples greedily unless given a sampler.
    print("--- generate (greedy) ---")
    print(a.prompt + generate(model, tokenizer, a.prompt, max_tokens=80))

    # 2. Streaming, into a cache we keep afterwards.
    print("\n--- stream_generate (temp 0.9, top-p 0.95) ---")
    mx.random.seed(0)
    cache = mlx_ksa.make_prompt_cache(model)
    print(a.prompt, end="")
    for r in stream_generate(model, tokenizer, a.prompt, max_tokens=120, prompt_cache=cache,
                             sampler=make_sampler(temp=0.9, top_p=0.95)):
        print(r.text, end="", flush=True)
    print(f"\n[{r.generation_tokens} tokens at {r.generation_tps:.0f} tok/s, peak memory {r.peak_memory:.3f} GB]")

    # 3. The cache: per layer, what it holds.
    print("\n--- the KV cache after that reply ---")
    print("layer  window  summaries kept  text tokens  bytes")
    for i, c in enumerate(cache):
        print(f"{i:5d}  {c.window:6d}  {str(c.keep_summaries):>14}  {c.offset:11d}  {c.nbytes:,}")

    # 4. How it grows: KSA layers keep W chunks of text plus one summary per
    # older chunk, so past the window they grow at S/k of the dense rate.
    print("\n--- cache size as the context grows ---")
    print("  tokens   KSA (MB)   dense (MB)   dense / KSA")
    cache = mlx_ksa.make_prompt_cache(model)
    ids = tokenizer.encode((a.prompt + " ") * (a.context // max(len(a.prompt), 1) + 1))[: a.context]
    fed, tic = 0, time.perf_counter()
    for end in sorted({min(n, len(ids)) for n in (64, 256, 1024, 2048, a.context)}):
        model(mx.array(ids[fed:end])[None], cache=cache)
        mx.eval([c.state[:2] for c in cache])
        fed = end
        tokens, ksa, dense = kv_cache_stats(model, cache)
        print(f"{tokens:8d}   {ksa / 1e6:8.3f}   {dense / 1e6:10.3f}   {dense / ksa:11.2f}")
    print(f"(prefilled {fed} tokens in {time.perf_counter() - tic:.1f} s; byte counts include the "
          "buffers' growth steps)")


if __name__ == "__main__":
    main()
