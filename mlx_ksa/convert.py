"""Convert KSA checkpoints to mlx-ksa model directories, optionally quantized.

    python -m mlx_ksa.convert --hf-path SRC --mlx-path DST [--dtype bfloat16]
        [-q --q-bits 4 --q-group-size 64] [--quant-predicate mixed_4_6] [--overwrite]

Sources: the official Hugging Face layout (safetensors, single or sharded), PyTorch
pickles (`pytorch_model.bin`, sharded `.bin` with its index, one raw `.pt`/`.pth`
state dict) read by `torch_pickle` without torch and without running pickle code,
and Muse training-framework names (KSA-SPEC section 4). Every source needs the
config.json with the `summary_*` keys.

The output is what `mlx_lm.convert` writes (it reuses mlx-lm's `quantize_model`,
`save_model`, `save_config` and mixed recipes): safetensors shards of at most
5 GB with `model.safetensors.index.json`, config.json (with `quantization` when
quantized), tokenizer and generation-config files, a model card. Quantization
touches the linear layers and the text embedding only: norms and the summary
embedding rows (a plain array, kept apart from the token table) stay exact.

Weights are read lazily and written one shard at a time, so conversion holds
about one output shard in memory; a torch checkpoint is first copied to
safetensors on disk beside DST (its size in extra disk, 1 GB in memory). Everything
is written into a temporary directory beside DST that is renamed at the end:
a failed or interrupted conversion leaves no DST and never writes into SRC.
"""

import argparse
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_map
from mlx_lm.convert import MODEL_CONVERSION_DTYPES, QUANT_RECIPES, mixed_quant_predicate_builder
from mlx_lm.utils import quantize_model, save_config, save_model

from .model import Model, ModelArgs
from .torch_pickle import open_torch_checkpoint
from .utils import local_path

Q_BITS = (2, 3, 4, 6, 8)
Q_GROUP_SIZES = (32, 64, 128)
# A torch checkpoint is first copied into safetensors files of about this size,
# so that it is then read lazily like any other source, one piece in memory.
STAGE_BYTES = 1 << 30
# Never "*.py": the official config's auto_map points at code this package never runs.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.jinja"]
# Fetched only from a repo without safetensors, so a repo with both formats is downloaded once.
HUB_PICKLES = ["*.bin", "*.pt", "*.pth"]
TOKENIZER_FILES = [
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "tokenizer.model", "*.tiktoken", "chat_template.jinja",
    "chat_template.json", "generation_config.json",
]
# Muse -> HF names, one dotted component at a time, plus two whole names.
MUSE_PARTS = {
    "tok_embeddings": "embed_tokens", "attn": "self_attn", "output_proj": "o_proj",
    "sa_norm": "input_layernorm", "sa_norm_summary": "input_layernorm_summary",
    "mlp_norm": "post_attention_layernorm", "w1": "gate_proj", "w3": "up_proj", "w2": "down_proj",
    "scale": "weight",
}
MUSE_NAMES = {"summary_embedding.weight": "model.summary_embedding", "model.output.weight": "lm_head.weight"}


def _fetch(hf_path, revision):
    """(local directory, hub repo id or None)."""
    path = local_path(hf_path)
    if path is not None:
        if not path.is_dir():
            raise ValueError(f"{path} is not a directory (give the model directory, with its config.json)")
        return path, None
    from huggingface_hub import snapshot_download

    try:
        path = Path(snapshot_download(hf_path, revision=revision, allow_patterns=HUB_PATTERNS))
        if not list(path.glob("*.safetensors")):
            path = Path(snapshot_download(hf_path, revision=revision, allow_patterns=HUB_PICKLES))
    except Exception as e:
        raise ValueError(f"{hf_path} is neither a local directory nor a reachable Hugging Face repo "
                         f"({type(e).__name__})") from None
    return path, hf_path


