"""Chat with a KSA model in the terminal: `mlx_lm.chat` for KSA models.

    python -m mlx_ksa.chat [--model DIR_OR_REPO] [--system-prompt "..."]

One KV cache lives across turns: each turn renders the whole conversation
with the chat template and feeds the model only what the cache does not
hold yet. When the rendering no longer starts with the cached tokens (a
template that rewrites earlier turns, a reply cut by --max-tokens that
re-tokenizes differently) the cache is trimmed back, or rebuilt if KSACache
cannot trim that far, so replies are always those of the full conversation.
Commands: `q` quits (so does end of input), `r` resets, `h` helps.
"""

import sys

import mlx.core as mx
from mlx_lm.generate import stream_generate
from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache
from mlx_lm.sample_utils import make_sampler

from .generate import (DEFAULT_PREFILL_STEP_SIZE, PrefillProgress, _Parser, _positive, format_kv_stats,
                       load_model_and_tokenizer, run_cli)

HELP = "commands: q quit, r reset the conversation, h help"


def setup_arg_parser():
    p = _Parser(prog="python -m mlx_ksa.chat", description="Chat with a KSA model.")
    p.add_argument("--model", help="local model directory or Hugging Face repo id "
                   "(default: the small model shipped in mlx_ksa/default_model)")
    p.add_argument("--adapter-path", help="LoRA adapters from `python -m mlx_ksa.train finetune`")
    p.add_argument("--system-prompt", help="system prompt for the chat template")
    p.add_argument("--max-tokens", "-m", type=_positive(int), default=256, help="maximum tokens per reply")
    p.add_argument("--temp", type=float, default=0.0, help="sampling temperature (0: greedy)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling top-p")
    p.add_argument("--min-p", type=float, default=0.0, help="min-p sampling")
    p.add_argument("--top-k", type=int, default=0, help="top-k sampling (0: off)")
    p.add_argument("--seed", type=int, default=0, help="PRNG seed")
    p.add_argument("--prefill-step-size", type=_positive(int), default=DEFAULT_PREFILL_STEP_SIZE,
                   help="prompt tokens per prefill step")
    p.add_argument("--quiet", "-q", action="store_true", help="no banner, statistics or progress bar")
    return p


def trim_exactly(cache, n):
    """Trims n tokens off every layer's cache in place; False when it cannot
    (KSACache trims only within its last chunks: past that the cache is
    left in an unknown state and must be rebuilt)."""
    if not can_trim_prompt_cache(cache):
        return False
    target = cache[0].offset - n
    try:
        trim_prompt_cache(cache, n)
    except ValueError:
        return False
    return all(c.offset == target for c in cache)


class Conversation:
    """The messages so far, the cache, and the tokens the cache holds."""

    def __init__(self, model, tokenizer, system_prompt=None):
        self.model, self.tokenizer, self.system_prompt = model, tokenizer, system_prompt
        self.reset()

    def reset(self):
        self.messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        self.cache = self.model.make_cache()
        self.cached = []  # token ids the cache holds, in order

    def render(self):
        tok = self.tokenizer
        if tok.has_chat_template:
            return tok.apply_chat_template(self.messages, add_generation_prompt=True)
        # No template: the plain concatenation of the turns.
        return tok.encode("".join(m["content"] for m in self.messages))

    def new_tokens(self, ids):
        """The part of `ids` the cache lacks, after trimming or resetting it
        so that it holds a prefix of `ids` (and never all of it)."""
        common = 0
        for a, b in zip(self.cached, ids):
            if a != b:
                break
            common += 1
        common = min(common, len(ids) - 1)  # at least one token must be fed
        drop = len(self.cached) - common
        if drop and not trim_exactly(self.cache, drop):
            self.cache, common = self.model.make_cache(), 0
        self.cached = list(ids[:common])
        return ids[common:]

    def reply(self, text, **kwargs):
        """Streams the reply to `text`: yields mlx-lm GenerationResponses."""
        self.messages.append({"role": "user", "content": text})
        ids = list(self.render())
        todo = self.new_tokens(ids)
        self.cached = ids  # once todo is fed
        out, last = [], None
        for r in stream_generate(self.model, self.tokenizer, mx.array(todo), prompt_cache=self.cache, **kwargs):
            # Every token stream_generate reports has been fed to the model.
            self.cached.append(r.token)
            out.append(r.text)
            last = r
            yield r
        self.messages.append({"role": "assistant", "content": "".join(out)})
        self.last = last


def run(a):
    model, tokenizer, path = load_model_and_tokenizer(a.model, a.adapter_path)
    mx.random.seed(a.seed)  # after loading, which draws random initial weights
    sampler = make_sampler(a.temp, a.top_p, a.min_p, top_k=a.top_k)
    chat = Conversation(model, tokenizer, a.system_prompt)
    log = (lambda *s: None) if a.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    log(f"[mlx_ksa.chat] {path}; {HELP}")
    while True:
        try:
            query = input(">> ")
        except EOFError:
            print()
            break
        if query.strip() in ("q", "/quit"):
            break
        if query.strip() in ("r", "/reset"):
            chat.reset()
            log("[conversation reset]")
            continue
        if query.strip() in ("h", "/help"):
            print(HELP)
            continue
        if not query.strip():
            continue
        progress = PrefillProgress(a.prefill_step_size, enabled=not a.quiet)
        for r in chat.reply(query, max_tokens=a.max_tokens, sampler=sampler,
                            prefill_step_size=a.prefill_step_size, prompt_progress_callback=progress):
            print(r.text, end="", flush=True)
        print()
        r = chat.last
        log(f"[prompt {r.prompt_tokens} new tokens, {r.prompt_tps:.1f} tok/s; reply {r.generation_tokens} "
            f"tokens, {r.generation_tps:.1f} tok/s; {format_kv_stats(model, chat.cache)}]")


def main(argv=None):
    return run_cli(run, setup_arg_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
