"""mlx-ksa: Kwai Summary Attention models in MLX."""

from .cache import KSACache
from .model import Model, ModelArgs
from .utils import load, load_model, make_prompt_cache

__all__ = ["KSACache", "Model", "ModelArgs", "load", "load_model", "make_prompt_cache"]
__version__ = "0.1.0"