def _read_config(src):
    file = src / "config.json"
    if not file.is_file():
        raise ValueError(f"{src} has no config.json: a KSA checkpoint needs its config (with the summary_* keys)"
                         " beside the weights")
    try:
        config = json.loads(file.read_text())
    except ValueError as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{file} does not hold a JSON object")
    if "quantization" in config or "quantization_config" in config:
        raise ValueError(f"{src} is already quantized: convert from the float checkpoint")
    try:
        args = ModelArgs.from_dict(config)
    except ValueError as e:
        raise ValueError(f"{file}: {e}") from None
    return config, args


def _mx_load(file):
    try:
        return mx.load(str(file))
    except (RuntimeError, ValueError, OSError) as e:
        raise ValueError(f"{file}: unreadable safetensors file ({e})") from None


def _stage_torch(checkpoint_path, staging):
    """The torch checkpoint copied into safetensors files under `staging`."""
    files, chunk = [], {}

    def flush():
        if chunk:
            files.append(staging / f"stage-{len(files):05d}.safetensors")
            mx.save_safetensors(str(files[-1]), chunk)
            chunk.clear()

    with open_torch_checkpoint(checkpoint_path) as checkpoint:
        for name in checkpoint:
            chunk[name] = checkpoint[name]
            if sum(a.nbytes for a in chunk.values()) >= STAGE_BYTES:
                flush()
        flush()
    return files


def _shards(index):
    """The shard files a shard index names, all present."""
    try:
        names = set(json.loads(index.read_text())["weight_map"].values())
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{index}: not a shard index ({type(e).__name__}: {e})") from None
    missing = sorted(n for n in names if not (index.parent / n).is_file())
    if missing:
        raise ValueError(f"{index} lists {missing[0]}, which is missing")
    return [index.parent / n for n in sorted(names)]


def _weight_files(src, staging):
    """The safetensors files holding the source weights (torch ones staged first)."""
    if (src / "model.safetensors.index.json").is_file():
        return _shards(src / "model.safetensors.index.json")
    files = sorted(src.glob("model*.safetensors"))
    if files:
        return files
    if (src / "pytorch_model.bin.index.json").is_file():
        _shards(src / "pytorch_model.bin.index.json")
        return _stage_torch(src, staging())
    if (src / "pytorch_model.bin").is_file():
        return _stage_torch(src, staging())
    pickles = sorted(p for pattern in ("*.bin", "*.pt", "*.pth") for p in src.glob(pattern))
    if len(pickles) > 1:
        raise ValueError(f"{src} holds several checkpoint files ({', '.join(p.name for p in pickles)}): "
                         "keep one, or add a pytorch_model.bin.index.json")
    if pickles:
        return _stage_torch(pickles[0], staging())
    raise ValueError(f"{src} has no model*.safetensors, pytorch_model.bin or *.pt/*.pth checkpoint")


def _load_weights(files):
    weights = {}
    for file in files:
        for name, array in _mx_load(file).items():
            if name in weights:
                raise ValueError(f"{file}: weight {name} appears in two files")
            weights[name] = array
    return weights


def _from_muse(weights, args):
    """Muse names -> HF names, and {HF name: Muse name} for error messages."""
    out, renamed = {}, {}
    for name, w in weights.items():
        hf = MUSE_NAMES.get(name) or ".".join(MUSE_PARTS.get(p, p) for p in name.split("."))
        if hf in out:
            raise ValueError(f"weights {renamed.get(hf, hf)} and {name} both map to {hf}")
        out[hf] = w
        if hf != name:
            renamed[hf] = name
    weights = out
    # Muse keeps the summary rows in their own tensor; its token table may then have
    # padding rows past the text vocabulary. Without that tensor the summary rows
    # are in the table, where sanitize finds them.
    if "model.embed_tokens.weight" in weights and "model.summary_embedding" in weights:
        weights["model.embed_tokens.weight"] = weights["model.embed_tokens.weight"][: args.summary_token_begin]
    return weights, renamed


