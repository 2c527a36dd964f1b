"""Generate text with a KSA model: `mlx_lm.generate` for Kwai Summary Attention.

    python -m mlx_ksa.generate --prompt "def fibonacci(n):"
    python -m mlx_ksa.generate --model DIR_OR_REPO --prompt - < question.txt
    python -m mlx_ksa.generate --model M --prompt "$(cat doc.txt)" --save-prompt-cache doc.safetensors
    python -m mlx_ksa.generate --prompt-cache-file doc.safetensors --prompt "Who wrote it?"

With no --model it runs the small model shipped in mlx_ksa/default_model. A
model is a local directory or a Hugging Face repo id; an original PyTorch
checkpoint of a KSA model is converted once with `mlx_ksa.convert` into a
cache directory (MLX_KSA_CACHE, default ~/.cache/mlx_ksa). Sampling, prompt
caches and streaming are mlx-lm's own (`make_sampler`, `stream_generate`,
`load_prompt_cache`), and so are speculative decoding (--draft-model) and KV
cache quantization (--kv-bits); what this module adds is loading KSA models,
the KV cache statistics against a dense model of the same shape, and a
progress bar for long prefills.

Under `mlx.launch` (more than one rank in `mx.distributed.init()`) the model
is sharded over the ranks with `Model.shard` (tensor parallelism, as
mlx_lm.chat and mlx_lm.benchmark do it) and only rank 0 prints.
"""

import argparse
import contextlib
import hashlib
import json
import os
import struct
import sys
import time
from pathlib import Path

import mlx.core as mx
from mlx_lm.generate import DEFAULT_QUANTIZED_KV_START, stream_generate, str2bool
from mlx_lm.models.cache import KVCache, load_prompt_cache, make_prompt_cache, save_prompt_cache
from mlx_lm.sample_utils import make_sampler

from .cache import KSACache
from .model import Model
# Importing mlx_ksa registers KSACache for load_prompt_cache.
from .utils import DEFAULT_MODEL, load, local_path, weight_read_errors

DEFAULT_PROMPT = "def fibonacci(n):"
DEFAULT_MAX_TOKENS = 100
DEFAULT_PREFILL_STEP_SIZE = 2048
DEFAULT_NUM_DRAFT_TOKENS = 3  # mlx_lm.generate's
SUMMARY_KEYS = ("summary_chunk_size", "summary_token_begin", "summary_sliding_chunk_num")


