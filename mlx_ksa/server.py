"""An OpenAI-compatible HTTP server for KSA models: mlx_lm.server, unchanged,
with mlx-ksa's loader.

    python -m mlx_ksa.server [--model DIR_OR_REPO] [--host 127.0.0.1] [--port 8080]

Every mlx_lm.server flag applies (sampling defaults, --prompt-cache-size,
--prompt-cache-bytes, --chat-template, ...). With no --model it serves the
small model shipped in mlx_ksa/default_model; `--port 0` picks a free port,
which the log reports. Endpoints: POST /v1/chat/completions,
/v1/completions, GET /v1/models, /health.

What changes from mlx-lm: models load with `mlx_ksa.load` (PyTorch KSA
checkpoints are converted once, see mlx_ksa.generate.resolve_model; a
--draft-model that is not KSA loads with mlx_lm.load), --num-draft-tokens
(and a request's num_draft_tokens) is at most the summary chunk size,
--draft-model does not combine with --kv-bits, and prompt caches are only
reused when they hold exactly the tokens they stand for (a KSA cache cannot
always be trimmed back to a shorter prefix). Concurrent requests are batched
by mlx-lm's BatchGenerator over BatchKSACache, as mlx_lm.server batches (not
with --kv-bits, a draft model or a request seed, which mlx-lm serves one at
a time).
"""

import copy
import logging
import socket
import sys
from http.server import ThreadingHTTPServer

import mlx_lm.server as mlx_server
from mlx_lm.models.cache import LRUPromptCache, can_trim_prompt_cache, trim_prompt_cache

from .generate import (DEFAULT_MODEL, DRAFT_KV_BITS_ERROR, check_draft_tokens, check_kv_group_size,
                       format_kv_stats, load_any, run_cli)
from .model import Model


def _load(path_or_repo, adapter_path=None, tokenizer_config=None, return_config=False, **_):
    """mlx_lm.utils.load's signature over mlx_ksa.load, for the model and the
    draft model (trust_remote_code is ignored: no code from a checkpoint
    ever runs)."""
    return load_any(path_or_repo, tokenizer_config=tokenizer_config, adapter_path=adapter_path,
                    return_config=return_config)


class ModelProvider(mlx_server.ModelProvider):
    def __init__(self, cli_args):
        if cli_args.draft_model and cli_args.kv_bits is not None:
            raise ValueError(DRAFT_KV_BITS_ERROR)
        cli_args.model = cli_args.model or str(DEFAULT_MODEL)
        super().__init__(cli_args)
        if self.is_distributed:
            raise ValueError("mlx_ksa.server runs on one machine (no distributed serving)")
        # Load now, so that a bad --model is a one-line error before serving.
        self.load_default()
        check_kv_group_size(self.model, cli_args.kv_bits, cli_args.kv_group_size)
        if self.draft_model is not None:
            check_draft_tokens(cli_args.num_draft_tokens, self.model, self.draft_model)


class PromptCache(LRUPromptCache):
    """mlx-lm's LRU prompt cache, for caches that trim only part way.

    mlx-lm trims a cached longer sequence back to the shared prefix and
    assumes the trim succeeds; KSACache trims only within its last chunks
    (and raises past them). This lookup takes the longer entry only when
    the trim is exact, and otherwise falls back to the longest cached
    prefix, as for a cache that cannot trim at all.
    """

    def fetch_nearest_cache(self, model, tokens):
        result = self._trie.search(model, tokens)
        short = len(result.shorter) if result.shorter is not None else 0
        cache, rest = None, tokens
        for key in (result.exact, result.longer):
            if key is None:
                continue
            # At least one prompt token must be left to prefill.
            prefix = len(tokens) - 1 if key is result.exact else min(len(tokens) - 1, result.common_prefix)
            if prefix > short:
                cache = _trimmed(self._trie.get(result.model, key).prompt_cache, len(key) - prefix)
                if cache is not None:
                    cache, rest = cache, tokens[prefix:]
                    break
        if cache is None and short:
            cache, rest = copy.deepcopy(self._trie.get(result.model, result.shorter).prompt_cache), tokens[short:]
        if cache is not None:
            logging.info(f"KSA prompt cache: reusing {len(tokens) - len(rest)} of {len(tokens)} prompt tokens")
        return cache, rest

    def insert_cache(self, model, tokens, prompt_cache, **kwargs):
        super().insert_cache(model, tokens, prompt_cache, **kwargs)
        provider = _provider
        if provider is not None and isinstance(provider.model, Model):
            logging.info(f"KSA prompt cache: stored {len(tokens)} tokens; "
                         + format_kv_stats(provider.model, prompt_cache))


