"""mlx-ksa: Kwai Summary Attention models in MLX."""

import warnings

from .cache import KSACache
from .convert import convert
from .model import Model, ModelArgs
from .utils import load, load_model, make_prompt_cache

__all__ = ["KSACache", "Model", "convert", "ModelArgs", "load", "load_model", "make_prompt_cache"]
__version__ = "0.1.0"
# `python -m mlx_ksa.convert` runs a module this package already imported (for
# the `convert` export); runpy warns about that, harmlessly, on every run.
warnings.filterwarnings("ignore", r"'mlx_ksa\.convert' found in sys\.modules", RuntimeWarning)