# -- models -------------------------------------------------------------------
def cache_home():
    return Path(os.environ.get("MLX_KSA_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "mlx_ksa").expanduser()


def _safetensors_names(file):
    """Tensor names from a safetensors header, without reading the weights."""
    with open(file, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return json.loads(f.read(min(n, 1 << 26)))


def is_ksa_checkpoint(path):
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and any(k in config for k in SUMMARY_KEYS)


def needs_conversion(path, hub=False):
    """Whether `path` holds a KSA checkpoint that mlx_ksa.load cannot read as
    is: PyTorch pickles only, or safetensors with Muse training names. A hub
    snapshot without safetensors needs it too (its pickles were not fetched)."""
    if not is_ksa_checkpoint(path):
        return False  # let load() say what is wrong
    shards = sorted(path.glob("model*.safetensors"))
    if not shards:
        return hub or any(True for p in ("*.bin", "*.pt", "*.pth") for _ in path.glob(p))
    try:
        names = _safetensors_names(shards[0])
    except (OSError, ValueError, struct.error):
        return False
    return "summary_embedding.weight" in names or "model.tok_embeddings.weight" in names


def _converted(src, source_name):
    """An mlx-ksa copy of the checkpoint at `src`, converted once and kept."""
    from .convert import convert

    files = sorted(p for p in src.iterdir() if p.is_file())
    key = hashlib.sha256(str(src.resolve()).encode())
    for p in files:
        st = p.stat()
        key.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    dst = cache_home() / "converted" / f"{Path(source_name).name}-{key.hexdigest()[:16]}"
    if (dst / "config.json").is_file():
        return dst
    print(f"[INFO] Converting {source_name} to MLX in {dst} (once)", file=sys.stderr)
    # convert() reports on stdout, which carries the generated text here.
    with contextlib.redirect_stdout(sys.stderr):
        try:
            convert(source_name, dst)
        except ValueError:
            if not (dst / "config.json").is_file():  # another process may have won the race
                raise
    return dst


def resolve_model(spec=None, revision=None):
    """The directory mlx_ksa.load reads for --model `spec`: the default model
    for None, a local directory, a hub download, or a converted copy."""
    if spec is None:
        if not (DEFAULT_MODEL / "config.json").is_file():
            raise ValueError(f"the default model is missing from the package ({DEFAULT_MODEL}): pass --model")
        return DEFAULT_MODEL
    path = local_path(spec)
    if path is not None:
        if not path.is_dir():
            raise ValueError(f"model {spec} is not a directory")
        return _converted(path, str(path)) if needs_conversion(path) else path
    from .convert import HUB_PATTERNS
    from mlx_lm.utils import _download

    try:
        path = _download(str(spec), revision=revision, allow_patterns=HUB_PATTERNS)  # never *.py
    except Exception as e:  # hub errors come in many classes; one line is what matters
        raise ValueError(f"cannot fetch model {spec} from the Hugging Face hub ({type(e).__name__})") from None
    return _converted(path, str(spec)) if needs_conversion(path, hub=True) else path


def load_model_and_tokenizer(spec=None, adapter_path=None, tokenizer_config=None, lazy=False):
    """(model, tokenizer, directory) for --model `spec` (see resolve_model)."""
    path = resolve_model(spec)
    if adapter_path is not None and not Path(adapter_path).is_dir():  # not the model's fault
        raise ValueError(f"--adapter-path {adapter_path} does not exist")
    try:
        model, tokenizer = load(str(path), tokenizer_config=tokenizer_config, adapter_path=adapter_path,
                                lazy=lazy)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"cannot load model {spec or path}: {e}") from None
    return model, tokenizer, path


def load_any(spec, dense=False, **kwargs):
    """(model, tokenizer) for a KSA model through mlx_ksa.load, and for any
    other model (or with dense) through mlx_lm.load: a draft model or a
    baseline need not be KSA."""
    path = resolve_model(spec)
    if is_ksa_checkpoint(path) and not dense:
        return load(str(path), **kwargs)
    from mlx_lm.utils import load as mlx_lm_load

    with weight_read_errors(path):
        return mlx_lm_load(str(path), **kwargs)


# mlx-lm's speculative decoding quantizes a copy of the cache list: the caches
# the caller holds (for statistics, or a server's prompt cache) would go stale.
DRAFT_KV_BITS_ERROR = ("--draft-model cannot be combined with --kv-bits: "
                       "mlx-lm quantizes copies of the caches then")


def check_kv_group_size(model, kv_bits, group_size):
    """mx.quantize groups the head dimension: refuse before generating, not at --quantized-kv-start."""
    if kv_bits is not None and model.args.head_dim % group_size:
        raise ValueError(f"--kv-group-size {group_size} does not divide the model's head_dim "
                         f"{model.args.head_dim}")


def check_draft_tokens(n, *models, name="--num-draft-tokens"):
    """Refuses drafting more tokens than the KSA models' caches can take back:
    a rejected draft is trimmed off, and KSACache.trim undoes one chunk at most."""
    limit = min((m.args.summary_chunk_size for m in models if isinstance(m, Model)), default=n)
    if n > limit:
        raise ValueError(f"{name} {n} is more than {limit}, the summary chunk size: a KSA cache "
                         "can take back rejected draft tokens only within one chunk")


def load_draft_model(spec, tokenizer):
    """The --draft-model, checked as mlx_lm.generate checks it: the same vocabulary."""
    try:
        draft, draft_tokenizer = load_any(spec)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"cannot load draft model {spec}: {e}") from None
    if draft_tokenizer.vocab_size != tokenizer.vocab_size:
        raise ValueError(f"draft model {spec} has a vocabulary of {draft_tokenizer.vocab_size} tokens, the "
                         f"model {tokenizer.vocab_size}: speculative decoding needs the model's tokenizer")
    return draft


# -- KV cache statistics --------------------------------------------------------
def kv_cache_stats(model, cache):
    """(text tokens, bytes the KSA cache holds, bytes mlx-lm's dense KVCache
    of the same model shape and dtype would hold for those tokens)."""
    cache = cache[: len(model.layers)]  # a draft model's caches follow the model's
    tokens = cache[0].offset if cache else 0
    nbytes = sum(c.nbytes for c in cache)
    keys = next((c.keys for c in cache if getattr(c, "keys", None) is not None), None)
    if isinstance(keys, tuple):  # quantized: (packed, scales, biases); scales keep the dense dtype
        keys = keys[1]
    itemsize = keys.dtype.size if keys is not None else 2
    batch = keys.shape[0] if keys is not None else 1
    # The heads this process holds: a sharded model keeps 1/N of them.
    heads = sum(layer.self_attn.n_kv_heads for layer in model.layers)
    # Like for like: nbytes counts growth steps, and mlx-lm's dense KVCache grows in steps too.
    slots = -(-tokens // KVCache.step) * KVCache.step
    dense = 2 * heads * model.args.head_dim * slots * itemsize * batch
    return tokens, nbytes, dense


def format_kv_stats(model, cache):
    tokens, ksa, dense = kv_cache_stats(model, cache)
    ratio = f" ({dense / ksa:.2f}x the KSA cache)" if ksa else ""
    # Both are what the buffers hold, growth steps included: short contexts
    # pay for KSA's fixed regions first, long ones gain ~k/S on most layers.
    return (f"KV cache: {ksa / 1e6:.3f} MB for {tokens} tokens; "
            f"a dense model of this shape: {dense / 1e6:.3f} MB{ratio}")


# -- progress ------------------------------------------------------------------
class PrefillProgress:
    """A one-line prefill progress bar on stderr, drawn only when stderr is a
    terminal and the prompt needs more than one prefill step."""

    def __init__(self, step_size, enabled=True, width=30):
        self.step_size, self.width = step_size, width
        self.enabled = enabled and sys.stderr.isatty()
        self.start, self.drawn = None, False

    def __call__(self, done, total):
        if not self.enabled or total <= self.step_size:
            return
        if self.start is None:
            self.start = time.perf_counter()
        if done >= total:
            if self.drawn:
                sys.stderr.write("\r\033[K")
                sys.stderr.flush()
                self.drawn = False
            return
        fill = self.width * done // max(total, 1)
        rate = done / max(time.perf_counter() - self.start, 1e-9)
        sys.stderr.write(f"\rPrefill [{'#' * fill}{'.' * (self.width - fill)}] "
                         f"{done}/{total} tokens, {rate:.0f} tok/s\033[K")
        sys.stderr.flush()
        self.drawn = True


# -- prompt caches ----------------------------------------------------------------
def load_ksa_prompt_cache(file, model):
    """(cache, metadata) from a prompt-cache file made for `model`."""
    if not Path(file).is_file():
        raise ValueError(f"prompt cache file {file} does not exist")
    try:
        cache, metadata = load_prompt_cache(str(file), return_metadata=True)
    except Exception as e:  # mx.load and the unflattening raise many kinds on a corrupt file
        raise ValueError(f"prompt cache file {file} is unreadable or corrupt ({type(e).__name__})") from None
    expected = model.make_cache()
    # A quantized KSA cache (--kv-bits) fits the model as well.
    shape = lambda c: (isinstance(c, KSACache), getattr(c, "chunk", None), getattr(c, "summaries", None),
                       getattr(c, "window", None))
    if len(cache) != len(expected) or any(shape(a) != shape(b) for a, b in zip(cache, expected)):
        raise ValueError(f"prompt cache file {file} was not made for this model (layers or KSA windows differ)")
    return cache, metadata


def _apply_template(tokenizer, messages, prefix_cached, save, template_kwargs):
    """The chat-templated prompt, as mlx_lm.generate / mlx_lm.cache_prompt build it."""
    if save:  # what mlx_lm.cache_prompt stores: the open user turn
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False,
                                             continue_final_message=True, **template_kwargs)
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                           **template_kwargs)
    if prefix_cached:
        # The cache holds everything up to the user's text: keep what follows it.
        messages[-1]["content"] = "<query>"
        probe = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                              **template_kwargs)
        prompt = prompt[probe.index("<query>"):]
    return prompt