class APIHandler(mlx_server.APIHandler):
    def validate_model_parameters(self):
        super().validate_model_parameters()
        provider = self.response_generator.model_provider
        if provider.draft_model is not None or self.requested_draft_model != "default_model":
            check_draft_tokens(self.num_draft_tokens, provider.model, provider.draft_model,
                               name="num_draft_tokens")

    def handle_models_request(self):
        # The served model only: mlx-lm's listing scans the hub cache for any
        # MLX model (most are not KSA) and fails when that cache is absent.
        self._set_completion_headers(200)
        self.end_headers()
        model = self.response_generator.cli_args.model
        data = [{"id": model, "object": "model", "created": self.created, "owned_by": "mlx_ksa"}]
        self.wfile.write(mlx_server.json.dumps({"object": "list", "data": data}).encode())
        self.wfile.flush()


def _trimmed(cache, n):
    """A copy of `cache` with its last n tokens removed, or None if it cannot be done exactly."""
    if n == 0:
        return copy.deepcopy(cache)
    if not can_trim_prompt_cache(cache):
        return None
    cache = copy.deepcopy(cache)
    target = cache[0].offset - n
    try:
        trim_prompt_cache(cache, n)
    except ValueError:
        return None
    return cache if all(c.offset == target for c in cache) else None


_provider = None


def run(host, port, model_provider, server_class=ThreadingHTTPServer, handler_class=APIHandler):
    """mlx_lm.server.run with the KSA prompt cache and handler; logs the bound port."""
    global _provider
    if not 0 <= port <= 65535:
        raise ValueError(f"--port must lie in 0..65535 (0: any free port), got {port}")
    _provider = model_provider
    prompt_cache = PromptCache(model_provider.cli_args.prompt_cache_size)
    if model_provider.cli_args.prompt_cache_bytes is not None:
        prompt_cache.max_bytes = model_provider.cli_args.prompt_cache_bytes
    response_generator = mlx_server.ResponseGenerator(model_provider, prompt_cache)
    fingerprint = mlx_server.get_system_fingerprint()
    # As mlx-lm: the address family follows the host (an IPv6 host works).
    family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    server_class = type("KSAHTTPServer", (server_class,), {"address_family": family})
    httpd = server_class(address, lambda *a, **kw: handler_class(
        response_generator, *a, system_fingerprint=fingerprint, **kw))
    bound_host, bound_port = httpd.server_address[:2]
    logging.warning("mlx_ksa.server, like mlx_lm.server, has only basic security checks: not for production")
    # As mlx_lm.server decides: a draft model or --kv-bits serves requests one at a time.
    batching = model_provider.is_batchable and model_provider.cli_args.kv_bits is None
    logging.info(f"mlx_ksa.server serving {model_provider.cli_args.model} at http://{bound_host}:{bound_port} "
                 f"({'concurrent requests batched' if batching else 'one request at a time'})")
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()
        response_generator.stop_and_join()


def main(argv=None):
    """Runs mlx_lm.server's command line with the KSA model provider, loader and run."""
    argv = sys.argv[1:] if argv is None else list(argv)
    mlx_server.load = _load
    mlx_server.ModelProvider = ModelProvider
    mlx_server.run = run
    sys.argv = ["python -m mlx_ksa.server", *argv]
    return run_cli(mlx_server.main)


if __name__ == "__main__":
    sys.exit(main())
