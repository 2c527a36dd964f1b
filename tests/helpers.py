"""Small builders the tests share: tiny KSA checkpoints and a tokenizer."""

import json
import string

import mlx.core as mx
import numpy as np

from tests import torch_reference as ref

CHARS = string.ascii_letters + string.digits + string.punctuation + " \n"


def write_tokenizer(path, vocab):
    """A character-level HF tokenizer whose ids stay below `vocab`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tokens = ["<unk>", "<eos>"] + list(CHARS)[: vocab - 2]
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<eos>", "unk_token": "<unk>",
        "chat_template": "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant: {% endif %}",
    }))


def tiny_checkpoint(path, seed=0, tokenizer=True, **overrides):
    """An official-format checkpoint of a random tiny KSA model; (path, cfg, torch weights)."""
    cfg = ref.make_config(**overrides)
    weights = ref.random_weights(cfg, seed=seed)
    ref.save_checkpoint(path, cfg, weights)
    if tokenizer:
        write_tokenizer(path, cfg["summary_token_begin"])
    return path, cfg, weights


def random_ids(n, vocab, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, n).astype(np.int32)


def run_steps(model, ids, sizes, cache):
    """Logits of `ids` fed through `cache` in pieces of the given sizes."""
    out, a = [], 0
    for s in sizes:
        out.append(np.array(model(mx.array(ids[a : a + s])[None], cache=cache)[0]))
        a += s
    assert a == len(ids)
    return np.concatenate(out)