# -- command line -----------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit status 2, no usage dump
        self.exit(2, f"error: {message}\n")


def _positive(kind):
    def parse(s):
        v = kind(s)
        if v <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {s}")
        return v
    parse.__name__ = kind.__name__  # argparse names the type in its errors
    return parse


def _json_object(s):
    v = json.loads(s)
    if not isinstance(v, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {s}")
    return v


_json_object.__name__ = "JSON object"


def setup_arg_parser():
    p = _Parser(prog="python -m mlx_ksa.generate", description="Generate text with a KSA model.")
    p.add_argument("--model", help="local model directory or Hugging Face repo id; an original PyTorch KSA "
                   "checkpoint is converted once. Default: the small model shipped in mlx_ksa/default_model")
    p.add_argument("--adapter-path", help="LoRA adapters from `python -m mlx_ksa.train finetune`")
    p.add_argument("--prompt", "-p", default=None,
                   help=f"the prompt ('-' reads stdin; default {DEFAULT_PROMPT!r})")
    p.add_argument("--system-prompt", help="system prompt for the chat template")
    p.add_argument("--prefill-response", help="start of the response, continued by the model")
    p.add_argument("--max-tokens", "-m", type=_positive(int), default=DEFAULT_MAX_TOKENS,
                   help=f"maximum tokens to generate (default {DEFAULT_MAX_TOKENS})")
    p.add_argument("--temp", type=float, default=0.0, help="sampling temperature (0: greedy)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling top-p (1: off)")
    p.add_argument("--min-p", type=float, default=0.0, help="min-p sampling (0: off)")
    p.add_argument("--top-k", type=int, default=0, help="top-k sampling (0: off)")
    p.add_argument("--min-tokens-to-keep", type=_positive(int), default=1, help="tokens min-p always keeps")
    p.add_argument("--seed", type=int, default=None, help="PRNG seed")
    p.add_argument("--ignore-chat-template", action="store_true", help="use the raw prompt, no chat template")
    p.add_argument("--chat-template-config", type=_json_object, default={},
                   help="JSON object of extra arguments for apply_chat_template")
    p.add_argument("--extra-eos-token", nargs="+", default=(), help="more tokens that end generation")
    p.add_argument("--prompt-cache-file", help="a prompt cache saved with --save-prompt-cache: the prompt "
                   "continues what it holds")
    p.add_argument("--save-prompt-cache", metavar="FILE", help="process the prompt, save its cache to FILE "
                   "and exit (what mlx_lm.cache_prompt does)")
    p.add_argument("--prefill-step-size", type=_positive(int), default=DEFAULT_PREFILL_STEP_SIZE,
                   help=f"prompt tokens per prefill step (default {DEFAULT_PREFILL_STEP_SIZE})")
    p.add_argument("--draft-model", help="a smaller model with the same tokenizer for speculative decoding")
    p.add_argument("--num-draft-tokens", type=_positive(int), default=DEFAULT_NUM_DRAFT_TOKENS,
                   help="tokens the draft model proposes per step (at most the summary chunk size; "
                   f"default {DEFAULT_NUM_DRAFT_TOKENS})")
    p.add_argument("--kv-bits", type=int, choices=(4, 8), help="quantize the KV cache to this many bits")
    p.add_argument("--kv-group-size", type=int, choices=(32, 64, 128), default=64,
                   help="group size of the KV cache quantization (default 64)")
    p.add_argument("--quantized-kv-start", type=int, default=DEFAULT_QUANTIZED_KV_START,
                   help=f"with --kv-bits, quantize once the cache holds this many tokens "
                   f"(default {DEFAULT_QUANTIZED_KV_START})")
    p.add_argument("--verbose", type=str2bool, nargs="?", const=True, default=True,
                   help="print the statistics (default true; 'false' prints the text only)")
    p.add_argument("--quiet", "-q", action="store_true",
                   help="only the generated text: no statistics, no progress bar")
    return p


def _check_args(a):
    if a.temp < 0:
        raise ValueError(f"--temp must be >= 0, got {a.temp}")
    if not 0 < a.top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {a.top_p}")
    if not 0 <= a.min_p <= 1:
        raise ValueError(f"--min-p must be in [0, 1], got {a.min_p}")
    if a.top_k < 0:
        raise ValueError(f"--top-k must be >= 0, got {a.top_k}")
    if a.prompt_cache_file and (a.save_prompt_cache or a.prefill_response is not None):
        raise ValueError("--prompt-cache-file cannot be combined with --save-prompt-cache or --prefill-response")
    if a.draft_model and (a.prompt_cache_file or a.save_prompt_cache):
        raise ValueError("--draft-model cannot be combined with prompt cache files: they hold no draft model cache")
    if a.draft_model and a.kv_bits is not None:
        raise ValueError(DRAFT_KV_BITS_ERROR)


def run(a):
    _check_args(a)
    group = mx.distributed.init()
    if group.size() > 1 and (a.adapter_path or a.draft_model or a.prompt_cache_file or a.save_prompt_cache):
        raise ValueError("adapters, draft models and prompt cache files are not supported in distributed mode")
    rank0 = group.rank() == 0
    verbose = a.verbose and not a.quiet and rank0
    cache, metadata = None, {}
    model_spec = a.model
    if a.prompt_cache_file and not Path(a.prompt_cache_file).is_file():
        raise ValueError(f"prompt cache file {a.prompt_cache_file} does not exist")
    if a.prompt_cache_file and model_spec is None:
        # As mlx_lm.generate: the cache names the model it was made with.
        try:
            _, metadata = load_prompt_cache(a.prompt_cache_file, return_metadata=True)
            model_spec = json.loads(metadata.get("mlx_ksa", "{}")).get("model")
        except Exception:
            pass  # a corrupt file is reported below, once the model is known
    # As mlx_lm.utils.sharded_load: load lazily, shard, then read only this rank's part.
    model, tokenizer, path = load_model_and_tokenizer(model_spec, a.adapter_path, lazy=group.size() > 1)
    if group.size() > 1:
        model.shard(group)
        mx.eval(model.parameters())
        mx.eval(mx.distributed.all_sum(mx.array(1.0), stream=mx.cpu))  # all ranks loaded: none times out
    check_kv_group_size(model, a.kv_bits, a.kv_group_size)
    draft = None
    if a.draft_model:
        draft = load_draft_model(a.draft_model, tokenizer)
        check_draft_tokens(a.num_draft_tokens, model, draft)
    for token in a.extra_eos_token:
        tokenizer.add_eos_token(token)
    if a.prompt_cache_file:
        cache, metadata = load_ksa_prompt_cache(a.prompt_cache_file, model)

    prompt = DEFAULT_PROMPT if a.prompt is None else a.prompt.replace("\\n", "\n").replace("\\t", "\t")
    if prompt == "-":
        prompt = sys.stdin.read()
    use_template = not a.ignore_chat_template and tokenizer.has_chat_template
    if a.prompt_cache_file:
        # The file records whether its prefix was templated: follow it.
        use_template = use_template and json.loads(metadata.get("mlx_ksa", "{}")).get("chat_template", True)
    if use_template:
        messages = [{"role": "system", "content": a.system_prompt}] if a.system_prompt is not None else []
        messages.append({"role": "user", "content": prompt})
        if a.prefill_response is not None and not a.save_prompt_cache:
            messages.append({"role": "assistant", "content": a.prefill_response})
            prompt = tokenizer.apply_chat_template(messages, tokenize=False, continue_final_message=True,
                                                   **a.chat_template_config)
        else:
            prompt = _apply_template(tokenizer, messages, cache is not None, a.save_prompt_cache,
                                     a.chat_template_config)
    elif a.prefill_response is not None:
        prompt += a.prefill_response
    ids = tokenizer.encode(prompt, add_special_tokens=not use_template and cache is None)
    if not ids:
        raise ValueError("the prompt is empty")

    progress = PrefillProgress(a.prefill_step_size, enabled=not a.quiet and rank0)
    if a.save_prompt_cache:
        return save_cache(a, model, tokenizer, ids, model_spec, use_template, progress, verbose)

    sampler = make_sampler(a.temp, a.top_p, a.min_p, a.min_tokens_to_keep, top_k=a.top_k)
    # Seeded after loading (building the model draws random initial weights),
    # so a seed gives what the Python API gives after mx.random.seed.
    if a.seed is not None:
        mx.random.seed(a.seed)
    elif group.size() > 1:
        # The ranks sample from the same logits: they must draw the same numbers too (as mlx_lm.server).
        mx.random.seed(mx.distributed.all_sum(mx.random.state[0]).view(mx.uint64).item())
    if cache is None:
        cache = model.make_cache() + (make_prompt_cache(draft) if draft is not None else [])
    if verbose:
        print("=" * 10)
    response, text = None, ""
    for response in stream_generate(model, tokenizer, ids, max_tokens=a.max_tokens, sampler=sampler,
                                    prompt_cache=cache, prefill_step_size=a.prefill_step_size,
                                    prompt_progress_callback=progress, draft_model=draft,
                                    num_draft_tokens=a.num_draft_tokens, kv_bits=a.kv_bits,
                                    kv_group_size=a.kv_group_size,
                                    quantized_kv_start=a.quantized_kv_start):
        if rank0:
            print(response.text, end="", flush=True)
        text += response.text
    if rank0:
        print()
    if verbose:
        print("=" * 10)
        if not text:
            print("No text generated for this prompt")
        print(f"Prompt: {response.prompt_tokens} tokens, {response.prompt_tps:.3f} tokens-per-sec")
        print(f"Generation: {response.generation_tokens} tokens, {response.generation_tps:.3f} tokens-per-sec")
        print(f"Peak memory: {response.peak_memory:.3f} GB")
        kv = format_kv_stats(model, cache)
        print(kv if group.size() == 1 else f"{kv}; on each of {group.size()} ranks (sharded heads)")
    return text


def save_cache(a, model, tokenizer, ids, model_spec, use_template, progress, verbose):
    """Prefills `ids` and writes the cache with what a later run needs to continue it."""
    cache = model.make_cache()
    tic = time.perf_counter()
    # generate_step with max_tokens=0 prefills the whole prompt, as mlx_lm.cache_prompt does.
    from mlx_lm.generate import generate_step

    for _ in generate_step(mx.array(ids), model, max_tokens=0, prompt_cache=cache,
                           prefill_step_size=a.prefill_step_size, prompt_progress_callback=progress,
                           kv_bits=a.kv_bits, kv_group_size=a.kv_group_size,
                           quantized_kv_start=a.quantized_kv_start):
        pass
    mx.eval([c.state[:2] for c in cache])
    dt = time.perf_counter() - tic
    spec = str(Path(model_spec).resolve()) if model_spec and Path(model_spec).exists() else model_spec
    metadata = {"model": str(spec or "default"),
                "mlx_ksa": json.dumps({"model": spec, "chat_template": use_template, "tokens": len(ids)})}
    out = Path(a.save_prompt_cache)
    if out.suffix != ".safetensors":
        raise ValueError(f"--save-prompt-cache needs a .safetensors file name, got {out}")
    try:
        save_prompt_cache(str(out), cache, metadata)
    except Exception as e:
        raise ValueError(f"cannot write prompt cache {out}: {e}") from None
    if verbose:
        print(f"Prompt: {len(ids)} tokens, {len(ids) / dt:.3f} tokens-per-sec")
        print(f"Peak memory: {mx.get_peak_memory() / 1e9:.3f} GB")
        print(format_kv_stats(model, cache))
        print(f"Saved {out}")


def run_cli(command, *args):
    """Runs a command line's `command`: the exit status, with the errors a
    user can fix (ValueError, OSError) on one line of stderr."""
    try:
        command(*args)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def main(argv=None):
    return run_cli(run, setup_arg_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
