"""Loading KSA models: official HF-format checkpoints and mlx-ksa directories."""

import contextlib
import json
import re
from pathlib import Path

from mlx_lm.utils import _download, load_tokenizer
from mlx_lm.utils import load_model as _mlx_lm_load_model

from .model import Model, ModelArgs


def _model_classes(config):
    return Model, ModelArgs


def load_model(path, lazy=False, model_config=None):
    """(model, config) from a local directory holding config.json and safetensors.

    Reads the official HF layout (summary rows inside embed_tokens) and
    mlx-ksa's own, quantized or not. Never imports or runs code from the
    checkpoint: the official `auto_map` template is ignored.
    """
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path} has no config.json: not a model directory")
    if not list(path.glob("model*.safetensors")):
        found = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
        hint = f" (found {', '.join(found)}: convert them with python -m mlx_ksa.convert)" if found else ""
        raise FileNotFoundError(f"no model*.safetensors in {path}{hint}")
    with weight_read_errors(path):
        try:
            return _mlx_lm_load_model(path, lazy, model_config=model_config,
                                      get_model_classes=_model_classes)
        except json.JSONDecodeError as e:
            raise ValueError(f"{config_file} is not valid JSON: {e}") from None
        except (ValueError, TypeError) as e:
            # mlx-lm infers a quantized layer's bits from its packed shape, so a
            # config whose sizes do not match the weights surfaces as odd bits.
            hint = " (do config.json's sizes match the weights?)" if "[quantize]" in str(e) else ""
            raise ValueError(f"cannot load the KSA model in {path}: {e}{hint}") from None


@contextlib.contextmanager
def weight_read_errors(path):
    """mx.load's RuntimeError on a truncated or corrupt weight file, as a
    ValueError naming the model directory (for any loader)."""
    try:
        yield
    except RuntimeError as e:
        raise ValueError(f"cannot read the weights in {path}: {e}") from None


# The small KSA model shipped inside the package (its card: README.md there).
DEFAULT_MODEL = Path(__file__).parent / "default_model"

# What may go to the Hugging Face hub: "name" or "owner/name". Anything else
# that does not exist locally is a mistyped path, reported as one.
REPO_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")


def local_path(spec):
    """The existing local path `spec` names, or None for a hub repo id; a
    ValueError when it is neither."""
    path = Path(spec).expanduser()
    if path.exists():
        return path
    if not REPO_ID.fullmatch(str(spec)) or str(spec).startswith("."):
        raise ValueError(f"model {spec} does not exist (and is not a Hugging Face repo id)")
    return None


def fetch(spec, revision=None):
    """The local directory of a model path or hub repo id (downloaded)."""
    local_path(spec)
    return Path(_download(str(spec), revision=revision))


def load(path_or_hf_repo=DEFAULT_MODEL, tokenizer_config=None, model_config=None, adapter_path=None,
         lazy=False, return_config=False, revision=None):
    """(model, tokenizer) as mlx_lm.load gives them; a repo id is downloaded;
    no argument: the model shipped in the package.
    adapter_path: LoRA adapters saved by `python -m mlx_ksa.train finetune`."""
    path = fetch(path_or_hf_repo, revision)
    model, config = load_model(path, lazy, model_config=model_config)
    if adapter_path is not None:
        from mlx_lm.tuner.utils import load_adapters

        model = load_adapters(model, adapter_path)
        model.eval()
    tokenizer = load_tokenizer(path, tokenizer_config, eos_token_ids=config.get("eos_token_id"))
    return (model, tokenizer, config) if return_config else (model, tokenizer)


def make_prompt_cache(model, max_context=None):
    """The per-layer KSA caches for `model` (see Model.make_cache)."""
    return model.make_cache(max_context)