def _check_weights(weights, model, renamed):
    """Every model parameter present once, with its shape; nothing else."""
    expected = dict(tree_flatten(model.parameters()))
    label = lambda n: f"{n} (Muse {renamed[n]})" if n in renamed else n
    for name, w in weights.items():
        if name not in expected:
            raise ValueError(f"unexpected weight {label(name)} with shape {tuple(w.shape)}: "
                             "not a parameter of the model this config describes")
        want = tuple(expected[name].shape)
        if tuple(w.shape) != want:
            raise ValueError(f"weight {label(name)} has shape {tuple(w.shape)}, expected {want}")
        if not mx.issubdtype(w.dtype, mx.floating):
            raise ValueError(f"weight {label(name)} has dtype {w.dtype}, expected a floating-point type")
    missing = [n for n in expected if n not in weights]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ValueError(f"missing weight {missing[0]} with shape {tuple(expected[missing[0]].shape)}{more}")


def _copy_tokenizer(src, dst):
    for pattern in TOKENIZER_FILES:
        for file in src.glob(pattern):
            shutil.copy(file, dst)


def _model_card(path, name, source, settings):
    from . import __version__

    base = f"base_model: {source}\n" if source else ""
    (path / "README.md").write_text(
        f"---\nlibrary_name: mlx\npipeline_tag: text-generation\ntags: [mlx, ksa]\n{base}---\n\n"
        f"# {name}\n\n"
        f"Kwai Summary Attention model converted to MLX with mlx-ksa {__version__} "
        f"from `{source or 'a local checkpoint'}`: {settings}.\n\n"
        "```python\nimport mlx_ksa\nfrom mlx_lm import generate\n\n"
        f'model, tokenizer = mlx_ksa.load("{name}")\n'
        'print(generate(model, tokenizer, "Hello", max_tokens=32))\n```\n'
    )


def _settings(dtype, config, recipe):
    q = config.get("quantization")
    if q is None:
        return f"{dtype}, not quantized"
    mixed = f", mixed recipe {recipe}" if recipe else ""
    return f"{dtype}, quantized affine {q['bits']}-bit, group size {q['group_size']}{mixed}"


def _publish(tmp, dst, overwrite):
    """Move the finished `tmp` to `dst`, replacing an existing dst only with --overwrite."""
    if not overwrite or not (dst.exists() or dst.is_symlink()):
        # rename fails on a dst created meanwhile (unless it is an empty directory).
        tmp.rename(dst)
        return
    old = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}.old-"))
    dst.rename(old / dst.name)
    try:
        tmp.rename(dst)
    except BaseException:
        (old / dst.name).rename(dst)
        old.rmdir()
        raise
    replaced = old / dst.name
    # A symlink or file is removed itself, never what a link points to.
    if replaced.is_dir() and not replaced.is_symlink():
        shutil.rmtree(replaced)
    else:
        replaced.unlink()
    old.rmdir()


