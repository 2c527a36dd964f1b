"""Question answering over a long document: read it once, ask many questions.

The document is prefilled once into a KSA cache; each question starts from a
copy of that cache, so only the question's own tokens are processed. The
statistics show the prefill rate and the cache against what a dense model of
the same shape would hold for the same document.

    python examples/long_document_qa.py                 # default model, a passkey far outside its window
    python examples/long_document_qa.py --model DIR_OR_REPO --document report.txt \\
        --question "Who signed the report?" --question "When?"

The default model was trained on passkey prompts (`mlx_ksa.eval`'s format),
so the built-in document is one: the key sits far behind the model's 64-token
windows and reaches the answer only through the summaries. A KSA chat model
(for example a converted KSA-4B checkpoint) answers questions about any text.
"""

import argparse
import copy
import time

import mlx.core as mx
import numpy as np
from mlx_lm import stream_generate
from mlx_lm.sample_utils import make_sampler

import mlx_ksa
from mlx_ksa import eval as ksa_eval
from mlx_ksa.generate import DEFAULT_MODEL, kv_cache_stats


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(DEFAULT_MODEL))
    p.add_argument("--document", help="a text file (default: a passkey prompt)")
    p.add_argument("--tokens", type=int, default=800, help="size of the built-in passkey document")
    p.add_argument("--question", action="append", help="repeat for several questions")
    p.add_argument("--max-tokens", type=int, default=40)
    p.add_argument("--temp", type=float, default=0.0, help="sampling temperature (0: greedy)")
    a = p.parse_args()

    model, tokenizer = mlx_ksa.load(a.model)
    if a.document:
        doc = open(a.document, encoding="utf-8", errors="replace").read()
        questions = a.question or ["Summarize the document in one sentence."]
        frame = "{doc}\n\nQuestion: <query>"
    else:
        count = lambda text: len(tokenizer.encode(text, add_special_tokens=False))
        prompt, (key,) = ksa_eval.passkey(a.tokens, 0.2, np.random.default_rng(0), count)
        doc, question = prompt.rsplit("\n", 1)
        questions = a.question or ["\n" + question]
        frame = "{doc}<query>"  # the prompt exactly as the model was trained on it
        print(f"passkey {key}, {count(prompt) - count(question)} tokens before the question\n")

    # Split the templated conversation at the question: the part before it is
    # the same for every question, and is what the cache keeps.
    messages = [{"role": "user", "content": frame.format(doc=doc)}]
    if tokenizer.has_chat_template:
        full = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        full = messages[0]["content"] + "\nAnswer:"
    prefix, suffix = full.split("<query>")

    cache = mlx_ksa.make_prompt_cache(model)
    ids = tokenizer.encode(prefix, add_special_tokens=not tokenizer.has_chat_template)
    tic = time.perf_counter()
    for i in range(0, len(ids), 2048):  # prefill in steps, as mlx-lm does
        model(mx.array(ids[i : i + 2048])[None], cache=cache)
        mx.eval([c.state[:2] for c in cache])
    dt = time.perf_counter() - tic
    tokens, ksa, dense = kv_cache_stats(model, cache)
    print(f"document: {len(doc):,} characters, {len(ids):,} tokens, prefilled in {dt:.1f} s "
          f"({len(ids) / dt:.0f} tok/s)")
    print(f"KV cache: {ksa / 1e6:.2f} MB; a dense model of this shape would hold {dense / 1e6:.2f} MB "
          f"({dense / ksa:.1f}x)\n")

    for q in questions:
        qcache = copy.deepcopy(cache)  # the document's cache stays as it is for the next question
        q_ids = tokenizer.encode(q + suffix, add_special_tokens=False)
        tic, answer, first = time.perf_counter(), "", None
        mx.random.seed(0)
        for r in stream_generate(model, tokenizer, mx.array(q_ids), max_tokens=a.max_tokens, prompt_cache=qcache,
                                 sampler=make_sampler(temp=a.temp)):
            first = first or time.perf_counter() - tic
            answer += r.text
        print(f"Q: {q.strip()}\nA: {answer.strip() or repr(answer)}")
        tokens, ksa, dense = kv_cache_stats(model, qcache)
        print(f"   [{len(q_ids)} question tokens prefilled, first token after {first * 1e3:.0f} ms, "
              f"{r.generation_tps:.0f} tok/s; cache {tokens:,} tokens, {ksa / 1e6:.2f} MB vs dense "
              f"{dense / 1e6:.2f} MB]\n")


if __name__ == "__main__":
    main()