def convert(hf_path, mlx_path="mlx_model", quantize=False, q_group_size=None, q_bits=None,
            dtype=None, quant_predicate=None, revision=None, overwrite=False):
    """Convert the KSA checkpoint at `hf_path` (local directory or hub repo id)
    into an mlx-ksa model directory `mlx_path`; see the module docstring."""
    dst = Path(mlx_path)
    if (dst.exists() or dst.is_symlink()) and not overwrite:
        raise ValueError(f"{dst} already exists (pass overwrite=True / --overwrite to replace it)")
    if not quantize and (q_bits or q_group_size or quant_predicate):
        raise ValueError("q_bits, q_group_size and quant_predicate need quantize=True (-q)")
    q_bits, q_group_size = q_bits or 4, q_group_size or 64
    if quantize and (q_bits not in Q_BITS or q_group_size not in Q_GROUP_SIZES):
        raise ValueError(f"quantization supports bits {Q_BITS} and group sizes {Q_GROUP_SIZES}, "
                         f"got {q_bits} bits, group size {q_group_size}")
    if isinstance(quant_predicate, str) and quant_predicate not in QUANT_RECIPES:
        raise ValueError(f"unknown quant predicate {quant_predicate!r}; choose one of {', '.join(QUANT_RECIPES)}")
    if not (quant_predicate is None or isinstance(quant_predicate, str) or callable(quant_predicate)):
        raise ValueError("quant_predicate must be a recipe name or a callable (path, module) -> bool | dict")
    if dtype is not None and dtype not in MODEL_CONVERSION_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(MODEL_CONVERSION_DTYPES)}, got {dtype!r}")

    src, repo = _fetch(hf_path, revision)
    s, d = src.resolve(), dst.resolve()
    if s == d or s in d.parents or d in s.parents:
        raise ValueError(f"{dst} overlaps the source {src}: choose a destination outside it")
    config, args = _read_config(src)
    config.pop("auto_map", None)

    dst.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        staging = lambda: Path(stack.enter_context(
            tempfile.TemporaryDirectory(dir=dst.parent, prefix=f".{dst.name}.staging-")))
        print("[INFO] Loading")
        weights = _load_weights(_weight_files(src, staging))
        renamed = {}
        if "model.tok_embeddings.weight" in weights or "summary_embedding.weight" in weights:
            weights, renamed = _from_muse(weights, args)
        model = Model(args)
        weights = model.sanitize(weights)
        _check_weights(weights, model, renamed)
        model.load_weights(list(weights.items()))
        del weights

        # Newer transformers write "dtype" where older ones wrote "torch_dtype".
        dtype = dtype or config.get("torch_dtype") or config.get("dtype")
        if dtype in MODEL_CONVERSION_DTYPES:
            print("[INFO] Using dtype:", dtype)
            cast = getattr(mx, dtype)
            model.update(tree_map(
                lambda v: v.astype(cast) if mx.issubdtype(v.dtype, mx.floating) else v, model.parameters()))
            config["torch_dtype"] = dtype
            if "dtype" in config:
                config["dtype"] = dtype
        if quantize:
            print("[INFO] Quantizing")
            predicate = (mixed_quant_predicate_builder(quant_predicate, model, q_group_size)
                         if isinstance(quant_predicate, str) else quant_predicate)
            model, config = quantize_model(model, config, q_group_size, q_bits, quant_predicate=predicate)

        tmp = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}.tmp-"))
        # mkdtemp makes it private (0700); the model gets the permissions a mkdir would give.
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)
        try:
            save_model(tmp, model, donate_model=True)
            save_config(config, tmp / "config.json")
            _copy_tokenizer(src, tmp)
            recipe = quant_predicate if isinstance(quant_predicate, str) else quant_predicate and "custom"
            _model_card(tmp, dst.name, repo or str(hf_path), _settings(dtype or "source dtype", config, recipe))
            _publish(tmp, dst, overwrite)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    print(f"[INFO] Saved {dst}")


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        # One line, as for every other failure (argparse would print the usage first).
        self.exit(2, f"error: {message} (see --help)\n")


def configure_parser():
    parser = _Parser(
        description="Convert a KSA checkpoint (Hugging Face safetensors, PyTorch .bin/.pt, Muse names) to MLX")
    parser.add_argument("--hf-path", "--model", required=True,
                        help="Local model directory or Hugging Face repo id (needs config.json)")
    parser.add_argument("--mlx-path", default="mlx_model", help="Directory to write the MLX model to")
    parser.add_argument("-q", "--quantize", action="store_true", help="Quantize the linear and embedding layers")
    parser.add_argument("--q-group-size", type=int, choices=Q_GROUP_SIZES, help="Quantization group size (64)")
    parser.add_argument("--q-bits", type=int, choices=Q_BITS, help="Bits per weight (4)")
    parser.add_argument("--quant-predicate", choices=QUANT_RECIPES, help="Mixed-bit recipe (mlx-lm's)")
    parser.add_argument("--dtype", choices=MODEL_CONVERSION_DTYPES,
                        help="dtype of the float parameters (default: config.json's torch_dtype)")
    parser.add_argument("--revision", help="Hub revision (branch, tag or commit)")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing --mlx-path")
    return parser


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv=None):
    args = configure_parser().parse_args(argv)
    # `kill` cleans up like Ctrl-C: the temporary directories are removed on the way out.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        convert(**vars(args))
    except KeyboardInterrupt:
        print("error: interrupted, nothing was written", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # one line for the user; the API raises with the same message
        print("error:", " ".join(str(e).split()) or type(e).__name__, file=sys.stderr)
        sys.exit(1)
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    main()
